"""The whole story of the paper in one call: clean model -> backdoor -> detection -> MESA ->
defense (MESA vs the single-point baseline, optionally the oracle) -> evaluation.

:func:`run_pipeline` returns (and writes, stage by stage, to ``out``) a JSON-able dict::

    {"clean": {"clean_acc", "asr"}, "backdoored": {...}, "mesa": {...}, "point": {...},
     "detection": {"per_class_asr": [...], "detected_target", "anomaly_index"},
     "seconds": {<stage>: s, "total": s}, "config": {...}, "status": "complete"}

All fractions are measured on the 20% evaluation split, which no stage trains on. Trained
classifiers are cached (safetensors) under the cache directory, keyed by everything that
determines them, so the book's chapters reuse each other's models.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from . import __version__
from .attack import check_target, inject_backdoor
from .baselines import reverse_engineer_trigger
from .data import DatasetSplits, cache_dir, load_dataset
from .defense import retrain
from .detect import scan_classes
from .evaluate import evaluate_model
from .mesa import train_mesa
from .models import build_model, load_weights, save_weights, train_classifier
from .presets import Preset, get_preset
from .triggers import FixedTrigger, pattern_from_id, random_color_triggers, trigger_from_pattern

__all__ = [
    "pick_device",
    "make_trigger",
    "get_clean_model",
    "get_backdoored_model",
    "run_pipeline",
    "write_json",
]


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_trigger(splits: DatasetSplits, pattern: int, color_seed: int | None = None) -> torch.Tensor:
    """The attack's trigger ``[C, 3, 3]``: a black/white pattern (on dark data its bright
    member, see :func:`~mesa_lib.triggers.bright_member`), or a seeded random colour trigger
    when ``color_seed`` is given (the CIFAR-100 setting)."""
    if color_seed is not None:
        return random_color_triggers(1, splits.channels, seed=color_seed)[0]
    return trigger_from_pattern(pattern, splits.channels, dark_background=splits.dark_background)


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _model_cache(name: str, key: str) -> Path:
    return cache_dir() / "models" / f"{name}-{key}.safetensors"


def get_clean_model(
    splits: DatasetSplits, preset: Preset | str, seed: int = 0, use_cache: bool = True, progress: bool = True
) -> nn.Module:
    """Train (or load from the cache) the clean classifier of a dataset and preset."""
    preset = get_preset(preset)
    device = splits.train.images.device
    torch.manual_seed(seed)
    model = build_model(preset.model, splits.channels, splits.num_classes, splits.image_size, preset.width).to(device)
    key = _key(__version__, splits.name, len(splits.train), preset.model, preset.width, preset.batch_size,
               preset.clean_epochs, preset.clean_lr, preset.clean_weight_decay, preset.clean_schedule, seed)
    path = _model_cache(f"clean-{splits.name}-{preset.model}", key)
    if use_cache and path.is_file():
        load_weights(model, path)
        return model.eval()
    train_classifier(model, splits.train, epochs=preset.clean_epochs, lr=preset.clean_lr,
                     batch_size=preset.batch_size, weight_decay=preset.clean_weight_decay,
                     seed=seed, desc="clean training", progress=progress, schedule=preset.clean_schedule)
    if use_cache:
        save_weights(model, path, {"dataset": splits.name, "preset": preset.name, "seed": seed})
    return model.eval()


def get_backdoored_model(
    clean: nn.Module, splits: DatasetSplits, trigger: torch.Tensor, target: int, preset: Preset | str,
    seed: int = 0, use_cache: bool = True, progress: bool = True, clean_key: str = "",
) -> nn.Module:
    """Inject the backdoor into a copy of ``clean`` (or load it from the cache)."""
    import copy

    preset = get_preset(preset)
    model = copy.deepcopy(clean)
    state_sig = _key(*[float(v.float().sum()) for v in clean.state_dict().values()][:8])
    key = _key(__version__, splits.name, trigger.tolist(), target, preset.poison_ratio, preset.attack_epochs,
               preset.attack_lr, preset.batch_size, seed, state_sig, clean_key)
    path = _model_cache(f"backdoored-{splits.name}-{preset.model}", key)
    if use_cache and path.is_file():
        load_weights(model, path)
        return model.eval()
    inject_backdoor(model, splits.train, trigger.to(splits.train.images.device), target,
                    poison_ratio=preset.poison_ratio, epochs=preset.attack_epochs, lr=preset.attack_lr,
                    batch_size=preset.batch_size, seed=seed + 1, progress=progress)
    if use_cache:
        save_weights(model, path, {"dataset": splits.name, "target": target, "seed": seed})
    return model.eval()


def write_json(obj: dict, path: str | Path) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


@contextmanager
def _timed(seconds: dict, stage: str, device: torch.device) -> Iterator[None]:
    t = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds[stage] = round(time.perf_counter() - t, 3)


def run_pipeline(
    dataset: str = "fashion-mnist",
    pattern: int = 170,
    target: int = 0,
    preset: Preset | str = "fast",
    seed: int = 0,
    out: str | Path | None = None,
    device: str | torch.device | None = None,
    root: str | Path | None = None,
    use_cache: bool = False,
    oracle: bool = False,
    color_seed: int | None = None,
    progress: bool = True,
    splits: DatasetSplits | None = None,
    extra_stages: dict[str, Callable[..., dict]] | None = None,
) -> dict:
    """Run the whole pipeline once and return its results (also written to ``out``).

    ``use_cache`` reuses trained clean/backdoored classifiers from the cache directory;
    ``oracle`` adds a defense with the true trigger; ``color_seed`` uses a random colour
    trigger instead of a pattern (CIFAR-100 style). ``extra_stages`` maps a stage name to
    ``fn(backdoored=, splits=, trigger=, target=, preset=, seed=, progress=) -> dict``, run
    after the defenses (timed as that stage); its dict is merged into the result (the sweep
    adds Neural Cleanse this way).
    """
    preset = get_preset(preset)
    if color_seed is None:
        pattern_from_id(pattern)  # validates the id before any work is done
    t0 = time.perf_counter()
    # given splits stay where they are unless a device is named (a chapter's MESA_DEVICE holds)
    dev = splits.device if (splits is not None and device is None) else pick_device(device)
    seconds: dict[str, float] = {}
    result: dict = {"status": "running"}

    def save(stage: str) -> None:
        seconds["total"] = round(time.perf_counter() - t0, 3)
        result["seconds"] = dict(seconds)
        result["last_stage"] = stage
        if out is not None:
            write_json(result, out)

    with _timed(seconds, "data", dev):
        if splits is None:
            splits = load_dataset(dataset, root=root, device=dev)
        else:
            splits = splits.to(dev)
    check_target(target, splits.num_classes)
    trigger = make_trigger(splits, pattern, color_seed).to(dev)
    result["config"] = {
        "dataset": splits.name, "pattern": pattern if color_seed is None else None,
        "stamped_pattern": None if color_seed is not None else (
            int(''.join(str(int(b)) for b in trigger[0].flatten().tolist()), 2)),
        "color_seed": color_seed, "target": target, "seed": seed, "device": str(dev),
        "preset": preset.to_dict(), "mesa_lib": __version__, "torch": torch.__version__,
    }
    torch.manual_seed(seed)

    with _timed(seconds, "clean_training", dev):
        clean = get_clean_model(splits, preset, seed, use_cache=use_cache, progress=progress)
    result["clean"] = evaluate_model(clean, splits.eval, trigger, target, seed=seed)
    save("clean_training")

    with _timed(seconds, "attack", dev):
        backdoored = get_backdoored_model(clean, splits, trigger, target, preset, seed, use_cache=use_cache,
                                          progress=progress)
    result["backdoored"] = evaluate_model(backdoored, splits.eval, trigger, target, seed=seed)
    save("attack")

    with _timed(seconds, "detection", dev):
        det_cfg = preset.mesa.__class__(**{**preset.mesa.__dict__, "steps": preset.detect_steps,
                                           "batch_size": preset.detect_batch})
        detection = scan_classes(backdoored, splits.model, splits.eval, det_cfg, beta=preset.detect_beta,
                                 seed=seed, progress=progress)
    result["detection"] = detection.to_dict()
    save("detection")

    with _timed(seconds, "mesa", dev):
        sampler, history = train_mesa(backdoored, splits.model, target, preset.mesa, seed=seed, progress=progress)
    result["mesa_search"] = {
        "final_f_mean": history["f_mean"][-1] if history["f_mean"] else None,
        "final_valid_frac": history["valid_frac"][-1] if history["valid_frac"] else None,
        "final_mi": history["mi"][-1] if history["mi"] else None,
    }
    save("mesa")

    with _timed(seconds, "point_search", dev):
        point = reverse_engineer_trigger(backdoored, splits.model, target, steps=preset.point_steps,
                                         lr=preset.point_lr, seed=seed, progress=progress)
    result["point_trigger"] = point.cpu().tolist()
    save("point_search")

    defenses = [("mesa", sampler), ("point", FixedTrigger(point))]
    if oracle:
        defenses.append(("oracle", FixedTrigger(trigger)))
    for name, smp in defenses:
        with _timed(seconds, f"defense_{name}", dev):
            fixed = retrain(backdoored, splits.model, smp, ratio=preset.defense_ratio,
                            epochs=preset.defense_epochs, lr=preset.defense_lr, batch_size=preset.batch_size,
                            seed=seed + 2, progress=progress)
        result[name] = evaluate_model(fixed, splits.eval, trigger, target, seed=seed)
        save(f"defense_{name}")

    for name, fn in (extra_stages or {}).items():
        with _timed(seconds, name, dev):
            result.update(fn(backdoored=backdoored, splits=splits, trigger=trigger, target=target,
                             preset=preset, seed=seed, progress=progress))
        save(name)

    result["status"] = "complete"
    save("complete")
    return result
