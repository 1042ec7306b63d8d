"""Run every lesson in order and print one summary table: `python -m lessons [--quick] [NAME ...]`.

Each lesson runs as its own process (as a reader would run it) and ends with `result: {json}`.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke runs of every lesson")
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
        command = [
            sys.executable,
            str(script),
            "--seed",
            str(args.seed),
            "--out",
            str(args.out / name),
        ] + (["--quick"] if args.quick else [])
        print(f"=== {name}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(command, text=True, capture_output=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("result: ")]
        if proc.returncode or not lines:
            failed += 1
            print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n")
            rows.append((name, "FAILED", f"{time.perf_counter() - t0:.0f}"))
            continue
        result = json.loads(lines[-1][len("result: ") :])
        metrics = ", ".join(f"{k}={v}" for k, v in result.items() if k not in ("seconds", "seed"))
        print(lines[-1])
        rows.append((name, metrics, f"{result['seconds']:.0f}"))
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"\n{'lesson':<{width}}  {'seconds':>7}  held-out metrics")
    for name, metrics, seconds in rows:
        print(f"{name:<{width}}  {seconds:>7}  {metrics}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
