"""Energy-tilted priors for NumPyro (JAX): the distribution, energies, normalizers and samplers.

The same public names as :mod:`tilted_priors.pyro`; randomness is explicit (``rng_key`` arguments), samplers
are compiled :func:`jax.lax.scan` loops and the distributions are pytrees.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> from tilted_priors.numpyro import EnergyTiltedNormal, EnergyMLP, ShortRunLangevin
>>> prior = EnergyTiltedNormal(EnergyMLP(16), jnp.zeros(16), jnp.ones(16), sampler=ShortRunLangevin(60, 0.4))
>>> prior.sample(jax.random.PRNGKey(0), (8,)).shape
(8, 16)
"""
from tilted_priors._extras import require

require("numpyro", "tilted_priors.numpyro")

from tilted_priors.errors import ChainDivergenceError, ChainRangeWarning
from tilted_priors.numpyro.distributions import EnergyTilted, EnergyTiltedNormal
from tilted_priors.numpyro.energies import EnergyMLP
from tilted_priors.numpyro.normalizers import (AnnealedImportance, Contrastive, Importance, LogZEstimate,
                                               LearnedLogZ, SelfNormalized, Unnormalized)
from tilted_priors.numpyro.samplers import MALA, Persistent, SamplerInfo, ShortRunLangevin
from tilted_priors.numpyro.sir import SIR, SIRInfo

__all__ = [
    "EnergyTilted", "EnergyTiltedNormal", "EnergyMLP",
    "Contrastive", "SelfNormalized", "Importance", "AnnealedImportance", "Unnormalized", "LearnedLogZ", "LogZEstimate",
    "ShortRunLangevin", "MALA", "Persistent", "SamplerInfo", "SIR", "SIRInfo", "ChainDivergenceError",
    "ChainRangeWarning",
]
