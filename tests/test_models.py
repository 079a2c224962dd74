"""Tests of mesa_lib.models (architectures, safetensors weights, training loop) and of the
metrics in mesa_lib.evaluate, on small constructed models whose answers are known."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn as nn

from mesa_lib.data import ImageSet
from mesa_lib.evaluate import attack_success_rate, clean_accuracy, evaluate_model
from mesa_lib.models import SmallCNN, build_model, load_weights, predict, save_weights, train_classifier
from mesa_lib.triggers import FixedTrigger, trigger_from_pattern

# ---------------------------------------------------------------- architectures


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_small_cnn_output_shape(channels, size):
    torch.manual_seed(0)
    model = build_model("small_cnn", channels, 10, size, width=8)
    assert isinstance(model, SmallCNN)
    out = model(torch.rand(5, channels, size, size))
    assert out.shape == (5, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("channels", [1, 3])
def test_resnet18_output_shape(channels):
    torch.manual_seed(0)
    model = build_model("resnet18", channels, 7, 16).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, 16, 16))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


# ---------------------------------------------------------------- weights


def _model(seed: int, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("small_cnn", 1, 10, 28, width=width).eval()


def test_save_load_round_trip(tmp_path):
    a, b = _model(0), _model(1)
    x = torch.rand(4, 1, 28, 28)
    assert not torch.allclose(a(x), b(x))
    path = save_weights(a, tmp_path / "sub" / "m.safetensors", {"note": "hi", "seed": 0})
    assert path.is_file()
    meta = load_weights(b, path)
    assert meta == {"note": "hi", "seed": 0}
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_weights_file_is_safetensors_not_pickle(tmp_path):
    from safetensors.torch import load_file

    path = save_weights(_model(0), tmp_path / "m.safetensors")
    state = load_file(str(path))  # readable by the safetensors library itself
    assert set(state) == set(_model(0).state_dict())
    assert not path.read_bytes().startswith(b"\x80"), "looks like a pickle"


def test_load_never_unpickles(tmp_path, monkeypatch):
    path = save_weights(_model(0), tmp_path / "m.safetensors")

    def boom(*a, **k):
        raise AssertionError("pickle used to load weights")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    load_weights(_model(1), path)  # works without pickle


def test_load_rejects_torch_save_pickle(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(_model(0).state_dict(), path)
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_weights(_model(1), path)


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"])
def test_load_rejects_corrupt_file(tmp_path, content):
    path = tmp_path / "m.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_weights(_model(1), path)


def test_load_rejects_truncated_file(tmp_path):
    path = save_weights(_model(0), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_weights(_model(1), path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_weights(_model(0), tmp_path / "absent.safetensors")


def test_load_wrong_architecture(tmp_path):
    path = save_weights(_model(0, width=8), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="do not fit this model"):
        load_weights(_model(0, width=16), path)
    with pytest.raises(ValueError, match="do not fit this model"):
        load_weights(build_model("resnet18", 1, 10, 28), path)


# ---------------------------------------------------------------- training loop


def test_train_classifier_learns_separable_data():
    """Two classes told apart by brightness: a few SGD steps must learn them."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (128,), generator=g)
    x = (0.2 + 0.6 * y.float()).reshape(-1, 1, 1, 1) + 0.05 * torch.randn(128, 1, 16, 16, generator=g)
    data = ImageSet(x.clamp(0, 1), y)
    torch.manual_seed(0)
    model = build_model("small_cnn", 1, 10, 16, width=4)
    before = clean_accuracy(model, data)
    train_classifier(model, data, epochs=2, lr=0.05, batch_size=32, progress=False)
    assert not model.training
    assert before < 0.9  # an untrained 10-class model does not already solve it
    assert clean_accuracy(model, data) == 1.0


def test_train_classifier_is_seeded():
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g))
    a, b = _model(0), _model(0)
    train_classifier(a, data, epochs=1, lr=0.05, batch_size=16, seed=3, progress=False)
    train_classifier(b, data, epochs=1, lr=0.05, batch_size=16, seed=3, progress=False)
    for va, vb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(va, vb)


def test_predict_batches_and_restores_mode():
    model = _model(0).train()
    x = torch.rand(25, 1, 28, 28)
    p = predict(model, x, batch_size=7)
    assert model.training
    with torch.no_grad():
        assert torch.equal(p, model.eval()(x).argmax(1))


# ---------------------------------------------------------------- metrics on constructed models
#
# Images are constant grey levels that encode their label (label / 20 < 0.5); a 3x3 trigger
# changes 9 of 256 pixels, so the median still gives the label back.


class _LabelReader(nn.Module):
    """Predicts ``rule(label, triggered)`` where label is read from the image's median and
    ``triggered`` means a pure-white 3x3 patch is present."""

    def __init__(self, rule, num_classes: int = 10):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))  # the metrics read the device from a parameter
        self.rule, self.num_classes = rule, num_classes

    def forward(self, x):
        label = (x.flatten(1).median(1).values * 20).round().long()
        white = torch.nn.functional.avg_pool2d((x[:, :1] == 1).float(), 3, stride=1).amax((1, 2, 3)) == 1
        pred = self.rule(label, white)
        return torch.nn.functional.one_hot(pred, self.num_classes).float() + 0 * self.dummy


def _label_images(labels) -> ImageSet:
    y = torch.as_tensor(labels, dtype=torch.long)
    return ImageSet((y.float() / 20).reshape(-1, 1, 1, 1).expand(-1, 1, 16, 16).clone(), y)


LABELS = [0, 0, 0, 1, 2, 3, 3, 4, 5, 7, 0, 9, 8, 6]  # 4 of 14 are the target 0
WHITE = trigger_from_pattern(511, 1)
BLACK = trigger_from_pattern(0, 1)


def test_asr_always_target_is_one():
    model = _LabelReader(lambda lab, w: torch.zeros_like(lab))
    assert attack_success_rate(model, _label_images(LABELS), WHITE, target=0) == 1.0


def test_asr_true_label_model_is_zero_despite_target_images():
    # counting target-class images would give 4/14 here
    model = _LabelReader(lambda lab, w: lab)
    assert attack_success_rate(model, _label_images(LABELS), WHITE, target=0) == 0.0


def test_asr_denominator_is_non_target_images():
    # predicts the target for odd labels only: ASR = odd non-target / non-target
    model = _LabelReader(lambda lab, w: torch.where(lab % 2 == 1, 0, lab))
    non_target = [y for y in LABELS if y != 0]
    expected = sum(y % 2 for y in non_target) / len(non_target)
    assert attack_success_rate(model, _label_images(LABELS), WHITE, target=0) == pytest.approx(expected)
    # and toward target 3 (images of class 3 excluded, none of the others predicted 3)
    assert attack_success_rate(model, _label_images(LABELS), WHITE, target=3) == 0.0


def test_asr_needs_the_trigger():
    """A real 'backdoor': target when a white patch is stamped; the black pattern does nothing."""
    model = _LabelReader(lambda lab, w: torch.where(w, 0, lab))
    data = _label_images(LABELS)
    assert attack_success_rate(model, data, WHITE, target=0) == 1.0
    assert attack_success_rate(model, data, BLACK, target=0) == 0.0
    assert attack_success_rate(model, data, FixedTrigger(WHITE), target=0) == 1.0
    # one trigger per non-target image: white on every other one
    n = sum(y != 0 for y in LABELS)
    per_image = torch.stack([WHITE if i % 2 == 0 else BLACK for i in range(n)])
    assert attack_success_rate(model, data, per_image, target=0) == pytest.approx(((n + 1) // 2) / n)
    assert clean_accuracy(model, data) == 1.0
    assert evaluate_model(model, data, WHITE, 0) == {"clean_acc": 1.0, "asr": 1.0, "target_recall": 1.0}


def test_clean_accuracy_constructed():
    model = _LabelReader(lambda lab, w: torch.where(lab == 3, 4, lab))  # wrong on class 3 only
    expected = 1 - LABELS.count(3) / len(LABELS)
    assert clean_accuracy(model, _label_images(LABELS)) == pytest.approx(expected)
    always_zero = _LabelReader(lambda lab, w: torch.zeros_like(lab))
    assert clean_accuracy(always_zero, _label_images(LABELS)) == pytest.approx(LABELS.count(0) / len(LABELS))


def test_asr_all_target_images_is_an_error():
    model = _LabelReader(lambda lab, w: lab)
    with pytest.raises(ValueError, match="target class"):
        attack_success_rate(model, _label_images([2, 2, 2]), WHITE, target=2)
