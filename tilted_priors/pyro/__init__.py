"""Energy-tilted priors for Pyro (torch): the distribution, energies, normalizers and samplers.

Examples
--------
>>> import torch
>>> from tilted_priors.pyro import EnergyTiltedNormal, EnergyMLP, ShortRunLangevin
>>> prior = EnergyTiltedNormal(EnergyMLP(16), torch.zeros(16), torch.ones(16), sampler=ShortRunLangevin(60, 0.4))
>>> prior.sample((8,)).shape
torch.Size([8, 16])
"""
from tilted_priors._extras import require

require("pyro", "tilted_priors.pyro")

from tilted_priors.errors import ChainDivergenceError, ChainRangeWarning
from tilted_priors.pyro.distributions import EnergyTilted, EnergyTiltedNormal
from tilted_priors.pyro.energies import EnergyMLP
from tilted_priors.pyro.normalizers import (AnnealedImportance, Contrastive, Importance, LogZEstimate,
                                            LearnedLogZ, SelfNormalized, Unnormalized)
from tilted_priors.pyro.samplers import MALA, Persistent, SamplerInfo, ShortRunLangevin
from tilted_priors.pyro.sir import SIR, SIRInfo

__all__ = [
    "EnergyTilted", "EnergyTiltedNormal", "EnergyMLP",
    "Contrastive", "SelfNormalized", "Importance", "AnnealedImportance", "Unnormalized", "LearnedLogZ", "LogZEstimate",
    "ShortRunLangevin", "MALA", "Persistent", "SamplerInfo", "SIR", "SIRInfo", "ChainDivergenceError",
    "ChainRangeWarning",
]
