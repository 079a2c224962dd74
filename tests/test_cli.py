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
