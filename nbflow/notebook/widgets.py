"""``Dashboard``: a live view of an engine's instances, with controls (SPEC 6, 9).

The dashboard is an ``ipywidgets.VBox``.  Its parts are public attributes so code
(and tests) can drive it without a browser:

* ``counts`` (instances by status; a click filters), ``status_filter`` and
  ``workflow_filter`` / ``filter(status=None, workflow=None)``;
* ``table`` -- the instances the filters match, refreshed from Redis while the
  dashboard is displayed: id, workflow, status, current step, a progress bar (steps
  done of the steps its workflow's last completed instance did), age.  A click on a
  row selects that instance (``table.click("row:ID")``, or ``select(id)``);
* for the selected instance: ``steps_html`` (its steps with ``stale`` and progress; a
  click on a row selects the step), ``timeline`` (one bar per step from start to
  finish, coloured by status), ``step_select`` / ``select_step(name)``,
  ``output_html`` (the selected step's result; a DataFrame as its head and shape),
  ``error_html``, ``logs_html``;
* buttons: ``pause_button``, ``resume_button``, ``terminate_button``,
  ``restart_button``, ``rerun_button`` (re-run from the selected step),
  ``rerun_stale_button``, ``fork_button`` (fork from the selected step, with the id
  typed in ``fork_id`` or a fresh one; the fork is then selected), the event
  sender (``event_type``, ``event_payload``, ``send_event_button``), and over every
  instance the filters match ``bulk_terminate_button``, ``bulk_resume_button``,
  ``bulk_restart_button``;
* ``message`` -- what the last action did, or why it could not.

Why it is built this way:

* The table, counts, steps and timeline are HTML drawn by Python
  (``nbflow.notebook.views``) inside a tiny ``anywidget`` (``ClickableHTML``) that
  reports clicks: one renderer makes both the live view and the static HTML.
* Button handlers only call the public instance API (a Redis write each) and return;
  they never wait for a run.  Any error lands in ``message``: an exception escaping a
  click handler would be printed into whatever cell runs.
* In ipykernel 7 the dashboard's widget messages are handled in a kernel subshell
  (``nbflow.notebook.comms``), so clicks work while another cell blocks in
  ``inst.wait()`` or ``%wf wait``; one re-entrant lock serialises handlers, the
  refresh thread and calls from code.
* A background thread (``nbflow.notebook.refresher.Refresher``, started when the
  dashboard is displayed in a kernel, or by ``start()``; stopped by
  ``stop()``/``close()``) calls ``refresh()`` every ``refresh_interval`` seconds: one
  ``engine.instances()`` read (two Redis round trips, no per-instance reads; the
  steps-per-workflow figure for the bars is read at most every ``EXPECTED_EVERY``
  seconds per workflow), plus the selected instance's steps, logs and status.  It
  never prints; problems go to ``logging.getLogger("nbflow")``.
* Displayed in a kernel, the dashboard is an output under a display id holding the
  widget view and static HTML; ``close()`` and the kernel's exit replace it with the
  static HTML alone, so a notebook saved afterwards reopens without "Error displaying
  widget" (see ``nbflow.notebook.outputs``).
* Its ``text/plain`` form is ``Dashboard(engine prefix 'workflow')`` -- no counts,
  ids or times that change between runs -- and its ``text/html`` the counts and a
  static table (without ages), so stored notebook outputs stay comparable.
"""

from __future__ import annotations

import atexit
import html
import json
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import ipywidgets  # type: ignore[import-untyped]  # ships no type hints
import pandas as pd

from nbflow.engine import Engine, WorkflowInstance
from nbflow.errors import InvalidStateError, WorkflowError
from nbflow.notebook import reregister
from nbflow.notebook.comms import route_beside_cells
from nbflow.notebook.display import WIDGET_MIMETYPE, notify_changed, widgets_available
from nbflow.notebook.outputs import Output, show
from nbflow.notebook.panels import TABLE_COLUMNS, Controls, InstanceList, Quiet, StepView
from nbflow.notebook.refresher import Refresher
from nbflow.records import FINAL_STATUSES, STATUSES

__all__ = ["Dashboard"]

log = logging.getLogger("nbflow")

#: Seconds between reads of a workflow's steps-per-run figure (it changes rarely).
EXPECTED_EVERY = 10.0
#: The background refresh takes at most about this share of one core's time: a refresh
#: that cost more CPU waits longer before the next one (a listing of 1,000 instances costs
#: about 50 ms, so it refreshes about every 2 s), so a dashboard never slows a worker in
#: the same kernel (which shares the GIL with it) by much.  Clicks refresh at once anyway.
MAX_CPU_SHARE = 0.025

_DONE = {
    "pause": "paused {id!r} (a step already running finishes first)",
    "resume": "resumed {id!r}",
    "terminate": "terminated {id!r}",
    "restart": "restarted {id!r} from the beginning",
}

#: Which listed instances a bulk action applies to (by status), and its verb.
_BULK: dict[str, tuple[tuple[str, ...], str]] = {
    "terminate": (tuple(s for s in STATUSES if s not in FINAL_STATUSES), "terminated"),
    "resume": (("paused", "waitingForPause"), "resumed"),
    "restart": (STATUSES, "restarted"),
}


def _describe(exc: BaseException) -> str:
    """An error as one line for the message area (our own errors already read well)."""
    if isinstance(exc, (WorkflowError, LookupError, ValueError, TypeError)):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _check_arguments(engine: Any, refresh_interval: Any, limit: Any, rows: Any) -> None:
    if not isinstance(engine, Engine):
        raise TypeError(f"Dashboard() takes an nbflow.Engine, not {engine!r}")
    if not refresh_interval > 0:
        raise ValueError(f"refresh_interval must be > 0 seconds, not {refresh_interval!r}")
    for name, value in (("limit", limit), ("rows", rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, not {value!r}")


def _event_payload(text: str) -> Any:
    """The event sender's payload field as JSON (empty: no payload)."""
    text = text.strip()
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError as exc:
        raise ValueError(f"the payload is not valid JSON ({exc.msg}): {text!r}") from None


#: Dashboards displayed in this kernel: at its exit each leaves its static HTML behind.
_DISPLAYED: weakref.WeakSet[Dashboard] = weakref.WeakSet()


@atexit.register
def _leave_static_html() -> None:
    for dash in list(_DISPLAYED):
        try:
            dash._leave_static()
        except Exception:  # the kernel is going away; nothing to tell anyone
            log.debug("nbflow: dashboard could not leave its static HTML", exc_info=True)


class Dashboard(ipywidgets.VBox):  # type: ignore[misc]  # ipywidgets ships no type hints
    """A live table of an engine's instances with lifecycle controls.

    ``refresh_interval`` is the seconds between refreshes while displayed; ``limit``
    caps how many (newest) instances are read for the counts, filters and bulk
    actions; ``rows`` how many of those the filters match the table shows.
    ``namespace`` (the magics pass the notebook's) is where workflow classes are
    looked up and re-registered before a resume, restart, re-run, fork or event, so a
    class the user just redefined in a cell is the one that runs.
    """

    def __init__(
        self,
        engine: Engine,
        refresh_interval: float = 1.0,
        *,
        limit: int = 1000,
        rows: int = 50,
        namespace: Mapping[str, Any] | None = None,
    ) -> None:
        _check_arguments(engine, refresh_interval, limit, rows)
        self.engine = engine
        self.limit = limit
        self.namespace = namespace
        self._lock = threading.RLock()
        self._quiet = Quiet()  # on while code (not a user) changes a selection
        self._refreshed = False
        self._selected: str | None = None
        self._expected: dict[str, tuple[int | None, float]] = {}
        self._outputs: list[Output] = []
        self._routed = False
        self._interval = float(refresh_interval)
        self._refresher = Refresher(
            "nbflow-dashboard",
            self._tick,
            float(refresh_interval),
            what="dashboard refresh",
            on_error=self._on_refresh_error,
        )
        self._list = InstanceList(rows)
        self._list.limit = limit
        self._step_view = StepView(self._quiet)
        self._controls = Controls()
        self._expose_parts()
        self._wire()
        super().__init__(
            [
                self.title,
                self.counts,
                ipywidgets.HBox([self.status_filter, self.workflow_filter]),
                self.table,
                self._controls.box(self.step_select),
                self.error_html,
                self.timeline,
                self.steps_html,
                self.output_html,
                self.logs_html,
            ]
        )

    def _expose_parts(self) -> None:
        """The parts' widgets as the dashboard's public attributes (what code drives)."""
        self.title = ipywidgets.HTML(
            "<b>nbflow</b> &nbsp; instances under prefix "
            f"<code>{html.escape(self.engine.prefix)}</code>"
        )
        listing, view, controls = self._list, self._step_view, self._controls
        self.counts = listing.counts
        self.table = listing.table
        self.status_filter = listing.status_filter
        self.workflow_filter = listing.workflow_filter
        self.step_select = view.select
        self.steps_html = view.steps_html
        self.timeline = view.timeline
        self.output_html = view.output_html
        self.error_html = view.error_html
        self.logs_html = view.logs_html
        for name in (
            "pause_button",
            "resume_button",
            "terminate_button",
            "restart_button",
            "rerun_button",
            "rerun_stale_button",
            "fork_button",
            "fork_id",
            "refresh_button",
            "event_type",
            "event_payload",
            "send_event_button",
            "bulk_terminate_button",
            "bulk_resume_button",
            "bulk_restart_button",
            "message",
        ):
            setattr(self, name, getattr(controls, name))

    def _wire(self) -> None:
        self.table.on_click(self._on_table_click)
        self.counts.on_click(self._on_counts_click)
        self.steps_html.on_click(self._on_step_click)
        self.timeline.on_click(self._on_step_click)
        self.step_select.observe(self._on_step_change, names="value")
        self.status_filter.observe(self._on_filter_change, names="value")
        self.workflow_filter.observe(self._on_filter_change, names="value")
        for what in ("pause", "resume", "terminate", "restart"):
            getattr(self, f"{what}_button").on_click(self._handler(what))
        self.rerun_button.on_click(self._on_rerun)
        self.rerun_stale_button.on_click(self._on_rerun_stale)
        self.fork_button.on_click(self._on_fork)
        self.send_event_button.on_click(self._on_send_event)
        self.refresh_button.on_click(self._on_refresh)
        for what in _BULK:
            getattr(self, f"bulk_{what}_button").on_click(self._bulk_handler(what))

    # -- stable representations ----------------------------------------------------

    def __repr__(self) -> str:
        return f"Dashboard(engine prefix {self.engine.prefix!r})"

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """Stable text, static HTML (counts and table), and the live widget view.

        The static forms are what GitHub, nbviewer and nbval see; a front end with
        widgets renders the live view instead.  In a kernel, showing the view starts
        the background refresh and routes the widgets' messages beside running cells.
        """
        data = self._static_bundle()
        view = super()._repr_mimebundle_(**kwargs) or {}
        if WIDGET_MIMETYPE in view:
            data[WIDGET_MIMETYPE] = view[WIDGET_MIMETYPE]
            if widgets_available():
                self._route()
                self.start()
        return data

    def display_in_kernel(self) -> None:
        """How a kernel shows the dashboard (``display(dash)``, a cell ending in ``dash``):
        the bundle under a display id, so ``close()`` and the kernel's exit can leave
        the static HTML in its place (registered with IPython's display formatter in a
        kernel only, see ``_register_display``)."""
        shown = show(self._repr_mimebundle_())
        if shown is not None:
            with self._lock:
                self._outputs.append(shown)
            _DISPLAYED.add(self)

    def _static_bundle(self) -> dict[str, Any]:
        data: dict[str, Any] = {"text/plain": repr(self)}
        try:
            self.refresh()  # what it shows now, not as of the last background round
            data["text/html"] = self.static_html()
        except Exception as exc:  # a display must not raise; say why in the log
            log.warning("nbflow: dashboard could not read instances: %s", exc)
        return data

    def static_html(self) -> str:
        """Counts and the instance table, without ages or times (stable across runs)."""
        with self._lock:
            return (
                '<div class="nbflow-dashboard-static">'
                f"<b>nbflow</b> &nbsp; instances under prefix "
                f"<code>{html.escape(self.engine.prefix)}</code>"
                f"{self._list.counts_html(live=False)}{self._list.html(with_age=False)}</div>"
            )

    def _route(self) -> None:
        if not self._routed:
            self._routed = True
            routed = [route_beside_cells(w) for w in self._parts()]
            if not all(routed):
                log.debug("nbflow: dashboard clicks are handled between cells only")

    def _leave_static(self) -> None:
        """Replace each displayed output with the static HTML (as it was last refreshed)."""
        with self._lock:
            outputs, self._outputs = self._outputs, []
            bundle = {"text/plain": repr(self), "text/html": self.static_html()}
        for output in outputs:
            output.update(bundle)
        _DISPLAYED.discard(self)

    # -- state ------------------------------------------------------------------------

    @property
    def instances(self) -> pd.DataFrame:
        """The instances the filters match, as of the last refresh.

        Columns: id, workflow, status, current_step, steps_done, age, progress.
        """
        with self._lock:
            return self._list.matching[TABLE_COLUMNS].reset_index(drop=True)

    @property
    def counts_by_status(self) -> dict[str, int]:
        """How many listed instances have each status (within the workflow filter)."""
        with self._lock:
            frame = self._list.frame
            if self._list.workflow is not None:
                frame = frame[frame["workflow"] == self._list.workflow]
            counts = frame["status"].value_counts()
            return {s: int(counts[s]) for s in STATUSES if s in counts}

    @property
    def filters(self) -> dict[str, str | None]:
        """The filters in force: ``{"status": ..., "workflow": ...}``."""
        return {"status": self._list.status, "workflow": self._list.workflow}

    @property
    def selected(self) -> str | None:
        """The id of the selected instance, if any."""
        return self._selected

    @property
    def selected_step(self) -> str | None:
        """The selected step (``name`` or ``name#n``), if any."""
        return self._step_view.selected

    @property
    def steps(self) -> pd.DataFrame | None:
        """``steps()`` of the selected instance as of the last refresh or selection."""
        with self._lock:
            steps = self._step_view.steps
            return None if steps is None else steps.copy()

    @property
    def logs(self) -> pd.DataFrame | None:
        """``logs()`` of the selected instance as of the last refresh (None if unavailable)."""
        with self._lock:
            logs = self._step_view.logs
            return None if logs is None else logs.copy()

    @property
    def output(self) -> Any:
        """The stored result of the selected step (None if none is selected or it has none)."""
        return self._step_view.output

    @property
    def running(self) -> bool:
        """Whether the background refresh thread runs."""
        return self._refresher.running

    @property
    def refresh_interval(self) -> float:
        """Seconds between background refreshes (a change applies from the next one; a
        refresh that costs much CPU waits longer, see ``MAX_CPU_SHARE``)."""
        return self._interval

    @refresh_interval.setter
    def refresh_interval(self, seconds: float) -> None:
        self._interval = float(seconds)
        self._refresher.interval = self._interval

    # -- refreshing ---------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the instances (and the selected instance's details) from Redis now.

        Redis is read before the lock is taken, so a slow read never holds up a
        click.  Errors propagate to the caller here; the background thread
        catches and logs them.
        """
        selected = self._selected
        frame = self.engine.instances(limit=self.limit)
        expected = self._steps_expected(frame)
        detail = self._read_detail(selected)
        now = time.time()
        with self._lock:
            self._list.take(frame, expected, now)
            self._refreshed = True
            self._list.draw(self._selected, self._quiet)
            if self._selected == selected:  # else a selection meanwhile showed its own
                self._step_view.show(selected, *detail, now=now)

    def _steps_expected(self, frame: pd.DataFrame) -> dict[str, int | None]:
        """Steps per run of each listed workflow (``info()["steps_expected"]``), cached."""
        now = time.monotonic()
        out: dict[str, int | None] = {}
        newest = frame.drop_duplicates("workflow")
        finished = set(frame.loc[frame["status"] == "complete", "workflow"])
        for workflow, iid in zip(newest["workflow"], newest["id"], strict=True):
            if not isinstance(workflow, str):
                continue
            cached = self._expected.get(workflow)
            # unknown until one completes: read again as soon as a listed one has
            unknown = cached is not None and cached[0] is None and workflow in finished
            if cached is None or unknown or now - cached[1] > EXPECTED_EVERY:
                try:
                    value = self.engine.instance(str(iid)).info().get("steps_expected")
                except Exception:  # gone meanwhile, or Redis: no bar this time
                    value = None if cached is None else cached[0]
                cached = (None if value is None else int(value), now)
                self._expected[workflow] = cached
            out[workflow] = cached[0]
        return out

    def _read_detail(self, iid: str | None) -> tuple[pd.DataFrame | None, Any, Any]:
        """(steps, logs, error) of instance ``iid``; Nones if none (or no such instance)."""
        if iid is None:
            return None, None, None
        inst = self.engine.instance(iid)
        info = inst.info()
        if info["status"] == "unknown":
            return None, None, None
        steps = inst.steps()
        read_logs = getattr(inst, "logs", None)  # SPEC 8.3; absent in older engines
        logs = read_logs() if read_logs is not None else None
        return steps, logs, info.get("error")

    def start(self) -> None:
        """Refresh in a background thread every ``refresh_interval`` seconds until ``stop()``."""
        self._refresher.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the background refresh (the widget keeps showing its last state)."""
        self._refresher.stop(timeout)

    def close(self) -> None:
        """Stop refreshing, leave the static HTML in place of each displayed view, and
        close the widget and its parts."""
        if getattr(self, "_refresher", None) is not None:  # ipywidgets' __del__ may call this
            self.stop()  # on an instance whose __init__ raised before setting anything up
            try:
                self._leave_static()
            except Exception:  # closing must not raise; the view just goes
                log.debug("nbflow: dashboard could not leave its static HTML", exc_info=True)
            for widget in self._parts():
                widget.close()
        super().close()

    def _parts(self) -> list[Any]:
        seen: list[Any] = []
        todo = list(self.children)
        while todo:
            widget = todo.pop()
            seen.append(widget)
            todo.extend(getattr(widget, "children", ()))
        return seen

    def _tick(self) -> bool:
        """One round of the background refresh; False once the widget was closed."""
        start = time.thread_time()
        self.refresh()
        cost = time.thread_time() - start
        self._refresher.interval = max(self._interval, cost / MAX_CPU_SHARE)
        return self.comm is not None

    def _on_refresh_error(self, exc: Exception) -> bool:
        """A failed background refresh: say so, and go on while the widget is open."""
        self._say(f"refresh failed: {_describe(exc)}", error=True)
        return self.comm is not None

    # -- selection and filters -------------------------------------------------------------

    def select(self, instance_id: str | None) -> None:
        """Select an instance (``None`` clears) and show its steps, timeline and logs.

        Raises ``InstanceNotFoundError`` for an unknown id and ``ValueError`` for an
        invalid one: this is a call from code, which should hear about its mistake.
        """
        with self._lock:
            if instance_id is not None:
                self.engine.instance(instance_id)  # raises for unknown or invalid ids
            self._selected = instance_id
            with self._quiet:
                self.step_select.value = None
            self._load_detail()
            self._list.draw(self._selected, self._quiet)

    def select_step(self, name: str | None) -> None:
        """Select a step of the selected instance (``"name"`` or ``"name#n"``) and show its result.

        Raises ``ValueError`` when no instance is selected and ``LookupError`` for a
        step the instance does not have.
        """
        with self._lock:
            if name is not None:
                if self.selected is None:
                    raise ValueError("select an instance first: dash.select(instance_id)")
                key = name[:-2] if name.endswith("#1") else name
                self._load_detail()  # fresh: the step may have finished since the last refresh
                keys = self._step_view.keys
                if key not in keys:
                    raise LookupError(
                        f"instance {self.selected!r} has no step {name!r} "
                        f"(its steps: {', '.join(keys) or 'none yet'})"
                    )
                name = key
            self._step_view.choose(name, time.time())

    def filter(self, status: str | None = None, workflow: str | None = None) -> None:
        """Show only instances with ``status`` and/or of ``workflow`` (None: any).

        The counts, the table and the bulk buttons follow the filters.  ``ValueError``
        for a status nbflow does not have.
        """
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; statuses are {', '.join(STATUSES)}")
        if workflow is not None and not isinstance(workflow, str):
            raise TypeError(f"workflow must be a workflow name or None, not {workflow!r}")
        with self._lock:
            if not self._refreshed:
                self.refresh()
            self._list.set_filters(status, workflow, self._quiet)
            self._list.draw(self._selected, self._quiet)

    def _load_detail(self) -> None:
        self._step_view.show(self._selected, *self._read_detail(self._selected), now=time.time())

    def _on_table_click(self, key: str) -> None:
        kind, _, iid = key.partition(":")
        if kind == "row":
            self._on_user_choice(lambda: self.select(iid))

    def _on_counts_click(self, key: str) -> None:
        kind, _, status = key.partition(":")
        if kind == "status":
            self._on_user_choice(lambda: self.filter(status or None, self._list.workflow))

    def _on_step_click(self, key: str) -> None:
        kind, _, label = key.partition(":")
        if kind == "step":
            self._on_user_choice(lambda: self.select_step(label))

    def _on_step_change(self, change: Mapping[str, Any]) -> None:
        """A user picked a step in the selector (or code set its value)."""
        self._on_user_choice(lambda: self._step_view.draw(time.time()))

    def _on_filter_change(self, change: Mapping[str, Any]) -> None:
        self._on_user_choice(
            lambda: self.filter(
                self.status_filter.value or None, self.workflow_filter.value or None
            )
        )

    def _on_user_choice(self, show: Callable[[], None]) -> None:
        try:
            with self._lock:  # checked under the lock: only the thread holding it is quiet
                if self._quiet.on:
                    return
                show()
        except Exception as exc:  # from a front-end event: report, never raise
            self._say(_describe(exc), error=True)

    # -- actions -----------------------------------------------------------------------------

    def _say(self, text: str, error: bool = False) -> None:
        self._controls.say(text, error)

    def _target(self) -> WorkflowInstance | None:
        iid = self.selected
        if iid is None:
            self._say("select an instance first", error=True)
            return None
        return self.engine.instance(iid)

    def _act(self, what: str, action: Callable[[WorkflowInstance], str], runs: bool) -> None:
        """Run one call on the selected instance; report in ``message``, never raise.

        ``runs``: the call makes the instance run again, so its class is first
        re-registered from the notebook namespace (if the dashboard has one).
        """
        try:
            with self._lock:
                inst = self._target()
                if inst is None:
                    return
                if runs and self.namespace is not None:
                    reregister(self.engine, self.namespace, inst)
                done = action(inst)
            self._say(done)
        except Exception as exc:  # a click handler must not raise into the kernel
            log.debug("nbflow: dashboard %s failed", what, exc_info=True)
            self._say(_describe(exc), error=True)
            return
        notify_changed(inst.id)  # displayed cards of it follow at once
        self._show_effect()

    def _show_effect(self) -> None:
        """After an action: read again now, so the table shows what it did."""
        try:
            self.refresh()
        except Exception as exc:  # the action happened; only showing it failed
            log.debug("nbflow: dashboard refresh after an action failed: %s", exc)
            self._refresher.wake()

    def _handler(self, what: str) -> Callable[[Any], None]:
        """The click handler of a lifecycle button (``pause``, ``resume``, ...)."""

        def action(inst: WorkflowInstance) -> str:
            getattr(inst, what)()
            return _DONE[what].format(id=inst.id)

        def on_click(_button: Any) -> None:
            self._act(what, action, runs=what in ("resume", "restart"))

        return on_click

    def _on_rerun(self, _button: Any) -> None:
        def rerun(inst: WorkflowInstance) -> str:
            step = self.selected_step
            if step is None:
                raise ValueError("select a step to re-run from first")
            inst.restart(from_step=step)
            return f"re-running {inst.id!r} from step {step!r}"

        self._act("re-run", rerun, True)

    def _on_rerun_stale(self, _button: Any) -> None:
        def rerun_stale(inst: WorkflowInstance) -> str:
            inst.rerun_stale()
            return f"re-running {inst.id!r} from its first stale step"

        self._act("re-run stale", rerun_stale, True)

    def _on_fork(self, _button: Any) -> None:
        forked: list[str] = []

        def fork(inst: WorkflowInstance) -> str:
            step = self.selected_step
            new = inst.fork(from_step=step, id=self.fork_id.value.strip() or None)
            forked.append(new.id)
            where = "with all its completed steps" if step is None else f"from step {step!r}"
            return f"forked {inst.id!r} {where} as {new.id!r}"

        self._act("fork", fork, True)
        if forked:
            try:
                self.select(forked[0])
            except Exception as exc:  # the fork exists; only showing it failed
                self._say(f"forked as {forked[0]!r}; could not show it: {_describe(exc)}", True)

    def _on_send_event(self, _button: Any) -> None:
        def send(inst: WorkflowInstance) -> str:
            etype = self.event_type.value.strip()
            if not etype:
                raise ValueError("type an event type first")
            inst.send_event(etype, _event_payload(self.event_payload.value))
            return f"sent event {etype!r} to {inst.id!r}"

        self._act("send event", send, True)

    def _on_refresh(self, _button: Any) -> None:
        try:
            self.refresh()
            self._say("")
        except Exception as exc:
            self._say(f"refresh failed: {_describe(exc)}", error=True)

    def _bulk_handler(self, what: str) -> Callable[[Any], None]:
        def on_click(_button: Any) -> None:
            self._bulk(what)

        return on_click

    def _bulk(self, what: str) -> None:
        """``what`` on every listed instance the filters match that it applies to."""
        applies, verb = _BULK[what]
        try:
            with self._lock:
                if not self._refreshed:
                    self.refresh()
                matching = self._list.matching
                ids = [
                    str(i)
                    for i, s in zip(matching["id"], matching["status"], strict=True)
                    if s in applies
                ]
                skipped = len(matching) - len(ids)
                done, failed = 0, []
                for iid in ids:
                    inst = self.engine.instance(iid)
                    try:
                        if what != "terminate" and self.namespace is not None:
                            reregister(self.engine, self.namespace, inst)
                        getattr(inst, what)()
                        done += 1
                        notify_changed(iid)
                    except InvalidStateError:  # its status changed since the refresh
                        skipped += 1
                    except Exception as exc:
                        failed.append(f"{iid}: {_describe(exc)}")
            text = f"{verb} {done} of {len(matching)} instances the filters match"
            if skipped:
                text += f" ({skipped} not {'paused' if what == 'resume' else 'running'})"
            if failed:
                text += f"; failed: {'; '.join(failed[:3])}"
            self._say(text, error=bool(failed))
        except Exception as exc:
            log.debug("nbflow: dashboard bulk %s failed", what, exc_info=True)
            self._say(_describe(exc), error=True)
            return
        self._show_effect()


def _register_display() -> bool:
    """In a Jupyter kernel, show dashboards with ``Dashboard.display_in_kernel``."""
    if not widgets_available():
        return False
    from IPython.core.getipython import get_ipython

    shell: Any = get_ipython()  # type: ignore[no-untyped-call, unused-ignore]
    formatter = shell.display_formatter.ipython_display_formatter
    formatter.for_type(Dashboard, Dashboard.display_in_kernel)
    return True


_register_display()
