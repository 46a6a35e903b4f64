"""How costs grow with the number of stored instances, up to 100,000.

    python bench/scale.py [--total 100000] [--chunk 20000] [--workers 2]

After each chunk of 3-step instances is created (batches of 1,000) and run to
completion by `nbflow worker` processes, prints: creation rate of that chunk,
throughput of that chunk, Redis memory per stored instance (used_memory delta over
the whole run), and the time of `engine.instances(limit=1000)` and of
`engine.instances(status="complete", limit=100)` at that size.
"""

from __future__ import annotations

import argparse
import time

from common import cleanup, emit, names, redis_url, start_workers, stop
from workflows import ThreeSteps

from nbflow import Engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--total", type=int, default=100000)
    ap.add_argument("--chunk", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    prefix, queue = names()
    engine = Engine(redis_url(), prefix=prefix, queue=queue)
    flow = engine.register(ThreeSteps)
    done_key = engine.keys.by_status("complete")
    base_memory = int(engine.redis.info("memory")["used_memory"])
    proc = start_workers(prefix, queue, args.workers)
    rows = []
    try:
        flow.create().wait(timeout=60)
        stored = engine.redis.zcard(done_key)
        while stored < args.total:
            n = min(args.chunk, args.total - stored)
            t0 = time.perf_counter()
            for start in range(0, n, 1000):
                flow.create_batch([{"params": {"i": i}} for i in range(min(1000, n - start))])
            created = time.perf_counter() - t0
            while engine.redis.zcard(done_key) < stored + n:
                time.sleep(0.02)
            ran = time.perf_counter() - t0
            stored += n
            memory = int(engine.redis.info("memory")["used_memory"]) - base_memory
            t1 = time.perf_counter()
            listing = engine.instances(limit=1000)
            t2 = time.perf_counter()
            engine.instances(status="complete", limit=100)
            t3 = time.perf_counter()
            assert len(listing) == 1000
            rows.append(
                {
                    "instances": stored,
                    "create_per_s": round(n / created),
                    "workflows_per_s": round(n / ran),
                    "bytes_per_instance": round(memory / stored),
                    "list_1000_ms": round((t2 - t1) * 1000, 1),
                    "list_status_100_ms": round((t3 - t2) * 1000, 1),
                }
            )
        emit({"benchmark": "scale", "workers": args.workers, "rows": rows})
    finally:
        stop(proc)
        cleanup(prefix, queue)


if __name__ == "__main__":
    main()
