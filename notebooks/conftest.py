"""The Redis that the tutorial notebooks use under ``pytest --nbval``.

The notebooks call ``nbflow.Engine()`` without a URL, as a user would: that is
``$NBFLOW_REDIS_URL`` if set, else nbflow's embedded server under ``$NBFLOW_HOME``
(default ``~/.nbflow``). Under pytest they use the test suite's Redis instead
(see tests/conftest.py): ``$NBFLOW_TEST_REDIS_URL``, else ``127.0.0.1:6379`` if a
server answers there, else the embedded server in a temporary ``$NBFLOW_HOME``,
stopped when the session ends. So a test run neither needs a ``redis-server``
binary when a Redis is already running, nor touches ``~/.nbflow``, nor leaves a
server behind. A ``$NBFLOW_REDIS_URL`` that is already set is left alone.

The variables are set only while a notebook's kernel starts: the kernel copies
the environment then (and tutorial 5's worker processes inherit it from the
kernel). The pytest process, and so the tests in tests/, never see them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

_ENV_NAMES = ("NBFLOW_REDIS_URL", "NBFLOW_HOME")
_kernel_env: dict[str, str] | None = None
_temp_home: Path | None = None


def _local_redis_answers() -> bool:
    try:
        return bool(redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _choose_kernel_env() -> dict[str, str]:
    """What to add to the environment of the notebooks' kernels (decided once)."""
    global _temp_home
    if os.environ.get("NBFLOW_REDIS_URL", "").strip():
        return {}
    url = os.environ.get("NBFLOW_TEST_REDIS_URL", "").strip()
    if url:
        return {"NBFLOW_REDIS_URL": url}
    if _local_redis_answers():
        return {"NBFLOW_REDIS_URL": "redis://127.0.0.1:6379/0"}
    # The embedded server, in a home of its own; short, for the Unix socket's path limit.
    _temp_home = Path(tempfile.mkdtemp(prefix="nbf-nb-", dir="/tmp"))
    return {"NBFLOW_HOME": str(_temp_home)}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[Any]:
    """Around the setup that starts a notebook's kernel, put the chosen Redis in os.environ."""
    global _kernel_env
    if _kernel_env is None:
        _kernel_env = _choose_kernel_env()
    saved = {name: os.environ.get(name) for name in _ENV_NAMES}
    os.environ.update(_kernel_env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _delete_tutorial_keys(url: str) -> None:
    """The tutorials keep their instances (a reader looks at them afterwards); under
    pytest they are deleted at the end: every ``tutorial0N-<tag>`` prefix, its queue
    and the RQ jobs left on it."""
    client = redis.Redis.from_url(url)
    for queue in client.smembers("rq:queues"):
        if queue.startswith(b"rq:queue:tutorial0"):
            for job in client.lrange(queue, 0, -1):
                client.delete(b"rq:job:" + job)
            client.delete(queue)
            client.srem("rq:queues", queue)
    keys = list(client.scan_iter(match="tutorial0[1-9]-*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])


def pytest_unconfigure(config: pytest.Config) -> None:
    """Delete what the tutorials stored in a shared Redis; stop the embedded server
    the notebooks started in the temporary home, if any."""
    url = (_kernel_env or {}).get("NBFLOW_REDIS_URL")
    if url and not os.environ.get("NBFLOW_REDIS_URL", "").strip():
        try:
            _delete_tutorial_keys(url)
        except redis.RedisError:
            pass  # nothing to tidy if the server went away
    if _temp_home is not None:
        from nbflow import server

        server.stop_server(_temp_home)
        shutil.rmtree(_temp_home, ignore_errors=True)
