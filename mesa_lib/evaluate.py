"""Metrics: clean accuracy and attack success rate (ASR).

ASR follows the paper: the fraction of test images *whose true label is not the target* that
the model classifies as the target once a trigger is pasted at a random location.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .data import ImageSet
from .models import predict
from .triggers import TriggerSampler, stamp
from .validate import check_finite_weights, check_target, check_trigger, num_classes

__all__ = ["clean_accuracy", "attack_success_rate", "evaluate_model"]


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


def evaluate_model(model: nn.Module, data: ImageSet, trigger: torch.Tensor, target: int, seed: int = 0) -> dict:
    """``{"clean_acc": .., "asr": ..}`` for the original trigger on ``data``."""
    return {
        "clean_acc": clean_accuracy(model, data),
        "asr": attack_success_rate(model, data, trigger, target, seed=seed),
    }
