#!/usr/bin/env python
"""(Re)write the Colab install cell, the first cell of every notebook in book/.

In Google Colab the notebook runs without this repository around it, so its first cell
installs ``mesa-lib`` with the ``book`` extra from the repository; anywhere else (a local
checkout, plain Jupyter, the book build, the tests) the cell does nothing. The repository
and branch come from one place, ``_config.yml``'s ``repository.url`` and
``repository.branch`` (the same keys that the book's Colab launch buttons and repository
button read). The cell is tagged ``remove-cell``, so the built HTML does not show it. In the
nbgrader assignment (chapter 10) it is the second cell, after the assignment's title, and
carries nbgrader metadata (see :func:`position`).

The cell is plain Python (``subprocess`` rather than ``!pip``/``%pip``), so the notebooks
stay valid Python for linters and for ``jupyter nbconvert --to script``.

Usage::

    python scripts/colab_cells.py           # rewrite the cells that differ
    python scripts/colab_cells.py --check   # exit 1 if any notebook's install cell differs

``tests/test_colab.py`` checks that every notebook holds the cell this script writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CELL_ID = "colab-install"
TAGS = ["remove-cell"]


def repository(config: Path = ROOT / "_config.yml") -> tuple[str, str]:
    """``(url, branch)`` of the repository, from ``_config.yml``."""
    repo = (yaml.safe_load(config.read_text()) or {}).get("repository") or {}
    url = str(repo.get("url") or "").rstrip("/")
    if not url.startswith("https://"):
        raise SystemExit(f"{config}: repository.url must be an https URL, got {url!r}")
    return url, str(repo.get("branch") or "main")


def requirement(url: str, branch: str) -> str:
    """The pip requirement that installs mesa-lib with its ``book`` extra from ``url``."""
    return f"mesa-lib[book] @ git+{url}@{branch}"


def cell_source(url: str, branch: str) -> str:
    """The install cell's code."""
    return (
        "# Colab only: install mesa_lib and the book's packages (elsewhere this cell does nothing).\n"
        "# Written by scripts/colab_cells.py from _config.yml (repository.url, repository.branch).\n"
        "import subprocess\n"
        "import sys\n"
        "\n"
        'if "google.colab" in sys.modules:\n'
        '    subprocess.run([sys.executable, "-m", "pip", "install", "-q",\n'
        f"                    {json.dumps(requirement(url, branch))}],\n"
        "                   check=True)"
    )


NBGRADER = {"grade": False, "grade_id": CELL_ID, "locked": True, "schema_version": 3,
            "solution": False, "task": False}


def make_cell(url: str, branch: str, graded: bool = False) -> dict:
    """The whole notebook cell (nbformat 4.5: with an id). In a notebook graded with nbgrader
    (``graded``) the cell carries nbgrader metadata too: a locked, ungraded cell."""
    source = cell_source(url, branch)
    lines = source.splitlines(keepends=True)
    metadata: dict = {"tags": list(TAGS)}
    if graded:
        metadata["nbgrader"] = dict(NBGRADER)
    return {
        "cell_type": "code",
        "execution_count": None,
        "id": CELL_ID,
        "metadata": metadata,
        "outputs": [],
        "source": lines,
    }


def is_graded(nb: dict) -> bool:
    """An nbgrader assignment: its cells carry nbgrader metadata."""
    return any("nbgrader" in c.get("metadata", {}) for c in nb["cells"] if c.get("id") != CELL_ID)


def position(nb: dict) -> int:
    """Where the install cell goes: first, except in an nbgrader assignment, whose first cell
    must stay its title and points total (the student version starts with it); there the
    install cell comes right after it. Either way it is the first code cell."""
    cells = [c for c in nb["cells"] if c.get("id") != CELL_ID]
    return 1 if is_graded(nb) and cells and cells[0]["cell_type"] == "markdown" else 0


def notebooks(book: Path = ROOT / "book") -> list[Path]:
    return sorted(p for p in book.glob("*.ipynb") if not p.name.startswith("."))


def update(path: Path, url: str, branch: str, write: bool) -> bool:
    """Put the install cell at its :func:`position` in ``path`` (replacing an earlier install
    cell); return whether the notebook changed (it is written only if ``write``). Formatting
    kept: nbformat's one-space indent, non-ASCII as is, the file's final newline or its
    absence."""
    raw = path.read_text(encoding="utf-8")
    nb = json.loads(raw)
    cell = make_cell(url, branch, graded=is_graded(nb))
    at = position(nb)
    cells = nb["cells"]
    if at < len(cells) and cells[at].get("id") == CELL_ID and cells[at] == cell:
        return False
    nb["cells"] = cells = [c for c in cells if c.get("id") != CELL_ID]
    cells.insert(at, cell)
    if write:
        out = json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True)
        path.write_text(out + ("\n" if raw.endswith("\n") else ""), encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only report notebooks whose install cell differs")
    args = ap.parse_args(argv)
    url, branch = repository()
    changed = [p for p in notebooks() if update(p, url, branch, write=not args.check)]
    for p in changed:
        print(f"{'differs' if args.check else 'wrote'}: {p.relative_to(ROOT)}")
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
