"""The single-point baseline: reverse-engineer ONE trigger by pixel-space SGD.

Neural-Cleanse style without the mask: start from a random trigger and follow the gradient of
the cross-entropy toward the target class on clean images with the trigger stamped at random
locations. Each random start lands on a different point of the valid set; retraining against
one point leaves the rest of the set working -- the paper's argument for modelling the whole
distribution. Several starts are optimised together in one batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import ImageSet
from .mesa import frozen
from .triggers import stamp
from .validate import finite_number, image_tensor, positive_int

__all__ = ["reverse_engineer_triggers", "reverse_engineer_trigger"]


def reverse_engineer_triggers(
    classifier: nn.Module,
    data: ImageSet | torch.Tensor,
    target: int,
    n_triggers: int = 1,
    steps: int = 200,
    lr: float = 0.1,
    batch_size: int = 128,
    trigger_size: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """``n_triggers`` triggers ``[n, C, p, p]`` optimised from independent random starts.

    The trigger is ``sigmoid(w)`` so pixels stay in ``[0, 1]``; ``w`` starts uniform in
    ``[-3, 3]`` (a random trigger) and is updated with Adam on the cross-entropy of the target
    class, each start on its own batch of ``batch_size`` stamped images.

    Raises:
        ValueError: counts that are not positive integers, a non-finite ``lr``, images that
            are not float32, finite and in ``[0, 1]``, a trigger larger than the images, or a
            target outside the classifier's classes.
    """
    device = next(classifier.parameters()).device
    n_triggers = positive_int("n_triggers", n_triggers)
    steps = positive_int("steps", steps)
    batch_size = positive_int("batch_size", batch_size)
    trigger_size = positive_int("trigger_size", trigger_size)
    finite_number("lr", lr, 0.0, strict=True)
    images = image_tensor(data, "reverse-engineering images")
    images = images.to(device)
    C = images.shape[1]
    if trigger_size > images.shape[-1]:
        raise ValueError(f"trigger of size {trigger_size} is larger than the images; use a smaller trigger")
    g = torch.Generator(device=device).manual_seed(seed)
    w = (torch.rand(n_triggers, C, trigger_size, trigger_size, generator=g, device=device) * 6 - 3).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    labels = torch.full((n_triggers * batch_size,), int(target), device=device)
    with frozen(classifier):
        n_classes = classifier(images[:1]).shape[1]
        if not 0 <= int(target) < n_classes:
            raise ValueError(f"target class must be in 0..{n_classes - 1}, got {target}")
        for _ in tqdm(range(steps), desc="point trigger", disable=not progress, leave=False):
            idx = torch.randint(0, len(images), (n_triggers * batch_size,), device=device, generator=g)
            trig = torch.sigmoid(w).repeat_interleave(batch_size, dim=0)
            loss = F.cross_entropy(classifier(stamp(images[idx], trig, generator=g, check_finite=False)), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return torch.sigmoid(w).detach()


def reverse_engineer_trigger(classifier: nn.Module, data: ImageSet | torch.Tensor, target: int, **kw) -> torch.Tensor:
    """One reverse-engineered trigger ``[C, p, p]`` (see :func:`reverse_engineer_triggers`)."""
    return reverse_engineer_triggers(classifier, data, target, n_triggers=1, **kw)[0]
