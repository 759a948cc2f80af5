"""The documentation site builds in quick mode: offline, warnings as errors, every tutorial and every page's code
cells executed (``TILTED_PRIORS_QUICK=1``: less data, fewer steps), so a tutorial cell that raises, a broken
cross-reference or an API page that no longer matches ``__all__`` fails the suite.

It is one test, the longest of the suite (a few minutes of one core); it sits first in the collection order, so
that under ``pytest -n 2 --dist worksteal`` (``make test``) one worker builds the site while the other runs the
rest of the suite. ``make docs-quick`` runs the same build on its own."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_documentation_site_builds_in_quick_mode():
    out = ROOT / "docs" / "_build" / "html-quick"
    env = {**os.environ, "TILTED_PRIORS_QUICK": "1"}
    command = [sys.executable, "-m", "sphinx", "-q", "-W", "--keep-going", "-b", "html", str(ROOT / "docs"), str(out)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (f"the quick documentation build failed (exit {proc.returncode}):\n"
                                  f"{proc.stdout[-6000:]}\n{proc.stderr[-12000:]}")
    assert (out / "index.html").is_file()
