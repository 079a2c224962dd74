"""The pipeline: determinism and the result file on a tiny fake dataset, the model cache, and
one end-to-end run of the fast preset on the real Fashion-MNIST (the only slow test)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import real_fmnist_available
from mesa_lib.mesa import MesaConfig
from mesa_lib.pipeline import get_backdoored_model, get_clean_model, make_trigger, run_pipeline
from mesa_lib.presets import PRESETS, Preset, get_preset
from mesa_lib.triggers import pattern_id

# a preset small enough to run the whole pipeline on 20 fake images in about a second
TINY = Preset(
    name="tiny", width=4, batch_size=8, clean_epochs=1, attack_epochs=1, poison_ratio=0.2,
    mesa=MesaConfig(hidden=8, mine_hidden=8, noise_dim=8, steps=3, batch_size=8),
    detect_steps=2, detect_batch=4, point_steps=2, defense_epochs=1,
)
STAGE_KEYS = ("clean", "backdoored", "mesa", "point")


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """An empty model cache, so runs are cold and never touch the user's cache."""
    d = tmp_path / "cache"
    monkeypatch.setenv("MESA_CACHE_DIR", str(d))
    return d


def _check_result_file(path, result, num_classes=10):
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["status"] == "complete"
    for key in STAGE_KEYS:
        assert set(on_disk[key]) >= {"clean_acc", "asr"}
        assert 0.0 <= on_disk[key]["clean_acc"] <= 1.0 and 0.0 <= on_disk[key]["asr"] <= 1.0
    det = on_disk["detection"]
    assert len(det["per_class_asr"]) == num_classes and 0 <= det["detected_target"] < num_classes
    assert on_disk["seconds"]["total"] > 0
    assert on_disk["seconds"]["total"] >= max(v for k, v in on_disk["seconds"].items() if k != "total")
    return on_disk


def _without_times(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "seconds"}


def test_tiny_pipeline_writes_result_and_is_deterministic(fake_fmnist_splits, cache, tmp_path, torch_single_thread):
    a = run_pipeline(preset=TINY, seed=0, splits=fake_fmnist_splits, out=tmp_path / "a.json", progress=False,
                     device="cpu")
    b = run_pipeline(preset=TINY, seed=0, splits=fake_fmnist_splits, out=tmp_path / "b.json", progress=False,
                     device="cpu", oracle=True)
    _check_result_file(tmp_path / "a.json", a)
    _check_result_file(tmp_path / "b.json", b)
    assert "oracle" in b and "oracle" not in a
    b.pop("oracle")
    assert _without_times(a) == _without_times(b)
    assert a["config"]["preset"]["name"] == "tiny" and a["config"]["target"] == 0
    assert a["config"]["stamped_pattern"] == 341  # 170 on a dark background is stamped as 341
    c = run_pipeline(preset=TINY, seed=1, splits=fake_fmnist_splits, progress=False, device="cpu")
    assert c["point_trigger"] != a["point_trigger"], "another seed should give another run"
    assert not any(cache.rglob("*.safetensors")), "use_cache=False must not write the model cache"


def test_model_cache_round_trip(fake_fmnist_splits, cache, torch_single_thread):
    sp = fake_fmnist_splits
    clean = get_clean_model(sp, TINY, seed=0, progress=False)
    files = list((cache / "models").glob("clean-*.safetensors"))
    assert len(files) == 1
    again = get_clean_model(sp, TINY, seed=0, progress=False)  # loaded, not retrained
    for (k, v), w in zip(clean.state_dict().items(), again.state_dict().values()):
        assert torch.equal(v, w), k
    other = get_clean_model(sp, TINY, seed=1, progress=False)
    assert len(list((cache / "models").glob("clean-*.safetensors"))) == 2
    assert not all(torch.equal(v, w) for v, w in zip(clean.state_dict().values(), other.state_dict().values()))

    trig = make_trigger(sp, 170)
    bd = get_backdoored_model(clean, sp, trig, 0, TINY, seed=0, progress=False)
    bd2 = get_backdoored_model(clean, sp, trig, 0, TINY, seed=0, progress=False)
    assert len(list((cache / "models").glob("backdoored-*.safetensors"))) == 1
    for v, w in zip(bd.state_dict().values(), bd2.state_dict().values()):
        assert torch.equal(v, w)
    # the clean model is not modified by the attack
    for (k, v), w in zip(clean.state_dict().items(), again.state_dict().values()):
        assert torch.equal(v, w), k


def test_make_trigger(fake_fmnist_splits):
    t = make_trigger(fake_fmnist_splits, 170)
    assert t.shape == (1, 3, 3) and pattern_id(t) == 341  # bright member on dark Fashion-MNIST
    c1, c2 = make_trigger(fake_fmnist_splits, 170, color_seed=1), make_trigger(fake_fmnist_splits, 170, color_seed=1)
    assert torch.equal(c1, c2) and c1.shape == (1, 3, 3)


def test_presets():
    assert set(PRESETS) == {"fast", "paper"}
    assert get_preset("fast") is PRESETS["fast"] and get_preset(TINY) is TINY
    paper = get_preset("paper")
    # the authors' settings (method.md)
    assert paper.model == "resnet18" and paper.poison_ratio == 0.01 and paper.attack_lr == 1e-3
    assert paper.mesa.betas == (0.5, 0.8, 0.9) and paper.mesa.alpha == 0.1 and paper.mesa.noise_dim == 64
    changed = PRESETS["fast"].with_(width=8, mesa={"steps": 7})
    assert changed.width == 8 and changed.mesa.steps == 7 and PRESETS["fast"].mesa.steps != 7


@pytest.mark.slow
def test_fast_pipeline_end_to_end(cache, tmp_path):
    """The paper's story on Fashion-MNIST with the fast preset, cold (about 60-90 s on 2 cores)."""
    if not real_fmnist_available():
        pytest.skip("Fashion-MNIST not found in /usr/share/datasets/fashion-mnist or the cache "
                    "(install dataset-fashion-mnist or run `make data`)")
    out = tmp_path / "r.json"
    r = run_pipeline(preset="fast", seed=0, out=out, progress=False)
    res = _check_result_file(out, r)
    print({k: r[k] for k in STAGE_KEYS}, r["detection"]["detected_target"], r["seconds"])
    assert res["backdoored"]["asr"] >= 0.9
    assert abs(res["backdoored"]["clean_acc"] - res["clean"]["clean_acc"]) <= 0.01
    assert res["detection"]["detected_target"] == 0
    assert res["mesa"]["asr"] <= 0.05
    assert res["mesa"]["clean_acc"] >= res["backdoored"]["clean_acc"] - 0.015
    assert res["clean"]["asr"] < 0.2  # the clean model has no backdoor
