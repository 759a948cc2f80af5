"""The reference hyper-parameters of the models, backend-free: LEBM's (Pang et al. 2020) and its generator's layer
plan (``tilted_priors.models.pyro.lebm`` and ``tilted_priors.models.numpyro.lebm`` export them as ``REFERENCE`` and ``MNIST``), and the
VAE-EBM's of the self-normalised likelihood paper (Senetaire et al.; ``tilted_priors.models.{pyro,numpyro}.vae_ebm``)."""
from __future__ import annotations

import math
from numbers import Integral
from typing import Any

__all__ = ["LEBM", "LEBM_MNIST", "VAE_EBM", "VAE_EBM_CPU", "RME", "mlp_sizes", "IMAGE_SIZES", "PRIOR_KINDS", "LIKELIHOODS", "check_likelihood", "check_image_shape", "generator_layers"]

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

#: Senetaire et al. (SNL), binary MNIST: a VAE with an energy-tilted prior trained by the SNELBO. ``hidden`` is the
#: width of the encoder's and decoder's hidden layers (this project's choice: the paper's code is not public here),
#: ``snl_samples`` the base draws behind Zhat per step, ``eval_*`` the evaluation's sample sizes (log Z, importance).
VAE_EBM: dict[str, Any] = {
    "image_shape": (28, 28, 1),
    "latent_dim": 16,
    "batch_size": 256,
    "iterations": 100_000,
    "hidden": (512, 256),
    "energy_hidden": 200,
    "energy_depth": 3,
    "activation": "leaky_relu(0.2)",
    "snl_samples": 256,
    "lr_energy": 2e-5,
    "lr_other": 1e-4,
    "eval_log_z_samples": 10_000,
    "eval_importance_samples": 100,
}

#: This project's CPU budget for the same model on the 4,000 training digits of MNIST-5k: fewer iterations at ten
#: times the learning rates (the reference's 100k iterations at 1e-4 take hours on two cores).
VAE_EBM_CPU: dict[str, Any] = {**VAE_EBM, "batch_size": 128, "iterations": 3_000, "lr_energy": 2e-4,
                               "lr_other": 1e-3}

#: The RME VAE (Kim and Pavlovic 2020) as this project runs it on MNIST-5k: the VAE-EBM's networks (latent 16,
#: MLP 784-512-256) for each of up to 5 encoder components, amortised mixing weights from a 784-64 MLP, the
#: diversity barrier C, and the CPU budget per component (the paper's settings are not public).
RME: dict[str, Any] = {"latent_dim": 16, "hidden": (512, 256), "num_components": 5, "mixing_hidden": 64,
                       "barrier": 2.0, "batch_size": 128, "lr": 1e-3, "steps_per_component": 600,
                       "eval_importance_samples": 1_000}


def mlp_sizes(image_shape: tuple[int, int, int], latent_dim: int, hidden) -> tuple[list[int], list[int]]:
    """Layer widths of the VAE's encoder (ending in ``2 * latent_dim``: loc and raw scale) and decoder (ending in
    one logit per pixel), identical on both backends.

    Examples
    --------
    >>> mlp_sizes((28, 28, 1), 16, (512, 256))
    ([784, 512, 256, 32], [16, 256, 512, 784])
    """
    pixels = int(image_shape[0]) * int(image_shape[1]) * int(image_shape[2])
    hidden = [int(h) for h in hidden]
    if not hidden or any(h < 1 for h in hidden):
        raise ValueError(f"hidden must be a non-empty sequence of positive widths, got {hidden!r}")
    return [pixels, *hidden, 2 * latent_dim], [latent_dim, *reversed(hidden), pixels]


IMAGE_SIZES = (28, 32)
PRIOR_KINDS = ("ebm", "gaussian")
LIKELIHOODS = ("bernoulli", "gaussian")


def check_likelihood(likelihood: str, obs_scale: float) -> tuple[str, float]:
    """The VAE's image likelihood and the Gaussian one's standard deviation, checked.

    Examples
    --------
    >>> check_likelihood("gaussian", 0.1)
    ('gaussian', 0.1)
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    obs_scale = float(obs_scale)
    if not (math.isfinite(obs_scale) and obs_scale > 0):
        raise ValueError(f"obs_scale must be positive and finite, got {obs_scale!r}")
    return likelihood, obs_scale


def check_image_shape(image_shape) -> tuple[int, int, int]:
    """``(H, W, C)`` as ints, or a ``ValueError`` saying what the generator can make (square 28 or 32, C >= 1).

    Examples
    --------
    >>> check_image_shape([28, 28, 1])
    (28, 28, 1)
    """
    try:
        shape = tuple(image_shape)
    except TypeError:
        raise ValueError(f"image_shape must be a tuple (H, W, C), got {image_shape!r}") from None
    if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, Integral) for s in shape):
        raise ValueError(f"image_shape must be three integers (H, W, C) (channels last), got {image_shape!r}")
    shape = tuple(int(s) for s in shape)
    h, w, c = shape
    if h != w or h not in IMAGE_SIZES:
        raise ValueError(f"image_shape: the generator makes square 28x28 or 32x32 images, got H={h}, W={w}")
    if c < 1:
        raise ValueError(f"image_shape: the number of channels C must be >= 1, got {c}")
    return shape


def generator_layers(latent_dim: int, image_shape: tuple[int, int, int], ngf: int) -> list[tuple[int, ...]]:
    """``(in, out, kernel, stride, padding)`` of the four transposed convolutions (identical on both backends).

    Examples
    --------
    >>> generator_layers(16, (28, 28, 1), 32)[0]
    (16, 128, 7, 1, 0)
    """
    size, _, channels = image_shape
    return [(latent_dim, 4 * ngf, size // 4, 1, 0),  # 1x1 -> (H/4)x(H/4): 7x7 or 8x8
            (4 * ngf, 2 * ngf, 4, 2, 1),             # -> H/2
            (2 * ngf, ngf, 4, 2, 1),                 # -> H
            (ngf, channels, 3, 1, 1)]                # -> H, C channels
