"""The command line: bad arguments give exit code 2 and one line, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mesa_lib.cli import format_table, main
from mesa_lib.triggers import canonical_patterns


def _run_module(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mesa_lib", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_bad_pattern_subprocess_exit_2_one_line(tmp_path):
    p = _run_module("run", "--pattern", "600", "--out", str(tmp_path / "r.json"), "--quiet")
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "0..511" in lines[0], p.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--pattern", "-1"], "0..511"),
        (["--preset", "turbo"], "unknown preset"),
        (["--target", "10"], "target class"),
        (["--target", "-3"], "target class"),
        (["--dataset", "mnist-digits"], "mnist-digits"),
    ],
)
def test_run_bad_arguments_exit_2(args, needle, capsys, tmp_path, fake_fmnist_root, monkeypatch):
    monkeypatch.setenv("MESA_CACHE_DIR", str(tmp_path / "cache"))
    code = main(["run", *args, "--data-root", str(fake_fmnist_root), "--out", str(tmp_path / "r.json"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert "Traceback" not in err


def test_patterns_lists_51(capsys):
    assert main(["patterns"]) == 0
    head, ids = capsys.readouterr().out.split(":", 1)
    assert head.startswith("51")
    assert [int(i) for i in ids.split()] == canonical_patterns()


def test_format_table():
    r = {
        "clean": {"clean_acc": 0.9, "asr": 0.01},
        "backdoored": {"clean_acc": 0.89, "asr": 0.995},
        "mesa": {"clean_acc": 0.88, "asr": 0.03},
        "detection": {"per_class_asr": [0.9] + [0.0] * 9, "detected_target": 0, "anomaly_index": 12.0},
        "seconds": {"total": 61.0},
    }
    t = format_table(r)
    assert "99.5%" in t and "MESA defense" in t and "3.0%" in t and "target 0" in t and "point" not in t


# ---------------------------------------------------------------- choices, device, --out, exit codes


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Make any training fail the test: the CLI must refuse bad input before it starts."""
    import mesa_lib.pipeline as pipeline
    import mesa_lib.sweep as sweep

    def refuse(*a, **k):
        raise AssertionError("bad input must be refused before any data is loaded or model trained")

    monkeypatch.setattr(pipeline, "run_pipeline", refuse)
    monkeypatch.setattr(sweep, "run_sweep", refuse)


@pytest.mark.parametrize("command", ["run", "sweep"])
@pytest.mark.parametrize("args,needle", [
    (["--preset", "turbo"], "unknown preset 'turbo'"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--device", "tpu"], "device must be cpu, cuda or cuda:N"),
    (["--device", "cuda:x"], "device must be cpu, cuda or cuda:N"),
    (["--seed", "one"], "--seed"),
])
def test_bad_choices_exit_2_one_line(command, args, needle, capsys, tmp_path, no_work):
    assert main([command, *args, "--out", str(tmp_path / "r.json")]) == 2
    assert needle in _one_error_line(capsys.readouterr().err)


def test_dataset_aliases_are_accepted(monkeypatch, tmp_path):
    import mesa_lib.pipeline as pipeline

    seen = {}

    def fake_run(**kw):
        seen.update(kw)
        return {}

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
    assert main(["run", "--dataset", "CIFAR-10", "--preset", "paper", "--out", str(tmp_path / "r.json")]) == 0
    assert seen["dataset"] == "cifar10" and seen["preset"] == "paper"


@pytest.mark.parametrize("command", ["run", "sweep"])
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_gpu_exit_2_one_line(command, device, capsys, tmp_path, monkeypatch, no_work):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([command, "--device", device, "--out", str(tmp_path / "r.json")]) == 2
    assert "CUDA is not available" in _one_error_line(capsys.readouterr().err)


def test_parse_device(monkeypatch):
    import argparse

    import torch

    from mesa_lib.cli import parse_device

    assert parse_device("cpu") == "cpu" and parse_device(" CPU ") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_device("cuda") == "cuda" and parse_device("CUDA:1") == "cuda:1"
    with pytest.raises(argparse.ArgumentTypeError, match="has 2 GPU"):
        parse_device("cuda:2")
    for bad in ("gpu", "cuda:", "cuda:-1", "mps", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="cpu, cuda or cuda:N"):
            parse_device(bad)


def _unwritable_outs(tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("not a folder")
    return {"existing folder": (folder, "is a directory"),
            "parent is a file": (a_file / "r.json", "is a file, not a folder"),
            "grandparent is a file": (a_file / "sub" / "r.json", "is a file, not a folder")}


@pytest.mark.parametrize("command", ["run", "sweep"])
@pytest.mark.parametrize("case", ["existing folder", "parent is a file", "grandparent is a file"])
def test_unwritable_out_exit_2_before_any_work(command, case, capsys, tmp_path, no_work):
    out, needle = _unwritable_outs(tmp_path)[case]
    assert main([command, "--out", str(out)]) == 2
    assert needle in _one_error_line(capsys.readouterr().err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
@pytest.mark.parametrize("command", ["run", "sweep"])
def test_read_only_out_folder_exit_2(command, capsys, tmp_path, no_work):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main([command, "--out", str(ro / "sub" / "r.json")]) == 2
        assert "cannot create files" in _one_error_line(capsys.readouterr().err)
    finally:
        ro.chmod(0o755)


def test_check_out_path_uses_write_permission(tmp_path, monkeypatch):
    """The permission test itself (also where root could write anyway): a folder the process
    may not write in, and an existing file it may not write, are refused."""
    from mesa_lib.cli import check_out_path

    existing = tmp_path / "r.json"
    existing.write_text("{}")
    assert check_out_path(tmp_path / "new" / "deeper" / "r.json") == tmp_path / "new" / "deeper" / "r.json"
    assert check_out_path(existing) == existing
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match="cannot create files in"):
        check_out_path(tmp_path / "new.json")
    with pytest.raises(ValueError, match="is not writable"):
        check_out_path(existing)


def test_sweep_out_check_does_not_touch_the_file(tmp_path, monkeypatch):
    """For a sweep only the location is checked; an existing file is neither read nor changed
    (whether it is a sweep file is the sweep's own business)."""
    import mesa_lib.sweep as sweep

    out = tmp_path / "other.jsonl"
    out.write_text("not a sweep file\n")
    before = out.stat()
    monkeypatch.setattr(sweep, "run_sweep", lambda **kw: [])
    assert main(["sweep", "--out", str(out), "--quiet"]) == 0
    after = out.stat()
    assert out.read_text() == "not a sweep file\n" and after.st_mtime_ns == before.st_mtime_ns


def test_fetch_data_offline_exit_2_one_line(capsys, offline):
    assert main(["fetch-data"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "could not download fashion-mnist" in line and "dataset-fashion-mnist" in line and "MESA_DATA_DIR" in line


@pytest.mark.parametrize("command", [[], ["run"], ["sweep"], ["fetch-data"]])
def test_help_has_examples_and_exit_codes(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "exit codes:" in out and "python -m mesa_lib" in out


def test_unexpected_errors_propagate(monkeypatch, tmp_path):
    """A bug is not dressed up as bad input: the exception escapes main (exit code 1 and a
    traceback under ``python -m``)."""
    import mesa_lib.pipeline as pipeline

    def bug(**kw):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pipeline, "run_pipeline", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["run", "--out", str(tmp_path / "r.json")])


@pytest.mark.parametrize("args,needle", [
    (["clean-controls", "--workers", "0"], "--workers"),
    (["clean-controls", "--seeds", "0-100000000000"], "at most"),
    (["clean-controls", "--seeds", "5-3"], "first seed is above its last"),
    (["run", "--seed", "18446744073709551615"], "--seed"),
    (["sweep", "--seed", "18446744073709551615"], "--seed"),
    (["sweep", "--workers", "0"], "--workers"),
])
def test_issue21_bad_options_exit_2_before_any_work(args, needle, capsys, tmp_path, no_work, monkeypatch):
    """Issue 21: each of these failed late or with an unclear message (ZeroDivisionError,
    MemoryError, 'Overflow when unpacking long long' after training)."""
    import mesa_lib.sweep as sweep

    monkeypatch.setattr(sweep, "run_clean_controls", no_work_fail)
    assert main([*args, "--out", str(tmp_path / "r.json")]) == 2
    assert needle in _one_error_line(capsys.readouterr().err)
    assert not list(tmp_path.iterdir())


def no_work_fail(*a, **k):
    raise AssertionError("bad input must be refused before any work")
