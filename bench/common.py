"""Shared bench helpers: a Redis URL, a throwaway prefix/queue, worker processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis

HERE = Path(__file__).resolve().parent


def redis_url() -> str:
    return os.environ.get("NBFLOW_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"bench{tag}", f"bench{tag}"


def start_workers(prefix: str, queue: str, processes: int) -> subprocess.Popen[bytes]:
    """`nbflow worker` in a subprocess with the bench workflows importable."""
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nbflow.cli",
            "worker",
            "--redis",
            redis_url(),
            "--prefix",
            prefix,
            "--queue",
            queue,
            "--import",
            "workflows",
            "--processes",
            str(processes),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def cleanup(prefix: str, queue: str) -> None:
    """Deletes a run's keys: its prefix, its queue and the RQ jobs still on it."""
    client = redis.Redis.from_url(redis_url())
    # the engine's queue and its workflows' queues (``{queue}:{workflow}``)
    queue_keys = [f"rq:queue:{queue}".encode(), *client.scan_iter(match=f"rq:queue:{queue}:*")]
    job_ids = [j for key in queue_keys for j in client.lrange(key, 0, -1)]
    for i in range(0, len(job_ids), 500):
        client.delete(*(b"rq:job:" + j for j in job_ids[i : i + 500]))
    for pattern in (f"{prefix}:*", f"rq:queue:{queue}*", f"rq:*:{queue}*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    client.srem("rq:queues", *queue_keys)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result, indent=2))


def wait_idle(seconds: float = 1.0) -> None:
    time.sleep(seconds)
