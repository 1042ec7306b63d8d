"""Video models: a ViViT style tubelet transformer, a frame-bag baseline, an audio-visual model.

Video is a sequence of images (and optionally audio); the difference from an image is the
temporal axis. A clip X in R^{T x H x W x C} becomes tokens as an image does in ViT, with time
as one more axis to cut:

1. Cut X into tubelets of t x p x p pixels (t frames, p x p pixels): N = (T/t)(H/p)(W/p)
   tubelets, numbered by time, then row, then column. Flatten each one to a vector
   x_i in R^{t p^2 C}, in (frame, row, column, channel) order.                   tubeletify
2. Project every tubelet to a token:  z_i = x_i E,  E in R^{(t p^2 C) x D}.     tubelet_embedding
   This is a 3-D convolution with kernel t x p x p and stride = kernel (each output voxel
   sees exactly one tubelet), as ViViT's "tubelet embedding" (Arnab et al. 2021); with t = 1
   it is ViT's patch embedding of each frame. A token already holds a little motion: t frames
   of the same p x p window.
3. Add learned position embeddings, one for where and one for when:
       z_i = z_i + E_space[s(i)] + E_time[tau(i)]       spatial_embedding, temporal_embedding
   E_space in R^{(H/p)(W/p) x D}, E_time in R^{(T/t) x D}. Attention ignores order; E_time is
   the only thing that tells the model which token came first.
4. Prepend [CLS], and run L transformer blocks of joint space-time attention: every token
   attends to every token of every frame, softmax(Q K^T / sqrt(d_k)) V     nn.TransformerBlock
5. Classify from [CLS]:  y~ = MLP(z_cls^L).                                            head

FrameBag is the baseline that throws the temporal axis away: the ViT of lesson 02 encodes each
frame on its own, the frames' [CLS] states are averaged over time, then the head:
    y~ = MLP( (1/T) sum_k ViT_cls(X_k) )
A mean does not depend on the order of its terms, so FrameBag gives the same output for any
permutation of the frames (and for the clip played backwards).

AudioVisualTransformer fuses two modalities in one sequence, as the lecture's Z = [Z_img, Z_text],
with the soundtrack as the second modality. As a VLM takes Z_img from a trained image encoder,
the streams come from their encoders (`stream_tokens`): a VideoTransformer's tubelet token
states and a ViT's patch token states over the log-mel spectrogram (a 1-channel image, as in
the audio lesson), each led by the encoder's embedding of its whole input. Each gets a learned
modality embedding, and one [CLS] goes first:
    Z = [z_cls; Z_video + m_video; Z_audio + m_audio]
then joint attention and a match / no-match head on [CLS].

Shapes: clips (N, T, H, W, C) -> tubelets (N, L, t p^2 C) -> tokens (N, 1 + L, D).
"""

from __future__ import annotations

from typing import Any

from .. import nn
from ..nn.attention import run_blocks
from ..tensor import Tensor, concatenate
from .vit import ViT, _normal


def tubeletify(clips: Any, tubelet: tuple[int, int]) -> Tensor:
    """Cut clips (N, T, H, W, C) into t x p x p tubelets, each flattened in (frame, row,
    column, channel) order: -> (N, (T/t)(H/p)(W/p), t p p C), numbered by time, then row,
    then column. A pure rearrangement (reshape + transpose); with t = 1 it is F.patchify of
    every frame."""
    clips = clips if isinstance(clips, Tensor) else Tensor(clips)
    t, p = tubelet
    if clips.ndim != 5:
        raise ValueError(f"tubeletify expects clips of shape (N, T, H, W, C), got {clips.shape}")
    n, frames, h, w, c = clips.shape
    if t < 1 or p < 1 or frames % t or h % p or w % p:
        raise ValueError(
            f"tubelet (t={t}, p={p}) does not divide the clip's {frames} frames of {h}x{w}: "
            f"need frames % t == 0, H % p == 0 and W % p == 0"
        )
    x = clips.reshape(n, frames // t, t, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # (N, T/t, H/p, W/p, t, p, p, C)
    return x.reshape(n, (frames // t) * (h // p) * (w // p), t * p * p * c)


class TubeletEmbedding(nn.Module):
    """Clips (N, T, H, W, C) -> tokens (N, L, D): tubelets, z_i = x_i E, plus E_space and E_time.

    tubelet_embedding is a 3-D convolution with kernel (t, p, p) and stride = kernel, written
    as tubeletify + one Linear."""

    def __init__(
        self, frames: int, image_size: int, tubelet: tuple[int, int], channels: int, dim: int
    ):
        super().__init__()
        t, p = tubelet
        if t < 1 or p < 1 or frames % t or image_size % p:
            raise ValueError(
                f"TubeletEmbedding: tubelet (t={t}, p={p}) does not divide {frames} frames of "
                f"{image_size}x{image_size}"
            )
        self.frames, self.image_size, self.channels = frames, image_size, channels
        self.tubelet = tubelet
        self.grid = (frames // t, image_size // p, image_size // p)  # (time, rows, columns)
        self.num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.tubelet_embedding = nn.Linear(t * p * p * channels, dim)  # E: (t p^2 C) x D
        self.spatial_embedding = nn.Parameter(_normal((self.grid[1] * self.grid[2], dim)))
        self.temporal_embedding = nn.Parameter(_normal((self.grid[0], dim)))

    def position_embedding(self) -> Tensor:
        """E_space[s] + E_time[tau] for every token, in token order: (L, D)."""
        steps, cells = self.grid[0], self.grid[1] * self.grid[2]
        dim = self.spatial_embedding.shape[1]
        space = self.spatial_embedding.reshape(1, cells, dim)
        time = self.temporal_embedding.reshape(steps, 1, dim)
        return (space + time).reshape(steps * cells, dim)  # time-major, as tubeletify numbers

    def forward(self, clips: Any) -> Tensor:
        clips = clips if isinstance(clips, Tensor) else Tensor(clips)
        expected = (self.frames, self.image_size, self.image_size, self.channels)
        if clips.ndim != 5 or tuple(clips.shape[1:]) != expected:
            raise ValueError(
                f"expected clips of shape (N, {', '.join(map(str, expected))}), "
                f"got {tuple(clips.shape)}"
            )
        tokens = self.tubelet_embedding(tubeletify(clips, self.tubelet))  # (N, L, D)
        return tokens + self.position_embedding()

    def extra_repr(self) -> str:
        t, p = self.tubelet
        return (
            f"{self.frames}x{self.image_size}x{self.image_size}x{self.channels} in {t}x{p}x{p} "
            f"tubelets -> {self.grid[0]}x{self.grid[1]}x{self.grid[2]} = {self.num_tokens} tokens"
        )


def _encode(blocks: nn.ModuleList, ln_final: nn.LayerNorm, z: Tensor, return_weights: bool) -> Any:
    """Transformer blocks and the final norm; with return_weights also the attention weights
    of every block, stacked (depth, N, heads, L, L)."""
    z = run_blocks(blocks, z, return_weights=return_weights)
    z, weights = z if return_weights else (z, None)
    z = ln_final(z)
    return (z, weights) if return_weights else z


def _with_cls(cls_token: Tensor, z: Tensor) -> Tensor:
    n, dim = z.shape[0], z.shape[-1]
    return concatenate([cls_token.broadcast_to((n, 1, dim)), z], axis=1)


class VideoTransformer(nn.Module):
    """ViViT style classifier over clips (N, T, H, W, C): tubelet tokens with space and time
    positions, [CLS], joint space-time attention, head on [CLS]. With num_classes = dim the
    head maps [CLS] to an embedding of the clip (the contrastive video encoder of lesson 07)."""

    def __init__(
        self,
        frames: int,
        image_size: int,
        tubelet: tuple[int, int],
        channels: int = 3,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2,
        num_classes: int = 2,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"VideoTransformer: num_classes must be >= 1, got {num_classes}")
        self.embedding = TubeletEmbedding(frames, image_size, tubelet, channels, dim)
        self.cls_token = nn.Parameter(_normal((1, 1, dim)))
        self.blocks = nn.ModuleList(
            nn.TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)
        )
        self.ln_final = nn.LayerNorm(dim)
        self.head = nn.MLP(dim, dim, num_classes)

    def encode(self, clips: Any, return_weights: bool = False) -> Any:
        """All token states (N, 1 + L, D), [CLS] first; with return_weights also the weights."""
        return _encode(
            self.blocks, self.ln_final, _with_cls(self.cls_token, self.embedding(clips)),
            return_weights,
        )  # fmt: skip

    def forward(self, clips: Any) -> Tensor:
        """Class logits (N, num_classes): y~ = MLP(z_cls^L)."""
        return self.head(self.encode(clips)[:, 0])


class FrameBag(nn.Module):
    """The order-blind baseline: the ViT of lesson 02 on each frame alone, the frames' [CLS]
    states averaged over time, then the head. Invariant to any permutation of the frames."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        channels: int = 3,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2,
        num_classes: int = 2,
    ):
        super().__init__()
        self.vit = ViT(image_size, patch_size, channels, dim, depth, heads, mlp_ratio)
        self.head = nn.MLP(dim, dim, num_classes)

    def forward(self, clips: Any) -> Tensor:
        clips = clips if isinstance(clips, Tensor) else Tensor(clips)
        if clips.ndim != 5:
            raise ValueError(f"FrameBag expects clips (N, T, H, W, C), got {clips.shape}")
        n, frames = clips.shape[:2]
        frames_alone = clips.reshape(n * frames, *clips.shape[2:])  # (N T, H, W, C)
        cls = self.vit.encode(frames_alone)[:, 0]  # (N T, D): one embedding per frame
        bag = cls.reshape(n, frames, -1).mean(axis=1)  # (N, D): the order is gone
        return self.head(bag)


def stream_tokens(encoder: nn.Module, x: Any) -> Tensor:
    """One modality's tokens for fusion, from its encoder (a VideoTransformer or a ViT):
    [e; z_1; ...; z_L] with e = head(z_cls^L) the encoder's embedding of the whole input
    (trained contrastively in lesson 07), then its patch / tubelet token states: (N, 1 + L, D).
    The head must map D -> D."""
    z = encoder.encode(x)  # (N, 1 + L, D), [CLS] first
    embedding = encoder.head(z[:, 0])  # (N, D)
    if embedding.shape[-1] != z.shape[-1]:
        raise ValueError(
            f"stream_tokens: the encoder's head gives {embedding.shape[-1]} numbers, its tokens "
            f"have {z.shape[-1]}: build it with num_classes = dim"
        )
    return concatenate([embedding.reshape(len(embedding.data), 1, -1), z[:, 1:]], axis=1)


class AudioVisualTransformer(nn.Module):
    """Two modalities in one sequence, as the lecture's Z_joint = [Z_img, Z_text] with the sound
    as the second modality:
        Z = [z_cls; Z_video + m_video; Z_audio + m_audio]
    (learned modality embeddings m), joint attention over all tokens, and a match / no-match
    head (2 logits) on [CLS]. The streams' tokens come from their encoders (`stream_tokens`):
    video (N, L_v, D), audio (N, L_a, D)."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: float = 2):
        super().__init__()
        self.dim = dim
        self.modality_embedding = nn.Parameter(_normal((2, dim)))  # m_video, m_audio
        self.cls_token = nn.Parameter(_normal((1, 1, dim)))
        self.blocks = nn.ModuleList(
            nn.TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)
        )
        self.ln_final = nn.LayerNorm(dim)
        self.head = nn.MLP(dim, dim, 2)  # no match / match

    def encode(self, video_tokens: Any, audio_tokens: Any, return_weights: bool = False) -> Any:
        """Token states (N, 1 + L_v + L_a, D): [CLS], the video, then the audio."""
        video = video_tokens if isinstance(video_tokens, Tensor) else Tensor(video_tokens)
        sound = audio_tokens if isinstance(audio_tokens, Tensor) else Tensor(audio_tokens)
        for name, t in (("video_tokens", video), ("audio_tokens", sound)):
            if t.ndim != 3 or t.shape[-1] != self.dim:
                raise ValueError(f"{name} must be (N, L, {self.dim}), got {tuple(t.shape)}")
        if video.shape[0] != sound.shape[0]:
            raise ValueError(
                f"{video.shape[0]} clips but {sound.shape[0]} soundtracks: pairs must align"
            )
        z = concatenate(
            [video + self.modality_embedding[0], sound + self.modality_embedding[1]], axis=1
        )
        return _encode(self.blocks, self.ln_final, _with_cls(self.cls_token, z), return_weights)

    def forward(self, video_tokens: Any, audio_tokens: Any) -> Tensor:
        """Match logits (N, 2): index 1 = the soundtrack belongs to the clip."""
        return self.head(self.encode(video_tokens, audio_tokens)[:, 0])
