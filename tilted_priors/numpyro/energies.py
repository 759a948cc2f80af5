"""Energy networks (JAX, Flax NNX)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tilted_priors._validation import check_nonnegative_int, check_positive_int

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

def _load_torch_linears(layers, state_dict: Mapping[str, Any], who: str) -> None:
    """Copy torch ``net.{2 i}.weight`` (``(out, in)``) and ``net.{2 i}.bias`` into ``layers[i]`` (kernel ``(in, out)``).

    The layout of an ``nn.Sequential`` of ``Linear`` layers with one activation module between them (the Pyro
    :class:`tilted_priors.models.pyro.vae_ebm.Encoder` / ``Decoder`` and :class:`tilted_priors.pyro.EnergyMLP`).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{who}: state_dict must be a mapping (a torch module's state_dict()), got "
                        f"{type(state_dict).__name__}")
    expected = {f"net.{2 * i}.{p}" for i in range(len(layers)) for p in ("weight", "bias")}
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"{who}: the state_dict does not match this module's {len(layers)} linear layers "
                         f"(missing {missing}, unexpected {unexpected})")
    new = []
    for i, layer in enumerate(layers):
        kernel, bias = layer.kernel.get_value(), layer.bias.get_value()
        w = np.asarray(state_dict[f"net.{2 * i}.weight"]).T
        b = np.asarray(state_dict[f"net.{2 * i}.bias"])
        if w.shape != kernel.shape or b.shape != bias.shape:
            raise ValueError(f"{who}: net.{2 * i} has weight {w.T.shape} and bias {b.shape} in the state_dict, but "
                             f"this module's layer {i} needs {kernel.T.shape} and {bias.shape} (torch's (out, in))")
        new.append((jnp.asarray(w, kernel.dtype), jnp.asarray(b, bias.dtype)))
    for layer, (w, b) in zip(layers, new):  # all checked first: nothing changes on an error
        layer.kernel.set_value(w)
        layer.bias.set_value(b)


def _torch_linears(layers) -> dict[str, np.ndarray]:
    out = {}
    for i, layer in enumerate(layers):
        out[f"net.{2 * i}.weight"] = np.array(layer.kernel.get_value()).T.copy()
        out[f"net.{2 * i}.bias"] = np.array(layer.bias.get_value())
    return out


class _TorchTwin:
    """Weights exchanged with the module's torch twin (an ``nn.Sequential`` ``net`` of ``Linear`` layers with one
    activation between them: :class:`tilted_priors.pyro.EnergyMLP`, ``tilted_priors.models.pyro.vae_ebm``'s networks), in its
    ``state_dict()`` names and layouts (a torch ``Linear`` weight is ``(out, in)``, an NNX kernel ``(in, out)``).
    The class using it keeps its linear layers, in order, in ``self.layers``."""

    def load_torch_state_dict(self, state_dict: Mapping[str, Any]):
        """Copy the weights of the torch twin's ``state_dict()`` (tensors or numpy arrays); returns ``self``.

        Examples
        --------
        >>> e = EnergyMLP(2, hidden=8)
        >>> e.load_torch_state_dict(e.torch_state_dict()) is e
        True
        """
        _load_torch_linears(self.layers, state_dict, f"{type(self).__name__}.load_torch_state_dict")
        return self

    def torch_state_dict(self) -> dict[str, np.ndarray]:
        """The weights in the torch twin's names and layouts (numpy arrays).

        Examples
        --------
        >>> EnergyMLP(2, hidden=8).torch_state_dict()["net.2.weight"].shape   # (out, in)
        (8, 8)
        """
        return _torch_linears(self.layers)


class EnergyMLP(_TorchTwin, nnx.Module):
    r"""The LEBM prior energy: an MLP :math:`E_\alpha: \mathbb R^d \to \mathbb R` (a Flax NNX module).

    ``latent_dim -> hidden -> ... -> hidden -> 1`` with ``depth`` hidden layers, each followed by ``activation``
    (exact GELU, as Pang et al. 2020: 100-200-200-1, and as torch's ``nn.GELU()``). The last layer is linear and
    the output is squeezed, so a batch ``(..., d)`` maps to energies ``(...)``. The prior it defines is
    :math:`e^{-E(z)}\mathcal N(z)/Z`.

    The layers are ``self.layers``, a list of ``depth + 1`` :class:`flax.nnx.Linear` in order (the hidden layers,
    then the output layer), each with a ``kernel`` of shape ``(in, out)`` — the transpose of torch's
    ``Linear.weight`` ``(out, in)`` — and a ``bias``; so the torch :class:`tilted_priors.pyro.EnergyMLP`'s
    ``net[2 * i]`` corresponds to ``layers[i]``, and :meth:`load_torch_state_dict` / :meth:`torch_state_dict` copy
    the weights from and to its ``state_dict()``. Weights are initialised as torch initialises ``nn.Linear``
    (uniform on :math:`\pm 1/\sqrt{\text{fan\_in}}`), so both backends start from the same law of energies.
    The module is a pytree of its parameters: it can be the ``energy`` of an
    :class:`~tilted_priors.numpyro.EnergyTiltedNormal` directly.

    With ``context_dim=c`` it is a conditional energy :math:`E(z, x)`, called as ``energy(z, context)`` (as
    :class:`~tilted_priors.numpyro.EnergyTilted` does with ``context=``): the first layer reads the concatenation
    ``[z, context]`` of width ``d + c``, their leading dimensions broadcast.

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
    context_dim : int
        :math:`c`, the number of covariates of a conditional energy; 0 (the default) for :math:`E(z)`.
    rngs : int or flax.nnx.Rngs
        Seed or NNX random streams for the initial weights.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> energy = EnergyMLP(16)
    >>> energy(jnp.ones((64, 16))).shape
    (64,)
    >>> EnergyMLP(2, 16, context_dim=3)(jnp.ones((10, 5, 2)), jnp.ones((5, 3))).shape
    (10, 5)
    """

    def __init__(self, latent_dim: int, hidden: int = 200, depth: int = 2, activation=_exact_gelu, *,
                 context_dim: int = 0, rngs: int | nnx.Rngs = 0):
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        self.context_dim = check_nonnegative_int("context_dim", context_dim)
        hidden = check_positive_int("hidden", hidden)
        depth = check_positive_int("depth", depth)
        if not callable(activation):
            raise TypeError(f"activation must be callable, got {activation!r}")
        if isinstance(rngs, int) and not isinstance(rngs, bool):
            rngs = nnx.Rngs(rngs)
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an int seed or flax.nnx.Rngs, got {type(rngs).__name__}")
        self.activation = activation
        widths = [self.latent_dim + self.context_dim] + [hidden] * depth + [1]
        layers = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layer = nnx.Linear(w_in, w_out, rngs=rngs)
            _torch_linear_init(layer, rngs.params())
            layers.append(layer)
        self.layers = nnx.List(layers)

    def __call__(self, z, context=None):
        z = jnp.asarray(z)
        if z.shape[-1:] != (self.latent_dim,):
            raise ValueError(f"EnergyMLP expects inputs of shape (..., {self.latent_dim}), got {tuple(z.shape)}")
        if self.context_dim:
            if context is None or jnp.shape(context)[-1:] != (self.context_dim,):
                got = "none" if context is None else f"shape {tuple(jnp.shape(context))}"
                raise ValueError(f"EnergyMLP(context_dim={self.context_dim}) is a conditional energy: call it as "
                                 f"energy(z, context) with context of shape (..., {self.context_dim}) (got {got}); "
                                 "EnergyTilted(..., context=x) does so")
            context = jnp.asarray(context, z.dtype)
            lead = jnp.broadcast_shapes(z.shape[:-1], context.shape[:-1])
            z = jnp.concatenate([jnp.broadcast_to(z, lead + z.shape[-1:]),
                                 jnp.broadcast_to(context, lead + context.shape[-1:])], -1)
        elif context is not None:
            raise ValueError("EnergyMLP got a context but was built without one: build it with "
                             "EnergyMLP(latent_dim, ..., context_dim=c)")
        h = z
        for layer in self.layers[:-1]:
            h = self.activation(layer(h))
        return self.layers[-1](h)[..., 0]
