"""``Dashboard``: a live ipywidgets view of an engine's instances, with controls.

The dashboard is an ``ipywidgets.VBox``.  Its parts are public attributes so
code (and tests) can drive it without a browser:

* ``table`` -- HTML table of instances (id, workflow, status, current step,
  steps done, age), refreshed from Redis while the dashboard is displayed;
* ``instance_select`` / ``select(id)`` -- choosing an instance shows its
  ``steps()`` in ``steps_html``; ``step_select`` / ``select_step(name)`` shows
  that step's stored result in ``output_html`` (a DataFrame as a table);
* ``pause_button``, ``resume_button``, ``terminate_button``, ``restart_button``,
  ``rerun_button`` (re-run from the selected step), and an event sender
  (``event_type``, ``event_payload``, ``send_event_button``);
* ``message`` -- what the last action did, or why it could not.

Why it is built this way:

* Button handlers only call the public instance API (one Redis write) and
  return; they never wait for a run.  Any error lands in ``message``: an
  exception escaping a click handler would be printed into whatever cell runs.
* A background thread (a ``nbflow.notebook.refresher.Refresher``, started when
  the dashboard is displayed in a kernel, or by ``start()``; stopped by
  ``stop()``/``close()``) calls ``refresh()`` every ``refresh_interval`` seconds.
  It never prints; problems go to ``logging.getLogger("nbflow")``.  One
  re-entrant lock serialises it with the handlers, so a refresh never
  interleaves with a selection change.
* The parts (instance table, step view, controls) are small classes in
  ``nbflow.notebook.panels``; the dashboard reads Redis and acts on instances.
* Its ``text/plain`` form is ``Dashboard(engine prefix 'workflow')`` -- no
  counts, ids or times that change between runs -- and its ``text/html`` a
  static table (without ages), so stored notebook outputs stay comparable.
"""

from __future__ import annotations

import html
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import ipywidgets  # type: ignore[import-untyped]  # ships no type hints
import pandas as pd

from nbflow.engine import Engine, WorkflowInstance
from nbflow.errors import WorkflowError
from nbflow.notebook import reregister
from nbflow.notebook.display import WIDGET_MIMETYPE, widgets_available
from nbflow.notebook.panels import (
    TABLE_COLUMNS,
    Controls,
    InstanceTable,
    Quiet,
    StepView,
    set_options,
)
from nbflow.notebook.refresher import Refresher

__all__ = ["Dashboard"]

log = logging.getLogger("nbflow")

_DONE = {
    "pause": "paused {id!r} (a step already running finishes first)",
    "resume": "resumed {id!r}",
    "terminate": "terminated {id!r}",
    "restart": "restarted {id!r} from the beginning",
}


def _describe(exc: BaseException) -> str:
    """An error as one line for the message area (our own errors already read well)."""
    if isinstance(exc, (WorkflowError, LookupError, ValueError, TypeError)):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _check_arguments(engine: Any, refresh_interval: Any, limit: Any) -> None:
    if not isinstance(engine, Engine):
        raise TypeError(f"Dashboard() takes an nbflow.Engine, not {engine!r}")
    if not refresh_interval > 0:
        raise ValueError(f"refresh_interval must be > 0 seconds, not {refresh_interval!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int, not {limit!r}")


def _event_payload(text: str) -> Any:
    """The event sender's payload field as JSON (empty: no payload)."""
    text = text.strip()
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError as exc:
        raise ValueError(f"the payload is not valid JSON ({exc.msg}): {text!r}") from None


class Dashboard(ipywidgets.VBox):  # type: ignore[misc]  # ipywidgets ships no type hints
    """A live table of an engine's instances with lifecycle controls.

    ``refresh_interval`` is the seconds between refreshes while displayed;
    ``limit`` caps how many (newest) instances the table lists.  ``namespace``
    (the magics pass the notebook's) is where workflow classes are looked up and
    re-registered before a resume, restart, re-run or event, so a class the user
    just redefined in a cell is the one that runs.
    """

    def __init__(
        self,
        engine: Engine,
        refresh_interval: float = 1.0,
        *,
        limit: int = 100,
        namespace: Mapping[str, Any] | None = None,
    ) -> None:
        _check_arguments(engine, refresh_interval, limit)
        self.engine = engine
        self.limit = limit
        self.namespace = namespace
        self._lock = threading.RLock()
        self._quiet = Quiet()  # on while code (not a user) changes a selection
        self._refreshed = False
        self._refresher = Refresher(
            "nbflow-dashboard",
            self._tick,
            float(refresh_interval),
            what="dashboard refresh",
            on_error=self._on_refresh_error,
        )
        self._table = InstanceTable()
        self._step_view = StepView(self._quiet)
        self._controls = Controls()
        self._expose_parts()
        self._wire()
        super().__init__(
            [
                self.title,
                self.table,
                ipywidgets.HBox([self.instance_select, self._controls.box(self.step_select)]),
                self.steps_html,
                self.output_html,
            ]
        )

    def _expose_parts(self) -> None:
        """The parts' widgets as the dashboard's public attributes (what code drives)."""
        self.title = ipywidgets.HTML(
            "<b>nbflow</b> &nbsp; instances under prefix "
            f"<code>{html.escape(self.engine.prefix)}</code>"
        )
        self.table = self._table.widget
        self.instance_select = ipywidgets.Select(
            options=(), rows=8, description="instance", layout=ipywidgets.Layout(width="320px")
        )
        view, controls = self._step_view, self._controls
        self.step_select = view.select
        self.steps_html = view.steps_html
        self.output_html = view.output_html
        self.pause_button = controls.pause_button
        self.resume_button = controls.resume_button
        self.terminate_button = controls.terminate_button
        self.restart_button = controls.restart_button
        self.rerun_button = controls.rerun_button
        self.refresh_button = controls.refresh_button
        self.event_type = controls.event_type
        self.event_payload = controls.event_payload
        self.send_event_button = controls.send_event_button
        self.message = controls.message

    def _wire(self) -> None:
        self.instance_select.observe(self._on_instance_change, names="value")
        self.step_select.observe(self._on_step_change, names="value")
        for what in ("pause", "resume", "terminate", "restart"):
            getattr(self, f"{what}_button").on_click(self._handler(what))
        self.rerun_button.on_click(self._on_rerun)
        self.send_event_button.on_click(self._on_send_event)
        self.refresh_button.on_click(self._on_refresh)

    # -- stable representations ----------------------------------------------------

    def __repr__(self) -> str:
        return f"Dashboard(engine prefix {self.engine.prefix!r})"

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """Stable text, a static HTML table, and the live widget (refreshing from now on).

        The static forms are what GitHub, nbviewer and nbval see; a front end
        with widgets renders the live view instead.
        """
        data: dict[str, Any] = {"text/plain": repr(self)}
        try:
            if not self._refreshed:
                self.refresh()
            data["text/html"] = self.static_html()
        except Exception as exc:  # a display must not raise; say why in the log
            log.warning("nbflow: dashboard could not read instances: %s", exc)
        view = super()._repr_mimebundle_(**kwargs) or {}
        if WIDGET_MIMETYPE in view:
            data[WIDGET_MIMETYPE] = view[WIDGET_MIMETYPE]
            if widgets_available():
                self.start()
        return data

    def static_html(self) -> str:
        """The instance table without ages or times (stable across runs of a notebook)."""
        with self._lock:
            return self._table.html(with_age=False)

    # -- state ------------------------------------------------------------------------

    @property
    def instances(self) -> pd.DataFrame:
        """The instances as of the last refresh.

        Columns: id, workflow, status, current_step, steps_done, age.
        """
        with self._lock:
            return self._table.frame[TABLE_COLUMNS].copy()

    @property
    def selected(self) -> str | None:
        """The id of the selected instance, if any."""
        value = self.instance_select.value
        return None if value is None else str(value)

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
    def output(self) -> Any:
        """The stored result of the selected step (None if none is selected or it has none)."""
        return self._step_view.output

    @property
    def running(self) -> bool:
        """Whether the background refresh thread runs."""
        return self._refresher.running

    @property
    def refresh_interval(self) -> float:
        """Seconds between background refreshes (a change applies from the next one)."""
        return self._refresher.interval

    @refresh_interval.setter
    def refresh_interval(self, seconds: float) -> None:
        self._refresher.interval = float(seconds)

    # -- refreshing ---------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the instances (and the selected instance's steps) from Redis now.

        Redis is read before the lock is taken, so a slow read never holds up a
        click.  Errors propagate to the caller here; the background thread
        catches and logs them.
        """
        selected = self.selected
        frame = self.engine.instances(limit=self.limit)
        steps = self._read_steps(selected)
        now = time.time()
        with self._lock:
            self._table.show(frame, now, self.selected)
            self._refreshed = True
            self._sync_instance_options(keep=selected if steps is not None else None)
            if self.selected == selected:  # else a selection meanwhile showed its own steps
                self._step_view.show(selected, steps)

    def start(self) -> None:
        """Refresh in a background thread every ``refresh_interval`` seconds until ``stop()``."""
        self._refresher.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the background refresh (the widget keeps showing its last state)."""
        self._refresher.stop(timeout)

    def close(self) -> None:
        """Stop refreshing and close the widget and its parts (their views disappear)."""
        if getattr(self, "_refresher", None) is not None:  # ipywidgets' __del__ may call this
            self.stop()  # on an instance whose __init__ raised before setting anything up
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
        self.refresh()
        return self.comm is not None

    def _on_refresh_error(self, exc: Exception) -> bool:
        """A failed background refresh: say so, and go on while the widget is open."""
        self._say(f"refresh failed: {_describe(exc)}", error=True)
        return self.comm is not None

    # -- selection -----------------------------------------------------------------------

    def select(self, instance_id: str | None) -> None:
        """Select an instance (``None`` clears) and show its steps.

        Raises ``InstanceNotFoundError`` for an unknown id and ``ValueError`` for an
        invalid one: this is a call from code, which should hear about its mistake.
        """
        with self._lock:
            if instance_id is not None:
                self.engine.instance(instance_id)  # raises for unknown or invalid ids
                options = list(self.instance_select.options)
                if instance_id not in options:
                    self._set_instance_options([*options, instance_id])
            with self._quiet:
                self.instance_select.value = instance_id
            self._show_instance()

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
                self._load_steps()  # fresh: the step may have finished since the last refresh
                keys = self._step_view.keys
                if key not in keys:
                    raise LookupError(
                        f"instance {self.selected!r} has no step {name!r} "
                        f"(its steps: {', '.join(keys) or 'none yet'})"
                    )
                name = key
            self._step_view.choose(name)

    def _on_instance_change(self, change: Mapping[str, Any]) -> None:
        """A user picked an instance in the front end (or code set the selector's value)."""
        self._on_user_choice(self._show_instance)

    def _on_step_change(self, change: Mapping[str, Any]) -> None:
        self._on_user_choice(self._step_view.show_output)

    def _on_user_choice(self, show: Callable[[], None]) -> None:
        try:
            with self._lock:  # checked under the lock: only the thread holding it is quiet
                if self._quiet.on:
                    return
                show()
        except Exception as exc:  # from a front-end event: report, never raise
            self._say(_describe(exc), error=True)

    def _show_instance(self) -> None:
        with self._quiet:
            self.step_select.value = None
        self._load_steps()

    def _load_steps(self) -> None:
        self._step_view.show(self.selected, self._read_steps(self.selected))

    def _read_steps(self, iid: str | None) -> pd.DataFrame | None:
        """``steps()`` of instance ``iid``; None if there is no such instance (any more)."""
        if iid is None:
            return None
        try:
            inst = self.engine.instance(iid)
        except LookupError:
            return None
        return inst.steps()

    def _set_instance_options(self, ids: list[str]) -> None:
        set_options(self.instance_select, ids, self._quiet)

    def _sync_instance_options(self, keep: str | None) -> None:
        """Offer the listed ids, plus ``keep`` (a selected instance older than the listing)."""
        ids = self._table.ids
        if keep is not None and keep not in ids:
            ids.append(keep)
        self._set_instance_options(ids)

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
        self._refresher.wake()  # let the refresh thread show the effect soon

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
