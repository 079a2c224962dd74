"""Every notebook of the book, executed once: one test per chapter.

The executed notebook goes into the jupyter-cache that the strict book build reads
(``execute_notebooks: cache``), so ``make test`` runs each notebook exactly once and the HTML
shows the outputs checked here. A failing assert cell fails its chapter's test with the
cell's traceback; a cell over ``MESA_CELL_TIMEOUT`` seconds fails with a message naming it.
Deselect with ``-m "not notebook"`` for a quick unit-test run. Under pytest-xdist with
``--dist loadgroup`` (``make test``) all notebooks run in one worker, in reading order, while the
unit tests use the other.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import notebooks  # noqa: E402

NOTEBOOKS = notebooks.toc_notebooks()


def test_the_toc_has_every_chapter_notebook():
    on_disk = sorted(p.name for p in (notebooks.ROOT / "book").glob("*.ipynb"))
    assert sorted(p.name for p in NOTEBOOKS) == on_disk, "a notebook under book/ is missing from _toc.yml"


@pytest.mark.notebook
@pytest.mark.xdist_group("notebooks")  # one worker runs them in order (one writer of the build's cache)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(path):
    try:
        seconds = notebooks.execute(path)
    except notebooks.NotebookFailed as err:
        pytest.fail(str(err), pytrace=False)
    print(f"{path.name}: {seconds:.1f} s")
