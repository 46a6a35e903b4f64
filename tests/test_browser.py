"""The dashboard in a real browser (SPEC 9): JupyterLab in headless Chromium.

One test, as a user would go through tutorial 3: run it, click an instance's row and
the pause and resume buttons while another cell waits for that instance, see the table
change, stop the kernel, save, and reopen the notebook without a kernel: the static
HTML is there and no "Error displaying widget".  It takes screenshots for the README
(``docs/dashboard-*.png``).  ``tests/browser.py`` starts and stops everything.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import Lab, chromium_path

REPO = Path(__file__).resolve().parent.parent
TUTORIAL = "03-dashboard.ipynb"
DOCS = REPO / "docs"

pytestmark = pytest.mark.skipif(
    chromium_path() is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)


@pytest.fixture
def lab(tmp_path: Path, redis_url: str) -> Iterator[Lab]:
    pytest.importorskip("playwright")
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(REPO / "notebooks" / TUTORIAL, root / TUTORIAL)
    lab = Lab(root, redis_url, env={"PYTHONPATH": str(REPO)})
    try:
        yield lab
    finally:
        lab.close()


def _cell_index(lab: Lab, starts: str) -> int:
    """The index (among all cells) of the code cell whose source starts with ``starts``."""
    index: int = lab.page.evaluate(
        "s => window.jupyterapp.shell.currentWidget.content.widgets"
        ".findIndex(c => c.model.type === 'code' && c.model.sharedModel.source.startsWith(s))",
        starts,
    )
    assert index >= 0, f"no cell starting {starts!r}"
    return index


def _wait_for_text(locator: Any, pattern: str, timeout: float = 15.0) -> str:
    """Wait until ``locator``'s visible text matches ``pattern``; return that text."""
    deadline = time.monotonic() + timeout
    while True:
        text = str(locator.inner_text())
        if re.search(pattern, text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not found in {text!r} after {timeout} s")
        time.sleep(0.1)


def test_tutorial_dashboard_clicks_during_a_wait_and_reopens_as_static_html(lab: Lab) -> None:
    page = lab.page
    lab.open(TUTORIAL, timeout=90)
    lab.run_all()
    lab.wait_cells_done(timeout=150)
    lab.wait_idle()

    # The last cell shows the live dashboard (widgets render once the kernel is idle).
    last = page.locator(".jp-CodeCell").last
    dashboard = last.locator(".jp-OutputArea")
    dashboard.locator("table.nbflow-dashboard").wait_for(timeout=30000)
    assert dashboard.locator('tr[data-nbflow-click="row:slow-1"]').count() == 1

    # Run the waiting cell again: it makes slow-2 and blocks in slow.wait().
    waiting = _cell_index(lab, "slow = slow_flow.create")
    lab.run_cell(waiting)
    prompt = page.locator(".jp-Notebook .jp-Cell").nth(waiting).locator(".jp-InputPrompt")
    row = dashboard.locator('tr[data-nbflow-click="row:slow-2"]')
    row.wait_for(timeout=30000)
    row.click()  # a click on the row selects the instance: its steps and timeline show
    dashboard.locator("text=steps of").wait_for(timeout=10000)
    dashboard.locator("svg.nbflow-timeline rect").nth(1).wait_for(timeout=15000)
    assert "[*]" in prompt.inner_text()  # the wait is still running
    DOCS.mkdir(exist_ok=True)
    dashboard.screenshot(path=str(DOCS / "dashboard-running.png"))

    dashboard.locator("button", has_text=re.compile(r"^\s*pause\s*$")).click()
    _wait_for_text(row, r"paused|waitingForPause")  # the table changed
    assert "paused 'slow-2'" in dashboard.inner_text()
    assert "[*]" in prompt.inner_text()  # the click took effect while the cell waited
    _wait_for_text(row, r"\bpaused\b")  # once its running step was stored

    dashboard.locator("button", has_text=re.compile(r"^\s*resume\s*$")).click()
    _wait_for_text(row, r"queued|running|complete")
    assert "resumed 'slow-2'" in dashboard.inner_text()
    lab.wait_cells_done(timeout=60)
    lab.wait_idle(timeout=60)
    waited = page.locator(".jp-Notebook .jp-Cell").nth(waiting).locator(".jp-OutputArea")
    assert re.search(r"complete\s+output\s+'done'", waited.inner_text())  # the wait returned
    _wait_for_text(row, r"complete")

    # Stop the kernel: the dashboard leaves its static HTML in place of the widget; save.
    lab.command("kernelmenu:shutdown")
    dashboard.locator(".nbflow-dashboard-static").wait_for(timeout=30000)
    lab.save()
    saved = json.loads((lab.root / TUTORIAL).read_text())
    widget_outputs = [
        output
        for cell in saved["cells"]
        for output in cell.get("outputs", [])
        if "application/vnd.jupyter.widget-view+json" in output.get("data", {})
    ]
    assert widget_outputs == [], "a widget view was saved: it would show 'model not found'"

    # Reopen without a kernel, as a reader of the saved notebook would.
    lab.open_without_kernel(TUTORIAL)
    page.locator(".nbflow-dashboard-static").last.wait_for(timeout=30000)
    text = page.locator(".jp-Notebook").inner_text()
    assert "Error displaying widget" not in text and "model not found" not in text
    assert page.locator(".nbflow-dashboard-static").count() == 2  # both dashboard cells
    assert "slow-2" in page.locator(".nbflow-dashboard-static").last.inner_text()
    reopened = page.locator(".jp-CodeCell").last.locator(".jp-OutputArea")
    reopened.scroll_into_view_if_needed()
    reopened.screenshot(path=str(DOCS / "dashboard-reopened.png"))
