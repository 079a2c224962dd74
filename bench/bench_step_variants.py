"""Benchmark: one MESA step (all staircase sub-models) done four ways, for chapter 6's table.

* ``loop``: the library's :class:`~mesa_lib.mesa.StaircaseTrainer` -- the ``N`` generators and
  ``N`` statistics networks called one after another in Python, one classifier pass for all
  their triggers;
* ``vmap``: the ``N`` generators as ONE batched model, and the ``N`` statistics networks as
  another (``torch.func.stack_module_state`` + ``vmap`` + ``functional_call``); the MINE
  moving average and losses computed for all sub-models at once;
* ``bf16``: the loop, with the classifier pass under ``torch.autocast(dtype=torch.bfloat16)``;
* ``compile``: the loop, with the classifier ``torch.compile``-d (the first call's compile time
  is reported apart, and is not in the per-step time).

Each is timed on the same model sizes and the same number of stamped images per step (the
``fast`` preset's small CNN on 28x28 images; its 3 sub-models x 64 triggers), once with the
preset's 128-wide generator and statistics network and once with the authors' 512-wide ones.
The classifier is freshly initialised (timing does not depend on its weights) and the images
are random, so the benchmark needs no dataset and no trained model. It also checks that the
batched model computes what the loop computes (largest absolute difference of the generators'
and statistics networks' outputs on the same inputs).

``vmap`` and BatchNorm: in training mode BatchNorm normalises with the batch's statistics,
which ``vmap`` handles, but it also updates its running averages in place, which ``vmap``
cannot; the batched copy therefore uses batch statistics only
(``torch.func.replace_all_batch_norm_modules_``). The outputs and gradients of a training step
are the same; a library version would also have to carry the running averages that
``sample()`` uses in eval mode.

Usage::

    python bench/bench_step_variants.py --threads 2 --out bench/results/step_variants_cpu.json
    python bench/bench_step_variants.py --device cuda --out bench/results/step_variants_gpu.json
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.func import functional_call, replace_all_batch_norm_modules_, stack_module_state, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesa_lib.common import code_fingerprint, git_state  # noqa: E402
from mesa_lib.mesa import MesaConfig, StaircaseTrainer, classifier_score_fn, frozen  # noqa: E402
from mesa_lib.models import build_model  # noqa: E402
from mesa_lib.presets import get_preset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mesa import _sync, bench_parser, header, setup, timeit  # noqa: E402  (shared with bench_mesa)

VARIANTS = ("loop", "vmap", "bf16", "compile")


class VmapStaircaseStep:
    """The step of :class:`StaircaseTrainer` with the N generators and the N statistics
    networks each run as one batched model. Starts from ``trainer``'s weights (copies)."""

    def __init__(self, trainer: StaircaseTrainer):
        cfg, dev = trainer.config, trainer.device
        self.cfg, self.device, self.M, self.B = cfg, dev, trainer.M, trainer.B
        self.score_fn, self.component, self.beta_per = trainer.score_fn, trainer.component, trainer.beta_per
        gens = list(trainer.sampler.generators)
        nets = [m.T for m in trainer.mines]
        self.g_base = copy.deepcopy(gens[0]).to("meta")
        replace_all_batch_norm_modules_(self.g_base)  # batch statistics only (see the docstring)
        self.t_base = copy.deepcopy(nets[0]).to("meta")
        self.gp, _ = stack_module_state(gens)  # {name: [M, ...]} leaves that require grad
        self.tp, _ = stack_module_state(nets)
        self.ma_rate, self.max_excess = trainer.mines[0].ma_rate, trainer.mines[0].max_excess
        self.log_ma = torch.full((self.M,), float("nan"), device=dev)
        self.opt_g = torch.optim.Adam(self.gp.values(), lr=cfg.lr, betas=cfg.adam_betas)
        self.opt_t = torch.optim.Adam(self.tp.values(), lr=cfg.mine_lr, betas=cfg.adam_betas)
        self.gen = torch.Generator(device=dev).manual_seed(0)
        self.shape = trainer.sampler.trigger_shape
        self._g = vmap(lambda p, z: functional_call(self.g_base, p, (z,)))
        self._t = vmap(lambda p, z, x: functional_call(self.t_base, p, (z, x)))

    def generators(self, z: torch.Tensor) -> torch.Tensor:
        """``[M, B, noise]`` -> ``[M, B, *shape]``: every generator on its own noise, one call."""
        return self._g(self.gp, z)

    def statistics(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``T_i(z_i, x_i)`` for every sub-model ``i``, ``[M, B]``."""
        return self._t(self.tp, z, x)

    def step(self) -> None:
        cfg, M, B = self.cfg, self.M, self.B
        z = torch.rand(M, B, cfg.noise_dim, device=self.device, generator=self.gen)
        z_marg = torch.rand(M, B, cfg.noise_dim, device=self.device, generator=self.gen)
        x = self.generators(z)
        f = self.score_fn(x.reshape(M * B, *self.shape), self.component)
        hinge = torch.minimum(f, self.beta_per).reshape(M, B).mean(1)
        log_b = math.log(B)
        # the DV estimate per sub-model (as the loop, T's gradients of this pass are discarded)
        mi = self.statistics(z, x).mean(1) - (torch.logsumexp(self.statistics(z_marg, x), 1) - log_b)
        loss_g = -(hinge + cfg.alpha * mi).sum()
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        xd = x.detach()
        t_joint, t_marg = self.statistics(z, xd), self.statistics(z_marg, xd)
        lme = torch.logsumexp(t_marg, 1) - log_b
        with torch.no_grad():  # MINE's moving average, for all sub-models at once
            cap = self.log_ma + self.max_excess
            clip = lme > cap
            cur = torch.where(clip, cap, lme)
            new = torch.logaddexp(self.log_ma + math.log1p(-self.ma_rate), cur + math.log(self.ma_rate))
            self.log_ma.copy_(torch.where(torch.isnan(self.log_ma), cur, new))
        lme_t = torch.where(clip, cap, lme)
        loss_t = -(t_joint.mean(1) - torch.exp(lme_t - self.log_ma)).sum()
        self.opt_t.zero_grad(set_to_none=True)
        loss_t.backward()
        self.opt_g.step()
        self.opt_t.step()


def agreement(trainer: StaircaseTrainer, batched: VmapStaircaseStep) -> dict:
    """Largest |difference| between the loop's and the batched model's outputs, same inputs."""
    cfg, M, B, dev = trainer.config, trainer.M, trainer.B, trainer.device
    z = torch.rand(M, B, cfg.noise_dim, device=dev, generator=torch.Generator(dev).manual_seed(1))
    with torch.no_grad():
        trainer.sampler.train()
        loop_x = torch.stack([g(z[i]) for i, g in enumerate(trainer.sampler.generators)])
        vm_x = batched.generators(z)
        loop_t = torch.stack([m.T(z[i], loop_x[i]) for i, m in enumerate(trainer.mines)])
        vm_t = batched.statistics(z, loop_x)
    return {"generators": float((loop_x - vm_x).abs().max()), "statistics": float((loop_t - vm_t).abs().max())}


def bench(device: torch.device, reps: int, cfg: MesaConfig, label: str) -> dict:
    preset = get_preset("fast")
    C, S, K = 1, 28, 10
    model = build_model(preset.model, C, K, S, preset.width).to(device)
    images = torch.rand(2048, C, S, S, device=device, generator=torch.Generator(device).manual_seed(0))
    M = len(cfg.betas)
    targets = torch.zeros(M, dtype=torch.long, device=device)
    out = {"label": label, "sub_models": M, "batch": cfg.batch_size, "images_per_step": M * cfg.batch_size,
           "generator_hidden": cfg.hidden, "mine_hidden": cfg.mine_hidden, "noise_dim": cfg.noise_dim, "ms": {}}
    with frozen(model):
        def trainer(score=None) -> StaircaseTrainer:
            score = score or classifier_score_fn(model, images, targets, cfg.trigger_noise)
            return StaircaseTrainer(score, (C, 3, 3), cfg, device=device)

        loop = trainer()
        batched = VmapStaircaseStep(loop)
        out["max_abs_difference"] = agreement(loop, batched)
        out["ms"]["loop"] = timeit(loop.step, device, reps, warmup=3)
        out["ms"]["vmap"] = timeit(batched.step, device, reps, warmup=3)

        plain = classifier_score_fn(model, images, targets, cfg.trigger_noise)

        def bf16_score(x, c):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return plain(x, c).float()

        out["ms"]["bf16"] = timeit(trainer(bf16_score).step, device, reps, warmup=3)
        torch._dynamo.reset()  # compile from scratch in this process (the on-disk cache may still help)
        compiled = torch.compile(model)
        comp = trainer(classifier_score_fn(compiled, images, targets, cfg.trigger_noise))
        t0 = time.perf_counter()
        comp.step()
        _sync(device)
        out["compile_seconds"] = round(time.perf_counter() - t0, 1)
        out["ms"]["compile"] = timeit(comp.step, device, reps, warmup=3)
    out["ms"] = {k: round(v, 2) for k, v in out["ms"].items()}
    out["speedup_vs_loop"] = {k: round(out["ms"]["loop"] / v, 3) for k, v in out["ms"].items()}
    return out


def main(argv=None) -> int:
    args = bench_parser(__doc__, reps=30).parse_args(argv)
    device = setup(args)
    fast = get_preset("fast").mesa
    t0 = time.perf_counter()
    results = {**header(device), "code": code_fingerprint(), "git": git_state(), "reps": args.reps,
               "how": "python bench/bench_step_variants.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "variants": list(VARIANTS), "runs": []}
    for cfg, label in ((fast, "fast preset (128-wide networks)"),
                       (replace(fast, hidden=512, mine_hidden=512), "authors' 512-wide networks")):
        results["runs"].append(bench(device, args.reps, cfg, label))
        print(json.dumps(results["runs"][-1]), file=sys.stderr)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
