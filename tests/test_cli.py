"""The ``nbflow`` command against a real Redis: workers from imported modules, listings,
the demo on the embedded server, and `rq info`-visible workers."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from rq import Worker
from support import not_redis_port

from nbflow import Engine, WorkflowEntrypoint, cli, server
from nbflow.cli import import_workflows, main

WORKFLOW_MODULE = textwrap.dedent(
    """
    from nbflow import WorkflowEntrypoint

    class Greet(WorkflowEntrypoint):
        async def run(self, event, step):
            name = await step.do("name", lambda: event.payload["name"])
            return await step.do("greet", lambda: f"hello {name}")

    class Shout(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("shout", lambda: event.payload["name"].upper())

    NotAWorkflow = dict
    """
)


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "cli_flows.py").write_text(WORKFLOW_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _env(module_dir: Path) -> dict[str, str]:
    return dict(
        os.environ, PYTHONPATH=f"{module_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    )


def _worker_cmd(redis_url: str, prefix: str, queue: str, *extra: str) -> list[str]:
    """`nbflow worker` running the workflows of cli_flows against this test's prefix/queue."""
    return [
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
        "cli_flows",
        *extra,
    ]


def test_import_registers_each_workflow_class_defined_in_the_module(
    engine: Engine, module_dir: Path
) -> None:
    names = import_workflows(engine, ["cli_flows"])
    assert sorted(names) == ["Greet", "Shout"]
    assert engine.workflows == ["Greet", "Shout"]


def test_burst_worker_process_runs_imported_workflows_to_completion(
    engine: Engine, module_dir: Path, redis_url: str
) -> None:
    import_workflows(engine, ["cli_flows"])
    greet = engine.workflow("Greet").create(params={"name": "ada"})
    shout = engine.workflow("Shout").create(params={"name": "bob"})
    cmd = _worker_cmd(redis_url, engine.prefix, engine.queue_name, "--burst")
    done = subprocess.run(cmd, env=_env(module_dir), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Greet, Shout" in done.stdout
    assert greet.status() == {"status": "complete", "output": "hello ada"}
    assert shout.status() == {"status": "complete", "output": "BOB"}


def test_worker_with_several_processes_shows_up_in_rq_and_shares_the_work(
    engine: Engine, module_dir: Path, redis_url: str
) -> None:
    import_workflows(engine, ["cli_flows"])
    cmd = _worker_cmd(redis_url, engine.prefix, engine.queue_name, "--processes", "2")
    proc = subprocess.Popen(
        cmd, env=_env(module_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if len(Worker.all(queue=engine.backend.queue_for("Greet"))) == 2:
                break
            time.sleep(0.1)
        assert len(Worker.all(queue=engine.backend.queue_for("Greet"))) == 2  # what `rq info` lists
        batch = engine.workflow("Greet").create_batch(
            [{"params": {"name": str(i)}} for i in range(40)]
        )
        for inst in batch:
            assert inst.wait(timeout=30)["status"] == "complete"
    finally:
        proc.terminate()
        proc.wait(20)


def test_worker_for_a_prefix_runs_nothing_of_another_prefix(
    engine: Engine, module_dir: Path, redis_url: str
) -> None:
    import_workflows(engine, ["cli_flows"])
    inst = engine.workflow("Greet").create(params={"name": "x"})
    cmd = _worker_cmd(redis_url, engine.prefix + "other", engine.queue_name + "other", "--burst")
    subprocess.run(cmd, env=_env(module_dir), capture_output=True, timeout=60, check=True)
    assert inst.status()["status"] == "queued"


def test_unregistered_workflow_waits_queued_saying_for_what(engine: Engine) -> None:
    class Lonely(WorkflowEntrypoint):
        def run(self, event: object, step: object) -> int:
            return 1

    inst = engine.register(Lonely).create()
    del engine.backend.classes["Lonely"]  # a worker that never imported it
    engine.run_worker(burst=True)
    assert inst.status() == {"status": "queued"}  # never errored for it (spec 8.1)
    assert inst.info()["waiting_for"] == "a worker with workflow 'Lonely'"


def test_list_and_status_print_instances(
    engine: Engine, module_dir: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import_workflows(engine, ["cli_flows"])
    inst = engine.workflow("Greet").create(id="cli-greet-1", params={"name": "cy"})
    engine.run_worker(burst=True)
    common = ["--redis", redis_url, "--prefix", engine.prefix, "--queue", engine.queue_name]
    assert main(["list", *common]) == 0
    out = capsys.readouterr().out
    assert "cli-greet-1" in out and "complete" in out
    assert main(["status", inst.id, *common]) == 0
    out = capsys.readouterr().out
    assert '"output": "hello cy"' in out and "greet" in out
    assert main(["status", "no-such-id", *common]) == 1
    assert "no instance 'no-such-id'" in capsys.readouterr().err


def test_bad_status_filter_is_a_clear_error(
    engine: Engine, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["list", "--redis", redis_url, "--prefix", engine.prefix, "--status", "sleepy"])
    assert code == 2
    assert "unknown status 'sleepy'" in capsys.readouterr().err


def test_unreachable_redis_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--redis", "redis://127.0.0.1:1/0"]) == 2
    err = capsys.readouterr().err
    assert "redis://127.0.0.1:1/0" in err
    assert "Traceback" not in err


def _nbflow(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``nbflow`` command in a fresh interpreter, as a user's shell would."""
    return subprocess.run(
        [sys.executable, "-m", "nbflow.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _with_db(url: str, db: int) -> str:
    """``url`` pointing at database ``db`` (the path of a TCP URL, ``?db=`` of a unix one)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return urlunsplit(parts._replace(query=f"db={db}"))
    return urlunsplit(parts._replace(path=f"/{db}"))


def test_status_with_a_database_the_server_lacks_prints_one_line_not_a_traceback(
    redis_url: str,
) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        setting = client.config_get("databases").get("databases")
    except redis.RedisError as exc:  # CONFIG may be renamed away on a managed server
        pytest.skip(f"cannot read the server's number of databases: {exc}")
    finally:
        client.close()
    assert setting is not None
    databases = int(setting)
    url = _with_db(redis_url, databases)  # indexes run 0 .. databases-1
    done = _nbflow("status", "some-id", "--redis", url)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("nbflow status: ")
    assert server.mask_url(url) in lines[0]  # what was tried
    assert "DB index is out of range" in lines[0]  # what went wrong, in Redis' words
    assert f"no database {databases}" in lines[0]
    assert done.stdout == ""


def test_status_against_a_port_that_is_not_redis_prints_one_line_not_a_traceback() -> None:
    page = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/html\r\n\r\n<html>no</html>"
    with not_redis_port(page) as port:
        url = f"redis://127.0.0.1:{port}/0"
        done = _nbflow("status", "some-id", "--redis", url)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert url in lines[0]
    assert "Protocol error" in lines[0]
    assert "does not speak the Redis protocol" in lines[0]


def test_list_against_a_port_that_is_not_redis_returns_2_from_main(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with not_redis_port(b"<!DOCTYPE html><html>not redis</html>\r\n") as port:
        url = f"redis://127.0.0.1:{port}/0"
        assert main(["list", "--redis", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"nbflow list: nbflow could not use Redis at {url}" in err
    assert 'Protocol error, got "<"' in err


def test_redis_failing_after_connect_prints_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def lost(args: object) -> int:
        raise redis.exceptions.ConnectionError("Connection closed by server.")

    monkeypatch.setitem(cli._COMMANDS, "list", lost)
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert err == "nbflow list: Redis failed: ConnectionError: Connection closed by server.\n"


def test_demo_step_lines_show_attempts_only_for_do_steps() -> None:
    do = {"status": "complete", "kind": "do", "step": "charge card", "attempts": 3, "output": 1}
    sleep = {"status": "complete", "kind": "sleep", "step": "cool-off", "attempts": 1}
    assert cli._demo_step_line(do) == "    complete  do     charge card       3 attempts  -> 1"
    assert cli._demo_step_line({**sleep, "output": None}) == "    complete  sleep  cool-off"


def test_demo_runs_end_to_end_on_the_embedded_server() -> None:
    if server.find_redis_server() is None:
        pytest.skip("no redis-server binary to embed")
    home = tempfile.mkdtemp(prefix="nbd-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "NBFLOW_REDIS_URL"}
    env["NBFLOW_HOME"] = home
    try:
        done = subprocess.run(
            [sys.executable, "-m", "nbflow.cli", "demo"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"unix://{home}/redis.sock" in done.stdout
        assert "charge card       3 attempts" in done.stdout
        assert "is complete after" in done.stdout
        assert "waits for an 'approved' event" in done.stdout
        assert not [line for line in done.stdout.splitlines() if line != line.rstrip()]
        status = subprocess.run(
            [sys.executable, "-m", "nbflow.cli", "server", "status"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert '"running": true' in status.stdout
    finally:
        subprocess.run(
            [sys.executable, "-m", "nbflow.cli", "server", "stop"],
            env=env,
            capture_output=True,
            timeout=30,
        )
    assert not server.server_status(Path(home))["running"]
