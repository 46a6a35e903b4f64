"""How engine objects show themselves in a notebook, without the engine knowing the
notebook layer.

``WorkflowInstance`` and ``InstanceStatus`` have ``_repr_html_`` /
``_repr_mimebundle_`` (IPython asks objects for those), but what they return is drawn
by ``nbflow.notebook.display``, which registers its renderers here when it is
imported (``import nbflow`` imports it).  Without a renderer an object falls back to
its plain ``repr``.  Renderers: ``instance_html(inst)``, ``instance_mimebundle(inst,
include, exclude)``, ``status_html(status_dict)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_renderers: dict[str, Callable[..., Any]] = {}


def register(name: str, renderer: Callable[..., Any]) -> None:
    """Makes ``renderer`` draw the display called ``name`` (a later one replaces it)."""
    _renderers[name] = renderer


def render(name: str, *args: Any, **kwargs: Any) -> Any:
    """What the renderer ``name`` draws for ``args``, or None when none is registered
    (IPython then uses the next representation it knows)."""
    renderer = _renderers.get(name)
    return None if renderer is None else renderer(*args, **kwargs)
