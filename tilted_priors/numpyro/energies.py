"""Energy networks (JAX, Flax NNX)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from tilted_priors._validation import check_positive_int

__all__ = ["EnergyMLP"]


def _exact_gelu(x):
    """The exact (erf) GELU, as torch's ``nn.GELU()``; Flax's ``nnx.gelu`` defaults to the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


def _torch_linear_init(layer: nnx.Linear, key) -> None:
    """Re-draw a layer's weights as torch's ``nn.Linear`` does: both ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    kernel, bias = layer.kernel.get_value(), layer.bias.get_value()
    bound = 1.0 / math.sqrt(kernel.shape[0])
    k_w, k_b = jax.random.split(key)
    layer.kernel.set_value(jax.random.uniform(k_w, kernel.shape, kernel.dtype, -bound, bound))
    layer.bias.set_value(jax.random.uniform(k_b, bias.shape, bias.dtype, -bound, bound))

class EnergyMLP(nnx.Module):
    r"""The LEBM prior energy: an MLP :math:`E_\alpha: \mathbb R^d \to \mathbb R` (a Flax NNX module).

    ``latent_dim -> hidden -> ... -> hidden -> 1`` with ``depth`` hidden layers, each followed by ``activation``
    (exact GELU, as Pang et al. 2020: 100-200-200-1, and as torch's ``nn.GELU()``). The last layer is linear and
    the output is squeezed, so a batch ``(..., d)`` maps to energies ``(...)``. The prior it defines is
    :math:`e^{-E(z)}\mathcal N(z)/Z`.

    The layers are ``self.layers``, a list of ``depth + 1`` :class:`flax.nnx.Linear` in order (the hidden layers,
    then the output layer), each with a ``kernel`` of shape ``(in, out)`` — the transpose of torch's
    ``Linear.weight`` ``(out, in)`` — and a ``bias``; so the torch :class:`tilted_priors.pyro.EnergyMLP`'s
    ``net[2 * i]`` corresponds to ``layers[i]``. Weights are initialised as torch initialises ``nn.Linear``
    (uniform on :math:`\pm 1/\sqrt{\text{fan\_in}}`), so both backends start from the same law of energies.
    The module is a pytree of its parameters: it can be the ``energy`` of an
    :class:`~tilted_priors.numpyro.EnergyTiltedNormal` directly.

    Parameters
    ----------
    latent_dim : int
        :math:`d`, the event size of the prior.
    hidden : int
        Width of the hidden layers.
    depth : int
        Number of hidden layers (at least 1).
    activation : callable
        Elementwise activation applied after each hidden layer (e.g. ``jax.nn.leaky_relu``); default exact GELU.
    rngs : int or flax.nnx.Rngs
        Seed or NNX random streams for the initial weights.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> energy = EnergyMLP(16)
    >>> energy(jnp.ones((64, 16))).shape
    (64,)
    """

    def __init__(self, latent_dim: int, hidden: int = 200, depth: int = 2, activation=_exact_gelu, *,
                 rngs: int | nnx.Rngs = 0):
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        hidden = check_positive_int("hidden", hidden)
        depth = check_positive_int("depth", depth)
        if not callable(activation):
            raise TypeError(f"activation must be callable, got {activation!r}")
        if isinstance(rngs, int) and not isinstance(rngs, bool):
            rngs = nnx.Rngs(rngs)
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an int seed or flax.nnx.Rngs, got {type(rngs).__name__}")
        self.activation = activation
        widths = [self.latent_dim] + [hidden] * depth + [1]
        layers = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layer = nnx.Linear(w_in, w_out, rngs=rngs)
            _torch_linear_init(layer, rngs.params())
            layers.append(layer)
        self.layers = nnx.List(layers)

    def __call__(self, z):
        z = jnp.asarray(z)
        if z.shape[-1:] != (self.latent_dim,):
            raise ValueError(f"EnergyMLP expects inputs of shape (..., {self.latent_dim}), got {tuple(z.shape)}")
        h = z
        for layer in self.layers[:-1]:
            h = self.activation(layer(h))
        return self.layers[-1](h)[..., 0]
