"""Redis memory per finished 3-step instance.

    python bench/memory.py [--workflows 10000]

Runs the instances to completion with a burst worker, then reads the memory of
every key under the prefix with MEMORY USAGE (shared indexes included).
"""

from __future__ import annotations

import argparse

from common import cleanup, emit, names, redis_url
from workflows import ThreeSteps

from nbflow import Engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workflows", type=int, default=10000)
    args = ap.parse_args()
    prefix, queue = names()
    engine = Engine(redis_url(), prefix=prefix, queue=queue)
    flow = engine.register(ThreeSteps)
    try:
        for start in range(0, args.workflows, 100):
            flow.create_batch(
                [{"params": {"i": start + i}} for i in range(100)][: args.workflows - start]
            )
        engine.run_worker(burst=True)
        total, keys = 0, 0
        pipe = engine.redis.pipeline(transaction=False)
        names_ = list(engine.redis.scan_iter(match=f"{prefix}:*", count=1000))
        for key in names_:
            pipe.memory_usage(key, samples=0)
        for size in pipe.execute():
            total += size or 0
            keys += 1
        done = engine.redis.zcard(engine.keys.by_status("complete"))
        emit(
            {
                "benchmark": "memory_per_instance",
                "instances": done,
                "keys": keys,
                "bytes_per_instance": round(total / max(done, 1), 1),
            }
        )
    finally:
        cleanup(prefix, queue)


if __name__ == "__main__":
    main()
