"""Running the notebooks in Colab: every notebook starts with the install cell that
scripts/colab_cells.py writes from _config.yml; that cell installs mesa-lib from the configured
repository in Colab and does nothing anywhere else; chapter_setup downloads the data in Colab.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import tempfile
import types
import venv
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("colab_cells", ROOT / "scripts" / "colab_cells.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


colab_cells = _script()
NOTEBOOKS = colab_cells.notebooks()


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 9


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_first_cell_is_the_generated_install_cell(nb):
    """The install cell is the first cell (in the nbgrader assignment: right after its title),
    so it is the first code cell everywhere."""
    content = json.loads(nb.read_text())
    at = colab_cells.position(content)
    cells = content["cells"]
    assert at == (1 if nb.name == "10_exercises.ipynb" else 0)
    want = colab_cells.make_cell(*colab_cells.repository(), graded=colab_cells.is_graded(content))
    assert cells[at] == want, (f"{nb.name}: cell {at} is not the Colab install cell that "
                               "`python scripts/colab_cells.py` writes; run it")
    assert all(c["cell_type"] == "markdown" for c in cells[:at])
    assert sum(c.get("id") == colab_cells.CELL_ID for c in cells) == 1
    assert "remove-cell" in cells[at]["metadata"]["tags"]


def test_script_check_mode_agrees():
    assert colab_cells.main(["--check"]) == 0


def test_one_repository_setting():
    """The install cell, the Colab launch button and the repository button read the same keys."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    url, branch = colab_cells.repository()
    assert url == config["repository"]["url"].rstrip("/") and url.startswith("https://github.com/")
    assert branch == config["repository"]["branch"]
    assert config["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert config["repository"].get("path_to_book", "") == ""  # the notebooks' paths are book/...
    assert config["html"]["use_repository_button"]
    source = colab_cells.cell_source(url, branch)
    assert f"git+{url}@{branch}" in source
    # no second copy of the address elsewhere in the notebooks, the package or the scripts
    copies = [p for p in [*ROOT.glob("mesa_lib/*.py"), *ROOT.glob("scripts/*.py"), ROOT / "pyproject.toml"]
              if url in p.read_text()]
    assert copies == [], copies


def test_install_cell_is_plain_python():
    compile(colab_cells.cell_source("https://github.com/o/r", "main"), "<cell>", "exec")


def _run_cell(monkeypatch, in_colab: bool) -> list:
    calls = []

    def fake_run(cmd, **kw):
        calls.append((cmd, kw))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    if in_colab:
        google = types.ModuleType("google")
        colab = types.ModuleType("google.colab")
        google.colab = colab
        monkeypatch.setitem(sys.modules, "google", google)
        monkeypatch.setitem(sys.modules, "google.colab", colab)
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    source = colab_cells.cell_source(*colab_cells.repository())
    exec(compile(source, "<install cell>", "exec"), {})
    return calls


def test_install_cell_installs_in_colab(monkeypatch):
    calls = _run_cell(monkeypatch, in_colab=True)
    url, branch = colab_cells.repository()
    assert len(calls) == 1
    cmd, kw = calls[0]
    assert cmd == [sys.executable, "-m", "pip", "install", "-q", f"mesa-lib[book] @ git+{url}@{branch}"]
    assert kw.get("check") is True, "a failed install must stop the notebook"


def test_install_cell_does_nothing_elsewhere(monkeypatch):
    assert _run_cell(monkeypatch, in_colab=False) == []


def _stop_at_load(monkeypatch) -> dict:
    """Make chapter_setup stop at loading the data; returns what it asked for."""
    from mesa_lib import book

    seen: dict = {}

    def fake_load(name, device="cpu", download=False, **kw):
        seen.update(device=device, download=download)
        raise RuntimeError("stop here")

    monkeypatch.setattr(book, "load_dataset", fake_load)
    return seen


def test_chapter_setup_downloads_only_in_colab(monkeypatch):
    from mesa_lib import book

    seen = _stop_at_load(monkeypatch)
    monkeypatch.delenv("MESA_STRICT_DEVICE", raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    with pytest.raises(RuntimeError, match="stop here"):
        book.chapter_setup()
    assert seen["download"] is False
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert book.in_colab()
    with pytest.raises(RuntimeError, match="stop here"):
        book.chapter_setup()
    assert seen["download"] is True


def test_chapter_setup_strict_device(monkeypatch):
    from mesa_lib import book, devicecheck

    seen = _stop_at_load(monkeypatch)
    monkeypatch.setenv("MESA_STRICT_DEVICE", "1")
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            book.chapter_setup()
        assert devicecheck.enabled() and seen["device"] == devicecheck.SIM_DEVICE
    finally:
        devicecheck.disable()


def notebook_imports() -> set[str]:
    """The top-level modules that the notebooks' code cells import, outside the standard library."""
    names: set[str] = set()
    for nb in NOTEBOOKS:
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            for node in ast.walk(ast.parse("".join(cell["source"]))):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names}


def test_notebook_imports_are_found():
    assert {"mesa_lib", "torch", "matplotlib", "ipywidgets", "myst_nb"} <= notebook_imports()


def test_install_cell_in_a_fresh_venv(request):
    """The install cell, run as in Colab in a fresh virtual environment that has nothing but
    pip, installs everything the notebooks import. The cell is the notebooks' own, with the
    GitHub address replaced by this checkout's committed HEAD (``git+file://``: the same kind
    of requirement, installed by pip the same way); then every module that any notebook
    imports is imported there, with ``mesa_lib.book.chapter_setup``, and ``pip check`` passes."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout: the cell installs from a git repository")
    # the environment holds torch and its CUDA wheels (gigabytes): removed as soon as the test
    # ends, not kept with pytest's last three temporary folders
    scratch = tempfile.TemporaryDirectory(prefix="mesa-colab-venv-")
    request.addfinalizer(scratch.cleanup)
    env_dir = Path(scratch.name) / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    url, branch = colab_cells.repository()
    cell = colab_cells.cell_source(url, branch)
    # file://localhost/...: pip reads file:///... followed by @rev as a local path
    local = cell.replace(f"git+{url}@{branch}", f"git+file://localhost{ROOT.as_posix()}@{head.stdout.strip()}")
    assert local != cell
    run_cell = ("import sys, types\n"
                "sys.modules['google.colab'] = types.ModuleType('google.colab')  # as in Colab\n" + local)
    done = subprocess.run([str(py), "-c", run_cell], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    modules = sorted(notebook_imports())
    probe = "\n".join([f"import {m}" for m in modules] + ["from mesa_lib.book import chapter_setup",
                                                            "print('imported', len(sys.modules))"])
    imported = subprocess.run([str(py), "-c", "import sys\n" + probe], capture_output=True, text=True,
                              timeout=600)
    assert imported.returncode == 0, (modules, imported.stderr[-3000:])
    check = subprocess.run([str(py), "-m", "pip", "check"], capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stdout[-3000:]
