"""The sweep: one JSON line per trigger, resumable, crash-safe, same results from every backend.

Every run here uses a tiny preset on fake data (a few optimiser steps), so the tests check the
bookkeeping, not the science; the cache goes to a temporary directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mesa_lib.neural_cleanse import NCConfig
from mesa_lib.presets import get_preset
from mesa_lib.sweep import append_line, parse_patterns, read_finished, run_sweep, sweep_tasks

TINY = get_preset("fast").with_(
    width=4, clean_epochs=1, attack_epochs=1, detect_steps=2, detect_batch=4, point_steps=2, defense_epochs=1,
    mesa={"steps": 2, "batch_size": 8, "hidden": 16, "mine_hidden": 16},
)
TINY_NC = NCConfig(steps=2, batch_size=2)
KEYS = {"pattern", "clean", "backdoored", "mesa", "point", "nc", "oracle", "detection", "nc_detection",
        "seconds", "config"}


@pytest.fixture
def fmnist_root(tmp_path, fake_fmnist_writer, monkeypatch):
    """Fake Fashion-MNIST (200 train, 50 test) and a private model cache."""
    monkeypatch.setenv("MESA_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "fmnist"
    fake_fmnist_writer(root, n_train=200, n_test=50)
    return root


def _sweep(root, out, patterns="170,341", **kw):
    return run_sweep(patterns=patterns, preset=TINY, out=out, root=root, nc=TINY_NC, progress=False, **kw)


def _lines(path: Path) -> list[dict]:
    return [json.loads(s) for s in path.read_text().splitlines()]


# ---------------------------------------------------------------- patterns and tasks


def test_parse_patterns():
    assert len(parse_patterns("all")) == 51 and parse_patterns("all")[0] == 0
    assert parse_patterns("170, 341,170") == [170, 341]
    assert parse_patterns("all", "cifar100") == list(range(10))
    with pytest.raises(ValueError, match="comma list"):
        parse_patterns("170;341")
    with pytest.raises(ValueError, match="0..511"):
        parse_patterns("600")
    with pytest.raises(ValueError, match="0..9"):
        parse_patterns("10", "cifar100")


def test_cifar100_tasks_have_seeded_colour_triggers_and_targets():
    a, b, c = sweep_tasks("cifar100", "all", seed=0), sweep_tasks("cifar100", "all", seed=0), sweep_tasks("cifar100", "all", seed=1)
    assert a == b and a != c
    assert len(a) == 10 and len({t.color_seed for t in a}) == 10
    assert all(0 <= t.target < 100 for t in a) and len({t.target for t in a}) > 1
    assert all(t.target == 0 and t.color_seed is None for t in sweep_tasks("fashion-mnist", "1,2"))


# ---------------------------------------------------------------- the file


def test_read_finished_repairs_only_a_half_written_last_line(tmp_path):
    path = tmp_path / "s.jsonl"
    append_line(path, {"pattern": 1, "x": 1})
    append_line(path, {"pattern": 2, "x": 2})
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"pattern": 3, "x"')  # killed while writing
    assert set(read_finished(path)) == {1, 2}
    assert path.read_bytes() == good
    with open(path, "ab") as f:
        f.write(b'{"note": "keep"}\n')  # a complete last line that is not a sweep line: kept, refused
    with pytest.raises(ValueError, match="line 3"):
        read_finished(path)
    assert path.read_bytes() == good + b'{"note": "keep"}\n'
    path.write_bytes(good + b"\n")  # a trailing blank line (echo >> file) is skipped
    assert set(read_finished(path)) == {1, 2}
    append_line(path, {"pattern": 4, "x": 4})
    assert set(read_finished(path)) == {1, 2, 4}
    path.write_bytes(good)
    path.write_bytes(b"garbage\n" + good)
    with pytest.raises(ValueError, match="line 1"):
        read_finished(path)


def test_lines_are_written_one_per_pattern_and_resume_skips_them(fmnist_root, tmp_path):
    out = tmp_path / "s.jsonl"
    lines = _sweep(fmnist_root, out)
    assert [l["pattern"] for l in lines] == [170, 341]
    assert [l["pattern"] for l in _lines(out)] == [170, 341]
    for line in lines:
        assert KEYS <= set(line) and line["status"] == "complete"
        assert {"clean_acc", "asr"} <= set(line["nc"]) and {"clean_acc", "asr"} <= set(line["oracle"])
        assert len(line["nc_detection"]["anomaly_index"]) == 10
        assert line["config"]["pattern"] == line["pattern"] and line["seconds"]["total"] > 0
    before = out.read_bytes()
    again = _sweep(fmnist_root, out)
    assert out.read_bytes() == before and again == lines
    runs = json.loads((tmp_path / "s.jsonl.runs.json").read_text())
    assert [r["patterns_run"] for r in runs] == [2] and runs[0]["wall_s"] > 0  # a no-op run is not recorded
    # a half-written last line is cut off and its pattern redone: exactly one line each
    text = out.read_text().splitlines()
    out.write_text(text[0] + "\n" + text[1][: len(text[1]) // 2])
    redone = _sweep(fmnist_root, out)
    assert [l["pattern"] for l in _lines(out)] == [170, 341]
    # same seed, same numbers -- though the first run trained the backdoored model and the
    # redo loaded it from the cache: results do not depend on the cache's state
    assert all(redone[1][k] == lines[1][k] for k in ("backdoored", "mesa", "point", "nc", "oracle", "detection"))


def test_a_file_from_another_sweep_is_refused(fmnist_root, tmp_path):
    out = tmp_path / "s.jsonl"
    _sweep(fmnist_root, out, patterns="170")
    with pytest.raises(ValueError, match="different sweep.*seed"):
        _sweep(fmnist_root, out, patterns="170,341", seed=1)


def test_resume_with_a_changed_target_or_code_is_refused(fmnist_root, tmp_path, monkeypatch):
    out = tmp_path / "s.jsonl"
    _sweep(fmnist_root, out, patterns="170")
    before = out.read_bytes()
    with pytest.raises(ValueError, match="different sweep.*target.*another --out"):
        _sweep(fmnist_root, out, patterns="170,341", target=1)
    with pytest.raises(ValueError, match="different sweep.*preset"):
        run_sweep(patterns="170,341", preset=TINY.with_(defense_lr=0.02), out=out, root=fmnist_root, nc=TINY_NC,
                  progress=False)
    import mesa_lib.sweep as sweep_mod

    monkeypatch.setattr(sweep_mod, "code_fingerprint", lambda: "0123456789abcdef")
    with pytest.raises(ValueError, match="different sweep.*code"):
        _sweep(fmnist_root, out, patterns="170,341")
    assert out.read_bytes() == before


@pytest.mark.parametrize("content", [b"my notes", b"my notes\n", b"a,b\n1,2\n", b'{"x": 1}\n'])
def test_out_that_is_not_a_sweep_file_is_refused_and_left_untouched(fmnist_root, tmp_path, content):
    out = tmp_path / "notes.txt"
    out.write_bytes(content)
    with pytest.raises(ValueError, match="not a sweep|left untouched"):
        _sweep(fmnist_root, out, patterns="170")
    assert out.read_bytes() == content
    assert not (tmp_path / "notes.txt.runs.json").exists()


def test_two_sweeps_on_one_file_cannot_both_run(fmnist_root, tmp_path):
    from mesa_lib.sweep import SweepLock

    out = tmp_path / "s.jsonl"
    with SweepLock(out):  # as if another sweep were running on this file
        with pytest.raises(ValueError, match="another sweep .*pid .* is writing"):
            _sweep(fmnist_root, out, patterns="170")
    assert not out.exists()
    _sweep(fmnist_root, out, patterns="170")  # once it is gone, the sweep runs
    assert [l["pattern"] for l in _lines(out)] == [170]


def test_two_sweep_processes_on_one_file(fmnist_root, tmp_path):
    """Across real processes: while another process holds the sweep's lock, a sweep process
    exits with the lock message and writes nothing; once the holder is gone (it is killed, as
    by a crash), the same command runs and writes one line per pattern."""
    out = tmp_path / "s.jsonl"
    ready = tmp_path / "holding"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from mesa_lib.sweep import SweepLock
        with SweepLock(Path({str(out)!r})):
            Path({str(ready)!r}).write_text("yes")
            time.sleep(600)
        """)])
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ready.is_file():
            time.sleep(0.02)
        assert ready.is_file(), "the lock holder did not start"
        script = tmp_path / "sweep.py"
        script.write_text(_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out), root=str(fmnist_root)))
        second = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
        assert second.returncode != 0 and "another sweep" in second.stderr, second.stderr[-2000:]
        assert not out.exists()
    finally:
        holder.kill()  # like kill -9: the OS releases the lock
        holder.wait()
    subprocess.run([sys.executable, str(script)], check=True, timeout=600)
    assert sorted(l["pattern"] for l in _lines(out)) == [0, 1, 3, 5, 7]


def test_corrupt_sidecar_names_the_file(fmnist_root, tmp_path):
    out = tmp_path / "s.jsonl"
    (tmp_path / "s.jsonl.runs.json").write_text("{not json")
    with pytest.raises(ValueError, match="s.jsonl.runs.json is corrupt"):
        _sweep(fmnist_root, out, patterns="170")


def test_lines_record_code_git_and_threads(fmnist_root, tmp_path):
    from mesa_lib.common import code_fingerprint

    (line,) = _sweep(fmnist_root, tmp_path / "s.jsonl", patterns="170")
    cfg = line["config"]
    assert cfg["code"] == code_fingerprint() and isinstance(cfg["torch_threads"], int)
    assert set(cfg["git"]) == {"commit", "dirty"}


def test_bad_arguments_fail_before_any_work(fmnist_root, tmp_path):
    with pytest.raises(ValueError, match="backend"):
        _sweep(fmnist_root, tmp_path / "s.jsonl", backend="slurm")
    with pytest.raises(ValueError, match="workers"):
        _sweep(fmnist_root, tmp_path / "s.jsonl", workers=0)
    assert not (tmp_path / "s.jsonl").exists()


# ---------------------------------------------------------------- crashes and backends

_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_sweep import TINY, TINY_NC
    from mesa_lib.sweep import run_sweep
    run_sweep(patterns="0,1,3,5,7", preset=TINY, out={out!r}, root={root!r}, nc=TINY_NC, progress=False)
    """
)


def test_kill_9_mid_sweep_then_restart_gives_exactly_one_line_per_pattern(fmnist_root, tmp_path):
    out = tmp_path / "s.jsonl"
    script = tmp_path / "sweep.py"
    script.write_text(_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out), root=str(fmnist_root)))
    env = {**os.environ, "MESA_CACHE_DIR": os.environ["MESA_CACHE_DIR"]}
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.is_file() and out.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    survived = out.read_bytes()
    n_before = survived.count(b"\n")
    assert 1 <= n_before < 5
    subprocess.run([sys.executable, str(script)], env=env, check=True, timeout=600)
    lines = _lines(out)
    assert sorted(l["pattern"] for l in lines) == [0, 1, 3, 5, 7]
    assert out.read_bytes().startswith(survived[: survived.rfind(b"\n") + 1])  # finished lines untouched


def test_two_worker_processes_give_the_same_patterns(fmnist_root, tmp_path):
    out = tmp_path / "s.jsonl"
    lines = _sweep(fmnist_root, out, patterns="0,1,3", workers=2)
    assert sorted(l["pattern"] for l in _lines(out)) == [0, 1, 3]
    assert [l["pattern"] for l in lines] == [0, 1, 3]


def test_ray_backend_on_a_local_two_cpu_cluster(fmnist_root, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "s.jsonl"
    lines = _sweep(fmnist_root, out, patterns="170,341", workers=2, backend="ray")
    assert sorted(l["pattern"] for l in _lines(out)) == [170, 341]
    assert all(KEYS <= set(l) for l in lines)
    # the same work, in process: identical numbers
    local = _sweep(fmnist_root, tmp_path / "local.jsonl", patterns="170,341")
    assert [l["oracle"] for l in local] == [l["oracle"] for l in lines]


def test_cifar100_sweep_uses_colour_triggers_and_random_targets(tmp_path, fake_cifar_writer, monkeypatch):
    monkeypatch.setenv("MESA_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "c100"
    fake_cifar_writer(root, "cifar100", per_batch=20, n_test=40)  # labels of the 8 eval images differ
    out = tmp_path / "c.jsonl"
    lines = run_sweep(dataset="cifar100", patterns="0,1", preset=TINY, out=out, root=root, nc=TINY_NC,
                      progress=False)
    tasks = sweep_tasks("cifar100", "0,1")
    assert [l["pattern"] for l in lines] == [0, 1]
    for line, task in zip(lines, tasks):
        assert line["config"]["color_seed"] == task.color_seed and line["config"]["target"] == task.target
        assert len(line["nc_detection"]["l1_norms"]) == 100


def test_cli_sweep_reports_bad_patterns_clearly(capsys):
    from mesa_lib.cli import main

    assert main(["sweep", "--patterns", "170,abc", "--out", "unused.jsonl"]) == 2
    assert "comma list" in capsys.readouterr().err
    assert not Path("unused.jsonl").exists()


def _fake_line(pattern: int, asr: dict, acc: float = 0.9, mesa_det: int = 0, nc_det: int = 0, flagged=(0,),
               mesa_flag: bool = True) -> dict:
    line = {"pattern": pattern, "config": {"target": 0},
            "detection": {"detected_target": mesa_det, "flagged": mesa_flag},
            "nc_detection": {"detected_target": nc_det, "flagged": list(flagged)}}
    for k, a in asr.items():
        line[k] = {"asr": a, "clean_acc": acc - (0.01 if k != "backdoored" else 0.0)}
    return line


def test_summarize_computes_ranges_changes_and_hits(tmp_path):
    from mesa_lib.sweep import load_sweep, summarize

    lines = [
        _fake_line(1, {"backdoored": 0.9, "mesa": 0.02, "point": 0.3, "nc": 0.1, "oracle": 0.01}),
        _fake_line(2, {"backdoored": 1.0, "mesa": 0.04, "point": 0.1, "nc": 0.2, "oracle": 0.03}, mesa_det=3, flagged=(),
                   mesa_flag=False),
        _fake_line(3, {"backdoored": 1.0, "mesa": 0.06, "point": 0.2, "nc": 0.2, "oracle": 0.03}),
    ]
    s = summarize(lines)
    assert s["n"] == 3
    m = s["methods"]
    assert m["mesa"]["asr"]["min"] == 0.02 and m["mesa"]["asr"]["max"] == 0.06
    assert abs(m["mesa"]["asr"]["mean"] - 0.04) < 1e-12 and abs(m["mesa"]["asr"]["median"] - 0.04) < 1e-12
    assert abs(m["point"]["clean_acc_change"]["mean"] + 0.01) < 1e-9 and m["backdoored"]["clean_acc_change"]["max"] == 0
    d = s["detection"]
    assert (d["mesa_hits"], d["mesa_flagged"], d["nc_hits"], d["nc_flagged"]) == (2, 2, 3, 2)
    assert "50%" in d["rule"] and "> 2" in d["rule"]


def test_point_median_and_worst_are_starts_ranked_by_the_defenders_check_score():
    from mesa_lib.sweep import arm_result, ranked_start

    starts = [{"asr": a, "clean_acc": 0.9 - a / 10, "target_recall": 0.8,
               "residual": {"fired": f, "mean_fired_before": a / 2, "max": a}}
              for a, f in ((0.1, 1), (0.4, 5), (0.2, 2), (0.3, 0))]
    # the defender ranks the starts by their check ASR before retraining: 2, 0, 3, 1
    check = [0.9, 0.5, 0.95, 0.7]
    line = {"point_starts": starts, "point": starts[2], "point_search": {"check_asr": check, "best": 2},
            "backdoored": {"asr": 1.0, "clean_acc": 0.9}}
    assert [ranked_start(check, w) for w in ("best", "median", "worst")] == [2, 0, 1]
    med, worst = arm_result(line, "point_median"), arm_result(line, "point_worst")
    assert med is starts[0] and worst is starts[1]  # actual starts, not a mean of two
    # ranked by the defender's score, not by what the evaluation split says after retraining
    assert worst["asr"] == 0.4 and max(s["asr"] for s in starts) == 0.4
    line["point_search"]["check_asr"] = [0.1, 0.9, 0.5, 0.7]
    assert arm_result(line, "point_worst") is starts[0] and arm_result(line, "point_median") is starts[3]
    assert arm_result(line, "point") is starts[2] and arm_result(line, "point_median", "second") is None
    with pytest.raises(ValueError, match="best"):
        ranked_start(check, "typical")


def test_bootstrap_interval_and_sign_test():
    from mesa_lib.sweep import bootstrap_ci, sign_test

    lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert 1.0 < lo < 3.0 < hi < 5.0
    assert bootstrap_ci([2.0] * 7) == (2.0, 2.0)
    t = sign_test([0.1] * 10, [0.2] * 10)
    assert (t["lower"], t["higher"], t["ties"]) == (10, 0, 0) and abs(t["p"] - 2 / 1024) < 1e-15
    t = sign_test([0.1, 0.3, 0.2], [0.2, 0.2, 0.2])
    assert (t["lower"], t["higher"], t["ties"], t["p"]) == (1, 1, 1, 1.0)
    with pytest.raises(ValueError, match="length"):
        sign_test([1.0], [1.0, 2.0])


def test_load_sweep_ignores_a_line_in_progress(tmp_path):
    from mesa_lib.sweep import load_sweep, summarize

    lines = [_fake_line(1, {"backdoored": 0.9}), _fake_line(2, {"backdoored": 0.8})]
    for line in lines:
        append_line(tmp_path / "s.jsonl", line)
    with open(tmp_path / "s.jsonl", "ab") as f:
        f.write(b'{"pattern": 5')  # a running sweep's line in progress: ignored, file untouched
    assert [l["pattern"] for l in load_sweep(tmp_path / "s.jsonl")] == [1, 2]
    assert (tmp_path / "s.jsonl").read_bytes().endswith(b'{"pattern": 5')
    with pytest.raises(ValueError, match="no sweep lines"):
        summarize([])


def test_light_sweep_runs_the_headline_arms_only_and_is_its_own_file(fmnist_root, tmp_path):
    out = tmp_path / "light.jsonl"
    (line,) = run_sweep(patterns="170", preset=TINY, out=out, root=fmnist_root, nc=TINY_NC, progress=False,
                        light=True, seed=1)
    assert {"mesa", "point", "point_starts", "oracle"} <= set(line)
    assert not {"nc", "random", "second", "nc_detection"} & set(line)
    assert line["config"]["light"] is True and line["config"]["seed"] == 1
    assert [p["name"] for p in line["protocols"]] == ["headline"]
    with pytest.raises(ValueError, match="different sweep"):  # a full sweep may not append to it
        run_sweep(patterns="170,341", preset=TINY, out=out, root=fmnist_root, nc=TINY_NC, progress=False, seed=1)


def test_full_line_has_both_protocols_controls_and_detection_rule(fmnist_root, tmp_path):
    (line,) = run_sweep(patterns="170", preset=TINY, out=tmp_path / "full.jsonl", root=fmnist_root, nc=TINY_NC,
                        progress=False)
    for arm in ("mesa", "point", "nc", "random", "oracle"):
        assert {"asr", "clean_acc", "target_recall", "residual"} <= set(line[arm]), arm
        assert {"asr", "clean_acc", "residual"} <= set(line["second"][arm]), arm
    assert line["second"]["protocol"]["ratio"] == TINY.second_ratio
    assert isinstance(line["detection"]["flagged"], bool)
    assert line["nc_detection"]["mitigated_class"] == line["nc_detection"]["detected_target"]


def test_clean_controls_cli(fmnist_root, tmp_path, capsys, monkeypatch):
    import json

    from mesa_lib import sweep as sweep_mod
    from mesa_lib.cli import main

    monkeypatch.setattr(sweep_mod, "get_preset", lambda name: TINY)
    monkeypatch.setattr(sweep_mod, "NC_CONFIGS", {"fast": TINY_NC})
    out = tmp_path / "controls.json"
    code = main(["clean-controls", "--seeds", "0-1", "--out", str(out), "--data-root", str(fmnist_root), "--quiet"])
    assert code == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["n"] == 2 and [l["seed"] for l in res["lines"]] == [0, 1]
    assert res["mesa_false_positives"] == sum(l["detection"]["flagged"] for l in res["lines"])
    assert "flagged by MESA's scan" in capsys.readouterr().out
    assert main(["clean-controls", "--seeds", "x", "--out", str(out)]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_cifar100_sweep_resumes(tmp_path, fake_cifar_writer, monkeypatch):
    """Issue 21, bug 1: each CIFAR-100 line has its own seeded target; a resume compares each
    line with its own trigger's target (it failed with 'differs in target -- file 44, now 0')."""
    monkeypatch.setenv("MESA_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "c100"
    fake_cifar_writer(root, "cifar100", per_batch=20, n_test=40)
    out = tmp_path / "c.jsonl"
    kw = dict(dataset="cifar100", preset=TINY, out=out, root=root, nc=TINY_NC, progress=False)
    run_sweep(patterns="0", **kw)
    lines = run_sweep(patterns="0,1", **kw)
    assert [l["pattern"] for l in _lines(out)] == [0, 1] and len(lines) == 2


def test_a_corrupted_cache_entry_is_retrained_with_one_warning(fmnist_root, tmp_path):
    """Issue 21, bug 4 and the NaN entry: a flipped bit in a cached model's tensors, or NaN
    weights, is found (SHA-256 stored with the entry), named in one warning and retrained; the
    entry is replaced, so later runs load it silently."""
    import warnings

    import torch

    from mesa_lib.data import load_dataset
    from mesa_lib.models import save_weights
    from mesa_lib.pipeline import get_clean_model

    splits = load_dataset("fashion-mnist", root=fmnist_root)
    good = get_clean_model(splits, TINY, 0, progress=False)
    (entry,) = (tmp_path / "cache" / "models").glob("clean-*.safetensors")
    data = bytearray(entry.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the tensor data
    entry.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=f"{entry.name}.*corrupted") as rec:
        again = get_clean_model(splits, TINY, 0, progress=False)
    assert len(rec) == 1
    assert all(torch.equal(a, b) for a, b in zip(good.state_dict().values(), again.state_dict().values()))
    from safetensors import safe_open

    with safe_open(str(entry), framework="pt") as f:
        meta = f.metadata()
    nan = get_clean_model(splits, TINY, 0, progress=False)
    with torch.no_grad():
        next(nan.parameters()).fill_(float("nan"))
    save_weights(nan, entry, json.loads(meta["mesa_lib"]))
    with pytest.warns(UserWarning, match=f"{entry.name}.*NaN"):
        fixed = get_clean_model(splits, TINY, 0, progress=False)
    assert all(torch.isfinite(p).all() for p in fixed.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_clean_model(splits, TINY, 0, progress=False)  # the entry was replaced: no warning


def test_a_symlink_to_a_locked_file_is_refused(fmnist_root, tmp_path):
    """Issue 21, bug 3: the lock is keyed on the real file; a second name (symlink) for a file
    another process is sweeping is refused."""
    out, link = tmp_path / "s.jsonl", tmp_path / "l.jsonl"
    link.symlink_to(out.name)
    ready = tmp_path / "holding"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from mesa_lib.sweep import SweepLock
        with SweepLock(Path({str(out)!r})):
            Path({str(ready)!r}).write_text("yes")
            time.sleep(600)
        """)])
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ready.is_file():
            time.sleep(0.02)
        assert ready.is_file(), "the lock holder did not start"
        with pytest.raises(ValueError, match="another sweep"):
            _sweep(fmnist_root, link, patterns="170")
    finally:
        holder.kill()
        holder.wait()


def test_a_refused_out_gets_no_lock_and_files_follow_the_umask(fmnist_root, tmp_path):
    """Issue 21: no <out>.lock beside a file that is refused (a non-sweep file, a pipe); the
    results file and its sidecar follow the umask instead of mkstemp's 0600."""
    notes = tmp_path / "notes.txt"
    notes.write_text('{"note": "keep"}\n')
    with pytest.raises(ValueError):
        _sweep(fmnist_root, notes, patterns="170")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        _sweep(fmnist_root, fifo, patterns="170")
    assert not (tmp_path / "notes.txt.lock").exists() and not (tmp_path / "pipe.lock").exists()
    old = os.umask(0o022)
    try:
        out = tmp_path / "s.jsonl"
        _sweep(fmnist_root, out, patterns="170")
    finally:
        os.umask(old)
    assert (tmp_path / "s.jsonl.runs.json").stat().st_mode & 0o777 == 0o644


def test_an_unreachable_ray_address_is_refused_before_any_work(fmnist_root, tmp_path):
    import socket

    pytest.importorskip("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once it is closed
    with pytest.raises(ValueError, match="cannot reach the Ray cluster"):
        _sweep(fmnist_root, tmp_path / "s.jsonl", backend="ray", ray_address=f"127.0.0.1:{port}")
    assert not list(tmp_path.glob("s.jsonl*"))


def test_bad_seed_and_target_fail_before_any_work(fmnist_root, tmp_path):
    with pytest.raises(ValueError, match="target class"):
        _sweep(fmnist_root, tmp_path / "s.jsonl", target=10)
    with pytest.raises(ValueError, match="seed must be an integer"):
        _sweep(fmnist_root, tmp_path / "s.jsonl", seed=2**64 - 1)
    assert not list(tmp_path.glob("s.jsonl*")) and not (tmp_path / "cache").exists()


def test_a_full_disk_loses_no_line(tmp_path, monkeypatch):
    import errno

    import mesa_lib.sweep as sweep_mod
    from mesa_lib.common import DiskFullError

    path = tmp_path / "s.jsonl"
    append_line(path, {"pattern": 1})
    before = path.read_bytes()

    def half_then_full(f, data, p):
        f.write(data[: len(data) // 2])
        f.flush()
        raise DiskFullError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(p))

    monkeypatch.setattr(sweep_mod, "write_all", half_then_full)
    with pytest.raises(DiskFullError):
        append_line(path, {"pattern": 2, "x": "y" * 100})
    assert path.read_bytes() == before
