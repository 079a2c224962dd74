"""A low-dimensional toy whose valid sets are known exactly.

Triggers are points ``x`` in the unit square; the "backdoored model" is an analytic testing
function: a sum of Gaussian bumps, capped at 1,

    f(x) = min(1, sum_k h_k * exp(-|x - c_k|^2 / (2 s_k^2)))

so every valid set ``X_beta = {f > beta}`` can be drawn and measured on a grid. MESA trained
on this ``f`` (the same :func:`~mesa_lib.mesa.train_staircase` as on images) should put its
step-``i`` samples inside ``X_beta_i`` (precision) and spread them over all of it (coverage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .mesa import ScoreFn

__all__ = ["ToyLandscape", "staircase_quality", "bump_coverage", "gibbs_optimum"]


@dataclass
class ToyLandscape:
    """Gaussian bumps on the unit square: centres ``[K, 2]``, widths ``[K]``, heights ``[K]``."""

    centers: tuple[tuple[float, float], ...] = ((0.3, 0.3), (0.72, 0.65))
    widths: tuple[float, ...] = (0.12, 0.08)
    heights: tuple[float, ...] = (1.0, 1.0)

    def f(self, x: torch.Tensor) -> torch.Tensor:
        """Testing function for points ``[..., 2]``."""
        c = torch.tensor(self.centers, dtype=x.dtype, device=x.device)
        s = torch.tensor(self.widths, dtype=x.dtype, device=x.device)
        h = torch.tensor(self.heights, dtype=x.dtype, device=x.device)
        d2 = ((x[..., None, :] - c) ** 2).sum(-1)
        return (h * torch.exp(-d2 / (2 * s ** 2))).sum(-1).clamp(max=1.0)

    def score_fn(self) -> ScoreFn:
        """The testing function in the form :func:`~mesa_lib.mesa.train_staircase` takes."""
        return lambda x, component: self.f(x)

    def grid(self, n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell centres ``[n*n, 2]`` of an n x n grid over the square and ``f`` on them."""
        t = (torch.arange(n) + 0.5) / n
        pts = torch.stack(torch.meshgrid(t, t, indexing="xy"), -1).reshape(-1, 2)
        return pts, self.f(pts)


def _cells_hit(samples: torch.Tensor, landscape: ToyLandscape, beta: float, grid: int):
    """For samples against ``X_beta`` on a ``grid x grid`` grid: which samples lie inside, the
    cell centres, which cells' centres lie in ``X_beta``, and which cells hold a sample inside."""
    s = samples.detach().cpu().reshape(-1, 2)
    inside = landscape.f(s) > beta
    pts, fv = landscape.grid(grid)
    cell = (s[inside].clamp(0, 1 - 1e-6) * grid).long()
    hit = torch.zeros(grid * grid, dtype=torch.bool)
    hit[cell[:, 1] * grid + cell[:, 0]] = True
    return inside, pts, fv > beta, hit


def staircase_quality(samples: torch.Tensor, landscape: ToyLandscape, beta: float, grid: int = 25) -> dict:
    """Precision and coverage of samples against the exact valid set ``X_beta``.

    * precision: fraction of samples with ``f(x) > beta``;
    * coverage: fraction of the grid cells whose centre lies in ``X_beta`` that hold at
      least one sample inside ``X_beta`` (how much of the set the samples spread over).
    """
    inside, pts, valid_cells, hit = _cells_hit(samples, landscape, beta, grid)
    covered = (hit & valid_cells).sum().item()
    return {
        "beta": beta,
        "precision": inside.float().mean().item(),
        "coverage": covered / max(valid_cells.sum().item(), 1),
        "valid_cells": int(valid_cells.sum().item()),
    }


def gibbs_optimum(
    landscape: ToyLandscape, beta: float, alpha: float | torch.Tensor, n: int = 300
) -> dict[str, torch.Tensor]:
    """The exact minimiser of the sub-model objective on the toy, on an ``n x n`` grid.

    Over all densities ``p`` on the unit square, ``-E_p[min(f, beta)] - alpha * H(p)`` is
    minimised by the Gibbs density ``q(x) = exp(min(f(x), beta) / alpha) / Z`` (flat on
    ``X_beta``, with mass outside it; the book's chapter 4 proves it). ``alpha`` may be a float or a 1-D tensor of values
    ``[A]`` (all computed at once); ``alpha = 0`` gives the limit, the uniform density on
    ``{f >= beta}``. Returns, with a leading ``[A]`` axis when ``alpha`` is a tensor:

    * ``density``: ``q`` at the ``n * n`` cell centres of :meth:`ToyLandscape.grid`
      (per unit area, so ``density.mean() == 1``);
    * ``mass_inside``: ``int_{X_beta} q``, the share of the optimum inside the valid set;
    * ``entropy``: the differential entropy ``H(q)`` in nats (``log |X_beta|`` at ``alpha = 0``);
    * ``objective``: the minimum ``-E_q[min(f, beta)] - alpha H(q)`` (``= -alpha log Z``).

    Integrals are midpoint sums over the grid (each cell has area ``1 / n^2``), computed in
    float64 and in log space, so small ``alpha`` never overflows.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) (X_1 is empty since f <= 1), got {beta}")
    a = torch.as_tensor(alpha, dtype=torch.float64)
    scalar = a.dim() == 0
    a = a.reshape(-1)
    if (a < 0).any() or not torch.isfinite(a).all():
        raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
    _, fv = landscape.grid(n)
    hinge = torch.minimum(fv.double(), torch.tensor(beta, dtype=torch.float64))  # [n*n]
    inside = fv > beta
    if not bool((fv >= beta).any()):
        raise ValueError(f"no grid point has f >= beta = {beta}: the valid set is empty on this grid")
    # log q up to a constant: (min(f, beta) - beta) / alpha, 0 on {f >= beta} (shifting by
    # beta / alpha keeps small alpha finite); alpha = 0 -> 0 on {f >= beta}, -inf off it
    top = hinge >= beta
    safe = torch.where(a > 0, a, torch.ones_like(a))[:, None]
    logits = torch.where(a[:, None] > 0, (hinge - beta) / safe,
                         torch.where(top, 0.0, -torch.inf).expand(len(a), -1))  # [A, n*n]
    cells = hinge.numel()
    log_z = torch.logsumexp(logits, 1) - math.log(cells)  # log of the integral of exp(logits)
    log_q = logits - log_z[:, None]  # log density per unit area
    q = log_q.exp()
    e_hinge = (q * hinge).mean(1)
    entropy = -(q * torch.where(q > 0, log_q, torch.zeros_like(log_q))).mean(1)
    out = {
        "density": q,
        "mass_inside": (q * inside).mean(1),
        "entropy": entropy,
        "objective": -e_hinge - a * entropy,
    }
    return {k: v[0] if scalar else v for k, v in out.items()}


def bump_coverage(samples: torch.Tensor, landscape: ToyLandscape, beta: float, grid: int = 25) -> list[float]:
    """Coverage of ``X_beta`` bump by bump: for each bump ``k``, the fraction of the grid cells
    of ``X_beta`` nearest to its centre that hold at least one sample inside ``X_beta``.

    ``staircase_quality``'s coverage pools the bumps, so a generator that fills one disc of a
    two-disc set can pass a pooled threshold; this tells the discs apart (``nan`` for a bump
    whose disc holds no cell of ``X_beta``).
    """
    inside, pts, valid_cells, hit = _cells_hit(samples, landscape, beta, grid)
    c = torch.tensor(landscape.centers, dtype=pts.dtype)
    nearest = ((pts[:, None, :] - c) ** 2).sum(-1).argmin(1)  # [grid*grid]
    out = []
    for k in range(len(c)):
        mine = valid_cells & (nearest == k)
        n_k = mine.sum().item()
        out.append((hit & mine).sum().item() / n_k if n_k else float("nan"))
    return out
