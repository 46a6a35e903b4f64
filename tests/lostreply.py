"""A lost-reply proxy for tests: a TCP proxy on loopback between a client and Redis
that lets Redis run a chosen command and then cuts the client's connection before
the reply reaches it.

That is the fault an exactly-once call must survive: the client cannot tell a
command that never arrived from one whose reply was lost, so redis-py's automatic
retry (``Retry``/``retry_on_error``, set in ``nbflow.server._client_from_url``)
sends it again on a new connection.  The proxy reads the client's bytes as RESP
commands; when a command matches (``cut_on_script``: an ``EVALSHA`` of a given
script), it forwards it (inside ``MULTI`` it waits for the ``EXEC`` that runs it),
then sends ``PING`` behind it and waits for the ``PONG``: Redis answers in order, so
by then the command has run.  Only then are both sides closed, the reply unsent.
Each trigger fires ``times`` times; after that the proxy only forwards.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

Command = list[bytes]


def _parse(buf: bytes, start: int) -> tuple[Command, int] | None:
    """The RESP command at ``buf[start:]`` and where it ends, or None if incomplete."""
    if start >= len(buf):
        return None
    if buf[start : start + 1] != b"*":  # an inline command: one line
        end = buf.find(b"\r\n", start)
        return None if end < 0 else (buf[start:end].split(), end + 2)
    end = buf.find(b"\r\n", start)
    if end < 0:
        return None
    count, pos, parts = int(buf[start + 1 : end]), end + 2, []
    for _ in range(count):
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        size = int(buf[pos + 1 : end])
        if len(buf) < end + 2 + size + 2:
            return None
        parts.append(buf[end + 2 : end + 2 + size])
        pos = end + 2 + size + 2
    return parts, pos


class _Trigger:
    def __init__(self, match: Callable[[Command], bool], times: int) -> None:
        self.match = match
        self.left = times


class _Link:
    """One client connection and its own connection to Redis."""

    def __init__(self, proxy: LostReplyProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = socket.create_connection(proxy.upstream)
        self.cutting = threading.Event()
        self.closed = False
        self.in_multi = False
        self.armed = False  # a matching command is queued in the current MULTI
        threading.Thread(target=self._client_to_redis, daemon=True).start()
        threading.Thread(target=self._redis_to_client, daemon=True).start()

    def _client_to_redis(self) -> None:
        buf = b""
        try:
            while not self.cutting.is_set():
                data = self.client.recv(65536)
                if not data:
                    break
                buf += data
                pos = 0
                while True:
                    parsed = _parse(buf, pos)
                    if parsed is None:
                        break
                    cmd, end = parsed
                    if self._cuts_after(cmd):
                        self.cutting.set()
                        # the command (and all before it) goes to Redis, then a PING
                        self.upstream.sendall(buf[:end] + b"*1\r\n$4\r\nPING\r\n")
                        return
                    pos = end
                if pos:
                    self.upstream.sendall(buf[:pos])
                    buf = buf[pos:]
        except OSError:
            pass
        self.close()

    def _cuts_after(self, cmd: Command) -> bool:
        """Whether Redis's reply to the command ending here must be lost."""
        name = cmd[0].upper() if cmd else b""
        if name == b"MULTI":
            self.in_multi, self.armed = True, False
            return False
        if name in (b"EXEC", b"DISCARD"):
            fire = self.armed and name == b"EXEC"
            self.in_multi = self.armed = False
            return fire
        trigger = self.proxy._take(cmd)
        if trigger and self.in_multi:
            self.armed = True  # it runs at EXEC: cut after that
            return False
        return trigger

    def _redis_to_client(self) -> None:
        tail = b""
        try:
            while True:
                data = self.upstream.recv(65536)
                if not data:
                    break
                if self.cutting.is_set():
                    tail = (tail + data)[-64:]
                    if tail.endswith(b"+PONG\r\n"):  # Redis ran the command: cut now
                        self.proxy.cuts += 1
                        break
                    continue
                self.client.sendall(data)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class LostReplyProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to Redis at ``upstream``."""

    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 6379)) -> None:
        self.upstream = upstream
        self.cuts = 0  #: connections cut after Redis ran the chosen command
        self._triggers: list[_Trigger] = []
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = self._server.getsockname()[1]
        self._running = True
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cut_on(self, match: Callable[[Command], bool], times: int = 1) -> None:
        """Lose the reply of the next ``times`` commands for which ``match(cmd)`` holds."""
        with self._lock:
            self._triggers.append(_Trigger(match, times))

    def cut_on_script(self, sha: str, times: int = 1) -> None:
        """Lose the reply of the next ``times`` calls of the script with this SHA1."""
        want = sha.encode()
        self.cut_on(lambda c: len(c) > 1 and c[0].upper() == b"EVALSHA" and c[1] == want, times)

    def _take(self, cmd: Command) -> bool:
        with self._lock:
            for trigger in self._triggers:
                if trigger.left > 0 and trigger.match(cmd):
                    trigger.left -= 1
                    return True
        return False

    def _accept(self) -> None:
        while self._running:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._links.append(_Link(self, client))

    def close(self) -> None:
        self._running = False
        self._server.close()
        for link in self._links:
            link.close()
