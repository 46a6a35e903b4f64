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
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn

import redis

from nbflow import capture, codec, progress, records
from nbflow.backend import Backend
from nbflow.batch import Batch, script_error, unreachable
from nbflow.callbacks import run_blocking
from nbflow.definition import WorkflowEvent
from nbflow.errors import (
    ArtifactError,
    FatalRunError,
    StoreUnavailable,
    Suspend,
    error_dict,
    rebuild_error,
)
from nbflow.fingerprint import class_version
from nbflow.routing import hand_back
from nbflow.step import SyncWorkflowStep, WorkflowStep
from nbflow.store import LEASE_SECONDS, clock

if TYPE_CHECKING:
    from nbflow.handshake import StopListener

log = logging.getLogger("nbflow")

# Which of several reasons to stop wins when parallel steps meet different ones.
_REASON_RANK = {"wait": 1, "stopping": 2, "paused": 3}

_loops = threading.local()
_HOST = f"{socket.gethostname()}:{os.getpid()}"
# The run a piece of async code belongs to (tasks inherit it from their creator),
# so a run waits for its own leftover parallel steps, not its neighbours'.
_current_run: contextvars.ContextVar[Run | None] = contextvars.ContextVar(
    "nbflow_run", default=None
)


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


def _ignore(reply: Any) -> None:
    """The reply of a write nobody waits for (a noted fingerprint)."""


def run_job(prefix: str, ids: list[str]) -> None:
    """What nbflow's RQ jobs name (``backend.JOB_FUNCTION``).  nbflow workers read the
    job and call ``run_many`` themselves, with their backend; a plain ``rq worker``
    that calls this has no engine to run the instances with."""
    raise RuntimeError(
        f"nbflow job for prefix {prefix!r} ({len(ids)} instance(s)) run outside an nbflow "
        "worker: start `nbflow worker` (or engine.start_worker()) instead of `rq worker`"
    )


def take_job(
    backend: Backend, job_id: str, worker_key: str, listener: StopListener | None = None
) -> tuple[list[str], tuple[str, Any] | None] | None:
    """Takes the RQ job ``job_id``: read, deleted, the worker marked busy and the
    job's first instance claimed, in one round trip (script ``claim_job``).  A job
    of one instance, the latency path, so costs one round trip less than reading
    it first.  Returns its ids and the claim of the first (the ``first`` of
    ``run_many``), ``([], None)`` if the job is gone, or None for a job without
    nbflow's meta (enqueued by hand, or by an older nbflow), to be read the old way.

    Raises RuntimeError for a job of another prefix (workers and engine disagree on
    ``--prefix``), and what Redis raised when it cannot be reached."""
    now, now_iso = clock()
    base = _token_base(listener)
    args = [backend.prefix, backend.base_queue.job_class.key_for(job_id), job_id, worker_key]
    args += [base, f"{now:.6f}", now_iso, f"{now + LEASE_SECONDS:.6f}"]
    reply = backend.scripts.pipeline([("claim_job", args)])[0]
    if isinstance(reply, Exception):
        raise reply  # Redis away (the worker waits for it) or a damaged job hash
    if reply[0] == b"none":
        return None
    if reply[0] == b"gone":
        log.warning("nbflow worker: job %s vanished before it ran", job_id)
        return [], None
    if reply[0] == b"prefix":
        raise RuntimeError(wrong_prefix(reply[1].decode(), backend.prefix))
    first = reply[1]
    if first[0] == b"error":  # a read of its claim failed: as a failed claim script
        first = redis.ResponseError(first[1].decode())
    return json.loads(reply[0])["ids"], (base, first)


def wrong_prefix(theirs: str, ours: str) -> str:
    """The error of a worker given a job of another prefix."""
    return (
        f"job for prefix {theirs!r} reached a worker for prefix {ours!r}: start workers "
        "with the same --prefix and --queue as the Engine"
    )


def run_many(
    backend: Backend,
    ids: Sequence[str],
    stopping: threading.Event | None = None,
    listener: StopListener | None = None,
    first: tuple[str, Any] | None = None,
) -> list[str]:
    """Claim ``ids`` in one round trip and run them: async runs side by side with
    their writes grouped, sync runs one after another.  Returns each outcome.

    ``stopping`` tells runs to hand their instance back at the next step; ``listener``
    is the worker's side of the stop handshake (``nbflow.handshake``); ``first`` is
    the token base and reply of a claim of ``ids[0]`` already made (``take_job``).
    """
    capture.install()  # again per job: something may have replaced sys.stdout since
    runs, outcomes = _claim(backend, ids, stopping, listener, first)
    async_runs: list[tuple[int, Run]] = []
    for n, run in runs:
        if run.is_async:
            async_runs.append((n, run))
            continue
        run.batch = Batch(backend, None, 1)
        try:
            outcomes[n] = run.execute_sync()
        except Exception as exc:  # an engine failure of this run must not stop the others
            outcomes[n] = _failed(backend, run, exc)
        finally:
            run.batch.close()
            run.forget()
    if async_runs:
        for n, outcome in zip(
            (n for n, _ in async_runs), _run_async(backend, [r for _, r in async_runs]), strict=True
        ):
            outcomes[n] = outcome
    return [outcomes[n] for n in range(len(ids))]


def _claim(
    backend: Backend,
    ids: Sequence[str],
    stopping: threading.Event | None,
    listener: StopListener | None,
    first: tuple[str, Any] | None = None,
) -> tuple[list[tuple[int, Run]], dict[int, str]]:
    """The claims of ``ids`` in one pipeline (but ``ids[0]``'s when ``first`` has it):
    the runs that may go ahead (with their positions), and the outcomes of those
    that may not."""
    now, now_iso = clock()
    lease = f"{now + LEASE_SECONDS:.6f}"
    token_base = _token_base(listener) if first is None else first[0]
    tokens = [f"{token_base}:{n}" for n in range(len(ids))]
    todo = 0 if first is None else 1
    if listener is not None:
        # stop requests left from earlier runs here (for ids[0], claimed already, the
        # requests can only be this run's own: kept)
        for iid in ids[todo:]:
            listener.requests.pop(iid, None)
    claims = backend.scripts.pipeline(
        [
            ("claim", [backend.prefix, iid, token, f"{now:.6f}", now_iso, lease])
            for iid, token in zip(ids[todo:], tokens[todo:], strict=True)
        ]
    )
    if first is not None:
        claims.insert(0, first[1])
    outcomes: dict[int, str] = {}
    runs: list[tuple[int, Run]] = []
    strays: dict[str, str] = {}  # claimed, but of a workflow this process does not have
    for n, (iid, token, claim) in enumerate(zip(ids, tokens, claims, strict=True)):
        if unreachable(claim):
            raise claim  # Redis is away: the job fails, the instances stay queued
        if isinstance(
            claim, (redis.ConnectionError, redis.TimeoutError, redis.exceptions.NoScriptError)
        ):
            # not claimed at all (Redis away, its script cache flushed again and again):
            # the instance is still queued, and the orphan sweep hands it out again
            outcomes[n] = f"skipped ({type(claim).__name__})"
            continue
        if isinstance(claim, Exception):
            # e.g. WRONGTYPE: the claim script aborted before writing anything
            outcomes[n] = _fail_corrupt(backend, iid, claim)
            continue
        if claim[0] != b"ok":
            outcomes[n] = f"skipped ({claim[0].decode()})"
            continue
        if not claim[1]:  # no workflowName: the metadata was deleted or edited by hand
            missing = records.CorruptField(
                backend.keys.metadata(iid), "workflowName", None, "an instance names its workflow"
            )
            outcomes[n] = _fail_corrupt(backend, iid, missing)
            continue
        if claim[1].decode() not in backend.classes:
            # (a job from the engine's own queue, or enqueued by hand: workers take
            # only their workflows' queues) never errored for it: given back below
            strays[iid] = token
            outcomes[n] = "handed back"
            continue
        try:
            run = Run(backend, iid, token, claim, stopping, listener)
        except Exception as exc:  # stored state that cannot be read: end it, clearly
            outcomes[n] = _fail_corrupt(backend, iid, exc)
            continue
        backend.runs[iid] = token
        runs.append((n, run))
    if strays:
        log.info("nbflow: handing back %d instance(s) of workflows not here", len(strays))
        hand_back(backend, strays)
    return runs, outcomes


def _run_async(backend: Backend, runs: list[Run]) -> list[str]:
    """Advances async runs side by side on this thread's loop, their writes grouped."""
    loop = _loop()
    batch = Batch(backend, loop, len(runs))
    for run in runs:
        run.batch = batch

    async def all_runs() -> list[Any]:
        return await asyncio.gather(*(run.execute_async() for run in runs), return_exceptions=True)

    try:
        results = loop.run_until_complete(all_runs())
    finally:
        batch.close()
        for run in runs:
            run.forget()
    outcomes = []
    for run, result in zip(runs, results, strict=True):
        if isinstance(result, KeyboardInterrupt):
            raise result
        if isinstance(result, BaseException):
            outcomes.append(_failed(backend, run, result))
        else:
            outcomes.append(result)
    return outcomes


def _failed(backend: Backend, run: Run, exc: BaseException) -> str:
    """A run that failed inside the engine.  A script error (a key of the wrong type, a
    field the scripts cannot read) ends its instance ``errored``; anything else leaves
    it leased, and it is taken back when the lease runs out.  Either way the other runs
    of the job go on."""
    if script_error(exc):
        return _fail_corrupt(backend, run.iid, exc)
    log.error("nbflow: run of %s failed inside the engine: %r", run.iid, exc)
    return f"failed ({exc!r})"


def _token_base(listener: StopListener | None) -> str:
    """A new claim's token base: a token names the worker that lifecycle calls must
    ask (see ``tell_owner``)."""
    if listener is not None:
        return f"{listener.worker_id}/{uuid.uuid4().hex[:12]}"
    return f"{_HOST}:{uuid.uuid4().hex[:12]}"


def _fail_corrupt(backend: Backend, iid: str, exc: BaseException) -> str:
    """Ends an instance whose stored state cannot be read (hand-edited or damaged keys):
    ``errored`` with a message saying so, instead of failing every run for ever.  If
    even that fails (its state key is of the wrong type) it is logged, never raised:
    other instances of the job must not pay for it."""
    log.error("nbflow: instance %s has unreadable state: %r", iid, exc)
    now, now_iso = clock()
    if isinstance(exc, records.CorruptField):
        message = (
            f"instance {iid!r} cannot run: {exc}; fix or delete the field, or delete the instance"
        )
    else:
        message = (
            f"the stored state of instance {iid!r} cannot be "
            f"read ({type(exc).__name__}: {exc}); restart it or delete its keys"
        )
    err = codec.encode({"name": "WorkflowError", "message": message})
    try:
        res = backend.scripts.fail(args=[backend.prefix, iid, f"{now:.6f}", now_iso, err])
    except redis.exceptions.ResponseError as again:
        log.error("nbflow: instance %s could not even be marked errored: %r", iid, again)
        return f"failed ({again!r})"
    outcome, _, parent = str(res.decode() if isinstance(res, bytes) else res).partition(" ")
    if parent:  # a child: its parent waited for it and is queued now
        backend.enqueue_many([parent], at_front=True)
    return outcome


def _read(key: str, field: str, raw: Any, parse: Callable[[Any], Any]) -> Any:
    """``parse(raw)`` of a claimed field; ``CorruptField`` naming it when it cannot be read."""
    try:
        return parse(raw)
    except Exception as exc:
        raise records.CorruptField(key, field, raw, f"{type(exc).__name__}: {exc}") from exc


class Run:
    """One run of one instance: the replay cache, the token that proves ownership, and
    the writes of its steps (what ``nbflow.step.StepRun`` asks for).

    Its code is ``async`` throughout; a plain ``def run`` (``blocking``) drives the same
    code with ``run_blocking``, and every wait below then completes at once: a call
    waits for its reply, a written record is sent at once (see ``_reply``, ``_sent``).
    """

    def __init__(
        self,
        backend: Backend,
        iid: str,
        token: str,
        claim: list[Any],
        stopping: threading.Event | None,
        listener: StopListener | None = None,
    ) -> None:
        self.backend = backend
        self.iid = iid
        self.token = token
        self.stopping = stopping
        self.listener = listener
        keys = backend.keys
        if not claim[1]:
            raise records.CorruptField(keys.metadata(iid), "workflowName", None, "missing")
        self.workflow_name = _read(keys.metadata(iid), "workflowName", claim[1], records.text)
        if not claim[2]:
            raise records.CorruptField(keys.metadata(iid), "payload", None, "missing")
        self.payload = _read(keys.metadata(iid), "payload", claim[2], codec.decode)
        self.created_at = _read(
            keys.state(iid), "createdAt", claim[3] or None, records.iso_datetime
        )
        self.created_ts = self.created_at.timestamp()
        self.cache: dict[str, dict[str, Any]] = {}
        top = -1
        for i in range(4, len(claim), 2):
            key = _read(keys.steps(iid), "(a step key)", claim[i], records.text)
            base = self.created_ts
            entry = _read(
                keys.steps(iid), key, claim[i + 1], partial(records.decode_entry, key, base=base)
            )
            self.cache[key] = entry
            top = max(top, _read(keys.steps(iid), key, entry["i"], int))
        self._next = top + 1
        self.counts: dict[str, int] = {}
        self.max_step_bytes = backend.max_step_bytes
        self.artifacts = backend.artifacts
        self.artifact_values: dict[int, tuple[Any, str]] = {}
        self.suspending = False
        self.reason = ""
        self.waits: list[tuple[str, str]] = []
        self.wake_at: float | None = None
        self.wait_types: set[str] = set()
        self._index_lock = threading.Lock()
        self._halted: set[int | None] = set()
        self._callback_errors: set[int] = set()
        self.cls = backend.classes.get(self.workflow_name)
        self.instance: Any = None
        self.is_async = False
        if self.cls is not None:
            try:
                self.instance = self.cls(ctx=backend.ctx, env=backend.env)
                self.is_async = inspect.iscoroutinefunction(self.instance.run)
            except Exception as exc:  # a constructor that fails fails the instance
                self.instance = exc
        self.blocking = not self.is_async
        self.batch: Batch | None = None
        self.own_in_flight = 0
        self.callbacks_running = 0  # callbacks started whose outcome is not recorded yet
        self.tasks: set[asyncio.Task[Any]] = set()
        # a step result not sent yet (it goes with the next call), and why Redis
        # refused one of the writes sent without waiting, once a reply says so
        self._pending: list[str] | None = None
        self._refused: str | None = None
        self._write_error: Exception | None = None
        self._stop_seen = 0  # the last stop request a checkpoint found no reason to obey
        self.calls = 0  # step calls made so far (the determinism check's positions)
        self.positions: dict[int, tuple[str, str]] | None = None
        self._noted: set[tuple[str, str]] = set()
        self._children: list[str] = []  # children created whose RQ job is not sent yet
        # what the workflow's code prints or logs (nbflow.capture), kept until the next
        # write; lines run() writes between steps are dropped while it replays
        self.log = capture.RunLog(self._log_position, replaying=bool(self.cache))
        self.log.notify = self._log_waits
        self._log_queued = False  # the flusher has _log_due on its list
        self.board: progress.Board | None = None  # reported progress, made on first use

    def forget(self) -> None:
        """The run is over: no more lease heartbeats or stop requests for it here."""
        self.backend.runs.pop(self.iid, None)
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

    async def start_step(self, key: str, name: str, entry: str, attempt: int) -> None:
        """Sends a step attempt's start (with the last step's result, when one is
        pending) before its callback runs, without waiting for its reply; a stop
        request or a refusal already read stops the run first.  From its return the
        callback counts as running (until its outcome is recorded), so a stop request
        waits for it rather than pausing under it."""
        self.log.replaying = False  # a step does real work: run()'s lines are new again
        self._stop_if_halted()
        self._raise_refused()
        asked = self._stop_asked()
        if asked:
            # steps of other branches already running finish and are stored first
            while self.callbacks_running:
                await asyncio.sleep(0.002)
            self._raise_refused()
            self._flush_pending()
            res = await self._reply("checkpoint", self._args())
            self._raise_refused()
            self._after_checkpoint(res, asked)
        self._send_start(key, name, entry, attempt)
        self.callbacks_running += 1
        try:
            assert self.batch is not None
            if self.blocking:  # no coroutine for it: this is on every step's path
                self.batch.written(True)
            else:
                await self._sent()
            self.batch.confirm()
            self._raise_refused()
        except BaseException:
            self.callbacks_running -= 1
            raise

    def record(self, key: str, entry: str, *, final: bool, event: str, attempt: int) -> None:
        """Stores a step's outcome (or a retry record); a pause asked for meanwhile
        takes effect right after it is stored.  It is written behind: it goes out
        with the run's next call (merged with the next step's start when that comes
        next), always before another callback of the run starts."""
        hist = f'"step":{codec.encode(key)},"attempt":{attempt}'
        self.log.replaying = False
        if final and self.board is not None:
            self.board.close(key)
        self._flush_pending()
        self._pending = [*self._own(), key, entry, "1" if final else "0", event, hist]
        if self.callbacks_running > 1 and self.batch is not None:
            # parallel branches still run callbacks: a crash now must not lose this
            # result, so it goes out at once instead of with the next call
            self._flush_pending()
            self.batch.flush()

    async def take_event(
        self, key: str, event_type: str, index: int, t0: float, pos: int | None
    ) -> dict[str, Any] | None:
        """The stored entry of an event step if an event of its type is buffered."""
        self.log.replaying = False
        self._stop_if_halted()
        self._raise_refused()
        self._flush_pending()
        rel = f"{t0 - self.created_ts:.3f}"
        where = "" if pos is None else str(pos)
        args = [*self._args(), key, event_type, str(index), rel, f"{t0:.6f}", where]
        res = await self._reply("take_event", args)  # replies come in order
        self._raise_refused()
        if isinstance(res, Exception):
            raise self._stop_on_error(res)
        tag = res[0]
        if tag in (b"event", b"final"):
            taken = codec.decode(res[1])
            assert isinstance(taken, dict)
            if taken["s"] == "errored":
                raise rebuild_error(taken.get("e") or {})
            return taken
        if tag == b"none":
            return None
        raise self.halt(tag.decode())

    def request_wait(
        self, key: str, entry: str, wake_at: float, event_type: str | None = None
    ) -> NoReturn:
        """Parks the run: the wait is written when the whole run has unwound."""
        self.log.replaying = False
        self.waits.append((key, entry))
        self.wake_at = wake_at if self.wake_at is None else min(self.wake_at, wake_at)
        if event_type is not None:
            self.wait_types.add(event_type)
        raise self.halt("wait")

    def parallel(self) -> bool:
        """Whether another branch of this run (``asyncio.gather``) is under way."""
        return not self.blocking and not self._alone()

    def note_fingerprint(self, key: str, fingerprint: str) -> None:
        """A replayed step's callback has another fingerprint now than when the step
        ran: remembered per workflow and class version (``fingerprints`` key), so that
        ``steps()`` can say ``stale`` where it cannot find the callback by name.  Sent
        behind the run's writes without waiting; once per step key and fingerprint
        per run."""
        if self.cls is None or (key, fingerprint) in self._noted or self.batch is None:
            return
        self._noted.add((key, fingerprint))
        try:
            version = class_version(self.cls)
        except (TypeError, ValueError):
            return
        field = self.backend.keys.fingerprints(self.workflow_name, version)
        self.batch.send("note_fingerprint", [self.backend.prefix, field, key, fingerprint], _ignore)

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
        """A step attempt is about to start (see ``steps_in_flight``)."""
        self.own_in_flight += 1
        if self.batch is not None:
            self.batch.steps_in_flight += 1

    def step_done(self) -> None:
        """An attempt counted by ``step_begins`` is over."""
        self.own_in_flight -= 1
        if self.batch is not None:
            self.batch.steps_in_flight -= 1

    # -- child workflows (nbflow.compose) -------------------------------------------

    def registered_workflows(self) -> Mapping[str, type]:
        """The workflows this worker can run, by name."""
        return self.backend.classes

    async def start_child(
        self,
        key: str,
        name: str,
        child_id: str,
        workflow: str,
        payload: str,
        entry: str,
        t0: float,
        version: str,
    ) -> tuple[str, Any]:
        """Starts a child (the ``start_child`` script; its RQ job follows): ('wait',
        None) while it runs, ('final', its decoded entry) once it has ended, or
        ('cycle' | 'exists', None) for an id that cannot be this step's child."""
        self._stop_if_halted()
        self._raise_refused()
        self._flush_pending()
        retention = "" if self.backend.retention is None else f"{self.backend.retention:.6f}"
        args = [*self._args(), key, name, child_id, workflow, payload, entry, f"{t0:.6f}"]
        res = await self._reply("start_child", [*args, retention, version])
        self._raise_refused()
        if isinstance(res, Exception):
            raise res
        tag = res[0].decode()
        if tag == "created":
            self._dispatch_child(child_id)
            return "wait", None
        if tag == "final":
            return "final", records.decode_entry(key, res[1], self.created_ts)
        if tag in ("wait", "cycle", "exists"):
            return tag, None
        raise self.halt(tag)

    def wait_for_child(self, key: str) -> NoReturn:
        """Parks the run until a child ends: its pending entry is stored already, and the
        script that ends the child queues the parent (``notify_parent``)."""
        raise self.halt("wait")

    def _dispatch_child(self, child_id: str) -> None:
        """Sends the RQ job of a child just created: in an async run, those of all the
        children created in one loop turn go together (a fan-out is a few jobs, not one
        per child); a blocking run sends it at once.  A job lost to a crash in between
        is sent again by the housekeeper's orphan sweep (the child is in ``ready``)."""
        self._children.append(child_id)
        if self.blocking:
            self._send_children()
        elif len(self._children) == 1:
            asyncio.get_running_loop().call_soon(self._send_children)

    def _send_children(self) -> None:
        ids, self._children = self._children, []
        if not ids:
            return
        try:
            self.backend.enqueue_many(ids)
        except redis.RedisError as exc:
            log.warning(
                "nbflow: jobs of %d child(ren) of %s not sent (%s)", len(ids), self.iid, exc
            )

    def _wake_parent(self, reply: str) -> str:
        """The outcome of an ending script; a parent it queued (``"errored parent-id"``)
        gets its RQ job."""
        outcome, _, parent = reply.partition(" ")
        if parent:
            self.backend.enqueue_many([parent], at_front=True)
        return outcome

    def report_progress(self, key: str, fraction: float | None, message: str | None) -> None:
        """``ctx.progress`` of the step ``key``: kept in memory, written at most ten times
        a second by ``nbflow.progress``'s flusher thread or with the run's next write."""
        board = self.board
        if board is None:
            with self._index_lock:
                if self.board is None:
                    self.board = progress.Board(self.backend, self.iid, self.token)
                board = self.board
        board.report(key, fraction, message)

    def _log_waits(self) -> None:
        """Lines wait for the next write: if that does not come soon (a long step), the
        background flusher writes them (see ``_log_due``)."""
        if not self._log_queued:
            self._log_queued = True
            progress.FLUSHER.poke(self._log_due)

    def _log_due(self, now: float) -> bool:
        """The flusher's turn: writes lines older than ``progress.LOG_FLUSH_AFTER`` (their
        step still runs); True once nothing is left waiting."""
        self._log_queued = False  # before reading first_at: a line added now pokes again
        first = self.log.first_at
        if first is None:
            return True  # the run wrote them itself meanwhile
        if now - first < progress.LOG_FLUSH_AFTER:
            self._log_queued = True
            return False
        taken = self.log.take()
        if taken:
            args = [self.backend.prefix, self.iid, self.token, str(self.log.limit), *taken]
            try:
                self.backend.scripts.log_append(args=args)
            except Exception as exc:  # Redis away: these lines are lost, the run goes on
                log.warning("nbflow: log lines of %s not stored: %r", self.iid, exc)
        return True

    def _log_position(self) -> int:
        """Where run() stands for its log: the order of the last step it reached."""
        return self._next - 1

    # -- the stop handshake (see nbflow.handshake) ----------------------------------

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
            raise self._stop_on_error(res)
        if res == b"running":
            self._stop_seen = max(self._stop_seen, asked)
            return
        if self._refused is None:  # paused, terminated, restarted (lost)
            self._refused = res.decode()
        raise self.halt(res.decode())

    # -- writes ------------------------------------------------------------------

    def _args(self) -> list[str]:
        return [self.backend.prefix, *self._own()]

    def _own(self) -> list[str]:
        """id, token, now, now_iso: what every write of this run starts with."""
        now, now_iso = clock()
        return [self.iid, self.token, f"{now:.6f}", now_iso]

    def _send_side(self) -> None:
        """Queues the lines captured and the progress reported since the last write, so
        they go out in the same write as the call queued next (nothing when there are
        none: a step that prints nothing pays nothing)."""
        assert self.batch is not None
        taken = self.log.take() if self.log.fields else None
        if taken:
            args = [self.backend.prefix, self.iid, self.token, str(self.log.limit), *taken]
            self.batch.send("log_append", args, self._on_side_write)
        board = self.board
        if board is not None and board.dirty:
            taken = board.take()
            if taken:
                args = [self.backend.prefix, self.iid, self.token, *taken]
                self.batch.send("progress", args, self._on_side_write)

    def _on_side_write(self, reply: Any) -> None:
        """A log or progress write needs no answer: one refused (the run lost the instance)
        changes nothing; an error is only logged, the run goes on."""
        if isinstance(reply, Exception):
            log.warning("nbflow: logs or progress of %s not stored: %r", self.iid, reply)

    def _send_start(self, key: str, name: str, entry: str, attempt: int) -> None:
        """Queues a step attempt's start, with the last step's result when one is
        pending (one ``step_next`` script call)."""
        assert self.batch is not None
        if self.log.fields or self.board is not None:
            self._send_side()
        hist = f'"step":{codec.encode(key)},"attempt":{attempt}'
        start = [*self._own(), key, entry, name, hist]
        if self._pending is None:
            self.batch.send("step_start", [self.backend.prefix, *start], self._on_write)
        else:
            args = [self.backend.prefix, *self._pending, *start]
            self._pending = None
            self.batch.send("step_next", args, self._on_write)

    async def _sent(self) -> None:
        """Lets the records queued so far go out before a callback starts: with other
        runs or branches going, at the end of this loop turn (they join the write);
        alone, at once."""
        assert self.batch is not None
        written = self.batch.written(self._alone())
        if written is not None:
            await written

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
            if res == b"ok":  # (every step's path: the answer nearly always)
                continue
            if self._refused is not None:
                return
            if script_error(res):  # e.g. a key of the wrong type: the instance is corrupt
                self._refused, self._write_error = "corrupt", res
            elif isinstance(res, Exception):
                self._refused, self._write_error = "lost", StoreUnavailable(res)
            elif res != b"ok":
                self._refused = res.decode()

    def _raise_refused(self) -> None:
        """Stops the run if Redis refused one of its writes (see ``_on_write``)."""
        if self._refused is None:
            return
        if self._write_error is not None:
            raise self.halt(self._refused) from self._write_error
        raise self.halt(self._refused)

    def _stop_on_error(self, res: Exception) -> Suspend:
        """The stop for an error reply to a call the run waited for: a script error
        means the instance's state is corrupt (it ends ``errored``, see ``_end``); any
        other (Redis out of memory, read-only) stops the run, and its lease hands it on."""
        if self._refused is None:
            self._refused, self._write_error = ("corrupt" if script_error(res) else "lost"), res
        return self.halt(self._refused)

    def _flush_pending(self) -> None:
        """Sends a result written behind on its own (the next call is no step start)."""
        if self._pending is not None:
            assert self.batch is not None
            if self.log.fields or self.board is not None:
                self._send_side()
            args = [self.backend.prefix, *self._pending]
            self._pending = None
            self.batch.send("step_finish", args, self._on_write)

    async def _reply(self, name: str, args: list[str]) -> Any:
        """A call's reply, behind the run's earlier writes on the same stream (grouped
        with this turn's calls; a blocking run waits for it here).  Redis being away
        stops the run (see ``StoreUnavailable``)."""
        assert self.batch is not None
        try:
            if self.blocking:
                return self.batch.call_now(name, args)
            return await self.batch.call(name, args)
        except StoreUnavailable as exc:
            raise self.halt("lost") from exc

    # -- the run -----------------------------------------------------------------

    def _event(self) -> WorkflowEvent[Any]:
        return WorkflowEvent(self.payload, self.created_at, self.iid, self.workflow_name)

    def _unrunnable(self) -> tuple[str, Any] | None:
        """The error ending an instance whose class cannot be built.  (One whose class
        is not registered here never gets a run: ``_claim`` hands it back.)"""
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
            return "complete", self._output_json(output)
        except TypeError as exc:
            return "errored", {
                "name": "TypeError",
                "message": f"the output of run() cannot be stored: {exc}",
            }
        except (ValueError, ArtifactError) as exc:  # over max_artifact_bytes, or unwritable
            return "errored", {"name": type(exc).__name__, "message": str(exc)}

    def _output_json(self, output: Any) -> str:
        """What ``output`` is stored as: its JSON, or a reference to an artifact (the one
        a step of this run got it from, when ``run`` returns that very value)."""
        held = self.artifact_values.get(id(output))
        if held is not None and held[0] is output:
            return held[1]
        store = self.artifacts
        if not store.large_frame(output):
            text = codec.encode(output)
            # (characters * 4 bounds the UTF-8 size: most outputs skip encoding it)
            if len(text) * 4 <= (store.threshold or 0) or not store.over_threshold(
                len(text.encode())
            ):
                return text
        else:
            text = None
        what = f"the output of instance {self.iid!r}"
        return store.write(output, self.iid, what, text)[0]

    def execute_sync(self) -> str:
        """Runs a plain ``def run`` (or an instance that cannot run), without a loop."""
        ending = self._unrunnable()
        if ending is None:
            step = SyncWorkflowStep(self)
            caught: list[BaseException] = []

            def body() -> Any:
                try:
                    return self.instance.run(self._event(), step)
                except BaseException as exc:
                    caught.append(exc)
                    raise

            sink = capture.enter(self.log, None)  # what run() itself writes
            try:
                ending = self._outcome(body)
                ending = run_blocking(self._roll_back(step, ending, caught))
            except KeyboardInterrupt:
                self._flush_pending()
                try:  # behind the run's last writes, on the same connection
                    if run_blocking(self._reply("release", self._args())) == b"queued":
                        self._requeue()
                except (Suspend, redis.RedisError):
                    pass  # Redis is away: the lease (or the orphan sweep) takes it back
                raise
            finally:
                capture.leave(sink, self.log, None)
        return run_blocking(self._end(*ending))

    async def execute_async(self) -> str:
        """Runs an ``async def run`` on the shared loop; its writes go through the batch."""
        _current_run.set(self)
        capture.enter(self.log, None)  # what run() itself writes (this task's context)
        self.tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        holder: dict[str, Any] = {}
        step = WorkflowStep(self)
        try:
            holder["output"] = await self.instance.run(self._event(), step)
        except BaseException as exc:  # judged by _outcome below
            holder["error"] = exc
        finally:
            await self._wait_own_tasks()

        def replay() -> Any:
            if "error" in holder:
                raise holder["error"]
            return holder.get("output")

        ending = self._outcome(replay)
        if ending[0] == "errored" and step.has_rollbacks():
            ending = await self._roll_back(
                step, ending, [holder["error"]] if "error" in holder else []
            )
            await self._wait_own_tasks()
        if self.batch is not None:
            self.batch.live -= 1
        return await self._end(*ending)

    async def _roll_back(
        self, step: WorkflowStep | SyncWorkflowStep, ending: tuple[str, Any], caught: list[Any]
    ) -> tuple[str, Any]:
        """An errored run whose completed steps have rollbacks runs them first (spec
        10.4, ``nbflow.compose``) and stores their report; the run ends errored after
        them, or parks if one must wait (a long retry, a stop request, a lost lease)."""
        if ending[0] != "errored" or not step.has_rollbacks():
            return ending
        error = caught[0] if caught else rebuild_error(ending[1])
        try:
            report = await step.roll_back(error)
        except Suspend:
            return "park", None
        if self.suspending:
            return "park", None
        assert self.batch is not None
        self._flush_pending()
        self.batch.send("rollback_report", [*self._args(), codec.encode(report)], self._on_write)
        return ending

    async def _wait_own_tasks(self) -> None:
        """Lets this run's parallel steps still in flight finish and store."""
        me = asyncio.current_task()
        while True:
            rest = [t for t in self.tasks if t is not me and not t.done()]
            if not rest:
                return
            await asyncio.gather(*rest, return_exceptions=True)

    # -- endings -----------------------------------------------------------------

    async def _end(self, status: str, value: Any) -> str:
        """Sends the ending call right behind the run's last writes (one round trip);
        if one of those writes was refused (a pause, a lost lease), that wins and the
        ending call finds the instance no longer owned and changes nothing."""
        self._send_children()
        ending = self._ending(status, value)
        if ending is None:
            if self.reason == "corrupt" and script_error(self._write_error):
                return _fail_corrupt(self.backend, self.iid, self._write_error)  # type: ignore[arg-type]
            return self.reason
        if self.log.partial:
            self.log.close()
        if self.log.fields or self.board is not None:
            self._send_side()  # ahead of the ending, while the run still owns the instance
        try:
            # replies come in order: when this one is in, so are the earlier writes'
            res = await self._reply(*ending)
            self._raise_refused()
        except Suspend:
            if self.reason == "corrupt" and script_error(self._write_error):
                return _fail_corrupt(self.backend, self.iid, self._write_error)  # type: ignore[arg-type]
            return self.reason
        if isinstance(res, Exception):
            if script_error(res):
                return _fail_corrupt(self.backend, self.iid, res)
            raise res
        name = ending[0]
        if name == "release":  # the worker stops: another worker takes it from here
            if res == b"queued":
                self._requeue()
            return "released"
        text: str = res.decode()
        if name != "suspend":
            text = self._wake_parent(text)
        if name == "suspend":
            if text == "queued":  # an event arrived while the run unwound
                self._requeue()
            return text
        log.info("instance %s %s", self.iid, text)
        return text

    def _requeue(self) -> None:
        """A job for the instance, queued again by this run's last call, on its
        workflow's queue."""
        self.backend.enqueue([self.iid], self.workflow_name, at_front=True)

    def _ending(self, status: str, value: Any) -> tuple[str, list[str]] | None:
        """The script call that ends the run (with the last step's result when one is
        pending), or None when a script already applied the stop (a pause, a
        terminate, a lost lease)."""
        if status != "park":
            text = value if isinstance(value, str) else codec.encode(value)
            hist = "" if status == "complete" else f'"error":{text}'
            args = [*self._args(), status, text, hist]
            if self._pending is not None:  # the last result and the end in one call
                pending, self._pending = self._pending, None
                return "step_finish_then_finish", [args[0], *pending, *args[1:]]
            return "finish", args
        self._flush_pending()
        reason = self.reason or "wait"
        if reason == "stopping":
            return "release", self._args()
        if reason != "wait":
            return None
        wake = "" if self.wake_at is None else f"{self.wake_at:.6f}"
        types = "," + ",".join(sorted(self.wait_types)) + "," if self.wait_types else ""
        flat = [part for key_entry in self.waits for part in key_entry]
        return "suspend", [*self._args(), wake, types, f'"until":{wake or "null"}', *flat]


__all__ = ["run_job", "run_many"]
