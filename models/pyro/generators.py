"""LEBM's generator network for Pyro (``torch.nn``), built from the backend-free layer plan
:func:`~tilted_priors.models.reference.generator_plan`; :mod:`tilted_priors.models.numpyro.generators` has the same
public names and the same layers in Flax NNX. :mod:`tilted_priors.models.pyro.lebm` re-exports both names.

Examples
--------
>>> [(layer.out_channels, layer.output_size) for layer in generator_plan((32, 32, 3), 100, 64)]
[(512, 4), (256, 8), (128, 16), (3, 32)]
"""
from __future__ import annotations

import torch
from torch import nn

from tilted_priors._validation import check_positive_int
from tilted_priors.models.reference import check_image_shape, generator_plan

__all__ = ["Generator", "generator_plan"]

#: The plan's activation names as torch modules.
_ACTIVATIONS = {"leaky_relu(0.2)": lambda: nn.LeakyReLU(0.2), "tanh": nn.Tanh}


class Generator(nn.Module):
    r"""LEBM's generator :math:`g_\beta`: latent vectors to channels-last images in ``[-1, 1]``.

    One ``nn.ConvTranspose2d`` per layer of :func:`~tilted_priors.models.reference.generator_plan`, each followed by
    its activation: ``net[2 i]`` is layer ``i``'s convolution and ``net[2 i + 1]`` its activation (LeakyReLU(0.2),
    Tanh after the last). The plans (``in -> out``, kernel/stride/padding, output size):

    - 32x32, Pang et al. 2020's SVHN generator: ``d -> 8 ngf`` (4/1/0, 4x4), ``8 ngf -> 4 ngf`` (4/2/1, 8x8),
      ``4 ngf -> 2 ngf`` (4/2/1, 16x16), ``2 ngf -> C`` (4/2/1, 32x32). With ``ngf=64``, ``d=100``: 100 -> 512 ->
      256 -> 128 -> 3, 3,447,683 parameters.
    - 64x64 (CelebA): ``d -> 8 ngf`` (4x4), ``-> 4 ngf`` (8x8), ``-> 2 ngf`` (16x16), ``-> ngf`` (32x32), ``-> C``
      (64x64); 4/1/0 then 4/2/1.
    - 28x28, this project's MNIST scaling (not the paper's): ``d -> 4 ngf`` (7/1/0, 7x7), ``4 ngf -> 2 ngf``
      (4/2/1, 14x14), ``2 ngf -> ngf`` (4/2/1, 28x28), ``ngf -> C`` (3/1/1, 28x28).

    No batch norm (the official LEBM code's default). Weights have torch's default initialisation (the official
    code uses ``xavier_normal_`` for the convolution weights; not reproduced). Inputs ``(..., d)`` map to
    ``(..., H, W, C)`` (torch's convolutions are channels-first; the permutation is inside). The JAX
    :class:`tilted_priors.models.numpyro.generators.Generator` has the same layers: its ``layers[i].kernel``
    (``(k, k, out, in)``) is ``net[2 i].weight.permute(2, 3, 1, 0)`` and its ``layers[i].bias`` is
    ``net[2 i].bias``, and the outputs agree to rounding (its ``load_torch_state_dict`` copies them).

    Parameters
    ----------
    latent_dim : int
        :math:`d`.
    image_shape : tuple of int
        ``(H, W, C)`` with ``H == W`` in ``{28, 32, 64}`` and ``C >= 1``.
    ngf : int
        Width (see :func:`~tilted_priors.models.reference.generator_plan`): 64 for the paper's SVHN network, 32 for
        this project's MNIST one.

    Attributes
    ----------
    plan : list of GeneratorLayer
        The layers, as :func:`~tilted_priors.models.reference.generator_plan` gives them.

    Examples
    --------
    >>> import torch
    >>> g = Generator(16, (28, 28, 1), ngf=8)
    >>> g(torch.randn(5, 16)).shape
    torch.Size([5, 28, 28, 1])
    >>> Generator(100, (64, 64, 3), ngf=4)(torch.randn(2, 100)).shape
    torch.Size([2, 64, 64, 3])
    """

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int] = (28, 28, 1), ngf: int = 32):
        super().__init__()
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        self.image_shape = check_image_shape(image_shape)
        self.ngf = check_positive_int("ngf", ngf)
        self.plan = generator_plan(self.image_shape, self.latent_dim, self.ngf)
        layers: list[nn.Module] = []
        for layer in self.plan:
            layers.append(nn.ConvTranspose2d(layer.in_channels, layer.out_channels, layer.kernel, layer.stride,
                                             layer.padding))
            layers.append(_ACTIVATIONS[layer.activation]())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1:] != (self.latent_dim,):
            raise ValueError(f"Generator expects latents of shape (..., {self.latent_dim}), got {tuple(z.shape)}")
        batch = z.shape[:-1]
        x = self.net(z.reshape(-1, self.latent_dim, 1, 1))  # (B, C, H, W)
        return x.permute(0, 2, 3, 1).reshape(*batch, *self.image_shape)
