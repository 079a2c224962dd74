"""Detecting the target class: a short trigger search toward every class.

Only the attacked class has a large valid set of 3x3 triggers: for a clean class, no small
patch makes most images flip to it. So we train one short MESA sub-model per class -- all
classes in one batched pass -- and measure the ASR of its generated triggers. The class whose
triggers succeed far more often than the others is the detected target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn

from .common import median
from .data import ImageSet, split_test
from .evaluate import attack_success_rate
from .mesa import MesaConfig, StaircaseSampler, train_mesa
from .validate import num_classes

__all__ = ["DetectionResult", "scan_classes", "scan_classes_with_sampler", "anomaly_index_of_top", "is_flagged", "defender_halves",
           "FLAG_ASR", "FLAG_INDEX", "RULE", "SEARCH_SHARE"]

FLAG_ASR = 0.5
"""A scan flags a backdoor only if its top class's triggers reach at least this ASR ..."""
FLAG_INDEX = 2.0
"""... and that ASR stands more than this many robust standard deviations above the rest."""
RULE = f"top-class ASR >= {FLAG_ASR:.0%} and anomaly index > {FLAG_INDEX:g}"
"""The one decision rule of the book (chapters 7 and 9, the sweep, the clean-model control)."""


def is_flagged(per_class_asr, anomaly_index: float) -> bool:
    """The book's decision rule (:data:`RULE`) on a scan's numbers."""
    return bool(max(per_class_asr) >= FLAG_ASR and anomaly_index > FLAG_INDEX)


def anomaly_index_of_top(asr) -> tuple[int, float]:
    """The class with the highest ASR and its anomaly index
    ``(asr[top] - median) / max(1.4826 * MAD, 1e-3)`` (MAD: the median absolute deviation;
    medians of an even count are the mean of the two middle values)."""
    a = torch.as_tensor(asr, dtype=torch.float64).flatten()
    top = int(a.argmax())
    med = median(a)
    mad = median((a - med).abs()) * 1.4826
    return top, float((a[top] - med) / mad.clamp(min=1e-3))


SEARCH_SHARE = 0.75
"""The share of the defender's modelling split that trigger searches run on; the rest checks them."""


def defender_halves(data: ImageSet, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """The defender's modelling split cut into a search part (:data:`SEARCH_SHARE`) and a
    held-out check part (the rest, seeded): triggers are searched on the first and scored on
    the second, so that no defender's choice ever looks at the evaluation split."""
    return split_test(data, SEARCH_SHARE, seed=seed)


@dataclass
class DetectionResult:
    per_class_asr: list[float]
    """ASR of the triggers generated for each class (non-class images, stamped)."""
    detected_target: int
    """The class with the highest ASR."""
    anomaly_index: float
    """How far the top ASR stands above the others, in robust standard deviations
    (median absolute deviation x 1.4826, as Neural Cleanse)."""

    @property
    def flagged(self) -> bool:
        """Whether the book's decision rule (:data:`RULE`) calls the model backdoored."""
        return is_flagged(self.per_class_asr, self.anomaly_index)

    def to_dict(self) -> dict:
        return {**asdict(self), "flagged": self.flagged}


def scan_classes(
    classifier: nn.Module,
    search_data: ImageSet,
    eval_data: ImageSet,
    config: MesaConfig,
    beta: float = 0.8,
    seed: int = 0,
    progress: bool = True,
    trigger_shape: tuple[int, int, int] | None = None,
) -> DetectionResult:
    """Search triggers toward every class in one batched pass and report per-class ASR.

    ``config`` gives the generator settings and the (short) number of steps; its betas are
    replaced by one ``beta`` per class. Triggers are searched on ``search_data`` and their ASR
    is measured on ``eval_data``. ``trigger_shape`` is ``(C, p, p)`` (default: the images'
    channels, 3x3, as :func:`~mesa_lib.mesa.train_mesa`).
    """
    return scan_classes_with_sampler(classifier, search_data, eval_data, config, beta, seed, progress,
                                     trigger_shape)[0]


def scan_classes_with_sampler(
    classifier: nn.Module,
    search_data: ImageSet,
    eval_data: ImageSet,
    config: MesaConfig,
    beta: float = 0.8,
    seed: int = 0,
    progress: bool = True,
    trigger_shape: tuple[int, int, int] | None = None,
) -> tuple[DetectionResult, StaircaseSampler]:
    """:func:`scan_classes`, and the scan's sampler too (its step ``c`` models the triggers
    toward class ``c``), for showing what the scan found."""
    n_classes = num_classes(classifier, search_data.images)
    cfg = replace(config, betas=(beta,) * n_classes, gammas=None)
    sampler, _ = train_mesa(classifier, search_data, list(range(n_classes)), cfg, trigger_shape=trigger_shape,
                            seed=seed, progress=progress)
    g = torch.Generator().manual_seed(seed)
    asr = []
    for c in range(n_classes):
        n = int((eval_data.labels != c).sum())
        trig = sampler.sample_step(c, n, generator=g)
        asr.append(attack_success_rate(classifier, eval_data, trig, c, seed=seed))
    top, index = anomaly_index_of_top(asr)
    return DetectionResult(per_class_asr=asr, detected_target=top, anomaly_index=index), sampler
