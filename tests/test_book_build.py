"""Checks of the book's sources that need no build: vendored JavaScript and README numbers."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_vendored_javascript_matches_its_audit_list():
    """book/_static's MathJax and widget renderer are exactly the files listed (with their
    SHA-256) in SHA256SUMS, which scripts/vendor_js.sh checks against npm's pinned tarballs."""
    r = subprocess.run(["bash", str(ROOT / "scripts" / "vendor_js.sh"), "--verify"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_readme_results_are_generated_from_the_committed_files():
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_results.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_pipeline_figure_is_what_its_script_draws():
    """Chapter 1's figure is generated (scripts/pipeline_figure.py), not edited by hand."""
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "pipeline_figure.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
