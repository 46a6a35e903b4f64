"""Runs every benchmark and writes bench/results.json (then `python bench/plot.py`).

python bench/run_all.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(HERE / script), *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)


def median_run(n: str, workers: int) -> dict:
    runs = [run("throughput.py", "--workflows", n, "--workers", str(workers)) for _ in range(3)]
    runs.sort(key=lambda r: r["workflows_per_s"])
    return {**runs[1], "runs_per_s": [r["workflows_per_s"] for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller runs (a smoke test)")
    quick = ap.parse_args().quick
    n = "2000" if quick else "10000"
    results = {
        # this VM's speed drifts: three runs per worker count, the median is plotted
        "throughput": [median_run(n, w) for w in (1, 2, 4)],
        "steps": [
            run("steps.py", "--steps", str(s))
            for s in ((10, 100, 1000) if quick else (10, 100, 1000, 10000))
        ],
        "latency": run("latency.py", "--runs", "100" if quick else "500"),
        "replay": run("replay.py"),
        "memory": run("memory.py", "--workflows", n),
    }
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
