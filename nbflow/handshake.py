"""The stop handshake, both sides: how ``pause()``, ``terminate()`` and ``restart()``
of a running instance learn that no new step of it will start.

Steps are written to Redis without waiting for a reply, so a run cannot learn of a
``pause()`` from its writes before its next step starts.  Instead the lifecycle
script publishes ``"id ack"`` on the channel of the worker named in the run's token;
that worker's ``StopListener`` counts the request (runs check the count before every
step start and answer it with a ``checkpoint``) and pushes to the list ``ack``, which
the caller waits for (``await_stop``).  A pause no worker heard in time is hardened:
the step scripts then apply it themselves.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import redis

from nbflow.backend import Backend

log = logging.getLogger("nbflow")

#: How long pause()/terminate()/restart() wait for the worker running the instance
#: to confirm that it starts no new step of it.
STOP_ACK_TIMEOUT = 5.0


def await_stop(backend: Backend, iid: str, script: str, ack: str) -> None:
    """The caller's side: waits until the worker running ``iid`` has promised to start
    no new step of it; past ``STOP_ACK_TIMEOUT`` a pause is applied by the scripts."""
    got = backend.redis.blpop([ack], timeout=STOP_ACK_TIMEOUT)
    if got is None:
        log.warning(
            "nbflow: the worker running %s did not confirm the %s within %.0fs; "
            "its next write applies it",
            iid,
            script,
            STOP_ACK_TIMEOUT,
        )
        backend.redis.delete(ack)
        if script == "pause":
            backend.scripts.harden(args=[backend.prefix, iid])


class StopListener(threading.Thread):
    """The worker's side of the stop handshake.

    Steps are written to Redis without waiting for a reply, so a worker cannot
    learn of a ``pause()`` from its writes before the next step starts.  Instead
    the lifecycle script publishes ``"id ack"`` on this worker's channel (named in
    the token of every run it claims); this thread counts the request in
    ``requests[id]``, which runs check before each step, and then answers on the list ``ack``,
    which the caller of ``pause()`` waits for.  So once ``pause()`` returns, no
    new step of the instance starts; the one already running finishes and is
    stored.  It subscribes before the worker claims anything.
    """

    def __init__(self, backend: Backend) -> None:
        super().__init__(name="nbflow-stop-listener", daemon=True)
        self.backend = backend
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.channel = backend.keys.stop_channel(self.worker_id)
        self.requests: dict[str, int] = {}  # instance id -> stop requests heard
        self._halt = threading.Event()
        self._pubsub: Any = None

    def start(self) -> None:
        """Subscribes (waiting for Redis to confirm it) and starts listening; if Redis
        is away the thread keeps trying, and pauses meanwhile are applied by the
        scripts themselves (``hardStop``)."""
        try:
            self._subscribe()
        except redis.RedisError as exc:
            log.warning("nbflow: stop channel not subscribed yet (%s)", exc)
        super().start()

    def _subscribe(self) -> None:
        if self._pubsub is not None:
            self._pubsub.close()
        self._pubsub = self.backend.redis.pubsub()  # type: ignore[no-untyped-call]
        self._pubsub.subscribe(self.channel)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            msg = self._pubsub.get_message(timeout=0.5)
            if msg is not None and msg["type"] == "subscribe":
                return
        raise redis.TimeoutError("no confirmation of SUBSCRIBE")

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                if self._pubsub is None:
                    self._subscribe()
                msg = self._pubsub.get_message(timeout=1.0)
                if msg is not None and msg["type"] == "message" and msg["data"]:
                    self._heard(msg["data"].decode())
            except (redis.RedisError, OSError, ValueError) as exc:
                if self._halt.is_set():
                    return
                log.warning("nbflow: stop listener lost Redis (%s); reconnecting", exc)
                self._pubsub = None
                self._halt.wait(0.5)

    def _heard(self, data: str) -> None:
        iid, _, ack = data.partition(" ")
        # from here on no new step of iid starts (a count, not a flag: a run that
        # finds the instance resumed meanwhile must still see a later request)
        self.requests[iid] = self.requests.get(iid, 0) + 1
        pipe = self.backend.redis.pipeline(transaction=False)
        pipe.rpush(ack, "1")
        pipe.expire(ack, 60)
        pipe.execute()

    def stop(self) -> None:
        """Stops listening (wakes the thread with an empty message to itself)."""
        self._halt.set()
        try:
            self.backend.redis.publish(self.channel, "")
        except redis.RedisError:
            pass
        self.join(2.0)
        if self._pubsub is not None:
            self._pubsub.close()
