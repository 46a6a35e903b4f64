"""Schedule ticks (SPEC 10.3): 100 schedules firing every minute for ``--minutes`` minutes
while 2 engines (processes with an in-process worker, ``engine.start_worker()``) and 2
``nbflow worker`` processes run, so 4 housekeepers race for every tick.

Checks that every tick created exactly one instance (ids ``{name}-{tick}``, none missing,
none extra) and reports the lag from tick time to instance creation (the instance's
``createdAt``): p50 / p99 / max, over every tick of every schedule.  Prints JSON.

    python bench/schedules.py [--schedules 100] [--minutes 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime

from common import HERE, cleanup, emit, names, percentile, redis_url, start_workers, stop
from workflows import ThreeSteps

from nbflow import Engine
from nbflow.schedules import tick_instance_id


def engine_process(prefix: str, queue: str) -> None:
    """One engine with its in-process worker (and housekeeper), until SIGTERM."""
    engine = Engine(redis_url(), prefix=prefix, queue=queue)
    engine.register(ThreeSteps)
    engine.start_worker()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    engine.stop_worker()


def start_engine(prefix: str, queue: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.Popen(
        [sys.executable, str(HERE / "schedules.py"), "--engine-process", prefix, queue],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schedules", type=int, default=100)
    ap.add_argument("--minutes", type=int, default=3)
    ap.add_argument("--engine-process", nargs=2, metavar=("PREFIX", "QUEUE"))
    args = ap.parse_args()
    if args.engine_process:
        engine_process(*args.engine_process)
        return
    prefix, queue = names()
    engine = Engine(redis_url(), prefix=prefix, queue=queue)
    engine.register(ThreeSteps)
    procs = [start_engine(prefix, queue) for _ in range(2)]
    procs += [start_workers(prefix, queue, 1) for _ in range(2)]
    try:
        scheds = [
            engine.schedule("ThreeSteps", "* * * * *", name=f"s{i:03d}", overlap="allow")
            for i in range(args.schedules)
        ]
        first = scheds[0].next_runs(1)[0].timestamp()
        if first - time.time() < 5:  # too close to start up the processes: skip that tick
            for s in scheds:
                s.pause()
            time.sleep(max(0.0, first - time.time()) + 1)
            for s in scheds:
                s.resume()
            first += 60
        ticks = [first + 60 * k for k in range(args.minutes)]
        time.sleep(max(0.0, ticks[-1] + 5 - time.time()))
        for s in scheds:
            s.pause()
        expected = {tick_instance_id(s.name, t): t for s in scheds for t in ticks}
        table = engine.schedules()
        listed = engine.instances(limit=10 * len(expected))
        got = set(listed["id"])
        lags = []
        for iid, created in zip(listed["id"], listed["created_at"], strict=True):
            if iid in expected:
                lags.append(created.timestamp() - expected[iid])
        deadline = time.time() + 60
        while time.time() < deadline and len(engine.instances(status="complete")) < len(got):
            time.sleep(0.5)
        complete = len(engine.instances(status="complete"))
        emit(
            {
                "bench": "schedules",
                "schedules": args.schedules,
                "minutes": args.minutes,
                "engines": 2,
                "workers": 2,
                "first_tick": datetime.fromtimestamp(first).isoformat(),
                "ticks_expected": len(expected),
                "instances_created": len(got),
                "missing": len(set(expected) - got),
                "extra": len(got - set(expected)),
                "exactly_once": got == set(expected),
                "fired_counter": int(table["fired"].sum()),
                "missed_counter": int(table["missed"].sum()),
                "skipped_counter": int(table["skipped"].sum()),
                "lag_p50_ms": round(1000 * percentile(lags, 0.50), 1),
                "lag_p99_ms": round(1000 * percentile(lags, 0.99), 1),
                "lag_max_ms": round(1000 * max(lags), 1),
                "completed": complete,
            }
        )
    finally:
        for p in procs:
            stop(p)
        cleanup(prefix, queue)


if __name__ == "__main__":
    main()
