"""Composition in the step protocol (spec 10.1, 10.4): child workflows
(``step.run_workflow``), maps (``step.map``) and saga rollbacks (``rollback=`` on
``step.do``).  ``ComposeSteps`` is mixed into the step API of ``nbflow.step``; like the
rest of the protocol it is written once, as ``async`` code, and decides *what* to
record, while its run (``ComposeRun``, satisfied by ``nbflow.runner.Run``) decides *how*.

Children
    A child is an instance of its own, created by the ``start_child`` script together
    with the parent's pending step entry (kind ``workflow``, naming the child in ``c``).
    The parent then parks (``waiting``, no timer, no worker held).  The script that
    ends the child (finish, fail, terminate: ``notify_parent`` in ``nbflow.store``)
    writes the outcome into that entry and queues a waiting parent in the same call,
    so no end is ever lost between the two.  A replay that finds the pending entry
    parks again without a call; one that finds it final returns the child's output or
    raises its error.  Child ids are deterministic (``child_id``), so a replay never
    starts a second child; a parent restarted from before the step starts its child
    afresh under the same id (the child's metadata records the parent's generation).

Maps
    ``step.map`` is ``step.do`` per item (``name#1`` ... ``name#n``), at most
    ``concurrency`` at a time (an ``asyncio.Semaphore``); a plain ``def run`` maps one
    item after another (it has no loop to overlap them on).

Rollbacks
    A ``rollback=`` callback is registered (in memory) when its step completes, or when
    a replay passes its stored result, so the run that fails -- the first one, or one
    resumed after a crash, which replays up to the same stored failure -- knows every
    rollback.  ``roll_back`` then runs them newest step first, each a durable step of
    kind ``rollback`` (key ``rollback:{step key}``, its own retries and timeout): a
    finished rollback replays and is not run again; the instance stays ``running``
    (or ``waiting`` for a long retry) until the last one is done, then ends errored.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from nbflow import callbacks, codec
from nbflow.definition import RollbackContext, StepContext
from nbflow.errors import (
    FatalRunError,
    InstanceExistsError,
    WorkflowNotRegisteredError,
    rebuild_error,
)
from nbflow.fingerprint import class_version
from nbflow.validate import StepConfig, check_instance_id, check_step_name, resolve_step_config

_ID_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")
_ID_MAX = 100


class ComposeRun(Protocol):
    """What composition needs of the run, beyond the step protocol's ``StepRun``."""

    iid: str
    created_ts: float
    max_step_bytes: int
    blocking: bool

    def registered_workflows(self) -> Mapping[str, type]: ...

    async def start_child(
        self,
        key: str,
        name: str,
        child_id: str,
        workflow: str,
        payload: str,
        entry: str,
        t0: float,
        version: str,
    ) -> tuple[str, Any]: ...

    def wait_for_child(self, key: str) -> NoReturn: ...


def child_id(parent: str, name: str, count: int) -> str:
    """The default id of a child: ``{parent}-{name}``, ``{parent}-{name}-{n}`` for the
    n-th call (n > 1) with that step name; characters an id may not hold become ``_``.
    Deterministic, so every replay of the parent names the same child."""
    raw = f"{parent}-{name}" + (f"-{count}" if count > 1 else "")
    safe = _ID_UNSAFE.sub("_", raw)
    if len(safe) > _ID_MAX:
        raise ValueError(
            f"the default child id {safe[:40]!r}... of step {name!r} is {len(safe)} characters "
            f"long (at most {_ID_MAX}); pass id= to step.run_workflow"
        )
    return safe


def check_concurrency(value: Any) -> int:
    """``step.map``'s ``concurrency``: a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"step.map concurrency must be a positive int (items run at once), not {value!r}"
        )
    return value


@dataclass
class _Rollback:
    """A completed step's rollback, known to this run."""

    index: int
    key: str
    callback: Callable[..., Any]
    config: StepConfig
    step: StepContext
    output: Any


class ComposeSteps:
    """``run_workflow``, ``map`` and rollbacks, as methods of the step API (see the
    module docstring).  The step base class provides the hooks below."""

    _run: ComposeRun  # the step base narrows it to its StepRun
    _rollbacks: list[_Rollback] | None = None

    # -- hooks the step protocol provides -----------------------------------------------

    def _new_step(self, name: str, kind: str) -> Any:
        raise NotImplementedError

    def _special_step(self, key: str, kind: str) -> Any:
        raise NotImplementedError

    def _do(
        self, st: Any, cfg: StepConfig, callback: Callable[..., Any]
    ) -> Coroutine[Any, Any, Any]:
        raise NotImplementedError

    def _e(self, status: str, kind: str, st: Any, attempts: int, t0: float, **kw: Any) -> str:
        raise NotImplementedError

    # -- child workflows ---------------------------------------------------------------

    def _workflow_name(self, workflow: Any) -> str:
        """The registered name of ``workflow``: a ``Workflow``, a name, or a class."""
        known = self._run.registered_workflows()
        if isinstance(workflow, str):
            if workflow in known:
                return workflow
            names = ", ".join(sorted(known)) or "none"
            raise WorkflowNotRegisteredError(
                f"step.run_workflow: no workflow named {workflow!r} is registered "
                f"(registered: {names})"
            )
        if isinstance(workflow, type):
            for name, cls in known.items():
                if cls is workflow:
                    return name
            raise WorkflowNotRegisteredError(
                f"step.run_workflow: class {workflow.__name__} is not registered; "
                "register it with engine.register() first"
            )
        handle_name = getattr(workflow, "name", None)
        if isinstance(handle_name, str) and callable(getattr(workflow, "create", None)):
            return handle_name  # a Workflow handle
        raise TypeError(
            "step.run_workflow(name, workflow, ...): workflow must be a Workflow (from "
            f"engine.register), a registered workflow name or class, not {workflow!r}"
        )

    async def _run_workflow(
        self, name: str, workflow: Any, params: Any, instance_id: str | None
    ) -> Any:
        """Starts (or, replaying, finds) the child and returns its output; parks the
        parent while the child runs."""
        check_step_name(name)
        wf = self._workflow_name(workflow)
        try:
            payload = codec.encode(params)
        except TypeError as exc:
            raise TypeError(f"params of child workflow step {name!r}: {exc}") from None
        if len(payload.encode()) > self._run.max_step_bytes:
            raise ValueError(
                f"params of child workflow step {name!r} are larger than "
                f"max_step_bytes={self._run.max_step_bytes}"
            )
        st = self._new_step(name, "workflow")
        e = st.entry
        if e is not None and e["s"] in ("complete", "errored"):
            return self._child_result(e)
        run = self._run
        cid = child_id(run.iid, st.name, st.count) if instance_id is None else instance_id
        check_instance_id(cid)
        if cid == run.iid:
            raise ValueError(
                f"step.run_workflow {name!r}: instance {cid!r} cannot be its own child "
                "(a cycle); give the child another id"
            )
        if e is not None and e.get("k") == "workflow" and e.get("c") == cid:
            run.wait_for_child(st.key)  # started by an earlier run: wait for its end
        t0 = time.time()
        pending = self._e("waiting", "workflow", st, 1, t0)
        pending = f'{pending[:-1]},"c":{codec.encode(cid)},"w":{codec.encode(wf)}}}'
        cls = run.registered_workflows().get(wf)
        version = "" if cls is None else class_version(cls)  # as create() records it
        tag, got = await run.start_child(st.key, st.name, cid, wf, payload, pending, t0, version)
        if tag == "final":
            return self._child_result(got)
        if tag == "cycle":
            raise ValueError(
                f"step.run_workflow {name!r}: instance {cid!r} is an ancestor of "
                f"{run.iid!r}, so it cannot be its child (a cycle); give the child another id"
            )
        if tag == "exists":
            raise InstanceExistsError(
                f"step.run_workflow {name!r}: an instance with id {cid!r} already exists and "
                f"is not this step's child; pass another id="
            )
        run.wait_for_child(st.key)

    def _child_result(self, e: Mapping[str, Any]) -> Any:
        """A child's stored outcome: its output, or its error raised again as the same
        class (looked up in the child workflow's module when the error names none)."""
        if e["s"] == "complete":
            return e.get("v")
        err = dict(e.get("e") or {})
        if "module" not in err:
            cls = self._run.registered_workflows().get(str(e.get("w")))
            if cls is not None:
                err["module"] = cls.__module__
        raise rebuild_error(err)

    # -- maps ------------------------------------------------------------------------

    async def _map(
        self,
        name: str,
        items: Iterable[Any],
        callback: Callable[[Any], Any],
        concurrency: int,
        config: Mapping[str, Any] | None,
    ) -> list[Any]:
        """``callback(item)`` per item as steps ``name#1``...``name#n``; results in input
        order.  The first failure stops items not yet started and is raised (a stop of
        the run, such as a long retry wait, takes precedence)."""
        check_step_name(name)
        check_concurrency(concurrency)
        if not callable(callback):
            raise TypeError(f"step.map callback must be callable, not {type(callback).__name__}")
        try:
            todo = list(items)
        except TypeError:
            raise TypeError(
                f"step.map items must be iterable, not {type(items).__name__}"
            ) from None
        cfg = resolve_step_config(config)
        steps = [self._new_step(name, "do") for _ in todo]  # keys in input order, on every replay
        calls = [_item_call(callback, item) for item in todo]
        if self._run.blocking:
            return [await self._do(st, cfg, call) for st, call in zip(steps, calls, strict=True)]
        gate = asyncio.Semaphore(concurrency)
        failed: list[BaseException] = []

        async def one(st: Any, call: Callable[[], Any]) -> Any:
            async with gate:
                if failed:
                    return None
                try:
                    return await self._do(st, cfg, call)
                except BaseException as exc:
                    failed.append(exc)
                    raise

        results = await asyncio.gather(
            *(one(st, call) for st, call in zip(steps, calls, strict=True)),
            return_exceptions=True,
        )
        for res in results:  # a Suspend / FatalRunError stops the run: it goes first
            if isinstance(res, BaseException) and not isinstance(res, Exception):
                raise res
        for res in results:
            if isinstance(res, BaseException):
                raise res
        return results

    # -- rollbacks -------------------------------------------------------------------

    async def _do_with_rollback(
        self,
        st: Any,
        cfg: StepConfig,
        callback: Callable[..., Any],
        rollback: Callable[..., Any],
        rollback_cfg: StepConfig,
    ) -> Any:
        """``step.do`` with ``rollback=``: once the step has a result (now or replayed),
        its rollback is known to this run."""
        value = await self._do(st, cfg, callback)
        attempt = st.attempt or int((st.entry or {}).get("a", 1))
        ctx = StepContext(name=st.name, count=st.count, attempt=attempt, config=cfg.as_dict())
        if self._rollbacks is None:
            self._rollbacks = []
        self._rollbacks.append(_Rollback(st.index, st.key, rollback, rollback_cfg, ctx, value))
        return value

    def has_rollbacks(self) -> bool:
        """Whether a completed step of this run has a rollback."""
        return bool(self._rollbacks)

    async def roll_back(self, error: BaseException) -> dict[str, Any]:
        """Runs the rollbacks of the completed steps, newest step start first, each as a
        durable step (``rollback:{key}``); one that fails after its retries is recorded
        and the others still run.  Returns the report ``status()`` shows."""
        done: list[str] = []
        failed = False
        for rb in sorted(self._rollbacks or (), key=lambda r: r.index, reverse=True):
            st = self._special_step(f"rollback:{rb.key}", "rollback")
            rctx = RollbackContext(output=rb.output, error=error, step=rb.step)
            try:
                await self._do(st, rb.config, _rollback_call(rb.callback, rctx))
            except (Exception, FatalRunError):  # recorded as the rollback step's error
                failed = True
            done.append(rb.key)
        return {"status": "errored" if failed else "complete", "steps": done}


def rollback_config(callback: Any, config: Mapping[str, Any] | None) -> StepConfig:
    """Checks ``rollback=`` and ``rollback_config=`` at the ``step.do`` call."""
    if not callable(callback):
        raise TypeError(f"step.do rollback must be callable, not {type(callback).__name__}")
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(
            "step.do rollback_config must be a dict like {'retries': {...}, 'timeout': ...}, "
            f"not {type(config).__name__}"
        )
    return resolve_step_config(config)


def _item_call(callback: Callable[[Any], Any], item: Any) -> Callable[[], Any]:
    """The step callback of one map item (async when ``callback`` is)."""
    if inspect.iscoroutinefunction(callback):

        async def call_async() -> Any:
            return await callback(item)

        return call_async

    def call() -> Any:
        return callback(item)

    return call


def _rollback_call(callback: Callable[..., Any], rctx: RollbackContext) -> Callable[[], Any]:
    """The step callback of one rollback: ``callback(rctx)`` (or ``callback()`` when it
    takes no argument)."""
    wants = callbacks.wants_context(callback)
    if inspect.iscoroutinefunction(callback):

        async def call_async() -> Any:
            return await (callback(rctx) if wants else callback())

        return call_async

    def call() -> Any:
        return callback(rctx) if wants else callback()

    return call


__all__ = ["ComposeRun", "ComposeSteps", "check_concurrency", "child_id", "rollback_config"]
