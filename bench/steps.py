"""Per-step overhead: one workflow of N trivial steps.

    python bench/steps.py [--steps 1000] [--thread] [--sync] [--durability everysec|always]

``--durability``: against a fresh embedded server (AOF, that appendfsync) instead
of ``$NBFLOW_BENCH_REDIS_URL``.

Runs it on an ``nbflow worker`` process (sync callbacks inline in its main thread,
bounded by SIGALRM); ``--thread`` uses the in-process worker thread of
``engine.start_worker()`` instead (notebooks: sync callbacks on the thread pool);
``--sync`` runs the same steps from a plain ``def run``.

``us_per_step`` is the marginal cost of a step: (create -> complete of the N-step
workflow minus that of a 0-step one) / N, the median over enough repeats to run
about 10,000 steps (so 10-step workflows are not lost in the per-run overhead).
``span_us_per_step`` is first step start -> last step end from the stored step
times (millisecond resolution: meaningful from about 100 steps).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from common import (
    add_durability_arg,
    cleanup,
    durable_server,
    emit,
    names,
    redis_url,
    start_workers,
    stop,
)
from workflows import ManySteps, SyncManySteps

from nbflow import Engine


def _one(flow: Any, n: int) -> tuple[float, Any]:
    t0 = time.perf_counter()
    inst = flow.create(params={"n": n})
    status = inst.wait(timeout=600)
    wall = time.perf_counter() - t0
    assert status["status"] == "complete", status
    return wall, inst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--thread", action="store_true", help="use the in-process worker thread")
    ap.add_argument("--sync", action="store_true", help="a plain def run workflow")
    add_durability_arg(ap)
    args = ap.parse_args()
    with durable_server(args.durability):
        run(args)


def run(args: argparse.Namespace) -> None:
    prefix, queue = names()
    engine = Engine(redis_url(), prefix=prefix, queue=queue)
    flow = engine.register(SyncManySteps if args.sync else ManySteps)
    proc = None
    if args.thread:
        engine.start_worker()
    else:
        proc = start_workers(prefix, queue, 1)
    try:
        _one(flow, 10)  # warm-up (and the worker is up)
        repeats = max(5, 10000 // args.steps)
        base = statistics.median(_one(flow, 0)[0] for _ in range(repeats))
        walls, span = [], 0.0
        for _ in range(repeats):
            wall, inst = _one(flow, args.steps)
            walls.append(wall)
        steps = inst.steps()
        span = (steps["finished_at"].max() - steps["started_at"].min()).total_seconds()
        emit(
            {
                "durability": args.durability or "none (external Redis)",
                "benchmark": "per_step_overhead",
                "steps": args.steps,
                "run": "def" if args.sync else "async def",
                "worker": "thread" if args.thread else "process",
                "repeats": repeats,
                "us_per_step": round((statistics.median(walls) - base) / args.steps * 1e6, 1),
                "span_us_per_step": round(span / args.steps * 1e6, 1),
                "run_overhead_ms": round(base * 1e3, 3),
            }
        )
    finally:
        engine.stop_worker()
        if proc is not None:
            stop(proc)
        cleanup(prefix, queue)


if __name__ == "__main__":
    main()
