"""Measure the build of a classroom zoo with the defaults, once, and the output-norm baseline on it.

    OMP_NUM_THREADS=1 nice -n 10 python bench/bench_zoo_build.py [--n 20] [--out bench/results/zoo_build_cpu.json]

Runs ``python -m mesa_lib zoo --out <tmp>/zoo --key <tmp>/keys/key.json --n N --quiet`` (the
defaults: one base per model, the fast preset, the whole Fashion-MNIST training set, a fresh
random seed) as a child process and records its wall time and CPU seconds (``getrusage`` of
the children), the load average before, during (sampled every 30 s) and after, and the code
version. Then it scores :func:`mesa_lib.zoo.norm_baseline_submission` (no images) on that zoo
with the key. The zoo and its key are deleted at the end: no key is committed.

The ratio to the shared-base build is taken against ``bench/results/zoo_game_cpu.json`` (the
same command with ``--bases 4``: ``user_cpu_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "zoo_build_cpu.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from mesa_lib.common import code_fingerprint, git_state
    from mesa_lib.zoo import grade, norm_baseline_submission

    code = {**git_state(), "fingerprint": code_fingerprint()}  # the version the build runs, read before it
    work = Path(tempfile.mkdtemp(prefix="mesa-zoo-bench-"))
    cmd = [sys.executable, "-m", "mesa_lib", "zoo", "--out", str(work / "zoo"), "--key",
           str(work / "keys" / "key.json"), "--n", str(args.n), "--quiet"]
    loads, done = [], threading.Event()

    def sample() -> None:
        while not done.wait(30):
            loads.append(round(os.getloadavg()[0], 2))

    threading.Thread(target=sample, daemon=True).start()
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    done.set()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"the build failed ({proc.returncode}): {proc.stderr[-2000:]}")
    key = json.loads((work / "keys" / "key.json").read_text())
    sub = work / "norm.csv"
    norm_baseline_submission(work / "zoo", sub)
    norm = grade(work / "keys" / "key.json", sub)
    shared = json.loads((ROOT / "bench" / "results" / "zoo_game_cpu.json").read_text())["zoo"]
    accs = [m["clean_acc"] for m in key["models"].values()]
    asrs = [m["asr"] for m in key["models"].values() if m["backdoored"]]
    record = {
        "what": f"build a {args.n}-model Fashion-MNIST zoo with the defaults (one base per model, fast preset, "
                "whole training set), once; then the output-norm baseline (no images) graded on it",
        "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "unset") + " nice -n 10 "
                   + " ".join(["python", "-m", "mesa_lib", "zoo", "--out", "<tmp>/zoo", "--key",
                               "<tmp>/keys/key.json", "--n", str(args.n), "--quiet"]),
        "code": code,
        "host": {"cpus": os.cpu_count(), "torch_threads_env": os.environ.get("OMP_NUM_THREADS"),
                 "load_before": round(load_before, 2), "load_during_every_30s": loads,
                 "load_after": round(os.getloadavg()[0], 2),
                 "note": "2 CPU cores shared with other jobs (other engineers' tests and notebooks); the CPU "
                         "seconds are this build's own, the wall time depends on that load"},
        "n": key["n"], "n_backdoored": key["n_backdoored"], "bases": key["settings"]["bases"],
        "wall_s": round(wall, 1),
        "user_cpu_s": round(usage.ru_utime, 1),
        "sys_cpu_s": round(usage.ru_stime, 1),
        "cpu_min": round((usage.ru_utime + usage.ru_stime) / 60, 2),
        "ratio_to_shared_bases": {
            "bases": shared["bases"],
            "shared_user_cpu_s": shared["user_cpu_s"],
            "ratio_user_cpu": round(usage.ru_utime / shared["user_cpu_s"], 2),
        },
        "clean_acc_range": [min(accs), max(accs)],
        "backdoored_asr_range": [min(asrs), max(asrs)] if asrs else None,
        "norm_baseline": {"auroc": norm["auroc"], "target_accuracy": norm["target_accuracy"],
                          "targets_correct": norm["targets_correct"], "n_backdoored": norm["n_backdoored"]},
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(work)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
