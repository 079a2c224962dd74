"""Device safety without a GPU: the strict-device checker itself (mesa_lib.devicecheck), the
library's API run on its simulated device, and a static guard over the code.

On a GPU three mistakes fail that pass silently on a CPU-only machine: ``.numpy()`` (or
``np.asarray``, or a matplotlib call) on a CUDA tensor, an operation mixing a CUDA tensor with
a non-scalar CPU tensor, and indexing a CPU tensor with CUDA indices. Strict mode makes them
fail on the CPU as well (see the module's docstring); these tests check that it does, that it
lets correct code through, and that mesa_lib's functions are correct code.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

from mesa_lib import devicecheck
from mesa_lib.devicecheck import DeviceMixError, on_device

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the checker
def test_mode_is_off_outside_the_fixture():
    assert not devicecheck.enabled()
    x = torch.ones(2).to(devicecheck.SIM_DEVICE)  # no mode: a plain CPU tensor, no mark
    assert not on_device(x) and x.numpy().shape == (2,)


def test_moves_and_device_attribute(strict_device):
    x = torch.ones(3, 4)
    d = x.to(strict_device)
    assert on_device(d) and not on_device(x), ".to(device) must not mark its (host) source"
    assert d.device == strict_device and x.device == torch.device("cpu")
    assert d.device != torch.device("cpu"), "the simulated device must differ from the host"
    assert not on_device(d.cpu()) and on_device(d), ".cpu() must not unmark its (device) source"
    assert not on_device(d.to("cpu")) and on_device(d.to(torch.float64)) and on_device(d.double())
    assert on_device(x.to(d)) and not on_device(d.to(x)), ".to(other) takes other's device"
    assert on_device(d * 2) and on_device(d.sum()) and on_device(d[0]) and on_device(d.T)
    assert not on_device(x * 2)


def test_factories(strict_device):
    d = torch.ones(2, device=strict_device)
    assert on_device(d)
    assert on_device(torch.zeros(3, device=d.device)), "device=x.device of a device tensor"
    assert on_device(torch.zeros_like(d)) and on_device(d.new_zeros(4)) and on_device(d.new_tensor([1.0]))
    assert not on_device(torch.zeros(3)) and not on_device(torch.arange(3))
    assert not on_device(torch.tensor([1.0, 2.0])) and not on_device(torch.zeros(2, device="cpu"))
    assert on_device(torch.tensor([1.0], device=strict_device)) and on_device(torch.as_tensor(d))
    assert not on_device(torch.from_numpy(np.zeros(2)))
    g = torch.Generator(device=strict_device).manual_seed(0)
    assert on_device(torch.rand(3, generator=g, device=strict_device))


def test_numpy_and_array_refuse_device_tensors(strict_device):
    d = torch.arange(4.0).to(strict_device)
    with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
        d.numpy()
    with pytest.raises(TypeError, match="Tensor.cpu"):
        np.asarray(d)
    with pytest.raises(TypeError):
        plt.plot(d)
    plt.close("all")
    assert d.cpu().numpy().tolist() == [0.0, 1.0, 2.0, 3.0]
    assert d.detach().cpu().numpy().shape == (4,) and np.asarray(d.cpu()).shape == (4,)
    assert d.numpy(force=True).shape == (4,)  # force=True copies, on CUDA too
    # what works on CUDA works here
    assert d.tolist() == [0.0, 1.0, 2.0, 3.0] and d.sum().item() == 6.0 and float(d[1]) == 1.0
    assert f"{d.max():.1f}" == "3.0" and "tensor" in repr(d)


def test_mixing_devices(strict_device):
    d, h = torch.ones(3).to(strict_device), torch.ones(3)
    for op in (lambda: d + h, lambda: h * d, lambda: torch.cat([d, h]), lambda: torch.where(d > 0, d, h),
               lambda: torch.bucketize(d, h), lambda: d.index_select(0, torch.tensor([0]))):
        with pytest.raises(DeviceMixError, match="Expected all tensors to be on the same device"):
            op()
    with pytest.raises(DeviceMixError):
        torch.nn.functional.cross_entropy(d[None], torch.tensor([0]))
    h2 = torch.zeros(3)
    with pytest.raises(DeviceMixError):
        h2 += d  # in place on the host with a device operand
    # a host 0-dim tensor may join a device operation (CUDA allows CPU scalars)
    assert on_device(d + torch.tensor(2.0)) and on_device(d * 2)
    # shape-only reads and conversions across devices are fine
    assert on_device(d.view_as(h)) and not on_device(h.expand_as(d)) and on_device(h.type_as(d))
    # copies across devices are fine
    h.copy_(d)
    d.copy_(torch.zeros(3))
    assert on_device(d) and not on_device(h)


def test_indexing(strict_device):
    d, h = torch.arange(5.0).to(strict_device), torch.arange(5.0)
    idx_d, idx_h = torch.tensor([0, 2]).to(strict_device), torch.tensor([0, 2])
    assert on_device(d[idx_h]) and on_device(d[idx_d]) and on_device(d[h > 2])
    assert not on_device(h[idx_h])
    with pytest.raises(DeviceMixError, match="indices should be either on cpu"):
        h[idx_d]
    with pytest.raises(DeviceMixError, match="indices should be either on cpu"):
        h[d > 2]
    with pytest.raises(DeviceMixError):
        h[idx_d] = 1.0


def test_modules_and_optimiser(strict_device):
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    m = m.to(strict_device)
    assert all(on_device(p) for p in m.parameters()) and all(on_device(b) for b in m.buffers())
    assert next(m.parameters()).device == strict_device
    with pytest.raises(DeviceMixError):
        m(torch.ones(5, 4))  # host input into a device model
    x = torch.randn(5, 4).to(strict_device)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(2):
        loss = m(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert on_device(loss) and all(on_device(p.grad) for p in m.parameters())
    m2 = copy.deepcopy(m)
    assert all(on_device(p) for p in m2.parameters()), "deepcopy keeps the device"
    sd = m.state_dict()
    assert all(on_device(v) for v in sd.values())
    m3 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)).to(strict_device)
    m3.load_state_dict({k: v.cpu() for k, v in sd.items()})  # loads copy across devices
    assert all(on_device(p) for p in m3.parameters())
    assert all(not on_device(p) for p in m.cpu().parameters())


def test_strict_mode_nests_and_switches_off():
    with devicecheck.strict_device() as dev:
        with devicecheck.strict_device():
            pass
        assert devicecheck.enabled(), "an inner block must not switch the outer one off"
        d = torch.ones(2).to(dev)
    assert not devicecheck.enabled()
    assert d.numpy().shape == (2,)  # off again
    p = torch.nn.Parameter(torch.ones(1))
    assert type(p) is torch.nn.Parameter and not on_device(p)


def test_env_switch(monkeypatch):
    for value, want in [("", False), ("0", False), ("1", True), ("yes", True)]:
        monkeypatch.setenv(devicecheck.ENV, value)
        assert devicecheck.env_requested() is want


# ---------------------------------------------------------------- the two bugs of chapter 3
def test_catches_chapter_3_bugs(strict_device):
    """The two mistakes chapter 3 made, in miniature: scores computed on the device (like the
    ASR of every pattern) went to matplotlib via .numpy(), and a host tensor of patterns was
    indexed with device indices (argsort of the scores, and a boolean mask of them)."""
    from mesa_lib.plots import patterns_tensor

    all_patterns = patterns_tensor(range(16))  # built on the host, as in the chapter
    asr_all = torch.linspace(0, 1, 16).to(strict_device)  # computed on the device
    with pytest.raises(TypeError):
        asr_all.numpy()
    with pytest.raises(TypeError):
        plt.scatter(torch.arange(16.0), asr_all)
    plt.close("all")
    top = asr_all.argsort(descending=True)[:4]
    with pytest.raises(DeviceMixError):
        all_patterns[top]
    with pytest.raises(DeviceMixError):
        all_patterns[asr_all > 0.5]
    # the fixed versions
    assert asr_all.cpu().numpy().shape == (16,)
    assert all_patterns[top.cpu()].shape == (4, 1, 3, 3)
    assert all_patterns[(asr_all > 0.5).cpu()].shape[0] == 8


# ---------------------------------------------------------------- mesa_lib on the device
TINY = dict(hidden=8, mine_hidden=8, noise_dim=8, steps=2, batch_size=4, log_every=1)


@pytest.fixture
def dev_splits(strict_device, fake_fmnist_root):
    from mesa_lib.data import load_dataset

    splits = load_dataset("fashion-mnist", root=fake_fmnist_root, device=strict_device)
    assert on_device(splits.train.images) and on_device(splits.eval.labels)
    return splits


def test_library_pipeline_on_device(dev_splits, strict_device, tmp_path, torch_single_thread):
    """Train, backdoor, search (point baseline, MESA, Neural Cleanse), defend and evaluate on
    the simulated device: no function mixes host and device tensors or calls .numpy() on one."""
    from mesa_lib import (FixedTrigger, MesaConfig, attack_success_rate, build_model, clean_accuracy,
                          inject_backdoor, load_weights, retrain, reverse_engineer_triggers,
                          save_weights, scan_classes, stamp, train_classifier, train_mesa)
    from mesa_lib.evaluate import evaluate_model
    from mesa_lib.models import predict
    from mesa_lib.neural_cleanse import NCConfig, detect_backdoor, reverse_engineer_masks, unlearn
    from mesa_lib.pipeline import make_trigger
    from mesa_lib.triggers import pattern_id

    s = dev_splits
    trigger = make_trigger(s, 170).to(strict_device)
    assert pattern_id(trigger[0]) in (170, 341)
    model = build_model("small_cnn", s.channels, s.num_classes, s.image_size, width=4).to(strict_device)
    train_classifier(model, s.train, epochs=1, lr=0.01, batch_size=8, progress=False)
    inject_backdoor(model, s.train, trigger, 0, poison_ratio=0.5, epochs=1, batch_size=8, progress=False)
    assert all(on_device(p) for p in model.parameters())
    assert on_device(predict(model, s.eval.images))
    assert 0 <= clean_accuracy(model, s.eval) <= 1
    assert 0 <= attack_success_rate(model, s.eval, trigger, 0) <= 1
    evaluate_model(model, s.eval, trigger, 0)
    g = torch.Generator(device=strict_device).manual_seed(0)
    assert on_device(stamp(s.eval.images, trigger[None].expand(len(s.eval), -1, -1, -1), generator=g))

    found = reverse_engineer_triggers(model, s.model, 0, n_triggers=2, steps=2, batch_size=4, progress=False)
    assert on_device(found)

    sampler, history = train_mesa(model, s.model, 0, MesaConfig(betas=(0.5, 0.8), **TINY), progress=False)
    assert on_device(sampler.sample(3, generator=torch.Generator(device=strict_device).manual_seed(0)))
    assert on_device(sampler.sample(3, generator=torch.Generator().manual_seed(0)))
    assert 0 <= attack_success_rate(model, s.eval, sampler, 0) <= 1
    defended = retrain(model, s.train, sampler, ratio=0.5, epochs=1, batch_size=8, progress=False)
    assert all(on_device(p) for p in defended.parameters())
    retrain(model, s.train, FixedTrigger(trigger), ratio=0.5, epochs=1, batch_size=8, progress=False)
    scan = scan_classes(model, s.model, s.eval, MesaConfig(**TINY), beta=0.5, progress=False)
    assert len(scan.per_class_asr) == s.num_classes

    nc = reverse_engineer_masks(model, s.model, NCConfig(steps=2, batch_size=4), classes=[0, 1, 2], progress=False)
    detect_backdoor(nc)
    unlearn(model, s.train, nc.masks[0], nc.patterns[0], epochs=1, batch_size=8, progress=False)

    path = save_weights(model, tmp_path / "m.safetensors")
    fresh = build_model("small_cnn", s.channels, s.num_classes, s.image_size, width=4).to(strict_device)
    load_weights(fresh, path)
    assert all(on_device(p) for p in fresh.parameters())
    assert json.loads(json.dumps(history["mi"]))  # history: plain Python numbers


def test_plots_take_device_tensors(strict_device):
    from mesa_lib.plots import (bar_per_class, patterns_tensor, plot_training_history, show_images,
                                show_triggers, table, trigger_embedding)

    trig = patterns_tensor(torch.arange(12).to(strict_device))
    assert on_device(trig)
    show_images(torch.rand(4, 1, 8, 8).to(strict_device), titles=list("abcd"))
    show_triggers(trig, titles=[str(i) for i in range(12)], nrow=6)
    trigger_embedding(trig, color=torch.linspace(0, 1, 12).to(strict_device), max_thumbnails=3)
    bar_per_class(torch.rand(10).to(strict_device))
    hist = {"step": [0, 1], "f_mean": torch.rand(2, 2).to(strict_device),
            "valid_frac": [[0.1, 0.2], [0.3, 0.4]], "mi": [[0.0, 0.1], [0.2, 0.3]]}
    plot_training_history(hist, betas=[0.5, 0.8])
    plt.close("all")
    t = table([[torch.tensor(0.5).to(strict_device), 1]], ["asr", "n"])
    assert "50.0%" in t._repr_markdown_()


# ---------------------------------------------------------------- static guard
def _code_sources() -> list[tuple[str, str]]:
    """``(where, python source)`` of every mesa_lib module and every notebook code cell."""
    out = [(str(p.relative_to(ROOT)), p.read_text()) for p in sorted((ROOT / "mesa_lib").rglob("*.py"))]
    for nb in sorted((ROOT / "book").glob("*.ipynb")):
        for k, cell in enumerate(json.loads(nb.read_text())["cells"]):
            if cell["cell_type"] == "code":
                src = "".join(cell["source"])
                # IPython magics and shell escapes are not Python
                src = re.sub(r"^\s*[%!].*$", "", src, flags=re.M)
                out.append((f"{nb.relative_to(ROOT)} cell {k}", src))
    return out


def numpy_without_cpu(source: str) -> list[int]:
    """Line numbers of ``X.numpy()`` calls whose ``X`` is not ``Y.cpu()`` (``.detach()`` may
    come between: ``Y.cpu().detach().numpy()``, ``Y.detach().cpu().numpy()``)."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "numpy" and not node.args):
            recv = node.func.value
            while (isinstance(recv, ast.Call) and isinstance(recv.func, ast.Attribute)
                   and recv.func.attr == "detach"):
                recv = recv.func.value
            is_cpu = (isinstance(recv, ast.Call) and isinstance(recv.func, ast.Attribute)
                      and recv.func.attr == "cpu")
            if not is_cpu:
                bad.append(node.lineno)
    return bad


def test_static_guard_itself():
    ok = "a.cpu().numpy(); a.detach().cpu().numpy(); a.cpu().detach().numpy(); np.zeros(2)"
    assert numpy_without_cpu(ok) == []
    assert numpy_without_cpu("x = a.numpy()\ny = a.detach().numpy()\nz = f(a).numpy()") == [1, 2, 3]


def test_every_numpy_call_goes_through_cpu():
    offenders = [f"{where}: line {line}" for where, src in _code_sources()
                 for line in numpy_without_cpu(src)]
    assert not offenders, ("call .cpu() before .numpy() (a CUDA tensor has no numpy view): "
                           + "; ".join(offenders))


def test_sweep_task_on_device(dev_splits, strict_device, monkeypatch, tmp_path, torch_single_thread):
    """One task of the 51-pattern sweep (the whole pipeline plus Neural Cleanse and the oracle)
    with the splits on the simulated device; the result is plain JSON."""
    from mesa_lib import MesaConfig
    from mesa_lib.presets import Preset
    from mesa_lib.neural_cleanse import NCConfig
    from mesa_lib.sweep import SweepTask, run_task

    monkeypatch.setenv("MESA_CACHE_DIR", str(tmp_path / "cache"))
    tiny = Preset(name="tiny", width=4, batch_size=8, clean_epochs=1, attack_epochs=1, poison_ratio=0.2,
                  mesa=MesaConfig(hidden=8, mine_hidden=8, noise_dim=8, steps=3, batch_size=8),
                  detect_steps=2, detect_batch=4, point_steps=2, defense_epochs=1)
    line = run_task(SweepTask(170, 0), dev_splits, tiny, seed=0, nc=NCConfig(steps=2, batch_size=4))
    assert line["config"]["device"] == str(strict_device)
    json.dumps(line)  # plain numbers, no tensors


# ---------------------------------------------------------------- chapters in strict mode
# Every chapter but 9 runs whole with MESA_STRICT_DEVICE=1 in its one execution by
# tests/test_notebooks.py (scripts/notebooks.py's STRICT_DEVICE); every chapter: `make test-device`.


def test_strict_chapters_exist():
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import notebooks

    assert notebooks.STRICT_DEVICE <= {p.stem for p in notebooks.toc_notebooks()}
