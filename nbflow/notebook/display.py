"""Rich display of workflow instances and status dicts in Jupyter.

A ``WorkflowInstance`` shows as a small status card: id, workflow, a coloured
status, the current step, how many steps are done (while it runs, out of the
step count of its workflow's last completed instance: "3/7 steps", with a bar),
the current step's reported progress (a bar and its message), and the error or
a summary of the output.  The bars are plain HTML/CSS, so they show wherever the
card's HTML does.  One output carries several forms (the dask.distributed /
tqdm.notebook pattern):

* ``text/plain`` -- stable, so nbval can compare stored outputs: no memory
  addresses, widget model ids, generated uuids or clock times, e.g.
  ``WorkflowInstance(id='order-42', workflow='Checkout', status='complete')``;
* ``text/html`` -- the static card, which GitHub and nbviewer render.

In a Jupyter kernel a card is an HTML output under a display id (no widget view),
which a background thread updates from Redis whenever what it shows changes, also
after the instance finished (a restart from the dashboard brings it back), so the
card follows its instance and a saved notebook keeps its last HTML, which every
front end renders (``instance_display``, ``nbflow.notebook.outputs``).
``instance_widget`` still gives the card as a live ``ipywidgets.HTML`` for layouts.

Everything is read through the public instance API (``info()``).  The live
cards share one ``nbflow.notebook.refresher.Refresher`` thread, which never prints
(output of a background thread lands in whatever cell runs at that moment); it
logs to ``logging.getLogger("nbflow")``.

Importing this module registers ``instance_mimebundle``, ``instance_html`` and
``status_html`` with ``nbflow.reprs``, which is how ``WorkflowInstance`` and the
``InstanceStatus`` dict that ``status()``/``wait()`` return draw themselves
without the engine knowing this layer (``import nbflow`` imports it).
"""

from __future__ import annotations

import html
import logging
import re
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pandas as pd

from nbflow import reprs
from nbflow.notebook.refresher import Refresher
from nbflow.records import FINAL_STATUSES, make_key

if TYPE_CHECKING:
    from nbflow.engine import WorkflowInstance

__all__ = [
    "STATUS_COLOURS",
    "InstanceSummary",
    "instance_display",
    "instance_html",
    "instance_mimebundle",
    "instance_text",
    "instance_widget",
    "live_card_count",
    "notify_changed",
    "progress_bar",
    "register_card_display",
    "status_badge",
    "status_html",
    "step_label",
    "stop_live_cards",
    "summarize",
    "value_html",
    "value_summary",
    "widgets_available",
]

log = logging.getLogger("nbflow")

#: Badge colours per status (``unknown``: deleted or never existed).
STATUS_COLOURS: dict[str, str] = {
    "queued": "#6c757d",
    "running": "#0d6efd",
    "waiting": "#6f42c1",
    "waitingForPause": "#fd7e14",
    "paused": "#e0a800",
    "complete": "#198754",
    "errored": "#dc3545",
    "terminated": "#343a40",
    "unknown": "#adb5bd",
    "unavailable": "#adb5bd",
}

WIDGET_MIMETYPE = "application/vnd.jupyter.widget-view+json"

# An id nobody chose: engine-generated ids are uuid4 hex.  The stable text form
# hides them so a notebook re-run compares equal under nbval.
_GENERATED_ID = re.compile(r"[0-9a-f]{32}")

_MAX_SUMMARY = 120


def widgets_available() -> bool:
    """Whether a live widget view can render: we run inside a Jupyter kernel.

    A terminal IPython or a bare ``InteractiveShell`` has no kernel, so a widget
    would only add a model nobody sees (and a refresh thread nobody needs).  Without
    IPython imported there is no kernel either: a worker process or a script does not
    import it (some 30,000 objects the garbage collector would walk for ever).
    """
    if "IPython" not in sys.modules:
        return False
    from IPython.core.getipython import get_ipython

    # IPython >= 9 ships type hints, older ones do not: the ignore must hold both ways.
    shell: Any = get_ipython()  # type: ignore[no-untyped-call, unused-ignore]
    return shell is not None and getattr(shell, "kernel", None) is not None


# -- values ------------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def value_summary(value: Any, width: int = _MAX_SUMMARY) -> str:
    """One short line describing a step result or workflow output.

    DataFrames and Series are described by shape (their contents can be huge);
    other values by a ``repr`` cut to ``width`` characters.
    """
    if isinstance(value, pd.DataFrame):
        rows, cols = value.shape
        return f"DataFrame: {_plural(rows, 'row')} × {_plural(cols, 'column')}"
    if isinstance(value, pd.Series):
        return f"Series: {_plural(len(value), 'value')}"
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    if isinstance(value, datetime):
        return value.isoformat()
    text = " ".join(repr(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def value_html(value: Any, max_rows: int = 20, max_cols: int = 20) -> str:
    """A stored result as HTML: a DataFrame or Series as a table, anything else as text."""
    if isinstance(value, pd.DataFrame):
        return value.to_html(max_rows=max_rows, max_cols=max_cols, border=0)
    if isinstance(value, pd.Series):
        return value.to_frame().to_html(max_rows=max_rows, border=0)
    if isinstance(value, (bytes, bytearray)):
        return f"<code>{len(value)} bytes</code>"
    text = value.isoformat() if isinstance(value, datetime) else repr(value)
    if len(text) > 5000:
        text = text[:4999] + "…"
    return f'<pre style="margin:0;white-space:pre-wrap">{html.escape(text)}</pre>'


def status_badge(status: str) -> str:
    """The status as a small coloured label (HTML)."""
    colour = STATUS_COLOURS.get(status, "#adb5bd")
    return (
        f'<span style="background:{colour};color:white;border-radius:3px;'
        f'padding:0 6px;font-family:monospace">{html.escape(status)}</span>'
    )


def progress_bar(fraction: Any, label: str = "", width: int = 120) -> str:
    """A small horizontal bar filled to ``fraction`` (0-1) with ``label`` beside it (plain
    HTML/CSS, no script: it renders in GitHub and nbviewer too).  No fraction: ``label``."""
    if fraction is None or (isinstance(fraction, float) and fraction != fraction):
        return html.escape(label)
    share = min(1.0, max(0.0, float(fraction)))
    bar = (
        f'<span style="display:inline-block;width:{width}px;height:8px;background:#e9ecef;'
        'border-radius:4px;vertical-align:middle;overflow:hidden">'
        f'<span style="display:block;width:{share * 100:.1f}%;height:100%;'
        'background:#0d6efd"></span></span>'
    )
    text = f"{share * 100:.0f}%" + (f" {label}" if label else "")
    return f'{bar} <span style="font-family:monospace">{html.escape(text)}</span>'


def _error_text(error: Any) -> str:
    if isinstance(error, Mapping):
        return f"{error.get('name', 'Error')}: {error.get('message', '')}"
    return str(error)


def status_html(status: Mapping[str, Any]) -> str:
    """A ``status()`` dict as a small HTML table (status badge, output or error)."""
    rows = [("status", status_badge(str(status.get("status", "unknown"))))]
    if "output" in status:
        rows.append(("output", value_html(status["output"])))
    if status.get("error") is not None:
        rows.append(("error", html.escape(_error_text(status["error"]))))
    for key, value in status.items():
        if key not in ("status", "output", "error"):
            rows.append((html.escape(str(key)), html.escape(value_summary(value))))
    body = "".join(
        f'<tr><th style="text-align:left;padding-right:1em">{k}</th>'
        f'<td style="text-align:left">{v}</td></tr>'
        for k, v in rows
    )
    return f'<table class="nbflow-status">{body}</table>'


def step_label(name: Any, count: Any) -> str:
    """A step as a user names it (``step_output``, ``restart(from_step=)``, ``%wf output``):
    ``name`` for its first call, else its key ``name#count`` (a missing count is 1)."""
    n = int(count) if pd.notna(count) else 1
    return str(name) if n <= 1 else make_key(name, n)


# -- instances ---------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceSummary:
    """What a status card shows, read once from Redis through the public API."""

    id: str
    workflow: str
    status: str
    current_step: str | None = None
    steps_done: int = 0
    error: str | None = None
    output: str | None = None
    #: steps done by the workflow's last completed instance (None: none completed yet)
    steps_expected: int | None = None
    #: what the current step last reported (``ctx.progress``), while it runs
    progress: float | None = None
    progress_message: str | None = None

    @property
    def final(self) -> bool:
        """Whether nothing can change any more (no reason to refresh)."""
        return self.status in FINAL_STATUSES or self.status in ("unknown", "unavailable")


def summarize(inst: WorkflowInstance) -> InstanceSummary:
    """Read an instance's card data with ``inst.info()`` (one round trip, no step results).

    A failure to read (Redis gone, say) gives status ``unavailable`` and is
    logged, because a display must never raise into the notebook.
    """
    try:
        info = inst.info()
    except Exception as exc:  # display must not raise; the reason goes to the log
        log.warning("nbflow: could not read instance %s for display: %s", inst.id, exc)
        return InstanceSummary(inst.id, inst.workflow, "unavailable", error=str(exc))
    state = str(info["status"])
    current = info.get("current_step") if state not in FINAL_STATUSES else None
    error = _error_text(info["error"]) if info.get("error") is not None else None
    output = value_summary(info["output"]) if "output" in info else None
    expected = info.get("steps_expected")
    return InstanceSummary(
        inst.id,
        inst.workflow,
        state,
        current,
        int(info.get("steps_done") or 0),
        error,
        output,
        steps_expected=None if expected is None else int(expected),
        progress=info.get("progress"),
        progress_message=info.get("progress_message"),
    )


def _stable_id(instance_id: str) -> str:
    return "<generated>" if _GENERATED_ID.fullmatch(instance_id) else repr(instance_id)


def instance_text(inst: WorkflowInstance, summary: InstanceSummary | None = None) -> str:
    """The stable plain-text form of an instance, safe to store in a notebook.

    E.g. ``WorkflowInstance(id='g1', workflow='Greet', status='complete')``.
    Generated (uuid4 hex) ids show as ``<generated>``: they differ on every run.
    """
    s = summary or summarize(inst)
    return f"WorkflowInstance(id={_stable_id(s.id)}, workflow={s.workflow!r}, status={s.status!r})"


def instance_html(inst: WorkflowInstance, summary: InstanceSummary | None = None) -> str:
    """The status card as static HTML (no clock times, so stored outputs stay comparable)."""
    s = summary or summarize(inst)
    rows = [
        ("instance", f"<code>{html.escape(s.id)}</code>"),
        ("workflow", html.escape(s.workflow)),
        ("status", status_badge(s.status)),
        ("current step", html.escape(s.current_step) if s.current_step else "–"),
        ("steps done", _steps_done_html(s)),
    ]
    if s.progress is not None and not s.final:
        rows.append(("progress", progress_bar(s.progress, s.progress_message or "")))
    if s.error is not None:
        rows.append(("error", f'<span style="color:#dc3545">{html.escape(s.error)}</span>'))
    if s.output is not None:
        rows.append(("output", f"<code>{html.escape(s.output)}</code>"))
    body = "".join(
        f'<tr><th style="text-align:left;padding-right:1em">{k}</th>'
        f'<td style="text-align:left">{v}</td></tr>'
        for k, v in rows
    )
    return (
        '<div class="nbflow-instance" style="display:inline-block;border:1px solid #ccc;'
        f'border-radius:4px;padding:4px 8px"><table>{body}</table></div>'
    )


def _steps_done_html(s: InstanceSummary) -> str:
    """``3``; while it runs (``running``, ``waitingForPause``), ``3/7 steps`` and a bar
    when its workflow has a completed instance to go by (more steps than that: the bar
    stays full).  Cards of queued, waiting, paused and finished instances keep the plain
    count, so the HTML a notebook stored for them stays the same from run to run."""
    if s.status not in ("running", "waitingForPause") or not s.steps_expected:
        return str(s.steps_done)
    label = f"{s.steps_done}/{s.steps_expected} steps"
    return progress_bar(min(1.0, s.steps_done / s.steps_expected), label)


def instance_mimebundle(
    inst: WorkflowInstance, include: Any = None, exclude: Any = None
) -> dict[str, Any]:
    """``WorkflowInstance._repr_mimebundle_``: the stable text and the static card.

    No widget view: in a kernel a card is displayed by ``instance_display`` as an
    HTML output under a display id, which the card refresh thread updates (so a saved
    notebook keeps plain HTML that every front end shows).  (IPython filters the
    bundle by ``include``/``exclude`` itself.)
    """
    summary = summarize(inst)
    return {
        "text/plain": instance_text(inst, summary),
        "text/html": instance_html(inst, summary),
    }


def instance_display(inst: WorkflowInstance) -> None:
    """Show a card (``display(inst)``, or an instance as a cell's value) that follows its
    instance: an HTML output under a display id, updated from Redis by the card refresh
    thread while the instance can change, and afterwards too (checked every
    ``FINAL_EVERY`` rounds, at once after a control of the dashboard or ``%wf`` acted on
    it), so a card says ``paused`` or ``queued`` again after a restart, whoever did it."""
    from nbflow.notebook import outputs

    summary = summarize(inst)
    bundle = {"text/plain": instance_text(inst, summary), "text/html": instance_html(inst, summary)}
    shown = outputs.show(bundle)
    if shown is not None and summary.status != "unknown":
        _LIVE.add_output(shown, inst)


# -- live cards --------------------------------------------------------------------


#: Cards of finished instances are read again every this many rounds (they change only
#: when someone restarts the instance; a control of ours says so at once, see ``notify``).
FINAL_EVERY = 5
#: At most this many displayed cards follow their instances (the oldest stop first).
MAX_OUTPUT_CARDS = 500


class _LiveCards:
    """Every displayed card, refreshed by one shared thread (not one per card).

    Two kinds: ``instance_widget`` cards (an ``ipywidgets.HTML``, kept while not
    final and not closed) and displayed outputs (``instance_display``), kept while
    their instance exists.  The thread ends when none is left and starts again with
    the next card.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cards: dict[int, tuple[Any, WorkflowInstance]] = {}
        self._outputs: dict[int, tuple[Any, WorkflowInstance]] = {}
        self._final: set[int] = set()  # outputs whose instance was final when last read
        self._due: set[str] = set()  # instance ids a control just acted on
        self._round = 0
        self._refresher = Refresher(
            "nbflow-live-cards", self._tick, 1.0, what="live card refresh", delay_first=True
        )

    def add(self, widget: Any, inst: WorkflowInstance, interval: float) -> None:
        with self._lock:
            first = not self._cards and not self._outputs
            self._cards[id(widget)] = (widget, inst)
            current = self._refresher.interval
            self._refresher.interval = interval if first else min(current, interval)
        self._refresher.start()

    def add_output(self, output: Any, inst: WorkflowInstance) -> None:
        with self._lock:
            self._outputs[id(output)] = (output, inst)
            while len(self._outputs) > MAX_OUTPUT_CARDS:
                oldest = next(iter(self._outputs))
                self._outputs.pop(oldest)
                self._final.discard(oldest)
        self._refresher.start()

    def notify(self, instance_id: str) -> None:
        """Instance ``instance_id`` just changed (a control acted on it): redraw its cards now."""
        with self._lock:
            if not any(inst.id == instance_id for _, inst in self._outputs.values()):
                return
            self._due.add(instance_id)
        self._refresher.start()
        self._refresher.wake()

    def count(self) -> int:
        with self._lock:
            return len(self._cards) + len(self._outputs)

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._cards.clear()
            self._outputs.clear()
            self._final.clear()
        self._refresher.stop(timeout)

    def _tick(self) -> bool:
        """Refresh every card once; False when none is left to refresh."""
        with self._lock:
            self._round += 1
            every = self._round % FINAL_EVERY == 0
            due, self._due = self._due, set()
            cards = list(self._cards.items())
            outputs = [
                (key, out, inst)
                for key, (out, inst) in self._outputs.items()
                if every or key not in self._final or inst.id in due
            ]
        done = [key for key, (widget, inst) in cards if not self._refresh(widget, inst)]
        gone: list[int] = []
        final: list[int] = []
        for key, out, inst in outputs:
            state = self._refresh_output(out, inst)
            (gone if state is None else final if state else []).append(key)
        with self._lock:
            for key in done:
                self._cards.pop(key, None)
            for key, _, _ in outputs:
                self._final.discard(key)
            self._final.update(final)
            for key in gone:
                self._outputs.pop(key, None)
                self._final.discard(key)
            return bool(self._cards) or bool(self._outputs)

    @staticmethod
    def _refresh(widget: Any, inst: WorkflowInstance) -> bool:
        """Update one card; False once it needs no more refreshing."""
        if getattr(widget, "comm", None) is None:  # closed
            return False
        try:
            summary = summarize(inst)
            value = instance_html(inst, summary)
            if widget.value != value:
                widget.value = value
            return not summary.final
        except Exception:  # one broken card must not stop the others, nor print
            log.exception("nbflow: live card of instance %s stopped", inst.id)
            return False

    @staticmethod
    def _refresh_output(output: Any, inst: WorkflowInstance) -> bool | None:
        """Update one displayed card: whether its instance is final; None to drop it."""
        try:
            summary = summarize(inst)
            if summary.status == "unknown":
                return None  # deleted (retention): the card keeps its last HTML
            if summary.status == "unavailable":
                return False  # Redis away for now: keep the card, try again
            output.update(
                {
                    "text/plain": instance_text(inst, summary),
                    "text/html": instance_html(inst, summary),
                }
            )
            return summary.final
        except Exception:  # one broken card must not stop the others, nor print
            log.exception("nbflow: card of instance %s stopped", inst.id)
            return None


_LIVE = _LiveCards()


def instance_widget(
    inst: WorkflowInstance,
    refresh_interval: float = 1.0,
    summary: InstanceSummary | None = None,
) -> Any:
    """An ``ipywidgets.HTML`` status card kept current from Redis until the instance is final.

    Close the widget (``widget.close()``) to stop refreshing it earlier.
    """
    import ipywidgets  # type: ignore[import-untyped]  # ships no type hints

    s = summary or summarize(inst)
    widget = ipywidgets.HTML(value=instance_html(inst, s))
    if not s.final:
        _LIVE.add(widget, inst, max(0.05, float(refresh_interval)))
    return widget


def notify_changed(instance_id: str) -> None:
    """A control (the dashboard, ``%wf``) just changed ``instance_id``: redraw its cards now."""
    _LIVE.notify(instance_id)


def live_card_count() -> int:
    """How many live cards are being refreshed right now."""
    return _LIVE.count()


def stop_live_cards(timeout: float = 5.0) -> None:
    """Stop refreshing every live card (they keep showing their last state)."""
    _LIVE.stop(timeout)


def register_card_display() -> bool:
    """In a Jupyter kernel, make IPython show instances with ``instance_display`` (cards
    that follow their instance); elsewhere (a terminal, a script, nbval's comparison
    still sees the same text and HTML) the static mimebundle is all there is."""
    if not widgets_available():
        return False
    from IPython.core.getipython import get_ipython

    shell: Any = get_ipython()  # type: ignore[no-untyped-call, unused-ignore]
    formatter = shell.display_formatter.ipython_display_formatter
    formatter.for_type_by_name("nbflow.engine", "WorkflowInstance", instance_display)
    return True


# What WorkflowInstance and InstanceStatus draw in a notebook (see nbflow.reprs).
reprs.register("instance_mimebundle", instance_mimebundle)
reprs.register("instance_html", instance_html)
reprs.register("status_html", status_html)
register_card_display()
