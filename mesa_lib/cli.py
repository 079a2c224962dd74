"""Command line: ``python -m mesa_lib run|sweep|fetch-data|patterns``.

    python -m mesa_lib run --dataset fashion-mnist --pattern 170 --target 0 --preset fast --seed 0 --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "format_table"]


def format_table(result: dict) -> str:
    """A readable table of a pipeline result."""
    rows = [("model", "clean acc", "ASR")]
    for key, label in (("clean", "clean"), ("backdoored", "backdoored"), ("mesa", "MESA defense"),
                       ("point", "point defense"), ("nc", "Neural Cleanse defense"), ("oracle", "oracle defense")):
        if key in result:
            rows.append((label, f"{100 * result[key]['clean_acc']:.1f}%", f"{100 * result[key]['asr']:.1f}%"))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    det = result.get("detection")
    if det:
        asr = " ".join(f"{100 * a:.0f}" for a in det["per_class_asr"])
        lines.append(f"detection: target {det['detected_target']} (anomaly index {det['anomaly_index']:.1f}); "
                     f"per-class ASR % [{asr}]")
    sec = result.get("seconds", {})
    if sec:
        lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in sec.items()))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mesa_lib", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the whole pipeline once: attack, detection, MESA, defenses")
    r.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default), cifar10, cifar100")
    r.add_argument("--pattern", type=int, default=170, help="3x3 pattern id 0..511 (default 170, the chequer)")
    r.add_argument("--color-seed", type=int, default=None, help="use a seeded random colour trigger instead")
    r.add_argument("--target", type=int, default=0, help="attacker's target class (default 0)")
    r.add_argument("--preset", default="fast", help="fast (CPU, minutes) or paper (authors' settings, GPU)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default="results.json", help="JSON results file (written after every stage)")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--data-root", default=None, help="directory holding the dataset")
    r.add_argument("--cache", action="store_true", help="reuse cached clean/backdoored models")
    r.add_argument("--oracle", action="store_true", help="also defend with the true trigger")
    r.add_argument("--quiet", action="store_true", help="no progress bars")

    f = sub.add_parser("fetch-data", help="make a dataset available offline (downloads with internet)")
    f.add_argument("--dataset", default="fashion-mnist")
    f.add_argument("--root", default=None)

    sub.add_parser("patterns", help="list the 51 canonical 3x3 patterns")

    s = sub.add_parser("sweep", help="the paper's experiment: every pattern, one JSON line each (resumable)")
    s.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default), cifar10, cifar100")
    s.add_argument("--patterns", default="all", help="'all' (default) or a comma list of ids, e.g. 170,341")
    s.add_argument("--preset", default="fast", help="fast (CPU) or paper (authors' settings, GPU)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--target", type=int, default=0, help="target class of the pattern attacks (default 0)")
    s.add_argument("--out", default="results/sweep.jsonl", help="JSONL file, one line per pattern; rerun to resume")
    s.add_argument("--workers", type=int, default=1, help="patterns run in parallel (processes or Ray tasks)")
    s.add_argument("--backend", default="local", choices=["local", "ray"])
    s.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local one)")
    s.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    s.add_argument("--data-root", default=None, help="directory holding the dataset")
    s.add_argument("--quiet", action="store_true", help="no log lines")
    __import__("mesa_lib.zoo", fromlist=["add_cli"]).add_cli(sub)  # zoo, grade, zoo-reference
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            from .pipeline import run_pipeline

            result = run_pipeline(
                dataset=args.dataset, pattern=args.pattern, target=args.target, preset=args.preset,
                seed=args.seed, out=args.out, device=args.device, root=args.data_root, use_cache=args.cache,
                oracle=args.oracle, color_seed=args.color_seed, progress=not args.quiet,
            )
            print(format_table(result))
            print(f"results written to {args.out}")
        elif args.command == "sweep":
            from .sweep import run_sweep

            lines = run_sweep(
                dataset=args.dataset, patterns=args.patterns, preset=args.preset, out=args.out, seed=args.seed,
                target=args.target, workers=args.workers, backend=args.backend, ray_address=args.ray_address,
                root=args.data_root, device=args.device, progress=not args.quiet,
            )
            print(f"{len(lines)} results in {args.out}")
        elif args.command == "fetch-data":
            from .data import fetch

            print(f"{args.dataset} is available in {fetch(args.dataset, root=args.root)}")
        elif args.command in ("zoo", "grade", "zoo-reference"):
            from .zoo import run_cli

            run_cli(args)
        elif args.command == "patterns":
            from .triggers import canonical_patterns

            ids = canonical_patterns()
            print(f"{len(ids)} canonical patterns:", " ".join(map(str, ids)))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
