"""create -> complete latency of one 3-step workflow with an idle worker (p50, p99).

    python bench/latency.py [--runs 200] [--durability everysec|always]

``--durability``: against a fresh embedded server (AOF, that appendfsync) instead
of ``$NBFLOW_BENCH_REDIS_URL``.

The worker is a real `nbflow worker` process; each instance is created only after
the previous one finished, so the worker is idle when it arrives.
"""

from __future__ import annotations

import argparse
import time

from common import (
    add_durability_arg,
    cleanup,
    durable_server,
    emit,
    names,
    percentile,
    redis_url,
    start_workers,
    stop,
)
from workflows import ThreeSteps

from nbflow import Engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    add_durability_arg(ap)
    args = ap.parse_args()
    with durable_server(args.durability):
        run(args)


def run(args: argparse.Namespace) -> None:
    prefix, queue = names()
    engine = Engine(redis_url(), prefix=prefix, queue=queue)
    flow = engine.register(ThreeSteps)
    proc = start_workers(prefix, queue, 1)
    try:
        flow.create().wait(timeout=30)  # warm-up: worker started and scripts loaded
        samples = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            inst = flow.create()
            status = inst.wait(timeout=30)
            samples.append((time.perf_counter() - t0) * 1000)
            assert status["status"] == "complete", status
        emit(
            {
                "durability": args.durability or "none (external Redis)",
                "benchmark": "latency_3_steps",
                "runs": args.runs,
                "p50_ms": round(percentile(samples, 0.50), 3),
                "p99_ms": round(percentile(samples, 0.99), 3),
                "mean_ms": round(sum(samples) / len(samples), 3),
            }
        )
    finally:
        stop(proc)
        cleanup(prefix, queue)


if __name__ == "__main__":
    main()
