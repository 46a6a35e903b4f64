"""Shared fixtures: a real Redis, and an Engine with its own prefix and queue per test.

Redis comes from ``$NBFLOW_TEST_REDIS_URL``, else ``127.0.0.1:6379`` if a server
answers there, else nbflow's embedded server (started under a temporary
``$NBFLOW_HOME``), so ``pytest`` works on a fresh machine with no Redis set up.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from nbflow import Engine, server


def _local_redis_answers() -> bool:
    try:
        return bool(redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("NBFLOW_TEST_REDIS_URL")
    if url:
        yield url
        return
    if _local_redis_answers():
        yield "redis://127.0.0.1:6379/0"
        return
    home = Path(tempfile.mkdtemp(prefix="nbf-", dir="/tmp"))
    try:
        yield server.start_server(home)
    finally:
        server.stop_server(home)
        shutil.rmtree(home, ignore_errors=True)


def cleanup_prefix(client: redis.Redis, prefix: str, queue: str) -> None:
    """Delete a test's keys: its prefix, its RQ queue and the RQ jobs still queued
    on it (SCAN is fine in tests)."""
    # the engine's queue and its workflows' queues (``{queue}:{workflow}``)
    queue_keys = [f"rq:queue:{queue}".encode(), *client.scan_iter(match=f"rq:queue:{queue}:*")]
    job_ids = [j for key in queue_keys for j in client.lrange(key, 0, -1)]
    for i in range(0, len(job_ids), 500):
        client.delete(*(b"rq:job:" + j for j in job_ids[i : i + 500]))
    for pattern in (f"{prefix}:*", f"rq:queue:{queue}*", f"rq:*:{queue}*"):
        batch = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(batch), 500):
            client.delete(*batch[i : i + 500])
    client.srem("rq:queues", *queue_keys)


@pytest.fixture
def names() -> tuple[str, str]:
    """A fresh (prefix, queue) pair so tests never see each other's data."""
    tag = uuid.uuid4().hex[:10]
    return f"t{tag}", f"q{tag}"


@pytest.fixture
def engine(redis_url: str, names: tuple[str, str]) -> Iterator[Engine]:
    """An engine (no worker) on its own prefix and queue; cleaned up afterwards."""
    prefix, queue = names
    eng = Engine(redis_url, prefix=prefix, queue=queue)
    yield eng
    eng.stop_worker()
    cleanup_prefix(eng.redis, prefix, queue)


@pytest.fixture
def worker_engine(engine: Engine) -> Engine:
    """The same engine with its in-process worker running."""
    engine.start_worker()
    return engine
