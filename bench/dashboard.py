"""Dashboard cost: kernel CPU and Redis round trips per refresh, and what a refreshing
dashboard does to the throughput of the worker in the same process.

    python bench/dashboard.py [--instances 1000] [--refreshes 30] [--workflows 2000]

1. ``refresh``: a dashboard over ``--instances`` instances (all listed: ``limit`` is
   1000), refreshed ``--refreshes`` times; CPU seconds of this process per refresh
   (``time.process_time``) and Redis round trips per refresh (commands and pipelines
   sent on the engine's client), without and with a selected instance.
2. ``throughput``: ``--workflows`` ThreeSteps instances run by the in-process worker
   (``engine.start_worker()``, as in a notebook), once without a dashboard and once
   with one refreshing every second in a background thread of the same process
   (the GIL is shared, as in a kernel; a refresh that costs much CPU waits longer,
   ``MAX_CPU_SHARE``); instances per second, and the slowdown (best and median of
   ``--rounds`` alternating rounds: the machine is shared, single rounds are noisy).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from common import cleanup, emit, names, redis_url
from workflows import ThreeSteps

from nbflow import Engine
from nbflow.widgets import Dashboard


class RoundTrips:
    """Counts what an engine's client sends: each command or pipeline is one round trip."""

    def __init__(self, engine: Engine) -> None:
        self.count = 0
        client = engine.redis
        plain = client.execute_command
        make_pipeline = client.pipeline

        def execute_command(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return plain(*args, **kwargs)

        def pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = make_pipeline(*args, **kwargs)
            run = pipe.execute

            def execute(*a: Any, **k: Any) -> Any:
                self.count += 1
                return run(*a, **k)

            pipe.execute = execute
            return pipe

        client.execute_command = execute_command  # type: ignore[method-assign]
        client.pipeline = pipeline  # type: ignore[method-assign]


def measure_refresh(dash: Dashboard, trips: RoundTrips, n: int) -> dict[str, float]:
    cpu: list[float] = []
    counts: list[int] = []
    for _ in range(n):
        before, c0 = time.process_time(), trips.count
        dash.refresh()
        cpu.append(time.process_time() - before)
        counts.append(trips.count - c0)
    return {
        "cpu_ms_median": round(statistics.median(cpu) * 1000, 1),
        "cpu_ms_max": round(max(cpu) * 1000, 1),
        "round_trips_median": statistics.median(counts),
    }


def refresh_cost(instances: int, refreshes: int) -> dict[str, Any]:
    prefix, queue = names()
    engine = Engine(redis_url(), prefix=prefix, queue=queue)
    try:
        flow = engine.register(ThreeSteps)
        for start in range(0, instances, 500):
            flow.create_batch(
                [{"params": {"i": i}} for i in range(start, min(instances, start + 500))]
            )
        engine.run_worker()  # all complete: rows with bars, counts, ages
        dash = Dashboard(engine, limit=1000)
        dash.refresh()  # warm (the steps-per-run figure is read now, then every 10 s)
        trips = RoundTrips(engine)
        listed = measure_refresh(dash, trips, refreshes)
        dash.select(str(dash.instances["id"][0]))
        selected = measure_refresh(dash, trips, refreshes)
        dash.close()
        return {"instances": instances, "no_selection": listed, "one_selected": selected}
    finally:
        cleanup(prefix, queue)


def run_throughput(workflows: int, with_dashboard: bool) -> float:
    prefix, queue = names()
    engine = Engine(redis_url(), prefix=prefix, queue=queue)
    dash = None
    try:
        flow = engine.register(ThreeSteps)
        engine.start_worker()
        flow.create().wait(timeout=60)  # the worker is up
        if with_dashboard:
            dash = Dashboard(engine, refresh_interval=1.0, limit=1000)
            dash.start()
        done_key = engine.keys.by_status("complete")
        base = engine.redis.zcard(done_key)
        t0 = time.perf_counter()
        for start in range(0, workflows, 100):
            flow.create_batch(
                [{"params": {"i": i}} for i in range(start, min(workflows, start + 100))]
            )
        deadline = time.monotonic() + 600
        while engine.redis.zcard(done_key) - base < workflows:
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not finish in 10 minutes")
            time.sleep(0.05)
        return workflows / (time.perf_counter() - t0)
    finally:
        if dash is not None:
            dash.close()
        engine.stop_worker()
        cleanup(prefix, queue)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--refreshes", type=int, default=30)
    ap.add_argument("--workflows", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    refresh = refresh_cost(args.instances, args.refreshes)
    without, with_dash = [], []
    for _ in range(args.rounds):  # alternate, so load on the machine hits both alike
        without.append(run_throughput(args.workflows, with_dashboard=False))
        with_dash.append(run_throughput(args.workflows, with_dashboard=True))
    best_without, best_with = max(without), max(with_dash)
    emit(
        {
            "bench": "dashboard",
            "refresh": refresh,
            "throughput": {
                "workflows": args.workflows,
                "worker": "in-process (engine.start_worker), dashboard refreshing every 1 s",
                "without_dashboard_per_s": [round(x, 1) for x in without],
                "with_dashboard_per_s": [round(x, 1) for x in with_dash],
                "slowdown_pct_best_of_rounds": round((1 - best_with / best_without) * 100, 1),
                "slowdown_pct_median_of_rounds": round(
                    (1 - statistics.median(with_dash) / statistics.median(without)) * 100, 1
                ),
            },
        }
    )


if __name__ == "__main__":
    main()
