"""Widget messages that are handled beside a running cell (clicks during ``inst.wait()``).

A Jupyter kernel runs one shell request at a time on its main thread: while a cell
blocks in ``inst.wait()`` or ``%wf wait`` (or any long call), a click on a dashboard
button is a ``comm_msg`` queued behind that cell and handled only when it returns --
too late to pause anything.

ipykernel 7 has *subshells* (JEP 91): extra shell threads, each with its own event
loop, created on request.  Its shell-channel thread routes each incoming
``comm_msg``/``comm_close`` to the subshell its comm names (``comm._reply_subshell_for``,
ipykernel/comm/comm.py).  ``route_beside_cells(widget)`` creates one subshell for
this kernel (once; kernel-side, in the control thread, as ``create_subshell_request``
does) and makes every message to ``widget``'s comm go there, so the dashboard's
clicks, row selections and text fields are handled at once, whatever the main thread
is doing.  The route is set on the comm itself (a method on the instance), because
ipykernel re-points ``_reply_subshell_id`` at every publish of the comm -- the refresh
thread publishes every second.

Handlers then run in the subshell's thread: the dashboard serialises them with its
own lock, and they only write to Redis.

Where there are no subshells (ipykernel 6, other kernels) nothing is routed; waits
then keep messages flowing another way (``nbflow.notebook.waiting``).  A failure to
create the subshell is logged once and clicks are handled after the running cell.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

__all__ = ["route_beside_cells", "subshell_id"]

log = logging.getLogger("nbflow")

#: How long creating the subshell may take before we go on without it.
CREATE_TIMEOUT = 5.0

_lock = threading.Lock()
_created: dict[int, str | None] = {}  # id(kernel) -> its subshell (None: cannot have one)


def _kernel() -> Any:
    from IPython.core.getipython import get_ipython

    shell: Any = get_ipython()  # type: ignore[no-untyped-call, unused-ignore]
    return None if shell is None else getattr(shell, "kernel", None)


def _create_subshell(kernel: Any) -> str | None:
    """Ask the kernel's shell-channel thread for a new subshell, from the control thread
    (the only thread that uses that socket), and wait for its id."""
    channel = getattr(kernel, "shell_channel_thread", None)
    control = getattr(kernel, "control_thread", None)
    if not getattr(kernel, "_supports_kernel_subshells", False) or channel is None:
        return None
    if control is None or getattr(control, "io_loop", None) is None:
        return None
    done = threading.Event()
    box: dict[str, Any] = {}

    def create() -> None:
        try:
            socket = channel.manager.control_to_shell_channel.from_socket
            socket.send_json({"type": "create"})
            box["reply"] = socket.recv_json()
        except BaseException as exc:  # reported by the caller
            box["error"] = exc
        finally:
            done.set()

    control.io_loop.add_callback(create)
    if not done.wait(CREATE_TIMEOUT):
        log.warning("nbflow: the kernel did not create a subshell for widget messages in time")
        return None
    reply = box.get("reply") or {}
    if "error" in box or reply.get("status") != "ok":
        log.warning(
            "nbflow: the kernel could not create a subshell for widget messages: %s",
            box.get("error") or reply.get("evalue"),
        )
        return None
    return str(reply["subshell_id"])


def subshell_id() -> str | None:
    """This kernel's subshell for widget messages (created on first use), else None."""
    kernel = _kernel()
    if kernel is None:
        return None
    with _lock:
        key = id(kernel)
        if key not in _created:
            try:
                _created[key] = _create_subshell(kernel)
            except Exception as exc:  # an unknown kernel: go on without
                log.warning("nbflow: no subshell for widget messages: %s", exc)
                _created[key] = None
        return _created[key]


def route_beside_cells(widget: Any) -> bool:
    """Make the kernel handle messages to ``widget`` in the subshell; True if it does."""
    comm = getattr(widget, "comm", None)
    if comm is None or not hasattr(comm, "_reply_subshell_for"):
        return False
    sid = subshell_id()
    if sid is None:
        return False

    def reply_subshell_for(data: Any, default: Any) -> str:
        return sid

    comm._reply_subshell_for = reply_subshell_for
    return True
