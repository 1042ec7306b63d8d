"""The lesson contract, for every lesson.

Each runs with --quick, ends with one valid `result: {json}` line holding its metrics, seconds and
seed, saves its figures, and the same seed gives the same result.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSONS = {  # lesson -> (result keys besides seconds/seed, figures it must save)
    "01_attention": (
        {"test_accuracy"},
        {"loss.png", "attention.png", "attention_graph.png", "attention_graph_reference.png"},
    ),
    "02_vit": (
        {"test_accuracy", "mlp_test_accuracy", "mlp_shifted_accuracy", "vit_shifted_accuracy"},
        {"patches.png", "pos_embedding.png", "cls_attention.png", "confusion.png", "loss.png"},
    ),
    "03_clip": (
        {"zero_shot_shape", "zero_shot_colour", "zero_shot_heldout_pairs"}
        | {"recall_i2t", "recall_t2i"},
        {"similarity.png", "zero_shot.png", "temperature.png", "loss.png"},
    ),
    "04_vlm": (
        {"vqa_accuracy", "caption_objects_exact", "swapped_image_accuracy", "cache_same_tokens"}
        | {f"vqa_{k}" for k in ("colour", "shape", "position", "size", "exists")},
        {"dialogue.png", "answer_attention.png", "fused_attention.png", "loss.png"},
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
    "07_video": (
        {"motion_accuracy", "frame_bag_accuracy", "shuffled_frames_accuracy"}
        | {"av_match_accuracy", "chance"},
        {"clip.png", "tubelets.png", "cls_attention.png", "temporal_embedding.png"}
        | {"soundtrack.png", "loss_video.png", "loss_frame_bag.png", "loss_av.png"},
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
    timing = lambda k: k == "seconds" or k.startswith("tokens_per_s")  # noqa: E731
    strip = lambda r: {k: v for k, v in r.items() if not timing(k)}  # noqa: E731
    assert strip(first) == strip(second), "same seed, different result"


def test_lessons_main_lists_every_lesson():
    scripts = sorted(p.stem for p in (ROOT / "lessons").glob("[0-9][0-9]_*.py"))
    assert scripts == sorted(LESSONS), "every lesson needs an entry in LESSONS"


def test_python_m_lessons_shows_progress_then_a_summary_table(tmp_path):
    """The lesson's own lines are echoed (indented) as they come, then the table: metrics, wall
    time and peak memory per lesson."""
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
    before_table = proc.stdout[: proc.stdout.index("\nlesson ")]
    assert "\n    step " in before_table and "\n    result: " in before_table
    peak_mb = float(table[2].split()[2])
    assert 20 < peak_mb < 4000, table[2]  # the lesson's peak RSS, in MB


def test_a_lesson_killed_mid_run_resumes_to_the_same_result(tmp_path):
    """SIGKILL after the first checkpoint, then --resume: the same result line as a run that
    was never interrupted (timings aside)."""
    script = str(ROOT / "lessons" / "01_attention.py")
    common = [sys.executable, script, "--quick", "--steps", "150", "--out", str(tmp_path)]
    uninterrupted, _ = run_lesson_command(common)
    checkpoint = tmp_path / "state.npz"
    log = tmp_path / "killed.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([*common, "--checkpoint", str(checkpoint)], stdout=out, cwd=ROOT)
        deadline = time.monotonic() + 300
        while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert checkpoint.exists()
    assert "result: " not in log.read_text(), "the run ended before it could be killed"
    resumed, output = run_lesson_command([*common, "--checkpoint", str(checkpoint), "--resume"])
    assert "resumed from" in output
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert strip(resumed) == strip(uninterrupted)


def run_lesson_command(command: list[str]) -> tuple[dict, str]:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("result: "), last
    return json.loads(last[len("result: ") :]), proc.stdout


@pytest.mark.parametrize("name", sorted(LESSONS))
def test_every_lesson_runs_in_reference_mode(name, tmp_path):
    """--reference: the plain compositions end to end (a few steps; slower, the same contract)."""
    script = str(ROOT / "lessons" / f"{name}.py")
    result, output = run_lesson_command(
        [sys.executable, script, "--quick", "--reference", "--steps", "3", "--out", str(tmp_path)]
    )
    assert "reference mode" in output and result["seed"] == 0
