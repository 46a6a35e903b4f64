"""``Refresher``: the one background thread behind everything live in the notebook layer.

The live status cards (``nbflow.notebook.display``) and the ``Dashboard``
(``nbflow.notebook.widgets``) both keep a widget current from Redis.  Each owns a
``Refresher`` that calls its ``tick`` every ``interval`` seconds in a daemon thread:

* ``tick()`` returns whether there is still something to refresh; False ends the
  thread (nothing displayed any more), and the next ``start()`` begins a new one.
  A ``start()`` that races with a tick deciding to stop is never lost: the thread
  then runs one more round instead of ending.
* A tick that raises is logged (a warning the first time, then debug) and retried
  after a growing delay (up to ten intervals), since Redis may come back.
  ``on_error`` may report it somewhere visible and says whether to go on.
* The thread never prints: output of a background thread lands in whatever cell
  runs at that moment.  Everything goes to ``logging.getLogger("nbflow")``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["Refresher"]

log = logging.getLogger("nbflow")

#: A failing tick is retried after at most this many intervals.
_MAX_BACKOFF = 10


class Refresher:
    """Calls ``tick`` every ``interval`` seconds in a daemon thread named ``name``.

    ``what`` names the work in log lines (``"nbflow: <what> failed: ..."``);
    ``delay_first``: wait one interval before the first tick (the caller has just
    drawn fresh state itself).
    """

    def __init__(
        self,
        name: str,
        tick: Callable[[], bool],
        interval: float,
        *,
        what: str,
        on_error: Callable[[Exception], bool] | None = None,
        delay_first: bool = False,
    ) -> None:
        self.name = name
        self.interval = interval
        self._tick = tick
        self._what = what
        self._on_error = on_error
        self._delay_first = delay_first
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()  # belongs to the current thread; a new one per thread
        self._wake = threading.Event()
        self._starts = 0  # start() calls so far: one during a tick means "go on"

    @property
    def running(self) -> bool:
        """Whether the refresh thread runs."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def start(self) -> None:
        """Make sure the thread runs (it is started if none does; idempotent)."""
        with self._lock:
            self._starts += 1
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = threading.Event()
            self._wake.clear()
            self._thread = threading.Thread(
                target=self._run, args=(self._stop,), name=self.name, daemon=True
            )
            self._thread.start()

    def wake(self) -> None:
        """Tick now instead of at the end of the current interval."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread (waiting up to ``timeout`` seconds for its current tick)."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
            self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _pause(self, stop: threading.Event, delay: float) -> bool:
        """Wait ``delay`` seconds (or until woken); True once the thread should end."""
        if delay > 0 and not stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
        return stop.is_set()

    def _run(self, stop: threading.Event) -> None:
        failures = 0
        delay = self.interval if self._delay_first else 0.0
        while not self._pause(stop, delay):
            with self._lock:
                starts = self._starts
            more, failures = self._one_tick(failures)
            if not more and self._finish(stop, starts):
                return
            delay = self.interval * min(1 + failures, _MAX_BACKOFF)

    def _one_tick(self, failures: int) -> tuple[bool, int]:
        """Run ``tick`` once: (whether to go on, consecutive failures so far)."""
        try:
            return self._tick(), 0
        except Exception as exc:  # keep going: Redis may come back; never print
            failures += 1
            level = logging.WARNING if failures == 1 else logging.DEBUG
            log.log(level, "nbflow: %s failed: %s", self._what, exc)
            return self._report(exc), failures

    def _report(self, exc: Exception) -> bool:
        if self._on_error is None:
            return True
        try:
            return self._on_error(exc)
        except Exception:  # a broken report must not kill the thread, nor print
            log.exception("nbflow: %s could not report its failure", self._what)
            return True

    def _finish(self, stop: threading.Event, starts: int) -> bool:
        """The tick found nothing to refresh: end, unless ``start()`` was called meanwhile."""
        with self._lock:
            if self._starts != starts and not stop.is_set():
                return False
            if self._thread is threading.current_thread():
                self._thread = None
            return True
