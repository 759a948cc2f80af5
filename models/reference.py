"""LEBM's hyper-parameters (Pang et al. 2020) and its generator's layer plan, backend-free: ``models.pyro.lebm``
and ``models.numpyro.lebm`` export the settings as ``REFERENCE`` and ``MNIST`` and build the same layers."""
from __future__ import annotations

from numbers import Integral
from typing import Any

__all__ = ["LEBM", "LEBM_MNIST", "IMAGE_SIZES", "PRIOR_KINDS", "check_image_shape", "generator_layers"]

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


IMAGE_SIZES = (28, 32)
PRIOR_KINDS = ("ebm", "gaussian")


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
