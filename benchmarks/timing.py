"""Timing shared by the benchmarks: one call's wall time, and two callables timed alternately in one process
(the median of per-round ratios, robust to a machine whose load changes between rounds)."""
from __future__ import annotations

import statistics
import time

__all__ = ["timed", "compare"]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(a, b, rounds: int) -> dict:
    """Alternate a and b; medians of each and of the per-round ratio a / b."""
    for _ in range(3):  # warm up (and compile)
        a(), b()
    ta, tb, ratio = [], [], []
    for i in range(rounds):
        if i % 2:
            x, y = timed(a), timed(b)
        else:
            y, x = timed(b), timed(a)
        ta.append(x), tb.append(y), ratio.append(x / y)
    return {"a_ms": 1e3 * statistics.median(ta), "b_ms": 1e3 * statistics.median(tb),
            "ratio": statistics.median(ratio)}
