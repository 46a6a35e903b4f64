"""Concurrency limit: N instances of a workflow registered with ``concurrency=C``, run
by W worker processes (`nbflow worker --processes W`, which register the class
without limits: the stored limit binds them).

    python bench/limits.py --instances 10000 --concurrency 50 --workers 2 [--ms 20]

Reports instances per second from the first create to the last completion, and the
observed maximum of instances running at once, two ways: counted inside the step
(``Limited``: an INCR/DECR around it) and sampled from the ``running`` status index
every 5 ms.  Neither may exceed the limit (the script fails if one does).
"""

from __future__ import annotations

import argparse
import threading
import time

from common import cleanup, emit, names, redis_url, start_workers, stop
from workflows import Limited

from nbflow import Engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ms", type=float, default=20.0, help="how long each step holds")
    args = ap.parse_args()
    prefix, queue = names()
    engine = Engine(redis_url(), prefix=prefix, queue=queue)
    wf = engine.register(Limited, concurrency=args.concurrency)
    fx = f"{prefix}:fx"
    proc = start_workers(prefix, queue, args.workers)
    r = engine.redis
    sampled = [0]
    done = threading.Event()

    def sample() -> None:
        key = engine.keys.by_status("running")
        while not done.is_set():
            sampled[0] = max(sampled[0], int(r.zcard(key)))
            time.sleep(0.005)

    try:
        p = {"url": redis_url(), "fx": fx + ":warm", "ms": 1}
        wf.create_batch([{"params": p} for _ in range(4)])[-1].wait(timeout=60)  # workers up
        time.sleep(1)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        p = {"url": redis_url(), "fx": fx, "ms": args.ms}
        t0 = time.perf_counter()
        insts = wf.create_batch([{"params": p} for _ in range(args.instances)])
        created = time.perf_counter() - t0
        complete = engine.keys.by_status("complete")
        while r.zcard(complete) < args.instances + 4:
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
        inside = int(r.get(fx + ":max") or 0)
        assert len(insts) == args.instances
        assert inside <= args.concurrency and sampled[0] <= args.concurrency, (inside, sampled)
        emit(
            {
                "benchmark": "concurrency_limit",
                "instances": args.instances,
                "concurrency": args.concurrency,
                "workers": args.workers,
                "step_ms": args.ms,
                "create_s": round(created, 3),
                "seconds": round(seconds, 3),
                "instances_per_s": round(args.instances / seconds, 1),
                "max_running_in_step": inside,
                "max_running_sampled": sampled[0],
                "limit_exceeded": inside > args.concurrency or sampled[0] > args.concurrency,
            }
        )
    finally:
        done.set()
        stop(proc)
        cleanup(prefix, queue)


if __name__ == "__main__":
    main()
