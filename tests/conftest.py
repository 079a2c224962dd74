"""Shared pytest fixtures.

``fake_*`` fixtures (owned by ``tests/test_data.py``) write tiny datasets in
the real on-disk formats, so tests run offline and fast:

* ``fake_fmnist_writer`` / ``fake_fmnist_root``: Fashion-MNIST IDX files
  (gzipped), 20 train / 10 test images of 28x28 by default.
* ``fake_cifar_writer`` / ``fake_cifar10_root`` / ``fake_cifar100_root``:
  CIFAR python-version batches, pickled the way the official (Python 2)
  archives are. Their md5 sums are not the official ones, so these fixtures
  (and only they) set ``mesa_lib.datafiles.SKIP_CIFAR_MD5_FOR_TESTS`` for the test;
  the restricted parsing stays on.
* ``fake_fmnist_splits``: a loaded :class:`mesa_lib.data.DatasetSplits` of the
  fake Fashion-MNIST (20 train, 8 model, 2 eval) on the CPU.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import pickle
import struct
from typing import Any, Callable

import numpy as np
import pytest

from mesa_lib.data import DATASETS

def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs two workers on two cores) every worker, and every
    notebook kernel it starts, uses one torch thread, so the workers do not oversubscribe the
    cores; a thread count the user exported is kept."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


FMNIST_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in IDX format (magic 0x0000 08 ndim, big-endian sizes)."""
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_fake_fmnist(directory: pathlib.Path, n_train: int = 20, n_test: int = 10,
                      gzipped: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the four Fashion-MNIST IDX files into ``directory``; return the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    # Make the extremes present so value-range checks are meaningful.
    arrays["train_images"][0, 0, 0] = 0
    arrays["train_images"][0, 0, 1] = 255
    directory.mkdir(parents=True, exist_ok=True)
    for key, stem in FMNIST_STEMS.items():
        payload = _idx_bytes(arrays[key])
        if gzipped:
            with gzip.open(directory / f"{stem}.gz", "wb") as f:
                f.write(payload)
        else:
            (directory / stem).write_bytes(payload)
    return arrays


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pickles ``bytes`` as Python 2 ``str`` (protocol 2), like the CIFAR archives.

    Loaded with ``encoding="latin1"`` (as torchvision does) such strings come
    back as ``str``; with ``encoding="bytes"`` as ``bytes`` (``b"data"``).
    """

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _py2_pickle(obj: Any, path: pathlib.Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


# the class names the fake meta files carry: the registry's own lists (one copy of the 100 names)
CIFAR100_FINE = list(DATASETS["cifar100"].classes)
CIFAR10_NAMES = list(DATASETS["cifar10"].classes)


def write_fake_cifar(root: pathlib.Path, which: str = "cifar10", per_batch: int = 2,
                     n_test: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny CIFAR-10/100 in the python-version layout under ``root``.

    Rows of ``data`` are 3072 uint8: 1024 red, then 1024 green, then 1024 blue,
    each plane row-major.  Returns ``{"train_data", "train_labels",
    "test_data", "test_labels"}`` (train = batches concatenated in order).
    """
    rng = np.random.default_rng(seed)
    n_classes = 10 if which == "cifar10" else 100
    label_key = b"labels" if which == "cifar10" else b"fine_labels"

    def batch(n: int, offset: int) -> tuple[dict[bytes, Any], np.ndarray, np.ndarray]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = (np.arange(offset, offset + n) * 7) % n_classes
        d: dict[bytes, Any] = {
            b"batch_label": b"fake batch",
            b"data": data,
            label_key: [int(x) for x in labels],
            b"filenames": [f"img_{offset + i}.png".encode() for i in range(n)],
        }
        if which == "cifar100":
            d[b"coarse_labels"] = [int(x) % 20 for x in labels]
        return d, data, labels

    train_data, train_labels = [], []
    if which == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for b in range(5):
            d, data, labels = batch(per_batch, b * per_batch)
            _py2_pickle(d, folder / f"data_batch_{b + 1}")
            train_data.append(data)
            train_labels.append(labels)
        d, test_data, test_labels = batch(n_test, 1000)
        _py2_pickle(d, folder / "test_batch")
        _py2_pickle({b"num_cases_per_batch": per_batch,
                     b"label_names": [c.encode() for c in CIFAR10_NAMES],
                     b"num_vis": 3072}, folder / "batches.meta")
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        d, data, labels = batch(5 * per_batch, 0)
        _py2_pickle(d, folder / "train")
        train_data.append(data)
        train_labels.append(labels)
        d, test_data, test_labels = batch(n_test, 1000)
        _py2_pickle(d, folder / "test")
        _py2_pickle({b"fine_label_names": [c.encode() for c in CIFAR100_FINE],
                     b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]},
                    folder / "meta")
    return {
        "train_data": np.concatenate(train_data),
        "train_labels": np.concatenate(train_labels),
        "test_data": test_data,
        "test_labels": test_labels,
    }


@pytest.fixture
def fake_fmnist_writer() -> Callable[..., dict[str, np.ndarray]]:
    """The function ``write_fake_fmnist(directory, n_train=20, n_test=10, gzipped=True)``."""
    return write_fake_fmnist


def _skip_cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the fake CIFAR files load: they cannot have the official md5 sums (reset after the test)."""
    import mesa_lib.datafiles

    monkeypatch.setattr(mesa_lib.datafiles, "SKIP_CIFAR_MD5_FOR_TESTS", True)


@pytest.fixture
def fake_cifar_writer(monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, np.ndarray]]:
    """The function ``write_fake_cifar(root, which="cifar10", per_batch=2, n_test=5)``."""
    _skip_cifar_md5(monkeypatch)
    return write_fake_cifar


@pytest.fixture
def fake_fmnist_root(tmp_path: pathlib.Path) -> pathlib.Path:
    """A directory with a tiny gzipped Fashion-MNIST (20 train, 10 test)."""
    root = tmp_path / "fake-fmnist"
    write_fake_fmnist(root)
    return root


def _fake_cifar_root(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, which: str) -> pathlib.Path:
    _skip_cifar_md5(monkeypatch)
    root = tmp_path / f"fake-{which}"
    write_fake_cifar(root, which)
    return root


@pytest.fixture
def fake_cifar10_root(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A directory holding ``cifar-10-batches-py`` (10 train, 5 test images)."""
    return _fake_cifar_root(tmp_path, monkeypatch, "cifar10")


@pytest.fixture
def fake_cifar100_root(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A directory holding ``cifar-100-python`` (10 train, 5 test images)."""
    return _fake_cifar_root(tmp_path, monkeypatch, "cifar100")


@pytest.fixture
def offline(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No internet (every download fails as without DNS), no Debian dataset, no
    MESA_DATA_DIR, and an empty private cache."""
    import urllib.error

    import mesa_lib.datafiles as data

    def no_network(name, target):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data, "_download", no_network)
    monkeypatch.setattr(data, "DEBIAN_DATA_DIR", tmp_path / "no-debian")
    monkeypatch.delenv("MESA_DATA_DIR", raising=False)
    monkeypatch.setenv("MESA_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def fake_fmnist_splits(fake_fmnist_root: pathlib.Path):
    """Tiny Fashion-MNIST as loaded splits on the CPU (20 train, 8 model, 2 eval)."""
    from mesa_lib.data import load_dataset

    return load_dataset("fashion-mnist", root=fake_fmnist_root, device="cpu")


@pytest.fixture
def torch_single_thread():
    """Run a test with one torch thread (restored afterwards).

    The small MLPs of MINE and the toy staircase are faster on one thread, and on a shared
    2-core machine several intra-op threads spin against other processes and can be many
    times slower.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FMNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")


def real_fmnist_available() -> bool:
    """True if the real Fashion-MNIST is where ``mesa_lib.load_dataset()`` finds it offline."""
    from mesa_lib.data import find_data_root

    try:
        find_data_root("fashion-mnist")
    except (FileNotFoundError, ValueError):
        return False
    return True


@pytest.fixture(scope="session")
def tiny_backdoor():
    """A quickly backdoored classifier on real Fashion-MNIST (a few seconds on one core).

    SmallCNN of width 8 trained from scratch for 3 epochs on the first 5000 training images
    with 20% of every batch poisoned (pattern 170 stamped as its bright member 341, target 0),
    SGD lr 0.05. Measured: clean accuracy ~0.76-0.80, ASR ~1.0. Returns a namespace with
    ``splits``, ``model`` (eval mode; do not modify it), ``trigger``, ``target``, ``clean_acc``
    and ``asr``. Skipped when the dataset is not installed.
    """
    import types

    import torch

    from mesa_lib import build_model, inject_backdoor, load_dataset, trigger_from_pattern
    from mesa_lib.evaluate import evaluate_model

    if not real_fmnist_available():
        pytest.skip("Fashion-MNIST not found (install dataset-fashion-mnist or run `make data`)")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a width-8 CNN gains little from threads; robust on a busy machine
    try:
        splits = load_dataset("fashion-mnist", train_limit=5000)
        trigger = trigger_from_pattern(170, 1, dark_background=True)
        torch.manual_seed(0)
        model = build_model("small_cnn", 1, 10, 28, width=8)
        inject_backdoor(model, splits.train, trigger, 0, poison_ratio=0.2, epochs=3, lr=0.05, seed=0,
                        progress=False)
        metrics = evaluate_model(model, splits.eval, trigger, 0)
    finally:
        torch.set_num_threads(before)
    return types.SimpleNamespace(splits=splits, model=model.eval(), trigger=trigger, target=0, **metrics)


# nbval waits only 5 s for each output message after a cell has finished; on a busy 2-core
# machine a kernel can take longer to flush a figure, which failed a cell spuriously. The
# cell's own timeout (--nbval-cell-timeout) is unchanged. (This hook lives here, not in a
# book/conftest.py: two conftest modules would shadow each other's imports.)
NBVAL_OUTPUT_TIMEOUT_S = 60


def pytest_collection_modifyitems(items):
    """nbval cells get the output timeout; the book's notebook tests go first (a stable reorder,
    the same in every pytest-xdist worker): with ``--dist loadfile`` each worker starts with its
    half of the book, the longest work, and the unit-test files fill in around them."""
    for item in items:
        if type(item).__name__ == "IPyNbCell":
            item.output_timeout = NBVAL_OUTPUT_TIMEOUT_S
    items.sort(key=lambda item: 0 if item.nodeid.startswith("tests/test_notebooks") else 1)



# ---------------------------------------------------------------- strict device mode
# Notebooks: `MESA_STRICT_DEVICE=1 pytest --nbval-lax book/03_one_or_many.ipynb` (the kernel
# inherits the variable; mesa_lib.book.chapter_setup then puts the chapter's data and models on
# the simulated device of mesa_lib.devicecheck); `make test-device` runs every chapter so.
@pytest.fixture
def strict_device():
    """Run a test in strict-device mode; yields the simulated device (``cpu:1``), which stands
    for ``cuda``: see :mod:`mesa_lib.devicecheck`."""
    from mesa_lib.devicecheck import strict_device as _strict

    with _strict() as dev:
        yield dev
