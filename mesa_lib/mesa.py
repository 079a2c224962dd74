"""MESA: the max-entropy staircase approximator of a trigger distribution.

Read this file after the derivation chapter; each piece maps to one line of the method.

* Testing function ``f(x)``: the backdoored model's softmax probability of the target class
  on clean images with trigger ``x`` pasted. The valid set for a threshold ``beta`` is
  ``X_beta = {x : f(x) > beta}``.
* Staircase: the trigger density is approximated by ``N`` steps; step ``i`` is the uniform
  (maximum-entropy) distribution on ``X_beta_i`` and is learned by a generator ``G_i``. The
  ensemble samples sub-model ``i`` with weight ``gamma_i``.
* Sub-model loss, with ``z ~ U[0,1)^64``::

      loss_i = -mean(min(f_hat(G_i(z) + noise), beta_i)) - alpha * DV_T(z, G_i(z))

  ``f_hat`` scores each trigger on one random image at one random location (an unbiased
  estimate of ``f`` at the noisy trigger; the hinge of it is biased low, chapter 4). The hinge
  ``min(f_hat, beta)`` stops pushing a sample once it scores above ``beta``; ``DV_T`` is the
  MINE estimate (:mod:`mesa_lib.mine`) of the mutual information between the noise and the
  samples, used as a push to spread the samples out. It stands in for the entropy of the
  samples, but for a deterministic generator the mutual information itself is infinite
  (chapter 5), so it is a heuristic, not a measurement of that entropy.
* All ``N`` sub-models are trained in one batched pass: their triggers go through one
  classifier forward and one backward, and the classifier is frozen (input gradients only).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .common import seeded
from .data import ImageSet
from .mine import MINE
from .triggers import stamp
from .validate import check_target, finite_number, image_tensor, num_classes, positive_int

__all__ = [
    "MesaConfig",
    "Generator",
    "StaircaseSampler",
    "ScoreFn",
    "classifier_score_fn",
    "StaircaseTrainer",
    "train_staircase",
    "train_mesa",
    "target_probability",
]

# score_fn(triggers [M*B, *shape], component [M*B]) -> f [M*B] in [0, 1]
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MesaConfig:
    """Settings of MESA; the defaults are the authors' (CIFAR-10). Frozen: make a changed copy
    with ``dataclasses.replace(config, steps=...)``."""

    betas: tuple[float, ...] = (0.5, 0.8, 0.9)
    """Thresholds of the staircase steps, one sub-model each."""
    gammas: tuple[float, ...] | None = None
    """Mixture weights of the sub-models (None: equal)."""
    alpha: float = 0.1
    """Weight of the entropy (mutual information) bonus."""
    noise_dim: int = 64
    """Dimension of the generator's uniform noise z (split in 4 quarters, one per layer)."""
    hidden: int = 512
    """Generator width (2048 for CIFAR-100 in the authors' code)."""
    mine_hidden: int = 512
    """Statistics network width."""
    lr: float = 2e-4
    """Adam learning rate of the generators."""
    mine_lr: float = 2e-4
    """Adam learning rate of the statistics networks."""
    adam_betas: tuple[float, float] = (0.5, 0.999)
    batch_size: int = 128
    """Triggers per sub-model per step."""
    steps: int = 625
    """Generator steps (authors: 10 epochs over the 8k modelling split at batch 128)."""
    trigger_noise: float = 0.1
    """Std of the Gaussian noise added to triggers in the classifier pass only."""
    ma_rate: float = 0.001
    """MINE moving-average rate."""
    log_every: int = 10
    """Record training curves every this many steps."""

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))  # NaN, inf fail the range check
        if not self.betas:
            raise ValueError("betas is empty: give at least one threshold, e.g. (0.5, 0.8, 0.9)")
        for b in self.betas:
            if not 0.0 < b < 1.0:
                raise ValueError(f"every beta must be in (0, 1): a softmax probability never exceeds 1, so "
                                 f"beta = 1 would ask for an empty valid set; got {b}")
        if self.gammas is not None:
            object.__setattr__(self, "gammas", tuple(_finite("gamma", g) for g in self.gammas))
            if len(self.gammas) != len(self.betas) or any(g < 0 for g in self.gammas) or sum(self.gammas) <= 0:
                raise ValueError(
                    f"gammas must be {len(self.betas)} non-negative weights with a positive sum, got {self.gammas}"
                )
        if _finite("alpha", self.alpha) < 0:
            raise ValueError(f"alpha must be >= 0 (0 turns the entropy bonus off), got {self.alpha}")
        for name in ("hidden", "mine_hidden", "batch_size", "steps", "log_every", "noise_dim"):
            positive_int(name, getattr(self, name))
        if self.noise_dim % 4:
            raise ValueError(f"noise_dim must be a positive multiple of 4, got {self.noise_dim}")
        for name in ("lr", "mine_lr"):
            finite_number(name, getattr(self, name), 0.0, strict=True)
        finite_number("trigger_noise", self.trigger_noise, 0.0)
        finite_number("ma_rate", self.ma_rate, 0.0, strict=True, maximum=1.0)
        if len(self.adam_betas) != 2 or not all(0.0 <= finite_number("adam_betas", b) < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")

    @property
    def weights(self) -> torch.Tensor:
        """Normalised mixture weights gamma."""
        g = torch.tensor(self.gammas if self.gammas is not None else [1.0] * len(self.betas))
        return g / g.sum()


def _finite(name: str, value: object) -> float:
    """``float(value)``, refusing NaN, inf and non-numbers with a one-line message."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"every {name} must be a finite number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"every {name} must be a finite number, got {value!r}")
    return x


class Generator(nn.Module):
    """G(z): 4 linear layers with BatchNorm + LeakyReLU(0.2); the noise is split in four
    quarters, one fed into each layer (skip inputs, for stability); sigmoid output in [0, 1]."""

    def __init__(self, out_shape: Sequence[int], noise_dim: int = 64, hidden: int = 512):
        super().__init__()
        self.out_shape = tuple(int(s) for s in out_shape)
        self.noise_dim = noise_dim
        q = noise_dim // 4
        out = math.prod(self.out_shape)

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(i, o), nn.BatchNorm1d(o), nn.LeakyReLU(0.2))

        self.l1 = block(q, hidden)
        self.l2 = block(hidden + q, hidden)
        self.l3 = block(hidden + q, hidden)
        self.l4 = nn.Linear(hidden + q, out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z1, z2, z3, z4 = z.chunk(4, dim=1)
        h = self.l1(z1)
        h = self.l2(torch.cat([h, z2], 1))
        h = self.l3(torch.cat([h, z3], 1))
        x = torch.sigmoid(self.l4(torch.cat([h, z4], 1)))
        return x.reshape(len(z), *self.out_shape)


class StaircaseSampler(nn.Module):
    """The trained staircase: ``N`` generators and their mixture weights ``gamma``.

    ``sample(n)`` draws ``n`` triggers from the mixture; ``sample_step(i, n)`` from step ``i``.
    """

    def __init__(self, trigger_shape: Sequence[int], config: MesaConfig, targets: Sequence[int] | None = None):
        super().__init__()
        self.config = config
        self.trigger_shape = tuple(int(s) for s in trigger_shape)
        self.targets = list(targets) if targets is not None else None
        self.generators = nn.ModuleList(
            Generator(self.trigger_shape, config.noise_dim, config.hidden) for _ in config.betas
        )
        self.register_buffer("gammas", config.weights)

    @property
    def betas(self) -> tuple[float, ...]:
        return self.config.betas

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        dev = self.gammas.device
        if generator is not None and generator.device != dev:
            return torch.rand(n, self.config.noise_dim, generator=generator, device=generator.device).to(dev)
        return torch.rand(n, self.config.noise_dim, generator=generator, device=dev)

    @torch.no_grad()
    def sample_step(self, i: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` triggers from sub-model ``i`` alone."""
        if not 0 <= i < len(self.generators):
            raise ValueError(f"step index must be in 0..{len(self.generators) - 1}, got {i}")
        g = self.generators[i]
        was = g.training
        g.eval()
        x = g(self.noise(n, generator))
        g.train(was)
        return x

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` triggers from the mixture: step ``i`` with probability ``gamma_i``."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        gam = self.gammas.to(generator.device) if generator is not None else self.gammas
        comp = torch.multinomial(gam, n, replacement=True, generator=generator).to(self.gammas.device)
        out = torch.empty(n, *self.trigger_shape, device=self.gammas.device)
        for i in range(len(self.generators)):
            # every step draws n (cheap MLPs), which keeps shapes static: no host sync
            out = torch.where(
                (comp == i).reshape(n, *[1] * len(self.trigger_shape)), self.sample_step(i, n, generator), out
            )
        return out

    def save(self, path: str | Path) -> Path:
        """Save weights (safetensors) with the config and targets as metadata."""
        from .models import save_weights

        meta = {"config": asdict(self.config), "trigger_shape": list(self.trigger_shape), "targets": self.targets}
        return save_weights(self, path, metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "StaircaseSampler":
        """Load a sampler written by :meth:`save`."""
        from safetensors import SafetensorError, safe_open

        from .models import load_weights

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no sampler file at {path}; train MESA first or check the path")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("mesa_lib", "{}"))
            config = MesaConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
        except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a sampler file written by StaircaseSampler.save ({err})") from None
        sampler = cls(meta["trigger_shape"], config, meta.get("targets")).to(device)
        load_weights(sampler, path)
        sampler.eval()
        return sampler


def target_probability(
    classifier: nn.Module, images: torch.Tensor, triggers: torch.Tensor, targets: torch.Tensor | int,
    locations: torch.Tensor | None = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``f``: softmax probability of ``targets`` for each image with its trigger stamped."""
    logits = classifier(stamp(images, triggers, locations, generator))
    probs = logits.softmax(1)
    if isinstance(targets, int):
        return probs[:, targets]
    return probs.gather(1, targets.reshape(-1, 1)).squeeze(1)


def classifier_score_fn(
    classifier: nn.Module, images: torch.Tensor, targets: torch.Tensor, trigger_noise: float = 0.1,
    generator: torch.Generator | None = None, cpu_chunk: int | None = 64,
) -> ScoreFn:
    """The testing function of a backdoored classifier, batched over sub-models.

    Each trigger is pasted (plus Gaussian noise of std ``trigger_noise``) at a random location
    on its own randomly drawn image; the result is the softmax probability of the target of
    the trigger's sub-model (``targets[component]``). ``images`` stay on the device.

    On the CPU the classifier pass runs in chunks of ``cpu_chunk`` images (measured: one pass
    over 3 x 64 stamped images was slower than three passes of 64, as the activations leave
    the cache); on a GPU it is one pass. The values and gradients are the same either way.
    """
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W] tensor, got shape {tuple(images.shape)}")
    device = images.device
    targets = targets.to(device)

    def score(triggers: torch.Tensor, component: torch.Tensor) -> torch.Tensor:
        n = len(triggers)
        idx = torch.randint(0, len(images), (n,), device=device, generator=generator)
        noisy = triggers + trigger_noise * torch.randn(triggers.shape, device=device, generator=generator)
        stamped, tgt = stamp(images[idx], noisy, generator=generator, check_finite=False), targets[component]
        if device.type != "cpu" or not cpu_chunk or n <= cpu_chunk:
            return _target_softmax(classifier(stamped), tgt)
        return torch.cat([_target_softmax(classifier(stamped[i:i + cpu_chunk]), tgt[i:i + cpu_chunk])
                          for i in range(0, n, cpu_chunk)])

    return score


def _target_softmax(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.softmax(1).gather(1, targets.reshape(-1, 1)).squeeze(1)


class StaircaseTrainer:
    """One optimisation step at a time for all staircase sub-models (see :func:`train_staircase`).

    ``step()`` draws ``batch_size`` noise vectors per sub-model, generates their triggers,
    scores all ``N * batch_size`` triggers in one call of ``score_fn`` and takes one Adam step
    on the sum of the sub-model losses (their parameters are disjoint, so this equals training
    each alone). Nothing in a step waits for the device: curves are kept as tensors.
    """

    def __init__(self, score_fn: ScoreFn, trigger_shape: Sequence[int], config: MesaConfig | None = None,
                 seed: int = 0, device: torch.device | str = "cpu", targets: Sequence[int] | None = None):
        self.device = device = torch.device(device)
        config = MesaConfig() if config is None else config
        self.score_fn, self.config = score_fn, config
        with seeded(seed):  # the networks' initial weights; the caller's random state is left alone
            self.sampler = StaircaseSampler(trigger_shape, config, targets)
            x_dim = math.prod(self.sampler.trigger_shape)
            self.mines = nn.ModuleList(
                MINE(config.noise_dim, x_dim, config.mine_hidden, config.ma_rate) for _ in range(len(config.betas))
            )
        self.sampler, self.mines = self.sampler.to(device), self.mines.to(device)
        self.M, self.B = len(config.betas), config.batch_size
        self.opt_g = torch.optim.Adam(self.sampler.generators.parameters(), lr=config.lr, betas=config.adam_betas)
        self.opt_t = torch.optim.Adam(self.mines.parameters(), lr=config.mine_lr, betas=config.adam_betas)
        self.betas = torch.tensor(config.betas, device=device)
        self.component = torch.arange(self.M, device=device).repeat_interleave(self.B)
        self.beta_per = self.betas[self.component]
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.steps_done = 0
        self._log: dict[str, list] = {"step": [], "f_mean": [], "valid_frac": [], "mi": []}
        self.sampler.train()

    def step(self) -> None:
        cfg, M, B, g = self.config, self.M, self.B, self.generator
        gens, mines = self.sampler.generators, self.mines
        z = torch.rand(M, B, cfg.noise_dim, device=self.device, generator=g)
        z_marg = torch.rand(M, B, cfg.noise_dim, device=self.device, generator=g)
        x = torch.stack([gen(z[i]) for i, gen in enumerate(gens)])  # [M, B, *shape]
        f = self.score_fn(x.reshape(M * B, *self.sampler.trigger_shape), self.component)  # one classifier pass
        hinge = torch.minimum(f, self.beta_per).reshape(M, B).mean(1)  # [M]: mean(min(f, beta_i))
        mi = torch.stack([mines[i].estimate(z[i], x[i], z_marg[i]) for i in range(M)])  # [M]: I(z; G_i(z))
        loss_g = -(hinge + cfg.alpha * mi).sum()
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        # T is trained on its own bias-corrected loss, on detached samples
        self.opt_t.zero_grad(set_to_none=True)
        xd = x.detach()
        loss_t = torch.stack([mines[i](z[i], xd[i], z_marg[i])[1] for i in range(M)]).sum()
        loss_t.backward()
        self.opt_g.step()
        self.opt_t.step()
        step = self.steps_done
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            fd = f.detach().reshape(M, B)
            self._log["step"].append(step)
            self._log["f_mean"].append(fd.mean(1))
            self._log["valid_frac"].append((fd > self.betas[:, None]).float().mean(1))
            self._log["mi"].append(mi.detach())
        self.steps_done += 1

    def history(self) -> dict:
        """Curves per logged step and sub-model: mean ``f``, fraction above ``beta``, MI estimate."""
        out = {"step": list(self._log["step"])}
        for k in ("f_mean", "valid_frac", "mi"):
            out[k] = torch.stack(self._log[k]).cpu().tolist() if self._log[k] else []
        return out


def train_staircase(
    score_fn: ScoreFn,
    trigger_shape: Sequence[int],
    config: MesaConfig | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    targets: Sequence[int] | None = None,
    progress: bool = True,
    desc: str = "MESA",
) -> tuple[StaircaseSampler, dict]:
    """Train all staircase sub-models together against a testing function.

    ``score_fn(triggers [N*B, *shape], component [N*B]) -> f [N*B]`` scores every sub-model's
    triggers in one call. Returns the sampler (in eval mode) and the training curves
    (:meth:`StaircaseTrainer.history`).
    """
    trainer = StaircaseTrainer(score_fn, trigger_shape, config, seed, device, targets)
    for _ in tqdm(range(trainer.config.steps), desc=desc, disable=not progress, leave=False):
        trainer.step()
    trainer.sampler.eval()
    return trainer.sampler, trainer.history()


def train_mesa(
    classifier: nn.Module,
    data: ImageSet | torch.Tensor,
    target: int,
    config: MesaConfig | None = None,
    trigger_shape: Sequence[int] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[StaircaseSampler, dict]:
    """Model the distribution of triggers that make ``classifier`` predict ``target``.

    ``data`` is the modelling split (images only are used). The classifier is frozen for the
    duration (eval mode, no weight gradients) and restored afterwards.

    Raises:
        ValueError: a bad target or config, images that are not float32, finite and in
            ``[0, 1]``, or a ``trigger_shape`` that is not ``(C, p, p)`` with 1 or the images'
            channels and ``p`` no larger than the images.
    """
    config = MesaConfig() if config is None else config
    if not isinstance(config, MesaConfig):
        raise ValueError(f"config must be a MesaConfig, got {type(config).__name__}")
    images = image_tensor(data, "MESA's images")
    device = next(classifier.parameters()).device
    images = images.to(device)
    n_classes = num_classes(classifier, images)
    many = isinstance(target, (list, tuple)) or (isinstance(target, torch.Tensor) and target.dim() > 0)
    targets = [check_target(t, n_classes) for t in (target if many else [target])]
    if trigger_shape is None:
        trigger_shape = (images.shape[1], 3, 3)
    if len(trigger_shape) != 3 or trigger_shape[1] != trigger_shape[2]:
        raise ValueError(f"trigger_shape must be (C, p, p), got {tuple(trigger_shape)}")
    for size in trigger_shape:
        positive_int("every trigger_shape entry", size)
    if trigger_shape[0] not in (1, images.shape[1]):
        raise ValueError(f"trigger_shape has {trigger_shape[0]} channels but the images have {images.shape[1]}; "
                         f"use 1 or {images.shape[1]}")
    if trigger_shape[-1] > images.shape[-1]:
        raise ValueError(f"trigger of size {trigger_shape[-1]} is larger than the images; use a smaller trigger")
    # one target per sub-model: a single target is shared by every step of the staircase
    per_step = torch.tensor(targets * len(config.betas) if len(targets) == 1 else targets, device=device)
    if len(per_step) != len(config.betas):
        raise ValueError(f"give one target, or one per beta ({len(config.betas)}), got {len(targets)}")
    with frozen(classifier):
        g = torch.Generator(device=device).manual_seed(seed + 1)
        score = classifier_score_fn(classifier, images, per_step, config.trigger_noise, generator=g)
        return train_staircase(score, trigger_shape, config, seed=seed, device=device,
                               targets=per_step.tolist(), progress=progress)


class frozen:
    """Context manager: a classifier in eval mode with ``requires_grad=False`` on its weights,
    so a backward pass computes input gradients only. Restores both on exit."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> nn.Module:
        self.training = self.model.training
        self.flags = [p.requires_grad for p in self.model.parameters()]
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc) -> None:
        for p, f in zip(self.model.parameters(), self.flags):
            p.requires_grad_(f)
        self.model.train(self.training)


