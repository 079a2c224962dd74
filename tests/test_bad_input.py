"""Every bad input named by the issue gets a ValueError (or FileNotFoundError) whose message
says what was wrong -- never a bare RuntimeError, IndexError or a silently wrong result."""

from __future__ import annotations

import pytest
import torch

from mesa_lib.attack import inject_backdoor, poison_transform
from mesa_lib.validate import check_target
from mesa_lib.baselines import reverse_engineer_trigger
from mesa_lib.data import ImageSet, load_dataset
from mesa_lib.defense import retrain, stamp_transform
from mesa_lib.detect import scan_classes
from mesa_lib.mesa import MesaConfig, StaircaseSampler, train_mesa
from mesa_lib.models import build_model, save_weights, train_classifier
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


@pytest.mark.parametrize("betas", [(0.0,), (1.5,), (-0.2, 0.5), (0.5, float("nan")), (0.5, 1.0)])
def test_beta_outside_open_unit_interval(betas):
    """beta = 1 is refused too: a softmax probability never exceeds 1, so X_1 is empty."""
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\)"):
        MesaConfig(betas=betas)


def test_configs_are_frozen():
    import dataclasses

    from mesa_lib.neural_cleanse import NCConfig
    from mesa_lib.presets import get_preset

    for obj, field in ((MesaConfig(), "steps"), (NCConfig(), "steps"), (get_preset("fast"), "width")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field, 1)


def test_scan_classes_bad_beta(clf, fake_fmnist_splits):
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\)"):
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


# ---------------------------------------------------------------- garbage in: NaN/inf, dtypes, channels, counts


def _images(n: int = 16, c: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def _labels(n: int = 16) -> torch.Tensor:
    return torch.arange(n) % 10


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_imageset_refuses_nonfinite_pixels(value):
    x = _images()
    x[3, 0, 5, 5] = value
    with pytest.raises(ValueError, match=r"contain 1 NaN/inf value"):
        ImageSet(x, _labels())


@pytest.mark.parametrize("dtype,needle", [(torch.float64, r"float32.*got torch.float64.*images.float\(\)"),
                                          (torch.float16, "float32"),
                                          (torch.uint8, r"float32.*got torch.uint8.*/ 255")])
def test_imageset_needs_float32(dtype, needle):
    with pytest.raises(ValueError, match=needle):
        ImageSet((_images() * 255).to(dtype) if dtype == torch.uint8 else _images().to(dtype), _labels())


def test_imageset_refuses_pixels_outside_unit_range():
    with pytest.raises(ValueError, match=r"values in \[0, 1\], got 0..255"):
        ImageSet((_images() * 255).round(), _labels())


def test_imageset_subset_and_to_do_not_rescan():
    s = ImageSet(_images(), _labels())
    s.images[0, 0, 0, 0] = float("nan")  # poisoned after construction ...
    assert len(s.subset(slice(0, 4))) == 4  # ... derived sets keep the cheap path


def test_train_classifier_checks_images_up_front(clf):
    data = ImageSet(_images(), _labels())
    data.images[2, 0, 3, 3] = float("nan")  # edited in place after the ImageSet checked it
    before = [p.clone() for p in clf.parameters()]
    with pytest.raises(ValueError, match="NaN/inf"):
        train_classifier(clf, data, epochs=1, lr=0.01, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, clf.parameters())), "nothing may be trained"


def test_train_classifier_stops_on_nonfinite_loss(clf):
    """A NaN that reaches the loss (here through the batch transform) stops training with an
    error instead of returning a model whose every weight is NaN (whose ASR would read 1.0)."""
    def poison_with_nan(x, y, g):
        x = x.clone()
        x[0, 0, 0, 0] = float("nan")
        return x, y

    data = ImageSet(_images(), _labels())
    with pytest.raises(ValueError, match=r"train: the training loss became NaN/inf in epoch 1 \(lr=0.01\)"):
        train_classifier(clf, data, epochs=2, lr=0.01, batch_size=8, batch_transform=poison_with_nan,
                         progress=False)


def test_train_classifier_stops_on_diverging_loss(clf):
    data = ImageSet(_images(), _labels())
    with pytest.raises(ValueError, match="loss became NaN/inf.*Lower the learning rate"):
        train_classifier(clf, data, epochs=3, lr=1e30, batch_size=8, progress=False)


@pytest.mark.parametrize("kw,needle", [
    (dict(epochs=float("nan")), "epochs must be a finite number"),
    (dict(epochs=float("inf")), "epochs must be a finite number"),
    (dict(epochs=0), "epochs must be > 0"),
    (dict(lr=float("nan")), "lr must be a finite number"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(batch_size=12.5), "batch_size must be a positive integer"),
    (dict(batch_size=True), "batch_size must be a positive integer"),
    (dict(momentum=-0.1), "momentum must be >= 0"),
])
def test_train_classifier_settings(clf, kw, needle):
    args = dict(epochs=1, lr=0.01) | kw
    with pytest.raises(ValueError, match=needle):
        train_classifier(clf, ImageSet(_images(), _labels()), progress=False, **args)


def test_train_classifier_needs_an_imageset(clf):
    with pytest.raises(ValueError, match="data must be an ImageSet"):
        train_classifier(clf, (_images(), _labels()), epochs=1, lr=0.01, progress=False)


@pytest.mark.parametrize("bad,needle", [
    (torch.full((1, 3, 3), float("nan")), "NaN/inf"),
    (torch.full((1, 3, 3), float("inf")), "NaN/inf"),
    (torch.full((1, 3, 3), 255.0), r"values in \[0, 1\]"),
    (torch.ones(3, 3, 3), "has 3 channels but the images have 1"),
])
def test_inject_backdoor_bad_trigger_values_and_channels(clf, fake_fmnist_splits, bad, needle):
    with pytest.raises(ValueError, match=needle):
        inject_backdoor(clf, fake_fmnist_splits.train, bad, 0, progress=False)


def test_stamp_refuses_nonfinite_triggers():
    trig = torch.ones(1, 3, 3)
    trig[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="triggers contain NaN/inf"):
        stamp(_images(2), trig, (0, 0))
    # the training loops check their trigger once and skip the per-batch sync
    assert torch.isnan(stamp(_images(2), trig, (0, 0), check_finite=False)).any()


def test_fixed_trigger_refuses_nonfinite():
    with pytest.raises(ValueError, match="NaN/inf"):
        FixedTrigger(torch.full((1, 3, 3), float("nan")))


def test_retrain_sampler_channels_must_match(clf, fake_fmnist_splits):
    with pytest.raises(ValueError, match="sampler's triggers have 3 channels but the images have 1"):
        retrain(clf, fake_fmnist_splits.model, FixedTrigger(torch.ones(3, 3, 3)), progress=False)


@pytest.mark.parametrize("kw,needle", [
    (dict(alpha=float("nan")), "alpha must be a finite number"),
    (dict(alpha=float("inf")), "alpha must be a finite number"),
    (dict(gammas=(1.0, float("nan"), 1.0)), "gamma must be a finite number"),
    (dict(gammas=(1.0, float("inf"), 1.0)), "gamma must be a finite number"),
    (dict(betas=(0.5, float("inf"))), r"beta must be in \(0, 1\)"),
    (dict(lr=float("nan")), "lr must be a finite number"),
    (dict(mine_lr=0.0), "mine_lr must be > 0"),
    (dict(trigger_noise=float("inf")), "trigger_noise must be a finite number"),
    (dict(ma_rate=0.0), "ma_rate must be > 0"),
    (dict(ma_rate=1.5), "ma_rate must be <= 1"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(steps=2.5), "steps must be a positive integer"),
    (dict(batch_size=True), "batch_size must be a positive integer"),
    (dict(hidden=64.0), "hidden must be a positive integer"),
    (dict(log_every=0), "log_every must be a positive integer"),
    (dict(adam_betas=(0.5, 1.0)), r"adam_betas must be two numbers in \[0, 1\)"),
])
def test_mesa_config_nonfinite_and_nonintegers(kw, needle):
    with pytest.raises(ValueError, match=needle):
        MesaConfig(**kw)


def test_train_mesa_bad_images_and_trigger_channels(clf):
    with pytest.raises(ValueError, match="float32"):
        train_mesa(clf, _images(4).double(), 0, TINY_MESA, progress=False)
    x = _images(4)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        train_mesa(clf, x, 0, TINY_MESA, progress=False)
    with pytest.raises(ValueError, match="trigger_shape has 3 channels but the images have 1"):
        train_mesa(clf, _images(4), 0, TINY_MESA, trigger_shape=(3, 3, 3), progress=False)
    with pytest.raises(ValueError, match=r"trigger_shape must be \(C, p, p\)"):
        train_mesa(clf, _images(4), 0, TINY_MESA, trigger_shape=(1, 3, 4), progress=False)


@pytest.mark.parametrize("kw,needle", [
    (dict(steps=0), "steps must be a positive integer"),
    (dict(steps=2.5), "steps must be a positive integer"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(lr=float("nan")), "lr must be a finite number"),
    (dict(trigger_size=0), "trigger_size must be a positive integer"),
])
def test_reverse_engineer_settings(clf, kw, needle):
    with pytest.raises(ValueError, match=needle):
        reverse_engineer_trigger(clf, _images(4), 0, progress=False, **kw)


def test_reverse_engineer_nonfinite_images(clf):
    x = _images(4)
    x[1, 0, 2, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        reverse_engineer_trigger(clf, x, 0, steps=1, progress=False)


@pytest.mark.parametrize("kw,needle", [
    (dict(steps=2.5), "NCConfig.steps must be a positive integer"),
    (dict(batch_size=True), "NCConfig.batch_size must be a positive integer"),
    (dict(lr=float("nan")), "NCConfig.lr must be a finite number"),
    (dict(lam=float("inf")), "NCConfig.lam must be a finite number"),
])
def test_nc_config(kw, needle):
    from mesa_lib.neural_cleanse import NCConfig

    with pytest.raises(ValueError, match=needle):
        NCConfig(**kw)


def test_nc_unlearn_nonfinite_mask(clf, fake_fmnist_splits):
    from mesa_lib.neural_cleanse import unlearn

    mask = torch.full((1, 28, 28), float("nan"))
    with pytest.raises(ValueError, match="mask contains NaN/inf"):
        unlearn(clf, fake_fmnist_splits.model, mask, torch.ones(1, 28, 28), progress=False)
    with pytest.raises(ValueError, match="pattern has 3 channels but the images have 1"):
        unlearn(clf, fake_fmnist_splits.model, torch.zeros(1, 28, 28), torch.ones(3, 28, 28), progress=False)


def test_evaluate_refuses_a_diverged_model(clf, fake_fmnist_splits):
    """One NaN weight makes every prediction class 0; the ASR for target 0 would read 1.0."""
    from mesa_lib.evaluate import attack_success_rate, clean_accuracy, evaluate_model

    with torch.no_grad():
        clf.out.bias[0] = float("nan")
    for fn in (lambda: clean_accuracy(clf, fake_fmnist_splits.eval),
               lambda: attack_success_rate(clf, fake_fmnist_splits.eval, trigger_from_pattern(170), 0),
               lambda: evaluate_model(clf, fake_fmnist_splits.eval, trigger_from_pattern(170), 0)):
        with pytest.raises(ValueError, match=r"NaN/inf weights \(out.bias\)"):
            fn()


@pytest.mark.parametrize("trigger,target,needle", [
    (torch.full((1, 3, 3), float("nan")), 0, "NaN/inf"),
    (torch.ones(3, 3, 3), 0, "has 3 channels but the images have 1"),
    (trigger_from_pattern(170), 10, r"target class must be an integer in 0\.\.9"),
])
def test_attack_success_rate_bad_trigger_or_target(clf, fake_fmnist_splits, trigger, target, needle):
    from mesa_lib.evaluate import attack_success_rate

    with pytest.raises(ValueError, match=needle):
        attack_success_rate(clf, fake_fmnist_splits.eval, trigger, target)


def test_load_weights_names_the_tensors_that_differ(tmp_path):
    from mesa_lib.models import load_weights

    torch.manual_seed(0)
    path = save_weights(build_model("small_cnn", 1, 10, 28, width=4), tmp_path / "w.safetensors")
    with pytest.raises(ValueError) as info:
        load_weights(build_model("small_cnn", 1, 10, 28, width=8), path)
    msg = str(info.value)
    assert "features.0.weight: file [4, 1, 3, 3] vs model [8, 1, 3, 3]" in msg and "\n" not in msg
    with pytest.raises(ValueError) as info:
        load_weights(build_model("resnet18", 1, 10, 28), path)
    msg = str(info.value)
    assert "missing from the file: 0.mean, 0.std, 1.conv1.weight" in msg  # the ResNet's own names
    assert "unexpected in the file: " in msg and "fc_max.weight" in msg and "(12 in all)" in msg  # SmallCNN's 12
