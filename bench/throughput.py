"""Throughput: N workflows of three trivial steps, created in batches, run by W worker
processes (`nbflow worker --processes W`).

    python bench/throughput.py --workflows 10000 --workers 2 [--batch 100]
                                [--durability everysec|always]

``--durability``: against a fresh embedded server (AOF, that appendfsync) instead
of ``$NBFLOW_BENCH_REDIS_URL``.

Reports workflows per second from the first create to the last completion.
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
    redis_url,
    start_workers,
    stop,
)
from workflows import ThreeSteps

from nbflow import Engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workflows", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=100)
    add_durability_arg(ap)
    args = ap.parse_args()
    with durable_server(args.durability):
        run(args)


def run(args: argparse.Namespace) -> None:
    prefix, queue = names()
    engine = Engine(redis_url(), prefix=prefix, queue=queue)
    flow = engine.register(ThreeSteps)
    proc = start_workers(prefix, queue, args.workers)
    try:
        flow.create().wait(timeout=60)  # workers are up
        done_key = engine.keys.by_status("complete")
        base = engine.redis.zcard(done_key)
        t0 = time.perf_counter()
        for start in range(0, args.workflows, args.batch):
            n = min(args.batch, args.workflows - start)
            flow.create_batch([{"params": {"i": start + i}} for i in range(n)])
        created = time.perf_counter() - t0
        deadline = time.monotonic() + 600
        while engine.redis.zcard(done_key) - base < args.workflows:
            if time.monotonic() > deadline:
                raise SystemExit("timed out")
            time.sleep(0.01)
        took = time.perf_counter() - t0
        emit(
            {
                "durability": args.durability or "none (external Redis)",
                "benchmark": "throughput_3_steps",
                "workflows": args.workflows,
                "workers": args.workers,
                "batch": args.batch,
                "seconds": round(took, 3),
                "workflows_per_s": round(args.workflows / took, 1),
                "create_s": round(created, 3),
            }
        )
    finally:
        stop(proc)
        cleanup(prefix, queue)


if __name__ == "__main__":
    main()
