"""Waits in a kernel keep widget messages flowing (ipykernel 6).

A Jupyter kernel handles one shell message at a time: while a cell runs
``inst.wait()`` or ``%wf wait``, a click on a dashboard button is a comm message
queued behind that cell, handled only when the wait returns (too late to pause
anything).

On ipykernel 7 the dashboard routes its widgets' messages to a kernel subshell
(``nbflow.notebook.comms``), so clicks are handled whatever the main thread does and
this hook has nothing to do.  On kernels without subshells (ipykernel 6),
``WorkflowInstance.wait()`` enters ``nbflow.reprs.waiting()`` around its wait and
calls what it yields every ~0.1 s; this module registers the hook that makes those
calls handle the kernel's pending messages with ``jupyter_ui_poll``
(Kirill888/jupyter-ui-poll), made for exactly this: it processes shell messages from
inside a running cell, holding back ``execute_request`` messages (cells queued
meanwhile) and replaying them, in order, once the cell finishes.  (jupyter_ui_poll
1.1 calls ``kernel.do_one_iteration()``, which ipykernel 7 no longer has: there it
would do nothing, hence the subshells.)

Only the kernel's main thread may do this, and only while a cell runs there;
anywhere else (a terminal IPython, a plain script, a background thread) the hook
does nothing.  A failure inside the poll is logged once and the wait goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from nbflow import reprs
from nbflow.notebook.display import widgets_available

log = logging.getLogger("nbflow")

#: At most this many queued kernel messages are handled per call (comm messages are small).
EVENTS_PER_POLL = 20

_warned = False


def _warn_once(exc: BaseException) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("nbflow: waits cannot handle widget messages in this kernel: %s", exc)


def _needs_polling() -> bool:
    """A kernel whose main thread must handle widget messages itself (no subshells)."""
    from IPython.core.getipython import get_ipython

    shell: Any = get_ipython()  # type: ignore[no-untyped-call, unused-ignore]
    kernel = getattr(shell, "kernel", None)
    return hasattr(kernel, "do_one_iteration") and not getattr(
        kernel, "_supports_kernel_subshells", False
    )


@contextmanager
def while_waiting() -> Iterator[Callable[[], None]]:
    """Within a kernel's main thread: a function that handles pending widget messages."""
    if (
        threading.current_thread() is not threading.main_thread()
        or not widgets_available()
        or not _needs_polling()
    ):
        yield lambda: None
        return
    try:
        from jupyter_ui_poll import ui_events  # type: ignore[import-untyped]

        events: Any = ui_events()
        poll = events.__enter__()
    except Exception as exc:  # an unknown kernel: wait without it
        _warn_once(exc)
        yield lambda: None
        return

    def between() -> None:
        try:
            poll(EVENTS_PER_POLL)
        except Exception as exc:
            _warn_once(exc)

    try:
        yield between
    finally:
        events.__exit__(None, None, None)


reprs.register("while_waiting", while_waiting)
