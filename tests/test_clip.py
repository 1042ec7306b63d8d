"""CLIP: the symmetric contrastive loss, the two towers' embeddings, the temperature, zero-shot.

F.clip_loss is checked against a hand computation in NumPy, against its invariants (swapping the
two sides, permuting the batch consistently, ln N when every similarity is equal) and against
finite differences. The model: unit-norm embeddings, an [EOS] state blind to the tokens after it,
logit_scale's initial value and clamp, and a zero-shot classifier that picks the right class.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import logsumexp

import tinymm as tm
import tinymm.functional as F
from tinymm.data import BPETokenizer
from tinymm.gradcheck import gradcheck
from tinymm.models import TextTransformer, ViT
from tinymm.models.clip import CLIP, MAX_LOGIT_SCALE, normalize, tokenize, zero_shot_classifier


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_clip_loss(v: np.ndarray, t: np.ndarray, scale: float) -> float:
    """The lecture's formulas, written out: -1/N sum_i log softmax_j(S_ij / tau)[i], both ways."""
    s = np.exp(scale) * v @ t.T
    n = len(s)
    image_to_text = -np.mean([s[i, i] - logsumexp(s[i, :]) for i in range(n)])
    text_to_image = -np.mean([s[j, j] - logsumexp(s[:, j]) for j in range(n)])
    return (image_to_text + text_to_image) / 2


# ----------------------------------------------------------------------------------------------
# F.clip_loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, d, scale", [(1, 3, 0.0), (5, 4, math.log(1 / 0.07)), (16, 8, 4.6)])
def test_clip_loss_matches_the_lecture_written_in_numpy(n, d, scale):
    rng = np.random.default_rng(n)
    v, t = unit_rows(rng, n, d), unit_rows(rng, n, d)
    loss = F.clip_loss(tm.tensor(v), tm.tensor(t), tm.tensor(np.float64(scale)))
    np.testing.assert_allclose(loss.item(), numpy_clip_loss(v, t, scale), rtol=1e-10)
    loss32 = F.clip_loss(tm.tensor(v.astype(np.float32)), tm.tensor(t.astype(np.float32)), scale)
    assert loss32.dtype == np.float32
    np.testing.assert_allclose(loss32.item(), numpy_clip_loss(v, t, scale), rtol=1e-5)


def test_clip_loss_is_not_one_sided():
    """A batch where image->text is easy but text->image is not: both directions count."""
    v = np.array([[1.0, 0.0], [1.0, 0.0]])  # two identical images
    t = np.array([[1.0, 0.0], [0.0, 1.0]])
    s = v @ t.T  # row i: [1, 0]; column 0: [1, 1]
    image_to_text = -np.mean([s[0, 0] - logsumexp(s[0]), s[1, 1] - logsumexp(s[1])])
    text_to_image = -np.mean([s[0, 0] - logsumexp(s[:, 0]), s[1, 1] - logsumexp(s[:, 1])])
    assert image_to_text != pytest.approx(text_to_image)
    loss = F.clip_loss(tm.tensor(v), tm.tensor(t), 0.0).item()
    assert loss == pytest.approx((image_to_text + text_to_image) / 2)


@given(n=st.integers(1, 12), d=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_clip_loss_is_symmetric_in_its_two_sides(n, d, seed):
    rng = np.random.default_rng(seed)
    v, t = tm.tensor(unit_rows(rng, n, d)), tm.tensor(unit_rows(rng, n, d))
    scale = float(rng.uniform(0, 4.6))
    assert F.clip_loss(v, t, scale).item() == pytest.approx(F.clip_loss(t, v, scale).item())


@given(n=st.integers(1, 12), d=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_clip_loss_is_invariant_to_permuting_the_batch_consistently(n, d, seed):
    rng = np.random.default_rng(seed)
    v, t = unit_rows(rng, n, d), unit_rows(rng, n, d)
    order = rng.permutation(n)
    base = F.clip_loss(tm.tensor(v), tm.tensor(t), 2.0).item()
    assert F.clip_loss(tm.tensor(v[order]), tm.tensor(t[order]), 2.0).item() == pytest.approx(base)


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_clip_loss_is_ln_n_when_every_similarity_is_equal(n):
    v = np.tile([[0.6, 0.8]], (n, 1))  # every image and every text the same unit vector
    loss = F.clip_loss(tm.tensor(v), tm.tensor(v), math.log(1 / 0.07))
    assert loss.item() == pytest.approx(math.log(n), abs=1e-12)


def test_clip_loss_falls_to_zero_for_perfectly_separated_pairs():
    v = np.eye(8)
    assert 0 <= F.clip_loss(tm.tensor(v), tm.tensor(v), math.log(100)).item() < 1e-40


@given(n=st.integers(1, 6), d=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_clip_loss_gradient_matches_finite_differences(n, d, seed):
    rng = np.random.default_rng(seed)
    v = tm.tensor(rng.standard_normal((n, d)), requires_grad=True)
    t = tm.tensor(rng.standard_normal((n, d)), requires_grad=True)
    scale = tm.tensor(np.float64(rng.uniform(0, 2)), requires_grad=True)
    assert gradcheck(lambda a, b, s: F.clip_loss(normalize(a), normalize(b), s), [v, t, scale])


def test_clip_loss_rejects_mismatched_batches():
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(5, 3\)"):
        F.clip_loss(tm.zeros(4, 3), tm.zeros(5, 3), 1.0)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

TEXTS = [
    "a large red circle in the top left",
    "a small blue star in the bottom right",
    "a photo of a circle",
    "a photo of a square",
]


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    return BPETokenizer.train(TEXTS, 290)


def small_clip(vocab_size: int, seed: int = 0) -> CLIP:
    tm.manual_seed(seed)
    vision = ViT(16, 4, 3, dim=16, depth=1, heads=2)
    text = TextTransformer(vocab_size, 16, dim=16, depth=2, heads=2)
    return CLIP(vision, text, embed_dim=8)


def test_embeddings_have_unit_norm_and_gradients_reach_both_towers(tokenizer):
    model = small_clip(tokenizer.vocab_size)
    images = np.random.default_rng(0).random((4, 16, 16, 3)).astype(np.float32)
    ids, eos = tokenize(tokenizer, TEXTS, 16)
    v, t = model(images, ids, eos)
    assert v.shape == t.shape == (4, 8) and v.dtype == t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v.data, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(t.data, axis=1), 1, atol=1e-6)
    F.clip_loss(v, t, model.logit_scale).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and np.any(p.grad != 0), name


def test_normalize_divides_by_the_norm_and_is_differentiable():
    x = np.random.default_rng(1).standard_normal((3, 4))
    np.testing.assert_allclose(normalize(tm.tensor(x)).data, x / np.linalg.norm(x, axis=1)[:, None])
    assert gradcheck(normalize, [tm.tensor(x, requires_grad=True)])


def test_tokenize_finds_eos_and_pads(tokenizer):
    ids, eos = tokenize(tokenizer, TEXTS, 16)
    assert ids.shape[0] == 4 and (ids[np.arange(4), eos] == tokenizer.eos_id).all()
    assert eos[2] < eos[0] and (ids[2, eos[2] + 1 :] == tokenizer.pad_id).all()


def test_text_embedding_at_eos_ignores_the_tokens_after_it(tokenizer):
    model = small_clip(tokenizer.vocab_size)
    ids, eos = tokenize(tokenizer, TEXTS, 16)
    other = ids.copy()
    rng = np.random.default_rng(0)
    for row, e in enumerate(eos):  # scramble everything after [EOS] (padding)
        other[row, e + 1 :] = rng.integers(0, tokenizer.vocab_size, ids.shape[1] - e - 1)
    assert not np.array_equal(other, ids)
    with tm.no_grad():
        a, b = model.encode_text(ids, eos).data, model.encode_text(other, eos).data
        before_eos = model.encode_text(ids[:, 1:], eos - 1).data  # drop a token before: changes
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(a, before_eos, atol=1e-3)


def test_logit_scale_starts_at_ln_1_over_0_07_and_is_clamped_to_ln_100(tokenizer):
    model = small_clip(tokenizer.vocab_size)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    assert model.temperature == pytest.approx(0.07, rel=1e-6)
    assert MAX_LOGIT_SCALE == pytest.approx(math.log(100))
    model.logit_scale.data[...] = 7.0
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(100), rel=1e-6)
    model.logit_scale.data[...] = 1.5  # below the cap: unchanged
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 1.5


def test_logit_scale_is_learned_and_a_step_can_cross_the_cap_until_clamped(tokenizer):
    model = small_clip(tokenizer.vocab_size)
    model.logit_scale.data[...] = MAX_LOGIT_SCALE - 1e-3
    v = normalize(tm.tensor(np.eye(4, 8, dtype=np.float32) + 1))  # S_ii = 1 > S_ij = 0.91
    F.clip_loss(v, v, model.logit_scale).backward()
    assert model.logit_scale.grad < 0  # every pair is matched: a sharper softmax helps
    tm.optim.SGD([model.logit_scale], lr=1.0).step()
    assert model.logit_scale.item() > MAX_LOGIT_SCALE
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)


# ----------------------------------------------------------------------------------------------
# Zero-shot classification
# ----------------------------------------------------------------------------------------------


class KeywordText(tm.nn.Module):
    """A hand-built 'text tower': the [EOS] state is the one-hot of the first class word seen."""

    def __init__(self, tokenizer: BPETokenizer, words: list[str]):
        super().__init__()
        self.tokenizer, self.words = tokenizer, words
        self.max_len, self.dim = 16, len(words)

    def forward(self, ids: np.ndarray, eos_positions: np.ndarray) -> tm.Tensor:
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        for row, seq in enumerate(ids):
            text = self.tokenizer.decode(seq[: eos_positions[row]]).split()
            out[row, [self.words.index(w) for w in text if w in self.words][0]] = 1.0
        return tm.tensor(out)


def test_zero_shot_classifier_picks_the_class_whose_prompts_match(tokenizer):
    words = ["circle", "square"]
    model = small_clip(tokenizer.vocab_size)
    model.text = KeywordText(tokenizer, words)
    model.text_projection = tm.nn.Linear(2, 2, bias=False)
    model.text_projection.weight.data[...] = np.eye(2)
    W = zero_shot_classifier(model, tokenizer, words, ["a photo of a {}", "a {} in the top left"])
    assert W.shape == (2, 2)
    np.testing.assert_allclose(np.linalg.norm(W, axis=0), 1, atol=1e-6)
    np.testing.assert_allclose(W, np.eye(2), atol=1e-6)  # class k's prompts -> axis k
    image_embeds = normalize(tm.tensor([[0.9, 0.1], [0.2, 0.8], [1.0, -0.5]])).data
    assert list((image_embeds @ W).argmax(1)) == [0, 1, 0]


def test_zero_shot_classifier_averages_templates_then_renormalises(tokenizer):
    model = small_clip(tokenizer.vocab_size)
    templates = ["a photo of a {}", "a large red {} in the top left"]
    W = zero_shot_classifier(model, tokenizer, ["circle", "square", "star"], templates)
    assert W.shape == (8, 3) and W.dtype == np.float32
    for k, name in enumerate(["circle", "square", "star"]):
        ids, eos = tokenize(tokenizer, [t.format(name) for t in templates], 16)
        with tm.no_grad():
            mean = model.encode_text(ids, eos).data.mean(0)
        np.testing.assert_allclose(W[:, k], mean / np.linalg.norm(mean), atol=1e-5)
    with pytest.raises(ValueError, match="'{}'"):
        zero_shot_classifier(model, tokenizer, ["circle"], ["a photo"])


def test_save_clip_then_load_clip_gives_the_same_model_and_tokenizer(tokenizer, tmp_path):
    from tinymm.models.clip import load_clip, save_clip

    model = small_clip(tokenizer.vocab_size, seed=3)
    config = dict(image_size=16, patch_size=4, dim=16, vit_depth=1, text_depth=2, heads=2)
    config |= dict(embed_dim=8, max_len=16, vocab_size=tokenizer.vocab_size)
    save_clip(model, tokenizer, tmp_path / "clip", config)
    loaded, loaded_tokenizer = load_clip(tmp_path / "clip")
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name], value, err_msg=name)
    assert loaded_tokenizer.merges == tokenizer.merges
    assert loaded_tokenizer.special_tokens == tokenizer.special_tokens
    images = np.random.default_rng(0).uniform(size=(2, 16, 16, 3)).astype(np.float32)
    ids, eos = tokenize(tokenizer, TEXTS[:2], 16)
    with tm.no_grad():
        for a, b in zip(model(images, ids, eos), loaded(images, ids, eos), strict=True):
            np.testing.assert_array_equal(a.data, b.data)
    with pytest.raises(FileNotFoundError, match="lacks"):
        load_clip(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="config lacks"):
        save_clip(model, tokenizer, tmp_path / "bad", {"dim": 16})


def test_text_transformer_causal_or_bidirectional_and_its_padding_mask():
    """Causal: a token's state ignores the tokens after it. causal=False: it depends on them,
    and with a mask the padding (the masked tokens) changes nothing."""
    tm.manual_seed(0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30, (3, 8))
    later = ids.copy()
    later[:, 5:] = (ids[:, 5:] + 1) % 30  # change tokens 5..7
    mask = np.ones(ids.shape, bool)
    mask[:, 5:] = False  # ... which are padding for the masked encoder
    for causal in (True, False):
        text = TextTransformer(30, 8, dim=16, depth=2, heads=2, causal=causal)
        with tm.no_grad():
            a, b = text.encode(ids).data, text.encode(later).data
            am, bm = text.encode(ids, mask=mask).data, text.encode(later, mask=mask).data
        assert np.allclose(a[:, :5], b[:, :5], atol=1e-6) == causal
        np.testing.assert_allclose(am[:, :5], bm[:, :5], atol=1e-6)
    with pytest.raises(ValueError, match="mask"):
        text.encode(ids, mask=mask[:, :4])


def test_text_transformer_embedding_std_sets_the_scale_of_the_word_embeddings():
    tm.manual_seed(0)
    small = TextTransformer(200, 8, dim=32, depth=1, heads=2).token_embedding.weight.data
    big = TextTransformer(200, 8, dim=32, depth=1, heads=2, embedding_std=1.0)
    assert abs(small.std() - 0.02) < 0.002 and abs(big.token_embedding.weight.data.std() - 1) < 0.1
    with pytest.raises(ValueError, match="embedding_std"):
        TextTransformer(200, 8, dim=32, depth=1, heads=2, embedding_std=0.0)
