"""Checks of user input shared by the public entry points.

Each check raises a ValueError whose one-line message names the argument, says what was
wrong and what to do. They only *read* values (never change a tensor or a random stream);
the tensor checks cost one pass over the data and one host sync, so the library calls them
once at an entry point, never inside a training step.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["check_seed", "MAX_SEED", "positive_int", "finite_number", "check_images", "check_trigger", "check_finite_weights",
           "check_target", "num_classes"]


MAX_SEED = 2**32 - 1
"""The largest experiment seed: stages derive further seeds from it (``seed + 2``, ``1000 * seed + i``),
which must stay within torch's 64-bit generator seeds."""


def check_seed(value: object, name: str = "seed") -> int:
    """An experiment seed as an ``int`` if it is an integer in ``0..MAX_SEED`` (``name`` is
    what the message calls it, e.g. ``--seed``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in 0..{MAX_SEED}, got {value!r}")
    return int(value)


def check_target(target: int, num_classes: int) -> int:
    """A class index as an ``int`` if it is an integer in ``0..num_classes-1``."""
    if isinstance(target, bool) or not float(target).is_integer() or not 0 <= int(target) < num_classes:
        raise ValueError(f"target class must be an integer in 0..{num_classes - 1}, got {target!r}")
    return int(target)


@torch.no_grad()
def num_classes(model: torch.nn.Module, images: torch.Tensor) -> int:
    """The number of classes of a classifier, from one forward pass on the first image (moved
    to the model's device), in eval mode; the model's train/eval mode is restored."""
    was = model.training
    model.eval()
    try:
        return int(model(images[:1].to(next(model.parameters()).device)).shape[1])
    finally:
        model.train(was)


def positive_int(name: str, value: object) -> int:
    """``value`` as an ``int`` if it is an integer >= 1 (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value!r}")
    return int(value)


def finite_number(name: str, value: object, minimum: float | None = None, *, strict: bool = False,
                  maximum: float | None = None) -> float:
    """``value`` as a ``float`` if it is a finite real number within the bounds.

    Args:
        minimum: lower bound (inclusive, or exclusive with ``strict=True``).
        maximum: inclusive upper bound.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    x = float(value)
    if minimum is not None and (x <= minimum if strict else x < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value!r}")
    if maximum is not None and x > maximum:
        raise ValueError(f"{name} must be <= {maximum:g}, got {value!r}")
    return x


def _range_or_nonfinite(t: torch.Tensor) -> tuple[bool, bool]:
    """``(all finite, all in [0, 1])`` in one pass (min/max propagate NaN) and one sync."""
    lo, hi = torch.aminmax(t.detach())
    lo_f, hi_f = float(lo), float(hi)
    finite = math.isfinite(lo_f) and math.isfinite(hi_f)
    return finite, finite and 0.0 <= lo_f and hi_f <= 1.0


def check_images(images: torch.Tensor, what: str = "images") -> None:
    """Images must be a float32 ``[N, C, H, W]`` tensor of finite values in ``[0, 1]``."""
    if images.dtype != torch.float32:
        fix = ("convert uint8 pixels with images.float() / 255" if not images.is_floating_point()
               else "convert with images.float()")
        raise ValueError(f"{what} must be float32 with values in [0, 1], got {images.dtype}; {fix}")
    if images.numel() == 0:
        return
    finite, in_range = _range_or_nonfinite(images)
    if not finite:
        bad = int((~torch.isfinite(images)).sum())
        raise ValueError(f"{what} contain {bad} NaN/inf value(s); clean or drop those images first "
                         "(e.g. torch.nan_to_num(images).clamp(0, 1))")
    if not in_range:
        lo, hi = torch.aminmax(images)
        raise ValueError(f"{what} must have values in [0, 1], got {float(lo):.4g}..{float(hi):.4g}; "
                         "scale pixels to [0, 1] (e.g. uint8 / 255)")


def image_tensor(data: object, what: str = "images") -> torch.Tensor:
    """The images of ``data`` (an :class:`~mesa_lib.data.ImageSet` or a tensor), checked: a
    non-empty float32 ``[N, C, H, W]`` tensor of finite values in ``[0, 1]``."""
    images = getattr(data, "images", data)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or len(images) == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{what} must be non-empty [N, C, H, W] images, got {shape}")
    check_images(images, what)
    return images


def check_trigger(trigger: torch.Tensor, what: str = "trigger", channels: int | None = None) -> None:
    """A trigger (``[C, p, p]`` or ``[N, C, p, p]``) of finite values in ``[0, 1]``, with 1 or
    ``channels`` channels when ``channels`` is given."""
    if not isinstance(trigger, torch.Tensor) or not trigger.is_floating_point():
        kind = trigger.dtype if isinstance(trigger, torch.Tensor) else type(trigger).__name__
        raise ValueError(f"{what} must be a float tensor with values in [0, 1], got {kind}")
    if trigger.dim() not in (3, 4):
        raise ValueError(f"{what} must be [C, p, p] or [N, C, p, p], got shape {tuple(trigger.shape)}")
    if channels is not None:
        tc = trigger.shape[-3]
        if tc not in (1, channels):
            raise ValueError(f"{what} has {tc} channels but the images have {channels}; "
                             f"give a trigger with 1 or {channels} channels")
    if trigger.numel() == 0:
        raise ValueError(f"{what} is empty, shape {tuple(trigger.shape)}")
    finite, in_range = _range_or_nonfinite(trigger)
    if not finite:
        raise ValueError(f"{what} contains NaN/inf values; a trigger must be finite pixel values in [0, 1]")
    if not in_range:
        raise ValueError(f"{what} must have values in [0, 1] (pixel values), got "
                         f"{float(trigger.min()):.4g}..{float(trigger.max()):.4g}; clamp it with .clamp(0, 1)")


def check_finite_weights(model: torch.nn.Module, what: str = "model") -> None:
    """Every parameter and buffer of ``model`` must be finite (one sync for all of them)."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    if not tensors:
        return
    ok = torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all()
    if not bool(ok):
        names = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                 if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())]
        raise ValueError(f"{what} has NaN/inf weights ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); "
                         "its training diverged, so its accuracy and ASR would be meaningless: retrain it "
                         "(e.g. with a lower learning rate)")
