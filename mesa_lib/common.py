"""Shared helpers that every stage may use: the package version, the code fingerprint,
atomic file writes and the torch thread count.

This is the lowest module of :mod:`mesa_lib`: it imports nothing from the package, so any
stage can import it without a cycle.

The *code fingerprint* names the exact source of the package that is running. The model
cache keys on it (changing a line of training code misses the cache) and every results line
records it, so a committed number can be traced to the code that made it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import torch

__all__ = [
    "median",
    "__version__",
    "PACKAGE_DIR",
    "code_fingerprint",
    "git_state",
    "atomic_write_bytes",
    "atomic_write_text",
    "DiskFullError",
    "write_all",
    "torch_threads",
    "thread_count",
    "check_writable",
    "check_new_file",
    "seeded",
]

__version__ = "0.1.0"

PACKAGE_DIR = Path(__file__).resolve().parent
"""The directory of the running ``mesa_lib`` sources."""


@lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """A 16-hex-digit SHA-256 over every ``.py`` file of the running package (paths and
    bytes, in sorted order). Any edit of the package's source changes it; a reinstall or a
    new clone of the same source does not."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(PACKAGE_DIR).as_posix()
        if "__pycache__" in rel:
            continue
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def git_state() -> dict:
    """``{"commit": <short hash or None>, "dirty": <bool or None>}`` of the git checkout the
    package runs from (``None`` outside a checkout, e.g. an installed wheel). ``dirty`` says
    whether the package's own sources differ from the commit."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PACKAGE_DIR, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=PACKAGE_DIR,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip() or None, "dirty": bool(dirty.stdout.strip())}


class DiskFullError(OSError):
    """Writing ``filename`` failed because its disk (or quota) is full; what was there before
    is unchanged (the write was rolled back). The CLI turns it into one line."""


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_all(f, data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to the open binary file ``f`` and make it durable (flush + fsync).
    A full disk (``ENOSPC``/``EDQUOT``) is raised as :class:`DiskFullError` naming ``path``."""
    try:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(err.errno, os.strerror(err.errno), str(path)) from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never
    half of one: write a uniquely named temporary file beside it, flush it to disk, then
    rename it over ``path``. Two processes writing the same path both succeed (the last
    rename wins). A symlink is followed (its target is written, the link stays). A new file
    gets the permissions the umask gives (``0o666 & ~umask``), an existing one keeps its own
    (``mkstemp`` alone would make every file ``0600``). A full disk raises
    :class:`DiskFullError` and leaves ``path`` as it was."""
    path = Path(path).expanduser()
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write_all(f, data, path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def thread_count(device: torch.device | str = "cpu") -> int | None:
    """The torch CPU thread count where it changes results (training on the CPU sums in
    a thread-dependent order), else ``None`` (on a GPU it does not matter)."""
    return torch.get_num_threads() if torch.device(device).type == "cpu" else None


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (``None``: unchanged), then restore."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_writable(out: str | os.PathLike) -> Path:
    """Check, without touching it, that a results file ``out`` can be written -- before any
    work is done, so a run is never lost at its end.

    ``out`` must not be a directory; its nearest existing ancestor must be a directory that
    this process may write in (missing folders below it are created when writing); an
    existing ``out`` must itself be writable. The file is neither read nor modified.

    Raises:
        ValueError: one line saying what is wrong and what to do.
    """
    path = Path(out).expanduser()
    if path.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name, e.g. --out {path / 'results.json'}")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--out {out}: {ancestor} is a file, not a folder; choose a path inside a folder")
    if path.exists() and not path.is_file():
        raise ValueError(f"--out {out} is not a regular file (a device, pipe or socket); give the name of a "
                         "results file, e.g. --out results.json")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"--out {out} is not writable (permission denied); choose another file or fix its permissions")
    if not path.exists() and not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot create files in {ancestor} (read-only or permission denied); "
                         "choose a writable folder")
    return path


def check_new_file(out: str | os.PathLike, force: bool = False, option: str = "--out") -> Path:
    """Check that writing the results file ``out`` replaces nothing: it must not exist yet,
    unless ``force`` says that replacing it is meant. A command only ever creates a results
    file or appends to it; this is the check of the commands that write a whole file
    (``run``, ``clean-controls``). Also checks that ``out`` can be written
    (:func:`check_writable`). The file is neither read nor modified.

    Raises:
        ValueError: one line naming ``option`` and ``--force``.
    """
    path = check_writable(out)
    if not force and (path.exists() or path.is_symlink()):
        raise ValueError(f"{option} {out} already exists and would be replaced; give a new file name, or pass "
                         "--force to replace it")
    return path


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global CPU random generator seeded by ``seed`` -- for the
    one thing that draws from it, the default initialisation of a network's weights -- and
    give the caller's generator state back afterwards, so that no function of the package
    changes global random state behind the caller's back."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def median(values: torch.Tensor) -> torch.Tensor:
    """The median of a 1-D tensor as statistics defines it: for an even count, the mean of the
    two middle values (``torch.median`` returns the lower one, which biases a MAD-based
    anomaly index over 10 classes)."""
    t = torch.as_tensor(values)
    if t.numel() == 0:
        raise ValueError("the median of no values is undefined")
    return torch.quantile(t.double().flatten(), 0.5)
