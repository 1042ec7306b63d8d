"""CLIP: an image tower and a text tower trained to agree, and zero-shot classification with it.

Following the lecture, for a batch of N (image, caption) pairs:

1. Image embedding: the ViT's [CLS] token after its final LayerNorm (CLIP's `ln_post`; the ViT
   applies it in `encode`), projected without bias and L2-normalised:
       v = normalize(LN(z_cls^L) W_img),   W_img in R^{D_img x d}           encode_image
2. Text embedding: the text transformer's state at the [EOS] token (causal attention makes it
   a summary of the caption before it), projected and L2-normalised:
       t = normalize(z_eos W_txt),         W_txt in R^{D_txt x d}           encode_text
3. Cosine similarity matrix of the batch: S_ij = v_i . t_j (unit vectors: the dot product is
   the cosine). The diagonal holds the true pairs.
4. Symmetric contrastive loss with a learned temperature tau = 1 / exp(logit_scale):
       L = (CE(S / tau, rows) + CE(S^T / tau, columns)) / 2                 F.clip_loss
   logit_scale starts at ln(1 / 0.07) (tau = 0.07, as the paper) and is clamped to at most
   ln(100) after every optimizer step (`clamp_logit_scale`, the lesson calls it): without the
   cap the model can push tau -> 0 and make the loss spiky.

Zero-shot classification (`zero_shot_classifier`): encode a prompt per class, e.g.
"a photo of a {class}", and predict y~ = argmax_k v . t_k. With several templates per class the
class embedding is the renormalised mean of its prompts' embeddings (prompt ensembling).

Shapes: images (N, H, W, C), token ids (N, L), eos_positions (N,) -> embeddings (N, d).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import io, nn
from ..data.tokenizer import BPETokenizer
from ..tensor import DEFAULT_DTYPE, Tensor, no_grad
from .text import TextTransformer
from .vit import ViT

INIT_TEMPERATURE = 0.07  # tau at the start, as the CLIP paper
MAX_LOGIT_SCALE = math.log(100.0)  # exp(logit_scale) <= 100, i.e. tau >= 0.01


def normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale each row to unit L2 norm, differentiably: x / sqrt(sum_i x_i^2 + eps).

    x (..., d) -> (..., d). eps keeps the gradient finite at x = 0.
    """
    return x / ((x * x).sum(axis=-1, keepdims=True) + eps).sqrt()


def tokenize(
    tokenizer: BPETokenizer, texts: Sequence[str], max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> padded ids (N, L) int64 ending in [EOS], and the [EOS] positions (N,).

    L = the longest text, at most max_len (a longer text is cut and keeps its [EOS] last).
    """
    longest = max(len(tokenizer.encode(t)) for t in texts)
    ids, mask = tokenizer.pad_batch([tokenizer.encode(t) for t in texts], min(longest, max_len))
    return ids, mask.sum(axis=1) - 1


class CLIP(nn.Module):
    """Two towers and two projections into one d-dimensional embedding space, plus the
    learned temperature. forward(images, ids, eos_positions) -> (image_embeds, text_embeds)."""

    def __init__(
        self,
        vision: ViT,
        text: TextTransformer,
        embed_dim: int,
        init_temperature: float = INIT_TEMPERATURE,
        max_logit_scale: float = MAX_LOGIT_SCALE,
    ):
        super().__init__()
        self.vision, self.text, self.embed_dim = vision, text, embed_dim
        self.image_projection = nn.Linear(vision.dim, embed_dim, bias=False)  # W_img
        self.text_projection = nn.Linear(text.dim, embed_dim, bias=False)  # W_txt
        # s = ln(1 / tau); learning s rather than tau keeps tau positive and the steps relative
        self.logit_scale = nn.Parameter(np.array(math.log(1 / init_temperature), DEFAULT_DTYPE))
        self.max_logit_scale = max_logit_scale

    def encode_image(self, images: np.ndarray | Tensor) -> Tensor:
        """Unit-norm image embeddings v (N, d) from images (N, H, W, C)."""
        cls = self.vision.encode(images)[:, 0]  # (N, 1 + N_p, D_img) -> [CLS] (N, D_img)
        return normalize(self.image_projection(cls))

    def encode_text(self, ids: np.ndarray, eos_positions: np.ndarray) -> Tensor:
        """Unit-norm text embeddings t (N, d) from token ids (N, L) and [EOS] positions (N,)."""
        return normalize(self.text_projection(self.text(ids, eos_positions)))

    def forward(
        self, images: np.ndarray | Tensor, ids: np.ndarray, eos_positions: np.ndarray
    ) -> tuple[Tensor, Tensor]:
        """(image_embeds, text_embeds), both (N, d) with unit rows; S = image @ text^T."""
        return self.encode_image(images), self.encode_text(ids, eos_positions)

    @property
    def temperature(self) -> float:
        """tau = 1 / exp(logit_scale)."""
        return float(np.exp(-self.logit_scale.data))

    def clamp_logit_scale(self) -> None:
        """logit_scale <- min(logit_scale, ln 100), in place; call after every optimizer step."""
        with no_grad():
            self.logit_scale.copy_(np.minimum(self.logit_scale.data, self.max_logit_scale))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, tau={self.temperature:.4f}"


def zero_shot_classifier(
    model: CLIP,
    tokenizer: BPETokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
) -> np.ndarray:
    """Class embeddings as the columns of a weight matrix W (d, K), from text alone.

    For class k: t_k = normalize(mean over templates m of encode_text(m.format(class_k))).
    A template is a format string with one "{}", e.g. "a photo of a {}.". Predictions for unit
    image embeddings V (N, d) are argmax_k (V W)_k: the class whose text is most similar.
    """
    if not class_names or not templates:
        raise ValueError("zero_shot_classifier needs at least one class name and one template")
    if any("{}" not in t for t in templates):
        raise ValueError(f"every template needs a '{{}}' for the class name, got {templates}")
    texts = [t.format(name) for name in class_names for t in templates]  # class-major
    ids, eos = tokenize(tokenizer, texts, model.text.max_len)
    with no_grad():
        embeds = model.encode_text(ids, eos).data  # (K * M, d)
    mean = embeds.reshape(len(class_names), len(templates), -1).mean(axis=1)  # (K, d)
    mean /= np.linalg.norm(mean, axis=-1, keepdims=True) + 1e-12
    return mean.T.astype(DEFAULT_DTYPE)  # (d, K)


CLIP_CONFIG_KEYS = (
    "image_size",
    "patch_size",
    "dim",
    "vit_depth",
    "text_depth",
    "heads",
    "embed_dim",
    "max_len",
    "vocab_size",
)


def save_clip(
    model: CLIP, tokenizer: BPETokenizer, folder: str | Path, config: dict[str, int]
) -> Path:
    """Write a trained CLIP to `folder`: clip.npz (the state dict, tinymm.io.save),
    tokenizer.json (BPETokenizer.save) and config.json (the constructor arguments,
    CLIP_CONFIG_KEYS), so that `load_clip(folder)` rebuilds it. Returns the folder."""
    if missing := [k for k in CLIP_CONFIG_KEYS if k not in config]:
        raise ValueError(f"save_clip: config lacks {missing}; it needs {CLIP_CONFIG_KEYS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    io.save(model.state_dict(), folder / "clip.npz")
    tokenizer.save(folder / "tokenizer.json")
    clean = {k: int(config[k]) for k in CLIP_CONFIG_KEYS}
    (folder / "config.json").write_text(json.dumps(clean, indent=1), encoding="utf-8")
    return folder


def load_clip(folder: str | Path) -> tuple[CLIP, BPETokenizer]:
    """Rebuild the CLIP and its tokenizer that `save_clip` (lesson 03) wrote to `folder`."""
    folder = Path(folder)
    files = [folder / f for f in ("config.json", "clip.npz", "tokenizer.json")]
    if missing := [str(f) for f in files if not f.is_file()]:
        raise FileNotFoundError(f"load_clip: {folder} lacks {missing} (run lesson 03 first)")
    config = json.loads(files[0].read_text(encoding="utf-8"))
    if absent := [k for k in CLIP_CONFIG_KEYS if k not in config]:
        raise ValueError(f"load_clip: {files[0]} lacks {absent}")
    c = config
    vision = ViT(c["image_size"], c["patch_size"], 3, c["dim"], c["vit_depth"], c["heads"])
    text = TextTransformer(c["vocab_size"], c["max_len"], c["dim"], c["text_depth"], c["heads"])
    model = CLIP(vision, text, c["embed_dim"])
    model.load_state_dict(io.load(files[1]))
    return model, BPETokenizer.load(files[2])
