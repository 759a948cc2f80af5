"""LEBM's hyper-parameters (Pang et al. 2020), backend-free: ``models.pyro.lebm`` and ``models.numpyro.lebm``
export them as ``REFERENCE`` and ``MNIST``."""
from __future__ import annotations

from typing import Any

__all__ = ["LEBM", "LEBM_MNIST"]

#: Pang et al. (2020), reference code for SVHN (32x32x3). ``ngf`` is this module's width parameter: the generator's
#: channels are ``4 ngf -> 2 ngf -> ngf -> C`` (512 -> 256 -> 128 -> 3; the paper's code writes ngf=64 with
#: multipliers 8, 4, 2).
LEBM: dict[str, Any] = {
    "image_shape": (32, 32, 3),
    "latent_dim": 100,
    "batch_size": 100,
    "ngf": 128,
    "energy_hidden": 200,
    "energy_depth": 2,
    "activation": "gelu",
    "generator_activation": "leaky_relu(0.2)",
    "likelihood_sd": 0.3,
    "prior_steps": 60,
    "prior_step_size": 0.4,
    "posterior_steps": 20,
    "posterior_step_size": 0.1,
    "lr_energy": 2e-5,
    "lr_generator": 1e-4,
    "adam_betas": (0.5, 0.999),
    "lr_decay_per_epoch": 0.998,
    "image_range": (-1.0, 1.0),
}

#: This project's MNIST (28x28x1) scaling of ``LEBM``: a 16-d latent and a generator of width ``ngf=32``
#: (128 -> 64 -> 32 -> 1 channels) that trains on two CPU cores; the samplers, learning rates and likelihood are
#: the paper's.
LEBM_MNIST: dict[str, Any] = {**LEBM, "image_shape": (28, 28, 1), "latent_dim": 16, "ngf": 32}
