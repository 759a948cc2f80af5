"""Ready NumPyro generators: ``lebm`` (LEBM and its Gaussian-prior baseline), ``vae_ebm`` (the VAE with an
energy-tilted prior and the plain VAE), ``rme`` (the VAE with a recursive mixture of encoders) and evaluation
(``evaluate``)."""
from tilted_priors._extras import require

require("numpyro", "tilted_priors.models.numpyro")

from tilted_priors.models.numpyro import evaluate, lebm, rme, vae_ebm

__all__ = ["lebm", "vae_ebm", "rme", "evaluate"]
