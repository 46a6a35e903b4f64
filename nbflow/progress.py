"""Progress a step callback reports with ``ctx.progress(done, total, message)`` (SPEC 8.4),
and the one background writer per process that also writes the logs of long steps.

A report never waits for Redis: it is kept in the run's ``Board`` (the latest value per
step, in memory) and written either by the run itself, in the same pipelined write as
its next step record (so the last value before a step ends is always stored with the
step), or, while a long callback runs, by one flusher thread per process that writes
what is new at most every ``FLUSH_INTERVAL`` seconds: at most about ten writes a second
per step, however often a callback reports.  Both writers use the ``progress`` script
(``nbflow.store``), which keeps the newest value (each carries its report time), so the
two connections racing cannot put an older value over a newer one.

The same thread writes the captured lines of a step that runs long (``nbflow.capture``):
lines normally go out with the step's own record, but ones older than
``LOG_FLUSH_AFTER`` are written by the thread, so ``inst.logs()`` shows a long step's
output while it runs.  Anything it writes is owner-checked like every run write.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from nbflow import records
from nbflow.backend import Backend

log = logging.getLogger("nbflow")

#: The flusher writes reported progress at most this often (seconds).
FLUSH_INTERVAL = 0.1
#: Captured lines that waited this long (seconds) for their step's record are written
#: by the flusher instead (a step still running).
LOG_FLUSH_AFTER = 1.0


class Board:
    """The progress the steps of one run reported and nobody has written yet."""

    __slots__ = ("backend", "iid", "token", "dirty", "_closed", "_seq", "_queued", "_lock")

    def __init__(self, backend: Backend, iid: str, token: str) -> None:
        self.backend = backend
        self.iid = iid
        self.token = token
        self.dirty: dict[str, tuple[int, str]] = {}
        self._closed: set[str] = set()
        self._seq = 0
        self._queued = False
        self._lock = threading.Lock()

    def report(self, key: str, fraction: float | None, message: str | None) -> None:
        """Keeps the step's latest progress; a step already finished reports nothing."""
        seq = time.time_ns() // 1000
        with self._lock:
            if key in self._closed:
                return
            seq = self._seq = max(seq, self._seq + 1)
            self.dirty[key] = (seq, records.progress_json(seq, fraction, message))
            poke = not self._queued
            self._queued = True
        if poke:
            FLUSHER.poke(self.due)

    def close(self, key: str) -> None:
        """The step finished: later reports of it (a callback that kept ``ctx``) are dropped."""
        with self._lock:
            self._closed.add(key)

    def take(self) -> list[str]:
        """The unwritten values as ``key, seq, json`` triples (for the ``progress`` script)."""
        with self._lock:
            dirty, self.dirty = self.dirty, {}
            self._queued = False
        out: list[str] = []
        for key, (seq, value) in dirty.items():
            out += [key, str(seq), value]
        return out

    def due(self, now: float) -> bool:
        """The flusher's turn: writes what is new now (the run's own writes go in its
        pipelined batch instead).  Always done: a later report pokes the flusher again."""
        taken = self.take()
        if taken:
            try:
                args = [self.backend.prefix, self.iid, self.token, *taken]
                self.backend.scripts.progress(args=args)
            except Exception as exc:  # Redis away for a moment: the next report tries again
                log.debug("nbflow: progress of %s not written: %r", self.iid, exc)
        return True


class Flusher:
    """One thread per process that writes what runs left for it (progress boards, the
    logs of long steps): each poked ``due(now)`` is called after ``FLUSH_INTERVAL`` and
    again every interval until it returns True.  It sleeps on an event while nothing is
    waiting, so an idle process pays nothing for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: list[Callable[[float], bool]] = []
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def poke(self, due: Callable[[float], bool]) -> None:
        with self._lock:
            self._waiting.append(due)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="nbflow-progress", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(FLUSH_INTERVAL)  # what is reported meanwhile joins this write
            with self._lock:
                self._wake.clear()
                waiting, self._waiting = self._waiting, []
            now = time.monotonic()
            later = []
            for due in waiting:
                try:
                    if not due(now):
                        later.append(due)
                except Exception:  # never print, never die
                    log.exception("nbflow: background flusher failed")
            if later:
                with self._lock:
                    self._waiting.extend(later)
                    self._wake.set()


FLUSHER = Flusher()


def describe(value: Any) -> str:
    """A progress fraction as text (``40%``), for displays."""
    return f"{float(value) * 100:.0f}%"


__all__ = ["FLUSHER", "FLUSH_INTERVAL", "LOG_FLUSH_AFTER", "Board", "Flusher", "describe"]
