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


def test_side_by_side_execution_stores_each_notebook_once(tmp_path, monkeypatch):
    """``scripts/notebooks.py --jobs 2`` (what ``make book`` runs): the first notebook alone,
    the others in two worker processes with cores // 2 torch threads each; the parent stores every
    executed notebook in the cache and records its time; a failing notebook fails the run
    with its cell's error, and the others are still stored."""
    import json

    import nbformat
    from jupyter_cache import get_cache

    monkeypatch.setattr(notebooks, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(notebooks, "TIMES", tmp_path / "times.json")
    monkeypatch.setattr(notebooks, "ROOT", tmp_path)
    paths = []
    import os

    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // 2))
    for name, code in [("a", "x = 1"), ("b", f"import os\nassert os.environ['OMP_NUM_THREADS'] == '{threads}'"),
                       ("c", "print('c')"), ("d", "raise ValueError('chapter d is wrong')")]:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(code)]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        paths.append(tmp_path / f"{name}.ipynb")
        nbformat.write(nb, paths[-1])
    assert notebooks.main([str(p) for p in paths] + ["--jobs", "2"]) == 1
    cache = get_cache(str(tmp_path / "cache"))
    for p in paths[:3]:
        cache.match_cache_notebook(nbformat.read(p, as_version=4))  # raises KeyError if not stored
    assert notebooks.uncached(paths, tmp_path / "cache") == [paths[3]]
    assert set(json.loads((tmp_path / "times.json").read_text())) == {"a.ipynb", "b.ipynb", "c.ipynb"}
