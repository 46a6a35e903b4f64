"""Bad input (spec 2.1-2.5, 3.2-3.4): the public API fuzzed with hypothesis (ids, params, step
names, step configs, durations, event types, payloads, oversized values, wrong types), Redis
state corrupted by hand, and workflow code that misbehaves.

Every case must end in the spec's error (``ValueError`` / ``TypeError`` / the nbflow error
named by the spec) at the call, or in a clear ``errored`` instance -- never a worker crash, a
hang, or half-written state.  Workers here are in-process (``run_worker(burst=True)``), except
where a test checks that a worker *process* survives.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers_procs import SLOW, Procs, load_module, poll, write_module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbflow import (
    Engine,
    InstanceExistsError,
    InstanceNotFoundError,
    WorkflowEntrypoint,
    WorkflowError,
)

FINAL = ("complete", "errored", "terminated")
FUZZ = settings(
    max_examples=400 if SLOW else 40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=not SLOW,
    database=None,
)

# -- oracles: the spec's rules, written independently of nbflow.validate -------------------------

ID_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9_-]*")


def valid_id(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 100 and bool(ID_RE.fullmatch(value))


def valid_step_name(value: Any) -> bool:
    import unicodedata

    return (
        isinstance(value, str)
        and 1 <= len(value) <= 256
        and not any(unicodedata.category(c) == "Cc" for c in value)
    )


UNITS = {
    "millisecond": 0.001,
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "week": 604800,
    "month": 30 * 86400,
    "year": 365 * 86400,
}


def duration_seconds(value: Any) -> float | None:
    """Seconds for a duration the spec (2.3) accepts, None for one it refuses; raises
    LookupError for strings outside the spec's grammar (nbflow may accept more)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) and value >= 0 else None
    if isinstance(value, timedelta):
        return value.total_seconds() if value >= timedelta(0) else None
    if isinstance(value, str):
        m = re.fullmatch(r"(\d+(?:\.\d+)?) ([a-z]+?)s?", value)
        if m and m.group(2) in UNITS:
            return float(m.group(1)) * UNITS[m.group(2)]
        raise LookupError(value)
    return None


# -- strategies -----------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
storable = st.recursive(
    json_scalars | st.binary(max_size=20) | st.datetimes(timezones=st.just(UTC)),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
unstorable = st.sampled_from([object(), {1, 2}, 1 + 2j, lambda: 1, threading.Lock(), ...])
ids = st.one_of(
    st.none(),
    st.from_regex(ID_RE, fullmatch=True),
    st.text(max_size=120),
    st.text(alphabet="ab-_:*? \n/", max_size=8),
    st.integers(),
    st.binary(max_size=5),
    st.lists(st.text(max_size=3), max_size=2),
)
step_names = st.one_of(
    st.text(min_size=0, max_size=300),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=250, max_size=260),
    st.sampled_from(["a#1", "#", "a:b", "x" * 256, "x" * 257, "\x00", "tab\there", " "]),
    st.integers(),
    st.none(),
)
good_durations = st.one_of(
    st.integers(0, 10**6),
    st.floats(0, 1e6),
    st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=30)),
    st.builds(
        lambda n, u, s: f"{n} {u}{s}",
        st.integers(0, 1000),
        st.sampled_from(sorted(UNITS)),
        st.sampled_from(["", "s"]),
    ),
)
any_durations = st.one_of(
    good_durations,
    st.integers(-(10**6), -1),
    st.floats(),
    st.timedeltas(max_value=timedelta(seconds=-1)),
    st.text(max_size=15),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
event_types = st.one_of(
    st.from_regex(ID_RE, fullmatch=True), st.text(max_size=110), st.integers(), st.none()
)


def configs() -> st.SearchStrategy[Any]:
    retries = st.dictionaries(
        st.sampled_from(["limit", "delay", "backoff", "limt", "retries"]),
        st.one_of(
            st.integers(-3, 5),
            st.booleans(),
            st.floats(-1, 5),
            any_durations,
            st.sampled_from(["constant", "linear", "exponential", "Linear", "fibonacci"]),
        ),
        max_size=3,
    )
    top = st.dictionaries(
        st.sampled_from(["retries", "timeout", "retry", "Timeout"]),
        st.one_of(retries, any_durations, st.integers(-1, 3)),
        max_size=2,
    )
    return st.one_of(st.none(), top, st.integers(), st.text(max_size=5), st.lists(st.none()))


def valid_config(cfg: Any) -> bool:
    if cfg is None:
        return True
    if not isinstance(cfg, dict) or set(cfg) - {"retries", "timeout"}:
        return False
    if "timeout" in cfg:
        t = duration_seconds(cfg["timeout"])
        if t is None or t <= 0:
            return False
    r = cfg.get("retries", {})
    if not isinstance(r, dict) or set(r) - {"limit", "delay", "backoff"}:
        return False
    if "limit" in r and (
        isinstance(r["limit"], bool) or not isinstance(r["limit"], int) or r["limit"] < 0
    ):
        return False
    if "delay" in r and duration_seconds(r["delay"]) is None:
        return False
    return "backoff" not in r or r["backoff"] in ("constant", "linear", "exponential")


def same(a: Any, b: Any) -> bool:
    """Equality after a storage round trip (tuples come back as lists)."""
    if isinstance(a, tuple):
        a = list(a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# -- workflows ------------------------------------------------------------------------------------

PROBE: dict[str, Callable[..., Any]] = {}


class Echo(WorkflowEntrypoint):
    async def run(self, event, step):
        return await step.do("echo", lambda: event.payload)


class Probe(WorkflowEntrypoint):
    """Runs whatever the test put in PROBE["run"] (an async function of step)."""

    async def run(self, event, step):
        return await PROBE["run"](step)


class Waits(WorkflowEntrypoint):
    async def run(self, event, step):
        a = await step.do("a", lambda: "a")
        got = await step.wait_for_event("w", "go", timeout="1 hour")
        b = await step.do("b", lambda: "b")
        return [a, got["payload"], b]


def burst(engine: Engine) -> None:
    """Runs what is due in this thread; a worker must never raise."""
    engine.run_worker(burst=True)


@pytest.fixture
def probe(engine: Engine) -> Iterator[Any]:
    flow = engine.register(Probe)
    yield flow
    PROBE.clear()


def run_probe(engine: Engine, flow: Any, fn: Callable[..., Any]) -> dict[str, Any]:
    PROBE["run"] = fn
    inst = flow.create()
    burst(engine)
    return dict(inst.status(), id=inst.id)


def assert_spec_error(status: dict[str, Any], *names: str) -> None:
    assert status["status"] == "errored", status
    assert status["error"]["name"] in names, status
    assert status["error"]["message"], status


# -- ids and params ------------------------------------------------------------------------------


@FUZZ
@given(iid=ids, params=st.one_of(storable, unstorable, st.tuples(st.integers(), st.text())))
def test_create_fuzzed_ids_and_params(engine: Engine, iid: Any, params: Any) -> None:
    flow = engine.register(Echo)
    storable_params = (
        not any(isinstance(params, type(x)) for x in ({1}, 1j, threading.Lock(), ...))
        and not callable(params)
        and type(params) is not object
    )
    try:
        inst = flow.create(id=iid, params=params)
    except InstanceExistsError:
        assert valid_id(iid)
        return
    except ValueError as exc:
        assert iid is not None and not valid_id(iid), exc
        return
    except TypeError as exc:
        assert not storable_params, exc
        return
    assert iid is None or valid_id(iid)
    assert storable_params
    burst(engine)
    status = inst.status()
    assert status["status"] == "complete", status
    assert same(params, status["output"]), (params, status["output"])


def test_params_with_non_finite_floats_round_trip(engine: Engine) -> None:
    inst = engine.register(Echo).create(params=[math.inf, -math.inf, math.nan])
    burst(engine)
    out = inst.status()["output"]
    assert out[:2] == [math.inf, -math.inf] and math.isnan(out[2])


@FUZZ
@given(
    items=st.lists(
        st.one_of(
            st.fixed_dictionaries({}, optional={"id": ids, "params": storable}),
            st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
            st.integers(),
            st.none(),
            st.text(max_size=3),
        ),
        max_size=6,
    )
)
def test_create_batch_fuzzed_items_write_all_or_nothing(engine: Engine, items: list[Any]) -> None:
    flow = engine.register(Echo)
    before = engine.instances(limit=10_000)
    try:
        made = flow.create_batch(items)
    except (ValueError, TypeError):
        after = engine.instances(limit=10_000)
        assert len(after) == len(before), "a refused batch wrote something"
        return
    assert len(made) <= len(items)
    burst(engine)
    for inst in made:
        assert inst.status()["status"] == "complete"


# -- step names, configs, durations, event types (inside a run) ----------------------------------


@FUZZ
@given(name=step_names)
def test_step_do_fuzzed_names(engine: Engine, probe: Any, name: Any) -> None:
    async def fn(step: Any) -> Any:
        return await step.do(name, lambda: "ok")

    status = run_probe(engine, probe, fn)
    if valid_step_name(name):
        assert status["status"] == "complete" and status["output"] == "ok", status
        assert engine.instance(status["id"]).step_output(f"{name}#1") == "ok"
    elif isinstance(name, str):
        assert_spec_error(status, "ValueError")
    else:
        assert_spec_error(status, "ValueError", "TypeError")


@FUZZ
@given(config=configs())
def test_step_do_fuzzed_configs(engine: Engine, probe: Any, config: Any) -> None:
    async def fn(step: Any) -> Any:
        return await step.do("s", config, lambda: "ok")

    status = run_probe(engine, probe, fn)
    try:
        expect_ok = valid_config(config)
    except LookupError:  # a duration string outside the spec's grammar: either outcome
        assert status["status"] == "complete" or status["error"]["name"] in (
            "ValueError",
            "TypeError",
        ), status
        return
    if expect_ok and status["status"] != "complete":
        # a valid but tiny timeout may fail the attempt: then it says so
        assert (
            status.get("error", {}).get("name") in ("StepTimeoutError",)
            or status["status"] == "waiting"
        ), status
        return
    if expect_ok:
        assert status == {"status": "complete", "output": "ok", "id": status["id"]}
    else:
        assert_spec_error(status, "ValueError", "TypeError")


@FUZZ
@given(duration=any_durations)
def test_step_sleep_fuzzed_durations(engine: Engine, probe: Any, duration: Any) -> None:
    async def fn(step: Any) -> Any:
        await step.sleep("nap", duration)
        return "woke"

    t0 = time.time()
    status = run_probe(engine, probe, fn)
    try:
        seconds = duration_seconds(duration)
    except LookupError:
        assert status["status"] in ("complete", "waiting") or status["error"]["name"] == (
            "ValueError"
        ), status
        return
    if seconds is None:
        assert_spec_error(status, "ValueError")
    elif seconds < 1e-3:
        assert status["status"] in ("complete", "waiting"), status
    else:
        assert status["status"] in ("waiting", "complete"), status
        if status["status"] == "waiting":
            due = engine.redis.zscore(engine.keys.timers, status["id"])
            assert due is not None and abs(due - (t0 + seconds)) < 5, (due, t0, seconds)


@FUZZ
@given(etype=event_types, timeout=any_durations)
def test_wait_for_event_fuzzed_types_and_timeouts(
    engine: Engine, probe: Any, etype: Any, timeout: Any
) -> None:
    async def fn(step: Any) -> Any:
        got = await step.wait_for_event("w", etype, timeout=timeout)
        return got["payload"]

    status = run_probe(engine, probe, fn)
    try:
        t = duration_seconds(timeout)
    except LookupError:
        t = -1.0  # outside the grammar: not judged
    if not valid_id(etype) or t is None:
        assert_spec_error(status, "ValueError")
        return
    if t == -1.0:
        return
    if t < 0.05:  # timed out before or at once
        assert status["status"] in ("waiting", "errored"), status
        return
    assert status["status"] == "waiting", status
    engine.instance(status["id"]).send_event(etype, {"n": 1})
    burst(engine)
    assert engine.instance(status["id"]).status() == {"status": "complete", "output": {"n": 1}}


@FUZZ
@given(etype=event_types, payload=st.one_of(storable, unstorable))
def test_send_event_fuzzed_types_and_payloads(engine: Engine, etype: Any, payload: Any) -> None:
    inst = engine.register(Waits).create()
    burst(engine)
    try:
        inst.send_event(etype, payload)
    except ValueError:
        assert not valid_id(etype)
        return
    except TypeError:
        assert valid_id(etype)
        return
    assert valid_id(etype)
    burst(engine)
    status = inst.status()
    if etype == "go":
        assert status["status"] == "complete" and same(payload, status["output"][1]), status
    else:
        assert status == {"status": "waiting"}
        assert engine.redis.llen(f"{engine.prefix}:{inst.id}:events:{etype}") == 1


# -- oversized values ----------------------------------------------------------------------------


def test_oversized_params_result_and_payload_are_refused(redis_url: str, names: Any) -> None:
    prefix, queue = names
    small = Engine(redis_url, prefix=prefix, queue=queue, max_step_bytes=2000)
    try:
        flow = small.register(Echo)
        with pytest.raises(ValueError, match="max_step_bytes"):
            flow.create(params="x" * 3000)
        assert small.instances().empty
        waits = small.register(Waits).create()
        burst(small)
        with pytest.raises(ValueError, match="max_step_bytes"):
            waits.send_event("go", "x" * 3000)
        assert waits.status() == {"status": "waiting"}

        class Big(WorkflowEntrypoint):
            async def run(self, event, step):
                return await step.do("big", lambda: "y" * 5000)

        inst = small.register(Big).create()
        burst(small)
        status = inst.status()
        assert_spec_error(status, "ValueError")
        assert (
            "big" in status["error"]["message"] and "max_step_bytes" in status["error"]["message"]
        )
        assert inst.steps()["attempts"].tolist() == [1], "no retries for an oversized result"
    finally:
        from conftest import cleanup_prefix

        cleanup_prefix(small.redis, prefix, queue)


def test_run_output_over_max_step_bytes_is_stored_anyway(redis_url: str, names: Any) -> None:
    """Observed: the limit applies to step results, params and event payloads; what ``run``
    itself returns is stored whatever its size (spec 2.1 is about step results)."""
    prefix, queue = names
    small = Engine(redis_url, prefix=prefix, queue=queue, max_step_bytes=2000)
    try:

        class BigOut(WorkflowEntrypoint):
            async def run(self, event, step):
                return "z" * 5000

        inst = small.register(BigOut).create()
        burst(small)
        assert inst.status() == {"status": "complete", "output": "z" * 5000}
    finally:
        from conftest import cleanup_prefix

        cleanup_prefix(small.redis, prefix, queue)


def test_a_17_mib_step_result_errors_the_instance_at_the_default_limit_without_artifacts(
    redis_url: str, names: Any
) -> None:
    """With artifacts off (``artifact_threshold=None``); with them on (the default) such a
    result is stored as an artifact instead (spec 11, tests/test_artifacts.py)."""

    class Huge(WorkflowEntrypoint):
        async def run(self, event, step):
            return await step.do("huge", lambda: b"\0" * (17 * 1024 * 1024))

    prefix, queue = names
    engine = Engine(redis_url, prefix=prefix, queue=queue, artifact_threshold=None)
    try:
        inst = engine.register(Huge).create()
        burst(engine)
        assert_spec_error(inst.status(), "ValueError")
    finally:
        from conftest import cleanup_prefix

        cleanup_prefix(engine.redis, prefix, queue)


# -- wrong types and bad values at the API -------------------------------------------------------

BAD_CALLS: list[tuple[str, Callable[[Engine, Any], Any]]] = [
    ("create id int", lambda e, i: e.workflow("Waits").create(id=5)),
    ("create id bytes", lambda e, i: e.workflow("Waits").create(id=b"x")),
    ("create params object", lambda e, i: e.workflow("Waits").create(params=object())),
    ("create params set", lambda e, i: e.workflow("Waits").create(params={1})),
    ("create_batch str", lambda e, i: e.workflow("Waits").create_batch("ab")),
    ("create_batch bad key", lambda e, i: e.workflow("Waits").create_batch([{"idd": "x"}])),
    ("create_batch dup", lambda e, i: e.workflow("Waits").create_batch([{"id": "d"}] * 2)),
    ("create_batch None", lambda e, i: e.workflow("Waits").create_batch(None)),
    ("get int", lambda e, i: e.workflow("Waits").get(7)),
    ("get bad id", lambda e, i: e.workflow("Waits").get("a b")),
    ("instance None", lambda e, i: e.instance(None)),
    ("restart from int", lambda e, i: i.restart(from_step=3)),
    ("restart from empty", lambda e, i: i.restart(from_step="")),
    ("restart from control char", lambda e, i: i.restart(from_step="a\x00")),
    ("restart from missing", lambda e, i: i.restart(from_step="nope")),
    ("send type int", lambda e, i: i.send_event(5)),
    ("send type long", lambda e, i: i.send_event("x" * 101)),
    ("send payload object", lambda e, i: i.send_event("go", object())),
    ("step_output int", lambda e, i: i.step_output(3)),
    ("step_output missing", lambda e, i: i.step_output("nope")),
    ("wait timeout str", lambda e, i: i.wait(timeout="soon")),
    ("wait timeout negative", lambda e, i: i.wait(timeout=-1)),
    ("instances bad status", lambda e, i: e.instances(status="done")),
    ("instances limit -1", lambda e, i: e.instances(limit=-1)),
    ("instances limit str", lambda e, i: e.instances(limit="5")),
    ("register non-class", lambda e, i: e.register(object())),
    ("register bad name", lambda e, i: e.register(Echo, name="a b")),
    ("workflow unknown", lambda e, i: e.workflow("Nope")),
    ("engine empty prefix", lambda e, i: Engine(e.redis, prefix="")),
    ("engine prefix space", lambda e, i: Engine(e.redis, prefix="a b")),
    ("engine max_step_bytes 0", lambda e, i: Engine(e.redis, max_step_bytes=0)),
    ("engine max_step_bytes float", lambda e, i: Engine(e.redis, max_step_bytes=1.5)),
    ("engine retention bad", lambda e, i: Engine(e.redis, retention="soon")),
    ("engine redis int", lambda e, i: Engine(5)),
    ("engine bad url", lambda e, i: Engine("http://nope")),
]


@pytest.mark.parametrize(("what", "call"), BAD_CALLS, ids=[w for w, _ in BAD_CALLS])
def test_bad_call_raises_the_specs_error_and_writes_nothing(
    engine: Engine, what: str, call: Callable[[Engine, Any], Any]
) -> None:
    engine.register(Waits)
    inst = engine.workflow("Waits").create(id="the-one")
    burst(engine)
    before = (inst.status(), engine.instances()["id"].tolist())
    with pytest.raises(Exception) as info:
        call(engine, inst)
    allowed = (ValueError, TypeError, LookupError, WorkflowError, TimeoutError)
    assert isinstance(info.value, allowed), f"{what}: {type(info.value).__name__}: {info.value}"
    assert str(info.value), what
    assert (inst.status(), engine.instances()["id"].tolist()) == before, what


# -- Redis state corrupted or missing, written by hand --------------------------------------------


def _corrupt_cases(engine: Engine, iid: str) -> dict[str, Callable[[], None]]:
    r, k = engine.redis, engine.keys
    return {
        "step entry not JSON": lambda: r.hset(k.steps(iid), "a#1", "garbage{"),
        "step entry JSON without fields": lambda: r.hset(k.steps(iid), "a#1", '{"x":1}'),
        "step entry unknown status": lambda: r.hset(k.steps(iid), "a#1", '{"s":"weird","i":0}'),
        "step key without count": lambda: r.hset(k.steps(iid), "zzz", r.hget(k.steps(iid), "a#1")),
        "payload not JSON": lambda: r.hset(k.metadata(iid), "payload", "{nope"),
        "workflowName missing": lambda: r.hdel(k.metadata(iid), "workflowName"),
        "metadata deleted": lambda: r.delete(k.metadata(iid)),
        "createdAt garbage": lambda: r.hset(k.state(iid), "createdAt", "yesterday"),
        "steps hash wrong type": lambda: (r.delete(k.steps(iid)), r.set(k.steps(iid), "x")),
        "event buffer not JSON": lambda: r.rpush(f"{engine.prefix}:{iid}:events:go", "nope{"),
        "history entry garbage": lambda: r.rpush(k.history(iid), "nope{"),
    }


# Was BUG 4 (the first four: the claimed state was decoded outside any handler, so the
# instance was reaped and claimed again every 30 s for ever) and BUG 5 (a wrong-typed steps key
# made the claim script fail half-way, after it had set running and taken a lease).
CORRUPTIONS = [
    "step entry not JSON",
    "step entry JSON without fields",
    "step entry unknown status",
    "step key without count",
    "payload not JSON",
    "workflowName missing",
    "metadata deleted",
    "createdAt garbage",
    "steps hash wrong type",
    "event buffer not JSON",
    "history entry garbage",
]


def _settle(engine: Engine, iid: str, rounds: int = 3) -> str:
    """Runs the worker, then (stand-in for the 30 s lease) expires leases and sweeps, a few
    times over; returns the status the instance settles in."""
    from nbflow.worker import Housekeeper

    for _ in range(rounds):
        burst(engine)
        if engine.redis.zscore(engine.keys.leases, iid) is not None:
            engine.redis.zadd(engine.keys.leases, {iid: 0})
            Housekeeper(engine.backend, threading.Event()).sweep(0)
    raw = engine.redis.hget(engine.keys.state(iid), "status")
    return raw.decode() if raw else "unknown"


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corrupt_state_ends_in_a_clear_error_never_a_crash_or_a_stuck_instance(
    engine: Engine, case: str
) -> None:
    inst = engine.register(Waits).create()
    burst(engine)
    assert inst.status() == {"status": "waiting"}
    _corrupt_cases(engine, inst.id)[case]()
    try:
        inst.send_event("go", "p")
    except (ValueError, TypeError, LookupError) as exc:  # refused at the call: fine
        assert str(exc)
    status = _settle(engine, inst.id)
    assert status in ("errored", "complete", "unknown"), f"{case}: left {status}"
    r, k = engine.redis, engine.keys
    # nothing half-written: no lease, no timer, not queued without a job
    assert r.zscore(k.leases, inst.id) is None
    if status == "errored":
        err = inst.status()["error"]
        assert err["name"] and err["message"], err


def test_a_corrupt_instance_does_not_strand_the_healthy_ones_of_its_batch(engine: Engine) -> None:
    """Was BUG 6: one unreadable instance failed the whole job, stranding the healthy ones
    claimed with it until their leases expired."""
    made = engine.register(Echo).create_batch([{"params": i} for i in range(3)])
    engine.redis.hset(engine.keys.metadata(made[1].id), "payload", "{nope")
    burst(engine)
    assert made[0].status() == {"status": "complete", "output": 0}
    assert made[2].status() == {"status": "complete", "output": 2}


# -- workflow code that misbehaves --------------------------------------------------------------


def test_non_deterministic_step_order_on_replay_replays_by_name(engine: Engine) -> None:
    """Steps are cached by name and occurrence, not position: a run that calls its steps in
    another order on replay gets each stored result back by name, and no step runs twice.
    nbflow does not detect the change of order (neither does Cloudflare)."""
    runs: dict[str, int] = {}
    orders = [["x", "y", "z"], ["z", "x", "y"]]

    class Shuffled(WorkflowEntrypoint):
        async def run(self, event, step):
            order = orders.pop(0) if orders else ["y", "z", "x"]
            out = {}
            for name in order:

                def cb(name: str = name) -> str:
                    runs[name] = runs.get(name, 0) + 1
                    return name.upper()

                out[name] = await step.do(name, cb)
                if name == order[0]:
                    await step.wait_for_event("w", "go")
            return out

    inst = engine.register(Shuffled).create()
    burst(engine)
    inst.send_event("go")
    burst(engine)
    status = inst.status()
    assert status == {"status": "complete", "output": {"x": "X", "y": "Y", "z": "Z"}}
    assert runs == {"x": 1, "y": 1, "z": 1}


def test_non_deterministic_step_names_run_new_steps_on_each_replay(engine: Engine) -> None:
    """Known limit: a step whose name changes between replays (a timestamp, a uuid) is a new
    step each time: it runs again and its old entry stays behind."""
    runs = []

    class Clocky(WorkflowEntrypoint):
        async def run(self, event, step):
            await step.do(f"at {time.monotonic_ns()}", lambda: runs.append(1))
            await step.wait_for_event("w", "go")
            return len(runs)

    inst = engine.register(Clocky).create()
    burst(engine)
    inst.send_event("go")
    burst(engine)
    assert inst.status() == {"status": "complete", "output": 2}
    assert len(inst.steps()) == 3


def test_step_that_never_returns_times_out_and_the_worker_goes_on(engine: Engine) -> None:
    stuck = threading.Event()

    class Hangs(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("hang", {"retries": {"limit": 0}, "timeout": 0.3}, lambda: stuck.wait())

    try:
        inst = engine.register(Hangs).create()
        other = engine.register(Echo).create(params=1)
        t0 = time.monotonic()
        burst(engine)
        assert time.monotonic() - t0 < 5
        assert_spec_error(inst.status(), "StepTimeoutError")
        assert other.status() == {"status": "complete", "output": 1}
    finally:
        stuck.set()


def test_async_step_that_never_returns_times_out(engine: Engine) -> None:
    class AsyncHangs(WorkflowEntrypoint):
        async def run(self, event, step):
            async def forever() -> None:
                await asyncio.sleep(3600)

            return await step.do("hang", {"retries": {"limit": 0}, "timeout": 0.2}, forever)

    inst = engine.register(AsyncHangs).create()
    burst(engine)
    assert_spec_error(inst.status(), "StepTimeoutError")


def test_stuck_steps_do_not_starve_later_steps_of_the_worker(engine: Engine) -> None:
    """Was BUG 7: 64 pooled callbacks stuck past their timeout kept every thread of the shared
    pool, so later pooled sync steps timed out without running."""
    stuck = threading.Event()
    ran = []

    class ManyHang(WorkflowEntrypoint):
        async def run(self, event, step):
            cfg = {"retries": {"limit": 0}, "timeout": 0.3}
            await asyncio.gather(
                *(step.do(f"h{i}", cfg, lambda: stuck.wait()) for i in range(64)),
                return_exceptions=True,
            )
            return "done"

    class Quick(WorkflowEntrypoint):
        async def run(self, event, step):  # two sync steps side by side: both on the pool
            cfg = {"retries": {"limit": 0}, "timeout": 2}
            return await asyncio.gather(
                step.do("q1", cfg, lambda: ran.append(1)), step.do("q2", cfg, lambda: ran.append(2))
            )

    try:
        engine.register(ManyHang).create()
        burst(engine)
        inst = engine.register(Quick).create()
        burst(engine)
        assert inst.status()["status"] == "complete", inst.status()
        assert sorted(ran) == [1, 2]
    finally:
        stuck.set()


def test_async_callback_blocking_the_loop_is_not_interrupted_by_its_timeout(
    engine: Engine,
) -> None:
    """Known limit: an ``async`` callback that blocks (``time.sleep`` instead of
    ``await asyncio.sleep``) holds the worker's event loop; its timeout cannot fire until it
    yields, so it runs to its end (a callback that blocks for ever holds its worker for ever,
    its lease renewed by the heartbeat)."""

    class Blocks(WorkflowEntrypoint):
        async def run(self, event, step):
            async def block() -> str:
                time.sleep(1.0)
                return "late"

            return await step.do("b", {"retries": {"limit": 0}, "timeout": 0.1}, block)

    inst = engine.register(Blocks).create()
    t0 = time.monotonic()
    burst(engine)
    assert time.monotonic() - t0 >= 1.0
    assert inst.status()["status"] in ("complete", "errored")


def test_run_returning_something_unstorable_errors_the_instance(engine: Engine) -> None:
    class Unstorable(WorkflowEntrypoint):
        async def run(self, event, step):
            await step.do("fine", lambda: 1)
            return object()

    inst = engine.register(Unstorable).create()
    burst(engine)
    status = inst.status()
    assert_spec_error(status, "TypeError")
    assert "object" in status["error"]["message"]


def test_step_returning_something_unstorable_errors_at_once_without_retries(
    engine: Engine,
) -> None:
    class BadResult(WorkflowEntrypoint):
        async def run(self, event, step):
            return await step.do("bad", lambda: {1, 2})

    inst = engine.register(BadResult).create()
    burst(engine)
    status = inst.status()
    assert_spec_error(status, "TypeError")
    assert "bad" in status["error"]["message"] and "set" in status["error"]["message"]
    assert inst.steps()["attempts"].tolist() == [1]


def test_run_swallowing_the_suspend_of_a_sleep_still_parks(engine: Engine) -> None:
    class Swallows(WorkflowEntrypoint):
        async def run(self, event, step):
            try:
                await step.sleep("nap", "1 hour")
            except BaseException:  # noqa: B036 - exactly what is being tested
                pass
            return await step.do("after", lambda: "ran")

    inst = engine.register(Swallows).create()
    burst(engine)
    assert inst.status() == {"status": "waiting"}
    assert "after" not in set(inst.steps()["step"])


def test_workflow_constructor_raising_errors_the_instance(engine: Engine) -> None:
    class BadInit(WorkflowEntrypoint):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("no init for you")

        async def run(self, event, step):
            return 1

    inst = engine.register(BadInit).create()
    burst(engine)
    assert_spec_error(inst.status(), "RuntimeError")


BASE_EXC_SOURCE = """
import sys

from nbflow import WorkflowEntrypoint


class Custom(BaseException):
    pass


class RaisesBase(WorkflowEntrypoint):
    async def run(self, event, step):
        kind = event.payload

        def cb():
            if kind == "custom":
                raise Custom("custom base exception")
            if kind == "exit":
                sys.exit(3)
            if kind == "interrupt":
                raise KeyboardInterrupt()
            raise GeneratorExit()

        return await step.do("boom", {"retries": {"limit": 1, "delay": 0.05}}, cb)


class Fine(WorkflowEntrypoint):
    async def run(self, event, step):
        return await step.do("fine", lambda: "fine")
"""


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


@pytest.mark.parametrize(
    "kind",
    [
        "custom",
        "generator-exit",
        "exit",  # was BUG 3: sys.exit() in a callback ended the worker process
        "interrupt",  # was BUG 3 too, for KeyboardInterrupt
    ],
)
def test_callback_raising_base_exception_errors_the_instance_not_the_worker(
    engine: Engine, redis_url: str, procs: Procs, tmp_path: Path, kind: str
) -> None:
    module = write_module(tmp_path, f"nbf_base_{engine.prefix}", BASE_EXC_SOURCE)
    mod = load_module(tmp_path, module)
    engine.register(mod.RaisesBase)
    engine.register(mod.Fine)
    w = procs.worker("w", redis_url, engine.prefix, engine.queue_name, module)
    inst = engine.workflow("RaisesBase").create(params=kind)
    poll(lambda: inst.status()["status"] in FINAL or w.poll() is not None, 5, "an outcome")
    time.sleep(0.3)
    assert w.poll() is None, f"the worker process ended ({w.returncode}):\n{procs.log('w')}"
    status = inst.status()
    assert status["status"] == "errored", status
    assert status["error"]["message"] or status["error"]["name"]
    fine = engine.workflow("Fine").create()
    assert fine.wait(timeout=10) == {"status": "complete", "output": "fine"}


def test_history_and_steps_of_an_instance_with_a_corrupt_entry_raise_clearly(
    engine: Engine,
) -> None:
    inst = engine.register(Waits).create()
    burst(engine)
    engine.redis.hset(engine.keys.steps(inst.id), "a#1", "garbage{")
    for call in (inst.steps, inst.history, lambda: inst.step_output("a")):
        try:
            call()
        except (ValueError, TypeError, LookupError) as exc:
            assert str(exc)


def test_deleted_instance_reports_unknown_and_calls_raise_not_found(engine: Engine) -> None:
    inst = engine.register(Waits).create()
    burst(engine)
    for key in (engine.keys.state(inst.id), engine.keys.metadata(inst.id)):
        engine.redis.delete(key)
    assert inst.status() == {"status": "unknown"}
    for call in (
        inst.pause,
        inst.resume,
        inst.terminate,
        inst.restart,
        lambda: inst.send_event("go"),
    ):
        with pytest.raises(InstanceNotFoundError):
            call()
    burst(engine)
    assert inst.status() == {"status": "unknown"}
