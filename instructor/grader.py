"""The isolated grader of the assignment (chapter 10): each graded item of a submission runs in a
fresh Python process that the submission cannot reach from its notebook.

For every item, a new process (``python -I``: no ``PYTHONPATH``, no user site, no current
folder on ``sys.path``)

1. imports the checker from a fresh read-only copy of ``mesa_lib`` and ``instructor`` that the
   grader wrote from the bytes it read when it started (so an earlier submission that edited the
   installed package changes nothing; compiled files go to a private, fresh cache folder);
2. takes hold of the item's checker (its graded cases and rules) BEFORE any student code runs;
3. runs the instructor's setup cells and the submission's solution cells up to the item's own
   (one time limit per cell), then the item's graded cases (one time limit for the check);
4. reports the points to the grading process, which computes the score; a report is refused
   when the submission changed the checker, torch or the builtins while it ran.

A cell or a check that runs past its limit (even one that swallows ``KeyboardInterrupt`` in a
bare ``except:``) costs its item only: the grader kills the process group and says so. A
submission's names (``check_*`` rebound, ``mesa_lib.classroom.checks.grade`` patched in the
notebook) do not exist in the grading process. Nothing is unpickled: the solution travels as
source text, the report as one JSON line.

Use (out of the notebook kernel, for the grades that count)::

    python -m instructor.grader submitted/*/mesa/10_exercises.ipynb --json scores.json

and in an nbgrader hidden test cell (in the instructor's source notebook)::

    ### BEGIN HIDDEN TESTS
    import instructor.grader; instructor.grader.item("ex-stamp-check")
    ### END HIDDEN TESTS

``item`` grades the notebook being autograded (the copy in the current folder, whose locked cells
nbgrader has restored) and evaluates to the points, which nbgrader reads as partial credit; it
raises (the cell fails, 0 points) when it cannot grade. What it cannot stop is code written to
attack the grader itself inside the grading process (e.g. digging the report channel out of the
interpreter's memory): see the instructor guide, "Grading for marks".
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "book" / "10_exercises.ipynb"
PACKAGES = ("mesa_lib", "instructor")

#: seconds: starting Python and importing torch (not the student's time), one solution cell, one check
START_LIMIT, CELL_LIMIT, CHECK_LIMIT = 180.0, 10.0, 30.0

__all__ = ["ItemResult", "Grader", "grade_notebook", "item", "CELL_LIMIT", "CHECK_LIMIT"]


@dataclass(frozen=True)
class ItemResult:
    """The grade of one item: points of ``max_points`` and the feedback the student reads."""

    grade_id: str
    points: float
    max_points: float
    feedback: str


def _read_tree() -> dict[str, bytes]:
    """The grader's own copy of the checker: every file of ``mesa_lib`` and ``instructor``."""
    files: dict[str, bytes] = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
                files[str(f.relative_to(ROOT))] = f.read_bytes()
    return files


def _write_tree(files: dict[str, bytes], dest: Path) -> None:
    for rel, data in files.items():
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(0o444)
    for d in sorted({p for rel in files for p in (dest / rel).parents if dest in p.parents}, reverse=True):
        d.chmod(0o555)


def _code(cell: Any) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


# the zygote: a fresh process that imports the checker (never any student code), then forks one
# fresh process per item; argv = [snapshot root, pycache folder]; requests on stdin, reports on stdout
_CHILD = r"""
import sys, os, json
_root, _cache = sys.argv[1], sys.argv[2]
sys.pycache_prefix = _cache
sys.path[:0] = [_root]
_report = os.fdopen(os.dup(1), "w")
_null = os.open(os.devnull, os.O_RDWR)
os.dup2(_null, 1); os.dup2(_null, 2)
import builtins, linecache, math, pkgutil, importlib
import torch
torch.set_num_threads(1)
import mesa_lib, instructor
for _m in pkgutil.walk_packages(mesa_lib.__path__, "mesa_lib.", onerror=lambda name: None):
    if _m.name.endswith("__main__"):
        continue
    try:
        importlib.import_module(_m.name)
    except Exception:
        pass
import mesa_lib.classroom.checks as _checks, mesa_lib.classroom.grading as _grading, instructor.hidden as _hidden
_ok = all(m.__file__.startswith(_root) for m in (_checks, _grading, _hidden))
def _send(token, **kw):
    kw["token"] = token
    _report.write(json.dumps(kw) + "\n"); _report.flush()
_send("zygote", ready=_ok)
def _state(cases):
    mods = [m for n, m in list(sys.modules.items()) if m is not None and n.split(".")[0] in ("mesa_lib", "instructor")]
    out = {}
    for m in mods + [torch, builtins, math, torch.nn.functional]:
        for k, v in list(vars(m).items()):
            out[(m.__name__, k)] = (id(v), id(getattr(v, "__code__", None)))
    for k, v in list(vars(torch.Tensor).items()) + list(vars(torch._C.TensorBase).items()):
        out[("Tensor", k)] = id(v)
    for c in cases:
        out[("case", id(c))] = id(c.__code__)
    return out
def _item(msg):
    tok = msg["token"]
    spec = {}
    def record(name, fn, cases, **kw):
        spec.update(name=name, cases=list(cases), kw=kw)
    grade = _grading.grade
    _checks.grade = record  # take hold of the item's checker before any student code runs
    getattr(_checks, msg["checker"])(None, hidden=True)
    _checks.grade = grade
    before = _state(spec["cases"])
    ns = {"__name__": "__main__", "__builtins__": builtins}
    for i, src in msg["cells"]:
        if i in msg["skip"]:
            continue
        _send(tok, phase="cell", cell=i)
        name = f"<cell {i}>"
        linecache.cache[name] = (len(src), None, src.splitlines(True), name)
        try:
            exec(compile(src, name, "exec"), ns)
        except BaseException as err:
            _send(tok, cell_error=i, error=f"{type(err).__name__}: {err}"[:300])
    _send(tok, phase="check")
    score = grade(spec["name"], ns.get(msg["function"]), spec["cases"], quiet=True, **spec["kw"])
    after = _state(spec["cases"])
    changed = sorted(f"{a}.{b}" for (a, b) in before if after.get((a, b)) != before[(a, b)])
    if changed:
        _send(tok, points=0.0, max=float(score.max_points), feedback=spec["name"] + ": 0 points: the submission "
              "changed the grader's environment while it ran (" + ", ".join(changed[:5]) + "); write the "
              "function, do not patch the checker")
    else:
        _send(tok, points=float(score), max=float(score.max_points), feedback=score.feedback)
for _line in sys.stdin:
    _msg = json.loads(_line)
    _pid = os.fork()
    if _pid == 0:
        os.setsid()
        sys.stdin = open(os.devnull)
        try:
            _item(_msg)
        finally:
            _report.flush()
            os._exit(0)
    _send(_msg["token"], pid=_pid)
    os.waitpid(_pid, 0)
    _send(_msg["token"], done=True)
"""


@dataclass
class Grader:
    """Grades submissions of the assignment, each item in a fresh process (see the module)."""

    source: Path = SOURCE
    cell_limit: float = CELL_LIMIT
    check_limit: float = CHECK_LIMIT
    files: dict[str, bytes] = field(default_factory=_read_tree)

    def __post_init__(self) -> None:
        import nbformat

        from mesa_lib.classroom.rubric import items

        self.source = Path(self.source)
        nb = nbformat.read(str(self.source), as_version=4)
        self.items = items(nb)
        self.setup: list[tuple[int, str]] = []
        for i, cell in enumerate(nb.cells):
            meta = cell.metadata.get("nbgrader", {})
            if meta.get("solution"):
                break
            if cell.cell_type == "code" and "remove-cell" not in cell.metadata.get("tags", []):
                self.setup.append((i, _code(cell)))

    # ----------------------------------------------------------------------------- one item
    def _cells(self, nb: Any, solution_id: str) -> list[tuple[int, str]]:
        """The instructor's setup cells, then the submission's solution cells up to ``solution_id``."""
        out = list(self.setup)
        for i, cell in enumerate(nb.cells):
            meta = cell.metadata.get("nbgrader", {})
            if cell.cell_type == "code" and meta.get("solution"):
                out.append((1000 + i, _code(cell)))
                if meta.get("grade_id") == solution_id:
                    break
        return out

    # ----------------------------------------------------------------------------- the zygote
    def start(self) -> None:
        """Start a fresh zygote: a new process with a fresh read-only copy of the checker."""
        self.stop()
        self._tmp = tempfile.mkdtemp(prefix="mesa_grade_")
        snap, cache = Path(self._tmp) / "checker", Path(self._tmp) / "pycache"
        _write_tree(self.files, snap)
        cache.mkdir()
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR", "MESA_CACHE_DIR")}
        env["MPLBACKEND"] = "Agg"
        self._proc = subprocess.Popen([sys.executable, "-I", "-c", _CHILD, str(snap), str(cache)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      cwd=self._tmp, env=env, start_new_session=True)
        self._buf = b""
        m = self._read("zygote", time.monotonic() + START_LIMIT)
        if not (m and m.get("ready")):
            self.stop()
            raise RuntimeError("the grader's process did not start (or did not import its own copy of the checker)")

    def stop(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            self._proc = None
        tmp = getattr(self, "_tmp", None)
        if tmp:
            for d in Path(tmp).rglob("*"):
                if d.is_dir():
                    d.chmod(0o755)
            shutil.rmtree(tmp, ignore_errors=True)
            self._tmp = None

    def _read(self, token: str, deadline: float) -> dict | None:
        """The next report with ``token`` before ``deadline`` (None when the time is up or the
        process ended)."""
        fd = self._proc.stdout.fileno()
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                try:
                    m = json.loads(line)
                except ValueError:
                    continue
                if isinstance(m, dict) and m.get("token") == token:
                    return m
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return None
                self._buf += chunk

    def _run_item(self, it: Any, cells: list, skip: set[int]) -> tuple[ItemResult | None, int | None, list[str]]:
        """One fresh (forked) process: (result, the cell that hung if one did, notes)."""
        if getattr(self, "_proc", None) is None or self._proc.poll() is not None:
            self.start()
        token = secrets.token_hex(16)
        msg = {"token": token, "checker": it.checker, "function": it.function, "cells": cells, "skip": sorted(skip)}
        self._proc.stdin.write((json.dumps(msg) + "\n").encode())
        self._proc.stdin.flush()
        notes: list[str] = []
        pid, phase, cell, result, hung = None, "start", None, None, None
        deadline = time.monotonic() + 60.0
        while True:
            m = self._read(token, deadline)
            if m is None:  # out of time (or the process ended)
                if phase == "cell":
                    hung = cell
                    notes.append(f"your solution cell ran longer than {self.cell_limit:g} s and was stopped; "
                                 "it is left out")
                elif phase == "check" and result is None:
                    result = ItemResult(it.grade_id, 0.0, it.points,
                                        f"{it.title}: 0 points: your function ran longer than {self.check_limit:g} s "
                                        "on the graded cases and was stopped (an endless loop? an interrupt "
                                        "swallowed by a bare except?)")
                if pid is not None:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    m = self._read(token, time.monotonic() + 30.0)
                    while m is not None and not m.get("done"):
                        m = self._read(token, time.monotonic() + 30.0)
                    if m is None:
                        self.stop()
                break
            if "pid" in m:
                pid = m["pid"]
            if "cell_error" in m:
                notes.append(f"a solution cell raised {m['error']}")
            if "phase" in m:
                phase, cell = m["phase"], m.get("cell")
                deadline = time.monotonic() + (self.cell_limit if phase == "cell" else self.check_limit)
            if "points" in m and result is None:
                result = ItemResult(it.grade_id, float(m["points"]), float(m["max"]), m["feedback"])
            if m.get("done"):
                break
        if result is None and hung is None:
            result = ItemResult(it.grade_id, 0.0, it.points,
                                f"{it.title}: 0 points: the grading process ended without a report (your code "
                                "ended the interpreter?)")
        return result, hung, notes

    def grade(self, notebook: str | Path | Any) -> dict[str, ItemResult]:
        """Every graded item of one submission (a path or a notebook node), by test cell grade_id:
        a fresh zygote for the submission, a fresh process per item."""
        import nbformat

        nb = nbformat.read(str(notebook), as_version=4) if isinstance(notebook, (str, Path)) else notebook
        self.start()
        try:
            skip: set[int] = set()
            return {it.grade_id: self.grade_item(nb, it.grade_id, skip) for it in self.items}
        finally:
            self.stop()

    def grade_item(self, nb: Any, grade_id: str, skip: set[int] | None = None) -> ItemResult:
        it = next(i for i in self.items if i.grade_id == grade_id)
        cells = self._cells(nb, grade_id.removesuffix("-check") + "-solution")
        skip = set() if skip is None else skip
        notes: list[str] = []
        result = None
        for _ in range(len(cells) + 1):
            result, hung, more = self._run_item(it, cells, skip)
            notes += more
            if hung is None:
                break
            skip.add(hung)
        if notes:
            result = ItemResult(result.grade_id, result.points, result.max_points,
                                result.feedback + "\n" + "\n".join("  note: " + n for n in notes))
        return result


def grade_notebook(notebook: str | Path, source: str | Path = SOURCE) -> dict[str, ItemResult]:
    """Grade one submitted notebook: each item in its own fresh process."""
    return Grader(Path(source)).grade(notebook)


_GRADER: Grader | None = None


class _Points(float):
    def __repr__(self) -> str:  # nbgrader reads the cell's value as partial credit
        return repr(float(self))


def item(grade_id: str, notebook: str | Path | None = None) -> float:
    """For an nbgrader hidden test cell: grade item ``grade_id`` of the notebook being autograded
    (``notebook``, or the only ``*.ipynb`` of the current folder) in a fresh process, print the
    feedback and return the points."""
    global _GRADER
    if notebook is None:
        found = sorted(Path.cwd().glob("*.ipynb"))
        if len(found) != 1:
            raise RuntimeError(f"cannot tell which notebook to grade in {Path.cwd()}: {[f.name for f in found]}")
        notebook = found[0]
    if _GRADER is None:
        _GRADER = Grader(Path(os.environ.get("MESA_GRADER_SOURCE", SOURCE)))
    import nbformat

    res = _GRADER.grade_item(nbformat.read(str(notebook), as_version=4), grade_id)
    print(res.feedback)
    return _Points(res.points)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m instructor.grader", description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="+", type=Path, help="submitted notebooks, one per student")
    ap.add_argument("--source", type=Path, default=SOURCE, help="the instructor's source notebook")
    ap.add_argument("--json", type=Path, help="write the scores here (notebook -> grade_id -> points)")
    args = ap.parse_args(argv)
    for nb in [args.source, *args.notebooks]:
        if not nb.is_file():
            print(f"error: {nb} is not a file; give the submitted .ipynb files", file=sys.stderr)
            return 2
    g = Grader(args.source)
    table = {}
    for nb in args.notebooks:
        res = g.grade(nb)
        table[str(nb)] = {k: r.points for k, r in res.items()}
        got, mx = sum(r.points for r in res.values()), sum(r.max_points for r in res.values())
        print(f"{nb}: {got:g} / {mx:g}")
        for r in res.values():
            print("  " + r.feedback.replace("\n", "\n  "))
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
