"""Issue 21 with real processes: Ctrl-C, ``kill -9`` of a sweep with workers, and an ``--out``
the process may not write (as root with every capability dropped).

The sweeps run the real command line (:func:`mesa_lib.cli.main`) in a child process, with a
tiny preset registered under the name ``tiny`` (the one of ``tests/test_sweep.py``) on fake
Fashion-MNIST, so each trigger takes about a second; ``long`` is the same with a MESA search
that would run for hours, so that a worker left behind is still computing when it is checked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import write_fake_fmnist

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

_CLI = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_sweep import TINY, TINY_NC
    import mesa_lib.presets as presets
    import mesa_lib.sweep as sweep
    presets.PRESETS["tiny"] = TINY.with_(name="tiny")
    sweep.NC_CONFIGS["tiny"] = TINY_NC
    presets.PRESETS["long"] = TINY.with_(name="long", mesa={{"steps": 10**7}})  # a trigger takes hours
    sweep.NC_CONFIGS["long"] = TINY_NC
    from mesa_lib.cli import main
    if __name__ == "__main__":  # not in the sweep's spawned workers, which import this file
        sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture
def tiny_cli(tmp_path):
    """``(argv prefix, env)`` for the command line with the ``tiny`` preset, fake data at
    ``tmp_path / "fm"`` and a private model cache."""
    write_fake_fmnist(tmp_path / "fm", n_train=200, n_test=50)
    script = tmp_path / "cli.py"
    script.write_text(_CLI.format(tests=str(TESTS)))
    env = {**os.environ, "MESA_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("MESA_DATA_DIR", None)
    return [sys.executable, str(script)], env


def _sweep_args(tmp_path: Path, out: Path, patterns: str, *extra: str, preset: str = "tiny") -> list[str]:
    return ["sweep", "--preset", preset, "--patterns", patterns, "--data-root", str(tmp_path / "fm"),
            "--out", str(out), "--quiet", *extra]


def _wait_for_lines(out: Path, proc: subprocess.Popen, n: int, timeout: float = 300) -> bytes:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if out.is_file() and (data := out.read_bytes()).count(b"\n") >= n:
            return data
        time.sleep(0.02)
    raise AssertionError(f"the sweep ended (exit {proc.poll()}) or stalled before writing {n} line(s)")


@pytest.mark.slow  # about 25 s: a sweep started, interrupted and resumed
def test_ctrl_c_is_one_line_exit_130_and_the_results_survive(tiny_cli, tmp_path):
    cmd, env = tiny_cli
    out = tmp_path / "s.jsonl"
    args = _sweep_args(tmp_path, out, "0,1,3,5")
    quiet = {**env, "PYTHONWARNINGS": "ignore::UserWarning"}  # the tiny preset's MESA warns of collapse
    proc = subprocess.Popen([*cmd, *args], env=quiet, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(out, proc, 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == "interrupted: rerun the same command to resume"
    kept = out.read_bytes()
    lines = [json.loads(s) for s in kept.decode().splitlines()]  # only complete lines
    assert kept.endswith(b"\n") and 1 <= len(lines) < 4
    again = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert out.read_bytes().startswith(kept)  # resumed: the lines written before Ctrl-C are untouched
    assert sorted(json.loads(s)["pattern"] for s in out.read_text().splitlines()) == [0, 1, 3, 5]


def _children(pid: int) -> set[int]:
    """The pids of every live process whose parent is ``pid`` (from ``/proc``)."""
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a zombie computes nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _is_worker(pid: int) -> bool:
    try:
        return b"multiprocessing" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_a_two_worker_sweep_leaves_no_worker_computing(tiny_cli, tmp_path):
    cmd, env = tiny_cli
    out = tmp_path / "w.jsonl"
    proc = subprocess.Popen([*cmd, *_sweep_args(tmp_path, out, "0,1,3", "--workers", "2", preset="long")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    workers: set[int] = set()
    while time.time() < deadline and proc.poll() is None and len(workers) < 2:
        workers = {p for p in _children(proc.pid) if _is_worker(p)}
        time.sleep(0.05)
    assert len(workers) >= 2, "the sweep never started its two workers"
    time.sleep(3.0)  # the workers load the data, attack, and are then in MESA's (hours long) search
    assert all(_running(p) for p in workers)
    everything = workers | _children(proc.pid)  # also the resource tracker
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_running(p) for p in everything):
        time.sleep(0.1)
    left = [p for p in everything if _running(p)]
    for p in left:  # do not leave them behind for the next test
        os.kill(p, signal.SIGKILL)
    assert not left, f"processes {left} kept running after their sweep was killed"


_SETPRIV = shutil.which("setpriv")


@pytest.mark.skipif(_SETPRIV is None, reason="setpriv (util-linux) is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="run as root, where plain permission bits do not stop writes")
@pytest.mark.parametrize("command,out", [
    (["run"], "ro/r.json"),
    (["sweep"], "ro/s.jsonl"),
    (["clean-controls"], "ro/c.json"),
    (["stress"], "ro/t.jsonl"),
    (["run", "--force"], "ro-file.json"),
])
def test_an_unwritable_out_is_refused_before_any_work_even_for_root(command, out, tmp_path):
    """As root without capabilities (``setpriv --inh-caps=-all --bounding-set=-all``) a
    read-only folder or file cannot be written: the command must say so in one line before
    it trains, and change nothing."""
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro-file.json").write_text("{}")
    os.chmod(tmp_path / "ro-file.json", 0o444)
    os.chmod(tmp_path / "ro", 0o555)
    env = {**os.environ, "MESA_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    probe = subprocess.run([_SETPRIV, "--inh-caps=-all", "--bounding-set=-all", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"setpriv cannot drop capabilities here: {probe.stderr.decode().strip()}")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    t0 = time.perf_counter()
    proc = subprocess.run([_SETPRIV, "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-m", "mesa_lib",
                           *command, "--out", out], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    took = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert ("cannot create files in ro" in lines[0]) or ("not writable" in lines[0]), lines[0]
    assert took < 30, f"took {took:.0f} s: it must be refused before any training"
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "ro-file.json").read_text() == "{}"
