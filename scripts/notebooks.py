"""Execute the book's notebooks exactly once, into the cache the book build reads.

``make test`` and ``make book`` run every notebook of ``_toc.yml`` here (``make test``
through ``tests/test_notebooks.py``, one pytest test per notebook); the strict
``jupyter-book build`` then runs with ``execute_notebooks: cache`` and takes the executed
outputs from the jupyter-cache at ``_build/.jupyter_cache`` -- the same cache, the same
matching and the same execution (nbclient, with widget state) that myst-nb uses itself. So
each notebook runs once per command, and what the HTML shows is what the tests checked.

A cell that raises fails its notebook with the cell's traceback; a cell that runs longer
than ``MESA_CELL_TIMEOUT`` seconds (default 1200) fails with a message naming it. The
per-notebook times go to ``_build/notebook_times.json``.

    python scripts/notebooks.py            # execute every notebook of the toc (2 side by side)
    python scripts/notebooks.py --jobs 1   # one after another
    python scripts/notebooks.py book/05_mine.ipynb
    python scripts/notebooks.py --check-cached   # exit 1 unless every notebook is cached
    python scripts/notebooks.py --force    # execute every notebook, even those up to date

A notebook is *up to date*, and is not executed again, when the cache holds an executed match of
it (jupyter-cache matches the code cells) and nothing else it reads has changed since: the
notebook file itself, the package's source (its code fingerprint), the committed results under
``book/results/``, the torch version and the ``MESA_*`` settings of the environment (the inputs
recorded in ``_build/notebook_inputs.json`` when it was executed). ``make book`` on a finished
build therefore executes nothing; ``make book FORCE=1`` (``--force``) executes every notebook.
    MESA_STRICT_DEVICE=0 python scripts/notebooks.py --jobs 4 --executed /tmp/nb   # on a GPU

``--executed DIR`` also writes each executed notebook to ``DIR`` (a new folder, or one without
notebooks of these names: nothing is overwritten).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mesa_lib.common import atomic_write_text  # noqa: E402
CACHE = ROOT / "_build" / ".jupyter_cache"
TIMES = ROOT / "_build" / "notebook_times.json"
INPUTS = ROOT / "_build" / "notebook_inputs.json"
DEFAULT_TIMEOUT_S = 1200

STRICT_DEVICE = {"02_backdoor", "03_one_or_many", "04_staircase", "05_mine", "06_training", "07_detection",
                 "08_defense", "10_exercises", "11_capstone"}
"""Notebooks executed with ``MESA_STRICT_DEVICE=1`` (mesa_lib.devicecheck's simulated device:
``.numpy()`` on a device tensor or host/device mixing fails here as on a GPU) in their one
execution: every chapter but 09, whose live check re-runs sweep lines in worker processes of
their own (the simulated device lives in one process); ``make test-device`` runs them all."""


LANE_B = ("08_defense", "06_training", "07_detection", "05_mine", "04_staircase")
"""The notebooks that ``make test`` executes in its second pytest-xdist worker
(``tests/test_notebooks_lane_b.py``; the others are in ``tests/test_notebooks.py``, and
``--dist loadfile`` gives each file to one worker). The two halves took about equal time in a
fresh-clone CI run at one thread each: 09, 02, 03, 10, 11 about 370 s; 08, 06, 07, 05, 04 about
340 s."""


def toc_notebooks(root: Path = ROOT) -> list[Path]:
    """The notebooks of ``_toc.yml``, in reading order."""
    import yaml

    toc = yaml.safe_load((root / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [c["file"] for c in part.get("chapters", [])]
    return [root / f"{f}.ipynb" for f in files if (root / f"{f}.ipynb").is_file()]


def cell_timeout() -> int:
    raw = os.environ.get("MESA_CELL_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"MESA_CELL_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise SystemExit(f"MESA_CELL_TIMEOUT must be positive, got {value}")
    return value


class NotebookFailed(Exception):
    """A notebook's cell raised or ran out of time; the message says which and why."""


def run(path: Path, timeout: int | None = None) -> tuple[object, float]:
    """Execute one notebook (working directory: its folder, like myst-nb); returns the executed
    notebook and its execution time in seconds. Raises :class:`NotebookFailed` on an error or a
    timeout. Stores nothing: :func:`store` puts the result into the cache."""
    import nbformat
    from jupyter_cache.executors.utils import single_nb_execution
    from nbclient.exceptions import CellTimeoutError

    timeout = timeout or cell_timeout()
    path = Path(path).resolve()
    nb = nbformat.read(path, as_version=4)
    # MESA_STRICT_DEVICE=0 turns the simulated device off (on a real GPU, say, where the real
    # device is the check)
    strict = path.stem in STRICT_DEVICE and os.environ.get("MESA_STRICT_DEVICE") != "0"
    saved = os.environ.get("MESA_STRICT_DEVICE")
    if strict:
        os.environ["MESA_STRICT_DEVICE"] = "1"  # the kernel inherits it
    try:
        result = single_nb_execution(nb, cwd=str(path.parent), timeout=timeout, allow_errors=False,
                                     meta_override=True)
    finally:
        if strict:
            if saved is None:
                os.environ.pop("MESA_STRICT_DEVICE")
            else:
                os.environ["MESA_STRICT_DEVICE"] = saved
    if result.err is not None:
        if isinstance(result.err, CellTimeoutError):
            raise NotebookFailed(
                f"{path.name}: a cell ran longer than the per-cell timeout of {timeout} s "
                "(set MESA_CELL_TIMEOUT to allow more on a slow machine)\n" + str(result.err)[:2000])
        raise NotebookFailed(f"{path.name}: a cell raised an error\n{result.err}")
    return nb, result.time


def store(path: Path, nb, seconds: float, cache_path: Path | None = None, stamp: str | None = None) -> None:
    """Put an executed notebook into the jupyter-cache (replacing an older record of it) and
    record its time and its inputs (``stamp``, taken before it ran: :func:`inputs_stamp`)."""
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    import fcntl

    path = Path(path).resolve()
    cache_path = Path(cache_path or CACHE)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    # one writer at a time: under pytest-xdist two workers may finish a notebook together
    with open(cache_path.with_name(cache_path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = get_cache(str(cache_path))
        record = cache.add_nb_to_project(str(path))
        cache.cache_notebook_bundle(CacheBundleIn(nb, record.uri, data={"execution_seconds": seconds}),
                                    check_validity=False, overwrite=True)
        _record_time(path, seconds)
        if stamp is not None and (cache_path == CACHE.resolve() or cache_path == CACHE):
            _record_inputs(path, stamp)


def inputs_stamp(path: Path) -> str:
    """A hash of everything a notebook reads besides its code cells: its own file, the package's
    code fingerprint, the committed results, the torch version and the ``MESA_*`` environment."""
    import hashlib

    from mesa_lib.common import code_fingerprint

    h = hashlib.sha256(Path(path).read_bytes())
    h.update(code_fingerprint().encode())
    results = ROOT / "book" / "results"
    for f in sorted(results.rglob("*")) if results.is_dir() else []:
        if f.is_file() and not f.name.endswith(".lock"):
            h.update(f.relative_to(results).as_posix().encode() + b"\0" + f.read_bytes())
    try:
        from importlib.metadata import version

        h.update(version("torch").encode())
    except Exception:  # noqa: BLE001 -- no torch metadata: the stamp just lacks it
        pass
    for key in sorted(k for k in os.environ if k.startswith("MESA_") and k != "MESA_CACHE_DIR"):
        h.update(f"{key}={os.environ[key]}".encode())
    return h.hexdigest()[:16]


def _record_inputs(path: Path, stamp: str) -> None:
    try:
        stamps = json.loads(INPUTS.read_text()) if INPUTS.is_file() else {}
    except ValueError:
        stamps = {}
    stamps[Path(path).resolve().relative_to(ROOT).as_posix()] = stamp
    atomic_write_text(INPUTS, json.dumps(stamps, indent=1, sort_keys=True))


def up_to_date(paths: list[Path], cache_path: Path | None = None) -> list[Path]:
    """The notebooks of ``paths`` whose executed copy in the cache still stands: a cached match,
    and the inputs recorded when it was executed equal to today's (:func:`inputs_stamp`)."""
    try:
        stamps = json.loads(INPUTS.read_text()) if INPUTS.is_file() else {}
    except ValueError:
        stamps = {}
    missing = set(uncached(paths, cache_path)) if (Path(cache_path or CACHE)).exists() else set(paths)
    return [p for p in paths if p not in missing
            and stamps.get(Path(p).resolve().relative_to(ROOT).as_posix()) == inputs_stamp(p)]


def execute(path: Path, cache_path: Path | None = None, timeout: int | None = None) -> float:
    """Execute one notebook and store it in the jupyter-cache; returns its time in seconds."""
    stamp = inputs_stamp(path)
    nb, seconds = run(path, timeout)
    store(path, nb, seconds, cache_path, stamp)
    return seconds


def _record_time(path: Path, seconds: float) -> None:
    path = Path(path).resolve()
    try:
        times = json.loads(TIMES.read_text()) if TIMES.is_file() else {}
    except ValueError:
        times = {}
    times[path.relative_to(ROOT).as_posix()] = {"seconds": round(seconds, 1), "cores": os.cpu_count(),
                                                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_text(TIMES, json.dumps(times, indent=1, sort_keys=True))


def uncached(paths: list[Path], cache_path: Path | None = None) -> list[Path]:
    """The notebooks of ``paths`` for which the cache holds no executed match."""
    import nbformat
    from jupyter_cache import get_cache

    cache = get_cache(str(cache_path or CACHE))
    missing = []
    for p in paths:
        try:
            cache.match_cache_notebook(nbformat.read(p, as_version=4))
        except KeyError:
            missing.append(p)
    return missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook of _toc.yml")
    ap.add_argument("--jobs", type=int, default=None,
                    help="notebooks executed side by side after the first (default: 2 on a machine with 2 or "
                         "more cores, else 1)")
    ap.add_argument("--check-cached", action="store_true",
                    help="execute nothing; exit 1 if a notebook has no executed copy in the cache")
    ap.add_argument("--force", action="store_true",
                    help="execute every notebook, also those whose cached copy is up to date")
    ap.add_argument("--executed", type=Path, default=None, metavar="DIR",
                    help="also write each executed notebook to DIR (refuses to overwrite one there)")
    args = ap.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or toc_notebooks()
    if args.executed is not None:
        clash = [p.name for p in paths if (args.executed / p.name).exists()]
        if clash:
            raise SystemExit(f"--executed {args.executed} already holds {', '.join(clash)}: "
                             "name an empty folder (nothing there is overwritten)")
        args.executed.mkdir(parents=True, exist_ok=True)
    if args.check_cached:
        missing = uncached(paths)
        for p in missing:
            print(f"not executed: {p.relative_to(ROOT)} (run `python scripts/notebooks.py` first)", file=sys.stderr)
        return 1 if missing else 0
    if not args.force and args.executed is None:
        fresh = up_to_date(paths)
        for p in fresh:
            print(f"   {p.relative_to(ROOT)}: up to date (nothing it reads changed; --force re-runs it)", flush=True)
        paths = [p for p in paths if p not in fresh]
        if not paths:
            print(">> every notebook is up to date: nothing to execute", flush=True)
            return 0
    stamps = {p: inputs_stamp(p) for p in paths}
    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    if jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {jobs}")
    failed = 0

    def done(p: Path, outcome) -> None:
        nonlocal failed
        if isinstance(outcome, NotebookFailed):
            failed += 1
            print(f"FAILED {outcome}", file=sys.stderr, flush=True)
        else:
            nb, seconds = outcome
            store(p, nb, seconds, stamp=stamps[p])
            if args.executed is not None:
                import nbformat

                nbformat.write(nb, args.executed / p.name)
            print(f"   {p.relative_to(ROOT)}: {seconds:.1f} s", flush=True)

    # the first notebook trains the shared classifiers into the model cache, which the others
    # then read (run side by side on a cold cache, each would train them again), so they wait
    # for it. Side by side, every kernel uses cores // jobs torch threads -- the first one too:
    # the cache keys a model by its thread count, so all chapters must train with the same
    # count to share it, and a process with more threads than its share of the cores slows
    # down several times over (OpenMP threads wait on each other).
    first, rest = paths[:1], paths[1:]
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // jobs))  # yours if exported
    if jobs == 1 or not rest:
        for p in paths:
            print(f">> executing {p.relative_to(ROOT)}", flush=True)
            done(p, _outcome(p))
        return 1 if failed else 0
    # The notebooks that share no trained model (CACHE_FREE) start beside the first one; the
    # others wait for it, then go longest first (by the last recorded times) so that the
    # processes finish together. Every process and its kernels use cores // jobs torch threads.
    free = [p for p in rest if p.stem in CACHE_FREE]
    order = sorted((p for p in rest if p not in free), key=lambda p: -_last_seconds(p))
    print(f">> executing {len(paths)} notebooks in {jobs} processes, {threads} torch thread(s) each: "
          f"{', '.join(p.stem for p in first + free)} first", flush=True)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_set_threads, initargs=(threads,)) as pool:
        head = pool.submit(_outcome, first[0])
        futures = {pool.submit(_outcome, p): p for p in free}
        done(first[0], head.result())
        futures.update({pool.submit(_outcome, p): p for p in order})
        for future in as_completed(futures):
            done(futures[future], future.result())
    return 1 if failed else 0


def _outcome(path: Path):
    """``(executed notebook, seconds)``, or the :class:`NotebookFailed` (returned, not raised)."""
    try:
        return run(path)
    except NotebookFailed as err:
        return err


def _set_threads(n: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(n)  # the kernels this worker starts inherit it


#: Notebooks that train no model the others share (chapter 9 reads the committed results and
#: re-derives its live lines in a private, empty model cache): they need not wait for the
#: first notebook, which trains the shared classifiers into the model cache.
CACHE_FREE = ("09_reproduction",)

#: Where no record of times exists yet (a fresh clone), these chapters start first: the slowest
#: in every recorded build (chapter 9 re-derives three sweep lines; chapter 8 retrains six arms).
SLOWEST_FIRST = ("09_reproduction", "08_defense")


def _last_seconds(path: Path) -> float:
    """The notebook's time in the last record (``_build/notebook_times.json``); without a
    record, a large number for :data:`SLOWEST_FIRST`, else 0."""
    path = Path(path).resolve()
    try:
        times = json.loads(TIMES.read_text())
    except (OSError, ValueError):
        times = {}
    key = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    if key in times:
        return float(times[key].get("seconds", 0.0))
    return 1e6 - SLOWEST_FIRST.index(path.stem) if path.stem in SLOWEST_FIRST else 0.0


if __name__ == "__main__":
    sys.exit(main())
