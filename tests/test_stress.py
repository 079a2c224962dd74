"""Several triggers for one target (mesa_lib.stress): the attack stamps one of k triggers per
poisoned image and every one takes; pattern-sets are far apart; the line's bookkeeping (the
took check, the arms, the point starts chosen on the defender's score, resume, MESA's mode
coverage) on tiny data. The science is in the committed results, not here."""

from __future__ import annotations

import json

import pytest
import torch

from mesa_lib.attack import inject_backdoor, poison_transform
from mesa_lib.cli import main
from mesa_lib.data import ImageSet, load_dataset
from mesa_lib.defense import retrain
from mesa_lib.evaluate import attack_success_rate, clean_accuracy
from mesa_lib.models import build_model
from mesa_lib.presets import get_preset
from mesa_lib.stress import (REGION_RADIUS, arm_table, binary_ids, grey_sets, hamming, mode_coverage, paired,
                             pattern_sets, region_sample, run_stress, run_stress_line, setting_label)
from mesa_lib.triggers import MultiTrigger, bright_member, canonical_patterns, pattern_id, patterns_tensor

TINY = get_preset("fast").with_(
    width=4, clean_epochs=1, attack_epochs=1, detect_steps=2, detect_batch=4, point_steps=2, defense_epochs=1,
    mesa={"steps": 2, "batch_size": 8, "hidden": 16, "mine_hidden": 16},
)


@pytest.fixture
def fmnist_root(tmp_path, fake_fmnist_writer, monkeypatch):
    """Fake Fashion-MNIST (200 train, 50 test) and a private model cache."""
    monkeypatch.setenv("MESA_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "fmnist"
    fake_fmnist_writer(root, n_train=200, n_test=50)
    return root


# ---------------------------------------------------------------- the attack


def test_multi_trigger_draws_each_trigger_seeded():
    trig = patterns_tensor([511, 341, 186])
    s = MultiTrigger(trig)
    a = s.sample(600, torch.Generator().manual_seed(0))
    ids = binary_ids(a)
    counts = torch.bincount(ids, minlength=512)[[511, 341, 186]]
    assert int(counts.sum()) == 600 and int(counts.min()) > 150  # each about a third
    assert torch.equal(a, s.sample(600, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=r"stack of triggers \[k, C, p, p\]"):
        MultiTrigger(trig[0])
    with pytest.raises(ValueError, match="NaN/inf"):
        MultiTrigger(torch.full((2, 1, 3, 3), float("nan")))


def test_poison_transform_with_a_stack_stamps_one_of_them_per_image():
    x, y = torch.zeros(64, 1, 8, 8), torch.ones(64, dtype=torch.long)
    trig = patterns_tensor([511, 341])
    xp, yp = poison_transform(trig, target=0, poison_ratio=0.5)(x, y, torch.Generator().manual_seed(1))
    assert (yp[:32] == 0).all() and (yp[32:] == 1).all() and (xp[32:] == 0).all()
    seen = set()
    for img in xp[:32, 0]:
        nz = torch.nonzero(img)
        r, c = int(nz[:, 0].min()), int(nz[:, 1].min())
        patch = img[r:r + 3, c:c + 3]
        seen.add(pattern_id(patch))
        assert float(img.sum()) == float(patch.sum())  # nothing outside one 3x3 patch
    assert seen == {511, 341}


def _dark_or_bright(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.1 + 0.5 * y.float().reshape(-1, 1, 1, 1) + 0.1 * torch.rand(n, 1, 12, 12, generator=g)
    return ImageSet(x, y)


def test_two_triggers_both_take_and_the_oracle_of_both_removes_them(torch_single_thread):
    """A 2-class toy: dark images with either white pattern become class 1; retraining against
    both triggers (the oracle of a multi-trigger attack) removes both."""
    data, test = _dark_or_bright(), _dark_or_bright(200, seed=1)
    trig = patterns_tensor([511, 341])
    torch.manual_seed(0)
    model = build_model("small_cnn", 1, 2, 12, width=4)
    inject_backdoor(model, data, trig, target=1, poison_ratio=0.3, epochs=6, lr=0.05, batch_size=32, progress=False)
    before = [attack_success_rate(model, test, t, target=1) for t in trig]
    assert min(before) >= 0.9 and clean_accuracy(model, test) >= 0.95
    fixed = retrain(model, data, MultiTrigger(trig), ratio=0.5, epochs=6, lr=0.05, batch_size=32, progress=False)
    after = [attack_success_rate(fixed, test, t, target=1) for t in trig]
    assert max(after) <= 0.1 and clean_accuracy(fixed, test) >= 0.95


def test_inject_backdoor_refuses_an_empty_stack(fmnist_root):
    splits = load_dataset("fashion-mnist", root=fmnist_root)
    model = build_model("small_cnn", 1, 10, 28, width=4)
    with pytest.raises(ValueError, match=r"\[k, C, p, p\] for several"):
        inject_backdoor(model, splits.train, torch.ones(0, 1, 3, 3), 0, progress=False)


# ---------------------------------------------------------------- pattern-sets and samples


@pytest.mark.parametrize("k,n", [(2, 8), (3, 8), (4, 6)])  # only 6 sets of 4 are 5+ pixels apart
def test_pattern_sets_are_far_apart_stamped_and_seeded(k, n):
    stamped = {bright_member(c) for c in canonical_patterns()}
    sets = pattern_sets(k, n, seed=0)
    assert len(set(sets)) == n and sets == pattern_sets(k, n, seed=0) and sets != pattern_sets(k, n, seed=1)
    for s in sets:
        assert len(s) == k and set(s) <= stamped
        assert all(hamming(a, b) >= 5 for i, a in enumerate(s) for b in s[i + 1:])
        assert all(511 - a not in s for a in s)  # no pattern with its inverse


def test_pattern_sets_refuse_impossible_requests():
    with pytest.raises(ValueError, match="k >= 1"):
        pattern_sets(0, 3)
    assert len(pattern_sets(1, 51)) == 51  # one trigger: each stamped pattern once
    with pytest.raises(ValueError, match="ask for fewer"):
        pattern_sets(3, 10, min_distance=8)


def test_binary_ids_match_pattern_id():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 1, 3, 3, generator=g)
    assert binary_ids(x).tolist() == [pattern_id(t) for t in x]


class _FakeSampler:
    """Step 0 always draws pattern 511, step 1 alternates 341 and one pixel off 186."""

    betas = (0.5, 0.9)

    def sample_step(self, i, n, generator=None):
        if i == 0:
            return patterns_tensor([511] * n)
        return patterns_tensor([341, 186 ^ 1] * (n // 2))


class _GreySampler:
    """Step 0 draws the first grey trigger plus 0.05, step 1 a point 0.5 away from both."""

    betas = (0.5, 0.9)

    def __init__(self, trig):
        self.trig = trig

    def sample_step(self, i, n, generator=None):
        x = (self.trig[0] + 0.05) if i == 0 else (self.trig[1] * 0 + 0.5)
        return x.expand(n, -1, -1, -1).clone()


def test_grey_sets_region_sample_and_grey_coverage():
    sets = grey_sets(2, 3, seed=0)
    assert [tuple(t.shape) for t in sets] == [(2, 1, 3, 3)] * 3 and all(((t >= 0) & (t <= 1)).all() for t in sets)
    assert torch.equal(sets[1], grey_sets(2, 2, seed=0)[1]) and not torch.equal(sets[0], grey_sets(2, 1, seed=1)[0])
    trig = torch.tensor([0.0, 1.0]).repeat_interleave(9).reshape(2, 1, 3, 3)  # all black, all white
    region = region_sample(trig, n=100, seed=0)
    assert region.shape == (100, 1, 3, 3) and ((region >= 0) & (region <= 1)).all()
    d = (region - trig[torch.arange(100) % 2]).abs().amax((1, 2, 3))
    assert (d <= REGION_RADIUS + 1e-6).all() and d.max() > REGION_RADIUS / 2  # spread over the region
    assert torch.equal(region, region_sample(trig, n=100, seed=0))
    cov = mode_coverage(_GreySampler(trig), trig, fired=[0], n=20)
    assert cov[0]["exact"] == [1.0, 0.0] and cov[0]["near"] == [1.0, 0.0] and cov[0]["in_valid"] == 1.0
    assert cov[1]["exact"] == [0.0, 0.0] and cov[1]["near"] == [0.0, 0.0]


def test_setting_label_names_what_differs_from_the_preset():
    base = {"k": 2, "preset": get_preset("fast").to_dict(), "protocol": "headline", "trigger_kind": "binary"}
    assert setting_label(base) == "k = 2"
    strong = base | {"preset": get_preset("fast").with_(poison_ratio=0.3, attack_epochs=3).to_dict()}
    assert setting_label(strong) == "k = 2, poison 30%, 3 attack epochs"
    assert setting_label(base | {"k": 1, "trigger_kind": "grey"}) == "k = 1, grey"
    assert setting_label(base | {"protocol": "second"}) == "k = 2, second protocol"


def test_mode_coverage_counts_exact_and_near_hits_per_sub_model():
    cov = mode_coverage(_FakeSampler(), [511, 341, 186], fired=[511], n=100)
    assert cov[0]["exact"] == [1.0, 0.0, 0.0] and cov[0]["in_valid"] == 1.0 and cov[0]["distinct"] == 1
    assert cov[1]["exact"] == [0.0, 0.5, 0.0] and cov[1]["near"] == [0.0, 0.5, 0.5]
    assert cov[1]["in_valid"] == 0.0 and cov[1]["distinct"] == 2 and cov[1]["beta"] == 0.9


# ---------------------------------------------------------------- lines, resume, summaries


def test_a_backdoor_that_did_not_take_is_recorded_and_not_defended(fmnist_root):
    splits = load_dataset("fashion-mnist", root=fmnist_root)
    line = run_stress_line((403, 488), splits, TINY.with_(poison_ratio=0.0), took_at=0.5)
    assert line["status"] == "attack_failed" and line["took"] == [False, False]
    assert "mesa" not in line and len(line["backdoored"]["asr_each"]) == 2


def test_a_complete_line_has_every_arm_and_picks_actual_starts(fmnist_root, tmp_path):
    out = tmp_path / "stress.jsonl"
    lines = run_stress(2, 1, out, preset=TINY, root=fmnist_root, progress=False, took_at=0.0)
    assert [l["patterns"] for l in lines] == [list(s) for s in pattern_sets(2, 1)]
    line = json.loads(out.read_text().splitlines()[0])
    assert line["status"] == "complete" and line["config"]["code"] and "git" in line["config"]
    for arm in ("clean", "backdoored", "mesa", "point", "point_median", "point_worst", "random", "nc", "oracle"):
        assert len(line[arm]["asr_each"]) == 2 and {"fired", "mean_fired_before"} <= set(line[arm]["residual"])
    assert line["nc_detection"]["detected_target"] in range(10)
    ps = line["point_search"]
    score = ps["check_asr"]
    ch = ps["chosen"]
    assert score[ch["point"]] == max(score) and score[ch["point_worst"]] == min(score)
    assert sorted(score)[len(score) // 2] == score[ch["point_median"]]
    assert line["point_median"] == line["point_starts"][ch["point_median"]]  # an actual start
    assert len(line["mesa_search"]["coverage"]) == len(TINY.mesa.betas)
    # resume: nothing is redone; another k cannot write into this file
    before = out.read_text()
    run_stress(2, 1, out, preset=TINY, root=fmnist_root, progress=False, took_at=0.0)
    assert out.read_text() == before
    with pytest.raises(ValueError, match="other code or settings.*k"):
        run_stress(3, 1, out, preset=TINY, root=fmnist_root, progress=False, took_at=0.0)
    table = arm_table(lines)
    assert set(table) >= {"mesa", "oracle", "point_median"} and len(table["mesa"]["asr_each"]) == 2
    test = paired(lines, "point_median")
    assert test["n"] == 1 and test["lower"] + test["higher"] + test["ties"] == 1


def test_a_grey_line_measures_the_region_under_the_second_protocol(fmnist_root, tmp_path):
    out = tmp_path / "grey.jsonl"
    preset = TINY.with_(second_epochs=0.5)
    lines = run_stress(1, 1, out, preset=preset, root=fmnist_root, progress=False, took_at=0.0, grey=True,
                       protocol="second", nc=False)
    line = lines[0]
    assert line["status"] == "complete" and line["patterns"] is None and line["k"] == 1
    assert torch.allclose(torch.tensor(line["triggers"]), grey_sets(1, 1)[0])
    assert line["protocol"]["name"] == "second" and line["protocol"]["epochs"] == 0.5 and "nc" not in line
    for arm in ("clean", "backdoored", "mesa", "point", "oracle"):
        assert {"fired", "mean_fired_before", "max"} <= set(line[arm]["region"])
    # the region's fired patches are counted against the backdoored model's
    assert line["backdoored"]["region"]["fired"] <= 512
    assert all(isinstance(d, float) for row in line["point_search"]["distances"] for d in row)
    assert setting_label(line["config"]) == "k = 1, grey, second protocol"
    table = arm_table(lines)
    assert "nc" not in table and "region_residual" in table["mesa"]
    assert paired(lines, "point_median", "region_residual")["n"] == 1
    # a binary run cannot resume into a grey file
    with pytest.raises(ValueError, match="other code or settings.*trigger_kind"):
        run_stress(1, 1, out, preset=preset, root=fmnist_root, progress=False, took_at=0.0, protocol="second",
                   nc=False)


def _line(mesa_res, point_res):
    arm = lambda v: {"residual": {"fired": 0, "mean_fired_before": v, "max": v}, "asr_each": [v], "clean_acc": 0.9}
    return {"status": "complete", "k": 1, "mesa": arm(mesa_res), "point_median": arm(point_res)}


def test_paired_difference_and_sign_test_on_known_numbers():
    lines = [_line(0.1, 0.3), _line(0.2, 0.3), _line(0.1, 0.5), _line(0.4, 0.2)]
    t = paired(lines, "point_median")
    assert t["mean_diff"] == pytest.approx((-0.2 - 0.1 - 0.4 + 0.2) / 4)
    assert (t["lower"], t["higher"], t["ties"]) == (3, 1, 0)
    assert t["ci"][0] < t["mean_diff"] < t["ci"][1]


def test_cli_stress_bad_k_is_one_line_exit_2(capsys, tmp_path):
    assert main(["stress", "--k", "0", "--out", str(tmp_path / "s.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "k >= 1" in err[0]
    assert not (tmp_path / "s.jsonl").exists()


@pytest.mark.parametrize("opt,value,words", [("--poison-ratio", "1.5", "--poison-ratio must be in (0, 1)"),
                                             ("--poison-ratio", "nan", "--poison-ratio must be a finite"),
                                             ("--attack-epochs", "0", "--attack-epochs must be > 0"),
                                             ("--protocol", "third", "invalid choice")])
def test_cli_stress_bad_attack_settings_are_one_line_exit_2(capsys, tmp_path, opt, value, words):
    assert main(["stress", opt, value, "--out", str(tmp_path / "s.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1] and not (tmp_path / "s.jsonl").exists()
