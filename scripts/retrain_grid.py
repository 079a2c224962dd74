"""Measure the retraining grid that fixes the sweep's retraining protocol (chapter 8 shows it).

On pattern 170 (seed 0, the ``fast`` preset's clean and backdoored models) the backdoored
model is retrained with the TRUE trigger (the oracle: the best any trigger-based defense can
do) at each stamped ratio and learning rate for up to ``--epochs`` epochs; after every epoch
the attacker's ASR and the clean accuracy are measured on the evaluation split. The sweep's
protocol is the cheapest complete cosine-decayed run at the paper's 1% ratio whose oracle
comes within 1 point of the clean model's own floor (the constant-rate curves are shown for
comparison): a protocol calibration made once, with the oracle only,
never with the defense being compared. The cosine runs also retrain against uniform-noise
patches (the control that knows nothing of the backdoor). Writes ``book/results/retrain_grid.json``::

    MESA_CACHE_DIR=... python scripts/retrain_grid.py --out book/results/retrain_grid.json

With ``--held-out`` every run is scored on the defender's own data instead: the modelling split is
cut by :func:`mesa_lib.detect.defender_halves` into a retraining part (the search share) and a
held-out check part, the runs retrain on the first and are scored on the second, and the 2,000
evaluation images are never looked at. That is the file chapter 8 chooses the protocol from::

    MESA_CACHE_DIR=... python scripts/retrain_grid.py --held-out --lrs "" \
        --out book/results/retrain_grid_heldout.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mesa_lib.common import atomic_write_text, code_fingerprint, git_state  # noqa: E402
from mesa_lib.data import load_dataset  # noqa: E402
from mesa_lib.defense import retrain  # noqa: E402
from mesa_lib.detect import SEARCH_SHARE, defender_halves  # noqa: E402
from mesa_lib.evaluate import evaluate_model  # noqa: E402
from mesa_lib.pipeline import get_backdoored_model, get_clean_model, make_trigger  # noqa: E402
from mesa_lib.presets import get_preset  # noqa: E402
from mesa_lib.triggers import FixedTrigger, UniformNoiseTrigger  # noqa: E402

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="book/results/retrain_grid.json")
    ap.add_argument("--pattern", type=int, default=170)
    ap.add_argument("--ratios", default="0.01,0.5")
    ap.add_argument("--lrs", default="0.01,0.03,0.1")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--cosine-lrs", default="0.01,0.03,0.05,0.1", help="learning rates of the cosine runs at the first ratio")
    ap.add_argument("--cosine-epochs", default="3,5,10", help="lengths of the cosine runs (each its own run)")
    ap.add_argument("--held-out", action="store_true",
                    help="retrain on the defender's search share of the modelling split and score on its held-out "
                         "rest (never the evaluation split)")
    args = ap.parse_args(argv)
    preset = get_preset("fast")
    splits = load_dataset("fashion-mnist")
    trigger = make_trigger(splits, args.pattern)
    clean = get_clean_model(splits, preset, 0, progress=False)
    bd = get_backdoored_model(clean, splits, trigger, 0, preset, 0, progress=False)
    if args.held_out:
        train_on, score_on = defender_halves(splits.model, seed=0)
        scored = (f"held-out {1 - SEARCH_SHARE:.0%} of the modelling split ({len(score_on.labels)} images); "
                  f"retrained on the other {SEARCH_SHARE:.0%} ({len(train_on.labels)} images)")
    else:
        train_on, score_on = splits.model, splits.eval
        scored = f"evaluation split ({len(score_on.labels)} images); retrained on the modelling split"
    rows = []
    t0 = time.perf_counter()
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for lr in [float(r) for r in args.lrs.split(",") if r]:
            curve = []

            def cb(epoch, model, curve=curve):
                curve.append({"epoch": epoch, **evaluate_model(model, score_on, trigger, 0, seed=0)})

            retrain(bd, train_on, FixedTrigger(trigger), ratio=ratio, epochs=args.epochs, lr=lr,
                    batch_size=preset.batch_size, seed=2, progress=False, callback=cb)
            rows.append({"ratio": ratio, "lr": lr, "schedule": "constant", "oracle_curve": curve})
            print(ratio, lr, [(c["epoch"], round(100 * c["asr"], 1), round(100 * c["clean_acc"], 1)) for c in curve],
                  flush=True)
    ratio = float(args.ratios.split(",")[0])
    for lr in [float(r) for r in args.cosine_lrs.split(",") if r]:
        for epochs in [int(e) for e in args.cosine_epochs.split(",") if e]:
            row = {"ratio": ratio, "lr": lr, "schedule": "cosine", "epochs": epochs}
            # the oracle, and the control that knows nothing of the backdoor (uniform-noise patches):
            # a protocol under which the control also removes the backdoor cannot tell triggers apart
            for arm, smp in (("oracle", FixedTrigger(trigger)), ("random", UniformNoiseTrigger(splits.channels))):
                fixed = retrain(bd, train_on, smp, ratio=ratio, epochs=epochs, lr=lr,
                                batch_size=preset.batch_size, seed=2, progress=False, schedule="cosine")
                row[arm] = evaluate_model(fixed, score_on, trigger, 0, seed=0)
            rows.append(row)
            print(ratio, lr, "cosine", epochs, {a: round(100 * row[a]["asr"], 1) for a in ("oracle", "random")},
                  round(100 * row["oracle"]["clean_acc"], 1), flush=True)
    result = {
        "pattern": args.pattern, "seed": 0, "preset": "fast", "arm": "oracle",
        "scored_on": scored, "held_out": bool(args.held_out),
        "clean": evaluate_model(clean, score_on, trigger, 0, seed=0),
        "backdoored": evaluate_model(bd, score_on, trigger, 0, seed=0),
        "grid": rows, "seconds": round(time.perf_counter() - t0, 1),
        "code": code_fingerprint(), "git": git_state(), "torch_threads": torch.get_num_threads(),
    }
    atomic_write_text(args.out, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
