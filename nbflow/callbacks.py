"""How a step callback is called: inline under a SIGALRM timer, or on a thread pool,
and how a callback's arguments are chosen (as rq keeps its ``timeouts.py``).

Inline is cheapest (no thread hand-off, which costs more than a trivial step) but only
possible where an interval timer can interrupt an overrun: in the main thread, one
callback at a time.  Everywhere else (the notebook's worker thread, parallel branches,
steps seen to be slow) a callback runs on the pool; a pooled thread that overruns its
timeout cannot be killed (Python has no such thing) and finishes unobserved.

This module also holds ``run_blocking``: nbflow writes the step protocol and the run
once, as ``async`` code, and a plain ``def run`` drives that same code to its end
without an event loop, because everything it awaits then completes at once.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # CPython's C half of signal
import asyncio
import contextvars
import inspect
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from nbflow.definition import StepContext

log = logging.getLogger("nbflow")

T = TypeVar("T")

#: A sync callback that ran inline longer than this (seconds), ``SLOW_RUNS`` times in a
#: row, is "slow": later calls of that step beside other runs go to the pool (see
#: ``WorkflowStep._inline``).  One long run is no sign: a garbage collection or the OS
#: taking the CPU away for a moment makes a trivial step look slow, and it would then
#: pay a thread hand-off on every call for the rest of the process.
SLOW_INLINE = 0.002
SLOW_RUNS = 3
_slow_steps: set[tuple[str, str]] = set()  # (workflow name, step name) seen to be slow
_slow_runs: dict[tuple[str, str], int] = {}  # slow runs in a row of steps not slow yet

_POOL_SIZE = 64
_POOL = ThreadPoolExecutor(max_workers=_POOL_SIZE, thread_name_prefix="nbflow-step")
_abandoned: set[Future[Any]] = set()
_pool_lock = threading.Lock()


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine that never suspends (all it awaits completes at once) to its
    result, without an event loop: how plain ``def run`` workflows share the async
    step protocol.  A coroutine that does suspend is a bug in nbflow, said so."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("nbflow: a blocking step awaited something that suspends")


def note_slow(workflow: str, step: str) -> None:
    """Counts a run of this step inline for longer than ``SLOW_INLINE``; the
    ``SLOW_RUNS``-th in a row makes it slow."""
    key = (workflow, step)
    runs = _slow_runs.get(key, 0) + 1
    if runs >= SLOW_RUNS:
        _slow_steps.add(key)
        _slow_runs.pop(key, None)
    else:
        _slow_runs[key] = runs


def note_fast(workflow: str, step: str) -> None:
    """A run of this step inline within ``SLOW_INLINE``: its count of slow runs restarts
    (callers skip this while ``counting()`` is False, the usual case)."""
    _slow_runs.pop((workflow, step), None)


def counting() -> bool:
    """Whether some step has slow runs counted (``note_fast`` has something to reset)."""
    return bool(_slow_runs)


def seen_slow(workflow: str, step: str) -> bool:
    """Whether this step was once seen to run inline for longer than ``SLOW_INLINE``."""
    return (workflow, step) in _slow_steps


def submit(callback: Callable[..., Any], ctx: StepContext | None, *, blocking: bool) -> Future[Any]:
    """Runs a callback on the pool.  ``blocking``: an awaitable it returns is run there
    too (a plain ``def run`` has no loop to await it on); else it is the result.

    It runs in a copy of the caller's context (as ``asyncio.to_thread`` does), so what it
    prints or logs reaches the step's log sink (``nbflow.capture``)."""
    run = contextvars.copy_context().run
    return _POOL.submit(run, _invoke_blocking if blocking else call, callback, ctx)


def abandon(future: Future[Any]) -> None:
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


class Alarm(BaseException):
    """SIGALRM fired inside a callback run inline that overran its timeout (a
    BaseException so the callback's own ``except Exception`` lets it through)."""


_alarm = {"armed": False}


def _on_alarm(signum: int, frame: Any) -> None:
    if _alarm["armed"]:
        _alarm["armed"] = False
        raise Alarm()


def can_inline() -> bool:
    """Whether a sync callback may run inline, without a thread hand-off: only where an
    interval timer can bound it, i.e. in the main thread (``nbflow worker``,
    ``engine.run_worker()``), and not inside another inline callback (one timer per
    process)."""
    return (
        threading.current_thread() is threading.main_thread()
        and not _alarm["armed"]
        and hasattr(signal, "setitimer")
    )


def call_inline(callback: Callable[..., Any], ctx: StepContext | None, timeout: float) -> Any:
    """Runs a sync callback here, interrupted by SIGALRM (``Alarm``) after ``timeout``.

    A signal interrupts blocking calls too (``time.sleep``, socket reads), so the
    timeout holds as it does on the pool."""
    # the C-level getsignal: signal.getsignal converts to an enum, which costs
    # more than the rest of a trivial step
    if _signal.getsignal(signal.SIGALRM) is not _on_alarm:
        signal.signal(signal.SIGALRM, _on_alarm)
    _alarm["armed"] = True
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:  # not through call(): this is on every inline step's path
        return callback(ctx) if ctx is not None else callback()
    finally:
        _alarm["armed"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)


def call(callback: Callable[..., Any], ctx: StepContext | None) -> Any:
    """Calls a callback with the step context when it takes one (see ``wants_context``)."""
    return callback(ctx) if ctx is not None else callback()


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
    return finish_blocking(call(callback, ctx))


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw


def finish_blocking(result: Any) -> Any:
    """A callback's result, an awaitable it returned run to its end here (no loop)."""
    return asyncio.run(_await(result)) if inspect.isawaitable(result) else result
