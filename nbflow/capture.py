"""What workflow code writes while a worker runs it, captured per step (SPEC 8.3).

A context variable names the current *sink*: the run's ``RunLog`` and the step key
whose callback is running (``None`` for ``run``'s own code between steps).  The step
protocol sets it around every callback (``enter`` / ``leave``); a run sets it around
``run`` itself.  Tasks inherit it from the task that created them, and
``nbflow.callbacks`` hands a copy of the caller's context to the thread-pool thread
that runs a callback, so the sink follows the code wherever nbflow runs it.

Three things feed a sink, all installed by ``install()`` when a worker starts (the
notebook's in-process worker thread, ``engine.run_worker()``, ``nbflow worker``) and
checked again, cheaply, before every job:

* **print and writes to ``sys.stdout`` / ``sys.stderr``**: both are replaced by a
  ``_Proxy`` that sends a write made while a sink is set to that sink (stream
  ``stdout`` or ``stderr``) and passes every other write, untouched, to the stream it
  replaced.  A kernel's own cells, other threads and code outside runs see no
  difference.  (Writes to ``sys.stdout.buffer``, to ``sys.__stdout__`` or to a file
  descriptor bypass it, and so do threads the workflow starts itself, which do not
  inherit the sink: use ``asyncio.to_thread`` or the step's own thread.)
* **logging**: a log-record factory (chained to the one already set) captures every
  record of level INFO and above created while a sink is set, from any logger but
  ``nbflow``'s own (stream: the level name, e.g. ``INFO``), whether or not a handler
  would show it.  Records below a logger's level are never created, so on first
  install the root logger is lowered to INFO when it was above (the default is
  WARNING).  What users saw before stays as it was: root's handlers that would have
  ignored INFO records get the old root level as their own, and logger ``nbflow``
  keeps the old level (so nbflow's own INFO lines stay uncreated on the hot path).
  A logger the user set above INFO themselves is respected (and not captured below it).
* **the user's own console handlers**: a ``StreamHandler`` writing to the console
  (the streams the proxies replaced, ``sys.__stdout__`` / ``sys.__stderr__``, or a
  proxy itself), and ``logging.lastResort`` (what prints WARNING records when no
  handler is configured), get a filter that drops records made inside a sink, so a
  step's log line is not printed into a notebook cell (nor twice into a CLI worker's
  console) but stored once.  Outside sinks they work exactly as before, and handlers
  writing elsewhere (files, sockets, pytest's ``caplog``) are not touched at all.
  Handlers on the root logger are looked at before every job; those on other loggers
  when a worker starts.

Lines are kept in the run's memory until its next write to Redis (``take``), which
carries them in the same pipelined batch (``nbflow.runner``): a step that prints nothing
costs one context-variable set and reset. Lines still waiting after
``progress.LOG_FLUSH_AFTER`` (a step that runs long) are written by the background
flusher of ``nbflow.progress`` instead, so they show while the step runs. Each step's
buffer is bounded like its stored log (``STEP_LOG_BYTES``; oldest lines dropped and
counted), and a single line is cut at ``MAX_LINE_CHARS``; a line redrawn with carriage
returns (a progress bar) keeps what it shows last. Lines that ``run`` writes outside
steps while it is still replaying steps an earlier execution ran are dropped: that
execution logged them already.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from nbflow import records

STEP_LOG_BYTES = records.STEP_LOG_BYTES
#: A longer single line is cut to this many characters (ending in "…").
MAX_LINE_CHARS = 8 * 1024

Sink = tuple["RunLog", "str | None"]

_SINK: contextvars.ContextVar[Sink | None] = contextvars.ContextVar("nbflow_log_sink", default=None)


def enter(log: RunLog, step: str | None) -> contextvars.Token[Sink | None]:
    """Makes ``step`` of ``log`` the sink of what this context writes (until ``leave``)."""
    return _SINK.set((log, step))


def leave(token: contextvars.Token[Sink | None], log: RunLog, step: str | None) -> None:
    """Restores the sink ``enter(log, step)`` replaced (``token``); a line left without its
    newline ends here."""
    _SINK.reset(token)
    if log.partial:
        log.end(step)


def current() -> Sink | None:
    """The sink set in this context, if any."""
    return _SINK.get()


class _Field:
    """The buffered lines of one step (or of one stretch of ``run`` between steps)."""

    __slots__ = ("lines", "size", "dropped")

    def __init__(self) -> None:
        self.lines: deque[str] = deque()
        self.size = 0
        self.dropped = 0


class RunLog:
    """The lines one run captured and has not written yet.

    ``position`` says where ``run`` stands (the order of the last step it reached), so
    lines ``run`` writes between steps are stored under ``#position`` and a restart from
    a step can drop those written after it.  ``replaying`` is True while the run only
    replays stored steps (see the module docstring); the run clears it at its first step
    that does real work.  Thread-safe: callbacks on the pool write from their threads.
    """

    __slots__ = (
        "fields",
        "partial",
        "replaying",
        "_position",
        "_lock",
        "limit",
        "first_at",
        "notify",
    )

    def __init__(
        self, position: Callable[[], int], replaying: bool, limit: int = STEP_LOG_BYTES
    ) -> None:
        self.fields: dict[str, _Field] = {}
        self.partial: dict[tuple[str | None, str], str] = {}
        self.replaying = replaying
        self._position = position
        self._lock = threading.Lock()
        self.limit = limit
        #: when (time.monotonic()) the oldest line not written yet was captured
        self.first_at: float | None = None
        #: called (under the lock) when a line lands in an empty buffer: the run has
        #: the background flusher look at it, should its step run long
        self.notify: Callable[[], None] | None = None

    def write(self, step: str | None, stream: str, text: str) -> None:
        """A write to ``stream``: whole lines are kept, the rest waits for its newline."""
        if step is None and self.replaying:
            return
        with self._lock:
            key = (step, stream)
            text = self.partial.pop(key, "") + text
            if "\n" not in text:
                if len(text) > MAX_LINE_CHARS:  # a line that never ends still gets out
                    self._add(step, stream, text)
                elif text:
                    self.partial[key] = _last_redraw(text)
                return
            *whole, rest = text.split("\n")
            if rest:
                self.partial[key] = _last_redraw(rest)
            for line in whole:
                self._add(step, stream, line)

    def lines(self, step: str | None, stream: str, text: str) -> None:
        """Whole lines at once (a log record's message, its traceback)."""
        if step is None and self.replaying:
            return
        with self._lock:
            for line in text.split("\n"):
                self._add(step, stream, line)

    def end(self, step: str | None) -> None:
        """The step's callback returned: its unfinished lines count as lines."""
        with self._lock:
            for key in [k for k in self.partial if k[0] == step]:
                self._add(step, key[1], self.partial.pop(key))

    def _add(self, step: str | None, stream: str, line: str) -> None:
        if "\r" in line:
            line = _last_redraw(line.rstrip("\r"))
        if len(line) > MAX_LINE_CHARS:
            line = line[: MAX_LINE_CHARS - 1] + "…"
        field = step if step is not None else f"#{self._position()}"
        if not self.fields:
            self.first_at = time.monotonic()
            if self.notify is not None:
                self.notify()
        buf = self.fields.get(field)
        if buf is None:
            buf = self.fields[field] = _Field()
        encoded = records.log_line(time.time(), stream, line)
        buf.lines.append(encoded)
        buf.size += len(encoded) + 1
        while buf.size > self.limit and len(buf.lines) > 1:
            buf.size -= len(buf.lines.popleft()) + 1
            buf.dropped += 1

    def take(self) -> list[str]:
        """What to write (``field, dropped, lines`` triples for the ``log_append``
        script), emptying the buffer; [] when nothing was captured."""
        with self._lock:
            fields, self.fields = self.fields, {}
            self.first_at = None
        out: list[str] = []
        for field, buf in fields.items():
            out += [field, str(buf.dropped), "\n".join(buf.lines)]
        return out

    def close(self) -> None:
        """The run is over: unfinished lines of every step count as lines."""
        with self._lock:
            for key in list(self.partial):
                self._add(key[0], key[1], self.partial.pop(key))


def _last_redraw(text: str) -> str:
    """What a terminal would show of a line redrawn with carriage returns (progress bars
    such as tqdm's): the text after the last one."""
    if "\r" not in text:
        return text
    body = text.rstrip("\r")  # a trailing one may be half of a "\r\n"
    return body.rsplit("\r", 1)[-1] + text[len(body) :]


# -- sys.stdout / sys.stderr ---------------------------------------------------------


class _Proxy:
    """Stands in for ``sys.stdout`` or ``sys.stderr``: a write made while a sink is set
    goes to the sink, every other write (and everything else) to the stream it replaced."""

    # No __slots__: IPython 9 tees a cell's output by assigning ``sys.stdout.write`` for
    # the cell and restoring it after, which an instance must allow.

    def __init__(self, original: Any, stream: str) -> None:
        self._original = original
        self._stream = stream

    def write(self, text: str) -> int:
        sink = _SINK.get()
        if sink is None:
            written: int = self._original.write(text)
            return written
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        sink[0].write(sink[1], self._stream, text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if _SINK.get() is None:
            self._original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)

    def __repr__(self) -> str:
        return f"<nbflow capture of {self._original!r}>"


# -- logging ---------------------------------------------------------------------------


def _is_nbflow(name: str) -> bool:
    return name == "nbflow" or name.startswith("nbflow.")


def _capture_record(record: logging.LogRecord, sink: Sink) -> None:
    try:
        text = record.getMessage()
    except Exception:  # bad %-args: logging itself would report it at emit time
        text = str(record.msg)
    if record.exc_info:
        text += "\n" + logging.Formatter().formatException(record.exc_info)
    if record.stack_info:
        text += "\n" + record.stack_info
    sink[0].lines(sink[1], record.levelname, text)


class _QuietInSinks(logging.Filter):
    """Put on console handlers: drops records made while a sink is set (the sink has
    them), except nbflow's own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _SINK.get() is None or _is_nbflow(record.name)


_QUIET = _QuietInSinks()
_install_lock = threading.Lock()
_logging_done = False
_consoles: list[Any] = []  # the streams the proxies replaced


def _is_console(stream: Any) -> bool:
    return (
        isinstance(stream, _Proxy)
        or stream is sys.__stdout__
        or stream is sys.__stderr__
        or any(stream is c for c in _consoles)
    )


def _quiet_consoles(handlers: Iterable[logging.Handler]) -> None:
    for handler in handlers:
        if (
            _QUIET not in handler.filters
            and isinstance(handler, logging.StreamHandler)
            and not isinstance(handler, logging.FileHandler)
            and _is_console(handler.stream)
        ):
            handler.addFilter(_QUIET)


def _install_logging() -> None:
    """Once per process: the record factory, INFO records created, nbflow's level kept."""
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        sink = _SINK.get()
        if sink is not None and record.levelno >= logging.INFO and not _is_nbflow(record.name):
            _capture_record(record, sink)
        return record

    logging.setLogRecordFactory(factory)
    root = logging.getLogger()
    old = root.level
    if old > logging.INFO:
        for handler in root.handlers:
            if handler.level < old:
                handler.setLevel(old)  # shows what it showed before
        nb = logging.getLogger("nbflow")
        if nb.level == logging.NOTSET:
            nb.setLevel(old)
        root.setLevel(logging.INFO)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            _quiet_consoles(logger.handlers)


def install() -> None:
    """Capture from now on in this process (see the module docstring).  Idempotent and
    cheap, so workers call it before every job: a stream something replaced since
    (pytest's capsys, a kernel) gets a proxy again, a handler added since its filter."""
    global _logging_done
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and type(stream) is not _Proxy:
            with _install_lock:
                stream = getattr(sys, name)
                if stream is not None and type(stream) is not _Proxy:
                    if not any(stream is c for c in _consoles):
                        _consoles.append(stream)
                    setattr(sys, name, _Proxy(stream, name))
    if not _logging_done:
        with _install_lock:
            if not _logging_done:
                _install_logging()
                _logging_done = True
    _quiet_consoles(logging.getLogger().handlers)
    last = logging.lastResort
    if last is not None and _QUIET not in last.filters:
        last.addFilter(_QUIET)


__all__ = ["MAX_LINE_CHARS", "STEP_LOG_BYTES", "RunLog", "current", "enter", "install", "leave"]
