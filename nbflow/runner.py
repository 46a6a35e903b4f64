"""One run of an instance: claim it, replay ``run(event, step)`` from stored
results, and park or finish it.  ``run_job`` is the function RQ jobs call.

A run owns its instance through a token written by the claim script; every
later write checks that token, so a run that lost its instance (a restart, a
lease taken over after a stall) can no longer change anything.  The claim
returns the instance's metadata and every stored step in one round trip, which
is all a replay needs.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from nbflow import codec
from nbflow.definition import WorkflowEvent
from nbflow.step import (
    FatalRunError,
    Suspend,
    SyncWorkflowStep,
    WorkflowStep,
    error_dict,
    rebuild_error,
)

if TYPE_CHECKING:
    from nbflow.engine import Engine

log = logging.getLogger("nbflow")

#: How long a claim or a step write keeps an instance leased to its run; the
#: worker's heartbeat renews leases of runs in progress every third of this.
LEASE_SECONDS = 30.0

# Which of several reasons to stop wins when parallel steps meet different ones.
_REASON_RANK = {"wait": 1, "stopping": 2, "paused": 3}

_bound = threading.local()
_loops = threading.local()
_HOST = f"{socket.gethostname()}:{os.getpid()}"


def bind_engine(engine: Engine, stopping: threading.Event | None = None) -> None:
    """Makes ``engine`` the one jobs run by this thread use (set by the worker);
    ``stopping`` tells runs to hand their instance back at the next step."""
    _bound.engine = engine
    _bound.stopping = stopping


def current_engine(prefix: str) -> Engine:
    engine: Engine | None = getattr(_bound, "engine", None)
    if engine is None:
        raise RuntimeError("nbflow job run outside an nbflow worker (no engine bound)")
    if engine.prefix != prefix:
        raise RuntimeError(
            f"job for prefix {prefix!r} reached a worker for prefix {engine.prefix!r}: "
            "start workers with the same --prefix and --queue as the Engine"
        )
    return engine


def run_job(prefix: str, ids: list[str]) -> None:
    """The RQ job: advance each instance in ``ids`` as far as it goes now."""
    engine = current_engine(prefix)
    stopping = getattr(_bound, "stopping", None)
    for iid in ids:
        advance(engine, iid, stopping)


def _now() -> tuple[float, str]:
    t = time.time()
    return t, datetime.fromtimestamp(t, timezone.utc).isoformat()


def _task_key() -> int | None:
    """Which parallel branch is calling: its asyncio task, or None outside a loop."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return None
    return None if task is None else id(task)


def _loop() -> asyncio.AbstractEventLoop:
    """One event loop per worker thread, reused by every async run on it."""
    loop: asyncio.AbstractEventLoop | None = getattr(_loops, "loop", None)
    if loop is None or loop.is_closed():
        loop = asyncio.new_event_loop()
        _loops.loop = loop
    return loop


def advance(engine: Engine, iid: str, stopping: threading.Event | None = None) -> str:
    """Claim ``iid`` and run it until it finishes or must wait; returns what happened."""
    token = f"{_HOST}:{uuid.uuid4().hex[:12]}"
    now, now_iso = _now()
    res = engine._scripts.claim(
        args=[engine.prefix, iid, token, f"{now:.6f}", now_iso, f"{now + LEASE_SECONDS:.6f}"]
    )
    if res[0] != b"ok":
        return f"skipped ({res[0].decode()})"
    run = Run(engine, iid, token, res, stopping)
    engine._runs[iid] = token
    try:
        return run.execute()
    finally:
        engine._runs.pop(iid, None)


class Run:
    """The state of one run: the replay cache and the token that proves ownership."""

    def __init__(
        self,
        engine: Engine,
        iid: str,
        token: str,
        claim: list[Any],
        stopping: threading.Event | None,
    ) -> None:
        self.engine = engine
        self.iid = iid
        self.token = token
        self.stopping = stopping
        self.workflow_name = claim[1].decode()
        self.payload = codec.decode(claim[2])
        self.created_at = datetime.fromisoformat(claim[3].decode())
        self.cache: dict[str, dict[str, Any]] = {}
        top = -1
        for i in range(4, len(claim), 2):
            entry = codec.decode(claim[i + 1])
            assert isinstance(entry, dict)
            self.cache[claim[i].decode()] = entry
            top = max(top, int(entry["i"]))
        self._next = top + 1
        self.counts: dict[str, int] = {}
        self.max_step_bytes = engine.max_step_bytes
        self.suspending = False
        self.reason = ""
        self.waits: list[tuple[str, str]] = []
        self.wake_at: float | None = None
        self.wait_types: set[str] = set()
        self._index_lock = threading.Lock()
        self._halted: set[int | None] = set()

    # -- used by the step protocol ----------------------------------------------

    def next_index(self) -> int:
        with self._index_lock:
            n = self._next
            self._next += 1
            return n

    def halt(self, reason: str) -> Suspend:
        """Stops the run for ``reason``; the strongest reason among parallel steps wins.

        Only the task (parallel branch) that is stopped remembers it: other branches
        of an ``asyncio.gather`` go on until they too finish or must wait, and the
        run is parked once all have unwound.
        """
        self.suspending = True
        self._halted.add(_task_key())
        if _REASON_RANK.get(reason, 9) > _REASON_RANK.get(self.reason, 0):
            self.reason = reason
        return Suspend(reason)

    def _stop_if_halted(self) -> None:
        """A branch that was told to stop (and swallowed it) starts nothing more."""
        if self._halted and _task_key() in self._halted:
            raise self.halt(self.reason or "wait")
        if self.stopping is not None and self.stopping.is_set():
            raise self.halt("stopping")

    def _check(self, result: bytes) -> None:
        if result != b"ok":
            raise self.halt(result.decode())

    def _args(self) -> list[str]:
        now, now_iso = _now()
        return [self.engine.prefix, self.iid, self.token, f"{now:.6f}", now_iso]

    def start_step(self, key: str, name: str, entry: str, attempt: int) -> None:
        """Records a step attempt's start; stops the run first if it must stop."""
        self._stop_if_halted()
        args = self._args()
        lease = f"{float(args[3]) + LEASE_SECONDS:.6f}"
        hist = f'"step":{codec.encode(key)},"attempt":{attempt}'
        self._check(self.engine._scripts.step_start(args=[*args, lease, key, entry, name, hist]))

    def record(self, key: str, entry: str, *, final: bool, event: str, attempt: int) -> None:
        """Stores a step's outcome (or a retry record); a pause asked for meanwhile
        takes effect right after it is stored."""
        args = self._args()
        lease = f"{float(args[3]) + LEASE_SECONDS:.6f}"
        hist = f'"step":{codec.encode(key)},"attempt":{attempt}'
        self._check(
            self.engine._scripts.step_finish(
                args=[*args, lease, key, entry, "1" if final else "0", event, hist]
            )
        )

    def take_event(
        self, key: str, name: str, event_type: str, index: int, t0: float
    ) -> dict[str, Any] | None:
        """The stored entry of an event step if an event of its type is buffered."""
        self._stop_if_halted()
        res = self.engine._scripts.take_event(
            args=[*self._args(), key, event_type, str(index), f"{t0:.6f}"]
        )
        tag = res[0]
        if tag in (b"event", b"final"):
            entry = codec.decode(res[1])
            assert isinstance(entry, dict)
            if entry["s"] == "errored":
                raise rebuild_error(entry.get("e") or {})
            return entry
        if tag == b"none":
            return None
        raise self.halt(tag.decode())

    def request_wait(
        self, key: str, entry: str, wake_at: float, event_type: str | None = None
    ) -> None:
        """Parks the run: the wait is written when the whole run has unwound."""
        self.waits.append((key, entry))
        self.wake_at = wake_at if self.wake_at is None else min(self.wake_at, wake_at)
        if event_type is not None:
            self.wait_types.add(event_type)
        raise self.halt("wait")

    # -- the run -----------------------------------------------------------------

    def execute(self) -> str:
        cls = self.engine._classes.get(self.workflow_name)
        if cls is None:
            known = ", ".join(sorted(self.engine._classes)) or "none"
            return self._finish(
                "errored",
                {
                    "name": "WorkflowNotRegisteredError",
                    "message": f"workflow {self.workflow_name!r} is not registered on this "
                    f"worker (registered: {known}); register it or start the worker with "
                    "--import <module>",
                },
            )
        event: WorkflowEvent[Any] = WorkflowEvent(
            self.payload, self.created_at, self.iid, self.workflow_name
        )
        try:
            instance = cls(ctx=self.engine.ctx, env=self.engine.env)
            if inspect.iscoroutinefunction(instance.run):
                output = _loop().run_until_complete(
                    _run_async(instance.run(event, WorkflowStep(self)))
                )
            else:
                output = instance.run(event, SyncWorkflowStep(self))
        except Suspend:
            return self._park()
        except FatalRunError as fatal:
            if self.suspending:
                return self._park()
            return self._finish("errored", fatal.error)
        except (KeyboardInterrupt, SystemExit):
            self._release()
            raise
        except BaseException as exc:  # the workflow failed: a step's last error, or its own
            if self.suspending:
                return self._park()
            log.info("instance %s errored: %s: %s", self.iid, type(exc).__name__, exc)
            err = error_dict(exc)
            return self._finish("errored", {"name": err["name"], "message": err["message"]})
        if self.suspending:  # the workflow swallowed a Suspend; the run still stops
            return self._park()
        try:
            text = codec.encode(output)
        except TypeError as exc:
            return self._finish(
                "errored", {"name": "TypeError", "message": f"run() returned {exc}"}
            )
        return self._finish("complete", text, encoded=True)

    def _finish(self, outcome: str, value: Any, encoded: bool = False) -> str:
        text = value if encoded else codec.encode(value)
        hist = "" if outcome == "complete" else f'"error":{text}'
        res: str = self.engine._scripts.finish(args=[*self._args(), outcome, text, hist]).decode()
        log.info("instance %s %s", self.iid, res)
        return res

    def _release(self) -> None:
        self.engine._scripts.release(args=self._args())

    def _park(self) -> str:
        reason = self.reason or "wait"
        if reason == "stopping":
            self._release()
            return "released"
        if reason != "wait":
            return reason  # the script that said so already applied it
        wake = "" if self.wake_at is None else f"{self.wake_at:.6f}"
        types = "," + ",".join(sorted(self.wait_types)) + "," if self.wait_types else ""
        hist = f'"until":{wake or "null"}'
        flat: list[str] = []
        for key, entry in self.waits:
            flat += [key, entry]
        res: str = self.engine._scripts.suspend(
            args=[*self._args(), wake, types, hist, *flat]
        ).decode()
        if res == "queued":  # an event arrived while the run unwound
            self.engine._enqueue([self.iid], at_front=True)
        return res


async def _run_async(coro: Any) -> Any:
    """Awaits ``run``; then lets parallel steps still in flight finish and store."""
    try:
        return await coro
    finally:
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not me]
        if rest:
            await asyncio.gather(*rest, return_exceptions=True)
