"""The figures lessons save: each function draws one picture, saves it as a PNG, returns the path.

Matplotlib with the Agg backend (no screen needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

plt.rcParams.update(
    {"figure.dpi": 110, "axes.spines.top": False, "axes.spines.right": False, "font.size": 9}
)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _smooth(values: Sequence[float], width: int) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if len(v) < width or width < 2:
        return v
    kernel = np.ones(width) / width
    return np.convolve(v, kernel, mode="valid")


def training_curves(
    history: Any, path: str | Path, title: str = "training", metric_name: str = "accuracy"
) -> Path:
    """Loss (and the training metric, and evaluations if any) against the step."""
    has_metric = not np.all(np.isnan(history.metric))
    fig, axes = plt.subplots(
        1, 2 if has_metric or history.evals else 1, figsize=(9, 3.2), squeeze=False
    )
    width = max(1, len(history.loss) // 100)
    steps = np.asarray(history.step)
    ax = axes[0, 0]
    ax.plot(steps, history.loss, color="0.8", lw=0.8, label="per step")
    ax.plot(steps[width - 1 :], _smooth(history.loss, width), color="C0", label="smoothed")
    ax.set(xlabel="step", ylabel="loss", title=f"{title}: loss", yscale="log")
    ax.legend(frameon=False)
    if axes.shape[1] > 1:
        ax = axes[0, 1]
        if has_metric:
            ax.plot(
                steps[width - 1 :], _smooth(history.metric, width), label=f"train {metric_name}"
            )
        for key in history.evals[0].keys() if history.evals else ():
            if key != "step":
                ax.plot(
                    [e["step"] for e in history.evals],
                    [e[key] for e in history.evals],
                    "o-",
                    ms=3,
                    label=key,
                )
        ax.set(xlabel="step", title=f"{title}: {metric_name}")
        ax.legend(frameon=False)
    return _save(fig, path)


def attention_maps(
    weights: np.ndarray,
    path: str | Path,
    query_labels: Sequence[str],
    key_labels: Sequence[str] | None = None,
    title: str = "attention",
    row_titles: Sequence[str] | None = None,
) -> Path:
    """Heatmaps of attention weights (layers, heads, L_q, L_k), queries down, keys across."""
    w = np.asarray(weights)
    w = w.reshape((1,) * (4 - w.ndim) + w.shape)
    layers, heads = w.shape[:2]
    key_labels = query_labels if key_labels is None else key_labels
    size = 0.16 * max(len(query_labels), len(key_labels)) + 1
    fig, axes = plt.subplots(layers, heads, figsize=(size * heads, size * layers), squeeze=False)
    for i in range(layers):
        for j in range(heads):
            ax = axes[i, j]
            ax.imshow(w[i, j], cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks(range(len(key_labels)), key_labels, fontsize=6)
            ax.set_yticks(range(len(query_labels)), query_labels, fontsize=6)
            name = row_titles[i] if row_titles else f"layer {i + 1}"
            ax.set_title(f"{name}, head {j + 1}", fontsize=8)
            if i == layers - 1:
                ax.set_xlabel("key (attended to)")
            if j == 0:
                ax.set_ylabel("query")
    fig.suptitle(title)
    return _save(fig, path)


# --- audio (lesson 06) -------------------------------------------------------------------------


def _heat_over(ax: Any, image: np.ndarray, heat: np.ndarray, peak: float | None = None) -> None:
    """`image` (H, W, C) with `heat` (a coarser grid, e.g. one value per patch) stretched over it
    in the magma colours, scaled to `peak` (default: heat's own maximum)."""
    h, w = image.shape[:2]
    ax.imshow(image, interpolation="nearest")
    ax.imshow(
        heat / max(heat.max() if peak is None else peak, 1e-12),
        cmap="magma",
        alpha=0.7,
        vmin=0,
        vmax=1,
        extent=(-0.5, w - 0.5, h - 0.5, -0.5),
        interpolation="nearest",
    )


def _panels(n: int, ncols: int, size: tuple[float, float]) -> tuple[Any, list[Any]]:
    """A figure with n panels in rows of ncols (unused cells hidden), and the n axes."""
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False
    )
    fig.subplots_adjust(hspace=0.6, wspace=0.3, top=1 - 0.7 / (size[1] * nrows))
    for ax in axes.flat:
        ax.xaxis.set_major_locator(plt.MaxNLocator(5))
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def waveforms(
    waves: np.ndarray,
    sr: float,
    titles: Sequence[str],
    path: str | Path,
    title: str = "waveforms",
    zoom: float | None = None,
    ncols: int = 4,
) -> Path:
    """One waveform y[n] per panel: amplitude against time t = n / sr in seconds. (n, samples)

    zoom: also draw, under each clip, `zoom` seconds around its loudest sample (shaded above),
    where the single oscillations can be seen."""
    waves = np.asarray(waves)
    n = len(waves)
    time = np.arange(waves.shape[1]) / sr
    nrows = -(-n // ncols)
    rows = 2 * nrows if zoom else nrows
    heights = [1.0, 0.7] * nrows if zoom else [1.0] * nrows
    height = 1.6 * sum(heights) + 0.5
    fig, grid = plt.subplots(
        rows,
        ncols,
        figsize=(3.2 * ncols, height),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    fig.subplots_adjust(hspace=1.0 if zoom else 0.6, wspace=0.3, top=1 - 0.75 / height)
    for ax in grid.flat:
        ax.set_visible(False)
    for i, (y, name) in enumerate(zip(waves, titles, strict=True)):
        row, col = divmod(i, ncols)
        ax = grid[2 * row if zoom else row, col]
        ax.set_visible(True)
        ax.plot(time, y, lw=0.3, color="C0")
        peak = np.abs(y).max() * 1.1 or 1.0
        ax.set(xlim=(0, time[-1]), ylim=(-peak, peak), title=name)
        ax.set_ylabel("amplitude" if col == 0 else "")
        if zoom or i >= n - ncols:
            ax.set_xlabel("time (s)")
        if zoom:
            centre = time[np.argmax(np.abs(y))]
            t0 = float(np.clip(centre - zoom / 2, 0, time[-1] - zoom))
            ax.axvspan(t0, t0 + zoom, color="C1", alpha=0.35, lw=0)
            inner = grid[2 * row + 1, col]
            inner.set_visible(True)
            shown = (time >= t0) & (time <= t0 + zoom)
            inner.plot(1000 * (time[shown] - t0), y[shown], lw=0.7, color="C1")
            inner.set(xlim=(0, 1000 * zoom), ylim=(-peak, peak))
            inner.set_xlabel(f"ms after {t0:.3f} s", fontsize=7)
            inner.tick_params(labelsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def spectra(
    freqs: np.ndarray,
    panels: Sequence[Sequence[tuple[np.ndarray, str]]],
    titles: Sequence[str],
    path: str | Path,
    title: str = "spectra",
    ylabel: str = "magnitude (dB)",
    ylim: tuple[float, float] | None = None,
    xscale: str = "linear",
    xlim: tuple[float, float] | None = None,
    ncols: int = 4,
) -> Path:
    """Magnitude spectra against frequency in Hz. Each panel holds one or more (curve, label)
    pairs, curves of the shape of freqs; a panel with several curves gets a legend, the later
    curves drawn thinner on top (identical curves then show as one line with a dark core).
    xscale="log" spreads the low frequencies out (give xlim a lower limit above 0 Hz)."""
    fig, axes = _panels(len(panels), ncols, (3.2, 1.9))
    single = dict(color="C0", lw=0.5)
    overlaid = [dict(color="C0", lw=1.6, alpha=0.45), dict(color="k", lw=0.3)]
    for i, (ax, curves, name) in enumerate(zip(axes, panels, titles, strict=True)):
        for j, (curve, label) in enumerate(curves):
            style = single if len(curves) == 1 else overlaid[min(j, 1)]
            ax.plot(freqs, curve, label=label, **style)
        ax.set(xscale=xscale, xlim=xlim or (freqs[0], freqs[-1]), title=name)
        if ylim is not None:
            ax.set_ylim(*ylim)
        if len(curves) > 1:
            ax.legend(frameon=False, fontsize=7, loc="lower left")
        if i % ncols == 0:
            ax.set_ylabel(ylabel)
        if i >= len(panels) - ncols:
            ax.set_xlabel("frequency (Hz)")
    fig.suptitle(title)
    return _save(fig, path)


def spectrograms(
    images: np.ndarray,
    titles: Sequence[str],
    path: str | Path,
    extent: tuple[float, float, float, float],
    ylabel: str = "frequency (Hz)",
    title: str = "spectrograms",
    yticks: tuple[Sequence[float], Sequence[str]] | None = None,
    colorbar_label: str = "dB",
    vmin: float | None = None,
    vmax: float | None = None,
    ncols: int = 4,
) -> Path:
    """Spectrogram images (n, rows, frames), row 0 = lowest frequency, drawn bottom up over
    extent = (t_start, t_end, y_low, y_high), time across, with one shared colour bar.
    yticks = (positions, labels) in the units of the extent, e.g. Hz labels on mel bands."""
    images = np.asarray(images)
    vmin = images.min() if vmin is None else vmin
    vmax = images.max() if vmax is None else vmax
    fig, axes = _panels(len(images), ncols, (3.2, 2.1))
    for i, (ax, image, name) in enumerate(zip(axes, images, titles, strict=True)):
        mappable = ax.imshow(
            image,
            origin="lower",
            aspect="auto",
            extent=extent,
            cmap="magma",
            vmin=vmin,
            vmax=vmax,
            interpolation="nearest",
        )
        ax.set_title(name)
        if yticks is not None:
            ax.set_yticks(*yticks)
        if i % ncols == 0:
            ax.set_ylabel(ylabel)
        if i >= len(images) - ncols:
            ax.set_xlabel("time (s)")
    fig.colorbar(mappable, ax=axes, label=colorbar_label, shrink=0.8, pad=0.01)
    fig.suptitle(title)
    return _save(fig, path)


def mel_filters(
    filterbank: np.ndarray,
    freqs: np.ndarray,
    edges: np.ndarray,
    path: str | Path,
    title: str = "mel filterbank",
) -> Path:
    """The triangular mel filters against Hz, and how their centres and widths grow.

    filterbank (n_mels, bins) at the bin frequencies freqs (bins,); edges (n_mels + 2,) the band
    edges in Hz: filter m rises from edges[m], peaks at edges[m + 1], ends at edges[m + 2]."""
    filterbank, edges = np.asarray(filterbank), np.asarray(edges)
    n_mels = len(filterbank)
    centres, widths = edges[1:-1], edges[2:] - edges[:-2]
    fig = plt.figure(figsize=(10, 5.6), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=(1.25, 1))
    ax = fig.add_subplot(grid[0, :])
    colours = plt.cm.viridis(np.linspace(0, 0.9, n_mels))
    for m in range(n_mels):
        ax.fill_between(freqs, filterbank[m], color=colours[m], alpha=0.25, lw=0)
        ax.plot(freqs, filterbank[m], color=colours[m], lw=0.9)
    ax.set(
        xlim=(freqs[0], freqs[-1]),
        ylim=(0, None),
        xlabel="frequency (Hz)",
        ylabel="weight",
        title=f"{n_mels} triangular filters, evenly spaced on the mel scale: "
        "narrow at low frequencies, wide at high ones",
    )
    ax = fig.add_subplot(grid[1, 0])
    ax.plot(np.arange(n_mels), centres, "o-", ms=3)
    ax.set(
        xlabel="filter m",
        ylabel="centre frequency (Hz)",
        title="centres: linear below 1 kHz, then exponential",
    )
    ax.axhline(1000, color="0.6", lw=0.8, ls=":")
    ax = fig.add_subplot(grid[1, 1])
    ax.plot(centres, widths, "o-", ms=3, color="C1")
    ax.set(
        xlabel="centre frequency (Hz)",
        ylabel="width (Hz)",
        title="width of each triangle (f_{m+2} - f_m)",
    )
    ax.set_ylim(0, None)
    fig.suptitle(title)
    return _save(fig, path)


def confusion_matrix(
    labels: np.ndarray,
    predicted: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    title: str = "confusion matrix",
) -> Path:
    """Rows: true class, columns: predicted class; each cell the fraction of its row (count
    written in the cell). A perfect classifier has everything on the diagonal."""
    k = len(class_names)
    counts = np.zeros((k, k), dtype=int)
    np.add.at(counts, (np.asarray(labels), np.asarray(predicted)), 1)
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 0.55 * k + 1.8
    fig, ax = plt.subplots(figsize=(size + 1, size), layout="constrained")
    mappable = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                colour = "white" if fractions[i, j] > 0.6 else "black"
                ax.text(j, i, counts[i, j], ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(mappable, ax=ax, label="fraction of the true class", shrink=0.8)
    return _save(fig, path)


# --- CLIP (lesson 03) --------------------------------------------------------------------------


def similarity_matrix(
    similarity: np.ndarray,
    images: np.ndarray,
    captions: Sequence[str],
    path: str | Path,
    title: str = "cosine similarity S_ij = v_i . t_j",
) -> Path:
    """The lecture's CLIP picture: images down the side (thumbnails), their captions across the
    top, each cell the cosine similarity of image i and caption j. Training pulls the diagonal
    (true pairs, boxed) up and everything else down; a dot marks each row's best caption.
    similarity (N, N), images (N, H, W, C) in [0, 1], N captions."""
    s = np.asarray(similarity, dtype=float)
    n = len(s)
    fig, ax = plt.subplots(figsize=(0.62 * n + 2.2, 0.62 * n + 2.6))
    mesh = ax.imshow(s, cmap="RdBu_r", vmin=-1, vmax=1, extent=(-0.5, n - 0.5, n - 0.5, -0.5))
    for i in range(n):
        ax.imshow(np.clip(images[i], 0, 1), extent=(-1.55, -0.55, i + 0.5, i - 0.5))
        for j in range(n):
            ax.text(
                j,
                i,
                f"{s[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=6.5,
                color="white" if abs(s[i, j]) > 0.55 else "black",
            )
        ax.add_patch(plt.Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, lw=1.6, ec="black"))
        ax.plot(s[i].argmax() + 0.36, i - 0.36, "o", ms=3.5, color="gold", mec="black", mew=0.5)
    ax.set_xlim(-1.6, n - 0.5)
    ax.set_ylim(n - 0.5, -0.5)
    ax.xaxis.tick_top()
    ax.set_xticks(range(n), captions, rotation=55, ha="left", fontsize=7)
    ax.set_yticks([])
    ax.spines[:].set_visible(False)
    ax.set_ylabel("images (v_i)")
    ax.set_xlabel("captions (t_j); boxed: true pairs, dot: the row's best caption")
    fig.colorbar(mesh, ax=ax, shrink=0.6, label="cosine similarity")
    ax.set_title(title, pad=12)
    return _save(fig, path)


def zero_shot_grid(
    images: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    labels: Sequence[int] | None = None,
    top_k: int = 3,
    ncols: int = 4,
    title: str = "zero-shot predictions",
) -> Path:
    """Each image next to its top_k classes and their probabilities, softmax(exp(s) v . t_k).
    The true class (if labels are given) is green when predicted, red bars mean a miss.
    images (N, H, W, C), probs (N, K) rows summing to 1, K class names."""
    n = len(images)
    nrows = -(-n // ncols)
    fig = plt.figure(figsize=(3.4 * ncols, 1.5 * nrows), layout="constrained")
    grid = fig.add_gridspec(nrows, 2 * ncols, width_ratios=[1, 1.6] * ncols)
    for i in range(n):
        r, c = divmod(i, ncols)
        ax_img = fig.add_subplot(grid[r, 2 * c])
        ax_img.imshow(np.clip(images[i], 0, 1))
        ax_img.set_axis_off()
        ax = fig.add_subplot(grid[r, 2 * c + 1])
        top = np.argsort(-probs[i])[:top_k]
        truth = None if labels is None else int(labels[i])
        colours = [
            "0.6" if truth is None else ("C2" if k == truth else "C3" if rank == 0 else "0.7")
            for rank, k in enumerate(top)
        ]
        ax.barh(range(top_k), probs[i, top], color=colours)
        for rank, k in enumerate(top):
            ax.text(0.02, rank, f"{class_names[k]}  {probs[i, k]:.2f}", va="center", fontsize=7)
        ax.set(xlim=(0, 1), ylim=(top_k - 0.5, -0.5), xticks=[], yticks=[])
        ax.spines[:].set_visible(False)
        if truth is not None and truth not in top:
            ax.set_title(f"true: {class_names[truth]}", fontsize=7, color="C3", loc="left")
    fig.suptitle(title)
    return _save(fig, path)


def temperature_curve(
    steps: Sequence[int],
    temperature: Sequence[float],
    path: str | Path,
    init: float = 0.07,
    floor: float = 0.01,
    title: str = "learned temperature",
) -> Path:
    """tau = 1 / exp(logit_scale) against the step, log scale, with its start and its floor
    (the clamp exp(logit_scale) <= 100). A falling tau sharpens the softmax over the batch."""
    tau = np.asarray(temperature, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, tau, color="C0", label="tau = 1 / exp(logit_scale)")
    ax.axhline(init, color="0.5", ls=":", lw=1, label=f"start: tau = {init:g}")
    ax.axhline(floor, color="C3", ls="--", lw=1, label=f"clamp: tau >= {floor:g}")
    ticks = [0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.2, 0.5, 1.0]
    ax.set(xlabel="step", ylabel="temperature tau", yscale="log")
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks], minor=False)
    ax.set_yticks([], minor=True)
    ax.set_ylim(min(floor, tau.min()) / 1.15, max(init, tau.max()) * 1.15)
    ax.set_title(f"{title}: tau {tau[0]:.3f} -> {tau[-1]:.4f} (1/tau = {1 / tau[-1]:.0f})")
    ax.legend(frameon=False, loc="center right")
    return _save(fig, path)


# --- ViT (lesson 02) ---------------------------------------------------------------------------


def patch_tokens(
    images: np.ndarray,
    names: Sequence[str],
    patch_size: int,
    path: str | Path,
    index: int = 0,
    per_line: int = 13,
    title: str = "an image becomes a sequence of patch tokens",
) -> Path:
    """Top: sample images with their class names. Bottom left: images[index] with its P x P patch
    grid and each patch's number. Bottom right: the token sequence the transformer reads,
    [CLS] first, then the patches row by row (each patch later flattened to P^2 C values).
    images (N, H, W, C) in [0, 1]; names: one label per image."""
    img = np.clip(np.asarray(images, dtype=float), 0, 1)
    n, h, w, c = img.shape
    p = patch_size
    gh, gw = h // p, w // p
    fig = plt.figure(figsize=(11, 6.2), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 2.6])
    samples = top.subplots(1, n)
    for i, ax in enumerate(np.atleast_1d(samples)):
        ax.imshow(img[i], interpolation="nearest")
        label = f"{names[i]} (split below)" if i == index else names[i]
        ax.set_title(label, fontsize=8, color="C3" if i == index else "black")
        ax.set_axis_off()
    top.suptitle("samples (the classifier's target: the shape)", fontsize=9)

    left, right = bottom.subplots(1, 2, width_ratios=[1, 1.6])
    left.imshow(img[index], interpolation="nearest")
    for k in range(1, gh):
        left.axhline(k * p - 0.5, color="white", lw=0.8)
    for k in range(1, gw):
        left.axvline(k * p - 0.5, color="white", lw=0.8)
    for r in range(gh):
        for col in range(gw):
            left.text(
                col * p,
                r * p,
                str(r * gw + col),
                color="yellow",
                fontsize=5,
                va="top",
                ha="left",
                alpha=0.9,
            )
    left.set_title(f"1. split {h}x{w}x{c} into {gh}x{gw} = {gh * gw} patches of {p}x{p}")
    left.set_xticks([])
    left.set_yticks([])

    tokens = gh * gw + 1
    lines = -(-tokens // per_line)
    gap = max(1, p // 2)
    cell = p + gap
    mosaic = np.ones((lines * cell + gap, per_line * cell + gap, 3))
    for t in range(tokens):
        line, slot = divmod(t, per_line)
        y0, x0 = gap + line * cell, gap + slot * cell
        if t == 0:
            mosaic[y0 : y0 + p, x0 : x0 + p] = (0.55, 0.75, 0.95)
        else:
            r, col = divmod(t - 1, gw)
            mosaic[y0 : y0 + p, x0 : x0 + p] = img[
                index, r * p : (r + 1) * p, col * p : (col + 1) * p
            ]
    right.imshow(mosaic, interpolation="nearest")
    for t in range(tokens):
        line, slot = divmod(t, per_line)
        y0, x0 = gap + line * cell, gap + slot * cell
        label = "CLS" if t == 0 else str(t - 1)
        right.text(
            x0 + p / 2 - 0.5,
            y0 + p + gap / 2 - 0.5,
            label,
            ha="center",
            va="center",
            fontsize=5.5,
            color="C0" if t == 0 else "0.3",
        )
    right.set_title(
        f"2-4. the token sequence: [CLS], then patch 0 ... {gh * gw - 1} row by row\n"
        f"(each patch: {p}x{p}x{c} = {p * p * c} values, z_p = x_p E)"
    )
    right.set_axis_off()
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def position_similarity(
    pos_embedding: np.ndarray,
    grid: tuple[int, int],
    path: str | Path,
    title: str = "cosine similarity of learned position embeddings",
) -> Path:
    """As the ViT paper's figure 7: for each patch position (r, c), a small map of the cosine
    similarity between its embedding E_pos[r, c] and every other position's. Nearby positions
    with similar embeddings mean the model learned the 2-D layout from 1-D indices.
    pos_embedding (gh * gw, D), patch positions only (no [CLS]); grid (gh, gw)."""
    e = np.asarray(pos_embedding, dtype=float)
    gh, gw = grid
    unit = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T  # (gh gw, gh gw)
    fig, axes = plt.subplots(gh, gw, figsize=(0.85 * gw + 1.2, 0.85 * gh + 0.6), squeeze=False)
    fig.subplots_adjust(wspace=0.08, hspace=0.08, left=0.08, right=0.86, bottom=0.06, top=0.9)
    for r in range(gh):
        for c in range(gw):
            ax = axes[r, c]
            mappable = ax.imshow(sim[r * gw + c].reshape(gh, gw), cmap="viridis", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(str(r + 1), rotation=0, ha="right", va="center")
            if r == gh - 1:
                ax.set_xlabel(str(c + 1))
    fig.supylabel("input patch row", x=0.01)
    fig.supxlabel("input patch column", y=0.0)
    cax = fig.add_axes((0.89, 0.2, 0.02, 0.6))
    fig.colorbar(mappable, cax=cax, label="cosine similarity")
    fig.suptitle(title)
    return _save(fig, path)


def cls_attention(
    images: np.ndarray,
    maps: Sequence[np.ndarray],
    map_names: Sequence[str],
    grid: tuple[int, int],
    path: str | Path,
    titles: Sequence[str] | None = None,
    title: str = "where the [CLS] token looks",
) -> Path:
    """Each image (top row), then one row per attention map, drawn over the image: how much the
    [CLS] token takes from each patch. images (N, H, W, C); maps: arrays (N, gh * gw), one
    per row, e.g. the last layer's [CLS] row and the attention rollout."""
    img = np.clip(np.asarray(images, dtype=float), 0, 1)
    n, h, w, _ = img.shape
    gh, gw = grid
    rows = 1 + len(maps)
    fig, axes = plt.subplots(
        rows, n, figsize=(1.35 * n + 0.8, 1.45 * rows), squeeze=False, layout="constrained"
    )
    for i in range(n):
        axes[0, i].imshow(img[i], interpolation="nearest")
        if titles is not None:
            axes[0, i].set_title(titles[i], fontsize=7)
        for k, m in enumerate(maps):
            _heat_over(axes[k + 1, i], img[i], np.asarray(m[i], dtype=float).reshape(gh, gw))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.spines[:].set_visible(False)
    axes[0, 0].set_ylabel("image", fontsize=8)
    for k, name in enumerate(map_names):
        axes[k + 1, 0].set_ylabel(name, fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


# --- the graph behind a tensor (issue #11: stepping through the source; lesson 01) -------------


@dataclass
class GraphNode:
    """One tensor of a graph: `kind` is "op" (made by an op), "param" (a module's Parameter),
    "input" (another leaf that requires grad) or "const" (a leaf without grad); `layer` counts
    ops from the output (0) by the longest path; `position` is its order among the layer's
    tensors (left to right), `x` where it is drawn."""

    tensor: Any
    kind: str
    label: str
    layer: int = 0
    position: int = 0
    x: float = 0.0


@dataclass
class GraphLayout:
    """`nodes[0]` is the output; `edges` are (input, result) pairs of node indices, one per pair
    however often the op used that input; `routes[edge]` are the (x, layer) points its line passes
    through (one per layer crossed, so long edges bend around nodes); `crossings` counts edges
    that cross between neighbouring layers."""

    nodes: list[GraphNode]
    edges: list[tuple[int, int]]
    routes: dict[tuple[int, int], list[tuple[float, int]]]
    crossings: int

    @property
    def depth(self) -> int:
        return 1 + max(n.layer for n in self.nodes)


def _graph_label(t: Any, kind: str) -> str:
    shape = "(" + ", ".join(str(n) for n in t.shape) + ("," if t.ndim == 1 else "") + ")"
    what = f"{shape} {t.dtype}"
    if kind == "op":
        head = t.grad_fn.op if t.name is None else f"{t.name} = {t.grad_fn.op}"
    elif kind == "const":
        head = t.name or (f"{t.item():.4g}" if t.size == 1 else "const")
        what = "" if t.size == 1 and t.name is None else what
    else:
        head = t.name or "input"
    lines = [head, what] if what else [head]
    if t.grad is not None:
        lines.append(f"grad {tuple(t.grad.shape)}")
    return "\n".join(lines)


def graph_layers(tensor: Any, constants: bool = True, sweeps: int = 8) -> GraphLayout:
    """Lay out the graph that produced `tensor` in layers, for `draw_graph`; no drawing.

    1. Collect every tensor reachable from the output through `grad_fn.inputs`, each once;
       a constant (a leaf without grad, e.g. the cached 0.5 of x * 0.5) once beside each op
       that uses it, not as one node with lines across the whole graph.
    2. Longest-path layering from the output: layer(output) = 0, and a tensor sits one layer
       below the deepest op that uses it, layer(t) = 1 + max over its users. Every edge then
       goes from a deeper layer to a shallower one, and a weight sits right next to its op.
    3. An edge that spans several layers gets a waypoint in each layer between (Sugiyama).
    4. Order each layer by the barycentre (mean position) of its neighbours in the layer above,
       then below, `sweeps` times, keeping the order with the fewest crossings.
    5. x coordinates: each node pulled toward the mean x of its neighbours, in order, without
       overlapping (the mean of a left-to-right and a right-to-left placement), 3 x `sweeps`
       times.
    constants=False leaves out leaves that do not require grad (0.5 in x * 0.5, the data).
    """
    from .nn.module import Parameter  # viz needs only the class, to tell weights apart

    if not hasattr(tensor, "grad_fn"):
        raise TypeError(f"graph_layers: expected a tinymm Tensor, got {type(tensor).__name__}")
    if not isinstance(sweeps, int) or sweeps < 0:
        raise ValueError(f"graph_layers: sweeps must be an integer >= 0, got {sweeps!r}")
    # 1. the tensors, each once, and the distinct (input, result) edges
    index, tensors, edges, known = {id(tensor): 0}, [tensor], [], set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        fn = t.grad_fn
        if fn is None:
            continue
        if fn.released:
            raise RuntimeError(
                f"graph_layers: backward() released the graph behind '{fn.op}'; draw it before "
                "backward, or call backward(retain_graph=True)"
            )
        for inp in fn.inputs:
            constant = inp.grad_fn is None and not inp.requires_grad
            if constant and not constants:
                continue
            key = (id(inp), id(t)) if constant else id(inp)  # a constant: once beside each user
            if key not in index:
                index[key] = len(tensors)
                tensors.append(inp)
                stack.append(inp)
            edge = (index[key], index[id(t)])
            if edge not in known:
                known.add(edge)
                edges.append(edge)
    n = len(tensors)
    inputs_of = [[] for _ in range(n)]
    users = [0] * n
    for src, dst in edges:
        inputs_of[dst].append(src)
        users[src] += 1

    # 2. longest path from the output: a tensor's layer is fixed once all its users have theirs
    layer = [0] * n
    ready = [0]
    while ready:
        i = ready.pop()
        for j in inputs_of[i]:
            layer[j] = max(layer[j], layer[i] + 1)
            users[j] -= 1
            if users[j] == 0:
                ready.append(j)

    # 3. waypoints: items 0..n-1 are tensors, n.. are waypoints of long edges
    item_layer = list(layer)
    chains = {}  # edge -> its items from the result (shallow) down to the input (deep)
    for src, dst in edges:
        chain = [dst]
        for k in range(layer[dst] + 1, layer[src]):
            item_layer.append(k)
            chain.append(len(item_layer) - 1)
        chain.append(src)
        chains[(src, dst)] = chain
    up = [[] for _ in item_layer]  # neighbours one layer shallower
    down = [[] for _ in item_layer]  # neighbours one layer deeper
    for chain in chains.values():
        for a, b in zip(chain[:-1], chain[1:], strict=True):
            down[a].append(b)
            up[b].append(a)
    depth = max(item_layer) + 1
    # first order: as met going down from the output
    rows: list[list[int]] = [[] for _ in range(depth)]
    rows[0] = [0]
    placed = {0}
    for k in range(depth - 1):
        for a in rows[k]:
            for b in down[a]:
                if b not in placed:
                    placed.add(b)
                    rows[k + 1].append(b)

    # 4. barycentre sweeps
    def crossings(rows: list[list[int]]) -> int:
        total = 0
        for k in range(depth - 1):
            pos = {b: p for p, b in enumerate(rows[k + 1])}
            pairs = [(p, pos[b]) for p, a in enumerate(rows[k]) for b in down[a]]
            for i, (a1, b1) in enumerate(pairs):
                total += sum((a1 - a2) * (b1 - b2) < 0 for a2, b2 in pairs[i + 1 :])
        return total

    def reorder(row: list[int], neighbours: list[list[int]], pos: dict[int, int]) -> list[int]:
        """Sort by the mean position of the neighbours; an item without any keeps its place."""
        key = {}
        for p, item in enumerate(row):
            near = [pos[b] for b in neighbours[item]]
            key[item] = sum(near) / len(near) if near else p
        return sorted(row, key=key.__getitem__)

    best, best_crossings = [list(r) for r in rows], crossings(rows)
    for sweep in range(sweeps):
        ks = range(1, depth) if sweep % 2 == 0 else range(depth - 2, -1, -1)
        for k in ks:
            other = rows[k - 1] if sweep % 2 == 0 else rows[k + 1]
            pos = {b: p for p, b in enumerate(other)}
            rows[k] = reorder(rows[k], up if sweep % 2 == 0 else down, pos)
        count = crossings(rows)
        if count < best_crossings:
            best, best_crossings = [list(r) for r in rows], count
    rows = best

    # 5. x coordinates: widths from the labels, waypoints thin
    labels = []
    for t in tensors:
        if t.grad_fn is not None:
            kind = "op"
        elif isinstance(t, Parameter):
            kind = "param"
        else:
            kind = "input" if t.requires_grad else "const"
        labels.append((kind, _graph_label(t, kind)))
    half = [_graph_box(label)[0] / 2 for _, label in labels] + [0.08] * (len(item_layer) - n)
    x = [0.0] * len(item_layer)
    for row in rows:
        left = -sum(2 * half[i] + 0.15 for i in row) / 2
        for i in row:
            x[i] = left + half[i]
            left += 2 * half[i] + 0.15
    for sweep in range(3 * sweeps):
        for k in range(depth) if sweep % 2 else range(depth - 1, -1, -1):
            row = rows[k]
            want = [
                sum(x[b] for b in up[i] + down[i]) / len(up[i] + down[i])
                if up[i] + down[i]
                else x[i]
                for i in row
            ]
            gaps = [half[a] + half[b] + 0.15 for a, b in zip(row[:-1], row[1:], strict=True)]
            lr, rl = list(want), list(want)
            for p in range(1, len(row)):
                lr[p] = max(want[p], lr[p - 1] + gaps[p - 1])
            for p in range(len(row) - 2, -1, -1):
                rl[p] = min(want[p], rl[p + 1] - gaps[p])
            for p, i in enumerate(row):
                x[i] = (lr[p] + rl[p]) / 2

    position = {i: p for row in rows for p, i in enumerate(j for j in row if j < n)}
    nodes = [
        GraphNode(t, kind, label, layer[i], position[i], x[i])
        for i, (t, (kind, label)) in enumerate(zip(tensors, labels, strict=True))
    ]
    routes = {
        edge: [(x[i], item_layer[i]) for i in reversed(chain)] for edge, chain in chains.items()
    }
    return GraphLayout(nodes, edges, routes, best_crossings)


def _graph_box(label: str) -> tuple[float, float]:
    """(width, height) of a node's box in layout units (1 unit = 1.5 in across, 0.8 in down)."""
    lines = label.split("\n")
    width = max(0.45, 0.036 * max(len(line) for line in lines) + 0.12)
    height = (len(lines) * 7.6 + 7) / (0.8 * 72)
    return width, height


_GRAPH_STYLES = {  # kind -> (face colour, edge colour, box style, what the legend calls it)
    "op": ("#dbe9f6", "#3d6fa8", "round,pad=0.3", "op result (op name, shape, dtype)"),
    "param": ("#fde0b8", "#b8701e", "round4,pad=0.3", "parameter (its name in the model)"),
    "input": ("#d7efd0", "#3f8f3a", "square,pad=0.3", "input that requires grad"),
    "const": ("#ffffff", "#9a9a9a", "square,pad=0.25", "constant (no grad)"),
}


def draw_graph(
    tensor: Any, path: str | Path, title: str | None = None, constants: bool = True
) -> Path:
    """Draw the graph that produced `tensor`, the output at the bottom, forward flowing down.

    Every node is a tensor: ops show their name and the shape and dtype of what they made,
    parameters their dotted name, leaves and constants their own style (see the legend). After
    `backward(retain_graph=True)` every tensor that kept a gradient shows its shape. The layout
    is `graph_layers` (longest-path layers, barycentre order); matplotlib only, no graphviz."""
    layout = graph_layers(tensor, constants=constants)
    xs = [n.x for n in layout.nodes] + [x for r in layout.routes.values() for x, _ in r]
    span = max(xs) - min(xs) + 1.6
    size = (1.5 * span + 0.5, 0.8 * layout.depth + 1.2)
    dpi = min(plt.rcParams["figure.dpi"], 30_000 / max(size))  # big graphs: under 30k pixels
    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    height = [_graph_box(n.label)[1] for n in layout.nodes]
    for (src, dst), route in layout.routes.items():
        points = [(px, py) for px, py in route]
        points[0] = (points[0][0], points[0][1] - height[src] / 2)  # leave the input's box
        end = (points[-1][0], points[-1][1] + height[dst] / 2 + 0.03)  # stop at the result's
        line = np.array(points[:-1] + [end])
        colour = "0.75" if layout.nodes[src].kind == "const" else "0.45"
        ax.plot(line[:, 0], line[:, 1], color=colour, lw=0.7, zorder=1)
        ax.annotate(
            "",
            xy=end,
            xytext=tuple(line[-2]),
            arrowprops=dict(arrowstyle="-|>", color=colour, lw=0.7, mutation_scale=7),
            zorder=1,
        )
    for i, node in enumerate(layout.nodes):
        face, edge, box, _ = _GRAPH_STYLES[node.kind]
        ax.text(
            node.x,
            node.layer,
            node.label,
            ha="center",
            va="center",
            fontsize=5.5 if node.kind == "const" else 6,
            fontweight="bold" if i == 0 else "normal",
            bbox=dict(boxstyle=box, fc=face, ec=edge, lw=1.6 if i == 0 else 0.7),
            zorder=2,
        )
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(-0.6, layout.depth - 0.4)
    ax.set_axis_off()
    kinds = {n.kind for n in layout.nodes}
    handles = [
        plt.Rectangle((0, 0), 1, 1, fc=face, ec=edge, label=name)
        for kind, (face, edge, _, name) in _GRAPH_STYLES.items()
        if kind in kinds
    ]
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=len(handles),
        frameon=False,
        fontsize=7,
    )
    count = {k: sum(n.kind == k for n in layout.nodes) for k in _GRAPH_STYLES}
    names = {"op": "op", "param": "parameter", "input": "input", "const": "constant"}
    summary = ", ".join(
        f"{count[k]} {names[k]}{'' if count[k] == 1 else 's'}" for k in names if count[k]
    )
    summary += "; the output (bold) at the bottom"
    ax.set_title(f"{title}\n{summary}" if title else summary, fontsize=9)
    return _save(fig, path)


# --- video (lesson 07) -------------------------------------------------------------------------


def clip_strips(
    clips: np.ndarray,
    row_titles: Sequence[str],
    path: str | Path,
    title: str = "clips, frame by frame",
) -> Path:
    """Each clip (n, T, H, W, C) as one row of its T frames, time to the right, with its title
    (e.g. label and prediction) above the row."""
    clips = np.clip(np.asarray(clips, dtype=float), 0, 1)
    n, frames = clips.shape[:2]
    fig, axes = plt.subplots(
        n, frames, figsize=(0.95 * frames + 0.4, 1.15 * n + 0.5), squeeze=False
    )
    fig.subplots_adjust(wspace=0.05, hspace=0.45, left=0.02, right=0.98, bottom=0.02)
    for i in range(n):
        for k in range(frames):
            ax = axes[i, k]
            ax.imshow(clips[i, k], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == n - 1:
                ax.set_xlabel(f"frame {k}", fontsize=7)
        axes[i, 0].set_title(row_titles[i], fontsize=8, loc="left")
    fig.suptitle(title)
    return _save(fig, path)


def tubelets(
    clip: np.ndarray,
    tubelet: tuple[int, int],
    path: str | Path,
    title: str = "a clip cut into tubelets",
) -> Path:
    """One clip (T, H, W, C) as a row of frames with the p x p grid drawn on every frame; the
    t frames of one tubelet share a coloured border, and each cell carries the number of its
    token (time step, then row, then column, as tubeletify numbers them)."""
    clip = np.clip(np.asarray(clip, dtype=float), 0, 1)
    frames, h, w, _ = clip.shape
    t, p = tubelet
    gh, gw = h // p, w // p
    fig, axes = plt.subplots(1, frames, figsize=(1.5 * frames + 0.3, 2.4), squeeze=False)
    fig.subplots_adjust(wspace=0.08, left=0.01, right=0.99, top=0.72, bottom=0.12)
    for k, ax in enumerate(axes[0]):
        step = k // t
        ax.imshow(clip[k], interpolation="nearest")
        for line in range(1, gh):
            ax.axhline(line * p - 0.5, color="white", lw=0.6)
        for line in range(1, gw):
            ax.axvline(line * p - 0.5, color="white", lw=0.6)
        for r in range(gh):
            for c in range(gw):
                token = (step * gh + r) * gw + c
                ax.text(c * p + 0.5, r * p + 0.5, str(token), color="yellow", fontsize=5.5,
                        va="top", ha="left")  # fmt: skip
        ax.set_xticks([])
        ax.set_yticks([])
        ax.spines[:].set_visible(True)
        for spine in ax.spines.values():
            spine.set_edgecolor(f"C{step}")
            spine.set_linewidth(2.5)
        ax.set_xlabel(f"frame {k}", fontsize=7)
        if k % t == 0:
            ax.set_title(
                f"time step {step}: frames {k}..{k + t - 1}", fontsize=7.5, loc="left",
                color=f"C{step}",
            )  # fmt: skip
    fig.suptitle(
        f"{title}\n{frames}x{h}x{w} clip, tubelets of {t} frames x {p}x{p} px -> "
        f"{frames // t} x {gh} x {gw} = {frames // t * gh * gw} tokens "
        f"(a 3-D convolution with kernel = stride = {t}x{p}x{p})",
        fontsize=9,
    )
    return _save(fig, path)


def space_time_attention(
    clips: np.ndarray,
    maps: Sequence[np.ndarray],
    map_names: Sequence[str],
    tubelet: tuple[int, int],
    path: str | Path,
    titles: Sequence[str] | None = None,
    title: str = "[CLS] attention over space and time",
) -> Path:
    """For each clip (n, T, H, W, C): a row of its frames, then one row per attention map,
    each (n, T/t, H/p, W/p), drawn over the frames (a tubelet's weight on each of its t
    frames), scaled to the clip's largest weight over all of space and time."""
    clips = np.clip(np.asarray(clips, dtype=float), 0, 1)
    n, frames, h, w, _ = clips.shape
    t, _ = tubelet
    rows = n * (1 + len(maps))
    fig, axes = plt.subplots(
        rows, frames, figsize=(0.95 * frames + 1.3, 1.0 * rows + 0.5), squeeze=False
    )
    fig.subplots_adjust(wspace=0.05, hspace=0.12, left=0.12, right=0.99, bottom=0.02, top=0.93)
    for i in range(n):
        base = i * (1 + len(maps))
        for k in range(frames):
            axes[base, k].imshow(clips[i, k], interpolation="nearest")
            for j, m in enumerate(maps):
                a = np.asarray(m[i], dtype=float)  # scaled to the clip's peak over space-time
                _heat_over(axes[base + 1 + j, k], clips[i, k], a[k // t], peak=a.max())
        axes[base, 0].set_ylabel(titles[i] if titles else "clip", fontsize=7)
        for j, name in enumerate(map_names):
            axes[base + 1 + j, 0].set_ylabel(name, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for k in range(frames):
        axes[0, k].set_title(f"frame {k}", fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def temporal_similarity(
    embedding: np.ndarray,
    path: str | Path,
    frames_per_step: int = 1,
    title: str = "cosine similarity of the learned temporal position embeddings",
) -> Path:
    """The cosine similarity of every pair of learned time-step embeddings E_time (steps, D),
    each cell written out. Neighbours in time that come out alike mean the model learned the
    order of its tokens from bare indices."""
    e = np.asarray(embedding, dtype=float)
    unit = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    steps = len(e)
    names = [
        f"step {s}\n(frames {s * frames_per_step}..{(s + 1) * frames_per_step - 1})"
        if frames_per_step > 1
        else f"frame {s}"
        for s in range(steps)
    ]
    size = 0.9 * steps + 2.2
    fig, ax = plt.subplots(figsize=(size + 1.2, size), layout="constrained")
    mappable = ax.imshow(sim, cmap="viridis", vmin=-1, vmax=1)
    for i in range(steps):
        for j in range(steps):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if sim[i, j] > 0.3 else "white")  # fmt: skip
    ax.set_xticks(range(steps), names, fontsize=7)
    ax.set_yticks(range(steps), names, fontsize=7)
    fig.colorbar(mappable, ax=ax, label="cosine similarity", shrink=0.8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def soundtrack_and_height(
    mel_db: np.ndarray,
    heights: np.ndarray,
    pitch_band: np.ndarray,
    duration: float,
    path: str | Path,
    titles: Sequence[str],
    title: str = "a soundtrack's pitch follows the object's height",
) -> Path:
    """One column per soundtrack: on top its mel spectrogram mel_db (n, n_mels, frames) in dB,
    band 0 at the bottom, with the pitch the height asks for (pitch_band (n, T), in mel-band
    units, one value per video frame) drawn over it; below, the object's height (n, T) in each
    video frame, on the same time axis."""
    mel_db = np.asarray(mel_db)
    n, n_mels, _ = mel_db.shape
    frames = heights.shape[1]
    times = (np.arange(frames) + 0.5) * duration / frames
    fig, axes = plt.subplots(
        2, n, figsize=(3.0 * n + 0.8, 4.6), squeeze=False, height_ratios=[1.6, 1],
        layout="constrained",
    )  # fmt: skip
    for i in range(n):
        top, bottom = axes[0, i], axes[1, i]
        mappable = top.imshow(mel_db[i], origin="lower", aspect="auto", cmap="magma",
                              extent=(0, duration, 0, n_mels), vmin=-80, vmax=0,
                              interpolation="nearest")  # fmt: skip
        top.plot(times, pitch_band[i], "o--", color="cyan", ms=3, lw=0.8, label="pitch of h")
        top.set_title(titles[i], fontsize=8)
        top.set_xlim(0, duration)
        bottom.plot(times, heights[i], "o-", color="C2", ms=4)
        bottom.set(xlim=(0, duration), ylim=(0, 1), xlabel="time (s)")
        if i == 0:
            top.set_ylabel("mel band")
            bottom.set_ylabel("height h on screen")
            top.legend(frameon=False, fontsize=7, loc="upper left", labelcolor="white")
    fig.colorbar(mappable, ax=axes[0, :], label="dB below peak", shrink=0.9)
    fig.suptitle(title)
    return _save(fig, path)


# --- lesson 04: vision-language model -------------------------------------------------------------


def dialogue_panel(
    images: np.ndarray,
    questions: Sequence[str],
    answers: Sequence[str],
    truths: Sequence[str],
    path: str | Path,
    ncols: int = 4,
    title: str = "image + question -> generated answer",
) -> Path:
    """One panel per turn: the image, the question under it and the generated answer, green
    if it equals the truth, red (with the truth) if not. images (N, H, W, C)."""
    n = len(images)
    fig, axes = _panels(n, ncols, (2.6, 3.1))
    for ax, image, q, a, t in zip(axes, images, questions, answers, truths, strict=False):
        ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
        right = a == t
        text = f"Q: {_wrap(q, 34)}\nA: {_wrap(a, 34)}" + (
            "" if right else f"\n(true: {_wrap(t, 28)})"
        )
        ax.set_xlabel(text, fontsize=7, color="green" if right else "red", loc="left")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    return _save(fig, path)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n   ".join(textwrap.wrap(text, width)) or "''"


def token_attention(
    images: np.ndarray,
    token_labels: Sequence[Sequence[str]],
    maps: Sequence[np.ndarray],
    grid: tuple[int, int],
    path: str | Path,
    row_titles: Sequence[str] | None = None,
    title: str = "each answer token's attention over the image patches",
) -> Path:
    """One row per example: the image, then for each generated token its attention over the
    patches drawn over the image. maps[i] (T_i, gh * gw), token_labels[i] T_i strings."""
    img = np.clip(np.asarray(images, dtype=float), 0, 1)
    n, h, w, _ = img.shape
    cols = 1 + max(len(m) for m in maps)
    fig, axes = plt.subplots(
        n, cols, figsize=(1.3 * cols + 0.6, 1.45 * n), squeeze=False, layout="constrained"
    )
    for i in range(n):
        axes[i, 0].imshow(img[i], interpolation="nearest")
        if row_titles is not None:
            axes[i, 0].set_title(_wrap(row_titles[i], 22), fontsize=6, loc="left")
        for j, a in enumerate(np.asarray(maps[i], dtype=float)):
            ax = axes[i, j + 1]
            _heat_over(ax, img[i], a.reshape(grid))
            ax.set_title(repr(token_labels[i][j]), fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, path)


def fused_attention(
    weights: np.ndarray,
    n_image: int,
    query_labels: Sequence[str],
    key_labels: Sequence[str],
    path: str | Path,
    title: str = "fused attention: queries from text only, keys [image | text]",
) -> Path:
    """The lecture's picture of the fusion: weights (L_q, n_image + L_t), text queries as rows,
    [image keys | text keys] as columns, a line between the two kinds of keys."""
    w = np.asarray(weights, dtype=float)
    fig, ax = plt.subplots(
        figsize=(0.2 * w.shape[1] + 2.5, 0.22 * w.shape[0] + 1.8), layout="constrained"
    )
    mappable = ax.imshow(w, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.axvline(n_image - 0.5, color="white", linewidth=1.5)
    ax.set_yticks(range(len(query_labels)), query_labels, fontsize=6)
    ax.set_xticks(range(len(key_labels)), key_labels, fontsize=6, rotation=90)
    ax.set_xlabel(f"keys: {n_image} image tokens | text tokens")
    ax.set_ylabel("queries: text tokens")
    fig.colorbar(mappable, ax=ax, label="attention weight (mean of heads)")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


# --- diffusion (lesson 05) ---------------------------------------------------------------------


def image_grid(
    images: np.ndarray,
    path: str | Path,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str = "",
    cell: float = 1.0,
) -> Path:
    """A grid of RGB images (rows, cols, H, W, 3) in [0, 1], labelled along both sides."""
    images = np.clip(np.asarray(images), 0, 1)
    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + 1.5, cell * rows + 0.6))
    axes = np.asarray(axes).reshape(rows, cols)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i, j]
            ax.imshow(images[i, j], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if col_labels is not None and i == 0:
                ax.set_title(col_labels[j], fontsize=7)
            if row_labels is not None and j == 0:
                ax.set_ylabel(row_labels[i], fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def noise_schedules(alphas_cumprod: dict[str, np.ndarray], path: str | Path) -> Path:
    """abar_t against t for each schedule: how much of the picture is left at step t."""
    fig, ax = plt.subplots(figsize=(4.5, 3))
    for name, abar in alphas_cumprod.items():
        ax.plot(np.arange(len(abar)), abar, label=name)
    ax.set(xlabel="step t", ylabel="abar_t = prod (1 - beta_s)", title="noise schedules")
    ax.legend(frameon=False)
    return _save(fig, path)


def cross_attention_maps(
    image: np.ndarray, maps: np.ndarray, words: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """The picture, then one map per text token (L, h, w): how much each image position
    (query) attends to that token (key)."""
    n = len(words)
    fig, axes = plt.subplots(1, n + 1, figsize=(1.3 * (n + 1), 1.8))
    axes[0].imshow(np.clip(image, 0, 1), interpolation="nearest")
    axes[0].set_title("sample", fontsize=8)
    for ax, m, word in zip(axes[1:], maps, words, strict=True):
        ax.imshow(m, cmap="viridis", vmin=0, vmax=maps.max(), interpolation="nearest")
        ax.set_title(repr(word), fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)
