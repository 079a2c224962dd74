"""MESA on your own model: scan, model the triggers and remove the backdoor of a classifier
the library did not train.

The stages are the library's own -- :func:`~mesa_lib.detect.scan_classes` (the target-class
scan), :func:`~mesa_lib.mesa.train_mesa` (the staircase), :func:`~mesa_lib.defense.retrain`
(retraining with true labels) and :mod:`~mesa_lib.evaluate` -- run on a user's ``nn.Module``
and the user's clean images, with every setting the fast preset assumes made a field of
:class:`DefenseSettings` (trigger size and channels, budgets, split). The defaults are the
fast preset's, so on the pipeline's own models and data the results are the pipeline's.

* :func:`scan` -- per class, the ASR of generated triggers and the book's flag (:data:`RULE`);
* :func:`model_triggers` -- a :class:`~mesa_lib.mesa.StaircaseSampler` toward one class;
* :func:`remove_backdoor` -- a retrained copy of the model;
* :func:`defend` -- all three, measured on an evaluation part that the defense never sees,
  in a :class:`DefenseReport` (JSON-serialisable; :meth:`DefenseReport.to_html` is one page).

Images are pixels in ``[0, 1]``: triggers are stamped there, and the model's own input
normalisation (:class:`InputNorm`, e.g. ``InputNorm.from_range(-1, 1)`` or a mean/std) is
applied in front of it (:class:`PixelSpace`). The user's images are split by the defender's
rule: ``eval_share`` is held out for evaluation; the rest (the *retraining* part, where MESA's
staircase is modelled too, as in the pipeline) is cut by
:func:`~mesa_lib.detect.defender_halves` into the scan's search part (:data:`SEARCH_SHARE`)
and its check part.

The command line ``python -m mesa_lib defend`` (:func:`add_cli`, :func:`run_cli`) reads a
model (safetensors weights with an importable factory or a torchvision name, or a
``torch.export`` program) and data (an image folder, a ``.npz`` or a book dataset) and
writes ``report.json``, ``report.md``, ``report.html`` and ``defended.safetensors`` to a
folder. Bad input is refused with one line before any training, and nothing is written
half-way.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import html
import importlib
import importlib.util
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from .common import __version__, code_fingerprint
from .data import ImageSet, split_test
from .defense import retrain
from .detect import FLAG_ASR, RULE, SEARCH_SHARE, defender_halves, is_flagged, scan_classes_with_sampler
from .evaluate import attack_success_rate, clean_accuracy, target_recall
from .mesa import MesaConfig, StaircaseSampler, train_mesa
from .models import Normalize, describe_state_mismatch
from .presets import FAST, Preset, get_preset
from .validate import check_trigger, finite_number, positive_int
from .validate import num_classes as probe_classes

__all__ = [
    "InputNorm",
    "DefenseSettings",
    "DefenderData",
    "PixelSpace",
    "ScanResult",
    "DefenseReport",
    "prepare_model",
    "check_model",
    "scan",
    "model_triggers",
    "remove_backdoor",
    "defend",
    "load_model",
    "load_data",
    "write_report",
    "add_cli",
    "run_cli",
    "MIN_PER_CLASS",
    "EVAL_SHARE",
    "RULE",
]

EVAL_SHARE = 0.2
"""The share of the user's images held out for evaluation (the pipeline's 80/20 split)."""

MIN_PER_CLASS = 10
"""Fewest images per class for the split: with 10, each class expects 2 images in the check
part and 2 in the evaluation part (20% each), so every class can be scored and measured."""

REPORT_FILES = ("report.json", "report.md", "report.html", "defended.safetensors")


# ---------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class InputNorm:
    """What the user's model expects as input, from pixels ``x`` in ``[0, 1]``:
    ``(x - mean) / std`` per channel. ``InputNorm()`` is ``[0, 1]`` itself;
    :meth:`from_range` maps ``[0, 1]`` onto ``[lo, hi]``."""

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        mean = tuple(finite_number("mean", float(m)) for m in _as_tuple(self.mean))
        std = tuple(finite_number("std", float(s), 0.0, strict=True) for s in _as_tuple(self.std))
        if not mean or not std:
            raise ValueError("mean and std need at least one value each (one per channel, or one for all)")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def from_range(cls, lo: float, hi: float) -> "InputNorm":
        """The model takes pixels linearly mapped onto ``[lo, hi]`` (e.g. ``-1, 1``; ``0, 255``)."""
        lo, hi = finite_number("input range low", lo), finite_number("input range high", hi)
        if hi <= lo:
            raise ValueError(f"the input range must be low < high, got [{lo:g}, {hi:g}]")
        return cls(mean=(-lo / (hi - lo),), std=(1.0 / (hi - lo),))

    def module(self, channels: int) -> Normalize:
        """The normalisation as a first layer (:class:`~mesa_lib.models.Normalize`)."""
        for name, v in (("mean", self.mean), ("std", self.std)):
            if len(v) not in (1, channels):
                raise ValueError(f"the input {name} has {len(v)} values but the images have {channels} "
                                 f"channels; give 1 or {channels}")
        return Normalize(list(self.mean) if len(self.mean) > 1 else self.mean[0],
                         list(self.std) if len(self.std) > 1 else self.std[0], channels)

    def describe(self) -> str:
        if self.mean == (0.0,) and self.std == (1.0,):
            return "pixels in [0, 1]"
        return f"(x - mean) / std with mean {list(self.mean)} and std {list(self.std)}, x in [0, 1]"


def _as_tuple(v: object) -> tuple:
    if isinstance(v, (int, float)):
        return (v,)
    return tuple(v)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DefenseSettings:
    """Every setting of a defense, with the fast preset's values as defaults (see
    :meth:`from_preset`). Frozen: change a copy with ``dataclasses.replace``.

    The budget is ``detect_steps`` (the scan), ``mesa.steps`` (the staircase) and
    ``retrain_epochs``; the trigger is ``trigger_channels x trigger_size x trigger_size``."""

    trigger_size: int = 3
    """Side of the square trigger patch (any ``k`` no larger than the images)."""
    trigger_channels: int | None = None
    """1 (grey patch on every channel) or the images' channel count; None: the images'."""
    mesa: MesaConfig = FAST.mesa
    """The staircase's settings (betas, alpha, generator width, steps, batch)."""
    detect_steps: int = FAST.detect_steps
    detect_batch: int = FAST.detect_batch
    detect_beta: float = FAST.detect_beta
    retrain_ratio: float = FAST.defense_ratio
    retrain_epochs: float = FAST.defense_epochs
    retrain_lr: float = FAST.defense_lr
    retrain_schedule: str = FAST.defense_schedule
    batch_size: int = FAST.batch_size
    eval_share: float = EVAL_SHARE
    """Share of the images held out for evaluation (the defense never sees them)."""
    seed: int = 0
    """Seeds the split, the searches and the retraining (the pipeline's seed)."""

    def __post_init__(self) -> None:
        positive_int("trigger_size", self.trigger_size)
        if self.trigger_channels is not None:
            positive_int("trigger_channels", self.trigger_channels)
        if not isinstance(self.mesa, MesaConfig):
            raise ValueError(f"mesa must be a MesaConfig, got {type(self.mesa).__name__}")
        for name in ("detect_steps", "detect_batch", "batch_size"):
            positive_int(name, getattr(self, name))
        if not 0.0 < finite_number("detect_beta", self.detect_beta) < 1.0:
            raise ValueError(f"detect_beta must be in (0, 1), got {self.detect_beta}")
        finite_number("retrain_ratio", self.retrain_ratio, 0.0, maximum=1.0)
        finite_number("retrain_epochs", self.retrain_epochs, 0.0, strict=True)
        finite_number("retrain_lr", self.retrain_lr, 0.0, strict=True)
        if self.retrain_schedule not in ("constant", "cosine"):
            raise ValueError(f"retrain_schedule must be 'constant' or 'cosine', got {self.retrain_schedule!r}")
        if not 0.0 < finite_number("eval_share", self.eval_share) < 1.0:
            raise ValueError(f"eval_share must be strictly between 0 and 1 (e.g. 0.2), got {self.eval_share}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    @classmethod
    def from_preset(cls, preset: Preset | str = "fast", **changes: Any) -> "DefenseSettings":
        """The settings a preset's pipeline uses (its headline retraining protocol)."""
        p = get_preset(preset)
        base = cls(mesa=p.mesa, detect_steps=p.detect_steps, detect_batch=p.detect_batch,
                   detect_beta=p.detect_beta, retrain_ratio=p.defense_ratio, retrain_epochs=p.defense_epochs,
                   retrain_lr=p.defense_lr, retrain_schedule=p.defense_schedule, batch_size=p.batch_size)
        return dataclasses.replace(base, **changes)

    def with_budget(self, detect_steps: int | None = None, mesa_steps: int | None = None,
                    retrain_epochs: float | None = None) -> "DefenseSettings":
        """A copy with a smaller (or larger) budget."""
        out = self
        if detect_steps is not None:
            out = dataclasses.replace(out, detect_steps=detect_steps)
        if mesa_steps is not None:
            out = dataclasses.replace(out, mesa=dataclasses.replace(out.mesa, steps=mesa_steps))
        if retrain_epochs is not None:
            out = dataclasses.replace(out, retrain_epochs=retrain_epochs)
        return out

    def trigger_shape(self, channels: int) -> tuple[int, int, int]:
        c = channels if self.trigger_channels is None else self.trigger_channels
        if c not in (1, channels):
            raise ValueError(f"trigger_channels is {c} but the images have {channels} channels; use 1 or {channels}")
        return (c, self.trigger_size, self.trigger_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------- data


@dataclass
class DefenderData:
    """The user's images split by the defender's rule: ``retrain`` (MESA's staircase and the
    retraining), cut into ``search`` and ``check`` for the scan, and ``evaluation``, held out."""

    search: ImageSet
    check: ImageSet
    retrain: ImageSet
    evaluation: ImageSet
    num_classes: int
    classes: list[str] = field(default_factory=list)

    @classmethod
    def split(cls, images: Any, labels: Any, eval_share: float = EVAL_SHARE, seed: int = 0,
              classes: Sequence[str] | None = None, num_classes: int | None = None) -> "DefenderData":
        """Check and split the user's images (float32 ``[N, C, H, W]`` in ``[0, 1]``, square)
        and integer labels ``0..K-1``.

        Raises:
            ValueError: images of the wrong shape, dtype or range; labels that are not class
                indices; a class with fewer than :data:`MIN_PER_CLASS` images.
        """
        data = as_imageset(images, labels)
        k = int(data.labels.max()) + 1 if num_classes is None else int(num_classes)
        if classes is not None and len(classes) != k:
            raise ValueError(f"{len(classes)} class names for {k} classes; give one name per class")
        if int(data.labels.max()) >= k:
            raise ValueError(f"labels go up to {int(data.labels.max())} but there are {k} classes")
        counts = torch.bincount(data.labels.cpu(), minlength=k)
        few = [c for c in range(k) if counts[c] < MIN_PER_CLASS]
        if few:
            c = few[0]
            raise ValueError(
                f"class {_name(classes, c)} has {int(counts[c])} image(s); the defender's split (search "
                f"{100 * (1 - eval_share) * SEARCH_SHARE:.0f}% / check {100 * (1 - eval_share) * (1 - SEARCH_SHARE):.0f}% "
                f"/ evaluation {100 * eval_share:.0f}%) needs at least {MIN_PER_CLASS} per class "
                f"({len(few)} class(es) have fewer); add images or merge classes")
        retrain_part, evaluation = split_test(data, 1.0 - eval_share, seed=seed)
        return cls.from_parts(retrain_part, evaluation, num_classes=k, seed=seed, classes=classes)

    @classmethod
    def from_parts(cls, retrain_part: ImageSet, evaluation: ImageSet, num_classes: int, seed: int = 0,
                   classes: Sequence[str] | None = None) -> "DefenderData":
        """From an existing modelling/evaluation split (a book dataset's ``model`` and ``eval``)."""
        search, check = defender_halves(retrain_part, seed)
        return cls(search, check, retrain_part, evaluation, int(num_classes), list(classes or []))

    @property
    def channels(self) -> int:
        return int(self.retrain.images.shape[1])

    def to(self, device: torch.device | str) -> "DefenderData":
        return DefenderData(self.search.to(device), self.check.to(device), self.retrain.to(device),
                            self.evaluation.to(device), self.num_classes, list(self.classes))

    def sizes(self) -> dict:
        return {k: len(getattr(self, k)) for k in ("search", "check", "retrain", "evaluation")}

    def class_name(self, c: int) -> str:
        return _name(self.classes, c)


def _name(classes: Sequence[str] | None, c: int) -> str:
    return f"{c} ({classes[c]})" if classes else str(c)


def as_imageset(images: Any, labels: Any) -> ImageSet:
    """The user's images and labels as a checked :class:`~mesa_lib.data.ImageSet` (numpy
    arrays are converted; labels of any integer dtype become int64).

    Raises:
        ValueError: one line saying what is wrong (shape, dtype, range, non-square images,
            channels other than 1 or 3, labels that are not non-negative integers).
    """
    x = torch.as_tensor(images)
    y = torch.as_tensor(labels)
    if x.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(x.shape)}; add a channel axis with "
                         "images.unsqueeze(1) for grey images, or permute(0, 3, 1, 2) for [N, H, W, C]")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels (axis 1 of [N, C, H, W]), got {x.shape[1]}; "
                         "for [N, H, W, C] arrays use permute(0, 3, 1, 2)")
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"images must be square, got {x.shape[2]}x{x.shape[3]}; crop or resize them first")
    if y.is_floating_point() or y.dtype == torch.bool or y.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor of integer class indices, got {y.dtype} of shape "
                         f"{tuple(y.shape)}")
    y = y.long()
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"labels must be class indices 0..K-1, got {int(y.min())}")
    return ImageSet(x, y.to(x.device))


def _defender_data(images: Any, labels: Any, settings: DefenseSettings) -> DefenderData:
    if isinstance(images, DefenderData):
        return images
    return DefenderData.split(images, labels, settings.eval_share, settings.seed)


# ---------------------------------------------------------------------------------- the model


class PixelSpace(nn.Module):
    """The user's model behind its input normalisation: takes pixels in ``[0, 1]``.

    ``inner`` is the user's model; its ``state_dict`` is what the defense saves. A model that
    cannot switch modes (a ``torch.export`` program) keeps the mode it was exported in."""

    def __init__(self, inner: nn.Module, norm: InputNorm, channels: int):
        super().__init__()
        self.norm = norm.module(channels)
        self.inner = inner
        self.switchable = _can_switch_mode(inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.norm(x))

    def train(self, mode: bool = True) -> "PixelSpace":
        self.training = mode
        self.norm.train(mode)
        if self.switchable:
            self.inner.train(mode)
        return self


def _can_switch_mode(model: nn.Module) -> bool:
    try:
        model.train(model.training)
        return True
    except NotImplementedError:  # torch.export's GraphModule
        return False


def prepare_model(model: nn.Module, channels: int, norm: InputNorm | None = None,
                  device: torch.device | str | None = None) -> PixelSpace:
    """A copy of ``model`` behind ``norm`` (default: it takes ``[0, 1]``), on ``device``
    (default: the model's own). The user's model is never changed."""
    if isinstance(model, PixelSpace):
        return model if device is None else model.to(device)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(True for _ in model.parameters()):
        raise ValueError("the model has no parameters: there is nothing to defend")
    wrapped = PixelSpace(copy.deepcopy(model), norm or InputNorm(), channels)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    return wrapped.to(dev)


@torch.no_grad()
def check_model(model: PixelSpace, data: DefenderData) -> None:
    """The model takes the images and gives one finite score per class of the data.

    Raises:
        ValueError: one line: the forward pass fails (with its reason), the output is not
            ``[N, K]`` with K the data's number of classes, or it holds NaN/inf.
    """
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        for n in (min(2, len(data.retrain)), min(5, len(data.retrain))):  # two batch sizes: a static export fails
            x = data.retrain.images[:n].to(device)
            try:
                out = model(x)
            except Exception as err:  # the user's code: any failure is bad input, said in one line
                msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                hint = ("; export it with a dynamic batch dimension (dynamic_shapes with torch.export.Dim)"
                        if "Guard failed" in msg or "size()[0]" in msg else "")
                raise ValueError(f"the model cannot classify images of shape {list(x.shape[1:])} "
                                 f"(batches of {n}): {type(err).__name__}: {msg}{hint}") from None
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"the model must return logits [N, classes], got {shape} for {n} images")
            if out.shape[1] != data.num_classes:
                raise ValueError(f"the model outputs {out.shape[1]} scores per image but the data has "
                                 f"{data.num_classes} classes; give data with all of the model's classes "
                                 "(or the model that was trained on these classes)")
        sample = data.retrain.images[:256].to(device)
        out = model(sample)
        if not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).any(1).sum())
            raise ValueError(f"the model gives NaN/inf outputs on {bad} of {len(sample)} clean images; check its "
                             "weights and its input normalisation (--mean/--std, --input-range)")
    finally:
        model.train(was)


def _setup(model: nn.Module, images: Any, labels: Any, settings: DefenseSettings | None,
           norm: InputNorm | None, device: torch.device | str | None) -> tuple[PixelSpace, DefenderData, DefenseSettings]:
    settings = DefenseSettings() if settings is None else settings
    if not isinstance(settings, DefenseSettings):
        raise ValueError(f"settings must be a DefenseSettings, got {type(settings).__name__}")
    data = _defender_data(images, labels, settings)
    settings.trigger_shape(data.channels)  # checks the channels
    if settings.trigger_size > data.retrain.images.shape[-1]:
        raise ValueError(f"trigger_size {settings.trigger_size} is larger than the "
                         f"{data.retrain.images.shape[-1]}x{data.retrain.images.shape[-1]} images; use a smaller one")
    wrapped = prepare_model(model, data.channels, norm, device)
    data = data.to(next(wrapped.parameters()).device)
    check_model(wrapped, data)
    return wrapped, data, settings


# ---------------------------------------------------------------------------------- the stages


@dataclass
class ScanResult:
    """One scan: per class the ASR of its generated triggers on the check part, the top
    class, its anomaly index and the book's flag (:data:`RULE`). ``triggers[c]`` are a few
    of the triggers generated toward class ``c`` (not in :meth:`to_dict`)."""

    per_class_asr: list[float]
    detected_target: int
    anomaly_index: float
    flagged: bool
    rule: str = RULE
    triggers: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "triggers"}


def _scan(wrapped: PixelSpace, data: DefenderData, settings: DefenseSettings, progress: bool,
          shown: int = 8) -> ScanResult:
    cfg = dataclasses.replace(settings.mesa, steps=settings.detect_steps, batch_size=settings.detect_batch)
    det, sampler = scan_classes_with_sampler(wrapped, data.search, data.check, cfg, beta=settings.detect_beta,
                                             seed=settings.seed, progress=progress,
                                             trigger_shape=settings.trigger_shape(data.channels))
    g = torch.Generator().manual_seed(settings.seed + 7)
    triggers = torch.stack([sampler.sample_step(c, shown, generator=g) for c in range(data.num_classes)]).cpu()
    return ScanResult(det.per_class_asr, det.detected_target, det.anomaly_index, det.flagged, RULE, triggers)


def scan(model: nn.Module, images: Any, labels: Any = None, *, settings: DefenseSettings | None = None,
         norm: InputNorm | None = None, device: torch.device | str | None = None,
         progress: bool = True) -> ScanResult:
    """Is ``model`` backdoored, and toward which class? One short trigger search per class
    (all in one batched pass) on the search part, scored on the check part.

    ``images``/``labels``: the user's clean images (float32 ``[N, C, H, W]`` in ``[0, 1]``)
    and labels, split by :meth:`DefenderData.split`; or a :class:`DefenderData`.

    Raises:
        ValueError: bad images, labels, model or settings (one line), before any search.
    """
    wrapped, data, settings = _setup(model, images, labels, settings, norm, device)
    return _scan(wrapped, data, settings, progress)


def _model_triggers(wrapped: PixelSpace, data: DefenderData, target: int, settings: DefenseSettings,
                    progress: bool) -> tuple[StaircaseSampler, dict]:
    return train_mesa(wrapped, data.retrain, target, settings.mesa, trigger_shape=settings.trigger_shape(data.channels),
                      seed=settings.seed, progress=progress)


def model_triggers(model: nn.Module, images: Any, target: int, labels: Any = None, *,
                   settings: DefenseSettings | None = None, norm: InputNorm | None = None,
                   device: torch.device | str | None = None, progress: bool = True) -> StaircaseSampler:
    """MESA's staircase of triggers toward ``target``, modelled on the retraining part of the
    images (the evaluation part is left out). Without ``labels`` the images are split by
    their count alone, as :meth:`DefenderData.split` would (no per-class check)."""
    settings = DefenseSettings() if settings is None else settings
    if labels is None and not isinstance(images, DefenderData):
        x = torch.as_tensor(images)
        unlabelled = as_imageset(x, torch.zeros(len(x), dtype=torch.long))
        part, evaluation = split_test(unlabelled, 1.0 - settings.eval_share, seed=settings.seed)
        wrapped = prepare_model(model, unlabelled.images.shape[1], norm, device)
        dev = next(wrapped.parameters()).device
        k = probe_classes(wrapped, part.images)
        data = DefenderData.from_parts(part.to(dev), evaluation.to(dev), k, settings.seed)
        check_model(wrapped, data)
    else:
        wrapped, data, settings = _setup(model, images, labels, settings, norm, device)
    return _model_triggers(wrapped, data, target, settings, progress)[0]


def _remove_backdoor(wrapped: PixelSpace, data: DefenderData, sampler, settings: DefenseSettings,
                     progress: bool) -> PixelSpace:
    return retrain(wrapped, data.retrain, sampler, ratio=settings.retrain_ratio, epochs=settings.retrain_epochs,
                   lr=settings.retrain_lr, batch_size=settings.batch_size, seed=settings.seed + 2,
                   progress=progress, schedule=settings.retrain_schedule)


def remove_backdoor(model: nn.Module, images: Any, labels: Any, sampler, *,
                    settings: DefenseSettings | None = None, norm: InputNorm | None = None,
                    device: torch.device | str | None = None, progress: bool = True) -> nn.Module:
    """A copy of ``model`` retrained on the retraining part with ``sampler``'s triggers
    stamped on ``retrain_ratio`` of each batch, every label kept true. Returns the user's
    architecture (without the normalisation wrapper)."""
    wrapped, data, settings = _setup(model, images, labels, settings, norm, device)
    return _remove_backdoor(wrapped, data, sampler, settings, progress).inner


# ---------------------------------------------------------------------------------- defend


@dataclass
class DefenseReport:
    """What :func:`defend` found and did; :meth:`to_dict` is plain JSON."""

    scan: dict
    flagged: bool
    detected_target: int
    target_name: str
    defended: bool
    before: dict
    after: dict | None
    sizes: dict
    num_classes: int
    classes: list[str]
    input_norm: str
    settings: dict
    seconds: dict
    device: str
    provenance: dict
    note: str = ""
    model: nn.Module | None = field(default=None, repr=False)
    """The defended model (the user's architecture), or None when no defense ran."""
    triggers: torch.Tensor | None = field(default=None, repr=False)
    """Scan triggers ``[K, n, C, p, p]`` and, as row K, the defense's MESA triggers."""

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("model", "triggers")} | {
            "scan": dict(self.scan)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        return _markdown(self)

    def to_html(self) -> str:
        return _html(self)


def _measure(model: nn.Module, data: ImageSet, target: int, sampler, seed: int,
             trigger: torch.Tensor | None = None, trigger_target: int | None = None) -> dict:
    """Clean accuracy, the ASR of ``sampler``'s triggers toward ``target`` and its recall on
    ``data``; with a known ``trigger``, its ASR toward ``trigger_target`` too."""
    out = {"clean_acc": clean_accuracy(model, data),
           "mesa_asr": attack_success_rate(model, data, sampler, target, seed=seed + 11),
           "target_recall": target_recall(model, data, target) if bool((data.labels == target).any()) else None}
    if trigger is not None:
        out["trigger_asr"] = attack_success_rate(model, data, trigger, target if trigger_target is None
                                                 else trigger_target, seed=seed + 13)
    return out


def defend(model: nn.Module, images: Any, labels: Any = None, *, settings: DefenseSettings | None = None,
           norm: InputNorm | None = None, device: torch.device | str | None = None, classes: Sequence[str] | None = None,
           always: bool = False, trigger: torch.Tensor | None = None, trigger_target: int | None = None,
           progress: bool = True) -> DefenseReport:
    """Scan ``model``; if the scan flags it (or ``always``), model the triggers of the flagged
    class and retrain them away. Everything is measured on the held-out evaluation part.

    ``trigger`` (``[C, p, p]``, measurement only: a defender does not know it) adds the ASR
    of a known trigger toward ``trigger_target`` (default: the detected class) before and
    after. Returns a :class:`DefenseReport` whose ``model`` is the defended copy.

    Raises:
        ValueError: bad input (one line), before any training.
    """
    t0 = time.perf_counter()
    if classes is not None and not isinstance(images, DefenderData):
        data0 = DefenderData.split(images, labels, (settings or DefenseSettings()).eval_share,
                                   (settings or DefenseSettings()).seed, classes=classes)
        images, labels = data0, None
    wrapped, data, settings = _setup(model, images, labels, settings, norm, device)
    dev = next(wrapped.parameters()).device
    if trigger is not None:
        trigger = torch.as_tensor(trigger, dtype=torch.float32)
        if trigger.dim() != 3:
            raise ValueError(f"trigger must be one [C, p, p] patch, got shape {tuple(trigger.shape)}")
        check_trigger(trigger, "trigger", channels=data.channels)
        trigger = trigger.to(dev)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    result = _scan(wrapped, data, settings, progress)
    seconds["scan"] = round(time.perf_counter() - t, 3)
    target = result.detected_target
    defended = result.flagged or always
    sampler, after, model_out, note = None, None, None, ""
    t = time.perf_counter()
    sampler, history = _model_triggers(wrapped, data, target, settings, progress) if defended else (None, None)
    seconds["mesa"] = round(time.perf_counter() - t, 3) if defended else 0.0
    if sampler is None:  # measure the scan's own triggers toward the top class
        sampler = _ScanStep(result.triggers[target])
        note = (f"not flagged ({RULE}): no defense was run; the top class's scan triggers are measured "
                "(pass always=True / --always to defend anyway)")
    before = _measure(wrapped, data.evaluation, target, sampler, settings.seed, trigger, trigger_target)
    if defended:
        t = time.perf_counter()
        new = _remove_backdoor(wrapped, data, sampler, settings, progress)
        seconds["retrain"] = round(time.perf_counter() - t, 3)
        after = _measure(new, data.evaluation, target, sampler, settings.seed, trigger, trigger_target)
        model_out = new.inner.eval() if new.switchable else new.inner
    g = torch.Generator().manual_seed(settings.seed + 5)
    shown = result.triggers
    if isinstance(sampler, StaircaseSampler):
        mesa_rows = sampler.sample(shown.shape[1], generator=g).cpu()
        shown = torch.cat([shown, mesa_rows[None]])
    seconds["total"] = round(time.perf_counter() - t0, 3)
    return DefenseReport(
        scan=result.to_dict(), flagged=result.flagged, detected_target=target, target_name=data.class_name(target),
        defended=defended, before=before, after=after, sizes=data.sizes(), num_classes=data.num_classes,
        classes=list(data.classes), input_norm=(norm or InputNorm()).describe(),
        settings=settings.to_dict() | {"trigger_shape": list(settings.trigger_shape(data.channels))},
        seconds=seconds, device=str(dev),
        provenance={"mesa_lib": __version__, "torch": torch.__version__, "code": code_fingerprint(),
                    "torch_threads": torch.get_num_threads(),
                    "final_mi": (history["mi"][-1] if history and history["mi"] else None)},
        note=note, model=model_out, triggers=shown)


class _ScanStep:
    """Draws from a few fixed triggers (the scan's, for a model that is not flagged)."""

    def __init__(self, triggers: torch.Tensor):
        self.triggers = triggers

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.randint(0, len(self.triggers), (n,), generator=generator)
        dev = generator.device if generator is not None else self.triggers.device
        return self.triggers[idx].to(dev)


# ---------------------------------------------------------------------------------- the report


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def _rows(report: DefenseReport) -> list[tuple[str, str, str]]:
    after = report.after or {}
    rows = [("clean accuracy", _pct(report.before["clean_acc"]), _pct(after.get("clean_acc"))),
            (f"ASR of MESA's triggers toward {report.target_name}", _pct(report.before["mesa_asr"]),
             _pct(after.get("mesa_asr"))),
            (f"recall of class {report.target_name}", _pct(report.before["target_recall"]),
             _pct(after.get("target_recall")))]
    if "trigger_asr" in report.before:
        rows.append(("ASR of the known trigger", _pct(report.before["trigger_asr"]), _pct(after.get("trigger_asr"))))
    return rows


def _markdown(r: DefenseReport) -> str:
    s = r.scan
    verdict = (f"**Flagged**: class {r.target_name} (top-class ASR {_pct(max(s['per_class_asr']))}, "
               f"anomaly index {s['anomaly_index']:.1f}; rule: {s['rule']})" if r.flagged else
               f"**Not flagged** (top class {r.target_name}: ASR {_pct(max(s['per_class_asr']))}, anomaly index "
               f"{s['anomaly_index']:.1f}; rule: {s['rule']})")
    lines = ["# MESA defense report", "", verdict, "",
             f"Images: {r.sizes['search']} search / {r.sizes['check']} check (scan), {r.sizes['retrain']} "
             f"retraining (search + check), {r.sizes['evaluation']} evaluation (held out, never seen by the "
             f"defense). Input: {r.input_norm}. Device: {r.device}.", "",
             "## Scan (ASR of generated triggers, per class, on the check part)", "",
             "| class | ASR |", "| --- | --- |"]
    lines += [f"| {_name(r.classes, c)}{' (top)' if c == r.detected_target else ''} | {_pct(a)} |"
              for c, a in enumerate(s["per_class_asr"])]
    lines += ["", "## Before and after the defense (evaluation part)", "", "| | before | after |",
              "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c or '-'} |" for a, b, c in _rows(r)]
    if r.note:
        lines += ["", r.note]
    st = r.settings
    lines += ["", f"Budget: scan {st['detect_steps']} steps, MESA {st['mesa']['steps']} steps, retraining "
              f"{st['retrain_epochs']:g} epochs at lr {st['retrain_lr']:g} ({st['retrain_schedule']}), "
              f"{100 * st['retrain_ratio']:g}% of each batch stamped; trigger "
              f"{' x '.join(map(str, st['trigger_shape']))} (channels x rows x columns); seed {st['seed']}.",
              "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r.seconds.items()) + "."]
    return "\n".join(lines) + "\n"


def trigger_grid_png(report: DefenseReport) -> bytes:
    """A PNG of the sampled triggers: one row per class (the scan's), then MESA's."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .plots import show_triggers

    t = report.triggers
    if t is None:
        raise ValueError("the report holds no triggers (it was read back from JSON)")
    rows, n = t.shape[0], t.shape[1]
    flat = t.reshape(rows * n, *t.shape[2:])
    fig, ax = plt.subplots(figsize=(0.5 * n + 1.5, 0.5 * rows + 0.3))
    show_triggers(flat, nrow=n, ax=ax, scale=max(1, 24 // t.shape[-1]))
    labels = [_name(report.classes, c) for c in range(report.num_classes)] + (["MESA"] if rows > report.num_classes else [])
    ax.set_axis_on()
    ax.set_xticks([])
    h = ax.get_images()[0].get_array().shape[0]
    ax.set_yticks([(i + 0.5) * h / rows for i in range(rows)], labels, fontsize=7)
    for spine in ax.spines.values():
        spine.set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _html(r: DefenseReport) -> str:
    md = _markdown(r)
    body, in_table = [], False
    for line in md.splitlines():  # the summary's few Markdown forms, as HTML
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("- "):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line:
            text = html.escape(line)
            while text.count("**") >= 2:
                text = text.replace("**", "<b>", 1).replace("**", "</b>", 1)
            body.append(f"<p>{text}</p>")
    if in_table:
        body.append("</table>")
    if r.triggers is not None:
        png = base64.b64encode(trigger_grid_png(r)).decode("ascii")
        body.insert(3, "<h2>Sampled triggers</h2><p>One row per class (the scan's generated triggers)"
                    + (", and MESA's staircase toward the flagged class" if r.defended else "")
                    + f".</p><img alt='sampled triggers' src='data:image/png;base64,{png}'>")
    style = ("body{font-family:sans-serif;max-width:52em;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:2px 8px;text-align:left}")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>MESA defense report</title>"
            f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def write_report(report: DefenseReport, out: str | os.PathLike, force: bool = False) -> list[Path]:
    """Write ``report.json``, ``report.md``, ``report.html`` and (when a defense ran)
    ``defended.safetensors`` into the folder ``out``: all into a temporary folder beside it
    first, then moved in, so ``out`` never holds half a report.

    Raises:
        ValueError: ``out`` exists and holds files (unless ``force``; then only these files are
            replaced), or it is not a writable folder.
    """
    out = check_out_dir(out, force)
    from safetensors.torch import save

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        (tmp / "report.json").write_text(report.to_json())
        (tmp / "report.md").write_text(report.to_markdown())
        (tmp / "report.html").write_text(report.to_html())
        if report.model is not None:
            state = {k: v.detach().contiguous().cpu() for k, v in report.model.state_dict().items()}
            meta = {"mesa_lib": json.dumps({"defense": "MESA", "detected_target": report.detected_target,
                                            "settings": report.settings}, default=str)}
            (tmp / "defended.safetensors").write_bytes(save(state, metadata=meta))
        out.mkdir(exist_ok=True)
        written = []
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
            written.append(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def check_out_dir(out: str | os.PathLike, force: bool = False) -> Path:
    """``out`` as a folder that may receive a report: missing, empty, or (``force``) with files.

    Raises:
        ValueError: ``out`` is a file, exists with files (without ``force``), or cannot be written.
    """
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the report")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise ValueError(f"--out {out} exists and holds files; choose a new folder, or pass --force to replace "
                         f"the report's files ({', '.join(REPORT_FILES)}) in it")
    ancestor = path if path.exists() else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not os.access(ancestor, os.W_OK | os.X_OK) or (path.exists() and not os.access(path.parent, os.W_OK)):
        raise ValueError(f"--out {out}: cannot write in {ancestor} (read-only or permission denied); "
                         "choose a writable folder")
    return path


# ---------------------------------------------------------------------------------- loading


def import_factory(spec: str):
    """``MODULE:FACTORY`` or ``path/to/file.py:FACTORY`` -> the callable.

    Raises:
        ValueError: one line: the spec's form, a module that cannot be imported, a missing name.
    """
    if ":" not in spec or spec.endswith(":") or spec.startswith(":"):
        raise ValueError(f"--arch must be MODULE:FACTORY (e.g. mymodels:make_net or nets.py:make_net), got {spec!r}")
    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise ValueError(f"--arch {spec}: no file {path}")
            mspec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mspec)  # type: ignore[arg-type]
            mspec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod_name)
    except ValueError:
        raise
    except Exception as err:  # ImportError, SyntaxError, anything the user's module raises
        raise ValueError(f"--arch {spec}: cannot import {mod_name} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); check the name and that it is on "
                         "PYTHONPATH (or give a file path, nets.py:make_net)") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ValueError(f"--arch {spec}: {mod_name} has no callable {attr!r}")
    return fn


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a valid safetensors file ({err}); save weights with "
                         "safetensors.torch.save_file(model.state_dict(), path)") from None


def load_model(path: str | os.PathLike, arch: str | None = None, torchvision_name: str | None = None,
               num_classes: int | None = None, arch_kwargs: dict | None = None) -> nn.Module:
    """The user's model: safetensors weights with an importable factory (``arch``) or a
    torchvision model name (built with ``num_classes``), or a ``torch.export`` program
    (``.pt2``, read by ``torch.export.load``). Never a pickle.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: one line: an unknown format, a factory that cannot be imported or built,
            weights that do not fit the architecture (naming the tensors).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    if path.suffix == ".pt2":
        if arch or torchvision_name:
            raise ValueError("a torch.export program (.pt2) holds its architecture; leave out --arch/--torchvision")
        try:
            program = torch.export.load(str(path))
        except Exception as err:
            raise ValueError(f"{path} is not a torch.export program ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); save one with torch.export.save") from None
        return program.module()
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: give weights as .safetensors (with --arch or --torchvision) or a torch.export "
                         "program .pt2; pickled checkpoints (.pt, .pth, .ckpt) are not read")
    if bool(arch) == bool(torchvision_name):
        raise ValueError("safetensors weights need exactly one of --arch MODULE:FACTORY or --torchvision NAME")
    if arch:
        factory = import_factory(arch)
        try:
            model = factory(**(arch_kwargs or {}))
        except Exception as err:
            raise ValueError(f"--arch {arch}: calling the factory failed ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from None
        if not isinstance(model, nn.Module):
            raise ValueError(f"--arch {arch} returned {type(model).__name__}, not a torch.nn.Module")
        what = f"--arch {arch}"
    else:
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        if torchvision_name not in names:
            raise ValueError(f"--torchvision {torchvision_name!r} is not a torchvision classification model; "
                             f"e.g. {', '.join(n for n in names if n.startswith(('resnet', 'mobilenet')))}")
        kw = dict(arch_kwargs or {})
        if num_classes is not None:
            kw.setdefault("num_classes", int(num_classes))
        model = torchvision.models.get_model(torchvision_name, weights=None, **kw)
        what = f"torchvision's {torchvision_name}"
    state = _read_safetensors(path)
    mismatch = describe_state_mismatch(model.state_dict(), state)
    if mismatch:
        raise ValueError(f"the weights in {path} do not fit {what}: {mismatch}")
    model.load_state_dict(state)
    return model.eval()


def load_data(spec: str, root: str | None = None, seed: int = 0,
              eval_share: float = EVAL_SHARE) -> DefenderData:
    """The user's data: an image folder (one subfolder per class), a ``.npz`` with ``images``
    and ``labels`` (and optionally ``classes``), or a book dataset's name (its test set,
    split as the pipeline splits it).

    Raises:
        FileNotFoundError: no such file or folder (and not a dataset name).
        ValueError: one line on anything else (format, shape, dtype, range, too few per class).
    """
    from .datafiles import canonical_name

    path = Path(spec).expanduser()
    if not path.exists():
        try:
            name = canonical_name(spec)
        except ValueError:
            raise FileNotFoundError(f"--data {spec}: no such file or folder, and not a book dataset "
                                    "(fashion-mnist, cifar10, cifar100)") from None
        from .data import load_dataset

        splits = load_dataset(name, root=root, model_fraction=1.0 - eval_share, split_seed=seed)
        return DefenderData.from_parts(splits.model, splits.eval, splits.num_classes, seed, splits.classes)
    if path.is_dir():
        images, labels, classes = _read_image_folder(path)
    elif path.suffix == ".npz":
        images, labels, classes = _read_npz(path)
    else:
        raise ValueError(f"--data {spec}: give an image folder (one subfolder per class), a .npz with 'images' "
                         "and 'labels', or a book dataset's name")
    return DefenderData.split(images, labels, eval_share, seed, classes=classes,
                              num_classes=len(classes) if classes else None)


def _pixels(array: Any, what: str) -> torch.Tensor:
    """uint8 (0..255) or float ([0, 1]) pixels, ``[N, H, W]``, ``[N, C, H, W]`` or
    ``[N, H, W, C]`` -> float32 ``[N, C, H, W]`` in ``[0, 1]``."""
    import numpy as np

    a = np.asarray(array)
    if a.dtype == np.uint8:
        x = torch.from_numpy(a.astype(np.float32) / 255.0)
    elif a.dtype in (np.float32, np.float64, np.float16):
        x = torch.from_numpy(a.astype(np.float32))
    else:
        raise ValueError(f"{what} must be uint8 (0..255) or float (0..1) pixels, got dtype {a.dtype}")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.permute(0, 3, 1, 2).contiguous()
    if x.dim() != 4:
        raise ValueError(f"{what} must be [N, H, W], [N, C, H, W] or [N, H, W, C], got shape {tuple(a.shape)}")
    return x


def _read_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("images", "labels") if k not in f.files]
            if missing:
                raise ValueError(f"{path} lacks {' and '.join(missing)} (it has {', '.join(f.files) or 'nothing'}); "
                                 "save it with np.savez(path, images=..., labels=...)")
            images, labels = f["images"], f["labels"]
            classes = [str(c) for c in f["classes"]] if "classes" in f.files else None
    except ValueError as err:
        if "allow_pickle" in str(err) or "Object arrays" in str(err):
            raise ValueError(f"{path} holds object arrays (pickles), which are not read; save plain numeric "
                             "arrays") from None
        raise
    except (OSError, EOFError) as err:
        raise ValueError(f"{path} is not a valid .npz file ({err})") from None
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers, got dtype {labels.dtype}")
    return _pixels(images, f"{path}'s images"), torch.from_numpy(labels.astype(np.int64)).reshape(-1), classes


def _read_image_folder(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    def loader(p: str) -> Image.Image:
        with Image.open(p) as im:
            return im.convert("L") if im.mode in ("L", "1", "I;16", "I") else im.convert("RGB")

    try:
        folder = ImageFolder(str(path), loader=loader)
    except (FileNotFoundError, OSError) as err:
        raise ValueError(f"--data {path}: not an image folder with one subfolder of images per class ({err})") from None
    tensors, labels = [], []
    for p, y in folder.samples:
        try:
            tensors.append(pil_to_tensor(loader(p)))
        except OSError as err:
            raise ValueError(f"--data {path}: cannot read image {p} ({err})") from None
        labels.append(y)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        a, b = sorted(shapes)[:2]
        raise ValueError(f"--data {path}: the images differ in size or channels ({list(a)} and {list(b)}); "
                         "resize them to one size first")
    images = torch.stack(tensors).float() / 255.0
    return images, torch.tensor(labels, dtype=torch.long), list(folder.classes)


# ---------------------------------------------------------------------------------- CLI


_EPILOG = """examples:
  python -m mesa_lib defend --model net.safetensors --arch mynets:make_net --data images/ --out report/
  python -m mesa_lib defend --model r18.safetensors --torchvision resnet18 --data data.npz --mean 0.5 --std 0.25 --out r/
  python -m mesa_lib defend --model net.pt2 --data fashion-mnist --input-range -1,1 --out r/ --force

writes report.json, report.md, report.html (one page, opens in a browser) and
defended.safetensors (when the scan flags the model, or with --always) into --out.

exit codes:
  0  success
  2  bad input or usage (one line on stderr starting with 'error:'; nothing was trained or written)
  1  unexpected error (a bug; Python's traceback is printed)"""


def _floats(value: str) -> tuple[float, ...]:
    import argparse

    try:
        out = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise argparse.ArgumentTypeError(f"expected finite comma-separated numbers, got {value!r}")
    return out


def _json_dict(value: str) -> dict:
    import argparse

    try:
        out = json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--arch-kwargs must be a JSON object, e.g. '{{\"num_classes\": 10}}' ({err})") from None
    if not isinstance(out, dict):
        raise argparse.ArgumentTypeError("--arch-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return out


def add_cli(sub) -> None:
    """Add the ``defend`` subcommand to an argparse subparsers object."""
    import argparse

    from .cli import _seed_type, parse_device

    d = sub.add_parser("defend", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="scan, model the triggers of and defend YOUR model on your images")
    d.add_argument("--model", required=True, help="weights (.safetensors) or a torch.export program (.pt2)")
    arch = d.add_mutually_exclusive_group()
    arch.add_argument("--arch", default=None, help="MODULE:FACTORY (or file.py:FACTORY) that builds the architecture")
    arch.add_argument("--torchvision", default=None, metavar="NAME", help="a torchvision model name, e.g. resnet18")
    d.add_argument("--arch-kwargs", type=_json_dict, default=None, help="JSON keyword arguments for the factory")
    d.add_argument("--data", required=True, help="image folder, .npz (images, labels) or a book dataset name")
    d.add_argument("--data-root", default=None, help="where a book dataset lives (default: search)")
    d.add_argument("--out", required=True, help="folder for the report and the defended weights")
    d.add_argument("--force", action="store_true", help="write into an --out that already holds files")
    norm = d.add_mutually_exclusive_group()
    norm.add_argument("--input-range", type=_floats, default=None, metavar="LO,HI",
                      help="the model takes pixels mapped onto [LO, HI] (default 0,1)")
    norm.add_argument("--mean", type=_floats, default=None, help="the model takes (x - mean) / std; with --std")
    d.add_argument("--std", type=_floats, default=None, help="per-channel std (with --mean)")
    d.add_argument("--trigger-size", type=int, default=3, help="side of the square trigger (default 3)")
    d.add_argument("--trigger-channels", type=int, default=None, help="1 or the images' channels (default)")
    d.add_argument("--preset", default="fast", help="settings to start from (default fast)")
    d.add_argument("--detect-steps", type=int, default=None, help="scan steps (default: the preset's)")
    d.add_argument("--mesa-steps", type=int, default=None, help="MESA steps (default: the preset's)")
    d.add_argument("--epochs", type=float, default=None, help="retraining epochs (default: the preset's)")
    d.add_argument("--seed", type=_seed_type, default=0, help="seeds the split, the searches and the retraining")
    d.add_argument("--always", action="store_true", help="defend even when the scan does not flag the model")
    d.add_argument("--device", type=parse_device, default=None, metavar="{cpu,cuda,cuda:N}",
                   help="where to compute (default: cuda if available, else cpu)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")


def _cli_norm(args) -> InputNorm:
    if args.std is not None and args.mean is None:
        raise ValueError("--std needs --mean too")
    if args.mean is not None:
        if args.std is None:
            raise ValueError("--mean needs --std too")
        return InputNorm(args.mean, args.std)
    if args.input_range is not None:
        if len(args.input_range) != 2:
            raise ValueError(f"--input-range takes two numbers LO,HI, got {len(args.input_range)}")
        return InputNorm.from_range(*args.input_range)
    return InputNorm()


def run_cli(args) -> None:
    """Run ``defend``: check everything (out folder, data, model, settings) before any training."""
    from .pipeline import pick_device

    check_out_dir(args.out, args.force)
    norm = _cli_norm(args)
    settings = DefenseSettings.from_preset(args.preset, trigger_size=args.trigger_size,
                                           trigger_channels=args.trigger_channels, seed=args.seed)
    settings = settings.with_budget(args.detect_steps, args.mesa_steps, args.epochs)
    data = load_data(args.data, root=args.data_root, seed=args.seed, eval_share=settings.eval_share)
    model = load_model(args.model, arch=args.arch, torchvision_name=args.torchvision, num_classes=data.num_classes,
                       arch_kwargs=args.arch_kwargs)
    report = defend(model, data, settings=settings, norm=norm, device=pick_device(args.device),
                    always=args.always, progress=not args.quiet)
    written = write_report(report, args.out, force=args.force)
    print(report.to_markdown())
    print(f"written to {args.out}: {', '.join(p.name for p in written)}")
