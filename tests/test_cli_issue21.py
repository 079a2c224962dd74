"""Issue 21, in process: no results file replaced without ``--force``, ``clean-controls``'
``--seed`` / ``--target``, the ``--preset paper`` warning on a CPU, ``MESA_DATA_DIR`` that
holds nothing, and ``fetch-data`` checking what it reports as available."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

import mesa_lib.datafiles as datafiles
from mesa_lib.cli import PAPER_CPU_BENCH, PAPER_CPU_IMAGES_PER_S, TRAIN_IMAGES, main
from mesa_lib.common import PACKAGE_DIR


@pytest.fixture
def fake_work(monkeypatch):
    """Record the calls that would train, instead of training."""
    import mesa_lib.pipeline as pipeline
    import mesa_lib.sweep as sweep

    calls = []

    def fake_run(**kw):
        calls.append(("run", kw))
        return {}

    def fake_controls(**kw):
        calls.append(("clean-controls", kw))
        return {"mesa_false_positives": 0, "nc_false_positives": 0, "n": len(kw["seeds"]), "rule": "r"}

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
    monkeypatch.setattr(sweep, "run_clean_controls", fake_controls)
    return calls


@pytest.mark.parametrize("command", ["run", "clean-controls"])
def test_an_existing_out_is_never_replaced_without_force(command, tmp_path, capsys, fake_work):
    """Issue 21, bug 2: ``run --out`` silently replaced an existing sweep file."""
    out = tmp_path / "s.jsonl"
    out.write_text('{"pattern": 170}\n')
    out.chmod(0o640)
    assert main([command, "--out", str(out), "--quiet"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error:") and "--force" in line and str(out) in line
    assert out.read_text() == '{"pattern": 170}\n' and out.stat().st_mode & 0o777 == 0o640
    assert not fake_work, "refused before any work"
    assert main([command, "--out", str(out), "--quiet", "--force"]) == 0  # replacing on purpose
    assert [c for c, _ in fake_work] == [command]


def test_clean_controls_refuses_seed_and_target_and_says_so_in_its_help(tmp_path, capsys, fake_work):
    out = str(tmp_path / "c.json")
    assert main(["clean-controls", "--seed", "3", "--out", out]) == 2
    assert "--seeds 3" in capsys.readouterr().err
    assert main(["clean-controls", "--target", "2", "--out", out]) == 2
    assert "no --target" in capsys.readouterr().err
    assert not fake_work and not (tmp_path / "c.json").exists()
    assert main(["clean-controls", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--seed and --target are refused" in text


def _bench_rate() -> float:
    run = json.loads((PACKAGE_DIR.parent / PAPER_CPU_BENCH).read_text())
    return next(r for r in run["runs"] if r["preset"] == "paper")["classifier_images_per_s"]


def test_the_fallback_throughput_is_the_benchmarks():
    assert PAPER_CPU_IMAGES_PER_S == _bench_rate()


@pytest.mark.parametrize("command,dataset,models", [
    (["run"], "cifar10", 1),
    (["run"], "fashion-mnist", 1),
    (["clean-controls", "--seeds", "0-2"], "cifar10", 3),
])
def test_paper_on_a_cpu_warns_up_front_with_the_estimate(command, dataset, models, tmp_path, capsys, fake_work):
    from mesa_lib.presets import get_preset

    args = [*command, "--preset", "paper", "--device", "cpu", "--dataset", dataset, "--out", str(tmp_path / "o.json"),
            "--quiet"]
    assert main(args) == 0
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "--preset paper on the CPU" in warnings[0]
    hours = get_preset("paper").clean_epochs * TRAIN_IMAGES[dataset] * models / _bench_rate() / 3600
    assert f"about {hours:.1f} h" in warnings[0]
    assert fake_work  # a warning, not a refusal
    assert main([*command, "--preset", "fast", "--device", "cpu", "--out", str(tmp_path / "f.json"), "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("state", ["missing", "empty", "file"])
def test_a_mesa_data_dir_that_holds_nothing_is_said_once(state, tmp_path, monkeypatch, capsys):
    where = tmp_path / "data"
    if state == "empty":
        where.mkdir()
    elif state == "file":
        where.write_text("x")
    monkeypatch.setenv("MESA_DATA_DIR", str(where))
    monkeypatch.setenv("MESA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(datafiles, "_WARNED_DATA_DIRS", set())
    monkeypatch.setattr(datafiles, "DEBIAN_DATA_DIR", tmp_path / "no-debian")
    for _ in range(2):
        with pytest.raises(FileNotFoundError) as err:
            datafiles.find_data_root("fashion-mnist")
    (line,) = capsys.readouterr().err.strip().splitlines()  # once, not per search
    problem = {"missing": "does not exist", "empty": "is an empty folder", "file": "is not a folder"}[state]
    assert line.startswith(f"warning: MESA_DATA_DIR={where} {problem}")
    assert problem in str(err.value)  # and the not-found message says why it did not count


def test_a_mesa_data_dir_with_data_is_not_warned_about(tmp_path, monkeypatch, capsys, fake_fmnist_writer):
    fake_fmnist_writer(tmp_path / "data")
    monkeypatch.setenv("MESA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(datafiles, "_WARNED_DATA_DIRS", set())
    assert datafiles.find_data_root("fashion-mnist") == tmp_path / "data"
    assert capsys.readouterr().err == ""


REAL_FMNIST = datafiles.DEBIAN_DATA_DIR / "fashion-mnist"


@pytest.mark.skipif(not (REAL_FMNIST / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fetch_data_verifies_the_real_files_and_refuses_a_tampered_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MESA_DATA_DIR", raising=False)
    datafiles.verify_data("fashion-mnist", REAL_FMNIST)  # the official content
    copy = tmp_path / "fm"
    shutil.copytree(REAL_FMNIST, copy)
    labels = copy / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[8] = (raw[8] + 1) % 10  # one label changed: still a valid IDX file, no longer the dataset
    labels.write_bytes(gzip.compress(bytes(raw)))
    assert main(["fetch-data", "--root", str(copy)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(labels) in line and "md5" in line and "corrupt or was modified" in line
    assert "fetch-data" in line  # what to do


def test_fetch_data_refuses_cifar_files_that_are_not_the_official_ones(tmp_path, fake_cifar_writer, monkeypatch,
                                                                       capsys):
    fake_cifar_writer(tmp_path, "cifar10")
    monkeypatch.setattr(datafiles, "SKIP_CIFAR_MD5_FOR_TESTS", False)
    assert main(["fetch-data", "--dataset", "cifar10", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "md5" in err and "differs from the official cifar10 file" in err


def test_a_failed_download_leaves_no_folder_behind(tmp_path, monkeypatch, offline):
    target = tmp_path / "new" / "data"

    def half_download(name, where):
        (where / "FashionMNIST").mkdir(parents=True)
        raise OSError("no network")

    monkeypatch.setattr(datafiles, "_download", half_download)
    with pytest.raises(ValueError, match="could not download"):
        datafiles.fetch("fashion-mnist", root=target)
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="no /dev/full")
def test_a_full_disk_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    """A real ENOSPC (``/dev/full``) becomes DiskFullError, and the command line turns it into
    one line that names the file and says nothing was lost."""
    import mesa_lib.pipeline as pipeline
    from mesa_lib.common import DiskFullError, write_all

    with open("/dev/full", "wb") as full, pytest.raises(DiskFullError) as err:
        write_all(full, b"x" * 65536, tmp_path / "r.json")
    assert err.value.filename == str(tmp_path / "r.json")

    def fill_up(**kw):
        with open("/dev/full", "wb") as full:
            write_all(full, b"x" * 65536, kw["out"])

    monkeypatch.setattr(pipeline, "run_pipeline", fill_up)
    assert main(["run", "--out", str(tmp_path / "r.json"), "--quiet"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: disk full while writing {tmp_path / 'r.json'}: nothing lost")


def test_ctrl_c_during_the_fsync_of_a_complete_line_keeps_it_and_a_half_line_is_cut(tmp_path, monkeypatch):
    """The Ctrl-C test (tests/test_cli_processes.py) once lost a finished line: the interrupt
    came in the fsync after the whole line was written, and the rollback cut it off."""
    import mesa_lib.sweep as sweep_mod
    from mesa_lib.sweep import append_line

    path = tmp_path / "s.jsonl"

    def interrupted_fsync(f, data, p):
        f.write(data)
        f.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_mod, "write_all", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        append_line(path, {"pattern": 1})
    assert path.read_text() == '{"pattern":1}\n'

    def interrupted_write(f, data, p):
        f.write(data[:5])
        f.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_mod, "write_all", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        append_line(path, {"pattern": 2})
    assert path.read_text() == '{"pattern":1}\n'


def test_clean_controls_computes_on_the_device_it_is_given(tmp_path, monkeypatch, fake_fmnist_root):
    """Issue 21: clean-controls accepted --device and always ran on the CPU. The command line
    passes it on, and the workers get it (checked with 'meta', a device every torch has)."""
    import mesa_lib.sweep as sweep_mod

    seen = {}

    class Stop(Exception):
        pass

    def capture(workers, threads, data):
        seen.update(data)
        raise Stop

    monkeypatch.setattr(sweep_mod, "_worker_pool", capture)
    with pytest.raises(Stop):
        sweep_mod.run_clean_controls(seeds=[0], out=tmp_path / "c.json", root=fake_fmnist_root, device="meta",
                                     progress=False)
    assert seen["device"] == "meta"
    calls = []
    monkeypatch.setattr(sweep_mod, "run_clean_controls", lambda **kw: calls.append(kw) or
                        {"mesa_false_positives": 0, "nc_false_positives": 0, "n": 1, "rule": "r"})
    assert main(["clean-controls", "--device", "cpu", "--seeds", "0", "--out", str(tmp_path / "d.json")]) == 0
    assert calls[0]["device"] == "cpu"
