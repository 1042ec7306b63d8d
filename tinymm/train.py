"""The small training loop every lesson shares, its progress line, and the lesson command line.

    history = fit(model, optimizer, loss_fn, (images, labels), steps=2000, batch_size=64, seed=0)

Each step: take the next mini-batch, loss = loss_fn(model, *batch), backward, (clip), step.
Batch order is a function of (seed, epoch) only, so a run resumed from a checkpoint sees the same
batches as an uninterrupted one and ends at the same weights.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import io, runtime
from .modes import set_reference_mode
from .nn import Module
from .optim import clip_grad_norm_
from .tensor import default_rng, no_grad


def lesson_args(
    name: str,
    description: str = "",
    argv: Sequence[str] | None = None,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The lesson contract's command line: --quick, --seed, --steps, --out (runs/<name>),
    --reference (the plain compositions instead of the fused kernels, on one thread: slower),
    --checkpoint PATH and --resume (see `checkpointing`). `options(parser)` adds the lesson's
    own, e.g. lambda p: p.add_argument("--fusion", choices=FUSIONS, default="lecture")."""
    parser = argparse.ArgumentParser(
        description=description.strip().splitlines()[0] if description else None
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps (default: lesson's)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs") / name, help="figures go here")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="run every composite op as its plain composition (tinymm.reference_mode): slower",
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="save the training state here as it trains"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from --checkpoint if it exists"
    )
    if options is not None:
        options(parser)
    args = parser.parse_args(argv)
    if args.resume and args.checkpoint is None:
        parser.error("--resume needs --checkpoint PATH")
    args.out.mkdir(parents=True, exist_ok=True)
    changed = runtime.tune()
    if changed:
        print(f"runtime.tune(): {runtime.describe(changed)}")
    if args.reference:
        set_reference_mode(True)
        print("reference mode: composite ops run as their plain compositions, on one thread")
    return args


def checkpointing(args: argparse.Namespace, steps: int, part: str = "") -> dict[str, Any]:
    """fit()'s checkpoint arguments from a lesson's --checkpoint / --resume: save every
    steps // 10 steps (at most 200) and at the end. `part` names one of several models a lesson
    trains, each in its own file (PATH.part.npz)."""
    if args.checkpoint is None:
        return {}
    path = Path(args.checkpoint)
    if part:
        path = path.with_name(f"{path.stem}.{part}{path.suffix or '.npz'}")
    return {
        "checkpoint": path,
        "checkpoint_every": min(max(steps // 10, 1), 200),
        "resume": args.resume,
    }


def result_line(metrics: dict[str, Any], seconds: float, seed: int) -> str:
    """Print (and return) the one final line of a lesson: `result: {json}`."""
    clean = {
        k: round(float(v), 4) if isinstance(v, float | np.floating) else v
        for k, v in metrics.items()
    }
    line = "result: " + json.dumps({**clean, "seconds": round(seconds, 1), "seed": seed})
    print(line, flush=True)
    return line


def in_batches(fn: Callable[..., Any], *arrays: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """fn over aligned arrays in slices of `batch_size`, without a graph; the results (Tensors
    or arrays) concatenated along axis 0. For evaluating on more data than one batch holds:
        logits = in_batches(model, test_images)            # (N, classes)
    """
    with no_grad():
        parts = [
            fn(*(a[i : i + batch_size] for a in arrays))
            for i in range(0, len(arrays[0]), batch_size)
        ]
    return np.concatenate([np.asarray(part) for part in parts])


def format_seconds(s: float) -> str:
    return f"{s:.0f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


@dataclass
class History:
    """What happened during training, for the figures."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    metric: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)  # each with its "step"
    seconds: float = 0.0


def fit(
    model: Module,
    optimizer: Any,
    loss_fn: Callable[..., Any],
    data: Sequence[np.ndarray],
    *,
    steps: int,
    batch_size: int,
    seed: int = 0,
    lr: Callable[[int], float] | None = None,
    clip: float | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    eval_every: int = 0,
    log_every: int = 50,
    metric_name: str = "acc",
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    log: Callable[[str], None] = print,
    after_step: Callable[[int], None] | None = None,
    generators: Sequence[np.random.Generator] = (),
) -> History:
    """Train `model` for `steps` optimizer steps on mini-batches of `data` (aligned arrays).

    loss_fn(model, *batch) returns the loss tensor, or (loss, metric) with a float metric.
    lr(step) sets the learning rate of every parameter group before each step.
    evaluate() is called every eval_every steps and at the end; its dict goes in the history.
    With `checkpoint`, the model, optimizer, step and random state are saved every
    checkpoint_every steps; resume=True continues from that file if it exists. `generators`:
    NumPy generators of the loss's own (e.g. diffusion's noise), saved and restored with
    tinymm's, so that a resumed run draws the numbers the uninterrupted run would have.
    after_step(done) runs right after each optimizer step (done = steps taken so far), e.g. to
    clamp a parameter into its range or to record it.
    """
    runtime.tune()  # the process settings that pay for training (tinymm/runtime.py)
    history = History()
    start_step = 0
    if resume and checkpoint is not None and Path(checkpoint).exists():
        start_step = _load_checkpoint(checkpoint, model, optimizer, generators)
        log(f"resumed from {checkpoint} at step {start_step}")
    n = len(data[0])
    t0 = time.perf_counter()
    window_t, window_steps = t0, 0
    model.train()
    for step in range(start_step, steps):
        epoch, offset = divmod(step * batch_size, n)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        idx = order[offset : offset + batch_size]
        if len(idx) < batch_size:  # the epoch's tail: top up from the next epoch's order
            idx = np.concatenate(
                [
                    idx,
                    np.random.default_rng([seed, epoch + 1]).permutation(n)[
                        : batch_size - len(idx)
                    ],
                ]
            )
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr(step)
        out = loss_fn(model, *(a[idx] for a in data))
        loss, metric = out if isinstance(out, tuple) else (out, float("nan"))
        if not np.isfinite(loss.item()):  # stop before backward spreads it into every weight
            raise FloatingPointError(
                f"fit: the loss is {loss.item()} at step {step + 1}/{steps}; the weights are "
                "as after the previous step. Find the op that made it with "
                "`with tm.detect_anomaly():` around one step, or lower the learning rate"
            )
        optimizer.zero_grad()
        loss.backward()
        if clip is not None:
            clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if after_step is not None:
            after_step(step + 1)
        history.step.append(step + 1)
        history.loss.append(float(loss.item()))
        history.metric.append(float(metric))
        window_steps += 1

        done = step + 1
        if evaluate is not None and eval_every and done % eval_every == 0 and done < steps:
            _record_eval(history, evaluate, model, done)
        if (
            checkpoint is not None
            and checkpoint_every
            and (done % checkpoint_every == 0 or done == steps)
        ):
            _save_checkpoint(checkpoint, model, optimizer, done, generators)
        if done % log_every == 0 or done == steps:
            now = time.perf_counter()
            rate = window_steps / max(now - window_t, 1e-9)
            window_t, window_steps = now, 0
            recent = slice(-log_every, None)
            line = (
                f"step {done:>{len(str(steps))}}/{steps}  "
                f"loss {np.mean(history.loss[recent]):.4f}  "
            )
            if not np.isnan(metric):
                line += f"{metric_name} {np.mean(history.metric[recent]):.3f}  "
            if history.evals and history.evals[-1]["step"] == done:
                line += (
                    "  ".join(f"{k} {v:.3f}" for k, v in history.evals[-1].items() if k != "step")
                    + "  "
                )
            elapsed = now - t0
            line += (
                f"{rate:.1f} steps/s  elapsed {format_seconds(elapsed)}  "
                f"eta {format_seconds((steps - done) / max(rate, 1e-9))}"
            )
            log(line)
    if evaluate is not None:
        _record_eval(history, evaluate, model, steps)
    history.seconds = time.perf_counter() - t0
    return history


def _record_eval(history: History, evaluate: Callable, model: Module, step: int) -> None:
    model.eval()
    with no_grad():
        history.evals.append({"step": step, **evaluate()})
    model.train()


def _save_checkpoint(
    path: str | Path, model: Module, optimizer: Any, step: int, generators: Sequence[Any]
) -> None:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"optim.{k}": v for k, v in optimizer.state_dict().items()})
    state["train.step"] = np.array(step)
    state["train.rng"] = np.array(json.dumps(default_rng().bit_generator.state))
    if generators:
        states = [g.bit_generator.state for g in generators]
        state["train.generators"] = np.array(json.dumps(states))
    io.save(state, path)


def _load_checkpoint(
    path: str | Path, model: Module, optimizer: Any, generators: Sequence[Any]
) -> int:
    state = io.load(path)
    saved = json.loads(str(state["train.generators"])) if "train.generators" in state else []
    if len(saved) != len(generators):
        raise ValueError(
            f"fit: the checkpoint {path} holds the states of {len(saved)} generators, but "
            f"generators= gives {len(generators)}: resume with the generators it was saved with"
        )
    model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    optimizer.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("optim.")})
    default_rng().bit_generator.state = json.loads(str(state["train.rng"]))
    for generator, generator_state in zip(generators, saved, strict=True):
        generator.bit_generator.state = generator_state
    return int(state["train.step"])
