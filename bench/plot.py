"""Plots bench/results.json (written by `python bench/run_all.py`) to bench/*.png."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    results = json.loads((HERE / "results.json").read_text())
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    workers = [r["workers"] for r in results["throughput"]]
    rates = [r["workflows_per_s"] for r in results["throughput"]]
    left.bar([str(w) for w in workers], rates, color="#4c72b0")
    left.axhline(2600, color="#c44e52", linestyle="--", label="bar: 2,600/s (2 workers)")
    left.set_xlabel("worker processes")
    left.set_ylabel("workflows / s (3 trivial steps)")
    left.set_title("Throughput, 10,000 workflows, batches of 100 (median of 3)")
    left.legend()
    steps = [r["steps"] for r in results["steps"]]
    cost = [r["us_per_step"] for r in results["steps"]]
    right.plot(steps, cost, marker="o", color="#55a868")
    right.axhline(60, color="#c44e52", linestyle="--", label="target: 60 µs/step")
    right.set_xscale("log")
    right.set_xlabel("steps in one workflow")
    right.set_ylabel("µs per step (marginal, median)")
    right.set_ylim(0, max(80.0, max(cost) * 1.2))
    right.set_title("Per-step cost against step count")
    right.legend()
    fig.tight_layout()
    fig.savefig(HERE / "figures.png", dpi=110)
    print(f"wrote {HERE / 'figures.png'}")


if __name__ == "__main__":
    main()
