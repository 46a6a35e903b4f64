"""``Engine(durability=...)`` (spec 12): the embedded server's ``appendfsync``.

Each test has its own ``NBFLOW_HOME`` (the ``home`` fixture of ``test_server``), so the
embedded servers started here are the tests' own and are stopped afterwards; a Redis
nbflow did not start is only checked, never changed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from helpers_procs import RedisServer
from test_server import home, needs_redis  # noqa: F401  (the private-home fixture)

from nbflow import Engine, WorkflowEntrypoint, server


class Two(WorkflowEntrypoint):
    async def run(self, event, step):
        a = await step.do("a", lambda: 1)
        return a + await step.do("b", lambda: 2)


def appendfsync(engine: Engine | redis.Redis) -> str:
    client = engine.redis if isinstance(engine, Engine) else engine
    value = dict(client.config_get("appendfsync")).popitem()[1]
    return value.decode() if isinstance(value, bytes) else str(value)


@needs_redis
def test_always_makes_the_embedded_server_fsync_every_write_and_runs_workflows(
    home: Path,  # noqa: F811
) -> None:
    engine = Engine(durability="always", prefix="dur", queue="dur")
    assert appendfsync(engine) == "always"
    assert "appendfsync always" in (home / "redis.conf").read_text()
    inst = engine.register(Two).create()
    engine.start_worker()
    try:
        assert inst.wait(timeout=30) == {"status": "complete", "output": 3}
    finally:
        engine.stop_worker()


@needs_redis
def test_the_default_leaves_the_server_as_it_is_and_a_new_one_fsyncs_every_second(
    home: Path,  # noqa: F811
) -> None:
    first = Engine()
    assert appendfsync(first) == "everysec"
    Engine(durability="always")  # a running server is switched ...
    assert appendfsync(first) == "always"
    Engine()  # ... and an engine without durability leaves it so
    assert appendfsync(first) == "always"
    Engine(durability="everysec")
    assert appendfsync(first) == "everysec"


@needs_redis
def test_the_embedded_servers_socket_url_counts_as_the_embedded_server(
    home: Path,  # noqa: F811
) -> None:
    url = server.start_server()
    assert appendfsync(Engine(url, durability="always")) == "always"
    client = redis.Redis.from_url(url)
    try:
        Engine(client, durability="everysec")
        assert appendfsync(client) == "everysec"
    finally:
        client.close()


@pytest.mark.parametrize("bad", ["no", "ALWAYS", "", "sometimes", 1, True, ["always"]])
def test_a_bad_durability_is_a_value_error_naming_the_allowed_values(
    home: Path,  # noqa: F811
    bad: object,
) -> None:
    with pytest.raises(ValueError, match="'everysec' or 'always'"):
        Engine(durability=bad)  # type: ignore[arg-type]
    assert server.server_status()["running"] is False  # nothing was started


def test_another_redis_is_checked_not_changed(tmp_path: Path) -> None:
    """A Redis nbflow did not start may be shared: durability= only checks that it
    already fsyncs that way."""
    srv = RedisServer(tmp_path / "r").start()  # appendonly yes, appendfsync always
    try:
        assert appendfsync(Engine(srv.url, durability="always")) == "always"
        with pytest.raises(ValueError, match="appendfsync 'always'.*CONFIG SET appendfsync"):
            Engine(srv.url, durability="everysec")
        assert appendfsync(srv.client()) == "always"
        srv.client().config_set("appendonly", "no")
        with pytest.raises(ValueError, match="appendonly 'no'"):
            Engine(srv.url, durability="always")
    finally:
        srv.stop()
