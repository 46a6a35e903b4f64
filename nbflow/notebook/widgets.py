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
* A background thread (started when the dashboard is displayed in a kernel, or
  by ``start()``; stopped by ``stop()``/``close()``) calls ``refresh()`` every
  ``refresh_interval`` seconds.  It never prints; problems go to
  ``logging.getLogger("nbflow")``.  One re-entrant lock serialises it with the
  handlers, so a refresh never interleaves with a selection change.
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
from nbflow.notebook import find_workflow_class
from nbflow.notebook.display import (
    WIDGET_MIMETYPE,
    status_badge,
    value_html,
    value_summary,
    widgets_available,
)

__all__ = ["Dashboard"]

log = logging.getLogger("nbflow")

_TABLE_COLUMNS = ["id", "workflow", "status", "current_step", "steps_done", "age"]
_STEP_COLUMNS = ["step", "kind", "count", "status", "attempts", "duration_s", "output", "error"]
_ERROR_COLOUR = "#dc3545"
_DONE = {
    "pause": "paused {id!r} (a step already running finishes first)",
    "resume": "resumed {id!r}",
    "terminate": "terminated {id!r}",
    "restart": "restarted {id!r} from the beginning",
}


def _age(seconds: float) -> str:
    """``12s``, ``5m 3s``, ``2h 5m``, ``3d 4h``: short enough for a table cell."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _step_key(name: Any, count: Any) -> str:
    """The form ``step_output`` and ``restart(from_step=)`` take: ``name`` or ``name#n``."""
    n = int(count) if pd.notna(count) else 1
    return str(name) if n <= 1 else f"{name}#{n}"


def _cell(value: Any) -> str:
    if value is None or (not isinstance(value, (list, dict)) and pd.isna(value)):
        return "–"
    return html.escape(str(value))


def _describe(exc: BaseException) -> str:
    """An error as one line for the message area (our own errors already read well)."""
    if isinstance(exc, (WorkflowError, LookupError, ValueError, TypeError)):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


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
        if not isinstance(engine, Engine):
            raise TypeError(f"Dashboard() takes an nbflow.Engine, not {engine!r}")
        if not refresh_interval > 0:
            raise ValueError(f"refresh_interval must be > 0 seconds, not {refresh_interval!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive int, not {limit!r}")
        self.engine = engine
        self.refresh_interval = float(refresh_interval)
        self.limit = limit
        self.namespace = namespace
        self._lock = threading.RLock()
        self._quiet = False  # True while code (not a user) changes a selection
        self._instances = pd.DataFrame(columns=[*_TABLE_COLUMNS, "created_at"])
        self._steps: pd.DataFrame | None = None
        self._output: Any = None
        self._refreshed = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

        self.title = ipywidgets.HTML(
            f"<b>nbflow</b> &nbsp; instances under prefix <code>{html.escape(engine.prefix)}</code>"
        )
        self.table = ipywidgets.HTML("<i>not refreshed yet</i>")
        self.instance_select = ipywidgets.Select(
            options=(), rows=8, description="instance", layout=ipywidgets.Layout(width="320px")
        )
        self.step_select = ipywidgets.Dropdown(options=(), description="step")
        self.steps_html = ipywidgets.HTML()
        self.output_html = ipywidgets.HTML()
        self.pause_button = ipywidgets.Button(description="pause", icon="pause")
        self.resume_button = ipywidgets.Button(description="resume", icon="play")
        self.terminate_button = ipywidgets.Button(
            description="terminate", icon="stop", button_style="danger"
        )
        self.restart_button = ipywidgets.Button(description="restart", icon="repeat")
        self.rerun_button = ipywidgets.Button(
            description="re-run from step", icon="step-forward", tooltip="restart(from_step=step)"
        )
        self.refresh_button = ipywidgets.Button(description="refresh", icon="refresh")
        self.event_type = ipywidgets.Text(description="event", placeholder="type, e.g. approved")
        self.event_payload = ipywidgets.Text(placeholder='JSON payload, e.g. {"ok": true}')
        self.send_event_button = ipywidgets.Button(description="send event", icon="paper-plane")
        self.message = ipywidgets.Label("")

        self.instance_select.observe(self._on_instance_change, names="value")
        self.step_select.observe(self._on_step_change, names="value")
        self.pause_button.on_click(self._handler("pause"))
        self.resume_button.on_click(self._handler("resume"))
        self.terminate_button.on_click(self._handler("terminate"))
        self.restart_button.on_click(self._handler("restart"))
        self.rerun_button.on_click(self._on_rerun)
        self.send_event_button.on_click(self._on_send_event)
        self.refresh_button.on_click(self._on_refresh)

        controls = ipywidgets.VBox(
            [
                ipywidgets.HBox(
                    [
                        self.pause_button,
                        self.resume_button,
                        self.terminate_button,
                        self.restart_button,
                        self.refresh_button,
                    ]
                ),
                ipywidgets.HBox([self.step_select, self.rerun_button]),
                ipywidgets.HBox([self.event_type, self.event_payload, self.send_event_button]),
                self.message,
            ]
        )
        super().__init__(
            [
                self.title,
                self.table,
                ipywidgets.HBox([self.instance_select, controls]),
                self.steps_html,
                self.output_html,
            ]
        )

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
            return self._table_html(self._instances, with_age=False)

    # -- state ------------------------------------------------------------------------

    @property
    def instances(self) -> pd.DataFrame:
        """The instances as of the last refresh.

        Columns: id, workflow, status, current_step, steps_done, age.
        """
        with self._lock:
            return self._instances[_TABLE_COLUMNS].copy()

    @property
    def selected(self) -> str | None:
        """The id of the selected instance, if any."""
        value = self.instance_select.value
        return None if value is None else str(value)

    @property
    def selected_step(self) -> str | None:
        """The selected step (``name`` or ``name#n``), if any."""
        value = self.step_select.value
        return None if value is None else str(value)

    @property
    def steps(self) -> pd.DataFrame | None:
        """``steps()`` of the selected instance as of the last refresh or selection."""
        with self._lock:
            return None if self._steps is None else self._steps.copy()

    @property
    def output(self) -> Any:
        """The stored result of the selected step (None if none is selected or it has none)."""
        return self._output

    @property
    def running(self) -> bool:
        """Whether the background refresh thread runs."""
        thread = self._thread
        return thread is not None and thread.is_alive()

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
        frame["age"] = [_age(now - ts.timestamp()) for ts in frame["created_at"]]
        with self._lock:
            self._instances = frame
            self._refreshed = True
            html_table = self._table_html(frame, with_age=True)
            if self.table.value != html_table:
                self.table.value = html_table
            self._sync_instance_options(keep=selected if steps is not None else None)
            if self.selected == selected:  # else a selection meanwhile showed its own steps
                self._apply_steps(selected, steps)

    def start(self) -> None:
        """Refresh in a background thread every ``refresh_interval`` seconds until ``stop()``."""
        with self._lock:
            if self.running:
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(self._stop,), name="nbflow-dashboard", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the background refresh (the widget keeps showing its last state)."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
            self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def close(self) -> None:
        """Stop refreshing and close the widget and its parts (their views disappear)."""
        if getattr(self, "_lock", None) is not None:  # ipywidgets' __del__ may call this
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

    def _run(self, stop: threading.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # keep going: Redis may come back; never print
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "nbflow: dashboard refresh failed: %s", exc)
                self._say(f"refresh failed: {_describe(exc)}", error=True)
            else:
                failures = 0
            if self.comm is None:  # the widget was closed
                return
            self._wake.wait(self.refresh_interval * min(1 + failures, 10))
            self._wake.clear()

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
                    self._set_options(self.instance_select, [*options, instance_id])
            self._quiet = True
            try:
                self.instance_select.value = instance_id
            finally:
                self._quiet = False
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
                options = list(self.step_select.options)
                if key not in options:
                    raise LookupError(
                        f"instance {self.selected!r} has no step {name!r} "
                        f"(its steps: {', '.join(options) or 'none yet'})"
                    )
                name = key
            self._quiet = True
            try:
                self.step_select.value = name
            finally:
                self._quiet = False
            self._show_output()

    def _on_instance_change(self, change: Mapping[str, Any]) -> None:
        """A user picked an instance in the front end (or code set the selector's value)."""
        try:
            with self._lock:  # checked under the lock: only the thread holding it sets _quiet
                if self._quiet:
                    return
                self._show_instance()
        except Exception as exc:  # from a front-end event: report, never raise
            self._say(_describe(exc), error=True)

    def _on_step_change(self, change: Mapping[str, Any]) -> None:
        try:
            with self._lock:
                if self._quiet:
                    return
                self._show_output()
        except Exception as exc:
            self._say(_describe(exc), error=True)

    def _show_instance(self) -> None:
        self._quiet = True
        try:
            self.step_select.value = None
        finally:
            self._quiet = False
        self._load_steps()

    def _load_steps(self) -> None:
        self._apply_steps(self.selected, self._read_steps(self.selected))

    def _read_steps(self, iid: str | None) -> pd.DataFrame | None:
        """``steps()`` of instance ``iid``; None if there is no such instance (any more)."""
        if iid is None:
            return None
        try:
            inst = self.engine.instance(iid)
        except LookupError:
            return None
        return inst.steps()

    def _apply_steps(self, iid: str | None, steps: pd.DataFrame | None) -> None:
        """Show ``steps`` of ``iid``; keep the selected step if it is still there."""
        self._steps = steps
        if iid is None:
            self._set_options(self.step_select, [])
            self.steps_html.value = ""
        else:
            keys = [] if steps is None else [_step_key(r.step, r.count) for r in steps.itertuples()]
            self._set_options(self.step_select, keys)
            self.steps_html.value = self._steps_html(iid, steps)
        self._show_output()

    def _show_output(self) -> None:
        key, steps = self.selected_step, self._steps
        self._output = None
        if key is None or steps is None:
            self.output_html.value = ""
            return
        row = next((r for r in steps.itertuples() if _step_key(r.step, r.count) == key), None)
        title = f"<b>output of step</b> <code>{html.escape(key)}</code><br>"
        if row is None:
            self.output_html.value = title + "<i>no such step any more</i>"
        elif row.status == "complete":
            self._output = row.output
            self.output_html.value = title + value_html(row.output)
        elif row.status == "errored" and isinstance(row.error, Mapping):
            text = f"{row.error.get('name')}: {row.error.get('message')}"
            self.output_html.value = (
                title + f'<span style="color:{_ERROR_COLOUR}">{html.escape(text)}</span>'
            )
        else:
            self.output_html.value = (
                title + f"<i>no result yet ({html.escape(str(row.status))})</i>"
            )

    def _set_options(self, select: Any, values: list[str]) -> None:
        """Replace a selector's options without losing (or announcing) the current choice."""
        if tuple(select.options) == tuple(values):
            return
        current = select.value
        self._quiet = True
        try:
            select.index = None  # so new options do not select their first entry
            select.options = values
            select.value = current if current in values else None
        finally:
            self._quiet = False

    def _sync_instance_options(self, keep: str | None) -> None:
        """Offer the listed ids, plus ``keep`` (a selected instance older than the listing)."""
        ids = list(self._instances["id"])
        if keep is not None and keep not in ids:
            ids.append(keep)
        self._set_options(self.instance_select, ids)

    # -- rendering -----------------------------------------------------------------------

    def _table_html(self, frame: pd.DataFrame, with_age: bool) -> str:
        columns = _TABLE_COLUMNS if with_age else _TABLE_COLUMNS[:-1]
        head = "".join(f'<th style="text-align:left">{c.replace("_", " ")}</th>' for c in columns)
        rows = []
        selected = self.selected
        for rec in frame.to_dict("records"):
            cells = []
            for c in columns:
                value = rec.get(c)
                cells.append(status_badge(str(value)) if c == "status" else _cell(value))
            style = ' style="background:#e7f1ff"' if with_age and rec["id"] == selected else ""
            rows.append(
                f"<tr{style}>"
                + "".join(f'<td style="text-align:left">{x}</td>' for x in cells)
                + "</tr>"
            )
        if not rows:
            rows.append(f'<tr><td colspan="{len(columns)}"><i>no instances</i></td></tr>')
        return (
            f'<table class="nbflow-dashboard"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>"
        )

    def _steps_html(self, iid: str, steps: pd.DataFrame | None) -> str:
        title = f"<b>steps of</b> <code>{html.escape(iid)}</code>"
        if steps is None:
            return title + " <i>(instance not found)</i>"
        if not len(steps):
            return title + " <i>(no steps yet)</i>"
        shown = steps[_STEP_COLUMNS].copy()
        shown["output"] = [
            value_summary(v, 60) if s == "complete" else ""
            for v, s in zip(steps["output"], steps["status"], strict=True)
        ]
        shown["error"] = [
            f"{e.get('name')}: {e.get('message')}" if isinstance(e, Mapping) else ""
            for e in steps["error"]
        ]
        return title + shown.to_html(index=False, border=0, na_rep="–")

    # -- actions -----------------------------------------------------------------------------

    def _say(self, text: str, error: bool = False) -> None:
        self.message.value = text
        self.message.style.text_color = _ERROR_COLOUR if error else None

    def _target(self) -> WorkflowInstance | None:
        iid = self.selected
        if iid is None:
            self._say("select an instance first", error=True)
            return None
        return self.engine.instance(iid)

    def _reregister(self, inst: WorkflowInstance) -> None:
        if self.namespace is not None:
            cls = find_workflow_class(self.namespace, inst.workflow)
            if cls is not None:
                self.engine.register(cls, name=inst.workflow)

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
                if runs:
                    self._reregister(inst)
                done = action(inst)
            self._say(done)
        except Exception as exc:  # a click handler must not raise into the kernel
            log.debug("nbflow: dashboard %s failed", what, exc_info=True)
            self._say(_describe(exc), error=True)
            return
        self._wake.set()  # let the refresh thread show the effect soon

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
            text = self.event_payload.value.strip()
            try:
                payload = json.loads(text) if text else None
            except json.JSONDecodeError as exc:
                raise ValueError(f"the payload is not valid JSON ({exc.msg}): {text!r}") from None
            inst.send_event(etype, payload)
            return f"sent event {etype!r} to {inst.id!r}"

        self._act("send event", send, True)

    def _on_refresh(self, _button: Any) -> None:
        try:
            self.refresh()
            self._say("")
        except Exception as exc:
            self._say(f"refresh failed: {_describe(exc)}", error=True)
