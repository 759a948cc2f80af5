"""Pieces of the model's unnormalised log joint over its latent sites that the guides share (NumPyro).

:class:`BaseDraws` is the "sampler" that leaves a tilted site at its base draw (the chains' "noise" start);
:func:`per_member` splits a site's log density over the members of the plate whose members run one chain each;
:func:`in_plate` runs a function inside a site's plate; :func:`is_real` says whether a chain can move on a site.
Used by :mod:`tilted_priors.inference.numpyro.guides` and the amortised and mixture guides.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro
from numpyro.distributions import constraints

__all__ = ["BaseDraws", "per_member", "in_plate", "is_real"]


class BaseDraws:
    """A sampler that does not move: the tilted site's value is a draw from its base (the "noise" start)."""

    def run(self, rng_key, log_density, init, **kwargs):
        return init

    def __eq__(self, other):
        return type(other) is BaseDraws

    def __hash__(self):
        return hash(BaseDraws)


def is_real(support) -> bool:
    """Whether a site's support is the real line (a Langevin chain can move on it)."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def per_member(log_prob, frames, plate: tuple) -> jax.Array:
    """A site's log density summed to one value per member of ``plate`` (``(name, dim, size)``); a site outside
    the plate, or not broadcast along it, is shared out evenly."""
    name, dim, size = plate
    log_prob = jnp.asarray(log_prob)
    if any(f.name == name for f in frames) and log_prob.ndim >= -dim and log_prob.shape[dim] == size:
        return jnp.moveaxis(log_prob, dim, 0).reshape(size, -1).sum(-1)
    return jnp.full(size, jnp.sum(log_prob) / size)


def in_plate(frame, inner):
    """``inner()`` run inside the plate ``frame`` (a frame of a site's ``cond_indep_stack``)."""
    with numpyro.plate(frame.name, frame.size, dim=frame.dim):
        return inner()
