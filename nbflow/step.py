"""The step protocol: ``step.do``, ``step.sleep``, ``step.sleep_until`` and
``step.wait_for_event``, and how each replays from stored results.

A run of an instance calls ``run(event, step)`` from the top every time it is
advanced.  Each step has a key, ``"name#count"`` (the count-th call with that
name), and an entry in the instance's ``steps`` hash (see ``nbflow.store``):

* a final entry (``complete`` / ``errored``) answers at once: the stored result
  is returned, or the stored error is raised again;
* a pending entry (``waiting`` / ``retrying`` / ``running``) says where an earlier
  run stopped: a sleep's deadline, an event wait's timeout, the time of the
  next retry, or an attempt cut short by a dead worker;
* no entry: the step runs now.

When a step cannot finish now (a sleep, an event not yet sent, a long retry
wait) it raises ``Suspend``; the runner then parks the instance in Redis and
the worker moves on.  Steps call their run (any ``StepRun``; ``nbflow.runner.Run``
is the one) for every Redis write: this module decides *what* to record, the run
*how*, and ``nbflow.callbacks`` how a callback is called.

The protocol is written once, as ``async`` code.  ``WorkflowStep`` (for ``async def
run``) hands out its coroutines; ``SyncWorkflowStep`` (for plain ``def run``) drives
them to their end at once (``callbacks.run_blocking``): in a blocking run everything
they await completes without suspending (sleeps block, calls wait for their reply).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from concurrent.futures import Future
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar, overload

from nbflow import callbacks, capture, codec, errors, fingerprint, records
from nbflow.compose import ComposeRun, ComposeSteps, rollback_config
from nbflow.definition import StepContext
from nbflow.durations import parse_duration, retry_delay, to_epoch
from nbflow.errors import FatalRunError, Suspend, error_dict, rebuild_error
from nbflow.validate import StepConfig, check_event_type, check_step_name, resolve_step_config

if TYPE_CHECKING:
    from nbflow.artifacts import ArtifactStore

log = logging.getLogger("nbflow")

T = TypeVar("T")

#: Whether the running code is a step callback of an async run (its task's context):
#: steps it calls are nested steps, which take no position in the run's sequence.
_in_callback: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "nbflow_in_callback", default=False
)

#: Retry waits up to this long are slept inline; longer ones park the instance
#: in Redis (status ``waiting``) so the worker is free meanwhile.
INLINE_WAIT_MAX = 1.0


class StepRun(ComposeRun, Protocol):
    """What the step protocol needs of the run it belongs to (``nbflow.runner.Run``);
    ``ComposeRun`` adds what child workflows need (``nbflow.compose``)."""

    iid: str
    workflow_name: str
    created_ts: float
    max_step_bytes: int
    #: where results larger than its threshold go, and are read back from
    artifacts: ArtifactStore
    #: id(value) -> (value, reference JSON) for the values this run got from artifacts,
    #: so ``run`` returning one of them stores the same reference, not a second copy
    artifact_values: dict[int, tuple[Any, str]]
    #: plain ``def run``: everything the protocol awaits must complete at once
    blocking: bool
    counts: dict[str, int]
    cache: dict[str, dict[str, Any]]
    #: callbacks started whose outcome is not recorded yet
    callbacks_running: int
    #: step calls made so far by this run (the next call's position)
    calls: int
    #: recorded position -> (step key, kind), built on a replay's first check
    positions: dict[int, tuple[str, str]] | None
    #: the workflow class the run runs (its callbacks are named relative to it)
    cls: type | None
    #: where what the callbacks print or log goes (``nbflow.capture``)
    log: capture.RunLog

    def next_index(self) -> int: ...

    async def start_step(self, key: str, name: str, entry: str, attempt: int) -> None: ...

    def record(self, key: str, entry: str, *, final: bool, event: str, attempt: int) -> None: ...

    def request_wait(
        self, key: str, entry: str, wake_at: float, event_type: str | None = None
    ) -> NoReturn: ...

    async def take_event(
        self, key: str, event_type: str, index: int, t0: float, pos: int | None
    ) -> dict[str, Any] | None: ...

    def parallel(self) -> bool: ...

    def note_fingerprint(self, key: str, fingerprint: str) -> None: ...

    def note_callback_error(self, exc: BaseException) -> None: ...

    def steps_in_flight(self) -> tuple[int, int]: ...

    def step_begins(self) -> None: ...

    def step_done(self) -> None: ...

    def report_progress(self, key: str, fraction: float | None, message: str | None) -> None: ...


class _Overran(Exception):
    """A callback ran over its timeout (converted to ``StepTimeoutError`` for the step)."""


def _now() -> float:
    return time.time()


def _seconds(value: float) -> str:
    return f"{value:g} second" + ("" if value == 1 else "s")


class _Step:
    """One call of a step method: its key, order, position, cached entry and config.

    ``pos`` is the call's position in the run's sequence of step calls; on a replay
    the call is checked against what was recorded there (``_check_replay``) before
    any stored result is used.  ``kind`` is what its entry records (``do``,
    ``workflow``, or ``rollback`` for a rollback step), ``attempt`` the attempt that
    succeeded (once one has).
    """

    __slots__ = ("name", "count", "key", "entry", "index", "pos", "kind", "attempt")

    def __init__(self, run: StepRun, name: str, kind: str) -> None:
        self.name = check_step_name(name)
        self.count = run.counts.get(name, 0) + 1
        run.counts[name] = self.count
        self.key = records.make_key(name, self.count)
        # a step called from inside another step's callback has no position of its own:
        # a replay that returns the outer step's stored result never calls it
        if run.callbacks_running > 0 if run.blocking else _in_callback.get():
            self.pos: int | None = None
        else:
            self.pos = run.calls
            run.calls += 1
        self.entry: dict[str, Any] | None = run.cache.get(self.key)
        if run.cache:  # a replay (a first run has nothing to compare with)
            _check_replay(run, self, kind)
        self.index = int(self.entry["i"]) if self.entry else run.next_index()
        self.kind = kind
        self.attempt = 0

    @classmethod
    def special(cls, run: StepRun, key: str, kind: str) -> _Step:
        """A step with a key of the engine's own (a rollback: ``rollback:{step key}``),
        outside the name counts and the positions of the workflow's steps (its order
        follows from the recorded ones, so the determinism check has nothing to add)."""
        st = cls.__new__(cls)
        st.name = st.key = key
        st.count = 1
        st.pos = None
        st.entry = run.cache.get(key)
        st.index = int(st.entry["i"]) if st.entry else run.next_index()
        st.kind = kind
        st.attempt = 0
        return st


#: Results that are never a DataFrame: no artifact check before encoding them.
_SCALARS = frozenset({int, float, str, bool, type(None), list, dict, tuple})


def _describe(key: str, kind: str) -> str:
    name, count = records.split_key(key)
    return f"{kind} step {name!r}" + ("" if count == 1 else f" (call {count})")


def _check_replay(run: StepRun, st: _Step, kind: str) -> None:
    """The determinism check: a replayed run must ask for the recorded steps, in the
    recorded order, with the recorded kinds.  Fails the instance with
    ``NonDeterminismError`` (no stored result is handed to a different step).

    Order is checked only while the run has one branch going: parallel branches
    (``asyncio.gather``) reach their steps in an order that depends on timing, so among
    them only names and kinds count (a step key names one call of one name, so no result
    goes to another step either way).  A step started but never finished (in flight at
    a crash) is recorded at its position and runs again normally.
    """
    e = st.entry
    if e is not None:
        recorded_kind = e.get("k", "do")
        if recorded_kind != kind:
            _nondeterministic(
                st.pos, _describe(st.key, recorded_kind), _describe(st.key, kind), run.iid
            )
        n = e.get("n")
        if n is None or n == st.pos or st.pos is None or run.parallel():
            return
    elif st.pos is None or run.parallel():
        return
    positions = run.positions
    if positions is None:
        positions = run.positions = {
            int(entry["n"]): (key, entry.get("k", "do"))
            for key, entry in run.cache.items()
            if "n" in entry
        }
    there = positions.get(st.pos)
    if there is None:
        if e is None:
            return  # nothing recorded here: a new step after the recorded ones
        _nondeterministic(
            st.pos,
            f"{_describe(st.key, kind)} at position {e['n']}",
            _describe(st.key, kind),
            run.iid,
        )
    if there[0] != st.key:
        _nondeterministic(st.pos, _describe(*there), _describe(st.key, kind), run.iid)


def _nondeterministic(pos: int | None, recorded: str, asked: str, iid: str) -> NoReturn:
    message = (
        f"instance {iid!r} is not deterministic: at step position {pos} the run asked for "
        f"{asked} where {recorded} was recorded; restart it (from that step or earlier) "
        "to run the new code"
    )
    raise FatalRunError("NonDeterminismError", message)


class _StepBase(ComposeSteps):
    """The step protocol, shared by the async and the sync step API.

    Every method a workflow calls is one ``async`` body here; the subclasses differ
    only in ``_deliver``: ``WorkflowStep`` hands the coroutine to the workflow to
    await, ``SyncWorkflowStep`` runs it to its end at once.
    """

    _run: StepRun

    def __init__(self, run: StepRun) -> None:
        self._run = run

    def _deliver(self, coro: Coroutine[Any, Any, Any]) -> Any:
        raise NotImplementedError

    def _new_step(self, name: str, kind: str) -> _Step:
        return _Step(self._run, name, kind)

    def _special_step(self, key: str, kind: str) -> _Step:
        return _Step.special(self._run, key, kind)

    def _e(self, status: str, kind: str, st: _Step, attempts: int, t0: float, **kw: Any) -> str:
        """A step entry of this run (times stored relative to the instance's creation,
        with the step's position in the run)."""
        return records.entry(
            status, kind, st.index, attempts, t0, base=self._run.created_ts, n=st.pos, **kw
        )

    # -- step.do: argument forms ------------------------------------------------

    def _do_call(
        self,
        name: Any,
        config_or_callback: Any,
        callback: Any,
        config: Mapping[str, Any] | None,
        rollback: Callable[..., Any] | None = None,
        rollback_cfg: Mapping[str, Any] | None = None,
    ) -> Any:
        """``do`` in every form (see ``WorkflowStep.do``): the step's result (as the
        subclass delivers it), or a decorator."""
        if callable(name) and config_or_callback is None and callback is None:
            return self._decorator(None, config, rollback, rollback_cfg)(name)  # bare @step.do
        name, config, callback = self._parse_do(name, config_or_callback, callback, config)
        if callback is None:
            return self._decorator(name, config, rollback, rollback_cfg)
        if name is None:
            raise TypeError("step.do needs a name: step.do('fetch user', callback)")
        if rollback is None and rollback_cfg is None:  # (every step's path: no extra call)
            return self._deliver(self._do(*self._begin_do(name, config), callback))
        return self._deliver(self._do_step(name, config, callback, rollback, rollback_cfg))

    def _do_step(
        self,
        name: str,
        config: Mapping[str, Any] | None,
        callback: Callable[..., Any],
        rollback: Callable[..., Any] | None,
        rollback_cfg: Mapping[str, Any] | None,
    ) -> Coroutine[Any, Any, Any]:
        """The coroutine of one ``do`` call; with ``rollback=`` the step's rollback is
        registered once it has a result (``nbflow.compose``)."""
        if rollback is None and rollback_cfg is None:
            return self._do(*self._begin_do(name, config), callback)
        rb_cfg = rollback_config(rollback, rollback_cfg)
        assert rollback is not None
        return self._do_with_rollback(*self._begin_do(name, config), callback, rollback, rb_cfg)

    def _decorator(
        self,
        name: str | None,
        config: Mapping[str, Any] | None,
        rollback: Callable[..., Any] | None = None,
        rollback_cfg: Mapping[str, Any] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[[], Any]]:
        def wrap(func: Callable[..., Any]) -> Callable[[], Any]:
            step_name = name if name is not None else func.__name__

            def run_step() -> Any:
                return self._deliver(self._do_step(step_name, config, func, rollback, rollback_cfg))

            run_step.__name__ = getattr(func, "__name__", "step")
            return run_step

        return wrap

    def _parse_do(
        self,
        name: Any,
        config_or_callback: Any,
        callback: Any,
        config: Mapping[str, Any] | None,
    ) -> tuple[str | None, Mapping[str, Any] | None, Callable[..., Any] | None]:
        if callable(config_or_callback):
            if callback is not None:
                raise TypeError("step.do(name, callback) takes one callback, not two")
            return name, config, config_or_callback
        if config_or_callback is not None:
            if not isinstance(config_or_callback, Mapping):
                raise TypeError(
                    "step.do(name, config, callback): config must be a dict like "
                    f"{{'retries': {{...}}, 'timeout': '30 seconds'}}, "
                    f"not {type(config_or_callback).__name__}"
                )
            if config is not None:
                raise TypeError("step.do got config twice (positionally and as config=)")
            config = config_or_callback
        if callback is not None and not callable(callback):
            raise TypeError(f"step.do callback must be callable, not {type(callback).__name__}")
        return name, config, callback

    def _begin_do(self, name: str, config: Mapping[str, Any] | None) -> tuple[_Step, StepConfig]:
        cfg = resolve_step_config(config)
        st = _Step(self._run, name, "do")
        return st, cfg

    # -- step.do: one step ---------------------------------------------------------

    async def _do(self, st: _Step, cfg: StepConfig, callback: Callable[..., Any]) -> Any:
        done, value = self._replayed(st)
        if done:
            recorded = st.entry.get("f") if st.entry else None
            if recorded is not None:
                current = fingerprint.step_identity(self._run.cls, callback)[0]
                if current != recorded:  # the step is stale for this run's class
                    self._run.note_fingerprint(st.key, current)
            return value
        attempt, wait = self._first_attempt(st, cfg)
        t0 = float(st.entry["t0"]) if st.entry else _now()
        if wait > 0:
            await self._wait(self._wait_before(st, attempt, wait, t0, None))
        is_async = not self._run.blocking and inspect.iscoroutinefunction(callback)
        while True:
            exc, result = await self._attempt(st, cfg, callback, attempt, t0, is_async)
            if exc is None:
                return result
            try:
                delay = self._failed(st, cfg, exc, attempt, t0)
            finally:
                self._run.callbacks_running -= 1  # its failure is recorded (or parked)
            attempt += 1
            if delay > 0:
                await self._wait(delay)

    async def _wait(self, seconds: float) -> None:
        """Waits inline before a retry (a blocking run has no loop to give it to)."""
        if self._run.blocking:
            time.sleep(seconds)
        else:
            await asyncio.sleep(seconds)

    async def _attempt(
        self,
        st: _Step,
        cfg: StepConfig,
        callback: Callable[..., Any],
        attempt: int,
        t0: float,
        is_async: bool,
    ) -> tuple[BaseException | None, Any]:
        """One attempt: (its error, None), or (None, the stored result).

        The attempt counts as in flight from before its start is sent (so parallel
        branches started in the same turn see each other) until it is over.  Its
        callback counts as running (``StepRun.callbacks_running``) from its start until
        its outcome is recorded; for an error that is the caller's job.
        """
        blocking = self._run.blocking
        if not blocking:  # what steps_in_flight counts is only read by async runs
            self._run.step_begins()
        counted = error_returned = False
        try:
            await self._run.start_step(
                st.key, st.name, self._e("running", st.kind, st, attempt, t0), attempt
            )
            counted = True  # start_step counted the callback as running
            ctx = self._context(callback, st, attempt, cfg)
            try:
                sink = capture.enter(self._run.log, st.key)  # what the callback writes
                try:
                    if blocking:
                        result = self._call_blocking(callback, ctx, cfg)
                    else:
                        inside = _in_callback.set(True)  # (see _Step: nested steps)
                        try:
                            result = await self._call_async(st, callback, ctx, cfg, is_async)
                        finally:
                            _in_callback.reset(inside)
                finally:
                    capture.leave(sink, self._run.log, st.key)
                # inside the attempt: an artifact that cannot be written (a full disk)
                # fails the attempt, and the step's retries apply
                stored = self._encode(st, result, attempt, t0)
            except (Suspend, FatalRunError, asyncio.CancelledError):
                raise
            except (callbacks.Alarm, _Overran):
                error_returned = True
                return self._timeout_error(st, attempt, cfg), None
            except BaseException as caught:
                # a TimeoutError the callback raised itself is its own failure; so is a
                # SystemExit or KeyboardInterrupt it raised (the worker goes on)
                error_returned = True
                self._run.note_callback_error(caught)
                return caught, None
            return None, self._succeed(st, result, stored, attempt, t0, callback)
        finally:
            if counted and not error_returned:  # recorded (or it raised past us)
                self._run.callbacks_running -= 1
            if not blocking:
                self._run.step_done()

    @staticmethod
    def _call_blocking(
        callback: Callable[..., Any], ctx: StepContext | None, cfg: StepConfig
    ) -> Any:
        """Calls a callback of a blocking run: inline under a timer where one can bound
        it, else on the pool, waiting for it at most its timeout."""
        if callbacks.can_inline():
            result = callbacks.call_inline(callback, ctx, cfg.timeout)
            return callbacks.finish_blocking(result) if inspect.isawaitable(result) else result
        future = callbacks.submit(callback, ctx, blocking=True)
        try:
            return future.result(timeout=cfg.timeout)
        except TimeoutError:
            if future.done():
                raise  # the callback's own TimeoutError
            callbacks.abandon(future)
            raise _Overran() from None

    async def _call_async(
        self,
        st: _Step,
        callback: Callable[..., Any],
        ctx: StepContext | None,
        cfg: StepConfig,
        is_async: bool,
    ) -> Any:
        """Calls a callback of an async run: a sync one inline when it may (see
        ``_inline``), else on the pool; an async one (or an awaitable a sync one
        returned) awaited here; all bounded by the step's timeout."""
        if not is_async and self._inline(st):
            began = time.monotonic()
            try:
                result = callbacks.call_inline(callback, ctx, cfg.timeout)
            finally:
                if time.monotonic() - began > callbacks.SLOW_INLINE:
                    callbacks.note_slow(self._run.workflow_name, st.name)
                elif callbacks.counting():
                    callbacks.note_fast(self._run.workflow_name, st.name)
            if not inspect.isawaitable(result):
                return result
            return await _bounded(cfg.timeout, lambda: result)
        if is_async:
            return await _bounded(cfg.timeout, lambda: callbacks.call(callback, ctx))
        pooled = callbacks.submit(callback, ctx, blocking=False)

        async def pooled_result() -> Any:
            result = await asyncio.wrap_future(pooled)
            return (await result) if inspect.isawaitable(result) else result

        return await _bounded(cfg.timeout, pooled_result, pooled)

    def _inline(self, st: _Step) -> bool:
        """Whether a sync callback of an async run runs inline (no thread hand-off,
        which costs more than a trivial step) rather than on the pool.

        Only where a timer can bound it (``can_inline``), and never beside another
        branch of its own run (``asyncio.gather`` keeps its steps parallel).  Beside
        other runs of its job it runs inline too, unless this step was seen to take
        longer than ``SLOW_INLINE``: from then on it goes to the pool so that a
        batch of slow (say, network) steps overlaps instead of queueing.
        """
        if not callbacks.can_inline():
            return False
        own, everyone = self._run.steps_in_flight()
        if own > 1:
            return False
        return everyone <= 1 or not callbacks.seen_slow(self._run.workflow_name, st.name)

    def _replayed(self, st: _Step) -> tuple[bool, Any]:
        """(True, value) when the step's stored entry answers it; raises a stored error."""
        e = st.entry
        if e is None:
            return False, None
        if e["s"] == "complete":
            value = e.get("v")
            if isinstance(value, codec.ArtifactRef):
                value = self._load(st, value)
            return True, value
        if e["s"] == "errored":
            raise rebuild_error(e.get("e") or {})
        return False, None

    def _load(self, st: _Step, ref: codec.ArtifactRef) -> Any:
        """A stored result held in an artifact (the worker's cache, else read and checked);
        a missing or corrupt one raises ``ArtifactError`` here, at the step."""
        value = self._run.artifacts.load(ref, f"step {st.name!r} of instance {self._run.iid!r}")
        self._run.artifact_values[id(value)] = (value, codec.encode(ref))
        return value

    def _first_attempt(self, st: _Step, cfg: StepConfig) -> tuple[int, float]:
        """The attempt to run next and how long to wait before it (pending entries)."""
        e = st.entry
        if e is None:
            return 1, 0.0
        if e["s"] == "retrying":
            return int(e.get("a", 1)) + 1, max(0.0, float(e.get("u", 0)) - _now())
        if e["s"] == "running":
            # An attempt cut short (its worker died): it counts, so a step that
            # kills its worker every time cannot loop for ever.
            attempt = int(e.get("a", 1)) + 1
            if attempt > cfg.retry_limit + 1:
                exc = errors.WorkflowError(
                    f"step {st.name!r} was interrupted {attempt - 1} time(s) (its worker died) "
                    "and has no attempts left"
                )
                self._fail_final(st, exc, attempt - 1, float(e.get("t0", _now())))
                raise exc
            return attempt, 0.0
        return 1, 0.0

    def _wait_before(self, st: _Step, attempt: int, wait: float, t0: float, err: Any) -> float:
        """Parks the instance when a retry wait is long; returns what to sleep inline."""
        if wait > INLINE_WAIT_MAX:
            retry_at = _now() + wait
            self._run.request_wait(
                st.key,
                self._e("retrying", st.kind, st, attempt - 1, t0, u=retry_at, err=err),
                retry_at,
            )
        return wait

    def _encode(
        self, st: _Step, value: Any, attempt: int, t0: float
    ) -> tuple[str, str | None, str | None]:
        """What is stored for a result: its codec JSON, or (over the artifact threshold) a
        reference to the artifact just written, with that artifact's URL and (for a JSON
        artifact) the value's JSON.

        An unstorable value or one over ``max_step_bytes`` / ``max_artifact_bytes`` fails
        the instance at once; an artifact that cannot be written raises ``ArtifactError``
        (a failed attempt).  A step that stores nothing large pays one comparison.
        """
        store = self._run.artifacts
        text: str | None = None
        try:
            if type(value) in _SCALARS or not store.large_frame(value):
                text = codec.encode(value)
                # at most 4 bytes a character: most results are known small unencoded
                limit, threshold = self._run.max_step_bytes, store.threshold
                if 4 * len(text) <= (limit if threshold is None else min(limit, threshold)):
                    return text, None, None
                size = len(text.encode())
                if not store.over_threshold(size):
                    if size > limit:
                        self._fatal(
                            st,
                            attempt,
                            t0,
                            "ValueError",
                            f"step {st.name!r} returned {size} bytes, more than "
                            f"max_step_bytes={limit}; store large data elsewhere and return "
                            "a reference",
                        )
                    return text, None, None
            what = f"step {st.name!r} of instance {self._run.iid!r}"
            ref_json, url, text = store.write(value, self._run.iid, what, text)
        except TypeError as exc:
            message = f"the result of step {st.name!r} cannot be stored: {exc}"
            self._fatal(st, attempt, t0, "TypeError", message)
        except ValueError as exc:  # ArtifactTooLarge
            self._fatal(st, attempt, t0, "ValueError", str(exc))
        return ref_json, url, text

    def _succeed(
        self,
        st: _Step,
        value: Any,
        stored: tuple[str, str | None, str | None],
        attempt: int,
        t0: float,
        callback: Callable[..., Any],
    ) -> Any:
        text, url, value_json = stored
        st.attempt = attempt
        f, q = fingerprint.step_identity(self._run.cls, callback)
        self._run.record(
            st.key,
            self._e(
                "complete", st.kind, st, attempt, t0, t1=_now(), value_json=text, ref=url, f=f, q=q
            ),
            final=True,
            event="step.finished",
            attempt=attempt,
        )
        if url is not None:
            # what a replay would read: a frame as it is (Parquet round trips were checked
            # before writing), anything else decoded as from Redis
            if value_json is not None:
                value = codec.decode(value_json)
            self._run.artifact_values[id(value)] = (value, text)
            return value
        return codec.decode(text) if _needs_roundtrip(value) else value

    def _fatal(self, st: _Step, attempt: int, t0: float, name: str, message: str) -> NoReturn:
        err = {"name": name, "message": message}
        self._run.record(
            st.key,
            self._e("errored", st.kind, st, attempt, t0, t1=_now(), err=err),
            final=True,
            event="step.failed",
            attempt=attempt,
        )
        raise FatalRunError(name, message)

    def _failed(
        self, st: _Step, cfg: StepConfig, exc: BaseException, attempt: int, t0: float
    ) -> float:
        """After a failed attempt: the delay before the next one, or raises the final error."""
        if isinstance(exc, errors.NonRetryableError) or attempt >= cfg.retry_limit + 1:
            self._fail_final(st, exc, attempt, t0)
            raise exc
        # exponential backoff can overflow to inf; no wait is longer than a year
        delay = min(retry_delay(cfg.retry_delay, cfg.backoff, attempt), 366 * 86400.0)
        log.info(
            "instance %s step %r attempt %d failed (%s: %s); retry in %.3gs",
            self._run.iid,
            st.name,
            attempt,
            type(exc).__name__,
            exc,
            delay,
        )
        err = error_dict(exc)
        if delay <= INLINE_WAIT_MAX:
            self._run.record(
                st.key,
                self._e("retrying", st.kind, st, attempt, t0, u=_now() + delay, err=err),
                final=False,
                event="step.retrying",
                attempt=attempt,
            )
        return self._wait_before(st, attempt + 1, delay, t0, err)

    def _fail_final(self, st: _Step, exc: BaseException, attempt: int, t0: float) -> None:
        log.warning(
            "instance %s step %r failed after %d attempt(s): %s: %s",
            self._run.iid,
            st.name,
            attempt,
            type(exc).__name__,
            exc,
        )
        self._run.record(
            st.key,
            self._e("errored", st.kind, st, attempt, t0, t1=_now(), err=error_dict(exc)),
            final=True,
            event="step.failed",
            attempt=attempt,
        )

    def _context(
        self, callback: Callable[..., Any], st: _Step, attempt: int, cfg: StepConfig
    ) -> StepContext | None:
        if not callbacks.wants_context(callback):
            return None
        return StepContext(
            name=st.name,
            count=st.count,
            attempt=attempt,
            config=cfg.as_dict(),
            _run=self._run,
            _key=st.key,
        )

    def _timeout_error(self, st: _Step, attempt: int, cfg: StepConfig) -> errors.StepTimeoutError:
        return errors.StepTimeoutError(
            f"step {st.name!r} attempt {attempt} ran over its timeout of {_seconds(cfg.timeout)}"
        )

    # -- sleeps -------------------------------------------------------------------

    def _sleep_until_epoch(self, name: str, deadline: float | None, duration: float) -> None:
        """Records and (unless due) parks a sleep; the first run fixes its deadline."""
        st = _Step(self._run, name, "sleep")
        e = st.entry
        if e is not None and e["s"] == "complete":
            return
        now = _now()
        if e is not None and "u" in e:
            until, t0 = float(e["u"]), float(e["t0"])
        else:
            until, t0 = (deadline if deadline is not None else now + duration), now
        if now >= until:
            self._run.record(
                st.key,
                self._e("complete", "sleep", st, 1, t0, t1=now, u=until, value_json="null"),
                final=True,
                event="slept",
                attempt=1,
            )
            return
        self._run.request_wait(st.key, self._e("waiting", "sleep", st, 1, t0, u=until), until)

    # -- events ------------------------------------------------------------------

    async def _wait_for_event(self, name: str, event_type: str, timeout: Any) -> dict[str, Any]:
        """Replays a wait, takes a buffered event, times out, or parks the run."""
        check_event_type(event_type)
        seconds = parse_duration(timeout)
        st = _Step(self._run, name, "event")
        e = st.entry
        what = f"the event of step {st.name!r} of instance {self._run.iid!r}"
        if e is not None and e["s"] == "complete":
            replayed: dict[str, Any] = self._run.artifacts.resolve(e.get("v"), what)
            return replayed
        if e is not None and e["s"] == "errored":
            raise rebuild_error(e.get("e") or {})
        if e is not None and "u" in e:
            deadline, t0 = float(e["u"]), float(e["t0"])
        else:
            t0 = _now()
            deadline = t0 + seconds
        got = await self._run.take_event(st.key, event_type, st.index, t0, st.pos)
        if got is not None:
            taken: dict[str, Any] = self._run.artifacts.resolve(got.get("v"), what)
            return taken
        now = _now()
        if now < deadline:
            self._run.request_wait(
                st.key,
                self._e("waiting", "event", st, 1, t0, u=deadline, ty=event_type),
                deadline,
                event_type=event_type,
            )
        exc = errors.EventTimeoutError(
            f"no {event_type!r} event arrived for step {st.name!r} within {_seconds(seconds)}"
        )
        self._run.record(
            st.key,
            self._e(
                "errored",
                "event",
                st,
                1,
                t0,
                t1=now,
                u=deadline,
                ty=event_type,
                err=error_dict(exc),
            ),
            final=True,
            event="event.timeout",
            attempt=1,
        )
        raise exc


async def _bounded(
    timeout: float, make: Callable[[], Awaitable[Any]], pooled: Future[Any] | None = None
) -> Any:
    """Awaits what ``make`` gives, at most ``timeout`` seconds (``_Overran`` past that;
    a pooled thread still running then is given up, see ``callbacks.abandon``)."""
    limit = asyncio.timeout(timeout)
    try:
        async with limit:
            return await make()
    except TimeoutError:
        if not limit.expired():
            raise  # the callback's own TimeoutError
        if pooled is not None:
            callbacks.abandon(pooled)
        raise _Overran() from None


def _needs_roundtrip(value: Any) -> bool:
    """Whether a fresh result differs from its replayed form (tuples come back as lists).

    Returning the decoded form on the first run too means a workflow sees the same
    value whether a step ran now or replayed, so it cannot depend on the difference.
    """
    return not isinstance(value, (str, int, float, bool, type(None)))


class WorkflowStep(_StepBase):
    """The ``step`` an ``async def run(self, event, step)`` receives.

    Every method returns an awaitable, so ``asyncio.gather`` can run steps side
    by side.  Each completed step's result is stored in Redis and returned on
    every later replay without running the step again.
    """

    def _deliver(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return coro

    @overload
    def do(
        self,
        name: str,
        config_or_callback: Callable[..., Awaitable[T]] | Callable[..., T],
        callback: None = None,
        *,
        config: Mapping[str, Any] | None = None,
        rollback: Callable[..., Any] | None = None,
        rollback_config: Mapping[str, Any] | None = None,
    ) -> Awaitable[T]: ...

    @overload
    def do(
        self,
        name: str,
        config_or_callback: Mapping[str, Any],
        callback: Callable[..., Awaitable[T]] | Callable[..., T],
        *,
        config: None = None,
        rollback: Callable[..., Any] | None = None,
        rollback_config: Mapping[str, Any] | None = None,
    ) -> Awaitable[T]: ...

    @overload
    def do(
        self,
        name: str | None = None,
        config_or_callback: Mapping[str, Any] | None = None,
        callback: None = None,
        *,
        config: Mapping[str, Any] | None = None,
        rollback: Callable[..., Any] | None = None,
        rollback_config: Mapping[str, Any] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[[], Awaitable[Any]]]: ...

    def do(
        self,
        name: Any = None,
        config_or_callback: Any = None,
        callback: Any = None,
        *,
        config: Mapping[str, Any] | None = None,
        rollback: Callable[..., Any] | None = None,
        rollback_config: Mapping[str, Any] | None = None,
    ) -> Any:
        """Run ``callback`` as a durable step named ``name`` (or decorate a function).

        Forms: ``do(name, callback)``, ``do(name, config, callback)``,
        ``do(name, callback, config=...)``, and ``@step.do(name=None, *, config=None)``
        (calling the decorated function runs the step).  The callback may be sync
        or async and may take one argument, a ``StepContext``.  Retries, backoff
        and the per-attempt timeout follow ``config`` merged over the defaults.

        ``rollback``: called with a ``RollbackContext`` if the instance fails after
        this step completed (saga rollbacks, newest step first, each a durable step
        of its own with retries and timeout from ``rollback_config``).
        """
        return self._do_call(name, config_or_callback, callback, config, rollback, rollback_config)

    async def sleep(self, name: str, duration: str | float | timedelta) -> None:
        """Sleep durably: the instance waits in Redis (status ``waiting``), no worker is held.

        On replay a finished sleep returns at once and an unfinished one waits only
        for what is left of its original deadline.
        """
        self._sleep_until_epoch(name, None, parse_duration(duration))

    async def sleep_until(self, name: str, when: datetime | float) -> None:
        """Sleep until an aware datetime or epoch seconds; a moment past returns at once."""
        self._sleep_until_epoch(name, to_epoch(when), 0.0)

    async def wait_for_event(
        self, name: str, type: str, timeout: str | float | timedelta = "24 hours"
    ) -> dict[str, Any]:
        """Wait for an event of ``type`` sent with ``instance.send_event``.

        Returns ``{"type", "payload", "timestamp"}``; raises ``EventTimeoutError``
        (which ``run`` may catch) if none arrives within ``timeout``.  Events sent
        earlier are buffered and taken first in, first out.
        """
        return await self._wait_for_event(name, type, timeout)

    async def run_workflow(
        self, name: str, workflow: Any, params: Any = None, *, id: str | None = None
    ) -> Any:
        """Run an instance of ``workflow`` (a ``Workflow``, or a registered name or
        class) as a child and return its output.

        The parent waits in Redis (``waiting``) without holding a worker.  A child that
        ends errored raises its error here (same class and message); a terminated one
        raises ``InvalidStateError``.  Recorded as a step (kind ``workflow``): a replay
        returns the stored output and never starts a second child.  ``id`` defaults to
        ``{parent id}-{name}`` (``-n`` for the n-th call with that name).  Fan out
        with ``asyncio.gather`` over several calls.
        """
        return await self._run_workflow(name, workflow, params, id)

    async def map(
        self,
        name: str,
        items: Iterable[Any],
        callback: Callable[[Any], Any],
        *,
        concurrency: int = 8,
        config: Mapping[str, Any] | None = None,
    ) -> list[Any]:
        """Run ``callback(item)`` for every item as its own step (``name#1`` ...
        ``name#n``, each with ``config``), at most ``concurrency`` at once; returns the
        results in input order.  On replay only items without a stored result run."""
        return await self._map(name, items, callback, concurrency, config)


class SyncWorkflowStep(_StepBase):
    """The ``step`` a plain ``def run(self, event, step)`` receives: the same methods as
    ``WorkflowStep``, returning values directly instead of awaitables."""

    def _deliver(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return callbacks.run_blocking(coro)

    @overload
    def do(
        self,
        name: str,
        config_or_callback: Callable[..., T],
        callback: None = None,
        *,
        config: Mapping[str, Any] | None = None,
        rollback: Callable[..., Any] | None = None,
        rollback_config: Mapping[str, Any] | None = None,
    ) -> T: ...

    @overload
    def do(
        self,
        name: str,
        config_or_callback: Mapping[str, Any],
        callback: Callable[..., T],
        *,
        config: None = None,
        rollback: Callable[..., Any] | None = None,
        rollback_config: Mapping[str, Any] | None = None,
    ) -> T: ...

    @overload
    def do(
        self,
        name: str | None = None,
        config_or_callback: Mapping[str, Any] | None = None,
        callback: None = None,
        *,
        config: Mapping[str, Any] | None = None,
        rollback: Callable[..., Any] | None = None,
        rollback_config: Mapping[str, Any] | None = None,
    ) -> Callable[[Callable[..., T]], Callable[[], T]]: ...

    def do(
        self,
        name: Any = None,
        config_or_callback: Any = None,
        callback: Any = None,
        *,
        config: Mapping[str, Any] | None = None,
        rollback: Callable[..., Any] | None = None,
        rollback_config: Mapping[str, Any] | None = None,
    ) -> Any:
        """Run ``callback`` as a durable step (see ``WorkflowStep.do``); returns its value."""
        return self._do_call(name, config_or_callback, callback, config, rollback, rollback_config)

    def sleep(self, name: str, duration: str | float | timedelta) -> None:
        """Sleep durably (see ``WorkflowStep.sleep``)."""
        self._sleep_until_epoch(name, None, parse_duration(duration))

    def sleep_until(self, name: str, when: datetime | float) -> None:
        """Sleep until an aware datetime or epoch seconds (see ``WorkflowStep.sleep_until``)."""
        self._sleep_until_epoch(name, to_epoch(when), 0.0)

    def wait_for_event(
        self, name: str, type: str, timeout: str | float | timedelta = "24 hours"
    ) -> dict[str, Any]:
        """Wait for an event (see ``WorkflowStep.wait_for_event``)."""
        result: dict[str, Any] = self._deliver(self._wait_for_event(name, type, timeout))
        return result

    def run_workflow(
        self, name: str, workflow: Any, params: Any = None, *, id: str | None = None
    ) -> Any:
        """Run a child workflow and return its output (see ``WorkflowStep.run_workflow``)."""
        return self._deliver(self._run_workflow(name, workflow, params, id))

    def map(
        self,
        name: str,
        items: Iterable[Any],
        callback: Callable[[Any], Any],
        *,
        concurrency: int = 8,
        config: Mapping[str, Any] | None = None,
    ) -> list[Any]:
        """Run ``callback(item)`` per item as its own step (see ``WorkflowStep.map``).

        A plain ``def run`` has no loop to overlap items on: they run one after another
        (``concurrency`` is checked but changes nothing); use ``async def run`` to run
        them side by side."""
        result: list[Any] = self._deliver(self._map(name, items, callback, concurrency, config))
        return result


__all__ = ["WorkflowStep", "SyncWorkflowStep", "StepRun"]
