"""The public front of the engine: ``Engine``, ``Workflow`` and ``WorkflowInstance``.

An ``Engine`` binds a Redis (spec 3.1), a key prefix and an RQ queue.  Creating
an instance writes its state and enqueues an RQ job for it in one MULTI/EXEC,
so an instance never exists without a way to be run.  Lifecycle calls are one
Lua script each (``nbflow.store``) and change the status before they return.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

import pandas as pd
import redis as redis_lib

from nbflow import codec, handshake, reprs, routing, server
from nbflow import schedules as _schedules
from nbflow.artifacts import DEFAULT_THRESHOLD, ArtifactStore
from nbflow.backend import Backend
from nbflow.definition import WorkflowEntrypoint
from nbflow.durations import parse_duration
from nbflow.errors import (
    InstanceExistsError,
    InstanceNotFoundError,
    InvalidStateError,
    WorkflowNotRegisteredError,
    rebuild_error,
)
from nbflow.fingerprint import class_version, stale_steps
from nbflow.fork import fork as fork_instance
from nbflow.limits import (
    DEFAULT_PRIORITY,
    OptionTypeError,
    StartOptions,
    check_limits,
    check_start,
    read_limits,
    store_limits,
)
from nbflow.records import (
    FINAL_STATUSES,
    INSTANCE_COLUMNS,
    LOG_COLUMNS,
    STATUSES,
    STEP_COLUMNS,
    InstanceStatus,
    decode_entry,
    decode_progress,
    event_json,
    instance_status,
    iso_datetime,
    lenient,
    log_label,
    log_rows,
    published_status,
    split_key,
    step_key,
    step_row,
    summarized,
    text,
)
from nbflow.schedules import Schedule
from nbflow.store import Keys, clock
from nbflow.validate import check_event_type, check_instance_id
from nbflow.worker import ThreadWorker, run_foreground

log = logging.getLogger("nbflow")

W = TypeVar("W", bound=WorkflowEntrypoint[Any, Any])

DEFAULT_MAX_STEP_BYTES = 16 * 1024 * 1024
#: create_batch writes this many instances per MULTI/EXEC.
BATCH_CHUNK = 500
#: what a ``create_batch`` item may hold (spec 10.2 adds the flow-control options)
_BATCH_ORDER = ("id", "params", "priority", "concurrency_key", "start_at", "delay")
_BATCH_KEYS = frozenset(_BATCH_ORDER)
#: Instances per RQ job, at most: a job's runs advance together with their Redis
#: calls grouped (fewer round trips, so bigger is cheaper); a batch of 50 or more is
#: still cut into at least two jobs (of 25 or more) so two workers can share it.
JOB_SIZE = 100
MIN_JOB_SIZE = 25


def _now() -> tuple[str, str]:
    t, iso = clock()
    return f"{t:.6f}", iso


class Engine:
    """Where workflows live: a Redis, a key prefix, an RQ queue, and the registered classes.

    ``redis`` is a URL, a ``redis.Redis`` or ``None`` (``$NBFLOW_REDIS_URL``, else the
    embedded server under ``$NBFLOW_HOME``).  ``prefix`` and ``queue`` let several
    independent engines share one Redis; workers must use the same two.  ``env`` and
    ``ctx`` are handed to every workflow instance as ``self.env`` / ``self.ctx``.
    ``retention`` (a duration) deletes finished instances that long after they finish.

    Results of any size (spec 11): a step result, run output or event payload whose
    encoding is over ``artifact_threshold`` bytes (``None``: never) is stored as an
    artifact under ``artifacts`` (a directory or an fsspec URL such as
    ``s3://bucket/path``; default ``$NBFLOW_HOME/artifacts``; ``artifact_options`` are
    the fsspec storage options, e.g. credentials or ``endpoint_url``), DataFrames and
    Series as Parquet; Redis keeps a small reference.  ``max_step_bytes`` caps what goes
    to Redis, ``max_artifact_bytes`` (default no limit) what goes to an artifact.

    ``durability`` (``"everysec"`` or ``"always"``; spec 12) is the embedded server's
    ``appendfsync``: how often its append-only file is fsynced (once a second: a crash
    of the machine may lose the last second; always: before every reply).  None leaves
    the server as it is (a new embedded server starts with ``"everysec"``).  nbflow
    never changes a Redis it did not start: given a URL of another server, it checks
    that the server already fsyncs that way and raises ``ValueError`` if not.
    """

    def __init__(
        self,
        redis: str | redis_lib.Redis | None = None,
        *,
        prefix: str = "workflow",
        queue: str = "nbflow",
        env: Any = None,
        ctx: Any = None,
        max_step_bytes: int = DEFAULT_MAX_STEP_BYTES,
        retention: str | float | timedelta | None = None,
        artifacts: str | os.PathLike[str] | None = None,
        artifact_threshold: int | None = DEFAULT_THRESHOLD,
        max_artifact_bytes: int | None = None,
        artifact_options: Mapping[str, Any] | None = None,
        durability: str | None = None,
    ) -> None:
        if not isinstance(prefix, str) or not prefix or any(c in prefix for c in " \t\r\n"):
            raise ValueError(f"prefix must be a non-empty string without spaces, not {prefix!r}")
        if not isinstance(queue, str) or not queue or any(c in queue for c in " \t\r\n"):
            raise ValueError(f"queue must be a non-empty string without spaces, not {queue!r}")
        if (
            isinstance(max_step_bytes, bool)
            or not isinstance(max_step_bytes, int)
            or (max_step_bytes <= 0)
        ):
            raise ValueError(f"max_step_bytes must be a positive int, not {max_step_bytes!r}")
        kept = None if retention is None else parse_duration(retention)
        if durability is not None:
            server.check_durability(durability)  # before anything is started
        store = ArtifactStore(
            artifacts,
            prefix=prefix,
            threshold=artifact_threshold,
            max_bytes=max_artifact_bytes,
            options=artifact_options,
        )
        client = server.connect(redis, durability=durability)
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError(
                "pass a redis.Redis with decode_responses=False (RQ stores binary data); "
                "nbflow decodes what it reads itself"
            )
        #: what runs and workers use (``nbflow.backend``); not part of the user API
        self.backend = Backend(
            client,
            prefix=prefix,
            queue=queue,
            env=env,
            ctx=ctx,
            max_step_bytes=max_step_bytes,
            retention=kept,
            artifacts=store,
        )
        self._worker: ThreadWorker | None = None
        self._worker_lock = threading.Lock()
        self._waiters = threading.local()  # per thread: the pubsub wait() listens on

    @property
    def redis(self) -> redis_lib.Redis:
        """The Redis client this engine uses."""
        return self.backend.redis

    @property
    def prefix(self) -> str:
        """The key prefix every key of this engine's instances starts with."""
        return self.backend.prefix

    @property
    def queue_name(self) -> str:
        """The RQ queue this engine's instances are dispatched on."""
        return self.backend.queue_name

    @property
    def keys(self) -> Keys:
        """Key names under this engine's prefix (``nbflow.store.Keys``)."""
        return self.backend.keys

    @property
    def max_step_bytes(self) -> int:
        """The largest step result, params or event payload stored, in bytes."""
        return self.backend.max_step_bytes

    @property
    def artifacts(self) -> str:
        """The URL of the artifact location (where results too large for Redis go)."""
        return self.backend.artifacts.url

    @property
    def retention(self) -> float | None:
        """Seconds after which finished instances are deleted (None: kept)."""
        return self.backend.retention

    @property
    def env(self) -> Any:
        """What every workflow instance gets as ``self.env``."""
        return self.backend.env

    @env.setter
    def env(self, value: Any) -> None:
        self.backend.env = value

    @property
    def ctx(self) -> Any:
        """What every workflow instance gets as ``self.ctx``."""
        return self.backend.ctx

    @ctx.setter
    def ctx(self, value: Any) -> None:
        self.backend.ctx = value

    def __repr__(self) -> str:
        where = server.describe(self.redis)
        return f"Engine({where!r}, prefix={self.prefix!r}, queue={self.queue_name!r})"

    # -- workflows ----------------------------------------------------------------

    def register(
        self,
        cls: type[W],
        name: str | None = None,
        *,
        concurrency: int | None = None,
        rate_limit: Mapping[str, Any] | None = None,
    ) -> Workflow[W]:
        """Make ``cls`` runnable under ``name`` (default: the class name).

        Registering a name again replaces the class, so re-running a notebook cell
        that redefines a workflow uses the new definition for new runs.

        ``concurrency``: at most that many instances running at once, across every
        worker; ``rate_limit={"limit": 50, "period": "1 minute"}``: at most 50 starts
        per period; both count per ``concurrency_key`` of ``create`` when given
        (spec 10.2, ``nbflow.limits``).  They are stored in Redis, so they bind every
        worker and engine, also those that register the class without limits:
        registering without limits leaves the stored ones; registering with either
        replaces both (``Workflow.set_limits()`` with no arguments removes them).
        """
        conc, rate = check_limits(concurrency, rate_limit)
        if not isinstance(cls, type) or not callable(getattr(cls, "run", None)):
            raise TypeError(
                f"register() takes a WorkflowEntrypoint subclass with a run(event, step) "
                f"method, not {cls!r}"
            )
        wf_name = cls.__name__ if name is None else name
        try:
            check_instance_id(wf_name)
        except (TypeError, ValueError):
            raise ValueError(
                f"invalid workflow name {wf_name!r}: use letters, digits, '_' and '-' "
                "(not starting with '-'), at most 100 characters"
            ) from None
        class_version(cls)  # a bad ``version`` attribute fails here, not at create
        if conc is not None or rate is not None:
            store_limits(self.backend, wf_name, conc, rate)
        self.backend.classes[wf_name] = cls
        return Workflow(self, wf_name)

    def workflow(self, name: str) -> Workflow[Any]:
        """The registered workflow called ``name``."""
        if name not in self.backend.classes:
            known = ", ".join(sorted(self.backend.classes)) or "none"
            raise WorkflowNotRegisteredError(
                f"no workflow named {name!r} is registered (registered: {known})"
            )
        return Workflow(self, name)

    @property
    def workflows(self) -> list[str]:
        """Names of the registered workflows."""
        return sorted(self.backend.classes)

    def instance(self, instance_id: str) -> WorkflowInstance:
        """A handle on any instance under this prefix, whatever its workflow."""
        check_instance_id(instance_id)
        name = self.redis.hget(self.keys.metadata(instance_id), "workflowName")
        if name is None:
            raise InstanceNotFoundError(f"no instance {instance_id!r} under prefix {self.prefix!r}")
        return WorkflowInstance(self, instance_id, text(name))

    # -- listing ------------------------------------------------------------------

    def instances(
        self, workflow: str | None = None, status: str | None = None, limit: int = 1000
    ) -> pd.DataFrame:
        """Instances newest first, as a DataFrame (read from indexes, never a key scan).

        Columns: id, workflow, status, created_at, updated_at, current_step,
        steps_done, error, version (the workflow's code version at creation), parent
        (the id of the instance that started it as a child with ``step.run_workflow``).
        """
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; statuses are {', '.join(STATUSES)}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be a non-negative int, not {limit!r}")
        if status is None and workflow is None:
            return _frame(list(self._rows(self._newest(limit))))
        if status is not None:
            index = self.keys.by_status(status)
        else:
            index = self.keys.by_workflow(str(workflow))
        rows: list[dict[str, Any]] = []
        start, page = 0, max(limit, 100)
        while len(rows) < limit:
            ids = [text(i) for i in self.redis.zrevrange(index, start, start + page - 1)]
            if not ids:
                break
            start += page
            for row in self._rows(ids):
                if workflow is None or row["workflow"] == workflow:
                    rows.append(row)
                    if len(rows) >= limit:
                        break
        return _frame(rows)

    def _newest(self, limit: int) -> list[str]:
        """The ``limit`` newest instances of any status: every instance sits in exactly
        one status index, so the newest of each, merged, are the newest of all."""
        if limit == 0:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for st in STATUSES:
            pipe.zrevrange(self.keys.by_status(st), 0, limit - 1, withscores=True)
        merged = [(score, text(iid)) for part in pipe.execute() for iid, score in part]
        merged.sort(reverse=True)
        return [iid for _, iid in merged[:limit]]

    def _rows(self, ids: Sequence[str]) -> Iterable[dict[str, Any]]:
        """Listing rows; a field that cannot be read (hand-edited, damaged, a key of the
        wrong type) is left empty in its own row, so one bad instance never hides the
        others (spec 12)."""
        pipe = self.redis.pipeline(transaction=False)
        for iid in ids:
            pipe.hmget(
                self.keys.state(iid), "status", "createdAt", "updatedAt", "error", "stepsDone"
            )
            pipe.hmget(self.keys.metadata(iid), "workflowName", "currentStep", "version", "parent")
        res = pipe.execute(raise_on_error=False)
        for n, iid in enumerate(ids):
            st, meta = res[2 * n], res[2 * n + 1]
            st = [None] * 5 if isinstance(st, Exception) else st
            meta = [None] * 2 if isinstance(meta, Exception) else meta
            if all(v is None for v in st) and isinstance(res[2 * n], list):
                continue  # deleted between the index read and now
            yield {
                "id": iid,
                "workflow": lenient(text, meta[0]),
                "status": lenient(text, st[0]),
                "created_at": _timestamp(st[1]),
                "updated_at": _timestamp(st[2]),
                "current_step": lenient(text, meta[1]) or None,
                "steps_done": 0 if st[4] is None else lenient(int, st[4]),
                "error": lenient(codec.decode, st[3]) if st[3] else None,
                "version": lenient(text, meta[2]) or None,
                "parent": lenient(text, meta[3]),
            }

    # -- schedules (nbflow.schedules) ---------------------------------------------

    def schedule(
        self,
        workflow: Workflow[Any] | str,
        cron: str,
        *,
        name: str | None = None,
        params: Any = None,
        timezone: str = "UTC",
        overlap: str = "skip",
    ) -> Schedule[WorkflowInstance]:
        """Start ``workflow`` on every tick of ``cron`` (croniter syntax, in ``timezone``).

        Each tick creates one instance, id ``{name}-{tick in UTC as YYYYMMDDTHHMMSS}``,
        however many engines and workers run; any worker on this prefix fires the
        ticks.  ``name`` defaults to the workflow's name; calling this again with the
        same name updates that schedule.  ``overlap="skip"`` skips a tick while the
        schedule's previous instance is unfinished, ``"allow"`` does not.  Ticks missed
        while nothing ran are not made up (``Schedule.backfill`` does that on request).
        Details and the choices made: ``nbflow.schedules``.
        """
        if isinstance(workflow, Workflow):
            if workflow.engine.prefix != self.prefix:
                raise ValueError(
                    f"workflow {workflow.name!r} belongs to an engine with prefix "
                    f"{workflow.engine.prefix!r}, not {self.prefix!r}"
                )
            wf_name = workflow.name
        elif isinstance(workflow, str):
            wf_name = workflow
        else:
            raise TypeError(
                f"schedule() takes a Workflow or the name of a registered one, not {workflow!r}"
            )
        if wf_name not in self.backend.classes:
            known = ", ".join(sorted(self.backend.classes)) or "none"
            raise ValueError(
                f"cannot schedule unknown workflow {wf_name!r}: register it on this engine "
                f"first (registered: {known})"
            )
        return _schedules.put(
            self.backend,
            wf_name,
            cron,
            self._instance_handle,
            name=name,
            params=params,
            timezone=timezone,
            overlap=overlap,
        )

    def get_schedule(self, name: str) -> Schedule[WorkflowInstance]:
        """The schedule called ``name`` (made by any engine on this prefix); ``LookupError``
        if there is none."""
        return _schedules.get(self.backend, name, self._instance_handle)

    def schedules(self) -> pd.DataFrame:
        """Every schedule, by name: name, workflow, cron, timezone, overlap, paused,
        next_run, last_run (UTC timestamps), last_instance, and the counters fired,
        skipped, missed, triggered, backfilled."""
        return _schedules.listing(self.backend)

    def _instance_handle(self, iid: str, workflow: str) -> WorkflowInstance:
        return WorkflowInstance(self, iid, workflow)

    # -- workers ------------------------------------------------------------------

    def start_worker(self) -> ThreadWorker:
        """Start a worker thread in this process (runs notebook-defined classes too).

        It runs every workflow registered on this engine, before or after it started.
        Calling it while a worker runs returns that worker.
        """
        with self._worker_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = ThreadWorker(self.backend)
                self._worker.start()
            return self._worker

    def stop_worker(self, timeout: float = 10.0) -> None:
        """Stop the in-process worker; it takes no more work once this returns.

        A step already running is left to finish in the background; its instance is
        handed back to the queue at its next step.
        """
        with self._worker_lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop(timeout)

    @property
    def worker_running(self) -> bool:
        """Whether this engine's in-process worker (``start_worker``) is running."""
        worker = self._worker
        return worker is not None and worker.is_alive()

    def run_worker(self, burst: bool = True) -> int:
        """Work in the foreground; with ``burst`` return when nothing is due any more.

        Returns how many RQ jobs were run.
        """
        return run_foreground(self.backend, burst=burst)

    # -- internals used by workflows and instances ----------------------------------

    def _done_listener(self) -> _DoneListener:
        """This thread's listener for ``wait()`` (see ``_DoneListener``)."""
        listener: _DoneListener | None = getattr(self._waiters, "listener", None)
        if listener is None:
            listener = self._waiters.listener = _DoneListener(self.redis)
        return listener

    def _drop_done_listener(self) -> None:
        listener: _DoneListener | None = getattr(self._waiters, "listener", None)
        self._waiters.listener = None
        if listener is not None:
            listener.pubsub.close()

    def _lifecycle(
        self,
        script: str,
        iid: str,
        extra: Sequence[str] = (),
        enqueue: str | None = None,
    ) -> str:
        """Runs a lifecycle script; ``enqueue`` names the instance's workflow when the
        script may queue it (its job goes on that workflow's queue, in the same MULTI)."""
        now, now_iso = _now()

        def job(pipe: Any) -> None:
            assert enqueue is not None
            self.backend.enqueue([iid], enqueue, at_front=True, pipe=pipe)

        rid = uuid.uuid4().hex  # names the call's ack list and its request key
        ack = self.keys.ack(rid)
        res = self.backend.scripts.execute(
            [(script, [self.prefix, iid, now, now_iso, *extra, ack])],
            job if enqueue is not None else None,
            once=self.keys.request(rid),
        )[0]
        tag, value = text(res[0]), text(res[1])
        if tag == "ok":
            # terminate and restart: {ok, status, heard, parent to wake or '', URLs...}
            if len(res) > 3 and res[3]:  # a child ended: its waiting parent is queued
                self.backend.enqueue_many([text(res[3])], at_front=True)
            if len(res) > 4:  # artifacts no reference names any more
                self.backend.artifacts.delete(res[4:])
            if len(res) > 2 and int(res[2]) > 0:
                handshake.await_stop(self.backend, iid, script, ack)
            return value
        if value == "unknown":
            raise InstanceNotFoundError(f"no instance {iid!r} under prefix {self.prefix!r}")
        if tag == "nostep":
            raise ValueError(f"instance {iid!r} has no step {value!r}")
        if tag == "badstep":
            raise _UnreadableStep(
                f"the stored entry of step {value!r} of instance {iid!r} cannot be read, so "
                "nbflow cannot tell which steps came before it; restart from another step, "
                "or restart() to run every step again"
            )
        raise InvalidStateError(value)


class _UnreadableStep(ValueError):
    """restart(from_step) of a step whose stored entry nbflow cannot read."""


def _timestamp(raw: Any) -> pd.Timestamp | Any:
    """A stored ISO time as a ``pd.Timestamp``, ``NaT`` when it cannot be read."""
    value = lenient(iso_datetime, raw)
    return pd.NaT if value is None else pd.Timestamp(value)


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The listing's DataFrame; ``steps_done`` stays integer when one is unreadable
    (pandas' nullable ``Int64`` then, instead of floats)."""
    frame = pd.DataFrame(rows, columns=INSTANCE_COLUMNS)
    if any(row["steps_done"] is None for row in rows):
        frame["steps_done"] = frame["steps_done"].astype("Int64")
    return frame


class _DoneListener:
    """One thread's pubsub connection for ``wait()``, kept between waits: a new
    connection per wait costs a connect and its handshake every time.

    A wait that returned from ``status()`` may leave its instance's `done` message
    unread; Redis sends it before the confirmation of the wait's UNSUBSCRIBE, so
    the next wait first reads up to that confirmation and drops what comes before.
    """

    def __init__(self, client: redis_lib.Redis) -> None:
        self.pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        self.leaving: bytes | None = None

    def enter(self, channel: bytes) -> Any:
        deadline = time.monotonic() + 2.0
        while self.leaving is not None:
            msg = self.pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if msg is None and time.monotonic() >= deadline:
                raise redis_lib.TimeoutError("no confirmation of UNSUBSCRIBE")
            if msg is not None and msg["type"] == "unsubscribe" and msg["channel"] == self.leaving:
                self.leaving = None
        self.pubsub.subscribe(channel)
        return self.pubsub

    def leave(self, channel: bytes) -> None:
        self.pubsub.unsubscribe(channel)
        self.leaving = channel


class Workflow(Generic[W]):
    """A registered workflow: creates and finds its instances."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.name = name

    def __repr__(self) -> str:
        return f"Workflow({self.name!r})"

    def _prepare(self, instance_id: Any, params: Any) -> tuple[str, str]:
        iid = uuid.uuid4().hex if instance_id is None else check_instance_id(instance_id)
        try:
            payload = codec.encode(params)
        except TypeError as exc:
            raise TypeError(f"params of instance {iid!r}: {exc}") from None
        if len(payload.encode()) > self.engine.max_step_bytes:
            raise ValueError(
                f"params of instance {iid!r} are larger than "
                f"max_step_bytes={self.engine.max_step_bytes}"
            )
        return iid, payload

    def _write(
        self, pairs: Sequence[tuple[str, str]], opts: Sequence[StartOptions] | None = None
    ) -> list[bool]:
        engine = self.engine
        now, now_iso = _now()
        retention = "" if engine.retention is None else f"{engine.retention:.6f}"
        cls = engine.backend.classes.get(self.name)
        version = "" if cls is None else class_version(cls)
        args = [engine.prefix, now, now_iso, self.name, retention, version]
        if opts is not None and all(o.default for o in opts):
            opts = None
        script = "create" if opts is None else "create_opts"
        # new instances to enqueue, per priority (delayed ones get none: wake_due queues them)
        by_priority: dict[int, list[str]] = {}
        for n, (iid, payload) in enumerate(pairs):
            args += [iid, payload]
            if opts is None:
                by_priority.setdefault(DEFAULT_PRIORITY, []).append(iid)
                continue
            args += opts[n].fields()
            if opts[n].start_at is None:
                by_priority.setdefault(opts[n].priority, []).append(iid)

        def jobs(pipe: Any) -> None:
            for priority, ids in by_priority.items():
                size = min(JOB_SIZE, max(MIN_JOB_SIZE, -(-len(ids) // 2)))
                for start in range(0, len(ids), size):
                    engine.backend.enqueue(
                        ids[start : start + size], self.name, pipe=pipe, priority=priority
                    )

        once = engine.keys.request()  # a resent transaction answers as the first one
        flags = engine.backend.scripts.execute([(script, args)], jobs, once=once)[0]
        return [bool(f) for f in flags]

    def set_limits(
        self, concurrency: int | None = None, rate_limit: Mapping[str, Any] | None = None
    ) -> None:
        """Replaces this workflow's stored limits (spec 10.2); with no arguments it
        removes them.  Held instances the new limits allow start at once."""
        conc, rate = check_limits(concurrency, rate_limit)
        store_limits(self.engine.backend, self.name, conc, rate)

    @property
    def limits(self) -> dict[str, Any]:
        """The limits stored for this workflow: ``{"concurrency": n or None,
        "rate_limit": {"limit": n, "period": seconds} or None}``."""
        return read_limits(self.engine.backend, self.name)

    def create(
        self,
        id: str | None = None,
        params: Any = None,
        *,
        priority: int = DEFAULT_PRIORITY,
        concurrency_key: str | None = None,
        start_at: datetime | float | None = None,
        delay: str | float | timedelta | None = None,
    ) -> WorkflowInstance:
        """Create an instance and queue it to run; ``id`` defaults to a fresh uuid4 hex.

        ``priority`` 0 (first) to 9 (last) orders it among queued instances of its
        workflow; ``concurrency_key`` makes the workflow's limits count per key;
        ``start_at`` (an aware datetime or epoch seconds) or ``delay`` (a duration)
        keeps it ``waiting`` until then, holding no worker (spec 10.2).

        Raises ``InstanceExistsError`` if an instance with that id exists.
        """
        opts = check_start(priority, concurrency_key, start_at, delay)
        iid, payload = self._prepare(id, params)
        if not self._write([(iid, payload)], [opts])[0]:
            raise InstanceExistsError(f"an instance with id {iid!r} already exists")
        return WorkflowInstance(self.engine, iid, self.name)

    def create_batch(self, items: Iterable[Mapping[str, Any]]) -> list[WorkflowInstance]:
        """Create many instances: ``[{"id"?: ..., "params"?: ...}, ...]``.

        Everything is checked before anything is written (duplicate ids in the batch
        raise ``ValueError``); ids that already exist are skipped and left out of the
        result, which keeps input order.  Written in chunks of ``BATCH_CHUNK``.
        """
        pairs: list[tuple[str, str]] = []
        opts: list[StartOptions] = []
        seen: set[str] = set()
        now = time.time()
        for n, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise TypeError(f"create_batch item {n} must be a dict with 'id' and/or 'params'")
            extra = set(item) - _BATCH_KEYS
            if extra:
                raise ValueError(
                    f"create_batch item {n} has unknown key(s) {sorted(extra)}; allowed: "
                    + ", ".join(sorted(_BATCH_KEYS, key=_BATCH_ORDER.index))
                )
            try:
                opt = check_start(
                    item.get("priority", DEFAULT_PRIORITY),
                    item.get("concurrency_key"),
                    item.get("start_at"),
                    item.get("delay"),
                    now,
                )
            except OptionTypeError as exc:
                raise OptionTypeError(f"create_batch item {n}: {exc}") from None
            except ValueError as exc:
                raise ValueError(f"create_batch item {n}: {exc}") from None
            iid, payload = self._prepare(item.get("id"), item.get("params"))
            if iid in seen:
                raise ValueError(f"create_batch: id {iid!r} appears more than once in the batch")
            seen.add(iid)
            pairs.append((iid, payload))
            opts.append(opt)
        created: list[WorkflowInstance] = []
        for start in range(0, len(pairs), BATCH_CHUNK):
            chunk = pairs[start : start + BATCH_CHUNK]
            written = self._write(chunk, opts[start : start + BATCH_CHUNK])
            for (iid, _), ok in zip(chunk, written, strict=True):
                if ok:
                    created.append(WorkflowInstance(self.engine, iid, self.name))
        return created

    def get(self, id: str) -> WorkflowInstance:
        """The instance with this id; ``InstanceNotFoundError`` if this workflow has none."""
        check_instance_id(id)
        name = self.engine.redis.hget(self.engine.keys.metadata(id), "workflowName")
        if name is None or text(name) != self.name:
            raise InstanceNotFoundError(f"workflow {self.name!r} has no instance {id!r}")
        return WorkflowInstance(self.engine, id, self.name)


class WorkflowInstance:
    """A handle on one instance: status, lifecycle calls, events and step results."""

    def __init__(self, engine: Engine, id: str, workflow: str) -> None:
        self.engine = engine
        self.id = id
        self.workflow = workflow

    def __repr__(self) -> str:
        return f"WorkflowInstance(id={self.id!r}, workflow={self.workflow!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, WorkflowInstance)
            and other.id == self.id
            and other.engine.prefix == self.engine.prefix
        )

    def __hash__(self) -> int:
        return hash((self.engine.prefix, self.id))

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        """Notebook display: a status card (stable text, HTML, live widget in a kernel)."""
        bundle: dict[str, Any] | None = reprs.render(
            "instance_mimebundle", self, include=include, exclude=exclude
        )
        return {"text/plain": repr(self)} if bundle is None else bundle

    def _repr_html_(self) -> str | None:
        """The static HTML status card (for tools that only ask for HTML)."""
        html: str | None = reprs.render("instance_html", self)
        return html

    def status(self) -> InstanceStatus:
        """``{"status": s}``, plus ``output`` when complete and ``error`` when errored
        (and ``rollback``, ``{"status", "steps"}``, when its rollbacks ran)."""
        st, output, error, rollback = self.engine.redis.hmget(
            self.engine.keys.state(self.id), "status", "output", "error", "rollback"
        )
        return self._loaded(instance_status(st, output, error, rollback))

    def _loaded(self, status: InstanceStatus) -> InstanceStatus:
        """The status with an output stored as an artifact read back (checked)."""
        if isinstance(status.get("output"), codec.ArtifactRef):
            what = f"the output of instance {self.id!r}"
            status["output"] = self.engine.backend.artifacts.load(status["output"], what)
        return status

    def info(self) -> dict[str, Any]:
        """A cheap summary in one round trip (what listings and live cards show).

        Keys: id, workflow, status, current_step, steps_done, created_at,
        updated_at, version (the workflow's code version recorded at creation),
        waiting_for, and output (when complete) or error (when errored).
        ``waiting_for`` says what a queued instance waits for when no running worker
        has its workflow (``"a worker with workflow 'X'"``), else None.  Step
        results are not read, so this stays cheap however large they are.
        Also ``steps_expected``: how many steps the last completed instance of this
        workflow did (None before one completed), for "3/7 steps"; and ``progress``
        (0-1) and ``progress_message``: what the current step last reported with
        ``ctx.progress`` while the instance runs (else None).
        """
        keys = self.engine.keys
        pipe = self.engine.redis.pipeline(transaction=False)
        pipe.hmget(
            self.engine.keys.state(self.id),
            "status",
            "createdAt",
            "updatedAt",
            "stepsDone",
            "output",
            "error",
        )
        pipe.hmget(self.engine.keys.metadata(self.id), "currentStep", "version")
        # live workers that run this workflow (entries hold until their expiry)
        pipe.zcount(self.engine.keys.serving(self.workflow), time.time(), "+inf")
        pipe.hget(keys.stepcount, self.workflow)
        pipe.hget(keys.progress(self.id), "@last")
        state, (current, version), served, expected, last = pipe.execute()
        status, created, updated, done, output, error = state
        info: dict[str, Any] = {"id": self.id, "workflow": self.workflow}
        if status is None:
            return {**info, "status": "unknown", "waiting_for": None}
        waits = text(status) == "queued" and not served
        info.update(  # unreadable fields are left empty, as in listings
            status=text(status),
            current_step=lenient(text, current) or None,
            steps_done=0 if done is None else lenient(int, done),
            created_at=_timestamp(created),
            updated_at=_timestamp(updated),
            version=lenient(text, version) or None,
            waiting_for=routing.waiting_for(self.workflow) if waits else None,
            steps_expected=None if expected is None else lenient(int, expected),
            progress=None,
            progress_message=None,
        )
        if last is not None and info["status"] in ("running", "waitingForPause"):
            reported = decode_progress(last)
            if split_key(str(reported.get("k", "#0")))[0] == info["current_step"]:
                info.update(progress=reported.get("p"), progress_message=reported.get("m"))
        ended = instance_status(status, output, error)
        info.update((k, summarized(v)) for k, v in ended.items() if k != "status")
        return info

    def _call(
        self, script: str, allowed: str, enqueue: bool = False, extra: Sequence[str] = ()
    ) -> str:
        try:
            return self.engine._lifecycle(
                script, self.id, extra, enqueue=self.workflow if enqueue else None
            )
        except InvalidStateError as exc:
            raise InvalidStateError(
                f"cannot {script} instance {self.id!r}: it is {exc.args[0]}; "
                f"{script} works from {allowed}"
            ) from None

    def pause(self) -> None:
        """Pause: no new step starts; a running step finishes and is stored first.

        Works from queued, running or waiting; afterwards the status is
        ``waitingForPause`` (a step is finishing) or ``paused``.  For a running
        instance it returns once the worker running it has promised to start no
        new step (the stop handshake; at most ``handshake.STOP_ACK_TIMEOUT``
        seconds, after which the step scripts enforce the pause themselves).
        """
        self._call("pause", "queued, running or waiting")

    def resume(self) -> None:
        """Resume a paused instance where it stopped (from paused or waitingForPause)."""
        self._call("resume", "paused or waitingForPause", enqueue=True)

    def terminate(self) -> None:
        """Stop for good: nothing of the instance runs afterwards; timers and waits go.

        For a running instance it returns once the worker running it has promised
        to start no new step (as ``pause``); a step already running cannot be
        interrupted, and its result is not stored.
        """
        self._call("terminate", "any status but complete, errored or terminated")

    def restart(self, from_step: str | None = None) -> None:
        """Run again with the same params, from any status.

        Without ``from_step`` every step result is dropped.  With ``from_step="name"``
        (or ``"name#3"``, its 3rd occurrence) the steps that ran before it keep their
        results and that step and all after it run again.
        """
        key = "" if from_step is None else step_key(from_step)
        try:
            self.engine._lifecycle("restart", self.id, [key], enqueue=self.workflow)
        except _UnreadableStep:
            raise
        except ValueError:
            known = list(dict.fromkeys(split_key(k)[0] for k, _ in self._entries()))
            raise ValueError(
                f"instance {self.id!r} has no step {from_step!r} to restart from "
                f"(its steps, in run order: {', '.join(known) or 'none'})"
            ) from None

    def send_event(self, type: str, payload: Any = None) -> None:
        """Send an event; a ``wait_for_event`` of that type receives it (now or later).

        Events are kept per type in order until consumed.  Raises
        ``InvalidStateError`` if the instance is complete, errored or terminated.
        """
        check_event_type(type)
        store = self.engine.backend.artifacts
        written: str | None = None
        try:
            if store.large_frame(payload):
                event = ""
            else:
                event = event_json(type, payload)
            if not event or store.over_threshold(len(event.encode())):
                what = f"an event {type!r} sent to instance {self.id!r}"
                ref_json, written, _ = store.write(payload, self.id, what)
                event = event_json(type, codec.decode(ref_json))
        except TypeError as exc:
            raise TypeError(f"event payload: {exc}") from None
        if written is None and len(event.encode()) > self.engine.max_step_bytes:
            raise ValueError(
                f"event payload is larger than max_step_bytes={self.engine.max_step_bytes}"
            )
        now, now_iso = _now()
        try:
            res = text(
                self.engine.backend.scripts.send_event(
                    keys=[self.engine.keys.request()],  # a resend buffers no second copy
                    args=[self.engine.prefix, self.id, type, event, now, now_iso],
                )
            )
        except BaseException:
            if written is not None:
                store.delete([written])
            raise
        if written is not None and res not in ("woken", "buffered"):
            store.delete([written])  # refused: nothing refers to it
        if res == "unknown":
            raise InstanceNotFoundError(
                f"no instance {self.id!r} under prefix {self.engine.prefix!r}"
            )
        if res in FINAL_STATUSES:
            raise InvalidStateError(
                f"cannot send an event to instance {self.id!r}: it is {res}; events go to "
                "instances that are not complete, errored or terminated"
            )
        if res == "woken":
            self.engine.backend.enqueue([self.id], self.workflow, at_front=True)

    def wait(self, timeout: float | None = None) -> InstanceStatus:
        """Block until complete, errored or terminated; returns ``status()``.

        Raises ``TimeoutError`` if ``timeout`` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        # The scripts that end an instance publish its final status on its `done`
        # channel, so a waiter wakes the moment it ends instead of polling; it still
        # re-reads the status every second in case a message was missed (a reconnect).
        # In a notebook the wait also lets the kernel handle widget messages every 0.1 s
        # (nbflow.reprs.waiting), so dashboard clicks take effect while a cell waits.
        listener = self.engine._done_listener()
        channel = self.engine.keys.done(self.id).encode()
        try:
            with reprs.waiting() as between:
                pubsub = listener.enter(channel)
                status = self.status()  # after subscribing: an end now cannot be missed
                polled = time.monotonic()
                while status["status"] not in FINAL_STATUSES and status["status"] != "unknown":
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(
                            f"instance {self.id!r} is still {status['status']} "
                            f"after {timeout} seconds"
                        )
                    between()
                    msg = pubsub.get_message(timeout=0.1 if left is None else min(left, 0.1))
                    if msg is None:
                        if time.monotonic() - polled >= 1.0:
                            status, polled = self.status(), time.monotonic()
                    elif msg["type"] == "message" and msg["channel"] == channel:
                        published = published_status(msg["data"])
                        if published is None or published["status"] == "errored":
                            status = self.status()  # errored: with its rollback report, if any
                        else:
                            status = self._loaded(published)
        except BaseException:  # a timeout, an interrupt: start afresh next time
            self.engine._drop_done_listener()
            raise
        listener.leave(channel)
        return status

    def _entries(self) -> list[tuple[str, dict[str, Any]]]:
        """Step entries in run order, their start times as epochs again."""
        return self._read_steps()[0]

    def _read_steps(
        self, seen_key: str | None = None, with_progress: bool = False
    ) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, str], dict[str, dict[str, Any]]]:
        """Step entries in run order and, in the same round trip, the fingerprints hash
        ``seen_key`` (see ``nbflow.store.Keys.fingerprints``) and, if asked, each
        step's last reported progress."""
        pipe = self.engine.redis.pipeline(transaction=False)
        pipe.hgetall(self.engine.keys.steps(self.id))
        pipe.hget(self.engine.keys.state(self.id), "createdAt")
        if seen_key is not None:
            pipe.hgetall(seen_key)
        else:
            pipe.echo("")  # keeps the replies' positions
        if with_progress:
            pipe.hgetall(self.engine.keys.progress(self.id))
        raw, created, seen_raw, *more = pipe.execute()
        base = datetime.fromisoformat(text(created)).timestamp() if created else 0.0
        entries = [(text(k), decode_entry(k, v, base)) for k, v in raw.items()]
        entries.sort(key=lambda kv: int(kv[1]["i"]))
        seen = {text(k): text(v) for k, v in seen_raw.items()} if seen_key is not None else {}
        progress = {text(k): decode_progress(v) for k, v in (more[0] if more else {}).items()}
        return entries, seen, progress

    def steps(self) -> pd.DataFrame:
        """One row per step in the order they first started.

        Columns: step, kind, count, status, attempts, started_at, finished_at,
        duration_s, output, error, stale, progress, message.  ``stale`` is True for a
        completed step whose callback code (its own and that of the user functions it
        calls) differs in the class registered on this engine now from when it ran:
        found from the class's methods and the current globals by name, else from what
        a run with the current class saw when it passed the step
        (``nbflow.fingerprint``).  Without the class registered here, or when unknown,
        it is False.  ``progress`` (0-1) and ``message`` are what ``ctx.progress`` last
        reported (None when nothing was).  A result stored as an artifact is not
        loaded: its ``output`` is a summary such as ``DataFrame 1,000,000 × 12 (96 MB)``
        (``step_output`` loads it).
        """
        cls = self.engine.backend.classes.get(self.workflow)
        seen_key = None
        if cls is not None:
            seen_key = self.engine.keys.fingerprints(self.workflow, class_version(cls))
        entries, seen, progress = self._read_steps(seen_key, with_progress=True)
        rows = [step_row(key, e, progress.get(key)) for key, e in entries]
        for row, stale in zip(rows, stale_steps(cls, entries, seen), strict=True):
            row["stale"] = stale
        frame = pd.DataFrame(rows, columns=STEP_COLUMNS)
        for column in ("progress", "message"):  # None where nothing was reported, not NaN
            frame[column] = pd.Series([r[column] for r in rows], index=frame.index, dtype=object)
        outputs = [row["output"] for row in rows]
        if any(isinstance(v, codec.ArtifactSummary) for v in outputs):
            # as objects: a str column would drop the summaries' ``.ref``
            frame["output"] = pd.Series(outputs, index=frame.index, dtype=object)
        return frame

    def rerun_stale(self) -> None:
        """Restart from the first stale step (see ``steps()``), keeping the results of
        the steps before it: after redefining a function a step uses (say ``clean``
        in a notebook cell), this re-runs that step and everything after it.

        ``ValueError`` naming the instance when no step is stale;
        ``InstanceNotFoundError`` when there is no such instance.
        """
        steps = self.steps()
        stale = steps[steps["stale"].astype(bool)]
        if stale.empty:
            if not self.engine.redis.exists(self.engine.keys.state(self.id)):
                raise InstanceNotFoundError(
                    f"no instance {self.id!r} under prefix {self.engine.prefix!r}"
                )
            raise ValueError(
                f"instance {self.id!r} has no stale step: every completed step's code is "
                "what the registered class runs now (redefine a function or the class, "
                "register it, then rerun_stale)"
            )
        first = stale.iloc[0]
        self.restart(from_step=f"{first['step']}#{int(first['count'])}")

    def fork(
        self,
        from_step: str | None = None,
        *,
        id: str | None = None,
        params: Any = None,
    ) -> WorkflowInstance:
        """A new queued instance of the same workflow that starts with copies of this
        one's results of every step that completed before ``from_step`` (``"name"`` or
        ``"name#3"``; all completed steps when None), so only the steps from there on
        run (with the code registered now).  ``id``: a fresh uuid4 hex unless given;
        ``params``: this instance's unless given.  This instance is not changed, whatever
        its status.

        Raises ``InstanceExistsError`` (the id is taken), ``ValueError`` (a bad id, or a
        step this instance does not have: the message lists its step keys),
        ``InstanceNotFoundError`` (no such instance).
        """
        new_id = fork_instance(self.engine.backend, self.id, self.workflow, from_step, id, params)
        return WorkflowInstance(self.engine, new_id, self.workflow)

    def logs(self, step: str | None = None) -> pd.DataFrame:
        """What the workflow's code printed or logged while workers ran it (SPEC 8.3).

        Columns: time (UTC), step (None for lines ``run`` wrote between steps),
        stream (``stdout``, ``stderr`` or a log level such as ``INFO``), line; oldest
        first.  ``step="load"`` keeps the lines of every occurrence of that step,
        ``"load#2"`` those of its 2nd; a step that printed nothing gives no rows, a step
        the instance does not have ``ValueError`` naming its steps.  Each step keeps the
        last 64 KiB of its lines; a first line says how many older ones were dropped.
        """
        keys = self.engine.keys
        pipe = self.engine.redis.pipeline(transaction=False)
        pipe.exists(keys.state(self.id))
        pipe.hgetall(keys.logs(self.id))
        exists, raw = pipe.execute()
        if not exists:
            raise InstanceNotFoundError(
                f"no instance {self.id!r} under prefix {self.engine.prefix!r}"
            )
        fields = {text(k): text(v) for k, v in raw.items()}
        if step is not None:
            fields = self._log_fields_of(step, fields)
        rows = [row for field, value in fields.items() for row in log_rows(field, value)]
        rows.sort(key=lambda r: (r["t"], r["seq"]))
        frame = pd.DataFrame(rows, columns=["t", *LOG_COLUMNS[1:]], dtype=object)
        micros = (frame.pop("t").astype(float) * 1e6).round().astype("int64")
        frame.insert(0, "time", pd.to_datetime(micros, unit="us", utc=True))
        return frame

    def _log_fields_of(self, step: str, fields: dict[str, str]) -> dict[str, str]:
        """The log fields of step ``step`` (every occurrence of a bare name)."""
        key = step_key(step)
        wanted = {f: v for f, v in fields.items() if f == key or split_key(f)[0] == step}
        if wanted:
            return wanted
        known = [k for k, _ in self._entries()]
        if key in known or any(split_key(k)[0] == step for k in known):
            return {}  # the step ran and printed nothing
        labels = [log_label(k) for k in known]
        raise ValueError(
            f"instance {self.id!r} has no step {step!r} (its steps: "
            f"{', '.join(str(label) for label in labels) or 'none yet'})"
        )

    def step_output(self, name: str) -> Any:
        """The stored result of step ``name`` (``"name#2"`` for its 2nd occurrence).

        A DataFrame stays a DataFrame.  ``LookupError`` if that step has no result.  A
        result stored as an artifact is read here (checked against its sha256);
        ``ArtifactError`` naming the step and the URL if it is missing or corrupt.
        """
        key = step_key(name)
        raw = self.engine.redis.hget(self.engine.keys.steps(self.id), key)
        if raw is None:
            if not self.engine.redis.exists(self.engine.keys.state(self.id)):
                raise InstanceNotFoundError(
                    f"no instance {self.id!r} under prefix {self.engine.prefix!r}"
                )
            raise LookupError(f"instance {self.id!r} has no step {name!r}")
        entry = codec.decode(raw)
        assert isinstance(entry, dict)
        if entry["s"] == "errored":
            err = rebuild_error(entry.get("e") or {})
            raise LookupError(
                f"step {name!r} of instance {self.id!r} failed: {type(err).__name__}: {err}"
            )
        if entry["s"] != "complete":
            raise LookupError(
                f"step {name!r} of instance {self.id!r} has no result yet ({entry['s']})"
            )
        what = f"step {name!r} of instance {self.id!r}"
        return self.engine.backend.artifacts.resolve(entry.get("v"), what)

    def history(self) -> list[dict[str, Any]]:
        """The instance's events in time order: created, step started / finished /
        retried / failed, waits and wake-ups, events sent and received, lifecycle
        calls, and how it ended.

        Events another key already records (creation, each step's start and finish,
        completion) are not stored twice: they are rebuilt here from the state and
        the step entries.
        """
        keys = self.engine.keys
        pipe = self.engine.redis.pipeline(transaction=False)
        pipe.hmget(keys.state(self.id), "createdAt", "status", "updatedAt")
        pipe.lrange(keys.history(self.id), 0, -1)
        (created, status, updated), stored = pipe.execute()
        first: list[dict[str, Any]] = []
        if created is not None:
            first.append({"t": datetime.fromisoformat(text(created)).timestamp(), "ev": "created"})
        middle: list[dict[str, Any]] = []
        for key, e in self._entries():
            t0 = e.get("t0")
            if t0 is None:
                continue
            kind = e.get("k", "do")
            start = "step.started" if kind == "do" else f"{kind}.started"
            middle.append({"t": float(t0), "ev": start, "step": key})
            if e["s"] == "complete" and e.get("d") is not None:
                done = {"do": "step.finished", "sleep": "slept", "event": "event.received"}.get(
                    kind,
                    f"{kind}.finished",  # a child's end (workflow), a rollback
                )
                entry: dict[str, Any] = {"t": float(t0) + float(e["d"]), "ev": done, "step": key}
                if int(e.get("a", 1)) != 1:
                    entry["attempt"] = int(e["a"])
                middle.append(entry)
        for raw in stored:
            item = codec.decode(raw)
            assert isinstance(item, dict)
            if item.get("ev") != "event.received":  # rebuilt above from the entry
                middle.append(item)
        # Times are kept to the millisecond, so events of one millisecond keep the
        # order they were gathered in (a step starts before it finishes).
        order = {id(item): n for n, item in enumerate(middle)}
        middle.sort(key=lambda item: (float(item["t"]), order[id(item)]))
        last: list[dict[str, Any]] = []
        if status is not None and text(status) == "complete":
            ended = datetime.fromisoformat(text(updated)).timestamp()
            latest = max((float(item["t"]) for item in middle), default=ended)
            last.append({"t": max(ended, latest), "ev": "complete"})
        return first + middle + last
