"""Runs of instances: claim them, replay ``run(event, step)`` from stored results,
and park or finish them.  ``run_job`` is the function RQ jobs call.

A run owns its instance through a token written by the claim script; every
later write checks that token, so a run that lost its instance (a restart, a
lease taken over after a stall) can no longer change anything.  The claim
returns the instance's metadata and every stored step in one round trip, which
is all a replay needs.

One RQ job may carry many instances (those created together).  Their claims go
out in one pipeline, and their ``async`` runs advance side by side on the worker
thread's event loop; every Redis script call they make in one turn of the loop
is written in one go (``Batch``: a group commit).  Step records are pipelined:
a step's result travels with the next step's start (``step_next``), which is
written to Redis before that step's callback runs, but no step waits for a
reply; replies are read as they arrive, and one that refuses a write (a lost
lease, a restart) stops the run at its next step.  Whether a new step may start
after ``pause()``, ``terminate()`` or ``restart()`` is decided by the stop
handshake instead: those calls ask the worker holding the instance
(``nbflow.worker.StopListener``) and return once it has promised to start no new
step.  Plain ``def run`` workflows run one after another, each on a stream of its
own (the same pipelined writes, without a loop).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import redis

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
from nbflow.store import ScriptStream, clock

if TYPE_CHECKING:
    from nbflow.engine import Engine
    from nbflow.worker import StopListener

log = logging.getLogger("nbflow")

#: How long a claim or a step write keeps an instance leased to its run; the
#: worker's heartbeat renews leases of runs in progress every third of this.
LEASE_SECONDS = 30.0

#: A step whose run has had no word from Redis for this long waits for the reply
#: to its start before its callback runs.  Far below the lease, so a run cut off
#: from Redis (whose lease may be taken over) starts no step unconfirmed.
CONFIRM_AFTER = LEASE_SECONDS / 30

# Which of several reasons to stop wins when parallel steps meet different ones.
_REASON_RANK = {"wait": 1, "stopping": 2, "paused": 3}

_bound = threading.local()
_loops = threading.local()
_HOST = f"{socket.gethostname()}:{os.getpid()}"
# The run a piece of async code belongs to (tasks inherit it from their creator),
# so a run waits for its own leftover parallel steps, not its neighbours'.
_current_run: contextvars.ContextVar[Run | None] = contextvars.ContextVar(
    "nbflow_run", default=None
)


def bind_engine(
    engine: Engine,
    stopping: threading.Event | None = None,
    listener: StopListener | None = None,
) -> None:
    """Makes ``engine`` the one jobs run by this thread use (set by the worker);
    ``stopping`` tells runs to hand their instance back at the next step, and
    ``listener`` hears lifecycle calls that must stop a run (the stop handshake)."""
    _bound.engine = engine
    _bound.stopping = stopping
    _bound.listener = listener


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


def _task_key() -> int | None:
    """Which parallel branch is calling: its asyncio task, or None outside a loop."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return None
    return None if task is None else id(task)


def _task_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
    task = asyncio.Task(coro, loop=loop, **kwargs)
    run = _current_run.get()
    if run is not None:
        run.tasks.add(task)
    return task


def _loop() -> asyncio.AbstractEventLoop:
    """One event loop per worker thread, reused by every async run on it."""
    loop: asyncio.AbstractEventLoop | None = getattr(_loops, "loop", None)
    if loop is None or loop.is_closed():
        loop = asyncio.new_event_loop()
        loop.set_task_factory(_task_factory)
        _loops.loop = loop
    return loop


class StoreUnavailable(Exception):
    """Redis did not take one of the engine's own writes (it is down or unreachable).

    The run stops without finishing anything: the instance keeps its lease, and
    when the lease runs out a worker takes it back and only the interrupted step
    runs again.  It must never be mistaken for the workflow's own failure.
    """

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"Redis unavailable: {cause}")


class Batch:
    """Group commit over one pipelined stream: script calls made during one turn of
    the loop are written in one go.  Step records are sent without waiting (their
    handler checks the reply when it arrives); ``call`` gives a future for the calls
    whose reply the caller needs (an event take, a run's ending)."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop | None, live: int) -> None:
        self.stream = ScriptStream(engine._scripts)
        self.loop = loop
        self.live = live  # runs of the job still going
        self.calls: list[tuple[str, list[str], Callable[[Any], None]]] = []
        self.awaited = 0  # calls in ``calls`` whose reply someone awaits
        self._written: asyncio.Future[None] | None = None
        self.steps_in_flight = 0  # step attempts started and not yet done, all runs

    def send(self, name: str, args: list[str], handler: Callable[[Any], None]) -> None:
        """Queues a call for this turn's write; ``handler`` gets its reply later."""
        if not self.calls and self.loop is not None:
            self.loop.call_soon(self.flush)
        self.calls.append((name, args, handler))

    def call(self, name: str, args: list[str]) -> asyncio.Future[Any]:
        """Queues a call and returns a future of its reply (Redis being away is
        ``StoreUnavailable``; an error reply is the exception as the result)."""
        assert self.loop is not None
        fut: asyncio.Future[Any] = self.loop.create_future()

        def got(reply: Any) -> None:
            if fut.done():
                return
            if isinstance(reply, redis.RedisError) and not isinstance(
                reply, redis.exceptions.ResponseError
            ):
                fut.set_exception(StoreUnavailable(reply))
            else:
                fut.set_result(reply)

        self.send(name, args, got)
        self.awaited += 1
        return fut

    def written(self, alone: bool) -> asyncio.Future[None] | None:
        """What to await before a step callback starts, so that the records sent
        so far are on their way to Redis: with other runs (or parallel branches)
        going, the end of this turn's write, which lets them join it; a run on its
        own (``alone``) writes at once (None: nothing to await)."""
        if alone and self.live <= 1:
            self.flush()
            return None
        assert self.loop is not None
        if self._written is None:
            self._written = self.loop.create_future()
        return self._written

    def call_now(self, name: str, args: list[str]) -> Any:
        """Sends a call behind those queued and waits for its reply (plain ``def run``
        runs, which have no loop); Redis being away is ``StoreUnavailable``."""
        box: list[Any] = []
        self.calls.append((name, args, box.append))
        self.flush(wait=True)
        reply = box[0]
        if isinstance(reply, redis.RedisError) and not isinstance(
            reply, redis.exceptions.ResponseError
        ):
            raise StoreUnavailable(reply)
        return reply

    def flush(self, wait: bool = False) -> None:
        """Writes the queued calls; reads every owed reply if someone awaits one
        (or ``wait``), else those that have arrived."""
        calls, self.calls = self.calls, []
        awaited, self.awaited = self.awaited, 0
        written, self._written = self._written, None
        try:
            if calls:
                try:
                    self.stream.send(calls)
                except redis.RedisError as exc:  # Redis unreachable: every caller learns it
                    for _, _, handler in calls:
                        handler(exc)
                else:
                    if awaited or wait:
                        self.stream.drain()
                    else:
                        # replies that arrived meanwhile; above all, a connection
                        # that closed (Redis went away) is seen now, before the
                        # next callback runs on a write that was lost
                        self.stream.poll()
        except redis.RedisError:
            pass  # the stream gave every owed handler the error
        finally:
            if written is not None and not written.done():
                written.set_result(None)

    def confirm(self) -> None:
        """Waits for every reply owed when Redis has not answered for a while (see
        ``CONFIRM_AFTER``): a run that lost its lease meanwhile learns it now."""
        if time.monotonic() - self.stream.settled_at > CONFIRM_AFTER:
            try:
                self.stream.drain()
            except redis.RedisError:
                pass  # the stream gave every owed handler the error

    def close(self) -> None:
        """Reads the replies still owed and gives the connection back."""
        try:
            self.stream.close()
        except redis.RedisError as exc:
            log.warning("nbflow: replies of a job's last writes were lost: %r", exc)


def run_job(prefix: str, ids: list[str]) -> None:
    """The RQ job: advance each instance in ``ids`` as far as it goes now."""
    engine = current_engine(prefix)
    run_many(engine, ids, getattr(_bound, "stopping", None))


def advance(engine: Engine, iid: str, stopping: threading.Event | None = None) -> str:
    """Claim ``iid`` and run it until it finishes or must wait; returns what happened."""
    return run_many(engine, [iid], stopping)[0]


def run_many(
    engine: Engine, ids: Sequence[str], stopping: threading.Event | None = None
) -> list[str]:
    """Claim ``ids`` in one round trip and run them: async runs side by side with
    their writes grouped, sync runs one after another.  Returns each outcome."""
    now, now_iso = clock()
    lease = f"{now + LEASE_SECONDS:.6f}"
    listener: StopListener | None = getattr(_bound, "listener", None)
    if listener is not None:
        # a token names the worker that lifecycle calls must ask (see tell_owner)
        token_base = f"{listener.worker_id}/{uuid.uuid4().hex[:12]}"
        for iid in ids:  # requests aimed at earlier runs
            listener.requests.pop(iid, None)
    else:
        token_base = f"{_HOST}:{uuid.uuid4().hex[:12]}"
    tokens = [f"{token_base}:{n}" for n in range(len(ids))]
    claims = engine._scripts.pipeline(
        [
            ("claim", [engine.prefix, iid, token, f"{now:.6f}", now_iso, lease])
            for iid, token in zip(ids, tokens, strict=True)
        ]
    )
    outcomes: dict[int, str] = {}
    async_runs: list[tuple[int, Run]] = []
    for n, (iid, token, claim) in enumerate(zip(ids, tokens, claims, strict=True)):
        if isinstance(claim, redis.RedisError) and not isinstance(
            claim, redis.exceptions.ResponseError
        ):
            raise claim  # Redis is away: the job fails, the instances stay queued
        if isinstance(claim, Exception):
            # e.g. WRONGTYPE: the claim script aborted before writing anything
            outcomes[n] = _fail_corrupt(engine, iid, claim)
            continue
        if claim[0] != b"ok":
            outcomes[n] = f"skipped ({claim[0].decode()})"
            continue
        try:
            run = Run(engine, iid, token, claim, stopping, listener)
        except Exception as exc:  # stored state that cannot be read: end it, clearly
            outcomes[n] = _fail_corrupt(engine, iid, exc)
            continue
        engine._runs[iid] = token
        if run.is_async:
            async_runs.append((n, run))
        else:
            run.batch = Batch(engine, None, 1)
            try:
                outcomes[n] = run.execute_sync()
            finally:
                run.batch.close()
                run.forget()
    if async_runs:
        loop = _loop()
        batch = Batch(engine, loop, len(async_runs))
        for _, run in async_runs:
            run.batch = batch

        async def all_runs() -> list[Any]:
            return await asyncio.gather(
                *(run.execute_async() for _, run in async_runs), return_exceptions=True
            )

        try:
            results = loop.run_until_complete(all_runs())
        finally:
            batch.close()
            for _, run in async_runs:
                run.forget()
        for (n, run), result in zip(async_runs, results, strict=True):
            if isinstance(result, KeyboardInterrupt):
                raise result
            if isinstance(result, BaseException):
                # the instance keeps its lease; when it runs out it is taken back
                log.error("nbflow: run of %s failed inside the engine: %r", run.iid, result)
                outcomes[n] = f"failed ({result!r})"
            else:
                outcomes[n] = result
    return [outcomes[n] for n in range(len(ids))]


def _fail_corrupt(engine: Engine, iid: str, exc: BaseException) -> str:
    """Ends an instance whose stored state cannot be read (hand-edited or damaged keys):
    ``errored`` with a message saying so, instead of failing every run for ever."""
    log.error("nbflow: instance %s has unreadable state: %r", iid, exc)
    now, now_iso = clock()
    err = codec.encode(
        {
            "name": "WorkflowError",
            "message": f"the stored state of instance {iid!r} cannot be "
            f"read ({type(exc).__name__}: {exc}); restart it or delete its keys",
        }
    )
    res = engine._scripts.fail(args=[engine.prefix, iid, f"{now:.6f}", now_iso, err])
    return str(res.decode() if isinstance(res, bytes) else res)


class Run:
    """The state of one run: the replay cache and the token that proves ownership."""

    def __init__(
        self,
        engine: Engine,
        iid: str,
        token: str,
        claim: list[Any],
        stopping: threading.Event | None,
        listener: StopListener | None = None,
    ) -> None:
        self.engine = engine
        self.iid = iid
        self.token = token
        self.stopping = stopping
        self.listener = listener
        self.workflow_name = claim[1].decode()
        self.payload = codec.decode(claim[2])
        self.created_at = datetime.fromisoformat(claim[3].decode())
        self.created_ts = self.created_at.timestamp()
        self.cache: dict[str, dict[str, Any]] = {}
        top = -1
        for i in range(4, len(claim), 2):
            entry = codec.decode(claim[i + 1])
            if not isinstance(entry, dict) or "s" not in entry or "i" not in entry:
                raise ValueError(f"step entry {claim[i]!r} is not a step entry: {entry!r}")
            if "t0" in entry:  # stored relative to creation; the protocol uses epochs
                entry["t0"] = self.created_ts + float(entry["t0"])
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
        self._callback_errors: set[int] = set()
        self.cls = engine._classes.get(self.workflow_name)
        self.instance: Any = None
        self.is_async = False
        if self.cls is not None:
            try:
                self.instance = self.cls(ctx=engine.ctx, env=engine.env)
                self.is_async = inspect.iscoroutinefunction(self.instance.run)
            except Exception as exc:  # a constructor that fails fails the instance
                self.instance = exc
        self.batch: Batch | None = None
        self.own_in_flight = 0
        self.callbacks_running = 0  # callbacks started whose outcome is not recorded yet
        self.tasks: set[asyncio.Task[Any]] = set()
        # async runs: a step result not sent yet (it goes with the next call), and
        # why Redis refused one of the writes sent without waiting, once a reply says so
        self._pending: list[str] | None = None
        self._refused: str | None = None
        self._write_error: Exception | None = None
        self._stop_seen = 0  # the last stop request a checkpoint found no reason to obey

    def forget(self) -> None:
        """The run is over: no more lease heartbeats or stop requests for it here."""
        self.engine._runs.pop(self.iid, None)
        if self.listener is not None:
            self.listener.requests.pop(self.iid, None)

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

    def _args(self) -> list[str]:
        return [self.engine.prefix, *self._own()]

    def _own(self) -> list[str]:
        """id, token, now, now_iso: what every write of this run starts with."""
        now, now_iso = clock()
        return [self.iid, self.token, f"{now:.6f}", now_iso]

    def _start_args(self, key: str, name: str, entry: str, attempt: int) -> list[str]:
        hist = f'"step":{codec.encode(key)},"attempt":{attempt}'
        return [*self._own(), key, entry, name, hist]

    def _stop_asked(self) -> int:
        """The number of the latest stop request (pause, terminate, restart) for the
        instance that this run has not checked yet, or 0.  A request stays until a
        checkpoint answers it, so every parallel branch sees it."""
        if self.listener is None:
            return 0
        asked = self.listener.requests.get(self.iid, 0)
        return asked if asked > self._stop_seen else 0

    def _after_checkpoint(self, res: Any, asked: int) -> None:
        """Acts on a checkpoint's answer: go on (resumed meanwhile), or stop the whole
        run, every branch of it."""
        if isinstance(res, Exception):
            raise res
        if res == b"running":
            self._stop_seen = max(self._stop_seen, asked)
            return
        if self._refused is None:  # paused, terminated, restarted (lost)
            self._refused = res.decode()
        raise self.halt(res.decode())

    def start_step(self, key: str, name: str, entry: str, attempt: int) -> None:
        """``astart_step`` for plain ``def run`` runs (no loop: written at once)."""
        self._stop_if_halted()
        self._raise_refused()
        asked = self._stop_asked()
        if asked:
            self._flush_pending()
            self._after_checkpoint(self._call_now("checkpoint", self._args()), asked)
            self._raise_refused()
        self._send_start(key, name, entry, attempt)
        assert self.batch is not None
        self.batch.written(alone=True)
        self.batch.confirm()
        self._raise_refused()

    def note_callback_error(self, exc: BaseException) -> None:
        """A step callback raised ``exc``: if it reaches ``run``'s caller it is the
        workflow's failure, even a KeyboardInterrupt (which otherwise stops the worker)."""
        if not isinstance(exc, Exception):
            self._callback_errors.add(id(exc))

    def steps_in_flight(self) -> tuple[int, int]:
        """Step attempts under way: of this run (its parallel branches), and on this
        worker's loop in all (the runs of its job)."""
        return self.own_in_flight, (0 if self.batch is None else self.batch.steps_in_flight)

    def step_begins(self) -> None:
        """A step attempt of an async run is about to start (see ``steps_in_flight``)."""
        self.own_in_flight += 1
        if self.batch is not None:
            self.batch.steps_in_flight += 1

    def step_done(self) -> None:
        """An attempt counted by ``step_begins`` is over."""
        self.own_in_flight -= 1
        if self.batch is not None:
            self.batch.steps_in_flight -= 1

    async def astart_step(self, key: str, name: str, entry: str, attempt: int) -> None:
        """``start_step`` for async runs: the start (with the last step's result, when
        one is pending) is written before the callback runs, without waiting for its
        reply; a stop request or a refusal already read stops the run first."""
        self._stop_if_halted()
        self._raise_refused()
        asked = self._stop_asked()
        if asked:
            # steps of other branches already running finish and are stored first
            while self.callbacks_running:
                await asyncio.sleep(0.002)
            self._raise_refused()
            self._flush_pending()
            res = await self._reply(self._call("checkpoint", self._args()))
            self._raise_refused()
            self._after_checkpoint(res, asked)
        self._send_start(key, name, entry, attempt)
        # from here the callback counts as running (until its outcome is recorded),
        # so a stop request waits for it rather than pausing under it
        self.callbacks_running += 1
        try:
            assert self.batch is not None
            written = self.batch.written(self._alone())
            if written is not None:
                await written
            self.batch.confirm()
            self._raise_refused()
        except BaseException:
            self.callbacks_running -= 1
            raise

    def _send_start(self, key: str, name: str, entry: str, attempt: int) -> None:
        """Queues a step attempt's start, with the last step's result when one is
        pending (one ``step_next`` script call)."""
        assert self.batch is not None
        start = self._start_args(key, name, entry, attempt)
        if self._pending is None:
            self.batch.send("step_start", [self.engine.prefix, *start], self._on_write)
        else:
            args = [self.engine.prefix, *self._pending, *start]
            self._pending = None
            self.batch.send("step_next", args, self._on_write)

    def _alone(self) -> bool:
        """Whether no other branch of this run (``asyncio.gather``) is under way."""
        if len(self.tasks) <= 1:
            return True
        me = asyncio.current_task()
        return not any(t is not me and not t.done() for t in self.tasks)

    def _on_write(self, reply: Any) -> None:
        """Checks the reply of a write sent without waiting; a refusal is kept until
        the run's next step (``_raise_refused``), where the run stops."""
        for res in reply if isinstance(reply, list) else (reply,):
            if self._refused is not None:
                return
            if isinstance(res, redis.exceptions.ResponseError):
                self._refused, self._write_error = "error", res
            elif isinstance(res, Exception):
                self._refused, self._write_error = "lost", StoreUnavailable(res)
            elif res != b"ok":
                self._refused = res.decode()

    def _raise_refused(self) -> None:
        """Stops the run if Redis refused one of its writes (see ``_on_write``)."""
        if self._refused is None:
            return
        if isinstance(self._write_error, redis.exceptions.ResponseError):
            raise self._write_error
        if self._write_error is not None:
            raise self.halt(self._refused) from self._write_error
        raise self.halt(self._refused)

    def record(self, key: str, entry: str, *, final: bool, event: str, attempt: int) -> None:
        """Stores a step's outcome (or a retry record); a pause asked for meanwhile
        takes effect right after it is stored.  It is written behind: it goes out
        with the run's next call (merged with the next step's start when that comes
        next), always before another callback of the run starts."""
        hist = f'"step":{codec.encode(key)},"attempt":{attempt}'
        self._flush_pending()
        self._pending = [*self._own(), key, entry, "1" if final else "0", event, hist]
        if self.callbacks_running > 1 and self.batch is not None:
            # parallel branches still run callbacks: a crash now must not lose this
            # result, so it goes out at once instead of with the next call
            self._flush_pending()
            self.batch.flush()

    def _flush_pending(self) -> None:
        """Sends a result written behind on its own (the next call is no step start)."""
        if self._pending is not None:
            assert self.batch is not None
            args = [self.engine.prefix, *self._pending]
            self._pending = None
            self.batch.send("step_finish", args, self._on_write)

    async def _reply(self, fut: asyncio.Future[Any]) -> Any:
        """A grouped call's reply; Redis being away stops the run (see StoreUnavailable)."""
        try:
            return await fut
        except StoreUnavailable as exc:
            raise self.halt("lost") from exc

    def _call_now(self, name: str, args: list[str]) -> Any:
        """A call whose reply a plain ``def run`` run waits for, behind its earlier
        writes; Redis being away stops the run (see StoreUnavailable)."""
        assert self.batch is not None
        try:
            return self.batch.call_now(name, args)
        except StoreUnavailable as exc:
            raise self.halt("lost") from exc

    def _call(self, name: str, args: list[str]) -> asyncio.Future[Any]:
        assert self.batch is not None
        return self.batch.call(name, args)

    def _take_event_args(self, key: str, event_type: str, index: int, t0: float) -> list[str]:
        rel = f"{t0 - self.created_ts:.3f}"
        return [*self._args(), key, event_type, str(index), rel, f"{t0:.6f}"]

    def take_event(
        self, key: str, name: str, event_type: str, index: int, t0: float
    ) -> dict[str, Any] | None:
        """The stored entry of an event step if an event of its type is buffered."""
        self._stop_if_halted()
        self._raise_refused()
        self._flush_pending()
        res = self._call_now("take_event", self._take_event_args(key, event_type, index, t0))
        self._raise_refused()
        if isinstance(res, Exception):
            raise res
        return self._taken(res)

    async def atake_event(
        self, key: str, name: str, event_type: str, index: int, t0: float
    ) -> dict[str, Any] | None:
        """``take_event`` for async runs (grouped)."""
        self._stop_if_halted()
        self._raise_refused()
        self._flush_pending()
        fut = self._call("take_event", self._take_event_args(key, event_type, index, t0))
        res = await self._reply(fut)  # replies come in order: earlier writes' are in
        self._raise_refused()
        if isinstance(res, Exception):
            raise res
        return self._taken(res)

    def _taken(self, res: list[Any]) -> dict[str, Any] | None:
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

    def _event(self) -> WorkflowEvent[Any]:
        return WorkflowEvent(self.payload, self.created_at, self.iid, self.workflow_name)

    def _unrunnable(self) -> tuple[str, Any] | None:
        """The error ending an instance whose class is missing or cannot be built."""
        if self.cls is None:
            known = ", ".join(sorted(self.engine._classes)) or "none"
            return "errored", {
                "name": "WorkflowNotRegisteredError",
                "message": f"workflow {self.workflow_name!r} is not registered on this "
                f"worker (registered: {known}); register it or start the worker with "
                "--import <module>",
            }
        if isinstance(self.instance, Exception):
            err = error_dict(self.instance)
            return "errored", {"name": err["name"], "message": err["message"]}
        return None

    def _outcome(self, run: Callable[[], Any]) -> tuple[str, Any]:
        """Runs ``run`` and says how the instance ends: a final status and value, or
        ('park', None) when it must wait / stop now."""
        try:
            output = run()
        except Suspend:
            return "park", None
        except FatalRunError as fatal:
            return ("park", None) if self.suspending else ("errored", fatal.error)
        except KeyboardInterrupt as exc:
            if id(exc) not in self._callback_errors:
                raise  # the worker is being interrupted, not the workflow
            return "errored", {"name": "KeyboardInterrupt", "message": str(exc)}
        except BaseException as exc:  # the workflow failed: a step's last error, or its own
            if self.suspending:
                return "park", None
            log.info("instance %s errored: %s: %s", self.iid, type(exc).__name__, exc)
            err = error_dict(exc)
            return "errored", {"name": err["name"], "message": err["message"]}
        if self.suspending:  # the workflow swallowed a Suspend; the run still stops
            return "park", None
        try:
            return "complete", codec.encode(output)
        except TypeError as exc:
            return "errored", {"name": "TypeError", "message": f"run() returned {exc}"}

    def execute_sync(self) -> str:
        """Runs a plain ``def run`` (or an instance that cannot run), without a loop."""
        ending = self._unrunnable()
        if ending is None:
            try:
                ending = self._outcome(
                    lambda: self.instance.run(self._event(), SyncWorkflowStep(self))
                )
            except KeyboardInterrupt:
                self._flush_pending()
                try:  # behind the run's last writes, on the same connection
                    self._call_now("release", self._args())
                except Suspend:
                    pass  # Redis is away: the lease runs out instead
                raise
        return self._end_sync(*ending)

    async def execute_async(self) -> str:
        """Runs an ``async def run`` on the shared loop; its writes go through the batch."""
        _current_run.set(self)
        self.tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        holder: dict[str, Any] = {}

        async def body() -> None:
            try:
                holder["output"] = await self.instance.run(self._event(), WorkflowStep(self))
            except BaseException as exc:  # judged by _outcome below
                holder["error"] = exc
            finally:
                await self._wait_own_tasks()

        await body()
        if self.batch is not None:
            self.batch.live -= 1

        def replay() -> Any:
            if "error" in holder:
                raise holder["error"]
            return holder.get("output")

        return await self._end_async(*self._outcome(replay))

    async def _wait_own_tasks(self) -> None:
        """Lets this run's parallel steps still in flight finish and store."""
        me = asyncio.current_task()
        while True:
            rest = [t for t in self.tasks if t is not me and not t.done()]
            if not rest:
                return
            await asyncio.gather(*rest, return_exceptions=True)

    # -- endings -----------------------------------------------------------------

    def _finish_args(self, outcome: str, value: Any) -> list[str]:
        text = value if isinstance(value, str) else codec.encode(value)
        hist = "" if outcome == "complete" else f'"error":{text}'
        return [*self._args(), outcome, text, hist]

    def _park_args(self) -> list[str] | None:
        """The suspend call, or None when the stop was already applied by a script."""
        reason = self.reason or "wait"
        if reason != "wait":
            return None
        wake = "" if self.wake_at is None else f"{self.wake_at:.6f}"
        types = "," + ",".join(sorted(self.wait_types)) + "," if self.wait_types else ""
        hist = f'"until":{wake or "null"}'
        flat: list[str] = []
        for key, entry in self.waits:
            flat += [key, entry]
        return [*self._args(), wake, types, hist, *flat]

    def _after_park(self, res: Any) -> str:
        if isinstance(res, Exception):
            raise res
        text: str = res.decode()
        if text == "queued":  # an event arrived while the run unwound
            self.engine._enqueue([self.iid], at_front=True)
        return text

    def _ending(self, status: str, value: Any) -> tuple[str, list[str]] | None:
        """The script call that ends the run (with the last step's result when one is
        pending), or None when a script already applied the stop (a pause, a
        terminate, a lost lease)."""
        if status != "park":
            args = self._finish_args(status, value)
            if self._pending is not None:  # the last result and the end in one call
                pending, self._pending = self._pending, None
                return "step_finish_then_finish", [args[0], *pending, *args[1:]]
            return "finish", args
        self._flush_pending()
        if (self.reason or "wait") == "stopping":
            return "release", self._args()
        park = self._park_args()
        return None if park is None else ("suspend", park)

    def _ended(self, name: str, res: Any) -> str:
        if isinstance(res, Exception):
            raise res
        if name == "release":
            return "released"
        if name == "suspend":
            return self._after_park(res)
        text: str = res.decode()
        log.info("instance %s %s", self.iid, text)
        return text

    def _end_sync(self, status: str, value: Any) -> str:
        """``_end_async`` for plain ``def run`` runs."""
        ending = self._ending(status, value)
        if ending is None:
            return self.reason
        try:
            res = self._call_now(*ending)
            self._raise_refused()
        except Suspend:
            return self.reason
        return self._ended(ending[0], res)

    async def _end_async(self, status: str, value: Any) -> str:
        """Sends the ending call right behind the run's last writes (one round trip);
        if one of those writes was refused (a pause, a lost lease), that wins and the
        ending call finds the instance no longer owned and changes nothing."""
        ending = self._ending(status, value)
        if ending is None:
            return self.reason
        try:
            # replies come in order: when this one is in, so are the earlier writes'
            res = await self._reply(self._call(*ending))
            self._raise_refused()
        except Suspend:
            return self.reason
        return self._ended(ending[0], res)


__all__ = ["run_job", "run_many", "advance", "bind_engine", "current_engine", "LEASE_SECONDS"]
