"""The attack's and the defense's batch transforms, and the attack end to end on a tiny model."""

from __future__ import annotations

import pytest
import torch

from mesa_lib.attack import inject_backdoor, poison_transform
from mesa_lib.data import ImageSet
from mesa_lib.defense import retrain, stamp_transform
from mesa_lib.evaluate import attack_success_rate, clean_accuracy
from mesa_lib.models import build_model
from mesa_lib.triggers import FixedTrigger, trigger_from_pattern

WHITE = trigger_from_pattern(511, 1)  # all-white 3x3: visible on the grey batches below


def _batch(B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = 0.25 + 0.5 * torch.rand(B, 1, 10, 10, generator=g)  # no pixel is exactly 1
    y = torch.randint(1, 10, (B,), generator=g)  # no image of the target class 0
    return x, y


def _white_patch_at(img: torch.Tensor) -> bool:
    """True if the image holds a 3x3 all-white patch and nothing else changed is white."""
    w = (img[0] == 1.0).float()
    return int(w.sum()) == 9 and float(torch.nn.functional.avg_pool2d(w[None, None], 3, 1).max()) == 1.0


@pytest.mark.parametrize("B,ratio,k", [(64, 0.1, 6), (64, 0.2, 13), (128, 0.01, 1), (64, 0.001, 1), (50, 1.0, 50),
                                       (64, 0.0, 0), (10, 0.25, 2)])
def test_poison_transform_relabels_exactly_k(B, ratio, k):
    assert k == (max(round(ratio * B), 1) if ratio > 0 else 0)
    x, y = _batch(B)
    x0, y0 = x.clone(), y.clone()
    xp, yp = poison_transform(WHITE, target=0, poison_ratio=ratio)(x, y, torch.Generator().manual_seed(1))
    assert torch.equal(x, x0) and torch.equal(y, y0), "the transform must not modify its inputs in place"
    assert int((yp == 0).sum()) == k
    assert torch.equal(yp[:k], torch.zeros(k, dtype=torch.long)) and torch.equal(yp[k:], y[k:])
    for i in range(B):
        if i < k:
            assert _white_patch_at(xp[i]), f"poisoned image {i} is not stamped"
            assert int((xp[i] != x[i]).sum()) == 9
        else:
            assert torch.equal(xp[i], x[i]), f"clean image {i} changed"


def test_stamp_transform_keeps_labels():
    B, ratio = 40, 0.25
    x, y = _batch(B)
    xs, ys = stamp_transform(FixedTrigger(WHITE), ratio)(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(ys, y)
    k = 10
    assert all(_white_patch_at(xs[i]) for i in range(k))
    assert torch.equal(xs[k:], x[k:])
    # at least one image when the ratio rounds to nothing; none at ratio 0
    xs, _ = stamp_transform(FixedTrigger(WHITE), 0.001)(x, y, torch.Generator().manual_seed(0))
    assert int((xs != x).any(3).any(2).any(1).sum()) == 1
    xs, _ = stamp_transform(FixedTrigger(WHITE), 0.0)(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(xs, x)


def test_stamp_transform_draws_from_the_sampler():
    class Counting:
        def __init__(self):
            self.calls = []

        def sample(self, n, generator=None):
            self.calls.append(n)
            return WHITE.expand(n, 1, 3, 3)

    s = Counting()
    x, y = _batch(20)
    stamp_transform(s, 0.5)(x, y, torch.Generator().manual_seed(0))
    assert s.calls == [10]


def _bright_vs_dark(n: int = 400, seed: int = 0) -> ImageSet:
    """A 2-class toy: class = whether the image is bright; dark images carry no white pixel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.1 + 0.5 * y.float().reshape(-1, 1, 1, 1) + 0.1 * torch.rand(n, 1, 12, 12, generator=g)
    return ImageSet(x, y)


def test_inject_backdoor_then_retrain_on_a_toy(torch_single_thread):
    """The attack implants the white-patch -> class 1 rule; retraining with the trigger and
    true labels removes it (a toy where both are quick)."""
    data = _bright_vs_dark()
    torch.manual_seed(0)
    model = build_model("small_cnn", 1, 2, 12, width=4)
    inject_backdoor(model, data, WHITE, target=1, poison_ratio=0.3, epochs=6, lr=0.05, batch_size=32,
                    progress=False)
    test = _bright_vs_dark(200, seed=1)
    asr = attack_success_rate(model, test, WHITE, target=1)
    # measured (3 seeds): ASR 1.0 -> 0.0 after retraining, clean accuracy 1.0 throughout
    assert asr >= 0.9 and clean_accuracy(model, test) >= 0.95
    fixed = retrain(model, data, FixedTrigger(WHITE), ratio=0.5, epochs=6, lr=0.05, batch_size=32, progress=False)
    assert attack_success_rate(fixed, test, WHITE, target=1) <= 0.1
    assert clean_accuracy(fixed, test) >= 0.95
