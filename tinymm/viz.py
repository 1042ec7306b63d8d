"""The figures lessons save: each function draws one picture, saves it as a PNG, returns the path.

Matplotlib with the Agg backend (no screen needed).
"""

from __future__ import annotations

from collections.abc import Sequence
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
