"""Workers: RQ's ``SimpleWorker`` running nbflow jobs inline (no fork per job), plus
the housekeeping every worker does beside it.  A worker is given an engine's
``Backend`` (``engine.backend``), never the engine itself.

* ``NbflowWorker`` dequeues RQ jobs and runs them in its own thread, so a step
  runs in the worker process and a notebook-defined class is reachable.  It
  listens to the queues of the workflows registered in its process, following
  ``engine.register`` calls made after it started (``nbflow.routing``).
* ``Housekeeper`` (a thread next to each worker) wakes instances whose timer
  is due, renews the leases of runs in progress, takes back instances whose
  worker died (expired lease), re-dispatches queued instances whose RQ job was
  lost, deletes instances past their retention, and fires the ticks of cron
  schedules that are due (``nbflow.schedules``).
* a ``StopListener`` (``nbflow.handshake``, a thread next to each worker) hears
  ``pause()``, ``terminate()`` and ``restart()`` of the instances the worker
  advances and promises that no new step of them starts.
* ``ThreadWorker`` is the in-process worker behind ``engine.start_worker()``;
  ``run_foreground`` is ``engine.run_worker()``; ``serve`` is ``nbflow worker``.

Every worker installs ``nbflow.capture`` when it starts (and each job checks it again),
so what workflow code prints or logs lands in its instance's log, never in a notebook
cell or the worker's console.
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
import weakref
import zlib
from typing import Any

import redis
from rq import worker_registration
from rq.exceptions import StopRequested
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty
from rq.worker import SimpleWorker, WorkerStatus
from rq.worker_registration import clean_worker_registry

from nbflow import capture, runner, schedules
from nbflow.backend import JOB_FUNCTION, Backend
from nbflow.handshake import StopListener
from nbflow.routing import Routes, hand_back
from nbflow.store import LEASE_SECONDS, clock

log = logging.getLogger("nbflow")

WAKE_INTERVAL = 0.05  # how often due timers are looked for
HEARTBEAT_INTERVAL = LEASE_SECONDS / 3
SWEEP_INTERVAL = 5.0  # expired leases, lost dispatches, retention
ORPHAN_AGE = 10.0  # a queued instance with no RQ job for this long is dispatched again
WORKER_HEARTBEAT = 10.0  # seconds between RQ worker-key heartbeats
EXIT_GRACE = 2.0  # at interpreter exit: how long runs get to hand back by themselves
ADMITTED_PER_RUN = 50  # held instances admitted by freed slots, run together at most


class NbflowWorker(SimpleWorker):
    """An RQ worker that runs nbflow jobs inline against one engine's ``Backend``.

    It registers, heartbeats and dies like any RQ worker (``rq info`` lists it,
    with its state), and takes jobs from the RQ queue; but it runs nbflow's jobs
    without RQ's per-job bookkeeping (started/finished registries, results,
    execution records: about twenty round trips a job).  nbflow does not need
    it: leases in ``nbflow.store`` are its recovery, and its jobs store no result.
    A job costs the BLPOP that takes it and one script that reads and deletes it,
    marks the worker busy and claims its first instance (``runner.take_job``); the
    ``idle`` state it owes goes out with the next BLPOP.

    ``in_thread`` workers (notebooks) install no signal handlers and add no log
    handlers (a background thread must never print into a cell); every worker
    polls in short slices so a stop request is honoured within a moment, and a
    workflow registered meanwhile adds its queue within one slice.
    """

    death_penalty_class = TimerDeathPenalty  # nbflow jobs have no RQ timeout; never SIGALRM

    def __init__(
        self, backend: Backend, *, in_thread: bool = False, stopping: threading.Event | None = None
    ) -> None:
        super().__init__([backend.base_queue], connection=backend.redis, serializer=JSONSerializer)
        self.backend = backend
        self.routes = Routes(backend, self.name)
        self._registered = False
        self._follow_routes()
        self.listener: StopListener | None = None
        self.in_thread = in_thread
        self.stopping = stopping or threading.Event()
        self.jobs_run = 0
        self._idle_owed = False  # a job ended: the worker's `idle` state is still to write

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        if not self.in_thread:
            super().bootstrap(*args, **kwargs)
            return
        # No pubsub command channel: its thread takes a second to stop, and an
        # in-process worker is stopped with engine.stop_worker(), not `rq` commands.
        self.register_birth()
        self.set_state(WorkerStatus.STARTED)

    def register_birth(self) -> None:
        super().register_birth()  # type: ignore[no-untyped-call]
        self._registered = True
        self.routes.advertise()
        log.info("nbflow worker %s: listening to queues %s", self.name, self.routes.describe())

    def register_death(self) -> None:
        try:
            self.routes.withdraw()
        finally:
            super().register_death()  # type: ignore[no-untyped-call]

    def _follow_routes(self) -> list[str]:
        """The queue keys to BLPOP, after following workflows registered since the
        last call (then the worker is registered on their queues too, for ``rq info``)."""
        if self.routes.refresh():
            self.queues = list(self.routes.queues)
            self._ordered_queues = self.queues[:]
            if self._registered:
                pipe = self.connection.pipeline(transaction=False)
                worker_registration.register(self, pipe)
                pipe.hset(self.key, "queues", ",".join(self.queue_names()))
                pipe.execute()
                self.routes.advertise()
                log.info(
                    "nbflow worker %s: now listening to queues %s",
                    self.name,
                    self.routes.describe(),
                )
        return self.routes.keys

    def _install_signal_handlers(self) -> None:
        if not self.in_thread:
            super()._install_signal_handlers()  # type: ignore[no-untyped-call]

    def work(
        self, burst: bool = False, logging_level: str | None = "INFO", *_: Any, **__: Any
    ) -> bool:
        """Take jobs until stopped (or, with ``burst``, until the queue is empty)."""
        self.bootstrap(logging_level)
        self._install_signal_handlers()
        # what workflow code prints or logs goes to its instance's log, not to a cell
        capture.install()
        listener = self.listener = StopListener(self.backend)
        listener.start()
        slice_s = 0.2 if self.in_thread else 1.0
        next_beat = 0.0
        backoff = 0.5
        try:
            while not (self._stop_requested or self.stopping.is_set()):
                try:
                    if time.monotonic() >= next_beat:
                        self.heartbeat()
                        self.routes.advertise()
                        next_beat = time.monotonic() + WORKER_HEARTBEAT
                    keys = self._follow_routes()
                    if burst:
                        job_id = None
                        for key in keys:
                            job_id = self.connection.lpop(key)  # (key: where it came from)
                            if job_id is not None:
                                break
                        if job_id is None:
                            break
                    else:
                        popped = self._blpop(keys, slice_s)
                        if popped is None:
                            continue
                        self.routes.rotate(popped[0])
                        got, job_id = popped
                        key = got.decode() if isinstance(got, bytes) else str(got)
                    backoff = 0.5
                    source = key
                    job = job_id.decode() if isinstance(job_id, bytes) else str(job_id)
                    if source in self.routes.go_keys:
                        self._run_admitted(source, job)
                    else:
                        self._run_job(job)
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    # Redis is away (restarting, network cut): wait and try again; the
                    # instances this worker held are taken back by their leases if needed
                    log.warning(
                        "nbflow worker: Redis unavailable (%s); retrying in %.1fs", exc, backoff
                    )
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
                    next_beat = 0.0
        except StopRequested:
            pass
        finally:
            listener.stop()
            try:
                self._say_idle()
                self.teardown()  # type: ignore[no-untyped-call]
            except redis.RedisError:
                log.warning("nbflow worker: could not register its death (Redis unavailable)")
        return self.jobs_run > 0

    def _blpop(self, keys: list[str], timeout: float) -> Any:
        """BLPOP ``keys``; the worker's ``idle`` state owed by the last job goes in the same
        round trip (a worker between two jobs spends one round trip less)."""
        if not self._idle_owed:
            return self.connection.blpop(keys, timeout=timeout)
        pipe = self.connection.pipeline(transaction=False)
        self._idle_state(pipe)
        pipe.blpop(keys, timeout=timeout)
        popped = pipe.execute()[-1]
        self._idle_owed = False
        return popped

    def _idle_state(self, pipe: Any) -> None:
        pipe.hset(self.key, "state", WorkerStatus.IDLE.value)
        pipe.hdel(self.key, "current_job", "nbflow_job")

    def _say_idle(self) -> None:
        """Writes the ``idle`` state a finished job owes, when no BLPOP carried it."""
        if self._idle_owed:
            pipe = self.connection.pipeline(transaction=False)
            self._idle_state(pipe)
            pipe.execute()
            self._idle_owed = False

    def _run_admitted(self, key: str, first: str) -> None:
        """Runs held instances that a freed slot admitted (spec 10.2): their ids come
        on the workflow's ``go`` list rather than in an RQ job; the ones already there
        are taken along (one more round trip) and run together like a job's ids."""
        more: Any = self.connection.lpop(key, ADMITTED_PER_RUN - 1) or []
        ids = [first, *(m.decode() if isinstance(m, bytes) else str(m) for m in more)]
        try:
            runner.run_many(self.backend, ids, self.stopping, self.listener)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:  # the instances stay leased (or queued: the orphan sweep)
            log.exception("nbflow worker: admitted instances %s failed", ids[:3])
        finally:
            self.jobs_run += 1

    def _run_job(self, job_id: str) -> None:
        # The job hash is deleted as it is read: its instances' leases, not the job, are
        # what recovers them if this worker dies, and a SIGKILLed worker never reaches a
        # `finally` (its job hashes used to stay for ever).  nbflow's jobs are read,
        # deleted and their first instance claimed by one script (``runner.take_job``).
        try:
            taken = runner.take_job(self.backend, job_id, self.key, self.listener)
            ids, first = self._read_job(job_id) if taken is None else taken
            if ids:
                runner.run_many(self.backend, ids, self.stopping, self.listener, first)
        except (KeyboardInterrupt, SystemExit, redis.ConnectionError, redis.TimeoutError):
            raise  # Redis away: the work loop waits for it
        except Exception:
            # The instances stay leased; when the leases expire they are taken back.
            log.exception("nbflow worker: job %s failed", job_id)
        finally:
            self.jobs_run += 1
            self._idle_owed = True  # written with the next BLPOP (``_blpop``)

    def _read_job(self, job_id: str) -> tuple[list[str], None]:
        """The ids of a job ``take_job`` did not know (no nbflow meta), read as RQ wrote
        it and deleted in the same round trip; none for a job that is not nbflow's."""
        job_key = self.backend.base_queue.job_class.key_for(job_id)
        pipe = self.connection.pipeline(transaction=False)
        pipe.hget(job_key, "data")
        pipe.delete(job_key)
        pipe.hset(self.key, mapping={"state": WorkerStatus.BUSY.value, "current_job": job_id})
        data, _, _ = pipe.execute()
        if data is None:
            log.warning("nbflow worker: job %s vanished before it ran", job_id)
            return [], None
        func, _instance, args, _kwargs = json.loads(zlib.decompress(data))
        if func != JOB_FUNCTION:
            log.error("nbflow worker: job %s calls %s, not an nbflow job; dropped", job_id, func)
            return [], None
        prefix, ids = args
        if prefix != self.backend.prefix:
            raise RuntimeError(runner.wrong_prefix(prefix, self.backend.prefix))
        return list(ids), None


class Housekeeper(threading.Thread):
    """Timers, lease heartbeats and recovery for one engine (see module docstring)."""

    def __init__(
        self,
        backend: Backend,
        stopping: threading.Event,
        *,
        beats_only: bool = False,
        worker: NbflowWorker | None = None,
    ) -> None:
        super().__init__(name="nbflow-housekeeper", daemon=True)
        self.backend = backend
        self.stopping = stopping
        self.beats_only = beats_only  # a burst worker wakes and sweeps by itself
        #: the worker beside it, whose ``serving`` entries it renews with the leases
        #: (the worker itself cannot while a long step runs inline)
        self.worker = worker

    def run(self) -> None:
        next_beat = next_sweep = next_ticks = 0.0
        while not self.stopping.is_set():
            try:
                if self.beats_only:
                    self.heartbeat()
                    self.stopping.wait(HEARTBEAT_INTERVAL)
                    continue
                self.wake_due()
                if time.time() >= next_ticks:  # (wall clock: ticks are wall-clock times)
                    next_ticks = schedules.fire_due(self.backend)
                now = time.monotonic()
                if now >= next_beat:
                    self.heartbeat()
                    next_beat = now + HEARTBEAT_INTERVAL
                if now >= next_sweep:
                    self.sweep(ORPHAN_AGE)
                    next_sweep = now + SWEEP_INTERVAL
            except Exception:  # Redis down for a moment: log and keep going
                log.warning("nbflow housekeeping failed; retrying", exc_info=True)
                self.stopping.wait(1.0)
            self.stopping.wait(WAKE_INTERVAL)

    def wake_due(self) -> int:
        """Queue instances whose sleep, event timeout or retry wait is due."""
        now, now_iso = clock()
        b = self.backend
        woken = b.scripts.wake_due(
            keys=[b.keys.request()], args=[b.prefix, f"{now:.6f}", now_iso, 500]
        )
        return b.enqueue_routed(woken, at_front=True) if woken else 0

    def heartbeat(self) -> None:
        """Renew the leases of the runs this process is advancing (and the worker's
        claim to serve its workflows)."""
        if self.worker is not None:
            self.worker.routes.advertise()
        runs = dict(self.backend.runs)
        by_token: dict[str, list[str]] = {}
        for iid, token in runs.items():
            by_token.setdefault(token, []).append(iid)
        lease = f"{time.time() + LEASE_SECONDS:.6f}"
        for token, ids in by_token.items():
            self.backend.scripts.heartbeat(args=[self.backend.prefix, token, lease, *ids])

    def sweep(self, orphan_age: float) -> int:
        """Recover dead workers' instances, re-dispatch lost jobs, apply retention."""
        b = self.backend
        now, now_iso = clock()
        found = 0
        dead = b.scripts.reap(keys=[b.keys.request()], args=[b.prefix, f"{now:.6f}", now_iso, 500])
        if dead:
            log.warning("nbflow: taking back %d instance(s) from dead workers", len(dead) // 2)
            found += b.enqueue_routed(dead, at_front=True)
        # lost dispatches, for the workflows this process can run (another's would only
        # wait on their queue again; the processes that have them look after them)
        workflows = sorted(b.classes)
        if workflows:
            args = [b.prefix, f"{now - orphan_age:.6f}", f"{now:.6f}", "500"]
            for wf in workflows:
                args += [wf, " ".join(b.queue_keys(wf))]
            lost = b.scripts.orphans(keys=[b.keys.request()], args=args)
            if lost:
                found += b.enqueue_routed(lost)
            # held instances whose slot is free (limits raised, say): spec 10.2
            b.scripts.pump_held(args=[b.prefix, f"{now:.6f}", 100])
        purged = b.scripts.purge(args=[b.prefix, f"{now:.6f}", 500])
        if len(purged) > 1:  # artifacts no reference names any more: files after the script
            b.artifacts.delete(purged[1:])
        # RQ's own tidy-up of workers that died without saying so (what `rq info` lists)
        for queue in (b.base_queue, *(b.queue_for(wf) for wf in workflows)):
            clean_worker_registry(queue)
        return found


class ThreadWorker:
    """The in-process worker of ``engine.start_worker()``: a worker thread and a housekeeper."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.stopping = threading.Event()
        self.worker = NbflowWorker(backend, in_thread=True, stopping=self.stopping)
        self.housekeeper = Housekeeper(backend, self.stopping, worker=self.worker)
        self.thread = threading.Thread(target=self._work, name="nbflow-worker", daemon=True)

    def __repr__(self) -> str:
        state = "running" if self.is_alive() else "stopped"
        return f"<nbflow ThreadWorker {state} queue={self.backend.queue_name!r}>"

    def _work(self) -> None:
        try:
            self.worker.work(burst=False, logging_level="WARNING")
        except Exception:
            log.exception("nbflow in-process worker stopped on an error")

    def start(self) -> None:
        self.housekeeper.start()
        self.thread.start()
        _hand_back_at_exit(self)

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Takes no new job; runs hand their instances back at their next step (queued
        and enqueued again, for whichever worker has the workflow)."""
        self.stopping.set()
        self.worker._stop_requested = True
        try:
            self.worker.routes.withdraw()
        except redis.RedisError:  # Redis away: the entries expire by themselves
            log.warning("nbflow worker: could not withdraw its serving entries")
        self.housekeeper.join(timeout)
        self.thread.join(timeout)

    def _at_exit(self) -> None:
        """The interpreter exits (a kernel shut down or restarted): the worker thread is
        about to die with it, so what it still holds is handed back now, and a worker
        started elsewhere takes it at once instead of when its lease runs out."""
        try:
            self.stop(timeout=EXIT_GRACE)
            if hand_back(self.backend, dict(self.backend.runs)):
                log.info("nbflow: handed back the instances this process held")
        except Exception:  # Redis away: the leases run out instead
            log.warning("nbflow: could not hand back instances at exit", exc_info=True)


_exiting: weakref.WeakSet[ThreadWorker] = weakref.WeakSet()  # in-process workers started
_exit_hooked: list[bool] = []  # [True] once _exit_all is hooked


def _hand_back_at_exit(worker: ThreadWorker) -> None:
    """Has ``worker._at_exit`` run when the interpreter exits.  Hooked into threading's
    own exit hooks when there are (they run before the thread pool of step callbacks
    is joined, so a step still running does not hold up the hand-back), else atexit."""
    if not _exit_hooked:
        _exit_hooked.append(True)
        hook = getattr(threading, "_register_atexit", None)
        try:
            if hook is None:
                raise RuntimeError("no threading exit hooks")
            hook(_exit_all)
        except RuntimeError:
            atexit.register(_exit_all)
    _exiting.add(worker)


def _exit_all() -> None:
    for worker in list(_exiting):
        worker._at_exit()
    _exiting.clear()


def run_foreground(backend: Backend, burst: bool = True) -> int:
    """``engine.run_worker()``: work in this thread; with ``burst`` stop when nothing is due."""
    stopping = threading.Event()
    worker = NbflowWorker(backend, in_thread=True, stopping=stopping)
    keeper = Housekeeper(backend, stopping, worker=worker)
    if not burst:
        keeper.start()
        try:
            worker.work(burst=False, logging_level="WARNING")
        finally:
            stopping.set()
        return 0
    beats = Housekeeper(backend, stopping, beats_only=True)  # leases of long steps
    beats.start()
    try:
        return _burst(backend, keeper, stopping)
    finally:
        stopping.set()


def _burst(backend: Backend, keeper: Housekeeper, stopping: threading.Event) -> int:
    jobs = 0
    while True:
        keeper.wake_due()
        keeper.sweep(orphan_age=0.0)
        if not _jobs_waiting(backend):
            return jobs
        worker = NbflowWorker(backend, in_thread=True, stopping=stopping)
        worker.work(burst=True, logging_level="WARNING")
        jobs += worker.jobs_run


def _jobs_waiting(backend: Backend) -> bool:
    """Whether a job waits on a queue this process listens to."""
    keys = [backend.base_queue.key]
    for wf in sorted(backend.classes):
        keys += backend.queue_keys(wf)
    pipe = backend.redis.pipeline(transaction=False)
    for key in keys:
        pipe.llen(key)
    return any(pipe.execute())


def serve(backend: Backend, burst: bool = False, logging_level: str = "WARNING") -> None:
    """``nbflow worker`` in this process: an RQ worker in the main thread plus a housekeeper."""
    stopping = threading.Event()
    worker = NbflowWorker(backend, stopping=stopping)
    keeper = Housekeeper(backend, stopping, worker=worker)
    # What is imported and registered by now lives as long as the process: frozen, the
    # garbage collector no longer walks it in every full collection (pandas and pyarrow
    # alone are some 80,000 objects; a full collection took 20-40 ms, in a step).
    gc.collect()
    gc.freeze()
    keeper.start()
    try:
        if burst:
            keeper.wake_due()
            keeper.sweep(orphan_age=0.0)
        worker.work(burst=burst, logging_level=logging_level)
    finally:
        stopping.set()
        keeper.join(5)


def serve_many(
    make_engine: Any, processes: int, burst: bool = False, logging_level: str = "WARNING"
) -> None:
    """``nbflow worker --processes N``: N worker processes, each with its own housekeeper.

    SIGTERM/SIGINT to this parent are passed on to the children (RQ's warm shutdown:
    each finishes its current job), and a child whose parent died stops by itself.
    """
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_child, args=(make_engine, burst, os.getpid(), logging_level))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()

    def forward(signum: int, frame: Any) -> None:
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for p in procs:
            p.join()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _child(make_engine: Any, burst: bool, parent: int, logging_level: str) -> None:
    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)  # the parent is gone: stop like on SIGTERM

    threading.Thread(target=watch_parent, name="nbflow-parent-watch", daemon=True).start()
    logging.basicConfig(
        level=logging_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    serve(make_engine().backend, burst=burst, logging_level=logging_level)
