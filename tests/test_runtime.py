"""Process settings: they take effect where the platform allows, and change no result."""

import gc
import os
import subprocess
import sys

import numpy as np
import pytest

import tinymm as tm
from tinymm import runtime


def test_blas_threads_can_be_read_and_set():
    before = runtime.blas_threads()
    if before is None:
        pytest.skip("NumPy does not use OpenBLAS here")
    try:
        assert runtime.blas_threads(1) == 1
        a = np.random.default_rng(0).standard_normal((300, 300)).astype(np.float32)
        single = a @ a
        runtime.blas_threads(before)
        assert runtime.blas_threads() == before
        np.testing.assert_allclose(a @ a, single, rtol=1e-5, atol=1e-4)
    finally:
        runtime.blas_threads(before)


def test_blas_core_names_the_kernels_openblas_was_told_to_run():
    """What the bench reports: OPENBLAS_CORETYPE=Haswell (AVX2, which every x86-64 CPU that
    has AVX2 runs) makes OpenBLAS report "Haswell"; None without OpenBLAS."""
    if runtime.blas_core() is None:
        pytest.skip("NumPy does not use OpenBLAS here")
    if "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("no AVX2: OpenBLAS would not run its Haswell kernels here")
    code = "from tinymm import runtime\nprint(runtime.blas_core())"
    assert _child(code, OPENBLAS_CORETYPE="Haswell") == "Haswell"


def _child(code: str, **env: str) -> str:
    unset = (
        runtime.OPT_OUT,
        "OPENBLAS_THREAD_TIMEOUT",
        "OPENBLAS_NUM_THREADS",
        "TINYMM_BLAS_THREADS",
    )
    environment = {k: v for k, v in os.environ.items() if k not in unset}
    environment.update(env)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True
    )
    return out.stdout.strip()


def test_import_changes_nothing_outside_tinymm():
    """A user's notebook keeps its BLAS threads, collector and environment after import."""
    code = (
        "import gc, os, numpy as np\n"
        "from tinymm import runtime\n"
        "before = (gc.get_threshold(), runtime.blas_threads(), dict(os.environ))\n"
        "import tinymm\n"
        "print(before == (gc.get_threshold(), runtime.blas_threads(), dict(os.environ)))"
    )
    assert _child(code) == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")
def test_tune_says_what_it_changed_and_untune_puts_it_back():
    code = (
        "import gc, tinymm\n"
        "from tinymm import runtime\n"
        "young, blas = gc.get_threshold()[0], runtime.blas_threads()\n"
        "changes = runtime.tune()\n"
        "print(sorted(changes), changes['gc_threshold'], runtime.tune() == changes)\n"
        "print(gc.get_threshold()[0], runtime.blas_threads())\n"
        "runtime.untune()\n"
        "print(gc.get_threshold()[0] == young, runtime.blas_threads() == blas,"
        " runtime.tune() == changes)"
    )
    lines = _child(code, OPENBLAS_NUM_THREADS="2").splitlines()
    assert "'gc_threshold', 'malloc_thresholds'" in lines[0] and "(700, 10000) True" in lines[0]
    assert lines[1] == f"{runtime.GC_THRESHOLD} 2"  # the user's OPENBLAS_NUM_THREADS stands
    assert lines[2] == "True True True"  # restored, and tune() applies again
    assert (
        _child("from tinymm import runtime; print(runtime.tune())", **{runtime.OPT_OUT: "1"})
        == "{}"
    )


def test_graphs_are_freed_by_reference_counting_alone():
    """Why a rarer cycle collector is safe: training, evaluating and abandoning graphs (a ViT
    step with AdamW, a conv net, a graph dropped without backward) leaves no reference cycles."""
    tm.manual_seed(0)
    vit = tm.models.ViT(image_size=8, patch_size=4, dim=8, depth=1, heads=2, num_classes=3)
    conv = tm.nn.Conv2d(3, 4, 3, padding=1)
    opt = tm.optim.AdamW(vit.parameters() + conv.parameters(), lr=1e-3)
    images = tm.randn(2, 8, 8, 3)

    def work() -> None:
        opt.zero_grad()
        loss = tm.functional.cross_entropy(vit(images), np.array([0, 2]))
        loss = loss + conv(images).mean()
        loss.backward()
        opt.step()
        vit(images).sum()  # a graph nobody calls backward on

    work()
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            work()
        assert gc.collect() == 0  # nothing unreachable was left for the collector to find
    finally:
        gc.enable()


def test_tune_gives_one_blas_thread_unless_chosen():
    if runtime.blas_threads() is None:
        pytest.skip("NumPy does not use OpenBLAS here")
    code = "import tinymm; tinymm.runtime.tune(); print(tinymm.runtime.blas_threads())"
    assert _child(code) == "1"
    assert _child(code, TINYMM_BLAS_THREADS="2") == "2"
    assert _child(code, OPENBLAS_NUM_THREADS="2") == "2"  # the user's own setting stands


def test_a_training_step_gives_the_same_numbers_with_and_without_the_settings():
    code = (
        "import numpy as np, tinymm as tm, tinymm.functional as F\n"
        "tm.runtime.tune()\n"
        "tm.manual_seed(0); m = tm.nn.TransformerBlock(16, 2)\n"
        "x = tm.randn(4, 5, 16); loss = (m(x) ** 2).mean(); loss.backward()\n"
        "print(repr(float(loss.item())), repr(float(m.attn.q_proj.weight.grad.sum())))"
    )
    assert _child(code) == _child(code, **{runtime.OPT_OUT: "1"})
    assert tm.runtime is runtime
