"""Where one trigger is not enough: several triggers implanted for one target.

The sweep (:mod:`mesa_lib.sweep`) attacks with ONE 3x3 pattern, and on Fashion-MNIST
retraining against any one valid trigger removes the whole valid set. This experiment
implants ``k`` dissimilar patterns together (each poisoned image gets one of them, see
:class:`~mesa_lib.triggers.MultiTrigger`), so that the valid set has ``k`` modes: a point
search finds one of them, and the question is whether retraining on it removes the others,
and whether MESA's distribution covers them all.

One line per pattern-set, with the same stages as a light sweep line (the cached clean
model, the attack, the detection scan, MESA, the point starts, the oracle -- here all ``k``
triggers -- and the random-patch control, retrained under the headline protocol), and per
arm the ASR of EACH implanted trigger, the residual valid set over all 512 binary patterns,
clean accuracy and the target's recall. Neural Cleanse is an arm too (a mask and pattern
reversed per class on the defender's search half; the class it flags is unlearnt, as in the
sweep). MESA's samples are read per sub-model: which implanted triggers they hit, exactly or
nearly (:func:`mode_coverage`).

Three levers make the test harder than the sweep's one binary pattern:

- ``k`` dissimilar binary patterns implanted together (the valid set has ``k`` modes);
- grey-level triggers (:func:`grey_sets`: values drawn uniformly in [0, 1]), whose valid set
  is a region, not a list: besides the 512 binary patterns, each arm is measured on a dense
  held-out sample of :data:`REGION_SAMPLES` grey patches within :data:`REGION_RADIUS` per
  pixel of the implanted triggers (:func:`region_sample`);
- a stronger backdoor (the preset's ``poison_ratio`` and ``attack_epochs`` raised) or a weaker
  retraining (the preset's second protocol instead of the headline one).

Pattern-sets (:func:`pattern_sets`) are drawn, seeded, from the 51 patterns the sweep stamps
(the bright member of each canonical class): ``k`` of them, pairwise at least
:data:`MIN_DISTANCE` pixels apart. Bright members are never each other's colour inverse (an
inverse has at most 4 white pixels), and distinct canonical classes are never rotations or
mirror images of each other, so no two triggers of a set are the same trigger seen another way.

The file is resumable: lines already in it (same code, seed, k and preset) are skipped.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch

from .attack import inject_backdoor
from .common import check_writable, code_fingerprint, median, torch_threads
from .data import DatasetSplits, load_dataset
from .detect import defender_halves
from .evaluate import (FIRE_THRESHOLD, attack_success_rate, clean_accuracy, residual_summary, residual_valid_set,
                       target_recall)
from .mesa import train_mesa
from .pipeline import (_defend, _point_search, detect_target, get_backdoored_model, get_clean_model, pick_device,
                       protocols, provenance)
from .presets import Preset, get_preset
from .validate import finite_number
from .neural_cleanse import detect_backdoor, reverse_engineer_masks, unlearn
from .sweep import NC_CONFIGS, SweepLock, append_line, bootstrap_ci, read_finished, sign_test
from .triggers import (FixedTrigger, MultiTrigger, UniformNoiseTrigger, bright_member, canonical_patterns,
                       patterns_tensor)

__all__ = ["MIN_DISTANCE", "REGION_RADIUS", "REGION_SAMPLES", "STRESS_ARMS", "hamming", "pattern_sets", "grey_sets",
           "region_sample", "binary_ids", "mode_coverage", "setting_label", "run_stress_line", "run_stress",
           "load_stress", "arm_table", "paired", "add_cli", "run_cli"]

MIN_DISTANCE = 5
"""Least Hamming distance between two triggers of a pattern-set: more than half of the 9
pixels differ (two bright members are at most 8 apart)."""

STRESS_ARMS = {"mesa": "MESA", "point": "point, best start", "point_median": "point, median start",
               "point_worst": "point, worst start", "random": "random patches (control)",
               "nc": "Neural Cleanse", "oracle": "oracle (all implanted triggers)"}
"""The defenses of a stress line. The point starts are ranked by the defender's own score (ASR
on the held-out check part): best = top, median = the start ranked ``n // 2`` from the bottom
(for 4 starts the second best: an actual start, not an average), worst = bottom."""


def hamming(a: int, b: int) -> int:
    """Pixels in which two 3x3 pattern ids differ."""
    return bin(int(a) ^ int(b)).count("1")


REGION_RADIUS = 0.25
"""Half-width, per pixel, of the grey region sampled around each implanted grey trigger."""

REGION_SAMPLES = 512
"""Grey patches in the held-out region sample (as many as there are binary patterns)."""

_GREY_SEED = 7_000
"""Offset of the grey triggers' generator from the experiment seed (the region sample uses
``seed + _GREY_SEED + 1``): the triggers never share a stream with training."""


def pattern_sets(k: int, n: int, seed: int = 0, min_distance: int = MIN_DISTANCE) -> list[tuple[int, ...]]:
    """``n`` seeded pattern-sets of ``k`` stamped patterns (bright members of the 51 canonical
    classes), pairwise at least ``min_distance`` apart, drawn without repeats from all such sets."""
    if not 1 <= k <= MAX_K or n < 1:
        raise ValueError(f"a pattern-set has k >= 1 triggers, at most {MAX_K} (--k), and n >= 1 sets are drawn "
                         f"(--sets), got k={k}, n={n}")
    if not 1 <= min_distance <= 9:
        raise ValueError(f"--min-distance must be 1..9 (pixels of a 3x3 pattern that differ), got {min_distance}")
    bright = sorted(bright_member(c) for c in canonical_patterns())
    every = _spread_sets(bright, k, min_distance)
    if len(every) < n:
        raise ValueError(f"only {len(every)} sets of {k} patterns are {min_distance}+ pixels apart; ask for fewer "
                         "sets or a smaller --min-distance")
    order = torch.randperm(len(every), generator=torch.Generator().manual_seed(seed))[:n]
    return [every[int(i)] for i in order]


MAX_K = 4
"""The most triggers one set implants (``--k``); at the default :data:`MIN_DISTANCE` no 5
stamped patterns are pairwise far enough apart."""

MAX_SETS_ENUMERATED = 1_000_000
"""The most candidate pattern-sets :func:`pattern_sets` lists before it refuses the settings."""


def _spread_sets(patterns: Sequence[int], k: int, min_distance: int) -> list[tuple[int, ...]]:
    """Every ``k``-subset of ``patterns`` (in ``itertools.combinations`` order) whose members
    are pairwise at least ``min_distance`` apart, found depth first with pruning.

    Raises:
        ValueError: more than :data:`MAX_SETS_ENUMERATED` such sets.
    """
    found: list[tuple[int, ...]] = []

    def grow(chosen: list[int], start: int) -> None:
        if len(chosen) == k:
            found.append(tuple(chosen))
            if len(found) > MAX_SETS_ENUMERATED:
                raise ValueError(f"over {MAX_SETS_ENUMERATED:,} sets of {k} patterns are {min_distance}+ pixels "
                                 "apart; raise --min-distance or lower --k")
            return
        for i in range(start, len(patterns) - (k - len(chosen)) + 1):
            p = patterns[i]
            if all(hamming(p, q) >= min_distance for q in chosen):
                grow(chosen + [p], i + 1)

    grow([], 0)
    return found


def grey_sets(k: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` seeded sets of ``k`` grey-level 1-channel 3x3 triggers ``[k, 1, 3, 3]``, every pixel
    drawn uniformly in [0, 1] (set ``i`` is the same whatever ``n``)."""
    if not 1 <= k <= MAX_K or n < 1:
        raise ValueError(f"a grey set has k >= 1 triggers, at most {MAX_K} (--k), and n >= 1 sets are drawn "
                         f"(--sets), got k={k}, n={n}")
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + _GREY_SEED + 1009 * i)
        out.append(torch.rand(k, 1, 3, 3, generator=g))
    return out


def region_sample(triggers: torch.Tensor, n: int = REGION_SAMPLES, radius: float = REGION_RADIUS,
                  seed: int = 0) -> torch.Tensor:
    """A held-out sample ``[n, C, 3, 3]`` of the grey region around ``triggers`` ``[k, C, 3, 3]``:
    ``n // k`` (the first ones one more) patches per trigger, each pixel moved uniformly within
    ``radius`` and clamped to [0, 1]. Drawn on its own generator, never seen by a defense."""
    k = len(triggers)
    g = torch.Generator().manual_seed(seed + _GREY_SEED + 1)
    base = triggers.cpu()[torch.arange(n) % k]
    noise = (torch.rand(base.shape, generator=g) * 2 - 1) * radius
    return (base + noise).clamp(0, 1)


def _linf(samples: torch.Tensor, triggers: torch.Tensor) -> torch.Tensor:
    """Largest per-pixel distance ``[N, k]`` of each sample to each trigger (first channel)."""
    a = samples.detach().cpu()[:, :1].reshape(len(samples), -1)
    b = triggers.detach().cpu()[:, :1].reshape(len(triggers), -1)
    return (a[:, None, :] - b[None, :, :]).abs().amax(-1)


def setting_label(config: dict) -> str:
    """A short name for a stress line's setting, from its recorded config (e.g. ``k = 2``,
    ``k = 1, grey``, ``k = 2, poison 30%, 3 attack epochs``, ``k = 2, second protocol``)."""
    parts = [f"k = {config['k']}"]
    if config.get("trigger_kind") == "grey":
        parts.append("grey")
    p, base = config["preset"], get_preset(config["preset"]["name"])
    if p["poison_ratio"] != base.poison_ratio or p["attack_epochs"] != base.attack_epochs:
        parts.append(f"poison {p['poison_ratio']:.0%}, {p['attack_epochs']:g} attack epochs")
    if config.get("protocol", "headline") != "headline":
        parts.append(f"{config['protocol']} protocol")
    return ", ".join(parts)


def binary_ids(triggers: torch.Tensor) -> torch.Tensor:
    """The 9-bit pattern ids ``[N]`` of 1-channel 3x3 triggers ``[N, 1, 3, 3]``, each pixel
    rounded to black or white (pixels read row by row, first = most significant bit)."""
    bits = (triggers.detach().reshape(len(triggers), -1)[:, :9] > 0.5).long().cpu()
    return (bits << torch.arange(8, -1, -1)).sum(1)


def _distances(ids: torch.Tensor, implanted: Sequence[int]) -> torch.Tensor:
    """Hamming distance ``[N, k]`` of each id to each implanted pattern."""
    x = ids[:, None] ^ torch.tensor(list(implanted))[None, :]
    return sum(((x >> b) & 1) for b in range(9))


def mode_coverage(sampler, implanted: Sequence[int] | torch.Tensor, fired: Sequence[int], n: int = 512,
                  seed: int = 0) -> list[dict]:
    """Per MESA sub-model (one beta of the staircase), of ``n`` samples: for binary implanted
    patterns (ids), the share of the binarised samples that IS each pattern (``exact``) and that
    is within one pixel of it (``near``); for grey implanted triggers (a tensor ``[k, C, 3, 3]``),
    the share within 0.1 (``exact``) and within :data:`REGION_RADIUS` (``near``) of each, per
    pixel. Also the share of binarised samples inside the backdoored model's binary valid set
    (``in_valid``: patterns in ``fired``) and how many distinct binary patterns they are."""
    g = torch.Generator().manual_seed(seed)
    fired_set = torch.zeros(512, dtype=torch.bool)
    fired_set[list(fired)] = True
    out = []
    for i, beta in enumerate(sampler.betas):
        x = sampler.sample_step(i, n, generator=g).cpu()
        ids = binary_ids(x)
        if isinstance(implanted, torch.Tensor):
            d = _linf(x, implanted)
            exact, near = (d <= 0.1), (d <= REGION_RADIUS)
        else:
            d = _distances(ids, implanted)
            exact, near = (d == 0), (d <= 1)
        out.append({"beta": beta, "exact": exact.float().mean(0).tolist(), "near": near.float().mean(0).tolist(),
                    "in_valid": float(fired_set[ids].float().mean()), "distinct": int(ids.unique().numel())})
    return out


def _measure(model, splits: DatasetSplits, triggers: torch.Tensor, target: int, seed: int, fired: list,
             region: torch.Tensor | None = None, region_fired: list | None = None) -> dict:
    """Clean accuracy, the target's recall, the ASR of EACH implanted trigger and the residual
    valid set (all 512 binary patterns), on the evaluation split; for grey triggers also the
    residual over the held-out ``region`` sample (``region_fired``: its patches that fired on
    the backdoored model)."""
    asr = [attack_success_rate(model, splits.eval, t, target, seed=seed) for t in triggers]
    valid = residual_valid_set(model, splits.eval, target, seed=seed)
    out = {"clean_acc": clean_accuracy(model, splits.eval), "target_recall": target_recall(model, splits.eval, target),
           "asr_each": asr, "implanted_firing": sum(a >= FIRE_THRESHOLD for a in asr),
           "residual": residual_summary(valid, fired),
           "fired_patterns": torch.nonzero(valid.cpu() >= FIRE_THRESHOLD).flatten().tolist()}
    if region is not None:
        r = residual_valid_set(model, splits.eval, target, seed=seed, triggers=region).cpu()
        out["region"] = residual_summary(r, region_fired if region_fired is not None else
                                         torch.nonzero(r >= FIRE_THRESHOLD).flatten().tolist())
    return out


def run_stress_line(patterns: Sequence[int] | torch.Tensor, splits: DatasetSplits, preset: Preset | str = "fast",
                    seed: int = 0, target: int = 0, index: int = 0, progress: bool = False,
                    took_at: float = FIRE_THRESHOLD, protocol: str = "headline", nc: bool = True) -> dict:
    """One set of implanted triggers: ``patterns`` are binary pattern ids (stamped as
    :func:`pattern_sets` draws them) or a tensor ``[k, 1, 3, 3]`` of grey triggers
    (:func:`grey_sets`). Implant them all for ``target``, check that each took (ASR >=
    ``took_at``, by default the 50% at which a pattern fires, on the evaluation split; if one
    did not, the line is recorded with ``status: "attack_failed"`` and no defense), then
    detect, search (MESA, point starts, Neural Cleanse unless ``nc=False``) and retrain every
    arm under the preset's ``protocol`` (``"headline"`` or ``"second"``)."""
    preset = get_preset(preset)
    protos = {p.name: p for p in protocols(preset)}
    if protocol not in protos:
        raise ValueError(f"protocol must be one of {sorted(protos)} for this preset, got {protocol!r}")
    proto = protos[protocol]
    preset = preset.with_(second_ratio=None) if protocol == "headline" else preset
    t0, sec = time.perf_counter(), {}

    def lap(stage: str) -> None:
        sec[stage] = round(time.perf_counter() - t0 - sum(sec.values()), 1)

    grey = isinstance(patterns, torch.Tensor)
    if grey:
        if patterns.dim() != 4 or tuple(patterns.shape[1:]) != (1, 3, 3):
            raise ValueError(f"grey triggers must be [k, 1, 3, 3], got {tuple(patterns.shape)}")
        triggers, pats = patterns.float().clamp(0, 1), None
        spacing = (min(float(_linf(triggers[i:i + 1], triggers[j:j + 1])) for i, j in
                       itertools.combinations(range(len(triggers)), 2)) if len(triggers) > 1 else None)
    else:
        pats = [int(p) for p in patterns]
        triggers = patterns_tensor(pats)
        spacing = min((hamming(a, b) for a, b in itertools.combinations(pats, 2)), default=None)
    k = len(triggers)
    triggers = triggers.expand(-1, splits.channels, -1, -1).to(splits.device)
    line: dict = {"pattern": index, "patterns": pats, "k": k,
                  "config": {"setting": "grey" if grey else "multi", "trigger_kind": "grey" if grey else "binary",
                             "patterns": pats, "k": k, "target": target, "min_distance": spacing,
                             "protocol": protocol, "nc": nc,
                             **provenance(splits, preset, seed, splits.device), "host": socket.gethostname()}}
    if grey:
        line["triggers"] = triggers[:, :1].cpu().tolist()
    region = region_sample(triggers[:, :1], seed=seed) if grey else None
    clean = get_clean_model(splits, preset, seed, use_cache=True, progress=progress)
    lap("clean")
    backdoored = get_backdoored_model(clean, splits, triggers, target, preset, seed, use_cache=True, progress=progress)
    lap("attack")
    valid = residual_valid_set(backdoored, splits.eval, target, seed=seed)
    fired = torch.nonzero(valid.cpu() >= FIRE_THRESHOLD).flatten().tolist()
    region_fired = None
    if grey:
        r = residual_valid_set(backdoored, splits.eval, target, seed=seed, triggers=region).cpu()
        region_fired = torch.nonzero(r >= FIRE_THRESHOLD).flatten().tolist()

    def measure(model) -> dict:
        return _measure(model, splits, triggers, target, seed, fired, region, region_fired)

    line["clean"] = measure(clean)
    line["backdoored"] = measure(backdoored)
    took = [a >= took_at for a in line["backdoored"]["asr_each"]]
    line["took"] = took
    lap("measure_attack")
    if not all(took):
        line["status"] = "attack_failed"
        line["seconds"] = {**sec, "total": round(time.perf_counter() - t0, 1)}
        return line

    search, check = defender_halves(splits.model, seed)
    line["detection"] = detect_target(backdoored, search, check, preset, seed, progress)
    defended = line["detection"]["detected_target"]
    line["defended_target"], line["target_detected"] = defended, defended == target
    lap("detection")
    sampler, history = train_mesa(backdoored, splits.model, defended, preset.mesa, seed=seed, progress=progress)
    line["mesa_search"] = {"final_mi": history["mi"][-1] if history["mi"] else None,
                           "coverage": mode_coverage(sampler, triggers[:, :1] if grey else pats, fired, seed=seed)}
    lap("mesa")
    ps = _point_search(backdoored, search, check, defended, preset, seed, progress)
    starts = torch.tensor(ps["triggers"])
    ids = binary_ids(starts[:, :1])
    ranked = sorted(range(len(ids)), key=lambda i: ps["check_asr"][i])
    chosen = {"point": ranked[-1], "point_median": ranked[len(ranked) // 2], "point_worst": ranked[0]}
    dist = _linf(starts, triggers[:, :1]) if grey else _distances(ids, pats)
    line["point_search"] = {"check_asr": ps["check_asr"], "ids": ids.tolist(), "chosen": chosen,
                            "distances": dist.tolist(), "triggers": ps["triggers"]}
    lap("point_search")

    arms = {"mesa": sampler, "oracle": MultiTrigger(triggers),
            "random": UniformNoiseTrigger(splits.channels, device=splits.device)}
    for name, smp in arms.items():
        line[name] = measure(_defend(backdoored, splits, smp, proto, preset, seed, progress))
        lap(f"defense_{name}")
    points = starts.to(splits.device)
    line["point_starts"] = [measure(_defend(backdoored, splits, FixedTrigger(points[i]), proto, preset, seed, progress))
                            for i in range(len(points))]
    for name, i in chosen.items():
        line[name] = line["point_starts"][i]
    lap("defense_points")
    if nc:  # as the sweep's nc_stage: reverse per class on the search half, unlearn the class NC flags
        rev = reverse_engineer_masks(backdoored, search, NC_CONFIGS.get(preset.name, NC_CONFIGS["fast"]), seed=seed,
                                     progress=progress)
        det = detect_backdoor(rev).to_dict()
        cls = det["detected_target"]
        line["nc_detection"] = det
        line["nc"] = measure(unlearn(backdoored, splits.model, rev.masks[cls], rev.patterns[cls], ratio=proto.ratio,
                                     epochs=proto.epochs, lr=proto.lr, batch_size=preset.batch_size, seed=seed + 2,
                                     progress=progress, schedule=proto.schedule))
        lap("nc")
    line["protocol"] = {"name": proto.name, "ratio": proto.ratio, "epochs": proto.epochs, "lr": proto.lr,
                        "schedule": proto.schedule}
    line["status"] = "complete"
    line["seconds"] = {**sec, "total": round(time.perf_counter() - t0, 1)}
    line["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return line


_RESUME = ("code", "seed", "k", "preset", "target", "torch_threads", "min_distance_rule", "trigger_kind", "protocol",
           "nc")


def run_stress(k: int, sets: int, out: str | Path, preset: Preset | str = "fast", seed: int = 0, target: int = 0,
               min_distance: int = MIN_DISTANCE, root: str | Path | None = None, device: str | None = None,
               progress: bool = True, splits: DatasetSplits | None = None,
               took_at: float = FIRE_THRESHOLD, grey: bool = False, protocol: str = "headline",
               nc: bool = True) -> list[dict]:
    """Run :func:`run_stress_line` for ``sets`` sets of ``k`` triggers (binary pattern-sets, or
    grey triggers with ``grey=True``), one JSON line each appended to ``out`` as soon as it is
    done; lines already in ``out`` are kept and skipped (a file made by other code or settings
    is refused)."""
    preset = get_preset(preset)
    if protocol not in {p.name for p in protocols(preset)}:
        raise ValueError(f"protocol must be one of {[p.name for p in protocols(preset)]}, got {protocol!r}")
    out = check_writable(out)
    # bad k / sets: an error before any training
    todo = grey_sets(k, sets, seed) if grey else pattern_sets(k, sets, seed, min_distance)
    read_finished(out, repair=False)  # not a stress file: refused before a lock is made beside it
    with SweepLock(out):
        done = read_finished(out)
        if splits is None:
            splits = load_dataset("fashion-mnist", root=root, device=pick_device(device))
        want = {"code": code_fingerprint(), "seed": seed, "k": k, "target": target,
                "preset": (preset.with_(second_ratio=None) if protocol == "headline" else preset).to_dict(),
                "torch_threads": torch.get_num_threads(), "min_distance_rule": None if grey else min_distance,
                "trigger_kind": "grey" if grey else "binary", "protocol": protocol, "nc": nc}
        for key, line in done.items():
            cfg = line["config"]
            diff = [f for f in _RESUME if json.loads(json.dumps(cfg.get(f))) != json.loads(json.dumps(want[f]))]
            if diff:
                raise ValueError(f"{out} holds stress lines of other code or settings (set {key} differs in "
                                 f"{', '.join(diff)}); write to another --out")
        for i, pats in enumerate(todo):
            if i in done:
                continue
            line = run_stress_line(pats, splits, preset, seed, target, index=i, progress=False, took_at=took_at,
                                   protocol=protocol, nc=nc)
            line["config"]["min_distance_rule"] = want["min_distance_rule"]
            append_line(out, json.loads(json.dumps(line)))
            done[i] = line
            if progress:
                b, m = line["backdoored"]["asr_each"], line.get("mesa", {}).get("asr_each")
                name = [round(v, 2) for v in pats.flatten().tolist()] if grey else list(pats)
                print(f"[{len(done)}/{sets}] set {name}: backdoored ASR {[round(a, 3) for a in b]}, "
                      f"MESA {m and [round(a, 3) for a in m]}, {line['status']} ({line['seconds']['total']:.0f} s)",
                      flush=True)
    return [done[i] for i in range(len(todo))]


# ---------------------------------------------------------------- reading results


def load_stress(path: str | Path) -> list[dict]:
    """The finished lines of a stress file, by set index (the file is not modified)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no stress results at {path}; run `python -m mesa_lib stress --out {path}` first")
    done = read_finished(path, repair=False)
    return [done[i] for i in sorted(done)]


def _quantiles(values: Sequence[float], worst_is_max: bool = True) -> dict:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return {"median": float(median(t)),
            "worst": float(t.max() if worst_is_max else t.min()), "mean": float(t.mean())}


def arm_table(lines: Sequence[dict]) -> dict:
    """Per arm (and the clean and backdoored models) over the complete lines: each implanted
    trigger's ASR (by its place in the set), the implanted triggers still firing, the
    patterns that fire, the mean ASR over the backdoored model's valid set, and clean
    accuracy, each as median / worst / mean over pattern-sets."""
    lines = [l for l in lines if l.get("status") == "complete"]
    if not lines:
        raise ValueError("no complete stress lines to summarise")
    k = lines[0]["k"]
    out = {}
    for arm in ("clean", "backdoored", *STRESS_ARMS):
        if not all(arm in l for l in lines):  # e.g. Neural Cleanse in a run made with nc=False
            continue
        rs = [l[arm] for l in lines]
        out[arm] = {"asr_each": [_quantiles([r["asr_each"][j] for r in rs]) for j in range(k)],
                    "implanted_firing": _quantiles([r["implanted_firing"] for r in rs]),
                    "fired": _quantiles([r["residual"]["fired"] for r in rs]),
                    "residual": _quantiles([r["residual"]["mean_fired_before"] for r in rs]),
                    "clean_acc": _quantiles([r["clean_acc"] for r in rs], worst_is_max=False)}
        if all("region" in r for r in rs):
            out[arm]["region_fired"] = _quantiles([r["region"]["fired"] for r in rs])
            out[arm]["region_residual"] = _quantiles([r["region"]["mean_fired_before"] for r in rs])
    return out


_METRICS = {"fired": lambda r: r["residual"]["fired"], "residual": lambda r: r["residual"]["mean_fired_before"],
            "region_fired": lambda r: r["region"]["fired"],
            "region_residual": lambda r: r["region"]["mean_fired_before"],
            "max_implanted_asr": lambda r: max(r["asr_each"]), "clean_acc": lambda r: r["clean_acc"]}


def paired(lines: Sequence[dict], arm: str, metric: str = "residual", against: str = "mesa") -> dict:
    """MESA (``against``) minus ``arm`` on one metric, paired by pattern-set: the mean
    difference, its bootstrap interval over pattern-sets and the exact sign test (``lower``
    counts the sets where ``against`` is lower)."""
    lines = [l for l in lines if l.get("status") == "complete"]
    a = [_METRICS[metric](l[against]) for l in lines]
    b = [_METRICS[metric](l[arm]) for l in lines]
    diff = [x - y for x, y in zip(a, b)]
    return {"metric": metric, "arm": arm, "n": len(diff), "mean_diff": sum(diff) / len(diff),
            "ci": bootstrap_ci(diff), **sign_test(a, b)}


# ---------------------------------------------------------------- command line


def add_cli(sub) -> None:
    """Register the ``stress`` subcommand."""
    from .cli import _positive, _seed_type

    s = sub.add_parser("stress", help="several triggers for one target: does one point cover them? (JSONL, resumable)")
    s.add_argument("--k", type=int, default=2, help=f"triggers implanted together, 1..{MAX_K} (default 2)")
    s.add_argument("--sets", type=int, default=8, help="pattern-sets, one line each (default 8)")
    s.add_argument("--min-distance", type=int, default=MIN_DISTANCE, help="least Hamming distance within a set")
    s.add_argument("--grey", action="store_true",
                   help="grey-level triggers (pixels uniform in [0, 1]) instead of binary pattern-sets")
    s.add_argument("--poison-ratio", type=float, default=None,
                   help="share of the attack's images poisoned (default: the preset's, 0.1 for fast)")
    s.add_argument("--attack-epochs", type=float, default=None,
                   help="epochs of poisoned fine-tuning (default: the preset's, 1 for fast)")
    s.add_argument("--protocol", default="headline", choices=("headline", "second"),
                   help="retraining protocol of every arm: the preset's headline one (default) or its second one")
    s.add_argument("--no-nc", action="store_true", help="leave the Neural Cleanse arm out")
    s.add_argument("--seed", type=_seed_type, default=0, help="experiment seed (default 0)")
    s.add_argument("--preset", default="fast", help="fast (default) or paper")
    s.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's)")
    s.add_argument("--out", default="results/stress_k2.jsonl", help="JSONL file, one line per pattern-set "
                   "(appended to: rerun to resume; never replaced)")
    s.add_argument("--data-root", default=None, help="directory holding Fashion-MNIST (default: search)")
    s.add_argument("--quiet", action="store_true", help="no log lines")


def cli_preset(args) -> Preset:
    """The preset of a ``stress`` command line, with its attack overrides checked (a ratio in
    (0, 1), a positive number of epochs) before any training."""
    preset = get_preset(args.preset)
    changes = {}
    if args.poison_ratio is not None:
        r = finite_number("--poison-ratio", args.poison_ratio, 0.0, strict=True)
        if r >= 1:
            raise ValueError(f"--poison-ratio must be in (0, 1), got {args.poison_ratio}")
        changes["poison_ratio"] = r
    if args.attack_epochs is not None:
        changes["attack_epochs"] = finite_number("--attack-epochs", args.attack_epochs, 0.0, strict=True)
    return preset.with_(**changes)


def run_cli(args) -> None:
    """Run the ``stress`` subcommand (bad settings raise ``ValueError`` before any training)."""
    from .cli import _warn_paper_on_cpu

    check_writable(args.out)
    preset = cli_preset(args)
    if args.grey:
        grey_sets(args.k, args.sets, args.seed)
    else:
        pattern_sets(args.k, args.sets, args.seed, args.min_distance)
    read_finished(args.out, repair=False)  # a file that is not a stress file: refused before any work
    with torch_threads(args.threads):
        _warn_paper_on_cpu(preset.name, "fashion-mnist", None)
        lines = run_stress(args.k, args.sets, args.out, preset, args.seed, min_distance=args.min_distance,
                           root=args.data_root, progress=not args.quiet, grey=args.grey, protocol=args.protocol,
                           nc=not args.no_nc)
    print(f"{len(lines)} stress lines in {args.out}")
