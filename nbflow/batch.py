"""Group commit: the Redis script calls of the runs of one RQ job, written together.

Runs advancing side by side on a worker's loop make script calls during each turn of
the loop; a ``Batch`` writes all of them in one go on the job's ``ScriptStream``
(``nbflow.store``), without waiting for replies.  Step records are sent and their
handlers check the reply when it arrives; ``call`` gives a future for the calls whose
reply the caller needs (an event take, a run's ending).  A plain ``def run`` has a
batch of its own without a loop (``call_now`` waits for the reply).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from nbflow.backend import Backend
from nbflow.errors import StoreUnavailable
from nbflow.store import LEASE_SECONDS, ScriptStream

log = logging.getLogger("nbflow")

#: A step whose run has had no word from Redis for this long (seconds) waits for the
#: reply to its start before its callback runs.  Far below the lease, so a run cut off
#: from Redis (whose lease may be taken over) starts no step unconfirmed.
CONFIRM_AFTER = LEASE_SECONDS / 30


def unreachable(reply: Any) -> bool:
    """Whether a reply (or the exception standing for it) says Redis could not be
    reached, as opposed to a script's own error reply."""
    return isinstance(reply, redis.RedisError) and not isinstance(
        reply, redis.exceptions.ResponseError
    )


def script_error(reply: Any) -> bool:
    """Whether a reply is a script's own failure (a Lua error, a key of the wrong type):
    something in one instance's keys, never Redis being away or full, so it ends that
    instance and no other (``nbflow.runner``)."""
    return isinstance(reply, redis.exceptions.ResponseError) and "user_script" in str(reply)


class Batch:
    """Group commit over one pipelined stream: script calls made during one turn of
    the loop are written in one go.  Step records are sent without waiting (their
    handler checks the reply when it arrives); ``call`` gives a future for the calls
    whose reply the caller needs (an event take, a run's ending)."""

    def __init__(self, backend: Backend, loop: asyncio.AbstractEventLoop | None, live: int) -> None:
        self.stream = ScriptStream(backend.scripts)
        self.loop = loop
        self.live = live  # runs of the job still going
        self.calls: list[tuple[str, list[str], Callable[[Any], None]]] = []
        self.awaited = 0  # calls in ``calls`` whose reply someone awaits
        self._written: asyncio.Future[None] | None = None
        self.steps_in_flight = 0  # step attempts started and not yet done, all runs

    def send(self, name: str, args: list[str], handler: Callable[[Any], None]) -> None:
        """Queues a call for this turn's write; ``handler`` gets its reply later."""
        if not self.calls and self.loop is not None:
            self.loop.call_soon(self.flush)
        self.calls.append((name, args, handler))

    def call(self, name: str, args: list[str]) -> asyncio.Future[Any]:
        """Queues a call and returns a future of its reply (Redis being away is
        ``StoreUnavailable``; an error reply is the exception as the result)."""
        assert self.loop is not None
        fut: asyncio.Future[Any] = self.loop.create_future()

        def got(reply: Any) -> None:
            if fut.done():
                return
            if unreachable(reply):
                fut.set_exception(StoreUnavailable(reply))
            else:
                fut.set_result(reply)

        self.send(name, args, got)
        self.awaited += 1
        return fut

    def written(self, alone: bool) -> asyncio.Future[None] | None:
        """What to await before a step callback starts, so that the records sent
        so far are on their way to Redis: with other runs (or parallel branches)
        going, the end of this turn's write, which lets them join it; a run on its
        own (``alone``) writes at once (None: nothing to await)."""
        if alone and self.live <= 1:
            self.flush()
            return None
        assert self.loop is not None
        if self._written is None:
            self._written = self.loop.create_future()
        return self._written

    def call_now(self, name: str, args: list[str]) -> Any:
        """Sends a call behind those queued and waits for its reply (plain ``def run``
        runs, which have no loop); Redis being away is ``StoreUnavailable``."""
        box: list[Any] = []
        self.calls.append((name, args, box.append))
        self.flush(wait=True)
        reply = box[0]
        if unreachable(reply):
            raise StoreUnavailable(reply)
        return reply

    def flush(self, wait: bool = False) -> None:
        """Writes the queued calls; reads every owed reply if someone awaits one
        (or ``wait``), else those that have arrived."""
        calls, self.calls = self.calls, []
        awaited, self.awaited = self.awaited, 0
        written, self._written = self._written, None
        try:
            if calls:
                try:
                    self.stream.send(calls)
                except redis.RedisError as exc:  # Redis unreachable: every caller learns it
                    for _, _, handler in calls:
                        handler(exc)
                else:
                    if awaited or wait:
                        self.stream.drain()
                    else:
                        # replies that arrived meanwhile; above all, a connection
                        # that closed (Redis went away) is seen now, before the
                        # next callback runs on a write that was lost
                        self.stream.poll()
        except redis.RedisError:
            pass  # the stream gave every owed handler the error
        finally:
            if written is not None and not written.done():
                written.set_result(None)

    def confirm(self) -> None:
        """Waits for every reply owed when Redis has not answered for a while (see
        ``CONFIRM_AFTER``): a run that lost its lease meanwhile learns it now."""
        if time.monotonic() - self.stream.settled_at > CONFIRM_AFTER:
            try:
                self.stream.drain()
            except redis.RedisError:
                pass  # the stream gave every owed handler the error

    def close(self) -> None:
        """Reads the replies still owed and gives the connection back."""
        try:
            self.stream.close()
        except redis.RedisError as exc:
            log.warning("nbflow: replies of a job's last writes were lost: %r", exc)
