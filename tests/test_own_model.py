"""MESA on models the library did not train through its pipeline (mesa_lib.own): a torchvision
ResNet-18 with a planted backdoor and a clean one, a plain nn.Sequential MLP, a model that
expects mean/std-normalised inputs; the same code path as the pipeline; the defend CLI end to
end and each bad input refused with one line before any training."""

from __future__ import annotations

import copy
import json
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mesa_lib.attack import poison_transform
from mesa_lib.cli import main
from mesa_lib.data import ImageSet
from mesa_lib.models import train_classifier
from mesa_lib.own import (MIN_PER_CLASS, DefenderData, DefenseSettings, InputNorm, defend, model_triggers,
                          remove_backdoor, scan)
from mesa_lib.triggers import trigger_from_pattern

from conftest import real_fmnist_available

K, TARGET = 5, 2
TRIGGER = trigger_from_pattern(170, 1, dark_background=True)
# a small budget: a few seconds per defense on one core
TINY = DefenseSettings(detect_batch=16, retrain_ratio=0.5, retrain_epochs=4, retrain_lr=0.02,
                       retrain_schedule="constant").with_budget(detect_steps=50, mesa_steps=30)


def _threads_one():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    return before


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these small models gain nothing from more, and two threads on a busy
    two-core machine were measured 10x slower."""
    before = _threads_one()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fm5():
    """Five Fashion-MNIST classes at 12x12 (centre crop, 2x2 mean): 120 training images per
    class for the model's owner, 40 per class for the defender (other images)."""
    if not real_fmnist_available():
        pytest.skip("Fashion-MNIST not found (install dataset-fashion-mnist or run `make data`)")
    from mesa_lib.data import load_dataset

    s = load_dataset("fashion-mnist", train_limit=3000)

    def take(n: int, off: int):
        idx = torch.cat([torch.nonzero(s.train.labels == c).flatten()[off:off + n] for c in range(K)])
        return F.avg_pool2d(s.train.images[idx][:, :, 2:26, 2:26], 2), s.train.labels[idx]

    return {"train": ImageSet(*take(120, 0)), "defender": take(40, 150)}


def _resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=K)
    net.conv1 = nn.Conv2d(1, 64, 3, 2, 1, bias=False)  # grey 12x12 images
    return net


@pytest.fixture(scope="module")
def resnets(fm5):
    """A clean torchvision ResNet-18 and a copy with a backdoor planted by poisoned fine-tuning
    (30% of each batch stamped with the chequer, relabelled TARGET), trained outside the pipeline."""
    before = _threads_one()
    try:
        clean = train_classifier(_resnet18(), fm5["train"], epochs=4, lr=0.05, batch_size=64, progress=False,
                                 schedule="cosine")
        bad = train_classifier(copy.deepcopy(clean), fm5["train"], epochs=4, lr=0.05, batch_size=64,
                               batch_transform=poison_transform(TRIGGER, TARGET, 0.3), progress=False,
                               schedule="cosine")
    finally:
        torch.set_num_threads(before)
    return clean.eval(), bad.eval()


def test_backdoored_resnet_is_flagged_on_its_target_and_defended(fm5, resnets):
    _, bad = resnets
    x, y = fm5["defender"]
    rep = defend(bad, x, y, settings=TINY, trigger=TRIGGER, trigger_target=TARGET, progress=False)
    assert rep.flagged and rep.detected_target == TARGET, rep.scan
    assert rep.before["trigger_asr"] >= 0.8, rep.before  # the planted backdoor works ...
    assert rep.after["trigger_asr"] <= rep.before["trigger_asr"] - 0.4, (rep.before, rep.after)  # ... and is removed
    assert rep.after["clean_acc"] >= rep.before["clean_acc"] - 0.1
    json.loads(rep.to_json())  # plain JSON
    assert rep.sizes["evaluation"] == 40 and rep.sizes["search"] + rep.sizes["check"] == rep.sizes["retrain"]
    # the defended model is the user's architecture, and the user's model is untouched
    assert type(rep.model).__name__ == "ResNet" and rep.model is not bad
    assert all(torch.equal(a, b) for a, b in zip(bad.state_dict().values(), resnets[1].state_dict().values()))


def test_clean_resnet_is_not_flagged(fm5, resnets):
    clean, _ = resnets
    x, y = fm5["defender"]
    res = scan(clean, x, y, settings=TINY, progress=False)
    assert not res.flagged, res.to_dict()
    assert len(res.per_class_asr) == K and res.triggers.shape == (K, 8, 1, 3, 3)


def test_sequential_mlp_flagged_and_staged_api(fm5):
    """A plain nn.Sequential MLP, through the three stages one by one."""
    before = _threads_one()
    try:
        torch.manual_seed(1)
        mlp = nn.Sequential(nn.Flatten(), nn.Linear(144, 128), nn.ReLU(), nn.Linear(128, K))
        train_classifier(mlp, fm5["train"], epochs=40, lr=0.05, batch_size=64, progress=False,
                         batch_transform=poison_transform(TRIGGER, TARGET, 0.3))
        x, y = fm5["defender"]
        res = scan(mlp, x, y, settings=TINY, progress=False)
        assert res.flagged and res.detected_target == TARGET, res.to_dict()
        sampler = model_triggers(mlp, x, TARGET, y, settings=TINY, progress=False)
        assert sampler.trigger_shape == (1, 3, 3) and sampler.targets == [TARGET] * 3
        fixed = remove_backdoor(mlp, x, y, sampler, settings=TINY, progress=False)
        assert isinstance(fixed, nn.Sequential) and not torch.equal(fixed[1].weight, mlp[1].weight)
        # a 2x2 one-channel trigger is a setting, not a code change
        small = scan(mlp, x, y, settings=DefenseSettings(trigger_size=2, detect_steps=2, detect_batch=4),
                     progress=False)
        assert small.triggers.shape[-2:] == (2, 2)
    finally:
        torch.set_num_threads(before)


class _Standardised(nn.Module):
    """A model that expects (x - 0.5) / 0.25 inputs: its first layer does not normalise."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 144, K))

    def forward(self, x):
        return self.body(x)


def test_mean_std_model_is_normalised_in_front(fm5):
    """Triggers are stamped in [0, 1] pixel space and the stated normalisation is applied in
    front of the model: the scan equals that of the model with the normalisation built in."""
    from mesa_lib.models import Normalize

    torch.manual_seed(0)
    model = _Standardised()
    x, y = fm5["defender"]
    tiny = DefenseSettings(detect_steps=3, detect_batch=8)
    stated = scan(model, x, y, settings=tiny, norm=InputNorm((0.5,), (0.25,)), progress=False)
    built_in = scan(nn.Sequential(Normalize(0.5, 0.25, 1), model), x, y, settings=tiny, progress=False)
    assert stated.per_class_asr == built_in.per_class_asr
    assert torch.equal(stated.triggers, built_in.triggers)
    unstated = scan(model, x, y, settings=tiny, progress=False)  # the wrong input range changes what it sees
    assert not torch.equal(unstated.triggers, stated.triggers)
    r = InputNorm.from_range(-1, 1)  # [0, 1] -> [-1, 1]
    assert r.module(1)(torch.tensor([0.0, 0.5, 1.0]).reshape(3, 1, 1, 1)).flatten().tolist() == [-1.0, 0.0, 1.0]


def test_same_code_path_as_the_pipeline(tiny_backdoor):
    """On a fast-preset-style backdoored model with the same seed and data, the new path's
    scan, staircase and retraining equal the pipeline's exactly."""
    from mesa_lib.detect import defender_halves
    from mesa_lib.mesa import train_mesa
    from mesa_lib.pipeline import _defend, detect_target, protocols
    from mesa_lib.presets import FAST

    preset = FAST.with_(detect_steps=4, detect_batch=8, mesa={"steps": 4, "batch_size": 8}, defense_epochs=0.05)
    splits, model, seed = tiny_backdoor.splits, tiny_backdoor.model, 3
    search, check = defender_halves(splits.model, seed)
    theirs = detect_target(model, search, check, preset, seed)
    data = DefenderData.from_parts(splits.model, splits.eval, 10, seed)
    settings = DefenseSettings.from_preset(preset, seed=seed)
    mine = scan(model, data, settings=settings, progress=False)
    assert mine.per_class_asr == theirs["per_class_asr"] and mine.anomaly_index == theirs["anomaly_index"]
    assert mine.flagged == theirs["flagged"] and mine.detected_target == theirs["detected_target"]

    their_sampler, _ = train_mesa(model, splits.model, 0, preset.mesa, seed=seed, progress=False)
    my_sampler = model_triggers(model, data, 0, settings=settings, progress=False)
    for a, b in zip(their_sampler.state_dict().values(), my_sampler.state_dict().values()):
        assert torch.equal(a, b)
    their_model = _defend(model, splits, their_sampler, protocols(preset)[0], preset, seed, False)
    my_model = remove_backdoor(model, data, None, my_sampler, settings=settings, progress=False)
    for a, b in zip(their_model.state_dict().values(), my_model.state_dict().values()):
        assert torch.equal(a, b)
    # and a different seed is not equal (the comparison can fail)
    other = scan(model, data, settings=DefenseSettings.from_preset(preset, seed=seed + 1), progress=False)
    assert other.per_class_asr != theirs["per_class_asr"]


# ---------------------------------------------------------------------------------- the CLI

NETS = textwrap.dedent("""
    import torch.nn as nn

    def make_net(num_classes=5, hidden=32):
        return nn.Sequential(nn.Flatten(), nn.Linear(144, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
""")
FAST_CLI = ["--detect-steps", "2", "--mesa-steps", "2", "--epochs", "0.2", "--quiet"]


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    """What a user has: nets.py with a factory, the model's safetensors weights, a .npz."""
    from safetensors.torch import save_file

    (tmp_path / "nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(144, 32), nn.ReLU(), nn.Linear(32, 5))
    save_file(net.state_dict(), tmp_path / "net.safetensors")
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(5 * 12, 12, 12, generator=g) * 255).to(torch.uint8).numpy()
    labels = np.repeat(np.arange(5), 12)
    np.savez(tmp_path / "data.npz", images=images, labels=labels)
    return tmp_path


def _defend_cli(files, *extra: str) -> list[str]:
    return ["defend", "--model", str(files / "net.safetensors"), "--arch", "nets:make_net",
            "--data", str(files / "data.npz"), "--out", str(files / "out"), *FAST_CLI, *extra]


def test_cli_end_to_end(user_files, capsys):
    from safetensors.torch import load_file

    from nets import make_net

    assert main(_defend_cli(user_files, "--always")) == 0
    out = user_files / "out"
    assert sorted(p.name for p in out.iterdir()) == ["defended.safetensors", "report.html", "report.json", "report.md"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["defended"] and len(rep["scan"]["per_class_asr"]) == 5 and rep["sizes"]["evaluation"] == 12
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page and "<script" not in page
    assert rep["settings"]["trigger_shape"] == [1, 3, 3]  # resolved from the images, not left as "image channels"
    assert "trigger 1 x 3 x 3 (channels x rows x columns)" in (out / "report.md").read_text()
    net = make_net()
    net.load_state_dict(load_file(out / "defended.safetensors"))  # the user's architecture takes the weights
    assert "MESA defense report" in capsys.readouterr().out
    # an --out with files is refused, --force replaces the report's files
    assert main(_defend_cli(user_files)) == 2
    assert "holds files" in capsys.readouterr().err
    assert main(_defend_cli(user_files, "--force")) == 0


def test_cli_image_folder_torchvision_and_export(tmp_path, capsys):
    """The other model and data forms: an ImageFolder, torchvision's name + weights, a .pt2."""
    import torchvision
    from PIL import Image
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    for c in range(3):
        (tmp_path / "imgs" / f"class_{c}").mkdir(parents=True)
        for i in range(MIN_PER_CLASS):
            px = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(tmp_path / "imgs" / f"class_{c}" / f"{i}.png")
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18(num_classes=3)
    save_file(r18.state_dict(), tmp_path / "r18.safetensors")
    args = ["defend", "--data", str(tmp_path / "imgs"), *FAST_CLI, "--mean", "0.5,0.5,0.5", "--std", "0.25"]
    assert main(args + ["--model", str(tmp_path / "r18.safetensors"), "--torchvision", "resnet18",
                        "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rep["classes"] == ["class_0", "class_1", "class_2"] and "mean [0.5, 0.5, 0.5]" in rep["input_norm"]

    small = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 256, 3)).eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(small, (torch.rand(4, 3, 16, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "net.pt2")
    assert main(args + ["--model", str(tmp_path / "net.pt2"), "--out", str(tmp_path / "b"), "--always"]) == 0, \
        capsys.readouterr().err
    assert (tmp_path / "b" / "defended.safetensors").is_file()
    # a program exported with a fixed batch size is refused with what to do
    static = torch.export.export(small, (torch.rand(4, 3, 16, 16),))
    torch.export.save(static, tmp_path / "static.pt2")
    capsys.readouterr()
    assert main(args + ["--model", str(tmp_path / "static.pt2"), "--out", str(tmp_path / "c")]) == 2
    assert "dynamic" in capsys.readouterr().err and not (tmp_path / "c").exists()


def _bad_npz(files, **arrays):
    np.savez(files / "data.npz", **arrays)


BAD = {
    "weights_do_not_fit": (lambda f: None, ["--arch-kwargs", '{"hidden": 16}'],
                           "do not fit --arch nets:make_net: 3 tensor(s) differ in shape (1.weight"),
    "factory_cannot_be_imported": (lambda f: None, ["--arch", "no_such_module:make_net"],
                                   "cannot import no_such_module"),
    "output_size_differs": (lambda f: _bad_npz(f, images=np.zeros((48, 12, 12), np.uint8),
                                               labels=np.repeat(np.arange(4), 12)), [],
                            "outputs 5 scores per image but the data has 4 classes"),
    "images_wrong_range": (lambda f: _bad_npz(f, images=np.full((60, 12, 12), 2.0, np.float32),
                                              labels=np.repeat(np.arange(5), 12)), [], "values in [0, 1]"),
    "images_wrong_dtype": (lambda f: _bad_npz(f, images=np.zeros((60, 12, 12), np.int32),
                                              labels=np.repeat(np.arange(5), 12)), [], "uint8 (0..255) or float"),
    "images_wrong_shape": (lambda f: _bad_npz(f, images=np.zeros((60, 5, 12, 12), np.uint8),
                                              labels=np.repeat(np.arange(5), 12)), [], "1 or 3 channels"),
    "too_few_per_class": (lambda f: _bad_npz(f, images=np.zeros((15, 12, 12), np.uint8),
                                             labels=np.repeat(np.arange(5), 3)), [],
                          f"needs at least {MIN_PER_CLASS} per class"),
    "nan_outputs": (lambda f: _nan_weights(f), [], "NaN/inf outputs"),
    "pickle_checkpoint": (lambda f: (f / "net.pt").write_bytes(b"x"), ["--model", "PT"], "are not read"),
}


def _nan_weights(files):
    from safetensors.torch import load_file, save_file

    state = load_file(files / "net.safetensors")
    state["3.bias"][0] = float("nan")
    save_file(state, files / "net.safetensors")


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_input_one_line_before_training(user_files, capsys, monkeypatch, case):
    import mesa_lib.own as own

    prepare, extra, message = BAD[case]
    prepare(user_files)
    extra = [str(user_files / "net.pt") if e == "PT" else e for e in extra]
    monkeypatch.setattr(own, "_scan", lambda *a, **k: pytest.fail("trained on bad input"))
    assert main(_defend_cli(user_files, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (user_files / "out").exists()  # nothing written


def test_api_bad_input_raises_the_same_line(user_files):
    from nets import make_net

    x = torch.rand(60, 1, 12, 12)
    y = torch.arange(60) % 5
    with pytest.raises(ValueError, match="outputs 5 scores per image but the data has 6 classes"):
        scan(make_net(), x, torch.arange(60) % 6, progress=False)
    with pytest.raises(ValueError, match="values in \\[0, 1\\]"):
        scan(make_net(), x * 3, y, progress=False)
    with pytest.raises(ValueError, match="needs at least 10 per class"):
        scan(make_net(), x[:20], y[:20], progress=False)
    with pytest.raises(ValueError, match="trigger_size 13 is larger"):
        scan(make_net(), x, y, settings=DefenseSettings(trigger_size=13), progress=False)
    with pytest.raises(ValueError, match="detect_steps must be a positive integer"):
        DefenseSettings(detect_steps=0)
