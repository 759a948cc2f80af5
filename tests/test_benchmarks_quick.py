"""Smoke runs with ``--quick`` of the SNL reproductions (``benchmarks/tabular_density.py``,
``benchmarks/ebm_regression.py``), the update-overhead benchmark (``benchmarks/update_overhead.py``) and the MCMC
kernel's (``benchmarks/mcmc_kernel.py``): each
script runs end to end in a subprocess (one compute thread) and prints its markdown table with a finite number in
every row."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # whole benchmark scripts, in subprocesses

pytest.importorskip("numpyro")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]
FLAGS = "--xla_cpu_multi_thread_eigen=false"


def run_quick(script: str, *extra: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XLA_FLAGS": FLAGS, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *extra], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def rows(out: str) -> dict[str, list[str]]:
    """The table rows by their first cell."""
    table = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table)}


NUMBER = re.compile(r"^-?\d+\.\d+ ± \d+\.\d+")


def test_tabular_density_quick():
    out = run_quick("tabular_density.py")
    assert "**wine**" in out
    table = rows(out)
    for label in ("Gaussian (closed form)", "flow (MAF)", "EBM, SNL", "EBM, NCE", "EBM, contrastive (MALA)"):
        lower, upper = table[label][:2]
        assert NUMBER.match(lower) and NUMBER.match(upper), (label, table[label])
    # the SNL bound is below the importance-sampling estimate, up to the rounding of the table
    lower, upper = (float(c.split(" ")[0]) for c in table["EBM, SNL"][:2])
    assert lower <= upper + 0.01


def test_ebm_regression_quick():
    out = run_quick("ebm_regression.py")
    assert "**toy**" in out
    table = rows(out)
    assert NUMBER.match(table["true density"][0])
    for label in ("Gaussian regression (MLP)", "MDN", "EBM, SNL (amortised b(x))", "EBM, NCE"):
        nll_is, nll_bound = table[label][:2]
        assert NUMBER.match(nll_is) and NUMBER.match(nll_bound), (label, table[label])
    nll_is, nll_bound = (float(c.split(" ")[0]) for c in table["EBM, SNL (amortised b(x))"][:2])
    assert nll_bound >= nll_is - 0.001  # the bound on the NLL is above the estimate


def test_update_overhead_quick():
    out = run_quick("update_overhead.py")
    table = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
             if line.startswith("| ") and not line.startswith(("| ---", "| model"))]
    assert {(row[0], row[1]) for row in table} == {("factor", "pyro"), ("factor", "numpyro"), ("digits", "pyro"),
                                                   ("digits", "numpyro"), ("svhn", "pyro")}
    for row in table:
        library_ms, hand_ms, ratio = (float(c) for c in row[2:5])
        assert library_ms > 0 and hand_ms > 0 and 0 < ratio < 10, row
        if row[1] == "numpyro":  # compile times: init + first update, and the hand-written update's
            assert re.fullmatch(r"\d+\.\d \+ \d+\.\d", row[5]) and float(row[6]) > 0, row


def test_mcmc_kernel_quick():
    out = run_quick("mcmc_kernel.py")
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith(("| ---", "| compile_potential"))]
    assert [row[0] for row in rows] == ["True", "False"]
    for row in rows:
        library_ms, hand_ms, ratio = (float(c) for c in row[1:4])
        assert library_ms > 0 and hand_ms > 0 and ratio > 0, row
