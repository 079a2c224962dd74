"""Every bad input named by the issue gets a ValueError (or FileNotFoundError) whose message
says what was wrong -- never a bare RuntimeError, IndexError or a silently wrong result."""

from __future__ import annotations

import pytest
import torch

from mesa_lib.attack import check_target, inject_backdoor, poison_transform
from mesa_lib.baselines import reverse_engineer_trigger
from mesa_lib.data import ImageSet, load_dataset
from mesa_lib.defense import retrain, stamp_transform
from mesa_lib.detect import scan_classes
from mesa_lib.mesa import MesaConfig, StaircaseSampler, train_mesa
from mesa_lib.models import build_model, save_weights
from mesa_lib.pipeline import run_pipeline
from mesa_lib.presets import get_preset
from mesa_lib.triggers import (
    FixedTrigger,
    bright_member,
    pattern_from_id,
    random_color_triggers,
    random_locations,
    stamp,
    trigger_from_pattern,
)

TINY_MESA = MesaConfig(hidden=8, mine_hidden=8, noise_dim=8, steps=1, batch_size=4)


@pytest.fixture
def clf():
    torch.manual_seed(0)
    return build_model("small_cnn", 1, 10, 28, width=4)


@pytest.fixture
def isolated_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MESA_CACHE_DIR", str(tmp_path / "cache"))


# ---------------------------------------------------------------- trigger larger than the image


def test_stamp_trigger_larger_than_image():
    with pytest.raises(ValueError, match="larger than the 4x4 images"):
        stamp(torch.rand(2, 1, 4, 4), torch.ones(1, 5, 5))


def test_random_locations_trigger_larger_than_image():
    with pytest.raises(ValueError, match="does not fit"):
        random_locations(3, image_size=4, patch_size=5)


def test_inject_backdoor_trigger_larger_than_image(clf, fake_fmnist_splits):
    with pytest.raises(ValueError, match="larger than the images"):
        inject_backdoor(clf, fake_fmnist_splits.train, torch.ones(1, 29, 29), 0, progress=False)


def test_train_mesa_and_point_trigger_larger_than_image(clf):
    images = torch.rand(4, 1, 28, 28)
    with pytest.raises(ValueError, match="larger than the images"):
        train_mesa(clf, images, 0, TINY_MESA, trigger_shape=(1, 29, 29), progress=False)
    with pytest.raises(ValueError, match="larger than the images"):
        reverse_engineer_trigger(clf, images, 0, trigger_size=29, progress=False)


@pytest.mark.parametrize("loc", [(0, 26), (26, 0), (-1, 0)])
def test_stamp_location_outside_image(loc):
    with pytest.raises(ValueError, match="outside"):
        stamp(torch.rand(2, 1, 28, 28), torch.ones(1, 3, 3), loc)


@pytest.mark.parametrize("locs", [[[0, 0], [0, 26]], [[26, 0], [0, 0]], [[0, -1], [0, 0]]])
def test_stamp_location_tensor_outside_image(locs):
    """A patch at column 26 of a 28-wide image would wrap into the next row, silently."""
    with pytest.raises(ValueError, match="outside"):
        stamp(torch.rand(2, 1, 28, 28), torch.ones(1, 3, 3), torch.tensor(locs))


# ---------------------------------------------------------------- pattern ids


@pytest.mark.parametrize("bad", [512, -1, 1000, 3.5, "abc"])
def test_pattern_id_outside_range(bad):
    for fn in (pattern_from_id, bright_member, trigger_from_pattern):
        with pytest.raises(ValueError, match="0..511"):
            fn(bad)


def test_run_pipeline_bad_pattern_fails_before_any_work(fake_fmnist_splits, isolated_cache, tmp_path):
    with pytest.raises(ValueError, match="0..511"):
        run_pipeline(pattern=512, splits=fake_fmnist_splits, out=tmp_path / "r.json", progress=False)
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------- target class


@pytest.mark.parametrize("bad", [10, -1, 1.5, True])
def test_check_target(bad):
    with pytest.raises(ValueError, match="target class"):
        check_target(bad, 10)


@pytest.mark.parametrize("bad", [10, -1])
def test_inject_backdoor_bad_target(clf, fake_fmnist_splits, bad):
    with pytest.raises(ValueError, match=r"target class must be an integer in 0\.\.9"):
        inject_backdoor(clf, fake_fmnist_splits.train, trigger_from_pattern(170), bad, progress=False)


@pytest.mark.parametrize("bad", [10, -1, 2.5, [0, 10, 1]])
def test_train_mesa_bad_target(clf, bad):
    with pytest.raises(ValueError, match="target class"):
        train_mesa(clf, torch.rand(4, 1, 28, 28), bad, TINY_MESA, progress=False)


def test_train_mesa_wrong_number_of_targets(clf):
    with pytest.raises(ValueError, match="one per beta"):
        train_mesa(clf, torch.rand(4, 1, 28, 28), [0, 1], TINY_MESA, progress=False)


def test_reverse_engineer_bad_target(clf):
    with pytest.raises(ValueError, match="target class"):
        reverse_engineer_trigger(clf, torch.rand(4, 1, 28, 28), 10, progress=False)


def test_run_pipeline_bad_target(fake_fmnist_splits, isolated_cache, monkeypatch):
    import mesa_lib.pipeline as pipeline

    def no_training(*a, **k):
        raise AssertionError("the target must be checked before any model is trained")

    monkeypatch.setattr(pipeline, "get_clean_model", no_training)
    with pytest.raises(ValueError, match="target class"):
        run_pipeline(target=10, splits=fake_fmnist_splits, progress=False)


# ---------------------------------------------------------------- MESA settings


@pytest.mark.parametrize("betas", [(0.0,), (1.5,), (-0.2, 0.5), (0.5, float("nan"))])
def test_beta_outside_unit_interval(betas):
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\]"):
        MesaConfig(betas=betas)


def test_beta_one_is_allowed():
    assert MesaConfig(betas=(1.0,)).betas == (1.0,)


def test_scan_classes_bad_beta(clf, fake_fmnist_splits):
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\]"):
        scan_classes(clf, fake_fmnist_splits.model, fake_fmnist_splits.eval, TINY_MESA, beta=1.5, progress=False)


@pytest.mark.parametrize("alpha", [-0.1, -10])
def test_negative_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        MesaConfig(alpha=alpha)


@pytest.mark.parametrize("kw,needle", [
    (dict(betas=()), "betas is empty"),
    (dict(gammas=(1.0, 1.0)), "gammas"),
    (dict(gammas=(1.0, -1.0, 1.0)), "gammas"),
    (dict(noise_dim=10), "noise_dim"),
    (dict(batch_size=0), "batch_size"),
    (dict(steps=-1), "steps"),
])
def test_other_mesa_settings(kw, needle):
    with pytest.raises(ValueError, match=needle):
        MesaConfig(**kw)


# ---------------------------------------------------------------- ratios


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_poison_ratio_outside_unit_interval(bad, clf, fake_fmnist_splits):
    with pytest.raises(ValueError, match=r"poison_ratio must be a fraction in \[0, 1\]"):
        poison_transform(trigger_from_pattern(170), 0, bad)
    with pytest.raises(ValueError, match=r"poison_ratio must be a fraction in \[0, 1\]"):
        inject_backdoor(clf, fake_fmnist_splits.train, trigger_from_pattern(170), 0, poison_ratio=bad,
                        progress=False)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_retraining_ratio_outside_unit_interval(bad, clf, fake_fmnist_splits):
    s = FixedTrigger(trigger_from_pattern(170))
    with pytest.raises(ValueError, match=r"retraining ratio must be a fraction in \[0, 1\]"):
        stamp_transform(s, bad)
    with pytest.raises(ValueError, match=r"retraining ratio must be a fraction in \[0, 1\]"):
        retrain(clf, fake_fmnist_splits.model, s, ratio=bad, progress=False)


# ---------------------------------------------------------------- empty or mismatched tensors


def test_imageset_empty_and_mismatched():
    with pytest.raises(ValueError, match="empty"):
        ImageSet(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        ImageSet(torch.zeros(5, 1, 28, 28), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="4-D"):
        ImageSet(torch.zeros(5, 28, 28), torch.zeros(5, dtype=torch.long))


def test_stamp_wrong_batch_of_triggers():
    with pytest.raises(ValueError, match=r"\[B=4, C, p, p\]"):
        stamp(torch.rand(4, 1, 28, 28), torch.ones(3, 1, 3, 3))


def test_stamp_empty_and_mismatched():
    with pytest.raises(ValueError, match="empty"):
        stamp(torch.rand(0, 1, 28, 28), torch.ones(1, 3, 3))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        stamp(torch.rand(1, 28, 28), torch.ones(1, 3, 3))
    with pytest.raises(ValueError, match="2 channels but images have 3"):
        stamp(torch.rand(2, 3, 28, 28), torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="square"):
        stamp(torch.rand(2, 1, 28, 28), torch.ones(1, 3, 2))
    with pytest.raises(ValueError, match=r"locations must be \[B=2, 2\]"):
        stamp(torch.rand(2, 1, 28, 28), torch.ones(1, 3, 3), torch.zeros(3, 2, dtype=torch.long))


def test_fixed_trigger_needs_one_trigger():
    with pytest.raises(ValueError, match=r"\[C, p, p\]"):
        FixedTrigger(torch.ones(2, 1, 3, 3))


def test_random_color_triggers_bad_counts():
    with pytest.raises(ValueError, match="n, channels and size must be >= 1"):
        random_color_triggers(0)


# ---------------------------------------------------------------- datasets, presets, models


@pytest.mark.parametrize("name", ["mnist-digits", "imagenet", ""])
def test_unknown_dataset(name, isolated_cache):
    with pytest.raises(ValueError, match="unknown dataset|dataset"):
        load_dataset(name)
    with pytest.raises(ValueError):
        run_pipeline(dataset=name, progress=False)


def test_unknown_preset(fake_fmnist_splits, isolated_cache):
    with pytest.raises(ValueError, match="unknown preset 'turbo'; choose one of fast, paper"):
        get_preset("turbo")
    with pytest.raises(ValueError, match="unknown preset"):
        run_pipeline(preset="turbo", splits=fake_fmnist_splits, progress=False)


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg", 1, 10, 28)


def test_sampler_file_errors(tmp_path, clf):
    with pytest.raises(FileNotFoundError, match="no sampler file"):
        StaircaseSampler.load(tmp_path / "absent.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a sampler file"):
        StaircaseSampler.load(bad)
    # a valid safetensors file, but a classifier's weights, not a sampler
    other = save_weights(clf, tmp_path / "clf.safetensors")
    with pytest.raises(ValueError, match="not a sampler file"):
        StaircaseSampler.load(other)
    pt = tmp_path / "pickle.pt"
    torch.save({"a": torch.ones(2)}, pt)
    with pytest.raises(ValueError, match="not a sampler file"):
        StaircaseSampler.load(pt)
