"""The grading machinery behind :mod:`mesa_lib.classroom.checks`.

A checker runs a student's function on a few *cases* (one point each), and returns a
:class:`Score`: a ``float`` (the points earned, which is what nbgrader reads from the last
line of an autograded cell as partial credit) that also carries the maximum and the
feedback. Before the cases run, it rejects, with zero points and a message:

* the library's reference implementation handed in as the answer (``my_stamp = stamp``):
  the function object, its code object, a copy of its code (a new function from its code
  object, or an ``exec`` of its source: the same instructions, global names and constants),
  or a function that *calls* the reference. The last
  is found by a trip wire: while the student's function runs, the ``__code__`` of every
  forbidden reference is swapped for one that raises :class:`ReferenceUsed` (a
  ``BaseException``, so a student's ``except Exception`` does not swallow it), however the
  student imported it;
* Python loops where the item forbids them: the source of the function (and of the helper
  functions it calls that were defined in the same notebook) is parsed, and any ``for``,
  ``while``, comprehension, or call of ``map``, ``filter``, ``reduce``, ``exec`` or ``eval``
  is reported with its line (a loop by recursion or in an imported helper is not detected);
* host synchronisations (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``) where the item
  asks for code that would run on a GPU without stalling.

Nothing a checker does writes to stderr (nbgrader gives zero points to a cell with stderr
output): warnings raised by the student's code are caught and named in the feedback.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import textwrap
import types
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = ["Score", "Wrong", "ReferenceUsed", "grade", "call", "tensor", "scalar", "loops_in", "syncs_in"]


class Score(float):
    """Points earned (the float value) with ``max_points``, the item's ``name`` and ``feedback``.

    Its ``repr`` is the bare number (``2.0``), which nbgrader parses as partial credit.
    """

    max_points: float
    name: str
    feedback: str

    def __new__(cls, points: float, max_points: float, name: str = "", feedback: str = "") -> "Score":
        obj = super().__new__(cls, points)
        obj.max_points, obj.name, obj.feedback = float(max_points), name, feedback
        return obj

    def __repr__(self) -> str:
        return repr(float(self))

    @property
    def full(self) -> bool:
        return float(self) == self.max_points


class Wrong(Exception):
    """A student's answer failed one case; the message says why."""


class ReferenceUsed(BaseException):
    """Raised by a trip-wired reference implementation when a student's function calls it."""


#: every score of this Python session, by item name (the last one wins): see :func:`summary`
SCORES: dict[str, Score] = {}

_FORBIDDEN: list[Callable] = []  # references trip-wired while the student's function runs


def _trip_code(qualname: str, freevars: tuple[str, ...] = ()) -> types.CodeType:
    """A code object that raises :class:`ReferenceUsed`, with the same number of free variables
    as the code it replaces (Python requires that when ``__code__`` is assigned)."""
    names = [f"_free{i}" for i in range(len(freevars))]
    body = ("    import mesa_lib.classroom.grading as _grading\n"
            f"    raise _grading.ReferenceUsed({qualname!r})\n")
    if names:
        body += "    " + ", ".join(names) + "\n"  # unreachable: only makes them free variables
        src = ("def _outer():\n    " + " = ".join(names) + " = None\n"
               "    def _trip(*args, **kwargs):\n" + textwrap.indent(body, "    ") + "    return _trip\n")
    else:
        src = "def _trip(*args, **kwargs):\n" + body
    ns: dict[str, Any] = {}
    exec(compile(src, "<mesa_lib.classroom trip wire>", "exec"), ns)  # noqa: S102 - our own source
    return (ns["_outer"]() if names else ns["_trip"]).__code__


def _qualname(f: Callable) -> str:
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"


@contextmanager
def _trip_wires(forbidden: Sequence[Callable]):
    saved = []
    try:
        for ref in forbidden:
            f = ref
            if hasattr(ref, "cache_clear"):  # functools.lru_cache
                ref.cache_clear()  # a warm cache would answer without calling the wrapped code
            while hasattr(f, "__wrapped__"):  # decorators (lru_cache, torch.no_grad, functools.wraps)
                f = f.__wrapped__
            saved.append((f, f.__code__))
            f.__code__ = _trip_code(_qualname(ref), f.__code__.co_freevars)
        yield
    finally:
        for f, code in saved:
            f.__code__ = code


def call(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call the student's function with the references trip-wired; turn its exceptions into a
    readable :class:`Wrong`."""
    err_text = io.StringIO()
    with _trip_wires(_FORBIDDEN):
        try:
            # nbgrader gives zero points to a cell that writes to stderr: keep the student's
            # warnings and stderr prints out of the cell, and report them in the feedback
            with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(err_text):
                warnings.simplefilter("always")
                out = fn(*args, **kwargs)
        except NotImplementedError:
            raise Wrong("the function is not implemented yet (it raised NotImplementedError); "
                        "replace `raise NotImplementedError()` with your code") from None
        except ReferenceUsed:
            raise
        except Exception as err:  # noqa: BLE001 - any student error is reported, not raised
            raise Wrong(f"your function raised {type(err).__name__}: {err}") from None
    if caught:
        _WARNINGS.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    if err_text.getvalue().strip():
        _WARNINGS.append("stderr: " + err_text.getvalue().strip().splitlines()[-1][:120])
    return out


_WARNINGS: list[str] = []


def tensor(out: Any, what: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise Wrong(f"{what} must be a torch.Tensor, got {type(out).__name__}")
    return out


def scalar(out: Any, what: str) -> torch.Tensor:
    out = tensor(out, what)
    if out.dim() != 0:
        raise Wrong(f"{what} must be a scalar (0-dim tensor), got shape {tuple(out.shape)}; "
                    "did you forget to average over the batch?")
    return out


# --------------------------------------------------------------------------- source checks
_LOOPS = {ast.For: "a `for` loop", ast.AsyncFor: "a `for` loop", ast.While: "a `while` loop",
          ast.ListComp: "a list comprehension", ast.SetComp: "a set comprehension",
          ast.DictComp: "a dict comprehension", ast.GeneratorExp: "a generator expression"}
_SYNCS = ("item", "tolist", "cpu", "numpy")


def _source_tree(fn: Callable) -> ast.AST | None:
    try:
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    try:
        return ast.parse(src)
    except SyntaxError:
        # a lambda inside a longer statement: parse from the lambda keyword on
        i = src.find("lambda")
        while i >= 0:
            for j in range(len(src), i, -1):
                try:
                    return ast.parse(src[i:j].strip().rstrip(",)"), mode="eval")
                except SyntaxError:
                    continue
            i = src.find("lambda", i + 1)
        return None


def _own_helpers(fn: Callable) -> list[Callable]:
    """Functions the student's function calls by a global name, defined in the same module."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return []
    names: set[str] = set()
    stack = [code]
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    out = []
    for n in sorted(names):
        obj = fn.__globals__.get(n)
        if isinstance(obj, types.FunctionType) and obj.__module__ == fn.__module__ and obj is not fn:
            out.append(obj)
    return out


def _walk_functions(fn: Callable) -> Iterable[tuple[Callable, ast.AST | None]]:
    seen, todo = set(), [fn]
    while todo:
        f = todo.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        yield f, _source_tree(f)
        todo.extend(_own_helpers(f))


_LOOP_CALLS = {"map": "a `map(...)` (a loop in disguise)", "filter": "a `filter(...)` (a loop in disguise)",
               "reduce": "a `reduce(...)` (a loop in disguise)", "starmap": "a `starmap(...)` (a loop in disguise)",
               "exec": "an `exec(...)` (code the rule cannot read)", "eval": "an `eval(...)` (code the rule cannot read)"}


def loops_in(fn: Callable) -> list[str]:
    """Python loops in ``fn`` and its same-module helpers, as readable strings ('line 4: a `for` loop')."""
    found = []
    for f, tree in _walk_functions(fn):
        if tree is None:
            continue
        where = "" if f is fn else f" (in your helper `{f.__name__}`)"
        for node in ast.walk(tree):
            for kind, words in _LOOPS.items():
                if isinstance(node, kind):
                    found.append(f"line {node.lineno}{where}: {words}")
            if isinstance(node, ast.Call):
                called = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                if called in _LOOP_CALLS:
                    found.append(f"line {node.lineno}{where}: {_LOOP_CALLS[called]}")
    return found


def syncs_in(fn: Callable) -> list[str]:
    """Calls that copy a tensor to the host (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``)."""
    found = []
    for f, tree in _walk_functions(fn):
        if tree is None:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _SYNCS:
                found.append(f"line {node.lineno}: .{node.func.attr}()")
    return found


# --------------------------------------------------------------------------- grading
def _code_key(code: types.CodeType) -> tuple:
    """What a copy of a function's code keeps whatever it is called: the number of instructions
    and, in order, the global names, attributes and constants it uses (nested functions by their
    own key; local names may be renamed; the docstring and line numbers may differ)."""
    import dis

    used: list = []
    n = 0
    for ins in dis.get_instructions(code):
        n += 1
        if ins.opname in ("LOAD_GLOBAL", "LOAD_ATTR", "LOAD_METHOD", "STORE_ATTR", "IMPORT_NAME", "IMPORT_FROM"):
            used.append(str(ins.argval))
        elif ins.opname == "LOAD_CONST":
            k = ins.argval
            used.append(_code_key(k) if isinstance(k, types.CodeType) else repr(k))
    return code.co_argcount, n, tuple(used)


def _is_reference(fn: Callable, forbidden: Sequence[Callable]) -> Callable | None:
    """The forbidden function ``fn`` is (the object, a wrapper, or a copy of its code: a new
    function from its ``__code__``, or an ``exec`` of its source), or None."""
    code = getattr(fn, "__code__", None)
    key = _code_key(code) if isinstance(code, types.CodeType) else None
    target = getattr(fn, "__func__", fn)  # bound methods
    for ref in forbidden:
        inner = ref
        while hasattr(inner, "__wrapped__"):
            inner = inner.__wrapped__
        if target is ref or target is inner or (code is not None and code is inner.__code__) \
                or getattr(fn, "__wrapped__", None) in (ref, inner):
            return ref
    for ref in forbidden:
        inner = ref
        while hasattr(inner, "__wrapped__"):
            inner = inner.__wrapped__
        ref_code = getattr(inner, "__code__", None)
        if str(getattr(inner, "__module__", "")).startswith("mesa_lib.classroom"):
            continue  # the checker's own expected values: the formula a student may well write alike
        if key is not None and isinstance(ref_code, types.CodeType) and _code_key(ref_code) == key:
            return ref
    return None


def grade(
    name: str,
    fn: Any,
    cases: Sequence[Callable[[Callable], None]],
    *,
    forbidden: Sequence[Callable] = (),
    no_loops: bool = False,
    no_syncs: bool = False,
    quiet: bool = False,
) -> Score:
    """Run ``cases`` (one point each) on ``fn``; print and return the :class:`Score`."""
    total = len(cases)
    lines: list[str] = []
    points = 0.0

    def done(pts: float, msgs: list[str]) -> Score:
        head = f"{name}: {pts:g} / {total:g} point{'s' if total != 1 else ''}"
        text = "\n".join([head, *("  " + m for m in msgs)])
        if not quiet:
            print(text)
        score = Score(pts, total, name, text)
        SCORES[name] = score
        return score

    if not callable(fn):
        return done(0, [f"not a function: got {type(fn).__name__}; define it with `def`"])
    ref = _is_reference(fn, forbidden)
    if ref is not None:
        return done(0, [f"zero points: this is the library's reference implementation ({_qualname(ref)}), "
                        "not your own code; write the function yourself"])
    if no_loops:
        loops = loops_in(fn)
        if loops:
            return done(0, ["zero points: this item must be written without Python loops (batched tensor "
                            "operations only), but your code has " + "; ".join(loops)])
    if no_syncs:
        syncs = syncs_in(fn)
        if syncs:
            return done(0, ["zero points: this item must not copy tensors to the host (it would stall a GPU "
                            "on every call), but your code calls " + "; ".join(syncs)])
    _FORBIDDEN[:] = list(forbidden)
    _WARNINGS.clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, case in enumerate(cases, 1):
                try:
                    case(fn)
                except Wrong as err:
                    lines.append(f"case {i}: not yet: {err}")
                else:
                    points += 1
                    lines.append(f"case {i}: correct")
    except ReferenceUsed as err:
        return done(0, [f"zero points: your function calls the library's reference implementation ({err}); "
                        "write the computation yourself"])
    finally:
        _FORBIDDEN.clear()
    if _WARNINGS:
        lines.append("your code raised warnings or wrote to stderr (not graded, but check them): "
                     + "; ".join(sorted(set(_WARNINGS))[:3]))
    if points == total:
        lines.append("Correct!")
    return done(points, lines)


def summary() -> str:
    """A table of the scores checked so far in this session (printed and returned)."""
    rows = [f"{'item':<34} {'points':>8}", "-" * 43]
    got = mx = 0.0
    for name, s in SCORES.items():
        rows.append(f"{name:<34} {float(s):>4g} / {s.max_points:g}")
        got, mx = got + float(s), mx + s.max_points
    rows += ["-" * 43, f"{'total':<34} {got:>4g} / {mx:g}"]
    text = "\n".join(rows)
    print(text)
    return text
