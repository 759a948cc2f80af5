"""Chain diagnostics, backend-free (numpy and ArviZ): is a short-run chain telling the truth?

Layered as arviz-stats is:

- :mod:`~tilted_priors.inference.diagnostics.arrays` — plain array functions on draws ``(chain, draw, *dims)``:
  :func:`rhat`, :func:`ess`, :func:`mcse`, :func:`summary` (the same values as ArviZ, vectorised),
  :func:`nested_rhat` for many short chains, :func:`energy_distance`;
- :mod:`~tilted_priors.inference.diagnostics.stein` — :func:`stein_discrepancy`: the kernel Stein discrepancy of a
  sample from the scores of its target, with a bootstrap test (the scores from either backend's ``stein_scores``);
- :mod:`~tilted_priors.inference.diagnostics.coupling` — :class:`CouplingBound`: L-lag coupling bounds on the total
  variation distance of a chain after :math:`t` steps from its stationary law (the chains from either backend's
  ``coupling_bound``), :func:`tv_bound_from_meeting_times`, :func:`steps_for`;
- :mod:`~tilted_priors.inference.diagnostics.data` — :func:`to_inference_data`: arrays, dicts or a Pyro / NumPyro ``MCMC``
  to ArviZ's InferenceData (0.2x) or DataTree (1.x);
- :mod:`~tilted_priors.inference.diagnostics.report` — :func:`short_vs_long`: the same starts run short and long, compared;
- :mod:`~tilted_priors.inference.diagnostics.plots` — the report's PNG figures.

Examples
--------
>>> import numpy as np
>>> from tilted_priors.inference.diagnostics import rhat, ess
>>> x = np.random.default_rng(0).normal(size=(4, 1000, 2))
>>> bool((rhat(x) < 1.01).all()), bool((ess(x) > 3000).all())
(True, True)
"""
from tilted_priors.inference.diagnostics.arrays import (EnergyDistance, Summary, energy_distance, ess, mcse, nested_rhat, rhat,
                                          summary)
from tilted_priors.inference.diagnostics.coupling import (CouplingBound, steps_for, tv_bound_from_meeting_times,
                                                          w1_bound_from_distances)
from tilted_priors.inference.diagnostics.data import to_inference_data
from tilted_priors.inference.diagnostics.report import ShortVsLong, compare_chains, short_vs_long
from tilted_priors.inference.diagnostics.running import trajectory
from tilted_priors.inference.diagnostics.stein import SteinDiscrepancy, imq_stein_kernel, stein_discrepancy

__all__ = ["to_inference_data", "rhat", "ess", "mcse", "summary", "Summary", "nested_rhat", "energy_distance",
           "EnergyDistance", "short_vs_long", "compare_chains", "ShortVsLong", "trajectory", "stein_discrepancy",
           "SteinDiscrepancy", "imq_stein_kernel", "CouplingBound", "tv_bound_from_meeting_times",
           "w1_bound_from_distances", "steps_for"]
