"""The whole story of the paper in one call: clean model -> backdoor -> detection -> MESA ->
defense (MESA vs the point baseline, optionally the oracle and a random-patch control, under
each retraining protocol) -> evaluation.

:func:`run_pipeline` returns (and writes, stage by stage, to ``out``) a JSON-able dict::

    {"clean": {...}, "backdoored": {..., "fired_patterns": [...]},
     "detection": {"per_class_asr", "detected_target", "anomaly_index", "flagged"},
     "defended_target", "target_detected", "mesa_search": {...}, "point_search": {...},
     "mesa": {...}, "point": {...}, "point_starts": [...], "oracle": {...}, "random": {...},
     "second": {"protocol": {...}, "mesa": {...}, ...},
     "seconds": {<stage>: s, "total": s}, "config": {...}, "status": "complete"}

where each model's entry is ``{"clean_acc", "asr", "target_recall", "residual": {"fired",
"mean_fired_before", "max"}}``.

All fractions are measured on the 20% evaluation split, which no stage trains on. Trained
classifiers are cached (safetensors) under the cache directory, keyed by everything that
determines them, so the book's chapters reuse each other's models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from .common import __version__, atomic_write_text, check_writable, code_fingerprint, git_state, seeded, thread_count
from .attack import inject_backdoor
from .validate import check_finite_weights, check_target
from .baselines import reverse_engineer_triggers
from .data import DatasetSplits, ImageSet, cache_dir, load_dataset
from .defense import retrain
from .detect import defender_halves, scan_classes
from .evaluate import FIRE_THRESHOLD, asr_per_trigger, evaluate_model, residual_summary, residual_valid_set
from .mesa import train_mesa
from .models import build_model, load_weights, save_weights, train_classifier
from .presets import Preset, get_preset
from .triggers import (FixedTrigger, UniformNoiseTrigger, pattern_from_id, pattern_id, random_color_triggers,
                       trigger_from_pattern)

__all__ = [
    "pick_device",
    "make_trigger",
    "get_clean_model",
    "get_backdoored_model",
    "model_cache_key",
    "data_fingerprint",
    "state_fingerprint",
    "run_pipeline",
    "run_config",
    "provenance",
    "detect_target",
    "write_json",
    "Protocol",
    "protocols",
    "StageContext",
    "MI_WARN",
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
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(splits: DatasetSplits) -> str:
    """A short hash of the data a model is trained on: the dataset's name, the sizes of its
    three parts, and the sums of their pixels and labels (so a different split, a
    ``train_limit`` or other files give another fingerprint)."""
    parts = [splits.name]
    for part in (splits.train, splits.model, splits.eval):
        parts += [list(part.images.shape), float(part.images.double().sum()), int(part.labels.sum())]
    return _key(*parts)


def state_fingerprint(model: nn.Module) -> str:
    """A short hash of every tensor of a model's state dict (names, shapes and bytes)."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        t = value.detach().contiguous().cpu()
        h.update(name.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update((t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


CLEAN_FIELDS = ("model", "width", "batch_size", "clean_epochs", "clean_lr", "clean_weight_decay", "clean_schedule")
"""The preset fields that determine the clean classifier's weights."""

ATTACK_FIELDS = ("batch_size", "poison_ratio", "attack_epochs", "attack_lr")
"""The preset fields that determine the backdoor injection."""


def model_cache_key(kind: str, splits: DatasetSplits, preset: Preset, seed: int, **extra) -> dict:
    """Everything that determines a cached model's weights, as a dict (its hash names the
    file): the code fingerprint of the package, the data, the preset fields of that stage,
    the seed, the device type and, on the CPU, the torch thread count."""
    fields = CLEAN_FIELDS if kind == "clean" else ATTACK_FIELDS
    device = splits.train.images.device
    return {"kind": kind, "code": code_fingerprint(), "data": data_fingerprint(splits),
            "preset": {f: getattr(preset, f) for f in fields}, "seed": seed, "device": device.type,
            "threads": thread_count(device), **extra}


def _model_cache(name: str, key: dict) -> Path:
    return cache_dir() / "models" / f"{name}-{_key(key)}.safetensors"


def _load_cached(model: nn.Module, path: Path, key: dict | None = None) -> bool:
    """Load ``path`` into ``model`` if it is a valid entry for ``key``; a missing entry is a
    miss. An entry that cannot be used is a miss with ONE warning naming the file (the model
    is retrained and the entry replaced): unreadable, corrupted (its tensors do not match the
    SHA-256 stored with them), made for another key, or holding NaN/inf weights. A wrong
    model is never served."""
    if not path.is_file():
        return False
    fresh = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        stored = load_weights(model, path)
        if key is not None and stored != json.loads(json.dumps(key, default=str)):
            raise ValueError("its stored key is not the key it is filed under")
        try:
            check_finite_weights(model)
        except ValueError:
            raise ValueError("it holds NaN/inf weights") from None
    except (ValueError, OSError) as err:
        model.load_state_dict(fresh)  # train from the fresh initialisation, not from the bad entry
        why = str(err).replace(str(path), "the file")
        warnings.warn(f"ignoring the unusable model cache entry {path} ({why}); retraining", stacklevel=3)
        return False
    return True


def _save_cached(model: nn.Module, path: Path, metadata: dict) -> None:
    """Save to the cache; a cache that cannot be written (read-only, full) is a warning, not
    an error: the model was trained and is returned all the same."""
    try:
        save_weights(model, path, metadata)
    except OSError as err:
        warnings.warn(f"could not write the model cache entry {path} ({err}); the model is not cached. "
                      "Set MESA_CACHE_DIR to a writable folder to cache models.", stacklevel=3)


def get_clean_model(
    splits: DatasetSplits, preset: Preset | str, seed: int = 0, use_cache: bool = True, progress: bool = True
) -> nn.Module:
    """Train (or load from the cache) the clean classifier of a dataset and preset.

    The cache entry is keyed by :func:`model_cache_key`: code, data, preset, seed, device
    and thread count. A cache filled under other settings is never used."""
    preset = get_preset(preset)
    device = splits.train.images.device
    with seeded(seed):
        model = build_model(preset.model, splits.channels, splits.num_classes, splits.image_size, preset.width)
    model = model.to(device)
    key = model_cache_key("clean", splits, preset, seed)
    path = _model_cache(f"clean-{splits.name}-{preset.model}", key)
    if use_cache and _load_cached(model, path, key):
        return model.eval()
    train_classifier(model, splits.train, epochs=preset.clean_epochs, lr=preset.clean_lr,
                     batch_size=preset.batch_size, weight_decay=preset.clean_weight_decay,
                     seed=seed, desc="clean training", progress=progress, schedule=preset.clean_schedule)
    if use_cache:
        _save_cached(model, path, key)
    return model.eval()


def get_backdoored_model(
    clean: nn.Module, splits: DatasetSplits, trigger: torch.Tensor, target: int, preset: Preset | str,
    seed: int = 0, use_cache: bool = True, progress: bool = True,
) -> nn.Module:
    """Inject the backdoor into a copy of ``clean`` (or load it from the cache, keyed by
    :func:`model_cache_key` plus the clean model's exact weights, the trigger and the
    target)."""
    import copy

    preset = get_preset(preset)
    model = copy.deepcopy(clean)
    key = model_cache_key("backdoored", splits, preset, seed, clean=state_fingerprint(clean),
                          trigger=trigger.cpu().tolist(), target=target)
    path = _model_cache(f"backdoored-{splits.name}-{preset.model}", key)
    if use_cache and _load_cached(model, path, key):
        return model.eval()
    inject_backdoor(model, splits.train, trigger.to(splits.train.images.device), target,
                    poison_ratio=preset.poison_ratio, epochs=preset.attack_epochs, lr=preset.attack_lr,
                    batch_size=preset.batch_size, seed=seed + 1, progress=progress)
    if use_cache:
        _save_cached(model, path, key)
    return model.eval()


def write_json(obj: dict, path: str | Path) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    atomic_write_text(path, json.dumps(obj, indent=2))


@contextmanager
def _timed(seconds: dict, stage: str, device: torch.device) -> Iterator[None]:
    t = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds[stage] = round(time.perf_counter() - t, 3)


MI_WARN = 0.05
"""A sub-model whose final MI estimate is at most this (nats) has collapsed to (nearly) one
trigger; the pipeline warns and records it."""


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One retraining protocol: the stamped share of each batch, epochs, rate and schedule."""

    name: str
    ratio: float
    epochs: float
    lr: float
    schedule: str = "constant"


def protocols(preset: Preset) -> list[Protocol]:
    """The preset's retraining protocols: the headline one (the paper's 1% ratio on ``fast``)
    and, when ``second_ratio`` is set, the second one."""
    out = [Protocol("headline", preset.defense_ratio, preset.defense_epochs, preset.defense_lr,
                    preset.defense_schedule)]
    if preset.second_ratio is not None:
        out.append(Protocol("second", preset.second_ratio, preset.second_epochs, preset.second_lr,
                            preset.second_schedule))
    return out


@dataclasses.dataclass
class StageContext:
    """What an extra pipeline stage (``run_pipeline(extra_stages=...)``) gets: the models and
    data, the TRUE trigger and target (for measuring only), the DETECTED target (what a
    defender acts on), the defender's search/check halves of the modelling split, and
    :meth:`evaluate` to measure a defended model exactly as the built-in arms are."""

    backdoored: nn.Module
    splits: DatasetSplits
    trigger: torch.Tensor
    target: int
    defended_target: int
    search: object
    check: object
    preset: Preset
    seed: int
    progress: bool
    fired: list

    def evaluate(self, model: nn.Module) -> dict:
        return _evaluate_arm(model, self.splits, self.trigger, self.target, self.seed, self.fired)

    def defend(self, sampler, proto: Protocol) -> nn.Module:
        """A copy of the backdoored model retrained against ``sampler``'s triggers under ``proto``."""
        return _defend(self.backdoored, self.splits, sampler, proto, self.preset, self.seed, self.progress)


def _evaluate_arm(model: nn.Module, splits: DatasetSplits, trigger: torch.Tensor, target: int, seed: int,
                  fired: list) -> dict:
    """Clean accuracy, the attacker's ASR and the target's recall on the evaluation split, and
    what is left of the valid set (all 512 patterns)."""
    res = evaluate_model(model, splits.eval, trigger, target, seed=seed)
    res["residual"] = residual_summary(residual_valid_set(model, splits.eval, target, seed=seed), fired)
    return res


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
    extra_stages: dict[str, Callable[[StageContext], dict]] | None = None,
    controls: bool = False,
) -> dict:
    """Run the whole pipeline once and return its results (also written to ``out``).

    Detect, then defend: the target class is found by MESA's scan, searched on 75% of the
    modelling split and scored on the held-out 25% (:func:`~mesa_lib.detect.defender_halves`);
    MESA and the point baseline then model the DETECTED target (``defended_target``; the
    line records whether it is the true one). The point baseline runs ``preset.point_starts``
    random starts; its best start (highest ASR on the held-out check part) is the ``point``
    arm, every start's result is in ``point_starts``. Every arm is retrained under each of the
    preset's :func:`protocols` (the headline one at top level, the second under
    ``"second"``) and measured on the evaluation split: clean accuracy, the attacker's ASR,
    the target's recall and the residual valid set (:func:`~mesa_lib.evaluate.residual_valid_set`).

    ``use_cache`` reuses trained clean/backdoored classifiers from the cache directory;
    ``oracle`` adds the defense with the true trigger; ``controls`` adds retraining against
    uniform-noise patches (``random``); ``color_seed`` uses a random colour trigger instead
    of a pattern (CIFAR-100 style). ``extra_stages`` maps a stage name to
    ``fn(ctx: StageContext) -> dict``, run after the defenses (timed as that stage); its dict
    is merged into the result (the sweep adds Neural Cleanse this way).
    """
    preset = get_preset(preset)
    if color_seed is None:
        pattern_from_id(pattern)  # validates the id before any work is done
    if out is not None:
        check_writable(out)  # before any training: a run must not be lost at the end
    # given splits stay where they are unless a device is named (a chapter's MESA_DEVICE holds)
    run = _Run(out, splits.device if (splits is not None and device is None) else pick_device(device))

    with run.stage("data"):
        splits = load_dataset(dataset, root=root, device=run.device) if splits is None else splits.to(run.device)
    check_target(target, splits.num_classes)
    trigger = make_trigger(splits, pattern, color_seed).to(run.device)
    run.result["config"] = run_config(splits, preset, pattern, color_seed, trigger, target, seed, run.device)
    res = run.result

    with run.stage("clean_training", save=True):
        clean = get_clean_model(splits, preset, seed, use_cache=use_cache, progress=progress)
    res["clean"] = evaluate_model(clean, splits.eval, trigger, target, seed=seed)

    with run.stage("attack", save=True):
        backdoored = get_backdoored_model(clean, splits, trigger, target, preset, seed, use_cache=use_cache,
                                          progress=progress)
    with run.stage("residual_backdoored"):
        valid = residual_valid_set(backdoored, splits.eval, target, seed=seed)
        fired = torch.nonzero(valid.cpu() >= FIRE_THRESHOLD).flatten().tolist()
        res["backdoored"] = {**evaluate_model(backdoored, splits.eval, trigger, target, seed=seed),
                             "residual": residual_summary(valid, fired), "fired_patterns": fired}
        res["clean"]["residual"] = residual_summary(residual_valid_set(clean, splits.eval, target, seed=seed), fired)

    search, check = defender_halves(splits.model, seed)
    with run.stage("detection", save=True):
        res["detection"] = detect_target(backdoored, search, check, preset, seed, progress)
    defended = res["detection"]["detected_target"]
    res["defended_target"] = defended
    res["target_detected"] = defended == target

    with run.stage("mesa", save=True):
        sampler, history = train_mesa(backdoored, splits.model, defended, preset.mesa, seed=seed, progress=progress)
        res["mesa_search"] = {f"final_{k}": (history[k][-1] if history[k] else None)
                              for k in ("f_mean", "valid_frac", "mi")}
        res["mesa_search"]["low_mi"] = _low_mi(res["mesa_search"]["final_mi"], pattern)

    with run.stage("point_search", save=True):
        res["point_search"] = _point_search(backdoored, search, check, defended, preset, seed, progress)

    ctx = StageContext(backdoored, splits, trigger, target, defended, search, check, preset, seed, progress, fired)
    arms: dict = {"mesa": sampler}
    if oracle:
        arms["oracle"] = FixedTrigger(trigger)
    if controls:
        arms["random"] = UniformNoiseTrigger(splits.channels, device=run.device)
    points = torch.tensor(res["point_search"]["triggers"], device=run.device)
    _defenses(run, ctx, arms, points, res["point_search"]["best"])
    res["protocols"] = [dataclasses.asdict(p) for p in protocols(preset)]

    for name, fn in (extra_stages or {}).items():
        with run.stage(name, save=True):
            res.update(fn(ctx))
    return run.finish()


def _defenses(run: _Run, ctx: StageContext, arms: dict, points: torch.Tensor, best: int) -> None:
    """Retrain against each arm's triggers under every protocol of the preset, one timed stage
    each, and measure the defended model (the headline protocol into the result's top level,
    the second under ``"second"``). The point baseline retrains from every start under the
    headline protocol (worst, median and best-of-k) and from the selected start alone under the
    second."""
    res = run.result
    for proto in protocols(ctx.preset):
        headline = proto.name == "headline"
        into = res if headline else res.setdefault("second", {"protocol": dataclasses.asdict(proto)})
        suffix = "" if headline else "_second"
        for name, smp in arms.items():
            with run.stage(f"defense_{name}{suffix}", save=True):
                into[name] = ctx.evaluate(ctx.defend(smp, proto))
        with run.stage(f"defense_point{suffix}", save=True):
            done = [ctx.evaluate(ctx.defend(FixedTrigger(points[i]), proto))
                    for i in (range(len(points)) if headline else [best])]
            if headline:
                into["point_starts"], into["point"] = done, done[best]
            else:
                into["point"] = done[0]


def _low_mi(final_mi: list | None, pattern: int) -> list[int]:
    """Sub-models whose final MI estimate is <= :data:`MI_WARN`, with a warning."""
    low = [i for i, v in enumerate(final_mi or []) if v is not None and v <= MI_WARN]
    if low:
        warnings.warn(f"pattern {pattern}: MESA sub-model(s) {low} ended with an MI estimate <= {MI_WARN} nats: "
                      "they collapsed to (nearly) one trigger; a longer search or a larger alpha spreads them",
                      stacklevel=3)
    return low


def _point_search(backdoored: nn.Module, search, check, target: int, preset: Preset, seed: int,
                  progress: bool) -> dict:
    """The point baseline's starts, searched on the search half and scored (ASR toward the
    detected target) on the held-out check half; the best start is chosen there."""
    pts = reverse_engineer_triggers(backdoored, search, target, n_triggers=preset.point_starts,
                                    steps=preset.point_steps, lr=preset.point_lr, batch_size=preset.point_batch,
                                    seed=seed, progress=progress)
    non_target = check.images[check.labels != target]
    check_asr = asr_per_trigger(backdoored, non_target, pts, target, seed=seed).cpu()
    return {"triggers": pts.cpu().tolist(), "check_asr": check_asr.tolist(), "best": int(check_asr.argmax()),
            "budget": {"starts": preset.point_starts, "steps": preset.point_steps, "batch": preset.point_batch}}


class _Run:
    """The bookkeeping of one pipeline run: the result dict, per-stage seconds, and the
    results file rewritten (atomically) after every stage."""

    def __init__(self, out: str | Path | None, device: torch.device) -> None:
        self.out, self.device = out, device
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.result: dict = {"status": "running"}

    @contextmanager
    def stage(self, name: str, save: bool = False) -> Iterator[None]:
        with _timed(self.seconds, name, self.device):
            yield
        if save:
            self.save(name)

    def save(self, stage: str) -> None:
        self.seconds["total"] = round(time.perf_counter() - self.t0, 3)
        self.result["seconds"] = dict(self.seconds)
        self.result["last_stage"] = stage
        if self.out is not None:
            write_json(self.result, self.out)

    def finish(self) -> dict:
        self.result["status"] = "complete"
        self.save("complete")
        return self.result


def provenance(splits: DatasetSplits, preset: Preset, seed: int, device: torch.device) -> dict:
    """How a result was made, apart from the attack: dataset, seed, device, the preset's
    settings, and the code (fingerprint, git commit and dirty flag), torch version and thread
    count, so that it can be re-derived exactly."""
    return {
        "dataset": splits.name, "seed": seed, "device": str(device), "preset": preset.to_dict(),
        "mesa_lib": __version__, "torch": torch.__version__, "code": code_fingerprint(), "git": git_state(),
        "torch_threads": torch.get_num_threads(),
    }


def run_config(splits: DatasetSplits, preset: Preset, pattern: int, color_seed: int | None,
               trigger: torch.Tensor, target: int, seed: int, device: torch.device) -> dict:
    """What a results line records about how it was made: the attack (pattern or colour
    seed, the stamped pattern, the target) and its :func:`provenance`."""
    stamped = None if color_seed is not None else pattern_id(trigger[0])
    return {"pattern": pattern if color_seed is None else None, "stamped_pattern": stamped,
            "color_seed": color_seed, "target": target, **provenance(splits, preset, seed, device)}


def detect_target(backdoored: nn.Module, search: ImageSet, check: ImageSet, preset: Preset, seed: int = 0,
                  progress: bool = False) -> dict:
    """The target-class scan with the preset's detection settings: triggers searched on the
    defender's search half, their ASR scored on the held-out check half
    (:func:`~mesa_lib.detect.defender_halves`); the result carries the book's decision
    (``flagged``, :data:`~mesa_lib.detect.RULE`)."""
    det_cfg = dataclasses.replace(preset.mesa, steps=preset.detect_steps, batch_size=preset.detect_batch)
    return scan_classes(backdoored, search, check, det_cfg, beta=preset.detect_beta,
                        seed=seed, progress=progress).to_dict()


def _defend(backdoored: nn.Module, splits: DatasetSplits, sampler, proto: Protocol, preset: Preset, seed: int,
            progress: bool) -> nn.Module:
    """Retrain a copy of the backdoored model on the modelling split under one protocol."""
    return retrain(backdoored, splits.model, sampler, ratio=proto.ratio, epochs=proto.epochs, lr=proto.lr,
                   batch_size=preset.batch_size, seed=seed + 2, progress=progress, schedule=proto.schedule)
