"""The ``%wf`` line magic: start, inspect and steer workflow instances from a notebook.

One ``@magics_class`` (``WorkflowMagics``) with one line magic and subcommands,
in the JupySQL / sparkmagic style::

    %wf start NAME [--id ID] [--params JSON]
    %wf list [--status S] [--workflow NAME] [--limit N]
    %wf status ID
    %wf pause|resume|terminate ID
    %wf restart ID [--from STEP]
    %wf rerun ID --stale | --from STEP
    %wf fork ID [--from STEP] [--id NEW]
    %wf event ID TYPE [JSON]
    %wf steps ID
    %wf output ID STEP
    %wf logs ID [STEP]
    %wf wait ID [--timeout SECONDS]
    %wf worker start|stop|status
    %wf dashboard [--refresh SECONDS]
    %wf schedule list|pause|resume|delete|trigger|next [NAME] [-n N]
    %wf help

Every user mistake -- an unknown subcommand, a missing argument, bad JSON, an
unknown workflow, instance id or step, a lifecycle call in the wrong state --
is one ``UsageError`` line that names the right form; IPython shows it without
a traceback.  The subcommands parse with ``argparse`` (one parser each, which
IPython's single-parser ``magic_arguments`` does not offer) subclassed so it
never prints and never exits.

Workflow classes are looked up by name in the notebook's namespace when a
command names them and registered on the engine then, so re-running a cell
that redefines a class makes new runs (and restarts) use the new definition.

The magic does no variable expansion (``@no_var_expand``): JSON like
``{"n":5}`` would otherwise be taken for a ``{expression}`` and mangled.  JSON
objects and arrays may be written unquoted: ``--params {"name": "ada"}``.
"""

from __future__ import annotations

import argparse
import difflib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class, no_var_expand

from nbflow.engine import Engine, Workflow, WorkflowInstance
from nbflow.errors import (
    InstanceNotFoundError,
    RedisUnavailableError,
    WorkflowError,
)
from nbflow.notebook import find_workflow_class, get_engine, reregister
from nbflow.notebook.display import notify_changed, step_label
from nbflow.records import InstanceStatus

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

    from nbflow.notebook.widgets import Dashboard

__all__ = ["USAGE", "WorkerState", "WorkflowMagics", "load_ipython_extension"]

#: Subcommands that change an instance (its displayed cards are redrawn at once).
_CHANGES = frozenset({"pause", "resume", "terminate", "restart", "rerun", "event"})

#: The right form of every subcommand (what a ``UsageError`` quotes).
USAGE: dict[str, str] = {
    "start": "%wf start NAME [--id ID] [--params JSON]",
    "list": "%wf list [--status S] [--workflow NAME] [--limit N]",
    "status": "%wf status ID",
    "pause": "%wf pause ID",
    "resume": "%wf resume ID",
    "terminate": "%wf terminate ID",
    "restart": "%wf restart ID [--from STEP]",
    "rerun": "%wf rerun ID --stale | --from STEP",
    "fork": "%wf fork ID [--from STEP] [--id NEW]",
    "event": "%wf event ID TYPE [JSON]",
    "steps": "%wf steps ID",
    "output": "%wf output ID STEP",
    "logs": "%wf logs ID [STEP]",
    "wait": "%wf wait ID [--timeout SECONDS]",
    "worker": "%wf worker start|stop|status",
    "dashboard": "%wf dashboard [--refresh SECONDS]",
    "schedule": "%wf schedule list | %wf schedule pause|resume|delete|trigger NAME | "
    "%wf schedule next NAME [-n N]",
    "help": "%wf help",
}

_OVERVIEW = "%wf " + "|".join(USAGE) + " ..."
#: What ``%wf schedule`` does (all but ``list`` name a schedule).
SCHEDULE_ACTIONS = ("list", "pause", "resume", "delete", "trigger", "next")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(command: str | None, problem: str) -> UsageError:
    """A one-line ``UsageError``: what was wrong, then the right form."""
    form = USAGE.get(command or "", _OVERVIEW)
    return UsageError(f"{_one_line(problem)}; usage: {form}")


class _Parser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` instead of printing and calling ``sys.exit``."""

    def __init__(self, command: str) -> None:
        super().__init__(prog=f"%wf {command}", add_help=False, allow_abbrev=False)
        self.command = command

    def error(self, message: str) -> NoReturn:
        raise _fail(self.command, message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _fail(self.command, message or "invalid arguments")

    def _print_message(self, message: str, file: Any = None) -> None:
        """Never print: output from a magic would land in the cell as noise."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of seconds >= 0")
    return value


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _parsers() -> dict[str, _Parser]:
    parsers = {name: _Parser(name) for name in USAGE}
    p = parsers["start"]
    p.add_argument("name", metavar="NAME")
    p.add_argument("--id", dest="id", metavar="ID")
    p.add_argument("--params", metavar="JSON")
    p = parsers["list"]
    p.add_argument("--status", metavar="S")
    p.add_argument("--workflow", metavar="NAME")
    p.add_argument("--limit", type=_limit, default=1000, metavar="N")
    for name in ("status", "pause", "resume", "terminate", "steps"):
        parsers[name].add_argument("id", metavar="ID")
    p = parsers["restart"]
    p.add_argument("id", metavar="ID")
    p.add_argument("--from", dest="from_step", nargs="+", metavar="STEP")
    p = parsers["rerun"]
    p.add_argument("id", metavar="ID")
    p.add_argument("--stale", action="store_true")
    p.add_argument("--from", dest="from_step", nargs="+", metavar="STEP")
    p = parsers["fork"]
    p.add_argument("id", metavar="ID")
    p.add_argument("--from", dest="from_step", nargs="+", metavar="STEP")
    p.add_argument("--id", dest="new_id", metavar="NEW")
    p = parsers["event"]
    p.add_argument("id", metavar="ID")
    p.add_argument("type", metavar="TYPE")
    p.add_argument("payload", nargs="?", metavar="JSON")
    p = parsers["output"]
    p.add_argument("id", metavar="ID")
    p.add_argument("step", nargs="+", metavar="STEP")
    p = parsers["logs"]
    p.add_argument("id", metavar="ID")
    p.add_argument("step", nargs="*", metavar="STEP")
    p = parsers["wait"]
    p.add_argument("id", metavar="ID")
    p.add_argument("--timeout", type=_positive_float, metavar="SECONDS")
    p = parsers["worker"]
    p.add_argument("action", choices=["start", "stop", "status"], metavar="start|stop|status")
    p = parsers["dashboard"]
    p.add_argument("--refresh", type=_positive_float, default=1.0, metavar="SECONDS")
    p = parsers["schedule"]
    p.add_argument("action", choices=SCHEDULE_ACTIONS, metavar="|".join(SCHEDULE_ACTIONS))
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("-n", dest="n", type=_limit, default=5, metavar="N")
    return parsers


_JSON = json.JSONDecoder()


def split_line(line: str) -> list[str]:
    """Split a magic's line like a shell, but keep an unquoted JSON object or array whole.

    ``start G --params {"name": "ada"}`` gives ``["start", "G", "--params",
    '{"name": "ada"}']``; quoted forms (``'{"name": "ada"}'``) work as in a shell.
    Raises ``ValueError`` on an unclosed quote.
    """
    tokens: list[str] = []
    i, n = 0, len(line)
    while i < n:
        if line[i].isspace():
            i += 1
            continue
        if line[i] in "{[":
            try:
                _, end = _JSON.raw_decode(line, i)
            except json.JSONDecodeError:
                pass  # not JSON after all: read it as a word, the caller will complain
            else:
                if end == n or line[end].isspace():
                    tokens.append(line[i:end])
                    i = end
                    continue
        word, i = _word(line, i)
        tokens.append(word)
    return tokens


def _word(line: str, i: int) -> tuple[str, int]:
    """One shell word from ``line[i]`` on: quotes group, backslash escapes (POSIX rules)."""
    out: list[str] = []
    n = len(line)
    while i < n and not line[i].isspace():
        c = line[i]
        if c == "'":
            end = line.find("'", i + 1)
            if end < 0:
                raise ValueError("no closing quotation (')")
            out.append(line[i + 1 : end])
            i = end + 1
        elif c == '"':
            i += 1
            while True:
                if i >= n:
                    raise ValueError('no closing quotation (")')
                if line[i] == '"':
                    i += 1
                    break
                if line[i] == "\\" and i + 1 < n and line[i + 1] in '"\\$`':
                    out.append(line[i + 1])
                    i += 2
                else:
                    out.append(line[i])
                    i += 1
        elif c == "\\" and i + 1 < n:
            out.append(line[i + 1])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out), i


def _json(command: str, what: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(
            command, f"{what} is not valid JSON ({exc.msg} at column {exc.colno}): {text!r}"
        ) from None


@contextmanager
def _as_usage(command: str) -> Iterator[None]:
    """Turn the engine's errors about what the user asked for into one-line ``UsageError``s."""
    try:
        yield
    except RedisUnavailableError as exc:
        raise UsageError(_one_line(str(exc))) from None
    except (WorkflowError, LookupError, ValueError, TypeError) as exc:
        raise _fail(command, str(exc)) from None


@dataclass(frozen=True)
class WorkerState:
    """What ``%wf worker ...`` returns: whether this kernel's worker runs.

    Its repr is stable text (no thread ids or addresses), so stored outputs compare.
    """

    running: bool

    def __repr__(self) -> str:
        return f"in-process worker: {'running' if self.running else 'stopped'}"

    def __bool__(self) -> bool:
        return self.running


class _Help:
    """``%wf help``: the usage lines, shown as plain text."""

    def __repr__(self) -> str:
        return "\n".join(USAGE.values())


@magics_class
class WorkflowMagics(Magics):
    """The ``%wf`` magic.  Holds the dashboard it opened last (closed when a new one opens)."""

    def __init__(self, shell: InteractiveShell | None = None, **kwargs: Any) -> None:
        # IPython >= 9 ships type hints, older ones do not: each ignore holds both ways.
        super().__init__(shell, **kwargs)  # type: ignore[no-untyped-call, unused-ignore]
        self._parsers = _parsers()
        self._dashboard: Dashboard | None = None
        self._commands: dict[str, Callable[[argparse.Namespace], Any]] = {
            "start": self._start,
            "list": self._list,
            "status": self._status,
            "pause": self._pause,
            "resume": self._resume,
            "terminate": self._terminate,
            "restart": self._restart,
            "rerun": self._rerun,
            "fork": self._fork,
            "event": self._event,
            "steps": self._steps,
            "output": self._output,
            "logs": self._logs,
            "wait": self._wait,
            "worker": self._worker,
            "dashboard": self._open_dashboard,
            "schedule": self._schedule,
            "help": lambda _args: _Help(),
        }

    @no_var_expand  # type: ignore[untyped-decorator, unused-ignore]
    @line_magic  # type: ignore[untyped-decorator, unused-ignore]
    def wf(self, line: str = "") -> Any:
        """Durable workflows from a notebook.

        %wf start NAME [--id ID] [--params JSON]   start an instance (returns it)
        %wf list [--status S] [--workflow NAME] [--limit N]   instances (DataFrame)
        %wf status ID                              its status dict
        %wf pause|resume|terminate ID              lifecycle calls
        %wf restart ID [--from STEP]               run again (from a step)
        %wf rerun ID --stale | --from STEP         re-run from the first stale step (or a step)
        %wf fork ID [--from STEP] [--id NEW]       a new instance reusing earlier results
        %wf event ID TYPE [JSON]                   send an event
        %wf steps ID                               its steps (DataFrame)
        %wf output ID STEP                         a step's stored result
        %wf logs ID [STEP]                         what it printed / logged (DataFrame)
        %wf wait ID [--timeout SECONDS]            block until it finishes
        %wf worker start|stop|status               the worker inside this kernel
        %wf dashboard [--refresh SECONDS]          the live dashboard
        %wf schedule list                          cron schedules (DataFrame)
        %wf schedule pause|resume|delete NAME      steer a schedule
        %wf schedule trigger NAME                  one instance now (returns it)
        %wf schedule next NAME [-n N]              its next N run times
        """
        try:
            tokens = split_line(line)
        except ValueError as exc:
            words = line.split()
            raise _fail(words[0] if words else None, str(exc)) from None
        if not tokens:
            raise _fail(None, "%wf needs a subcommand")
        command, rest = tokens[0], tokens[1:]
        if command not in self._commands:
            close = difflib.get_close_matches(command, list(self._commands), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _fail(None, f"unknown subcommand {command!r}{hint}")
        args = self._parsers[command].parse_args(rest)
        result = self._commands[command](args)
        if command in _CHANGES and isinstance(result, WorkflowInstance):
            notify_changed(args.id)  # displayed cards of it follow at once
        return result

    # -- helpers ----------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The engine the magics use (``nbflow.notebook.use_engine``, else a default one)."""
        try:
            return get_engine()
        except RedisUnavailableError as exc:
            raise UsageError(_one_line(str(exc))) from None

    @property
    def namespace(self) -> dict[str, Any]:
        """The notebook's namespace, where workflow classes are looked up by name."""
        return self.shell.user_ns if self.shell is not None else {}

    def _workflow(self, command: str, name: str) -> Workflow[Any]:
        """Look ``name`` up in the notebook and register it now; else an already registered one."""
        engine = self.engine
        cls = find_workflow_class(self.namespace, name)
        if cls is None and self.namespace.get(name) is not None:
            value = self.namespace[name]
            what = "a class" if isinstance(value, type) else f"a {type(value).__name__}"
            raise _fail(
                command,
                f"{name!r} in this notebook is {what}, not a WorkflowEntrypoint subclass",
            )
        with _as_usage(command):
            if cls is not None:
                return engine.register(cls, name=name)
            if name in engine.workflows:
                return engine.workflow(name)
        raise _fail(
            command,
            f"unknown workflow {name!r}: define a WorkflowEntrypoint subclass named "
            f"{name} in this notebook (or register it with engine.register)",
        )

    def _instance(self, command: str, instance_id: str) -> WorkflowInstance:
        engine = self.engine
        try:
            return engine.instance(instance_id)
        except InstanceNotFoundError:
            raise _fail(
                command, f"unknown instance {instance_id!r} (under prefix {engine.prefix!r})"
            ) from None
        except (ValueError, TypeError) as exc:
            raise _fail(command, str(exc)) from None

    def _reregister(self, inst: WorkflowInstance) -> None:
        """Before a call that makes the instance run again, register its class from the notebook.

        So fixing a workflow's cell and then ``%wf restart ID --from STEP`` runs the fix.
        """
        reregister(self.engine, self.namespace, inst)

    # -- subcommands ------------------------------------------------------------------

    def _start(self, args: argparse.Namespace) -> WorkflowInstance:
        wf = self._workflow("start", args.name)
        params = None if args.params is None else _json("start", "--params", args.params)
        with _as_usage("start"):
            return wf.create(id=args.id, params=params)

    def _list(self, args: argparse.Namespace) -> Any:
        with _as_usage("list"):
            return self.engine.instances(
                workflow=args.workflow, status=args.status, limit=args.limit
            )

    def _status(self, args: argparse.Namespace) -> InstanceStatus:
        inst = self._instance("status", args.id)
        with _as_usage("status"):
            return inst.status()

    def _lifecycle(self, command: str, args: argparse.Namespace) -> WorkflowInstance:
        inst = self._instance(command, args.id)
        if command == "resume":
            self._reregister(inst)
        with _as_usage(command):
            getattr(inst, command)()
        return inst

    def _pause(self, args: argparse.Namespace) -> WorkflowInstance:
        return self._lifecycle("pause", args)

    def _resume(self, args: argparse.Namespace) -> WorkflowInstance:
        return self._lifecycle("resume", args)

    def _terminate(self, args: argparse.Namespace) -> WorkflowInstance:
        return self._lifecycle("terminate", args)

    def _restart(self, args: argparse.Namespace) -> WorkflowInstance:
        inst = self._instance("restart", args.id)
        from_step = None if args.from_step is None else " ".join(args.from_step)
        self._reregister(inst)
        with _as_usage("restart"):
            inst.restart(from_step=from_step)
        return inst

    def _rerun(self, args: argparse.Namespace) -> WorkflowInstance:
        """``--stale``: from the first step whose code changed (``rerun_stale``), with the
        class as the notebook defines it now; ``--from STEP``: as ``restart --from``."""
        if args.stale == (args.from_step is not None):
            raise _fail("rerun", "give either --stale or --from STEP")
        inst = self._instance("rerun", args.id)
        self._reregister(inst)
        with _as_usage("rerun"):
            if args.stale:
                inst.rerun_stale()
            else:
                inst.restart(from_step=" ".join(args.from_step))
        return inst

    def _fork(self, args: argparse.Namespace) -> WorkflowInstance:
        inst = self._instance("fork", args.id)
        from_step = None if args.from_step is None else " ".join(args.from_step)
        self._reregister(inst)
        with _as_usage("fork"):
            return inst.fork(from_step, id=args.new_id)

    def _event(self, args: argparse.Namespace) -> WorkflowInstance:
        inst = self._instance("event", args.id)
        payload = None if args.payload is None else _json("event", "the payload", args.payload)
        self._reregister(inst)
        with _as_usage("event"):
            inst.send_event(args.type, payload)
        return inst

    def _steps(self, args: argparse.Namespace) -> Any:
        inst = self._instance("steps", args.id)
        with _as_usage("steps"):
            return inst.steps()

    def _output(self, args: argparse.Namespace) -> Any:
        inst = self._instance("output", args.id)
        step = " ".join(args.step)
        try:
            return inst.step_output(step)
        except LookupError as exc:
            problem = str(exc)
            if "has no step" in problem:
                with _as_usage("output"):
                    steps = inst.steps()
                names = [
                    step_label(n, c) for n, c in zip(steps["step"], steps["count"], strict=True)
                ]
                problem += f" (its steps: {', '.join(names) or 'none yet'})"
            raise _fail("output", problem) from None
        except (WorkflowError, ValueError, TypeError) as exc:
            raise _fail("output", str(exc)) from None

    def _logs(self, args: argparse.Namespace) -> Any:
        """What the instance's code printed or logged (``inst.logs``), all or one step's."""
        inst = self._instance("logs", args.id)
        step = " ".join(args.step) if args.step else None
        with _as_usage("logs"):
            return inst.logs(step)

    def _wait(self, args: argparse.Namespace) -> InstanceStatus:
        inst = self._instance("wait", args.id)
        try:
            return inst.wait(timeout=args.timeout)
        except TimeoutError as exc:
            raise _fail("wait", f"{exc} (is a worker running? %wf worker start)") from None

    def _worker(self, args: argparse.Namespace) -> WorkerState:
        engine = self.engine
        if args.action == "start":
            engine.start_worker()
        elif args.action == "stop":
            engine.stop_worker()
        return WorkerState(engine.worker_running)

    def _schedule(self, args: argparse.Namespace) -> Any:
        """``%wf schedule ...``: list returns the DataFrame, trigger the new instance,
        next the run times, and pause/resume/delete the schedule's info afterwards
        (delete: the list that is left)."""
        engine = self.engine
        if args.action == "list":
            with _as_usage("schedule"):
                return engine.schedules()
        if args.name is None:
            raise _fail("schedule", f"%wf schedule {args.action} needs a schedule NAME")
        with _as_usage("schedule"):
            try:
                sched = engine.get_schedule(args.name)
            except LookupError:
                known = ", ".join(engine.schedules()["name"]) or "none"
                raise _fail(
                    "schedule", f"unknown schedule {args.name!r} (schedules: {known})"
                ) from None
            if args.action == "trigger":
                return sched.trigger()
            if args.action == "next":
                return [t.isoformat() for t in sched.next_runs(args.n)]
            if args.action == "delete":
                sched.delete()
                return engine.schedules()
            getattr(sched, args.action)()
            return sched.info()

    def _open_dashboard(self, args: argparse.Namespace) -> Dashboard:
        from nbflow.notebook.widgets import Dashboard

        if self._dashboard is not None:
            self._dashboard.close()
        self._dashboard = Dashboard(
            self.engine, refresh_interval=max(0.1, args.refresh), namespace=self.namespace
        )
        return self._dashboard


def load_ipython_extension(ipython: InteractiveShell) -> None:
    """``%load_ext nbflow``: register ``%wf`` on this shell."""
    ipython.register_magics(WorkflowMagics)  # type: ignore[no-untyped-call, unused-ignore]
