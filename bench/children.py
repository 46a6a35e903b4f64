"""Fan-out: one parent starts N children (``step.run_workflow`` under ``asyncio.gather``),
run by W worker processes (`nbflow worker --processes W`); the parent waits in Redis.

    python bench/children.py --children 1000 --workers 2 [--repeats 3]

Reports children per second from the parent's create to its completion (median of the
repeats), and checks that every child ran exactly once (N children, each complete).
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import cleanup, emit, names, redis_url, start_workers, stop
from workflows import FanOut, Leaf

from nbflow import Engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--children", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    prefix, queue = names()
    engine = Engine(redis_url(), prefix=prefix, queue=queue)
    engine.register(Leaf)
    fan = engine.register(FanOut)
    proc = start_workers(prefix, queue, args.workers)
    n = args.children
    runs: list[float] = []
    wakes: list[int] = []
    try:
        fan.create(params={"n": 2}).wait(timeout=60)  # workers are up
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            parent = fan.create(params={"n": n})
            status = parent.wait(timeout=600)
            runs.append(time.perf_counter() - t0)
            assert status == {"status": "complete", "output": n * (n - 1)}, status
            kids = engine.instances(workflow="Leaf", limit=10 * n)
            mine = kids[kids["parent"] == parent.id]
            assert len(mine) == n and set(mine["status"]) == {"complete"}, mine
            # how often the parent was woken and replayed while its children ended
            wakes.append(sum(1 for e in parent.history() if e["ev"] == "waiting"))
        best = statistics.median(runs)
        emit(
            {
                "benchmark": "fan_out_children",
                "children": n,
                "workers": args.workers,
                "seconds": [round(r, 3) for r in runs],
                "children_per_s": round(n / best, 1),
                "parent_parks": wakes,
            }
        )
    finally:
        stop(proc)
        cleanup(prefix, queue)


if __name__ == "__main__":
    main()
