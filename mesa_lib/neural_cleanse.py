"""Neural Cleanse (Wang et al. 2019): reverse-engineer a mask + pattern per class, flag the
class whose trigger is anomalously small, and unlearn the backdoor.

For every class ``c`` Neural Cleanse looks for the *smallest* full-image blend that makes
clean images be classified as ``c``::

    x' = (1 - m) * x + m * p,      m in [0, 1]^{1 x H x W},  p in [0, 1]^{C x H x W}
    loss_c = CE(model(x'), c) + lam * |m|_1

A backdoored class needs only the trigger's few pixels; a clean class needs a large mask.
The L1 norms of the masks are compared with the median absolute deviation (MAD): the
*anomaly index* of class ``c`` is ``|norm_c - median| / (1.4826 * MAD)``, and a class with
index > 2 and a norm below the median is flagged as backdoored.

Here all classes are optimised together in one batched pass (one classifier forward per
step for every class, classifier frozen). Mitigation is NC's *unlearning*: fine-tune on data
where a fraction of each batch carries the reversed trigger and keeps its true label -- the
same retraining loop as MESA's defense (:func:`mesa_lib.models.train_classifier`), with a
mask blend instead of a 3x3 stamp.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .attack import check_ratio, count_in_batch
from .common import median
from .data import ImageSet
from .mesa import frozen
from .models import BatchTransform, train_classifier
from .validate import check_target, check_trigger, finite_number, image_tensor, num_classes, positive_int

__all__ = [
    "NC_THRESHOLD",
    "NCConfig",
    "ReversedTriggers",
    "NCDetection",
    "reverse_engineer_masks",
    "anomaly_index",
    "detect_backdoor",
    "blend",
    "blend_transform",
    "unlearn",
]


@dataclass(frozen=True)
class NCConfig:
    """Settings of the Neural Cleanse search (fixed ``lam``, Adam as in the NC code)."""

    steps: int = 300
    """Optimisation steps (each: one batch per class through the classifier)."""
    batch_size: int = 32
    """Images per class per step."""
    lr: float = 0.1
    """Adam learning rate on the mask and pattern logits (NC: 0.1, betas (0.5, 0.9))."""
    lam: float = 1e-2
    """Weight of the mask's L1 norm."""

    def __post_init__(self) -> None:
        positive_int("NCConfig.steps", self.steps)
        positive_int("NCConfig.batch_size", self.batch_size)
        finite_number("NCConfig.lr", self.lr, 0.0, strict=True)
        finite_number("NCConfig.lam", self.lam, 0.0)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReversedTriggers:
    """One reverse-engineered (mask, pattern) per class."""

    masks: torch.Tensor
    """``[K, 1, H, W]`` in ``[0, 1]``."""
    patterns: torch.Tensor
    """``[K, C, H, W]`` in ``[0, 1]``."""
    attack_rate: torch.Tensor
    """``[K]``: fraction of the last step's images classified as their class."""

    @property
    def l1_norms(self) -> torch.Tensor:
        """``[K]``: the L1 norm of each class's mask (the size of its trigger)."""
        return self.masks.flatten(1).sum(1)


def blend(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``(1 - mask) * images + mask * pattern`` (broadcast: one mask/pattern or one per image)."""
    return (1 - mask) * images + mask * pattern


def reverse_engineer_masks(
    classifier: nn.Module,
    data: ImageSet | torch.Tensor,
    config: NCConfig | None = None,
    classes: list[int] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ReversedTriggers:
    """Optimise a mask and pattern toward every class (default: all), in one batched pass.

    Each step draws ``batch_size`` images per class, blends each class's images with that
    class's mask and pattern, and runs the frozen classifier once on all of them. The loss is
    the sum over classes of ``CE + lam * |m|_1``; the classes' parameters are disjoint, so this
    equals optimising each class alone.

    Raises:
        ValueError: a bad config or class, or images that are not float32, finite and in
            ``[0, 1]``.
    """
    config = NCConfig() if config is None else config
    if not isinstance(config, NCConfig):
        raise ValueError(f"config must be an NCConfig, got {type(config).__name__}")
    images = image_tensor(data, "Neural Cleanse images")
    device = next(classifier.parameters()).device
    images = images.to(device)
    n_classes = num_classes(classifier, images)
    classes = list(range(n_classes)) if classes is None else [check_target(c, n_classes) for c in classes]
    K, B = len(classes), config.batch_size
    _, C, H, W = images.shape
    g = torch.Generator(device=device).manual_seed(seed)
    # NC starts from a random mask and pattern; logits of U(0,1) values
    m_w = torch.logit(torch.rand(K, 1, 1, H, W, generator=g, device=device).clamp(0.05, 0.95)).requires_grad_(True)
    p_w = torch.logit(torch.rand(K, 1, C, H, W, generator=g, device=device).clamp(0.05, 0.95)).requires_grad_(True)
    opt = torch.optim.Adam([m_w, p_w], lr=config.lr, betas=(0.5, 0.9))
    labels = torch.tensor(classes, device=device).repeat_interleave(B)
    with frozen(classifier):
        for _ in tqdm(range(config.steps), desc="Neural Cleanse", disable=not progress, leave=False):
            idx = torch.randint(0, len(images), (K, B), device=device, generator=g)
            mask, pattern = torch.sigmoid(m_w), torch.sigmoid(p_w)
            x = blend(images[idx], mask, pattern).reshape(K * B, C, H, W)  # [K, B, C, H, W] -> batch
            logits = classifier(x)
            ce = F.cross_entropy(logits, labels, reduction="none").reshape(K, B).mean(1)
            loss = (ce + config.lam * mask.flatten(1).sum(1)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rate = (logits.detach().argmax(1) == labels).float().reshape(K, B).mean(1)
    return ReversedTriggers(torch.sigmoid(m_w).detach()[:, 0], torch.sigmoid(p_w).detach()[:, 0], rate)


def anomaly_index(norms: torch.Tensor) -> torch.Tensor:
    """``|norm - median| / (1.4826 * MAD)`` per class (MAD floored at 1e-6 of the median)."""
    norms = torch.as_tensor(norms, dtype=torch.float64)
    if norms.dim() != 1 or len(norms) < 3:
        raise ValueError(f"anomaly index needs a 1-D tensor of >= 3 norms, got shape {tuple(norms.shape)}")
    med = median(norms)
    mad = 1.4826 * median((norms - med).abs())
    return (norms - med).abs() / mad.clamp(min=1e-6 * float(med.abs()) + 1e-12)


@dataclass
class NCDetection:
    l1_norms: list[float]
    """L1 norm of each class's reversed mask."""
    anomaly_index: list[float]
    """Anomaly index of each class."""
    flagged: list[int]
    """Classes with index > ``threshold`` and a norm below the median."""
    detected_target: int
    """The most anomalous small-norm class (reported even when nothing is flagged)."""
    attack_rate: list[float]
    """How often each class's reversed trigger reached its class (last step)."""

    def to_dict(self) -> dict:
        return asdict(self)


NC_THRESHOLD = 2.0
"""Neural Cleanse flags a class whose mask's anomaly index exceeds this (the paper's value)."""


def detect_backdoor(reversed_: ReversedTriggers, threshold: float = NC_THRESHOLD) -> NCDetection:
    """Neural Cleanse's decision from the reversed masks."""
    norms = reversed_.l1_norms.double().cpu()
    idx = anomaly_index(norms)
    small = norms <= median(norms)
    flagged = [int(c) for c in torch.nonzero(small & (idx > threshold)).flatten()]
    detected = int(torch.where(small, idx, torch.full_like(idx, -1.0)).argmax())
    return NCDetection(norms.tolist(), idx.tolist(), flagged, detected, reversed_.attack_rate.cpu().tolist())


def blend_transform(mask: torch.Tensor, pattern: torch.Tensor, ratio: float) -> BatchTransform:
    """A batch transform that blends the reversed trigger into the first ``ratio`` of each
    (already shuffled) batch and keeps every label: NC's unlearning data."""
    check_ratio("unlearning ratio", ratio)

    def transform(x: torch.Tensor, y: torch.Tensor, g: torch.Generator):
        k = count_in_batch(ratio, len(x))
        if k == 0:
            return x, y
        x = x.clone()
        x[:k] = blend(x[:k], mask.to(x.device), pattern.to(x.device))
        return x, y

    return transform


def unlearn(
    model: nn.Module,
    data: ImageSet,
    mask: torch.Tensor,
    pattern: torch.Tensor,
    ratio: float = 0.2,
    epochs: float = 1,
    lr: float = 1e-2,
    batch_size: int = 128,
    momentum: float = 0.9,
    seed: int = 0,
    progress: bool = True,
    schedule: str = "constant",
) -> nn.Module:
    """NC mitigation: fine-tune a copy of ``model`` on ``data`` where a fraction ``ratio`` of
    each batch carries the reversed trigger (``mask`` ``[1, H, W]``, ``pattern`` ``[C, H, W]``)
    with its true label. NC's paper uses 20% of the data; the sweep uses the same ratio,
    epochs and learning rate as MESA's defense so that the defenses differ only in the
    trigger they retrain against."""
    if mask.dim() != 3 or mask.shape[0] != 1 or pattern.dim() != 3 or pattern.shape[1:] != mask.shape[1:]:
        raise ValueError(f"mask must be [1, H, W] and pattern [C, H, W], got {tuple(mask.shape)}, {tuple(pattern.shape)}")
    if not isinstance(data, ImageSet):
        raise ValueError(f"data must be an ImageSet, got {type(data).__name__}")
    if mask.shape[1:] != data.images.shape[2:]:
        raise ValueError(f"mask is {tuple(mask.shape[1:])} but the images are {tuple(data.images.shape[2:])}")
    check_trigger(mask, "Neural Cleanse mask", channels=1)
    check_trigger(pattern, "Neural Cleanse pattern", channels=data.images.shape[1])
    model = copy.deepcopy(model)
    return train_classifier(model, data, epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum,
                            batch_transform=blend_transform(mask, pattern, ratio), seed=seed,
                            desc="NC unlearning", progress=progress, schedule=schedule)
