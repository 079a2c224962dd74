"""Command line: ``python -m mesa_lib run|sweep|clean-controls|fetch-data|patterns``.

    python -m mesa_lib run --dataset fashion-mnist --pattern 170 --target 0 --preset fast --seed 0 --out results.json

Exit codes:

* ``0`` -- success.
* ``2`` -- bad input or usage: an unknown option or value, a pattern, target or seed out of
  range, an ``--out`` that cannot be written, or that exists where a command writes a whole
  file (``run``, ``clean-controls``: ``--force`` replaces it; a sweep's or stress file is only
  ever appended to), ``--device cuda`` without a GPU, data that cannot be found, fetched,
  parsed or (``fetch-data``) that differs from the official files. One line on stderr,
  starting with ``error:``; nothing was trained and no file was created or changed.
* ``130`` -- interrupted (Ctrl-C): one line; rerun the same command to resume a sweep.

``--preset paper`` on a CPU prints one warning line first, with the hours its clean training
takes at the throughput ``bench/bench_mesa.py`` measured.
* ``1`` -- an unexpected error (a bug): Python's traceback is printed.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from .common import DiskFullError, check_new_file
from .common import check_writable as check_out_path

__all__ = ["main", "format_table", "parse_device", "check_out_path"]

EXIT_OK, EXIT_UNEXPECTED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

_EXIT_CODES = """exit codes:
  0  success
  2  bad input or usage (one line on stderr starting with 'error:'; nothing was trained)
  130  interrupted (Ctrl-C; rerun the same command to resume)
  1  unexpected error (a bug; Python's traceback is printed)"""

_EPILOGS = {
    "main": """examples:
  python -m mesa_lib patterns
  python -m mesa_lib fetch-data --dataset fashion-mnist
  python -m mesa_lib run --pattern 170 --preset fast --out results.json
  python -m mesa_lib sweep --patterns all --preset fast --out results/sweep.jsonl

""" + _EXIT_CODES,
    "run": """examples:
  python -m mesa_lib run --dataset fashion-mnist --pattern 170 --target 0 --preset fast --out results.json
  python -m mesa_lib run --dataset cifar10 --preset paper --device cuda:0 --oracle --out cifar10-170.json
  python -m mesa_lib run --dataset cifar100 --color-seed 3 --target 7 --device cpu --quiet

""" + _EXIT_CODES,
    "sweep": """examples:
  python -m mesa_lib sweep --preset fast --out results/sweep.jsonl          (rerun to resume)
  python -m mesa_lib sweep --patterns 170,341 --workers 2 --device cpu --out results/two.jsonl
  python -m mesa_lib sweep --dataset cifar100 --preset paper --device cuda --out results/c100.jsonl

""" + _EXIT_CODES,
    "clean-controls": """--seed and --target are refused: the clean models' seeds are given by --seeds (one
model per seed: --seeds 3 is the clean model of seed 3), and a clean model has no target
(the scan searches every class).

examples:
  python -m mesa_lib clean-controls --seeds 0-9 --workers 2 --out results/clean_controls.json
  python -m mesa_lib clean-controls --seeds 3 --out seed3.json

""" + _EXIT_CODES,
    "fetch-data": """examples:
  python -m mesa_lib fetch-data                        (Fashion-MNIST; nothing to do if Debian's
                                                         dataset-fashion-mnist is installed)
  python -m mesa_lib fetch-data --dataset cifar10 --root ~/data

""" + _EXIT_CODES,
}


class _OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see `{self.prog} --help`)\n")


def format_table(result: dict) -> str:
    """A readable table of a pipeline result: per model the clean accuracy, the attacker's
    ASR and the residual valid set (patterns still firing), under each retraining protocol."""
    protos = {p["name"]: p for p in result.get("protocols", [])}
    head = protos.get("headline")
    cols = ["clean acc", "ASR", "fires"]
    if "second" in result:
        cols += [f"ASR @{100 * result['second']['protocol']['ratio']:.0f}%", "fires"]
    rows = [("model", *cols)]

    def cells(entry: dict | None) -> list[str]:
        if entry is None:
            return ["", ""]
        res = entry.get("residual")
        return [f"{100 * entry['asr']:.1f}%", "" if res is None else str(res["fired"])]

    for key, label in (("clean", "clean"), ("backdoored", "backdoored"), ("mesa", "MESA defense"),
                       ("point", "point defense (best start)"), ("nc", "Neural Cleanse defense"),
                       ("random", "random patches (control)"), ("oracle", "oracle defense")):
        if key in result:
            row = [label, f"{100 * result[key]['clean_acc']:.1f}%", *cells(result[key])]
            if "second" in result:
                row += cells(result["second"].get(key)) if key not in ("clean", "backdoored") else ["", ""]
            rows.append(tuple(row))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    if head:
        lines.append(f"retraining: {100 * head['ratio']:g}% of each batch stamped, {head['epochs']:g} epochs, "
                     f"lr {head['lr']:g} ({head['schedule']}); 'fires': patterns of all 512 with ASR >= 50%")
    det = result.get("detection")
    if det:
        asr = " ".join(f"{100 * a:.0f}" for a in det["per_class_asr"])
        lines.append(f"detection: target {det['detected_target']} (anomaly index {det['anomaly_index']:.1f}"
                     + (f", flagged {det['flagged']}" if "flagged" in det else "") + f"); per-class ASR % [{asr}]")
    sec = result.get("seconds", {})
    if sec:
        lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in sec.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------- argument types


def parse_device(value: str) -> str:
    """An argparse type: ``cpu``, ``cuda`` or ``cuda:N``, and a CUDA device must exist here.

    Raises:
        argparse.ArgumentTypeError: any other spelling, or CUDA asked for on a machine
            without it (or with fewer than ``N + 1`` GPUs).
    """
    text = str(value).strip().lower()
    index: int | None = None
    if text.startswith("cuda:"):
        number = text[len("cuda:"):]
        if not number.isdigit():
            raise argparse.ArgumentTypeError(f"device must be cpu, cuda or cuda:N (N a GPU index), got {value!r}")
        index = int(number)
    elif text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device must be cpu, cuda or cuda:N (N a GPU index), got {value!r}")
    if text == "cpu":
        return text
    import torch

    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{value!r} asked for, but CUDA is not available on this machine; use --device cpu "
            "(or leave --device out to use a GPU only when there is one)")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise argparse.ArgumentTypeError(
            f"{value!r} asked for, but this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return text


def _dataset_name(value: str) -> str:
    """An argparse type: a dataset name or alias (``CIFAR-10``) -> its canonical name."""
    from .datafiles import canonical_name

    try:
        return canonical_name(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _preset_name(value: str) -> str:
    """An argparse type: a preset name, with the library's message for unknown ones."""
    from .presets import get_preset

    try:
        return get_preset(value).name
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# ---------------------------------------------------------------- parser


MAX_SEEDS = 10_000
"""The most clean models one ``clean-controls`` run may name."""


def _seed_type(value: str) -> int:
    """An argparse type: an experiment seed in ``0..MAX_SEED``."""
    from .validate import check_seed

    try:
        return check_seed(int(value), "the seed")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _color_seed_type(value: str) -> int:
    """An argparse type: a colour-trigger seed in ``0..MAX_SEED``."""
    from .validate import check_seed

    try:
        return check_seed(int(value), "the colour seed")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive(value: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value!r}")
    return n


def _seed_list(spec: str) -> list[int]:
    """Seeds from ``"0-9"`` or ``"0,3,5"`` (at most :data:`MAX_SEEDS`)."""
    try:
        if "-" in spec.strip().lstrip("-"):
            lo, hi = (int(v) for v in spec.split("-", 1))
            if hi < lo:
                raise ValueError(f"--seeds range {spec!r} is empty: its first seed is above its last; "
                                 f"write it as {hi}-{lo}") from None
            if hi - lo + 1 > MAX_SEEDS:
                raise ValueError(f"--seeds {spec!r} names {hi - lo + 1} clean models; at most {MAX_SEEDS} "
                                 "in one run") from None
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError as err:
        if str(err).startswith("--seeds"):
            raise
        raise ValueError(f"--seeds must be a range like 0-9 or a comma list like 0,1,2; got {spec!r}") from None
    if not seeds or min(seeds) < 0:
        raise ValueError(f"--seeds must name non-negative seeds, like 0-9; got {spec!r}")
    return seeds


def _shared_options(seed_and_target: bool = True) -> argparse.ArgumentParser:
    """Options common to ``run``, ``sweep`` and (without ``--seed`` / ``--target``)
    ``clean-controls`` (one parent parser)."""
    from .data import DATASETS
    from .presets import PRESETS

    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--dataset", type=_dataset_name, choices=list(DATASETS), default="fashion-mnist",
                        help="dataset (default fashion-mnist)")
    shared.add_argument("--preset", type=_preset_name, choices=list(PRESETS), default="fast",
                        help="fast (CPU, minutes) or paper (authors' settings, GPU); default fast")
    if seed_and_target:
        shared.add_argument("--seed", type=_seed_type, default=0, help="experiment seed (default 0)")
        shared.add_argument("--target", type=int, default=0, help="attacker's target class (default 0)")
    shared.add_argument("--device", type=parse_device, default=None, metavar="{cpu,cuda,cuda:N}",
                        help="where to compute (default: cuda if available, else cpu)")
    shared.add_argument("--data-root", default=None, help="directory holding the dataset (default: search)")
    shared.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    return shared


def _parser() -> argparse.ArgumentParser:
    from .data import DATASETS

    fmt = argparse.RawDescriptionHelpFormatter
    p = _OneLineParser(prog="python -m mesa_lib", description=__doc__.splitlines()[0],
                       epilog=_EPILOGS["main"], formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    shared = _shared_options()

    r = sub.add_parser("run", parents=[shared], epilog=_EPILOGS["run"], formatter_class=fmt,
                       help="run the whole pipeline once: attack, detection, MESA, defenses")
    r.add_argument("--pattern", type=int, default=170, help="3x3 pattern id 0..511 (default 170, the chequer)")
    r.add_argument("--color-seed", type=_color_seed_type, default=None,
                   help="use a seeded random colour trigger instead")
    r.add_argument("--out", default="results.json", help="JSON results file (written after every stage); "
                   "an existing file is never replaced unless --force")
    r.add_argument("--force", action="store_true", help="replace an existing --out file")
    r.add_argument("--cache", action="store_true", help="reuse cached clean/backdoored models")
    r.add_argument("--oracle", action="store_true", help="also defend with the true trigger")

    f = sub.add_parser("fetch-data", epilog=_EPILOGS["fetch-data"], formatter_class=fmt,
                       help="make a dataset available offline (downloads with internet)")
    f.add_argument("--dataset", type=_dataset_name, choices=list(DATASETS), default="fashion-mnist")
    f.add_argument("--root", default=None, help="where to put it (default: the user cache)")

    sub.add_parser("patterns", help="list the 51 canonical 3x3 patterns", epilog=_EXIT_CODES, formatter_class=fmt)

    s = sub.add_parser("sweep", parents=[shared], epilog=_EPILOGS["sweep"], formatter_class=fmt,
                       help="the paper's experiment: every pattern, one JSON line each (resumable)")
    s.add_argument("--patterns", default="all", help="'all' (default) or a comma list of ids, e.g. 170,341")
    s.add_argument("--out", default="results/sweep.jsonl", help="JSONL file, one line per pattern; rerun to resume")
    s.add_argument("--workers", type=_positive, default=1, help="patterns run in parallel (processes or Ray tasks)")
    s.add_argument("--backend", default="local", choices=["local", "ray"])
    s.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local one)")
    s.add_argument("--light", action="store_true", help="MESA, point starts and oracle at the headline "
                   "protocol only (the book's extra seeds)")

    c = sub.add_parser("clean-controls", parents=[_shared_options(seed_and_target=False)], formatter_class=fmt,
                       epilog=_EPILOGS["clean-controls"],
                       help="false-positive control: MESA's scan and Neural Cleanse on clean models of many seeds")
    c.add_argument("--seeds", default="0-9", help="seeds of the clean models: a range 0-9 or a comma list")
    c.add_argument("--seed", default=None, help="not accepted: the clean models' seeds are --seeds (e.g. --seeds 3)")
    c.add_argument("--target", default=None, help="not accepted: a clean model has no attacker's target; the scan "
                   "searches every class")
    c.add_argument("--out", default="results/clean_controls.json", help="JSON file with every scan and the rates; "
                   "an existing file is never replaced unless --force")
    c.add_argument("--force", action="store_true", help="replace an existing --out file")
    c.add_argument("--workers", type=_positive, default=1, help="clean models scanned in parallel (processes)")
    from .zoo import add_cli as add_zoo_cli

    add_zoo_cli(sub)  # zoo, grade, zoo-reference
    from .stress import add_cli as add_stress_cli

    add_stress_cli(sub)  # stress (several triggers for one target)

    from .own import add_cli as add_own_cli

    add_own_cli(sub)  # defend
    return p


def _refuse_seed_and_target(args: argparse.Namespace) -> None:
    """``clean-controls`` takes ``--seeds``; ``--seed`` and ``--target`` would be ignored, so
    they are refused with what to write instead."""
    if args.seed is not None:
        raise ValueError(f"clean-controls takes --seeds, not --seed: one clean model per seed, e.g. "
                         f"--seeds {args.seed} (or a range such as --seeds 0-9)")
    if args.target is not None:
        raise ValueError("clean-controls takes no --target: its models are clean (no attack, so no target) and "
                         "its scan searches every class; leave --target out")


TRAIN_IMAGES = {"fashion-mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000}
"""Training images of each dataset (the official training sets)."""

PAPER_CPU_BENCH = "bench/results/bench_paper_cpu_1thread.json"
"""The measured CPU throughput of the ``paper`` preset's classifier (``bench/bench_mesa.py``),
relative to the repository root."""

PAPER_CPU_IMAGES_PER_S = 23.0
"""``classifier_images_per_s`` of :data:`PAPER_CPU_BENCH` (ResNet-18 training steps on
CIFAR-sized images, one CPU thread), used where the benchmark file is not installed (a wheel);
a test keeps the two equal."""


def paper_cpu_throughput() -> tuple[float, int, str]:
    """``(images per second, torch threads, source)`` of the ``paper`` classifier's training
    on the CPU, as measured by the benchmark (:data:`PAPER_CPU_BENCH`)."""
    import json

    from .common import PACKAGE_DIR

    path = PACKAGE_DIR.parent / PAPER_CPU_BENCH
    try:
        run = json.loads(path.read_text())
        rate = next(r for r in run["runs"] if r.get("preset") == "paper")["classifier_images_per_s"]
        return float(rate), int(run.get("threads") or 1), PAPER_CPU_BENCH
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return PAPER_CPU_IMAGES_PER_S, 1, "bench/bench_mesa.py"


def paper_cpu_hours(dataset: str, models: int = 1, threads: int | None = None) -> tuple[float, float]:
    """Hours of clean training of ``models`` ``paper`` classifiers on the CPU: ``(at the
    benchmark's thread count, with ``threads`` -- assuming throughput grows at best in
    proportion to the threads)``."""
    import torch

    from .presets import get_preset

    rate, bench_threads, _ = paper_cpu_throughput()
    images = get_preset("paper").clean_epochs * TRAIN_IMAGES[dataset] * models
    hours = images / rate / 3600
    threads = torch.get_num_threads() if threads is None else threads
    return hours, hours * bench_threads / max(threads, bench_threads)


def _warn_paper_on_cpu(preset: str, dataset: str, device: str | None, models: int = 1) -> None:
    """One warning line on stderr when the ``paper`` preset is about to train on the CPU,
    with the time its clean training alone takes at the measured throughput."""
    if preset != "paper":
        return
    from .pipeline import pick_device

    if pick_device(device).type != "cpu":
        return
    import torch

    from .presets import get_preset

    rate, bench_threads, source = paper_cpu_throughput()
    one, now = paper_cpu_hours(dataset, models)
    threads = torch.get_num_threads()
    n = f"{models} clean models" if models > 1 else "clean training"
    print(f"warning: --preset paper on the CPU: {n} alone ({get_preset('paper').clean_epochs:g} epochs x "
          f"{TRAIN_IMAGES[dataset]:,} images{' each' if models > 1 else ''}) take{'' if models > 1 else 's'} about {one:.1f} h at the "
          f"{rate:g} images/s measured on {bench_threads} thread{'s' if bench_threads > 1 else ''} ({source}), at best about {now:.1f} h with "
          f"this run's {threads} threads; use a GPU (--device cuda) or --preset fast for minutes",
          file=sys.stderr, flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace | int:
    """Parsed arguments, or the exit code argparse asked for (``--help``: 0, bad usage: 2)."""
    try:
        return _parser().parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    args = _parse(argv)
    if isinstance(args, int):
        return args
    try:
        if args.command == "clean-controls":
            _refuse_seed_and_target(args)
            seeds = _seed_list(args.seeds)
        if args.command in ("run", "clean-controls"):  # they write a whole file: never replace one by mistake
            check_new_file(args.out, args.force)  # before any data is loaded or model trained
        elif args.command == "sweep":
            check_out_path(args.out)  # appended to (resumed), never replaced
        if args.command in ("run", "sweep", "clean-controls"):
            _warn_paper_on_cpu(args.preset, args.dataset, args.device,
                               len(seeds) if args.command == "clean-controls" else 1)
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
                root=args.data_root, device=args.device, progress=not args.quiet, light=args.light,
            )
            print(f"{len(lines)} results in {args.out}")
        elif args.command == "clean-controls":
            from .sweep import run_clean_controls

            res = run_clean_controls(dataset=args.dataset, seeds=seeds, preset=args.preset,
                                     out=args.out, workers=args.workers, root=args.data_root, progress=not args.quiet,
                                     device=args.device)
            print(f"{res['mesa_false_positives']} / {res['n']} clean models flagged by MESA's scan "
                  f"({res['rule']}), {res['nc_false_positives']} / {res['n']} by Neural Cleanse; written to {args.out}")
        elif args.command == "fetch-data":
            from .data import fetch

            where = fetch(args.dataset, root=args.root, verify=True)
            print(f"{args.dataset} is available in {where} (every file checked against the official checksums)")
        elif args.command in ("zoo", "grade", "zoo-reference"):
            from .zoo import run_cli

            run_cli(args)
        elif args.command == "stress":
            from .stress import run_cli as run_stress_cli

            run_stress_cli(args)
        elif args.command == "defend":
            from .own import run_cli as run_own_cli

            run_own_cli(args)
        elif args.command == "patterns":
            from .triggers import canonical_patterns

            ids = canonical_patterns()
            print(f"{len(ids)} canonical patterns:", " ".join(map(str, ids)))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DiskFullError as err:
        print(f"error: disk full while writing {err.filename}: nothing lost (the file is as it was before "
              "that write); free some space and rerun the same command", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK
