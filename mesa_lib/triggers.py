"""Triggers: 3x3 patterns, their symmetry classes, random colour triggers, and stamping.

A *trigger* is a small patch of pixel values, shape ``[C, p, p]`` with values in ``[0, 1]``.
A *pattern* is a black-and-white 3x3 trigger described by a 9-bit id: the pixels read row by
row, the first (top-left) pixel is the most significant bit, and a 1 bit is a white pixel.
``170 = 0b010_101_010`` is the chequer of the paper's figures.

Stamping pastes a trigger over the images at a location per image, in one batched
``scatter``: no Python loop over images, and differentiable in the trigger values (MESA and
the point baseline back-propagate through it).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol, Sequence

import torch

from .validate import check_trigger

__all__ = [
    "PATTERN_SIZE",
    "NUM_PATTERNS",
    "pattern_from_id",
    "pattern_id",
    "patterns_tensor",
    "symmetry_class",
    "canonical_id",
    "canonical_patterns",
    "bright_member",
    "trigger_from_pattern",
    "random_color_triggers",
    "random_locations",
    "stamp",
    "TriggerSampler",
    "FixedTrigger",
    "MultiTrigger",
    "UniformNoiseTrigger",
]

PATTERN_SIZE = 3
NUM_PATTERNS = 512  # 2 ** (3 * 3) binary 3x3 patterns


def _check_id(pattern: int) -> int:
    if isinstance(pattern, bool) or not isinstance(pattern, int):
        try:
            value = float(pattern)
            if not value.is_integer():
                raise ValueError
            pattern = int(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"pattern id must be an integer in 0..511, got {pattern!r}") from None
    if not 0 <= pattern < NUM_PATTERNS:
        raise ValueError(
            f"pattern id must be in 0..511 (a 9-bit number, pixels read row by row), got {pattern}"
        )
    return pattern


def pattern_from_id(pattern: int) -> torch.Tensor:
    """The 3x3 binary pattern of a 9-bit id, as a float tensor of 0s (black) and 1s (white).

    >>> pattern_from_id(170).int().tolist()
    [[0, 1, 0], [1, 0, 1], [0, 1, 0]]
    """
    pattern = _check_id(pattern)
    bits = [(pattern >> (8 - k)) & 1 for k in range(9)]
    return torch.tensor(bits, dtype=torch.float32).reshape(3, 3)


def patterns_tensor(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """The binary 3x3 patterns of 9-bit ids as a ``[N, 1, 3, 3]`` tensor, in one tensor op
    (pixels read row by row, first pixel = most significant bit, 1 = white)."""
    t = torch.as_tensor(ids)
    if t.dim() != 1 or len(t) == 0 or t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"ids must be a non-empty 1-D sequence of integer pattern ids, got {ids!r}")
    if bool(((t < 0) | (t >= NUM_PATTERNS)).any()):
        raise ValueError(f"pattern ids must be in 0..{NUM_PATTERNS - 1} (9-bit numbers), got {t.tolist()}")
    shifts = torch.arange(8, -1, -1, device=t.device)
    return ((t.long()[:, None] >> shifts) & 1).float().reshape(-1, 1, 3, 3)


def pattern_id(pattern: torch.Tensor) -> int:
    """The 9-bit id of a 3x3 pattern (values are rounded to 0/1; a ``[1, 3, 3]`` tensor works)."""
    p = torch.as_tensor(pattern)
    if p.dim() == 3 and p.shape[0] == 1:
        p = p[0]
    if p.shape != (3, 3):
        raise ValueError(f"a pattern is a 3x3 tensor, got shape {tuple(p.shape)}")
    bits = (p.detach().float().cpu().round().clamp(0, 1).flatten().long()).tolist()
    return int(sum(b << (8 - k) for k, b in enumerate(bits)))


def _symmetries(p: torch.Tensor) -> list[torch.Tensor]:
    """The 16 images of a pattern under the dihedral group (4 rotations x mirror) x inversion."""
    out = []
    for q in (p, torch.flip(p, dims=[1])):
        for k in range(4):
            r = torch.rot90(q, k, dims=(0, 1))
            out.extend([r, 1 - r])
    return out


@lru_cache(maxsize=None)
def symmetry_class(pattern: int) -> tuple[int, ...]:
    """All pattern ids equal to ``pattern`` under rotation, mirror flip and colour inversion."""
    p = pattern_from_id(pattern)
    return tuple(sorted({pattern_id(q) for q in _symmetries(p)}))


def canonical_id(pattern: int) -> int:
    """The canonical id of a pattern's class: its smallest member (e.g. 341 -> 170)."""
    return symmetry_class(pattern)[0]


@lru_cache(maxsize=None)
def _canonical() -> tuple[int, ...]:
    return tuple(sorted({canonical_id(i) for i in range(NUM_PATTERNS)}))


def canonical_patterns() -> list[int]:
    """The 51 canonical black-and-white 3x3 patterns of the paper's CIFAR-10 experiment."""
    return list(_canonical())


def bright_member(pattern: int) -> int:
    """The member of ``{pattern, inverse}`` with the majority (>= 5 of 9) of white pixels.

    Why: on images with a black background (Fashion-MNIST) a black trigger pixel is
    indistinguishable from the background wherever the patch lands off the garment, so only
    the white pixels carry the trigger. A pattern and its colour inverse are one class
    (the paper counts them once), so on dark data we stamp the member that shows the
    most: the one with more white pixels. This turns the all-black pattern 0 (invisible on
    black) into the white square 511, and the chequer 170 (4 white) into 341 (5 white).
    """
    pattern = _check_id(pattern)
    return pattern if bin(pattern).count("1") >= 5 else (NUM_PATTERNS - 1) - pattern


def trigger_from_pattern(pattern: int, channels: int = 1, dark_background: bool = False) -> torch.Tensor:
    """The ``[channels, 3, 3]`` trigger for a pattern id (grey-level copies on every channel).

    With ``dark_background=True`` the class's :func:`bright_member` is used (see there why).
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    pid = bright_member(pattern) if dark_background else _check_id(pattern)
    return pattern_from_id(pid).unsqueeze(0).repeat(channels, 1, 1)


def random_color_triggers(
    n: int, channels: int = 3, size: int = PATTERN_SIZE, seed: int = 0
) -> torch.Tensor:
    """``n`` seeded random colour triggers ``[n, channels, size, size]`` (the paper's CIFAR-100 setting).

    Each pixel of each channel is drawn uniformly from {0, 1}, i.e. one of 8 saturated colours,
    so that the triggers are distinct and clearly visible.
    """
    if n < 1 or size < 1 or channels < 1:
        raise ValueError(f"n, channels and size must be >= 1, got n={n}, channels={channels}, size={size}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, channels, size, size), generator=g).float()


def random_locations(
    n: int, image_size: int, patch_size: int = PATTERN_SIZE, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` uniformly random top-left corners ``[n, 2]`` (row, col) for a patch inside the image."""
    if patch_size > image_size:
        raise ValueError(
            f"trigger of size {patch_size} does not fit in images of size {image_size}; use a smaller trigger"
        )
    span = image_size - patch_size + 1
    if generator is not None:
        locs = torch.randint(0, span, (n, 2), generator=generator, device=generator.device)
        return locs.to(device) if device is not None else locs
    return torch.randint(0, span, (n, 2), device=device)


def stamp(
    images: torch.Tensor,
    triggers: torch.Tensor,
    locations: torch.Tensor | tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Paste triggers over images, one location per image, in one batched operation.

    Args:
        images: ``[B, C, H, W]`` images in ``[0, 1]``.
        triggers: one trigger ``[C, p, p]`` for all images, or one per image ``[B, C, p, p]``.
            A 1-channel trigger is broadcast over the image's channels.
        locations: ``[B, 2]`` top-left corners (row, col); a single ``(row, col)`` for all
            images; or ``None`` for a uniformly random location per image.
        generator: random generator for the locations (reproducibility).
        check_finite: refuse triggers with NaN/inf values (one host sync). The library's
            training loops validate their trigger once up front and pass ``False`` here, so
            that no step waits for the device.

    Returns:
        New ``[B, C, H, W]`` tensor; ``images`` is not modified. Differentiable in ``triggers``.

    Raises:
        ValueError: bad shapes, channel counts or locations, or (with ``check_finite``)
            NaN/inf trigger values.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    B, C, H, W = images.shape
    if B == 0:
        raise ValueError("images is empty: nothing to stamp")
    if triggers.dim() == 3:
        triggers = triggers.unsqueeze(0).expand(B, *triggers.shape)
    if triggers.dim() != 4 or triggers.shape[0] != B:
        raise ValueError(
            f"triggers must be [C, p, p] or [B={B}, C, p, p], got shape {tuple(triggers.shape)}"
        )
    tc, p, q = triggers.shape[1:]
    if p != q:
        raise ValueError(f"triggers must be square, got {p}x{q}")
    if p > H or p > W:
        raise ValueError(f"trigger of size {p} is larger than the {H}x{W} images; use a smaller trigger")
    if tc not in (1, C):
        raise ValueError(f"trigger has {tc} channels but images have {C}; give 1 or {C} channels")
    if check_finite and not bool(torch.isfinite(triggers.detach()).all()):
        raise ValueError("triggers contain NaN/inf values; a trigger must be finite pixel values in [0, 1]")
    triggers = triggers.to(images.dtype).expand(B, C, p, p)
    if locations is None:
        locations = random_locations(B, min(H, W), p, generator=generator, device=images.device)
    elif isinstance(locations, (tuple, list)):
        r, c = int(locations[0]), int(locations[1])
        if not (0 <= r <= H - p and 0 <= c <= W - p):
            raise ValueError(f"location {(r, c)} puts the {p}x{p} trigger outside the {H}x{W} image")
        locations = torch.tensor([[r, c]], device=images.device).expand(B, 2)
    else:
        locations = torch.as_tensor(locations, device=images.device)
        if locations.shape != (B, 2):
            raise ValueError(f"locations must be [B={B}, 2], got shape {tuple(locations.shape)}")
        # user-given corners: check them (one host sync), since a column past W - p would
        # silently wrap the patch into the next row
        limit = torch.tensor([H - p, W - p], device=images.device)
        if bool(((locations < 0) | (locations > limit)).any()):
            raise ValueError(
                f"locations put the {p}x{p} trigger outside the {H}x{W} image; top-left corners "
                f"must be in 0..{H - p} (row) and 0..{W - p} (col)"
            )
    locations = locations.long()
    offs = torch.arange(p, device=images.device)
    rows = locations[:, 0, None] + offs  # [B, p]
    cols = locations[:, 1, None] + offs  # [B, p]
    flat = (rows[:, :, None] * W + cols[:, None, :]).reshape(B, 1, p * p).expand(B, C, p * p)
    out = images.reshape(B, C, H * W).scatter(2, flat, triggers.reshape(B, C, p * p))
    return out.reshape(B, C, H, W)


class TriggerSampler(Protocol):
    """Anything that draws triggers: ``sample(n, generator) -> [n, C, p, p]`` in ``[0, 1]``.

    The defense retrains against a sampler; MESA's :class:`~mesa_lib.mesa.StaircaseSampler`,
    the point baseline and the oracle (the true trigger) are all samplers.
    """

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor: ...


class FixedTrigger:
    """A sampler that always returns the same trigger (point baseline, oracle)."""

    def __init__(self, trigger: torch.Tensor):
        if not isinstance(trigger, torch.Tensor) or trigger.dim() != 3:
            shape = tuple(trigger.shape) if isinstance(trigger, torch.Tensor) else type(trigger).__name__
            raise ValueError(f"a trigger is [C, p, p], got shape {shape}")
        check_trigger(trigger, "FixedTrigger's trigger")
        self.trigger = trigger

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.trigger.unsqueeze(0).expand(n, *self.trigger.shape)

    def __repr__(self) -> str:
        return f"FixedTrigger(shape={tuple(self.trigger.shape)})"


class MultiTrigger:
    """A sampler of ``k`` fixed triggers ``[k, C, p, p]``: each draw is one of them, chosen
    uniformly per image (seeded by the generator). The attack of several triggers for one
    target stamps them this way, and the oracle of that attack retrains against all of them."""

    def __init__(self, triggers: torch.Tensor):
        if not isinstance(triggers, torch.Tensor) or triggers.dim() != 4 or len(triggers) == 0:
            shape = tuple(triggers.shape) if isinstance(triggers, torch.Tensor) else type(triggers).__name__
            raise ValueError(f"MultiTrigger needs a stack of triggers [k, C, p, p], got shape {shape}")
        check_trigger(triggers, "MultiTrigger's triggers")
        self.triggers = triggers
        self.trigger_shape = tuple(int(s) for s in triggers.shape[1:])

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        dev = generator.device if generator is not None else self.triggers.device
        pick = torch.randint(0, len(self.triggers), (n,), generator=generator, device=dev)
        return self.triggers.to(dev)[pick]

    def __repr__(self) -> str:
        return f"MultiTrigger(k={len(self.triggers)}, shape={self.trigger_shape})"


class UniformNoiseTrigger:
    """A sampler of fresh uniform-noise patches ``[C, p, p]`` (every pixel uniform in
    ``[0, 1]``): the control that knows nothing of the backdoor. Retraining against it
    measures how much generic patch augmentation removes by itself."""

    def __init__(self, channels: int, size: int = PATTERN_SIZE, device: torch.device | str = "cpu"):
        if channels < 1 or size < 1:
            raise ValueError(f"channels and size must be >= 1, got {channels}, {size}")
        self.trigger_shape = (int(channels), int(size), int(size))
        self.device = torch.device(device)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        dev = generator.device if generator is not None else self.device
        return torch.rand(n, *self.trigger_shape, generator=generator, device=dev)

    def __repr__(self) -> str:
        return f"UniformNoiseTrigger(shape={self.trigger_shape})"
