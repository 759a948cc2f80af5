"""Energy-tilted latent priors for Pyro and NumPyro.

The prior alone lives here: the distribution, energies, normalizers and samplers, once per backend
(:mod:`tilted_priors.pyro`, :mod:`tilted_priors.numpyro`, the same public names in both). Backend-free
pieces (errors, annealing schedules) sit at this level. Nothing here imports :mod:`tilted_priors.inference` or
:mod:`tilted_priors.models`.
"""
from tilted_priors.errors import ChainDivergenceError, ChainRangeWarning
from tilted_priors.schedules import annealing_betas

__version__ = "0.1.0"
__all__ = ["ChainDivergenceError", "ChainRangeWarning", "annealing_betas", "__version__"]
