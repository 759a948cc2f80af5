"""The fault matrix (docs/fault_matrix.py): one test per class of failure. No case runs silently, each message
names what is at fault, and the documentation page (docs/guide/fault-matrix.md) still says what the code does."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("fault_matrix", Path(__file__).parents[1] / "docs" / "fault_matrix.py")
fault_matrix = sys.modules["fault_matrix"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fault_matrix)


@pytest.mark.parametrize("kind", fault_matrix.kinds())
def test_no_fault_is_silent_and_the_page_is_true(kind):
    cases = [c for c in fault_matrix.CASES if c.kind == kind]
    outcomes = [fault_matrix.run_case(c) for c in cases]
    for c, o in zip(cases, outcomes):
        assert not o.silent, f"{c.what} ({c.backend}) ran silently"
        assert c.names in o.message, f"{c.what} ({c.backend}): the message does not name {c.names!r}: {o.message}"
    shown = fault_matrix.page_rows(kind)
    assert shown == fault_matrix.rows_of(cases, outcomes), (
        f"docs/guide/fault-matrix.md is out of date for {kind!r}: run `python docs/fault_matrix.py`")
