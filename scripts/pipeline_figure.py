#!/usr/bin/env python
"""Draw chapter 1's map of the book: the stages of the method, the chapter that teaches each
one and the ``mesa_lib`` module that implements it (``book/figures/pipeline.svg``).

    python scripts/pipeline_figure.py            # (re)write the figure
    python scripts/pipeline_figure.py --check    # exit 1 if the committed figure differs

The SVG is deterministic (no date, fixed ids), so ``--check`` can compare bytes.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "book" / "figures" / "pipeline.svg"

# (title, what happens, chapters, modules), in the order the data flows
STAGES = [
    ("Attack", "poison part of\neach batch: stamp\na 3x3 trigger and\nrelabel as target", "ch. 2", "data, triggers,\nmodels, attack"),
    ("Trigger space", "many of the 512\npatterns fire the\nbackdoor, not only\nthe attacker's", "ch. 3", "triggers,\nevaluate"),
    ("MESA", "a staircase of\ngenerators: hinge\nat beta + alpha x MI\n(MINE) per step", "ch. 4-6", "toy, mine,\nmesa"),
    ("Detect", "search triggers\ntoward every class;\nthe target\nstands out", "ch. 7", "detect,\nneural_cleanse"),
    ("Defend", "retrain on images\nstamped with\nsampled triggers,\ntrue labels kept", "ch. 8", "defense,\nbaselines"),
    ("Evaluate", "51 patterns: ASR,\nthe 512-pattern\nresidual, controls,\nseeds", "ch. 9", "sweep,\nevaluate"),
]


def draw() -> bytes:
    plt.rcParams["svg.hashsalt"] = "mesa-book"
    fig, ax = plt.subplots(figsize=(12, 3.3))
    ax.set_xlim(0, len(STAGES) * 2)
    ax.set_ylim(0, 3.1)
    ax.axis("off")
    for i, (title, what, chapters, modules) in enumerate(STAGES):
        x = i * 2 + 0.12
        ax.add_patch(FancyBboxPatch((x, 0.75), 1.66, 2.15, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    facecolor="#eef3fb" if title != "MESA" else "#fdf1e3",
                                    edgecolor="#35557f" if title != "MESA" else "#b36b00", linewidth=1.4))
        ax.text(x + 0.83, 2.62, title, ha="center", va="center", fontsize=12, fontweight="bold")
        ax.text(x + 0.83, 2.35, chapters, ha="center", va="center", fontsize=9, color="#555555")
        ax.text(x + 0.83, 1.55, what, ha="center", va="center", fontsize=8.6, linespacing=1.3)
        ax.text(x + 0.83, 0.38, modules, ha="center", va="center", fontsize=8, family="monospace",
                color="#35557f", linespacing=1.2)
        if i < len(STAGES) - 1:
            ax.add_patch(FancyArrowPatch((x + 1.7, 1.83), (x + 2.08, 1.83), arrowstyle="-|>",
                                         mutation_scale=14, color="#35557f", linewidth=1.4))
    ax.text(0.02, 0.02, "mesa_lib modules", fontsize=7.5, color="#777777", family="monospace")
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed figure differs")
    args = ap.parse_args(argv)
    svg = draw()
    if args.check:
        same = OUT.is_file() and OUT.read_bytes() == svg
        if not same:
            print(f"{OUT.relative_to(ROOT)} is not what scripts/pipeline_figure.py draws; run it", file=sys.stderr)
        return 0 if same else 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(svg)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(svg)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
