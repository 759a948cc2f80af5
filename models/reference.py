"""The reference hyper-parameters of the models, backend-free: LEBM's (Pang et al. 2020) and its generator's layer
plan (:func:`generator_plan`; ``tilted_priors.models.pyro.lebm`` and ``tilted_priors.models.numpyro.lebm`` export the
settings as ``REFERENCE`` and ``MNIST`` and build their networks from the plan), and the VAE-EBM's of the
self-normalised likelihood paper (Senetaire et al.; ``tilted_priors.models.{pyro,numpyro}.vae_ebm``)."""
from __future__ import annotations

import math
from numbers import Integral
from typing import Any, NamedTuple

from tilted_priors._validation import check_positive_int

__all__ = ["LEBM", "LEBM_MNIST", "VAE_EBM", "VAE_EBM_CPU", "RME", "mlp_sizes", "IMAGE_SIZES", "PRIOR_KINDS",
           "LIKELIHOODS", "check_likelihood", "check_image_shape", "GeneratorLayer", "generator_plan",
           "generator_layers"]

#: Pang et al. (2020), the official code for SVHN (32x32x3, ``train_svhn.py``): latent 100, an energy MLP
#: 100 -> 200 -> 200 -> 1 with GELU, and the generator of :func:`generator_plan` at 32x32 with ``ngf=64`` (channels
#: 512 -> 256 -> 128 -> 3 at 4x4, 8x8, 16x16, 32x32; LeakyReLU(0.2), no batch norm, tanh; 3,447,683 parameters).
#: One difference remains: the official code initialises the convolution and linear weights with
#: ``xavier_normal_``; this project's networks keep torch's default initialisation (on both backends).
LEBM: dict[str, Any] = {
    "image_shape": (32, 32, 3),
    "latent_dim": 100,
    "batch_size": 100,
    "ngf": 64,
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

#: This project's MNIST (28x28x1) scaling of ``LEBM`` (not the paper's: LEBM has no MNIST experiment): a 16-d
#: latent and the 28x28 generator of :func:`generator_plan` with ``ngf=32`` (128 -> 64 -> 32 -> 1 channels at 7x7,
#: 14x14, 28x28, 28x28; 264,705 parameters) that trains on two CPU cores; the samplers, learning rates and likelihood
#: are the paper's.
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


#: The square image sizes the LEBM generator makes: 28 (this project's MNIST scaling), 32 (the paper's SVHN
#: network) and 64 (CelebA 64x64); see :func:`generator_plan`.
IMAGE_SIZES = (28, 32, 64)
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
    """``(H, W, C)`` as ints, or a ``ValueError`` saying what the generator can make (square 28, 32 or 64, C >= 1).

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
        raise ValueError(f"image_shape: the generator makes square 28x28, 32x32 or 64x64 images, got H={h}, W={w}")
    if c < 1:
        raise ValueError(f"image_shape: the number of channels C must be >= 1, got {c}")
    return shape


class GeneratorLayer(NamedTuple):
    """One layer of the LEBM generator: torch's ``ConvTranspose2d(in_channels, out_channels, kernel, stride,
    padding)`` (with bias), then ``activation``; it makes ``output_size`` x ``output_size`` maps."""

    kind: str          #: ``"conv_transpose"`` (the only kind)
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    output_size: int   #: height (= width) of the layer's output
    activation: str    #: ``"leaky_relu(0.2)"`` or ``"tanh"`` (the last layer)


#: Per image size, each layer's ``(channels as a multiple of ngf, None for the image's C; kernel, stride, padding)``.
_STAGES: dict[int, tuple[tuple[int | None, int, int, int], ...]] = {
    # this project's MNIST scaling (not the paper's): 7x7 start, one 3x3 convolution at 28x28 to the image
    28: ((4, 7, 1, 0), (2, 4, 2, 1), (1, 4, 2, 1), (None, 3, 1, 1)),
    # Pang et al. 2020, SVHN (train_svhn.py): 4x4 start, three doublings, the last one to the image
    32: ((8, 4, 1, 0), (4, 4, 2, 1), (2, 4, 2, 1), (None, 4, 2, 1)),
    # CelebA 64x64: the SVHN network with the 2 ngf -> ngf layer at 32x32 that train_svhn.py keeps commented out
    64: ((8, 4, 1, 0), (4, 4, 2, 1), (2, 4, 2, 1), (1, 4, 2, 1), (None, 4, 2, 1)),
}


def generator_plan(image_shape: tuple[int, int, int], latent_dim: int, ngf: int) -> list[GeneratorLayer]:
    """The LEBM generator's layers for an image shape, latent size and width, one :class:`GeneratorLayer` each.

    Both backends build their ``Generator`` from this list (torch's ``nn.ConvTranspose2d`` on Pyro, the same map in
    Flax NNX on NumPyro), so their layer plans are identical. The input is the latent vector as a 1x1 map with
    ``d = latent_dim`` channels; every layer but the last is followed by LeakyReLU(0.2), the last by tanh; no batch
    norm (the official code's default, ``g_batchnorm=False``, which keeps the biases). Layers as
    ``in -> out (kernel/stride/padding, output size)``:

    - ``H = 32``, Pang et al. 2020's SVHN generator (official ``train_svhn.py``, ``ngf=64``):
      d -> 8 ngf (4/1/0, 4x4), 8 ngf -> 4 ngf (4/2/1, 8x8), 4 ngf -> 2 ngf (4/2/1, 16x16),
      2 ngf -> C (4/2/1, 32x32).
    - ``H = 64``, the CelebA 64x64 generator: d -> 8 ngf (4/1/0, 4x4), 8 ngf -> 4 ngf (4/2/1, 8x8),
      4 ngf -> 2 ngf (4/2/1, 16x16), 2 ngf -> ngf (4/2/1, 32x32), ngf -> C (4/2/1, 64x64).
    - ``H = 28``, this project's MNIST scaling (not the paper's, which has no 28x28 network):
      d -> 4 ngf (7/1/0, 7x7), 4 ngf -> 2 ngf (4/2/1, 14x14), 2 ngf -> ngf (4/2/1, 28x28), ngf -> C (3/1/1, 28x28).

    ``ngf`` is thus the official code's width (the hidden layers have 8, 4, 2 (and 1) times ``ngf`` channels) at 32
    and 64, and the narrowest hidden layer at 28. The official repository has no 64x64 script: its
    ``train_svhn.py`` keeps the 2 ngf -> ngf layer at 32x32 commented out, and restoring it (with the last layer
    then taking ngf channels) gives the 64x64 plan above, which is also the doubling pattern that its
    ``train_celeba_128.py`` extends to 128x128 (with a 16 ngf first layer).

    Parameters
    ----------
    image_shape : tuple of int
        ``(H, W, C)`` with ``H == W`` in :data:`IMAGE_SIZES`.
    latent_dim : int
        :math:`d`.
    ngf : int
        Width (see above).

    Returns
    -------
    list of GeneratorLayer

    Examples
    --------
    >>> for layer in generator_plan((32, 32, 3), 100, 64):
    ...     print(layer)
    GeneratorLayer(kind='conv_transpose', in_channels=100, out_channels=512, kernel=4, stride=1, padding=0, \
output_size=4, activation='leaky_relu(0.2)')
    GeneratorLayer(kind='conv_transpose', in_channels=512, out_channels=256, kernel=4, stride=2, padding=1, \
output_size=8, activation='leaky_relu(0.2)')
    GeneratorLayer(kind='conv_transpose', in_channels=256, out_channels=128, kernel=4, stride=2, padding=1, \
output_size=16, activation='leaky_relu(0.2)')
    GeneratorLayer(kind='conv_transpose', in_channels=128, out_channels=3, kernel=4, stride=2, padding=1, \
output_size=32, activation='tanh')
    >>> [layer.output_size for layer in generator_plan((64, 64, 3), 100, 64)]
    [4, 8, 16, 32, 64]
    """
    size, _, channels = check_image_shape(image_shape)
    latent_dim = check_positive_int("latent_dim", latent_dim)
    ngf = check_positive_int("ngf", ngf)
    stages = _STAGES[size]
    plan, c_in, spatial = [], latent_dim, 1
    for i, (mult, k, s, p) in enumerate(stages):
        last = i == len(stages) - 1
        c_out = channels if mult is None else mult * ngf
        spatial = (spatial - 1) * s - 2 * p + k  # torch's ConvTranspose2d output size
        plan.append(GeneratorLayer("conv_transpose", c_in, c_out, k, s, p, spatial,
                                   "tanh" if last else "leaky_relu(0.2)"))
        c_in = c_out
    assert spatial == size, (size, plan)
    return plan


def generator_layers(latent_dim: int, image_shape: tuple[int, int, int], ngf: int) -> list[tuple[int, ...]]:
    """``(in, out, kernel, stride, padding)`` of each transposed convolution of :func:`generator_plan` (note the
    argument order: ``latent_dim`` first).

    Examples
    --------
    >>> generator_layers(16, (28, 28, 1), 32)[0]
    (16, 128, 7, 1, 0)
    """
    return [(layer.in_channels, layer.out_channels, layer.kernel, layer.stride, layer.padding)
            for layer in generator_plan(image_shape, latent_dim, ngf)]
