"""The published book holds no solution; the instructor build holds them all.

A tiny sample book is built twice with the book's own solution settings (sphinx-exercise and
``hide_solutions`` from ``_config.yml``, the local extension ``book/_ext/book_solutions.py``):
once as published, once with the instructor config of ``scripts/instructor_book.py``. Its
pages hold the three forms the chapters use: a ``{solution}`` dropdown in Markdown, a gated
``{solution-start}`` ... ``{solution-end}`` around a notebook code cell (chapter 10), and a
``remove-input`` cell that runs a model solution through its checker (chapters 2-9), whose
output line may show but whose source must not. The full book's HTML is checked the same way
by ``tests/test_book_browser.py`` after ``make test`` builds it.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
JB = Path(sys.executable).parent / "jupyter-book"
SECRETS = ("SECRET_DROPDOWN_ANSWER", "SECRET_GATED_CELL_ANSWER", "SECRET_CHECKER_CELL_SOURCE")
VISIBLE = ("VISIBLE_EXERCISE_TEXT", "VISIBLE_CHECK_OUTPUT")


def _instructor_module():
    spec = importlib.util.spec_from_file_location("instructor_book", ROOT / "scripts" / "instructor_book.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sample_config() -> dict:
    """The book's config, reduced to what decides what a page shows (no static files, no bibliography)."""
    book = yaml.safe_load((ROOT / "_config.yml").read_text())
    sph = book["sphinx"]
    return {
        "title": "sample", "only_build_toc_files": True,
        "execute": {"execute_notebooks": "off"},
        "parse": book["parse"],
        "sphinx": {
            "extra_extensions": sph["extra_extensions"],
            "local_extensions": {name: str(ROOT / path) for name, path in sph["local_extensions"].items()},
            "recursive_update": True,
            "config": {"hide_solutions": sph["config"]["hide_solutions"]},
        },
    }


def _write_sample(src: Path) -> None:
    (src / "index.md").write_text(
        "# Sample\n\n```{exercise} Add\n:label: ex-add\n\nVISIBLE_EXERCISE_TEXT\n```\n\n"
        "```{solution} ex-add\n:class: dropdown\n\nSECRET_DROPDOWN_ANSWER\n```\n")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    check = nbformat.v4.new_code_cell("print('SECRET_CHECKER_CELL_SOURCE')", metadata={"tags": ["remove-input"]})
    check.outputs = [nbformat.v4.new_output("stream", name="stdout", text="VISIBLE_CHECK_OUTPUT\n")]
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Notebook\n\n```{exercise} Mul\n:label: ex-mul\n\nmultiply\n```"),
        nbformat.v4.new_markdown_cell("```{solution-start} ex-mul\n:class: dropdown\n```"),
        nbformat.v4.new_code_cell("x = 'SECRET_GATED_CELL_ANSWER'"),
        nbformat.v4.new_markdown_cell("```{solution-end}\n```"),
        check,
        nbformat.v4.new_markdown_cell("The end."),
    ]
    nbformat.write(nb, src / "page.ipynb")
    (src / "_toc.yml").write_text("format: jb-book\nroot: index\nchapters:\n  - file: page\n")


def _build(src: Path, cfg: dict, out: Path) -> str:
    (src / "_config.yml").write_text(yaml.safe_dump(cfg))
    done = subprocess.run([str(JB), "build", str(src), "--path-output", str(out), "-W", "-n", "--keep-going"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    html = out / "_build" / "html"
    return "\n".join(p.read_text() for p in ("index.html", "page.html") for p in [html / p])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not JB.exists():
        pytest.skip("jupyter-book is not installed (the `book` extra)")
    src = tmp_path_factory.mktemp("sample")
    _write_sample(src)
    public = _build(src, _sample_config(), tmp_path_factory.mktemp("public"))
    solved = _build(src, _instructor_module().instructor_config(_sample_config()), tmp_path_factory.mktemp("inst"))
    return public, solved


def test_published_sample_shows_no_solution(built):
    public, _ = built
    for s in SECRETS:
        assert s not in public, f"{s} is in the published HTML"
    for v in VISIBLE:
        assert v in public, f"{v} (the task, the checker's output line) is missing from the published HTML"


def test_instructor_sample_shows_the_solutions(built):
    """The same pages with the instructor switch: the solutions are there (so the test above can fail)."""
    _, solved = built
    assert "SECRET_DROPDOWN_ANSWER" in solved and "SECRET_GATED_CELL_ANSWER" in solved
    assert "SECRET_CHECKER_CELL_SOURCE" not in solved  # remove-input: source never shown, even here


def test_public_config_hides_solutions_and_the_guide():
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert cfg["sphinx"]["config"]["hide_solutions"] is True
    assert "book_solutions" in cfg["sphinx"]["local_extensions"]
    toc = (ROOT / "_toc.yml").read_text()
    assert "instructor_guide" not in toc
    inst = _instructor_module()
    assert "book/instructor_guide" in yaml.safe_dump(inst.instructor_toc(yaml.safe_load(toc)))
