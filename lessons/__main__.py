"""Run every lesson in order and print one summary table: `python -m lessons [--quick] [NAME ...]`.

Each lesson runs as its own process (as a reader would run it): its progress lines appear as
they come, and it ends with `result: {json}`. The table gives each lesson's held-out metrics,
its wall time and its peak memory (resident set size).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(command: list[str]) -> tuple[int, list[str], float]:
    """Run a lesson, echoing its output line by line; (exit code, its lines, peak RSS in MB)."""
    lines = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        for line in proc.stdout:
            print("    " + line, end="", flush=True)
            lines.append(line.rstrip("\n"))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, lines, usage.ru_maxrss / 1024  # Linux reports kilobytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke runs of every lesson")
    parser.add_argument("--reference", action="store_true", help="plain compositions (slower)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("names", nargs="*", help="only these lessons, e.g. 01_attention or 01")
    args = parser.parse_args()
    rows, failed = [], 0
    scripts = sorted(HERE.glob("[0-9][0-9]_*.py"))
    if args.names:
        scripts = [s for s in scripts if any(s.stem.startswith(n) for n in args.names)]
        if not scripts:
            parser.error(f"no lesson matches {args.names}")
    for script in scripts:
        name = script.stem
        command = [sys.executable, str(script), "--seed", str(args.seed)]
        command += ["--out", str(args.out / name)]
        command += ["--quick"] * args.quick + ["--reference"] * args.reference
        print(f"=== {name}", flush=True)
        t0 = time.perf_counter()
        code, lines, peak_mb = run(command)
        results = [ln for ln in lines if ln.startswith("result: ")]
        if code or not results:
            failed += 1
            rows.append((name, "FAILED", f"{time.perf_counter() - t0:.0f}", f"{peak_mb:.0f}"))
            continue
        result = json.loads(results[-1][len("result: ") :])
        metrics = ", ".join(f"{k}={v}" for k, v in result.items() if k not in ("seconds", "seed"))
        rows.append((name, metrics, f"{result['seconds']:.0f}", f"{peak_mb:.0f}"))
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"\n{'lesson':<{width}}  {'seconds':>7}  {'peak MB':>7}  held-out metrics")
    for name, metrics, seconds, peak in rows:
        print(f"{name:<{width}}  {seconds:>7}  {peak:>7}  {metrics}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
