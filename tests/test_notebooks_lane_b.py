"""The other half of the book's notebooks (``scripts/notebooks.py``'s ``LANE_B``), executed once
each like those of ``tests/test_notebooks.py``. A file of its own, so that ``make test``'s
``--dist loadfile`` runs it in the second pytest-xdist worker while the first runs the other
half."""

from __future__ import annotations

import pytest
from test_notebooks import NOTEBOOKS, notebooks, run_chapter

LANE_B = [p for p in NOTEBOOKS if p.stem in notebooks.LANE_B]


@pytest.mark.notebook
@pytest.mark.parametrize("path", LANE_B, ids=[p.stem for p in LANE_B])
def test_notebook(path):
    run_chapter(path)
