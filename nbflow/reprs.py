"""How engine objects show themselves in a notebook, without the engine knowing the
notebook layer.

``WorkflowInstance`` and ``InstanceStatus`` have ``_repr_html_`` /
``_repr_mimebundle_`` (IPython asks objects for those), but what they return is drawn
by ``nbflow.notebook.display``, which registers its renderers here when it is
imported (``import nbflow`` imports it).  Without a renderer an object falls back to
its plain ``repr``.  Renderers: ``instance_html(inst)``, ``instance_mimebundle(inst,
include, exclude)``, ``instance_display(inst)`` (``_ipython_display_``: shows the card
under a display id so it can follow its instance), ``status_html(status_dict)``.

One more hook lives here for the same reason: ``while_waiting`` is a context manager
factory that ``WorkflowInstance.wait()`` enters around its wait; it yields a function
the wait calls every ~0.1 s.  The notebook layer registers one that lets the kernel
handle widget messages meanwhile, so a dashboard click works while a cell waits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
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


@contextmanager
def _nothing_to_do() -> Iterator[Callable[[], None]]:
    yield lambda: None


def waiting() -> AbstractContextManager[Callable[[], None]]:
    """The ``while_waiting`` hook's context (a no-op one when none is registered)."""
    factory = _renderers.get("while_waiting")
    return _nothing_to_do() if factory is None else factory()  # type: ignore[no-any-return, unused-ignore]
