"""The assignment's rubric, read from the notebook's nbgrader metadata (never typed twice).

:func:`items` lists the graded items of an nbgrader notebook (points from the autograded
cells' metadata, titles from the ``{exercise}`` directives, checkers from the test cells);
:func:`points_table` renders them as the Markdown table of the instructor guide, which
``scripts/make_rubric.py`` writes between the guide's ``<!-- rubric:start -->`` and
``<!-- rubric:end -->`` markers (a test checks that the guide is up to date).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Item", "items", "points_table", "START", "END", "replace_table"]

START, END = "<!-- rubric:start -->", "<!-- rubric:end -->"
_EXERCISE = re.compile(r"^[`:]{3,}\s*\{exercise\}\s*(.*)$", re.M)
_CHECK = re.compile(r"^(check_\w+)\((\w+)\)", re.M)
_NO_LOOPS = re.compile(r"\*\*no\s+(python\s+)?loop", re.I)
_NO_SYNCS = re.compile(r"no host synchroni[sz]ation", re.I)


@dataclass(frozen=True)
class Item:
    number: int
    grade_id: str  # of the autograded test cell
    label: str  # of the {exercise} directive
    title: str
    points: float
    checker: str
    function: str
    no_loops: bool
    no_syncs: bool


def _source(cell: Any) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def items(nb: Any) -> list[Item]:
    """The graded items of a notebook (a dict / NotebookNode, or a path), in order."""
    if isinstance(nb, (str, Path)):
        import nbformat

        nb = nbformat.read(str(nb), as_version=4)
    exercises: dict[str, tuple[str, str]] = {}
    out: list[Item] = []
    for cell in nb["cells"]:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        src = _source(cell)
        m = _EXERCISE.search(src) if cell["cell_type"] == "markdown" else None
        if m:
            label = re.search(r":label:\s*(\S+)", src)
            if label:
                exercises[label.group(1)] = (m.group(1).strip(), src)
        if cell["cell_type"] == "code" and meta.get("grade") and not meta.get("solution"):
            gid = meta["grade_id"]
            label = gid.removesuffix("-check")
            title, text = exercises.get(label, (label, ""))
            c = _CHECK.search(src)
            out.append(Item(len(out) + 1, gid, label, title, float(meta["points"]),
                            c.group(1) if c else "", c.group(2) if c else "", bool(_NO_LOOPS.search(text)), bool(_NO_SYNCS.search(text))))
    return out


def points_table(nb: Any) -> str:
    """The Markdown table: item, function, checker, points, what earns them."""
    its = items(nb)
    rows = ["| # | Item | Function | Checker | Points | Rubric |", "|---|---|---|---|---|---|"]
    for it in its:
        pts = f"{it.points:g}"
        rubric = f"{pts} hidden cases, 1 point each"
        rubric += "; 0 for the reference or a call to it"
        if it.no_loops:
            rubric += "; 0 for a Python loop or comprehension"
        if it.no_syncs:
            rubric += "; 0 for a host sync (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`)"
        rows.append(f"| {it.number} | {it.title} | `{it.function}` | `{it.checker}` | {pts} | {rubric} |")
    total = sum(it.points for it in its)
    rows.append(f"| | **Total** | | | **{total:g}** | |")
    return "\n".join(rows)


def replace_table(text: str, table: str) -> str:
    """``text`` with the part between the rubric markers replaced by ``table``."""
    if START not in text or END not in text:
        raise ValueError(f"the guide has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"
