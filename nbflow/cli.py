"""The ``nbflow`` command: workers, listings, the demo and the embedded server.

::

    nbflow worker [--redis URL] [--prefix P] [--queue Q] [--import MODULE ...]
                  [--processes N] [--burst] [--artifacts URL]
    nbflow list [--status S] [--workflow NAME] [--limit N]
    nbflow status ID
    nbflow schedules [--redis URL] [--prefix P]
    nbflow gc [--artifacts URL] [--min-age DURATION] [--dry-run]
    nbflow logs ID [--step STEP]
    nbflow demo
    nbflow server start|stop|status
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import inspect
import json
import logging
import sys
import time
import uuid
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import redis as redis_lib

from nbflow import server
from nbflow.definition import WorkflowEntrypoint
from nbflow.engine import Engine
from nbflow.errors import InstanceNotFoundError, RedisUnavailableError, WorkflowError


def import_workflows(engine: Engine, modules: Sequence[str]) -> list[str]:
    """Register every ``WorkflowEntrypoint`` subclass defined in each module, by class name."""
    names = []
    for modname in modules:
        module = importlib.import_module(modname)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(obj, WorkflowEntrypoint)
                and obj is not WorkflowEntrypoint
                and obj.__module__ == module.__name__
            ):
                engine.register(obj)
                names.append(obj.__name__)
    return names


def make_engine(
    redis: str | None,
    prefix: str,
    queue: str,
    imports: Sequence[str],
    artifacts: str | None = None,
) -> Engine:
    """An engine with the imported workflows registered (picklable via partial for spawn)."""
    sys.path.insert(0, ".")  # `--import mymodule` finds modules in the working directory
    engine = Engine(redis, prefix=prefix, queue=queue, artifacts=artifacts)
    import_workflows(engine, imports)
    return engine


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--redis", help="Redis URL (default: $NBFLOW_REDIS_URL, else the embedded server)"
    )
    p.add_argument("--prefix", default="workflow", help="key prefix (must match the Engine's)")
    p.add_argument("--queue", default="nbflow", help="RQ queue name (must match the Engine's)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbflow", description="Durable workflows on Redis and RQ")
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser(
        "worker",
        help="run workers (any number, on any number of machines)",
        description="Run nbflow workers.  A worker runs only the workflows it imports: it "
        "listens to one RQ queue per workflow, QUEUE:WORKFLOW (see `rq info`), so instances "
        "of other workflows wait, queued, for a worker that has them.",
    )
    _engine_args(w)
    w.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="module whose WorkflowEntrypoint subclasses this worker runs (repeatable); "
        "it takes instances of those workflows only",
    )
    w.add_argument("--processes", type=int, default=1, help="worker processes to start (default 1)")
    w.add_argument(
        "--artifacts",
        metavar="URL",
        help="where results too large for Redis go: a directory or an fsspec URL "
        "(s3://bucket/path ...) that every engine and worker reaches "
        "(default: $NBFLOW_HOME/artifacts)",
    )
    w.add_argument("--burst", action="store_true", help="exit when nothing is due")
    w.add_argument("-v", "--verbose", action="store_true", help="log at INFO instead of WARNING")

    ls = sub.add_parser("list", help="list instances, newest first")
    _engine_args(ls)
    ls.add_argument("--status")
    ls.add_argument("--workflow")
    ls.add_argument("--limit", type=int, default=50)

    st = sub.add_parser("status", help="show one instance and its steps")
    _engine_args(st)
    st.add_argument("id")

    sc = sub.add_parser("schedules", help="list the cron schedules (engine.schedule)")
    _engine_args(sc)
    gc = sub.add_parser("gc", help="delete artifacts that no instance refers to any more (orphans)")
    _engine_args(gc)
    gc.add_argument(
        "--artifacts", metavar="URL", help="artifact location (default: $NBFLOW_HOME/artifacts)"
    )
    gc.add_argument(
        "--min-age",
        default="1 hour",
        help="leave files younger than this alone: one may be being written (default 1 hour)",
    )
    gc.add_argument("--dry-run", action="store_true", help="list the orphans, delete nothing")
    lg = sub.add_parser("logs", help="what an instance's code printed or logged, oldest first")
    _engine_args(lg)
    lg.add_argument("id")
    lg.add_argument("--step", help="only this step ('name', or 'name#2' for its 2nd occurrence)")

    sub.add_parser("demo", help="run a demo workflow end to end (starts the embedded server)")

    sv = sub.add_parser("server", help="the embedded redis-server under $NBFLOW_HOME")
    sv.add_argument("action", choices=["start", "stop", "status"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nbflow`` command; returns the exit code.

    Expected failures (a Redis that cannot be reached or used, bad arguments, a module that
    does not import) print one line naming the command and exit 2: a traceback would bury
    the line that says what to fix.
    """
    args = _parser().parse_args(argv)
    try:
        return int(_COMMANDS[args.command](args) or 0)
    except RedisUnavailableError as exc:
        # Already says what was tried and why it failed (server.connect builds it).
        print(f"nbflow {args.command}: {exc}", file=sys.stderr)
        return 2
    except redis_lib.exceptions.RedisError as exc:
        # Redis went away or refused a command after connect() had checked it.
        print(f"nbflow {args.command}: Redis failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except (WorkflowError, ValueError, TypeError, ImportError) as exc:
        print(f"nbflow {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _worker(args: argparse.Namespace) -> int:
    from nbflow.worker import serve, serve_many

    level = "INFO" if args.verbose else "WARNING"
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.processes < 1:
        raise ValueError(f"--processes must be at least 1, not {args.processes}")
    engine = make_engine(args.redis, args.prefix, args.queue, args.imports, args.artifacts)
    names = sorted(engine.workflows)
    queues = [engine.backend.queue_for(n).name for n in names]
    print(
        f"nbflow worker: {server.describe(engine.redis)} prefix={args.prefix!r} "
        f"queue={args.queue!r} processes={args.processes} artifacts={engine.artifacts} "
        f"workflows: {', '.join(names) or 'none'}",
        flush=True,
    )
    print(
        f"nbflow worker: listening to queues {', '.join(queues) or '(none: no workflows)'}"
        + ("" if names else "; it takes nothing (import a module with --import)"),
        flush=True,
    )
    if args.processes == 1:
        serve(engine.backend, burst=args.burst, logging_level=level)
    else:
        factory = functools.partial(
            make_engine, args.redis, args.prefix, args.queue, args.imports, args.artifacts
        )
        serve_many(factory, args.processes, burst=args.burst, logging_level=level)
    return 0


def _list(args: argparse.Namespace) -> int:
    engine = Engine(args.redis, prefix=args.prefix, queue=args.queue)
    df = engine.instances(workflow=args.workflow, status=args.status, limit=args.limit)
    if df.empty:
        print("no instances")
    else:
        print(
            df[["id", "workflow", "status", "current_step", "steps_done", "created_at"]].to_string(
                index=False
            )
        )
    return 0


def _status(args: argparse.Namespace) -> int:
    engine = Engine(args.redis, prefix=args.prefix, queue=args.queue)
    try:
        inst = engine.instance(args.id)
    except InstanceNotFoundError as exc:
        print(f"nbflow status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(inst.status(), default=str, indent=2))
    steps = inst.steps()
    if not steps.empty:
        print(
            steps[["step", "kind", "count", "status", "attempts", "duration_s"]].to_string(
                index=False
            )
        )
    return 0


def _schedules(args: argparse.Namespace) -> int:
    engine = Engine(args.redis, prefix=args.prefix, queue=args.queue)
    df = engine.schedules()
    if df.empty:
        print("no schedules")
        return 0
    shown = df[
        ["name", "workflow", "cron", "timezone", "overlap", "paused", "next_run", "last_instance"]
    ].copy()
    shown["next_run"] = [_utc_text(t) for t in shown["next_run"]]
    shown["last_instance"] = shown["last_instance"].fillna("-")
    print(shown.to_string(index=False))
    return 0


def _utc_text(stamp: Any) -> str:
    """A schedule's next run for the table: ISO 8601 UTC to the second, '-' when paused."""
    if stamp is None or stamp != stamp:  # None or NaT
        return "-"
    return str(stamp.strftime("%Y-%m-%dT%H:%M:%SZ"))


def _gc(args: argparse.Namespace) -> int:
    from nbflow.artifacts import collect_garbage
    from nbflow.durations import parse_duration

    engine = Engine(args.redis, prefix=args.prefix, queue=args.queue, artifacts=args.artifacts)
    store = engine.backend.artifacts
    orphans = collect_garbage(
        store,
        engine.redis,
        engine.keys.artifacts,
        min_age=parse_duration(args.min_age),
        dry_run=args.dry_run,
    )
    verb = "would delete" if args.dry_run else "deleted"
    for url in orphans:
        print(f"{verb} {url}")
    print(f"nbflow gc: {verb} {len(orphans)} orphaned artifact(s) under {store.root}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    """One line per captured line: time, step (``-`` for run's own), stream, text."""
    engine = Engine(args.redis, prefix=args.prefix, queue=args.queue)
    try:
        inst = engine.instance(args.id)
        frame = inst.logs(args.step)
    except InstanceNotFoundError as exc:
        print(f"nbflow logs: {exc}", file=sys.stderr)
        return 1
    if frame.empty:
        print("no log lines" + (f" for step {args.step!r}" if args.step else ""))
        return 0
    times = frame["time"].dt.strftime("%Y-%m-%dT%H:%M:%S.%f").str[:-3] + "Z"
    for when, step, stream, line in zip(
        times, frame["step"], frame["stream"], frame["line"], strict=True
    ):
        print(f"{when} {'-' if step is None else step} {stream}: {line}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from nbflow.demo import DemoOrder

    print("nbflow demo: a durable workflow, step by step")
    engine = Engine(prefix="nbflow-demo", queue="nbflow-demo")
    print(f"  Redis: {server.describe(engine.redis)}")
    flow = engine.register(DemoOrder)
    engine.start_worker()
    try:
        inst = flow.create(id=f"order-{uuid.uuid4().hex[:8]}", params={"order_id": 42})
        print(f"  created instance {inst.id} of workflow {flow.name}")
        started = time.monotonic()
        _wait_for(inst, "waiting", 30)
        print("  it sleeps in Redis (status 'waiting'), then waits for an 'approved' event ...")
        _wait_for_step(inst, "manager approval", 30)
        inst.send_event("approved", {"by": "manager"})
        print("  sent event 'approved'")
        result = inst.wait(timeout=60)
        took = time.monotonic() - started
        for row in inst.steps().to_dict("records"):
            print(_demo_step_line(row))
        print(f"  instance {inst.id} is {result['status']} after {took:.1f} s:")
        print(f"    {json.dumps(result.get('output') or result.get('error'))}")
        print("Next: `nbflow list --prefix nbflow-demo`, or open notebooks/ in Jupyter.")
        return 0 if result["status"] == "complete" else 1
    finally:
        engine.stop_worker()


def _demo_step_line(row: Mapping[Hashable, Any]) -> str:
    """One row of the demo's step table.

    Attempts are shown for ``do`` steps only: a sleep or an event wait is not retried, so
    "1 attempt" there would suggest a retry policy it does not have.  No trailing blanks
    when a step has no output (a sleep).
    """
    tries = ""
    if row["kind"] == "do":
        attempts = int(row["attempts"])
        tries = f"{attempts} attempts" if attempts != 1 else "1 attempt"
    shown = row["output"]
    out = "" if shown is None else f"-> {json.dumps(shown, default=_json_text)}"
    return f"    {row['status']:9} {row['kind']:6} {row['step']:17} {tries:11} {out}".rstrip()


def _json_text(value: object) -> str:
    """JSON fallback for the demo's output: ISO 8601 for datetimes (an event's timestamp),
    the usual text form of a time in JSON, rather than ``str``'s space-separated one."""
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return str(value)


def _wait_for(inst: Any, status: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while inst.status()["status"] != status and time.monotonic() < deadline:
        time.sleep(0.02)


def _wait_for_step(inst: Any, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = inst.steps()
        if not steps.empty and name in set(steps["step"]):
            return
        time.sleep(0.02)


def _server(args: argparse.Namespace) -> int:
    if args.action == "start":
        url = server.start_server()
        print(f"nbflow server running at {url} (data in {server.nbflow_home() / 'data'})")
    elif args.action == "stop":
        stopped = server.stop_server()
        print("nbflow server stopped" if stopped else "nbflow server was not running")
    else:
        info = server.server_status()
        print(json.dumps(info, indent=2, default=str))
        return 0 if info.get("running") else 1
    return 0


_COMMANDS = {
    "worker": _worker,
    "list": _list,
    "status": _status,
    "schedules": _schedules,
    "gc": _gc,
    "logs": _logs,
    "demo": _demo,
    "server": _server,
}

if __name__ == "__main__":
    sys.exit(main())
