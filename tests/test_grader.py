"""The isolated grader (instructor/grader.py): a grading round trip with the submissions a class
produces -- cheats, typical mistakes, a hang, a correct one -- each asserted to its score.

Every item of a submission runs in a fresh process forked from a zygote that imported a fresh
read-only copy of the checker before any student code ran; the scores are computed here, in the
grading process. A submission is the source notebook with its solution cells replaced."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

from instructor.grader import Grader  # noqa: E402
from mesa_lib.classroom.rubric import items  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "book" / "10_exercises.ipynb"
STUB = "# YOUR CODE HERE\nraise NotImplementedError()\n"

# the typical-mistakes submission: grade_id of the solution cell -> its code (also graded by
# nbgrader in tests/test_nbgrader.py)
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
# its expected points per graded cell (the others keep full marks)
FAULTY_POINTS = {"ex-stamp-check": 0, "ex-testing-check": 0, "ex-hinge-check": 0, "ex-gibbs-check": 2,
                 "ex-mass-check": 1, "ex-mixture-check": 0, "ex-dv-check": 1, "ex-mine-step-check": 0,
                 "ex-retrain-check": 0, "ex-asr-check": 0}
FAULTY_WORDS = {"ex-stamp-check": "reference implementation", "ex-testing-check": "without Python loops",
                "ex-hinge-check": "summed over the batch", "ex-dv-check": "overflows",
                "ex-mine-step-check": "zero_grad", "ex-mixture-check": "not implemented yet",
                "ex-asr-check": "TRUE label", "ex-mass-check": "f = beta"}

PATCH_CHECKER = ("import mesa_lib.classroom.grading as _g, mesa_lib.classroom.checks as _c\n"
                 "_full = lambda name, fn, cases, **kw: _g.Score(len(cases), len(cases), name, 'Correct!')\n"
                 "_g.grade = _full\n_c.grade = _full\n")
REBIND = "".join(f"{c} = lambda *a, **k: None\n" for c in (
    "check_stamp_one", "check_stamp", "check_canonical", "check_testing_function", "check_hinge",
    "check_gibbs_optimum", "check_valid_mass", "check_mixture_sample", "check_dv_bound", "check_mine_step",
    "check_anomaly_index", "check_retrain_transform", "check_attack_success"))
HARD_CODE = ("def stamp_one(image, trigger, row, col):\n    return image.clone()\n"
             "print(check_stamp_one(stamp_one, hidden=True))\n")
DISGUISED = {
    # exec of the library's source, in a copy of its module's namespace
    "ex-stamp-solution": "import inspect\nfrom mesa_lib import triggers as _t\n_ns = dict(vars(_t))\n"
                         "exec(inspect.getsource(_t.stamp), _ns)\nmy_stamp = _ns['stamp']\n",
    # a new function from the library's code object
    "ex-patterns-solution": "import types\nfrom mesa_lib.triggers import canonical_id as _ci\n"
                            "my_canonical = types.FunctionType(_ci.__code__, _ci.__globals__)\n",
    # a loop in disguise
    "ex-testing-solution": "def testing_function(classifier, stamped, targets):\n"
                           "    t = torch.as_tensor(targets).expand(len(stamped))\n"
                           "    probs = classifier(stamped).softmax(1)\n"
                           "    return torch.stack(list(map(lambda b: probs[b, t[b]], range(len(stamped)))))\n",
    # the library's detector and ASR helpers, not forbidden before
    "ex-scan-solution": "from mesa_lib.detect import anomaly_index_of_top as anomaly_index\n",
    "ex-asr-solution": "from mesa_lib.evaluate import asr_per_trigger\n\n"
                       "def attack_success(model, images, labels, trigger, target, generator):\n"
                       "    keep = labels != target\n"
                       "    return float(asr_per_trigger(model, images[keep], trigger[None], target)[0])\n",
}
TAMPER = ("import pathlib, mesa_lib.classroom as _m\n_p = pathlib.Path(_m.__file__)\n"
          "_p.chmod(0o644)\n_p.parent.chmod(0o755)\n"
          "with open(_p, 'a') as _f:\n"
          "    _f.write('\\nfrom . import grading as _g\\n_g.grade = lambda n, fn, c, **k: _g.Score(len(c), len(c), n)\\n')\n")
HANG_IN_FUNCTION = ("import time\n\ndef stamp_one(image, trigger, row, col):\n    while True:\n        try:\n"
                    "            time.sleep(0.05)\n        except:  # noqa: E722 - swallows the interrupt\n"
                    "            pass\n")
HANG_IN_CELL = "while True:\n    try:\n        pass\n    except:  # noqa: E722\n        pass\n"


def _solutions() -> dict[str, str]:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    return {c.metadata["nbgrader"]["grade_id"]: c.source for c in nb.cells
            if c.cell_type == "code" and c.metadata.get("nbgrader", {}).get("solution")}


def _stub(solution: str) -> str:
    """The released version of a solution cell: its ``def`` line, then nbgrader's stub."""
    head = next(line for line in solution.splitlines() if line.startswith("def "))
    return head + "\n    " + STUB.replace("\n", "\n    ").rstrip() + "\n"


def _submission(replace: dict[str, str], blank: bool = False, notebook: Path = NOTEBOOK):
    """The source notebook with its solution cells blank (``blank``: the released stubs) or
    solved, then ``replace``d."""
    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if cell.metadata.get("nbgrader", {}).get("solution"):
            cell.source = replace.get(gid, _stub(cell.source) if blank else cell.source)
    return nb


@pytest.fixture(scope="module")
def round_trip():
    """Grade the submissions in this order with one grader (the blank one right after the tampering one)."""
    first = next(iter(_solutions()))
    subs = {
        "correct": _submission({}),
        "typical mistakes": _submission(FAULTY),
        "patch the checker": _submission({first: _stub(_solutions()[first]) + PATCH_CHECKER}, blank=True),
        "rebind the checks": _submission({first: _stub(_solutions()[first]) + REBIND}, blank=True),
        "hard-code, hidden=True": _submission({first: HARD_CODE}, blank=True),
        "disguised reference": _submission(DISGUISED, blank=True),
        "tamper with the package": _submission({first: _stub(_solutions()[first]) + TAMPER}, blank=True),
        "blank, graded next": _submission({}, blank=True),
        "hang": _submission({"ex-stamp-one-solution": HANG_IN_FUNCTION, "ex-mixture-solution": HANG_IN_CELL}),
    }
    g = Grader(NOTEBOOK, cell_limit=5.0, check_limit=10.0)
    return {name: g.grade(nb) for name, nb in subs.items()}


def _total(res) -> float:
    return sum(r.points for r in res.values())


MAX = sum(i.points for i in items(NOTEBOOK))


@pytest.mark.slow
def test_correct_submission_gets_full_marks(round_trip):
    res = round_trip["correct"]
    assert _total(res) == MAX >= 30, {k: r.feedback for k, r in res.items() if r.points < r.max_points}


@pytest.mark.slow
def test_typical_mistakes_get_the_rubric_partial_credit(round_trip):
    res = round_trip["typical mistakes"]
    want = {i.grade_id: FAULTY_POINTS.get(i.grade_id, i.points) for i in items(NOTEBOOK)}
    assert {k: r.points for k, r in res.items()} == want
    for gid, words in FAULTY_WORDS.items():
        assert words.lower() in res[gid].feedback.lower(), (gid, res[gid].feedback)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["patch the checker", "rebind the checks", "hard-code, hidden=True",
                                  "disguised reference", "tamper with the package", "blank, graded next"])
def test_cheats_score_zero(round_trip, name):
    res = round_trip[name]
    assert _total(res) == 0, {k: r.feedback for k, r in res.items() if r.points}


@pytest.mark.slow
def test_disguised_references_are_named(round_trip):
    res = round_trip["disguised reference"]
    for gid in ("ex-stamp-check", "ex-patterns-check", "ex-scan-check", "ex-asr-check"):
        assert "reference implementation" in res[gid].feedback, res[gid].feedback
    assert "map(" in res["ex-testing-check"].feedback


@pytest.mark.slow
def test_a_hang_costs_only_its_item(round_trip):
    res = round_trip["hang"]
    assert res["ex-stamp-one-check"].points == 0 and "ran longer than" in res["ex-stamp-one-check"].feedback
    assert res["ex-mixture-check"].points == 0 and "stopped" in res["ex-mixture-check"].feedback
    lost = {k for k, r in res.items() if r.points < r.max_points}
    assert lost == {"ex-stamp-one-check", "ex-mixture-check"}, {k: res[k].feedback for k in lost}


def test_the_grader_does_not_run_student_code_in_its_own_process():
    """Building a grader reads files only; it imports no submission, and the checker it hands to
    its processes is its own bytes of mesa_lib and instructor."""
    g = Grader(NOTEBOOK)
    assert "mesa_lib/classroom/checks.py" in g.files and "instructor/hidden.py" in g.files
    assert all(not k.endswith(".pyc") for k in g.files)
