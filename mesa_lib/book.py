"""Notebook setup for the book's chapters: one call instead of a page of boilerplate.

Every chapter starts with::

    from mesa_lib.book import chapter_setup
    ch = chapter_setup()          # preset, dataset, device, seed, data, trigger

The preset is ``fast`` (CPU) unless ``MESA_PRESET=paper``; the dataset is Fashion-MNIST
unless ``MESA_DATASET`` names another (``cifar10``, ``cifar100``). Trained classifiers are
cached, so later chapters reuse what earlier ones trained, and each chapter still runs on its
own from a cold cache.

``MESA_STRICT_DEVICE=1`` runs the chapter in strict-device mode (:mod:`mesa_lib.devicecheck`):
data and models go to a simulated second device, and every host/device mix-up that would fail
on a GPU fails on the CPU too. In Colab the dataset is downloaded through torchvision when it
is not found.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import devicecheck
from .data import DatasetSplits, load_dataset
from .pipeline import get_backdoored_model, get_clean_model, make_trigger, pick_device
from .presets import Preset, get_preset

__all__ = ["Chapter", "chapter_setup", "in_colab"]


def in_colab() -> bool:
    """Whether this runs in Google Colab (its kernel imports ``google.colab``)."""
    return "google.colab" in sys.modules


@dataclass
class Chapter:
    """What a chapter works with."""

    preset: Preset
    dataset: str
    device: torch.device
    seed: int
    splits: DatasetSplits
    pattern: int
    target: int
    trigger: torch.Tensor

    def clean_model(self, progress: bool = False) -> nn.Module:
        """The clean classifier (trained once, then loaded from the cache)."""
        return get_clean_model(self.splits, self.preset, self.seed, use_cache=True, progress=progress)

    def backdoored_model(self, progress: bool = False) -> nn.Module:
        """The backdoored classifier for this chapter's pattern and target (cached)."""
        return get_backdoored_model(self.clean_model(progress), self.splits, self.trigger, self.target,
                                    self.preset, self.seed, use_cache=True, progress=progress)


def chapter_setup(pattern: int = 170, target: int = 0, seed: int = 0) -> Chapter:
    """Pick preset/dataset from the environment, seed everything, load the data on the device,
    set a plain plot style, and build the attack's trigger."""
    preset = get_preset(os.environ.get("MESA_PRESET", "fast"))
    dataset = os.environ.get("MESA_DATASET", "fashion-mnist")
    if devicecheck.env_requested():
        device = devicecheck.enable()  # the simulated device (MESA_STRICT_DEVICE=1)
    else:
        device = pick_device(os.environ.get("MESA_DEVICE") or None)
    torch.manual_seed(seed)
    try:
        import matplotlib.pyplot as plt

        plt.rcParams.update({"figure.dpi": 100, "axes.spines.top": False, "axes.spines.right": False,
                             "image.cmap": "gray"})
    except ImportError:  # pragma: no cover
        pass
    splits = load_dataset(dataset, device=device, download=in_colab())
    trigger = make_trigger(splits, pattern).to(device)
    return Chapter(preset, dataset, device, seed, splits, pattern, target, trigger)
