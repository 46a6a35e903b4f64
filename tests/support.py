"""Helpers shared by the test modules (not fixtures: those live in conftest.py)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any


def poll(
    fn: Callable[[], Any], timeout: float = 10.0, what: str = "condition", interval: float = 0.005
) -> Any:
    """Calls ``fn`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def wait_status(inst: Any, status: str, timeout: float = 5.0) -> None:
    """Polls until the instance has ``status``; fails at once if it ended otherwise."""

    def reached() -> bool:
        now = inst.status()
        assert now["status"] not in ("complete", "errored", "terminated") or (
            now["status"] == status
        ), now
        return bool(now["status"] == status)

    poll(reached, timeout, what=f"status {status!r} of {inst.id}")


@contextlib.contextmanager
def not_redis_port(reply: bytes | None) -> Iterator[int]:
    """A throwaway TCP server on 127.0.0.1 (port 0: any free one) that is not Redis: it
    greets every connection with ``reply`` and hangs up, or with ``reply=None`` accepts and
    never answers.  Yields its port; stopped on exit."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.1)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            if reply is None:
                held.append(conn)  # silent: keep it open until the test ends
                continue
            with conn, contextlib.suppress(OSError):
                conn.sendall(reply)
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(2)
                while conn.recv(65536):  # let the client read the reply before closing
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()
