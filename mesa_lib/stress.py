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
clean accuracy and the target's recall. Neural Cleanse is left out (its 10-class mask search
costs about as much as the rest of a line on one core). MESA's samples are read per
sub-model: which implanted patterns they hit, exactly or within one pixel (:func:`mode_coverage`).

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
from .evaluate import FIRE_THRESHOLD, attack_success_rate, clean_accuracy, residual_summary, residual_valid_set, target_recall
from .mesa import train_mesa
from .pipeline import (_defend, _point_search, detect_target, get_backdoored_model, get_clean_model, pick_device,
                       protocols, provenance)
from .presets import Preset, get_preset
from .sweep import SweepLock, append_line, bootstrap_ci, read_finished, sign_test
from .triggers import (FixedTrigger, MultiTrigger, UniformNoiseTrigger, bright_member, canonical_patterns,
                       patterns_tensor)

__all__ = ["MIN_DISTANCE", "STRESS_ARMS", "hamming", "pattern_sets", "binary_ids", "mode_coverage",
           "run_stress_line", "run_stress", "load_stress", "arm_table", "paired", "add_cli", "run_cli"]

MIN_DISTANCE = 5
"""Least Hamming distance between two triggers of a pattern-set: more than half of the 9
pixels differ (two bright members are at most 8 apart)."""

STRESS_ARMS = {"mesa": "MESA", "point": "point, best start", "point_median": "point, median start",
               "point_worst": "point, worst start", "random": "random patches (control)",
               "oracle": "oracle (all implanted triggers)"}
"""The defenses of a stress line. The point starts are ranked by the defender's own score (ASR
on the held-out check part): best = top, median = the start ranked ``n // 2`` from the bottom
(for 4 starts the second best: an actual start, not an average), worst = bottom."""


def hamming(a: int, b: int) -> int:
    """Pixels in which two 3x3 pattern ids differ."""
    return bin(int(a) ^ int(b)).count("1")


def pattern_sets(k: int, n: int, seed: int = 0, min_distance: int = MIN_DISTANCE) -> list[tuple[int, ...]]:
    """``n`` seeded pattern-sets of ``k`` stamped patterns (bright members of the 51 canonical
    classes), pairwise at least ``min_distance`` apart, drawn without repeats from all such sets."""
    if not 2 <= k <= MAX_K or n < 1:
        raise ValueError(f"a pattern-set has k >= 2 triggers, at most {MAX_K} (--k), and n >= 1 sets are drawn "
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
"""The most triggers one pattern-set implants (``--k``); at the default
:data:`MIN_DISTANCE` no 5 stamped patterns are pairwise far enough apart."""

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


def binary_ids(triggers: torch.Tensor) -> torch.Tensor:
    """The 9-bit pattern ids ``[N]`` of 1-channel 3x3 triggers ``[N, 1, 3, 3]``, each pixel
    rounded to black or white (pixels read row by row, first = most significant bit)."""
    bits = (triggers.detach().reshape(len(triggers), -1)[:, :9] > 0.5).long().cpu()
    return (bits << torch.arange(8, -1, -1)).sum(1)


def _distances(ids: torch.Tensor, implanted: Sequence[int]) -> torch.Tensor:
    """Hamming distance ``[N, k]`` of each id to each implanted pattern."""
    x = ids[:, None] ^ torch.tensor(list(implanted))[None, :]
    return sum(((x >> b) & 1) for b in range(9))


def mode_coverage(sampler, implanted: Sequence[int], fired: Sequence[int], n: int = 512, seed: int = 0) -> list[dict]:
    """Per MESA sub-model (one beta of the staircase): of ``n`` samples, binarised, the share
    that IS each implanted pattern (``exact``), that is within one pixel of it (``near``),
    the share inside the backdoored model's valid set (``in_valid``: patterns in ``fired``),
    and how many distinct patterns the samples are."""
    g = torch.Generator().manual_seed(seed)
    fired_set = torch.zeros(512, dtype=torch.bool)
    fired_set[list(fired)] = True
    out = []
    for i, beta in enumerate(sampler.betas):
        ids = binary_ids(sampler.sample_step(i, n, generator=g).cpu())
        d = _distances(ids, implanted)
        out.append({"beta": beta, "exact": (d == 0).float().mean(0).tolist(), "near": (d <= 1).float().mean(0).tolist(),
                    "in_valid": float(fired_set[ids].float().mean()), "distinct": int(ids.unique().numel())})
    return out


def _measure(model, splits: DatasetSplits, triggers: torch.Tensor, target: int, seed: int, fired: list) -> dict:
    """Clean accuracy, the target's recall, the ASR of EACH implanted trigger and the residual
    valid set (all 512 patterns), on the evaluation split."""
    asr = [attack_success_rate(model, splits.eval, t, target, seed=seed) for t in triggers]
    valid = residual_valid_set(model, splits.eval, target, seed=seed)
    return {"clean_acc": clean_accuracy(model, splits.eval), "target_recall": target_recall(model, splits.eval, target),
            "asr_each": asr, "implanted_firing": sum(a >= FIRE_THRESHOLD for a in asr),
            "residual": residual_summary(valid, fired),
            "fired_patterns": torch.nonzero(valid.cpu() >= FIRE_THRESHOLD).flatten().tolist()}


def run_stress_line(patterns: Sequence[int], splits: DatasetSplits, preset: Preset | str = "fast", seed: int = 0,
                    target: int = 0, index: int = 0, progress: bool = False, took_at: float = FIRE_THRESHOLD) -> dict:
    """One pattern-set: implant every pattern of ``patterns`` (as stamped, see
    :func:`pattern_sets`) for ``target``, check that each took (ASR >= ``took_at``, by default
    the 50% at which a pattern fires, on the evaluation split; if one did not, the line is
    recorded with ``status: "attack_failed"`` and no defense), then detect, search (MESA,
    point starts) and retrain every arm under the headline protocol."""
    preset = get_preset(preset).with_(second_ratio=None)
    t0, sec = time.perf_counter(), {}

    def lap(stage: str) -> None:
        sec[stage] = round(time.perf_counter() - t0 - sum(sec.values()), 1)

    pats = [int(p) for p in patterns]
    triggers = patterns_tensor(pats).expand(-1, splits.channels, -1, -1).to(splits.device)
    line: dict = {"pattern": index, "patterns": pats, "k": len(pats),
                  "config": {"setting": "multi", "patterns": pats, "k": len(pats), "target": target,
                             "min_distance": min(hamming(a, b) for a, b in itertools.combinations(pats, 2)),
                             **provenance(splits, preset, seed, splits.device), "host": socket.gethostname()}}
    clean = get_clean_model(splits, preset, seed, use_cache=True, progress=progress)
    lap("clean")
    backdoored = get_backdoored_model(clean, splits, triggers, target, preset, seed, use_cache=True, progress=progress)
    lap("attack")
    valid = residual_valid_set(backdoored, splits.eval, target, seed=seed)
    fired = torch.nonzero(valid.cpu() >= FIRE_THRESHOLD).flatten().tolist()
    line["clean"] = _measure(clean, splits, triggers, target, seed, fired)
    line["backdoored"] = _measure(backdoored, splits, triggers, target, seed, fired)
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
                           "coverage": mode_coverage(sampler, pats, fired, seed=seed)}
    lap("mesa")
    ps = _point_search(backdoored, search, check, defended, preset, seed, progress)
    ids = binary_ids(torch.tensor(ps["triggers"])[:, :1])
    ranked = sorted(range(len(ids)), key=lambda i: ps["check_asr"][i])
    chosen = {"point": ranked[-1], "point_median": ranked[len(ranked) // 2], "point_worst": ranked[0]}
    line["point_search"] = {"check_asr": ps["check_asr"], "ids": ids.tolist(), "chosen": chosen,
                            "distances": _distances(ids, pats).tolist(), "triggers": ps["triggers"]}
    lap("point_search")

    proto = protocols(preset)[0]
    arms = {"mesa": sampler, "oracle": MultiTrigger(triggers),
            "random": UniformNoiseTrigger(splits.channels, device=splits.device)}
    for name, smp in arms.items():
        line[name] = _measure(_defend(backdoored, splits, smp, proto, preset, seed, progress),
                              splits, triggers, target, seed, fired)
        lap(f"defense_{name}")
    points = torch.tensor(ps["triggers"], device=splits.device)
    line["point_starts"] = [_measure(_defend(backdoored, splits, FixedTrigger(points[i]), proto, preset, seed, progress),
                                     splits, triggers, target, seed, fired) for i in range(len(points))]
    for name, i in chosen.items():
        line[name] = line["point_starts"][i]
    lap("defense_points")
    line["protocol"] = {"name": proto.name, "ratio": proto.ratio, "epochs": proto.epochs, "lr": proto.lr,
                        "schedule": proto.schedule}
    line["status"] = "complete"
    line["seconds"] = {**sec, "total": round(time.perf_counter() - t0, 1)}
    line["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return line


_RESUME = ("code", "seed", "k", "preset", "target", "torch_threads", "min_distance_rule")


def run_stress(k: int, sets: int, out: str | Path, preset: Preset | str = "fast", seed: int = 0, target: int = 0,
               min_distance: int = MIN_DISTANCE, root: str | Path | None = None, device: str | None = None,
               progress: bool = True, splits: DatasetSplits | None = None,
               took_at: float = FIRE_THRESHOLD) -> list[dict]:
    """Run :func:`run_stress_line` for ``sets`` pattern-sets of ``k`` triggers, one JSON line
    each appended to ``out`` as soon as it is done; lines already in ``out`` are kept and skipped
    (a file made by other code or settings is refused)."""
    preset = get_preset(preset)
    out = check_writable(out)
    todo = pattern_sets(k, sets, seed, min_distance)  # bad k / sets: an error before any training
    read_finished(out, repair=False)  # not a stress file: refused before a lock is made beside it
    with SweepLock(out):
        done = read_finished(out)
        if splits is None:
            splits = load_dataset("fashion-mnist", root=root, device=pick_device(device))
        want = {"code": code_fingerprint(), "seed": seed, "k": k, "target": target,
                "preset": preset.with_(second_ratio=None).to_dict(), "torch_threads": torch.get_num_threads(),
                "min_distance_rule": min_distance}
        for key, line in done.items():
            cfg = line["config"]
            diff = [f for f in _RESUME if json.loads(json.dumps(cfg.get(f))) != json.loads(json.dumps(want[f]))]
            if diff:
                raise ValueError(f"{out} holds stress lines of other code or settings (set {key} differs in "
                                 f"{', '.join(diff)}); write to another --out")
        for i, pats in enumerate(todo):
            if i in done:
                continue
            line = run_stress_line(pats, splits, preset, seed, target, index=i, progress=False, took_at=took_at)
            line["config"]["min_distance_rule"] = min_distance
            append_line(out, json.loads(json.dumps(line)))
            done[i] = line
            if progress:
                b, m = line["backdoored"]["asr_each"], line.get("mesa", {}).get("asr_each")
                print(f"[{len(done)}/{sets}] set {pats}: backdoored ASR {[round(a, 3) for a in b]}, "
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
        rs = [l[arm] for l in lines]
        out[arm] = {"asr_each": [_quantiles([r["asr_each"][j] for r in rs]) for j in range(k)],
                    "implanted_firing": _quantiles([r["implanted_firing"] for r in rs]),
                    "fired": _quantiles([r["residual"]["fired"] for r in rs]),
                    "residual": _quantiles([r["residual"]["mean_fired_before"] for r in rs]),
                    "clean_acc": _quantiles([r["clean_acc"] for r in rs], worst_is_max=False)}
    return out


_METRICS = {"fired": lambda r: r["residual"]["fired"], "residual": lambda r: r["residual"]["mean_fired_before"],
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
    s.add_argument("--k", type=int, default=2, help=f"triggers implanted together, 2..{MAX_K} (default 2)")
    s.add_argument("--sets", type=int, default=8, help="pattern-sets, one line each (default 8)")
    s.add_argument("--min-distance", type=int, default=MIN_DISTANCE, help="least Hamming distance within a set")
    s.add_argument("--seed", type=_seed_type, default=0, help="experiment seed (default 0)")
    s.add_argument("--preset", default="fast", help="fast (default) or paper")
    s.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's)")
    s.add_argument("--out", default="results/stress_k2.jsonl", help="JSONL file, one line per pattern-set "
                   "(appended to: rerun to resume; never replaced)")
    s.add_argument("--data-root", default=None, help="directory holding Fashion-MNIST (default: search)")
    s.add_argument("--quiet", action="store_true", help="no log lines")


def run_cli(args) -> None:
    """Run the ``stress`` subcommand (bad settings raise ``ValueError`` before any training)."""
    from .cli import _warn_paper_on_cpu

    check_writable(args.out)
    preset = get_preset(args.preset)
    pattern_sets(args.k, args.sets, args.seed, args.min_distance)
    read_finished(args.out, repair=False)  # a file that is not a stress file: refused before any work
    with torch_threads(args.threads):
        _warn_paper_on_cpu(preset.name, "fashion-mnist", None)
        lines = run_stress(args.k, args.sets, args.out, args.preset, args.seed, min_distance=args.min_distance,
                           root=args.data_root, progress=not args.quiet)
    print(f"{len(lines)} stress lines in {args.out}")
