"""A low-dimensional toy whose valid sets are known exactly.

Triggers are points ``x`` in the unit square; the "backdoored model" is an analytic testing
function: a sum of Gaussian bumps, capped at 1,

    f(x) = min(1, sum_k h_k * exp(-|x - c_k|^2 / (2 s_k^2)))

so every valid set ``X_beta = {f > beta}`` can be drawn and measured on a grid. MESA trained
on this ``f`` (the same :func:`~mesa_lib.mesa.train_staircase` as on images) should put its
step-``i`` samples inside ``X_beta_i`` (precision) and spread them over all of it (coverage).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .mesa import ScoreFn

__all__ = ["ToyLandscape", "staircase_quality"]


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


def staircase_quality(samples: torch.Tensor, landscape: ToyLandscape, beta: float, grid: int = 25) -> dict:
    """Precision and coverage of samples against the exact valid set ``X_beta``.

    * precision: fraction of samples with ``f(x) > beta``;
    * coverage: fraction of the grid cells whose centre lies in ``X_beta`` that hold at
      least one sample inside ``X_beta`` (how much of the set the samples spread over).
    """
    s = samples.detach().cpu().reshape(-1, 2)
    inside = landscape.f(s) > beta
    pts, fv = landscape.grid(grid)
    valid_cells = fv > beta
    cell = (s[inside].clamp(0, 1 - 1e-6) * grid).long()
    hit = torch.zeros(grid * grid, dtype=torch.bool)
    hit[cell[:, 1] * grid + cell[:, 0]] = True
    covered = (hit & valid_cells).sum().item()
    return {
        "beta": beta,
        "precision": inside.float().mean().item(),
        "coverage": covered / max(valid_cells.sum().item(), 1),
        "valid_cells": int(valid_cells.sum().item()),
    }
