"""nbflow against DBOS Transact at equal durability: the same 3-step workflow, both
fsyncing every commit, measured in one run.

    pip install dbos            # (or pip install -e ".[bench]"); not an nbflow dependency
    python bench/dbos_compare.py [--workflows 500] [--sequential 100] [--workers 1]
                                 [--pg postgresql://postgres@127.0.0.1:5432]

* nbflow: a fresh embedded server with ``durability="always"`` (``appendfsync always``:
  Redis fsyncs its append-only file before it replies), ``--workers`` ``nbflow worker``
  processes.
* DBOS: its system database on the local PostgreSQL, in a database of its own
  (``nbflow_bench``, created here and dropped afterwards), with ``fsync`` and
  ``synchronous_commit`` on (checked: every commit is fsynced before it returns); the
  workflows run in this process on DBOS's executor threads.

Two figures each: throughput (``--workflows`` started at once, first start to last
result: nbflow ``create_batch`` in batches of 100, DBOS ``start_workflow``) and one at a
time (``--sequential`` workflows, start -> result, each after the previous finished).
Prints JSON with both engines' workflows/s and the ratios nbflow / DBOS.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from common import durable_server, emit, names, redis_url, start_workers, stop
from workflows import ThreeSteps

from nbflow import Engine

DB = "nbflow_bench"


def bench_nbflow(n: int, sequential: int, workers: int) -> dict[str, Any]:
    with durable_server("always"):
        prefix, queue = names()
        engine = Engine(redis_url(), prefix=prefix, queue=queue, durability="always")
        flow = engine.register(ThreeSteps)
        proc = start_workers(prefix, queue, workers)
        try:
            flow.create().wait(timeout=60)  # workers are up, scripts loaded
            samples = []
            for _ in range(sequential):
                t0 = time.perf_counter()
                assert flow.create().wait(timeout=60)["status"] == "complete"
                samples.append(time.perf_counter() - t0)
            done_key = engine.keys.by_status("complete")
            base = engine.redis.zcard(done_key)
            t0 = time.perf_counter()
            for start in range(0, n, 100):
                flow.create_batch([{"params": {"i": i}} for i in range(start, min(n, start + 100))])
            deadline = time.monotonic() + 600
            while engine.redis.zcard(done_key) - base < n:
                if time.monotonic() > deadline:
                    raise SystemExit("nbflow timed out")
                time.sleep(0.005)
            took = time.perf_counter() - t0
            fsync = engine.redis.config_get("appendfsync")
        finally:
            stop(proc)
    return {
        "durability": f"appendfsync {dict(fsync).popitem()[1]}",
        "workers": f"{workers} nbflow worker process(es)",
        "throughput_workflows_per_s": round(n / took, 1),
        "sequential_workflows_per_s": round(1 / statistics.mean(samples), 1),
        "sequential_p50_ms": round(statistics.median(samples) * 1000, 3),
    }


def bench_dbos(pg: str, n: int, sequential: int) -> dict[str, Any]:
    import psycopg
    from dbos import DBOS, DBOSConfig

    with psycopg.connect(f"{pg}/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DB}")
        admin.execute(f"CREATE DATABASE {DB}")
        settings = {
            name: admin.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
            for name in ("fsync", "synchronous_commit", "wal_sync_method")
        }
    assert settings["fsync"] == "on" and settings["synchronous_commit"] == "on", settings
    try:

        @DBOS.step()
        def one() -> int:
            return 1

        @DBOS.step()
        def two(a: int) -> int:
            return a + 1

        @DBOS.step()
        def three(b: int) -> int:
            return b + 1

        @DBOS.workflow()
        def three_steps(i: int) -> int:
            return three(two(one()))

        config: DBOSConfig = {
            "name": "nbflow-bench",
            "system_database_url": f"{pg}/{DB}",
            "log_level": "WARNING",
        }
        DBOS(config=config)
        DBOS.launch()
        try:
            assert DBOS.start_workflow(three_steps, -1).get_result() == 3  # warm-up
            samples = []
            for i in range(sequential):
                t0 = time.perf_counter()
                assert DBOS.start_workflow(three_steps, i).get_result() == 3
                samples.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            handles = [DBOS.start_workflow(three_steps, i) for i in range(n)]
            for h in handles:
                assert h.get_result() == 3
            took = time.perf_counter() - t0
        finally:
            DBOS.destroy(destroy_registry=True)
    finally:
        with psycopg.connect(f"{pg}/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    return {
        "durability": ", ".join(f"{k} {v}" for k, v in settings.items()),
        "workers": "this process (DBOS executor threads)",
        "throughput_workflows_per_s": round(n / took, 1),
        "sequential_workflows_per_s": round(1 / statistics.mean(samples), 1),
        "sequential_p50_ms": round(statistics.median(samples) * 1000, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workflows", type=int, default=500)
    ap.add_argument("--sequential", type=int, default=100)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    args = ap.parse_args()
    nb = bench_nbflow(args.workflows, args.sequential, args.workers)
    db = bench_dbos(args.pg, args.workflows, args.sequential)
    emit(
        {
            "benchmark": "nbflow_vs_dbos_3_steps",
            "workflows": args.workflows,
            "sequential": args.sequential,
            "nbflow": nb,
            "dbos": db,
            "ratio_throughput": round(
                nb["throughput_workflows_per_s"] / db["throughput_workflows_per_s"], 2
            ),
            "ratio_sequential": round(
                nb["sequential_workflows_per_s"] / db["sequential_workflows_per_s"], 2
            ),
        }
    )


if __name__ == "__main__":
    main()
