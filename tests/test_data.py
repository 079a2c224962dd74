"""Tests of mesa_lib.data: offline loading, search order, splits, CIFAR parsing."""

from __future__ import annotations

import gzip
import pathlib

import numpy as np
import pytest
import torch

from mesa_lib import data, datafiles
from mesa_lib.data import (
    DATASETS,
    DatasetSplits,
    ImageSet,
    cache_dir,
    find_data_root,
    load_dataset,
    read_idx,
    split_test,
)

REAL_DEBIAN_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test sees the machine's data: empty cache, no env var, fake Debian dir."""
    monkeypatch.delenv("MESA_DATA_DIR", raising=False)
    monkeypatch.setenv("MESA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(datafiles, "DEBIAN_DATA_DIR", tmp_path / "debian-datasets")


def _check_fmnist(splits: DatasetSplits, arrays: dict[str, np.ndarray]) -> None:
    assert splits.name == "fashion-mnist"
    assert splits.num_classes == 10 and len(splits.classes) == 10
    assert splits.channels == 1 and splits.image_size == 28 and splits.dark_background
    tr = splits.train
    assert tr.images.shape == (20, 1, 28, 28) and tr.images.dtype == torch.float32
    assert tr.labels.shape == (20,) and tr.labels.dtype == torch.int64
    assert float(tr.images.min()) == 0.0 and float(tr.images.max()) == 1.0
    expected = torch.from_numpy(arrays["train_images"]).float().div(255).unsqueeze(1)
    assert torch.equal(tr.images, expected)
    assert torch.equal(tr.labels, torch.from_numpy(arrays["train_labels"]).long())
    assert len(splits.model) == 8 and len(splits.eval) == 2


# ---------------------------------------------------------------- Fashion-MNIST


def test_load_via_root(fake_fmnist_writer, tmp_path):
    arrays = fake_fmnist_writer(tmp_path / "d")
    splits = load_dataset(root=tmp_path / "d")
    _check_fmnist(splits, arrays)
    assert splits.train.images.device.type == "cpu"


def test_load_uncompressed_via_env(fake_fmnist_writer, tmp_path, monkeypatch):
    arrays = fake_fmnist_writer(tmp_path / "env", gzipped=False)
    monkeypatch.setenv("MESA_DATA_DIR", str(tmp_path / "env"))
    _check_fmnist(load_dataset("fashion-mnist"), arrays)


def test_load_env_with_dataset_subfolder(fake_fmnist_writer, tmp_path, monkeypatch):
    arrays = fake_fmnist_writer(tmp_path / "all" / "fashion-mnist")
    monkeypatch.setenv("MESA_DATA_DIR", str(tmp_path / "all"))
    assert find_data_root("fashion-mnist") == tmp_path / "all" / "fashion-mnist"
    _check_fmnist(load_dataset(), arrays)


def test_load_torchvision_layout(fake_fmnist_writer, tmp_path):
    arrays = fake_fmnist_writer(tmp_path / "tv" / "FashionMNIST" / "raw")
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    assert find_data_root("fashion-mnist", tmp_path / "tv") == raw
    _check_fmnist(load_dataset(root=tmp_path / "tv"), arrays)


def test_load_from_cache_and_debian(fake_fmnist_writer, tmp_path):
    arrays = fake_fmnist_writer(datafiles.DEBIAN_DATA_DIR / "fashion-mnist")
    _check_fmnist(load_dataset(), arrays)
    fake_fmnist_writer(cache_dir() / "fashion-mnist")
    assert find_data_root("fashion-mnist") == cache_dir() / "fashion-mnist"


def test_train_limit(fake_fmnist_root):
    splits = load_dataset(root=fake_fmnist_root, train_limit=7)
    assert len(splits.train) == 7 and len(splits.model) + len(splits.eval) == 10
    with pytest.raises(ValueError, match="train_limit"):
        load_dataset(root=fake_fmnist_root, train_limit=0)


def test_split_fixed_disjoint_covering(fake_fmnist_writer, tmp_path):
    arrays = fake_fmnist_writer(tmp_path / "d", n_test=50)
    a = load_dataset(root=tmp_path / "d")
    b = load_dataset(root=tmp_path / "d")
    assert len(a.model) == 40 and len(a.eval) == 10
    assert torch.equal(a.model.images, b.model.images) and torch.equal(a.eval.labels, b.eval.labels)
    # Identify each test image by its raw pixels -> index in the test file.
    test = torch.from_numpy(arrays["test_images"]).float().div(255).unsqueeze(1)

    def indices(part: ImageSet) -> set[int]:
        eq = (part.images[:, None] == test[None]).flatten(2).all(-1)  # [n_part, n_test]
        assert (eq.sum(1) == 1).all()
        return set(eq.int().argmax(1).tolist())

    m, e = indices(a.model), indices(a.eval)
    assert not (m & e) and m | e == set(range(50))
    # Not the trivial split, and independent of the global RNG.
    assert sorted(m) != list(range(40))
    torch.manual_seed(123)
    c = load_dataset(root=tmp_path / "d")
    assert torch.equal(a.model.images, c.model.images)
    d = load_dataset(root=tmp_path / "d", split_seed=1)
    assert indices(d.model) != m


def test_split_test_function():
    test = ImageSet(torch.rand(10, 1, 4, 4), torch.arange(10))
    model, ev = split_test(test, 0.8, seed=0)
    assert len(model) == 8 and len(ev) == 2
    assert sorted(model.labels.tolist() + ev.labels.tolist()) == list(range(10))
    model2, _ = split_test(test, 0.8, seed=0)
    assert torch.equal(model.labels, model2.labels)
    assert len(split_test(test, 0.25)[0]) == round(0.25 * 10)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 1.5, 0.01])
def test_bad_model_fraction(fraction, fake_fmnist_root):
    with pytest.raises(ValueError, match="model_fraction"):
        load_dataset(root=fake_fmnist_root, model_fraction=fraction)


# ---------------------------------------------------------------- search order


def test_search_order(fake_fmnist_writer, tmp_path, monkeypatch):
    places = {
        "root": tmp_path / "explicit",
        "env": tmp_path / "env",
        "cache": cache_dir() / "fashion-mnist",
        "debian": datafiles.DEBIAN_DATA_DIR / "fashion-mnist",
    }
    for i, p in enumerate(places.values()):
        fake_fmnist_writer(p, seed=i)
    monkeypatch.setenv("MESA_DATA_DIR", str(places["env"]))
    assert find_data_root("fashion-mnist", places["root"]) == places["root"]
    assert find_data_root("fashion-mnist") == places["env"]
    monkeypatch.delenv("MESA_DATA_DIR")
    assert find_data_root("fashion-mnist") == places["cache"]
    monkeypatch.setenv("MESA_CACHE_DIR", str(tmp_path / "empty-cache"))
    assert find_data_root("fashion-mnist") == places["debian"]
    # The loaded data really comes from the winner.
    monkeypatch.setenv("MESA_DATA_DIR", str(places["env"]))
    a = load_dataset(root=places["root"])
    ref = fake_fmnist_writer(tmp_path / "check", seed=0)
    assert torch.equal(a.train.labels, torch.from_numpy(ref["train_labels"]).long())
    assert torch.equal(a.train.images[:, 0], torch.from_numpy(ref["train_images"]).float() / 255)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MESA_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MESA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "mesa_lib"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == pathlib.Path.home() / ".cache" / "mesa_lib"


def test_not_found_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("MESA_DATA_DIR", str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError) as info:
        load_dataset()
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "download" in msg
    assert "fetch-data" in msg and "MESA_DATA_DIR" in msg
    for place in (tmp_path / "nothing-here", cache_dir() / "fashion-mnist",
                  datafiles.DEBIAN_DATA_DIR / "fashion-mnist"):
        assert str(place) in msg


def test_explicit_root_missing_is_an_error(fake_fmnist_writer, tmp_path, monkeypatch):
    fake_fmnist_writer(tmp_path / "env")
    monkeypatch.setenv("MESA_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError, match="wrong-dir"):
        load_dataset(root=tmp_path / "wrong-dir")


def test_incomplete_dir_is_not_found(fake_fmnist_writer, tmp_path):
    fake_fmnist_writer(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError):
        find_data_root("fashion-mnist", tmp_path / "d")


def test_fetch_and_download(fake_fmnist_writer, tmp_path, monkeypatch):
    calls = []

    def fake_download(name, target):  # stands in for torchvision's download
        calls.append((name, target))
        fake_fmnist_writer(target / "FashionMNIST" / "raw")

    monkeypatch.setattr(datafiles, "_download", fake_download)
    # Already findable: nothing is downloaded, the found dir is returned.
    fake_fmnist_writer(datafiles.DEBIAN_DATA_DIR / "fashion-mnist")
    assert data.fetch() == datafiles.DEBIAN_DATA_DIR / "fashion-mnist" and not calls
    # Nothing found: download=True downloads into the user cache, then loads.
    monkeypatch.setattr(datafiles, "DEBIAN_DATA_DIR", tmp_path / "no-debian")
    splits = load_dataset(download=True)
    assert calls == [("fashion-mnist", cache_dir() / "fashion-mnist")]
    assert len(splits.train) == 20
    assert find_data_root("fashion-mnist") == cache_dir() / "fashion-mnist" / "FashionMNIST" / "raw"
    # With an explicit root the download goes there.
    assert data.fetch(root=tmp_path / "mine") == tmp_path / "mine" / "FashionMNIST" / "raw"
    assert calls[-1] == ("fashion-mnist", tmp_path / "mine")


# ---------------------------------------------------------------- corrupt files


def _gz(path: pathlib.Path, payload: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize(
    "corruption", ["magic", "truncated", "labels-magic", "not-gzip", "bad-deflate", "count"]
)
def test_corrupt_idx(fake_fmnist_writer, tmp_path, corruption):
    d = tmp_path / "d"
    fake_fmnist_writer(d)
    images = d / "train-images-idx3-ubyte.gz"
    labels = d / "train-labels-idx1-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    if corruption == "magic":
        _gz(images, b"\x00\x00\x08\x07" + raw[4:])
        bad = images
    elif corruption == "truncated":
        _gz(images, raw[:-100])
        bad = images
    elif corruption == "labels-magic":
        _gz(labels, raw)  # an image file where labels belong: 3-D, not 1-D
        bad = labels
    elif corruption == "not-gzip":
        images.write_bytes(b"this is not gzip data at all")
        bad = images
    elif corruption == "bad-deflate":
        broken = bytearray(images.read_bytes())
        broken[30:60] = b"x" * 30
        images.write_bytes(bytes(broken))
        bad = images
    else:  # label count differs from image count
        lab = gzip.decompress(labels.read_bytes())
        _gz(labels, b"\x00\x00\x08\x01" + (19).to_bytes(4, "big") + lab[8:27])
        bad = labels
    with pytest.raises(ValueError, match=bad.name):
        load_dataset(root=d)


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "x-idx3-ubyte"
    header = bytes([0, 0, 8, 3]) + b"".join(s.to_bytes(4, "big") for s in arr.shape)
    p.write_bytes(header + arr.tobytes())
    out = read_idx(p, expect_ndim=3)
    assert np.array_equal(out, arr) and out.flags.writeable
    with pytest.raises(ValueError, match="x-idx3-ubyte"):
        read_idx(p, expect_ndim=1)


# ---------------------------------------------------------------- CIFAR


def _expected_chw(row: np.ndarray) -> torch.Tensor:
    """CIFAR row (1024 R, 1024 G, 1024 B, row-major planes) -> [3, 32, 32] in [0, 1]."""
    return torch.from_numpy(row.reshape(3, 32, 32).astype(np.float32) / 255)


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar(which, fake_cifar_writer, tmp_path):
    arrays = fake_cifar_writer(tmp_path / which, which)
    splits = load_dataset(which, root=tmp_path / which)
    n_classes = 10 if which == "cifar10" else 100
    assert splits.name == which and splits.num_classes == n_classes
    assert len(splits.classes) == n_classes
    assert splits.classes[:2] == (["airplane", "automobile"] if which == "cifar10"
                                  else ["apple", "aquarium_fish"])
    assert splits.channels == 3 and splits.image_size == 32 and not splits.dark_background
    tr = splits.train
    assert tr.images.shape == (10, 3, 32, 32) and tr.images.dtype == torch.float32
    assert tr.labels.dtype == torch.int64
    assert torch.equal(tr.labels, torch.from_numpy(arrays["train_labels"]).long())
    # Known image, channel order: image 3 (second image of batch 2 for CIFAR-10).
    row = arrays["train_data"][3]
    assert torch.allclose(tr.images[3], _expected_chw(row))
    assert tr.images[3, 0, 0, 1].item() == pytest.approx(row[1] / 255)          # red, (0, 1)
    assert tr.images[3, 1, 2, 5].item() == pytest.approx(row[1024 + 2 * 32 + 5] / 255)  # green
    assert tr.images[3, 2, 31, 31].item() == pytest.approx(row[3071] / 255)     # blue
    assert 0.0 <= float(tr.images.min()) and float(tr.images.max()) <= 1.0
    assert len(splits.model) == 4 and len(splits.eval) == 1
    all_test = torch.cat([splits.model.labels, splits.eval.labels]).sort().values
    assert torch.equal(all_test, torch.from_numpy(arrays["test_labels"]).long().sort().values)


def test_cifar_fixtures_and_env(fake_cifar10_root, fake_cifar100_root, monkeypatch, tmp_path):
    # One MESA_DATA_DIR serving both datasets through sub-folders named after them.
    both = tmp_path / "both"
    both.mkdir()
    (both / "cifar10").symlink_to(fake_cifar10_root, target_is_directory=True)
    (both / "cifar100").symlink_to(fake_cifar100_root, target_is_directory=True)
    monkeypatch.setenv("MESA_DATA_DIR", str(both))
    assert len(load_dataset("CIFAR-10", train_limit=3).train) == 3
    assert load_dataset("cifar100").num_classes == 100


def test_cifar_not_found(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10")
    msg = str(info.value)
    assert "download" in msg and "cifar-10-batches-py" in msg
    assert "apt-get" not in msg  # there is no Debian package for CIFAR


def test_cifar_corrupt(fake_cifar_writer, tmp_path):
    fake_cifar_writer(tmp_path / "c", "cifar10")
    (tmp_path / "c" / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path / "c")


# ---------------------------------------------------------------- API details


def test_unknown_name():
    with pytest.raises(ValueError) as info:
        load_dataset("mnist")
    for known in DATASETS:
        assert known in str(info.value)
    with pytest.raises(ValueError):
        find_data_root("imagenet")


@pytest.mark.parametrize(
    "images, labels, match",
    [
        (torch.rand(3, 28, 28), torch.zeros(3, dtype=torch.long), "4-D"),
        (torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), "float"),
        (torch.rand(3, 1, 4, 4), torch.zeros(3, 1, dtype=torch.long), "1-D"),
        (torch.rand(3, 1, 4, 4), torch.zeros(3, dtype=torch.int32), "int64"),
        (torch.rand(3, 1, 4, 4), torch.zeros(2, dtype=torch.long), "3 images but 2 labels"),
        (torch.rand(0, 1, 4, 4), torch.zeros(0, dtype=torch.long), "empty"),
        (np.zeros((3, 1, 4, 4), np.float32), torch.zeros(3, dtype=torch.long), "torch.Tensor"),
    ],
)
def test_imageset_validation(images, labels, match):
    with pytest.raises(ValueError, match=match):
        ImageSet(images, labels)


def test_imageset_subset_and_to():
    s = ImageSet(torch.rand(6, 3, 8, 8), torch.arange(6))
    assert len(s) == 6
    assert s.subset(slice(1, 3)).labels.tolist() == [1, 2]
    assert s.subset(torch.tensor([5, 0])).labels.tolist() == [5, 0]
    assert s.subset(s.labels % 2 == 0).labels.tolist() == [0, 2, 4]
    moved = s.to("cpu")
    assert isinstance(moved, ImageSet) and torch.equal(moved.images, s.images)


def test_splits_to_and_properties(fake_fmnist_splits):
    moved = fake_fmnist_splits.to(torch.device("cpu"))
    assert isinstance(moved, DatasetSplits)
    assert moved.classes == fake_fmnist_splits.classes and moved.classes[0] == "T-shirt/top"
    assert moved.info is DATASETS["fashion-mnist"]
    assert DATASETS["cifar100"].num_classes == 100 and DATASETS["cifar10"].channels == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_cuda(fake_fmnist_root):
    splits = load_dataset(root=fake_fmnist_root, device="cuda")
    for part in (splits.train, splits.model, splits.eval):
        assert part.images.is_cuda and part.labels.is_cuda


# ---------------------------------------------------------------- real data


@pytest.mark.skipif(not REAL_DEBIAN_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.setattr(datafiles, "DEBIAN_DATA_DIR", REAL_DEBIAN_DIR.parent)
    splits = load_dataset("fashion-mnist")
    assert find_data_root("fashion-mnist") == REAL_DEBIAN_DIR
    assert splits.train.images.shape == (60000, 1, 28, 28)
    assert len(splits.model) == 8000 and len(splits.eval) == 2000
    assert splits.num_classes == 10
    assert splits.train.labels.bincount().tolist() == [6000] * 10
    assert float(splits.train.images.min()) == 0.0 and float(splits.train.images.max()) == 1.0


# ---------------------------------------------------------------- CIFAR: integrity and safe parsing


class _RunsCode:
    """Pickles to ``builtins.exec(<code>)``: unpickling it with plain pickle runs the code."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


class _CallsSystem:
    """Pickles to ``os.system(<command>)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


@pytest.mark.parametrize("which", ["exec", "system"])
def test_cifar_tampered_batch_is_refused_without_running_code(which, fake_cifar_writer, tmp_path):
    import pickle

    fake_cifar_writer(tmp_path / "c", "cifar10")
    marker = tmp_path / "marker"
    payload = (_RunsCode(f"open({str(marker)!r}, 'w').write('pwned')") if which == "exec"
               else _CallsSystem(f"touch {marker}"))
    batch = tmp_path / "c" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({"data": payload, "labels": [0]}, protocol=2))
    with pytest.raises(ValueError) as info:
        load_dataset("cifar10", root=tmp_path / "c")
    assert not marker.exists(), "the crafted pickle ran code"
    msg = str(info.value)
    assert "data_batch_3" in msg and "refused" in msg and "download" in msg and "\n" not in msg


def test_cifar_tampered_meta_is_refused(fake_cifar_writer, tmp_path):
    import pickle

    fake_cifar_writer(tmp_path / "c", "cifar100")
    marker = tmp_path / "marker"
    (tmp_path / "c" / "cifar-100-python" / "meta").write_bytes(
        pickle.dumps(_CallsSystem(f"touch {marker}"), protocol=2))
    with pytest.raises(ValueError, match=r"meta: refused: the file asks to load (posix|os)\.system"):
        load_dataset("cifar100", root=tmp_path / "c")
    assert not marker.exists()


def test_cifar_truncated_batch_is_an_error(fake_cifar_writer, tmp_path):
    fake_cifar_writer(tmp_path / "c", "cifar10")
    batch = tmp_path / "c" / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:200])
    with pytest.raises(ValueError) as info:
        load_dataset("cifar10", root=tmp_path / "c")
    msg = str(info.value)
    assert "data_batch_2" in msg and "corrupt or truncated" in msg and "download" in msg and "\n" not in msg


def test_cifar_wrong_content_is_an_error(fake_cifar_writer, tmp_path):
    """A valid pickle of the wrong shape (e.g. an image batch without pixels) is not accepted."""
    import pickle

    fake_cifar_writer(tmp_path / "c", "cifar10")
    (tmp_path / "c" / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]}, protocol=2))
    with pytest.raises(ValueError, match="test_batch: 'data' must be uint8 rows of 3072 pixels"):
        load_dataset("cifar10", root=tmp_path / "c")


def test_cifar_md5_is_checked_on_real_loads(fake_cifar_writer, tmp_path, monkeypatch):
    """Outside the fixtures' switch every file must carry the official md5 sum: the fake
    files are valid pickles in the right layout, and still they are rejected."""
    import mesa_lib.datafiles as data

    fake_cifar_writer(tmp_path / "c", "cifar10")
    assert len(load_dataset("cifar10", root=tmp_path / "c").train) == 10  # loads with the switch on
    monkeypatch.setattr(data, "SKIP_CIFAR_MD5_FOR_TESTS", False)
    with pytest.raises(ValueError) as info:
        load_dataset("cifar10", root=tmp_path / "c")
    msg = str(info.value)
    assert "data_batch_1: md5" in msg and "c99cafc152244af753f735de768cd75f" in msg and "\n" not in msg


def test_cifar_md5_switch_is_off_by_default():
    import mesa_lib.datafiles as data

    assert data.SKIP_CIFAR_MD5_FOR_TESTS is False


def test_cifar_md5_accepts_matching_file(fake_cifar_writer, tmp_path, monkeypatch):
    """With the switch off, files whose md5 matches the reference list load (here the list is
    pointed at the fake files' own sums, standing in for the official archive)."""
    import mesa_lib.datafiles as data

    fake_cifar_writer(tmp_path / "c", "cifar10")
    folder = tmp_path / "c" / "cifar-10-batches-py"
    real = data._cifar_reference

    def reference(name):
        train, test, (meta, _, key) = real(name)
        sums = lambda lst: [(f, data._md5(folder / f)) for f, _ in lst]  # noqa: E731
        return sums(train), sums(test), (meta, data._md5(folder / meta), key)

    monkeypatch.setattr(data, "_cifar_reference", reference)
    monkeypatch.setattr(data, "SKIP_CIFAR_MD5_FOR_TESTS", False)
    assert len(load_dataset("cifar10", root=tmp_path / "c").train) == 10


def test_fetch_offline_is_one_line_value_error(offline):
    import mesa_lib.datafiles as data

    with pytest.raises(ValueError) as info:
        data.fetch("fashion-mnist")
    msg = str(info.value)
    assert "\n" not in msg and "dataset-fashion-mnist" in msg and "MESA_DATA_DIR" in msg
    assert "URLError" in msg
