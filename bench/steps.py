"""Per-step overhead: one workflow of N trivial steps.

    python bench/steps.py [--steps 1000] [--thread]

Runs it with ``engine.run_worker()`` in this main thread, as an ``nbflow worker``
process does (sync callbacks inline, bounded by SIGALRM); ``--thread`` uses the
in-process worker thread of ``engine.start_worker()`` instead (notebooks: sync
callbacks on the thread pool). Reports microseconds per step, create -> complete.
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
    ap.add_argument("--thread", action="store_true", help="use the in-process worker thread")
    args = ap.parse_args()
    prefix, queue = names()
    engine = Engine(redis_url(), prefix=prefix, queue=queue)
    flow = engine.register(ManySteps)
    if args.thread:
        engine.start_worker()
    try:
        warm = flow.create(params={"n": 10})
        if not args.thread:
            engine.run_worker(burst=True)
        warm.wait(timeout=30)
        t0 = time.perf_counter()
        inst = flow.create(params={"n": args.steps})
        if not args.thread:
            engine.run_worker(burst=True)
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
