#!/usr/bin/env python
"""Write student handouts of the exercise notebooks: solutions removed, checks kept.

The book holds the SOLVED exercise notebook (so the tests run it and its checks pass). A
handout is the same notebook with

* every region between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` in a code cell replaced
  by ``# YOUR CODE HERE`` / ``raise NotImplementedError()`` (the nbgrader convention, at the
  region's indentation; teachers can also feed the solved notebook to nbgrader directly);
* the solution directives removed: markdown cells holding a ``{solution}`` directive, and the
  ``{solution-start}`` / ``{solution-end}`` cells that gate a solution code cell, with any
  markdown between them (the code cell between them stays, its solution stripped);
* ``{exercise}`` directives turned into plain markdown (Jupyter does not render MyST);
* all outputs and execution counts cleared.

Usage::

    python scripts/make_handouts.py                  # book/10_exercises.ipynb -> handouts/
    python scripts/make_handouts.py NB.ipynb --out DIR
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NOTEBOOKS = [ROOT / "book" / "10_exercises.ipynb"]
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
PLACEHOLDER = ("# YOUR CODE HERE", "raise NotImplementedError()")
SOLUTION_DIRECTIVE = re.compile(r"^\s*(`{3,}|:{3,})\s*\{(solution|solution-start|solution-end)\}", re.M)
EXERCISE_OPEN = re.compile(r"^(`{3,}|:{3,})\s*\{exercise(?:-start)?\}\s*(.*)$")


class HandoutError(ValueError):
    """The notebook's solution markers are malformed."""


def strip_solution_code(source: str, where: str = "cell") -> str:
    """Replace each BEGIN/END SOLUTION region by the nbgrader placeholder, keeping indentation."""
    out: list[str] = []
    inside = False
    for line in source.splitlines():
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise HandoutError(f"{where}: nested '{BEGIN}' (close the first with '{END}')")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(indent + p for p in PLACEHOLDER)
        elif stripped == END:
            if not inside:
                raise HandoutError(f"{where}: '{END}' without a '{BEGIN}' before it")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise HandoutError(f"{where}: '{BEGIN}' is never closed by '{END}'")
    return "\n".join(out)


def plain_exercise(source: str) -> str:
    """Turn ```{exercise} Title / :label: ... / body / ``` into '**Exercise: Title**' + body."""
    lines = source.splitlines()
    out: list[str] = []
    fence = None
    for line in lines:
        m = EXERCISE_OPEN.match(line.strip()) if fence is None else None
        if m:
            fence = m.group(1)
            out.append(f"**Exercise: {m.group(2).strip()}**" if m.group(2).strip() else "**Exercise**")
            continue
        if fence is not None:
            if re.match(r"^:[\w-]+:", line.strip()):  # directive options (:label:, :class:)
                continue
            if line.strip() == fence:
                fence = None
                continue
        out.append(line)
    return "\n".join(out)


def make_handout(nb: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """The student version of a solved notebook (a new notebook; the input is untouched)."""
    nb = nbformat.from_dict(nb)
    cells = []
    gated = False  # between {solution-start} and {solution-end}: markdown is solution text
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            found = SOLUTION_DIRECTIVE.findall(cell.source)
            if found:
                kinds = [kind for _, kind in found]
                if "solution-start" in kinds:
                    gated = True
                if "solution-end" in kinds:
                    gated = False
                continue
            if gated:
                continue
            cell.source = plain_exercise(cell.source)
        elif cell.cell_type == "code":
            cell.source = strip_solution_code(cell.source, f"{name}, cell {i}")
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)
        cells.append(cell)
    if gated:
        raise HandoutError(f"{name}: a {{solution-start}} is never closed by {{solution-end}}")
    nb.cells = cells
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="solved notebooks (default: the book's exercises)")
    parser.add_argument("--out", type=Path, default=ROOT / "handouts", help="output folder (default: handouts/)")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or DEFAULT_NOTEBOOKS
    args.out.mkdir(parents=True, exist_ok=True)
    for path in notebooks:
        if not path.is_file():
            print(f"error: no notebook at {path}", file=sys.stderr)
            return 2
        try:
            hand = make_handout(nbformat.read(path, as_version=4), path.name)
        except HandoutError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        dest = args.out / path.name
        nbformat.write(hand, dest)
        n = sum(c.source.count(PLACEHOLDER[1]) for c in hand.cells if c.cell_type == "code")
        print(f"{path.name}: {n} solution blocks removed -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
