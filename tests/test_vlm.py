"""The VLM of lesson 04: the lecture's fusion, KV-cached decoding, the answer-only loss.

- KV-cached decoding gives the logits of full recomputation at every step (float64, every fusion,
  a batch of prompts of different lengths, each also equal to its prompt decoded alone);
- causality: text states never depend on later text tokens; every text query sees the image;
  with fusion="lecture" the image states are not updated by the decoder;
- the loss is on the answer tokens only;
- gradients of a tiny VLM end to end against finite differences.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinymm as tm
import tinymm.functional as F
from tinymm.data.qa import IGNORE_INDEX, chat_batch, qa_splits, train_chat_tokenizer
from tinymm.gradcheck import gradcheck
from tinymm.models import ViT
from tinymm.models.vlm import FUSIONS, VLM, _heads, joint_mask, sincos_2d

VOCAB = 23


def tiny_vlm(fusion: str, seed: int = 0, dtype=np.float64, depth: int = 2) -> VLM:
    tm.manual_seed(seed)
    vision = ViT(16, 8, 3, dim=8, depth=1, heads=2)  # 2 x 2 = 4 patches
    model = VLM(vision, VOCAB, 8, depth, 2, fusion, max_len=16, num_queries=4, vision_ids=(1, 2))
    for p in model.parameters():
        p.data = p.data.astype(dtype)
    return model.eval()


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(n, 16, 16, 3))


PROMPTS = [[3, 4, 5], [6], [7, 8, 9, 10, 11], [12, 13]]


@pytest.mark.parametrize("fusion", FUSIONS)
def test_cached_decoding_equals_full_recomputation_at_every_step(fusion):
    model = tiny_vlm(fusion)
    x = images(len(PROMPTS))
    cached, cached_logits = model.generate(x, PROMPTS, 6, return_logits=True)
    full, full_logits = model.generate(x, PROMPTS, 6, use_cache=False, return_logits=True)
    assert cached_logits.shape == (len(PROMPTS), 6, VOCAB)
    np.testing.assert_allclose(cached_logits, full_logits, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(cached, full)
    for i, prompt in enumerate(PROMPTS):  # left padding is masked: the same as decoding alone
        alone, alone_logits = model.generate(x[i : i + 1], [prompt], 6, return_logits=True)
        np.testing.assert_allclose(alone_logits[0], cached_logits[i], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(alone[0], cached[i])


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_fast_decoding_step_equals_the_tensor_composition(fusion, threads, activation, monkeypatch):
    """generate's NumPy decoding step (`_decode_step`, preallocated cache) gives the logits of
    the Tensor-op step (`_extend`, reference mode), padded prompts included; a batch split
    over two threads too; the decoder's tanh GELU (the default) and the exact one."""
    from tinymm import parallel

    model = tiny_vlm(fusion)
    for block in model.blocks:
        block.mlp.activation = activation
    x = images(len(PROMPTS))
    assert model._fast_decoding()
    monkeypatch.setattr(parallel, "MIN_SIZE", 16)  # split even this tiny batch
    monkeypatch.setattr(parallel, "_threads", threads)
    fast, fast_logits = model.generate(x, PROMPTS, 6, return_logits=True)
    with tm.reference_mode():
        assert not model._fast_decoding()
        slow, slow_logits = model.generate(x, PROMPTS, 6, return_logits=True)
    np.testing.assert_allclose(fast_logits, slow_logits, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(fast, slow)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_greedy_tokens_are_the_same_whether_the_logits_are_returned_or_not(fusion):
    """Greedy decoding takes the argmax of the float32 logits as they are, and casts them to
    float64 only to return them: the same tokens either way (float32, as the lessons run)."""
    model = tiny_vlm(fusion, dtype=np.float32)
    x = images(len(PROMPTS)).astype(np.float32)
    tokens = model.generate(x, PROMPTS, 6)
    returned, logits = model.generate(x, PROMPTS, 6, return_logits=True)
    assert logits.dtype == np.float64
    np.testing.assert_array_equal(tokens, returned)
    np.testing.assert_array_equal(tokens, logits.argmax(axis=-1))


@settings(max_examples=6)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=2, max_size=3),
    fusion=st.sampled_from(FUSIONS),
    seed=st.integers(0, 2**16),
)
def test_cached_logits_match_the_forward_pass_on_the_whole_sequence(lengths, fusion, seed):
    """The cached logits of step t are the forward pass's logits at the last real token of
    prompt + the t tokens written so far (each sequence alone, no padding)."""
    model = tiny_vlm(fusion, seed % 7)
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(3, VOCAB, n)) for n in lengths]
    x = images(len(prompts), seed)
    tokens, logits = model.generate(x, prompts, 4, temperature=1.0, seed=seed, return_logits=True)
    for i, prompt in enumerate(prompts):
        seq = np.array([prompt + list(tokens[i, :-1])])
        with tm.no_grad():
            full = model(x[i : i + 1], seq).data[0, len(prompt) - 1 :]
        np.testing.assert_allclose(logits[i], full, rtol=0, atol=1e-11)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_text_states_never_depend_on_later_text_tokens(fusion):
    model = tiny_vlm(fusion)
    x, ids = images(2), np.random.default_rng(1).integers(3, VOCAB, (2, 7))
    with tm.no_grad():
        base = model(x, ids).data
        for j in range(7):
            changed = ids.copy()
            changed[:, j] = (changed[:, j] + 5) % VOCAB
            out = model(x, changed).data
            np.testing.assert_array_equal(out[:, :j], base[:, :j])  # before j: untouched
            assert np.abs(out[:, j:] - base[:, j:]).max() > 1e-6  # from j on: it matters


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_text_query_sees_the_image(fusion):
    model = tiny_vlm(fusion)
    ids = np.random.default_rng(1).integers(3, VOCAB, (2, 6))
    with tm.no_grad():
        a, weights = model(images(2, 0), ids, return_weights=True)
        b = model(images(2, 1), ids)
    assert np.all(np.abs(a.data - b.data).max(axis=-1) > 1e-6)  # every position, the first too
    n_img = weights.shape[-1] - ids.shape[1]
    assert np.all(weights[..., :n_img].sum(-1) > 0)  # every block, head and query


def test_joint_mask_shows_every_image_key_and_the_causal_real_text_keys():
    text_mask = np.array([[True, True, True, False], [True, True, True, True]])
    m = joint_mask(3, text_mask)
    assert m.shape == (2, 1, 4, 7)
    assert m[..., :3].all()  # image keys: always visible
    causal = np.tril(np.ones((4, 4), dtype=bool))
    np.testing.assert_array_equal(m[1, 0, :, 3:], causal)
    np.testing.assert_array_equal(m[0, 0, :, 3:], causal & [True, True, True, False])


def test_lecture_fusion_never_updates_the_image_states():
    """The keys and values every block reads from the image are that block's projections of
    the same Z_img (the decoder's input), whatever the text; with a prefix they are not."""
    x, ids = images(2), np.random.default_rng(2).integers(3, VOCAB, (2, 5))
    mask = np.ones(ids.shape, dtype=bool)
    for fusion, expect_same in (("lecture", True), ("prefix", False)):
        model = tiny_vlm(fusion, depth=3)
        with tm.no_grad():
            z_img = model.image_tokens(x)
            _, cache, _ = model._prefill(z_img, ids, mask)
            n_img = z_img.shape[1]
            same = []
            for block, (k, v) in zip(model.blocks, cache, strict=True):
                h = block.ln1(z_img)
                k0, v0 = _heads(block.attn.k_proj(h), 2).data, _heads(block.attn.v_proj(h), 2).data
                same.append(
                    np.allclose(k.data[:, :, :n_img], k0) and np.allclose(v.data[:, :, :n_img], v0)
                )
        assert all(same) if expect_same else not all(same[1:]), (fusion, same)


def test_generate_samples_reproducibly_and_top_k_1_is_greedy():
    model = tiny_vlm("lecture")
    x = images(2)
    greedy = model.generate(x, PROMPTS[:2], 5)
    a = model.generate(x, PROMPTS[:2], 5, temperature=2.0, seed=7)
    b = model.generate(x, PROMPTS[:2], 5, temperature=2.0, seed=7)
    np.testing.assert_array_equal(a, b)
    top1 = model.generate(x, PROMPTS[:2], 5, temperature=2.0, top_k=1, seed=3)
    np.testing.assert_array_equal(top1, greedy)
    many = model.generate(np.repeat(x[:1], 16, 0), [PROMPTS[0]] * 16, 5, temperature=5.0, seed=1)
    assert len({tuple(r) for r in many}) > 1  # sampling does sample


def test_generate_stops_after_eos_and_pads():
    model = tiny_vlm("lecture")
    x = images(2)
    free = model.generate(x, PROMPTS[:2], 6)
    eos = int(free[0, -1])  # pretend a token the model writes is the end of text
    out = model.generate(x, PROMPTS[:2], 6, eos_id=eos, pad_id=0)
    for row, unstopped in zip(out, free, strict=True):
        stop = int(np.argmax(unstopped == eos)) if eos in unstopped else len(unstopped)
        np.testing.assert_array_equal(row[: stop + 1], unstopped[: stop + 1])
        assert np.all(row[stop + 1 :] == 0)
    assert eos in out[0]


# --- the answer-only loss ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat():
    data = qa_splits(12, 1, 1, seed=0)["train"]
    return data, train_chat_tokenizer(data.questions + data.answers, 300)


def test_chat_batch_targets_are_the_answer_tokens_only(chat):
    data, tokenizer = chat
    ids, targets, mask = chat_batch(tokenizer, data.questions, data.answers)
    assistant = tokenizer.special_ids["<|assistant|>"]
    for row in range(len(ids)):
        n = mask[row].sum()
        start = int(np.flatnonzero(ids[row] == assistant)[0])  # the last prompt token
        assert np.all(targets[row, :start] == IGNORE_INDEX)
        assert np.all(targets[row, n:] == IGNORE_INDEX) and np.all(~mask[row, n:])
        np.testing.assert_array_equal(targets[row, start : n - 1], ids[row, start + 1 : n])
        assert targets[row, n - 1] == tokenizer.eos_id
        answer = tokenizer.decode(targets[row, start:n])
        assert answer.strip() == data.answers[row]


def test_changing_a_masked_label_changes_nothing(chat):
    """The loss is the mean of -log p(target) over the answer positions only: the logits at
    prompt and padding positions get no gradient, and the padding ids change nothing."""
    data, tokenizer = chat
    ids, targets, mask = chat_batch(tokenizer, data.questions[:6], data.answers[:6])
    model = VLM(ViT(32, 8, 3, 8, 1, 2), tokenizer.vocab_size, 8, 1, 2, max_len=64)
    x = data.scenes.images[data.image[:6]]
    with tm.no_grad():
        logits = tm.tensor(model(x, ids, mask).data.astype(np.float64), requires_grad=True)
    loss = F.cross_entropy(logits, targets)
    loss.backward()
    answer = targets != IGNORE_INDEX
    logp = logits.data - np.log(np.exp(logits.data).sum(-1, keepdims=True))
    rows, cols = np.nonzero(answer)
    assert loss.item() == pytest.approx(-logp[rows, cols, targets[rows, cols]].mean(), rel=1e-9)
    assert np.all(logits.grad[~answer] == 0) and np.all(np.abs(logits.grad[answer]).sum(-1) > 0)
    # a label at a masked position, whatever it is, changes nothing ...
    rng = np.random.default_rng(0)
    other = np.where(answer, targets, rng.integers(0, tokenizer.vocab_size, targets.shape))
    assert F.cross_entropy(logits, np.where(answer, other, IGNORE_INDEX)).item() == loss.item()
    # ... unless it is unmasked: then the prompt's labels count (the check can fail)
    assert F.cross_entropy(logits, other).item() != pytest.approx(loss.item(), rel=1e-3)
    noisy_padding = np.where(mask, ids, rng.integers(0, tokenizer.vocab_size, ids.shape))
    with tm.no_grad():
        padded = F.cross_entropy(model(x, noisy_padding, mask), targets).item()
    assert padded == pytest.approx(loss.item(), rel=1e-5)  # padding ids change nothing


# --- gradients ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
def test_tiny_vlm_gradients_match_finite_differences(fusion):
    model = tiny_vlm(fusion, depth=1)
    model.train()
    x = tm.tensor(images(2), requires_grad=True)
    ids = np.array([[3, 4, 5, 6], [7, 8, 0, 0]])
    mask = ids != 0
    targets = np.where(mask, np.roll(ids, -1, 1), IGNORE_INDEX)
    targets[:, 0] = IGNORE_INDEX

    def loss(image, *params):
        return F.cross_entropy(model(image, ids, mask), targets)

    params = [
        model.pos_embedding,
        model.image_projection.weight,
        model.blocks[0].attn.k_proj.weight,
        model.blocks[0].attn.q_proj.bias,
        model.lm_head.weight,
        model.vision.patch_embedding.weight,
    ]
    if fusion == "resampler":
        params += [model.resampler.queries, model.resampler.attn.k_proj.weight]
    assert gradcheck(loss, [x, *params], atol=1e-6, rtol=1e-5)


def test_sincos_2d_codes_each_cell_differently_and_rejects_odd_dims():
    codes = sincos_2d(3, 3, 16, (4, 4))
    assert codes.shape == (9, 16)
    distances = np.linalg.norm(codes[:, None] - codes[None], axis=-1)
    assert np.all(distances[~np.eye(9, dtype=bool)] > 0.1)
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d(2, 2, 6, (2, 2))


# --- errors ---------------------------------------------------------------------------------------


def test_bad_arguments_are_named():
    vision = ViT(16, 8, 3, 8, 1, 2)
    with pytest.raises(ValueError, match="fusion"):
        VLM(vision, VOCAB, 8, 1, 2, fusion="late")
    with pytest.raises(TypeError, match="ViT"):
        VLM("vit", VOCAB, 8, 1, 2)
    with pytest.raises(ValueError, match="square"):
        VLM(vision, VOCAB, 8, 1, 2, fusion="resampler", num_queries=5)
    model = tiny_vlm("lecture")
    x = images(2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(x, PROMPTS[:2], 0)
    with pytest.raises(ValueError, match="max_len"):
        model.generate(x, PROMPTS[:2], 15)
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        model.generate(x, PROMPTS[:3], 2)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(x, PROMPTS[:2], 2, temperature=1.0, top_k=0)
    with pytest.raises(IndexError, match="token ids"):
        model(x, np.array([[1, VOCAB], [1, 2]]))
    with pytest.raises(ValueError, match="mask"):
        model(x, np.array([[1, 2], [1, 2]]), np.ones((2, 3), dtype=bool))
