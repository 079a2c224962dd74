"""The instructor guide matches the assignment: its points table is the notebook's nbgrader
metadata, and every checker message it quotes is one the checkers really print."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import nbformat

from mesa_lib.classroom.rubric import END, START, items, points_table

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "book" / "instructor_guide.md"
NOTEBOOK = ROOT / "book" / "10_exercises.ipynb"


def test_points_table_is_generated_from_the_notebook():
    text = GUIDE.read_text()
    table = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert table == points_table(NOTEBOOK), "run: python scripts/make_rubric.py"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_rubric.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_points_table_equals_the_nbgrader_points():
    """Read the table back and compare it with the points in the cells' nbgrader metadata."""
    text = GUIDE.read_text()
    table = text.split(START, 1)[1].split(END, 1)[0]
    rows = [r.split("|")[1:-1] for r in table.strip().splitlines()[2:]]
    listed = {r[3].strip("` ").replace("check_", ""): float(r[4]) for r in rows if r[0].strip().isdigit()}
    nb = nbformat.read(NOTEBOOK, as_version=4)
    meta = {}
    for cell in nb.cells:
        g = cell.metadata.get("nbgrader", {})
        if g.get("grade") and cell.cell_type == "code":
            checker = re.search(r"^check_(\w+)\(", cell.source, re.M).group(1)
            meta[checker] = float(g["points"])
    assert listed == meta
    total = re.search(r"\*\*Total\*\* \| \| \| \*\*([\d.]+)\*\*", table)
    assert float(total.group(1)) == sum(meta.values()) == sum(i.points for i in items(nb))


def _checker_strings() -> list[str]:
    out = []
    for mod in ("checks.py", "grading.py"):
        tree = ast.parse((ROOT / "mesa_lib" / "classroom" / mod).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append(node.value)
    return out


def test_common_mistakes_quote_real_messages():
    section = GUIDE.read_text().split("## Common mistakes", 1)[1]
    quotes = re.findall(r'"([^"]+)"', section.replace("\n  ", " "))
    assert len(quotes) >= 30
    strings = _checker_strings()
    for q in quotes:
        assert any(q in s for s in strings), f"not a checker message: {q!r}"


def test_guide_links_the_projects_page_and_every_chapter():
    text = GUIDE.read_text()
    assert "{doc}`projects`" in text and (ROOT / "book" / "projects.md").is_file()
    for ch in ("02_backdoor", "03_one_or_many", "04_staircase", "05_mine", "06_training", "07_detection",
               "08_defense", "09_reproduction"):
        assert f"{{doc}}`{ch}`" in text


def test_schedule_points_are_the_sums_of_its_items():
    """The schedule's Points column types sums of the rubric's points: each row's must be the
    sum over the items it names (``a-b:``), and the rows must cover every item once."""
    rows = [r.split("|")[1:-1] for r in GUIDE.read_text().split("## A suggested schedule", 1)[1]
            .split("\n## ", 1)[0].splitlines() if r.startswith("| ") and re.search(r"\| \d+-\d+:", r)]
    points = [i.points for i in items(NOTEBOOK)]
    covered = []
    for row in rows:
        a, b = map(int, re.search(r"(\d+)-(\d+):", row[2]).groups())
        assert float(row[3]) == sum(points[a - 1:b]), row
        covered += range(a, b + 1)
    assert covered == list(range(1, len(points) + 1))


def test_the_capstone_cost_quotes_the_benchmark_records():
    """The capstone section's cost sentence is Markdown (no glue): every number in it must be
    the one the committed benchmark records hold, so a re-measured build fails this test until
    the sentence is updated."""
    import json

    text = GUIDE.read_text()
    cost = text.split("**Cost.**", 1)[1].split("**Rubric", 1)[0]
    build = json.loads((ROOT / "bench" / "results" / "zoo_build_cpu.json").read_text())
    game = json.loads((ROOT / "bench" / "results" / "zoo_game_cpu.json").read_text())
    want = {f"{build['n']}-model", f"{build['cpu_min']:.1f} CPU-minutes", f"{build['wall_s'] / 60:.0f} minutes",
            f"{build['ratio_to_shared_bases']['ratio_user_cpu']:g} times",
            f"{build['ratio_to_shared_bases']['bases']}-shared-base",
            f"AUROC {build['norm_baseline']['auroc']:.3f}",
            f"{build['norm_baseline']['targets_correct']}/{build['norm_baseline']['n_backdoored']} targets",
            f"{game['reference']['user_cpu_s']:g} CPU-seconds"}
    flat = " ".join(cost.split())
    assert all(w in flat for w in want), [w for w in want if w not in flat]
    quoted = set(re.findall(r"\d+(?:\.\d+)?", flat))
    allowed = set(re.findall(r"\d+(?:\.\d+)?", " ".join(want))) | {"100", "20", "4"}
    assert quoted <= allowed, f"numbers in the cost sentence that no record holds: {quoted - allowed}"
