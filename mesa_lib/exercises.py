"""Check functions for the book's exercises (a classroom's autograder, in plain Python).

Each ``check_*`` function runs a student's implementation on a few cases, compares it with the
library's reference, and prints what is wrong in words a student can act on ("you modified
the input in place", "pixels outside the patch changed", "overflows for large T", ...) or
``Correct!``. It returns ``True`` only when every case passes, so a notebook cell
``assert check_stamp(my_stamp)`` fails on a wrong answer::

    from mesa_lib.exercises import check_stamp

    def my_stamp(images, triggers, locations):
        ...

    assert check_stamp(my_stamp)

The exercises and their references:

==============================  =========================================================
checker                         reference
==============================  =========================================================
:func:`check_stamp`             :func:`mesa_lib.triggers.stamp`
:func:`check_hinge`             the hinge line of :func:`mesa_lib.mesa.train_staircase`
:func:`check_dv_bound`          :func:`mesa_lib.mine.dv_bound`
:func:`check_retrain_transform` :func:`mesa_lib.defense.stamp_transform`
:func:`check_canonical`         :func:`mesa_lib.triggers.canonical_id` (the 51 patterns)
==============================  =========================================================
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable

import torch

from .defense import stamp_transform
from .mine import dv_bound
from .triggers import NUM_PATTERNS, FixedTrigger, canonical_id, pattern_from_id, pattern_id, stamp

__all__ = [
    "reference_hinge_loss",
    "check_stamp",
    "check_hinge",
    "check_dv_bound",
    "check_retrain_transform",
    "check_canonical",
]

CORRECT = "Correct!"


class _Wrong(Exception):
    """A student's answer failed one case; the message says why."""


def _report(name: str, run: Callable[[], None]) -> bool:
    """Run the cases of one exercise; print ``Correct!`` or what is wrong."""
    try:
        run()
    except _Wrong as err:
        print(f"Not yet ({name}): {err}")
        return False
    print(CORRECT)
    return True


def _call(fn: Callable, *args: Any) -> Any:
    """Call the student's function; turn its exceptions into a readable failure."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise _Wrong("the function is not implemented yet (it raised NotImplementedError); "
                     "replace `raise NotImplementedError()` with your code") from None
    except Exception as err:  # noqa: BLE001 - any student error is reported, not raised
        raise _Wrong(f"your function raised {type(err).__name__}: {err}") from None


def _tensor(out: Any, what: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise _Wrong(f"{what} must be a torch.Tensor, got {type(out).__name__}")
    return out


def _scalar(out: Any, what: str) -> torch.Tensor:
    out = _tensor(out, what)
    if out.dim() != 0:
        raise _Wrong(f"{what} must be a scalar (0-dim tensor), got shape {tuple(out.shape)}; "
                     "did you forget to average over the batch?")
    return out


# --------------------------------------------------------------------------- stamping
def _stamp_cases() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    cases = []
    for B, C, H, p in ((4, 1, 8, 3), (3, 3, 10, 3), (5, 1, 7, 2)):
        images = torch.rand(B, C, H, H, generator=g)
        # trigger values outside [0, 1] so pasted pixels are unmistakable
        triggers = 2.0 + torch.rand(B, C, p, p, generator=g)
        locations = torch.randint(0, H - p + 1, (B, 2), generator=g)
        locations[0] = torch.tensor([0, H - p])  # a corner: off-by-one errors show
        cases.append((images, triggers, locations))
    return cases


def check_stamp(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Check ``fn(images [B,C,H,W], triggers [B,C,p,p], locations [B,2]) -> stamped images``.

    Image ``b`` gets ``triggers[b]`` pasted with its top-left corner at ``locations[b] =
    (row, col)``; every other pixel keeps its value; the input is not modified; the result
    is differentiable in the triggers. Reference: :func:`mesa_lib.triggers.stamp`.
    """

    def run() -> None:
        for images, triggers, locations in _stamp_cases():
            before = images.clone()
            trig = triggers.clone().requires_grad_(True)
            out = _tensor(_call(fn, images, trig, locations.clone()), "the stamped batch")
            if not torch.equal(images, before):
                raise _Wrong("you modified the input images in place; work on a copy "
                             "(e.g. images.clone()) or build a new tensor")
            if out.shape != images.shape:
                raise _Wrong(f"wrong shape: expected {tuple(images.shape)} (same as the images), "
                             f"got {tuple(out.shape)}")
            want = stamp(images, triggers, locations)
            patch = want != images  # where the reference pasted the trigger
            if not torch.allclose(out.detach()[~patch], images[~patch]):
                if torch.allclose(out.detach(), stamp(images, triggers, locations.flip(1))):
                    raise _Wrong("rows and columns are swapped: locations[b] = (row, col), the row indexes "
                                 "dimension 2 (height) and the column dimension 3 (width)")
                n = int((out.detach()[~patch] != images[~patch]).sum())
                raise _Wrong(f"{n} pixels outside the patch changed; only the p x p patch at "
                             f"locations[b] = (row, col) may change (check for off-by-one errors)")
            if torch.allclose(out.detach(), stamp(images, triggers.transpose(-1, -2), locations)):
                raise _Wrong("the trigger is pasted transposed: trigger pixel [i, j] goes to image pixel "
                             "[row + i, col + j]")
            if not torch.allclose(out.detach(), want):
                raise _Wrong("the patch does not hold the trigger: image b must get triggers[b] "
                             "(all channels) at rows row..row+p-1 and columns col..col+p-1")
            if not out.requires_grad:
                raise _Wrong("the result is not differentiable in the triggers (MESA back-propagates "
                             "through stamping); avoid .detach(), .item(), .numpy() and torch.no_grad()")
            out.sum().backward()
            if trig.grad is None or not torch.allclose(trig.grad, torch.ones_like(trig)):
                raise _Wrong("gradients do not reach the triggers correctly: d(sum of output)/d trigger "
                             "should be 1 for every trigger pixel")

    return _report("stamp", run)


# --------------------------------------------------------------------------- hinge
def reference_hinge_loss(f: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """The hinge term of a MESA sub-model's loss, ``-mean(min(f, beta))``.

    It is the line ``hinge = torch.minimum(f, beta_per)...mean(1)`` of
    :func:`mesa_lib.mesa.train_staircase` (there summed over sub-models, negated in ``loss_g``).
    """
    beta = torch.as_tensor(beta, dtype=f.dtype, device=f.device)
    return -torch.minimum(f, beta).mean()


def check_hinge(fn: Callable[[torch.Tensor, float | torch.Tensor], torch.Tensor]) -> bool:
    """Check ``fn(f [B], beta) -> scalar loss`` = ``-mean(min(f, beta))``.

    ``f`` holds testing-function values in [0, 1]; ``beta`` is a float or one threshold per
    sample (a ``[B]`` tensor, as in the batched staircase). The loss is minimised, pushes
    samples with ``f < beta`` up and leaves those already above ``beta`` alone (zero gradient).
    """

    def run() -> None:
        g = torch.Generator().manual_seed(1)
        f0 = torch.rand(64, generator=g)
        per_sample = torch.tensor([0.5, 0.8, 0.9]).repeat_interleave(22)[:64]
        for beta in (0.8, 0.5, per_sample):
            f = f0.clone().requires_grad_(True)
            before = f0.clone()
            out = _scalar(_call(fn, f, beta), "the hinge loss")
            if not torch.equal(f.detach(), before):
                raise _Wrong("you modified f in place (e.g. f.clamp_ or f[...] = ...); "
                             "use out-of-place operations such as torch.minimum")
            want = reference_hinge_loss(f0, beta)
            got = out.detach()
            if torch.allclose(got, want, atol=1e-6):
                pass
            elif torch.allclose(got, -want, atol=1e-6):
                raise _Wrong("wrong sign: this is a loss that is MINIMISED, so it is "
                             "-mean(min(f, beta)) (maximising the capped score)")
            elif torch.allclose(got, want * len(f0), atol=1e-4) or torch.allclose(got, -want * len(f0), atol=1e-4):
                raise _Wrong("you summed over the batch; average instead (mean), so the loss does not "
                             "depend on the batch size")
            elif torch.allclose(got, -torch.maximum(f0, torch.as_tensor(beta)).mean(), atol=1e-6) or \
                    torch.allclose(got, torch.maximum(f0, torch.as_tensor(beta)).mean(), atol=1e-6):
                raise _Wrong("you used max(f, beta); the hinge CAPS the score at beta: min(f, beta)")
            elif torch.allclose(got, -f0.mean(), atol=1e-6) or torch.allclose(got, f0.mean(), atol=1e-6):
                raise _Wrong("the score is not capped at beta: use min(f, beta), so samples already "
                             "inside the valid set stop being pushed")
            else:
                raise _Wrong(f"wrong value: for this batch expected {want.item():.5f}, "
                             f"got {got.item():.5f}")
            if not out.requires_grad:
                raise _Wrong("the loss is not differentiable in f (the generator learns through it); "
                             "avoid .detach(), .item() and torch.no_grad()")
            out.backward()
            grad = f.grad if f.grad is not None else torch.zeros_like(f0)
            b = torch.as_tensor(beta).expand_as(f0)
            below, above = f0 < b, f0 > b
            if not torch.allclose(grad[above], torch.zeros(int(above.sum()))):
                raise _Wrong("samples with f > beta still get a gradient; the hinge must leave them alone")
            if not torch.allclose(grad[below], torch.full((int(below.sum()),), -1.0 / len(f0))):
                raise _Wrong("samples with f < beta get the wrong gradient (expected -1/B each)")

    return _report("hinge", run)


# --------------------------------------------------------------------------- DV bound
def check_dv_bound(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Check ``fn(t_joint [B], t_marginal [B]) -> mean(t_joint) - log(mean(exp(t_marginal)))``.

    It must stay finite for large (|T| ~ 1000) values: compute the log-mean-exp with
    ``torch.logsumexp``. Reference: :func:`mesa_lib.mine.dv_bound`.
    """

    def run() -> None:
        g = torch.Generator().manual_seed(2)
        n = 50
        tj0 = torch.randn(n, generator=g) + 1.0
        tm0 = torch.randn(n, generator=g) * 0.7
        tj = tj0.clone().requires_grad_(True)
        tm = tm0.clone().requires_grad_(True)
        out = _scalar(_call(fn, tj, tm), "the DV bound")
        if not (torch.equal(tj.detach(), tj0) and torch.equal(tm.detach(), tm0)):
            raise _Wrong("you modified an input in place; use out-of-place operations")
        want = dv_bound(tj0, tm0)
        got = out.detach()
        if not torch.isfinite(got):
            raise _Wrong(f"the result is {got.item()} for ordinary values of T")
        if not torch.allclose(got, want, atol=1e-5):
            if torch.allclose(got, want - math.log(n), atol=1e-4):
                raise _Wrong("off by log(n): log MEAN exp = logsumexp(t) - log(n), you used the log of the sum "
                             "without subtracting log(n)")
            if torch.allclose(got, dv_bound(tm0, tj0), atol=1e-5):
                raise _Wrong("arguments swapped: the mean is over the joint pairs, the log-mean-exp over "
                             "the marginal (shuffled) pairs")
            if torch.allclose(got, tj0.mean() - tm0.mean(), atol=1e-5):
                raise _Wrong("log(mean(exp(t))) is not mean(t) (Jensen); keep the exp inside the mean")
            if torch.allclose(got, -want, atol=1e-5):
                raise _Wrong("wrong sign: the bound is mean(T_joint) MINUS log mean exp(T_marginal)")
            raise _Wrong(f"wrong value: expected {want.item():.5f}, got {got.item():.5f}")
        if not out.requires_grad:
            raise _Wrong("the bound is not differentiable (T and the generator learn through it); "
                         "avoid .detach(), .item() and torch.no_grad()")
        out.backward()
        if tj.grad is None or tm.grad is None:
            raise _Wrong("no gradient reaches one of the inputs")
        want_gm = -torch.softmax(tm0, 0)
        if not torch.allclose(tm.grad, want_gm, atol=1e-6):
            raise _Wrong("wrong gradient for t_marginal (it should be -softmax(t_marginal))")
        # large values: exp(1000) overflows to inf in float32 (and float64)
        for shift, word in ((1000.0, "large"), (-1000.0, "very negative")):
            big = _tensor(_call(fn, tj0 + shift, tm0 + shift), "the DV bound").detach()
            ref = dv_bound(tj0 + shift, tm0 + shift)
            if not torch.isfinite(big):
                raise _Wrong(f"overflows for {word} T (T ~ {shift:+.0f} gives {big.item()}): "
                             "exp(T) is not representable; compute log(mean(exp(t))) as "
                             "torch.logsumexp(t, 0) - log(n)")
            if not torch.allclose(big, ref, atol=1e-3):
                raise _Wrong(f"inaccurate for {word} T (T ~ {shift:+.0f}): expected {ref.item():.4f}, "
                             f"got {big.item():.4f}; use torch.logsumexp")

    return _report("DV bound", run)


# --------------------------------------------------------------------------- retraining transform
def check_retrain_transform(
    fn: Callable[[torch.Tensor, torch.Tensor, Any, float, torch.Generator], tuple[torch.Tensor, torch.Tensor]],
) -> bool:
    """Check ``fn(x, y, sampler, ratio, generator) -> (x', y')``, the defense's batch transform.

    The first ``k = round(ratio * B)`` images (at least one when ``ratio > 0``) get a trigger
    drawn from ``sampler.sample(k, generator=generator)`` stamped at a random location; the
    other images and ALL labels stay as they are (the defense keeps the true labels); the
    inputs are not modified. Reference: :func:`mesa_lib.defense.stamp_transform`.
    """

    def run() -> None:
        g0 = torch.Generator().manual_seed(3)
        x0 = torch.rand(50, 1, 12, 12, generator=g0)
        y0 = torch.randint(0, 10, (50,), generator=g0)
        mark = torch.full((1, 3, 3), 5.0)  # a value no image has
        sampler = FixedTrigger(mark)
        for ratio in (0.1, 0.5, 0.01, 0.0):
            x, y = x0.clone(), y0.clone()
            out = _call(fn, x, y, sampler, ratio, torch.Generator().manual_seed(4))
            if not (isinstance(out, tuple) and len(out) == 2):
                raise _Wrong("return a pair (images, labels)")
            xs, ys = _tensor(out[0], "the images"), _tensor(out[1], "the labels")
            if not (torch.equal(x, x0) and torch.equal(y, y0)):
                raise _Wrong("you modified the input batch in place; clone it first (x = x.clone())")
            if xs.shape != x0.shape or ys.shape != y0.shape:
                raise _Wrong(f"wrong shapes: expected images {tuple(x0.shape)} and labels {tuple(y0.shape)}, "
                             f"got {tuple(xs.shape)} and {tuple(ys.shape)}")
            if not torch.equal(ys, y0):
                raise _Wrong("labels changed: the defense keeps the TRUE labels (relabelling to the target "
                             "is the attack, not the defense)")
            ref_x, _ = stamp_transform(sampler, ratio)(x0, y0, torch.Generator().manual_seed(4))
            k = int((ref_x != x0).flatten(1).any(1).sum())
            changed = (xs != x0).flatten(1).any(1)
            if int(changed.sum()) != k:
                extra = " (at least one image when ratio > 0)" if ratio > 0 and round(ratio * len(x0)) == 0 else ""
                raise _Wrong(f"with ratio={ratio} and a batch of {len(x0)}, {k} images must be stamped{extra}; "
                             f"you changed {int(changed.sum())}")
            if k and not bool(changed[:k].all()):
                raise _Wrong("stamp the FIRST k images of the (already shuffled) batch")
            n_mark = (xs[:k] == 5.0).flatten(1).sum(1)
            if k and not bool((n_mark == mark.numel()).all()):
                raise _Wrong("each stamped image must hold one whole trigger drawn from the sampler "
                             "(use sampler.sample(k, generator=generator) and mesa_lib.stamp)")
            if k and not torch.equal(torch.where(xs[:k] == 5.0, x0[:k], xs[:k]), x0[:k]):
                raise _Wrong("pixels outside the trigger patch changed")
        # locations must be random (one per image), not always the same corner
        xs, _ = _call(fn, x0.clone(), y0.clone(), sampler, 0.5, torch.Generator().manual_seed(5))
        where = (xs[:25] == 5.0).flatten(1).float().argmax(1)
        if len(torch.unique(where)) < 3:
            raise _Wrong("the triggers always land in the same place; stamp at a random location per "
                         "image (mesa_lib.stamp does that when locations=None; pass the generator)")

    return _report("retraining transform", run)


# --------------------------------------------------------------------------- the 51 patterns
def _group_count(rotate: bool, flip: bool, invert: bool) -> int:
    seen = set()
    for i in range(NUM_PATTERNS):
        p = pattern_from_id(i)
        imgs = [p]
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


def check_canonical(fn: Callable[[int], int]) -> bool:
    """Check ``fn(pattern_id) -> canonical id``: the smallest id among the pattern's images
    under the 4 rotations, the mirror flip and colour inversion (16 images). The 512 patterns
    then fall into 51 classes. Reference: :func:`mesa_lib.triggers.canonical_id`.
    """

    def run() -> None:
        got = {}
        for i in range(NUM_PATTERNS):
            out = _call(fn, i)
            if isinstance(out, torch.Tensor) and out.numel() == 1:
                out = out.item()
            if isinstance(out, bool) or not isinstance(out, int):
                raise _Wrong(f"return a Python int (a pattern id), got {type(out).__name__} for pattern {i}")
            got[i] = out
        n = len(set(got.values()))
        bad = [i for i in range(NUM_PATTERNS) if got[i] != canonical_id(i)]
        if not bad:
            return
        if n != 51:
            raise _Wrong(f"your function gives {n} classes, not 51: {_missing_hint(n)}")
        i = bad[0]
        raise _Wrong(f"the classes are right but the representative is not: for pattern {i} expected "
                     f"{canonical_id(i)} (the SMALLEST id of its class), got {got[i]}")

    return _report("51 patterns", run)
