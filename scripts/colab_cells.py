#!/usr/bin/env python
"""(Re)write the first cell of every notebook in book/: the Colab install cell.

In Google Colab the notebook runs without this repository around it, so its first cell
installs ``mesa-lib`` with the ``book`` extra from the repository; anywhere else (a local
checkout, plain Jupyter, the book build, the tests) the cell does nothing. The repository
and branch come from one place, ``_config.yml``'s ``repository.url`` and
``repository.branch`` (the same keys that the book's Colab launch buttons and repository
button read). The cell is tagged ``remove-cell``, so the built HTML does not show it.

The cell is plain Python (``subprocess`` rather than ``!pip``/``%pip``), so the notebooks
stay valid Python for linters and for ``jupyter nbconvert --to script``.

Usage::

    python scripts/colab_cells.py           # rewrite the cells that differ
    python scripts/colab_cells.py --check   # exit 1 if any notebook's first cell differs

``tests/test_colab.py`` checks that every notebook's first cell is what this script writes.
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


def make_cell(url: str, branch: str) -> dict:
    """The whole notebook cell (nbformat 4.5: with an id)."""
    source = cell_source(url, branch)
    lines = source.splitlines(keepends=True)
    return {
        "cell_type": "code",
        "execution_count": None,
        "id": CELL_ID,
        "metadata": {"tags": list(TAGS)},
        "outputs": [],
        "source": lines,
    }


def notebooks(book: Path = ROOT / "book") -> list[Path]:
    return sorted(p for p in book.glob("*.ipynb") if not p.name.startswith("."))


def update(path: Path, cell: dict, write: bool) -> bool:
    """Put ``cell`` first in ``path`` (replacing an earlier install cell); return whether the
    notebook changed (it is written only if ``write``). Formatting kept: nbformat's
    one-space indent, non-ASCII as is, the file's final newline or its absence."""
    raw = path.read_text(encoding="utf-8")
    nb = json.loads(raw)
    cells = nb["cells"]
    if cells and cells[0].get("id") == CELL_ID:
        if cells[0] == cell:
            return False
        cells[0] = cell
    else:
        cells.insert(0, cell)
    if write:
        out = json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True)
        path.write_text(out + ("\n" if raw.endswith("\n") else ""), encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only report notebooks whose first cell differs")
    args = ap.parse_args(argv)
    cell = make_cell(*repository())
    changed = [p for p in notebooks() if update(p, cell, write=not args.check)]
    for p in changed:
        print(f"{'differs' if args.check else 'wrote'}: {p.relative_to(ROOT)}")
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
