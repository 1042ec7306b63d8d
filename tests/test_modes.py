"""The two readings and the debugger: reference mode, one thread under a trace function, pdb.

- reference_mode() (context manager, decorator) and TINYMM_REFERENCE=1 switch every composite op
  to its plain composition; a whole model gives the same loss and gradients both ways.
- While a trace function is set, tinymm.parallel runs every kernel on the calling thread.
- A real pdb session stops in a linear layer's weight gradient and in attention's softmax
  backward (both ran on the worker thread before), seeing all the rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from scipy.special import erf

import tinymm as tm
import tinymm.functional as F
from tinymm import kernels, nn, parallel
from tinymm.models import ViT

ROOT = Path(__file__).resolve().parents[1]


def test_reference_mode_is_a_context_manager_and_a_decorator_and_restores():
    assert not tm.is_reference_mode()
    with tm.reference_mode():
        assert tm.is_reference_mode()
        with tm.reference_mode(False):
            assert not tm.is_reference_mode()
        assert tm.is_reference_mode()
    assert not tm.is_reference_mode()

    @tm.reference_mode()
    def inside():
        return tm.is_reference_mode()

    assert inside() and not tm.is_reference_mode()
    with pytest.raises(RuntimeError), tm.reference_mode():
        raise RuntimeError("an error inside still restores the mode")
    assert not tm.is_reference_mode()


def graph_ops(t: tm.Tensor) -> list[str]:
    ops, stack, seen = [], [t], set()
    while stack:
        node = stack.pop()._node
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        ops.append(node.op)
        stack.extend(node.inputs)
    return ops


def test_reference_mode_builds_the_composition_not_the_fused_node():
    x = tm.randn(3, 5, requires_grad=True)
    assert graph_ops(F.softmax(x)) == ["softmax"]
    with tm.reference_mode():
        ops = graph_ops(F.softmax(x))
    assert "softmax" not in ops and {"exp", "sum", "/"} <= set(ops) | {"/"}
    assert len(ops) >= 3


def test_environment_variable_turns_reference_mode_on():
    code = "import tinymm as tm; print(tm.is_reference_mode())"
    env = {**os.environ, "TINYMM_REFERENCE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr
    env["TINYMM_REFERENCE"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_a_whole_vit_gives_the_same_loss_and_gradients_in_both_readings():
    tm.manual_seed(0)
    model = ViT(8, 4, channels=3, dim=16, depth=2, heads=2, num_classes=3)
    images = np.random.default_rng(0).standard_normal((4, 8, 8, 3))
    labels = np.array([0, 1, 2, 1])
    results = []
    for reference in (False, True):
        model.zero_grad()
        with tm.reference_mode(reference):
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
        results.append((loss.item(), [p.grad.copy() for p in model.parameters()]))
    (loss_fused, grads_fused), (loss_ref, grads_ref) = results
    np.testing.assert_allclose(loss_fused, loss_ref, rtol=1e-5)
    for gf, gr in zip(grads_fused, grads_ref, strict=True):
        np.testing.assert_allclose(gf, gr, rtol=1e-3, atol=1e-5)


def test_silu_two_readings_agree_in_float64():
    x = tm.tensor(np.linspace(-6, 6, 25), requires_grad=True)
    F.silu(x).sum().backward()
    fused = x.grad.copy()
    x.grad = None
    with tm.reference_mode():
        F.silu(x).sum().backward()
    np.testing.assert_allclose(fused, x.grad, rtol=1e-12)


def test_exact_gelu_float32_kernel_is_float32_accurate():
    """The float32 kernel computes Phi with A&S 7.1.26 (|error| <= 7.5e-8); SciPy's exact erf
    is the truth. Values and derivative within a few float32 ulps of the magnitude."""
    a = np.linspace(-8, 8, 4001).astype(np.float32).astype(np.float64)  # exact float32 inputs
    phi = 0.5 * (1 + erf(a / np.sqrt(2)))
    x = tm.tensor(a.astype(np.float32), requires_grad=True)
    y = kernels.gelu_erf(x)
    y.sum().backward()
    assert y.dtype == np.float32 and x.grad.dtype == np.float32
    assert np.all(np.abs(y.data - a * phi) <= 1.5e-7 * (1 + np.abs(a)))
    slope = phi + a * np.exp(-0.5 * a * a) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(x.grad, slope, atol=5e-7)


def test_kernels_run_on_the_calling_thread_while_a_trace_function_is_set():
    like = np.zeros((2**20, 1), np.float32)  # big enough to be split over two threads
    seen: list[int] = []

    def kernel(rows):
        seen.append(threading.get_ident())

    parallel.rows(kernel, like)
    split = len(seen)
    seen.clear()
    previous = sys.gettrace()
    sys.settrace(lambda *a: None)
    try:
        parallel.rows(kernel, like)
    finally:
        sys.settrace(previous)
    assert seen == [threading.get_ident()]
    if parallel.threads() > 1:
        assert split == 2  # without the trace function it was split
    seen.clear()
    with tm.reference_mode():
        parallel.rows(kernel, like)
    assert seen == [threading.get_ident()]


PDB_SCRIPT = """
import numpy as np
import tinymm as tm
import tinymm.functional as F
from tinymm import nn

tm.manual_seed(0)
layer = nn.Linear(512, 512)
x = tm.randn(2048, 512, requires_grad=True)      # big: split over two threads normally
q = tm.randn(8, 4, 64, 32, requires_grad=True)
loss = (layer(x) ** 2).mean() + F.scaled_dot_product_attention(q, q, q).mean()
loss.backward()
print("done", flush=True)
"""


def line_of(text: str, path: Path) -> int:
    lines = path.read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


@pytest.mark.skipif(sys.platform == "win32", reason="pdb driven through a pipe")
def test_pdb_stops_in_a_linear_weight_gradient_and_in_attention_backward(tmp_path):
    script = tmp_path / "debug_me.py"
    script.write_text(PDB_SCRIPT)
    kernels_py = ROOT / "tinymm" / "kernels.py"
    weight_line = line_of("gw = parallel.matmul(x_rows.T, g_rows)", kernels_py)
    softmax_line = line_of("ds *= p  # times P^T", kernels_py)
    at_each_stop = [
        "p ('STOP', __import__('threading').current_thread().name)",
        "p ('COLUMNS', p.shape, weights_t.shape)",  # in softmax_backward (a NameError elsewhere)
        "continue",
    ]
    commands = [f"break {kernels_py}:{weight_line}", f"break {kernels_py}:{softmax_line}"]
    commands += ["continue"] + at_each_stop * 2
    proc = subprocess.run(
        [sys.executable, "-m", "pdb", str(script)],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    out = proc.stdout
    assert "weight_grads()" in out and "softmax_backward()" in out, out[-3000:]
    assert out.count("('STOP', 'MainThread')") == 2, out[-3000:]
    # the stop sees every query's column: P^T is (L_k, all B L_q columns) = (64, 8 * 4 * 64)
    assert "('COLUMNS', (64, 2048), (64, 2048))" in out, out[-3000:]
    assert "done" in out


def test_an_attention_block_trains_the_same_in_both_readings():
    """Three AdamW steps of a transformer block: the same losses in both readings."""
    losses = []
    for reference in (False, True):
        tm.manual_seed(1)
        block = nn.TransformerBlock(16, 2)
        opt = tm.optim.AdamW(block.parameters(), lr=1e-2)
        x = np.random.default_rng(1).standard_normal((3, 5, 16)).astype(np.float32)
        run = []
        with tm.reference_mode(reference):
            for _ in range(3):
                loss = (block(x, causal=True) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                run.append(loss.item())
        losses.append(run)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)


def test_the_readme_pdb_session_stops_where_it_says():
    """The README's "Two readings, and stepping through" session, command for command."""
    readme = (ROOT / "README.md").read_text()
    session = readme[readme.index("$ python -m pdb lessons/02_vit.py --quick") :]
    session = session[: session.index("```")]
    commands = [ln[len("(Pdb) ") :] for ln in session.splitlines() if ln.startswith("(Pdb) ")]
    stops = [ln.split()[1] for ln in session.splitlines() if ln.startswith("> ")]
    proc = subprocess.run(
        [sys.executable, "-m", "pdb", "lessons/02_vit.py", "--quick", "--out", "/tmp/pdb02"],
        input="\n".join([*commands, "quit"]) + "\n",
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    out = proc.stdout
    missing = [stop for stop in stops if stop not in out]
    assert not missing, (missing, out[-3000:], proc.stderr[-2000:])
    positions = [out.index(stop) for stop in stops]  # each stop, in the README's order
    assert positions == sorted(positions), out[-3000:]
    assert "(65, 16640)" in out and "((64, 65, 144), 4)" in out, out[-3000:]
    assert "node.backward(g)" in out and "softmax_backward" in out
