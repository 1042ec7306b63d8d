"""The lesson contract, for every lesson.

Each runs with --quick, ends with one valid `result: {json}` line holding its metrics, seconds and
seed, saves its figures, and the same seed gives the same result.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSONS = {  # lesson -> (result keys besides seconds/seed, figures it must save)
    "01_attention": ({"test_accuracy"}, {"loss.png", "attention.png"}),
    "02_vit": (
        {"test_accuracy", "mlp_test_accuracy", "mlp_shifted_accuracy", "vit_shifted_accuracy"},
        {"patches.png", "pos_embedding.png", "cls_attention.png", "confusion.png", "loss.png"},
    ),
    "03_clip": (
        {"zero_shot_shape", "zero_shot_colour", "zero_shot_heldout_pairs"}
        | {"recall_i2t", "recall_t2i"},
        {"similarity.png", "zero_shot.png", "temperature.png", "loss.png"},
    ),
    "05_diffusion": (
        {"gen_colour", "gen_shape", "gen_size", "gen_position", "gen_all", "gen_all_unguided"}
        | {"judge_accuracy", "sample_std"},
        {"forward.png", "reverse.png", "samples.png", "guidance.png", "reconstructions.png"}
        | {"cross_attention.png", "schedules.png", "loss.png"},
    ),
    "06_audio": (
        {"test_accuracy"},
        {
            "waveform.png",
            "spectrum.png",
            "spectrogram.png",
            "mel_spectrogram.png",
            "mel_filterbank.png",
            "confusion.png",
            "loss.png",
        },
    ),
}


def run_lesson(name: str, out: Path, seed: int = 0) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "lessons" / f"{name}.py"),
            "--quick",
            "--seed",
            str(seed),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("result: "), lines[-5:]
    assert sum(line.startswith("result: ") for line in lines) == 1
    assert any(line.startswith("step ") for line in lines), "no progress line"
    return json.loads(lines[-1][len("result: ") :])


@pytest.mark.parametrize("name", sorted(LESSONS))
def test_lesson_quick_run_keeps_the_contract(name, tmp_path):
    keys, figures = LESSONS[name]
    first = run_lesson(name, tmp_path / "a")
    assert keys | {"seconds", "seed"} <= set(first)
    assert first["seed"] == 0
    for key in keys:
        assert isinstance(first[key], int | float) and 0 <= first[key] <= 1, (key, first[key])
    for figure in figures:
        assert (tmp_path / "a" / figure).stat().st_size > 1000, figure
    second = run_lesson(name, tmp_path / "b")
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert strip(first) == strip(second), "same seed, different result"


def test_lessons_main_lists_every_lesson():
    scripts = sorted(p.stem for p in (ROOT / "lessons").glob("[0-9][0-9]_*.py"))
    assert scripts == sorted(LESSONS), "every lesson needs an entry in LESSONS"


def test_python_m_lessons_prints_a_summary_table(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lessons", "--quick", "--out", str(tmp_path), "01"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("\nlesson ") :].splitlines()
    assert table[1].split()[0] == "lesson" and "held-out metrics" in table[1]
    assert table[2].startswith("01_attention") and "test_accuracy=" in table[2]
    assert (tmp_path / "01_attention" / "attention.png").exists()
