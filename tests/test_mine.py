"""Tests of mesa_lib.mine: the DV bound, its numerics, the moving average, and the estimate
against the analytic mutual information of correlated Gaussians."""

from __future__ import annotations

import math

import pytest
import torch

from mesa_lib.mine import MINE, dv_bound, gaussian_mi, log_mean_exp, train_mine


def _gaussian_pairs(rho: float, dim: int):
    def sample(n: int, g: torch.Generator):
        z = torch.randn(n, dim, generator=g)
        x = rho * z + math.sqrt(1 - rho * rho) * torch.randn(n, dim, generator=g)
        return z, x

    return sample


def test_gaussian_mi_formula():
    assert gaussian_mi(0.0) == 0.0
    assert gaussian_mi(0.9, 2) == pytest.approx(-math.log(1 - 0.81))
    assert gaussian_mi(-0.5, 3) == pytest.approx(3 * gaussian_mi(0.5))
    for bad in (1.0, -1.0, 1.5):
        with pytest.raises(ValueError, match="rho"):
            gaussian_mi(bad)


def test_mine_estimates_correlated_gaussians(torch_single_thread):
    truth = gaussian_mi(0.9, 2)  # 1.66 nats
    est, history = train_mine(_gaussian_pairs(0.9, 2), 2, 2, steps=500, seed=0)
    assert len(history) == 500 and all(math.isfinite(h) for h in history)
    assert est == pytest.approx(truth, rel=0.15)
    assert est < truth * 1.05, "a DV lower bound should not clearly exceed the truth"


def test_mine_independent_is_near_zero(torch_single_thread):
    est, _ = train_mine(_gaussian_pairs(0.0, 2), 2, 2, steps=300, seed=0)
    assert abs(est) < 0.1


def test_log_mean_exp_stable_for_large_values():
    t = torch.tensor([1e4, 1e4 + 1.0, 1e4 - 2.0, 1e4 + 0.5], dtype=torch.float32)
    naive = torch.log(torch.exp(t).mean())
    assert not torch.isfinite(naive)  # the naive formula overflows here
    lme = log_mean_exp(t)
    expected = 1e4 + math.log(sum(math.exp(v) for v in (0.0, 1.0, -2.0, 0.5)) / 4)
    assert torch.isfinite(lme) and float(lme) == pytest.approx(expected, abs=1e-2)
    # and for very negative values (underflow side)
    assert float(log_mean_exp(-t)) == pytest.approx(-1e4 + math.log(sum(math.exp(-v) for v in (0.0, 1.0, -2.0, 0.5)) / 4), abs=1e-2)


def test_dv_bound_large_values_finite():
    j = torch.full((8,), 2e4)
    m = torch.full((8,), 1e4)
    assert float(dv_bound(j, m)) == pytest.approx(1e4)


def test_mine_forward_finite_with_large_T():
    torch.manual_seed(0)
    mine = MINE(3, 4, hidden=16, ma_rate=0.01)
    with torch.no_grad():
        mine.T.body[-1].bias.fill_(1e4)  # T ~ 1e4 everywhere: exp(T) overflows float32
    z, x, zm = torch.rand(32, 3), torch.rand(32, 4, requires_grad=True), torch.rand(32, 3)
    mi, t_loss = mine(z, x, zm)
    assert torch.isfinite(mi) and torch.isfinite(t_loss) and torch.isfinite(mine.log_ma)
    t_loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in mine.parameters())


def test_moving_average_starts_at_first_value_then_updates():
    torch.manual_seed(0)
    r = 0.1
    mine = MINE(2, 2, hidden=8, ma_rate=r)
    assert torch.isnan(mine.log_ma)
    z, x, zm = torch.randn(16, 2), torch.randn(16, 2), torch.randn(16, 2)
    mine(z, x, zm)
    first = log_mean_exp(mine.T(zm, x)).detach()
    assert float(mine.log_ma) == pytest.approx(float(first), abs=1e-6)
    z2, x2, zm2 = torch.randn(16, 2), torch.randn(16, 2), torch.randn(16, 2)
    mine(z2, x2, zm2)
    second = log_mean_exp(mine.T(zm2, x2)).detach()
    expected = math.log((1 - r) * math.exp(float(first)) + r * math.exp(float(second)))
    assert float(mine.log_ma) == pytest.approx(expected, abs=1e-5)


def test_bias_corrected_gradient():
    """With rate 1 the average is the current batch: T's loss gradient is the DV gradient;
    with a smaller rate the log term's gradient is divided by the average instead."""
    torch.manual_seed(0)
    z, x, zm = torch.randn(16, 2), torch.randn(16, 2), torch.randn(16, 2)
    mine = MINE(2, 2, hidden=8, ma_rate=1.0)
    mi, t_loss = mine(z, x, zm)
    g_loss = torch.autograd.grad(t_loss, list(mine.parameters()), retain_graph=True)
    g_dv = torch.autograd.grad(-mi, list(mine.parameters()))
    for a, b in zip(g_loss, g_dv):
        assert torch.allclose(a, b, atol=1e-6)

    # ma fixed at a known value: d/dtheta t_loss = -d mean T_joint + d mean exp(T_marg) / ma
    mine2 = MINE(2, 2, hidden=8, ma_rate=1e-9)
    mine2.load_state_dict(mine.state_dict())
    mine2.log_ma.fill_(math.log(3.0))
    _, t_loss2 = mine2(z, x, zm)
    params = list(mine2.parameters())
    g2 = torch.autograd.grad(t_loss2, params)
    ref = -mine2.T(z, x).mean() + torch.exp(mine2.T(zm, x)).mean() / 3.0
    g_ref = torch.autograd.grad(ref, params)
    for a, b in zip(g2, g_ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_mine_bad_rate():
    with pytest.raises(ValueError, match="ma_rate"):
        MINE(2, 2, ma_rate=0.0)
