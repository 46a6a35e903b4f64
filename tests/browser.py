"""JupyterLab in headless Chromium, for the browser tests (tests/test_browser.py).

``Lab`` starts a JupyterLab server from this environment (``python -m jupyter lab``) in
a temporary root holding copies of the notebooks under test, with its own config,
settings and workspace directories (so the user's JupyterLab is neither read nor
changed), and drives it with Playwright for Python through Debian's ``chromium``
(``executable_path``; Playwright's own browser downloads are never used).  Kernels
started by the server get ``NBFLOW_REDIS_URL`` of the test suite's Redis.

Everything it starts is stopped by ``close()``: the browser, then the server (which
shuts its kernels down), killed by process group if it does not exit in time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

TOKEN = "nbflow-browser-test"
#: JupyterLab settings for a quiet, predictable UI: no news pop-up, no update checks.
SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    # Render every cell (JupyterLab 4 only renders the cells in view by default), so the
    # tests can read any output.
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def chromium_path() -> str | None:
    """Debian's chromium, if installed (``.ci/run`` installs it with apt)."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Lab:
    """One JupyterLab server and one headless Chromium page on it."""

    def __init__(self, root: Path, redis_url: str, env: dict[str, str] | None = None) -> None:
        from playwright.sync_api import sync_playwright

        self.root = root
        self.port = _free_port()
        home = root.parent
        settings = home / "lab-settings"
        for name, value in SETTINGS.items():
            path = settings / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        run_env = dict(os.environ)
        run_env.update(
            NBFLOW_REDIS_URL=redis_url,
            JUPYTER_CONFIG_DIR=str(home / "jupyter-config"),
            JUPYTERLAB_SETTINGS_DIR=str(settings),
            JUPYTERLAB_WORKSPACES_DIR=str(home / "lab-workspaces"),
            JUPYTER_RUNTIME_DIR=str(home / "jupyter-runtime"),
        )
        run_env.update(env or {})
        self.log_path = home / "lab.log"
        self._log = self.log_path.open("w")
        self.server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter",
                "lab",
                "--no-browser",
                "--allow-root",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.port}",
                f"--ServerApp.token={TOKEN}",
                f"--ServerApp.root_dir={root}",
                "--LabApp.expose_app_in_browser=True",
            ],
            env=run_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._playwright: Any = None
        self.browser: Any = None
        try:
            self._wait_for_server(60.0)
            self._playwright = sync_playwright().start()
            self.browser = self._playwright.chromium.launch(
                executable_path=chromium_path(), headless=True
            )
            self.page = self.browser.new_page(viewport={"width": 1280, "height": 1000})
        except BaseException:
            self.close()
            raise

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_for_server(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.server.poll() is not None:
                raise RuntimeError(f"jupyter lab exited: {self.log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.base}/api/status?token={TOKEN}", timeout=2)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"jupyter lab did not answer on {self.base}") from None
                time.sleep(0.2)

    # -- driving the page --------------------------------------------------------------

    def open(self, notebook: str, timeout: float = 60.0) -> None:
        """Open ``notebook`` (relative to the root) and wait until its kernel is idle."""
        self.page.goto(f"{self.base}/lab/tree/{notebook}?token={TOKEN}")
        self.page.wait_for_function(
            "window.jupyterapp && document.querySelector('.jp-Notebook')",
            timeout=timeout * 1000,
        )
        self.wait_idle(timeout)

    def open_without_kernel(self, notebook: str, timeout: float = 60.0) -> None:
        """Open ``notebook`` as a reader would who has no kernel: no kernel is started."""
        self.page.goto(f"{self.base}/lab/tree/{notebook}?token={TOKEN}")
        self.page.wait_for_function(
            "window.jupyterapp && document.querySelector('.jp-Notebook .jp-Cell')",
            timeout=timeout * 1000,
        )
        self.command("kernelmenu:shutdown")
        self.page.wait_for_function(
            "!window.jupyterapp.shell.currentWidget?.sessionContext?.session",
            timeout=timeout * 1000,
        )

    def command(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """Run a JupyterLab command (what a menu item or a shortcut runs)."""
        return self.page.evaluate(
            "([name, args]) => window.jupyterapp.commands.execute(name, args)",
            [name, args or {}],
        )

    def kernel_status(self) -> str | None:
        status: str | None = self.page.evaluate(
            "window.jupyterapp.shell.currentWidget?.sessionContext?.session?.kernel?.status ?? null"
        )
        return status

    def wait_idle(self, timeout: float = 60.0) -> None:
        self.page.wait_for_function(
            "window.jupyterapp.shell.currentWidget?.sessionContext?.session?.kernel?.status"
            " === 'idle'",
            timeout=timeout * 1000,
        )

    def run_all(self) -> None:
        """Clear every output, then run all cells (Run → Run All Cells); returns at once."""
        self.command("notebook:clear-all-cell-outputs")
        self.page.wait_for_function(
            "[...window.jupyterapp.shell.currentWidget.node"
            ".querySelectorAll('.jp-CodeCell .jp-InputPrompt')]"
            ".every(e => !/\\d/.test(e.textContent))"
        )
        self.command("notebook:run-all-cells")

    def run_cell(self, index: int) -> None:
        """Run code cell number ``index`` (0-based, among all cells); returns at once."""
        # Not ``command()``: its promise settles only when the cell has finished running.
        self.page.evaluate(
            "i => { window.jupyterapp.shell.currentWidget.content.activeCellIndex = i;"
            " window.jupyterapp.commands.execute('notebook:run-cell'); }",
            index,
        )

    def wait_cells_done(self, timeout: float = 120.0) -> None:
        """Wait until every code cell has run (each prompt shows an execution count)."""
        self.page.wait_for_function(
            "(() => { const p = [...window.jupyterapp.shell.currentWidget.node.querySelectorAll("
            "'.jp-CodeCell .jp-InputPrompt')];"
            " return p.length > 0 && p.every(e => /\\[\\d+\\]/.test(e.textContent)); })()",
            timeout=timeout * 1000,
        )

    def cell_outputs(self) -> list[str]:
        """The visible text of each code cell's outputs, in order."""
        texts: list[str] = self.page.evaluate(
            "[...window.jupyterapp.shell.currentWidget.node.querySelectorAll('.jp-CodeCell')]"
            ".map(c => c.querySelector('.jp-OutputArea')?.innerText ?? '')"
        )
        return texts

    def save(self) -> None:
        self.command("docmanager:save")
        self.page.wait_for_function(
            "!window.jupyterapp.shell.currentWidget?.context?.model?.dirty", timeout=30000
        )

    def screenshot(self, path: Path, selector: str | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if selector is None:
            self.page.screenshot(path=str(path))
        else:
            self.page.locator(selector).first.screenshot(path=str(path))

    # -- stopping --------------------------------------------------------------------------

    def _delete_kernels(self) -> None:
        """Shut down every kernel the server runs (its REST API), before the server stops."""
        if self.server.poll() is not None:
            return
        try:
            with urllib.request.urlopen(f"{self.base}/api/kernels?token={TOKEN}", timeout=5) as r:
                kernels = json.load(r)
            for kernel in kernels:
                req = urllib.request.Request(
                    f"{self.base}/api/kernels/{kernel['id']}?token={TOKEN}", method="DELETE"
                )
                urllib.request.urlopen(req, timeout=15).close()
        except OSError:
            pass  # the server is going away anyway; its shutdown stops what is left

    def close(self) -> None:
        """Stop the browser and the server (and so its kernels); never leaves them running."""
        try:
            self._delete_kernels()
            if self.browser is not None:
                self.browser.close()
            if self._playwright is not None:
                self._playwright.stop()
        finally:
            self.browser = self._playwright = None
            if self.server.poll() is None:
                self.server.send_signal(signal.SIGINT)  # jupyter asks once, then shuts down
                time.sleep(0.2)
                self.server.send_signal(signal.SIGINT)
                try:
                    self.server.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(self.server.pid, signal.SIGKILL)
                    self.server.wait(timeout=5)
            # kernels are the server's children, in its session: none may outlive the test
            try:
                os.killpg(self.server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._log.close()
