"""Tests of mesa_lib.exercises: each checker accepts the reference solution and rejects typical
wrong answers with a message that names the mistake; and of scripts/make_handouts.py."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from mesa_lib.exercises import (
    CORRECT,
    check_canonical,
    check_dv_bound,
    check_hinge,
    check_retrain_transform,
    check_stamp,
    reference_hinge_loss,
)
from mesa_lib.mine import dv_bound
from mesa_lib.defense import stamp_transform
from mesa_lib.triggers import canonical_id, pattern_from_id, pattern_id, stamp, symmetry_class

ROOT = pathlib.Path(__file__).resolve().parents[1]


def verdict(checker, fn, capsys) -> tuple[bool, str]:
    ok = checker(fn)
    return ok, capsys.readouterr().out


def assert_rejected(checker, fn, capsys, *words: str) -> None:
    ok, out = verdict(checker, fn, capsys)
    assert ok is False, out
    assert CORRECT not in out
    for w in words:
        assert w.lower() in out.lower(), f"expected {w!r} in the message, got: {out}"


# --------------------------------------------------------------------------- stamp
def good_stamp(images, triggers, locations):
    return stamp(images, triggers, locations)


def loop_stamp(images, triggers, locations):
    """A correct but loopy answer: the checker judges behaviour, not style."""
    out = images.clone()
    p = triggers.shape[-1]
    for b, (r, c) in enumerate(locations.tolist()):
        out[b, :, r:r + p, c:c + p] = triggers[b]
    return out


def inplace_stamp(images, triggers, locations):
    p = triggers.shape[-1]
    for b, (r, c) in enumerate(locations.tolist()):
        images[b, :, r:r + p, c:c + p] = triggers[b].detach()
    return images


def swapped_stamp(images, triggers, locations):
    return stamp(images, triggers, locations.flip(1))


def off_by_one_stamp(images, triggers, locations):
    out = images.clone()
    p = triggers.shape[-1]
    for b, (r, c) in enumerate(locations.tolist()):
        out[b, :, r:r + p, c:c + p] = triggers[b]
        out[b, :, r + p - 1:r + p + 1, c] = 0.0  # overwrites one row below the patch
    return out


def detached_stamp(images, triggers, locations):
    return stamp(images, triggers.detach(), locations)


def first_trigger_stamp(images, triggers, locations):
    return stamp(images, triggers[0], locations)


def test_check_stamp_accepts_reference_and_loop(capsys):
    assert verdict(check_stamp, good_stamp, capsys) == (True, CORRECT + "\n")
    assert verdict(check_stamp, loop_stamp, capsys)[0]


@pytest.mark.parametrize("fn, words", [
    (inplace_stamp, ["in place"]),
    (swapped_stamp, ["swapped"]),
    (lambda i, t, l: stamp(i, t.transpose(-1, -2), l), ["transposed"]),
    (off_by_one_stamp, ["outside the patch"]),
    (detached_stamp, ["not differentiable"]),
    (first_trigger_stamp, ["patch does not hold the trigger"]),
    (lambda i, t, l: stamp(i, t, l)[0], ["wrong shape"]),
    (lambda i, t, l: i.numpy(), ["must be a torch.tensor"]),
])
def test_check_stamp_rejects(fn, words, capsys):
    assert_rejected(check_stamp, fn, capsys, *words)


def test_not_implemented_is_explained(capsys):
    def todo(*args):
        raise NotImplementedError()

    for checker in (check_stamp, check_hinge, check_dv_bound, check_retrain_transform, check_canonical):
        assert_rejected(checker, todo, capsys, "not implemented yet")


def test_student_exception_is_reported_not_raised(capsys):
    assert_rejected(check_stamp, lambda i, t, l: i @ t, capsys, "raised RuntimeError")


# --------------------------------------------------------------------------- hinge
def test_reference_hinge_is_the_training_line():
    f = torch.tensor([0.2, 0.9, 0.6])
    assert reference_hinge_loss(f, 0.8).item() == pytest.approx(-(0.2 + 0.8 + 0.6) / 3)


def test_check_hinge_accepts_reference_and_clamp(capsys):
    assert verdict(check_hinge, reference_hinge_loss, capsys)[0]
    assert verdict(check_hinge, lambda f, b: -torch.where(f < b, f, b).mean(), capsys)[0]


@pytest.mark.parametrize("fn, words", [
    (lambda f, b: torch.minimum(f, torch.as_tensor(b)).mean(), ["wrong sign"]),
    (lambda f, b: -torch.minimum(f, torch.as_tensor(b)).sum(), ["summed"]),
    (lambda f, b: -torch.maximum(f, torch.as_tensor(b)).mean(), ["max(f, beta)"]),
    (lambda f, b: -f.mean(), ["not capped"]),
    (lambda f, b: -torch.minimum(f, torch.as_tensor(b)), ["scalar"]),
    (lambda f, b: -torch.minimum(f.detach(), torch.as_tensor(b)).mean(), ["not differentiable"]),
    (lambda f, b: -f.data.clamp_(max=0.8).mean(), ["in place"]),
    (lambda f, b: -torch.minimum(f, torch.as_tensor(0.8)).mean(), ["wrong value"]),
])
def test_check_hinge_rejects(fn, words, capsys):
    assert_rejected(check_hinge, fn, capsys, *words)


def test_check_hinge_rejects_wrong_gradient(capsys):
    # right value, but a straight-through trick lets samples above beta keep a gradient
    def leaky(f, b):
        capped = torch.minimum(f, torch.as_tensor(b))
        return -(f + (capped - f).detach()).mean()

    assert_rejected(check_hinge, leaky, capsys, "f > beta still get a gradient")


# --------------------------------------------------------------------------- DV bound
def naive_dv(tj, tm):
    return tj.mean() - torch.log(torch.exp(tm).mean())


def test_check_dv_accepts_reference(capsys):
    assert verdict(check_dv_bound, dv_bound, capsys)[0]
    stable_manual = lambda tj, tm: tj.mean() - (tm.max() + torch.log(torch.exp(tm - tm.max()).mean()))
    assert verdict(check_dv_bound, stable_manual, capsys)[0]


@pytest.mark.parametrize("fn, words", [
    (naive_dv, ["overflows", "logsumexp"]),
    (lambda tj, tm: tj.mean() - torch.logsumexp(tm, 0), ["log(n)"]),
    (lambda tj, tm: dv_bound(tm, tj), ["swapped"]),
    (lambda tj, tm: tj.mean() - tm.mean(), ["jensen"]),
    (lambda tj, tm: -dv_bound(tj, tm), ["wrong sign"]),
    (lambda tj, tm: dv_bound(tj, tm).detach(), ["not differentiable"]),
    (lambda tj, tm: (tj - torch.logsumexp(tm, 0)), ["scalar"]),
    (lambda tj, tm: dv_bound(tj, tm).item(), ["must be a torch.tensor"]),
])
def test_check_dv_rejects(fn, words, capsys):
    assert_rejected(check_dv_bound, fn, capsys, *words)


# --------------------------------------------------------------------------- retraining transform
def good_transform(x, y, sampler, ratio, g):
    return stamp_transform(sampler, ratio)(x, y, g)


def manual_transform(x, y, sampler, ratio, g):
    k = int(round(ratio * len(x)))
    k = max(k, 1) if ratio > 0 else 0
    x = x.clone()
    if k:
        x[:k] = stamp(x[:k], sampler.sample(k, generator=g), generator=g)
    return x, y


def relabel_transform(x, y, sampler, ratio, g):
    x, y = manual_transform(x, y, sampler, ratio, g)
    y = y.clone()
    y[: max(1, int(round(ratio * len(x))))] = 0
    return x, y


def inplace_transform(x, y, sampler, ratio, g):
    k = max(1, int(round(ratio * len(x)))) if ratio > 0 else 0
    if k:
        x[:k] = stamp(x[:k], sampler.sample(k, generator=g), generator=g)
    return x, y


def no_minimum_transform(x, y, sampler, ratio, g):
    k = int(ratio * len(x))
    x = x.clone()
    if k:
        x[:k] = stamp(x[:k], sampler.sample(k, generator=g), generator=g)
    return x, y


def fixed_corner_transform(x, y, sampler, ratio, g):
    k = max(1, int(round(ratio * len(x)))) if ratio > 0 else 0
    x = x.clone()
    if k:
        x[:k] = stamp(x[:k], sampler.sample(k, generator=g), (0, 0))
    return x, y


def last_k_transform(x, y, sampler, ratio, g):
    k = max(1, int(round(ratio * len(x)))) if ratio > 0 else 0
    x = x.clone()
    if k:
        x[-k:] = stamp(x[-k:], sampler.sample(k, generator=g), generator=g)
    return x, y


def test_check_retrain_accepts_reference_and_manual(capsys):
    assert verdict(check_retrain_transform, good_transform, capsys)[0]
    assert verdict(check_retrain_transform, manual_transform, capsys)[0]


@pytest.mark.parametrize("fn, words", [
    (relabel_transform, ["labels changed", "true labels"]),
    (inplace_transform, ["in place"]),
    (no_minimum_transform, ["at least one image"]),
    (fixed_corner_transform, ["same place", "random location"]),
    (last_k_transform, ["first k"]),
    (lambda x, y, s, r, g: x, ["pair"]),
])
def test_check_retrain_rejects(fn, words, capsys):
    assert_rejected(check_retrain_transform, fn, capsys, *words)


# --------------------------------------------------------------------------- 51 patterns
def canon_from(rotate: bool, flip: bool, invert: bool):
    def canon(i: int) -> int:
        imgs = [pattern_from_id(i)]
        if flip:
            imgs += [torch.flip(q, dims=[1]) for q in imgs]
        if rotate:
            imgs = [torch.rot90(q, k, dims=(0, 1)) for q in imgs for k in range(4)]
        if invert:
            imgs += [1 - q for q in imgs]
        return min(pattern_id(q) for q in imgs)

    return canon


def test_check_canonical(capsys):
    assert verdict(check_canonical, canonical_id, capsys)[0]
    assert verdict(check_canonical, canon_from(True, True, True), capsys)[0]
    assert_rejected(check_canonical, canon_from(True, True, False), capsys, "without colour inversion")
    assert_rejected(check_canonical, canon_from(True, False, True), capsys, "without mirror flips")
    assert_rejected(check_canonical, lambda i: max(symmetry_class(i)), capsys, "smallest")
    assert_rejected(check_canonical, lambda i: float(canonical_id(i)), capsys, "python int")


# --------------------------------------------------------------------------- handouts
def _notebook(cells):
    return {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                        "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def _code(src, **meta):
    return {"cell_type": "code", "execution_count": 3, "id": f"c{abs(hash(src)) % 10**8}",
            "metadata": meta, "outputs": [{"output_type": "stream", "name": "stdout", "text": "Correct!\n"}],
            "source": src}


def _md(src):
    return {"cell_type": "markdown", "id": f"m{abs(hash(src)) % 10**8}", "metadata": {}, "source": src}


def run_handouts(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "make_handouts.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_make_handouts_on_a_small_notebook(tmp_path):
    nb = _notebook([
        _md("```{exercise} Stamping\n:label: ex-a\n\nWrite `f`.\n```"),
        _md("```{solution-start} ex-a\n:class: dropdown\n```"),
        _md("Explanation: SECRET_GATED."),
        _code("def f(x):\n    \"\"\"Doc.\"\"\"\n    ### BEGIN SOLUTION\n    return SECRET_42 + x\n    ### END SOLUTION\n"),
        _md("```{solution-end}\n```"),
        _code("assert check(f)"),
        _md("```{solution} ex-a\n:class: dropdown\nThe trick is SECRET_TEXT.\n```"),
    ])
    src = tmp_path / "ex.ipynb"
    src.write_text(json.dumps(nb))
    out_dir = tmp_path / "out"
    res = run_handouts(str(src), "--out", str(out_dir))
    assert res.returncode == 0, res.stderr
    hand = json.loads((out_dir / "ex.ipynb").read_text())
    text = json.dumps(hand)
    assert "SECRET_42" not in text and "SECRET_TEXT" not in text and "SECRET_GATED" not in text
    assert "BEGIN SOLUTION" not in text
    assert "solution-start" not in text and "{solution}" not in text
    sources = ["".join(c["source"]) for c in hand["cells"]]
    assert 'def f(x):\n    """Doc."""\n    # YOUR CODE HERE\n    raise NotImplementedError()' in sources
    assert "assert check(f)" in sources  # the check cell is kept
    assert all(c.get("outputs", []) == [] for c in hand["cells"] if c["cell_type"] == "code")
    assert "Exercise" in sources[0] and "Write `f`." in sources[0] and "```" not in sources[0]


def test_make_handouts_rejects_unbalanced_markers(tmp_path):
    nb = _notebook([_code("def f():\n    ### BEGIN SOLUTION\n    return 1\n")])
    src = tmp_path / "bad.ipynb"
    src.write_text(json.dumps(nb))
    res = run_handouts(str(src), "--out", str(tmp_path / "out"))
    assert res.returncode != 0
    assert "END SOLUTION" in res.stderr


def test_make_handouts_on_the_book(tmp_path):
    """The real exercise notebook: no solution text survives, every check cell is kept."""
    res = run_handouts("--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    solved = json.loads((ROOT / "book" / "10_exercises.ipynb").read_text())
    hand = json.loads((tmp_path / "10_exercises.ipynb").read_text())
    solutions = []
    for c in solved["cells"]:
        src = "".join(c["source"])
        if "### BEGIN SOLUTION" in src:
            body = src.split("### BEGIN SOLUTION", 1)[1].split("### END SOLUTION", 1)[0]
            solutions += [ln.strip() for ln in body.splitlines() if len(ln.strip()) > 12]
    assert len(solutions) >= 4
    hand_text = "\n".join("".join(c["source"]) for c in hand["cells"])
    for line in solutions:
        assert line not in hand_text, f"solution line leaked into the handout: {line}"
    hand_code = "\n".join("".join(c["source"]) for c in hand["cells"] if c["cell_type"] == "code")
    assert "{solution" not in hand_text and "BEGIN SOLUTION" not in hand_code
    checks = ["".join(c["source"]) for c in solved["cells"]
              if c["cell_type"] == "code" and "check_" in "".join(c["source"])
              and "BEGIN SOLUTION" not in "".join(c["source"])]
    assert len(checks) >= 4
    for chk in checks:
        assert chk in hand_text
    assert hand_text.count("raise NotImplementedError()") >= 4
