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
the worker moves on.  Steps call the runner (``nbflow.runner.Run``) for every
Redis write; this module decides *what* to record, the runner *how*.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # CPython's C half of signal
import asyncio
import builtins
import importlib
import inspect
import logging
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, overload

from nbflow import codec, errors
from nbflow.definition import StepContext
from nbflow.durations import parse_duration, retry_delay, to_epoch
from nbflow.validate import StepConfig, check_event_type, check_step_name, resolve_step_config

if TYPE_CHECKING:
    from nbflow.runner import Run

log = logging.getLogger("nbflow")

T = TypeVar("T")

#: Retry waits up to this long are slept inline; longer ones park the instance
#: in Redis (status ``waiting``) so the worker is free meanwhile.
INLINE_WAIT_MAX = 1.0

# Sync callbacks run here so their ``timeout`` can be enforced, unless they can run
# inline (see ``can_inline``); a thread that overruns cannot be killed (Python has
# no such thing) and finishes unobserved.
#: A sync callback that ran inline longer than this (seconds) is "slow": later calls
#: of that step beside other runs go to the pool (see ``WorkflowStep._inline``).
SLOW_INLINE = 0.002
_slow_steps: set[tuple[str, str]] = set()  # (workflow name, step name) seen to be slow

_POOL_SIZE = 64
_POOL = ThreadPoolExecutor(max_workers=_POOL_SIZE, thread_name_prefix="nbflow-step")
_abandoned: set[Future[Any]] = set()
_pool_lock = threading.Lock()


def _abandon(future: Future[Any]) -> None:
    """A pooled callback overran its timeout and keeps its thread: once half the
    pool is held so, later steps get a fresh pool (the stuck threads end, or not,
    on their own) instead of waiting behind them."""
    global _POOL
    if future.done():
        return
    with _pool_lock:
        _abandoned.add(future)
        future.add_done_callback(_abandoned.discard)
        if len(_abandoned) >= _POOL_SIZE // 2:
            log.warning(
                "nbflow: %d step callbacks overran their timeouts and still hold threads; "
                "starting a fresh step thread pool",
                len(_abandoned),
            )
            _POOL = ThreadPoolExecutor(max_workers=_POOL_SIZE, thread_name_prefix="nbflow-step")
            _abandoned.clear()


class _Alarm(BaseException):
    """SIGALRM fired inside a callback run inline that overran its timeout (a
    BaseException so the callback's own ``except Exception`` lets it through)."""


_alarm = {"armed": False}


def _on_alarm(signum: int, frame: Any) -> None:
    if _alarm["armed"]:
        _alarm["armed"] = False
        raise _Alarm()


def can_inline() -> bool:
    """Whether a sync callback may run inline, without a thread hand-off (which
    costs more than a trivial step): only where an interval timer can bound it,
    i.e. in the main thread (``nbflow worker``, ``engine.run_worker()``), and not
    inside another inline callback (one timer per process)."""
    return (
        threading.current_thread() is threading.main_thread()
        and not _alarm["armed"]
        and hasattr(signal, "setitimer")
    )


def call_inline(callback: Callable[..., Any], ctx: StepContext | None, timeout: float) -> Any:
    """Runs a sync callback here, interrupted by SIGALRM (``_Alarm``) after ``timeout``.

    A signal interrupts blocking calls too (``time.sleep``, socket reads), so the
    timeout holds as it does on the pool."""
    # the C-level getsignal: signal.getsignal converts to an enum, which costs
    # more than the rest of a trivial step
    if _signal.getsignal(signal.SIGALRM) is not _on_alarm:
        signal.signal(signal.SIGALRM, _on_alarm)
    _alarm["armed"] = True
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return callback(ctx) if ctx is not None else callback()
    finally:
        _alarm["armed"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)


class Suspend(BaseException):
    """Unwinds ``run`` when the instance must stop for now (a BaseException so a
    workflow's ``except Exception`` cannot swallow it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FatalRunError(BaseException):
    """Fails the instance at once (an unstorable result): no retries, no catching."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.error = {"name": name, "message": message}


def error_dict(exc: BaseException) -> dict[str, Any]:
    """The stored form of an error: class name, message, where the class lives, and its
    constructor arguments when they are storable (so it can be raised again as it was)."""
    cls = type(exc)
    err: dict[str, Any] = {"name": cls.__name__, "message": str(exc), "module": cls.__module__}
    try:
        codec.encode(list(exc.args))
        err["args"] = list(exc.args)
    except TypeError:
        pass
    return err


def _error_class(err: Mapping[str, Any]) -> Any:
    name = str(err.get("name", "WorkflowError"))
    module = err.get("module")
    if module:
        mod = sys.modules.get(str(module))
        if mod is None:
            try:
                mod = importlib.import_module(str(module))
            except Exception:
                mod = None
        cls = getattr(mod, name, None) if mod is not None else None
        if cls is not None:
            return cls
    return getattr(errors, name, None) or getattr(builtins, name, None)


def rebuild_error(err: Mapping[str, Any]) -> BaseException:
    """The exception a stored error replays as: the same type and message.

    The class is found again by module and name and rebuilt from its stored
    arguments (``KeyError('k')`` stays ``'k'``, a class taking several arguments
    keeps them); when the class cannot be found (a notebook class after a kernel
    restart) a same-named ``WorkflowError`` subclass stands in.
    """
    name = str(err.get("name", "WorkflowError"))
    message = str(err.get("message", ""))
    args = err.get("args")
    args = tuple(args) if isinstance(args, list) else (message,)
    cls = _error_class(err)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        for attempt_args in (args, (message,)):
            try:
                rebuilt: BaseException = cls(*attempt_args)
                return rebuilt
            except Exception:
                pass
        try:
            bare: BaseException = cls.__new__(cls)
            bare.args = args
            return bare
        except Exception:
            pass
    stand_in: type[BaseException] = type(name, (errors.WorkflowError,), {})
    return stand_in(message)


def wants_context(callback: Callable[..., Any]) -> bool:
    """Whether a callback takes the ``StepContext``: it has a required positional parameter.

    ``lambda i=i: i`` (the usual loop idiom) has none, so it is called with no argument.
    """
    func = getattr(callback, "__func__", callback)
    code = getattr(func, "__code__", None)
    if code is not None:
        bound = 1 if func is not callback else 0
        return bool(code.co_argcount - len(getattr(func, "__defaults__", None) or ()) - bound > 0)
    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        for p in params
    )


def _invoke_blocking(callback: Callable[..., Any], ctx: StepContext | None) -> Any:
    """Runs a callback in a pool thread; an awaitable it returns is run there too."""
    result = callback(ctx) if ctx is not None else callback()
    if inspect.isawaitable(result):
        return asyncio.run(_await(result))
    return result


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw


def _now() -> float:
    return time.time()


def _seconds(value: float) -> str:
    return f"{value:g} second" + ("" if value == 1 else "s")


def split_key(key: str) -> tuple[str, int]:
    """``"name#count"`` -> (name, count); names may contain ``#`` themselves."""
    name, _, count = key.rpartition("#")
    return name, int(count)


class _Step:
    """One call of a step method: its key, order, cached entry and config."""

    __slots__ = ("name", "count", "key", "entry", "index")

    def __init__(self, run: Run, name: str) -> None:
        self.name = check_step_name(name)
        self.count = run.counts.get(name, 0) + 1
        run.counts[name] = self.count
        self.key = f"{name}#{self.count}"
        self.entry: dict[str, Any] | None = run.cache.get(self.key)
        self.index = int(self.entry["i"]) if self.entry else run.next_index()


class _StepBase:
    """Logic shared by the async and the sync step API (see ``WorkflowStep``)."""

    def __init__(self, run: Run) -> None:
        self._run = run

    def _e(self, status: str, kind: str, index: int, attempts: int, t0: float, **kw: Any) -> str:
        """A step entry of this run (times stored relative to the instance's creation)."""
        return _entry(status, kind, index, attempts, t0, base=self._run.created_ts, **kw)

    # -- step.do: argument forms ------------------------------------------------

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

    # -- step.do: one step ---------------------------------------------------------

    def _begin_do(self, name: str, config: Mapping[str, Any] | None) -> tuple[_Step, StepConfig]:
        cfg = resolve_step_config(config)
        st = _Step(self._run, name)
        return st, cfg

    def _replayed(self, st: _Step) -> tuple[bool, Any]:
        """(True, value) when the step's stored entry answers it; raises a stored error."""
        e = st.entry
        if e is None:
            return False, None
        if e["s"] == "complete":
            return True, e.get("v")
        if e["s"] == "errored":
            raise rebuild_error(e.get("e") or {})
        return False, None

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
                self._e("retrying", "do", st.index, attempt - 1, t0, u=retry_at, err=err),
                retry_at,
            )
        return wait

    def _start_attempt(self, st: _Step, attempt: int, t0: float) -> None:
        self._run.start_step(
            st.key, st.name, self._e("running", "do", st.index, attempt, t0), attempt
        )

    async def _astart_attempt(self, st: _Step, attempt: int, t0: float) -> None:
        await self._run.astart_step(
            st.key, st.name, self._e("running", "do", st.index, attempt, t0), attempt
        )

    def _succeed(self, st: _Step, value: Any, attempt: int, t0: float) -> Any:
        try:
            text = codec.encode(value)
        except TypeError as exc:
            self._fatal(st, attempt, t0, "TypeError", f"step {st.name!r} returned {exc}")
        size = len(text.encode())
        limit = self._run.max_step_bytes
        if size > limit:
            self._fatal(
                st,
                attempt,
                t0,
                "ValueError",
                f"step {st.name!r} returned {size} bytes, more than max_step_bytes={limit}; "
                "store large data elsewhere and return a reference",
            )
        self._run.record(
            st.key,
            self._e("complete", "do", st.index, attempt, t0, t1=_now(), value_json=text),
            final=True,
            event="step.finished",
            attempt=attempt,
        )
        return codec.decode(text) if _needs_roundtrip(value) else value

    def _fatal(self, st: _Step, attempt: int, t0: float, name: str, message: str) -> Any:
        err = {"name": name, "message": message}
        self._run.record(
            st.key,
            self._e("errored", "do", st.index, attempt, t0, t1=_now(), err=err),
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
                self._e("retrying", "do", st.index, attempt, t0, u=_now() + delay, err=err),
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
            self._e("errored", "do", st.index, attempt, t0, t1=_now(), err=error_dict(exc)),
            final=True,
            event="step.failed",
            attempt=attempt,
        )

    def _context(
        self, callback: Callable[..., Any], st: _Step, attempt: int, cfg: StepConfig
    ) -> StepContext | None:
        if not wants_context(callback):
            return None
        return StepContext(name=st.name, count=st.count, attempt=attempt, config=cfg.as_dict())

    def _timeout_error(self, st: _Step, attempt: int, cfg: StepConfig) -> errors.StepTimeoutError:
        return errors.StepTimeoutError(
            f"step {st.name!r} attempt {attempt} ran over its timeout of {_seconds(cfg.timeout)}"
        )

    # -- sleeps -------------------------------------------------------------------

    def _sleep_until_epoch(self, name: str, deadline: float | None, duration: float) -> None:
        """Records and (unless due) parks a sleep; the first run fixes its deadline."""
        st = _Step(self._run, name)
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
                self._e("complete", "sleep", st.index, 1, t0, t1=now, u=until, value_json="null"),
                final=True,
                event="slept",
                attempt=1,
            )
            return
        self._run.request_wait(st.key, self._e("waiting", "sleep", st.index, 1, t0, u=until), until)

    # -- events ------------------------------------------------------------------

    def _event_wait_begin(
        self, name: str, event_type: str, timeout: Any
    ) -> tuple[_Step, float, float, float] | tuple[Any]:
        """Validates a wait and fixes its deadline: ``(value,)`` if it replays, else
        ``(step, deadline, t0, seconds)`` for the buffer check."""
        check_event_type(event_type)
        seconds = parse_duration(timeout)
        st = _Step(self._run, name)
        e = st.entry
        if e is not None and e["s"] == "complete":
            return (e.get("v"),)
        if e is not None and e["s"] == "errored":
            raise rebuild_error(e.get("e") or {})
        if e is not None and "u" in e:
            return st, float(e["u"]), float(e["t0"]), seconds
        now = _now()
        return st, now + seconds, now, seconds

    def _event_wait_end(
        self,
        st: _Step,
        event_type: str,
        deadline: float,
        t0: float,
        seconds: float,
        got: dict[str, Any] | None,
    ) -> Any:
        """After the buffer check: the event, a timeout, or park the run."""
        if got is not None:
            return got.get("v")
        now = _now()
        if now >= deadline:
            exc = errors.EventTimeoutError(
                f"no {event_type!r} event arrived for step {st.name!r} within {_seconds(seconds)}"
            )
            self._run.record(
                st.key,
                self._e(
                    "errored",
                    "event",
                    st.index,
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
        self._run.request_wait(
            st.key,
            self._e("waiting", "event", st.index, 1, t0, u=deadline, ty=event_type),
            deadline,
            event_type=event_type,
        )
        raise AssertionError("unreachable")  # request_wait raises Suspend


def _needs_roundtrip(value: Any) -> bool:
    """Whether a fresh result differs from its replayed form (tuples come back as lists).

    Returning the decoded form on the first run too means a workflow sees the same
    value whether a step ran now or replayed, so it cannot depend on the difference.
    """
    return not isinstance(value, (str, int, float, bool, type(None)))


def _entry(
    status: str,
    kind: str,
    index: int,
    attempts: int,
    t0: float,
    *,
    base: float = 0.0,
    t1: float | None = None,
    u: float | None = None,
    ty: str | None = None,
    err: Mapping[str, Any] | None = None,
    value_json: str | None = None,
) -> str:
    """A step entry as compact JSON (see ``nbflow.store``); ``s`` stays first.

    ``t0`` is stored as seconds since ``base`` (the instance's creation): a short
    number keeps small entries small enough for Redis's compact hash encoding.
    """
    parts = [f'{{"s":"{status}"']
    if kind != "do":
        parts.append(f',"k":"{kind}"')
    parts.append(f',"i":{index}')
    if attempts != 1:
        parts.append(f',"a":{attempts}')
    parts.append(f',"t0":{t0 - base:.3f}')
    if t1 is not None:
        parts.append(f',"d":{max(0.0, t1 - t0):.3f}')
    if u is not None:
        parts.append(f',"u":{u:.3f}')
    if ty is not None:
        parts.append(f',"ty":"{ty}"')
    if err is not None:
        parts.append(f',"e":{codec.encode(dict(err))}')
    if value_json is not None:
        parts.append(f',"v":{value_json}')
    parts.append("}")
    return "".join(parts)


class WorkflowStep(_StepBase):
    """The ``step`` an ``async def run(self, event, step)`` receives.

    Every method returns an awaitable, so ``asyncio.gather`` can run steps side
    by side.  Each completed step's result is stored in Redis and returned on
    every later replay without running the step again.
    """

    @overload
    def do(
        self,
        name: str,
        config_or_callback: Callable[..., Awaitable[T]] | Callable[..., T],
        callback: None = None,
        *,
        config: Mapping[str, Any] | None = None,
    ) -> Awaitable[T]: ...

    @overload
    def do(
        self,
        name: str,
        config_or_callback: Mapping[str, Any],
        callback: Callable[..., Awaitable[T]] | Callable[..., T],
        *,
        config: None = None,
    ) -> Awaitable[T]: ...

    @overload
    def do(
        self,
        name: str | None = None,
        config_or_callback: Mapping[str, Any] | None = None,
        callback: None = None,
        *,
        config: Mapping[str, Any] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[[], Awaitable[Any]]]: ...

    def do(
        self,
        name: Any = None,
        config_or_callback: Any = None,
        callback: Any = None,
        *,
        config: Mapping[str, Any] | None = None,
    ) -> Any:
        """Run ``callback`` as a durable step named ``name`` (or decorate a function).

        Forms: ``do(name, callback)``, ``do(name, config, callback)``,
        ``do(name, callback, config=...)``, and ``@step.do(name=None, *, config=None)``
        (calling the decorated function runs the step).  The callback may be sync
        or async and may take one argument, a ``StepContext``.  Retries, backoff
        and the per-attempt timeout follow ``config`` merged over the defaults.
        """
        if callable(name) and config_or_callback is None and callback is None:
            return self._decorator(None, config)(name)  # bare @step.do
        name, config, callback = self._parse_do(name, config_or_callback, callback, config)
        if callback is None:
            return self._decorator(name, config)
        if name is None:
            raise TypeError("step.do needs a name: step.do('fetch user', callback)")
        st, cfg = self._begin_do(name, config)
        return self._do_async(st, cfg, callback)

    def _decorator(
        self, name: str | None, config: Mapping[str, Any] | None
    ) -> Callable[[Callable[..., Any]], Callable[[], Awaitable[Any]]]:
        def wrap(func: Callable[..., Any]) -> Callable[[], Awaitable[Any]]:
            step_name = name if name is not None else func.__name__

            def run_step() -> Awaitable[Any]:
                st, cfg = self._begin_do(step_name, config)
                return self._do_async(st, cfg, func)

            run_step.__name__ = getattr(func, "__name__", "step")
            return run_step

        return wrap

    async def _do_async(self, st: _Step, cfg: StepConfig, callback: Callable[..., Any]) -> Any:
        done, value = self._replayed(st)
        if done:
            return value
        attempt, wait = self._first_attempt(st, cfg)
        t0 = float(st.entry["t0"]) if st.entry else _now()
        if wait > 0:
            await asyncio.sleep(self._wait_before(st, attempt, wait, t0, None))
        is_async = inspect.iscoroutinefunction(callback)
        while True:
            exc, result = await self._attempt_async(st, cfg, callback, attempt, t0, is_async)
            if exc is None:
                return result
            try:
                delay = self._failed(st, cfg, exc, attempt, t0)
            finally:
                self._run.callbacks_running -= 1  # its failure is recorded (or parked)
            attempt += 1
            if delay > 0:
                await asyncio.sleep(delay)

    async def _attempt_async(
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
        callback counts as running (``Run.callbacks_running``) from its start until
        its outcome is recorded; for an error that is the caller's job.
        """
        self._run.step_begins()
        counted = error_returned = False
        try:
            await self._astart_attempt(st, attempt, t0)  # counts the callback as running
            counted = True
            ctx = self._context(callback, st, attempt, cfg)
            pooled: Future[Any] | None = None
            inline = not is_async and self._inline(st)
            limit = None if inline else asyncio.timeout(cfg.timeout)
            try:
                if limit is None:
                    began = time.monotonic()
                    try:
                        result = call_inline(callback, ctx, cfg.timeout)
                    finally:
                        if time.monotonic() - began > SLOW_INLINE:
                            _slow_steps.add((self._run.workflow_name, st.name))
                    if inspect.isawaitable(result):
                        limit = asyncio.timeout(cfg.timeout)
                        async with limit:
                            result = await result
                else:
                    async with limit:
                        if is_async:
                            result = await (callback(ctx) if ctx is not None else callback())
                        else:
                            pooled = _POOL.submit(_call_plain, callback, ctx)
                            result = await asyncio.wrap_future(pooled)
                            if inspect.isawaitable(result):
                                result = await result
            except (Suspend, FatalRunError, asyncio.CancelledError):
                raise
            except _Alarm:
                error_returned = True
                return self._timeout_error(st, attempt, cfg), None
            except BaseException as caught:
                # a TimeoutError the callback raised itself is its own failure; so is a
                # SystemExit or KeyboardInterrupt it raised (the worker goes on)
                error_returned = True
                if isinstance(caught, TimeoutError) and limit is not None and limit.expired():
                    if pooled is not None:
                        _abandon(pooled)
                    return self._timeout_error(st, attempt, cfg), None
                self._run.note_callback_error(caught)
                return caught, None
            return None, self._succeed(st, result, attempt, t0)
        finally:
            if counted and not error_returned:  # recorded (or it raised past us)
                self._run.callbacks_running -= 1
            self._run.step_done()

    def _inline(self, st: _Step) -> bool:
        """Whether a sync callback runs inline (no thread hand-off, which costs more
        than a trivial step) rather than on the pool.

        Only where a timer can bound it (``can_inline``), and never beside another
        branch of its own run (``asyncio.gather`` keeps its steps parallel).  Beside
        other runs of its job it runs inline too, unless this step was seen to take
        longer than ``SLOW_INLINE``: from then on it goes to the pool so that a
        batch of slow (say, network) steps overlaps instead of queueing.
        """
        if not can_inline():
            return False
        own, everyone = self._run.steps_in_flight()
        if own > 1:
            return False
        return everyone <= 1 or (self._run.workflow_name, st.name) not in _slow_steps

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
        begun = self._event_wait_begin(name, type, timeout)
        if len(begun) == 1:
            replayed: dict[str, Any] = begun[0]
            return replayed
        st, deadline, t0, seconds = begun
        got = await self._run.atake_event(st.key, st.name, type, st.index, t0)
        result: dict[str, Any] = self._event_wait_end(st, type, deadline, t0, seconds, got)
        return result


def _call_plain(callback: Callable[..., Any], ctx: StepContext | None) -> Any:
    return callback(ctx) if ctx is not None else callback()


class SyncWorkflowStep(_StepBase):
    """The ``step`` a plain ``def run(self, event, step)`` receives: the same methods as
    ``WorkflowStep``, returning values directly instead of awaitables."""

    @overload
    def do(
        self,
        name: str,
        config_or_callback: Callable[..., T],
        callback: None = None,
        *,
        config: Mapping[str, Any] | None = None,
    ) -> T: ...

    @overload
    def do(
        self,
        name: str,
        config_or_callback: Mapping[str, Any],
        callback: Callable[..., T],
        *,
        config: None = None,
    ) -> T: ...

    @overload
    def do(
        self,
        name: str | None = None,
        config_or_callback: Mapping[str, Any] | None = None,
        callback: None = None,
        *,
        config: Mapping[str, Any] | None = None,
    ) -> Callable[[Callable[..., T]], Callable[[], T]]: ...

    def do(
        self,
        name: Any = None,
        config_or_callback: Any = None,
        callback: Any = None,
        *,
        config: Mapping[str, Any] | None = None,
    ) -> Any:
        """Run ``callback`` as a durable step (see ``WorkflowStep.do``); returns its value."""
        if callable(name) and config_or_callback is None and callback is None:
            return self._decorator(None, config)(name)  # bare @step.do
        name, config, callback = self._parse_do(name, config_or_callback, callback, config)
        if callback is None:
            return self._decorator(name, config)
        if name is None:
            raise TypeError("step.do needs a name: step.do('fetch user', callback)")
        st, cfg = self._begin_do(name, config)
        return self._do_sync(st, cfg, callback)

    def _decorator(
        self, name: str | None, config: Mapping[str, Any] | None
    ) -> Callable[[Callable[..., Any]], Callable[[], Any]]:
        def wrap(func: Callable[..., Any]) -> Callable[[], Any]:
            step_name = name if name is not None else func.__name__

            def run_step() -> Any:
                st, cfg = self._begin_do(step_name, config)
                return self._do_sync(st, cfg, func)

            run_step.__name__ = getattr(func, "__name__", "step")
            return run_step

        return wrap

    def _do_sync(self, st: _Step, cfg: StepConfig, callback: Callable[..., Any]) -> Any:
        done, value = self._replayed(st)
        if done:
            return value
        attempt, wait = self._first_attempt(st, cfg)
        t0 = float(st.entry["t0"]) if st.entry else _now()
        if wait > 0:
            time.sleep(self._wait_before(st, attempt, wait, t0, None))
        while True:
            self._start_attempt(st, attempt, t0)
            ctx = self._context(callback, st, attempt, cfg)
            future = None
            try:
                if can_inline():
                    result = call_inline(callback, ctx, cfg.timeout)
                    if inspect.isawaitable(result):
                        result = asyncio.run(_await(result))
                else:
                    future = _POOL.submit(_invoke_blocking, callback, ctx)
                    result = future.result(timeout=cfg.timeout)
            except (Suspend, FatalRunError):
                raise
            except _Alarm:
                exc: BaseException = self._timeout_error(st, attempt, cfg)
            except BaseException as caught:
                # a TimeoutError the callback raised itself is its own failure; so is a
                # SystemExit or KeyboardInterrupt it raised (the worker goes on)
                timed_out = (
                    isinstance(caught, FutureTimeout) and future is not None and not future.done()
                )
                if timed_out and future is not None:
                    _abandon(future)
                self._run.note_callback_error(caught)
                exc = self._timeout_error(st, attempt, cfg) if timed_out else caught
            else:
                return self._succeed(st, result, attempt, t0)
            delay = self._failed(st, cfg, exc, attempt, t0)
            attempt += 1
            if delay > 0:
                time.sleep(delay)

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
        begun = self._event_wait_begin(name, type, timeout)
        if len(begun) == 1:
            replayed: dict[str, Any] = begun[0]
            return replayed
        st, deadline, t0, seconds = begun
        got = self._run.take_event(st.key, st.name, type, st.index, t0)
        result: dict[str, Any] = self._event_wait_end(st, type, deadline, t0, seconds, got)
        return result


def event_json(event_type: str, payload: Any) -> str:
    """The stored form of a sent event, as ``wait_for_event`` returns it."""
    return codec.encode({"type": event_type, "payload": payload, "timestamp": datetime.now(UTC)})


__all__ = [
    "WorkflowStep",
    "SyncWorkflowStep",
    "Suspend",
    "FatalRunError",
    "event_json",
    "error_dict",
    "rebuild_error",
    "split_key",
]
