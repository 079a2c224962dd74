"""The zoo for a class (issues 20 and 21): every bad option of `zoo` and `zoo-reference` refused
before any training (real subprocesses: exit 2, one line, quick, nothing left behind), the key
0600 and the models following the umask, no global random state, the class leaderboard, and
the grader's refusals of ambiguous or broken input."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mesa_lib.cli import main
from mesa_lib.zoo import (SUBMISSION_COLUMNS, build_zoo, class_leaderboard, grade, norm_baseline_submission,
                          output_row_norms)

REPO = Path(__file__).resolve().parents[1]
SETPRIV = shutil.which("setpriv")
needs_setpriv = pytest.mark.skipif(
    SETPRIV is None or os.geteuid() != 0,
    reason="the unwritable cases need root with capabilities dropped (setpriv), since plain root writes "
           "past permission bits" if SETPRIV else "setpriv is not installed")


def _cli(args: list[str], cwd: Path, drop_caps: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mesa_lib", *args]
    if drop_caps:
        cmd = [SETPRIV, "--inh-caps=-all", "--bounding-set=-all", *cmd]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60, env=env)


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


BAD_ZOO_OPTIONS = [
    (["--finetune-epochs", "nan"], "--finetune-epochs"),
    (["--finetune-epochs", "0"], "--finetune-epochs"),
    (["--poison-ratio", "1.5"], "--poison-ratio"),
    (["--poison-ratio", "nan"], "--poison-ratio"),
    (["--backdoored-fraction", "-0.1"], "--backdoored-fraction"),
    (["--n", "0"], "--n"),
    (["--bases", "0"], "--bases"),
    (["--n", "3", "--bases", "5"], "bases must be in 1..n"),
    (["--seed", "18446744073709551615"], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--train-limit", "0"], "--train-limit"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--preset", "huge"], "--preset"),
    (["--dataset", "mnist-ish"], "--dataset"),
]


@pytest.mark.parametrize("extra, needle", BAD_ZOO_OPTIONS, ids=[" ".join(e) for e, _ in BAD_ZOO_OPTIONS])
def test_zoo_bad_option_exit_2_one_line_nothing_left(tmp_path, extra, needle):
    t = time.perf_counter()
    r = _cli(["zoo", "--out", "zoo", "--quiet", *extra], tmp_path)
    assert time.perf_counter() - t < 30
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stdout == "" and _tree(tmp_path) == []


@pytest.mark.parametrize("extra, needle", [
    (["--steps", "0"], "--steps"), (["--device", "gpu"], "--device"), (["--seed", "x"], "--seed")])
def test_zoo_reference_bad_option(tmp_path, extra, needle):
    r = _cli(["zoo-reference", "--zoo", "zoo", "--out", "ref.csv", "--quiet", *extra], tmp_path)
    assert r.returncode == 2 and needle in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert _tree(tmp_path) == []


def _fake_zoo(folder: Path) -> None:
    """A folder that passes the manifest check (nothing is scanned before --out is refused)."""
    folder.mkdir()
    (folder / "zoo.json").write_text(json.dumps({"format": "mesa-zoo/1", "models": []}))


def test_zoo_reference_out_is_a_folder_or_exists_refused_before_scanning(tmp_path):
    _fake_zoo(tmp_path / "zoo")
    (tmp_path / "adir").mkdir()
    (tmp_path / "taken.csv").write_text("mine")
    before = _tree(tmp_path)
    for out, needle in (("adir", "is a directory"), ("taken.csv", "never overwritten")):
        r = _cli(["zoo-reference", "--zoo", "zoo", "--out", out, "--quiet"], tmp_path)
        assert r.returncode == 2 and needle in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert _tree(tmp_path) == before and (tmp_path / "taken.csv").read_text() == "mine"
    r = _cli(["zoo-reference", "--zoo", "nozoo", "--out", "r.csv", "--quiet"], tmp_path)
    assert r.returncode == 2 and "no zoo.json in nozoo" in r.stderr


@needs_setpriv
def test_unwritable_out_key_refused_before_training(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        cases = [
            (["--out", str(ro / "zoo")], "--out"),
            (["--out", str(tmp_path / "zoo"), "--key", str(ro / "k" / "key.json")], "--key"),
            (["--out", str(tmp_path / "zoo"), "--key", str(ro / "key.json")], "--key"),
        ]
        for args, needle in cases:
            t = time.perf_counter()
            r = _cli(["zoo", "--quiet", *args], tmp_path, drop_caps=True)
            assert time.perf_counter() - t < 30
            assert r.returncode == 2, r.stderr
            assert needle in r.stderr and "cannot create files" in r.stderr, r.stderr
            assert r.stderr.strip().count("\n") == 0, r.stderr
            assert _tree(tmp_path) == ["ro"]  # no zoo, no key, no .zoo.tmp<pid>/
        _fake_zoo(tmp_path / "z")
        r = _cli(["zoo-reference", "--zoo", "z", "--out", str(ro / "ref.csv"), "--quiet"], tmp_path, drop_caps=True)
        assert r.returncode == 2 and "cannot create files" in r.stderr and r.stderr.strip().count("\n") == 0
        assert _tree(ro) == []
    finally:
        ro.chmod(0o755)


def test_key_0600_models_follow_umask_and_no_global_random_state(tmp_path, fake_fmnist_splits,
                                                                   torch_single_thread):
    old = os.umask(0o022)
    try:
        torch.manual_seed(1234)
        state = torch.get_rng_state()
        key = build_zoo(tmp_path / "zoo", n=3, seed=5, splits=fake_fmnist_splits, progress=False,
                        poison_ratio=0.3, finetune_epochs=0.5)
        assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    finally:
        os.umask(old)
    key_path = tmp_path / "zoo_key.json"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    for f in (tmp_path / "zoo").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f  # students can read the models
    assert key["settings"]["preset"]["poison_ratio"] == 0.3 and key["settings"]["finetune_epochs"] == 0.5
    assert "--poison-ratio 0.3" in key["command"] and "--bases 3" in key["command"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # the output-norm baseline runs on it and is gradable; its target is the largest output row
    rows = norm_baseline_submission(tmp_path / "zoo", tmp_path / "norm.csv")
    from mesa_lib.zoo import load_zoo_model

    for name, score, target in rows:
        norms = output_row_norms(load_zoo_model(tmp_path / "zoo", name))
        assert target == int(norms.argmax()) and score >= 1.0
    r = grade(key_path, tmp_path / "norm.csv")
    assert r["n_models"] == 3 and 0.0 <= r["auroc"] <= 1.0


def test_a_failed_key_write_leaves_no_tmp_folder(tmp_path, fake_fmnist_splits, monkeypatch):
    import mesa_lib.zoo as zoo

    def refuse(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zoo.os, "fchmod", refuse)
    with pytest.raises(OSError):
        build_zoo(tmp_path / "zoo", n=2, seed=0, splits=fake_fmnist_splits, progress=False)
    assert [p.name for p in tmp_path.iterdir() if p.name != "fake-fmnist"] == []  # no zoo, .tmp folder, half key


# --------------------------------------------------------------------------- grading input


@pytest.fixture
def key_file(tmp_path):
    models = {f"model_{i:02d}": {"backdoored": i < 2, **({"target": i + 1} if i < 2 else {})} for i in range(4)}
    path = tmp_path / "key.json"
    path.write_text(json.dumps({"format": "mesa-zoo-key/1", "models": models, "settings": {"num_classes": 10}}))
    return path


def _csv(path: Path, lines: list[str], header: str = ",".join(SUBMISSION_COLUMNS)) -> Path:
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


GOOD = ["model_00,0.9,1", "model_01,0.8,2", "model_02,0.1,0", "model_03,0.2,0"]


def test_two_score_columns_refused_not_the_last(key_file, tmp_path, capsys):
    sub = _csv(tmp_path / "s.csv", [r + ",0.0" for r in GOOD], header="model,backdoored_score,suspected_target,"
               "backdoored_score")
    assert main(["grade", "--key", str(key_file), "--submission", str(sub)]) == 2
    err = capsys.readouterr().err
    assert "backdoored_score more than once" in err and err.count("\n") == 1


def test_extra_fields_in_a_row_refused(key_file, tmp_path, capsys):
    lines = list(GOOD)
    lines[1] = "model_01,0,8,2"  # a decimal comma
    sub = _csv(tmp_path / "s.csv", lines)
    assert main(["grade", "--key", str(key_file), "--submission", str(sub)]) == 2
    err = capsys.readouterr().err
    assert "line 3: 4 fields, but the header has 3" in err and err.count("\n") == 1


def test_non_utf8_submission_and_key_name_the_file(key_file, tmp_path, capsys):
    sub = tmp_path / "latin1.csv"
    sub.write_bytes(("\n".join([",".join(SUBMISSION_COLUMNS), *GOOD]) + "\nmodel_04,0.5,1 caf\xe9\n").encode("latin-1"))
    assert main(["grade", "--key", str(key_file), "--submission", str(sub)]) == 2
    err = capsys.readouterr().err
    assert str(sub) in err and "not UTF-8" in err and err.count("\n") == 1
    bad_key = tmp_path / "k.json"
    bad_key.write_bytes(b"\xff\xfe{")
    assert main(["grade", "--key", str(bad_key), "--submission", str(sub)]) == 2
    err = capsys.readouterr().err
    assert str(bad_key) in err and "not UTF-8" in err and err.count("\n") == 1


@pytest.mark.parametrize("mutate, needle", [
    (lambda k: k.pop("models"), "'models'"),
    (lambda k: k.update(models={}), "'models'"),
    (lambda k: k.pop("settings"), "num_classes"),
    (lambda k: k["settings"].update(num_classes="10"), "num_classes"),
    (lambda k: k["models"]["model_00"].pop("target"), "model_00"),
    (lambda k: k["models"]["model_00"].update(target=10), "model_00"),
    (lambda k: k["models"]["model_02"].pop("backdoored"), "model_02"),
    (lambda k: k["models"].update(model_02=[1]), "model_02"),
])
def test_malformed_key_one_line(key_file, tmp_path, capsys, mutate, needle):
    key = json.loads(key_file.read_text())
    mutate(key)
    key_file.write_text(json.dumps(key))
    sub = _csv(tmp_path / "s.csv", GOOD)
    assert main(["grade", "--key", str(key_file), "--submission", str(sub)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the answer key") and "malformed" in err and needle in err, err
    assert err.count("\n") == 1


def test_class_leaderboard_ranks_and_reports_bad_files(key_file, tmp_path, capsys):
    subs = tmp_path / "subs"
    subs.mkdir()
    _csv(subs / "alice.csv", GOOD)                                                     # AUROC 1, targets 2/2
    _csv(subs / "bob.csv", ["model_00,0.9,1", "model_01,0.1,0", "model_02,0.5,0", "model_03,0.2,0"])  # 0.5, 1/2
    _csv(subs / "carol.csv", ["model_00,0.1,1", "model_01,0.2,2", "model_02,0.9,0", "model_03,0.8,0"])  # 0, 2/2
    _csv(subs / "dave.csv", GOOD[:3])                                                   # a missing row
    (subs / "notes.txt").write_text("not a submission")
    results, errors = class_leaderboard(key_file, subs)
    assert [(r["name"], r["auroc"], r["targets_correct"]) for r in results] == [
        ("alice", 1.0, 2), ("bob", 0.5, 1), ("carol", 0.0, 2)]
    assert len(errors) == 1 and errors[0].startswith("dave: not graded") and "model_03" in errors[0]
    assert main(["grade", "--key", str(key_file), "--submission", str(subs)]) == 0
    out = capsys.readouterr()
    table = out.out.strip().splitlines()
    assert len(table) == 4 and table[1].split()[:3] == ["1", "alice", "1.000"]
    assert table[2].split()[:4] == ["2", "bob", "0.500", "0.500"] and table[3].split()[1] == "carol"
    assert out.err.strip().splitlines() == [errors[0]]
    # a folder where nothing can be graded: exit 2
    for f in ("alice", "bob", "carol"):
        (subs / f"{f}.csv").unlink()
    assert main(["grade", "--key", str(key_file), "--submission", str(subs)]) == 2
