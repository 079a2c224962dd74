"""A real nbgrader round trip on the graded assignment (book/10_exercises.ipynb).

In a temporary course directory: ``nbgrader generate_assignment`` makes the student version
(no solution, no hidden test, no explanation leaks), then ``nbgrader autograde`` grades two
submissions made from it: one with the solutions filled in (full marks), one with typical
faults (the reference handed in, a loop where loops are forbidden, wrong answers, an item left
undone), whose per-item scores are checked against the checkers' partial credit. Scores are
read from nbgrader's gradebook.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("nbgrader", reason="nbgrader is not installed (it is in the `test` extra: pip install -e '.[test]')")
nbformat = pytest.importorskip("nbformat")

from nbgrader.api import Gradebook  # noqa: E402

from mesa_lib.classroom.rubric import items  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "book" / "10_exercises.ipynb"
ASSIGNMENT = "mesa"
NB_NAME = NOTEBOOK.stem

# the faulty submission: grade_id of the solution cell -> its code
FAULTY = {
    # the reference, under the student's name
    "ex-stamp-solution": "from mesa_lib import stamp\n\ndef my_stamp(images, triggers, locations):\n"
                         "    return stamp(images, triggers, locations)\n",
    # right values, but a comprehension where loops are forbidden
    "ex-testing-solution": "def testing_function(classifier, stamped, targets):\n"
                           "    t = torch.as_tensor(targets).expand(len(stamped))\n"
                           "    probs = classifier(stamped).softmax(1)\n"
                           "    return torch.stack([probs[b, t[b]] for b in range(len(stamped))])\n",
    # summed instead of averaged: wrong in every case
    "ex-hinge-solution": "def hinge_loss(f, beta):\n"
                         "    return -torch.minimum(f, torch.as_tensor(beta, dtype=f.dtype)).sum()\n",
    # overflows for alpha = 1e-3: 2 of 3
    "ex-gibbs-solution": "def gibbs_optimum(f, beta, alpha):\n"
                         "    w = torch.exp(torch.clamp(f, max=beta) / alpha)\n    return w / w.sum()\n",
    # f >= beta: wrong only in the case with ties, 1 of 2
    "ex-mass-solution": "def valid_mass(f, beta, alpha):\n"
                        "    return gibbs_optimum(f, beta, alpha)[f >= beta].sum().item()\n",
    # not done
    "ex-mixture-solution": "def mixture_sample(candidates, gammas, generator):\n"
                           "    # YOUR CODE HERE\n    raise NotImplementedError()\n",
    # naive exp: right for ordinary values only, 1 of 3
    "ex-dv-solution": "def my_dv_bound(t_joint, t_marginal):\n"
                      "    return t_joint.mean() - torch.log(torch.exp(t_marginal).mean())\n",
    # forgets zero_grad: 0 of 3
    "ex-mine-step-solution": "def mine_step(T, optimizer, z, x, z_marginal):\n"
                             "    x = x.detach()\n    bound = my_dv_bound(T(z, x), T(z_marginal, x))\n"
                             "    (-bound).backward()\n    optimizer.step()\n    return bound.detach()\n",
    # calls the library's transform: 0
    "ex-retrain-solution": "from mesa_lib.defense import stamp_transform\n\n"
                           "def retrain_transform(x, y, sampler, ratio, generator):\n"
                           "    return stamp_transform(sampler, ratio)(x, y, generator)\n",
    # counts the target-class images too: 0 of 2
    "ex-asr-solution": "def attack_success(model, images, labels, trigger, target, generator):\n"
                       "    stamped = paste_at_random(images, trigger, generator)\n"
                       "    return (model(stamped).argmax(1) == target).float().mean().item()\n",
}
# expected points of the faulty submission per graded cell (the others keep full marks)
FAULTY_POINTS = {"ex-stamp-check": 0, "ex-testing-check": 0, "ex-hinge-check": 0, "ex-gibbs-check": 2,
                 "ex-mass-check": 1, "ex-mixture-check": 0, "ex-dv-check": 1, "ex-mine-step-check": 0,
                 "ex-retrain-check": 0, "ex-asr-check": 0}


# patches the checker in the kernel and rebinds every check_* name to a no-op (issue 20)
CHEAT = ("import mesa_lib.classroom.grading as _g, mesa_lib.classroom.checks as _c\n"
         "_full = lambda name, fn, cases, **kw: _g.Score(len(cases), len(cases), name, 'Correct!')\n"
         "_g.grade = _full\n_c.grade = _full\n"
         + "".join(f"{c} = lambda *a, **k: None\n" for c in (
             "check_stamp_one", "check_stamp", "check_canonical", "check_testing_function", "check_hinge",
             "check_gibbs_optimum", "check_valid_mass", "check_mixture_sample", "check_dv_bound",
             "check_mine_step", "check_anomaly_index", "check_retrain_transform", "check_attack_success")))


def _nbgrader(course: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("MPLBACKEND", None)
    res = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res


def _submit(course: Path, student: str, replace: dict[str, str]) -> None:
    """A submission: the released notebook with the solution cells filled in."""
    released = nbformat.read(course / "release" / ASSIGNMENT / NOTEBOOK.name, as_version=4)
    for cell in released.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in replace:
            cell.source = replace[gid]
    dest = course / "submitted" / student / ASSIGNMENT
    dest.mkdir(parents=True)
    nbformat.write(released, dest / NOTEBOOK.name)


@dataclass
class Course:
    path: Path
    scores: dict[str, dict[str, float]]  # student -> grade_id -> points
    totals: dict[str, tuple[float, float]]  # student -> (score, max score)


def _read_gradebook(course: Path) -> tuple[dict, dict]:
    scores, totals = {}, {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for student in ("good", "faulty", "cheat"):
            nb = gb.find_submission_notebook(NB_NAME, ASSIGNMENT, student)
            scores[student] = {g.name: g.score for g in nb.grades if g.max_score > 0}
            sub = gb.find_submission(ASSIGNMENT, student)
            totals[student] = (sub.score, sub.max_score)
    return scores, totals


@pytest.fixture(scope="module")
def course(tmp_path_factory) -> Course:
    # nbgrader runs the `alembic` script of its environment: put that environment's bin first
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
        path = _make_course(tmp_path_factory.mktemp("course"))
        scores, totals = _read_gradebook(path)
    return Course(path, scores, totals)


def _make_course(course: Path) -> Path:
    (course / "nbgrader_config.py").write_text(
        "c = get_config()\n"
        "c.CourseDirectory.course_id = 'mesa-book'\n"
        "c.Execute.timeout = 300  # seconds per cell (nbgrader's default, 30, is tight on a busy machine)\n"
    )
    # the source as the instructor guide makes it: the solved notebook, markdown made plain
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_handouts.py"), str(NOTEBOOK),
                          "--nbgrader-source", str(course / "source" / ASSIGNMENT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    _nbgrader(course, "generate_assignment", ASSIGNMENT, "--force")

    solved = nbformat.read(NOTEBOOK, as_version=4)
    solutions = {c.metadata["nbgrader"]["grade_id"]: c.source for c in solved.cells
                 if c.metadata.get("nbgrader", {}).get("solution") and c.cell_type == "code"}
    _submit(course, "good", solutions)
    _submit(course, "faulty", {**solutions, **FAULTY})
    # nothing implemented; the first cell patches the checker and rebinds every check_* name
    stubs = {gid: next(line for line in src.splitlines() if line.startswith("def ")) +
             "\n    # YOUR CODE HERE\n    raise NotImplementedError()\n" for gid, src in solutions.items()}
    first = next(iter(solutions))
    _submit(course, "cheat", {**stubs, first: stubs[first] + CHEAT})
    _nbgrader(course, "autograde", ASSIGNMENT, "--create", "--force")
    return course


def test_student_version_leaks_nothing(course):
    hand = nbformat.read(course.path / "release" / ASSIGNMENT / NOTEBOOK.name, as_version=4)
    solved = nbformat.read(NOTEBOOK, as_version=4)
    text = "\n".join(c.source for c in hand.cells)
    assert "BEGIN SOLUTION" not in text and "BEGIN HIDDEN TESTS" not in text
    assert "hidden=True" not in text
    public = "\n".join(c.source for c in solved.cells if not c.metadata.get("nbgrader", {}).get("solution"))
    for cell in solved.cells:
        if not cell.metadata.get("nbgrader", {}).get("solution"):
            continue
        region = cell.source.split("### BEGIN SOLUTION", 1)[1].split("### END SOLUTION", 1)[0]
        for line in region.splitlines():
            line = line.strip()
            if len(line) > 12:
                assert line not in text or line in public, f"solution text leaked into the student version: {line}"
    assert text.count("raise NotImplementedError()") == len(items(solved))
    assert all(c.get("outputs", []) == [] for c in hand.cells if c.cell_type == "code")
    # readable in plain Jupyter: no instructor-only paragraph, no solution-marker cell, no MyST fence
    md = "\n".join(c.source for c in hand.cells if c.cell_type == "markdown")
    assert "instructor-only" not in md and "For instructors" not in md
    assert not re.search(r"\{(solution|solution-start|solution-end|exercise)\}", md)
    assert not [c for c in hand.cells if c.cell_type == "markdown" and not c.source.strip()]
    assert "For instructors" in "\n".join(c.source for c in solved.cells)  # the source had it


def test_correct_submission_gets_full_marks(course):
    score, max_score = course.totals["good"]
    expected = sum(i.points for i in items(nbformat.read(NOTEBOOK, as_version=4)))
    assert max_score == expected >= 30
    assert score == max_score, course.scores["good"]


def test_faulty_submission_gets_partial_credit(course):
    got = course.scores["faulty"]
    solved = nbformat.read(NOTEBOOK, as_version=4)
    want = {i.grade_id: FAULTY_POINTS.get(i.grade_id, i.points) for i in items(solved)}
    assert got == want
    score, max_score = course.totals["faulty"]
    assert score == sum(want.values()) and 0 < score < max_score


def test_feedback_names_the_mistakes(course):
    """The autograded notebook holds the checkers' messages for the student."""
    graded = nbformat.read(course.path / "autograded" / "faulty" / ASSIGNMENT / NOTEBOOK.name, as_version=4)
    out = {c.metadata["nbgrader"]["grade_id"]: "".join(o.get("text", "") for o in c.outputs)
           for c in graded.cells if c.cell_type == "code" and c.metadata.get("nbgrader", {}).get("grade")}
    assert "reference implementation" in out["ex-stamp-check"]
    assert "without Python loops" in out["ex-testing-check"]
    assert "summed over the batch" in out["ex-hinge-check"]
    assert "overflows" in out["ex-dv-check"]
    assert "zero_grad" in out["ex-mine-step-check"]
    assert "not implemented yet" in out["ex-mixture-check"]
    assert "TRUE label" in out["ex-asr-check"]
    assert re.search(r"f = beta", out["ex-mass-check"])
    json.dumps(out)  # plain text, nothing else


def test_patched_checker_and_rebound_checks_score_zero(course):
    """The hidden tests grade in the isolated grader: what the notebook patched or rebound in its
    kernel does not reach it (before issue 20 this submission got full marks)."""
    score, max_score = course.totals["cheat"]
    assert max_score >= 30 and score == 0, course.scores["cheat"]
