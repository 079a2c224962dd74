#!/usr/bin/env python
"""Write the student version of the graded assignment: nbgrader's, readable in plain Jupyter.

The book holds the SOLVED assignment (book/10_exercises.ipynb; the tests run it and an
nbgrader round trip grades it). Its student version is made in two steps:

1. **nbgrader's own preprocessors**, in the order ``nbgrader generate_assignment`` runs them
   (``LockCells``, ``ClearSolutions``, ``ClearOutput``, ``ClearHiddenTests``,
   ``ClearMarkScheme``, ``ComputeChecksums``, ``CheckCellMetadata``): every solution region
   becomes ``# YOUR CODE HERE`` / ``raise NotImplementedError()``, hidden tests and outputs go,
   read-only cells are locked. The code cells are then exactly those of
   ``nbgrader generate_assignment`` (``tests/test_nbgrader.py`` checks it). Without nbgrader
   installed, an equivalent built-in fallback strips the same regions (no checksums).
2. **MyST -> Jupyter Markdown**, because Jupyter does not render MyST: the
   ``{solution-start}``/``{solution-end}`` cells are dropped (with any markdown between them),
   ``{exercise}`` directives become bold headings, and roles become text or links:
   ``{cite}`` -> "(Qiao et al., 2019)" from book/references.bib, ``{prf:ref}`` -> a link to the
   chapter with the definition's title, ``{doc}`` -> a link with the chapter's title,
   ``{glue:*}`` -> "(a number computed in the book)", ``{math}`` -> ``$...$``, any other role ->
   its text. The title gets "(student version)" and the blocks between
   ``<!-- instructor-only -->`` and ``<!-- /instructor-only -->`` are removed.

Usage::

    python scripts/make_handouts.py                  # book/10_exercises.ipynb -> handouts/
    python scripts/make_handouts.py --nbgrader-source source/mesa   # nbgrader's source, then
    nbgrader generate_assignment mesa                # a release readable in plain Jupyter
    python scripts/make_handouts.py NB.ipynb --out DIR
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from functools import lru_cache
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
DEFAULT_NOTEBOOKS = [BOOK / "10_exercises.ipynb"]
BEGIN, END = "BEGIN SOLUTION", "END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"
CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
SOLUTION_DIRECTIVE = re.compile(r"^\s*(`{3,}|:{3,})\s*\{(solution|solution-start|solution-end)\}", re.M)
EXERCISE_OPEN = re.compile(r"^(`{3,}|:{3,})\s*\{exercise(?:-start)?\}\s*(.*)$")
ROLE = re.compile(r"\{([\w:-]+)\}`([^`]*)`")
EMPTY_LINK = re.compile(r"\[\]\(([\w./-]+?)(?:\.ipynb|\.md)?\)")
INSTRUCTOR = re.compile(r"<!--\s*instructor-only\s*-->.*?<!--\s*/instructor-only\s*-->\n?", re.S)


class HandoutError(ValueError):
    """The notebook's solution markers are malformed."""


# --------------------------------------------------------------------------- step 1: nbgrader
def _nbgrader_student_version(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    from nbgrader.preprocessors import (CheckCellMetadata, ClearHiddenTests, ClearMarkScheme, ClearOutput,
                                        ClearSolutions, ComputeChecksums, LockCells)

    resources: dict = {}
    for pre in (LockCells(), ClearSolutions(), ClearOutput(), ComputeChecksums(), ClearHiddenTests(),
                ClearMarkScheme(), ComputeChecksums(), CheckCellMetadata()):
        try:
            nb, resources = pre.preprocess(nb, resources)
        except RuntimeError as err:
            raise HandoutError(str(err)) from None
    return nb


def _strip_region(source: str, begin: str, end: str, stub: tuple[str, ...], where: str) -> str:
    out: list[str] = []
    inside = False
    for line in source.split("\n"):
        if begin in line:
            if inside:
                raise HandoutError(f"{where}: nested '{begin}' (close the first with '{end}')")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(indent + s for s in stub)
        elif end in line:
            if not inside:
                raise HandoutError(f"{where}: '{end}' without a '{begin}' before it")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise HandoutError(f"{where}: '{begin}' is never closed by '{end}'")
    return "\n".join(out)


def strip_solution_code(source: str, where: str = "cell") -> str:
    """Replace each BEGIN/END SOLUTION region by nbgrader's code stub, keeping indentation."""
    return _strip_region(source, BEGIN, END, CODE_STUB, where)


def _fallback_student_version(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        cell.source = strip_solution_code(cell.source, f"cell {i}")
        cell.source = _strip_region(cell.source, BEGIN_HIDDEN, END_HIDDEN, (), f"cell {i}")
        cell.outputs = []
        cell.execution_count = None
        cell.metadata.pop("execution", None)
    return nb


def student_version(nb: nbformat.NotebookNode, use_nbgrader: bool | None = None) -> nbformat.NotebookNode:
    """What ``nbgrader generate_assignment`` releases (nbgrader's preprocessors if importable)."""
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    if use_nbgrader is None:
        try:
            import nbgrader  # noqa: F401
            use_nbgrader = True
        except ImportError:
            use_nbgrader = False
    return _nbgrader_student_version(nb) if use_nbgrader else _fallback_student_version(nb)


# --------------------------------------------------------------------------- step 2: MyST -> Markdown
@lru_cache(maxsize=None)
def _bib(book: Path) -> dict[str, str]:
    """citation key -> 'Qiao et al., 2019'."""
    path = book / "references.bib"
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    for entry in re.split(r"\n@", "\n" + path.read_text()):
        key = re.match(r"\w+\{([^,]+),", entry)
        if not key:
            continue
        author = re.search(r"author\s*=\s*\{(.+?)\},?\s*\n", entry)
        year = re.search(r"year\s*=\s*\{?(\d{4})", entry)
        names = [a.split(",")[0].strip(" {}") for a in author.group(1).split(" and ")] if author else ["?"]
        who = names[0] if len(names) == 1 else f"{names[0]} and {names[1]}" if len(names) == 2 else f"{names[0]} et al."
        out[key.group(1).strip()] = f"{who}, {year.group(1) if year else 'n.d.'}"
    return out


@lru_cache(maxsize=None)
def _chapters(book: Path) -> tuple[dict[str, str], dict[str, tuple[str, str, str]]]:
    """(chapter file stem -> title, prf label -> (kind, title, chapter file name))."""
    titles: dict[str, str] = {}
    labels: dict[str, tuple[str, str, str]] = {}
    prf = re.compile(r"[`:]{3,}\{prf:(\w+)\}\s*(.*)\n:label:\s*([\w-]+)")
    for path in sorted(book.glob("*.ipynb")) + sorted(book.glob("*.md")):
        if path.suffix == ".ipynb":
            try:
                text = "\n\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"]
                                   if c["cell_type"] == "markdown")
            except (ValueError, KeyError):
                continue
        else:
            text = path.read_text()
        title = re.search(r"^#\s+(.+)$", text, re.M)
        titles[path.stem] = title.group(1).strip() if title else path.stem
        for kind, t, label in prf.findall(text):
            labels[label] = (kind, t.strip(), path.name)
    return titles, labels


def _link(target: str, book: Path, text: str | None = None) -> str:
    titles, _ = _chapters(book)
    stem = Path(target).stem
    suffix = ".ipynb" if (book / f"{stem}.ipynb").exists() else ".md"
    return f"[{text or titles.get(stem, stem)}]({stem}{suffix})"


def _role(m: re.Match, book: Path) -> str:
    role, content = m.group(1), m.group(2)
    if role in ("cite", "cite:p", "cite:t", "cite:ps"):
        bib = _bib(book)
        return "(" + "; ".join(bib.get(k.strip(), k.strip()) for k in content.split(",")) + ")"
    if role == "prf:ref":
        _, labels = _chapters(book)
        if content in labels:
            kind, title, chapter = labels[content]
            return f"{kind} *{title}* ({_link(chapter, book)})"
        return content
    if role == "doc":
        return _link(content, book)
    if role.startswith("glue"):
        return "(a number computed in the book)"
    if role == "math":
        return f"${content}$"
    text = re.match(r"(.*?)\s*<.*>$", content)  # {ref}`text <target>`
    return text.group(1) if text else content


def render_myst(source: str, book: Path = BOOK) -> str:
    """MyST markdown -> Markdown that plain Jupyter renders (see the module docstring)."""
    source = INSTRUCTOR.sub("", source)
    out: list[str] = []
    fence = None
    for line in source.split("\n"):
        m = EXERCISE_OPEN.match(line.strip()) if fence is None else None
        if m:
            fence = m.group(1)
            title = m.group(2).strip()
            out.append(f"### Exercise: {title}" if title else "### Exercise")
            continue
        if fence is not None:
            if re.match(r"^:[\w-]+:", line.strip()):  # directive options (:label:, :class:)
                continue
            if line.strip() == fence:
                fence = None
                continue
        out.append(line)
    text = "\n".join(out)
    text = ROLE.sub(lambda m: _role(m, book), text)
    text = EMPTY_LINK.sub(lambda m: _link(m.group(1), book), text)
    return text


def _render_cells(nb: nbformat.NotebookNode, name: str, book: Path, title_suffix: str) -> nbformat.NotebookNode:
    """Step 2 on ``nb`` in place: drop the gated solution cells, render MyST markdown as
    Jupyter Markdown, and suffix the title."""
    cells = []
    gated = False  # between {solution-start} and {solution-end}: markdown there is solution text
    titled = False
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            found = SOLUTION_DIRECTIVE.findall(cell.source)
            if found:
                kinds = [kind for _, kind in found]
                gated = ("solution-start" in kinds) or (gated and "solution-end" not in kinds)
                continue
            if gated:
                continue
            cell.source = render_myst(cell.source, book)
            if not cell.source.strip():  # e.g. a cell that held only an instructor-only block
                continue
            if not titled and title_suffix:
                cell.source, n = re.subn(r"^(#\s+.+?)[ \t]*$", rf"\1 {title_suffix}", cell.source, count=1,
                                         flags=re.M)
                titled = bool(n)
        cells.append(cell)
    if gated:
        raise HandoutError(f"{name}: a {{solution-start}} is never closed by {{solution-end}}")
    nb.cells = cells
    return nb


def make_handout(nb: nbformat.NotebookNode, name: str = "notebook", book: Path = BOOK,
                 use_nbgrader: bool | None = None) -> nbformat.NotebookNode:
    """The student version of a solved notebook (a new notebook; the input is untouched)."""
    try:
        nb = student_version(nb, use_nbgrader)
    except HandoutError as err:
        raise HandoutError(f"{name}: {err}") from None
    return _render_cells(nb, name, book, "(student version)")


def nbgrader_source(nb: nbformat.NotebookNode, name: str = "notebook", book: Path = BOOK) -> nbformat.NotebookNode:
    """The solved notebook as nbgrader's *source* (a new notebook): solutions, hidden tests and
    metadata kept, only the markdown made readable in plain Jupyter (step 2 alone), so that
    ``nbgrader generate_assignment`` releases no instructor-only paragraph, no solution-marker
    cell and no MyST fence."""
    return _render_cells(nbformat.from_dict(json.loads(json.dumps(nb))), name, book, "(student version)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="solved notebooks (default: the book's assignment)")
    parser.add_argument("--out", type=Path, default=ROOT / "handouts", help="output folder (default: handouts/)")
    parser.add_argument("--no-nbgrader", action="store_true", help="use the built-in fallback, not nbgrader")
    parser.add_argument("--nbgrader-source", type=Path, default=None, metavar="DIR",
                        help="write the SOLVED notebooks, markdown made plain, into DIR as the source of "
                             "`nbgrader generate_assignment` (e.g. source/mesa), instead of the student version")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or DEFAULT_NOTEBOOKS
    if args.nbgrader_source is None:
        args.out.mkdir(parents=True, exist_ok=True)
    for path in notebooks:
        if not path.is_file():
            print(f"error: no notebook at {path}", file=sys.stderr)
            return 2
        if args.nbgrader_source is not None:
            args.nbgrader_source.mkdir(parents=True, exist_ok=True)
            dest = args.nbgrader_source / path.name
            try:
                nbformat.write(nbgrader_source(nbformat.read(path, as_version=4), path.name), dest)
            except HandoutError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
            print(f"{path.name}: nbgrader source (solved, plain markdown) -> {dest}")
            continue
        try:
            hand = make_handout(nbformat.read(path, as_version=4), path.name,
                                use_nbgrader=False if args.no_nbgrader else None)
        except HandoutError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        dest = args.out / path.name
        nbformat.write(hand, dest)
        n = sum(c.source.count(CODE_STUB[1]) for c in hand.cells if c.cell_type == "code")
        print(f"{path.name}: {n} solutions removed -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
