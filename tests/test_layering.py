"""The package's layering: the low modules import nothing of the stages, shared checks live in
one place, and no function leaves a model's train/eval mode changed."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

PKG = Path(__file__).resolve().parents[1] / "mesa_lib"


def _imports(module: str) -> set[str]:
    tree = ast.parse((PKG / f"{module}.py").read_text())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}


def test_low_modules_import_no_stage():
    assert _imports("common") == set()
    assert _imports("validate") <= {"common"}
    assert _imports("datafiles") == set()  # finding and parsing files knows no tensors' containers
    assert _imports("data") <= {"datafiles", "validate"}


def test_one_images_check():
    """MESA, Neural Cleanse and the point baseline check their images with validate.image_tensor,
    not with copies of its shape test."""
    for name in ("mesa", "neural_cleanse", "baselines"):
        text = (PKG / f"{name}.py").read_text()
        assert "image_tensor(" in text and "isinstance(data, ImageSet) else data" not in text, name


def test_no_module_imports_the_package_init():
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 1 and node.module is None:
                names = {a.name for a in node.names}
                assert "__version__" not in names, f"{path.name} imports the package __init__ (a cycle)"


def test_one_class_count_probe_and_one_target_check():
    """Every stage asks validate.num_classes / validate.check_target; no stage defines its own."""
    for path in PKG.rglob("*.py"):
        if path.name == "validate.py":
            continue
        tree = ast.parse(path.read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}  # module-level functions
        assert not defined & {"check_target", "num_classes", "_num_classes"}, path


def test_probes_restore_the_models_mode(tiny_model_and_data):
    from mesa_lib.detect import scan_classes
    from mesa_lib.mesa import MesaConfig
    from mesa_lib.validate import num_classes

    model, data = tiny_model_and_data
    model.train()
    assert num_classes(model, data.images) == 10 and model.training
    cfg = MesaConfig(hidden=8, mine_hidden=8, noise_dim=8, steps=2, batch_size=4)
    scan_classes(model, data, data, cfg, progress=False)
    assert model.training, "scan_classes left the model in eval mode"


import pytest  # noqa: E402


@pytest.fixture
def tiny_model_and_data(fake_fmnist_splits):
    from mesa_lib.models import build_model

    torch.manual_seed(0)
    return build_model("small_cnn", 1, 10, 28, 4), fake_fmnist_splits.model
