"""Issue 21: every command validates all its inputs before any training.

Each case runs ``python -m mesa_lib <subcommand> <one bad option>`` in a real process, in a
fresh working folder with an empty model cache, and asserts that it exits with code 2 and an
``error:`` line within a few seconds (training the smallest model takes minutes on this
machine, so a command that trains first cannot pass), and that it leaves the folder and the
cache exactly as they were: no results file, no lock, no sidecar, no temporary folder, no
cache entry, and files that were there unchanged.

The processes run two at a time in threads (each one mostly imports torch), all of them once
per session (:func:`outcomes`); each parametrized test then checks one case.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import write_fake_fmnist

FEW_SECONDS = 30.0
"""The most a refused command may take. A bad option is refused after the imports (about
1.5 s here, several times that when both cores are busy); the least training of the
fast preset takes minutes, so a command that trains first cannot come in under it."""

pytestmark = pytest.mark.slow  # 35 processes: about 40 s on two idle cores, over 2 min when they are busy

HUGE = str(2**64)  # one more than the largest unsigned 64-bit integer


def _existing(name: str, text: str = "keep me\n") -> Callable[[Path], None]:
    def setup(cwd: Path) -> None:
        (cwd / name).write_text(text)
    return setup


def _folder(name: str) -> Callable[[Path], None]:
    def setup(cwd: Path) -> None:
        (cwd / name).mkdir()
        (cwd / name / "mine.txt").write_text("keep me\n")
    return setup


def _tampered_fmnist(cwd: Path) -> None:
    write_fake_fmnist(cwd / "fm")


def _nothing(cwd: Path) -> None:
    pass


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    needle: str
    """Text the error line must contain (the option named, or what to do)."""
    setup: Callable[[Path], None] = _nothing
    one_line: bool = True
    env: dict = field(default_factory=dict)


DEFEND = ("defend", "--model", "m.safetensors", "--torchvision", "resnet18", "--data", "imgs")

CASES = [
    # run
    Case("run-pattern", ("run", "--pattern", "600"), "600"),
    Case("run-target", ("run", "--target", "10"), "target"),
    Case("run-seed", ("run", "--seed", HUGE), "--seed"),
    Case("run-color-seed", ("run", "--color-seed", HUGE), "--color-seed"),
    Case("run-out-exists", ("run", "--out", "results.json"), "--force", _existing("results.json")),
    Case("run-out-dir", ("run", "--out", "d"), "directory", _folder("d")),
    Case("run-device", ("run", "--device", "cuda:7"), "cuda:7"),
    Case("run-data-root", ("run", "--data-root", "nowhere"), "Could not find", one_line=False),
    # sweep
    Case("sweep-patterns", ("sweep", "--patterns", "600"), "600"),
    Case("sweep-target", ("sweep", "--target", "10"), "target"),
    Case("sweep-seed", ("sweep", "--seed", HUGE), "--seed"),
    Case("sweep-workers", ("sweep", "--workers", "0"), "--workers"),
    Case("sweep-out-not-a-sweep", ("sweep", "--out", "notes.txt"), "notes.txt", _existing("notes.txt")),
    Case("sweep-ray-address", ("sweep", "--backend", "ray", "--ray-address", "127.0.0.1:1"), "ray"),
    Case("sweep-data-root", ("sweep", "--data-root", "nowhere"), "Could not find", one_line=False),
    # clean-controls
    Case("cc-workers", ("clean-controls", "--workers", "0"), "--workers"),
    Case("cc-seeds-reversed", ("clean-controls", "--seeds", "5-3"), "first seed is above its last"),
    Case("cc-seeds-too-many", ("clean-controls", "--seeds", "0-100000000000"), "at most"),
    Case("cc-seeds-huge", ("clean-controls", "--seeds", HUGE), "--seeds"),
    Case("cc-seed", ("clean-controls", "--seed", "3"), "--seeds 3"),
    Case("cc-target", ("clean-controls", "--target", "1"), "--target"),
    Case("cc-out-exists", ("clean-controls", "--out", "cc.json"), "--force", _existing("cc.json")),
    Case("cc-data-root", ("clean-controls", "--data-root", "nowhere"), "Could not find", one_line=False),
    # fetch-data
    Case("fetch-dataset", ("fetch-data", "--dataset", "imagenet"), "imagenet"),
    Case("fetch-tampered", ("fetch-data", "--root", "fm"), "md5", _tampered_fmnist),
    # patterns
    Case("patterns-option", ("patterns", "--bogus"), "--bogus"),
    # stress
    Case("stress-k", ("stress", "--k", "9"), "--k"),
    Case("stress-poison", ("stress", "--poison-ratio", "1.5"), "--poison-ratio"),
    Case("stress-attack-epochs", ("stress", "--attack-epochs", "nan"), "--attack-epochs"),
    Case("stress-grey-k", ("stress", "--grey", "--k", "0"), "--k"),
    Case("stress-seed", ("stress", "--seed", HUGE), "--seed"),
    Case("stress-threads", ("stress", "--threads", "0"), "--threads"),
    Case("stress-preset", ("stress", "--preset", "turbo"), "turbo"),
    Case("stress-out-not-a-sweep", ("stress", "--out", "notes.txt"), "notes.txt", _existing("notes.txt")),
    # defend
    Case("defend-seed", (*DEFEND, "--out", "rep", "--seed", HUGE), "--seed"),
    Case("defend-out-full", (*DEFEND, "--out", "rep"), "--force", _folder("rep")),
    Case("defend-data", (*DEFEND, "--out", "rep"), "imgs"),
]


def _listing(*roots: Path) -> dict[str, str]:
    """Every path under ``roots`` with a hash of its content (folders: ``dir``)."""
    out = {}
    for root in roots:
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Outcome:
    code: int | None
    stderr: str
    seconds: float
    before: dict
    after: dict


def _run(case: Case, base: Path) -> Outcome:
    cwd, cache = base / case.id, base / f"{case.id}-cache"
    cwd.mkdir()
    cache.mkdir()
    case.setup(cwd)
    before = _listing(cwd, cache)
    env = {**os.environ, "MESA_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", **case.env}
    env.pop("MESA_DATA_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "mesa_lib", *case.args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=2 * FEW_SECONDS)
        code, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:  # it went on to train: killed, and this case fails
        code, err = None, f"still running after {2 * FEW_SECONDS:g} s (killed)"
    return Outcome(code, err, time.perf_counter() - t0, before, _listing(cwd, cache))


@pytest.fixture(scope="session")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    base = tmp_path_factory.mktemp("bad_options")
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip([c.id for c in CASES], pool.map(lambda c: _run(c, base), CASES)))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_option_exits_2_quickly_and_leaves_nothing(case, outcomes):
    got = outcomes[case.id]
    assert got.code == 2, f"exit {got.code}: {got.stderr[-2000:]}"
    lines = got.stderr.strip().splitlines()
    assert lines and lines[0].startswith("error:"), got.stderr
    assert "Traceback" not in got.stderr
    if case.one_line:
        assert len(lines) == 1, got.stderr
    assert case.needle in got.stderr, got.stderr
    assert got.seconds < FEW_SECONDS, f"took {got.seconds:.1f} s"
    assert got.after == got.before, "files were created, changed or removed"


def test_the_cases_cover_every_subcommand_of_this_file():
    """The subcommands of issue 21 this file answers for, each with several bad options."""
    covered = {c.args[0] for c in CASES}
    assert covered == {"run", "sweep", "clean-controls", "fetch-data", "patterns", "stress", "defend"}
