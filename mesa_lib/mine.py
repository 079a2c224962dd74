"""Mutual information neural estimation (MINE, Belghazi et al. 2018).

The Donsker-Varadhan (DV) representation gives a lower bound on mutual information for any
"statistics network" T:

    I(Z; X) >= E_{p(z,x)}[T(z, x)] - log E_{p(z)p(x)}[exp T(z, x)]

The first expectation is over matched pairs (z, G(z)); the second over mismatched pairs
(z', G(z)) with z' drawn independently. T is trained to maximise the bound; the gradient of
the log term is biased on mini-batches, so MINE replaces its denominator by a moving average
of E[exp T] (rate ``ma_rate``: 0.001 in :class:`MINE` and MESA's ``MesaConfig``, 0.01 in
:func:`train_mine`'s default). Everything here is computed in log space (``logsumexp``), so large
values of T never overflow.

The moving average is robust to one extreme batch: a batch's ``log mean exp T`` enters it
clipped at ``log_ma + log((1 + r) / r)``, so one batch can at most double the average (and
its loss term is clipped the same way). Without the clip, one batch of values around 1e6
raised the log-average by about 1e6 nats, which the rate-0.001 average then took about a
billion steps to forget (each step lowers it by at most ``-log(1 - r)``, about 1e-3 nats),
turning off the bias-corrected log term meanwhile. The clip is a ``torch.where`` that returns
the unclipped value bit for bit whenever a batch is below it, so normal batches are computed
exactly as before.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from .common import seeded

__all__ = ["StatisticsNetwork", "log_mean_exp", "dv_bound", "MINE", "max_batch_excess", "train_mine", "gaussian_mi"]


class StatisticsNetwork(nn.Module):
    """T(z, x): a z-branch and an x-branch linear layer summed, then two more layers
    (the authors' architecture: hidden 512, LeakyReLU 0.2)."""

    def __init__(self, z_dim: int, x_dim: int, hidden: int = 512):
        super().__init__()
        self.fz = nn.Linear(z_dim, hidden)
        self.fx = nn.Linear(x_dim, hidden)
        self.body = nn.Sequential(
            nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1)
        )

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.fz(z) + self.fx(x.flatten(1))).squeeze(1)


def log_mean_exp(t: torch.Tensor) -> torch.Tensor:
    """``log(mean(exp(t)))`` computed stably."""
    return torch.logsumexp(t, dim=0) - math.log(t.shape[0])


def dv_bound(t_joint: torch.Tensor, t_marginal: torch.Tensor) -> torch.Tensor:
    """The Donsker-Varadhan estimate ``mean(T_joint) - log mean exp(T_marginal)``."""
    return t_joint.mean() - log_mean_exp(t_marginal)


class MINE(nn.Module):
    """A statistics network with MINE's bias-corrected training loss.

    ``forward(z, x, z_marginal)`` returns ``(mi, t_loss)``: ``mi`` is the DV estimate
    (differentiable in ``x``, for a generator that wants to maximise it), ``t_loss`` is the
    loss that trains T, whose gradient uses the moving average of ``E[exp T]`` in place of the
    mini-batch mean (the bias correction). The moving average is kept in log space.
    """

    def __init__(self, z_dim: int, x_dim: int, hidden: int = 512, ma_rate: float = 0.001):
        super().__init__()
        if not 0.0 < ma_rate <= 1.0:
            raise ValueError(f"ma_rate must be in (0, 1], got {ma_rate}")
        self.T = StatisticsNetwork(z_dim, x_dim, hidden)
        self.ma_rate = ma_rate
        self.max_excess = max_batch_excess(ma_rate)
        self.register_buffer("log_ma", torch.tensor(float("nan")))

    def estimate(self, z: torch.Tensor, x: torch.Tensor, z_marginal: torch.Tensor) -> torch.Tensor:
        """The DV estimate alone (differentiable in ``x``), leaving the moving average as it
        is: the generator's pass uses this, so the average is updated once per training step
        (by :meth:`forward`, in T's own pass), as the authors do."""
        return dv_bound(self.T(z, x), self.T(z_marginal, x))

    def forward(self, z: torch.Tensor, x: torch.Tensor, z_marginal: torch.Tensor):
        t_joint = self.T(z, x)
        t_marg = self.T(z_marginal, x)
        lme = log_mean_exp(t_marg)
        mi = t_joint.mean() - lme
        # Bias-corrected surrogate: d/dtheta exp(lme - log_ma) = (E exp T / ma) * d lme
        #                                                     = d(E exp T) / ma.
        with torch.no_grad():
            # one extreme batch may at most double the average; a NaN average (first step)
            # or a NaN batch compares False, so those pass through unchanged
            cap = self.log_ma + self.max_excess
            clip = lme.detach() > cap
            cur = torch.where(clip, cap, lme.detach())
            r = self.ma_rate
            keep = math.log1p(-r) if r < 1.0 else -math.inf  # rate 1: the average is the current value
            new = torch.logaddexp(self.log_ma + keep, cur + math.log(r))
            # first step: start the average at the current value (no branch, no host sync)
            self.log_ma.copy_(torch.where(torch.isnan(self.log_ma), cur, new))
        lme_t = torch.where(clip, cap, lme)  # the same clip in T's loss (bitwise lme when not clipped)
        t_loss = -(t_joint.mean() - torch.exp(lme_t - self.log_ma.detach()))
        return mi, t_loss


def max_batch_excess(ma_rate: float) -> float:
    """How far (in nats) a batch's ``log mean exp T`` may exceed the log moving average.

    ``log((1 + r) / r)``: at that value one update of rate ``r`` exactly doubles the average,
    ``(1 - r) * ma + r * ma * (1 + r) / r = 2 * ma`` (6.9 nats for the default rate 0.001,
    4.6 for 0.01). With rate 1 the average *is* the batch, so nothing is clipped (``inf``).
    """
    if not 0.0 < ma_rate <= 1.0:
        raise ValueError(f"ma_rate must be in (0, 1], got {ma_rate}")
    return math.inf if ma_rate >= 1.0 else math.log1p(ma_rate) - math.log(ma_rate)


def train_mine(
    sample: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]],
    z_dim: int,
    x_dim: int,
    steps: int = 1000,
    batch_size: int = 256,
    hidden: int = 128,
    lr: float = 1e-3,
    ma_rate: float = 0.01,
    seed: int = 0,
    eval_batch: int = 4096,
) -> tuple[float, list[float]]:
    """Estimate I(Z; X) from a sampler ``sample(n, generator) -> (z, x)`` of joint pairs.

    Returns the final estimate on a large fresh batch, and the per-step training estimates.
    Marginal pairs are made by shuffling x against z.
    """
    g = torch.Generator().manual_seed(seed)
    with seeded(seed):  # initial weights; the caller's random state is left alone
        mine = MINE(z_dim, x_dim, hidden, ma_rate)
    opt = torch.optim.Adam(mine.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        z, x = sample(batch_size, g)
        z_marg = z[torch.randperm(batch_size, generator=g)]
        mi, loss = mine(z, x, z_marg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(mi.detach())
    with torch.no_grad():
        z, x = sample(eval_batch, g)
        est = dv_bound(mine.T(z, x), mine.T(z[torch.randperm(eval_batch, generator=g)], x)).item()
    return est, torch.stack(history).tolist()


def gaussian_mi(rho: float, dim: int = 1) -> float:
    """Analytic I(Z; X) in nats for ``dim`` independent pairs of standard normals with correlation ``rho``."""
    if not -1.0 < rho < 1.0:
        raise ValueError(f"rho must be in (-1, 1), got {rho}")
    return -0.5 * dim * math.log(1.0 - rho * rho)
