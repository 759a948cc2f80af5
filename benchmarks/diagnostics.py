"""Speed of the chain diagnostics: tilted_priors.inference.diagnostics against ArviZ on the same draws.

Summarising many short chains is what the short-run diagnostics do all the time: 1,000 chains x 100 draws x 16
dimensions, the target being under 1 s. Both sides compute the same numbers (R-hat, bulk and tail ESS, MCSE of
the mean and of the sd; ``tests/inference/test_diagnostics.py`` checks they agree to 1e-10): ArviZ's functions
one after another on a Dataset, against :func:`tilted_priors.inference.diagnostics.summary`. Nested R-hat over 250
super-chains of 4 is timed alone. The two sides alternate; the report gives medians and the median of per-round
ratios. Then the cost of ``summary`` as chains, draws and dimensions grow.

Run: ``.venv/bin/python benchmarks/diagnostics.py [--rounds 7] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import warnings

import numpy as np

from tilted_priors.inference.diagnostics import nested_rhat, summary
from tilted_priors.inference.diagnostics._arviz import arviz_major, arviz_module
from timing import timed

warnings.filterwarnings("ignore")


def arviz_summary(az, x: np.ndarray) -> None:
    """The same statistics with ArviZ's own functions."""
    if arviz_major() >= 1:
        data, tail = x, {"prob": 0.95}
    else:
        data, tail = az.convert_to_dataset({"z": x}, dims={"z": ["latent"]}), {}
    az.rhat(data)
    az.ess(data, method="bulk")
    az.ess(data, method="tail", **tail)
    az.mcse(data, method="mean")
    az.mcse(data, method="sd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    az = arviz_module()
    x = np.random.default_rng(0).normal(size=(1000, 100, 16))
    ids = np.repeat(np.arange(250), 4)
    summary(x[:8])  # warm up
    ours, theirs, nested = [], [], []
    for _ in range(args.rounds):
        ours.append(timed(lambda: summary(x)))
        theirs.append(timed(lambda: arviz_summary(az, x)))
        nested.append(timed(lambda: nested_rhat(x, ids)))
    ratio = statistics.median(t / o for o, t in zip(ours, theirs))
    results = {"arviz": az.__version__, "shape": list(x.shape), "summary_s": statistics.median(ours),
               "arviz_s": statistics.median(theirs), "arviz_over_ours": ratio,
               "nested_rhat_s": statistics.median(nested)}
    print(f"1000 chains x 100 draws x 16 dims (ArviZ {az.__version__}, median of {args.rounds} rounds)")
    print(f"  tilted_priors.inference.diagnostics.summary  {results['summary_s']:.3f} s")
    print(f"  ArviZ, same statistics          {results['arviz_s']:.3f} s   (ratio {ratio:.1f}x)")
    print(f"  nested_rhat (250 x 4 chains)    {results['nested_rhat_s']:.3f} s")
    print("\nsummary cost as the draws grow (chains x draws x dims: seconds)")
    scaling = []
    for shape in [(250, 100, 16), (1000, 100, 16), (4000, 100, 16), (1000, 400, 16), (1000, 100, 64)]:
        y = np.random.default_rng(1).normal(size=shape)
        t = statistics.median(timed(lambda: summary(y)) for _ in range(3))
        scaling.append({"shape": list(shape), "seconds": t})
        print(f"  {shape[0]:>5} x {shape[1]:>4} x {shape[2]:>3}: {t:.3f}")
    results["scaling"] = scaling
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
