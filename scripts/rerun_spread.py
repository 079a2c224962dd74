"""Measure how far re-runs of committed sweep lines land from them, and write the tolerance
that chapter 9's live check allows (``book/results/rerun_spread.json``).

Re-run a few patterns of the committed file into other files -- once with the committed
thread count, once with another -- each from an empty model cache, e.g.::

    MESA_CACHE_DIR=$(mktemp -d) python -m mesa_lib sweep --light --patterns 0,170 \\
        --workers 2 --out /tmp/rerun-1thread.jsonl
    MESA_CACHE_DIR=$(mktemp -d) python -m mesa_lib sweep --light --patterns 0,170 --out /tmp/rerun-2threads.jsonl

then::

    python scripts/rerun_spread.py book/results/sweep_fashion-mnist_fast.jsonl \\
        /tmp/rerun-1thread.jsonl /tmp/rerun-2threads.jsonl --out book/results/rerun_spread.json

The tolerance is the largest deviation of any ASR or clean accuracy over all re-runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mesa_lib.common import atomic_write_text  # noqa: E402
from mesa_lib.sweep import METHODS, load_sweep  # noqa: E402


def deviations(committed: list[dict], rerun: list[dict]) -> dict[int, float]:
    """Per pattern of ``rerun``: the largest |difference| of any ASR, clean accuracy or residual
    (of every model the re-run has: a ``--light`` re-run has the headline arms only)."""
    ref = {l["pattern"]: l for l in committed}
    out = {}
    for line in rerun:
        old = ref[line["pattern"]]
        keys = [k for k in METHODS if k in line and k in old]
        devs = [abs(line[k][q] - old[k][q]) for k in keys for q in ("asr", "clean_acc")]
        devs += [abs(line[k]["residual"]["mean_fired_before"] - old[k]["residual"]["mean_fired_before"])
                 for k in keys if "residual" in line[k] and "residual" in old[k]]
        devs += [abs(a["asr"] - b["asr"]) for a, b in zip(line.get("point_starts", []), old.get("point_starts", []))]
        out[line["pattern"]] = max(devs)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("committed", type=Path)
    ap.add_argument("reruns", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    committed = load_sweep(args.committed)
    runs = []
    for path in args.reruns:
        lines = load_sweep(path)
        dev = deviations(committed, lines)
        runs.append({"file": path.name, "torch_threads": sorted({l["config"]["torch_threads"] for l in lines}),
                     "code": sorted({str(l["config"].get("code")) for l in lines}),
                     "committed_threads": sorted({l["config"]["torch_threads"] for l in committed
                                                  if l["pattern"] in dev}),
                     "deviation": {str(k): v for k, v in dev.items()}})
    result = {"committed": args.committed.name, "code": sorted({l["config"]["code"] for l in committed}),
              "git": sorted({l["config"]["git"]["commit"] for l in committed}), "reruns": runs,
              "max_deviation": max(v for r in runs for v in r["deviation"].values()),
              "how": "scripts/rerun_spread.py; see its docstring for the commands"}
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
