"""Classifiers and their training loop, with safetensors weights.

* :class:`SmallCNN` -- the CPU preset's model. A plain LeNet-style CNN barely learns a 3x3
  trigger at a *random* location; this one adds a global max-pool of its last feature map to
  the head, so that a small local feature ("the trigger is somewhere") reaches the decision.
* :func:`cifar_resnet18` -- torchvision's ResNet-18 adapted to 32x32 inputs (3x3 stem, no
  max-pool), as in the paper, for 1 or 3 channels.

Every model takes images in ``[0, 1]`` and normalises them itself, so triggers are stamped in
pixel space. :func:`train_classifier` is the one training loop of the library: the attack and
the defense pass it a ``batch_transform`` that stamps triggers into each batch.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .common import atomic_write_bytes
from .data import ImageSet
from .validate import check_images, finite_number, positive_int

__all__ = [
    "Normalize",
    "SmallCNN",
    "cifar_resnet18",
    "build_model",
    "train_classifier",
    "predict",
    "save_weights",
    "load_weights",
    "describe_state_mismatch",
    "tensors_digest",
    "BatchTransform",
]

BatchTransform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], "tuple[torch.Tensor, torch.Tensor]"]


class Normalize(nn.Module):
    """Per-channel standardisation as the first layer, so models take ``[0, 1]`` pixels."""

    def __init__(self, mean: float | list[float], std: float | list[float], channels: int):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).expand(channels).reshape(1, channels, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).expand(channels).reshape(1, channels, 1, 1)
        self.register_buffer("mean", mean_t.clone())
        self.register_buffer("std", std_t.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """Two conv blocks and a head that sees both the flattened map and its global max-pool."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 32):
        super().__init__()
        w = width
        self.norm = Normalize(0.5, 0.25, in_channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.fc_map = nn.Linear(2 * w * side * side, 128)
        self.fc_max = nn.Linear(2 * w, 128)
        self.out = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(self.norm(x))
        z = self.fc_map(h.flatten(1)) + self.fc_max(torch.amax(h, dim=(2, 3)))
        return self.out(F.relu(z))


def cifar_resnet18(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem: 3x3 stride-1 first conv, no max-pool."""
    import torchvision  # here, not at the top: the command line starts faster without it

    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    if in_channels == 3:
        norm = Normalize([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616], 3)
    else:
        norm = Normalize(0.5, 0.25, in_channels)
    return nn.Sequential(norm, net)


MODELS = ("small_cnn", "resnet18")


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, width: int = 32) -> nn.Module:
    """A fresh classifier by name: ``"small_cnn"`` or ``"resnet18"``."""
    if name == "small_cnn":
        return SmallCNN(in_channels, num_classes, image_size, width)
    if name == "resnet18":
        return cifar_resnet18(in_channels, num_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def train_classifier(
    model: nn.Module,
    data: ImageSet,
    epochs: float,
    lr: float,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_transform: BatchTransform | None = None,
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
    callback: Callable[[int, nn.Module], None] | None = None,
    schedule: str = "constant",
) -> nn.Module:
    """Train ``model`` in place with SGD on a dataset held as tensors on the model's device.

    ``batch_transform(x, y, generator) -> (x, y)`` edits each batch (poisoning, stamping);
    ``epochs`` may be fractional (e.g. ``0.5`` = half a pass). ``callback(epoch, model)`` runs
    after each whole epoch (for curves). The loss is shown every 50 steps (only with a
    progress bar), so the loop does not wait for the device on every step. ``schedule`` is
    ``"constant"`` (fine-tuning: attack, defense) or ``"cosine"`` (decay to 0: training from
    scratch ends converged, so a later fine-tune does not itself change clean accuracy).

    Raises:
        ValueError: bad settings (``epochs``/``lr`` not finite and > 0, ``batch_size`` not a
            positive integer, ...), images that are not float32, finite and in ``[0, 1]``
            (checked once up front), or a loss that became NaN/inf. The loss is checked
            without waiting for the device on every step: a finiteness flag is kept on the
            device and read once per epoch (and at the end); then training stops with an
            error, since every weight is already invalid.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if not isinstance(data, ImageSet):
        raise ValueError(f"data must be an ImageSet, got {type(data).__name__}; wrap tensors as ImageSet(images, labels)")
    finite_number("epochs", epochs, 0.0, strict=True)
    finite_number("lr", lr, 0.0, strict=True)
    batch_size = positive_int("batch_size", batch_size)
    finite_number("momentum", momentum, 0.0)
    finite_number("weight_decay", weight_decay, 0.0)
    check_images(data.images, f"{desc} images")
    device = next(model.parameters()).device
    x_all, y_all = data.images.to(device), data.labels.to(device)
    n = len(y_all)
    steps_per_epoch = math.ceil(n / batch_size)
    total = int(round(epochs * steps_per_epoch))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1)) if schedule == "cosine" else None
    g = torch.Generator(device=device).manual_seed(seed)
    model.train()
    step = 0
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    running = torch.zeros((), device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # any NaN/inf loss so far (no sync)
    while step < total:
        perm = torch.randperm(n, device=device, generator=g)
        for i in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[i * batch_size:(i + 1) * batch_size]
            x, y = x_all[idx], y_all[idx]
            if batch_transform is not None:
                x, y = batch_transform(x, y, g)
            loss = F.cross_entropy(model(x), y)
            nonfinite |= ~torch.isfinite(loss.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            if progress:
                running = running + loss.detach()
                bar.update(1)
                if step % 50 == 0:  # the only host sync, and only when a bar is shown
                    bar.set_postfix(loss=f"{(running / 50).item():.3f}")
                    running.zero_()
        if bool(nonfinite):  # one host sync per epoch
            bar.close()
            raise ValueError(
                f"{desc}: the training loss became NaN/inf in epoch {math.ceil(step / steps_per_epoch)} "
                f"(lr={lr}); the model's weights are now invalid. Lower the learning rate, or check the "
                "images and the batch transform (trigger) for NaN/inf values"
            )
        if callback is not None and step % steps_per_epoch == 0:
            callback(step // steps_per_epoch, model)
    bar.close()
    model.eval()
    return model


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted labels ``[N]`` for ``[N, C, H, W]`` images (eval mode, batched)."""
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W] tensor, got shape {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    out = torch.cat([model(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return out


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """The SHA-256 (hex) of a state dict's tensors: names, dtypes, shapes and bytes, in name
    order. Stored in every weights file, so a flipped bit in the tensor data is found."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1))  # a host copy
        h.update(flat.view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def save_weights(model: nn.Module, path: str | Path, metadata: dict | None = None) -> Path:
    """Save a model's state dict with safetensors (no pickle). ``metadata`` is stored as JSON,
    with the :func:`tensors_digest` of the tensors beside it (checked by :func:`load_weights`).

    The file is written atomically under a unique temporary name, so a reader never sees
    half a file and two processes saving the same path both succeed."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"mesa_lib": json.dumps(metadata or {}, default=str), "sha256": tensors_digest(state)}
    return atomic_write_bytes(path, save(state, metadata=meta))


def describe_state_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor],
                            limit: int = 4) -> str:
    """One line naming what differs between a model's state dict and loaded tensors.

    Lists tensors whose shapes differ (``name: file [a, b] vs model [c, d]``), keys the file
    lacks (missing) and keys the model does not have (unexpected), at most ``limit`` of each.
    Returns ``""`` when names and shapes all agree.
    """

    def some(names: list[str]) -> str:
        more = f", ... ({len(names)} in all)" if len(names) > limit else ""
        return ", ".join(names[:limit]) + more

    shapes = [f"{k}: file {list(found[k].shape)} vs model {list(v.shape)}"
              for k, v in expected.items() if k in found and tuple(found[k].shape) != tuple(v.shape)]
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} tensor(s) differ in shape ({some(shapes)})")
    if missing:
        parts.append(f"missing from the file: {some(missing)}")
    if unexpected:
        parts.append(f"unexpected in the file: {some(unexpected)}")
    return "; ".join(parts)


def load_weights(model: nn.Module, path: str | Path) -> dict:
    """Load safetensors weights into ``model`` (on its device); returns the stored metadata.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not
    a valid safetensors file, whose tensors do not match the SHA-256 stored with them (a
    corrupted file; files written before the digest was stored have none to check), or that
    does not match the model's architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}; train the model first or check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path} is not a valid safetensors weights file ({err}); delete it and retrain, "
            "or give the path of a file written by mesa_lib.save_weights"
        ) from None
    stored = meta.get("sha256")
    if stored is not None and stored != tensors_digest(state):
        raise ValueError(f"{path} is corrupted: its tensors do not match the SHA-256 stored with them; delete it "
                         "and retrain (or copy the file again)")
    mismatch = describe_state_mismatch(model.state_dict(), state)
    if mismatch:
        raise ValueError(
            f"weights in {path} do not fit this model: {mismatch}; check the preset/model/dataset "
            "the file was saved for"
        )
    device = next(model.parameters()).device
    try:
        model.load_state_dict({k: v.to(device) for k, v in state.items()})
    except RuntimeError as err:  # anything the comparison above did not foresee
        raise ValueError(
            f"weights in {path} do not fit this model ({str(err).splitlines()[0]}); "
            "check the preset/model/dataset the file was saved for"
        ) from None
    return json.loads(meta.get("mesa_lib", "{}"))
