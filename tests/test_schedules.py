"""Cron schedules (SPEC 10.3) against a real Redis: one instance per tick however many
engines and housekeepers race, overlap, missed ticks and backfill, pause / resume /
delete / trigger / next_runs, updates by name, a Redis restart, the CLI and the magics.

Most tests walk a clock through ticks by calling ``nbflow.schedules.fire_due`` (what every
worker's housekeeper calls on its wake cycle) with an injected ``now``, so minutes of
ticks take no time; the tests with real housekeepers use croniter's six-field syntax
(seconds) and wait for what they need, never asserting on time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pandas as pd
import pytest
from helpers_procs import Procs, RedisServer, write_module
from support import poll

from nbflow import Engine, Schedule, WorkflowEntrypoint, WorkflowInstance
from nbflow.cli import main
from nbflow.schedules import MISFIRE_GRACE, fire_due, tick_instance_id, ticks_after


class Nightly(WorkflowEntrypoint):
    def run(self, event: Any, step: Any) -> Any:
        return step.do("report", lambda: {"region": (event.payload or {}).get("region")})


FLOWS = """
from nbflow import WorkflowEntrypoint


class Nightly(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("report", lambda: {"region": (event.payload or {}).get("region")})
"""


def _next_tick(sched: Schedule[Any]) -> float:
    return sched.next_runs(1)[0].timestamp()


def _ids(engine: Engine) -> set[str]:
    return set(engine.instances()["id"])


@pytest.fixture
def other(engine: Engine, redis_url: str) -> Iterator[Engine]:
    """A second engine on the same prefix and queue (another process, as far as Redis
    can tell: its own connections)."""
    eng = Engine(redis_url, prefix=engine.prefix, queue=engine.queue_name)
    eng.register(Nightly)
    yield eng
    eng.stop_worker()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


# -- exactly once --------------------------------------------------------------------------


def test_each_tick_creates_exactly_one_instance_while_two_engines_and_housekeepers_race(
    engine: Engine, other: Engine
) -> None:
    flow = engine.register(Nightly)
    scheds = [
        engine.schedule(flow, "* * * * *", name=f"n{i}", params={"region": i}, overlap="allow")
        for i in range(20)
    ]
    first = _next_tick(scheds[0])
    ticks = [first + 60 * k for k in range(5)]
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def housekeeper(eng: Engine) -> None:
        try:
            for tick in ticks:  # they share one clock: all start each tick together
                start.wait()
                for offset in (0.0, 0.001, 0.01, 0.2):  # wake cycles look several times
                    fire_due(eng.backend, now=tick + offset)
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=housekeeper, args=(e,)) for e in (engine, other) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    expected = {tick_instance_id(f"n{i}", tick) for i in range(20) for tick in ticks}
    assert _ids(engine) == expected
    table = engine.schedules().set_index("name")
    assert list(table["fired"]) == [5] * 20
    assert list(table["missed"]) == [0] * 20
    # every instance was queued with its job: a worker runs each of them once
    engine.run_worker()
    done = engine.instances(status="complete")
    assert len(done) == 100
    inst = engine.instance(tick_instance_id("n7", ticks[2]))
    assert inst.status() == {"status": "complete", "output": {"region": 7}}


def test_real_housekeepers_in_worker_processes_and_a_kernel_fire_every_second_once(
    engine: Engine, redis_url: str, procs: Procs, tmp_path: Path
) -> None:
    module = write_module(tmp_path, "sched_flows", FLOWS)
    for n in range(2):
        procs.worker(f"w{n}", redis_url, engine.prefix, engine.queue_name, module)
    engine.register(Nightly)
    engine.start_worker()  # a third housekeeper, in this process
    scheds = [
        engine.schedule("Nightly", "* * * * * *", name=f"sec{i}", overlap="allow") for i in range(3)
    ]

    def fired_enough() -> bool:
        return bool((engine.schedules()["fired"] >= 4).all())

    poll(fired_enough, 30, "4 ticks of each schedule", interval=0.1)
    for s in scheds:
        s.pause()
    table = engine.schedules().set_index("name")
    for s in scheds:
        mine = sorted(i for i in _ids(engine) if i.startswith(f"{s.name}-"))
        assert len(mine) == table.loc[s.name, "fired"]
        stamps = [datetime.strptime(i.split("-", 1)[1], "%Y%m%dT%H%M%S") for i in mine]
        # one instance for every second from the first tick on: none missing, none twice
        assert [(b - a).total_seconds() for a, b in pairwise(stamps)] == [1.0] * (len(stamps) - 1)
    ids = sorted(_ids(engine))
    poll(
        lambda: all(engine.instance(i).status()["status"] == "complete" for i in ids),
        30,
        "scheduled instances complete",
        interval=0.1,
    )


# -- overlap, missed ticks, backfill ---------------------------------------------------------


def test_overlap_skip_skips_a_tick_while_the_previous_instance_is_unfinished(
    engine: Engine,
) -> None:
    engine.register(Nightly)
    sched = engine.schedule("Nightly", "*/5 * * * *")  # name defaults to the workflow's
    assert sched.name == "Nightly" and sched.overlap == "skip"
    t1 = _next_tick(sched)
    fire_due(engine.backend, now=t1 + 0.1)
    first = tick_instance_id("Nightly", t1)
    assert _ids(engine) == {first}  # queued: no worker ran it yet
    fire_due(engine.backend, now=t1 + 300.1)
    assert _ids(engine) == {first}
    info = sched.info()
    assert (info["skipped"], info["fired"]) == (1, 1)
    skipped = [e for e in sched.history() if e["ev"] == "skipped"]
    assert skipped == [
        {"t": pytest.approx(t1 + 300.1), "ev": "skipped", "tick": t1 + 300, "running": first}
    ]
    engine.run_worker()  # the first instance finishes
    fire_due(engine.backend, now=t1 + 600.1)
    assert _ids(engine) == {first, tick_instance_id("Nightly", t1 + 600)}


def test_overlap_allow_fires_while_the_previous_instance_is_unfinished(engine: Engine) -> None:
    engine.register(Nightly)
    sched = engine.schedule("Nightly", "*/5 * * * *", overlap="allow")
    t1 = _next_tick(sched)
    fire_due(engine.backend, now=t1 + 0.1)
    fire_due(engine.backend, now=t1 + 300.1)
    assert _ids(engine) == {tick_instance_id("Nightly", t) for t in (t1, t1 + 300)}
    assert sched.info()["skipped"] == 0


def test_ticks_missed_while_nothing_ran_are_not_created_afterwards(engine: Engine) -> None:
    engine.register(Nightly)
    sched = engine.schedule("Nightly", "* * * * *", overlap="allow")
    t1 = _next_tick(sched)
    late = t1 + 3600 + 30  # an hour later nothing has fired: the housekeepers were down
    fire_due(engine.backend, now=late)
    assert _ids(engine) == set()
    info = sched.info()
    assert (info["missed"], info["fired"]) == (1, 0)
    # it jumped to the next tick after "now": that one fires
    assert info["next_run"].timestamp() == t1 + 3660
    fire_due(engine.backend, now=t1 + 3660 + 0.1)
    assert _ids(engine) == {tick_instance_id("Nightly", t1 + 3660)}
    # a tick found within the grace period still fires
    fire_due(engine.backend, now=t1 + 3720 + MISFIRE_GRACE - 1)
    assert tick_instance_id("Nightly", t1 + 3720) in _ids(engine)


def test_backfill_creates_each_past_tick_that_has_no_instance_yet(engine: Engine) -> None:
    engine.register(Nightly)
    sched = engine.schedule("Nightly", "*/2 * * * *", name="bf", params={"region": "eu"})
    now = time.time()
    start = datetime.fromtimestamp((now // 120) * 120 - 1200, UTC)  # on a tick
    end = start + timedelta(minutes=10)  # on a tick too: both ends count
    made = sched.backfill(start, end)
    expected = [tick_instance_id("bf", start.timestamp() + 120 * k) for k in range(6)]
    assert [i.id for i in made] == expected
    assert all(isinstance(i, WorkflowInstance) and i.workflow == "Nightly" for i in made)
    again = sched.backfill(start - timedelta(minutes=4), end)
    assert [i.id for i in again] == [
        tick_instance_id("bf", start.timestamp() - 240 + 120 * k) for k in range(2)
    ]
    assert sched.info()["backfilled"] == 8
    # ticks after now are left to the schedule
    assert (
        sched.backfill(
            datetime.now(UTC) + timedelta(minutes=1), datetime.now(UTC) + timedelta(hours=1)
        )
        == []
    )
    engine.run_worker()
    assert engine.instance(expected[0]).status() == {
        "status": "complete",
        "output": {"region": "eu"},
    }


# -- lifecycle -------------------------------------------------------------------------------


def test_pause_resume_trigger_next_runs_and_delete(engine: Engine) -> None:
    engine.register(Nightly)
    sched = engine.schedule("Nightly", "0 6 * * *", name="morning", timezone="Europe/Berlin")
    runs = sched.next_runs(3)
    assert len(runs) == 3 and all(r.tzinfo == ZoneInfo("Europe/Berlin") for r in runs)
    assert all((r.hour, r.minute) == (6, 0) for r in runs)
    assert [(b - a).days for a, b in pairwise(runs)] == [1, 1]
    assert sched.next_runs(0) == []

    sched.pause()
    assert sched.paused and engine.schedules().loc[0, "paused"]
    fire_due(engine.backend, now=runs[0].timestamp() + 0.1)
    assert _ids(engine) == set()
    assert sched.next_runs(1)[0] >= datetime.now(UTC)

    inst = sched.trigger()  # works while paused
    assert inst.id.startswith("morning-") and inst.workflow == "Nightly"
    assert inst.status() == {"status": "queued"}
    second = sched.trigger()  # the same second: the id gets a suffix
    assert second.id != inst.id
    assert sched.info()["triggered"] == 2 and sched.info()["last_instance"] == second.id

    sched.resume()
    assert not sched.paused
    assert sched.info()["next_run"] == pd.Timestamp(sched.next_runs(1)[0]).tz_convert("UTC")

    sched.delete()
    assert engine.schedules().empty
    with pytest.raises(LookupError, match="morning"):
        engine.get_schedule("morning")
    with pytest.raises(LookupError, match="morning"):
        sched.trigger()
    with pytest.raises(LookupError, match="morning"):
        sched.delete()
    engine.run_worker()  # its instances stay and run
    assert engine.instance(inst.id).status()["status"] == "complete"


def test_calling_schedule_again_with_the_same_name_updates_it(
    engine: Engine, other: Engine
) -> None:
    engine.register(Nightly)
    first = engine.schedule("Nightly", "*/5 * * * *", name="job", params={"region": "a"})
    first.pause()
    again = other.schedule(
        "Nightly",
        "0 * * * *",
        name="job",
        params={"region": "b"},
        overlap="allow",
        timezone="Asia/Tokyo",
    )
    assert again == first
    table = engine.schedules()
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["cron"], row["overlap"], row["timezone"], row["paused"]) == (
        "0 * * * *",
        "allow",
        "Asia/Tokyo",
        True,
    )
    assert first.params == {"region": "b"}
    assert [e["ev"] for e in first.history()] == ["created", "paused", "updated"]
    # a re-run of the same cell keeps the tick the schedule waits for
    again.resume()
    pending = again.info()["next_run"]
    other.schedule(
        "Nightly",
        "0 * * * *",
        name="job",
        params={"region": "c"},
        overlap="allow",
        timezone="Asia/Tokyo",
    )
    assert again.info()["next_run"] == pending and again.params == {"region": "c"}


def test_ticks_follow_the_time_zone_and_ids_use_utc_across_daylight_saving() -> None:
    ny = ZoneInfo("America/New_York")
    # fall back (2026-11-01, 02:00 EDT -> 01:00 EST): a fixed 01:30 fires once that day
    start = datetime(2026, 10, 31, 12, 0, tzinfo=ny).timestamp()
    daily = [t for _, t in zip(range(3), ticks_after("30 1 * * *", ny, start), strict=False)]
    assert [(t.isoformat()) for t in daily] == [
        "2026-11-01T01:30:00-04:00",
        "2026-11-02T01:30:00-05:00",
        "2026-11-03T01:30:00-05:00",
    ]
    assert tick_instance_id("nightly", daily[0].timestamp()) == "nightly-20261101T053000"
    assert tick_instance_id("nightly", daily[1].timestamp()) == "nightly-20261102T063000"
    # an hourly schedule keeps firing every real hour through the repeated hour
    first = datetime(2026, 11, 1, 0, 30, tzinfo=ny).timestamp()
    hourly = [t for _, t in zip(range(3), ticks_after("@hourly", ny, first), strict=False)]
    assert [t.timestamp() - first for t in hourly] == [1800, 5400, 9000]
    ids = {tick_instance_id("h", t.timestamp()) for t in hourly}
    assert len(ids) == 3
    # spring forward (2027-03-14, 02:00 EST -> 03:00 EDT): 02:30 does not exist that day
    start = datetime(2027, 3, 13, 12, 0, tzinfo=ny).timestamp()
    spring = [t for _, t in zip(range(2), ticks_after("30 2 * * *", ny, start), strict=False)]
    assert [t.isoformat() for t in spring] == [
        "2027-03-14T03:00:00-04:00",
        "2027-03-15T02:30:00-04:00",
    ]


# -- bad input -------------------------------------------------------------------------------


def _schedule_keys(engine: Engine) -> list[bytes]:
    return list(engine.redis.scan_iter(match=f"{engine.prefix}:schedule*"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"cron": "61 * * * *"}, ValueError, "invalid cron expression '61 \\* \\* \\* \\*'"),
        ({"cron": "* * *"}, ValueError, "five fields"),
        ({"cron": "@sometimes"}, ValueError, "@daily"),
        ({"cron": "0 0 31 2 *"}, ValueError, "'0 0 31 2 \\*'"),
        ({"cron": 5}, TypeError, "cron must be a string"),
        ({"timezone": "Mars/Olympus"}, ValueError, "unknown time zone 'Mars/Olympus'"),
        ({"timezone": ""}, ValueError, "unknown time zone ''"),
        ({"timezone": 2}, TypeError, "IANA"),
        ({"overlap": "queue"}, ValueError, "overlap must be one of 'skip', 'allow', not 'queue'"),
        ({"params": {"x": object()}}, TypeError, "params of schedule 'Nightly'"),
        ({"workflow": "Nope"}, ValueError, "unknown workflow 'Nope'.*registered: Nightly"),
        ({"workflow": 3}, TypeError, "Workflow or the name"),
        ({"name": "-bad"}, ValueError, "invalid schedule name '-bad'"),
        ({"name": "x" * 81}, ValueError, "at most 80"),
    ],
)
def test_bad_input_raises_and_writes_nothing(
    engine: Engine, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    engine.register(Nightly)
    args: dict[str, Any] = {"workflow": "Nightly", "cron": "* * * * *", **kwargs}
    with pytest.raises(error, match=match):
        engine.schedule(args.pop("workflow"), args.pop("cron"), **args)
    assert _schedule_keys(engine) == []


def test_backfill_refuses_naive_or_reversed_ranges_and_writes_nothing(engine: Engine) -> None:
    engine.register(Nightly)
    sched = engine.schedule("Nightly", "* * * * *")
    before = {k: engine.redis.type(k) for k in _schedule_keys(engine)}
    aware = datetime.now(UTC) - timedelta(hours=1)
    with pytest.raises(ValueError, match="backfill start is a naive datetime"):
        sched.backfill(datetime(2026, 1, 1), aware)
    with pytest.raises(ValueError, match="backfill end is a naive datetime"):
        sched.backfill(aware, datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="is before start"):
        sched.backfill(aware, aware - timedelta(minutes=1))
    with pytest.raises(TypeError, match="aware datetime"):
        sched.backfill("yesterday", aware)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="more than 10000 ticks"):
        sched.backfill(aware - timedelta(days=30), aware)
    assert {k: engine.redis.type(k) for k in _schedule_keys(engine)} == before
    assert _ids(engine) == set()
    assert sched.info()["backfilled"] == 0


# -- restarts, CLI, magics -------------------------------------------------------------------


def test_schedules_survive_a_redis_restart(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path / "redis-data").start()
    try:
        eng = Engine(srv.url, prefix="survive", queue="survive")
        eng.register(Nightly)
        sched = eng.schedule("Nightly", "*/10 * * * *", name="ten", params={"region": "us"})
        sched.pause()
        sched.resume()
        tick = _next_tick(sched)
        srv.restart()  # SIGKILL: only the append-only file keeps it
        after = Engine(srv.url, prefix="survive", queue="survive")
        row = after.schedules().iloc[0]
        assert (row["name"], row["cron"], row["paused"]) == ("ten", "*/10 * * * *", False)
        assert row["next_run"].timestamp() == tick
        fire_due(after.backend, now=tick + 0.1)  # Redis lost its scripts: they load again
        inst = after.instance(tick_instance_id("ten", tick))
        after.register(Nightly)
        after.run_worker()
        assert inst.status() == {"status": "complete", "output": {"region": "us"}}
    finally:
        srv.stop()


def test_cli_lists_schedules(
    engine: Engine, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--redis", redis_url, "--prefix", engine.prefix, "--queue", engine.queue_name]
    assert main(["schedules", *common]) == 0
    assert capsys.readouterr().out.strip() == "no schedules"
    engine.register(Nightly)
    engine.schedule("Nightly", "@daily", name="daily-report", timezone="Europe/Paris")
    engine.schedule("Nightly", "0 * * * *", name="hourly").pause()
    assert main(["schedules", *common]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "name",
        "workflow",
        "cron",
        "timezone",
        "overlap",
        "paused",
        "next_run",
        "last_instance",
    ]
    assert lines[1].split()[:4] == ["daily-report", "Nightly", "@daily", "Europe/Paris"]
    assert lines[2].split() == [
        "hourly",
        "Nightly",
        "0",
        "*",
        "*",
        "*",
        "*",
        "UTC",
        "skip",
        "True",
        "-",
        "-",
    ]


@pytest.fixture
def shell(engine: Engine) -> Iterator[Any]:
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    from nbflow.notebook import use_engine

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    sh = InteractiveShell.instance(config=config)
    sh.run_line_magic("load_ext", "nbflow")
    use_engine(engine)
    yield sh
    use_engine(None)


def test_magics_list_steer_and_trigger_schedules(engine: Engine, shell: Any) -> None:
    from IPython.core.error import UsageError

    def wf(line: str) -> Any:
        return shell.run_line_magic("wf", line)

    engine.register(Nightly)
    engine.schedule("Nightly", "30 7 * * 1-5", name="weekday", timezone="Europe/London")
    listed = wf("schedule list")
    assert list(listed["name"]) == ["weekday"]
    nxt = wf("schedule next weekday -n 2")
    assert len(nxt) == 2 and all("T07:30:00" in t for t in nxt)
    assert wf("schedule pause weekday")["paused"] is True
    assert wf("schedule resume weekday")["paused"] is False
    inst = wf("schedule trigger weekday")
    assert isinstance(inst, WorkflowInstance) and inst.id.startswith("weekday-")
    assert wf("schedule delete weekday").empty
    with pytest.raises(UsageError, match="needs a schedule NAME; usage: %wf schedule list"):
        wf("schedule pause")
    with pytest.raises(UsageError, match="unknown schedule 'nope' \\(schedules: none\\)"):
        wf("schedule trigger nope")
    with pytest.raises(UsageError, match="invalid choice"):
        wf("schedule explode weekday")


def test_a_housekeeper_that_dies_after_claiming_a_tick_delays_it_only_by_its_claim(
    engine: Engine, other: Engine
) -> None:
    from nbflow.schedules import CLAIM_SECONDS

    engine.register(Nightly)
    sched = engine.schedule("Nightly", "* * * * *", name="claimed")
    tick = _next_tick(sched)
    b = engine.backend
    # what fire_due's first script does, and then the process is gone
    claimed = b.scripts.schedule_due(args=[b.prefix, f"{tick:.6f}", "dead-1", tick + 5, 10])
    assert [x.decode() for x in claimed[1]][:1] == ["claimed"]
    fire_due(other.backend, now=tick + 1)
    assert _ids(engine) == set()
    fire_due(other.backend, now=tick + CLAIM_SECONDS + 0.1)
    assert _ids(engine) == {tick_instance_id("claimed", tick)}
    assert sched.info()["fired"] == 1
