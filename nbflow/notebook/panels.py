"""The parts a ``Dashboard`` (``nbflow.notebook.widgets``) is made of.

* ``InstanceTable`` -- the instance listing as last read, drawn as an HTML table
  (with ages while live, without them in the stable static form);
* ``StepView`` -- the selected instance's steps, a step selector and the
  selected step's stored result;
* ``Controls`` -- the lifecycle buttons, the event sender and the message line;
* ``Quiet`` -- marks a selection change made by code, so the observers that
  react to a user's choice in the front end let it pass.

They hold widgets and draw HTML; reading Redis, locking and acting on instances
stay with the ``Dashboard``.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import ipywidgets  # type: ignore[import-untyped]  # ships no type hints
import pandas as pd

from nbflow.notebook.display import (
    progress_bar,
    status_badge,
    step_label,
    value_html,
    value_summary,
)

__all__ = ["Controls", "InstanceTable", "Quiet", "StepView", "age_text"]

TABLE_COLUMNS = ["id", "workflow", "status", "current_step", "steps_done", "age"]
STEP_COLUMNS = [
    "step",
    "kind",
    "count",
    "status",
    "attempts",
    "duration_s",
    "progress",
    "output",
    "error",
]
ERROR_COLOUR = "#dc3545"


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


def _cell(value: Any) -> str:
    if value is None or (not isinstance(value, (list, dict)) and pd.isna(value)):
        return "–"
    return html.escape(str(value))


def _error_line(error: Any) -> str:
    """A step's ``error`` column as ``Name: message`` ("" when there is none)."""
    if isinstance(error, Mapping):
        return f"{error.get('name')}: {error.get('message')}"
    return ""


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


# -- the instance table -------------------------------------------------------------------


class InstanceTable:
    """The instances as of the last refresh and the HTML table that shows them."""

    def __init__(self) -> None:
        self.widget = ipywidgets.HTML("<i>not refreshed yet</i>")
        self.frame = pd.DataFrame(columns=[*TABLE_COLUMNS, "created_at"])

    @property
    def ids(self) -> list[str]:
        return [str(i) for i in self.frame["id"]]

    def show(self, frame: pd.DataFrame, now: float, selected: str | None) -> None:
        """Take ``frame`` (``engine.instances()``) as the listing; ages are counted to ``now``."""
        frame["age"] = [age_text(now - ts.timestamp()) for ts in frame["created_at"]]
        self.frame = frame
        value = self.html(with_age=True, selected=selected)
        if self.widget.value != value:
            self.widget.value = value

    def html(self, with_age: bool, selected: str | None = None) -> str:
        """The table; without ages (and the selection's highlight) it is stable across runs."""
        columns = TABLE_COLUMNS if with_age else TABLE_COLUMNS[:-1]
        head = "".join(f'<th style="text-align:left">{c.replace("_", " ")}</th>' for c in columns)
        rows = [
            self._row(rec, columns, highlight=with_age and rec["id"] == selected)
            for rec in self.frame.to_dict("records")
        ]
        if not rows:
            rows.append(f'<tr><td colspan="{len(columns)}"><i>no instances</i></td></tr>')
        return (
            f'<table class="nbflow-dashboard"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>"
        )

    @staticmethod
    def _row(rec: Mapping[Any, Any], columns: list[str], highlight: bool) -> str:
        cells = [
            status_badge(str(rec.get(c))) if c == "status" else _cell(rec.get(c)) for c in columns
        ]
        style = ' style="background:#e7f1ff"' if highlight else ""
        return (
            f"<tr{style}>"
            + "".join(f'<td style="text-align:left">{x}</td>' for x in cells)
            + "</tr>"
        )


# -- the step view ------------------------------------------------------------------------


def steps_html(iid: str, steps: pd.DataFrame | None) -> str:
    """The steps of instance ``iid`` as a titled table (outputs as one-line summaries)."""
    title = f"<b>steps of</b> <code>{html.escape(iid)}</code>"
    if steps is None:
        return title + " <i>(instance not found)</i>"
    if not len(steps):
        return title + " <i>(no steps yet)</i>"
    shown = steps[STEP_COLUMNS].copy()
    shown["output"] = [
        value_summary(v, 60) if s == "complete" else ""
        for v, s in zip(steps["output"], steps["status"], strict=True)
    ]
    shown["error"] = [_error_line(e) for e in steps["error"]]
    # every cell escaped here, so the progress bars (HTML) can go in unescaped
    for column in shown.columns:
        if column != "progress":
            shown[column] = [_cell(v) if v != "" else "" for v in shown[column]]
    messages = steps["message"] if "message" in steps else [None] * len(steps)
    shown["progress"] = [
        "–" if p is None or pd.isna(p) else progress_bar(p, m or "", width=60)
        for p, m in zip(steps["progress"], messages, strict=True)
    ]
    return title + shown.to_html(index=False, border=0, escape=False)


def output_html(key: str, row: Any) -> str:
    """What the step ``key`` (its ``steps()`` row, None if gone) has to show."""
    title = f"<b>output of step</b> <code>{html.escape(key)}</code><br>"
    if row is None:
        return title + "<i>no such step any more</i>"
    if row.status == "complete":
        return title + value_html(row.output)
    if row.status == "errored" and isinstance(row.error, Mapping):
        text = html.escape(_error_line(row.error))
        return title + f'<span style="color:{ERROR_COLOUR}">{text}</span>'
    return title + f"<i>no result yet ({html.escape(str(row.status))})</i>"


class StepView:
    """The selected instance's steps, the step selector and the selected step's result."""

    def __init__(self, quiet: Quiet) -> None:
        self.select = ipywidgets.Dropdown(options=(), description="step")
        self.steps_html = ipywidgets.HTML()
        self.output_html = ipywidgets.HTML()
        self.steps: pd.DataFrame | None = None
        self.output: Any = None
        self._quiet = quiet

    @property
    def selected(self) -> str | None:
        value = self.select.value
        return None if value is None else str(value)

    @property
    def keys(self) -> list[str]:
        """The steps as the selector offers them (``name``, ``name#2``, ...)."""
        return list(self.select.options)

    def choose(self, key: str | None) -> None:
        """Select step ``key`` (None clears) without announcing it, and show its result."""
        with self._quiet:
            self.select.value = key
        self.show_output()

    def show(self, iid: str | None, steps: pd.DataFrame | None) -> None:
        """Show ``steps`` of ``iid``; keep the selected step if it is still there."""
        self.steps = steps
        if iid is None:
            set_options(self.select, [], self._quiet)
            self.steps_html.value = ""
        else:
            keys = (
                [] if steps is None else [step_label(r.step, r.count) for r in steps.itertuples()]
            )
            set_options(self.select, keys, self._quiet)
            self.steps_html.value = steps_html(iid, steps)
        self.show_output()

    def show_output(self) -> None:
        key, steps = self.selected, self.steps
        self.output = None
        if key is None or steps is None:
            self.output_html.value = ""
            return
        row = next((r for r in steps.itertuples() if step_label(r.step, r.count) == key), None)
        if row is not None and row.status == "complete":
            self.output = row.output
        self.output_html.value = output_html(key, row)


# -- the controls -------------------------------------------------------------------------


class Controls:
    """The lifecycle buttons, the event sender and the message line, laid out as one box."""

    def __init__(self) -> None:
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

    def box(self, step_select: Any) -> Any:
        """The controls as one ``VBox`` (the step selector sits next to the re-run button)."""
        lifecycle = [
            self.pause_button,
            self.resume_button,
            self.terminate_button,
            self.restart_button,
            self.refresh_button,
        ]
        return ipywidgets.VBox(
            [
                ipywidgets.HBox(lifecycle),
                ipywidgets.HBox([step_select, self.rerun_button]),
                ipywidgets.HBox([self.event_type, self.event_payload, self.send_event_button]),
                self.message,
            ]
        )

    def say(self, text: str, error: bool = False) -> None:
        """Show what the last action did (``error``: in red, why it could not)."""
        self.message.value = text
        self.message.style.text_color = ERROR_COLOUR if error else None
