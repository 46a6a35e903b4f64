"""The parts a ``Dashboard`` (``nbflow.notebook.widgets``) is made of.

* ``InstanceList`` -- the instance listing as last read, its filters and counts,
  drawn as a clickable table (with ages while live, without them in the stable
  static form);
* ``StepView`` -- the selected instance's steps (clickable), their timeline, the
  selected step's stored result, the instance's error and its logs;
* ``Controls`` -- the lifecycle, re-run, fork, event and bulk buttons and the
  message line;
* ``Quiet`` -- marks a selection change made by code, so the observers that
  react to a user's choice in the front end let it pass.

They hold widgets and draw HTML (``nbflow.notebook.views``); reading Redis, locking
and acting on instances stay with the ``Dashboard``.
"""

from __future__ import annotations

from typing import Any

import ipywidgets  # type: ignore[import-untyped]  # ships no type hints
import pandas as pd

from nbflow.notebook import views
from nbflow.notebook.clickable import ClickableHTML
from nbflow.notebook.display import step_label
from nbflow.records import STATUSES

__all__ = ["Controls", "InstanceList", "Quiet", "StepView", "age_text"]

#: ``dash.instances`` columns (``progress``: 0-1, or None before a run of the workflow
#: completed, see ``views.row_fraction``).
TABLE_COLUMNS = ["id", "workflow", "status", "current_step", "steps_done", "age", "progress"]
ERROR_COLOUR = views.ERROR_COLOUR


def age_text(seconds: float) -> str:
    """``12s``, ``5m 3s``, ``2h 5m``, ``3d 4h``: short enough for a table cell."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


class Quiet:
    """Whether code (not a user) is changing a selector right now.

    ``with quiet:`` around the change; observers return early while ``quiet.on``.
    """

    def __init__(self) -> None:
        self._depth = 0

    @property
    def on(self) -> bool:
        return self._depth > 0

    def __enter__(self) -> Quiet:
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1


def set_options(select: Any, values: list[str], quiet: Quiet) -> None:
    """Replace a selector's options without losing (or announcing) the current choice."""
    if tuple(select.options) == tuple(values):
        return
    current = select.value
    with quiet:
        select.index = None  # so new options do not select their first entry
        select.options = values
        select.value = current if current in values else None


# -- the instance list --------------------------------------------------------------------


class InstanceList:
    """The instances as of the last refresh, the filters, and the counts and table drawn
    from them (a click on a row selects, a click on a count filters)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.counts = ClickableHTML("")
        self.table = ClickableHTML("<i>not refreshed yet</i>")
        self.status_filter = ipywidgets.Dropdown(
            options=[("all", ""), *[(s, s) for s in STATUSES]],
            value="",
            description="status",
            layout=ipywidgets.Layout(width="220px"),
        )
        self.workflow_filter = ipywidgets.Dropdown(
            options=[("all", "")],
            value="",
            description="workflow",
            layout=ipywidgets.Layout(width="260px"),
        )
        self.frame = pd.DataFrame(columns=[*TABLE_COLUMNS, "created_at", "error"])
        self.status: str | None = None
        self.workflow: str | None = None
        self.limit = 0

    @property
    def matching(self) -> pd.DataFrame:
        """The listed instances the filters match."""
        frame = self.frame
        if self.status is not None:
            frame = frame[frame["status"] == self.status]
        if self.workflow is not None:
            frame = frame[frame["workflow"] == self.workflow]
        return frame

    def take(self, frame: pd.DataFrame, expected: dict[str, int | None], now: float) -> None:
        """Take ``frame`` (``engine.instances()``) as the listing; ages are counted to ``now``."""
        frame = frame.copy()
        frame["age"] = [  # (an unreadable createdAt is NaT: no age)
            age_text(now - ts.timestamp()) if pd.notna(ts) else "" for ts in frame["created_at"]
        ]
        frame["steps_expected"] = [expected.get(str(w)) for w in frame["workflow"]]
        frame["progress"] = [
            views.row_fraction(str(s), int(d) if pd.notna(d) else 0, e)
            for s, d, e in zip(
                frame["status"], frame["steps_done"], frame["steps_expected"], strict=True
            )
        ]
        self.frame = frame

    def draw(self, selected: str | None, quiet: Quiet) -> None:
        """Redraw counts, table and the workflow filter's choices from the listing."""
        self._workflow_options(quiet)
        counts = self.counts_html(live=True)
        if self.counts.value != counts:
            self.counts.value = counts
        table = self.html(with_age=True, selected=selected)
        if self.table.value != table:
            self.table.value = table

    def counts_html(self, live: bool) -> str:
        base = self.frame
        if self.workflow is not None:
            base = base[base["workflow"] == self.workflow]
        counts = {s: int(n) for s, n in base["status"].value_counts().items()}
        ordered = {s: counts[s] for s in STATUSES if s in counts}
        return views.counts_html(ordered, self.status, len(base))

    def html(self, with_age: bool, selected: str | None = None) -> str:
        """The table; without ages (and the selection's highlight) it is stable across runs."""
        matching = self.matching
        shown = matching.head(self.rows).to_dict("records")
        return views.instance_table_html(
            shown,
            selected=selected,
            with_age=with_age,
            matching=len(matching),
            listed=len(self.frame),
            limit=self.limit,
        )

    def _workflow_options(self, quiet: Quiet) -> None:
        names = sorted({str(w) for w in self.frame["workflow"] if isinstance(w, str)})
        if self.workflow is not None and self.workflow not in names:
            names.append(self.workflow)
        options = [("all", ""), *[(n, n) for n in names]]
        if list(self.workflow_filter.options) != options:
            with quiet:
                self.workflow_filter.options = options
                self.workflow_filter.value = self.workflow or ""

    def set_filters(self, status: str | None, workflow: str | None, quiet: Quiet) -> None:
        self.status, self.workflow = status, workflow
        self._workflow_options(quiet)
        with quiet:  # "" is the dropdowns' "all" (None would show as no choice at all)
            self.status_filter.value = status or ""
            self.workflow_filter.value = workflow or ""


# -- the step view ------------------------------------------------------------------------


class StepView:
    """The selected instance's steps, their timeline, the step selector, the selected
    step's stored result, the instance's error and its logs."""

    def __init__(self, quiet: Quiet) -> None:
        self.select = ipywidgets.Dropdown(options=(), description="step")
        self.steps_html = ClickableHTML()
        self.timeline = ClickableHTML()
        self.output_html = ipywidgets.HTML()
        self.error_html = ipywidgets.HTML()
        self.logs_html = ipywidgets.HTML()
        self.steps: pd.DataFrame | None = None
        self.logs: pd.DataFrame | None = None
        self.error: Any = None
        self.output: Any = None
        self.iid: str | None = None
        self._quiet = quiet

    @property
    def selected(self) -> str | None:
        value = self.select.value
        return None if value is None else str(value)

    @property
    def keys(self) -> list[str]:
        """The steps as the selector offers them (``name``, ``name#2``, ...)."""
        return list(self.select.options)

    def choose(self, key: str | None, now: float) -> None:
        """Select step ``key`` (None clears) without announcing it, and show its result."""
        with self._quiet:
            self.select.value = key
        self.draw(now)

    def show(
        self,
        iid: str | None,
        steps: pd.DataFrame | None,
        logs: pd.DataFrame | None,
        error: Any,
        now: float,
    ) -> None:
        """Show what was read of ``iid``; keep the selected step if it is still there."""
        self.iid, self.steps, self.logs, self.error = iid, steps, logs, error
        keys = [] if steps is None else [step_label(r.step, r.count) for r in steps.itertuples()]
        set_options(self.select, keys, self._quiet)
        self.draw(now)

    def draw(self, now: float) -> None:
        iid, steps, key = self.iid, self.steps, self.selected
        self.output = None
        if iid is None:
            for widget in (
                self.steps_html,
                self.timeline,
                self.output_html,
                self.error_html,
                self.logs_html,
            ):
                _set(widget, "")
            return
        _set(self.steps_html, views.steps_table_html(iid, steps, key))
        _set(self.timeline, views.timeline_html(steps, now, key))
        _set(self.error_html, views.error_html(iid, self.error))
        logs = self.logs
        if logs is not None and key is not None and len(logs):
            logs = logs[[self._is_step(s, key) for s in logs["step"]]]
        _set(self.logs_html, views.logs_html(logs, key))
        if key is None or steps is None:
            _set(self.output_html, "")
            return
        row = next(
            (r for r in steps.to_dict("records") if step_label(r["step"], r["count"]) == key),
            None,
        )
        if row is not None and row["status"] == "complete":
            self.output = row["output"]
        _set(self.output_html, views.output_html(key, row))

    @staticmethod
    def _is_step(logged: Any, key: str) -> bool:
        """Whether a log row's ``step`` is the step ``key`` (``name`` is ``name#1``)."""
        if not isinstance(logged, str):
            return False
        return logged == key or logged == f"{key}#1" or f"{logged}#1" == key


def _set(widget: Any, value: str) -> None:
    if widget.value != value:
        widget.value = value


# -- the controls -------------------------------------------------------------------------


class Controls:
    """The buttons, the event sender and the message line, laid out as one box."""

    def __init__(self) -> None:
        button = ipywidgets.Button
        self.pause_button = button(description="pause", icon="pause")
        self.resume_button = button(description="resume", icon="play")
        self.terminate_button = button(description="terminate", icon="stop", button_style="danger")
        self.restart_button = button(description="restart", icon="repeat")
        self.rerun_button = button(
            description="re-run from step", icon="step-forward", tooltip="restart(from_step=step)"
        )
        self.rerun_stale_button = button(
            description="re-run stale", icon="refresh", tooltip="rerun_stale()"
        )
        self.fork_button = button(
            description="fork from step", icon="code-fork", tooltip="fork(from_step=step)"
        )
        self.fork_id = ipywidgets.Text(
            placeholder="fork's id (empty: a fresh one)", layout=ipywidgets.Layout(width="220px")
        )
        self.refresh_button = button(description="refresh", icon="refresh")
        self.event_type = ipywidgets.Text(description="event", placeholder="type, e.g. approved")
        self.event_payload = ipywidgets.Text(placeholder='JSON payload, e.g. {"ok": true}')
        self.send_event_button = button(description="send event", icon="paper-plane")
        self.bulk_terminate_button = button(
            description="terminate all", icon="stop", tooltip="every instance the filters match"
        )
        self.bulk_resume_button = button(
            description="resume all", icon="play", tooltip="every instance the filters match"
        )
        self.bulk_restart_button = button(
            description="restart all", icon="repeat", tooltip="every instance the filters match"
        )
        self.message = ipywidgets.Label("")

    def box(self, step_select: Any) -> Any:
        """The controls as one ``VBox`` (the step selector sits next to the step buttons)."""
        row = ipywidgets.HBox
        return ipywidgets.VBox(
            [
                row(
                    [
                        self.pause_button,
                        self.resume_button,
                        self.terminate_button,
                        self.restart_button,
                        self.refresh_button,
                    ]
                ),
                row([step_select, self.rerun_button, self.rerun_stale_button]),
                row([self.fork_button, self.fork_id]),
                row([self.event_type, self.event_payload, self.send_event_button]),
                row(
                    [
                        ipywidgets.Label("filtered:"),
                        self.bulk_terminate_button,
                        self.bulk_resume_button,
                        self.bulk_restart_button,
                    ]
                ),
                self.message,
            ]
        )

    def say(self, text: str, error: bool = False) -> None:
        """Show what the last action did (``error``: in red, why it could not)."""
        self.message.value = text
        self.message.style.text_color = ERROR_COLOUR if error else None
