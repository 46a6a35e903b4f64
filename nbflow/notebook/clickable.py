"""``ClickableHTML``: HTML drawn by Python whose marked elements report clicks.

The dashboard's instance table, status counts, step table and timeline are HTML that
Python renders (the same renderer makes the static HTML a saved notebook keeps).  To
make rows and bars clickable, this is an ``anywidget.AnyWidget``: a dozen lines of
plain ES module (no build step, nothing to install but the ``anywidget`` wheel, which
carries its own JupyterLab/Notebook 7 extension and runs in VS Code, Colab and marimo
too).  The module shows ``value`` and, on a click inside an element carrying
``data-nbflow-click="KEY"``, sends ``{"click": KEY}`` to the kernel, where
``on_click`` callbacks get ``KEY``.  ``click(KEY)`` does the same from code, which is
how tests (and notebooks under nbval) drive it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anywidget
import traitlets

__all__ = ["CLICK_ATTR", "ClickableHTML"]

log = logging.getLogger("nbflow")

CLICK_ATTR = "data-nbflow-click"

_ESM = """
function render({ model, el }) {
  const draw = () => { el.innerHTML = model.get("value"); };
  draw();
  model.on("change:value", draw);
  el.addEventListener("click", (event) => {
    const target = event.target.closest("[CLICK_ATTR]");
    if (target && el.contains(target)) {
      model.send({ click: target.getAttribute("CLICK_ATTR") });
    }
  });
}
export default { render };
""".replace("CLICK_ATTR", CLICK_ATTR)


class ClickableHTML(anywidget.AnyWidget):  # type: ignore[misc, unused-ignore]  # anywidget's base is untyped
    """HTML whose ``data-nbflow-click`` elements call the ``on_click`` callbacks with their key."""

    _esm = _ESM
    value = traitlets.Unicode("").tag(sync=True)

    def __init__(self, value: str = "", **kwargs: Any) -> None:
        super().__init__(value=value, **kwargs)
        self._click_callbacks: list[Callable[[str], None]] = []
        self.on_msg(self._on_front_end_msg)

    def on_click(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(key)`` on every click of a marked element."""
        self._click_callbacks.append(callback)

    def click(self, key: str) -> None:
        """What a click on the element marked ``key`` does (for code and tests)."""
        for callback in list(self._click_callbacks):
            callback(key)

    def _on_front_end_msg(self, _widget: Any, content: Any, _buffers: Any) -> None:
        key = content.get("click") if isinstance(content, dict) else None
        if isinstance(key, str):
            try:
                self.click(key)
            except Exception:  # a message handler must not raise into the kernel
                log.exception("nbflow: click on %r failed", key)
