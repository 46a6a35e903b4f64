"""Store-level promises: scripts survive a flushed script cache (a Redis restart), and
nothing is written under anyone else's prefix."""

from __future__ import annotations

from nbflow import Engine, WorkflowEntrypoint


class One(WorkflowEntrypoint):
    def run(self, event: object, step: object) -> int:
        return 1


def test_create_and_lifecycle_calls_work_after_redis_forgets_its_scripts(engine: Engine) -> None:
    flow = engine.register(One)
    engine.redis.script_flush()  # what a Redis restart does to the script cache
    inst = flow.create(id="after-flush")
    engine.redis.script_flush()
    inst.pause()
    assert inst.status() == {"status": "paused"}
    engine.redis.script_flush()
    inst.resume()
    engine.redis.script_flush()
    engine.run_worker(burst=True)
    assert inst.status() == {"status": "complete", "output": 1}


def test_every_key_an_instance_writes_is_under_the_engine_prefix(engine: Engine) -> None:
    flow = engine.register(One)
    before = {k for k in engine.redis.scan_iter(match="*", count=1000) if not k.startswith(b"rq:")}
    flow.create(id="keys-1")
    engine.run_worker(burst=True)
    after = {k for k in engine.redis.scan_iter(match="*", count=1000) if not k.startswith(b"rq:")}
    new = {k.decode() for k in after - before if b"keys-1" in k or k.startswith(b"t")}
    assert any("keys-1" in k for k in new), "the instance wrote nothing"
    mine = {k for k in new if "keys-1" in k}
    assert all(k.startswith(engine.prefix + ":") for k in mine), sorted(mine)
