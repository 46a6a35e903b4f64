"""What the dashboard draws, as HTML strings (pure functions of what it read).

One renderer for both forms: the live widget shows these strings, and the static
HTML a saved notebook keeps is made of the same pieces (without ages and clock
times, so stored outputs compare equal under nbval).  Elements a user can click
carry ``data-nbflow-click="kind:key"`` (``nbflow.notebook.clickable``): ``row:ID``
(the instance table), ``status:S`` / ``status:`` (the counts: filter by status, or
all), ``step:LABEL`` (the step table and the timeline).

Bars and the timeline are plain HTML/CSS and inline SVG: no script, so they also
render on GitHub and nbviewer.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from nbflow.notebook.clickable import CLICK_ATTR
from nbflow.notebook.display import (
    STATUS_COLOURS,
    progress_bar,
    status_badge,
    step_label,
    value_html,
    value_summary,
)

__all__ = [
    "counts_html",
    "error_html",
    "instance_table_html",
    "logs_html",
    "output_html",
    "row_fraction",
    "steps_table_html",
    "timeline_html",
]

ERROR_COLOUR = "#dc3545"
SELECTED_BACKGROUND = "#e7f1ff"
#: Step statuses as the timeline colours them (instance colours where the names match).
STEP_COLOURS = {**STATUS_COLOURS, "running": "#0d6efd", "waiting": "#6f42c1"}

_TH = 'style="text-align:left;padding:2px 8px"'
_TD = 'style="text-align:left;padding:2px 8px"'


def _click(key: str) -> str:
    return f'{CLICK_ATTR}="{html.escape(key, quote=True)}"'


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _cell(value: Any) -> str:
    return "–" if _missing(value) else html.escape(str(value))


# -- the instance table -----------------------------------------------------------------


def counts_html(counts: Mapping[str, int], active: str | None, total: int) -> str:
    """Counts by status as clickable chips (a click filters by that status; "all" clears)."""
    chips = [
        f'<span {_click("status:")} style="cursor:pointer;margin-right:10px;'
        f'{"font-weight:bold;" if active is None else ""}">all {total}</span>'
    ]
    for status, n in counts.items():
        bold = "font-weight:bold;text-decoration:underline;" if status == active else ""
        chips.append(
            f'<span {_click("status:" + status)} style="cursor:pointer;margin-right:10px;{bold}">'
            f"{status_badge(status)} {n}</span>"
        )
    return f'<div class="nbflow-counts" style="margin:4px 0">{"".join(chips)}</div>'


def row_fraction(status: str, steps_done: int, expected: int | None) -> float | None:
    """How far an instance is: complete is done; else steps done of the steps its
    workflow's last completed instance did (None when none completed yet)."""
    if status == "complete":
        return 1.0
    if not expected:
        return None
    return min(1.0, steps_done / expected)


def _progress_cell(rec: Mapping[Any, Any]) -> str:
    done = 0 if _missing(rec.get("steps_done")) else int(rec["steps_done"])
    raw = rec.get("steps_expected")
    expected = None if raw is None or _missing(raw) else int(raw)
    fraction = row_fraction(str(rec.get("status")), done, expected)
    steps = f"{done} step" if done == 1 else f"{done} steps"
    label = f"{done}/{expected}" if expected else steps
    return progress_bar(fraction, label, width=80)


#: The instance table's columns: (title, how a cell is drawn).
_COLUMNS = ["id", "workflow", "status", "current step", "progress", "age"]


def instance_table_html(
    rows: Sequence[Mapping[Any, Any]],
    *,
    selected: str | None,
    with_age: bool,
    matching: int,
    listed: int,
    limit: int,
) -> str:
    """The instance table; each row selects its instance when clicked.

    ``rows``: records with id, workflow, status, current_step, steps_done,
    steps_expected (and age when ``with_age``).  ``matching``: how many instances
    the filters match (``rows`` may be the first of them); ``listed``: how many
    were read (at most ``limit``).
    """
    columns = _COLUMNS if with_age else _COLUMNS[:-1]
    head = "".join(f"<th {_TH}>{c}</th>" for c in columns)
    body = []
    for rec in rows:
        iid = str(rec["id"])
        cells = [
            f"<code>{html.escape(iid)}</code>",
            _cell(rec.get("workflow")),
            status_badge(str(rec.get("status"))),
            _cell(rec.get("current_step")),
            _progress_cell(rec),
        ]
        if with_age:
            cells.append(_cell(rec.get("age")))
        style = "cursor:pointer"
        if with_age and iid == selected:
            style += f";background:{SELECTED_BACKGROUND}"
        body.append(
            f'<tr {_click("row:" + iid)} style="{style}">'
            + "".join(f"<td {_TD}>{c}</td>" for c in cells)
            + "</tr>"
        )
    if not body:
        body.append(f'<tr><td colspan="{len(columns)}"><i>no instances</i></td></tr>')
    notes = []
    if matching > len(rows):
        notes.append(f"{len(rows)} of {matching} shown; filter to narrow")
    if listed >= limit:
        notes.append(f"the newest {limit} instances are read")
    note = f'<div style="color:#6c757d"><i>{"; ".join(notes)}</i></div>' if notes else ""
    return (
        f'<table class="nbflow-dashboard"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>{note}"
    )


# -- the selected instance ----------------------------------------------------------------


def _step_labels(steps: pd.DataFrame) -> list[str]:
    return [step_label(s, c) for s, c in zip(steps["step"], steps["count"], strict=True)]


def _step_progress(row: Mapping[Any, Any]) -> str:
    progress = row.get("progress")
    message = row.get("message")
    if progress is None or _missing(progress):
        return "–"
    return progress_bar(float(progress), "" if _missing(message) else str(message), width=60)


def steps_table_html(
    iid: str, steps: pd.DataFrame | None, selected_step: str | None, with_times: bool = True
) -> str:
    """The steps of ``iid`` (stale and progress included); each row selects its step."""
    title = f"<b>steps of</b> <code>{html.escape(iid)}</code>"
    if steps is None:
        return title + " <i>(instance not found)</i>"
    if not len(steps):
        return title + " <i>(no steps yet)</i>"
    columns = ["step", "kind", "status", "attempts"]
    if with_times:
        columns.append("duration")
    columns += ["progress", "stale", "output", "error"]
    head = "".join(f"<th {_TH}>{c}</th>" for c in columns)
    body = []
    for label, row in zip(_step_labels(steps), steps.to_dict("records"), strict=True):
        status = str(row.get("status"))
        output = value_summary(row.get("output"), 60) if status == "complete" else ""
        error = row.get("error")
        error_text = (
            f"{error.get('name')}: {error.get('message')}" if isinstance(error, Mapping) else ""
        )
        duration = row.get("duration_s")
        cells = [
            f"<code>{html.escape(label)}</code>",
            _cell(row.get("kind")),
            status_badge(status),
            _cell(row.get("attempts")),
        ]
        if with_times:
            cells.append("–" if duration is None or _missing(duration) else f"{duration:.2f}s")
        stale = row.get("stale")
        cells += [
            _step_progress(row),
            "stale" if (not _missing(stale) and bool(stale)) else "",
            html.escape(output),
            f'<span style="color:{ERROR_COLOUR}">{html.escape(error_text)}</span>',
        ]
        style = "cursor:pointer"
        if label == selected_step:
            style += f";background:{SELECTED_BACKGROUND}"
        body.append(
            f'<tr {_click("step:" + label)} style="{style}">'
            + "".join(f"<td {_TD}>{c}</td>" for c in cells)
            + "</tr>"
        )
    return (
        f'{title}<table class="nbflow-steps"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _epoch(value: Any) -> float | None:
    if _missing(value):
        return None
    return float(pd.Timestamp(value).timestamp())


def timeline_html(
    steps: pd.DataFrame | None, now: float, selected_step: str | None, width: int = 640
) -> str:
    """One bar per step from its start to its finish (to ``now`` while unfinished),
    coloured by status, as inline SVG; a click on a bar selects the step."""
    if steps is None or not len(steps):
        return ""
    spans = []
    for label, row in zip(_step_labels(steps), steps.to_dict("records"), strict=True):
        start = _epoch(row.get("started_at"))
        if start is None:
            continue
        end = _epoch(row.get("finished_at"))
        spans.append((label, str(row.get("status")), start, end))
    if not spans:
        return ""
    t0 = min(s for _, _, s, _ in spans)
    t1 = max([now if e is None else e for _, _, _, e in spans] + [t0 + 1e-3])
    span = max(t1 - t0, 1e-3)
    left, bar_h, gap = 140, 14, 4
    plot = width - left - 10
    height = len(spans) * (bar_h + gap) + 22
    parts = [
        f'<svg class="nbflow-timeline" width="{width}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg" style="font:11px monospace">'
    ]
    for n, (label, status, start, end) in enumerate(spans):
        y = n * (bar_h + gap) + 2
        x = left + (start - t0) / span * plot
        w = max(2.0, ((now if end is None else end) - start) / span * plot)
        colour = STEP_COLOURS.get(status, "#adb5bd")
        took = f"{(now if end is None else end) - start:.2f}s"
        outline = ' stroke="#000" stroke-width="1.5"' if label == selected_step else ""
        name = label if len(label) <= 18 else label[:17] + "…"
        parts.append(
            f'<g {_click("step:" + label)} style="cursor:pointer">'
            f"<title>{html.escape(label)}: {html.escape(status)}, {took}</title>"
            f'<text x="0" y="{y + bar_h - 3}">{html.escape(name)}</text>'
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" rx="2" '
            f'fill="{colour}"{outline}/></g>'
        )
    axis_y = len(spans) * (bar_h + gap) + 14
    parts.append(
        f'<text x="{left}" y="{axis_y}" fill="#6c757d">0s</text>'
        f'<text x="{left + plot}" y="{axis_y}" fill="#6c757d" text-anchor="end">'
        f"{_seconds(span)}</text></svg>"
    )
    return "<b>timeline</b><br>" + "".join(parts)


def _seconds(span: float) -> str:
    if span < 60:
        return f"{span:.1f}s" if span < 10 else f"{math.floor(span)}s"
    return f"{int(span // 60)}m {int(span % 60)}s"


def output_html(key: str, row: Mapping[Any, Any] | None, head_rows: int = 10) -> str:
    """The selected step's stored result: a DataFrame as its head with its shape."""
    title = f"<b>output of step</b> <code>{html.escape(key)}</code><br>"
    if row is None:
        return title + "<i>no such step any more</i>"
    status = str(row.get("status"))
    if status == "complete":
        value = row.get("output")
        if isinstance(value, pd.DataFrame):
            rows, cols = value.shape
            return (
                title
                + f"<i>DataFrame, shape ({rows}, {cols}); first {min(rows, head_rows)} rows</i>"
                + value.head(head_rows).to_html(border=0, max_cols=20)
            )
        return title + value_html(value)
    error = row.get("error")
    if status == "errored" and isinstance(error, Mapping):
        text = html.escape(f"{error.get('name')}: {error.get('message')}")
        return title + f'<span style="color:{ERROR_COLOUR}">{text}</span>'
    return title + f"<i>no result yet ({html.escape(status)})</i>"


def error_html(iid: str, error: Any) -> str:
    """The selected instance's error ("" when it has none)."""
    if not isinstance(error, Mapping):
        return ""
    text = html.escape(f"{error.get('name')}: {error.get('message')}")
    return (
        f"<b>error of</b> <code>{html.escape(iid)}</code>: "
        f'<span style="color:{ERROR_COLOUR}">{text}</span>'
    )


def logs_html(logs: pd.DataFrame | None, step: str | None, last: int = 40) -> str:
    """The last ``last`` log lines of the selected instance (of ``step`` if one is selected)."""
    what = "logs" if step is None else f"logs of step <code>{html.escape(step)}</code>"
    if logs is None:
        return f"<b>{what}</b> <i>(not available)</i>"
    if not len(logs):
        return f"<b>{what}</b> <i>(nothing printed or logged)</i>"
    lines = []
    for rec in logs.tail(last).to_dict("records"):
        stream = str(rec.get("stream"))
        colour = ERROR_COLOUR if stream in ("stderr", "ERROR", "CRITICAL", "WARNING") else "inherit"
        where = "" if _missing(rec.get("step")) else f"[{rec['step']}] "
        lines.append(
            f'<span style="color:{colour}">{html.escape(where + str(rec.get("line")))}</span>'
        )
    more = f"<i>({len(logs) - last} earlier lines not shown)</i><br>" if len(logs) > last else ""
    return (
        f"<b>{what}</b><br>{more}"
        '<pre style="margin:0;max-height:12em;overflow:auto;white-space:pre-wrap">'
        + "\n".join(lines)
        + "</pre>"
    )
