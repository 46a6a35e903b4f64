"""Results of any size (spec 11): a step returning a ~1 GB DataFrame.

    python bench/artifacts.py [--rows 10000000] [--dir DIR]

Measures, on the same disk in the same run:

* ``write`` / ``read``: seconds and MB/s (of the frame's in-memory size) for plain
  ``df.to_parquet()`` / ``pd.read_parquet()`` against nbflow's artifact store
  (``ArtifactStore.write`` -- Parquet through a hashing writer, fsync, rename -- and
  ``ArtifactStore.load`` from a store with nothing in memory -- read, sha256 check,
  dtype restore); ``*_vs_plain`` is nbflow's throughput over plain Parquet's (goal
  >= 0.8).  Best of ``--repeats``.
* ``worker``: a separate process runs a workflow whose step builds the frame and
  returns it, on an in-process burst worker (``engine.run_worker``); its peak RSS
  (``resource.getrusage``) over the frame's in-memory size (goal < 2.5; the baseline of
  an interpreter with pandas and pyarrow loaded is in it too), the same once the frame
  is built (before nbflow stores it) and the difference (what storing added), the
  step's wall time, and
  the Redis memory of the artifact step: ``MEMORY USAGE`` of the instance's steps hash
  holding that one step and the length of its entry (goal < 1 KB).

``--rows 1000000`` runs in seconds; the default (10 million rows, about 1 GB) needs
about 4 GB of memory and a minute or two.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd
from common import cleanup, emit, names, redis_url

from nbflow import Engine, WorkflowEntrypoint, codec
from nbflow.artifacts import ArtifactStore


def make_frame(rows: int) -> pd.DataFrame:
    """Mixed dtypes, about 100 bytes a row in memory."""
    rng = np.random.default_rng(7)
    frame = pd.DataFrame(
        {
            "id": np.arange(rows, dtype="int64"),
            "when": pd.date_range("2024-01-01", periods=rows, freq="s", tz="UTC"),
            "flag": rng.random(rows) < 0.5,
            "level": pd.Categorical.from_codes(rng.integers(0, 5, rows), ["a", "b", "c", "d", "e"]),
            "count": pd.array(rng.integers(0, 1000, rows), dtype="Int64"),
            "name": pd.array(
                np.array([f"user{i}" for i in range(5000)], dtype=object)[np.arange(rows) % 5000],
                dtype="str",
            ),
        }
    )
    for i in range(7):
        frame[f"x{i}"] = rng.random(rows)
    return frame


def best(fn: Any, repeats: int) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return min(times), value


def io_figures(rows: int, directory: str, repeats: int) -> dict[str, Any]:
    frame = make_frame(rows)
    mem = int(frame.memory_usage(index=True, deep=True).sum())
    plain = os.path.join(directory, "plain.parquet")
    plain_write, _ = best(lambda: frame.to_parquet(plain), repeats)
    plain_read, _ = best(lambda: pd.read_parquet(plain), repeats)
    size = os.path.getsize(plain)
    os.unlink(plain)
    store = ArtifactStore(directory, prefix="bench", threshold=0, cache_bytes=0)
    refs: list[str] = []

    def write() -> None:
        refs.append(store.write(frame, "inst", "bench")[0])

    nb_write, _ = best(write, repeats)
    ref = codec.decode(refs[-1])
    assert isinstance(ref, codec.ArtifactRef)
    nb_read, back = best(lambda: store.load(ref, "bench"), repeats)
    assert back.shape == frame.shape
    mb = mem / 1e6
    return {
        "rows": rows,
        "frame_mb": round(mb, 1),
        "parquet_mb": round(size / 1e6, 1),
        "artifact_mb": round(ref.size / 1e6, 1),
        "plain_write_s": round(plain_write, 3),
        "nbflow_write_s": round(nb_write, 3),
        "plain_write_mb_s": round(mb / plain_write, 1),
        "nbflow_write_mb_s": round(mb / nb_write, 1),
        "write_vs_plain": round(plain_write / nb_write, 3),
        "plain_read_s": round(plain_read, 3),
        "nbflow_read_s": round(nb_read, 3),
        "plain_read_mb_s": round(mb / plain_read, 1),
        "nbflow_read_mb_s": round(mb / nb_read, 1),
        "read_vs_plain": round(plain_read / nb_read, 3),
    }


#: the worker's peak RSS (MB) once the step's callback has built its frame, before nbflow
#: stores it: what building the frame costs, so the rest is what storing it costs
_BUILT: list[float] = []


def _build(rows: int) -> pd.DataFrame:
    frame = make_frame(rows)
    _BUILT.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3)
    return frame


class BigFrame(WorkflowEntrypoint):
    async def run(self, event, step):  # type: ignore[no-untyped-def]
        frame = await step.do("frame", lambda: _build(event.payload["rows"]))
        return len(frame)


def worker_child(rows: int, directory: str) -> None:
    """In a process of its own: one workflow, its artifact step, and what it cost."""
    prefix, queue = names()
    engine = Engine(redis_url(), prefix=prefix, queue=queue, artifacts=directory)
    try:
        inst = engine.register(BigFrame).create(params={"rows": rows})
        t0 = time.perf_counter()
        engine.run_worker(burst=True)
        wall = time.perf_counter() - t0
        status = inst.status()
        assert status == {"status": "complete", "output": rows}, status
        steps_key = engine.keys.steps(inst.id)
        entry = engine.redis.hget(steps_key, "frame#1")
        shown = str(inst.steps()["output"].iloc[0])
        print(
            json.dumps(
                {
                    "step_wall_s": round(wall, 3),
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
                    "peak_rss_after_build_mb": _BUILT[-1],
                    "redis_steps_hash_bytes": engine.redis.memory_usage(steps_key),
                    "redis_entry_bytes": len(entry),
                    "steps_output": shown,
                }
            )
        )
    finally:
        cleanup(prefix, queue)


def worker_figures(rows: int, directory: str) -> dict[str, Any]:
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=f"{here}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            "--rows",
            str(rows),
            "--dir",
            directory,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    mem = make_frame(min(rows, 100_000)).memory_usage(index=True, deep=True).sum()
    frame_mb = float(mem) * rows / min(rows, 100_000) / 1e6
    figures["peak_rss_over_frame"] = round(figures["peak_rss_mb"] / frame_mb, 2)
    figures["peak_rss_after_build_over_frame"] = round(
        figures["peak_rss_after_build_mb"] / frame_mb, 2
    )
    # what storing the frame added on top of building it, over the frame's size
    figures["store_rss_over_frame"] = round(
        (figures["peak_rss_mb"] - figures["peak_rss_after_build_mb"]) / frame_mb, 2
    )
    figures["peak_rss_mb"] = round(figures["peak_rss_mb"], 1)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--dir", help="where files go (default: a temporary directory in /tmp)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        worker_child(args.rows, args.dir)
        return
    directory = tempfile.mkdtemp(prefix="nbflow-bench-", dir=args.dir)
    try:
        result: dict[str, Any] = {"benchmark": "artifacts"}
        result.update(io_figures(args.rows, directory, args.repeats))
        result["worker"] = worker_figures(args.rows, directory)
        emit(result)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
