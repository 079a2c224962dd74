"""Neural Cleanse: batched mask/pattern reverse engineering, MAD anomaly index, unlearning."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mesa_lib.neural_cleanse import (
    NCConfig,
    ReversedTriggers,
    anomaly_index,
    blend,
    blend_transform,
    detect_backdoor,
    reverse_engineer_masks,
    unlearn,
)


def test_anomaly_index_matches_the_mad_formula():
    norms = torch.tensor([10.0, 50.0, 53.0, 47.0, 51.0, 49.0, 52.0])
    med = norms.median()  # 50
    mad = 1.4826 * (norms - med).abs().median()
    expected = (norms - med).abs() / mad
    assert torch.allclose(anomaly_index(norms), expected.double())
    assert anomaly_index(norms)[0] > 2 > anomaly_index(norms)[1:].max()


def test_anomaly_index_rejects_too_few_norms():
    with pytest.raises(ValueError, match=">= 3 norms"):
        anomaly_index(torch.tensor([1.0, 2.0]))


def _reversed(norms: list[float]) -> ReversedTriggers:
    K = len(norms)
    masks = torch.zeros(K, 1, 10, 10)
    for k, n in enumerate(norms):
        masks[k].view(-1)[: int(n)] = 1.0  # a mask of exactly n pixels
    return ReversedTriggers(masks, torch.rand(K, 1, 10, 10), torch.ones(K))


def test_detection_flags_only_a_small_outlier():
    det = detect_backdoor(_reversed([60, 58, 9, 61, 57, 59, 62, 60, 56, 63]))
    assert det.l1_norms[2] == 9
    assert det.flagged == [2] and det.detected_target == 2
    # a LARGE outlier is not a backdoor: nothing is flagged
    det = detect_backdoor(_reversed([60, 58, 99, 61, 57, 59, 62, 60, 56, 63]))
    assert det.flagged == []
    assert det.l1_norms[det.detected_target] <= sorted(det.l1_norms)[len(det.l1_norms) // 2]


def test_blend_and_transform_keep_labels_and_stamp_the_first_fraction():
    x = torch.rand(10, 1, 8, 8)
    y = torch.arange(10)
    mask = torch.zeros(1, 8, 8)
    mask[:, :2, :2] = 1.0
    pattern = torch.ones(1, 8, 8)
    b = blend(x, mask, pattern)
    assert torch.equal(b[:, :, :2, :2], torch.ones(10, 1, 2, 2)) and torch.equal(b[:, :, 2:], x[:, :, 2:])
    x2, y2 = blend_transform(mask, pattern, 0.3)(x, y, torch.Generator())
    assert torch.equal(y2, y)
    assert torch.equal(x2[:3], b[:3]) and torch.equal(x2[3:], x[3:])
    with pytest.raises(ValueError, match="fraction"):
        blend_transform(mask, pattern, 1.5)


def test_config_and_shapes_are_validated():
    with pytest.raises(ValueError, match="steps"):
        NCConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        NCConfig(lr=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ValueError, match=r"\[1, H, W\]"):
        unlearn(model, None, torch.zeros(8, 8), torch.zeros(1, 8, 8))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target class"):
        reverse_engineer_masks(model, torch.rand(4, 1, 8, 8), NCConfig(steps=1), classes=[5])


def test_search_returns_masks_in_range_and_restores_the_classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 4)).eval()
    images = torch.rand(50, 1, 6, 6)
    cfg = NCConfig(steps=5, batch_size=4)
    both = reverse_engineer_masks(model, images, cfg, classes=[1, 2], seed=3, progress=False)
    assert both.masks.shape == (2, 1, 6, 6) and both.patterns.shape == (2, 1, 6, 6)
    assert ((both.masks >= 0) & (both.masks <= 1)).all()
    assert all(p.requires_grad for p in model.parameters())  # the classifier is restored


@pytest.fixture(scope="module")
def backdoored_fmnist():
    """SmallCNN width 8 trained on 5000 Fashion-MNIST images, backdoored (pattern 341 -> class 0,
    20% poison, 3 epochs at lr 0.05); skips when Fashion-MNIST is not available."""
    from mesa_lib import load_dataset
    from mesa_lib.attack import inject_backdoor
    from mesa_lib.models import SmallCNN, train_classifier
    from mesa_lib.triggers import trigger_from_pattern

    try:
        splits = load_dataset("fashion-mnist", train_limit=5000)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST not available (make data)")
    torch.manual_seed(0)
    model = SmallCNN(1, 10, 28, width=8)
    train_classifier(model, splits.train, epochs=2, lr=0.05, seed=0, progress=False)
    trigger = trigger_from_pattern(341)
    inject_backdoor(model, splits.train, trigger, 0, poison_ratio=0.2, epochs=3, lr=0.05, seed=1, progress=False)
    return splits, model, trigger


def test_nc_detects_the_target_and_unlearning_lowers_asr(backdoored_fmnist):
    from mesa_lib.evaluate import attack_success_rate, clean_accuracy

    splits, model, trigger = backdoored_fmnist
    asr_before = attack_success_rate(model, splits.eval, trigger, 0)
    assert asr_before > 0.8, "the backdoor did not take; the test model is too weak"
    rev = reverse_engineer_masks(model, splits.model, NCConfig(steps=150, batch_size=16), seed=0, progress=False)
    det = detect_backdoor(rev)
    # the target's trigger is by far the smallest; whether its anomaly index passes 2 depends on
    # how much the clean classes' norms spread (on this weak 5000-image model they spread a
    # lot, index ~1.4; the sweep records both on the fast preset's models)
    # (the gap to the next-smallest norm depends on the thread count's float order: 2x with one
    # torch thread, 5% with two, so only the ranking is asserted)
    assert det.detected_target == 0
    assert det.l1_norms[0] == min(det.l1_norms)
    fixed = unlearn(model, splits.model, rev.masks[0], rev.patterns[0], ratio=0.5, epochs=1, seed=2, progress=False)
    asr_after = attack_success_rate(fixed, splits.eval, trigger, 0)
    assert asr_after < asr_before / 3
    assert clean_accuracy(fixed, splits.eval) > clean_accuracy(model, splits.eval) - 0.05
