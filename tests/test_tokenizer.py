"""Byte-level BPE tokenizer: round trips, training invariants, specials, batching, files."""

import json
import os
import random
import subprocess
import sys
from collections import Counter
from functools import cache
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinymm.data.tokenizer import BPETokenizer, merge_pair, pretokenize

SIZES = ["small", "large", "tiny", "big", "medium"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring"]
PLACES = ["top left", "top right", "bottom left", "bottom right", "center", "middle"]
ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!",
    "How vexingly quick daft zebras jump; 3 of them, at 10:45 on 2024-05-17.",
    "A picture is worth a thousand words, but a caption is worth 12 tokens.",
    "Attention is all you need?  Maybe not -- patches, queries & keys too.",
    "Naïve café owners in Zürich serve crème brûlée (€4.50).",
    "def f(x_1): return x_1 ** 2  # snake_case",
]


@cache
def corpus() -> tuple[str, ...]:
    """Seeded shape captions plus some varied English."""
    rng = random.Random(0)
    captions = [
        f"a {rng.choice(SIZES)} {rng.choice(COLORS)} {rng.choice(SHAPES)}"
        f" in the {rng.choice(PLACES)}"
        for _ in range(600)
    ]
    return tuple(captions + ENGLISH * 5)


@cache
def trained(vocab_size: int = 400) -> BPETokenizer:
    return BPETokenizer.train(corpus(), vocab_size)


def naive_train(texts, n_merges):
    """Reference BPE: recount every pair of every word occurrence at every step."""
    words = [list(w.encode()) for t in texts for w in pretokenize(t)]
    merges = []
    for _ in range(n_merges):
        pairs = Counter(p for w in words for p in pairwise(w))
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = [merge_pair(w, best, 255 + len(merges)) for w in words]
    return merges


any_text = st.text(st.characters(categories=["Cs"]) | st.characters())  # with lone surrogates


@given(any_text)
def test_pretokenize_keeps_every_character(s):
    assert "".join(pretokenize(s)) == s


def test_pretokenize_words_keep_their_leading_space():
    assert pretokenize("a red  circle, 42x_y") == [
        "a", " red", " ", " circle", ",", " 4", "2", "x", "_", "y"
    ]  # fmt: skip


@given(st.text())
def test_round_trip_any_unicode(s):
    tok = trained()
    assert tok.decode(tok.encode(s)) == s
    assert tok.decode(tok.encode(s, add_bos=True, add_eos=False)) == s


@given(any_text)
def test_round_trip_with_lone_surrogates(s):
    tok = trained()
    assert tok.decode(tok.encode(s)) == s


@pytest.mark.parametrize(
    "s",
    [
        "",
        "a large red circle in the top left",
        "emoji 👩‍👩‍👧 🇯🇵 ok",
        "中文 日本語 한국어",
        "e\u0301 a\u0308\u0323",  # combining marks
        "\ud800 lone \udfff and a pair written as two halves \ud83d\ude00",
        "literal <eos> and <pad><bos> in the text",
        "\x00\t\n\r   \u3000 trailing   ",
    ],
)
def test_round_trip_hard_cases(s):
    tok = trained()
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert max(ids) < len(tok)


def test_training_is_deterministic_and_matches_naive_bpe():
    a, b = BPETokenizer.train(corpus(), 400), BPETokenizer.train(list(corpus()), 400)
    assert a.merges == b.merges
    texts = corpus()[:200] + tuple(ENGLISH)
    assert BPETokenizer.train(texts, 259 + 80).merges == naive_train(texts, 80)


def test_training_does_not_depend_on_hash_seed():
    code = (
        "import json, sys; sys.path.insert(0, 'tests'); import test_tokenizer as t;"
        "print(json.dumps(t.BPETokenizer.train(t.corpus(), 400).merges))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("0", "1", "12345")
    }
    assert len(outputs) == 1
    assert [tuple(m) for m in json.loads(outputs.pop())] == trained().merges


def test_ties_go_to_the_smallest_pair_whatever_the_corpus_order():
    assert BPETokenizer.train(["cd", "ab"], 259 + 2).merges == [(97, 98), (99, 100)]
    assert BPETokenizer.train(["ab", "cd"], 259 + 2).merges == [(97, 98), (99, 100)]


def test_first_merge_is_the_most_frequent_byte_pair():
    captions = corpus()[:600]  # lowercase words and single spaces: words are "a", " large", ...
    words = [
        w.encode() for c in captions for w in [c.split()[0]] + [" " + x for x in c.split()[1:]]
    ]
    pairs = Counter(p for w in words for p in pairwise(w))
    top = max(pairs.values())
    assert trained().merges[0] == min(p for p, n in pairs.items() if n == top)


def test_merges_never_cross_word_boundaries():
    tok = trained()
    for token in tok.token_bytes[256:]:
        text = token.decode("utf-8", "replace")
        if "\ufffd" not in text:
            assert pretokenize(text) == [text]


def test_merges_shrink_the_corpus_monotonically():
    def length(tok):
        return sum(len(tok.encode(c, add_eos=False)) for c in corpus())

    n_bytes = sum(len(c.encode()) for c in corpus())
    tokenizers = [BPETokenizer.train(corpus(), 259 + k) for k in (0, 1, 10, 50, 141)]
    lengths = [length(t) for t in tokenizers]
    assert lengths[0] == n_bytes
    assert all(a >= b for a, b in pairwise(lengths))
    assert lengths[-1] < 0.3 * n_bytes  # the captions become ~one token per word
    for small, big in pairwise(tokenizers):  # more merges only extend the list
        assert big.merges[: len(small.merges)] == small.merges


def test_vocab_size_is_respected():
    tok = trained()
    assert len(tok) == tok.vocab_size == 400 == 256 + len(tok.merges) + 3
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (397, 398, 399)
    small = BPETokenizer.train(["aaaa"], 1000)  # runs out of pairs: stops early
    assert len(small) < 1000 and small.encode("aaaa", add_eos=False) == [257]
    with pytest.raises(ValueError, match="vocab_size=258"):
        BPETokenizer.train(corpus(), 258)


@pytest.mark.parametrize(
    "specials", ["<pad><bos><eos>", ("<pad>", "<bos>"), ("<pad>", "<bos>", "<eos>", "<bos>")]
)
def test_bad_special_tokens_are_rejected_before_training(specials):
    def texts():
        raise AssertionError("the corpus was read before the arguments were checked")
        yield "x"

    with pytest.raises(ValueError, match="special_tokens"):
        BPETokenizer.train(texts(), 300, special_tokens=specials)


def test_special_tokens_are_whole_ids_and_never_merged():
    tok = BPETokenizer.train(corpus(), 400, special_tokens=("<pad>", "<bos>", "<eos>", "<image>"))
    specials = set(tok.special_ids.values())
    assert specials == {396, 397, 398, 399}
    assert not specials & {i for m in tok.merges for i in m}
    ids = tok.encode("a red circle", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and not specials & set(ids[1:-1])
    assert tok.encode("", add_bos=False, add_eos=False) == []
    assert tok.encode("") == [tok.eos_id]
    literal = tok.encode("<eos><image>", add_eos=False)  # text stays text
    assert not specials & set(literal) and tok.decode(literal) == "<eos><image>"
    rendered = tok.decode([tok.bos_id, *tok.encode("hi", add_eos=False), tok.eos_id, tok.pad_id])
    assert rendered == "hi"
    assert tok.decode([tok.bos_id, 104, tok.eos_id, tok.pad_id], skip_special=False) == (
        "<bos>h<eos><pad>"
    )


def test_decode_errors_and_invalid_utf8():
    tok = trained()
    assert tok.decode([*b"ok", 0xF0, 0x9F]) == "ok\ufffd"  # a cut-off emoji
    assert tok.decode(np.array([104, 105])) == "hi"
    with pytest.raises(ValueError, match="400"):
        tok.decode([400])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="bytes"):
        tok.encode(b"bytes")


def test_pad_batch_shapes_mask_and_padding():
    tok = trained()
    seqs = [tok.encode("a red circle"), tok.encode("a"), []]
    ids, mask = tok.pad_batch(seqs)
    n = len(seqs[0])
    assert ids.shape == mask.shape == (3, n) and ids.dtype == np.int64 and mask.dtype == bool
    assert ids[0].tolist() == seqs[0] and mask[0].all()
    assert ids[1].tolist() == seqs[1] + [tok.pad_id] * (n - len(seqs[1]))
    assert mask.sum(axis=1).tolist() == [n, len(seqs[1]), 0]
    assert (ids[~mask] == tok.pad_id).all()
    ids, mask = tok.pad_batch(seqs, length=n + 2)
    assert ids.shape == (3, n + 2) and mask.sum() == n + len(seqs[1])
    ids, mask = tok.pad_batch([], length=4)
    assert ids.shape == mask.shape == (0, 4)
    with pytest.raises(ValueError, match="length"):
        tok.pad_batch(seqs, length=0)


def test_truncation_keeps_eos_last():
    tok = trained()
    with_eos = tok.encode("a large red circle in the top left")
    no_eos = with_eos[:-1]
    ids, mask = tok.pad_batch([with_eos, no_eos], length=3)
    assert ids[0].tolist() == with_eos[:2] + [tok.eos_id]
    assert ids[1].tolist() == no_eos[:3]
    assert mask.all()


def test_save_load_round_trip(tmp_path):
    tok = BPETokenizer.train(corpus(), 400, special_tokens=("<pad>", "<bos>", "<eos>", "<image>"))
    path = tmp_path / "tok.json"
    tok.save(path)
    tok.save(path)  # over an existing file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.json"]
    back = BPETokenizer.load(str(path))
    assert back.merges == tok.merges and back.special_tokens == tok.special_tokens
    for s in corpus()[:50] + ("emoji 👩‍👩‍👧", "\ud800x"):
        assert back.encode(s, add_bos=True) == tok.encode(s, add_bos=True)


@pytest.mark.parametrize(
    "content",
    [
        b"not json at all",
        b"\xff\xfe\x00garbage",
        b'{"format": "other", "version": 1, "merges": [], "special_tokens": []}',
        b'{"format": "tinymm-bpe", "version": 99, "merges": [], "special_tokens": []}',
        b'{"format": "tinymm-bpe", "version": 1, "special_tokens": ["<pad>", "<bos>", "<eos>"]}',
        b'{"format": "tinymm-bpe", "version": 1, "merges": [[97, 300]],'
        b' "special_tokens": ["<pad>", "<bos>", "<eos>"]}',
        b'{"format": "tinymm-bpe", "version": 1, "merges": [[97, 98], [97, 98]],'
        b' "special_tokens": ["<pad>", "<bos>", "<eos>"]}',
        b'{"format": "tinymm-bpe", "version": 1, "merges": [], "special_tokens": ["<pad>"]}',
        b'{"format": "tinymm-bpe", "version": 1, "merges": {"a": 1},'
        b' "special_tokens": ["<pad>", "<bos>", "<eos>"]}',
        b"[1, 2, 3]",
    ],
)
def test_load_rejects_foreign_or_corrupt_files(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.json"):
        BPETokenizer.load(path)
