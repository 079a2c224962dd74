"""The paper's experiment: the whole pipeline for every trigger, one JSON line per trigger.

For each 3x3 pattern (Fashion-MNIST / CIFAR-10: the 51 canonical patterns, target class 0)
or each seeded random colour trigger (CIFAR-100: 10 triggers with seeded random targets) the
sweep runs :func:`~mesa_lib.pipeline.run_pipeline` -- attack, detection on the defender's
held-out check half, MESA, the point baseline's starts, the oracle and the random-patch
control, each retrained under both protocols -- plus Neural Cleanse
(:mod:`mesa_lib.neural_cleanse`), and appends one JSON line to the output file as soon as
that trigger is done (see :mod:`mesa_lib.pipeline` for the line's keys).

The file is the state of the sweep. Restarted with the same arguments it skips the triggers
already in it, so an interrupted sweep (Ctrl-C, ``kill -9``, a lost machine) loses at most
the triggers in flight; a half-written last line is cut off and redone. Only the parent
process writes the file, whichever backend ran the work: in-process (``workers=1``), local
processes (``workers=N``) or Ray tasks (``backend="ray"``, one GPU per task when CUDA is
present). A sidecar ``<out>.runs.json`` records each invocation's wall time.

All triggers share the clean model (same seed; trained once and cached), and every line is
reproducible from its seed: the cache only saves time, it never changes a number.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .data import DATASETS, DatasetSplits, load_dataset
from .datafiles import canonical_name, find_data_root
from .evaluate import clean_accuracy
from .neural_cleanse import NCConfig, detect_backdoor, reverse_engineer_masks, unlearn
from .common import check_writable, code_fingerprint, git_state, median, torch_threads, write_all
from .detect import RULE
from .pipeline import StageContext, get_clean_model, pick_device, protocols, run_pipeline, write_json
from .presets import Preset, get_preset
from .triggers import canonical_patterns, pattern_from_id
from .validate import check_seed, check_target

__all__ = [
    "SweepTask",
    "NC_CONFIGS",
    "sweep_tasks",
    "parse_patterns",
    "nc_stage",
    "run_task",
    "read_finished",
    "append_line",
    "run_sweep",
    "check_ray",
    "work_threads",
    "SweepLock",
    "RESUME_KEYS",
    "METHODS",
    "ARMS",
    "load_sweep",
    "arm_result",
    "summarize",
    "bootstrap_ci",
    "sign_test",
    "control_line",
    "run_clean_controls",
]

NUM_COLOR_TRIGGERS = 10
"""Random colour triggers of the CIFAR-100 setting."""

NC_CONFIGS = {"fast": NCConfig(steps=150, batch_size=16), "paper": NCConfig(steps=1000, batch_size=64)}
"""Neural Cleanse settings per preset name (other presets get ``fast``'s)."""


@dataclass(frozen=True)
class SweepTask:
    """One trigger of the sweep."""

    pattern: int
    """The line's key: a pattern id (0..511), or the index of a colour trigger (CIFAR-100)."""
    target: int
    color_seed: int | None = None


def parse_patterns(spec: str | int | Iterable[int] | None, dataset: str = "fashion-mnist") -> list[int]:
    """The trigger keys named by ``spec``: ``"all"`` / None, an id, or a comma list of ids.

    For ``cifar100`` the keys are colour-trigger indices ``0..9``; otherwise pattern ids
    ``0..511`` (``"all"`` = the 51 canonical patterns).
    """
    colour = _is_colour(dataset)
    every = list(range(NUM_COLOR_TRIGGERS)) if colour else canonical_patterns()
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return every
    if isinstance(spec, str):
        try:
            ids = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--patterns must be 'all' or a comma list of integers like 170,341; got {spec!r}") from None
    elif isinstance(spec, int):
        ids = [spec]
    else:
        ids = [int(s) for s in spec]
    if not ids:
        raise ValueError("no patterns given; use 'all' or a comma list of ids like 170,341")
    for i in ids:
        if colour and not 0 <= i < NUM_COLOR_TRIGGERS:
            raise ValueError(f"{dataset} uses {NUM_COLOR_TRIGGERS} colour triggers: ids must be in 0..9, got {i}")
        if not colour:
            pattern_from_id(i)  # clear error for ids outside 0..511
    return list(dict.fromkeys(ids))  # drop repeats, keep order


def _is_colour(dataset: str) -> bool:
    return dataset.lower().replace("-", "").replace("_", "") == "cifar100"


def sweep_tasks(dataset: str, patterns: str | Iterable[int] | None = "all", seed: int = 0, target: int = 0) -> list[SweepTask]:
    """The tasks of a sweep. CIFAR-100: colour trigger ``i`` has ``color_seed = 1000 * seed + i``
    and a target drawn (seeded by ``seed``) uniformly from the 100 classes, as in the paper;
    otherwise every pattern attacks ``target``."""
    ids = parse_patterns(patterns, dataset)
    if _is_colour(dataset):
        g = torch.Generator().manual_seed(seed)
        targets = torch.randint(0, 100, (NUM_COLOR_TRIGGERS,), generator=g).tolist()
        return [SweepTask(i, int(targets[i]), 1000 * seed + i) for i in ids]
    return [SweepTask(i, target) for i in ids]


def nc_stage(config: NCConfig):
    """A pipeline stage (see ``run_pipeline(extra_stages=...)``) running Neural Cleanse:
    reverse-engineer a mask + pattern per class on the defender's search half, detect with
    the MAD anomaly index, then unlearn the reversed trigger of the class NC itself detected,
    under every retraining protocol of the preset (the same ratio, epochs and rate as MESA's
    defense). Adds ``nc``, ``second.nc`` and ``nc_detection``."""

    def stage(ctx: StageContext) -> dict:
        rev = reverse_engineer_masks(ctx.backdoored, ctx.search, config, seed=ctx.seed, progress=ctx.progress)
        det = detect_backdoor(rev).to_dict()
        cls = det["detected_target"]
        det["mitigated_class"] = cls
        out: dict = {"nc_detection": det}
        for proto in protocols(ctx.preset):
            fixed = unlearn(ctx.backdoored, ctx.splits.model, rev.masks[cls], rev.patterns[cls], ratio=proto.ratio,
                            epochs=proto.epochs, lr=proto.lr, batch_size=ctx.preset.batch_size, seed=ctx.seed + 2,
                            progress=ctx.progress, schedule=proto.schedule)
            if proto.name == "headline":
                out["nc"] = ctx.evaluate(fixed)
            else:
                out["nc_second"] = ctx.evaluate(fixed)
        return out

    return stage


def _nc_config(preset: Preset, nc: NCConfig | None) -> NCConfig:
    return nc if nc is not None else NC_CONFIGS.get(preset.name, NC_CONFIGS["fast"])


def run_task(task: SweepTask, splits: DatasetSplits, preset: Preset | str = "fast", seed: int = 0,
             nc: NCConfig | None = None, progress: bool = False, light: bool = False) -> dict:
    """One line of the sweep: the pipeline with the oracle and the random-patch control, and
    Neural Cleanse, for one trigger. ``light`` (the extra seeds of the book's sweep): MESA,
    the point starts and the oracle only, under the headline protocol only."""
    preset = get_preset(preset)
    nc = _nc_config(preset, nc)
    if light:
        preset = preset.with_(second_ratio=None)
    result = run_pipeline(
        dataset=splits.name, pattern=task.pattern if task.color_seed is None else 0, target=task.target,
        preset=preset, seed=seed, use_cache=True, oracle=True, controls=not light, color_seed=task.color_seed,
        progress=progress, splits=splits, extra_stages={} if light else {"nc": nc_stage(nc)},
    )
    result["config"]["light"] = light
    if "nc_second" in result:
        result["second"]["nc"] = result.pop("nc_second")
    result["config"]["nc"] = nc.to_dict()
    result["config"]["host"] = socket.gethostname()
    result["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {"pattern": task.pattern, **result}


# ---------------------------------------------------------------- the JSONL file


def _is_sweep_line(raw: bytes) -> bool:
    try:
        obj = json.loads(raw)
        int(obj["pattern"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        return False
    return isinstance(obj, dict)


def read_finished(path: str | Path, repair: bool = True) -> dict[int, dict]:
    """The finished lines of a sweep file, by pattern key.

    Blank lines are skipped (an ``echo >> file`` does no harm). A last line without its
    newline that starts like a sweep line (``{"pattern"``) was being written when the sweep
    died: with ``repair`` the file is truncated to the end of the last complete line, so
    that the trigger is redone. Anything else that is not a sweep line -- a complete last
    line, a line in the middle, an unfinished last line that is not a sweep line, a file
    with no sweep line at all -- raises ``ValueError`` and the file is left untouched:
    a line a user added is never deleted.
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise ValueError(f"{path} is not a file; give --out a file name")
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    done: dict[int, dict] = {}
    good_end = 0
    for n, raw in enumerate(lines):
        if raw.strip() and not _is_sweep_line(raw):
            raise ValueError(
                f"{path}, line {n + 1}, is not a sweep result (broken JSON or no 'pattern'); it was left "
                "untouched: write the sweep to another --out, or fix or delete that line"
            )
        if raw.strip():
            obj = json.loads(raw)
            done.setdefault(int(obj["pattern"]), obj)
        good_end += len(raw) + 1
    if tail.strip():
        if not tail.lstrip().startswith(b'{"pattern"'):
            what = (f"its last line ({len(lines) + 1}) is not a sweep result" if done
                    else "it is not a sweep results file (no JSON line with a 'pattern')")
            raise ValueError(f"{path}: {what}; it was left untouched: give --out a new file name, or fix or "
                             "delete that line")
        if repair:
            with open(path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
    elif tail and repair:  # only blanks after the last newline: drop them
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return done


def append_line(path: str | Path, obj: dict) -> None:
    """Append one JSON line and make it durable (flush + fsync) before returning. If the
    write fails (a full disk: :class:`~mesa_lib.common.DiskFullError`) the file is cut back
    to its previous length, so no half line is left; a Ctrl-C that comes once the whole line
    is in the file (during the fsync) keeps it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    with open(path, "ab") as f:
        start = f.seek(0, os.SEEK_END)
        try:
            write_all(f, line, path)
        except BaseException as err:
            try:
                if isinstance(err, OSError) or os.fstat(f.fileno()).st_size != start + len(line):
                    f.truncate(start)
                # else: interrupted (Ctrl-C) after the whole line reached the file: a finished
                # trigger is kept, not thrown away
            except OSError:
                pass  # a half line is cut off by the next resume
            raise


RESUME_KEYS = ("dataset", "seed", "target", "preset", "nc", "code", "torch_threads", "light")
"""What a resumed sweep must share with the lines already in its file."""


def _check_compatible(done: dict[int, dict], path: Path, want: dict, targets: dict[int, int] | None = None) -> None:
    """Refuse to append to a file whose lines were made by other code or other settings
    (every key of :data:`RESUME_KEYS`). ``targets`` maps a line's key to the target its
    trigger attacks where that differs per trigger (CIFAR-100: each colour trigger's seeded
    random target); otherwise every line must have ``want["target"]``."""
    want = json.loads(json.dumps(want))
    for key, line in done.items():
        cfg = line.get("config", {})
        expect = {**want, "target": targets.get(key, want["target"]) if targets else want["target"]}
        diff = sorted(k for k in RESUME_KEYS if cfg.get(k) != expect[k])
        if diff:
            detail = "; ".join(f"{k}: file {cfg.get(k)!r}, now {expect[k]!r}" for k in diff
                               if k not in ("preset", "nc"))
            raise ValueError(
                f"{path} holds results of a different sweep (pattern {key} differs in {', '.join(diff)}"
                + (f" -- {detail}" if detail else "") + "); a sweep only resumes a file made by the same code "
                "and settings: start a new file with another --out (or move this one away)"
            )


class SweepLock:
    """An exclusive lock on ``<out>.lock`` for as long as a sweep writes ``out``: a second
    sweep on the same file stops with a clear message instead of interleaving lines. The
    lock is keyed on the real file (symlinks resolved), so another name for the same file
    cannot bypass it. It is an OS file lock (``fcntl.flock``), released when the process
    ends, even by ``kill -9``."""

    def __init__(self, out: Path) -> None:
        real = Path(os.path.realpath(Path(out).expanduser()))
        self.path = real.with_name(real.name + ".lock")
        self._fd: int | None = None

    def __enter__(self) -> "SweepLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.path.read_text(errors="replace").strip() or "another process"
            raise ValueError(f"another sweep ({holder}) is writing {self.path.with_suffix('')}; wait for it to "
                             "finish or stop it, or write to another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None


def _read_runs(path: Path) -> list:
    if not path.is_file():
        return []
    try:
        runs = json.loads(path.read_text())
        if not isinstance(runs, list):
            raise ValueError("not a list")
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"the sweep's sidecar {path} is corrupt ({err}); move it away (it only records run "
                         "times) and run again") from None
    return runs


# ---------------------------------------------------------------- workers

_WORKER: dict = {}


PR_SET_PDEATHSIG = 1
"""Linux prctl option: the signal a process gets when its parent dies."""


def _watch_parent(parent: int, poll_s: float = 1.0) -> None:
    """End this worker process as soon as its parent (the sweep) is gone, e.g. by ``kill -9``,
    so no orphan keeps computing: on Linux through ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, and
    everywhere through a daemon thread that checks the parent's pid every ``poll_s`` seconds.
    Ctrl-C is ignored here: the parent handles it and stops the workers."""
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the watch was set up
        os._exit(1)

    def poll() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=poll, name="watch-parent", daemon=True).start()


def _init_worker(threads: int, data: dict, parent: int | None = None) -> None:
    if parent is not None:
        _watch_parent(parent)
    torch.set_num_threads(threads)
    _WORKER["data"] = data


@contextmanager
def _worker_pool(workers: int, threads: int, data: dict) -> Iterator[ProcessPoolExecutor]:
    """``workers`` spawned local processes that watch this one (:func:`_watch_parent`). When
    the block fails or is interrupted (Ctrl-C), queued work is cancelled and the running
    workers are stopped at once instead of being waited for."""
    import multiprocessing as mp

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads, data, os.getpid()))
    try:
        yield pool
    except BaseException:
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=10)
        raise
    pool.shutdown(wait=True)


def _worker_splits(data: dict) -> DatasetSplits:
    key = json.dumps(data, sort_keys=True, default=str)
    if _WORKER.get("key") != key:
        _WORKER["splits"] = load_dataset(data["dataset"], root=data["root"], device=pick_device(data["device"]),
                                         train_limit=data["train_limit"])
        _WORKER["key"] = key
    return _WORKER["splits"]


def _work(task: SweepTask, data: dict, preset: Preset, seed: int, nc: NCConfig) -> dict:
    """Run one task in a worker process (local pool or Ray); loads the data once per process."""
    if "threads" in data:
        torch.set_num_threads(data["threads"])
    return run_task(task, _worker_splits(data), preset, seed, nc, progress=False, light=data.get("light", False))


def _summary(line: dict) -> str:
    parts = [f"{k} {100 * line[k]['asr']:.1f}%" for k in ("backdoored", "mesa", "point", "nc", "random", "oracle")
             if k in line]
    det = line.get("detection", {}).get("detected_target")
    ncd = line.get("nc_detection", {}).get("detected_target")
    return (f"pattern {line['pattern']}: ASR " + ", ".join(parts)
            + f"; detected MESA {det} NC {ncd} ({line['seconds']['total']:.0f} s)")


def run_sweep(
    dataset: str = "fashion-mnist",
    patterns: str | Iterable[int] | None = "all",
    preset: Preset | str = "fast",
    out: str | Path = "results/sweep.jsonl",
    seed: int = 0,
    target: int = 0,
    workers: int = 1,
    backend: str = "local",
    ray_address: str | None = None,
    root: str | Path | None = None,
    device: str | None = None,
    train_limit: int | None = None,
    nc: NCConfig | None = None,
    progress: bool = True,
    threads: int | None = None,
    light: bool = False,
) -> list[dict]:
    """Run (or resume) a sweep and return all its lines, in task order.

    ``light`` runs MESA, the point starts and the oracle under the headline protocol only
    (see :func:`run_task`): the book's extra seeds.

    ``workers`` > 1 runs triggers in that many local processes (spawned, each with
    ``cpu_count // workers`` torch threads); ``backend="ray"`` runs them as Ray tasks
    (``ray.init(address=ray_address)``; a local cluster of ``workers`` CPUs when no address
    is given). ``threads`` sets every trigger's torch thread count (default:
    :func:`work_threads`); re-deriving committed lines uses the count they were made with.
    The parent alone writes ``out``.
    """
    preset = get_preset(preset)
    nc = _nc_config(preset, nc)
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be a positive integer (>= 1), got {workers!r}")
    seed = check_seed(seed)
    tasks = sweep_tasks(dataset, patterns, seed, target)
    if not _is_colour(dataset):  # CIFAR-100's targets are drawn per trigger
        check_target(target, DATASETS[canonical_name(dataset)].num_classes)
    out = Path(os.path.realpath(check_writable(out)))  # the real file: a symlink is another name for it
    dev = pick_device(device)
    if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
        raise ValueError(f"threads must be a positive number of torch threads, got {threads!r}")
    threads = work_threads(backend, workers, dev) if threads is None else int(threads)
    if backend == "ray":
        check_ray(ray_address)
    log = (lambda msg: print(msg, flush=True)) if progress else (lambda msg: None)
    runs_path = out.with_name(out.name + ".runs.json")
    read_finished(out, repair=False)  # a file that is not a sweep file is refused before any lock is made
    _read_runs(runs_path)
    find_data_root(dataset, root)  # data that is not there: refused before any lock is made
    with SweepLock(out):
        done = read_finished(out, repair=False)  # checked before anything is changed
        runs = _read_runs(runs_path)
        splits = load_dataset(dataset, root=root, device=dev, train_limit=train_limit)
        targets = ({t.pattern: t.target for t in sweep_tasks(dataset, "all", seed, target)}
                   if _is_colour(dataset) else None)
        _check_compatible(done, out, {"dataset": splits.name, "seed": seed, "target": target,
                                      "preset": (preset.with_(second_ratio=None) if light else preset).to_dict(),
                                      "nc": nc.to_dict(), "code": code_fingerprint(), "torch_threads": threads,
                                      "light": light}, targets)
        done = read_finished(out)  # now cut off a half-written last line
        todo = [t for t in tasks if t.pattern not in done]
        log(f"sweep {splits.name} / {preset.name} / seed {seed}: {len(tasks)} triggers, "
            f"{len(tasks) - len(todo)} already in {out}, {len(todo)} to run ({backend}, {workers} worker(s), "
            f"{threads} torch thread(s) each)")
        if todo:
            _run_todo(todo, len(tasks), done, out, runs, runs_path, splits, preset, seed, nc, threads, backend,
                      workers, ray_address, {"dataset": dataset, "root": None if root is None else str(root),
                                             "device": device, "train_limit": train_limit, "light": light},
                      progress, log)
    return [done[t.pattern] for t in tasks]


def work_threads(backend: str, workers: int, device: torch.device) -> int:
    """The torch thread count each trigger of a sweep runs with: in-process the current
    count; in ``workers`` local processes ``cpu_count // workers``; as Ray tasks 1 on the CPU.
    Lines made with another count differ a little (CPU sums in another order), so it is part
    of what a resumed sweep must share."""
    cpus = os.cpu_count() or 1
    if backend == "ray":
        return 1 if device.type == "cpu" else max(1, cpus // workers)
    return torch.get_num_threads() if workers == 1 else max(1, cpus // workers)


def _run_todo(todo, n_tasks, done, out, runs, runs_path, splits, preset, seed, nc, threads, backend, workers,
              ray_address, data, progress, log) -> None:
    """Run the missing triggers, appending each finished line and the sidecar's run record."""
    run_info = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "finished": None,
                "wall_s": 0.0, "patterns_run": 0, "backend": backend, "workers": workers, "threads": threads,
                "host": socket.gethostname(), "cpu_count": os.cpu_count(), "device": str(splits.device),
                "argv": sys.argv[1:], "git": git_state(), "code": code_fingerprint()}
    runs.append(run_info)
    t0 = time.perf_counter()

    def record(line: dict | None = None) -> None:
        if line is not None:
            line = json.loads(json.dumps(line))  # as read back from the file (lists, not tuples)
            append_line(out, line)
            done[int(line["pattern"])] = line
            run_info["patterns_run"] += 1
            log(f"[{len(done)}/{n_tasks}] " + _summary(line))
        run_info["wall_s"] = round(time.perf_counter() - t0, 1)
        write_json(runs, runs_path)

    record()
    # every task shares the clean model: train (or load) it once, before any worker starts,
    # with the workers' thread count (it is part of the cache key)
    with torch_threads(threads):
        get_clean_model(splits, preset, seed, use_cache=True, progress=progress)
    try:
        if backend == "ray":
            _run_ray(todo, data, preset, seed, nc, workers, threads, ray_address, record)
        elif workers == 1:
            with torch_threads(threads):
                for task in todo:
                    record(run_task(task, splits, preset, seed, nc, progress=False, light=data["light"]))
        else:
            _run_pool(todo, data, preset, seed, nc, workers, threads, record)
    except KeyboardInterrupt:
        log(f"interrupted: {len(done)} of {n_tasks} triggers are in {out}; run the same command to resume")
        raise
    run_info["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record()


def _run_pool(todo: Sequence[SweepTask], data: dict, preset: Preset, seed: int, nc: NCConfig, workers: int,
              threads: int, record) -> None:
    with _worker_pool(workers, threads, data) as pool:
        pending = {pool.submit(_work, t, data, preset, seed, nc) for t in todo}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                record(fut.result())


RAY_CONNECT_TIMEOUT_S = 5.0
"""How long a sweep waits for a TCP connection to ``--ray-address`` before it refuses it."""

RAY_INIT_TIMEOUT_S = 120.0
"""How long ``ray.init(address=...)`` may take before the sweep stops with an error."""


def _bounded(fn, timeout_s: float, message: str):
    """``fn()`` run in a daemon thread; ``ValueError(message)`` if it takes over ``timeout_s``."""
    import threading

    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 -- re-raised in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=target, name="bounded", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise ValueError(message)
    if "error" in box:
        raise box["error"]
    return box.get("value")


def check_ray(address: str | None) -> None:
    """Check, before any work, that the Ray backend can run: Ray is installed and, when an
    ``address`` ``host:port`` (or ``ray://host:port``) is given, something listens there
    (a TCP connection within :data:`RAY_CONNECT_TIMEOUT_S`).

    Raises:
        ValueError: one line naming ``--ray-address`` and what to do.
    """
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ValueError("the ray backend needs Ray: pip install 'mesa-lib[ray]' (or pip install ray)") from None
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray-address must be host:port (e.g. 127.0.0.1:6379), ray://host:port or auto; "
                         f"got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise ValueError(f"cannot reach the Ray cluster at --ray-address {address} ({why}, waited at most "
                         f"{RAY_CONNECT_TIMEOUT_S:g} s); check the address (is `ray start --head` running there?) "
                         "or leave --ray-address out to start a local cluster") from None


def _run_ray(todo: Sequence[SweepTask], data: dict, preset: Preset, seed: int, nc: NCConfig, workers: int,
             threads: int, address: str | None, record) -> None:
    import ray

    started = False
    if not ray.is_initialized():
        if address:
            _bounded(lambda: ray.init(address=address), RAY_INIT_TIMEOUT_S,
                     f"could not connect to the Ray cluster at --ray-address {address} within "
                     f"{RAY_INIT_TIMEOUT_S:g} s; check the address (is `ray start --head` running there?) or "
                     "leave --ray-address out to start a local cluster")
        else:
            ray.init(num_cpus=workers, include_dashboard=False)
        started = True
    try:
        gpus = 1 if torch.cuda.is_available() else 0
        remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=1)(_work)
        task_data = {**data, "threads": threads}
        pending = [remote.remote(t, task_data, preset, seed, nc) for t in todo]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                record(ray.get(ref))
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------- reading results

METHODS = {"backdoored": "attack, no defense", "mesa": "MESA", "point": "point baseline (best of k)",
           "nc": "Neural Cleanse", "random": "random patches (control)", "oracle": "oracle (true trigger)"}
"""The models of a sweep line, in table order, with their display names."""

ARMS = {"mesa": "MESA", "point": "point, best of k", "point_median": "point, median start",
        "point_worst": "point, worst start", "nc": "Neural Cleanse", "random": "random patches (control)",
        "oracle": "oracle (true trigger)"}
"""The defenses a summary reports; ``point`` is the start ranked best on the defender's check half,
``point_median`` / ``point_worst`` the starts it ranks in the middle and last (headline protocol
only; :func:`arm_result`)."""


def load_sweep(path: str | Path) -> list[dict]:
    """The finished lines of a sweep file, sorted by pattern key (the file is not modified;
    a half-written last line of a running sweep is ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sweep results at {path}; run `python -m mesa_lib sweep --out {path}` first")
    done = read_finished(path, repair=False)
    return [done[k] for k in sorted(done)]


def arm_result(line: dict, arm: str, protocol: str = "headline") -> dict | None:
    """One arm's numbers on one line: ``{"asr", "clean_acc", "target_recall", "residual"}``
    (None where the line does not have it). ``point_median`` / ``point_worst`` are actual
    starts of the point baseline (headline protocol), ranked as ``point`` is, by the defender's
    own score -- their ASR on the held-out check half before retraining
    (``line["point_search"]["check_asr"]``), never by the evaluation split: the worst is the
    lowest-scored start, the median the start ranked ``k // 2 + 1`` of ``k`` from the top (of
    four starts, the second best: of the two middle starts the one the defender ranks
    higher)."""
    if arm in ("backdoored", "clean"):
        return line.get(arm)
    src = line if protocol == "headline" else line.get("second", {})
    if arm in ("point_median", "point_worst"):
        starts = src.get("point_starts")
        if not starts:
            return None
        return starts[ranked_start(line["point_search"]["check_asr"], "median" if arm == "point_median" else "worst")]
    return src.get(arm)


def ranked_start(check_asr: Sequence[float], which: str) -> int:
    """The index of the ``"best"``, ``"median"`` or ``"worst"`` point start by the defender's
    check score (ties broken by the lower index, as ``argmax`` breaks them for the best)."""
    order = sorted(range(len(check_asr)), key=lambda i: (-check_asr[i], i))
    if which == "best":
        return order[0]
    if which == "worst":
        return order[-1]
    if which == "median":
        return order[(len(order) - 1) // 2]
    raise ValueError(f"which must be 'best', 'median' or 'worst', got {which!r}")


def _stats(values: Sequence[float]) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    return {"min": float(t.min()), "median": float(median(t)), "max": float(t.max()), "mean": float(t.mean())}


def summarize(lines: Sequence[dict], protocol: str = "headline") -> dict:
    """Per arm over the lines (one protocol): the attacker's ASR, the residual valid set
    (mean ASR over the patterns that fired on the backdoored model, and how many patterns
    still fire), the clean-accuracy change against the backdoored model and the target's
    recall, each as min / median / max / mean; plus detection under the book's rule
    (:data:`~mesa_lib.detect.RULE`) for MESA's scan and Neural Cleanse."""
    if not lines:
        raise ValueError("no sweep lines to summarize; is the sweep file empty?")
    out: dict = {"n": len(lines), "protocol": protocol, "methods": {}}
    for arm, name in {"backdoored": "attack, no defense", "clean": "clean model", **ARMS}.items():
        have = [(l, r) for l in lines if (r := arm_result(l, arm, protocol)) is not None]
        if not have:
            continue
        entry = {"name": name, "n": len(have), "asr": _stats([r["asr"] for _, r in have])}
        if all("residual" in r for _, r in have):
            entry["residual"] = _stats([r["residual"]["mean_fired_before"] for _, r in have])
            entry["fired"] = _stats([r["residual"]["fired"] for _, r in have])
        entry["clean_acc_change"] = _stats([r["clean_acc"] - l["backdoored"]["clean_acc"] for l, r in have])
        if all(r.get("target_recall") is not None for _, r in have):
            entry["target_recall"] = _stats([r["target_recall"] for _, r in have])
        out["methods"][arm] = entry
    target = [l["config"]["target"] for l in lines]
    out["detection"] = {
        "rule": RULE,
        "mesa_hits": sum(l["detection"]["detected_target"] == t for l, t in zip(lines, target)),
        "mesa_flagged": sum(bool(l["detection"].get("flagged")) for l in lines),
        "nc_hits": sum(l["nc_detection"]["detected_target"] == t for l, t in zip(lines, target) if "nc_detection" in l),
        "nc_flagged": sum(t in l["nc_detection"]["flagged"] for l, t in zip(lines, target) if "nc_detection" in l),
    }
    return out


def bootstrap_ci(values: Sequence[float], level: float = 0.95, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval of the mean of ``values`` (resampled with replacement,
    ``n`` times, seeded)."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if t.numel() == 0:
        raise ValueError("no values to bootstrap")
    g = torch.Generator().manual_seed(seed)
    means = t[torch.randint(0, len(t), (n, len(t)), generator=g)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def sign_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """The paired sign test of ``a < b``: how many pairs have ``a`` lower, higher, tied, and the
    exact two-sided binomial p-value over the untied pairs."""
    import math

    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} and {len(b)}")
    lower = sum(x < y for x, y in zip(a, b))
    higher = sum(x > y for x, y in zip(a, b))
    m, k = lower + higher, min(lower, higher)
    p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m) if m else 1.0
    return {"lower": lower, "higher": higher, "ties": len(a) - m, "p": p}


# ---------------------------------------------------------------- the clean-model control


def control_line(seed: int, splits: DatasetSplits, preset: Preset | str = "fast", nc: NCConfig | None = None,
                 progress: bool = False) -> dict:
    """Detection on a CLEAN model (trained with ``seed``): MESA's scan and Neural Cleanse exactly
    as in the sweep (search half / check half of the modelling split), and whether the book's
    rule (:data:`~mesa_lib.detect.RULE`) or NC's flag would call it backdoored: a false positive."""
    from .detect import defender_halves
    from .pipeline import detect_target, provenance

    preset = get_preset(preset)
    nc = _nc_config(preset, nc)
    t0 = time.perf_counter()
    clean = get_clean_model(splits, preset, seed, use_cache=True, progress=progress)
    search, check = defender_halves(splits.model, seed)
    det = detect_target(clean, search, check, preset, seed, progress)
    ncd = detect_backdoor(reverse_engineer_masks(clean, search, nc, seed=seed, progress=progress)).to_dict()
    cfg = {**provenance(splits, preset, seed, splits.device), "nc": nc.to_dict()}
    return {"seed": seed, "clean_acc": clean_accuracy(clean, splits.eval),
            "detection": det, "nc_detection": ncd, "mesa_false_positive": bool(det["flagged"]),
            "nc_false_positive": bool(ncd["flagged"]), "seconds": round(time.perf_counter() - t0, 1), "config": cfg}


def _control_work(seed: int, data: dict, preset: Preset, nc: NCConfig) -> dict:
    return control_line(seed, _worker_splits(data), preset, nc)


def run_clean_controls(dataset: str = "fashion-mnist", seeds: Sequence[int] = range(10), preset: Preset | str = "fast",
                       out: str | Path = "results/clean_controls.json", workers: int = 1, root: str | Path | None = None,
                       nc: NCConfig | None = None, progress: bool = True, device: str | None = None) -> dict:
    """The false-positive control: :func:`control_line` for clean models of every seed (in
    ``workers`` local processes, computing on ``device``: default CUDA when available, else
    the CPU), written to ``out`` as one JSON file with the rates."""
    preset = get_preset(preset)
    nc = _nc_config(preset, nc)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be a positive integer (>= 1), got {workers!r}")
    seeds = [check_seed(s, "--seeds") for s in seeds]
    if not seeds:
        raise ValueError("--seeds names no seed; give a range like 0-9 or a comma list like 0,1,2")
    out = check_writable(out)
    dev = pick_device(device)
    find_data_root(dataset, root)  # missing data: refused here, not in a worker
    t0 = time.perf_counter()
    data = {"dataset": dataset, "root": None if root is None else str(root), "device": str(dev),
            "train_limit": None, "light": False}
    threads = work_threads("local", workers, dev)
    lines = []
    with _worker_pool(workers, threads, data) as pool:
        for line in pool.map(_control_work, seeds, [data] * len(seeds), [preset] * len(seeds), [nc] * len(seeds)):
            lines.append(line)
            if progress:
                print(f"clean seed {line['seed']}: MESA scan top ASR {max(line['detection']['per_class_asr']):.1%}, "
                      f"index {line['detection']['anomaly_index']:.1f}, flagged {line['mesa_false_positive']}; "
                      f"NC flagged {line['nc_detection']['flagged']} ({line['seconds']:.0f} s)", flush=True)
    result = {"rule": RULE, "n": len(lines), "mesa_false_positives": sum(l["mesa_false_positive"] for l in lines),
              "nc_false_positives": sum(l["nc_false_positive"] for l in lines), "lines": lines,
              "wall_s": round(time.perf_counter() - t0, 1), "workers": workers, "threads": threads,
              "code": code_fingerprint(), "git": git_state()}
    write_json(result, out)
    return result
