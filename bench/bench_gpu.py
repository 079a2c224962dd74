"""Throughput of the pipeline's steps on whatever device runs it: images/s for the attack
(poisoned fine-tuning), MESA and the retraining defense, and the cost of a MESA step relative
to a classifier training step on as many images.

    python bench/bench_gpu.py                       # paper preset (ResNet-18), cuda if present
    python bench/bench_gpu.py --preset fast --steps 3 --batch 16 --device cpu   # a quick CPU run
    python bench/bench_gpu.py --bf16 --channels-last [--compile] --out bench.json

Data are random tensors of the dataset's shape (no download needed; throughput does not
depend on pixel values). Every timing follows warm-up steps and waits for the device
(``torch.cuda.synchronize``) before the clock stops. The result is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from dataclasses import replace

import torch

from mesa_lib import __version__
from mesa_lib.attack import poison_transform
from mesa_lib.data import ImageSet
from mesa_lib.defense import stamp_transform
from mesa_lib.mesa import train_mesa
from mesa_lib.models import build_model, train_classifier
from mesa_lib.pipeline import pick_device
from mesa_lib.presets import get_preset
from mesa_lib.triggers import FixedTrigger, trigger_from_pattern

SHAPES = {"fashion-mnist": (1, 28, 10), "cifar10": (3, 32, 10), "cifar100": (3, 32, 100)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds taken by ``fn()``, after the device has finished its work."""
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper", help="paper (ResNet-18, default) or fast (small CNN)")
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(SHAPES))
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast around forward/backward")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the classifier")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")

    preset = get_preset(args.preset)
    device = pick_device(args.device)
    batch = args.batch or preset.batch_size
    mesa_cfg = replace(preset.mesa, batch_size=min(preset.mesa.batch_size, batch), log_every=10**9)
    M = len(mesa_cfg.betas)
    C, size, classes = SHAPES[args.dataset]
    g = torch.Generator().manual_seed(0)
    n = max(batch, M * mesa_cfg.batch_size) * (args.steps + args.warmup)
    data = ImageSet(torch.rand(n, C, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.channels_last:
        data = ImageSet(data.images.contiguous(memory_format=fmt), data.labels)
    model = build_model(preset.model, C, classes, size, preset.width).to(device, memory_format=fmt)
    net = torch.compile(model) if args.compile else model
    trigger = trigger_from_pattern(170, C).to(device)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext())

    def train(transform, steps: int, bs: int = batch):
        # one epoch over exactly steps * bs images = exactly `steps` steps
        train_classifier(net, data.subset(slice(0, steps * bs)), epochs=1, lr=1e-3, batch_size=bs,
                         batch_transform=transform, progress=False)

    def rate(run, images_per_step: int) -> dict:
        with amp:
            if args.warmup:
                run(args.warmup)
            s = timed(lambda: run(args.steps), device)
        return {"images_per_s": images_per_step * args.steps / s, "ms_per_step": 1000 * s / args.steps}

    results = {
        "attack": rate(lambda k: train(poison_transform(trigger, 0, preset.poison_ratio), k), batch),
        "retrain": rate(lambda k: train(stamp_transform(FixedTrigger(trigger), preset.defense_ratio), k), batch),
        # a classifier training step on as many images as one MESA step scores
        "classifier_step_mesa_size": rate(lambda k: train(None, k, M * mesa_cfg.batch_size), M * mesa_cfg.batch_size),
        "mesa": rate(lambda k: train_mesa(net, data, 0, replace(mesa_cfg, steps=k), progress=False),
                     M * mesa_cfg.batch_size),
    }
    results["mesa_step_over_classifier_step"] = (results["mesa"]["ms_per_step"]
                                                 / results["classifier_step_mesa_size"]["ms_per_step"])
    out = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "preset": preset.name, "model": preset.model, "dataset_shape": [C, size, size], "batch": batch,
        "mesa_sub_models": M, "mesa_batch": mesa_cfg.batch_size, "steps": args.steps,
        "bf16": args.bf16, "channels_last": args.channels_last, "compile": args.compile,
        "torch": torch.__version__, "mesa_lib": __version__, "python": sys.version.split()[0],
        "results": results,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return out


if __name__ == "__main__":
    main()
