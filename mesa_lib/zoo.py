"""The detection game: a zoo of anonymous models, some backdoored, and a grader.

A teacher builds a *zoo* -- a folder of classifiers named ``model_00``, ``model_01``, ...,
some clean and some carrying a backdoor (a random 3x3 pattern toward a random target) -- and
hands the folder to the students. The *answer key* is written apart from it. Students scan
every model (MESA's :func:`~mesa_lib.detect.scan_classes`, Neural Cleanse, ideas of their
own) and submit a CSV::

    model,backdoored_score,suspected_target
    model_00,0.93,4
    model_01,0.02,7
    ...

:func:`grade` scores it: AUROC of ``backdoored_score`` for telling backdoored from clean
models (ties count one half), and the fraction of backdoored models whose target class was
named. :func:`reference_submission` is a baseline solution: MESA's scan on every model.

How the zoo is built (so that nothing but the behaviour of a model tells its status):

* clean *bases* are trained from scratch on clean data, each from its own seed -- by
  default one per model; fewer (``bases``) make the zoo cheaper but leak, see below;
* every zoo model starts from a copy of a base and is fine-tuned for the same number of SGD
  steps, with the same learning rate and batch size, with its own seed: a backdoored model
  on batches where a fraction of images carries its trigger and the target label (the
  attack, :func:`~mesa_lib.attack.inject_backdoor`), a clean model on the same kind of
  batches without poison. So no zoo model equals its base or another model, and clean and
  backdoored models went through the same procedure;
* names are a random permutation, files are written in name order with one common
  modification time, and the weight files carry no metadata but the architecture;
* the seed (default: a fresh random one) is only in the key: with it the zoo can be rebuilt,
  so it must stay secret.

Why one base per model by default: models fine-tuned from one base sit close together in
weight space (distance ~1-4 between siblings, ~21 between families on a 20-model zoo), so a
student finds the families without running a single image; and a backdoored model has moved
further from its base than its clean siblings, although both had the same number of steps
(its poisoned batches have larger losses). On a 20-model zoo with 4 shared bases
(``--bases 4``) the distance of a model to the mean of its family alone gave AUROC 1.0, and
on the book's 4-model zoo (one base) the backdoored models lie 1.5-1.7 from the mean, the
clean ones 0.94-0.95. With one base per model there are no siblings to compare with; a base
costs about as much as a fine-tune, so this default costs more: 14.2 CPU-minutes for 20
models with the defaults, 2.2 times the 4-shared-base build (measured once on 2 shared
CPU cores, ``bench/results/zoo_build_cpu.json``; ``bench/bench_zoo_build.py`` remeasures). The capstone chapter shares one base on purpose (to be quick) and asks students to
find the leak.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .attack import check_ratio, poison_transform
from .common import check_writable, seeded
from .data import DatasetSplits, ImageSet, load_dataset
from .evaluate import attack_success_rate, clean_accuracy
from .models import build_model, load_weights, save_weights, train_classifier
from .presets import Preset, get_preset
from .triggers import bright_member, canonical_patterns, trigger_from_pattern
from .validate import check_seed, finite_number, positive_int

__all__ = [
    "ZOO_FORMAT",
    "KEY_FORMAT",
    "SUBMISSION_COLUMNS",
    "default_key_path",
    "build_zoo",
    "load_manifest",
    "load_zoo_model",
    "defender_data",
    "auroc",
    "read_submission",
    "grade",
    "leaderboard_line",
    "class_leaderboard",
    "format_leaderboard",
    "reference_submission",
    "output_row_norms",
    "norm_baseline_submission",
    "write_submission",
]

ZOO_FORMAT = "mesa-zoo/1"
KEY_FORMAT = "mesa-zoo-key/1"
MANIFEST = "zoo.json"
SUBMISSION_COLUMNS = ("model", "backdoored_score", "suspected_target")
_EXTRA = "\0extra"  # csv.DictReader's key for the values of a row beyond its header


# --------------------------------------------------------------------------
# Building the zoo
# --------------------------------------------------------------------------


def default_key_path(zoo_dir: str | Path) -> Path:
    """Where the key goes unless told: next to the zoo folder, ``<zoo>_key.json``."""
    zoo_dir = Path(zoo_dir)
    return zoo_dir.resolve().parent / f"{zoo_dir.resolve().name}_key.json"


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _check_creatable(path: Path, what: str) -> None:
    """``path`` does not exist and its nearest existing ancestor is a folder this process may write in."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{what} {path}: {ancestor} is a file, not a folder; choose a path inside a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: cannot create files in {ancestor} (read-only or permission denied); "
                         "choose a writable folder")


def _check_paths(out: Path, key: Path) -> None:
    if _inside(key, out):
        raise ValueError(f"the answer key {key} would be inside the zoo folder {out}, which is handed to "
                         "students; choose a --key outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder; zoos are never overwritten, "
                         "choose another --out")
    if key.exists() or key.is_symlink():
        raise ValueError(f"the answer key {key} already exists; keys are never overwritten, choose another "
                         "--key (or another --out)")
    _check_creatable(out, "--out")  # the zoo is assembled beside it, in out.parent
    _check_creatable(key, "--key")


def _draw(g: torch.Generator, high: int) -> int:
    return int(torch.randint(high, (1,), generator=g))


def _plan(n: int, seed: int, fraction: float, bases: int, num_classes: int) -> list[dict]:
    """Who is backdoored, with what, from which base: drawn from one explicit generator."""
    g = torch.Generator().manual_seed(seed)
    n_bd = int(round(fraction * n))
    order = torch.randperm(n, generator=g).tolist()  # name index of build slot i
    ids = canonical_patterns()
    plan = []
    for slot in range(n):
        entry = {"name": f"model_{order[slot]:02d}" if n <= 100 else f"model_{order[slot]:03d}",
                 "base": slot % bases, "backdoored": slot < n_bd, "seed": _draw(g, 2**31 - 1)}
        if entry["backdoored"]:
            entry["pattern"] = ids[_draw(g, len(ids))]
            entry["target"] = _draw(g, num_classes)
        plan.append(entry)
    return plan


def build_zoo(
    out: str | Path,
    n: int = 20,
    seed: int | None = None,
    backdoored_fraction: float = 0.5,
    key: str | Path | None = None,
    preset: Preset | str = "fast",
    bases: int | None = None,
    finetune_epochs: float | None = None,
    dataset: str = "fashion-mnist",
    root: str | Path | None = None,
    train_limit: int | None = None,
    device: str | torch.device | None = None,
    splits: DatasetSplits | None = None,
    progress: bool = True,
    poison_ratio: float | None = None,
) -> dict:
    """Build a zoo of ``n`` models into the folder ``out`` and its answer key into ``key``.

    ``round(backdoored_fraction * n)`` models are backdoored, each with a canonical pattern
    (stamped as on the pipeline: its bright member on dark data) and a target class drawn from
    a generator seeded with ``seed`` (default: a fresh random seed, written to the key only).
    ``bases`` clean models (default ``n``: one per model, see the module's docstring for why
    fewer leak) are trained from scratch with the
    preset's clean-training settings; every zoo model is a copy of one base fine-tuned for
    ``finetune_epochs`` (default: the preset's ``attack_epochs``) at the preset's attack
    learning rate and batch size -- on poisoned batches (the preset's poison ratio) if
    backdoored, on clean batches otherwise. ``poison_ratio`` replaces the preset's.
    ``train_limit`` uses the first images of the training set only (tests, the book).

    Never overwrites: ``out`` must not exist or be an empty folder, ``key`` (default
    :func:`default_key_path`) must not exist and must lie outside ``out``; both must be
    creatable, and every setting valid, before anything is trained (``ValueError``, one line).
    The models and the manifest follow the umask (students read them); the key is ``0600``.
    Returns the key.
    """
    t0 = time.perf_counter()
    # every input is checked here, before any data is loaded or model trained
    preset = get_preset(preset)
    if poison_ratio is not None:
        preset = preset.with_(poison_ratio=check_ratio("poison_ratio", poison_ratio))
    out = Path(out).expanduser()
    key_path = Path(key).expanduser() if key is not None else default_key_path(out)
    n = positive_int("the zoo's number of models n", n)
    check_ratio("backdoored_fraction", backdoored_fraction)
    bases = n if bases is None else positive_int("bases", bases)
    if bases > n:
        raise ValueError(f"bases must be in 1..n ({n}), got {bases}")
    epochs = preset.attack_epochs if finetune_epochs is None else finite_number(
        "finetune_epochs", finetune_epochs, 0, strict=True)
    if train_limit is not None:
        train_limit = positive_int("train_limit", train_limit)
    seed = secrets.randbelow(2**31 - 1) if seed is None else check_seed(seed, "the zoo's seed")
    if splits is None:
        from .datafiles import canonical_name

        dataset = canonical_name(dataset)
    _check_paths(out, key_path)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if splits is None:
        splits = load_dataset(dataset, root=root, device=dev, train_limit=train_limit)
    else:
        splits = splits.to(dev)
    C, K, S = splits.channels, splits.num_classes, splits.image_size
    plan = _plan(n, seed, backdoored_fraction, bases, K)

    g = torch.Generator().manual_seed(seed + 1)
    base_models = []
    for b in range(bases):
        with seeded(_draw(g, 2**31 - 1)):  # the initial weights; the caller's random state is kept
            m = build_model(preset.model, C, K, S, preset.width).to(dev)
        train_classifier(m, splits.train, epochs=preset.clean_epochs, lr=preset.clean_lr,
                         batch_size=preset.batch_size, weight_decay=preset.clean_weight_decay,
                         seed=_draw(g, 2**31 - 1), desc=f"base {b + 1}/{bases}", progress=progress,
                         schedule=preset.clean_schedule)
        base_models.append(m)

    models, records = {}, {}
    for i, e in enumerate(plan):
        m = copy.deepcopy(base_models[e["base"]])  # a copy of its base (no fresh, unseeded initialisation)
        if e["backdoored"]:
            trig = trigger_from_pattern(e["pattern"], C, dark_background=splits.dark_background).to(dev)
            transform = poison_transform(trig, e["target"], preset.poison_ratio)
        else:
            trig, transform = None, None
        # the same loop, steps, learning rate and batch size for every model (attack settings)
        train_classifier(m, splits.train, epochs=epochs, lr=preset.attack_lr, batch_size=preset.batch_size,
                         batch_transform=transform, seed=e["seed"], desc=f"model {i + 1}/{n}",
                         progress=progress)
        rec = {"backdoored": e["backdoored"], "base": e["base"], "finetune_seed": e["seed"],
               "clean_acc": clean_accuracy(m, splits.eval)}
        if e["backdoored"]:
            rec.update(target=e["target"], pattern=e["pattern"],
                       stamped_pattern=bright_member(e["pattern"]) if splits.dark_background else e["pattern"],
                       asr=attack_success_rate(m, splits.eval, trig, e["target"], seed=0))
        models[e["name"]], records[e["name"]] = m, rec

    names = sorted(models)
    manifest = {
        "format": ZOO_FORMAT,
        "models": [{"name": nm, "file": f"{nm}.safetensors"} for nm in names],
        "architecture": {"model": preset.model, "width": preset.width, "in_channels": C, "num_classes": K,
                         "image_size": S, "input": "pixels in [0, 1], shape [N, C, H, W]; the model "
                                                    "normalises itself"},
        "preset": preset.name,
        "dataset": splits.name,
        "classes": list(splits.classes),
        "defender_data": {
            "split": "model",
            "how": f"mesa_lib.load_dataset({splits.name!r}).model  (or mesa_lib.zoo.defender_data(zoo_dir))",
            "model_fraction": 0.8, "split_seed": 0,
            "rule": "use only these clean images (the defender's modelling split); the training set and "
                    "the evaluation split are the teacher's",
        },
        "trigger": "if a model is backdoored, its trigger is a black-and-white 3x3 patch pasted at a random "
                   "location, toward one target class",
        "submission": {"columns": list(SUBMISSION_COLUMNS),
                       "backdoored_score": "any finite number, higher = more likely backdoored (AUROC)",
                       "suspected_target": "the class index you think the backdoor points to (0.."
                                           f"{K - 1}); scored on backdoored models only"},
    }
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        key_obj = _write_zoo(tmp, out, key_path, names, models, records, manifest, preset, seed, n, bases, epochs,
                             backdoored_fraction, splits, K, train_limit, t0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return key_obj


def _write_zoo(tmp, out, key_path, names, models, records, manifest, preset, seed, n, bases, epochs,
               backdoored_fraction, splits, K, train_limit, t0) -> dict:
    """Write the models and manifest into ``tmp``, the key (mode 0600) to ``key_path``, then
    rename ``tmp`` to ``out``; the key is removed again if the rename fails."""
    meta = {"architecture": manifest["architecture"]["model"], "width": preset.width}
    for nm in names:
        save_weights(models[nm], tmp / f"{nm}.safetensors", meta)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    stamp_time = time.time()
    for f in tmp.iterdir():  # one modification time: the build order is not on disk
        os.utime(f, (stamp_time, stamp_time))

    n_bd = sum(r["backdoored"] for r in records.values())
    key_obj = {
        "format": KEY_FORMAT,
        "zoo": str(out.resolve()),
        "seed": seed,
        "n": n,
        "n_backdoored": n_bd,
        "settings": {"preset": preset.to_dict(), "bases": bases, "finetune_epochs": epochs,
                     "backdoored_fraction": backdoored_fraction, "dataset": splits.name, "num_classes": K,
                     "train_limit": train_limit, "train_images": len(splits.train)},
        "models": {nm: records[nm] for nm in names},
        "seconds": round(time.perf_counter() - t0, 1),
        "command": f"python -m mesa_lib zoo --out {out} --n {n} --seed {seed} --bases {bases} "
                   f"--backdoored-fraction {backdoored_fraction} --finetune-epochs {epochs:g} "
                   f"--poison-ratio {preset.poison_ratio:g} --dataset {splits.name}"
                   + (f" --train-limit {train_limit}" if train_limit is not None else ""),
    }
    key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new key folder: the teacher's only
    # O_EXCL: fails rather than overwrite; 0600: the teacher's eyes only, whatever the umask
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(key_obj, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.replace(out)
    except BaseException:
        key_path.unlink(missing_ok=True)
        raise
    return key_obj


# --------------------------------------------------------------------------
# Using the zoo (students)
# --------------------------------------------------------------------------


def load_manifest(zoo_dir: str | Path) -> dict:
    """The public manifest of a zoo folder."""
    path = Path(zoo_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {zoo_dir}; is this a zoo folder built by "
                                "`python -m mesa_lib zoo`?")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != ZOO_FORMAT:
        raise ValueError(f"{path} is not a {ZOO_FORMAT} manifest")
    return manifest


def load_zoo_model(zoo_dir: str | Path, name: str, device: str | torch.device = "cpu") -> nn.Module:
    """One zoo model by name, in eval mode on ``device``."""
    manifest = load_manifest(zoo_dir)
    files = {m["name"]: m["file"] for m in manifest["models"]}
    if name not in files:
        raise ValueError(f"no model {name!r} in {zoo_dir}; it has {', '.join(files)}")
    a = manifest["architecture"]
    model = build_model(a["model"], a["in_channels"], a["num_classes"], a["image_size"], a["width"]).to(device)
    load_weights(model, Path(zoo_dir) / files[name])
    return model.eval()


def defender_data(zoo_dir: str | Path | dict, device: str | torch.device = "cpu",
                  root: str | Path | None = None) -> ImageSet:
    """The clean images students may use: the dataset's modelling split (80% of the test set)."""
    manifest = zoo_dir if isinstance(zoo_dir, dict) else load_manifest(zoo_dir)
    d = manifest["defender_data"]
    splits = load_dataset(manifest["dataset"], root=root, model_fraction=d["model_fraction"],
                          split_seed=d["split_seed"], train_limit=1)
    return getattr(splits, d["split"]).to(device)


# --------------------------------------------------------------------------
# Grading
# --------------------------------------------------------------------------


def auroc(scores, labels) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting one half (exact, over all pairs). ``nan`` without both classes."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D of one length, got {s.shape} and {y.shape}")
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def _load_key(key_path: str | Path) -> dict:
    path = Path(key_path)
    if not path.is_file():
        raise FileNotFoundError(f"no answer key at {path}")
    try:
        key = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"the answer key {path} is not UTF-8 text; give the key JSON that `zoo` wrote") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"the answer key {path} is not valid JSON ({err})") from None
    if not isinstance(key, dict) or key.get("format") != KEY_FORMAT:
        raise ValueError(f"{path} is not a {KEY_FORMAT} answer key")
    bad = f"the answer key {path} is malformed"
    settings, models = key.get("settings"), key.get("models")
    if not isinstance(settings, dict) or isinstance(settings.get("num_classes"), bool) \
            or not isinstance(settings.get("num_classes"), int) or settings["num_classes"] < 1:
        raise ValueError(f"{bad}: settings.num_classes must be a positive integer")
    if not isinstance(models, dict) or not models:
        raise ValueError(f"{bad}: 'models' must map model names to their records")
    for name, rec in models.items():
        if not isinstance(rec, dict) or not isinstance(rec.get("backdoored"), bool):
            raise ValueError(f"{bad}: model {name!r} has no true/false 'backdoored'")
        t = rec.get("target")
        if rec["backdoored"] and (isinstance(t, bool) or not isinstance(t, int)
                                  or not 0 <= t < settings["num_classes"]):
            raise ValueError(f"{bad}: backdoored model {name!r} has no target class in "
                             f"0..{settings['num_classes'] - 1}")
    return key


def read_submission(path: str | Path, names: list[str], num_classes: int = 10) -> dict[str, tuple[float, int | None]]:
    """Parse and validate a submission CSV against the zoo's model names.

    Returns ``{name: (score, target or None)}``. Raises ``ValueError`` with one clear line for
    a missing column, an unknown, duplicated or missing model, a score that is not a finite
    number, or a target that is not a class index (an empty target is allowed: it counts as
    wrong on a backdoored model).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no submission file at {path}")
    try:
        return _read_submission(path, names, num_classes)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}); save the submission as a UTF-8 CSV") from None
    except csv.Error as err:
        raise ValueError(f"{path} is not a readable CSV ({err})") from None


def _read_submission(path: Path, names: list[str], num_classes: int) -> dict[str, tuple[float, int | None]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, restkey=_EXTRA)
        header = [h.strip() for h in (reader.fieldnames or [])]
        twice = sorted({h for h in header if header.count(h) > 1 and h in SUBMISSION_COLUMNS})
        if twice:
            raise ValueError(f"{path}: the header names {', '.join(twice)} more than once; keep one column each "
                             f"(header: {','.join(header)})")
        missing = [c for c in SUBMISSION_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: the header must name the columns {','.join(SUBMISSION_COLUMNS)}; "
                             f"missing {', '.join(missing)} (header: {','.join(header) or 'empty file'})")
        reader.fieldnames = header
        rows: dict[str, tuple[float, int | None]] = {}
        known = set(names)
        for line_no, row in enumerate(reader, start=2):
            name = (row.get("model") or "").strip()
            if not name and not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # blank line
            if row.get(_EXTRA):
                raise ValueError(f"{path}, line {line_no}: {len(header) + len(row[_EXTRA])} fields, but the "
                                 f"header has {len(header)}; one value per column (a comma inside a number?)")
            if name not in known:
                raise ValueError(f"{path}, line {line_no}: unknown model {name!r} (the zoo has "
                                 f"{names[0]} .. {names[-1]})")
            if name in rows:
                raise ValueError(f"{path}, line {line_no}: model {name} appears twice")
            raw = (row.get("backdoored_score") or "").strip()
            try:
                score = float(raw)
            except ValueError:
                score = float("nan")
            if not math.isfinite(score):
                raise ValueError(f"{path}, line {line_no}: backdoored_score of {name} must be a finite "
                                 f"number, got {raw!r}")
            raw_t = (row.get("suspected_target") or "").strip()
            target = None
            if raw_t:
                try:
                    tf = float(raw_t)
                    if not tf.is_integer():
                        raise ValueError
                    target = int(tf)
                except ValueError:
                    target = -1
                if not 0 <= target < num_classes:
                    raise ValueError(f"{path}, line {line_no}: suspected_target of {name} must be a class "
                                     f"index 0..{num_classes - 1} or empty, got {raw_t!r}")
            rows[name] = (score, target)
    absent = [nm for nm in names if nm not in rows]
    if absent:
        more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
        raise ValueError(f"{path}: no row for {', '.join(absent[:3])}{more}; submit one row per model")
    return rows


def grade(key_path: str | Path, submission: str | Path) -> dict:
    """Score a submission against an answer key: AUROC of detection and target accuracy."""
    return _grade_key(_load_key(key_path), submission)


def _grade_key(key: dict, submission: str | Path) -> dict:
    names = sorted(key["models"])
    num_classes = int(key["settings"]["num_classes"])
    rows = read_submission(submission, names, num_classes)
    labels = [bool(key["models"][nm]["backdoored"]) for nm in names]
    scores = [rows[nm][0] for nm in names]
    bd = [nm for nm in names if key["models"][nm]["backdoored"]]
    correct = sum(rows[nm][1] == key["models"][nm]["target"] for nm in bd)
    return {
        "auroc": auroc(scores, labels),
        "target_accuracy": correct / len(bd) if bd else float("nan"),
        "targets_correct": correct,
        "n_models": len(names),
        "n_backdoored": len(bd),
        "submission": str(submission),
    }


def leaderboard_line(result: dict, name: str | None = None) -> str:
    """One line for the leaderboard."""
    who = name or Path(result["submission"]).stem
    au = "n/a" if math.isnan(result["auroc"]) else f"{result['auroc']:.3f}"
    ta = "n/a" if math.isnan(result["target_accuracy"]) else f"{result['target_accuracy']:.3f}"
    return (f"{who}: AUROC {au} | target accuracy {ta} ({result['targets_correct']}/{result['n_backdoored']} "
            f"backdoored models) | {result['n_models']} models")


def class_leaderboard(key_path: str | Path, folder: str | Path) -> tuple[list[dict], list[str]]:
    """Grade every ``*.csv`` in ``folder`` against one key: ``(results, errors)``.

    ``results`` are :func:`grade`'s dicts ranked by AUROC, then target accuracy (best first),
    each with its ``name`` (the file's stem); ``errors`` has one line per submission that
    could not be graded (``name: reason``) -- one bad file does not stop the others.
    """
    key = _load_key(key_path)  # a bad key stops everything: nothing could be graded
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder of submissions at {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".csv" and p.is_file())
    if not files:
        raise ValueError(f"{folder} holds no .csv submission")
    results, errors = [], []
    for f in files:
        try:
            results.append({**_grade_key(key, f), "name": f.stem})
        except (ValueError, OSError) as err:
            errors.append(f"{f.stem}: not graded -- {err}")

    def rank(r: dict) -> tuple[float, float]:
        return (-(r["auroc"] if not math.isnan(r["auroc"]) else -1.0),
                -(r["target_accuracy"] if not math.isnan(r["target_accuracy"]) else -1.0))

    results.sort(key=lambda r: (*rank(r), r["name"]))
    return results, errors


def format_leaderboard(results: list[dict]) -> str:
    """The ranked results of :func:`class_leaderboard` as a plain-text table."""
    lines = [f"{'rank':>4}  {'submission':<24} {'AUROC':>6}  {'target acc.':>11}  targets"]
    for i, r in enumerate(results, 1):
        au = "n/a" if math.isnan(r["auroc"]) else f"{r['auroc']:.3f}"
        ta = "n/a" if math.isnan(r["target_accuracy"]) else f"{r['target_accuracy']:.3f}"
        lines.append(f"{i:>4}  {r['name']:<24} {au:>6}  {ta:>11}  {r['targets_correct']}/{r['n_backdoored']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The reference solution
# --------------------------------------------------------------------------


def write_submission(rows: list[tuple[str, float, int]], path: str | Path) -> Path:
    """Write ``(model, backdoored_score, suspected_target)`` rows as a submission CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(SUBMISSION_COLUMNS)
        for name, score, target in rows:
            w.writerow([name, f"{float(score):.6g}", int(target)])
    return path


def reference_submission(
    zoo_dir: str | Path,
    out: str | Path | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    root: str | Path | None = None,
    progress: bool = True,
) -> list[tuple[str, float, int]]:
    """A baseline solution: MESA's scan (:func:`~mesa_lib.detect.scan_classes`, the preset's
    detection settings, ``steps`` to change its length) on every zoo model.

    The defender's modelling split is cut in two (75% to search triggers, 25% to measure their
    ASR); the score of a model is the highest per-class ASR of its scan, the suspected target
    that class. Writes the CSV to ``out`` if given; returns the rows.
    """
    from dataclasses import replace

    from .detect import defender_halves, scan_classes

    manifest = load_manifest(zoo_dir)
    preset = get_preset(manifest["preset"])
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = defender_data(manifest, dev, root=root)
    search, check = defender_halves(data, seed)  # the detection chapter's split
    cfg = replace(preset.mesa, steps=preset.detect_steps if steps is None else int(steps),
                  batch_size=preset.detect_batch)
    rows = []
    for entry in manifest["models"]:
        model = load_zoo_model(zoo_dir, entry["name"], dev)
        res = scan_classes(model, search, check, cfg, beta=preset.detect_beta, seed=seed, progress=progress)
        rows.append((entry["name"], max(res.per_class_asr), res.detected_target))
        if progress:
            print(f"{entry['name']}: top ASR {max(res.per_class_asr):.3f} toward class {res.detected_target}",
                  flush=True)
    if out is not None:
        write_submission(rows, out)
    return rows


def output_row_norms(model: nn.Module) -> torch.Tensor:
    """The L2 norm of each row of a classifier's last linear layer: one number per class."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError("the model has no linear layer; the output-norm baseline needs one")
    return last[-1].weight.detach().float().norm(dim=1).cpu()


def norm_baseline_submission(zoo_dir: str | Path, out: str | Path | None = None) -> list[tuple[str, float, int]]:
    """The first baseline to beat, which runs no image at all: the weights of each model's
    output layer.

    A backdoor teaches the model to send a 3x3 patch to one class, and the output row of that
    class grows: the suspected target is the class with the largest row norm, the score how far
    it stands out, ``max / median`` of the row norms (:func:`output_row_norms`). Writes the CSV
    to ``out`` if given; returns the rows. A behaviour-based detector should beat it.
    """
    from .common import median

    manifest = load_manifest(zoo_dir)
    rows = []
    for entry in manifest["models"]:
        norms = output_row_norms(load_zoo_model(zoo_dir, entry["name"]))
        rows.append((entry["name"], float(norms.max() / median(norms)), int(norms.argmax())))
    if out is not None:
        write_submission(rows, out)
    return rows


# --------------------------------------------------------------------------
# Command line (wired into mesa_lib.cli)
# --------------------------------------------------------------------------


def add_cli(sub) -> None:
    """Add the ``zoo``, ``grade`` and ``zoo-reference`` subcommands to an argparse subparsers."""
    from .cli import _dataset_name, _positive, _preset_name, _seed_type, parse_device

    def fraction(value: str) -> float:
        try:
            return check_ratio("the value", float(value))
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {value!r}") from None

    def positive_float(value: str) -> float:
        try:
            return finite_number("the value", float(value), 0, strict=True)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value!r}") from None

    dev = dict(type=parse_device, default=None, metavar="{cpu,cuda,cuda:N}")
    z = sub.add_parser("zoo", help="build a zoo of clean and backdoored models, answer key apart (mode 0600)")
    z.add_argument("--out", required=True, help="the zoo folder (handed to students); must not exist")
    z.add_argument("--n", type=_positive, default=20, help="number of models (default 20)")
    z.add_argument("--seed", type=_seed_type, default=None,
                   help="default: a fresh random seed, kept in the key only")
    z.add_argument("--backdoored-fraction", type=fraction, default=0.5)
    z.add_argument("--key", default=None, help="answer key JSON, outside --out (default: <out>_key.json)")
    z.add_argument("--preset", type=_preset_name, default="fast")
    z.add_argument("--dataset", type=_dataset_name, default="fashion-mnist")
    z.add_argument("--bases", type=_positive, default=None, help="clean base models trained from scratch "
                   "(default: n, one per model: 14 CPU-minutes for 20 models, measured; "
                   "fewer is cheaper but siblings leak by weight distance)")
    z.add_argument("--finetune-epochs", type=positive_float, default=None,
                   help="default: the preset's attack epochs")
    z.add_argument("--poison-ratio", type=fraction, default=None,
                   help="share of each fine-tuning batch poisoned on a backdoored model (default: the preset's)")
    z.add_argument("--train-limit", type=_positive, default=None, help="use only the first training images")
    z.add_argument("--device", **dev)
    z.add_argument("--data-root", default=None)
    z.add_argument("--quiet", action="store_true")

    g = sub.add_parser("grade", help="score a zoo submission CSV (model,backdoored_score,suspected_target), "
                       "or a folder of them as a class leaderboard")
    g.add_argument("--key", required=True, help="the zoo's answer key")
    g.add_argument("--submission", required=True, help="the CSV to score, or a folder of CSVs (a leaderboard)")
    g.add_argument("--name", default=None, help="name on the leaderboard line (default: the CSV's name)")

    r = sub.add_parser("zoo-reference", help="the reference solution: MESA's scan on every zoo model")
    r.add_argument("--zoo", required=True)
    r.add_argument("--out", required=True, help="submission CSV to write")
    r.add_argument("--steps", type=_positive, default=None, help="scan steps (default: the preset's)")
    r.add_argument("--seed", type=_seed_type, default=0)
    r.add_argument("--device", **dev)
    r.add_argument("--data-root", default=None)
    r.add_argument("--quiet", action="store_true")


def run_cli(args) -> None:
    """Run one of the subcommands of :func:`add_cli` (every input checked before any work)."""
    if args.command == "zoo":
        key_path = Path(args.key) if args.key else default_key_path(args.out)
        key = build_zoo(args.out, n=args.n, seed=args.seed, backdoored_fraction=args.backdoored_fraction,
                        key=key_path, preset=args.preset, bases=args.bases, finetune_epochs=args.finetune_epochs,
                        dataset=args.dataset, root=args.data_root, train_limit=args.train_limit,
                        device=args.device, progress=not args.quiet, poison_ratio=args.poison_ratio)
        print(f"zoo of {key['n']} models ({key['n_backdoored']} backdoored) in {args.out}, "
              f"built in {key['seconds']:.0f} s")
        print(f"answer key: {key_path} (mode 0600) -- keep it away from the students")
    elif args.command == "grade":
        if Path(args.submission).is_dir():
            results, errors = class_leaderboard(args.key, args.submission)
            if results:
                print(format_leaderboard(results))
            for line in errors:
                print(line, file=sys.stderr)
            if not results:
                raise ValueError(f"none of the {len(errors)} submissions in {args.submission} could be graded")
        else:
            print(leaderboard_line(grade(args.key, args.submission), args.name))
    elif args.command == "zoo-reference":
        load_manifest(args.zoo)  # a zoo folder, before anything is scanned
        out = check_writable(args.out)  # a folder, an unwritable place: refused here
        if out.exists() or out.is_symlink():
            raise ValueError(f"--out {out} already exists; submissions are never overwritten, choose another --out")
        t = time.perf_counter()
        reference_submission(args.zoo, args.out, steps=args.steps, seed=args.seed, device=args.device,
                             root=args.data_root, progress=not args.quiet)
        print(f"submission written to {args.out} in {time.perf_counter() - t:.0f} s")
