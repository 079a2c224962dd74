"""The pieces of chapter 9's evidence: MINE's moving average updated once per step, true
medians, the residual valid set, the target's recall, the random-patch control and the
book's one decision rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mesa_lib.common import median
from mesa_lib.data import ImageSet
from mesa_lib.detect import FLAG_ASR, FLAG_INDEX, RULE, DetectionResult, anomaly_index_of_top, is_flagged
from mesa_lib.evaluate import residual_summary, residual_valid_set, target_recall
from mesa_lib.mesa import MesaConfig, StaircaseTrainer
from mesa_lib.neural_cleanse import anomaly_index
from mesa_lib.toy import ToyLandscape
from mesa_lib.triggers import NUM_PATTERNS, UniformNoiseTrigger


class Constant(nn.Module):
    """Always predicts ``cls``."""

    def __init__(self, cls: int, n: int = 10):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.cls, self.n = cls, n

    def forward(self, x):
        out = torch.zeros(len(x), self.n) + 0 * self.w
        out[:, self.cls] = 1.0
        return out


class WhiteCorner(nn.Module):
    """Predicts 0 when a 3x3 white patch is stamped (any pixel == 1 on a 0.5 image) -- a
    backdoor fired by every pattern with a white pixel -- else 1."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        hit = (x.flatten(1) == 1.0).any(1).float()
        out = torch.zeros(len(x), 10) + 0 * self.w
        out[:, 0] = hit
        out[:, 1] = 1 - hit
        return out


def _grey(n=12, label=3):
    return ImageSet(torch.full((n, 1, 8, 8), 0.5), torch.full((n,), label))


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    assert float(median(torch.tensor([4.0, 1.0, 3.0, 2.0]))) == 2.5
    assert float(median(torch.tensor([3.0, 1.0, 2.0]))) == 2.0
    with pytest.raises(ValueError):
        median(torch.tensor([]))
    # the scan's anomaly index over 10 classes uses it (torch.median would take 0.02 here)
    asr = torch.tensor([0.9, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09])
    top, idx = anomaly_index_of_top(asr)
    a = asr.double()
    med = (a.sort().values[4] + a.sort().values[5]) / 2  # 0.05 and 0.06
    mad = float(median((a - med).abs())) * 1.4826
    assert top == 0 and idx == pytest.approx(float((a[0] - med) / mad))
    assert float(med) == pytest.approx(0.055)
    # Neural Cleanse's index too
    norms = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert anomaly_index(norms)[0] == pytest.approx(abs(1.0 - 2.5) / (1.4826 * 1.0))


def test_one_decision_rule():
    assert "50%" in RULE and FLAG_ASR == 0.5 and FLAG_INDEX == 2.0
    assert is_flagged([0.9, 0.0, 0.0], 3.0) and not is_flagged([0.4, 0.0, 0.0], 30.0)
    assert not is_flagged([0.9, 0.8, 0.0], 1.5)
    r = DetectionResult([0.9] + [0.0] * 9, 0, 50.0)
    assert r.flagged and r.to_dict()["flagged"] is True


def test_mine_moving_average_updated_once_per_step(monkeypatch):
    from mesa_lib import mine as mine_mod

    calls = []
    forward = mine_mod.MINE.forward

    def counting(self, *a, **k):
        calls.append(1)
        return forward(self, *a, **k)

    monkeypatch.setattr(mine_mod.MINE, "forward", counting)
    cfg = MesaConfig(betas=(0.5, 0.8), hidden=8, mine_hidden=8, noise_dim=4, batch_size=8, steps=3)
    trainer = StaircaseTrainer(ToyLandscape().score_fn(), (2,), cfg, seed=0)
    before = [m.log_ma.clone() for m in trainer.mines]
    trainer.step()
    assert len(calls) == 2, "one moving-average update per sub-model and step (T's own pass)"
    assert all(torch.isnan(b) for b in before) and all(torch.isfinite(m.log_ma) for m in trainer.mines)
    # the generator's estimate leaves the average alone
    m = trainer.mines[0]
    z, x = torch.rand(8, 4), torch.rand(8, 2)
    ma = m.log_ma.clone()
    m.estimate(z, x, torch.rand(8, 4))
    assert torch.equal(ma, m.log_ma)


def test_residual_valid_set_and_summary():
    model = WhiteCorner()
    data = _grey()
    asr = residual_valid_set(model, data, target=0, n_images=5)
    assert asr.shape == (NUM_PATTERNS,)
    assert float(asr[0]) == 0.0 and bool((asr[1:] == 1.0).all())  # pattern 0 is all black
    s = residual_summary(asr, fired_before=[0, 1, 2, 3])
    assert s == {"fired": 511, "mean_fired_before": 0.75, "max": 1.0}
    assert residual_summary(torch.zeros(NUM_PATTERNS), [])["mean_fired_before"] == 0.0
    with pytest.raises(ValueError):
        residual_valid_set(model, data, target=0, n_images=0)


def test_target_recall_shows_a_suppressed_class():
    data = ImageSet(torch.full((6, 1, 8, 8), 0.5), torch.tensor([0, 0, 1, 2, 0, 3]))
    assert target_recall(Constant(0), data, 0) == 1.0
    assert target_recall(Constant(1), data, 0) == 0.0  # never says 0: its ASR would look perfect
    with pytest.raises(ValueError, match="no image of the target class"):
        target_recall(Constant(0), data, 9)


def test_uniform_noise_trigger():
    s = UniformNoiseTrigger(3)
    a = s.sample(5, generator=torch.Generator().manual_seed(1))
    b = s.sample(5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (5, 3, 3, 3) and torch.equal(a, b) and 0 <= float(a.min()) and float(a.max()) <= 1
    assert not torch.equal(a[0], a[1])
    with pytest.raises(ValueError):
        UniformNoiseTrigger(0)
