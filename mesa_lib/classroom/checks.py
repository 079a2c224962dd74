"""Checkers for the graded assignment (chapter 10): one per item, partial credit per case.

Every ``check_*(fn, hidden=False)`` runs the student's ``fn`` on test cases, prints what is
wrong in words a student can act on ("you modified the input in place", "rows and columns are
swapped", "overflows for large T", ...), and returns a :class:`~mesa_lib.classroom.grading.Score`
(a float: the points). ``hidden=False`` runs one public example (what the student sees while
working). The graded cases (one point each, other seeds and shapes) are NOT part of this
package: they are the instructor's source (``instructor/hidden.py`` in the book's repository),
which ``hidden=True`` runs where it is present and the isolated grader (``instructor/grader.py``)
runs for grades; in an installed package ``hidden=True`` runs nothing and reveals nothing.
A function that *is*, or calls, the library's reference for the item scores zero; items
marked "no loops" score zero when the source holds a Python loop or comprehension. See
:mod:`mesa_lib.classroom.grading` for how.

==========================  ======  =====================================================
checker                     points  forbidden (the library's function, or the checker's own)
==========================  ======  =====================================================
check_stamp_one             2       :func:`_expect_stamp_one`, :func:`mesa_lib.triggers.stamp`
check_stamp                 3       :func:`mesa_lib.triggers.stamp` (no loops, no host syncs,
                                    runs on any device)
check_canonical             2       :func:`mesa_lib.triggers.canonical_id`
check_testing_function      2       :func:`_expect_testing_function` (no loops)
check_hinge                 3       :func:`_expect_hinge_loss` (the hinge of ``train_staircase``)
check_gibbs_optimum         3       :func:`_expect_gibbs_optimum`
check_valid_mass            2       :func:`_expect_valid_mass`
check_mixture_sample        3       :func:`_expect_mixture_sample` (no loops)
check_dv_bound              3       :func:`mesa_lib.mine.dv_bound`
check_mine_step             3       :func:`_expect_mine_step`
check_anomaly_index         3       :func:`_expect_anomaly_index` (``scan_classes``' rule)
check_retrain_transform     3       :func:`mesa_lib.defense.stamp_transform`
check_attack_success        2       :func:`_expect_attack_success`
check_sign_test             4       :func:`mesa_lib.sweep.sign_test` (chapter 9's exercise)
check_bootstrap_ci          3       :func:`mesa_lib.sweep.bootstrap_ci` (chapter 9's exercise)
==========================  ======  =====================================================

The last two are the statistics of the reproduction chapter; they are not items of the
graded assignment, so :data:`POINTS` (the assignment's points) leaves them out.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from functools import lru_cache
from typing import Any, Callable

import torch
import torch.nn as nn

from .. import devicecheck
from ..common import seeded
from .. import evaluate as _evaluate
from ..defense import retrain, stamp_transform
from ..detect import anomaly_index_of_top, scan_classes
from ..mesa import StaircaseSampler, _target_softmax, target_probability
from ..mine import MINE, StatisticsNetwork, dv_bound, log_mean_exp, train_mine
from ..sweep import bootstrap_ci, sign_test
from ..toy import ToyLandscape
from ..triggers import (NUM_PATTERNS, FixedTrigger, _symmetries, canonical_id, pattern_from_id, pattern_id,
                        stamp, symmetry_class)
from .grading import Score, Wrong, call, grade, scalar, tensor

__all__ = [
    "POINTS",
    "paste_at_random",
    "check_stamp_one", "check_stamp", "check_canonical", "check_testing_function", "check_hinge",
    "check_dv_bound", "check_mine_step", "check_mixture_sample", "check_gibbs_optimum", "check_valid_mass",
    "check_anomaly_index", "check_retrain_transform", "check_attack_success", "check_sign_test",
    "check_bootstrap_ci", "grade_isolated", "hidden_cases_available"
]

CORRECT = "Correct!"


def paste_at_random(images: torch.Tensor, triggers: torch.Tensor, generator: torch.Generator | None = None
                    ) -> torch.Tensor:
    """A tool for the later items: paste ``triggers`` (``[C, p, p]`` or one per image) at a
    uniformly random location per image (``mesa_lib.stamp`` with ``locations=None``)."""
    return stamp(images, triggers, None, generator)


_INSTRUCTOR = "instructor"
"""The folder of the instructor's source (next to ``mesa_lib`` in a checkout of the book's
repository, absent from an installed package) that holds the graded cases."""


def _hidden_path() -> "Path":
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / _INSTRUCTOR / "hidden.py"


def hidden_cases_available() -> bool:
    """True where the instructor's graded cases sit next to the package (a checkout of the book's
    repository), so that ``check_...(fn, hidden=True)`` runs them; False in an installed package
    (Colab, pip), where a hidden check runs nothing and scores 0. The book's model-solution cells
    run the hidden cases only where this is True."""
    import sys

    return f"{_INSTRUCTOR}.hidden" in sys.modules or _hidden_path().is_file()


def _hidden_cases(name: str) -> list | None:
    """The graded cases of item ``name`` from the instructor's source, or None where it is absent
    (an installed package: the graded cases are not part of it)."""
    import importlib.util
    import sys
    from pathlib import Path

    mod = sys.modules.get(f"{_INSTRUCTOR}.hidden")
    if mod is None:
        path = _hidden_path()
        if not path.is_file():
            return None
        spec = importlib.util.spec_from_file_location(f"{_INSTRUCTOR}.hidden", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod.hidden_cases(name)


def grade_isolated(grade_id: str, notebook: str = "10_exercises.ipynb") -> float:
    """For the hidden test cells of the instructor's source notebook (nbgrader autograde, the
    book's build): grade item ``grade_id`` of ``notebook`` (in the current folder) with the
    isolated grader, ``instructor/grader.py``, loaded afresh from the instructor's source, in a
    fresh process; print the feedback and return the points (nbgrader's partial credit). Raises
    (the cell fails: 0 points) where the grader is absent, as in an installed package."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / _INSTRUCTOR / "grader.py"
    if not path.is_file():
        raise RuntimeError("the isolated grader (instructor/grader.py) is not installed here: the graded "
                           "cases run on the instructor's machine")
    global _ISOLATED
    if _ISOLATED is None:  # once per kernel: its grader keeps one zygote for the notebook's items
        spec = importlib.util.spec_from_file_location("_mesa_isolated_grader", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        _ISOLATED = mod
    return _ISOLATED.item(grade_id, notebook)


_ISOLATED: Any = None


def _run(name: str, fn: Any, public: list, hidden: bool, **kw) -> Score:
    if not hidden:
        return grade(f"{name} (public example)", fn, public, **kw)
    cases = _hidden_cases(name)
    if cases is None:
        text = (f"{name}: the graded cases are not part of the installed package (your instructor runs them "
                "in an isolated grader); nothing was run. The public example, check_...(fn), is yours to use.")
        print(text)
        return Score(0.0, POINTS.get(name, 0), name, text)
    return grade(name, fn, cases, **kw)


# =========================================================================== 1. stamp one image
def _expect_stamp_one(image: torch.Tensor, trigger: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """Paste ``trigger [C, p, p]`` on ``image [C, H, W]`` with its top-left corner at ``(row, col)``."""
    p = trigger.shape[-1]
    out = image.clone()
    out[:, row:row + p, col:col + p] = trigger
    return out


def _stamp_one_case(seed: int, C: int, H: int, p: int, row: int, col: int) -> Callable:
    def case(fn: Callable) -> None:
        g = torch.Generator().manual_seed(seed)
        image = torch.rand(C, H, H, generator=g)
        trigger = 2.0 + torch.rand(C, p, p, generator=g)  # values no image pixel has
        before = image.clone()
        out = tensor(call(fn, image, trigger, row, col), "the stamped image")
        if not torch.equal(image, before):
            raise Wrong("you modified the input image in place; work on a copy (image.clone())")
        if out.shape != image.shape:
            raise Wrong(f"wrong shape: expected {tuple(image.shape)} (same as the image), got {tuple(out.shape)}")
        want = _expect_stamp_one(image, trigger, row, col)
        if torch.equal(out, want):
            return
        if row != col and torch.equal(out, _expect_stamp_one(image, trigger, col, row)):
            raise Wrong("rows and columns are swapped: `row` indexes dimension 1 (height), `col` dimension 2 (width)")
        if torch.equal(out, _expect_stamp_one(image, trigger.transpose(-1, -2), row, col)):
            raise Wrong("the trigger is pasted transposed: trigger pixel [i, j] goes to image pixel "
                        "[row + i, col + j]")
        patch = want != image
        if not torch.equal(out[~patch], image[~patch]):
            n = int((out[~patch] != image[~patch]).sum())
            raise Wrong(f"{n} pixels outside the {p}x{p} patch changed (check for off-by-one errors: "
                        f"the patch covers rows row..row+{p - 1})")
        raise Wrong("the patch does not hold the trigger (all channels, at rows row..row+p-1 and "
                    "columns col..col+p-1)")

    return case


def check_stamp_one(fn: Callable, hidden: bool = False) -> Score:
    """``fn(image [C,H,W], trigger [C,p,p], row, col) -> new image`` with the trigger pasted."""
    return _run("stamp one image", fn,
                [_stamp_one_case(100, 1, 6, 3, 1, 2)],
                hidden, forbidden=[stamp, _expect_stamp_one])


# =========================================================================== 2. batched stamping
@contextlib.contextmanager
def _outside_strict_device():
    """Suspend ``mesa_lib``'s strict-device mode (a chapter run with ``MESA_STRICT_DEVICE=1``)
    for the device case: that mode simulates its device on the CPU and would turn the ``meta``
    tensors of the case into host tensors, failing a correct function."""
    was_on = devicecheck.enabled()
    if was_on:
        devicecheck.disable()
    try:
        yield
    finally:
        if was_on:
            devicecheck.enable()


def _stamp_case(seed: int, B: int, C: int, H: int, p: int, on_meta: bool = False) -> Callable:
    def case(fn: Callable) -> None:
        g = torch.Generator().manual_seed(seed)
        images = torch.rand(B, C, H, H, generator=g)
        triggers = 2.0 + torch.rand(B, C, p, p, generator=g)
        locations = torch.randint(0, H - p + 1, (B, 2), generator=g)
        locations[0] = torch.tensor([0, H - p])  # a corner: off-by-one errors show
        before = images.clone()
        trig = triggers.clone().requires_grad_(True)
        out = tensor(call(fn, images, trig, locations.clone()), "the stamped batch")
        if not torch.equal(images, before):
            raise Wrong("you modified the input images in place; work on a copy (images.clone())")
        if out.shape != images.shape:
            raise Wrong(f"wrong shape: expected {tuple(images.shape)} (same as the images), got {tuple(out.shape)}")
        want = stamp(images, triggers, locations)
        patch = want != images
        o = out.detach()
        if not torch.allclose(o[~patch], images[~patch]):
            if torch.allclose(o, stamp(images, triggers, locations.flip(1))):
                raise Wrong("rows and columns are swapped: locations[b] = (row, col), the row indexes "
                            "dimension 2 (height) and the column dimension 3 (width)")
            n = int((o[~patch] != images[~patch]).sum())
            raise Wrong(f"{n} pixels outside the patch changed; only the p x p patch at "
                        "locations[b] = (row, col) may change (check for off-by-one errors)")
        if torch.allclose(o, stamp(images, triggers.transpose(-1, -2), locations)):
            raise Wrong("the trigger is pasted transposed: trigger pixel [i, j] goes to image pixel "
                        "[row + i, col + j]")
        if not torch.allclose(o, want):
            raise Wrong("the patch does not hold the trigger: image b must get triggers[b] "
                        "(all channels) at rows row..row+p-1 and columns col..col+p-1")
        if not out.requires_grad:
            raise Wrong("the result is not differentiable in the triggers (MESA back-propagates "
                        "through stamping); avoid .detach(), .item(), .numpy() and torch.no_grad()")
        out.sum().backward()
        if trig.grad is None or not torch.allclose(trig.grad, torch.ones_like(trig)):
            raise Wrong("gradients do not reach the triggers correctly: d(sum of output)/d trigger "
                        "must be 1 for every trigger pixel")
        if on_meta:
            # 'meta' tensors have shapes but no data: a tensor created on the CPU inside the
            # function meets them in an operation and fails, as it would on a GPU
            m = torch.device("meta")
            try:
                with _outside_strict_device():
                    out_m = fn(images.to(m), triggers.to(m), locations.to(m))
                    on_m = isinstance(out_m, torch.Tensor) and out_m.device == m
            except NotImplementedError as err:  # some ops have no meta kernel: not the student's fault
                if "meta" in str(err):
                    return
                raise Wrong("the function raised NotImplementedError on another device") from None
            except Exception as err:  # noqa: BLE001
                raise Wrong("your function fails on another device than the CPU (here the 'meta' device, "
                            f"as it would on a GPU): {type(err).__name__}: {str(err)[:160]}; create "
                            "index tensors on the images' device (torch.arange(p, device=images.device))"
                            ) from None
            if not on_m:
                raise Wrong("on another device the result must stay on that device (images.device)")

    return case


def check_stamp(fn: Callable, hidden: bool = False) -> Score:
    """``fn(images [B,C,H,W], triggers [B,C,p,p], locations [B,2]) -> stamped batch``: no Python
    loops, no host syncs, differentiable in the triggers, runs on the images' device."""
    return _run("batched stamping", fn,
                [_stamp_case(100, 2, 1, 6, 3)],
                hidden, forbidden=[stamp, paste_at_random, _expect_stamp_one], no_loops=True, no_syncs=True)


# =========================================================================== 3. the 51 patterns
def _group_count(rotate: bool, flip: bool, invert: bool) -> int:
    seen = set()
    for i in range(NUM_PATTERNS):
        imgs = [pattern_from_id(i)]
        if flip:
            imgs = imgs + [torch.flip(q, dims=[1]) for q in imgs]
        if rotate:
            imgs = [torch.rot90(q, k, dims=(0, 1)) for q in imgs for k in range(4)]
        if invert:
            imgs = imgs + [1 - q for q in imgs]
        seen.add(min(pattern_id(q) for q in imgs))
    return len(seen)


@lru_cache(maxsize=None)
def _missing_by_count() -> dict[int, list[str]]:
    """Number of classes -> the symmetries left out to get that number (e.g. 102 -> inversion)."""
    out: dict[int, list[str]] = {}
    for rot in (False, True):
        for fl in (False, True):
            for inv in (False, True):
                missing = [w for w, on in (("rotations", rot), ("mirror flips", fl), ("colour inversion", inv))
                           if not on]
                out.setdefault(_group_count(rot, fl, inv), missing)
    return out


def _missing_hint(n_classes: int) -> str:
    missing = _missing_by_count().get(n_classes)
    if missing:
        return f"that is the count without {' and '.join(missing)}"
    return "compare all 16 images of a pattern: 4 rotations x (flipped or not) x (inverted or not)"


def _canonical_values(fn: Callable, ids: range) -> dict[int, int]:
    got = {}
    for i in ids:
        out = call(fn, i)
        if isinstance(out, torch.Tensor) and out.numel() == 1:
            out = out.item()
        if isinstance(out, bool) or not isinstance(out, int):
            raise Wrong(f"return a Python int (a pattern id), got {type(out).__name__} for pattern {i}")
        got[i] = out
    return got


def _canonical_case(ids: range, count_classes: bool) -> Callable:
    def case(fn: Callable) -> None:
        got = _canonical_values(fn, ids)
        want = {i: canonical_id(i) for i in ids}
        if count_classes:
            n = len(set(got.values()))
            if n != 51:
                raise Wrong(f"your function gives {n} classes, not 51: {_missing_hint(n)}")
        bad = [i for i in ids if got[i] != want[i]]
        if bad:
            i = bad[0]
            same_class = got[i] in symmetry_class(i)
            why = " (a member of its class, but not the SMALLEST id)" if same_class else ""
            raise Wrong(f"for pattern {i} expected {want[i]}, got {got[i]}{why}")

    return case


def check_canonical(fn: Callable, hidden: bool = False) -> Score:
    """``fn(pattern_id) -> canonical id``: the smallest id of the pattern's 16 images under
    rotations, mirror flip and colour inversion; 512 patterns -> 51 classes."""
    return _run("51 patterns", fn,
                [_canonical_case(range(0, 16), False)],
                hidden, forbidden=[canonical_id, symmetry_class, _symmetries])


# =========================================================================== 4. testing function
def _expect_testing_function(classifier: nn.Module, stamped: torch.Tensor, targets: torch.Tensor | int
                               ) -> torch.Tensor:
    """``f`` per sample: the softmax probability of its own target class."""
    probs = classifier(stamped).softmax(1)
    t = torch.as_tensor(targets, device=stamped.device).expand(len(stamped))
    return probs.gather(1, t.reshape(-1, 1)).squeeze(1)


def _classifier(seed: int, d: int, k: int) -> nn.Module:
    with seeded(seed):  # the caller's (the student's) global random stream stays as it was
        return nn.Sequential(nn.Flatten(), nn.Linear(d, k)).eval()


def _testing_case(seed: int, B: int, K: int, per_sample: bool) -> Callable:
    def case(fn: Callable) -> None:
        model = _classifier(seed, 16, K)
        g = torch.Generator().manual_seed(seed)
        x = (3 * torch.randn(B, 1, 4, 4, generator=g)).requires_grad_(True)
        targets = torch.randint(0, K, (B,), generator=g) if per_sample else 2
        out = tensor(call(fn, model, x, targets), "f")
        with torch.no_grad():
            want = _expect_testing_function(model, x, targets)
            logits = model(x)
        if out.shape != (B,):
            raise Wrong(f"return one value per sample, shape ({B},); got {tuple(out.shape)}")
        o = out.detach()
        if torch.allclose(o, want, atol=1e-6):
            if not out.requires_grad:
                raise Wrong("f is not differentiable in the stamped images (the generators learn through "
                            "it); avoid .detach(), .item() and torch.no_grad()")
            return
        t = torch.as_tensor(targets).expand(B).reshape(-1, 1)
        if torch.allclose(o, logits.gather(1, t).squeeze(1), atol=1e-5):
            raise Wrong("these are logits, not probabilities: apply softmax over the classes first")
        if torch.allclose(o, logits.log_softmax(1).gather(1, t).squeeze(1), atol=1e-5):
            raise Wrong("these are log-probabilities; f is the softmax probability itself")
        if torch.allclose(o, logits.softmax(0).gather(1, t).squeeze(1), atol=1e-5):
            raise Wrong("softmax over the wrong dimension: normalise over the classes (dim=1), not the batch")
        if per_sample and any(torch.allclose(o, logits.softmax(1)[:, c], atol=1e-6) for c in range(K)):
            raise Wrong("every sample got the probability of the same class; each sample has its own target "
                        "(targets[b]): gather with the targets tensor")
        raise Wrong(f"wrong values: for sample 0 expected {want[0].item():.5f}, got {o[0].item():.5f}")

    return case


def check_testing_function(fn: Callable, hidden: bool = False) -> Score:
    """``fn(classifier, stamped [B,C,H,W], targets int or [B]) -> f [B]``, no loops."""
    return _run("testing function f", fn,
                [_testing_case(100, 6, 4, False)],
                hidden, forbidden=[target_probability, _target_softmax, _expect_testing_function], no_loops=True)


# =========================================================================== 5. the hinge
def _expect_hinge_loss(f: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """The hinge term of a MESA sub-model's loss, ``-mean(min(f, beta))``.

    It is the line ``hinge = torch.minimum(f, beta_per)...mean(1)`` of
    :meth:`mesa_lib.mesa.StaircaseTrainer.step` (there summed over sub-models, negated in ``loss_g``).
    """
    beta = torch.as_tensor(beta, dtype=f.dtype, device=f.device)
    return -torch.minimum(f, beta).mean()


def _hinge_case(seed: int, n: int, beta: Any) -> Callable:
    def case(fn: Callable) -> None:
        g = torch.Generator().manual_seed(seed)
        f0 = torch.rand(n, generator=g)
        b_arg = beta(n) if callable(beta) else beta
        f = f0.clone().requires_grad_(True)
        out = scalar(call(fn, f, b_arg), "the hinge loss")
        if not torch.equal(f.detach(), f0):
            raise Wrong("you modified f in place (e.g. f.clamp_ or f[...] = ...); "
                        "use out-of-place operations such as torch.minimum")
        want = _expect_hinge_loss(f0, b_arg)
        got = out.detach()
        bt = torch.as_tensor(b_arg)
        if torch.allclose(got, want, atol=1e-6):
            pass
        elif torch.allclose(got, -want, atol=1e-6):
            raise Wrong("wrong sign: this is a loss that is MINIMISED, so it is "
                        "-mean(min(f, beta)) (maximising the capped score)")
        elif torch.allclose(got, want * n, atol=1e-4) or torch.allclose(got, -want * n, atol=1e-4):
            raise Wrong("you summed over the batch; average instead (mean), so the loss does not "
                        "depend on the batch size")
        elif torch.allclose(got, -torch.maximum(f0, bt).mean(), atol=1e-6) or \
                torch.allclose(got, torch.maximum(f0, bt).mean(), atol=1e-6):
            raise Wrong("you used max(f, beta); the hinge CAPS the score at beta: min(f, beta)")
        elif torch.allclose(got, -f0.mean(), atol=1e-6) or torch.allclose(got, f0.mean(), atol=1e-6):
            raise Wrong("the score is not capped at beta: use min(f, beta), so samples already "
                        "inside the valid set stop being pushed")
        else:
            raise Wrong(f"wrong value: for this batch expected {want.item():.5f}, got {got.item():.5f}")
        if not out.requires_grad:
            raise Wrong("the loss is not differentiable in f (the generator learns through it); "
                        "avoid .detach(), .item() and torch.no_grad()")
        out.backward()
        grad = f.grad if f.grad is not None else torch.zeros_like(f0)
        b = bt.expand_as(f0)
        below, above = f0 < b, f0 > b
        if not torch.allclose(grad[above], torch.zeros(int(above.sum()))):
            raise Wrong("samples with f > beta still get a gradient; the hinge must leave them alone")
        if not torch.allclose(grad[below], torch.full((int(below.sum()),), -1.0 / n)):
            raise Wrong("samples with f < beta get the wrong gradient (expected -1/B each)")

    return case


def _per_sample_betas(n: int) -> torch.Tensor:
    return torch.tensor([0.5, 0.8, 0.9]).repeat_interleave(n // 3 + 1)[:n]


def check_hinge(fn: Callable, hidden: bool = False) -> Score:
    """``fn(f [B], beta) -> -mean(min(f, beta))``; ``beta`` a float or a ``[B]`` tensor."""
    return _run("hinge", fn,
                [_hinge_case(100, 16, 0.7)],
                hidden, forbidden=[_expect_hinge_loss])


# =========================================================================== 6. the DV bound
def _dv_values_case(seed: int, n: int) -> Callable:
    def case(fn: Callable) -> None:
        g = torch.Generator().manual_seed(seed)
        tj0 = torch.randn(n, generator=g) + 1.0
        tm0 = torch.randn(n, generator=g) * 0.7
        tj, tm = tj0.clone().requires_grad_(True), tm0.clone().requires_grad_(True)
        out = scalar(call(fn, tj, tm), "the DV bound")
        if not (torch.equal(tj.detach(), tj0) and torch.equal(tm.detach(), tm0)):
            raise Wrong("you modified an input in place; use out-of-place operations")
        want = dv_bound(tj0, tm0)
        got = out.detach()
        if not torch.isfinite(got):
            raise Wrong(f"the result is {got.item()} for ordinary values of T")
        if not torch.allclose(got, want, atol=1e-5):
            if torch.allclose(got, want - math.log(n), atol=1e-4):
                raise Wrong("off by log(n): log MEAN exp = logsumexp(t) - log(n), you used the log of the sum "
                            "without subtracting log(n)")
            if torch.allclose(got, dv_bound(tm0, tj0), atol=1e-5):
                raise Wrong("arguments swapped: the mean is over the joint pairs, the log-mean-exp over "
                            "the marginal (shuffled) pairs")
            if torch.allclose(got, tj0.mean() - tm0.mean(), atol=1e-5):
                raise Wrong("log(mean(exp(t))) is not mean(t) (Jensen); keep the exp inside the mean")
            if torch.allclose(got, -want, atol=1e-5):
                raise Wrong("wrong sign: the bound is mean(T_joint) MINUS log mean exp(T_marginal)")
            raise Wrong(f"wrong value: expected {want.item():.5f}, got {got.item():.5f}")
        if not out.requires_grad:
            raise Wrong("the bound is not differentiable (T and the generator learn through it); "
                        "avoid .detach(), .item() and torch.no_grad()")
        out.backward()
        if tj.grad is None or tm.grad is None:
            raise Wrong("no gradient reaches one of the inputs")
        if not torch.allclose(tm.grad, -torch.softmax(tm0, 0), atol=1e-6):
            raise Wrong("wrong gradient for t_marginal (it should be -softmax(t_marginal))")

    return case


def _dv_extreme_case(seed: int, n: int, shift: float) -> Callable:
    word = "large" if shift > 0 else "very negative"

    def case(fn: Callable) -> None:
        g = torch.Generator().manual_seed(seed)
        tj0 = torch.randn(n, generator=g) + shift
        tm0 = torch.randn(n, generator=g) * 0.7 + shift
        big = tensor(call(fn, tj0, tm0), "the DV bound").detach()
        ref = dv_bound(tj0, tm0)
        if not torch.isfinite(big).all():
            raise Wrong(f"overflows for {word} T (T ~ {shift:+.0f} gives {big.flatten()[0].item()}): "
                        "exp(T) is not representable; compute log(mean(exp(t))) as "
                        "torch.logsumexp(t, 0) - log(n)")
        if big.shape == ref.shape and torch.allclose(big, ref - math.log(n), atol=1e-3):
            return  # stable, but off by log(n): the values case takes the point for that, not this one
        if big.shape != ref.shape or not torch.allclose(big, ref, atol=1e-3):
            raise Wrong(f"inaccurate for {word} T (T ~ {shift:+.0f}): expected {ref.item():.4f}, "
                        f"got {big.flatten()[0].item():.4f}; use torch.logsumexp")

    return case


def check_dv_bound(fn: Callable, hidden: bool = False) -> Score:
    """``fn(t_joint [n], t_marginal [n]) -> mean(t_joint) - log(mean(exp(t_marginal)))``, stable."""
    return _run("DV bound", fn,
                [_dv_values_case(100, 20)],
                hidden, forbidden=[dv_bound, log_mean_exp])


# =========================================================================== 7. a MINE step
def _expect_mine_step(T: nn.Module, optimizer: torch.optim.Optimizer, z: torch.Tensor, x: torch.Tensor,
                        z_marginal: torch.Tensor) -> torch.Tensor:
    """One ascent step of the statistics network on the DV bound; returns the bound before the step.

    The samples ``x`` are detached: this step trains T only (the generator has its own loss).
    """
    x = x.detach()
    bound = T(z, x).mean() - (torch.logsumexp(T(z_marginal, x), 0) - math.log(len(x)))
    optimizer.zero_grad()
    (-bound).backward()
    optimizer.step()
    return bound.detach()


def _params(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def _mine_case(seed: int, zd: int, xd: int, n: int) -> Callable:
    def case(fn: Callable) -> None:
        with seeded(seed):  # the caller's global random stream stays as it was
            T = StatisticsNetwork(zd, xd, hidden=16)
        g = torch.Generator().manual_seed(seed)
        z = torch.rand(n, zd, generator=g)
        x = (z[:, :1].repeat(1, xd) + 0.3 * torch.randn(n, xd, generator=g)).requires_grad_(True)
        z_marg = torch.rand(n, zd, generator=g)
        for p in T.parameters():  # gradients left over from an earlier step
            p.grad = torch.full_like(p, 0.5)

        def run_ref(params: torch.Tensor, sign: float = 1.0, zero: bool = True, swap: bool = False) -> tuple:
            """One step of the reference (or of a typical mistake) from the parameters ``params``."""
            m = copy.deepcopy(T)
            torch.nn.utils.vector_to_parameters(params.clone(), m.parameters())
            for p in m.parameters():
                p.grad = torch.full_like(p, 0.5)
            opt = torch.optim.SGD(m.parameters(), lr=0.05)
            a, b = (z_marg, z) if swap else (z, z_marg)
            xd = x.detach()
            bound = m(a, xd).mean() - (torch.logsumexp(m(b, xd), 0) - math.log(n))
            if zero:
                opt.zero_grad()
            (-sign * bound).backward()
            opt.step()
            return bound.detach(), _params(m)

        before = _params(T)
        want_b, want_p = run_ref(before)
        opt = torch.optim.SGD(T.parameters(), lr=0.05)
        out = scalar(call(fn, T, opt, z, x, z_marg), "the returned bound")
        after = _params(T)
        if torch.equal(after, before):
            raise Wrong("the parameters of T did not change: call optimizer.step() after backward()")
        if not torch.allclose(after, want_p, atol=1e-6):
            if torch.allclose(after, run_ref(before, zero=False)[1], atol=1e-6):
                raise Wrong("old gradients were added to this step's: call optimizer.zero_grad() before backward()")
            if torch.allclose(after, run_ref(before, sign=-1.0)[1], atol=1e-6):
                raise Wrong("wrong direction: T MAXIMISES the bound, so minimise the loss -bound "
                            "(you descended on the bound)")
            if torch.allclose(after, run_ref(before, swap=True)[1], atol=1e-6):
                raise Wrong("joint and marginal pairs swapped: T(z, x) of matched pairs is averaged, "
                            "T(z_marginal, x) goes inside the log-mean-exp")
            raise Wrong("T's parameters after your step differ from one optimizer step that maximises the DV "
                        "bound mean(T(z, x)) - log mean exp(T(z_marginal, x))")
        if x.grad is not None and bool((x.grad != 0).any()):
            raise Wrong("the gradient leaked into the samples x: detach them (x.detach()); this step trains T only")
        got = out.detach()
        if not torch.allclose(got, want_b, atol=1e-5):
            if torch.allclose(got, -want_b, atol=1e-5):
                raise Wrong("return the bound (the MI estimate), not the loss -bound")
            raise Wrong(f"return the bound computed before the step: expected {want_b.item():.5f}, "
                        f"got {got.item():.5f}")
        if out.requires_grad:
            raise Wrong("return a detached value (bound.detach()): a logged number must not keep the graph")

    return case


def check_mine_step(fn: Callable, hidden: bool = False) -> Score:
    """``fn(T, optimizer, z, x, z_marginal) -> bound``: one ascent step of T on the DV bound."""
    return _run("MINE training step", fn,
                [_mine_case(100, 2, 3, 16)],
                hidden, forbidden=[MINE.forward, train_mine, _expect_mine_step])


# =========================================================================== 8. the mixture sampler
def _expect_mixture_sample(candidates: torch.Tensor, gammas: torch.Tensor,
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample ``j`` is ``candidates[c_j, j]`` with ``c_j ~ gammas / gammas.sum()``: no loops."""
    N, n = candidates.shape[:2]
    comp = torch.multinomial(gammas / gammas.sum(), n, replacement=True, generator=generator)
    return candidates[comp, torch.arange(n, device=candidates.device)]


def _mixture_case(seed: int, gammas: list[float], n: int = 6000) -> Callable:
    def case(fn: Callable) -> None:
        N = len(gammas)
        gam = torch.tensor(gammas)
        # candidate [i, j] is a 1x2x2 "trigger" that encodes its step i and its index j
        code = (100000 * torch.arange(N)[:, None] + torch.arange(n)[None, :]).float()
        cand = code[:, :, None, None, None].expand(N, n, 1, 2, 2).clone()
        out = tensor(call(fn, cand, gam.clone(), torch.Generator().manual_seed(seed)), "the samples")
        if out.shape != (n, 1, 2, 2):
            raise Wrong(f"return one sample per column, shape {(n, 1, 2, 2)}; got {tuple(out.shape)}")
        v = out[:, 0, 0, 0].round().long()
        step, idx = v // 100000, v % 100000
        if not torch.equal(out, out[:, :1, :1, :1].expand_as(out)) or bool(((step < 0) | (step >= N)).any()):
            raise Wrong("each sample must be one whole candidate, candidates[i, j] (do not mix pixels of "
                        "different steps)")
        if not torch.equal(idx, torch.arange(n)):
            raise Wrong("sample j must be a candidate of column j (candidates[c_j, j]); you took candidates "
                        "from other columns")
        freq = torch.bincount(step, minlength=N).float() / n
        p = gam / gam.sum()
        if bool(((p == 0) & (freq > 0)).any()):
            raise Wrong("a step with weight gamma_i = 0 was sampled; it must never be")
        sd = (p * (1 - p) / n).sqrt()
        if bool(((freq - p).abs() > 5 * sd + 1e-3).any()):
            for shift in (1, -1):
                if bool(((freq - p.roll(shift)).abs() <= 5 * sd.roll(shift) + 1e-3).all()) and not torch.allclose(
                        p, p.roll(shift)):
                    raise Wrong("the steps are off by one: the frequencies are the weights shifted by one step; "
                                "sample j is candidates[c_j, j] with c_j the drawn index itself (no + 1 or - 1)")
            if freq.max() == 1.0:
                raise Wrong("every sample came from the same step; draw one step per sample with probability "
                            "gamma_i (torch.multinomial)")
            if torch.allclose(freq, torch.full((N,), 1.0 / N), atol=0.03) and not torch.allclose(
                    p, torch.full((N,), 1.0 / N)):
                raise Wrong("the steps are drawn uniformly; draw step i with probability gamma_i / sum(gamma)")
            raise Wrong(f"the steps' frequencies {[round(f, 3) for f in freq.tolist()]} do not match the "
                        f"weights gamma / sum(gamma) = {[round(q, 3) for q in p.tolist()]}")
        again = call(fn, cand, gam.clone(), torch.Generator().manual_seed(seed))
        if not torch.equal(again, out):
            raise Wrong("two calls with equally seeded generators gave different samples: pass the "
                        "generator to the random functions (torch.multinomial(..., generator=generator))")

    return case


def check_mixture_sample(fn: Callable, hidden: bool = False) -> Score:
    """``fn(candidates [N, n, *shape], gammas [N], generator) -> [n, *shape]``, no loops."""
    return _run("staircase mixture sampler", fn,
                [_mixture_case(100, [1.0, 1.0])],
                hidden, forbidden=[StaircaseSampler.sample, _expect_mixture_sample], no_loops=True)


# =========================================================================== 9-10. the Gibbs optimum on the toy
def _expect_gibbs_optimum(f: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """The maximiser of ``E_p[min(f, beta)] + alpha * H(p)`` over distributions on the grid:
    ``p* ∝ exp(min(f, beta) / alpha)`` (a softmax, so no overflow for small alpha)."""
    return torch.softmax(torch.clamp(f, max=beta) / alpha, dim=0)


def _expect_valid_mass(f: torch.Tensor, beta: float, alpha: float) -> float:
    """The mass ``p*(X_beta)`` that the Gibbs optimum puts on ``f > beta``."""
    return float(_expect_gibbs_optimum(f, beta, alpha)[f > beta].sum())


def _toy_f(n: int) -> torch.Tensor:
    return ToyLandscape().grid(n)[1].double()


def _gibbs_case(f_maker: Callable[[], torch.Tensor], beta: float, alpha: float) -> Callable:
    def case(fn: Callable) -> None:
        f = f_maker()
        f0 = f.clone()
        out = tensor(call(fn, f, beta, alpha), "p*")
        if not torch.equal(f, f0):
            raise Wrong("you modified f in place; use torch.clamp / torch.minimum (not clamp_)")
        if out.shape != f.shape:
            raise Wrong(f"return one probability per grid cell, shape {tuple(f.shape)}; got {tuple(out.shape)}")
        o = out.detach().double()
        want = _expect_gibbs_optimum(f, beta, alpha)
        if not torch.isfinite(o).all():
            raise Wrong(f"non-finite values for alpha = {alpha}: exp(min(f, beta) / alpha) overflows; "
                        "subtract the maximum first, or use torch.softmax")
        if torch.allclose(o, want, atol=1e-9, rtol=1e-6):
            return
        if not math.isclose(float(o.sum()), 1.0, abs_tol=1e-6):
            raise Wrong(f"p* must be a distribution: it sums to {float(o.sum()):.4g}, not 1 (normalise)")
        if torch.allclose(o, torch.softmax(f / alpha, 0), atol=1e-9, rtol=1e-6):
            raise Wrong("f is not capped at beta: the objective uses min(f, beta), so the optimum is flat "
                        "on X_beta")
        if torch.allclose(o, torch.softmax(torch.clamp(f, max=beta) * alpha, 0), atol=1e-9, rtol=1e-6):
            raise Wrong("divide by alpha, do not multiply: p* ∝ exp(min(f, beta) / alpha)")
        capped = torch.clamp(f, max=beta)
        if torch.allclose(o, capped / capped.sum(), atol=1e-9, rtol=1e-6):
            raise Wrong("p* ∝ exp(min(f, beta) / alpha), not min(f, beta) itself")
        raise Wrong(f"wrong values: the largest probability should be {want.max().item():.4g}, "
                    f"yours is {o.max().item():.4g}")

    return case


def _random_f(seed: int, n: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def check_gibbs_optimum(fn: Callable, hidden: bool = False) -> Score:
    """``fn(f [M], beta, alpha) -> p* [M]``, ``p* ∝ exp(min(f, beta) / alpha)``, stable for small alpha."""
    return _run("Gibbs optimum", fn,
                [_gibbs_case(_random_f(100, 10), 0.6, 0.5)],
                hidden, forbidden=[_expect_gibbs_optimum])


def _mass_case(f_maker: Callable[[], torch.Tensor], beta: float, alpha: float) -> Callable:
    def case(fn: Callable) -> None:
        f = f_maker()
        out = call(fn, f, beta, alpha)
        if isinstance(out, torch.Tensor):
            if out.numel() != 1:
                raise Wrong(f"return one number (the mass), got a tensor of shape {tuple(out.shape)}")
            out = out.item()
        if not isinstance(out, (int, float)) or isinstance(out, bool):
            raise Wrong(f"return a number, got {type(out).__name__}")
        want = _expect_valid_mass(f, beta, alpha)
        if math.isclose(out, want, abs_tol=1e-6):
            return
        p = _expect_gibbs_optimum(f, beta, alpha)
        if math.isclose(out, float(p[f >= beta].sum()), abs_tol=1e-6):
            raise Wrong("you counted the cells with f = beta; the valid set is f > beta (strictly)")
        if math.isclose(out, 1 - want, abs_tol=1e-6):
            raise Wrong("this is the mass OUTSIDE X_beta; sum p* over the cells with f > beta")
        if math.isclose(out, float((f > beta).double().mean()), abs_tol=1e-6):
            raise Wrong("this is the fraction of grid cells in X_beta; weight them by p*")
        if math.isclose(out, 100 * want, abs_tol=1e-4):
            raise Wrong("return a fraction in [0, 1], not a percentage")
        raise Wrong(f"wrong mass: expected {want:.5f}, got {out:.5f}")

    return case


def _f_with_ties(seed: int) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        f = torch.rand(200, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        f[::7] = 0.5  # cells exactly on the threshold
        return f

    return make


def check_valid_mass(fn: Callable, hidden: bool = False) -> Score:
    """``fn(f [M], beta, alpha) -> float``: the mass of ``p*`` inside ``X_beta = {f > beta}``."""
    return _run("mass inside X_beta", fn,
                [_mass_case(_random_f(100, 12), 0.5, 0.3)],
                hidden, forbidden=[_expect_valid_mass, _expect_gibbs_optimum])


# =========================================================================== 11. the target scan
def _expect_anomaly_index(asr: torch.Tensor) -> tuple[int, float]:
    """The detected class and its anomaly index, as :func:`mesa_lib.detect.scan_classes` computes
    them: ``(asr[top] - median) / max(1.4826 * MAD, 1e-3)``, MAD the median absolute deviation,
    a median of an even count the mean of its two middle values."""
    from ..detect import anomaly_index_of_top

    return anomaly_index_of_top(asr)


def _anomaly_case(values: list[float]) -> Callable:
    def case(fn: Callable) -> None:
        asr = torch.tensor(values, dtype=torch.float64)
        out = call(fn, asr.clone())
        if not (isinstance(out, tuple) and len(out) == 2):
            raise Wrong("return a pair (class, anomaly index)")
        top, idx = out
        if isinstance(top, torch.Tensor) and top.numel() == 1:
            top = top.item()
        if isinstance(idx, torch.Tensor) and idx.numel() == 1:
            idx = idx.item()
        if not isinstance(top, int) or isinstance(top, bool):
            raise Wrong(f"the class must be an int, got {type(top).__name__}")
        if not isinstance(idx, (int, float)):
            raise Wrong(f"the anomaly index must be a number, got {type(idx).__name__}")
        want_top, want = _expect_anomaly_index(asr)
        if top != want_top:
            if top == int(asr.argmin()):
                raise Wrong("you picked the class with the LOWEST ASR; the suspect is the highest")
            raise Wrong(f"wrong class: expected {want_top} (the highest ASR), got {top}")
        if not math.isfinite(idx):
            raise Wrong("the index is not finite: when the MAD is 0 (all other classes equal) clamp it "
                        "to at least 1e-3 before dividing")
        if math.isclose(idx, want, rel_tol=1e-6, abs_tol=1e-6):
            return
        a, med = asr, torch.quantile(asr, 0.5)
        mad = torch.quantile((a - med).abs(), 0.5)
        if math.isclose(idx, float((a[want_top] - med) / mad.clamp(min=1e-3)), rel_tol=1e-6):
            raise Wrong("missing the consistency constant: the robust standard deviation is 1.4826 x MAD")
        low = asr.median()  # torch.median: the lower middle value of an even count
        low_mad = (a - low).abs().median()
        if math.isclose(idx, float((a[want_top] - low) / (1.4826 * low_mad).clamp(min=1e-3)), rel_tol=1e-6):
            raise Wrong("torch.median returns the LOWER middle value of an even count; the median of 10 "
                        "classes is the mean of the two middle values (torch.quantile(x, 0.5))")
        if math.isclose(idx, float((a[want_top] - a.mean()) / a.std()), rel_tol=1e-6) or math.isclose(
                idx, float((a[want_top] - a.mean()) / a.std(unbiased=False)), rel_tol=1e-6):
            raise Wrong("you used the mean and standard deviation; the outlier itself inflates them. Use the "
                        "median and 1.4826 x the median absolute deviation")
        if math.isclose(idx, float((a[want_top] - a.mean()) / (1.4826 * mad).clamp(min=1e-3)), rel_tol=1e-6):
            raise Wrong("centre on the median, not the mean")
        raise Wrong(f"wrong anomaly index: expected {want:.4f}, got {idx:.4f}")

    return case


def check_anomaly_index(fn: Callable, hidden: bool = False) -> Score:
    """``fn(asr [K]) -> (class, anomaly index)`` with the median / MAD rule of the target scan."""
    return _run("target scan", fn,
                [_anomaly_case([0.02, 0.05, 0.9, 0.03, 0.04])],
                hidden, forbidden=[scan_classes, anomaly_index_of_top, _expect_anomaly_index])


# =========================================================================== 12. retraining transform
MARK = 1.0
"""The retraining item's trigger value: white, where its test images are all darker than 0.5."""


def _retrain_case(ratios: tuple[float, ...], check_random: bool = False, seed: int = 3) -> Callable:
    def case(fn: Callable) -> None:
        g0 = torch.Generator().manual_seed(seed)
        x0 = 0.5 * torch.rand(50, 1, 12, 12, generator=g0)  # pixels below 0.5 ...
        y0 = torch.randint(0, 10, (50,), generator=g0)
        mark = torch.full((1, 3, 3), MARK)  # ... so the trigger's value 1 is one no image has
        sampler = FixedTrigger(mark)
        for ratio in ratios:
            x, y = x0.clone(), y0.clone()
            out = call(fn, x, y, sampler, ratio, torch.Generator().manual_seed(4))
            if not (isinstance(out, tuple) and len(out) == 2):
                raise Wrong("return a pair (images, labels)")
            xs, ys = tensor(out[0], "the images"), tensor(out[1], "the labels")
            if not (torch.equal(x, x0) and torch.equal(y, y0)):
                raise Wrong("you modified the input batch in place; clone it first (x = x.clone())")
            if xs.shape != x0.shape or ys.shape != y0.shape:
                raise Wrong(f"wrong shapes: expected images {tuple(x0.shape)} and labels {tuple(y0.shape)}, "
                            f"got {tuple(xs.shape)} and {tuple(ys.shape)}")
            if not torch.equal(ys, y0):
                raise Wrong("labels changed: the defense keeps the TRUE labels (relabelling to the target "
                            "is the attack, not the defense)")
            ref_x, _ = stamp_transform(sampler, ratio)(x0, y0, torch.Generator().manual_seed(4))
            k = int((ref_x != x0).flatten(1).any(1).sum())
            changed = (xs != x0).flatten(1).any(1)
            if int(changed.sum()) != k:
                extra = " (at least one image when ratio > 0)" if ratio > 0 and round(ratio * len(x0)) == 0 else ""
                raise Wrong(f"with ratio={ratio} and a batch of {len(x0)}, {k} images must be stamped{extra}; "
                            f"you changed {int(changed.sum())}")
            if k and not bool(changed[:k].all()):
                raise Wrong("stamp the FIRST k images of the (already shuffled) batch")
            n_mark = (xs[:k] == MARK).flatten(1).sum(1)
            if k and not bool((n_mark == mark.numel()).all()):
                raise Wrong("each stamped image must hold one whole trigger drawn from the sampler "
                            "(use sampler.sample(k, generator=generator) and paste_at_random)")
            if k and not torch.equal(torch.where(xs[:k] == MARK, x0[:k], xs[:k]), x0[:k]):
                raise Wrong("pixels outside the trigger patch changed")
        if check_random:
            xs, _ = call(fn, x0.clone(), y0.clone(), sampler, 0.5, torch.Generator().manual_seed(5))
            where = (xs[:25] == MARK).flatten(1).float().argmax(1)
            if len(torch.unique(where)) < 3:
                raise Wrong("the triggers always land in the same place; stamp at a random location per "
                            "image (paste_at_random(images, triggers, generator))")

    return case


def check_retrain_transform(fn: Callable, hidden: bool = False) -> Score:
    """``fn(x, y, sampler, ratio, generator) -> (x', y')``: the first ``k = round(ratio * B)``
    images (at least one when ``ratio > 0``) get a sampled trigger at a random location; the
    labels stay; the inputs are not modified. Reference: :func:`mesa_lib.defense.stamp_transform`."""
    return _run("retraining transform", fn,
                [_retrain_case((0.2,), seed=100)],
                hidden, forbidden=[stamp_transform, retrain])


# =========================================================================== 13. ASR
class _RuleModel(nn.Module):
    """A classifier with a known backdoor, for the ASR item: on flat images of brightness v/2
    (v in [0, 1)) it predicts ``floor(v * K)``; a bright patch (> 0.75, darker than any image
    pixel can be) flips images with v > ``cut`` to ``target``. Both rules ignore where the patch
    is, so any random location gives the same ASR."""

    def __init__(self, K: int, target: int, cut: float):
        super().__init__()
        self.K, self.target, self.cut = K, target, cut
        self.dummy = nn.Parameter(torch.zeros(()))  # so next(model.parameters()) works

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = 2 * x.clamp(max=0.5).flatten(1).mean(1)
        clean = (v * self.K).long().clamp(0, self.K - 1)
        fired = (x > 0.75).flatten(1).any(1) & (v > self.cut)
        cls = torch.where(fired, torch.full_like(clean, self.target), clean)
        return nn.functional.one_hot(cls, self.K).float() * 10 + 0 * self.dummy


def _expect_attack_success(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                             trigger: torch.Tensor, target: int, generator: torch.Generator | None = None) -> float:
    """ASR: the fraction of the images whose TRUE label is not ``target`` that the model
    classifies as ``target`` once ``trigger`` is pasted at a random location."""
    keep = labels != target
    stamped = paste_at_random(images[keep], trigger, generator)
    with torch.no_grad():
        return (model(stamped).argmax(1) == target).float().mean().item()


def _asr_case(seed: int, K: int, target: int, cut: float, n: int = 200) -> Callable:
    def case(fn: Callable) -> None:
        g = torch.Generator().manual_seed(seed)
        v = torch.rand(n, generator=g)
        images = 0.5 * v[:, None, None, None].expand(n, 1, 10, 10).clone()
        labels = (v * K).long().clamp(0, K - 1)
        flip = torch.rand(n, generator=g) < 0.15  # a few label errors, as in real data
        labels[flip] = torch.randint(0, K, (int(flip.sum()),), generator=g)
        model = _RuleModel(K, target, cut)
        trigger = torch.full((1, 3, 3), 1.0)  # white: a valid trigger, brighter than every image
        out = call(fn, model, images.clone(), labels.clone(), trigger, target, torch.Generator().manual_seed(1))
        if isinstance(out, torch.Tensor):
            if out.numel() != 1:
                raise Wrong(f"return one number, got a tensor of shape {tuple(out.shape)}")
            out = out.item()
        if not isinstance(out, (int, float)) or isinstance(out, bool):
            raise Wrong(f"return a number (a fraction), got {type(out).__name__}")
        want = _expect_attack_success(model, images, labels, trigger, target)
        if math.isclose(out, want, abs_tol=1e-6):
            return
        with torch.no_grad():
            pred_all = model(paste_at_random(images, trigger)).argmax(1)
            clean = model(images).argmax(1)
        keep = labels != target
        if math.isclose(out, 100 * want, abs_tol=1e-4):
            raise Wrong("return a fraction in [0, 1], not a percentage")
        if math.isclose(out, float((pred_all == target).float().mean()), abs_tol=1e-6):
            raise Wrong("you counted the images of the target class too; the ASR is measured on images "
                        "whose TRUE label is not the target")
        if math.isclose(out, float((clean[keep] == target).float().mean()), abs_tol=1e-6):
            raise Wrong("the images were not stamped: paste the trigger first (paste_at_random)")
        if math.isclose(out, float((pred_all[keep] != labels[keep]).float().mean()), abs_tol=1e-6):
            raise Wrong("you counted misclassified images; the attack succeeds only when the prediction is "
                        "the TARGET class")
        if math.isclose(out, float((pred_all[keep] == target).sum()), abs_tol=1e-6):
            raise Wrong("return the fraction, not the count")
        raise Wrong(f"wrong ASR: expected {want:.4f}, got {out:.4f}")

    return case


def check_attack_success(fn: Callable, hidden: bool = False) -> Score:
    """``fn(model, images, labels, trigger, target, generator) -> ASR``, on the non-target images."""
    return _run("attack success rate", fn,
                [_asr_case(100, 4, 0, 0.3, n=40)],
                hidden, forbidden=[_evaluate.attack_success_rate, _evaluate.asr_per_trigger, _evaluate.evaluate_model,
                                    _expect_attack_success])


# =========================================================================== 14. the sign test (chapter 9)
def _binom_tail(m: int, k: int) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(m, 1/2)``, from exact integers (no overflow for any m)."""
    if k < 0:
        return 0.0
    return sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m


def _expect_sign_test(a: list[float], b: list[float]) -> float:
    """The exact two-sided p-value of the paired sign test: tied pairs dropped; of the ``m``
    untied pairs ``k = min(#a<b, #a>b)``; ``p = min(1, 2 P(X <= k))``, ``X ~ Binomial(m, 1/2)``;
    ``p = 1`` when every pair is tied. The ``"p"`` of :func:`mesa_lib.sweep.sign_test`."""
    lower = sum(x < y for x, y in zip(a, b))
    higher = sum(x > y for x, y in zip(a, b))
    m = lower + higher
    return min(1.0, 2 * _binom_tail(m, min(lower, higher))) if m else 1.0


def _number(out: Any, what: str) -> float:
    """The student's result as a float, or a :class:`Wrong` that says what it was."""
    if isinstance(out, torch.Tensor):
        if out.numel() != 1:
            raise Wrong(f"return one number ({what}), got a tensor of shape {tuple(out.shape)}")
        out = out.item()
    if isinstance(out, dict):
        raise Wrong(f"return {what} alone, as a number (not a dict)")
    if isinstance(out, bool) or not isinstance(out, numbers.Real):
        raise Wrong(f"return {what} as a number, got {type(out).__name__}")
    return float(out)


def _normal_p(m: int, k: int, correction: bool) -> float:
    z = (k + (0.5 if correction else 0.0) - m / 2) / math.sqrt(m / 4)
    return min(1.0, 2 * 0.5 * math.erfc(-z / math.sqrt(2)))


def _paired(seed: int, lower: int, higher: int, ties: int) -> tuple[list[float], list[float]]:
    """Paired ASR-like values (multiples of 1/2000) with the given numbers of a < b, a > b, a == b,
    in a shuffled order."""
    g = torch.Generator().manual_seed(seed)
    n = lower + higher + ties
    signs = torch.tensor([-1] * lower + [1] * higher + [0] * ties)[torch.randperm(n, generator=g)]
    base = torch.randint(150, 1800, (n,), generator=g)
    step = torch.randint(1, 150, (n,), generator=g)
    a = [int(v) / 2000 for v in base]
    b = [int(v - s * d) / 2000 for v, s, d in zip(base, signs, step)]  # s = -1: a < b
    return a, b


def _sign_case(seed: int, lower: int, higher: int, ties: int, all_tied: bool = False) -> Callable:
    def case(fn: Callable) -> None:
        a, b = _paired(seed, lower, higher, ties)
        a0, b0 = list(a), list(b)
        n, m, k = len(a), lower + higher, min(lower, higher)
        try:
            out = _number(call(fn, a, b), "the p-value")
        except Wrong as err:
            if m > 1000 and "Overflow" in str(err):
                raise Wrong(f"with {m} untied pairs your function overflows ({err}): 2.0 ** m or a binomial "
                            "coefficient converted to a float leaves the float range beyond about 1000 pairs; "
                            "divide exact Python integers (math.comb(m, i) / 2 ** m) or work in log space "
                            "(math.lgamma)") from None
            raise
        if a != a0 or b != b0:
            raise Wrong("you modified the input lists in place; work on copies")
        want = sign_test(a, b)["p"]
        if not math.isfinite(out):
            raise Wrong(f"the p-value is {out} for {m} untied pairs")
        if not math.isclose(out, want, rel_tol=1e-7, abs_tol=1e-12):
            one_sided = _binom_tail(m, k)
            directional = [_binom_tail(m, c) for c in (lower, higher) if c != k]
            if out > 1 + 1e-9:
                raise Wrong(f"a p-value cannot exceed 1 (got {out:.4g}): cap the doubled tail, "
                            "p = min(1, 2 * P(X <= k))")
            if math.isclose(out, one_sided, rel_tol=1e-7, abs_tol=1e-12):
                raise Wrong("this is the one-sided p-value (the smaller tail); the two-sided test doubles it: "
                            "p = min(1, 2 * P(X <= k))")
            if any(math.isclose(out, v, rel_tol=1e-7) or math.isclose(out, min(1.0, 2 * v), rel_tol=1e-7)
                   for v in directional):
                raise Wrong("you took the tail in a fixed direction (counting the pairs with a < b, or with "
                            "a > b); a two-sided test uses the SMALLER of the two counts, k = min(lower, higher)")
            if ties and any(math.isclose(out, v, rel_tol=1e-7, abs_tol=1e-12) for v in (
                    min(1.0, 2 * _binom_tail(n, k)), _binom_tail(n, k), min(1.0, 2 * _binom_tail(n, k + ties)),
                    min(1.0, 2 * _binom_tail(n, k + ties // 2)))):
                raise Wrong(f"tied pairs (a == b, {ties} here) must be dropped: the test counts only the "
                            "m pairs that differ (m = lower + higher), since a tie says nothing about the direction")
            if math.isclose(out, min(1.0, 2 * _binom_tail(m, k - 1)), rel_tol=1e-7, abs_tol=1e-12):
                raise Wrong("the tail must include k itself: P(X <= k) sums the binomial probabilities of "
                            "i = 0, 1, ..., k")
            if any(math.isclose(out, _normal_p(m, k, c), rel_tol=1e-6, abs_tol=1e-12) for c in (False, True)):
                raise Wrong("this is the normal approximation; the exact test sums binomial probabilities "
                            "C(m, i) / 2^m over i = 0..k")
            if math.isclose(out, 1 - want, rel_tol=1e-7, abs_tol=1e-12):
                raise Wrong("you returned 1 - p; the p-value is the (doubled) tail probability itself")
            if m > 1000:
                raise Wrong(f"inaccurate with {m} untied pairs: expected p = {want:.6g}, got {out:.6g}; "
                            "compute in float64 from exact integers (math.comb) or in log space")
            raise Wrong(f"wrong p-value: expected {want:.6g}, got {out:.6g}")
        if all_tied:
            try:
                same = _number(call(fn, a0, list(a0)), "the p-value")
            except Wrong as err:
                raise Wrong("when every pair is tied there is no untied pair (m = 0) and no evidence either "
                            f"way: return p = 1 ({err})") from None
            if not (math.isfinite(same) and math.isclose(same, 1.0)):
                raise Wrong(f"when every pair is tied (m = 0) there is no evidence either way: p = 1, got {same}")

    return case


def check_sign_test(fn: Callable, hidden: bool = False) -> Score:
    """``fn(a, b) -> p``: the exact two-sided p-value of the paired sign test of two equally long
    lists (ties dropped; ``p = 1`` when all pairs tie). Reference: :func:`mesa_lib.sweep.sign_test`."""
    return _run("sign test", fn,
                [_sign_case(100, 6, 2, 1)],
                hidden, forbidden=[sign_test, _expect_sign_test])


# =========================================================================== 15. the bootstrap (chapter 9)
_BOOT_REF_N = 200_000  # resamples of the checker's own intervals: their Monte Carlo error is negligible


def _boot(values: list[float], q_lo: float, q_hi: float, stat: str = "mean") -> tuple[float, float]:
    """Quantiles ``q_lo``, ``q_hi`` of the bootstrap distribution of the mean (or median)."""
    t = torch.as_tensor(values, dtype=torch.float64)
    idx = torch.randint(0, len(t), (_BOOT_REF_N, len(t)), generator=torch.Generator().manual_seed(7))
    r = t[idx]
    s = {"mean": lambda: r.mean(1), "median": lambda: r.quantile(0.5, dim=1),
         "lower median": lambda: r.median(1).values}[stat]()
    q = torch.quantile(s, torch.tensor([q_lo, q_hi], dtype=torch.float64))
    return float(q[0]), float(q[1])


def _interval(out: Any) -> tuple[float, float]:
    if isinstance(out, torch.Tensor):
        if out.numel() != 2:
            raise Wrong(f"return a pair (lower, upper), got a tensor of shape {tuple(out.shape)}")
        out = out.flatten().tolist()
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise Wrong("return a pair (lower, upper)")
    return _number(out[0], "the lower end"), _number(out[1], "the upper end")


_SKEWED = [0.004, 0.006, 0.007, 0.008, 0.01, 0.012, 0.015, 0.02, 0.03, 0.05, 0.12, 0.31]
"""Twelve ASR-like values with a long right tail: their mean's bootstrap distribution is skewed, so
a percentile interval is not symmetric about the mean."""


def _boot_values(seed: int, n: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return [round(float(v), 4) for v in 0.3 * torch.rand(n, generator=g, dtype=torch.float64) ** 3]


def _boot_case(values: list[float], level: float, n: int = 40_000, seed: int = 0, repeat: bool = False,
               constant: bool = False) -> Callable:
    def case(fn: Callable) -> None:
        v0 = list(values)
        lo, hi = _interval(call(fn, v0, level, n, torch.Generator().manual_seed(seed)))
        if v0 != values:
            raise Wrong("you modified the input list in place; work on a copy")
        t = torch.tensor(values, dtype=torch.float64)
        se = float(t.std() / math.sqrt(len(t)))
        tol = 0.15 * se + 1e-9  # about six times the Monte Carlo error of n resamples
        want = bootstrap_ci(values, level, n=_BOOT_REF_N, seed=seed + 11)

        def near(iv: tuple[float, float]) -> bool:
            return abs(lo - iv[0]) <= tol and abs(hi - iv[1]) <= tol

        if not near(want):
            mean = float(t.mean())
            tails = ((1 - level) / 2, (1 + level) / 2)
            if lo > hi:
                raise Wrong("the interval is reversed: return (lower, upper)")
            if abs(hi - lo) < 1e-12:
                raise Wrong("every resampled mean was the same: resample WITH replacement (indices from "
                            "torch.randint(0, len(values), (n, len(values)), generator=generator)); a "
                            "permutation of the values has the same mean")
            vq = torch.quantile(t, torch.tensor(tails, dtype=torch.float64))
            if near((float(vq[0]), float(vq[1]))):
                raise Wrong("these are quantiles of the values themselves; the interval is made of quantiles of "
                            "the n resampled MEANS")
            if abs(lo - 100 * want[0]) <= 100 * tol and abs(hi - 100 * want[1]) <= 100 * tol:
                raise Wrong("return fractions, on the scale of the values, not percentages")
            if level != 0.95 and near(_boot(values, 0.025, 0.975)):
                raise Wrong(f"this is a 95% interval, but level = {level}: leave (1 - level) / 2 in each tail")
            if near(_boot(values, 1 - level, level)) or near(_boot(values, level / 2, 1 - level / 2)):
                raise Wrong(f"wrong quantiles: a {level:.0%} interval leaves (1 - level) / 2 of the resampled "
                            f"means in each tail, so take the quantiles {tails[0]:g} and {tails[1]:g}")
            z = math.sqrt(2) * torch.erfinv(torch.tensor(level, dtype=torch.float64)).item()
            for s in (se, float(t.std(unbiased=False) / math.sqrt(len(t)))):
                if near((mean - z * s, mean + z * s)):
                    raise Wrong("this is the symmetric normal interval mean +- z * SE; the percentile bootstrap "
                                "takes the quantiles of the resampled means, which are not symmetric about "
                                "the mean for skewed values like these")
            if near(_boot(values, *tails, stat="median")) or near(_boot(values, *tails, stat="lower median")):
                raise Wrong("you bootstrapped the median; the interval is for the MEAN of the values")
            raise Wrong(f"expected about ({want[0]:.4f}, {want[1]:.4f}) (within {tol:.1g}, the Monte Carlo "
                        f"error of {n} resamples), got ({lo:.4f}, {hi:.4f})")
        if repeat:
            again = _interval(call(fn, list(values), level, n, torch.Generator().manual_seed(seed)))
            if again != (lo, hi):
                raise Wrong("two calls with equally seeded generators gave different intervals: draw the "
                            "resamples with the generator (torch.randint(..., generator=generator))")
        if constant:
            c = [values[0]] * 9
            lo_c, hi_c = _interval(call(fn, c, level, 1000, torch.Generator().manual_seed(seed)))
            if not (math.isclose(lo_c, c[0], rel_tol=1e-5) and math.isclose(hi_c, c[0], rel_tol=1e-5)):
                raise Wrong(f"for nine equal values {c[0]} every resampled mean is {c[0]}, so the interval is "
                            f"({c[0]}, {c[0]}); got ({lo_c:.6g}, {hi_c:.6g})")

    return case


def check_bootstrap_ci(fn: Callable, hidden: bool = False) -> Score:
    """``fn(values, level, n, generator) -> (lower, upper)``: the percentile bootstrap interval of
    the mean of ``values`` from ``n`` resamples with replacement drawn with ``generator``.
    Reference: :func:`mesa_lib.sweep.bootstrap_ci`; intervals within about six times the Monte
    Carlo error of ``n`` resamples count as equal."""
    return _run("bootstrap interval", fn,
                [_boot_case(_boot_values(100, 20), 0.95, seed=100)],
                hidden, forbidden=[bootstrap_ci])


#: points per item of the graded assignment (the number of hidden cases), in the notebook's order;
#: the chapters' own checkers (check_sign_test, check_bootstrap_ci) are not items of it
POINTS = {
    "stamp one image": 2, "batched stamping": 3, "51 patterns": 2, "testing function f": 2, "hinge": 3,
    "Gibbs optimum": 3, "mass inside X_beta": 2, "staircase mixture sampler": 3, "DV bound": 3,
    "MINE training step": 3, "target scan": 3, "retraining transform": 3, "attack success rate": 2,
}
