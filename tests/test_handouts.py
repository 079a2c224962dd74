"""scripts/make_handouts.py: the student version of the assignment, as nbgrader makes it, with
the book's MyST turned into Markdown that plain Jupyter renders."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "book" / "10_exercises.ipynb"

spec = importlib.util.spec_from_file_location("make_handouts", ROOT / "scripts" / "make_handouts.py")
mh = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mh)

HAS_NBGRADER = importlib.util.find_spec("nbgrader") is not None
MYST_ROLE = re.compile(r"\{[\w:-]+\}`")


def run_handouts(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "make_handouts.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def _md_text(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


@pytest.fixture(scope="module")
def handout(tmp_path_factory) -> nbformat.NotebookNode:
    out = tmp_path_factory.mktemp("handouts")
    res = run_handouts("--out", str(out))
    assert res.returncode == 0, res.stderr
    return nbformat.read(out / NOTEBOOK.name, as_version=4)


def test_no_solution_and_no_hidden_test_survives(handout):
    solved = nbformat.read(NOTEBOOK, as_version=4)
    text = "\n".join(c.source for c in handout.cells)
    public = "\n".join(c.source for c in solved.cells if not c.metadata.get("nbgrader", {}).get("solution"))
    for cell in solved.cells:
        if "### BEGIN SOLUTION" in cell.source:
            region = cell.source.split("### BEGIN SOLUTION", 1)[1].split("### END SOLUTION", 1)[0]
            for line in region.splitlines():
                if len(line.strip()) > 12:
                    # (a line that the task statements also hold is no leak)
                    assert line.strip() not in text or line.strip() in public, f"solution line leaked: {line.strip()}"
    assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text and "hidden=True" not in text
    assert text.count("raise NotImplementedError()") >= 12
    assert all(c.outputs == [] and c.execution_count is None for c in handout.cells if c.cell_type == "code")
    # every check cell is kept, with its public example
    checks = re.findall(r"^(check_\w+\(\w+\))$", text, re.M)
    assert len(checks) >= 12


def test_front_matter_is_the_student_version(handout):
    first = handout.cells[0].source
    assert first.splitlines()[0] == "# Graded assignment (student version)"
    md = _md_text(handout).lower()
    for word in ("solution", "solved", "dropdown", "instructor-only"):
        assert word not in md, f"the student version mentions {word!r}"


def test_no_unrendered_myst(handout):
    md = _md_text(handout)
    assert not MYST_ROLE.search(md), MYST_ROLE.search(md)
    assert "{exercise}" not in md and "{solution" not in md and ":label:" not in md
    assert "[](" not in md
    # roles became readable text and links
    assert "(Qiao et al., 2019)" in md
    assert "(Belghazi et al., 2018)" in md
    assert "definition *Sub-model loss* ([The max-entropy staircase](04_staircase.ipynb))" in md
    assert "[Detecting the target class](07_detection.ipynb)" in md
    assert "### Exercise: Stamp a batch without a loop" in md


@pytest.mark.skipif(not HAS_NBGRADER, reason="nbgrader is not installed (it is in the `test` extra)")
def test_code_cells_are_nbgraders(handout):
    """The code cells are those of nbgrader's preprocessors, and the fallback strips the same."""
    solved = nbformat.read(NOTEBOOK, as_version=4)
    via_nbgrader = mh.student_version(solved, use_nbgrader=True)
    fallback = mh.student_version(solved, use_nbgrader=False)
    code = [c.source for c in handout.cells if c.cell_type == "code"]
    assert code == [c.source for c in via_nbgrader.cells if c.cell_type == "code"]
    assert code == [c.source for c in fallback.cells if c.cell_type == "code"]
    # nbgrader's lock flags and checksums travel with the cells
    locked = [c for c in handout.cells if c.metadata.get("nbgrader", {}).get("locked")]
    assert locked and all(c.metadata.get("editable") is False for c in locked)


def test_render_myst_roles():
    r = mh.render_myst
    assert r("see {cite}`qiao2019mesa,wang2019neuralcleanse`") == "see (Qiao et al., 2019; Wang et al., 2019)"
    assert r("{doc}`05_mine`") == "[Entropy through mutual information](05_mine.ipynb)"
    assert r("{glue:text}`n_classes` classes") == "(a number computed in the book) classes"
    assert r("{math}`x^2`") == "$x^2$"
    assert r("{ref}`the table <tab-x>`") == "the table"
    assert r("[](02_backdoor.ipynb)") == "[Backdoor injection](02_backdoor.ipynb)"
    assert r("a <!-- instructor-only -->secret<!-- /instructor-only -->b") == "a b"
    assert r("```{exercise} T\n:label: x\n\nBody.\n```") == "### Exercise: T\n\nBody."


# --------------------------------------------------------------------------- small notebooks
def _notebook(cells):
    return {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                        "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def _code(src, gid, **nbg):
    meta = {"nbgrader": {"grade": False, "grade_id": gid, "locked": False, "schema_version": 3,
                         "solution": False, "task": False, **nbg}}
    return {"cell_type": "code", "execution_count": 3, "id": gid, "metadata": meta,
            "outputs": [{"output_type": "stream", "name": "stdout", "text": "Correct!\n"}], "source": src}


def _md(src, gid):
    return {"cell_type": "markdown", "id": gid, "metadata": {}, "source": src}


def test_make_handouts_on_a_small_notebook(tmp_path):
    nb = _notebook([
        _md("# Tasks\n\nIntro.\n<!-- instructor-only -->\nSolved here.\n<!-- /instructor-only -->", "m0"),
        _md("```{exercise} Stamping\n:label: ex-a\n\nWrite `f`.\n```", "m1"),
        _md("```{solution-start} ex-a\n:class: dropdown\n```", "m2"),
        _md("Explanation: SECRET_GATED.", "m3"),
        _code("def f(x):\n    \"\"\"Doc.\"\"\"\n    ### BEGIN SOLUTION\n    return SECRET_42 + x\n    ### END SOLUTION\n",
              "sol", solution=True),
        _md("```{solution-end}\n```", "m4"),
        _code("check(f)\n### BEGIN HIDDEN TESTS\ncheck(f, hidden=True)\n### END HIDDEN TESTS", "chk",
              grade=True, locked=True, points=2),
    ])
    src = tmp_path / "ex.ipynb"
    src.write_text(json.dumps(nb))
    for flag in (("",) if HAS_NBGRADER else ()) + ("--no-nbgrader",):
        out_dir = tmp_path / f"out{flag}"
        res = run_handouts(str(src), "--out", str(out_dir), *([flag] if flag else []))
        assert res.returncode == 0, res.stderr
        hand = json.loads((out_dir / "ex.ipynb").read_text())
        text = json.dumps(hand)
        for secret in ("SECRET_42", "SECRET_GATED", "Solved here", "hidden=True", "BEGIN", "solution-start"):
            assert secret not in text, (flag, secret)
        sources = ["".join(c["source"]).rstrip("\n") for c in hand["cells"]]
        assert sources[0] == "# Tasks (student version)\n\nIntro."
        assert 'def f(x):\n    """Doc."""\n    # YOUR CODE HERE\n    raise NotImplementedError()' in sources
        assert "check(f)" in sources
        assert all(c.get("outputs", []) == [] for c in hand["cells"] if c["cell_type"] == "code")
        assert sources[1] == "### Exercise: Stamping\n\nWrite `f`."


def test_make_handouts_rejects_unbalanced_markers(tmp_path):
    nb = _notebook([_code("def f():\n    ### BEGIN SOLUTION\n    return 1\n", "sol", solution=True)])
    src = tmp_path / "bad.ipynb"
    src.write_text(json.dumps(nb))
    for flag in ("--no-nbgrader",) + (("",) if HAS_NBGRADER else ()):
        res = run_handouts(str(src), "--out", str(tmp_path / "out"), *([flag] if flag else []))
        assert res.returncode != 0
        assert "end solution" in res.stderr.lower()
