"""Find, verify and parse the dataset files: where Fashion-MNIST and CIFAR live on disk,
how to get them, and how their files become tensors.

:mod:`mesa_lib.data` builds on this module: it holds the loaded tensors and splits the test
set. Here are

* the registry of datasets (:data:`DATASETS`: classes, channels, size, Debian package);
* the offline search (:func:`find_data_root`): ``root``, ``$MESA_DATA_DIR``, the user cache,
  Debian's ``/usr/share/datasets``; and the download (:func:`fetch`, through torchvision);
* the parsers: IDX files (:func:`read_idx`, :func:`read_fmnist`) and CIFAR's python-version
  files (:func:`read_cifar`), which are pickles: each one is checked against the md5 sum of
  the official archive and parsed by a restricted unpickler that only rebuilds numpy arrays,
  so a tampered file is refused instead of run.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import math
import os
import pathlib
import pickle
import sys
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "DatasetInfo",
    "DATASETS",
    "DEBIAN_DATA_DIR",
    "canonical_name",
    "cache_dir",
    "find_data_root",
    "fetch",
    "read_idx",
    "read_fmnist",
    "read_cifar",
]

PathLike = str | os.PathLike

#: Where Debian's ``dataset-*`` packages install their data.  Module level so
#: that tests (and unusual systems) can point it elsewhere.
DEBIAN_DATA_DIR: pathlib.Path = pathlib.Path("/usr/share/datasets")


# --------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a dataset before loading it.

    Attributes:
        name: canonical name used throughout ``mesa_lib``.
        channels: 1 for grey-scale, 3 for RGB.
        image_size: side length of the (square) images.
        classes: class names, index ``i`` is label ``i``.
        dark_background: True if the images show objects on black
            (Fashion-MNIST); matters for how triggers look.
        debian_package: name of the Debian package shipping the data, if any.
    """

    name: str
    channels: int
    image_size: int
    classes: tuple[str, ...]
    dark_background: bool
    debian_package: str | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)


_CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy "
    "bridge bus butterfly camel can castle caterpillar cattle chair chimpanzee clock "
    "cloud cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish forest "
    "fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard "
    "lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid "
    "otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum "
    "rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail "
    "snake spider squirrel streetcar sunflower sweet_pepper table tank telephone "
    "television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf "
    "woman worm"
).split()

#: Registry of the datasets this module can load, by canonical name.
DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        channels=1,
        image_size=28,
        classes=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        dark_background=True,
        debian_package="dataset-fashion-mnist",
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        channels=3,
        image_size=32,
        classes=(
            "airplane", "automobile", "bird", "cat", "deer",
            "dog", "frog", "horse", "ship", "truck",
        ),
        dark_background=False,
    ),
    "cifar100": DatasetInfo(
        name="cifar100",
        channels=3,
        image_size=32,
        classes=tuple(_CIFAR100_CLASSES),
        dark_background=False,
    ),
}

_ALIASES = {
    "fashion-mnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "cifar100": "cifar100",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
}


def canonical_name(name: str) -> str:
    """Map ``name`` (any case, common spellings) to a key of :data:`DATASETS`."""
    key = _ALIASES.get(str(name).strip().lower())
    if key is None:
        raise ValueError(
            f"unknown dataset {name!r}; known datasets are: {', '.join(sorted(DATASETS))}."
        )
    return key



# --------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------


def cache_dir() -> pathlib.Path:
    """The user cache of ``mesa_lib``.

    ``$MESA_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/mesa_lib``, else
    ``~/.cache/mesa_lib``.  The directory is not created here.
    """
    env = os.environ.get("MESA_CACHE_DIR")
    if env:
        return pathlib.Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return pathlib.Path(xdg).expanduser() / "mesa_lib"
    return pathlib.Path.home() / ".cache" / "mesa_lib"


_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Files torchvision's CIFAR classes read, relative to their ``root``.
_CIFAR_FILES = {
    "cifar10": (
        "cifar-10-batches-py",
        ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
         "test_batch", "batches.meta"],
    ),
    "cifar100": ("cifar-100-python", ["train", "test", "meta"]),
}


def _idx_file(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    """``directory/stem`` or ``directory/stem.gz``, whichever exists (plain first)."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _holds_fmnist(directory: pathlib.Path) -> pathlib.Path | None:
    """The directory *directly* holding the four IDX files, or None.

    Looks at ``directory`` itself and at torchvision's layout
    ``directory/FashionMNIST/raw``.
    """
    for d in (directory, directory / "FashionMNIST" / "raw"):
        if all(_idx_file(d, stem) is not None for stem in _FMNIST_FILES.values()):
            return d
    return None


def _holds_cifar(name: str, directory: pathlib.Path) -> pathlib.Path | None:
    """``directory`` if it holds the CIFAR folder torchvision expects, else None."""
    folder, files = _CIFAR_FILES[name]
    if all((directory / folder / f).is_file() for f in files):
        return directory
    return None


def _holds(name: str, directory: pathlib.Path) -> pathlib.Path | None:
    """Where ``directory`` (or its sub-folder named after the dataset) holds ``name``."""
    for d in (directory, directory / name):
        found = _holds_fmnist(d) if name == "fashion-mnist" else _holds_cifar(name, d)
        if found is not None:
            return found
    return None


_WARNED_DATA_DIRS: set[str] = set()


def data_dir_problem(env: str) -> str | None:
    """Why ``$MESA_DATA_DIR`` = ``env`` can serve no dataset (it is missing, not a folder, or
    empty), else None."""
    path = pathlib.Path(env).expanduser()
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is not a folder"
    try:
        if not any(path.iterdir()):
            return "is an empty folder"
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    return None


def _candidates(name: str) -> list[tuple[str, pathlib.Path]]:
    """The places searched when no explicit ``root`` is given, in order. A ``$MESA_DATA_DIR``
    that is missing or empty is said so, once per process, on stderr: the user set it on
    purpose, so it is not skipped silently."""
    places: list[tuple[str, pathlib.Path]] = []
    env = os.environ.get("MESA_DATA_DIR")
    if env:
        problem = data_dir_problem(env)
        if problem and env not in _WARNED_DATA_DIRS:
            _WARNED_DATA_DIRS.add(env)
            print(f"warning: MESA_DATA_DIR={env} {problem}, so it holds no dataset; searching the other "
                  "places instead (point it at the folder that holds the data, or unset it)",
                  file=sys.stderr, flush=True)
        places.append(("$MESA_DATA_DIR" + (f", which {problem}" if problem else ""),
                       pathlib.Path(env).expanduser()))
    places.append(("user cache", cache_dir() / name))
    if DATASETS[name].debian_package:
        places.append((f"Debian package {DATASETS[name].debian_package}", DEBIAN_DATA_DIR / name))
    return places


def _not_found_message(name: str, searched: list[tuple[str, pathlib.Path]]) -> str:
    info = DATASETS[name]
    lines = [f"Could not find the {name} dataset. Searched:"]
    lines += [f"  - {path}  ({why})" for why, path in searched]
    lines.append("To fix this, either:")
    if info.debian_package:
        lines.append(
            f"  * install it offline: `apt-get install {info.debian_package}` "
            f"(puts it in {DEBIAN_DATA_DIR / name}), or set MESA_DATA_DIR / pass root= "
            "to a directory holding the files;"
        )
    else:
        lines.append(
            "  * set MESA_DATA_DIR or pass root= to a directory holding "
            f"{_CIFAR_FILES[name][0]}/ (the extracted python-version archive);"
        )
    lines.append(
        "  * with internet access, download it: load_dataset(..., download=True) or "
        f"`python -m mesa_lib fetch-data --dataset {name}` (saves into {cache_dir() / name})."
    )
    return "\n".join(lines)


def find_data_root(name: str, root: PathLike | None = None) -> pathlib.Path:
    """Find a dataset on disk without using the network.

    Args:
        name: dataset name (see :data:`DATASETS`).
        root: explicit directory.  If given, *only* it is searched (a wrong
            explicit path is an error, not something to silently skip).

    Without ``root`` the search order is ``$MESA_DATA_DIR``, the user cache
    ``cache_dir()/name``, then (Fashion-MNIST only) Debian's
    ``/usr/share/datasets/fashion-mnist``.  Each place may hold the data
    directly or in a sub-folder named after the dataset (so one
    ``MESA_DATA_DIR`` can serve several datasets).

    Returns:
        For Fashion-MNIST the directory that directly contains the four IDX
        files (gzipped or not); for CIFAR the directory that contains
        ``cifar-10-batches-py`` / ``cifar-100-python`` (torchvision's
        ``root``).

    Raises:
        ValueError: unknown dataset name.
        FileNotFoundError: nowhere to be found; the message lists the places
            searched and how to get the data.
    """
    name = canonical_name(name)
    if root is not None:
        searched = [("root argument", pathlib.Path(root).expanduser())]
    else:
        searched = _candidates(name)
    for _, place in searched:
        found = _holds(name, place)
        if found is not None:
            return found
    raise FileNotFoundError(_not_found_message(name, searched))


FMNIST_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
"""md5 sums of the official Fashion-MNIST IDX files, *decompressed* (the archives' own sums,
torchvision's, depend on the compressor: Debian's re-gzipped files have other ones)."""


def _md5_idx(path: pathlib.Path) -> str:
    """The md5 of an IDX file's content (decompressed first if it is ``.gz``)."""
    if path.suffix != ".gz":
        return _md5(path)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with gzip.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: cannot be decompressed ({err}); the file is corrupt") from None
    return digest.hexdigest()


def verify_data(name: str, directory: PathLike) -> None:
    """Check every file of ``name`` in ``directory`` (what :func:`find_data_root` returned)
    against the md5 sums of the official files, so that data reported as available is
    the real dataset, not a corrupt or modified copy.

    Raises:
        ValueError: one line naming the file that differs and what to do.
    """
    name = canonical_name(name)
    directory = pathlib.Path(directory)
    if name == "fashion-mnist":
        fix = (f"reinstall Debian's package (apt-get install --reinstall {DATASETS[name].debian_package})"
               if directory == DEBIAN_DATA_DIR / name else
               f"move {directory} away and get the dataset again (python -m mesa_lib fetch-data)")
        for stem, expected in FMNIST_MD5.items():
            path = _idx_file(directory, stem)
            if path is None:
                raise ValueError(f"{directory / stem}: missing; {fix}")
            try:
                got = _md5_idx(path)
            except ValueError as err:
                raise ValueError(f"{err}: {fix}") from None
            if got != expected:
                raise ValueError(f"{path}: md5 {got} of its content differs from the official Fashion-MNIST "
                                 f"file ({expected}); the data is corrupt or was modified: {fix}")
        return
    train_list, test_list, (meta_file, meta_md5, _) = _cifar_reference(name)
    folder = directory / _CIFAR_FILES[name][0]
    for file, md5 in [*train_list, *test_list, (meta_file, meta_md5)]:
        _check_cifar_md5(folder / file, md5, name)


def _download(name: str, target: pathlib.Path) -> None:
    """Download ``name`` into ``target`` through torchvision (needs internet).

    CIFAR is only downloaded and extracted here (the archive's md5 is checked); it is parsed
    by :func:`read_cifar`, never by torchvision's plain ``pickle.load``.
    """
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import download_and_extract_archive

    target.mkdir(parents=True, exist_ok=True)
    if name == "fashion-mnist":
        for train in (True, False):
            tvd.FashionMNIST(str(target), train=train, download=True)
    else:
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        download_and_extract_archive(cls.url, str(target), filename=cls.filename, md5=cls.tgz_md5)


def fetch(name: str = "fashion-mnist", root: PathLike | None = None, verify: bool = False) -> pathlib.Path:
    """Make sure ``name`` is on disk where :func:`load_dataset` finds it.

    If the dataset is already findable (e.g. Debian's package is installed)
    nothing is copied or downloaded.  Otherwise it is downloaded through
    torchvision (needs internet) into ``root`` if given, else into the user
    cache ``cache_dir()/name``.

    With ``verify`` (``python -m mesa_lib fetch-data``) every file found or downloaded is
    checked against the official md5 sums (:func:`verify_data`).

    Returns:
        The directory :func:`find_data_root` now returns for it.

    Raises:
        ValueError: unknown name, the download failed (e.g. no internet), or (``verify``) a
            file differs from the official one: one line that says what to do.
    """
    name = canonical_name(name)
    try:
        found = find_data_root(name, root)
    except FileNotFoundError:
        found = None
    if found is not None:
        if verify:
            verify_data(name, found)
        return found
    target = pathlib.Path(root).expanduser() if root is not None else cache_dir() / name
    made = _missing_ancestor(target)
    try:
        _download(name, target)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision raises RuntimeError
        if made is not None:  # a failed download leaves no folder it created behind
            import shutil

            shutil.rmtree(made, ignore_errors=True)
        raise ValueError(_download_failed_message(name, target, err)) from None
    found = find_data_root(name, target)
    if verify:
        verify_data(name, found)
    return found


def _missing_ancestor(path: pathlib.Path) -> pathlib.Path | None:
    """The outermost folder of ``path`` that does not exist yet (None if ``path`` exists)."""
    if path.exists():
        return None
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return top


def _download_failed_message(name: str, target: pathlib.Path, err: BaseException) -> str:
    """One line: why the download of ``name`` failed and how to get the data offline."""
    why = " ".join(str(err).split()) or type(err).__name__
    info = DATASETS[name]
    offline = (f"install Debian's {info.debian_package} (apt-get install {info.debian_package})"
               if info.debian_package else f"copy the extracted {_CIFAR_FILES[name][0]}/ folder there")
    return (f"could not download {name} into {target} ({type(err).__name__}: {why}); without internet, "
            f"{offline}, or set MESA_DATA_DIR to a directory that holds the dataset.")


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike, expect_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped (``.gz``) or not.

    The format: a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then
    ``ndim`` big-endian uint32 sizes, then the data in row-major order.
    Fashion-MNIST images are magic 2051 (uint8, 3-D), labels 2049 (uint8, 1-D).

    Args:
        path: the file.
        expect_ndim: if given, the number of dimensions the file must have.

    Returns:
        A numpy array in native byte order.

    Raises:
        ValueError: naming the file, if it is not valid IDX (bad magic,
            wrong size, truncated, broken gzip stream).
    """
    path = pathlib.Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot read IDX file ({err}); the file is corrupt, "
                         "delete it and get the dataset again.") from err

    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: not a valid IDX file: {why}. The file is corrupt or "
                          "truncated; delete it and get the dataset again.")

    if len(raw) < 4:
        raise bad(f"only {len(raw)} bytes")
    zero1, zero2, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero1 != 0 or zero2 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise bad(f"bad magic number 0x{int.from_bytes(raw[:4], 'big'):08x}")
    if expect_ndim is not None and ndim != expect_ndim:
        magic = (type_code << 8) | expect_ndim
        raise bad(f"magic number {int.from_bytes(raw[:4], 'big')} says {ndim}-D data, "
                  f"expected {expect_ndim}-D (magic {magic})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise bad("header is truncated")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise bad(f"header says shape {shape} ({expected} bytes in all) but the file has "
                  f"{len(raw)} bytes")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # a writable copy in native byte order


def _images_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` array -> float32 tensor in ``[0, 1]``."""
    pixels = np.ascontiguousarray(pixels)
    if not pixels.flags.writeable:
        pixels = pixels.copy()
    return torch.from_numpy(pixels).to(torch.float32).div_(255.0)


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> torch.Tensor:
    labels = np.asarray(labels).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{what}: labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}; "
            "the file is corrupt, get the dataset again."
        )
    return torch.from_numpy(labels)


def read_fmnist(directory: pathlib.Path, part: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of ``part`` ("train" / "test") of Fashion-MNIST in ``directory``:
    float32 ``[N, 1, 28, 28]`` in ``[0, 1]`` and int64 ``[N]``."""
    img_path = _idx_file(directory, _FMNIST_FILES[f"{part}_images"])
    lab_path = _idx_file(directory, _FMNIST_FILES[f"{part}_labels"])
    assert img_path is not None and lab_path is not None  # checked by find_data_root
    images = read_idx(img_path, expect_ndim=3)
    labels = read_idx(lab_path, expect_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise ValueError(f"{img_path} / {lab_path}: Fashion-MNIST files must hold uint8 data "
                         f"(magic 2051 / 2049), got {images.dtype} / {labels.dtype}.")
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"{img_path}: images must be square, got {images.shape[1:]}.")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path} has {images.shape[0]} images but {lab_path} has "
                         f"{labels.shape[0]} labels; the files do not belong together.")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return (_images_to_tensor(images[:, None, :, :]),
            _check_labels(labels, DATASETS["fashion-mnist"].num_classes, str(lab_path)))


#: **Tests only.** When True, CIFAR files are parsed without comparing their md5 sums with
#: torchvision's lists of the official files, so that the tiny fake CIFAR folders written by
#: ``tests/conftest.py`` load. Only those fixtures set it (through ``monkeypatch``, so it is
#: reset after each test). Real loads always check every batch and meta file; parsing is
#: restricted (:class:`_CifarUnpickler`) either way.
SKIP_CIFAR_MD5_FOR_TESTS: bool = False


def _cifar_reference(name: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]], tuple[str, str, str]]:
    """torchvision's lists of the official CIFAR files: ``(train, test, meta)``.

    ``train`` / ``test`` are ``[(file name, md5)]``; ``meta`` is ``(file name, md5, key of
    the class names)``. Taken from torchvision's dataset classes, so there is one copy.
    """
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    train = [(str(f), str(m)) for f, m in cls.train_list]
    test = [(str(f), str(m)) for f, m in cls.test_list]
    meta = (str(cls.meta["filename"]), str(cls.meta["md5"]), str(cls.meta["key"]))
    return train, test, meta


def _md5(path: pathlib.Path) -> str:
    """The md5 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_cifar_md5(path: pathlib.Path, expected: str, name: str) -> None:
    """Raise ValueError unless ``path`` has the md5 sum of the official file.

    Skipped only when :data:`SKIP_CIFAR_MD5_FOR_TESTS` is set (by the tests' fixtures).
    """
    if SKIP_CIFAR_MD5_FOR_TESTS:
        return
    got = _md5(path)
    if got != expected:
        raise ValueError(
            f"{path}: md5 {got} differs from the official {name} file ({expected}); the file is "
            f"corrupt or not the original: delete {path.parent} and download {name} again "
            f"(python -m mesa_lib fetch-data --dataset {name})."
        )


class _ForbiddenGlobal(ValueError):
    """A pickle asked for a global that a CIFAR file never needs."""


def _numpy_reconstruct() -> Any:
    """numpy's ``_reconstruct`` (``numpy._core`` in numpy 2, ``numpy.core`` before)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds what CIFAR's python-version files contain.

    The files are dicts of strings, lists of ints and one uint8 numpy array, so the only
    globals they name are numpy's array reconstruction helpers (plus ``_codecs.encode``, with
    which Python 3 writes ``bytes`` in protocol 2; it only encodes a string). Any other global (``os.system``,
    ``builtins.eval``, ``subprocess.Popen``, ...) is refused with a ValueError before it is
    imported, so a tampered file cannot run code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise _ForbiddenGlobal(
                f"the file asks to load {module}.{name}, which no CIFAR file contains; it is not a "
                "genuine CIFAR file and was not unpickled"
            )
        if name == "_reconstruct":
            return _numpy_reconstruct()
        if module == "_codecs":
            return codecs.encode
        return np.ndarray if name == "ndarray" else np.dtype


def _read_cifar_pickle(path: pathlib.Path, name: str) -> dict[str, Any]:
    """Parse one CIFAR batch or meta file with :class:`_CifarUnpickler`.

    Raises:
        ValueError: one line naming the file, for anything that is not a well-formed CIFAR
            dict (a forbidden global, a truncated or corrupt stream, another type).
    """
    redo = f"delete {path.parent} and download {name} again (python -m mesa_lib fetch-data --dataset {name})"
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except _ForbiddenGlobal as err:
        raise ValueError(f"{path}: refused: {err}; {redo}.") from None
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 -- any parse failure means a corrupt file
        why = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"{path}: cannot parse the CIFAR file ({type(err).__name__}: {why}); it is "
                         f"corrupt or truncated: {redo}.") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a CIFAR dict; {redo}.")
    return obj


def _cifar_batch(path: pathlib.Path, name: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(pixels uint8 [N, 3, 32, 32], labels [N])`` of one CIFAR batch file."""
    entry = _read_cifar_pickle(path, name)
    data, labels = entry.get("data"), entry.get(label_key)
    redo = f"delete {path.parent} and download {name} again"
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be uint8 rows of 3072 pixels, got {what}; {redo}.")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        raise ValueError(f"{path}: needs {len(data)} '{label_key}', one per image; {redo}.")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels)


def _cifar_classes(path: pathlib.Path, name: str, key: str) -> list[str]:
    """The class names in a CIFAR meta file."""
    names = _read_cifar_pickle(path, name).get(key)
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        raise ValueError(f"{path}: no list of class names under '{key}'; delete {path.parent} and "
                         f"download {name} again.")
    return names


def read_cifar(name: str, root: pathlib.Path, train: bool,
               limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images, labels, class names)`` of one part of CIFAR-10/100 from the python-version
    files under ``root``: float32 ``[N, 3, 32, 32]`` in ``[0, 1]`` and int64 ``[N]``.

    Every file is compared with the md5 sum of the official archive (unless
    :data:`SKIP_CIFAR_MD5_FOR_TESTS`) and parsed with :class:`_CifarUnpickler`: no code from
    the files is run.
    """
    folder = root / _CIFAR_FILES[name][0]
    train_list, test_list, (meta_file, meta_md5, meta_key) = _cifar_reference(name)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    pixels, targets = [], []
    for file, md5 in train_list if train else test_list:
        path = folder / file
        _check_cifar_md5(path, md5, name)
        data, labels = _cifar_batch(path, name, label_key)
        pixels.append(data)
        targets.append(labels)
    _check_cifar_md5(folder / meta_file, meta_md5, name)
    classes = _cifar_classes(folder / meta_file, name, meta_key)
    all_pixels, all_targets = np.concatenate(pixels), np.concatenate(targets)
    if limit is not None:
        all_pixels, all_targets = all_pixels[:limit], all_targets[:limit]
    images = _images_to_tensor(all_pixels)
    labels = _check_labels(all_targets, DATASETS[name].num_classes, str(folder))
    return images, labels, classes
