"""Speed of the kernel Stein discrepancy: tilted_priors.inference.diagnostics.stein_discrepancy on arrays.

The KSD costs O(n^2 d): every pair of points enters the V-statistic. The table times it (IMQ kernel, beta = -1/2,
c = 1, V-statistic) for n = 1,000, 3,000 and 10,000 points in d = 16 (exact draws from N(0, I), scores -x), and the
wild-bootstrap test (500 Rademacher draws, O(n^2 * 500)) at n = 1,000. Each time is the median of ``--rounds``
runs after one warm-up. ``--quick`` runs small sizes for a smoke test.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stein.py [--quick] [--rounds 3] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

from tilted_priors.inference.diagnostics import stein_discrepancy
from timing import timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke run")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per size (the median is reported)")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    sizes, test_n, rounds = ((200, 500, 1000), 200, 1) if args.quick else ((1000, 3000, 10000), 1000, args.rounds)
    rng = np.random.default_rng(0)
    stein_discrepancy(*(lambda x: (x, -x))(rng.normal(size=(100, args.dim))))  # warm up
    rows = []
    for n in sizes:
        x = rng.normal(size=(n, args.dim))
        ksd = stein_discrepancy(x, -x).ksd
        seconds = statistics.median(timed(lambda: stein_discrepancy(x, -x)) for _ in range(rounds))
        rows.append({"what": "KSD (V-statistic)", "n": n, "d": args.dim, "seconds": seconds, "ksd": ksd})
    x = rng.normal(size=(test_n, args.dim))
    result = stein_discrepancy(x, -x, test=True, num_bootstrap=500)
    seconds = statistics.median(timed(lambda: stein_discrepancy(x, -x, test=True, num_bootstrap=500))
                                for _ in range(rounds))
    rows.append({"what": "KSD + bootstrap test (500)", "n": test_n, "d": args.dim, "seconds": seconds,
                 "ksd": result.ksd, "p_value": result.p_value})
    print(f"Kernel Stein discrepancy, IMQ (beta = -0.5, c = 1), N(0, I) draws (median of {rounds} round(s))\n")
    print("| what | n | d | seconds | KSD |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['what']} | {row['n']} | {row['d']} | {row['seconds']:.3f} | {row['ksd']:.4f} |")
    print(f"\nbootstrap p-value of the exact draws at n = {test_n}: {result.p_value:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
