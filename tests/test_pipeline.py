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
    assert "oracle" in b and "oracle" not in a and "oracle" in b["second"]
    b.pop("oracle")
    b["second"].pop("oracle")
    assert _without_times(a) == _without_times(b)
    # detect, then defend: the defended class is the scan's, and the line says if it is the true one
    assert a["defended_target"] == a["detection"]["detected_target"]
    assert a["target_detected"] == (a["defended_target"] == 0)
    # every point start is retrained under the headline protocol; the best is chosen on the check half
    ps = a["point_search"]
    assert len(ps["triggers"]) == TINY.point_starts == len(a["point_starts"]) == len(ps["check_asr"])
    assert ps["best"] == max(range(len(ps["check_asr"])), key=lambda i: ps["check_asr"][i])
    assert a["point"] == a["point_starts"][ps["best"]]
    # the residual valid set: the patterns that fired on the backdoored model, and each arm's leftovers
    fired = a["backdoored"]["fired_patterns"]
    assert a["backdoored"]["residual"]["fired"] == len(fired)
    for arm in ("mesa", "point"):
        for proto in (a, a["second"]):
            assert 0 <= proto[arm]["residual"]["fired"] <= 512
    assert [p["name"] for p in a["protocols"]] == ["headline", "second"]
    assert a["second"]["protocol"]["ratio"] == TINY.second_ratio
    assert a["config"]["preset"]["name"] == "tiny" and a["config"]["target"] == 0
    assert a["config"]["stamped_pattern"] == 341  # 170 on a dark background is stamped as 341
    c = run_pipeline(preset=TINY, seed=1, splits=fake_fmnist_splits, progress=False, device="cpu")
    assert c["point_search"]["triggers"] != a["point_search"]["triggers"], "another seed should give another run"
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
    """The paper's story on Fashion-MNIST with the fast preset, cold, under the headline
    protocol (the paper's 1%) and with one point start; the second protocol and the point
    starts are checked on tiny data above and in tests/test_sweep.py, and their numbers by
    chapter 9's committed lines."""
    if not real_fmnist_available():
        pytest.skip("Fashion-MNIST not found in /usr/share/datasets/fashion-mnist or the cache "
                    "(install dataset-fashion-mnist or run `make data`)")
    out = tmp_path / "r.json"
    r = run_pipeline(preset=get_preset("fast").with_(second_ratio=None, point_starts=1), seed=0, out=out,
                     progress=False)
    assert "second" not in r
    res = _check_result_file(out, r)
    print({k: r[k] for k in STAGE_KEYS}, r["detection"]["detected_target"], r["seconds"])
    assert res["backdoored"]["asr"] >= 0.9
    assert abs(res["backdoored"]["clean_acc"] - res["clean"]["clean_acc"]) <= 0.01
    assert res["detection"]["detected_target"] == 0
    assert res["mesa"]["asr"] <= 0.05
    assert res["mesa"]["clean_acc"] >= res["backdoored"]["clean_acc"] - 0.015
    assert res["clean"]["asr"] < 0.2  # the clean model has no backdoor


# ---------------------------------------------------------------- a cache that cannot lie


def _models(cache, kind="clean"):
    return sorted((cache / "models").glob(f"{kind}-*.safetensors"))


def test_cache_key_covers_threads_code_data_and_preset(fake_fmnist_splits, cache, monkeypatch):
    """Each thing that determines the weights misses the cache: the thread count, a change
    of the package's source, the data, and the preset's training fields."""
    import mesa_lib.common as common
    import mesa_lib.pipeline as pipeline

    sp = fake_fmnist_splits
    with common.torch_threads(1):
        one = get_clean_model(sp, TINY, seed=0, progress=False)
    with common.torch_threads(2):
        get_clean_model(sp, TINY, seed=0, progress=False)
    assert len(_models(cache)) == 2, "another thread count must not load the 1-thread model"
    with common.torch_threads(1):
        again = get_clean_model(sp, TINY, seed=0, progress=False)
        assert len(_models(cache)) == 2
        assert all(torch.equal(v, w) for v, w in zip(one.state_dict().values(), again.state_dict().values()))
        get_clean_model(sp, TINY.with_(clean_lr=0.01), seed=0, progress=False)
        assert len(_models(cache)) == 3
        get_clean_model(sp, TINY.with_(mesa={"steps": 99}), seed=0, progress=False)  # not a clean-training field
        assert len(_models(cache)) == 3
        fewer = type(sp)(name=sp.name, train=sp.train.subset(slice(0, 16)), model=sp.model, eval=sp.eval,
                         num_classes=sp.num_classes, classes=sp.classes)
        get_clean_model(fewer, TINY, seed=0, progress=False)
        assert len(_models(cache)) == 4


def test_changing_a_line_of_code_misses_the_cache(fake_fmnist_splits, cache, tmp_path, monkeypatch):
    """The code fingerprint hashes the package's sources: an edited copy of the package
    gets another fingerprint, and so another cache entry."""
    import shutil

    import mesa_lib.common as common

    copy = tmp_path / "pkg"
    shutil.copytree(common.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = common.code_fingerprint()
    try:
        monkeypatch.setattr(common, "PACKAGE_DIR", copy)
        common.code_fingerprint.cache_clear()
        assert common.code_fingerprint() == before, "a copy of the same source has the same fingerprint"
        models_py = copy / "models.py"
        models_py.write_text(models_py.read_text() + "\n# one changed line\n")
        common.code_fingerprint.cache_clear()
        changed = common.code_fingerprint()
        assert changed != before
        with common.torch_threads(1):
            get_clean_model(fake_fmnist_splits, TINY, seed=0, progress=False)
            assert len(_models(cache)) == 1
            monkeypatch.setattr(common, "PACKAGE_DIR", common.Path(__file__).resolve().parents[1] / "mesa_lib")
            common.code_fingerprint.cache_clear()
            assert common.code_fingerprint() == before
            get_clean_model(fake_fmnist_splits, TINY, seed=0, progress=False)
            assert len(_models(cache)) == 2, "the edited code's model must not be served to the original code"
    finally:
        common.code_fingerprint.cache_clear()


def test_corrupt_cache_entry_is_retrained_with_a_warning(fake_fmnist_splits, cache, torch_single_thread):
    first = get_clean_model(fake_fmnist_splits, TINY, seed=0, progress=False)
    (path,) = _models(cache)
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unusable model cache entry"):
        again = get_clean_model(fake_fmnist_splits, TINY, seed=0, progress=False)
    assert all(torch.equal(v, w) for v, w in zip(first.state_dict().values(), again.state_dict().values()))
    from mesa_lib.models import load_weights

    load_weights(again, path)  # the corrupt entry was replaced by a good one


def test_unwritable_cache_is_a_warning_not_an_error(fake_fmnist_splits, tmp_path, monkeypatch,
                                                    torch_single_thread):
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("x")
    monkeypatch.setenv("MESA_CACHE_DIR", str(blocker))
    with pytest.warns(UserWarning, match="could not write the model cache"):
        model = get_clean_model(fake_fmnist_splits, TINY, seed=0, progress=False)
    assert not model.training


def _save_many(args):
    path, seed = args
    import torch as t

    from mesa_lib.models import build_model, load_weights, save_weights

    t.manual_seed(seed)
    m = build_model("small_cnn", 1, 10, 28, 4)
    for _ in range(20):
        save_weights(m, path, {"seed": seed})
    load_weights(m, path)
    return True


def test_two_processes_saving_one_path_both_succeed(tmp_path):
    """Cache writes use unique temporary names: concurrent saves of the same entry do not
    clash, and the file left is a complete one."""
    import multiprocessing as mp

    from mesa_lib.models import build_model, load_weights

    path = tmp_path / "models" / "same.safetensors"
    with mp.get_context("spawn").Pool(2) as pool:
        assert pool.map(_save_many, [(path, 0), (path, 1)]) == [True, True]
    meta = load_weights(build_model("small_cnn", 1, 10, 28, 4), path)
    assert meta["seed"] in (0, 1)
    assert not [p for p in path.parent.iterdir() if p.name != "same.safetensors"], "no temporary files left"


def test_results_record_code_and_threads(fake_fmnist_splits, cache, tmp_path, torch_single_thread):
    from mesa_lib.common import code_fingerprint

    r = run_pipeline(preset=TINY, seed=0, splits=fake_fmnist_splits, progress=False, device="cpu")
    cfg = r["config"]
    assert cfg["code"] == code_fingerprint() and cfg["torch_threads"] == 1
    assert set(cfg["git"]) == {"commit", "dirty"}


def test_unwritable_out_fails_before_training(fake_fmnist_splits, tmp_path, monkeypatch):
    import mesa_lib.pipeline as pipeline

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(pipeline, "get_clean_model", no_training)
    (tmp_path / "a_file").write_text("x")
    for bad in (tmp_path, tmp_path / "a_file" / "r.json"):
        with pytest.raises(ValueError, match="--out|cannot write"):
            run_pipeline(preset=TINY, splits=fake_fmnist_splits, out=bad, progress=False, device="cpu")
