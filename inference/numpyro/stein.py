r"""Kernel Stein discrepancy for NumPyro: scores :math:`\nabla \log p` by JAX's autodiff, and the KSD of a sample.

The NumPyro half of the Stein diagnostic; the array layer is
:func:`tilted_priors.inference.diagnostics.stein_discrepancy` (its docstring has the maths, the test and the cost),
the Pyro half :mod:`tilted_priors.inference.pyro.stein` (the same names and signatures).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tilted_priors.inference.diagnostics.stein import SteinDiscrepancy
from tilted_priors.inference.diagnostics.stein import stein_discrepancy as _stein_discrepancy

__all__ = ["stein_scores", "stein_discrepancy"]


def _log_density(log_density_or_dist):
    """The unnormalised log density to differentiate: ``log_tilted``, else ``log_prob``, else the callable (a
    NumPyro distribution is callable too, as a sampler: its methods come first)."""
    for method in ("log_tilted", "log_prob"):
        fn = getattr(log_density_or_dist, method, None)
        if callable(fn):
            return fn
    if callable(log_density_or_dist):
        return log_density_or_dist
    raise TypeError("log_density_or_dist must be a log density z -> log p(z) mapping (..., d) to (...), or a "
                    "distribution with log_prob (e.g. an EnergyTilted), got "
                    f"{type(log_density_or_dist).__name__}")


def stein_scores(log_density_or_dist, samples) -> np.ndarray:
    r"""The scores :math:`\nabla_z \log p(z)` at each of ``samples``, by :func:`jax.grad`, as a numpy array.

    Which log density is differentiated:

    - a distribution with ``log_tilted`` (:class:`~tilted_priors.numpyro.EnergyTilted`,
      :class:`~tilted_priors.numpyro.EnergyTiltedNormal`): :math:`-E(z) + \log q(z)`, the unnormalised density.
      Its ``log_prob`` would also subtract the normalizer's :math:`\log Z`, a constant in :math:`z` that changes
      no score but may run chains or draw samples to estimate it;
    - another distribution (anything with ``log_prob``): its ``log_prob``;
    - a callable: itself, ``log_density(z)`` mapping ``(..., d)`` to ``(...)`` (e.g. a tilted prior's
      ``annealed_log_density()``, or a posterior's unnormalised log joint in :math:`z`).

    The gradient is that of the sum over points, so the log density at each point must depend on that point only
    (true of any distribution's ``log_prob``). It runs eagerly (not compiled): one forward and backward pass.

    Parameters
    ----------
    log_density_or_dist : callable or distribution
        As above.
    samples : array_like or jax.Array, shape (..., d)
        The points, as a JAX array of JAX's default float dtype (float32 unless ``jax_enable_x64``) when they are
        not floating already. Shaped as the density takes them: for a distribution with batch shape ``B``,
        ``(n, *B, d)`` as ``dist.sample(key, (n,))`` draws them.

    Returns
    -------
    numpy.ndarray
        The scores, of the shape of ``samples`` (float64).

    Examples
    --------
    A tilted Gaussian: the quadratic energy :math:`E(z) = \tfrac12 z^\top z` tilts :math:`\mathcal N(1, I)` into
    :math:`\mathcal N(1/2, I/2)`, whose score is :math:`-2(z - 1/2)`:

    >>> import jax.numpy as jnp
    >>> from tilted_priors.numpyro import EnergyTiltedNormal
    >>> prior = EnergyTiltedNormal(lambda z: 0.5 * (z * z).sum(-1), jnp.ones(2), jnp.ones(2))
    >>> z = jnp.array([[0.5, 0.5], [1.0, 0.0]])
    >>> stein_scores(prior, z).tolist()
    [[0.0, 0.0], [-1.0, 1.0]]
    """
    fn = _log_density(log_density_or_dist)
    z = jnp.asarray(samples)
    if not jnp.issubdtype(z.dtype, jnp.floating):
        z = z.astype(jnp.zeros(()).dtype)
    if z.ndim < 1 or z.shape[-1] < 1:
        raise ValueError(f"samples must have shape (..., d) with d >= 1, got shape {tuple(z.shape)}")

    def total(points):
        lp = fn(points)
        if not hasattr(lp, "shape") or tuple(lp.shape) != tuple(points.shape[:-1]):
            got = tuple(lp.shape) if hasattr(lp, "shape") else type(lp).__name__
            raise ValueError(f"the log density must map points (..., d) to one value each (...): for samples of "
                             f"shape {tuple(points.shape)} it gave {got}; for a distribution with batch shape B "
                             "pass samples (n, *B, d)")
        return jnp.sum(lp)

    try:
        grad = jax.grad(total)(z)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as err:
        raise TypeError("the log density is not differentiable in z by JAX (it converts z to a concrete value: "
                        "numpy, float() or Python control flow on z); compute it with jax.numpy operations"
                        ) from err
    return np.asarray(grad, dtype=np.float64)


def stein_discrepancy(log_density_or_dist, samples, *, kernel: str = "imq", beta: float = -0.5, c: float = 1.0,
                      statistic: str = "v", test: bool = False, num_bootstrap: int = 500, level: float = 0.05,
                      seed: int | None = 0) -> SteinDiscrepancy:
    r"""Kernel Stein discrepancy of ``samples`` ``(..., n, d)`` to a NumPyro density: :func:`stein_scores`, then
    :func:`tilted_priors.inference.diagnostics.stein_discrepancy` (the maths, the test, the keyword arguments).

    ``samples`` are handed to the density as they are, so their leading dimensions must suit it: ``(n, d)`` for a
    distribution without batch shape (or a batch of samples ``(m, n, d)`` for a log density that takes any leading
    shape). For a distribution with batch shape ``B``, compute ``scores = stein_scores(dist, draws)`` on its draws
    ``(n, *B, d)`` and move the point axis next to the last for the array layer:
    ``stein_discrepancy(np.moveaxis(draws, 0, -2), np.moveaxis(scores, 0, -2))``.

    The test assumes independent points: the final states of independent chains, or one chain thinned.
    ``seed`` seeds the bootstrap's numpy generator (not a JAX key: the test runs in numpy).

    Examples
    --------
    Short-run Langevin chains of 3 and of 100 steps from the base, judged against the tilted density:

    >>> import jax, jax.numpy as jnp
    >>> from tilted_priors.numpyro import EnergyTiltedNormal, ShortRunLangevin
    >>> prior = EnergyTiltedNormal(lambda z: 2.0 * (z * z).sum(-1), jnp.zeros(2), jnp.ones(2))  # N(0, I/5)
    >>> short = prior.sample_with(jax.random.PRNGKey(0), ShortRunLangevin(3, 0.05), (400,))
    >>> long = prior.sample_with(jax.random.PRNGKey(1), ShortRunLangevin(100, 0.1), (400,))
    >>> r_short = stein_discrepancy(prior, short, test=True)
    >>> r_long = stein_discrepancy(prior, long, test=True)
    >>> bool(r_short.ksd > r_long.ksd), bool(r_short.reject)
    (True, True)
    """
    return _stein_discrepancy(np.asarray(samples), stein_scores(log_density_or_dist, samples), kernel=kernel,
                              beta=beta, c=c, statistic=statistic, test=test, num_bootstrap=num_bootstrap,
                              level=level, seed=seed)
