"""Per-step overhead: one workflow of N trivial steps, run by an in-process worker.

    python bench/steps.py [--steps 1000]

Reports microseconds per step from the instance's own step timestamps
(first step started -> last step finished) and wall time create -> complete.
"""

from __future__ import annotations

import argparse
import time

from common import cleanup, emit, names, redis_url
from workflows import ManySteps

from nbflow import Engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args()
    prefix, queue = names()
    engine = Engine(redis_url(), prefix=prefix, queue=queue)
    flow = engine.register(ManySteps)
    engine.start_worker()
    try:
        flow.create(params={"n": 10}).wait(timeout=30)  # warm-up
        t0 = time.perf_counter()
        inst = flow.create(params={"n": args.steps})
        status = inst.wait(timeout=600)
        wall = time.perf_counter() - t0
        assert status["status"] == "complete", status
        steps = inst.steps()
        span = (steps["finished_at"].max() - steps["started_at"].min()).total_seconds()
        emit(
            {
                "benchmark": "per_step_overhead",
                "steps": args.steps,
                "us_per_step": round(span / args.steps * 1e6, 1),
                "wall_us_per_step": round(wall / args.steps * 1e6, 1),
                "wall_s": round(wall, 3),
            }
        )
    finally:
        engine.stop_worker()
        cleanup(prefix, queue)


if __name__ == "__main__":
    main()
