"""tinymm.parallel: splitting work over threads (1, 2, 3, 4, more than the cores) changes no
result."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import tinymm as tm
import tinymm.functional as F
from tinymm import parallel


@pytest.fixture
def split_everything(monkeypatch):
    """Two threads and no size thresholds: every matmul and fused kernel is split."""
    monkeypatch.setattr(parallel, "MIN_SIZE", 0)
    monkeypatch.setattr(parallel, "MIN_MACS", 0)
    before = parallel.threads()
    parallel.set_threads(2)
    yield
    parallel.set_threads(before)


@pytest.mark.parametrize(
    "a_shape, b_shape",
    [
        ((7, 5), (5, 3)),  # rows of a split
        ((1, 5), (5, 3)),  # one row: nothing to split
        ((4, 3, 6, 5), (4, 3, 5, 2)),  # same batch: the leading axis split
        ((4, 6, 5), (1, 5, 2)),  # broadcast batch: one np.matmul
        ((6, 5), (3, 5, 2)),  # a broadcast over b's batch
        ((0, 5), (5, 3)),  # empty
        ((5,), (5, 3)),  # vector @ matrix
    ],
)
def test_matmul_is_numpys_matmul(split_everything, a_shape, b_shape):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(a_shape, dtype=np.float32)
    b = rng.standard_normal(b_shape, dtype=np.float32)
    out = parallel.matmul(a, b)
    expected = np.matmul(a, b)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", [True, False])
def test_matmul_adds_the_bias_to_every_row(split, monkeypatch):
    if split:
        monkeypatch.setattr(parallel, "MIN_MACS", 0)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((9, 4), dtype=np.float32)
    b = rng.standard_normal((4, 3), dtype=np.float32)
    bias = rng.standard_normal(3, dtype=np.float32)
    np.testing.assert_allclose(parallel.matmul(a, b, bias), a @ b + bias, rtol=1e-5, atol=1e-6)


def test_rows_calls_the_kernel_once_per_half_and_covers_every_row(split_everything):
    seen = []
    parallel.rows(lambda r: seen.append(r), np.zeros((5, 2)))
    assert sorted((r.start, r.stop) for r in seen) == [(0, 2), (2, 5)]  # 55% of 5 rows: 2
    seen.clear()
    parallel.rows(lambda r: seen.append(r), np.zeros(()))  # 0-d: one call, everything
    assert seen == [...]


def test_both_returns_the_two_results_in_order_from_two_threads(split_everything):
    import threading

    first, second = parallel.both(threading.get_ident, threading.get_ident, macs=1)
    assert first == threading.get_ident() and second != first  # second ran on the worker
    with pytest.raises(ZeroDivisionError):
        parallel.both(lambda: 1, lambda: 1 / 0, macs=1)
    parallel.set_threads(1)
    assert len(set(parallel.both(threading.get_ident, threading.get_ident, macs=1))) == 1


def test_small_work_stays_on_one_call():
    seen = []
    parallel.rows(lambda r: seen.append(r), np.zeros((5, 2)))
    assert seen == [...]


def test_an_error_on_the_worker_reaches_the_caller(split_everything):
    def kernel(r):
        if r != slice(0, 2):  # the worker's half
            raise ValueError("worker failed")

    with pytest.raises(ValueError, match="worker failed"):
        parallel.rows(kernel, np.zeros((4, 2)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_its_own_worker(split_everything):
    a = np.ones((4, 3), np.float32)
    parallel.matmul(a, a.T)  # the parent's worker thread exists now
    pid = os.fork()
    if pid == 0:  # child: the split must not wait for the parent's worker (it is not here)
        ok = np.array_equal(parallel.matmul(a, a.T), np.full((4, 4), 3.0))
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung waiting for a worker thread it does not have")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_one_thread_where_the_process_has_one_core_or_asks_for_one():
    code = "from tinymm import parallel; print(parallel.threads())"
    env = {k: v for k, v in os.environ.items() if k != "TINYMM_THREADS"}

    def threads(*prefix, **extra):
        out = subprocess.run(
            [*prefix, sys.executable, "-c", code],
            capture_output=True, text=True, env={**env, **extra}, check=True,
        )  # fmt: skip
        return int(out.stdout)

    assert threads(TINYMM_THREADS="1") == 1
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2:
        assert threads() == len(os.sched_getaffinity(0))  # every core the process may use
        assert threads(TINYMM_THREADS="2") == 2  # capped
        assert threads(TINYMM_THREADS="999") == len(os.sched_getaffinity(0))
        if shutil.which("taskset"):
            assert threads("taskset", "-c", "0") == 1


def test_threads_setting():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            parallel.set_threads(bad)
    before = parallel.threads()
    parallel.set_threads(1)
    assert parallel.threads() == 1
    parallel.set_threads(before)


def _transformer_step():
    """Loss and every gradient of a transformer block (attention, layer norm, GELU), a group
    norm and convolutions."""
    tm.manual_seed(0)
    block = tm.nn.TransformerBlock(16, 4, mlp_ratio=2)
    norm = tm.nn.GroupNorm(2, 4)
    x = tm.randn(6, 9, 16, requires_grad=True)
    images = tm.randn(3, 4, 4, 4, requires_grad=True)
    loss = (block(x) ** 2).mean() + (F.layer_norm(x[0, 0], None, None) ** 3).sum()  # one row
    loss = loss + (norm(images) ** 3).mean() + F.gelu(x).mean()
    conv = tm.nn.Conv2d(4, 5, 3, padding=1)
    strided = F.conv2d(images, conv.weight, conv.bias, stride=2, padding=1)
    loss = loss + (conv(images) ** 2).mean() + (strided**2).mean()
    loss.backward()
    grads = {name: p.grad for name, p in block.named_parameters()}
    grads |= {f"norm.{name}": p.grad for name, p in norm.named_parameters()}
    grads |= {f"conv.{name}": p.grad for name, p in conv.named_parameters()}
    grads["images"] = images.grad
    return loss.item(), x.grad, grads


def test_a_training_step_is_the_same_on_one_thread_and_two(split_everything):
    loss2, x_grad2, grads2 = _transformer_step()
    parallel.set_threads(1)
    loss1, x_grad1, grads1 = _transformer_step()
    assert loss1 == pytest.approx(loss2, rel=1e-6)
    np.testing.assert_allclose(x_grad2, x_grad1, rtol=1e-5, atol=1e-7)
    for name in grads1:
        np.testing.assert_allclose(grads2[name], grads1[name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize(
    "q_shape, k_shape, mask",
    [
        ((4, 2, 5, 3), (4, 2, 5, 3), "causal"),  # split over the batch, a causal mask
        ((4, 2, 5, 3), (4, 2, 7, 3), (4, 2, 5, 7)),  # split, a mask per sequence
        ((4, 2, 5, 3), (4, 2, 7, 3), (4, 1, 1, 7)),  # padding mask broadcast over heads: one call
        ((4, 2, 5, 3), (1, 2, 7, 3), None),  # keys shared by the batch: one call, broadcast
        ((5, 3), (7, 3), None),  # no batch axes at all
    ],
)
def test_attention_is_the_same_on_one_thread_and_two(split_everything, q_shape, k_shape, mask):
    rng = np.random.default_rng(0)
    q = rng.standard_normal(q_shape, dtype=np.float32)
    k = rng.standard_normal(k_shape, dtype=np.float32)
    v = rng.standard_normal(k_shape[:-1] + (4,), dtype=np.float32)
    allowed = None if mask in (None, "causal") else rng.random(mask) > 0.3

    def run():
        ts = [tm.tensor(a, requires_grad=True) for a in (q, k, v)]
        out = F.scaled_dot_product_attention(*ts, mask=allowed, causal=mask == "causal")
        (out * out).sum().backward()
        return [out.data] + [t.grad for t in ts]

    two = run()
    parallel.set_threads(1)
    for a, b in zip(two, run(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_threads", [1, 2, 3, 4, 7])
def test_any_number_of_threads_gives_the_same_results(monkeypatch, n_threads):
    """Shares of rows cover every row once, in order; matmuls, a training step and attention
    equal their one-thread results, with up to 7 threads on however many cores there are."""
    monkeypatch.setattr(parallel, "MIN_SIZE", 0)
    monkeypatch.setattr(parallel, "MIN_MACS", 0)
    before = parallel.threads()
    try:
        parallel.set_threads(n_threads)
        seen = []
        parallel.rows(lambda r: seen.append(r), np.zeros((10, 2)))
        covered = sorted(i for r in seen for i in np.arange(10)[r])
        assert covered == list(range(10)) and len(seen) == min(n_threads, 10)
        rng = np.random.default_rng(n_threads)
        a, b = rng.standard_normal((13, 6)), rng.standard_normal((6, 4))
        np.testing.assert_allclose(parallel.matmul(a, b), a @ b, rtol=1e-12)
        results, x = {}, tm.tensor(rng.standard_normal((3, 9, 16)))
        for threads in (1, n_threads):
            parallel.set_threads(threads)
            tm.manual_seed(0)
            block = tm.nn.TransformerBlock(16, 4)
            loss = (block(x, causal=True) ** 2).mean()
            loss.backward()
            results[threads] = (loss.item(), block.attn.q_proj.weight.grad.copy())
        np.testing.assert_allclose(results[1][0], results[n_threads][0], rtol=1e-6)
        np.testing.assert_allclose(results[1][1], results[n_threads][1], rtol=1e-4, atol=1e-6)
    finally:
        parallel.set_threads(before)
