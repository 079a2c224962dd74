"""The attack: inject a backdoor by fine-tuning on poisoned batches (BadNets style).

In every batch a fraction ``poison_ratio`` of the images gets the trigger pasted at a random
location and its label replaced by the target class; the model is fine-tuned on that stream.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn as nn

from .data import ImageSet
from .models import BatchTransform, train_classifier
from .triggers import MultiTrigger, stamp
from .validate import check_target, check_trigger, num_classes

__all__ = ["poison_transform", "inject_backdoor", "check_ratio", "count_in_batch"]


def check_ratio(name: str, ratio: float) -> float:
    """Validate a fraction in [0, 1] (poison ratio, retraining ratio)."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not (0.0 <= float(ratio) <= 1.0):
        raise ValueError(f"{name} must be a fraction in [0, 1], got {ratio}")
    return float(ratio)


def count_in_batch(ratio: float, batch: int) -> int:
    """How many images of a batch a fraction ``ratio`` touches: ``round(ratio * batch)``, but at
    least one when ``ratio > 0`` (1% of a batch of 64 would otherwise round to nothing)."""
    k = int(round(ratio * batch))
    return max(k, 1) if ratio > 0 else k


def poison_transform(trigger: torch.Tensor, target: int, poison_ratio: float) -> BatchTransform:
    """A batch transform that stamps ``trigger`` on the first ``poison_ratio`` of each batch
    (the batch is already shuffled) at random locations and relabels those images ``target``.

    ``trigger`` is one trigger ``[C, p, p]``, or a stack ``[k, C, p, p]`` of several triggers
    for the same target: each poisoned image then gets one of them, chosen uniformly
    (:class:`~mesa_lib.triggers.MultiTrigger`), so each carries about ``1 / k`` of the poison.
    At least one image per batch is poisoned when ``poison_ratio > 0`` (:func:`count_in_batch`).
    The trigger is checked once here (finite, in ``[0, 1]``), not on every batch.
    """
    check_ratio("poison_ratio", poison_ratio)
    check_trigger(trigger, "trigger")
    several = MultiTrigger(trigger) if trigger.dim() == 4 else None

    def transform(x: torch.Tensor, y: torch.Tensor, g: torch.Generator):
        k = count_in_batch(poison_ratio, len(x))
        if k == 0:
            return x, y
        x, y = x.clone(), y.clone()
        trig = several.sample(k, generator=g) if several is not None else trigger
        x[:k] = stamp(x[:k], trig.to(x.device), generator=g, check_finite=False)  # checked once up front
        y[:k] = target
        return x, y

    return transform


def inject_backdoor(
    model: nn.Module,
    train: ImageSet,
    trigger: torch.Tensor,
    target: int,
    poison_ratio: float = 0.01,
    epochs: float = 10,
    lr: float = 1e-3,
    batch_size: int = 128,
    momentum: float = 0.9,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Fine-tune ``model`` in place on poisoned batches; defaults are the authors' settings
    (1% poison, SGD lr 1e-3, momentum 0.9, batch 128, 10 epochs, no augmentation).
    ``trigger`` is ``[C, p, p]``, or ``[k, C, p, p]`` for several triggers of one target
    (see :func:`poison_transform`).

    Raises:
        ValueError: a bad target, trigger (shape, size, channels, NaN/inf or values outside
            ``[0, 1]``), ratio or training setting, before any training.
    """
    if not isinstance(train, ImageSet):
        raise ValueError(f"train must be an ImageSet, got {type(train).__name__}")
    check_target(target, num_classes(model, train.images))
    if not isinstance(trigger, torch.Tensor) or trigger.dim() not in (3, 4) or len(trigger) == 0:
        shape = tuple(trigger.shape) if isinstance(trigger, torch.Tensor) else type(trigger).__name__
        raise ValueError(f"trigger must be [C, p, p] (or [k, C, p, p] for several), got shape {shape}")
    if trigger.shape[-1] > train.images.shape[-1]:
        raise ValueError(
            f"trigger of size {trigger.shape[-1]} is larger than the images ({train.images.shape[-1]}); use a smaller trigger"
        )
    check_trigger(trigger, "trigger", channels=train.images.shape[1])
    return train_classifier(
        model, train, epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum,
        batch_transform=poison_transform(trigger, target, poison_ratio), seed=seed,
        desc="attack", progress=progress,
    )


