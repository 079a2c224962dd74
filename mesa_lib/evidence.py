"""Reading the sweep as evidence: the live check, paired statistics, and detect-then-defend.

Three things a reader of chapter 9 needs, kept apart from the sweep's running code:

- **The live check.** One sweep line is one draw: another seed, and equally another processor
  (CPU kernels sum in another order, and a few hundred SGD steps turn that into a different
  run), moves it. :func:`seed_tolerances` measures, per quantity, how far lines of the same
  pattern land apart across seeds; :func:`compare_lines` holds a re-derived line to the
  committed one quantity by quantity within that spread, and the detected class exactly.
- **Paired statistics.** :func:`paired` compares two arms on the same backdoored models:
  the mean paired difference with a bootstrap interval that resamples *patterns* (a pattern
  run at several seeds is one cluster, not several independent lines), the exact sign test
  over the per-pattern mean differences, and the practical side -- how many patterns still
  fire, how far above the clean floor.
- **Detect, then defend.** :func:`deployed` is what a defender who follows the book's rule
  gets: a model the rule does not flag is left as it is, so it keeps its backdoor.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch

from .sweep import arm_result, sign_test

__all__ = [
    "QUANTITIES",
    "PRACTICAL",
    "line_quantities",
    "seed_tolerances",
    "compare_lines",
    "cluster_bootstrap_ci",
    "paired",
    "deployed",
    "still_firing",
]

PRACTICAL = 0.01
"""The smallest difference in an ASR (or residual) that the book counts as mattering: one point,
the margin of the goals it set before the sweep ran (e.g. "MESA within 1 point of the oracle").
A statistically detectable difference below it is reported as detectable, not as mattering."""


def _sorted_starts(line: dict) -> list[float]:
    return sorted(s["asr"] for s in line["point_starts"])


QUANTITIES: dict[str, Callable[[dict], float]] = {
    **{f"{arm}.{metric}": (lambda line, arm=arm, metric=metric:
                           line[arm][metric] if metric != "residual" else line[arm]["residual"]["mean_fired_before"])
       for arm in ("clean", "backdoored", "mesa", "point", "oracle")
       for metric in ("clean_acc", "asr", "residual")},
    "point starts: lowest ASR": lambda line: _sorted_starts(line)[0],
    "point starts: highest ASR": lambda line: _sorted_starts(line)[-1],
}
"""The quantities of a (``--light``) sweep line that the live check compares, each a function of
the line: every light arm's clean accuracy, attacker's ASR and residual valid set, and the lowest
and highest ASR over the point starts after retraining (sorted, since a start's index carries no
meaning across runs). The detected class is compared exactly, apart from these."""


def line_quantities(line: dict) -> dict[str, float]:
    """The :data:`QUANTITIES` of one sweep line."""
    return {name: float(get(line)) for name, get in QUANTITIES.items()}


def seed_tolerances(lines_by_seed: Mapping[int, Sequence[dict]]) -> dict[str, dict]:
    """Per quantity, how far lines of the same pattern land apart across seeds.

    For every pattern present at every seed, the range (max - min) of each quantity over the
    seeds; the tolerance is the largest range over those patterns. Returns ``{quantity:
    {"tolerance", "pattern" (where the largest range was), "median" (over patterns)}}`` plus
    ``"_patterns"`` (the patterns used) and ``"_seeds"``.

    Raises:
        ValueError: fewer than two seeds, or no pattern common to all of them.
    """
    if len(lines_by_seed) < 2:
        raise ValueError(f"a spread across seeds needs at least two seeds, got {sorted(lines_by_seed)}")
    by_seed = {s: {l["pattern"]: l for l in ls} for s, ls in lines_by_seed.items()}
    common = sorted(set.intersection(*(set(d) for d in by_seed.values())))
    if not common:
        raise ValueError("no pattern was run at every seed")
    out: dict = {"_patterns": common, "_seeds": sorted(by_seed)}
    for name, get in QUANTITIES.items():
        ranges = []
        for p in common:
            values = [float(get(d[p])) for d in by_seed.values()]
            ranges.append((max(values) - min(values), p))
        ranges.sort()
        out[name] = {"tolerance": ranges[-1][0], "pattern": ranges[-1][1], "median": ranges[len(ranges) // 2][0]}
    return out


def compare_lines(committed: dict, rerun: dict, tolerances: Mapping[str, dict]) -> list[dict]:
    """Hold a re-derived line to the committed one: each :data:`QUANTITIES` entry within its
    tolerance (:func:`seed_tolerances`), and the detected class equal.

    Returns one row per quantity: ``{"quantity", "committed", "rerun", "deviation",
    "tolerance", "ok"}``; the detected class is the last row (tolerance 0).

    Raises:
        ValueError: the two lines are of different patterns, or a quantity has no tolerance.
    """
    if committed["pattern"] != rerun["pattern"]:
        raise ValueError(f"the lines are of patterns {committed['pattern']} and {rerun['pattern']}")
    missing = [q for q in QUANTITIES if q not in tolerances]
    if missing:
        raise ValueError(f"no tolerance for {missing}")
    a, b = line_quantities(committed), line_quantities(rerun)
    rows = []
    for q in QUANTITIES:
        dev = abs(a[q] - b[q])
        tol = float(tolerances[q]["tolerance"])
        rows.append({"quantity": q, "committed": a[q], "rerun": b[q], "deviation": dev, "tolerance": tol,
                     "ok": dev <= tol})
    ca, cb = committed["detection"]["detected_target"], rerun["detection"]["detected_target"]
    rows.append({"quantity": "detected class", "committed": ca, "rerun": cb, "deviation": float(ca != cb),
                 "tolerance": 0.0, "ok": ca == cb})
    return rows


def cluster_bootstrap_ci(values: Sequence[float], clusters: Sequence[object], level: float = 0.95,
                         n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval of the mean of ``values`` that resamples whole clusters
    (e.g. patterns, each run at several seeds) with replacement, ``n`` times, seeded: the mean
    of a resample is the mean over every value of the drawn clusters.

    Raises:
        ValueError: no values, or values and clusters of different lengths.
    """
    if len(values) != len(clusters):
        raise ValueError(f"{len(values)} values but {len(clusters)} cluster labels")
    if not len(values):
        raise ValueError("no values to bootstrap")
    keys = list(dict.fromkeys(clusters))
    index = {k: i for i, k in enumerate(keys)}
    ids = torch.tensor([index[c] for c in clusters])
    t = torch.as_tensor(values, dtype=torch.float64)
    sums = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, ids, t)
    counts = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, ids, torch.ones_like(t))
    g = torch.Generator().manual_seed(seed)
    draw = torch.randint(0, len(keys), (n, len(keys)), generator=g)
    means = sums[draw].sum(1) / counts[draw].sum(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def still_firing(result: dict) -> int:
    """How many binary patterns still fire (ASR >= the fire threshold) on a defended model."""
    return int(result["residual"]["fired"])


def _metric(result: dict, metric: str) -> float:
    if metric == "asr":
        return float(result["asr"])
    if metric == "residual":
        return float(result["residual"]["mean_fired_before"])
    raise ValueError(f"unknown metric {metric!r}; use 'asr' or 'residual'")


def deployed(line: dict, arm: str, protocol: str = "headline") -> dict | None:
    """An arm's result as a defender who follows the book's rule meets it: where the rule
    flagged the model (``line["detection"]["flagged"]``) the defended model's numbers, else the
    backdoored model's (nothing was defended, the backdoor stays). None where the line has no
    such arm."""
    res = arm_result(line, arm, protocol)
    if res is None or arm in ("backdoored", "clean"):
        return res
    return res if line["detection"].get("flagged") else line["backdoored"]


def paired(lines: Sequence[dict], arm_a: str, arm_b: str, metric: str = "asr", protocol: str = "headline",
           as_deployed: bool = False, level: float = 0.95, seed: int = 0) -> dict | None:
    """Compare two arms on the same backdoored models, clustered by pattern.

    Per line the difference ``a - b`` of ``metric`` (``"asr"``: the attacker's trigger;
    ``"residual"``: the mean ASR over the patterns that fired before the defense). A pattern
    present at several seeds is one cluster: the interval resamples patterns
    (:func:`cluster_bootstrap_ci`) and the sign test counts per-pattern mean differences.

    Returns ``{"n_lines", "n_patterns", "mean_diff", "ci", "lower", "higher", "ties", "p",
    "matters", "fire_a", "fire_b", "floor"...}`` where ``lower`` counts the patterns on which
    ``a`` is lower, ``matters`` says whether the whole interval lies beyond :data:`PRACTICAL`
    on one side and ``negligible`` whether it lies within it on both, ``fire_a`` / ``fire_b`` are the largest numbers of patterns still firing after
    each arm, and ``above_floor_a`` / ``_b`` the mean points above the clean model's floor of
    the same metric. None where some line lacks one of the arms.
    """
    get = deployed if as_deployed else arm_result
    pairs = [(l, get(l, arm_a, protocol), get(l, arm_b, protocol)) for l in lines]
    if not pairs or any(a is None or b is None for _, a, b in pairs):
        return None
    diffs = [_metric(a, metric) - _metric(b, metric) for _, a, b in pairs]
    clusters = [l["pattern"] for l, _, _ in pairs]
    per_pattern: dict = {}
    for c, d in zip(clusters, diffs):
        per_pattern.setdefault(c, []).append(d)
    means = [sum(v) / len(v) for v in per_pattern.values()]
    test = sign_test(means, [0.0] * len(means))
    lo, hi = cluster_bootstrap_ci(diffs, clusters, level=level, seed=seed)
    floor = [_metric(l["clean"], metric) for l, _, _ in pairs]
    return {
        "arm_a": arm_a, "arm_b": arm_b, "metric": metric, "protocol": protocol, "as_deployed": as_deployed,
        "n_lines": len(pairs), "n_patterns": len(per_pattern),
        "mean_diff": sum(diffs) / len(diffs), "ci": (lo, hi), "level": level,
        "lower": test["lower"], "higher": test["higher"], "ties": test["ties"], "p": test["p"],
        "matters": hi < -PRACTICAL or lo > PRACTICAL,
        "negligible": -PRACTICAL < lo and hi < PRACTICAL,
        "fire_a": max(still_firing(a) for _, a, _ in pairs if "residual" in a),
        "fire_b": max(still_firing(b) for _, _, b in pairs if "residual" in b),
        "above_floor_a": sum(_metric(a, metric) - f for (_, a, _), f in zip(pairs, floor)) / len(pairs),
        "above_floor_b": sum(_metric(b, metric) - f for (_, _, b), f in zip(pairs, floor)) / len(pairs),
    }


def verdict(t: dict, name_a: str, name_b: str) -> str:
    """One sentence of a :func:`paired` result that keeps the statistical and the practical
    apart: which arm is lower on how many patterns and with what p, the paired difference and
    its interval in points, and whether that difference matters (its whole interval beyond
    :data:`PRACTICAL`)."""
    lo, hi = (100 * x for x in t["ci"])
    what = "the attacker's ASR" if t["metric"] == "asr" else "the residual valid set"
    side = (f"{name_a} lower on {t['lower']} of {t['n_patterns']} patterns, {name_b} on {t['higher']}"
            + (f" ({t['ties']} tied)" if t["ties"] else ""))
    stat = (f"detectable (sign test p = {t['p']:.2g})" if t["p"] < 0.05 else
            f"not detectable (sign test p = {t['p']:.2g})")
    size = (f"mean difference {100 * t['mean_diff']:+.2f} points, {t['level']:.0%} interval "
            f"[{lo:+.2f}, {hi:+.2f}]")
    pts = f"{100 * PRACTICAL:.0f} point"
    matter = (f"a difference that matters (the whole interval lies beyond {pts})" if t["matters"] else
              f"too small to matter (the whole interval lies within {pts} of no difference)" if t["negligible"] else
              f"not shown to matter or not (the interval reaches both sides of {pts})")
    return f"On {what}: {side}; {stat}; {size}; {matter}."


def fire_count(results: Iterable[dict]) -> int:
    """How many of the given defended results leave at least one pattern firing."""
    return sum(still_firing(r) > 0 for r in results if "residual" in r)


__all__ += ["verdict", "fire_count"]
