"""Code versions and fingerprints: what code an instance and each of its steps ran with,
and whether the currently registered class would run different code (``stale``).

Pure: no Redis, no engine.  Three things:

* ``class_version(cls)``: the version an instance records at creation, ``cls.version``
  when the class sets one, else a short hash of the class's source (of the code objects
  of its methods when the source cannot be read, e.g. a class ``exec``'d from a string).
* ``callback_fingerprint(fn)``: a short hash of a step callback's own code (bytecode,
  constants including nested functions and lambdas, names) and, transitively, of the code
  of the user's own functions and classes it reaches by global name or through its
  closure.  "The user's own" means defined in ``__main__``, a notebook cell, or any
  module whose file is not under ``sys.prefix``, the standard library or a
  site-packages directory; library code is not followed (nbflow itself neither).
  Redefining ``clean`` in a notebook cell therefore changes the fingerprint of every
  callback that calls ``clean``, while a new pandas does not.
* ``stale_steps(cls, entries, seen)``: for each stored step, whether the code the class
  ``cls`` would run for it now differs from the code recorded when it completed.

Speed.  A step's fingerprint is computed when it completes, so it must cost next to
nothing: the hash of a code object's own code (and the list of global names it uses)
is computed once per code object and cached; what is left per step is one dict lookup
per global name the callback uses (to see what that name is bound to *now*, which is
what makes a redefinition count) and, only when user functions are reached, a
cached combination of their fingerprints.  A lambda defined in a loop is one code
object, so it is hashed once however many steps it runs.

Identity for the stale check.  Besides ``f`` (the fingerprint) a completed step
records ``q``, a compact name of its callback by which the current class's code is
searched later (``callback_name``): the callback's qualified name with the workflow
class's own qualified name written ``~`` and ``.<locals>`` left out
(``MyFlow.run.<locals>.<lambda>`` -> ``~.run.<lambda>``), plus ``#k`` for the k-th
(from 0) code object of that name inside the class (two lambdas in one ``run``).
Callbacks that cannot be found again by name (partials, callable objects, builtins) get
no ``q``; their staleness is known only once a run has passed that step with the
current class (``seen``, written by the worker).  A fingerprint that includes user
functions found in the callback's closure starts with ``c``: such a step cannot be
rebuilt from the class's code alone (the closure's contents are only known to a run),
so it too is judged from ``seen`` only.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import site
import sys
import sysconfig
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

#: Hex digits kept of each hash: short entries (Redis memory), ample against collisions
#: between two versions of one step.
DIGITS = 12

#: How deep calls between user functions are followed.
MAX_DEPTH = 50

_OWN: dict[int, tuple[types.CodeType, str, tuple[str, ...]]] = {}
_COMBINED: dict[tuple[Any, ...], str] = {}
_USER_MODULES: dict[str | None, bool] = {}
_CLASS_VERSIONS: dict[int, tuple[type, str]] = {}
_CLASS_CODES: dict[int, tuple[type, dict[str, list[_Found]], dict[int, str]]] = {}
_SIMPLE: dict[int, tuple[types.CodeType, type | None, str, str | None]] = {}
_NAMES: dict[tuple[int, int], tuple[types.CodeType, type | None, str]] = {}
_LIBRARY_ROOTS: tuple[str, ...] | None = None

_Found = tuple[types.CodeType, Mapping[str, Any], "types.FunctionType | None"]


def _hash(*parts: bytes | str) -> str:
    h = hashlib.blake2b(digest_size=DIGITS // 2)
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\x00")
    return h.hexdigest()


# -- whose code is it ------------------------------------------------------------------


def _library_roots() -> tuple[str, ...]:
    global _LIBRARY_ROOTS
    if _LIBRARY_ROOTS is None:
        roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
        for name in ("stdlib", "platstdlib", "purelib", "platlib"):
            path = sysconfig.get_paths().get(name)
            if path:
                roots.add(path)
        try:
            roots.update(site.getsitepackages())
            roots.add(site.getusersitepackages())
        except Exception:  # some embedded interpreters lack these
            pass
        _LIBRARY_ROOTS = tuple(os.path.realpath(r) + os.sep for r in roots if r)
    return _LIBRARY_ROOTS


def is_user_module(name: str | None) -> bool:
    """Whether code of module ``name`` is the user's own (followed by fingerprints):
    ``__main__`` and notebook cells, modules without a file (``exec``'d into a module
    object), and modules whose file lies outside the interpreter's prefixes, the
    standard library and site-packages (``__main__`` always counts: a notebook, or the
    script being run).  nbflow itself is never followed."""
    known = _USER_MODULES.get(name)
    if known is not None:
        return known
    if name is None or name == "__main__":
        verdict = True  # a notebook, a script, or exec() without a module name
    elif name.partition(".")[0] == "nbflow" or name in sys.builtin_module_names:
        verdict = False
    else:
        module = sys.modules.get(name)
        if module is None:
            return True  # not imported (yet): dynamic code; not cached, it may come
        path = getattr(module, "__file__", None)
        origin = getattr(getattr(module, "__spec__", None), "origin", None)
        if origin in ("frozen", "built-in"):
            verdict = False
        elif not path:
            verdict = not hasattr(module, "__path__")
        else:
            real = os.path.realpath(path)
            verdict = not (
                real.startswith(_library_roots())
                or f"{os.sep}site-packages{os.sep}" in real
                or f"{os.sep}dist-packages{os.sep}" in real
            )
    _USER_MODULES[name] = verdict
    return verdict


# -- own code --------------------------------------------------------------------------


def _const_text(value: Any) -> str:
    """A constant as text that is the same in every process (frozensets unordered)."""
    if isinstance(value, frozenset):
        return "frozenset(" + ",".join(sorted(_const_text(v) for v in value)) + ")"
    if isinstance(value, tuple):
        return "(" + ",".join(_const_text(v) for v in value) + ")"
    return repr(value)


def _walk_code(code: types.CodeType, parts: list[bytes | str], names: dict[str, None]) -> None:
    parts.append(code.co_code)
    parts.append(f"{code.co_argcount},{code.co_kwonlyargcount}:{','.join(code.co_names)}")
    names.update(dict.fromkeys(code.co_names))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            parts.append("<code>")
            _walk_code(const, parts, names)
        else:
            parts.append(_const_text(const))


def _own(code: types.CodeType) -> tuple[types.CodeType, str, tuple[str, ...]]:
    """(code, hash of its own code with nested code objects, the names it uses), once
    per code object (the code is kept so its id is never reused meanwhile)."""
    got = _OWN.get(id(code))
    if got is not None and got[0] is code:
        return got
    parts: list[bytes | str] = []
    names: dict[str, None] = {}
    _walk_code(code, parts, names)
    got = (code, _hash(*parts), tuple(names))
    _OWN[id(code)] = got
    return got


def code_hash(code: types.CodeType) -> str:
    """The hash of a code object's own code (bytecode, constants, nested code, names)."""
    return _own(code)[1]


# -- following what a function reaches ---------------------------------------------------


def _combine(own: str, deps: list[tuple[str, str]]) -> str:
    key = (own, *deps)
    got = _COMBINED.get(key)
    if got is None:
        got = _COMBINED[key] = _hash(own, *(f"{n}={d}" for n, d in deps))
    return got


def _dep(value: Any, stack: set[int]) -> str | None:
    """The fingerprint of a user function or class a callback reaches, else None."""
    if isinstance(value, types.FunctionType):
        if not is_user_module(value.__module__):
            return None
        if id(value.__code__) in stack:  # a cycle: its own code is already counted
            return "cycle:" + _own(value.__code__)[1]
        return _fp_code(value.__code__, value.__globals__, value.__closure__, stack)
    if isinstance(value, type):
        if not is_user_module(value.__module__):
            return None
        try:
            return "class:" + class_version(value)
        except Exception:
            return "class:" + value.__qualname__
    return None


def _fp_code(
    code: types.CodeType,
    globals_: Mapping[str, Any],
    closure: tuple[Any, ...] | None,
    stack: set[int],
    top: bool = False,
) -> str:
    """The fingerprint of code run with ``globals_`` (and ``closure``): its own hash,
    combined with those of the user functions and classes it reaches now."""
    _, own, names = _own(code)
    deps: list[tuple[str, str]] | None = None
    if names and len(stack) < MAX_DEPTH:
        stack.add(id(code))
        try:
            for name in names:
                value = globals_.get(name)
                if value is None:
                    continue
                if isinstance(value, types.ModuleType):
                    found = _module_deps(name, value, names, stack)
                    if found:
                        deps = (deps or []) + found
                    continue
                fp = _dep(value, stack)
                if fp is not None:
                    (deps := deps or []).append((name, fp))
        finally:
            stack.discard(id(code))
    in_cells = False
    if closure:
        for n, cell in enumerate(closure):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell (a name not bound yet)
                continue
            if isinstance(content, types.FunctionType):
                fp = _dep(content, stack)
                if fp is not None:
                    (deps := deps or []).append((f"<cell {n}>", fp))
                    in_cells = True
    if deps is None:
        return own
    combined = _combine(own, deps)
    return "c" + combined[1:] if top and in_cells else combined


def _module_deps(
    alias: str, module: types.ModuleType, names: Iterable[str], stack: set[int]
) -> list[tuple[str, str]]:
    """``helpers.clean(...)`` with ``import helpers`` (a user module): the user functions
    of that module among the names the code uses."""
    if not is_user_module(module.__name__):
        return []
    space = vars(module)
    out = []
    for name in names:
        fp = _dep(space.get(name), stack)
        if fp is not None:
            out.append((f"{alias}.{name}", fp))
    return out


def _target(fn: Any) -> types.FunctionType | None:
    """The plain function behind a callback that can be found again by name."""
    if isinstance(fn, types.FunctionType):
        return fn
    if isinstance(fn, types.MethodType) and isinstance(fn.__func__, types.FunctionType):
        return fn.__func__
    return None


def _fingerprint(fn: Any, depth: int = 0) -> str:
    target = _target(fn)
    if target is not None:
        return _fp_code(target.__code__, target.__globals__, target.__closure__, set(), top=True)
    if depth > 8:
        return _hash("deep", type(fn).__qualname__)
    if isinstance(fn, types.MethodType):  # a bound method of a builtin or a callable
        return _hash("method", _fingerprint(fn.__func__, depth + 1))
    if isinstance(fn, functools.partial):
        # the function and any user functions among its bound arguments
        parts = [_fingerprint(fn.func, depth + 1)]
        for arg in (*fn.args, *fn.keywords.values()):
            if callable(arg) and _target(arg) is not None:
                parts.append(_fingerprint(arg, depth + 1))
        return _hash("partial", *parts)
    if isinstance(fn, (staticmethod, classmethod)):
        return _fingerprint(fn.__func__, depth + 1)
    if isinstance(fn, type):
        if is_user_module(fn.__module__):
            return _hash("class", class_version(fn))
        return _hash("builtin", f"{fn.__module__}.{fn.__qualname__}")
    if isinstance(
        fn,
        (
            types.BuiltinFunctionType,
            types.BuiltinMethodType,
            types.MethodWrapperType,
            types.WrapperDescriptorType,
            types.MethodDescriptorType,
            types.ClassMethodDescriptorType,
        ),
    ):
        owner = getattr(fn, "__module__", None) or type(getattr(fn, "__self__", None)).__name__
        return _hash("builtin", f"{owner}.{getattr(fn, '__qualname__', repr(type(fn)))}")
    call = next((vars(k)["__call__"] for k in type(fn).__mro__ if "__call__" in vars(k)), None)
    if isinstance(call, types.FunctionType):  # a callable object: its class's __call__
        return _hash("object", _fingerprint(call, depth + 1))
    return _hash("callable", f"{type(fn).__module__}.{type(fn).__qualname__}")


def callback_fingerprint(fn: Callable[..., Any]) -> str:
    """A short hash of what calling ``fn`` runs: its own code and, transitively, the user
    functions and classes it reaches by global name or closure (see the module docstring).

    Works for any callable: plain and nested functions, lambdas (also those defined in
    loops), bound methods, ``functools.partial`` (its function and any user functions
    bound as arguments), callable objects (their class's ``__call__``), and builtins (by
    qualified name).  Never raises: a callable it cannot look into is fingerprinted by
    its type's qualified name.
    """
    try:
        return _fingerprint(fn)
    except Exception:
        return _hash("opaque", f"{type(fn).__module__}.{type(fn).__qualname__}")


# -- class versions ---------------------------------------------------------------------


def _user_classes(cls: type) -> list[type]:
    return [k for k in cls.__mro__ if k is not object and is_user_module(k.__module__)]


def _functions_of(klass: type) -> Iterable[tuple[str, types.FunctionType]]:
    """The functions a class defines itself, by sorted name (methods, static and class
    methods, property accessors)."""
    space = vars(klass)
    for name in sorted(space):
        value = space[name]
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            for part, acc in (("get", value.fget), ("set", value.fset), ("del", value.fdel)):
                if isinstance(acc, types.FunctionType):
                    yield f"{name}.{part}", acc
            continue
        if isinstance(value, types.FunctionType):
            yield name, value


def _code_version(cls: type) -> str:
    parts: list[str] = []
    for klass in _user_classes(cls) or [cls]:
        parts.append(klass.__qualname__)
        parts.extend(f"{name}={code_hash(fn.__code__)}" for name, fn in _functions_of(klass))
    return _hash("code", *parts)


def class_version(cls: type) -> str:
    """The version an instance of workflow ``cls`` records: ``cls.version`` when the class
    sets one (a str; an int is taken as its decimal text), else a hash of the class's
    source, or of the code of its methods when the source is unavailable.  Computed
    once per class object.  ``TypeError`` for a ``version`` of another type."""
    explicit = getattr(cls, "version", None)
    if explicit is not None:
        if isinstance(explicit, bool) or not isinstance(explicit, (str, int)):
            raise TypeError(
                f"{cls.__qualname__}.version must be a str (or an int), "
                f"not {type(explicit).__name__}"
            )
        text = str(explicit)
        if not text or len(text) > 200 or any(c.isspace() for c in text):
            raise ValueError(
                f"{cls.__qualname__}.version must be non-empty text without whitespace, "
                f"at most 200 characters, not {explicit!r}"
            )
        return text
    got = _CLASS_VERSIONS.get(id(cls))
    if got is not None and got[0] is cls:
        return got[1]
    try:
        version = _hash("source", inspect.getsource(cls))
    except Exception:  # no source (exec, some notebooks), or a file changed meanwhile
        version = _code_version(cls)
    _CLASS_VERSIONS[id(cls)] = (cls, version)
    return version


# -- finding a step's callback again ----------------------------------------------------


def _compact(qualname: str, cls_qualname: str) -> str:
    if qualname == cls_qualname or qualname.startswith(cls_qualname + "."):
        qualname = "~" + qualname[len(cls_qualname) :]
    return qualname.replace(".<locals>", "")


def _class_codes(cls: type) -> tuple[dict[str, list[_Found]], dict[int, str]]:
    """Every code object reachable from the class's own methods (nested functions and
    lambdas included), by compact name in a stable order, and each one's name (with
    ``#k`` for the k-th of a name).  Once per class object."""
    got = _CLASS_CODES.get(id(cls))
    if got is not None and got[0] is cls:
        return got[1], got[2]
    by_name: dict[str, list[_Found]] = {}
    names: dict[int, str] = {}

    def walk(
        code: types.CodeType, globals_: Mapping[str, Any], fn: types.FunctionType | None
    ) -> None:
        name = _compact(code.co_qualname, cls.__qualname__)
        found = by_name.setdefault(name, [])
        names[id(code)] = name if not found else f"{name}#{len(found)}"
        found.append((code, globals_, fn))
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                walk(const, globals_, None)

    for klass in _user_classes(cls):
        for _, fn in _functions_of(klass):
            walk(fn.__code__, fn.__globals__, fn)
    _CLASS_CODES[id(cls)] = (cls, by_name, names)
    return by_name, names


def callback_name(cls: type | None, fn: Any) -> str | None:
    """The compact name under which ``fn``'s code is found again in ``cls`` (or in the
    globals of its module), or None when it cannot be (see the module docstring)."""
    target = _target(fn)
    if target is None:
        return None
    code = target.__code__
    key = (id(cls), id(code))
    got = _NAMES.get(key)
    if got is not None and got[0] is code and got[1] is cls:
        return got[2]
    name: str | None = None
    if cls is not None:
        try:
            name = _class_codes(cls)[1].get(id(code))
        except Exception:
            name = None
    if name is None:
        name = _compact(target.__qualname__, cls.__qualname__ if cls is not None else "\0")
    _NAMES[key] = (code, cls, name)
    return name


def step_identity(cls: type | None, fn: Any) -> tuple[str, str | None]:
    """``(fingerprint, name)`` of a completed step's callback: what its entry records as
    ``f`` and ``q``.

    On every completed step's path: a plain function that uses no global name and whose
    closure holds no function (``lambda i=i: i``, ``lambda: a + 1``) depends on its code
    alone, so its answer is cached per code object and class; anything else looks at
    what its global names and cells are bound to now (cheap: the code's own hash is
    cached).
    """
    simple = type(fn) is _FUNCTION and _no_function_cells(fn.__closure__)
    if simple:
        code = fn.__code__
        hit = _SIMPLE.get(id(code))
        if hit is not None and hit[0] is code and hit[1] is cls:
            return hit[2], hit[3]
    try:
        name = callback_name(cls, fn)
    except Exception:
        name = None
    fp = callback_fingerprint(fn)
    if simple and not _own(fn.__code__)[2]:
        _SIMPLE[id(fn.__code__)] = (fn.__code__, cls, fp, name)
    return fp, name


_FUNCTION = types.FunctionType


def _no_function_cells(closure: tuple[Any, ...] | None) -> bool:
    """Whether a closure holds no function (the only cell contents a fingerprint follows)."""
    if closure is None:
        return True
    for cell in closure:
        try:
            if isinstance(cell.cell_contents, _FUNCTION):
                return False
        except ValueError:  # an empty cell: bound later, perhaps to a function
            return False
    return True


def _module_globals(cls: type) -> Mapping[str, Any]:
    run = getattr(cls, "run", None)
    space = getattr(run, "__globals__", None)
    if isinstance(space, dict):
        return space
    module = sys.modules.get(cls.__module__)
    return vars(module) if module is not None else {}


def current_fingerprint(cls: type, name: str) -> tuple[str, bool] | None:
    """What the callback recorded as ``name`` would fingerprint as now, with ``cls``
    and the current globals: ``(fingerprint, exact)``, ``exact`` False when only its
    code was found (its closure is unknown); None when it cannot be found."""
    base, _, nth = name.partition("#")
    ordinal = int(nth) if nth.isdigit() else 0
    found = _class_codes(cls)[0].get(base)
    if found is not None and ordinal < len(found):
        code, globals_, fn = found[ordinal]
        if fn is not None:
            return _fp_code(code, globals_, fn.__closure__, set(), top=True), True
        return _fp_code(code, globals_, None, set(), top=True), False
    if ordinal or base.startswith("~"):
        return None
    value: Any = _module_globals(cls).get(base.split(".")[0])
    for part in base.split(".")[1:]:
        value = getattr(value, part, None)
    target = _target(value)
    if target is None:
        return None
    return _fp_code(target.__code__, target.__globals__, target.__closure__, set(), True), True


def stale_steps(
    cls: type | None,
    entries: Iterable[tuple[str, Mapping[str, Any]]],
    seen: Mapping[str, str] | None = None,
) -> list[bool]:
    """For each ``(key, entry)``: whether the step is stale, i.e. completed with a
    callback fingerprint that differs from what ``cls`` would run for it now.

    Known from the class's code and the current globals when the callback can be found
    again by name (``current_fingerprint``), else from ``seen`` (step key -> the
    fingerprint a run with the current class computed when it passed the step);
    unknown counts as not stale.
    """
    memo: dict[str, tuple[str, bool] | None] = {}
    out = []
    for key, e in entries:
        recorded = e.get("f")
        if not recorded or e.get("s") != "complete" or e.get("k", "do") != "do":
            out.append(False)
            continue
        now: str | None = None
        name = e.get("q")
        if cls is not None and isinstance(name, str):
            if name not in memo:
                try:
                    memo[name] = current_fingerprint(cls, name)
                except Exception:
                    memo[name] = None
            got = memo[name]
            if got is not None and (got[1] or not str(recorded).startswith("c")):
                now = got[0]
        if now is None and seen:
            now = seen.get(key)
        out.append(now is not None and now != recorded)
    return out


__all__ = [
    "callback_fingerprint",
    "callback_name",
    "class_version",
    "code_hash",
    "current_fingerprint",
    "is_user_module",
    "stale_steps",
    "step_identity",
]
