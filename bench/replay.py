"""Replay of a suspended run: N completed steps, then an event wakes the instance.

    python bench/replay.py [--steps 10 100 1000]

For each N, measures the wake-up run (claim + replay of N stored steps + the rest)
and the Redis commands it sent (INFO commandstats delta, RQ's own bookkeeping
included): the count must not grow with N, because the claim script returns every
stored step in one round trip.
"""

from __future__ import annotations

import argparse
import time

import redis
from common import cleanup, emit, names, redis_url
from workflows import ManyStepsThenWait

from nbflow import Engine


def commands(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    args = ap.parse_args()
    rows = []
    for n in args.steps:
        prefix, queue = names()
        engine = Engine(redis_url(), prefix=prefix, queue=queue)
        flow = engine.register(ManyStepsThenWait)
        try:
            inst = flow.create(params={"n": n})
            engine.run_worker(burst=True)
            assert inst.status()["status"] == "waiting", inst.status()
            inst.send_event("go")
            before = commands(engine.redis)
            t0 = time.perf_counter()
            engine.run_worker(burst=True)
            took = time.perf_counter() - t0
            used = commands(engine.redis) - before - 1  # minus the INFO itself
            assert inst.status()["status"] == "complete", inst.status()
            rows.append({"steps": n, "wake_run_ms": round(took * 1000, 2), "redis_commands": used})
        finally:
            cleanup(prefix, queue)
    emit({"benchmark": "replay", "runs": rows})


if __name__ == "__main__":
    main()
