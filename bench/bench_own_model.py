"""Benchmark: "a 20k-parameter model with 8k images defended" through mesa_lib.own.

A user's own CNN of about 20k parameters (not the library's SmallCNN) is trained on
Fashion-MNIST's training set with a backdoor (pattern 170's bright member toward class 0 on
20% of every batch, 3 epochs) -- untimed, this is what the user brings. Then :func:`mesa_lib.own.defend`
is timed (``always=True``: every stage runs) on Fashion-MNIST's 10k test images with the fast preset's settings: 8k are the
defender's (6k search / 2k check for the scan, all 8k for MESA and the retraining) and 2k
are held out for evaluation. Goal: <= 180 s on 2 CPU cores.

Prints (and with ``--out`` writes) JSON: the parameter count, the image counts, the seconds of
each stage and in all, the threads, the scan's verdict, and the trigger's ASR before/after.

Usage: ``python bench/bench_own_model.py [--threads 2] [--device cpu] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesa_lib.attack import poison_transform  # noqa: E402
from mesa_lib.data import load_dataset  # noqa: E402
from mesa_lib.models import train_classifier  # noqa: E402
from mesa_lib.own import DefenderData, DefenseSettings, defend  # noqa: E402
from mesa_lib.triggers import trigger_from_pattern  # noqa: E402

GOAL_S = 180.0


def users_cnn() -> nn.Module:
    """A 20,602-parameter CNN that takes [0, 1] pixels (the user's own design)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(2),
        nn.Flatten(), nn.Linear(192, 10),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    splits = load_dataset("fashion-mnist", device=args.device)
    trigger = trigger_from_pattern(170, 1, dark_background=True).to(args.device)
    torch.manual_seed(0)
    model = users_cnn().to(args.device)
    t = time.perf_counter()
    train_classifier(model, splits.train, epochs=3, lr=0.05, progress=False, schedule="cosine",
                     batch_transform=poison_transform(trigger, 0, 0.2))
    prep_s = time.perf_counter() - t
    data = DefenderData.from_parts(splits.model, splits.eval, splits.num_classes, 0, splits.classes)

    t = time.perf_counter()
    report = defend(model.eval(), data, settings=DefenseSettings(), device=args.device, trigger=trigger,
                    trigger_target=0, always=True, progress=False)
    total = time.perf_counter() - t
    result = {
        "what": "mesa_lib.own.defend, fast preset settings, a user's CNN on Fashion-MNIST's test set",
        "parameters": sum(p.numel() for p in model.parameters()),
        "images": report.sizes,
        "seconds": {**report.seconds, "wall": round(total, 1)},
        "goal_s": GOAL_S,
        "within_goal": total <= GOAL_S,
        "untimed_training_s": round(prep_s, 1),
        "flagged": report.flagged, "detected_target": report.detected_target,
        "before": report.before, "after": report.after,
        "torch_threads": torch.get_num_threads(), "device": args.device, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
