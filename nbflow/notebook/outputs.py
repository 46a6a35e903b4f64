"""Outputs that change after their cell ran: shown under a display id, updated later.

Status cards and the dashboard's static form are plain HTML outputs that a background
thread replaces (``update_display``) when what they show changes.  A saved notebook
then holds their last HTML, which every front end renders (JupyterLab, VS Code,
GitHub, nbviewer), instead of a widget view that needs the kernel's widget models.

Each update is published with the *displaying cell's* parent header, not with
whatever cell runs at that moment:

* JupyterLab hands an IOPub message to the output area of the request it answers;
  that area knows the display id (it keeps listening after the cell finished);
* nbclient (which executes notebooks) and nbval record messages of the cell being
  run only, so a later update never rewrites or fails an earlier cell's stored output.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["Output", "show"]

log = logging.getLogger("nbflow")


def _shell() -> Any:
    from IPython.core.getipython import get_ipython

    return get_ipython()  # type: ignore[no-untyped-call, unused-ignore]


class Output:
    """One displayed output (its display id and the request that displayed it)."""

    def __init__(self, display_id: str, parent: dict[str, Any] | None) -> None:
        self.display_id = display_id
        self.parent = parent
        self.last: dict[str, Any] | None = None

    def update(self, bundle: dict[str, Any]) -> None:
        """Replace the output with ``bundle`` (a mimetype -> data dict), if it changed."""
        if bundle == self.last:
            return
        from IPython.display import update_display

        shell = _shell()
        pub: Any = getattr(shell, "display_pub", None)
        token = None
        if self.parent is not None and hasattr(pub, "set_thread_parent"):
            token = pub.set_thread_parent(self.parent)
        try:
            update_display(bundle, display_id=self.display_id, raw=True)  # type: ignore[no-untyped-call, unused-ignore]
            self.last = bundle
        finally:
            if token is not None:
                pub.reset_thread_parent(token)


def show(bundle: dict[str, Any]) -> Output | None:
    """Display ``bundle`` under a fresh display id; None outside IPython."""
    from IPython.display import display

    shell = _shell()
    if shell is None:
        return None
    handle = display(bundle, raw=True, display_id=True)  # type: ignore[no-untyped-call, unused-ignore]
    if handle is None:
        return None
    pub = getattr(shell, "display_pub", None)
    header = getattr(pub, "parent_header", None)
    output = Output(str(handle.display_id), dict(header) if header else None)
    output.last = bundle
    return output
