"""Benchmark: the cost of a MESA step relative to training the classifier, and what batching
the staircase sub-models buys.

For each preset's model it prints JSON with, on the same number of stamped images
(N sub-models x batch):
* ``classifier_step_ms``: one classifier training step (forward + backward + SGD step);
* ``mesa_step_ms``: one MESA step of all N sub-models (generators, MINE, the frozen classifier's
  forward and input-gradient backward);
* ``ratio``: mesa / classifier (goal <= 1.3 for the paper's ResNet-18, where the classifier
  should dominate; the frozen classifier needs input gradients only);
* ``no_classifier_ms``: the same MESA step with a free testing function -- the cost of the
  generators and statistics networks alone (what dominates for a small model);
* ``sequential_ms`` and ``batched_speedup``: the N sub-models stepped one after another vs in
  one batched pass.

Usage: ``python bench/bench_mesa.py [--device cuda] [--reps 10] [--presets fast,paper] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesa_lib.mesa import MesaConfig, StaircaseTrainer, classifier_score_fn, frozen  # noqa: E402
from mesa_lib.models import build_model  # noqa: E402
from mesa_lib.presets import get_preset  # noqa: E402
from mesa_lib.triggers import stamp  # noqa: E402

SHAPES = {"fast": (1, 28, 10), "paper": (3, 32, 10)}  # channels, size, classes (Fashion-MNIST / CIFAR-10)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def bench_preset(name: str, device: torch.device, reps: int, mesa: MesaConfig | None = None) -> dict:
    preset = get_preset(name)
    cfg = mesa or preset.mesa
    C, S, K = SHAPES[name]
    torch.manual_seed(0)
    model = build_model(preset.model, C, K, S, preset.width).to(device)
    images = torch.rand(2048, C, S, S, device=device)
    M, B = len(cfg.betas), cfg.batch_size
    n = M * B
    trig = torch.rand(C, 3, 3, device=device)
    labels = torch.randint(0, K, (n,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def classifier_step():
        idx = torch.randint(0, len(images), (n,), device=device)
        x = stamp(images[idx], trig)
        loss = F.cross_entropy(model(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    t_cls = timeit(classifier_step, device, reps)
    out = {"preset": name, "model": preset.model, "images_per_step": n, "sub_models": M,
           "generator_hidden": cfg.hidden, "mine_hidden": cfg.mine_hidden, "noise_dim": cfg.noise_dim,
           "classifier_step_ms": round(t_cls, 2)}
    targets = torch.zeros(M, dtype=torch.long, device=device)
    with frozen(model):
        score = classifier_score_fn(model, images, targets, cfg.trigger_noise)
        trainer = StaircaseTrainer(score, (C, 3, 3), cfg, device=device)
        t_mesa = timeit(trainer.step, device, reps)
        free = StaircaseTrainer(lambda x, c: x.mean(dim=tuple(range(1, x.dim()))), (C, 3, 3), cfg, device=device)
        t_free = timeit(free.step, device, reps)
        singles = []
        for i, b in enumerate(cfg.betas):
            one = replace(cfg, betas=(b,), gammas=None)
            s1 = classifier_score_fn(model, images, targets[:1], cfg.trigger_noise)
            singles.append(StaircaseTrainer(s1, (C, 3, 3), one, device=device))
        t_seq = timeit(lambda: [t.step() for t in singles], device, reps)
    out.update({
        "mesa_step_ms": round(t_mesa, 2),
        "ratio": round(t_mesa / t_cls, 3),
        "no_classifier_ms": round(t_free, 2),
        "sequential_ms": round(t_seq, 2),
        "batched_speedup": round(t_seq / t_mesa, 3),
        "mesa_images_per_s": round(n / t_mesa * 1000, 1),
        "classifier_images_per_s": round(n / t_cls * 1000, 1),
    })
    return out


def bench_parser(doc: str, reps: int) -> argparse.ArgumentParser:
    """The options every benchmark takes: --device, --reps, --threads, --out."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=reps)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads; the device to measure on."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def header(device: torch.device) -> dict:
    """Where a benchmark ran: device, torch version, threads, CPU, GPU name."""
    return {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def main(argv=None) -> int:
    p = bench_parser(__doc__, reps=10)
    p.add_argument("--presets", default="fast,paper")
    args = p.parse_args(argv)
    device = setup(args)
    results = {**header(device), "runs": []}
    for name in args.presets.split(","):
        results["runs"].append(bench_preset(name, device, args.reps))
        if name == "fast":
            # the fast preset's sizes were chosen against the authors' 512-wide networks
            wide = replace(get_preset("fast").mesa, hidden=512, mine_hidden=512)
            r = bench_preset("fast", device, args.reps, mesa=wide)
            r["variant"] = "fast model, authors' 512-wide generator and MINE"
            results["runs"].append(r)
        print(json.dumps(results["runs"][-1]), file=sys.stderr)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
