"""Shared helpers for the fault, race, fuzz and netns tests: real worker processes,
throwaway ``redis-server`` processes (append-only, restartable), and polling.

Everything started here is tracked and torn down by ``Procs.close()`` / ``RedisServer.stop()``;
tests call those from fixture finalizers so nothing is left running, also on failure.
Processes are always ended by their own pid, never by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from support import poll  # noqa: F401  (re-exported for the fault tests)

from nbflow import server

ROOT = Path(__file__).resolve().parent.parent

#: Long versions (soak, thousands of race iterations, real 30 s leases) run with NBFLOW_SLOW=1.
SLOW = os.environ.get("NBFLOW_SLOW") == "1"


def slow_marks(reason: str) -> list[Any]:
    """The marks of a slow test: ``slow``, and skipped unless ``NBFLOW_SLOW=1``."""
    return [pytest.mark.slow, pytest.mark.skipif(not SLOW, reason=f"{reason}; set NBFLOW_SLOW=1")]


def slow_only(reason: str) -> Any:
    """Decorator form of ``slow_marks``."""

    def mark(fn: Any) -> Any:
        for m in slow_marks(reason):
            fn = m(fn)
        return fn

    return mark


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    found = server.find_redis_server()
    if found is None:
        pytest.skip("no redis-server binary (apt-get install redis-server)")
    return found


class RedisServer:
    """A throwaway ``redis-server`` with append-only persistence (``appendfsync always``),
    which a test may SIGKILL and start again on the same port and data directory."""

    def __init__(
        self, data_dir: Path, *, port: int | None = None, bind: Sequence[str] = ("127.0.0.1",)
    ) -> None:
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bind = list(bind)
        self.port = port or free_port(self.bind[0] if self.bind[0] != "127.0.0.1" else "127.0.0.1")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://{self.bind[0]}:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host=self.bind[0], port=self.port, socket_timeout=5, **kwargs)

    def start(self, timeout: float = 10.0) -> RedisServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        log = open(self.dir / f"redis-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                *self.bind,
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        c = self.client(socket_connect_timeout=0.5)

        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited: {self.log_tail()}")
            try:
                return bool(c.ping())
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                return False

        poll(answers, timeout, what=f"redis-server on port {self.port}", interval=0.02)
        c.close()
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kills the server (SIGKILL by default: no shutdown save; the AOF has every write)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def restart(self, down_for: float = 0.0) -> None:
        self.kill()
        if down_for:
            time.sleep(down_for)
        self.start()

    def stop(self) -> None:
        self.kill()
        self.proc = None

    def log_tail(self, lines: int = 20) -> str:
        logs = sorted(self.dir.glob("redis-*.log"))
        if not logs:
            return ""
        return "\n".join(logs[-1].read_text(errors="replace").splitlines()[-lines:])


def write_module(directory: Path, name: str, source: str) -> str:
    """Writes ``source`` as module ``name`` into ``directory`` (put on PYTHONPATH); returns name."""
    (Path(directory) / f"{name}.py").write_text(source)
    return name


def load_module(directory: Path, name: str) -> Any:
    """Imports the module written by ``write_module`` into this process (for ``register``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(directory) / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class Procs:
    """Worker (and other helper) processes of one test; ``close()`` kills what is left."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.workdir), str(ROOT), env.get("PYTHONPATH")) if p
        )
        env.pop("NBFLOW_REDIS_URL", None)
        env.update(extra or {})
        return env

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        netns: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        cmd = list(argv)
        if netns is not None:
            cmd = ["ip", "netns", "exec", netns, *cmd]  # exec's the command: same pid
        log = open(self.workdir / f"{name}.log", "wb")
        proc = subprocess.Popen(
            cmd, cwd=self.workdir, env=self.env(env), stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.procs.append((name, proc))
        return proc

    def worker(
        self,
        name: str,
        redis_url: str,
        prefix: str,
        queue: str,
        module: str,
        *,
        netns: str | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """``nbflow worker`` in a process of its own (optionally inside a network namespace)."""
        argv = [
            sys.executable,
            "-m",
            "nbflow.cli",
            "worker",
            "--redis",
            redis_url,
            "--prefix",
            prefix,
            "--queue",
            queue,
            "--import",
            module,
            *extra_args,
        ]
        return self.spawn(name, argv, netns=netns, env=env)

    def log(self, name: str, lines: int = 40) -> str:
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{self.log(n)}" for n, _ in self.procs)

    @staticmethod
    def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, sig)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def close(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2
        for _, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(proc)
        self.procs.clear()


def hist_events(client: redis.Redis, prefix: str, iid: str) -> list[dict[str, Any]]:
    """An instance's history as dicts (documented in ``nbflow.store``)."""
    import json

    return [json.loads(x) for x in client.lrange(f"{prefix}:{iid}:history", 0, -1)]


# A workflow module for worker processes.  ``Plan`` runs the steps its payload lists, and
# counts every side effect in the test's own Redis (``payload["fx"]``, or ``$NBF_FX_URL`` in the
# worker's environment, hash ``payload["k"]``):
# ``{iid}:{step}:start`` when a callback starts, ``{iid}:{step}`` when it returns.  A
# callback returns "{step}-{host}-{n}": n is its start count, so a stored result says which
# execution produced it (a late duplicate overwriting a result would show).
#
#   ["do", name]                  a step
#   ["slow", name, seconds]       a step whose callback takes that long
#   ["block", name]               a step that announces itself (SET {k}:in:{iid} pid) and
#                                 then holds while the key {k}:hold exists (at most 60 s)
#   ["retry", name, fails, delay] a step failing its first `fails` attempts (constant delay)
#   ["sleep", name, seconds]      step.sleep
#   ["event", name, type]         step.wait_for_event (timeout 1 hour)
FLOW_SOURCE = '''
import os
import time

import redis

from nbflow import WorkflowEntrypoint

_clients = {}


def fx(url):
    c = _clients.get(url)
    if c is None:
        c = _clients[url] = redis.Redis.from_url(url)
    return c


def persist(call):
    """Retries through a network cut (a blocked step must outlive its host's outage)."""
    end = time.monotonic() + 90
    while True:
        try:
            return call()
        except redis.RedisError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


class Plan(WorkflowEntrypoint):
    async def run(self, event, step):
        p = event.payload
        iid = event.instance_id
        k = p["k"]
        out = []
        for item in p["plan"]:
            kind, name = item[0], item[1]

            def cb(ctx=None, kind=kind, name=name, item=item):
                r = fx(os.environ.get("NBF_FX_URL") or p["fx"])
                n = r.hincrby(k, iid + ":" + name + ":start", 1)
                if kind == "slow":
                    time.sleep(item[2])
                elif kind == "block":
                    r.set(k + ":in:" + iid, os.getpid())
                    end = time.monotonic() + 60
                    while persist(lambda: r.exists(k + ":hold")) and time.monotonic() < end:
                        time.sleep(0.02)
                elif kind == "retry":
                    if n <= item[2]:
                        raise RuntimeError("planned failure %d" % n)
                persist(lambda: r.hincrby(k, iid + ":" + name, 1))
                # which run of the callback this result comes from, and where it ran
                return "%s-%s-%d" % (name, os.environ.get("NBF_HOST", "local"), n)

            if kind in ("do", "slow", "block"):
                # room for a re-run: an attempt cut short by a dead worker counts as one
                cfg = {"retries": {"limit": p.get("limit", 3), "delay": 0.1}}
                out.append(await step.do(name, cfg, cb))
            elif kind == "retry":
                cfg = {"retries": {"limit": item[2], "delay": item[3], "backoff": "constant"}}
                out.append(await step.do(name, cfg, cb))
            elif kind == "sleep":
                await step.sleep(name, item[2])
                out.append(name)
            elif kind == "event":
                got = await step.wait_for_event(name, item[2], timeout="1 hour")
                out.append(got["payload"])
        return out
'''


def plan_steps(plan: Sequence[Sequence[Any]]) -> list[str]:
    """Names of the plan's items whose callbacks count side effects."""
    return [item[1] for item in plan if item[0] in ("do", "slow", "block", "retry")]


def worker_count(client: redis.Redis, queue: str) -> int:
    """Workers registered for ``queue`` (as ``rq info`` sees them; a SIGKILLed one stays
    registered until its key expires)."""
    from rq import Queue, Worker

    return int(Worker.count(connection=client, queue=Queue(queue, connection=client)))


def wait_workers(client: redis.Redis, queue: str, n: int, timeout: float = 30) -> None:
    """Waits until ``n`` workers have registered for ``queue``."""
    poll(lambda: worker_count(client, queue) >= n, timeout, f"{n} worker(s) up")
