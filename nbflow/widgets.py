"""``nbflow.widgets.Dashboard``: the live dashboard, under the name the spec gives it.

The implementation lives in ``nbflow.notebook.widgets``; this module only
re-exports it so ``from nbflow.widgets import Dashboard`` works.
"""

from __future__ import annotations

from nbflow.notebook.widgets import Dashboard

__all__ = ["Dashboard"]
