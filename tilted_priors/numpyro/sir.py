r"""Sampling-importance-resampling (SIR) from a tilted distribution's base (JAX).

For each output draw, :class:`SIR` draws :math:`K` proposals from the base :math:`q`, weights them by
:math:`w_k = e^{-E(y_k)}` (the density ratio :math:`p / q` up to :math:`Z`) and returns one of them, picked with
probability :math:`w_k / \sum_j w_j`. No step size and no chain: the draws are independent, and their law tends to
the tilted density as :math:`K` grows (it is :math:`q` at :math:`K = 1`; the bias of an expectation is
:math:`O(1/K)`).

A sampler normally exposes only ``run(rng_key, log_density, init)``, which gives no access to the base. SIR
implements the optional protocol method ``sample_tilted(rng_key, dist, sample_shape)``, which
:meth:`~tilted_priors.numpyro.EnergyTilted.sample_with` calls when a sampler has it; so SIR works as a
distribution's ``sampler=``, inside :class:`~tilted_priors.numpyro.Contrastive` and with the
:func:`~tilted_priors.inference.numpyro.handlers.sampler` handler. ``run`` raises ``TypeError``. The draws are one
module-level :func:`jax.jit`-ed function taking the distribution as a pytree (compiled once per energy structure
and shapes); under an outer transformation (the user's :func:`jax.jit`, an ``SVI`` update) it is traced inline.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import logsumexp

from tilted_priors._compat import jax_in_transformation
from tilted_priors._rng_keys import check_key as _check_key
from tilted_priors._sir import bad_weights_message, check_tilted, needs_base_message
from tilted_priors._validation import check_positive_int, check_sample_shape
from tilted_priors.numpyro.samplers import _Frozen

__all__ = ["SIR", "SIRInfo"]


class SIRInfo(NamedTuple):
    r"""Per output draw: the effective sample size of its :math:`K` weights, :math:`(\sum_k w_k)^2 / \sum_k w_k^2`
    (between 1 and :math:`K`), and :math:`\log \frac1K \sum_k w_k`, an importance estimate of :math:`\log Z`."""

    ess: jax.Array
    log_z: jax.Array


def _sir(num_proposals: int, sample_shape: tuple, rng_key, dist):
    """The draws, their :class:`SIRInfo` and the number of draws with unusable weights."""
    key_proposals, key_pick = jax.random.split(rng_key)
    y = lax.stop_gradient(dist.base.sample(key_proposals, (num_proposals,) + sample_shape))
    log_w = lax.stop_gradient(-dist._energy(y))
    bad = jnp.isnan(log_w).any(0) | (log_w == jnp.inf).any(0) | (log_w == -jnp.inf).all(0)
    index = jax.random.categorical(key_pick, log_w, axis=0)
    z = jnp.take_along_axis(y, index[None, ..., None], axis=0)[0]
    log_sum = logsumexp(log_w, 0)
    info = SIRInfo(jnp.exp(2.0 * log_sum - logsumexp(2.0 * log_w, 0)), log_sum - math.log(num_proposals))
    return z, info, jnp.sum(bad)


_sir_jit = jax.jit(_sir, static_argnums=(0, 1))


class SIR(_Frozen):
    r"""Sampling-importance-resampling from the base: :math:`K` = ``num_proposals`` base draws per output draw,
    one kept with probability proportional to :math:`e^{-E}`.

    .. math:: y_1, \dots, y_K \sim q, \qquad z = y_k \text{ with probability } \frac{e^{-E(y_k)}}{\sum_j e^{-E(y_j)}}

    Exact as :math:`K \to \infty` (the draws are :math:`q` at :math:`K = 1`), with no step size; good when the
    tilted density is close to its base (a resampling ESS, :attr:`SIRInfo.ess`, that is a sizeable fraction of
    :math:`K`), hopeless when the energy concentrates the mass where the base rarely goes. Costs :math:`K` energy
    evaluations per draw, all in one batch. Draws carry no gradient (``stop_gradient``). Immutable, compared and
    hashed by its setting, like the other samplers.

    Parameters
    ----------
    num_proposals : int
        :math:`K`, base draws per output draw.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from tilted_priors.numpyro import EnergyTiltedNormal
    >>> d = EnergyTiltedNormal(lambda z: (z ** 2).sum(-1), jnp.zeros(2), jnp.ones(2), sampler=SIR(500))
    >>> v = d.sample(jax.random.PRNGKey(0), (2000,)).var(0)   # exact: 1/3
    >>> bool((jnp.abs(v - 1 / 3) < 0.05).all())
    True
    """

    __slots__ = ("num_proposals",)

    def __init__(self, num_proposals: int = 1000):
        object.__setattr__(self, "num_proposals", check_positive_int("num_proposals", num_proposals))

    def _key(self) -> tuple:
        return (self.num_proposals,)

    def __reduce__(self):
        return (SIR, (self.num_proposals,))

    def run(self, rng_key, log_density, init, *, return_info: bool = False):
        """Not available: raises ``TypeError`` (SIR needs the distribution's base; see :meth:`sample_tilted`)."""
        raise TypeError(needs_base_message("run(rng_key, log_density, init)"))

    def sample_tilted(self, rng_key, dist, sample_shape=(), *, return_info: bool = False):
        """Draw ``sample_shape + batch_shape + event_shape`` samples from the tilted distribution ``dist``.

        Parameters
        ----------
        rng_key : jax.Array
            A PRNG key.
        dist : EnergyTilted
            The distribution (its ``base`` and energy are used).
        sample_shape : tuple of int
            Leading shape of the draws.
        return_info : bool
            Also return a :class:`SIRInfo` (shape ``sample_shape + batch_shape``).

        Raises
        ------
        FloatingPointError
            When some draw's weights are unusable (a ``nan`` or ``-inf`` energy, or ``+inf`` at all proposals);
            eager calls only (under an outer trace nothing can be raised: ``info.log_z`` is then non-finite).

        Examples
        --------
        >>> import jax, jax.numpy as jnp
        >>> from tilted_priors.numpyro import EnergyTiltedNormal
        >>> d = EnergyTiltedNormal(lambda z: 0.0 * z.sum(-1), jnp.zeros(3), jnp.ones(3))
        >>> z, info = SIR(50).sample_tilted(jax.random.PRNGKey(0), d, (4,), return_info=True)   # E = 0
        >>> z.shape, info.ess.round().tolist()
        ((4, 3), [50.0, 50.0, 50.0, 50.0])
        """
        if rng_key is None:
            raise ValueError("SIR.sample_tilted needs a PRNG key, e.g. jax.random.PRNGKey(0)")
        _check_key(rng_key, "rng_key")
        check_tilted(dist, "SIR.sample_tilted")
        sample_shape = check_sample_shape(sample_shape)
        view = dist._chain_view()
        if jax_in_transformation(rng_key, view):
            z, info, _ = _sir(self.num_proposals, sample_shape, rng_key, view)
        else:
            z, info, num_bad = _sir_jit(self.num_proposals, sample_shape, rng_key, view)
            if int(num_bad) > 0:
                raise FloatingPointError(bad_weights_message(int(num_bad), math.prod(info.ess.shape),
                                                             self.num_proposals))
        return (z, info) if return_info else z

    def __repr__(self) -> str:
        return f"SIR(num_proposals={self.num_proposals})"
