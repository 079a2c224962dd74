"""The detection game (mesa_lib.zoo): building a zoo with its key apart, never overwriting,
grading submissions (AUROC with ties, target accuracy, malformed CSVs), the reference
solution, and the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import real_fmnist_available
from mesa_lib.cli import main
from mesa_lib.zoo import (SUBMISSION_COLUMNS, _plan, auroc, build_zoo, default_key_path, grade,
                          leaderboard_line, load_manifest, load_zoo_model, reference_submission)

# --------------------------------------------------------------------------- AUROC


def test_auroc_hand_computed_with_ties():
    # positives {0.9, 0.8}, negatives {0.8, 0.1}: pairs 0.9>0.8, 0.9>0.1, 0.8=0.8 (1/2), 0.8>0.1
    assert auroc([0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0]) == pytest.approx(3.5 / 4)
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auroc([1, 2, 3, 4], [1, 1, 0, 0]) == 0.0
    assert auroc([5, 5, 5], [1, 0, 1]) == 0.5  # all tied: chance
    assert math.isnan(auroc([1, 2], [1, 1]))  # no negatives: undefined


def _auroc_by_ranks(scores, labels):
    """Mann-Whitney U from mid-ranks: an independent way to the same number."""
    s = np.asarray(scores, float)
    y = np.asarray(labels, bool)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[order[j + 1]] == s[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n1, n0 = y.sum(), (~y).sum()
    return (ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


def test_auroc_matches_rank_formula_on_random_scores_with_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randint(0, 6, (30,), generator=g).float().tolist()  # many ties
        labels = (torch.rand(30, generator=g) < 0.4).tolist()
        assert auroc(scores, labels) == pytest.approx(_auroc_by_ranks(scores, labels))


# --------------------------------------------------------------------------- grading


@pytest.fixture
def key_file(tmp_path):
    """A hand-written key: 4 backdoored and 2 clean models."""
    models = {f"model_{i:02d}": {"backdoored": i < 4, **({"target": i + 1} if i < 4 else {})} for i in range(6)}
    key = {"format": "mesa-zoo-key/1", "n": 6, "n_backdoored": 4, "models": models,
           "settings": {"num_classes": 10, "dataset": "fashion-mnist"}}
    path = tmp_path / "keys" / "zoo_key.json"
    path.parent.mkdir()
    path.write_text(json.dumps(key))
    return path


def _write_csv(path, rows, header=",".join(SUBMISSION_COLUMNS)):
    path.write_text("\n".join([header] + [",".join(map(str, r)) for r in rows]) + "\n")
    return path


def test_grade_perfect_submission(key_file, tmp_path):
    rows = [(f"model_{i:02d}", 1.0 if i < 4 else 0.0, i + 1 if i < 4 else 0) for i in range(6)]
    r = grade(key_file, _write_csv(tmp_path / "perfect.csv", rows[::-1]))  # row order does not matter
    assert r["auroc"] == 1.0 and r["target_accuracy"] == 1.0 and r["targets_correct"] == 4
    line = leaderboard_line(r, "team A")
    assert line.startswith("team A: AUROC 1.000") and "target accuracy 1.000 (4/4" in line


def test_grade_random_submission_is_scored_correctly(key_file, tmp_path):
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(6, generator=g).tolist()
    scores[4] = scores[1]  # a tie between a clean and a backdoored model
    targets = [1, 0, 3, 9, "", 5]  # right on model_00 and model_02; an empty target is allowed
    rows = [(f"model_{i:02d}", scores[i], targets[i]) for i in range(6)]
    r = grade(key_file, _write_csv(tmp_path / "random.csv", rows))
    labels = [True] * 4 + [False] * 2
    pairs = [(p, q) for p in range(4) for q in (4, 5)]
    expected = sum(1.0 if scores[p] > scores[q] else 0.5 if scores[p] == scores[q] else 0.0
                   for p, q in pairs) / len(pairs)
    assert r["auroc"] == pytest.approx(expected) == pytest.approx(auroc(scores, labels))
    assert r["targets_correct"] == 2 and r["target_accuracy"] == 0.5


@pytest.mark.parametrize("rows, needle", [
    ([(f"model_{i:02d}", 0.5, 1) for i in range(5)], "no row for model_05"),
    ([(f"model_{i:02d}", 0.5, 1) for i in range(6)] + [("model_03", 0.1, 2)], "model_03 appears twice"),
    ([(f"model_{i:02d}", "high" if i == 2 else 0.5, 1) for i in range(6)], "backdoored_score of model_02"),
    ([(f"model_{i:02d}", "nan" if i == 2 else 0.5, 1) for i in range(6)], "finite number"),
    ([(f"model_{i:02d}", 0.5, 1) for i in range(6)] + [("model_99", 0.5, 1)], "unknown model 'model_99'"),
    ([(f"model_{i:02d}", 0.5, 10 if i == 1 else 1) for i in range(6)], "suspected_target of model_01"),
    ([(f"model_{i:02d}", 0.5, "cat" if i == 1 else 1) for i in range(6)], "class index"),
])
def test_malformed_submission_is_one_error_line_exit_2(key_file, tmp_path, capsys, rows, needle):
    sub = _write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        grade(key_file, sub)
    assert main(["grade", "--key", str(key_file), "--submission", str(sub)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: ") and needle in out.err
    assert out.err.count("\n") == 1


def test_submission_without_the_columns_is_rejected(key_file, tmp_path, capsys):
    sub = _write_csv(tmp_path / "bad.csv", [("model_00", 0.5)], header="model,score")
    assert main(["grade", "--key", str(key_file), "--submission", str(sub)]) == 2
    assert "missing backdoored_score, suspected_target" in capsys.readouterr().err
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert main(["grade", "--key", str(key_file), "--submission", str(empty)]) == 2
    assert main(["grade", "--key", str(tmp_path / "nokey.json"), "--submission", str(empty)]) == 2


def test_cli_grade_prints_one_leaderboard_line(key_file, tmp_path, capsys):
    rows = [(f"model_{i:02d}", 1.0 if i < 4 else 0.0, 0) for i in range(6)]
    sub = _write_csv(tmp_path / "sub.csv", rows)
    assert main(["grade", "--key", str(key_file), "--submission", str(sub), "--name", "ref"]) == 0
    out = capsys.readouterr().out
    assert out == "ref: AUROC 1.000 | target accuracy 0.000 (0/4 backdoored models) | 6 models\n"


# --------------------------------------------------------------------------- building


def test_plan_is_seeded_and_balanced():
    a, b = _plan(20, 7, 0.5, 4, 10), _plan(20, 7, 0.5, 4, 10)
    assert a == b and a != _plan(20, 8, 0.5, 4, 10)
    assert sum(e["backdoored"] for e in a) == 10
    assert sorted(e["name"] for e in a) == [f"model_{i:02d}" for i in range(20)]
    assert len({e["seed"] for e in a}) == 20  # every model its own fine-tuning seed
    assert all(0 <= e["target"] < 10 for e in a if e["backdoored"])


def test_never_overwrites_and_key_stays_outside(tmp_path, fake_fmnist_splits, capsys):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="never overwritten"):
        build_zoo(zoo, n=2, seed=0, splits=fake_fmnist_splits, progress=False)
    with pytest.raises(ValueError, match="inside the zoo folder"):
        build_zoo(tmp_path / "z2", n=2, seed=0, key=tmp_path / "z2" / "key.json", splits=fake_fmnist_splits,
                  progress=False)
    key = tmp_path / "taken.json"
    key.write_text("{}")
    with pytest.raises(ValueError, match="never overwritten"):
        build_zoo(tmp_path / "z3", n=2, seed=0, key=key, splits=fake_fmnist_splits, progress=False)
    assert key.read_text() == "{}" and (zoo / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "z2").exists() and not (tmp_path / "z3").exists()
    assert main(["zoo", "--out", str(zoo), "--n", "2", "--quiet"]) == 2
    assert "choose another --out" in capsys.readouterr().err


def test_tiny_zoo_on_fake_data_then_no_overwrite(tmp_path, fake_fmnist_splits, torch_single_thread):
    key = build_zoo(tmp_path / "zoo", n=3, seed=1, splits=fake_fmnist_splits, progress=False)
    assert default_key_path(tmp_path / "zoo") == tmp_path / "zoo_key.json"
    assert json.loads((tmp_path / "zoo_key.json").read_text()) == json.loads(json.dumps(key))
    with pytest.raises(ValueError, match="never overwritten"):
        build_zoo(tmp_path / "zoo", n=3, seed=1, splits=fake_fmnist_splits, progress=False)
    # another folder but an existing key file: refused, the first key untouched
    before = (tmp_path / "zoo_key.json").read_text()
    with pytest.raises(ValueError, match="keys are never overwritten"):
        build_zoo(tmp_path / "zoo2", n=3, seed=2, key=tmp_path / "zoo_key.json", splits=fake_fmnist_splits,
                  progress=False)
    assert (tmp_path / "zoo_key.json").read_text() == before and not (tmp_path / "zoo2").exists()
    # the seed (kept in the key) re-derives the zoo: same plan, same weights
    again = build_zoo(tmp_path / "again", n=3, seed=1, splits=fake_fmnist_splits, progress=False)
    assert {k: {f: v for f, v in m.items() if f not in ("clean_acc", "asr")} for k, m in again["models"].items()} \
        == {k: {f: v for f, v in m.items() if f not in ("clean_acc", "asr")} for k, m in key["models"].items()}
    for name in key["models"]:
        a = load_zoo_model(tmp_path / "zoo", name).state_dict()
        b = load_zoo_model(tmp_path / "again", name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def real_zoo(tmp_path_factory):
    """3 models (2 backdoored) on the first 1000 Fashion-MNIST training images, one base."""
    if not real_fmnist_available():
        pytest.skip("Fashion-MNIST not found (install dataset-fashion-mnist or run `make data`)")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("zoo")
        key = build_zoo(root / "class_zoo", n=3, seed=123457, train_limit=1000, bases=1, device="cpu", progress=False)
    finally:
        torch.set_num_threads(before)
    return root, key


def test_zoo_end_to_end(real_zoo, tmp_path, capsys):
    root, key = real_zoo
    zoo = root / "class_zoo"
    names = [f"model_{i:02d}" for i in range(3)]
    files = sorted(p.name for p in zoo.iterdir())
    assert files == sorted([f"{n}.safetensors" for n in names] + ["zoo.json"])  # no key, nothing else
    assert (root / "class_zoo_key.json").is_file() and key["n_backdoored"] == 2
    assert sorted(key["models"]) == names
    # what students get says nothing about who is backdoored, nor the seed
    public = (zoo / "zoo.json").read_text()
    manifest = load_manifest(zoo)
    assert [m["name"] for m in manifest["models"]] == names
    assert manifest["defender_data"]["split"] == "model"
    assert str(key["seed"]) not in public and '"seed"' not in public and "pattern\"" not in public
    from safetensors import safe_open

    for n in names:
        with safe_open(str(zoo / f"{n}.safetensors"), "pt") as f:
            meta = json.dumps(f.metadata())
        assert "target" not in meta and "backdoor" not in meta and "seed" not in meta
    assert len({(zoo / f"{n}.safetensors").stat().st_mtime for n in names}) == 1
    # every model differs from every other (clean models were fine-tuned as well)
    weights = [torch.cat([p.flatten() for p in load_zoo_model(zoo, n).parameters()]) for n in names]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(weights[i], weights[j])
    # the reference solution writes a submission the grader accepts; a perfect one scores 1 / 1
    sub = tmp_path / "ref.csv"
    rows = reference_submission(zoo, sub, steps=2, progress=False, device="cpu")
    assert [r[0] for r in rows] == names
    r = grade(root / "class_zoo_key.json", sub)
    assert 0.0 <= r["auroc"] <= 1.0 and r["n_models"] == 3 and r["n_backdoored"] == 2
    perfect = _write_csv(tmp_path / "perfect.csv", [
        (n, float(m["backdoored"]), m.get("target", 0)) for n, m in key["models"].items()])
    assert main(["grade", "--key", str(root / "class_zoo_key.json"), "--submission", str(perfect)]) == 0
    assert "AUROC 1.000 | target accuracy 1.000 (2/2" in capsys.readouterr().out
