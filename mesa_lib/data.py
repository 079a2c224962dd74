"""Whole datasets as tensors: Fashion-MNIST, CIFAR-10 and CIFAR-100.

MESA (Qiao et al., NeurIPS 2019) works with small image datasets that fit in
memory many times over, so this module loads a dataset *once* into plain
tensors and keeps it there (on the GPU if asked).  There are no
``DataLoader`` workers and no per-image transforms: every image is a float32
``[C, H, W]`` slice of one big tensor with values in ``[0, 1]``.

The defense uses the data in three roles, bundled in :class:`DatasetSplits`:

``train``
    The full training set.  The *attacker* trains the backdoored model on it
    (after poisoning); the defender never touches it.
``model``
    A fixed 80 % of the test set.  The defender only has this small clean set:
    it is used to model the trigger distribution and to retrain the model.
``eval``
    The remaining 20 % of the test set.  It is held out from the defender and
    used only to measure how well the defense worked.

The test-set split is a fixed permutation seeded by ``split_seed`` (default
0), independent of any experiment seed, so every run sees the same
``model`` / ``eval`` images.

Where the data comes from
-------------------------
Fashion-MNIST (the default dataset) is found *offline* by looking, in order,
at

1. the ``root`` argument, if given (then it must hold the data),
2. the directory in ``$MESA_DATA_DIR``,
3. the user cache, ``cache_dir() / "fashion-mnist"``,
4. Debian's ``/usr/share/datasets/fashion-mnist``
   (``apt-get install dataset-fashion-mnist``),

and only downloaded (with ``download=True``, into the user cache, through
torchvision) when none of these has it.  CIFAR-10/100 are searched for the
same way (without the Debian step). Finding, verifying and parsing the files is the job of
:mod:`mesa_lib.datafiles` (CIFAR's pickles go through a restricted, md5-checked unpickler);
this module holds what they load.

Example::

    >>> from mesa_lib.data import load_dataset
    >>> data = load_dataset("fashion-mnist", device="cuda")   # doctest: +SKIP
    >>> data.train.images.shape, len(data.model), len(data.eval)  # doctest: +SKIP
    (torch.Size([60000, 1, 28, 28]), 8000, 2000)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .datafiles import (DATASETS, DatasetInfo, cache_dir, canonical_name, fetch, find_data_root,
                        read_cifar, read_fmnist, read_idx)
from .validate import check_images

__all__ = [
    "ImageSet",
    "DatasetSplits",
    "DatasetInfo",
    "DATASETS",
    "cache_dir",
    "find_data_root",
    "load_dataset",
    "split_test",
    "fetch",
    "read_idx",
]

Device = str | torch.device
PathLike = str | os.PathLike


# --------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------


@dataclass
class ImageSet:
    """A labelled set of images held as two tensors.

    Attributes:
        images: float tensor ``[N, C, H, W]`` with values in ``[0, 1]``.
        labels: int64 tensor ``[N]`` of class indices.

    Both tensors live on the same device; use :meth:`to` to move them and
    :meth:`subset` to pick images.  The constructor checks shapes and dtypes and
    that every pixel is finite and in ``[0, 1]`` (one pass over the data and one
    host sync); sets derived with :meth:`to` and :meth:`subset` are not
    re-scanned.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        self._check_structure()
        check_images(self.images, "ImageSet.images")

    @classmethod
    def _derived(cls, images: torch.Tensor, labels: torch.Tensor) -> "ImageSet":
        """An ImageSet made from a checked one (moved or indexed): structure checks only."""
        out = cls.__new__(cls)
        out.images, out.labels = images, labels
        out._check_structure()
        return out

    def _check_structure(self) -> None:
        """Types, shapes, dtypes and devices (no pass over the values)."""
        images, labels = self.images, self.labels
        if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise ValueError(
                "ImageSet needs two torch.Tensors (images, labels); got "
                f"{type(images).__name__} and {type(labels).__name__}. "
                "Convert with torch.as_tensor(...) first."
            )
        if images.dim() != 4:
            raise ValueError(
                f"ImageSet.images must be 4-D [N, C, H, W], got shape {tuple(images.shape)}. "
                "Add a channel axis with images.unsqueeze(1) for grey-scale data."
            )
        if images.dtype != torch.float32:
            fix = ("Convert uint8 pixels with images.float() / 255." if not images.is_floating_point()
                   else "Convert with images.float().")
            raise ValueError(
                f"ImageSet.images must be a float32 tensor with values in [0, 1], got {images.dtype}. {fix}"
            )
        if labels.dim() != 1:
            raise ValueError(
                f"ImageSet.labels must be 1-D [N], got shape {tuple(labels.shape)}. "
                "Flatten it with labels.reshape(-1)."
            )
        if labels.dtype != torch.int64:
            raise ValueError(
                f"ImageSet.labels must be int64 class indices, got {labels.dtype}. "
                "Convert with labels.long()."
            )
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"ImageSet has {images.shape[0]} images but {labels.shape[0]} labels; "
                "give exactly one label per image."
            )
        if images.shape[0] == 0:
            raise ValueError("ImageSet is empty (N = 0); it needs at least one image.")
        if images.device != labels.device:
            raise ValueError(
                f"ImageSet.images is on {images.device} but labels on {labels.device}; "
                "move both to the same device (ImageSet(...).to(device) after construction)."
            )

    def __len__(self) -> int:
        """Number of images."""
        return int(self.images.shape[0])

    @property
    def device(self) -> torch.device:
        """The device holding the tensors."""
        return self.images.device

    def to(self, device: Device) -> "ImageSet":
        """Return a copy on ``device`` (no copy if already there)."""
        return ImageSet._derived(self.images.to(device), self.labels.to(device))

    def subset(self, index: torch.Tensor | slice) -> "ImageSet":
        """Return the images selected by ``index``.

        Args:
            index: a slice, an integer index tensor or a boolean mask of
                length ``N``.  Index tensors may live on any device.

        Raises:
            ValueError: if the selection is empty.
        """
        if isinstance(index, torch.Tensor):
            index = index.to(self.images.device)
        return ImageSet._derived(self.images[index], self.labels[index])


@dataclass
class DatasetSplits:
    """A dataset loaded for MESA: training set plus the split test set.

    Attributes:
        name: canonical dataset name (``"fashion-mnist"``, ``"cifar10"``,
            ``"cifar100"``).
        train: the full training set (used by the attacker).
        model: fixed 80 % of the test set: the defender's clean data, used
            to model the trigger distribution and to retrain.
        eval: the other 20 % of the test set, only for evaluating the defense.
        num_classes: number of classes.
        classes: class names, index ``i`` is label ``i``.
    """

    name: str
    train: ImageSet
    model: ImageSet
    eval: ImageSet
    num_classes: int
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = canonical_name(self.name)
        if self.classes and len(self.classes) != self.num_classes:
            raise ValueError(
                f"DatasetSplits got num_classes={self.num_classes} but {len(self.classes)} "
                "class names; pass one name per class."
            )
        shape = tuple(self.train.images.shape[1:])
        for part in ("model", "eval"):
            other = tuple(getattr(self, part).images.shape[1:])
            if other != shape:
                raise ValueError(
                    f"DatasetSplits.{part} images have shape {other} per image but train has "
                    f"{shape}; all parts must come from the same dataset."
                )

    @property
    def info(self) -> DatasetInfo:
        """The registry entry for this dataset."""
        return DATASETS[self.name]

    @property
    def channels(self) -> int:
        """Number of image channels (1 or 3)."""
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        """Image height (= width; images are square)."""
        return int(self.train.images.shape[2])

    @property
    def dark_background(self) -> bool:
        """True if objects sit on a black background (Fashion-MNIST)."""
        return DATASETS[self.name].dark_background

    @property
    def device(self) -> torch.device:
        """The device holding the tensors."""
        return self.train.device

    def to(self, device: Device) -> "DatasetSplits":
        """Return a copy with all three image sets on ``device``."""
        return DatasetSplits(
            name=self.name,
            train=self.train.to(device),
            model=self.model.to(device),
            eval=self.eval.to(device),
            num_classes=self.num_classes,
            classes=list(self.classes),
        )


# --------------------------------------------------------------------------
# Splitting and loading
# --------------------------------------------------------------------------


def split_test(test: ImageSet, model_fraction: float = 0.8,
               seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Split the test set into the defender's ``model`` part and ``eval``.

    A fixed permutation of ``range(N)`` is drawn from a private generator
    seeded with ``seed`` (so it does not depend on, or disturb, the global
    RNG).  The first ``round(model_fraction * N)`` permuted indices form
    ``model``, the rest ``eval``; each part keeps the original order.

    Returns:
        ``(model, eval)``: disjoint, together exactly the test set.

    Raises:
        ValueError: if ``model_fraction`` is not strictly between 0 and 1 or
            would leave one part empty.
    """
    if not isinstance(model_fraction, (int, float)) or not 0.0 < float(model_fraction) < 1.0:
        raise ValueError(f"model_fraction must be strictly between 0 and 1 (e.g. 0.8), "
                         f"got {model_fraction!r}.")
    n = len(test)
    n_model = round(model_fraction * n)
    if not 0 < n_model < n:
        raise ValueError(f"model_fraction={model_fraction} splits {n} test images into "
                         f"{n_model} + {n - n_model}; both parts need at least one image.")
    generator = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=generator)
    model_idx = perm[:n_model].sort().values
    eval_idx = perm[n_model:].sort().values
    return test.subset(model_idx), test.subset(eval_idx)


def load_dataset(
    name: str = "fashion-mnist",
    root: PathLike | None = None,
    device: Device = "cpu",
    download: bool = False,
    model_fraction: float = 0.8,
    split_seed: int = 0,
    train_limit: int | None = None,
) -> DatasetSplits:
    """Load a whole dataset as tensors and split its test set.

    Args:
        name: ``"fashion-mnist"`` (default), ``"cifar10"`` or ``"cifar100"``.
        root: directory holding the data; default: search (see
            :func:`find_data_root`).
        device: where to put all tensors at the end (e.g. ``"cuda"``).
        download: if the data is not found, download it through torchvision
            (needs internet) into ``root`` or the user cache.
        model_fraction: share of the test set that goes to ``model``.
        split_seed: seed of the fixed test-set permutation.
        train_limit: keep only the first ``train_limit`` training images
            (for quick tests).

    Returns:
        A :class:`DatasetSplits` on ``device``.

    Raises:
        ValueError: unknown name, bad ``model_fraction``/``train_limit``,
            corrupt files.
        FileNotFoundError: data not found and ``download`` is False.
    """
    name = canonical_name(name)
    info = DATASETS[name]
    if not isinstance(model_fraction, (int, float)) or not 0.0 < float(model_fraction) < 1.0:
        raise ValueError(f"model_fraction must be strictly between 0 and 1 (e.g. 0.8), "
                         f"got {model_fraction!r}.")
    if train_limit is not None and (isinstance(train_limit, bool) or int(train_limit) < 1):
        raise ValueError(f"train_limit must be a positive number of images or None, "
                         f"got {train_limit!r}.")
    limit = None if train_limit is None else int(train_limit)

    try:
        data_root = find_data_root(name, root)
    except FileNotFoundError:
        if not download:
            raise
        data_root = fetch(name, root)

    if name == "fashion-mnist":
        train = ImageSet(*read_fmnist(data_root, "train", limit))
        test = ImageSet(*read_fmnist(data_root, "test", None))
        classes = list(info.classes)
    else:
        *train_tensors, classes = read_cifar(name, data_root, True, limit)
        train, test = ImageSet(*train_tensors), ImageSet(*read_cifar(name, data_root, False, None)[:2])
        if len(classes) != info.num_classes:
            raise ValueError(f"{data_root}: the CIFAR meta file lists "
                             f"{len(classes)} class names, {name} has {info.num_classes}.")

    model, eval_ = split_test(test, model_fraction, split_seed)
    splits = DatasetSplits(name=name, train=train, model=model, eval=eval_,
                           num_classes=info.num_classes, classes=classes)
    return splits.to(device)
