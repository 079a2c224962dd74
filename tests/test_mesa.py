"""Tests of mesa_lib.mesa: the staircase on a toy whose valid sets are known exactly,
determinism, batching of the sub-models, the sampler's mixture and its file format."""

from __future__ import annotations

import math

import pytest
import torch

from mesa_lib.mesa import MesaConfig, StaircaseSampler, frozen, train_mesa, train_staircase
from mesa_lib.models import build_model
from mesa_lib.toy import ToyLandscape, staircase_quality

TOY_CONFIG = dict(hidden=128, mine_hidden=128, steps=1000, batch_size=128, lr=2e-4, mine_lr=1e-3, noise_dim=8)
N_SAMPLES = 2000


def _in_set_entropy(samples: torch.Tensor, land: ToyLandscape, beta: float, grid: int = 25) -> float:
    """Entropy (nats) of the samples inside X_beta over the cells of a grid: log(#cells) when
    they spread uniformly, lower when they pile up in a few cells."""
    s = samples.reshape(-1, 2)
    s = s[land.f(s) > beta]
    cell = (s.clamp(0, 1 - 1e-6) * grid).long()
    counts = torch.bincount(cell[:, 1] * grid + cell[:, 0], minlength=grid * grid).float()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def _toy_run(alpha: float, betas=(0.5, 0.8, 0.9), seed: int = 0):
    land = ToyLandscape()
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small MLPs: one thread is fastest (and robust on a busy machine)
    try:
        cfg = MesaConfig(betas=betas, alpha=alpha, **TOY_CONFIG)
        sampler, history = train_staircase(land.score_fn(), (2,), cfg, seed=seed, progress=False)
    finally:
        torch.set_num_threads(before)
    g = torch.Generator().manual_seed(123)
    samples = [sampler.sample_step(i, N_SAMPLES, generator=g) for i in range(len(betas))]
    return land, sampler, history, samples


@pytest.fixture(scope="module")
def toy_mesa():
    """The staircase (alpha 0.1, betas 0.5/0.8/0.9) trained on the toy landscape (~15 s)."""
    return _toy_run(alpha=0.1)


def test_toy_staircase_precision_and_coverage(toy_mesa):
    land, sampler, history, samples = toy_mesa
    report = []
    for beta, s in zip(sampler.betas, samples):
        q = staircase_quality(s, land, beta)
        report.append(f"beta {beta}: precision {q['precision']:.2f} coverage {q['coverage']:.2f}")
        assert q["valid_cells"] > 0
        # measured (seeds 0-2): precision 0.83-0.92, coverage 0.60-1.00
        assert q["precision"] >= 0.7, report
        assert q["coverage"] >= 0.5, report
    print("; ".join(report))
    # the training curves say the same: most samples of each step end above its beta
    assert all(v > 0.6 for v in history["valid_frac"][-1])


def test_toy_steps_are_nested(toy_mesa):
    """Higher thresholds give samples with higher f (the staircase goes up)."""
    land, sampler, _, samples = toy_mesa
    means = [float(land.f(s).mean()) for s in samples]
    assert means[0] < means[1] < means[2]


def test_toy_alpha_zero_collapses(toy_mesa):
    """Without the entropy bonus the samples pile up: less of X_0.5 is covered and the
    in-set histogram has a clearly lower entropy (measured over seeds 0-3: entropy 2.4-2.6
    nats for alpha 0 vs 3.1-3.7 for alpha 0.1; coverage 0.36-0.51 vs 0.58-0.86)."""
    land, _, _, samples = toy_mesa
    _, _, _, collapsed = _toy_run(alpha=0.0, betas=(0.5,))
    spread_q = staircase_quality(samples[0], land, 0.5)
    collapsed_q = staircase_quality(collapsed[0], land, 0.5)
    h_spread = _in_set_entropy(samples[0], land, 0.5)
    h_collapsed = _in_set_entropy(collapsed[0], land, 0.5)
    print(f"alpha 0.1: coverage {spread_q['coverage']:.2f} entropy {h_spread:.2f}; "
          f"alpha 0: coverage {collapsed_q['coverage']:.2f} entropy {h_collapsed:.2f}")
    assert collapsed_q["coverage"] < spread_q["coverage"]
    assert h_collapsed < h_spread - 0.3
    assert h_spread <= math.log(spread_q["valid_cells"]) + 1e-6


# ---------------------------------------------------------------- mechanics (tiny configs)

TINY = dict(hidden=16, mine_hidden=16, noise_dim=8, batch_size=16, steps=5, log_every=1)


def test_train_staircase_deterministic(torch_single_thread):
    land = ToyLandscape()
    cfg = MesaConfig(**TINY)
    a, ha = train_staircase(land.score_fn(), (2,), cfg, seed=7, progress=False)
    b, hb = train_staircase(land.score_fn(), (2,), cfg, seed=7, progress=False)
    c, _ = train_staircase(land.score_fn(), (2,), cfg, seed=8, progress=False)
    sa = a.sample(64, generator=torch.Generator().manual_seed(0))
    sb = b.sample(64, generator=torch.Generator().manual_seed(0))
    sc = c.sample(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sa, sb)
    assert ha == hb
    assert not torch.equal(sa, sc)


def test_all_sub_models_scored_in_one_call_per_step(torch_single_thread):
    land = ToyLandscape()
    calls = []

    def counting(x, component):
        calls.append((tuple(x.shape), component.clone()))
        return land.f(x)

    cfg = MesaConfig(betas=(0.3, 0.5, 0.7, 0.9), **TINY)
    train_staircase(counting, (2,), cfg, seed=0, progress=False)
    M, B = 4, cfg.batch_size
    assert len(calls) == cfg.steps
    for shape, comp in calls:
        assert shape == (M * B, 2)
        assert torch.equal(comp, torch.arange(M).repeat_interleave(B))


def test_history_shapes(torch_single_thread):
    cfg = MesaConfig(betas=(0.5, 0.9), **TINY)
    _, h = train_staircase(ToyLandscape().score_fn(), (2,), cfg, seed=0, progress=False)
    assert h["step"] == list(range(cfg.steps))
    for k in ("f_mean", "valid_frac", "mi"):
        assert len(h[k]) == cfg.steps and all(len(row) == 2 for row in h[k])


def _constant_sampler(gammas, values=(0.1, 0.5, 0.9)) -> StaircaseSampler:
    """A sampler whose step i always outputs the constant values[i] (to identify it)."""
    cfg = MesaConfig(betas=(0.5, 0.8, 0.9), gammas=gammas, hidden=8, noise_dim=8)
    s = StaircaseSampler((1, 3, 3), cfg)
    with torch.no_grad():
        for gen, v in zip(s.generators, values):
            gen.l4.weight.zero_()
            gen.l4.bias.fill_(math.log(v / (1 - v)))
    return s.eval()


def test_sample_follows_gammas():
    values = (0.1, 0.5, 0.9)
    x = _constant_sampler((1, 0, 0)).sample(500, generator=torch.Generator().manual_seed(0))
    assert x.shape == (500, 1, 3, 3)
    assert torch.allclose(x, torch.full_like(x, values[0]), atol=1e-6), "gammas (1,0,0): all from step 0"

    n = 20000
    x = _constant_sampler((0.2, 0.3, 0.5)).sample(n, generator=torch.Generator().manual_seed(0))
    step = torch.stack([(x[:, 0, 0, 0] - v).abs() < 1e-5 for v in values]).float()
    assert bool((step.sum(0) == 1).all()), "every sample comes from exactly one step"
    fractions = (step.sum(1) / n).tolist()
    assert fractions == pytest.approx([0.2, 0.3, 0.5], abs=0.015)
    # equal weights by default
    x = _constant_sampler(None).sample(n, generator=torch.Generator().manual_seed(1))
    fractions = [float(((x[:, 0, 0, 0] - v).abs() < 1e-5).float().mean()) for v in values]
    assert fractions == pytest.approx([1 / 3] * 3, abs=0.015)


def test_sampler_save_load_round_trip(tmp_path, torch_single_thread):
    cfg = MesaConfig(betas=(0.5, 0.9), gammas=(0.25, 0.75), **TINY)
    s, _ = train_staircase(ToyLandscape().score_fn(), (2,), cfg, seed=0, targets=[3, 3], progress=False)
    path = s.save(tmp_path / "s.safetensors")
    t = StaircaseSampler.load(path)
    assert t.config == s.config and t.targets == [3, 3] and t.trigger_shape == (2,)
    assert torch.allclose(t.gammas, torch.tensor([0.25, 0.75]))
    for i in range(2):
        a = s.sample_step(i, 32, generator=torch.Generator().manual_seed(i))
        b = t.sample_step(i, 32, generator=torch.Generator().manual_seed(i))
        assert torch.equal(a, b)
    assert torch.equal(s.sample(50, generator=torch.Generator().manual_seed(9)),
                       t.sample(50, generator=torch.Generator().manual_seed(9)))


# ---------------------------------------------------------------- on a classifier


def test_train_mesa_leaves_classifier_untouched(torch_single_thread):
    torch.manual_seed(0)
    clf = build_model("small_cnn", 1, 10, 12, width=4).train()
    flags_before = [p.requires_grad for p in clf.parameters()]
    state = {k: v.clone() for k, v in clf.state_dict().items()}
    images = torch.rand(20, 1, 12, 12)
    cfg = MesaConfig(betas=(0.5, 0.8), **TINY)
    sampler, hist = train_mesa(clf, images, target=4, config=cfg, seed=0, progress=False)
    assert clf.training and [p.requires_grad for p in clf.parameters()] == flags_before
    for k, v in clf.state_dict().items():
        assert torch.equal(v, state[k]), f"train_mesa changed the classifier ({k})"
    assert sampler.targets == [4, 4] and sampler.trigger_shape == (1, 3, 3)
    x = sampler.sample(10)
    assert x.shape == (10, 1, 3, 3) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert len(hist["f_mean"]) == cfg.steps


def test_frozen_context():
    m = build_model("small_cnn", 1, 10, 12, width=4).train()
    with frozen(m):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert m.training and all(p.requires_grad for p in m.parameters())
