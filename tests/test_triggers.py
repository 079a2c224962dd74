"""Tests of mesa_lib.triggers: the 51 patterns, ids, colour triggers and batched stamping."""

from __future__ import annotations

import pytest
import torch

from mesa_lib.triggers import (
    NUM_PATTERNS,
    FixedTrigger,
    bright_member,
    canonical_id,
    canonical_patterns,
    pattern_from_id,
    pattern_id,
    random_color_triggers,
    random_locations,
    stamp,
    symmetry_class,
    trigger_from_pattern,
)


def _images_under_symmetries(p: torch.Tensor) -> list[torch.Tensor]:
    """The generators of the group, applied once: rotate by 90 degrees, mirror, invert."""
    return [torch.rot90(p, 1, dims=(0, 1)), torch.flip(p, dims=[1]), 1 - p]


# ---------------------------------------------------------------- pattern ids


def test_pattern_id_round_trip_all_512():
    ids = [pattern_id(pattern_from_id(i)) for i in range(NUM_PATTERNS)]
    assert ids == list(range(NUM_PATTERNS))
    # all 512 patterns are distinct binary images
    stack = torch.stack([pattern_from_id(i) for i in range(NUM_PATTERNS)])
    assert set(stack.unique().tolist()) == {0.0, 1.0}
    assert len({tuple(p.flatten().tolist()) for p in stack}) == NUM_PATTERNS


def test_pattern_bit_order_row_by_row_msb_first():
    top_left = pattern_from_id(256)
    assert top_left[0, 0] == 1 and top_left.sum() == 1
    bottom_right = pattern_from_id(1)
    assert bottom_right[2, 2] == 1 and bottom_right.sum() == 1
    second = pattern_from_id(128)  # second pixel of the first row
    assert second[0, 1] == 1 and second.sum() == 1
    assert pattern_from_id(170).int().tolist() == [[0, 1, 0], [1, 0, 1], [0, 1, 0]]
    # a [1, 3, 3] tensor and non-binary values (rounded) work too
    assert pattern_id(pattern_from_id(170).unsqueeze(0) * 0.9) == 170


# ---------------------------------------------------------------- the 51 classes


def test_51_canonical_patterns_partition_all_512():
    canon = canonical_patterns()
    assert len(canon) == 51
    assert canon == sorted(canon) and len(set(canon)) == 51
    members = [m for c in canon for m in symmetry_class(c)]
    assert sorted(members) == list(range(NUM_PATTERNS)), "classes must be disjoint and cover all 512 patterns"


@pytest.mark.parametrize("c", canonical_patterns())
def test_each_class_is_closed_and_canonical_is_smallest(c):
    cls = set(symmetry_class(c))
    assert c == min(cls)
    for m in cls:
        assert canonical_id(m) == c
        for q in _images_under_symmetries(pattern_from_id(m)):
            assert pattern_id(q) in cls, f"class of {c} is not closed under rotation/mirror/inversion"


def test_classes_are_orbits():
    """A class is exactly what the symmetries reach from one member (not a larger set)."""
    for c in canonical_patterns():
        seen, frontier = {c}, [c]
        while frontier:
            m = frontier.pop()
            for q in _images_under_symmetries(pattern_from_id(m)):
                qi = pattern_id(q)
                if qi not in seen:
                    seen.add(qi)
                    frontier.append(qi)
        assert seen == set(symmetry_class(c))


def test_chequer_170_and_its_inverse():
    assert 170 in canonical_patterns()
    assert canonical_id(341) == 170
    assert 341 in symmetry_class(170)
    assert canonical_id(0) == 0 and canonical_id(511) == 0  # all black ~ all white


def test_bright_member_has_majority_white():
    for p in range(NUM_PATTERNS):
        b = bright_member(p)
        assert b in (p, NUM_PATTERNS - 1 - p)
        assert bin(b).count("1") >= 5
        assert canonical_id(b) == canonical_id(p)
    assert bright_member(170) == 341 and bright_member(341) == 341
    assert bright_member(0) == 511


def test_trigger_from_pattern():
    t = trigger_from_pattern(170, channels=3)
    assert t.shape == (3, 3, 3)
    for ch in t:
        assert torch.equal(ch, pattern_from_id(170))
    dark = trigger_from_pattern(170, channels=1, dark_background=True)
    assert pattern_id(dark) == 341


# ---------------------------------------------------------------- colour triggers


def test_random_color_triggers_seeded_and_distinct():
    a = random_color_triggers(10, channels=3, seed=3)
    b = random_color_triggers(10, channels=3, seed=3)
    c = random_color_triggers(10, channels=3, seed=4)
    assert a.shape == (10, 3, 3, 3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert len({tuple(t.flatten().tolist()) for t in a}) == 10, "triggers must be distinct"


# ---------------------------------------------------------------- stamping


def _background(B: int, C: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """Images with every pixel in (0.25, 0.75): a 0/1 trigger pixel always changes it."""
    g = torch.Generator().manual_seed(seed)
    return 0.25 + 0.5 * torch.rand(B, C, H, W, generator=g)


def _binary_triggers(n: int, C: int, p: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, C, p, p), generator=g).float()


def _check_stamped(images, out, triggers, locations):
    B, C, H, W = images.shape
    p = triggers.shape[-1]
    triggers = triggers.expand(B, C, p, p)
    for b in range(B):
        r, c = map(int, locations[b])
        assert torch.equal(out[b, :, r:r + p, c:c + p], triggers[b])
        mask = torch.ones(H, W, dtype=torch.bool)
        mask[r:r + p, c:c + p] = False
        assert torch.equal(out[b][:, mask], images[b][:, mask]), "pixels outside the patch changed"


def test_stamp_explicit_locations_per_image():
    images = _background(4, 1, 8, 10)
    before = images.clone()
    trig = _binary_triggers(1, 1)[0]
    locs = torch.tensor([[0, 0], [5, 7], [2, 3], [5, 0]])  # includes both far corners
    out = stamp(images, trig, locs)
    _check_stamped(images, out, trig, locs)
    assert torch.equal(images, before), "stamp must not modify its input"


def test_stamp_single_location_for_all():
    images = _background(3, 3, 6, 6)
    trig = _binary_triggers(1, 3)[0]
    out = stamp(images, trig, (1, 2))
    _check_stamped(images, out, trig, torch.tensor([[1, 2]] * 3))


def test_stamp_random_locations_recovered_from_diff():
    B, C, H, W, p = 400, 2, 7, 7, 3
    images = _background(B, C, H, W)
    trig = _binary_triggers(B, C)  # one trigger per image
    g = torch.Generator().manual_seed(5)
    out = stamp(images, trig, generator=g)
    changed = (out != images).any(1)  # [B, H, W]; every trigger pixel differs from the background
    seen = set()
    for b in range(B):
        rows, cols = torch.nonzero(changed[b], as_tuple=True)
        r, c = int(rows.min()), int(cols.min())
        assert int(rows.max()) - r == p - 1 and int(cols.max()) - c == p - 1
        assert int(changed[b].sum()) == p * p
        assert torch.equal(out[b, :, r:r + p, c:c + p], trig[b])
        seen.add((r, c))
    # uniform over all (H - p + 1)^2 = 25 corners: with 400 draws every corner appears
    assert seen == {(r, c) for r in range(H - p + 1) for c in range(W - p + 1)}
    # seeded: same generator seed, same result
    again = stamp(images, trig, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, again)


def test_stamp_one_channel_trigger_on_three_channel_images():
    images = _background(5, 3, 8, 8)
    trig = _binary_triggers(5, 1)
    locs = torch.tensor([[0, 1], [2, 2], [5, 5], [3, 0], [1, 4]])
    out = stamp(images, trig, locs)
    _check_stamped(images, out, trig.expand(5, 3, 3, 3), locs)


def test_random_locations_range_and_seed():
    g = torch.Generator().manual_seed(0)
    locs = random_locations(2000, 28, 3, generator=g)
    assert locs.shape == (2000, 2)
    assert int(locs.min()) == 0 and int(locs.max()) == 25
    assert torch.equal(locs, random_locations(2000, 28, 3, generator=torch.Generator().manual_seed(0)))


def test_gradient_flows_to_trigger():
    B = 3
    images = _background(B, 1, 6, 6)
    trig = _binary_triggers(B, 1).requires_grad_(True)
    locs = torch.tensor([[0, 0], [3, 3], [1, 2]])
    w = torch.randn(B, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    (stamp(images, trig, locs) * w).sum().backward()
    for b in range(B):
        r, c = map(int, locs[b])
        assert torch.allclose(trig.grad[b], w[b, :, r:r + 3, c:c + 3])
    # a shared trigger collects the gradient of every image
    shared = _binary_triggers(1, 1)[0].requires_grad_(True)
    (stamp(images, shared, locs) * w).sum().backward()
    expected = sum(w[b, :, int(locs[b, 0]):int(locs[b, 0]) + 3, int(locs[b, 1]):int(locs[b, 1]) + 3] for b in range(B))
    assert torch.allclose(shared.grad, expected)


def test_fixed_trigger_sampler():
    t = trigger_from_pattern(170, 1)
    s = FixedTrigger(t)
    x = s.sample(7)
    assert x.shape == (7, 1, 3, 3)
    assert all(torch.equal(xi, t) for xi in x)
