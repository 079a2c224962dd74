"""The instructor's version of the book: every solution shown, the instructor guide in the toc.

The published book (``make book``, ``_config.yml``) hides the solutions (sphinx-exercise's
``hide_solutions: true``) and leaves the instructor guide out of its table of contents. This
script writes the two files of the solved version next to the build, from the public ones (so
they are never edited twice):

* ``_build/instructor/_config.yml``: ``_config.yml`` with ``hide_solutions: false`` and the
  notebooks' outputs taken from the same jupyter-cache as the public build;
* ``_build/instructor/_toc.yml``: ``_toc.yml`` with ``book/instructor_guide`` in the
  Classroom part;

and builds the book with them into ``_build/instructor/_build/html`` (``--write-only`` writes
the two files and stops). ``make book-instructor`` runs it after executing the notebooks.
Keep that build off any public web server: it is the answer key.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "_build" / "instructor"
GUIDE = "book/instructor_guide"


def instructor_config(public: dict) -> dict:
    """``public`` with the solutions shown and the public build's notebook cache."""
    cfg = yaml.safe_load(yaml.safe_dump(public))  # a deep copy
    cfg["title"] = cfg.get("title", "") + " (instructor version, with solutions)"
    sph = cfg.setdefault("sphinx", {})
    sph.setdefault("config", {})["hide_solutions"] = False
    # jupyter-book puts a local extension's folder on sys.path relative to the config file: this
    # one lives elsewhere, so the folders become absolute
    sph["local_extensions"] = {name: str((ROOT / path).resolve()) if not Path(path).is_absolute() else path
                               for name, path in (sph.get("local_extensions") or {}).items()}
    cfg.setdefault("execute", {})["cache"] = str(ROOT / "_build" / ".jupyter_cache")
    return cfg


def instructor_toc(public: dict) -> dict:
    """``public`` with the instructor guide after the last page of the Classroom part."""
    toc = yaml.safe_load(yaml.safe_dump(public))
    for part in toc.get("parts", []):
        if part.get("caption") == "Classroom":
            files = [c.get("file") for c in part["chapters"]]
            if GUIDE not in files:
                part["chapters"].append({"file": GUIDE})
            return toc
    raise SystemExit("error: _toc.yml has no 'Classroom' part to put the instructor guide in")


def write(out: Path = OUT) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    cfg, toc = out / "_config.yml", out / "_toc.yml"
    cfg.write_text(yaml.safe_dump(instructor_config(yaml.safe_load((ROOT / "_config.yml").read_text())),
                                  sort_keys=False))
    toc.write_text(yaml.safe_dump(instructor_toc(yaml.safe_load((ROOT / "_toc.yml").read_text())),
                                  sort_keys=False))
    return cfg, toc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write-only", action="store_true", help="write the config and toc, do not build")
    args = ap.parse_args(argv)
    cfg, toc = write()
    if args.write_only:
        print(f"wrote {cfg} and {toc}")
        return 0
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(ROOT), "--config", str(cfg),
           "--toc", str(toc), "--path-output", str(OUT), "-W", "-n", "--keep-going"]
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode == 0:
        print(f">> instructor book built: open {OUT / '_build' / 'html' / 'index.html'} (keep it private)")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
