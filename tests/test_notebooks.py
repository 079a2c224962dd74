"""Every notebook of the book, executed once: one test per chapter.

The executed notebook goes into the jupyter-cache that the strict book build reads
(``execute_notebooks: cache``), so ``make test`` runs each notebook exactly once and the HTML
shows the outputs checked here. A failing assert cell fails its chapter's test with the
cell's traceback; a cell over ``MESA_CELL_TIMEOUT`` seconds fails with a message naming it.
Deselect with ``-m "not notebook"`` for a quick unit-test run. Under pytest-xdist with
``--dist loadfile`` (``make test``) this file runs in one worker and
``tests/test_notebooks_lane_b.py`` (the chapters of ``scripts/notebooks.py``'s ``LANE_B``) in
the other, both before the unit tests (``tests/conftest.py`` puts them first): each chapter runs
on its own from a cold cache, and ``scripts/notebooks.py`` takes a file lock while it writes the
build's cache, so two workers never write it at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import notebooks  # noqa: E402

NOTEBOOKS = notebooks.toc_notebooks()
LANE_A = [p for p in NOTEBOOKS if p.stem not in notebooks.LANE_B]


def run_chapter(path: Path) -> None:
    """Execute one chapter into the build's cache; its failure is the test's failure."""
    try:
        seconds = notebooks.execute(path)
    except notebooks.NotebookFailed as err:
        pytest.fail(str(err), pytrace=False)
    print(f"{path.name}: {seconds:.1f} s")


def test_the_toc_has_every_chapter_notebook():
    on_disk = sorted(p.name for p in (notebooks.ROOT / "book").glob("*.ipynb"))
    assert sorted(p.name for p in NOTEBOOKS) == on_disk, "a notebook under book/ is missing from _toc.yml"


def test_the_two_lanes_hold_every_chapter_once():
    lane_b = [p for p in NOTEBOOKS if p.stem in notebooks.LANE_B]
    assert len(lane_b) == len(notebooks.LANE_B), "a LANE_B name is not a notebook of the toc"
    assert sorted(LANE_A + lane_b) == sorted(NOTEBOOKS)


@pytest.mark.notebook
@pytest.mark.parametrize("path", LANE_A, ids=[p.stem for p in LANE_A])
def test_notebook(path):
    run_chapter(path)


def test_side_by_side_execution_stores_each_notebook_once(tmp_path, monkeypatch):
    """``scripts/notebooks.py --jobs 2`` (what ``make book`` runs): the first notebook with the
    cache-free ones beside it (``a`` waits until ``e`` has started), the others after it (``b``
    finds what ``a`` left), in two worker processes with cores // 2 torch threads each; the parent
    stores every executed notebook in the cache and records its time; a failing notebook fails
    the run with its cell's error, and the others are still stored."""
    import json

    import nbformat
    from jupyter_cache import get_cache

    monkeypatch.setattr(notebooks, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(notebooks, "TIMES", tmp_path / "times.json")
    monkeypatch.setattr(notebooks, "INPUTS", tmp_path / "inputs.json")
    monkeypatch.setattr(notebooks, "ROOT", tmp_path)
    monkeypatch.setattr(notebooks, "CACHE_FREE", ("e",))
    paths = []
    import os

    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // 2))
    flag = f"import pathlib, time\nflag = pathlib.Path(r'{tmp_path}')"
    wait_for_e = (f"{flag} / 'e_started'\nt = time.time()\nwhile not flag.exists() and time.time() - t < 120:\n"
                  "    time.sleep(0.1)\nassert flag.exists(), 'e did not start beside a'\n"
                  f"pathlib.Path(r'{tmp_path}', 'a_done').touch()")
    for name, code in [("a", wait_for_e),
                       ("b", f"import os\nassert os.environ['OMP_NUM_THREADS'] == '{threads}'\n"
                             f"{flag} / 'a_done'\nassert flag.exists(), 'b started before a ended'"),
                       ("c", "print('c')"), ("d", "raise ValueError('chapter d is wrong')"),
                       ("e", f"{flag} / 'e_started'\nflag.touch()")]:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(code)]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        paths.append(tmp_path / f"{name}.ipynb")
        nbformat.write(nb, paths[-1])
    assert notebooks.main([str(p) for p in paths] + ["--jobs", "2"]) == 1
    cache = get_cache(str(tmp_path / "cache"))
    for p in paths[:3] + paths[4:]:
        cache.match_cache_notebook(nbformat.read(p, as_version=4))  # raises KeyError if not stored
    assert notebooks.uncached(paths, tmp_path / "cache") == [paths[3]]
    assert set(json.loads((tmp_path / "times.json").read_text())) == {"a.ipynb", "b.ipynb", "c.ipynb", "e.ipynb"}


def test_a_second_run_executes_only_what_changed(tmp_path, monkeypatch, capsys):
    """``make book`` on a finished build executes nothing; a changed notebook, or a changed input
    it reads (a committed results file), is executed again, the others not; ``--force`` executes
    every one."""
    import json

    import nbformat

    monkeypatch.setattr(notebooks, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(notebooks, "TIMES", tmp_path / "times.json")
    monkeypatch.setattr(notebooks, "INPUTS", tmp_path / "inputs.json")
    monkeypatch.setattr(notebooks, "ROOT", tmp_path)
    results = tmp_path / "book" / "results"
    results.mkdir(parents=True)
    (results / "r.json").write_text("1")
    paths = []
    for name in ("a", "b"):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(f"print('{name}')")]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        paths.append(tmp_path / f"{name}.ipynb")
        nbformat.write(nb, paths[-1])

    def executed(*extra):
        capsys.readouterr()
        assert notebooks.main([str(p) for p in paths] + ["--jobs", "1", *extra]) == 0
        out = capsys.readouterr().out
        return sorted(p.stem for p in paths if f">> executing {p.name}" in out)

    assert executed() == ["a", "b"]
    assert executed() == []                      # nothing changed: nothing runs
    nb = nbformat.read(paths[1], as_version=4)
    nb.cells[0].source = "print('b, changed')"
    nbformat.write(nb, paths[1])
    assert executed() == ["b"]                   # only the changed notebook
    (results / "r.json").write_text("2")
    assert executed() == ["a", "b"]              # an input both read
    assert executed() == []
    assert executed("--force") == ["a", "b"]
    assert set(json.loads((tmp_path / "inputs.json").read_text())) == {"a.ipynb", "b.ipynb"}


def _store_one(args):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import nbformat

    import notebooks as nbs

    path, cache, times = args
    nbs.TIMES = Path(times)
    nbs.ROOT = Path(path).parent
    nbs.store(Path(path), nbformat.read(path, as_version=4), 1.0, Path(cache))


def test_concurrent_stores_into_a_fresh_cache(tmp_path):
    """Two processes store four notebooks into a cache that does not exist yet (what two
    pytest-xdist workers may do): every record lands, none is lost to a race."""
    import multiprocessing

    import nbformat

    paths = []
    for i in range(4):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(f"x = {i}")]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        paths.append(tmp_path / f"n{i}.ipynb")
        nbformat.write(nb, paths[-1])
    cache = tmp_path / "build" / "cache"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_store_one, [(str(p), str(cache), str(tmp_path / "times.json")) for p in paths])
    assert notebooks.uncached(paths, cache) == []
