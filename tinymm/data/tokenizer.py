"""Byte-level BPE: the tokenizer idea behind GPT-2 and Qwen, small enough to read.

A text is first turned into UTF-8 bytes, so the starting vocabulary is just the 256 byte values
and no string is ever "unknown". Training then repeats one step: count every adjacent pair of
tokens in the corpus, and merge the most frequent pair into a new token (e.g. "t" + "h" -> "th",
later "th" + "e" -> "the"). The ordered list of merges *is* the tokenizer: encoding a new text
replays the merges in the order they were learned. Before counting, the text is cut into
"words" by a regex (a word keeps its leading space: " circle"), so merges never cross a word.

Qwen's tokenizer is the same algorithm at scale: byte-level BPE with ~150k merges learned on
trillions of tokens, a richer pre-tokenisation regex, and special tokens such as
<|im_start|> and <|vision_start|> that bracket chat turns and image tokens.

Token ids: 0..255 are the bytes, 256..256+M-1 the M merges (merge i makes id 256+i), and the
special tokens ("<pad>", "<bos>", "<eos>", plus any extra) come last, so
``vocab_size = 256 + M + len(special_tokens)``. Special tokens are ids only: the string "<eos>"
inside a text is ordinary text (so a text cannot inject control tokens), and `decode` drops
special ids by default. Together with "surrogatepass" UTF-8 (lone surrogates are legal in a
Python str) this makes ``decode(encode(s)) == s`` hold for every str s.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np

__all__ = ["BPETokenizer", "pretokenize"]

FORMAT, VERSION = "tinymm-bpe", 1
REQUIRED_SPECIALS = ("<pad>", "<bos>", "<eos>")

# Pieces, in order of preference: a run of letters with an optional leading space (" circle"),
# a single digit (" 1", "2"), a run of other symbols (" ,", "!?", "_"), and whitespace. A run
# of spaces gives its last space to the next word (`\s+(?!\S)`). Every character matches one
# branch, so "".join(pretokenize(s)) == s for every string.
PRETOKEN_PATTERN = re.compile(r" ?[^\W\d_]+| ?\d| ?(?:[^\w\s]|_)+|\s+(?!\S)|\s+")


def pretokenize(text: str) -> list[str]:
    """Cut text into the words BPE merges in: 'a red  dot.' -> ['a', ' red', ' ', ' dot', '.']."""
    return PRETOKEN_PATTERN.findall(text)


def to_bytes(word: str) -> list[int]:
    """UTF-8 bytes of a word; lone surrogates (legal in a Python str) pass through as 3 bytes."""
    return list(word.encode("utf-8", "surrogatepass"))


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair` in `ids`, left to right, by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def check_merges(merges: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Merges as id pairs; merge i may only combine ids made before it (below 256 + i)."""
    if not isinstance(merges, (list, tuple)):
        raise ValueError(f"merges must be a list of id pairs, got {type(merges).__name__}")
    for i, m in enumerate(merges):
        ok = isinstance(m, (list, tuple)) and len(m) == 2
        if not (ok and all(type(x) is int and 0 <= x < 256 + i for x in m)):
            raise ValueError(f"merge {i} must be a pair of ids below {256 + i}, got {m!r}")
    pairs = [(a, b) for a, b in merges]
    if len(set(pairs)) < len(pairs):
        raise ValueError("merges contain the same pair twice")
    return pairs


def check_special_tokens(special_tokens: Sequence[str]) -> tuple[str, ...]:
    """Distinct non-empty strings that include <pad>, <bos> and <eos>."""
    tokens = list(special_tokens) if isinstance(special_tokens, (list, tuple)) else [None]
    if not all(isinstance(s, str) and s for s in tokens) or len(set(tokens)) < len(tokens):
        raise ValueError(f"special_tokens must be distinct strings, got {special_tokens!r}")
    if missing := [s for s in REQUIRED_SPECIALS if s not in special_tokens]:
        raise ValueError(f"special_tokens must include {missing}, got {special_tokens!r}")
    return tuple(special_tokens)


class BPETokenizer:
    """Byte-level BPE tokenizer: 256 byte tokens, learned merges, then special tokens."""

    def __init__(self, merges: Sequence[Sequence[int]], special_tokens: Sequence[str]) -> None:
        self.merges = check_merges(merges)
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.special_tokens = check_special_tokens(special_tokens)
        first = 256 + len(self.merges)
        self.special_ids = {s: first + k for k, s in enumerate(self.special_tokens)}
        self.pad_id, self.bos_id, self.eos_id = (self.special_ids[s] for s in REQUIRED_SPECIALS)
        self.token_bytes = [bytes([b]) for b in range(256)]  # id -> the bytes it stands for
        for a, b in self.merges:
            self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: Sequence[str] = REQUIRED_SPECIALS,
    ) -> BPETokenizer:
        """Learn merges until ``256 + merges + len(special_tokens) == vocab_size``.

        Each step merges the most frequent adjacent pair, counted over unique words weighted by
        how often they occur; ties go to the smallest pair of ids, so training is deterministic.
        Training stops early (a smaller vocabulary) if every word has become a single token.
        """
        n_merges = vocab_size - 256 - len(check_special_tokens(special_tokens))
        if n_merges < 0:
            raise ValueError(
                f"vocab_size={vocab_size} < 256 bytes + {len(special_tokens)} specials"
            )
        word_counts = Counter(w for text in texts for w in pretokenize(text))
        words = [to_bytes(w) for w in word_counts]
        counts = list(word_counts.values())
        pair_counts: Counter[tuple[int, int]] = Counter()
        words_with: defaultdict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> word ids
        for i, (w, c) in enumerate(zip(words, counts, strict=True)):
            for pair in pairwise(w):
                pair_counts[pair] += c
                words_with[pair].add(i)
        merges: list[tuple[int, int]] = []
        while len(merges) < n_merges and pair_counts:
            best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
            new_id = 256 + len(merges)
            merges.append(best)
            for i in words_with.pop(best):  # only the counts of the words that change
                old, c = words[i], counts[i]
                words[i] = new = merge_pair(old, best, new_id)
                for pair in pairwise(old):
                    pair_counts[pair] -= c
                    if pair_counts[pair] == 0:
                        del pair_counts[pair]
                for pair in pairwise(new):
                    pair_counts[pair] += c
                    words_with[pair].add(i)
        return cls(merges, special_tokens)

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges) + len(self.special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def encode_word(self, word: str) -> tuple[int, ...]:
        """Apply the merges to one pre-token, lowest rank (earliest learned) first, as GPT-2."""
        if word not in self._cache:
            ids = to_bytes(word)
            while len(ids) > 1:
                pair = min(pairwise(ids), key=lambda p: self.ranks.get(p, len(self.ranks)))
                if pair not in self.ranks:
                    break
                ids = merge_pair(ids, pair, 256 + self.ranks[pair])
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[word] = tuple(ids)
        return self._cache[word]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = True) -> list[int]:
        """Text -> token ids. A special token's string in `text` ("<eos>") stays plain text."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = [self.bos_id] if add_bos else []
        for word in pretokenize(text):
            ids.extend(self.encode_word(word))
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Token ids -> text; special ids are dropped, or rendered as "<eos>" etc. if not skipped.

        Ids from `encode` always form valid (surrogatepass) UTF-8; other ids, such as a model's
        cut-off emoji, may not, and their invalid bytes decode to U+FFFD.
        """
        parts, buf = [], bytearray()
        special_names = {i: s for s, i in self.special_ids.items()}
        for i in map(int, ids):
            if 0 <= i < len(self.token_bytes):
                buf += self.token_bytes[i]
            elif i in special_names:
                if not skip_special:
                    parts += [_utf8(buf), special_names[i]]
                    buf.clear()
            else:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {len(self)})")
        return "".join(parts) + _utf8(buf)

    def pad_batch(
        self, batch: Sequence[Sequence[int]], length: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad id lists with pad_id into ``ids (B, L) int64`` and ``mask (B, L) bool``.

        L = `length`, or the longest sequence. A longer sequence is cut to L tokens; if it ended
        with <eos> the cut keeps <eos> as its last token (CLIP reads the text feature there).
        mask is True where a real token is.
        """
        if length is None:
            length = max((len(s) for s in batch), default=0)
        elif length < 1:
            raise ValueError(f"length must be at least 1, got {length}")
        ids = np.full((len(batch), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), length), dtype=bool)
        for row, seq in enumerate(batch):
            seq = list(seq)
            if len(seq) > length:
                seq = seq[: length - 1] + [self.eos_id] if seq[-1] == self.eos_id else seq[:length]
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = True
        return ids, mask

    def save(self, path: str | Path) -> None:
        """Write merges and special tokens as JSON; a failed save keeps the previous file."""
        data = {"format": FORMAT, "version": VERSION, "special_tokens": list(self.special_tokens)}
        data["merges"] = [list(m) for m in self.merges]
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Read a tokenizer saved by `save`; a foreign or corrupt file raises ValueError."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
            return cls(data["merges"], data["special_tokens"])
        except (ValueError, KeyError) as err:  # JSON and UTF-8 errors are ValueErrors too
            raise ValueError(f"cannot load tokenizer from {path}: {err}") from err


def _utf8(buf: bytes | bytearray) -> str:
    """Bytes -> str, keeping lone surrogates; if any byte is invalid, errors="replace" instead."""
    try:
        return bytes(buf).decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return bytes(buf).decode("utf-8", "replace")
