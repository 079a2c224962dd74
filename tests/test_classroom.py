"""Tests of mesa_lib.classroom: each checker gives full marks to a correct answer, partial
credit per hidden case, zero (with a message) to the reference or a call to it and to loops
where they are forbidden, and feedback that names the mistake."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from mesa_lib import classroom as cr
from mesa_lib.classroom import checks, grading
from mesa_lib.classroom.checks import (
    check_anomaly_index, check_attack_success, check_bootstrap_ci, check_canonical, check_dv_bound,
    check_gibbs_optimum, check_hinge, check_mine_step, check_mixture_sample, check_retrain_transform,
    check_sign_test, check_stamp, check_stamp_one, check_testing_function, check_valid_mass, paste_at_random,
)
from mesa_lib.classroom.rubric import items
from mesa_lib.defense import stamp_transform
from mesa_lib.mine import dv_bound
from mesa_lib.sweep import bootstrap_ci, sign_test
from mesa_lib.triggers import canonical_id, pattern_from_id, pattern_id, stamp, symmetry_class

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "book" / "10_exercises.ipynb"

ALL = [check_stamp_one, check_stamp, check_canonical, check_testing_function, check_hinge, check_gibbs_optimum,
       check_valid_mass, check_mixture_sample, check_dv_bound, check_mine_step, check_anomaly_index,
       check_retrain_transform, check_attack_success]


def graded(checker, fn, capsys):
    score = checker(fn, hidden=True)
    captured = capsys.readouterr()
    assert captured.err == "", "a checker must not write to stderr (nbgrader gives 0 for it)"
    return score, captured.out


def assert_score(checker, fn, capsys, points, *words):
    score, out = graded(checker, fn, capsys)
    assert float(score) == points, out
    for w in words:
        assert w.lower() in out.lower(), f"expected {w!r} in the message, got: {out}"
    return out


# --------------------------------------------------------------------------- solutions
def stamp_one(image, trigger, row, col):
    p = trigger.shape[-1]
    out = image.clone()
    out[:, row:row + p, col:col + p] = trigger
    return out


def my_stamp(images, triggers, locations):
    B, p = images.shape[0], triggers.shape[-1]
    offsets = torch.arange(p, device=images.device)
    rows = (locations[:, 0, None] + offsets)[:, :, None]
    cols = (locations[:, 1, None] + offsets)[:, None, :]
    batch = torch.arange(B, device=images.device)[:, None, None]
    out = images.clone()
    out[batch, :, rows, cols] = triggers.permute(0, 2, 3, 1).to(out.dtype)
    return out


def canon(i):
    p = pattern_from_id(i)
    ims = []
    for q in (p, torch.flip(p, dims=[1])):
        for k in range(4):
            r = torch.rot90(q, k, dims=(0, 1))
            ims += [r, 1 - r]
    return min(pattern_id(q) for q in ims)


def canon_no_invert(i):
    p = pattern_from_id(i)
    return min(pattern_id(torch.rot90(q, k, dims=(0, 1))) for q in (p, torch.flip(p, dims=[1])) for k in range(4))


def tfun(classifier, stamped, targets):
    probs = classifier(stamped).softmax(1)
    t = torch.as_tensor(targets).expand(len(stamped))
    return probs.gather(1, t[:, None])[:, 0]


def hinge(f, beta):
    return -torch.minimum(f, torch.as_tensor(beta, dtype=f.dtype)).mean()


def dv(tj, tm):
    return tj.mean() - (torch.logsumexp(tm, 0) - math.log(len(tm)))


def mine_step(T, optimizer, z, x, z_marginal):
    x = x.detach()
    bound = dv(T(z, x), T(z_marginal, x))
    optimizer.zero_grad()
    (-bound).backward()
    optimizer.step()
    return bound.detach()


def mixture(candidates, gammas, generator):
    n = candidates.shape[1]
    comp = torch.multinomial(gammas / gammas.sum(), n, replacement=True, generator=generator)
    return candidates[comp, torch.arange(n)]


def gibbs(f, beta, alpha):
    return torch.softmax(torch.clamp(f, max=beta) / alpha, 0)


def mass(f, beta, alpha):
    return gibbs(f, beta, alpha)[f > beta].sum().item()


def q50(x):
    """The median of an even count as statistics defines it (the mean of the two middle values)."""
    return torch.quantile(x, 0.5)


def anomaly(asr):
    med = q50(asr)
    mad = q50((asr - med).abs()) * 1.4826
    top = int(asr.argmax())
    return top, float((asr[top] - med) / mad.clamp(min=1e-3))


def retrain_transform(x, y, sampler, ratio, generator):
    k = int(round(ratio * len(x)))
    if ratio > 0:
        k = max(k, 1)
    x = x.clone()
    if k:
        x[:k] = paste_at_random(x[:k], sampler.sample(k, generator=generator), generator)
    return x, y


def asr(model, images, labels, trigger, target, generator):
    keep = labels != target
    x = paste_at_random(images[keep], trigger, generator)
    return (model(x).argmax(1) == target).float().mean().item()


SOLUTIONS = [stamp_one, my_stamp, canon, tfun, hinge, gibbs, mass, mixture, dv, mine_step, anomaly,
             retrain_transform, asr]


@pytest.mark.parametrize("checker, fn", list(zip(ALL, SOLUTIONS)), ids=[c.__name__ for c in ALL])
def test_solutions_get_full_marks(checker, fn, capsys):
    score, out = graded(checker, fn, capsys)
    assert score.full and float(score) == score.max_points, out
    assert "Correct!" in out
    assert repr(score) == repr(float(score))  # nbgrader reads the repr as partial credit
    public = checker(fn)
    assert public.full and "public example" in public.name


def test_points_match_the_notebook():
    """The notebook's nbgrader points equal the number of hidden cases of each checker."""
    nb_items = items(NOTEBOOK)
    assert [i.checker for i in nb_items] == [c.__name__ for c in ALL]
    for it, checker in zip(nb_items, ALL):
        score = checker(lambda *a: (_ for _ in ()).throw(NotImplementedError()), hidden=True)
        assert score.max_points == it.points, it
    assert {s.name: s.max_points for s in [c(None, hidden=True) for c in ALL]} == checks.POINTS
    assert len(nb_items) >= 12 and sum(i.points for i in nb_items) == sum(checks.POINTS.values())


def test_not_implemented_is_explained(capsys):
    def todo(*args):
        raise NotImplementedError()

    for checker in ALL:
        assert_score(checker, todo, capsys, 0, "not implemented yet")


# --------------------------------------------------------------------------- reference detection
@pytest.mark.parametrize("checker, fn, name", [
    (check_stamp, stamp, "mesa_lib.triggers.stamp"),
    (check_stamp, lambda i, t, l: stamp(i, t, l), "mesa_lib.triggers.stamp"),
    (check_stamp, lambda i, t, l: paste_at_random(i, t) * 0 + stamp(i, t, l), "stamp"),
    (check_stamp_one, lambda im, t, r, c: stamp(im[None], t, (r, c))[0], "stamp"),
    (check_canonical, canonical_id, "canonical_id"),
    (check_canonical, lambda i: symmetry_class(i)[0], "canonical_id"),  # canonical_id's own code, copied
    (check_dv_bound, dv_bound, "dv_bound"),
    (check_dv_bound, lambda a, b: dv_bound(a, b) + 0, "dv_bound"),
    (check_hinge, checks._expect_hinge_loss, "_expect_hinge_loss"),
    (check_retrain_transform, lambda x, y, s, r, g: stamp_transform(s, r)(x, y, g), "stamp_transform"),
    (check_mixture_sample, checks._expect_mixture_sample, "_expect_mixture_sample"),
    (check_gibbs_optimum, checks._expect_gibbs_optimum, "_expect_gibbs_optimum"),
])
def test_reference_scores_zero(checker, fn, name, capsys):
    out = assert_score(checker, fn, capsys, 0, "reference implementation", name)
    assert "case 1" not in out  # no partial credit at all


def test_trip_wire_is_removed_after_the_check(capsys):
    code = stamp.__code__
    assert_score(check_stamp, lambda i, t, l: stamp(i, t, l), capsys, 0)
    assert stamp.__code__ is code
    assert canonical_id(341) == 170  # the library still works


def test_except_exception_does_not_hide_the_reference(capsys):
    def sneaky(i, t, l):
        try:
            return stamp(i, t, l)
        except Exception:  # noqa: BLE001
            return my_stamp(i, t, l)

    assert_score(check_stamp, sneaky, capsys, 0, "reference implementation")


# --------------------------------------------------------------------------- loops and syncs
def loop_stamp(images, triggers, locations):
    out = images.clone()
    p = triggers.shape[-1]
    for b in range(len(images)):
        r, c = locations[b]
        out[b, :, r:r + p, c:c + p] = triggers[b]
    return out


def _helper_with_loop(x):
    return torch.stack([v for v in x])


def stamp_via_helper(images, triggers, locations):
    return _helper_with_loop(my_stamp(images, triggers, locations))


def test_loops_score_zero_where_forbidden(capsys):
    assert_score(check_stamp, loop_stamp, capsys, 0, "without python loops", "`for` loop")
    assert_score(check_stamp, stamp_via_helper, capsys, 0, "list comprehension", "_helper_with_loop")
    assert_score(check_testing_function,
                 lambda c, s, t: torch.stack([c(s).softmax(1)[b, int(torch.as_tensor(t).expand(len(s))[b])]
                                              for b in range(len(s))]), capsys, 0, "comprehension")
    assert_score(check_mixture_sample, lambda c, g, gen: c[0], capsys, 0, "same step")  # no loop: graded


def test_loops_allowed_where_not_forbidden(capsys):
    assert_score(check_canonical, canon, capsys, 2)  # canon has loops: fine for this item


def test_host_syncs_score_zero_in_the_gpu_item(capsys):
    def syncing(images, triggers, locations):
        p = triggers.shape[-1]
        locs = locations.tolist()
        return my_stamp(images, triggers, torch.tensor(locs)) if p else images

    assert_score(check_stamp, syncing, capsys, 0, ".tolist()", "stall a GPU")


def cpu_stamp(images, triggers, locations):
    B, p = images.shape[0], triggers.shape[-1]
    offsets = torch.arange(p)
    rows = (locations[:, 0, None] + offsets)[:, :, None]
    cols = (locations[:, 1, None] + offsets)[:, None, :]
    out = images.clone()
    out[torch.arange(B)[:, None, None], :, rows, cols] = triggers.permute(0, 2, 3, 1)
    return out


def test_cpu_only_tensors_lose_the_device_case(capsys):
    assert_score(check_stamp, cpu_stamp, capsys, 2, "another device", "device=images.device")


def test_device_case_in_strict_device_mode(strict_device, capsys):
    """Chapter 2 runs with MESA_STRICT_DEVICE=1, whose simulated device would turn the device
    case's meta tensors into host tensors: the case runs outside it, and it is back on after."""
    from mesa_lib import devicecheck

    assert_score(check_stamp, my_stamp, capsys, 3)
    assert_score(check_stamp, cpu_stamp, capsys, 2, "another device")
    assert devicecheck.enabled()
    x = torch.zeros(2).to(strict_device)
    assert x.device == strict_device  # the mode still simulates its device


# --------------------------------------------------------------------------- diagnoses
@pytest.mark.parametrize("checker, fn, points, words", [
    (check_stamp_one, lambda im, t, r, c: stamp_one(im, t, c, r), 0, ["swapped"]),
    (check_stamp_one, lambda im, t, r, c: stamp_one(im, t.transpose(-1, -2), r, c), 0, ["transposed"]),
    (check_stamp, lambda i, t, l: my_stamp(i, t, l.flip(1)), 0, ["swapped"]),
    (check_stamp, lambda i, t, l: my_stamp(i, t.detach(), l), 0, ["not differentiable"]),
    (check_canonical, lambda i: canon_no_invert(i), 0, ["102 classes", "without colour inversion"]),
    (check_testing_function, lambda c, s, t: c(s).gather(1, torch.as_tensor(t).expand(len(s))[:, None])[:, 0],
     0, ["logits"]),
    (check_testing_function, lambda c, s, t: c(s).softmax(1)[:, 2], 1, ["same class"]),
    (check_hinge, lambda f, b: torch.minimum(f, torch.as_tensor(b)).mean(), 0, ["wrong sign"]),
    (check_hinge, lambda f, b: -torch.minimum(f, torch.as_tensor(b)).sum(), 0, ["summed"]),
    (check_hinge, lambda f, b: -f.mean(), 0, ["not capped"]),
    (check_hinge, lambda f, b: -torch.minimum(f.detach(), torch.as_tensor(b)).mean(), 0, ["not differentiable"]),
    (check_dv_bound, lambda tj, tm: tj.mean() - torch.log(torch.exp(tm).mean()), 1, ["overflows", "logsumexp"]),
    # the rubric's named mistake: stable but without the - log n, it loses the value case only
    (check_dv_bound, lambda tj, tm: tj.mean() - torch.logsumexp(tm, 0), 2, ["log(n)"]),
    (check_dv_bound, lambda tj, tm: tj.mean() - tm.mean(), 0, ["jensen"]),
    (check_gibbs_optimum, lambda f, b, a: torch.exp(torch.clamp(f, max=b) / a) / torch.exp(
        torch.clamp(f, max=b) / a).sum(), 2, ["overflows"]),
    (check_gibbs_optimum, lambda f, b, a: torch.softmax(f / a, 0), 0, ["not capped"]),
    (check_gibbs_optimum, lambda f, b, a: torch.exp(torch.clamp(f, max=b) / a), 0, ["sums to"]),
    (check_valid_mass, lambda f, b, a: gibbs(f, b, a)[f >= b].sum().item(), 1, ["f = beta"]),
    (check_valid_mass, lambda f, b, a: gibbs(f, b, a)[f <= b].sum().item(), 0, ["outside"]),
    (check_anomaly_index, lambda a: (int(a.argmax()), float((a.max() - a.mean()) / a.std())), 0, ["median"]),
    (check_anomaly_index, lambda a: (int(a.argmax()), float((a.max() - q50(a)) / q50(
        (a - q50(a)).abs()).clamp(min=1e-3))), 1, ["1.4826"]),
    (check_anomaly_index, lambda a: (int(a.argmax()), float((a.max() - q50(a)) / (
        1.4826 * q50((a - q50(a)).abs())))), 2, ["clamp"]),
    (check_anomaly_index, lambda a: (int(a.argmax()), float((a.max() - a.median()) / (
        1.4826 * (a - a.median()).abs().median()).clamp(min=1e-3))), 2, ["torch.median", "two middle values"]),
    (check_retrain_transform, lambda x, y, s, r, g: (retrain_transform(x, y, s, r, g)[0], y * 0), 0, ["labels"]),
    (check_retrain_transform, lambda x, y, s, r, g: (x, y), 0, ["must be stamped"]),
    (check_attack_success, lambda m, i, l, t, tg, g: 100 * asr(m, i, l, t, tg, g), 0, ["percentage"]),
    (check_attack_success, lambda m, i, l, t, tg, g: (m(paste_at_random(i, t, g)).argmax(1) == tg).float().mean(),
     0, ["TRUE label"]),
])
def test_diagnoses(checker, fn, points, words, capsys):
    assert_score(checker, fn, capsys, points, *words)


def test_mine_step_diagnoses(capsys):
    def no_zero(T, optimizer, z, x, z_marginal):
        x = x.detach()
        bound = dv(T(z, x), T(z_marginal, x))
        (-bound).backward()
        optimizer.step()
        return bound.detach()

    def descends(T, optimizer, z, x, z_marginal):
        x = x.detach()
        bound = dv(T(z, x), T(z_marginal, x))
        optimizer.zero_grad()
        bound.backward()
        optimizer.step()
        return bound.detach()

    def leaks(T, optimizer, z, x, z_marginal):
        bound = dv(T(z, x), T(z_marginal, x))
        optimizer.zero_grad()
        (-bound).backward()
        optimizer.step()
        return bound.detach()

    assert_score(check_mine_step, no_zero, capsys, 0, "zero_grad")
    assert_score(check_mine_step, descends, capsys, 0, "wrong direction")
    assert_score(check_mine_step, leaks, capsys, 0, "detach")


def test_mixture_diagnoses(capsys):
    def unseeded(c, g, gen):
        n = c.shape[1]
        return c[torch.multinomial(g / g.sum(), n, replacement=True), torch.arange(n)]

    def uniform(c, g, gen):
        n = c.shape[1]
        return c[torch.randint(0, len(g), (n,), generator=gen), torch.arange(n)]

    assert_score(check_mixture_sample, unseeded, capsys, 0, "generator")
    assert_score(check_mixture_sample, uniform, capsys, 1, "uniformly", "gamma_i = 0")


def test_summary_adds_up(capsys):
    grading.SCORES.clear()
    check_hinge(hinge, hidden=True)
    check_dv_bound(lambda tj, tm: tj.mean() - torch.log(torch.exp(tm).mean()), hidden=True)
    text = cr.summary()
    assert "total" in text and "4 / 6" in text


def test_every_cell_carries_nbgrader_metadata():
    """Nothing leaks and nothing is editable by accident: every cell has a role for nbgrader."""
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    ids = []
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader")
        assert meta, f"a cell without nbgrader metadata: {cell.source[:60]!r}"
        ids.append(meta["grade_id"])
        if meta.get("solution"):
            assert cell.cell_type == "code" and "### BEGIN SOLUTION" in cell.source
        elif meta.get("grade"):
            assert meta["locked"] and meta["points"] > 0 and "### BEGIN HIDDEN TESTS" in cell.source
            hidden = cell.source.split("### BEGIN HIDDEN TESTS", 1)[1]
            assert f'grade_isolated("{meta["grade_id"]}")' in hidden  # graded by the isolated grader
        else:
            assert meta["locked"], f"an unlocked non-solution cell: {cell.source[:60]!r}"
            assert "BEGIN SOLUTION" not in cell.source
    assert len(ids) == len(set(ids))
    total = sum(i.points for i in items(nb))
    assert f"**{total:g} points**" in nb.cells[0].source
    # the student's namespace gets checkers and tools, never a reference implementation
    setup = next(c.source for c in nb.cells if "from mesa_lib" in c.source and c.cell_type == "code")
    imported = set(re.findall(r"\b(\w+)\b", setup.split("from mesa_lib", 1)[1]))
    for name in ("stamp", "dv_bound", "canonical_id", "stamp_transform", "attack_success_rate",
                 "scan_classes", "train_staircase", "StaircaseSampler", "MINE"):
        assert name not in imported, name
    assert not any(n.startswith("reference_") for n in imported)


def test_student_stderr_and_warnings_stay_out_of_the_cell(capsys):
    import sys
    import warnings

    def noisy(f, beta):
        print("debug", file=sys.stderr)
        warnings.warn("careful")
        return hinge(f, beta)

    out = assert_score(check_hinge, noisy, capsys, 3, "wrote to stderr", "careful")
    assert "debug" in out


# --------------------------------------------------------------------------- chapter 9: the statistics
def _counts(a, b):
    lower = sum(x < y for x, y in zip(a, b))
    higher = sum(x > y for x, y in zip(a, b))
    return lower, higher


def _tail(m, k):
    return sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m


def sign_p(a, b):
    lower, higher = _counts(a, b)
    m = lower + higher
    return min(1.0, 2 * _tail(m, min(lower, higher))) if m else 1.0


def boot(values, level, n, generator):
    t = torch.tensor(values, dtype=torch.float64)
    means = t[torch.randint(0, len(t), (n, len(t)), generator=generator)].mean(1)
    q = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return q[0].item(), q[1].item()


def boot_loop(values, level, n, generator):
    """Loops and a sorted list instead of torch.quantile: as right, within the Monte Carlo error."""
    means = sorted(sum(values[int(j)] for j in torch.randint(0, len(values), (len(values),), generator=generator))
                   / len(values) for _ in range(n))
    return means[int((1 - level) / 2 * n)], means[min(n - 1, int((1 + level) / 2 * n))]


@pytest.mark.parametrize("checker, fn", [(check_sign_test, sign_p), (check_bootstrap_ci, boot)],
                         ids=["check_sign_test", "check_bootstrap_ci"])
def test_chapter_checkers_give_full_marks(checker, fn, capsys):
    score, out = graded(checker, fn, capsys)
    assert score.full and float(score) == score.max_points, out
    assert "Correct!" in out and repr(score) == repr(float(score))
    assert checker(fn).full
    assert score.name not in checks.POINTS  # a chapter's exercise, not an item of the graded assignment
    assert checker in (cr.check_sign_test, cr.check_bootstrap_ci)  # exported with the others


def test_bootstrap_accepts_other_correct_implementations(capsys):
    """Another resampling order (a loop, float32, its own quantile rule) differs from the library's
    interval by Monte Carlo error only, and gets full marks; so does every seed of the generator."""
    def boot32(values, level, n, generator):
        t = torch.tensor(values)
        means = t[torch.randint(0, len(t), (n, len(t)), generator=generator)].mean(1).sort().values
        return means[int((1 - level) / 2 * n)].item(), means[int((1 + level) / 2 * n) - 1].item()

    assert_score(check_bootstrap_ci, boot32, capsys, 3)
    for seed in range(15):
        for case in (checks._boot_case(checks._SKEWED, 0.95, seed=1000 + seed),
                     checks._boot_case(checks._boot_values(2, 51), 0.9, seed=2000 + seed)):
            case(boot)


@pytest.mark.slow
def test_bootstrap_accepts_a_python_loop(capsys):
    assert_score(check_bootstrap_ci, boot_loop, capsys, 3)


@pytest.mark.parametrize("checker, fn, name", [
    (check_sign_test, sign_test, "mesa_lib.sweep.sign_test"),
    (check_sign_test, lambda a, b: sign_test(a, b)["p"], "mesa_lib.sweep.sign_test"),
    (check_sign_test, checks._expect_sign_test, "_expect_sign_test"),
    (check_bootstrap_ci, bootstrap_ci, "mesa_lib.sweep.bootstrap_ci"),
    (check_bootstrap_ci, lambda v, level, n, g: bootstrap_ci(v, level, n), "mesa_lib.sweep.bootstrap_ci"),
])
def test_chapter_references_score_zero(checker, fn, name, capsys):
    out = assert_score(checker, fn, capsys, 0, "reference implementation", name)
    assert "case 1" not in out


def _sign_variant(m_of, k_of, two_sided=True, cap=True):
    def fn(a, b):
        lower, higher = _counts(a, b)
        m, k = m_of(a, lower, higher), k_of(lower, higher)
        if m == 0:
            return 1.0
        p = _tail(m, k) * (2 if two_sided else 1)
        return min(1.0, p) if cap else p
    return fn


def _untied(a, lower, higher):
    return lower + higher


def _smaller(lower, higher):
    return min(lower, higher)


def _floats_overflow(a, b):
    lower, higher = _counts(a, b)
    m, k = lower + higher, min(lower, higher)
    return min(1.0, 2 * sum(math.comb(m, i) * 0.5 ** m for i in range(k + 1))) if m else 1.0


def _normal(a, b):
    lower, higher = _counts(a, b)
    m, k = lower + higher, min(lower, higher)
    z = (k + 0.5 - m / 2) / math.sqrt(m / 4)
    return min(1.0, 1 + math.erf(z / math.sqrt(2)))


def _no_tie_guard(a, b):
    lower, higher = _counts(a, b)
    m, k = lower + higher, min(lower, higher)
    return min(1.0, 2 * _tail(m, k)) / (m / m)  # ZeroDivisionError when every pair ties


@pytest.mark.parametrize("fn, points, words", [
    (_sign_variant(_untied, _smaller, two_sided=False), 0, ["one-sided", "doubles"]),
    (_sign_variant(lambda a, lo, hi: len(a), _smaller), 0, ["tied pairs", "dropped"]),
    (_sign_variant(_untied, lambda lo, hi: lo), 3, ["fixed direction", "min(lower, higher)"]),
    (_sign_variant(_untied, lambda lo, hi: hi), 2, ["fixed direction"]),
    (_sign_variant(_untied, _smaller, cap=False), 3, ["cannot exceed 1"]),
    (_sign_variant(_untied, lambda lo, hi: min(lo, hi) - 1), 0, ["include k itself"]),
    (_floats_overflow, 3, ["overflows", "math.comb(m, i) / 2 ** m"]),
    (_normal, 0, ["normal approximation"]),
    (_no_tie_guard, 3, ["m = 0", "p = 1"]),
    (lambda a, b: {"p": sign_p(a, b)}, 0, ["not a dict"]),
    (lambda a, b: 1 - sign_p(a, b), 0, ["1 - p"]),
])
def test_sign_test_diagnoses(fn, points, words, capsys):
    assert_score(check_sign_test, fn, capsys, points, *words)


def _boot_levels(lo_q, hi_q):
    def fn(values, level, n, generator):
        t = torch.tensor(values, dtype=torch.float64)
        means = t[torch.randint(0, len(t), (n, len(t)), generator=generator)].mean(1)
        return torch.quantile(means, lo_q(level)).item(), torch.quantile(means, hi_q(level)).item()
    return fn


def _boot_normal(values, level, n, generator):
    t = torch.tensor(values, dtype=torch.float64)
    z = math.sqrt(2) * torch.erfinv(torch.tensor(level, dtype=torch.float64)).item()
    se = (t.std() / math.sqrt(len(t))).item()
    return t.mean().item() - z * se, t.mean().item() + z * se


def _boot_permutations(values, level, n, generator):
    t = torch.tensor(values, dtype=torch.float64)
    means = torch.stack([t[torch.randperm(len(t), generator=generator)].mean() for _ in range(100)])
    return torch.quantile(means, (1 - level) / 2).item(), torch.quantile(means, (1 + level) / 2).item()


def _boot_median(values, level, n, generator):
    t = torch.tensor(values, dtype=torch.float64)
    med = t[torch.randint(0, len(t), (n, len(t)), generator=generator)].median(1).values
    return torch.quantile(med, (1 - level) / 2).item(), torch.quantile(med, (1 + level) / 2).item()


@pytest.mark.parametrize("fn, points, words", [
    (_boot_permutations, 0, ["WITH replacement"]),
    (lambda v, level, n, g: tuple(torch.quantile(torch.tensor(v), torch.tensor([(1 - level) / 2, (1 + level) / 2]))
                                  .tolist()), 0, ["values themselves", "MEANS"]),
    (_boot_levels(lambda level: 0.025, lambda level: 0.975), 1, ["95% interval, but level = 0.9"]),
    (_boot_levels(lambda level: 1 - level, lambda level: level), 0, ["wrong quantiles", "(1 - level) / 2"]),
    (_boot_normal, 2, ["symmetric normal interval", "skewed"]),
    (lambda v, level, n, g: boot(v, level, n, None), 2, ["equally seeded", "generator"]),
    (_boot_median, 0, ["bootstrapped the median"]),
    (lambda v, level, n, g: tuple(100 * x for x in boot(v, level, n, g)), 0, ["percentages"]),
    (lambda v, level, n, g: boot(v, level, n, g)[::-1], 0, ["reversed"]),
])
def test_bootstrap_diagnoses(fn, points, words, capsys):
    assert_score(check_bootstrap_ci, fn, capsys, points, *words)


def test_points_typed_in_the_assignment_text_match_the_metadata():
    """The assignment's text types its item count, total and each item's points (a student
    reads them before any cell runs): they must be the nbgrader metadata's."""
    import nbformat

    from mesa_lib.detect import FLAG_ASR, FLAG_INDEX

    nb = nbformat.read(NOTEBOOK, as_version=4)
    md = [c.source for c in nb.cells if c.cell_type == "markdown"]
    its = items(NOTEBOOK)
    words = {10: "Ten", 11: "Eleven", 12: "Twelve", 13: "Thirteen", 14: "Fourteen", 15: "Fifteen", 16: "Sixteen"}
    assert f"{words[len(its)]} items" in md[0], md[0][:200]
    assert f"worth **{sum(i.points for i in its):g} points**" in md[0], md[0][:200]
    typed = [float(p) for s in md for p in re.findall(r"^\*(\d+) points?\.\*$", s, re.M)]
    assert typed == [i.points for i in its]
    text = " ".join(" ".join(md).split())
    assert f"the top ASR is at least {FLAG_ASR:.0%} and the index is above {FLAG_INDEX:g}" in text


# --------------------------------------------------------------------------- issue 20: nothing hidden, no global state
def test_checks_leave_the_global_random_state_alone(capsys):
    """The checkers seed their own models (common.seeded) and generators: the student's stream
    is what it was."""
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    graded(check_testing_function, tfun, capsys)
    graded(check_mine_step, mine_step, capsys)
    check_testing_function(tfun)
    check_mine_step(mine_step)
    capsys.readouterr()
    assert torch.equal(torch.get_rng_state(), state)


def test_hidden_cases_are_not_in_the_package(monkeypatch, capsys):
    """Without the instructor's source (an installed package), hidden=True runs nothing and says
    so; the package names no graded case and exports no reference."""
    import inspect

    assert checks.hidden_cases_available()  # this checkout has instructor/ next to mesa_lib
    monkeypatch.setattr(checks, "_INSTRUCTOR", "no_such_instructor_folder")
    monkeypatch.delitem(__import__("sys").modules, "no_such_instructor_folder.hidden", raising=False)
    assert not cr.hidden_cases_available()  # the book's model-solution cells then skip the hidden cases
    score = check_stamp_one(lambda im, t, r, c: im, hidden=True)
    out = capsys.readouterr().out
    assert float(score) == 0 and score.max_points == checks.POINTS["stamp one image"]
    assert "not part of the installed package" in out and "case 1" not in out
    assert not [n for n in dir(cr) + list(checks.__all__) if n.startswith("reference_")]
    src = inspect.getsource(checks)
    assert "_stamp_one_case(0, 1, 8, 3, 0, 5)" not in src  # a hidden case of instructor/hidden.py


def test_copies_and_disguised_loops_score_zero(capsys):
    import inspect
    import types

    from mesa_lib import triggers
    from mesa_lib.detect import anomaly_index_of_top
    from mesa_lib.evaluate import asr_per_trigger

    ns = dict(vars(triggers))
    exec(inspect.getsource(triggers.stamp), ns)  # noqa: S102 - the bypass under test
    assert_score(check_stamp, ns["stamp"], capsys, 0, "reference implementation")
    copied = types.FunctionType(canonical_id.__code__, canonical_id.__globals__)
    assert_score(check_canonical, copied, capsys, 0, "reference implementation")
    assert_score(check_anomaly_index, anomaly_index_of_top, capsys, 0, "reference implementation")
    assert_score(check_attack_success, lambda m, i, l, t, tg, g: float(asr_per_trigger(m, i[l != tg], t[None], tg)[0]),
                 capsys, 0, "reference implementation")
    assert_score(check_testing_function,
                 lambda c, s, t: torch.stack(list(map(lambda b: c(s).softmax(1)[b, 2], range(len(s))))),
                 capsys, 0, "map(")
    # an own implementation that is not a copy keeps its points
    assert_score(check_canonical, canon, capsys, 2)


def test_mixture_off_by_one_is_named(capsys):
    def shifted(c, g, gen):
        n = c.shape[1]
        comp = torch.multinomial(g / g.sum(), n, replacement=True, generator=gen)
        return c[(comp + 1) % len(g), torch.arange(n)]

    out = assert_score(check_mixture_sample, shifted, capsys, 1, "off by one")
    assert "multinomial" not in out
