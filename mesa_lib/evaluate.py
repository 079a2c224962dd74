"""Metrics: clean accuracy and attack success rate (ASR).

ASR follows the paper: the fraction of test images *whose true label is not the target* that
the model classifies as the target once a trigger is pasted at a random location.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .data import ImageSet
from .models import predict
from .triggers import NUM_PATTERNS, TriggerSampler, patterns_tensor, stamp
from .validate import check_finite_weights, check_target, check_trigger, num_classes, positive_int

__all__ = [
    "clean_accuracy",
    "attack_success_rate",
    "target_recall",
    "evaluate_model",
    "asr_per_trigger",
    "residual_valid_set",
    "residual_summary",
    "FIRE_THRESHOLD",
    "RESIDUAL_IMAGES",
]

FIRE_THRESHOLD = 0.5
"""A pattern *fires* (is in the valid set) when its ASR is at least this."""

RESIDUAL_IMAGES = 32
"""Non-target evaluation images per pattern in :func:`residual_valid_set` (512 x 32 = 16,384
stamped images: one batched pass of about 2 s on one CPU core; an ASR to 1/32)."""


def _check_inputs(model: nn.Module, data: ImageSet) -> None:
    """An ImageSet and a model whose weights are finite (a diverged model reads ASR 1.0)."""
    if not isinstance(data, ImageSet):
        raise ValueError(f"data must be an ImageSet, got {type(data).__name__}")
    check_finite_weights(model)


def clean_accuracy(model: nn.Module, data: ImageSet) -> float:
    """Fraction of untouched images classified correctly.

    Raises:
        ValueError: ``data`` is not an ImageSet, or the model has NaN/inf weights.
    """
    _check_inputs(model, data)
    device = next(model.parameters()).device
    pred = predict(model, data.images.to(device))
    return (pred == data.labels.to(device)).float().mean().item()


def attack_success_rate(
    model: nn.Module,
    data: ImageSet,
    trigger: torch.Tensor | TriggerSampler,
    target: int,
    seed: int = 0,
) -> float:
    """Fraction of non-target images classified as ``target`` with the trigger stamped.

    ``trigger`` is one trigger ``[C, p, p]``, one per image ``[N, C, p, p]`` (N = number of
    non-target images), or a sampler whose ``sample(n)`` draws one trigger per image.
    Locations are random but seeded, so two models are compared on the same stamped images.

    Raises:
        ValueError: a target outside the model's classes, a trigger with NaN/inf, values
            outside ``[0, 1]`` or the wrong channel count, or a model with NaN/inf weights.
    """
    _check_inputs(model, data)
    device = next(model.parameters()).device
    target = check_target(target, num_classes(model, data.images))
    if isinstance(trigger, torch.Tensor):
        check_trigger(trigger, "trigger", channels=data.images.shape[1])
    keep = data.labels.to(device) != target
    images = data.images.to(device)[keep]
    if len(images) == 0:
        raise ValueError(f"every image is of the target class {target}: ASR is undefined")
    g = torch.Generator(device=device).manual_seed(seed)
    if isinstance(trigger, torch.Tensor):
        trig = trigger.to(device)
    else:
        trig = trigger.sample(len(images), generator=g).to(device)
    stamped = stamp(images, trig, generator=g)
    return (predict(model, stamped) == target).float().mean().item()


def target_recall(model: nn.Module, data: ImageSet, target: int) -> float:
    """Fraction of the untouched images *of the target class* classified as the target: a
    defense that merely suppresses the target class shows here (its ASR would look perfect)."""
    _check_inputs(model, data)
    device = next(model.parameters()).device
    mine = data.labels.to(device) == check_target(target, num_classes(model, data.images))
    if not bool(mine.any()):
        raise ValueError(f"no image of the target class {target} in the data: its recall is undefined")
    return (predict(model, data.images.to(device)[mine]) == target).float().mean().item()


def evaluate_model(model: nn.Module, data: ImageSet, trigger: torch.Tensor, target: int, seed: int = 0) -> dict:
    """``{"clean_acc", "asr", "target_recall"}`` for the original trigger on ``data`` (the
    recall is None when ``data`` holds no image of the target class)."""
    has_target = bool((data.labels == target).any()) if isinstance(data, ImageSet) else False
    return {
        "clean_acc": clean_accuracy(model, data),
        "asr": attack_success_rate(model, data, trigger, target, seed=seed),
        "target_recall": target_recall(model, data, target) if has_target else None,
    }


def asr_per_trigger(model: nn.Module, images: torch.Tensor, triggers: torch.Tensor, target: int,
                    seed: int = 0, batch_size: int = 4096) -> torch.Tensor:
    """The ASR of each of ``T`` triggers ``[T, C, p, p]`` on the same (non-target) images
    ``[n, C, H, W]``, as a tensor ``[T]`` on the model's device: all ``T x n`` stamped images
    in one batched pass (random locations, seeded)."""
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W] tensor, got shape {tuple(images.shape)}")
    device = next(model.parameters()).device
    images = images.to(device)
    T, n = len(triggers), len(images)
    g = torch.Generator(device=device).manual_seed(seed)
    per_image = triggers.to(device).repeat_interleave(n, dim=0)
    stamped = stamp(images.repeat(T, 1, 1, 1), per_image, generator=g)
    hits = predict(model, stamped, batch_size=batch_size) == target
    return hits.float().reshape(T, n).mean(1)


def residual_valid_set(model: nn.Module, data: ImageSet, target: int, n_images: int = RESIDUAL_IMAGES,
                       seed: int = 0, triggers: torch.Tensor | None = None) -> torch.Tensor:
    """The ASR ``[512]`` of every binary 3x3 pattern (id order) on ``n_images`` non-target
    images of ``data`` (the first ones of a seeded permutation): the whole valid set, not only
    the attacker's trigger. After a defense, the patterns that still fire are what it left.
    ``triggers`` ``[N, 1 or C, p, p]`` measures another set of candidates (e.g. a sample of a
    grey region) on the same images instead; the result is then ``[N]``."""
    _check_inputs(model, data)
    n_images = positive_int("n_images", n_images)
    target = check_target(target, num_classes(model, data.images))
    keep = torch.nonzero(data.labels.cpu() != target).flatten()
    order = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))][:n_images]
    images = data.images[order.to(data.images.device)]
    pats = patterns_tensor(range(NUM_PATTERNS)) if triggers is None else triggers.to(images.device)
    pats = pats.expand(-1, images.shape[1], -1, -1)
    # a channels-last copy runs these 512 x n convolutions about 1.7x faster on a CPU
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return asr_per_trigger(fast, images, pats, target, seed=seed)


def residual_summary(asr: torch.Tensor, fired_before: torch.Tensor | list[int]) -> dict:
    """What a model leaves of the valid set: ``fired`` (patterns with ASR >= 50%),
    ``mean_fired_before`` (mean ASR over the patterns that fired on the backdoored model) and
    ``max`` (the largest ASR of any pattern)."""
    asr = torch.as_tensor(asr, dtype=torch.float32).cpu()
    idx = torch.as_tensor(fired_before, dtype=torch.long).cpu()
    return {
        "fired": int((asr >= FIRE_THRESHOLD).sum()),
        "mean_fired_before": float(asr[idx].mean()) if len(idx) else 0.0,
        "max": float(asr.max()),
    }
