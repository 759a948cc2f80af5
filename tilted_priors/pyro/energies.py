"""Energy networks (torch)."""
from __future__ import annotations

import torch
from torch import nn

from tilted_priors._validation import check_nonnegative_int, check_positive_int, describe, dtype_mismatch_message

__all__ = ["EnergyMLP"]


def _float_dtypes(energy) -> set:
    """The floating dtypes of a torch module's parameters and buffers (empty for anything else)."""
    if not isinstance(energy, torch.nn.Module):
        return set()
    tensors = list(energy.parameters()) + list(energy.buffers())
    return {t.dtype for t in tensors if torch.is_floating_point(t)}


def _dtype_error(energy, what: str = "energy", **inputs) -> TypeError | None:
    """A ``TypeError`` naming the dtypes when a torch module ``energy`` has parameters of another floating dtype
    than its floating ``inputs`` (``z=..., context=...``), else ``None``; used to explain torch's error after a
    failed call (no cost when the call succeeds)."""
    dtypes = _float_dtypes(energy)
    if len(dtypes) != 1:
        return None
    (param_dtype,) = dtypes
    other = {k: v.dtype for k, v in inputs.items()
             if isinstance(v, torch.Tensor) and torch.is_floating_point(v) and v.dtype != param_dtype}
    return TypeError(dtype_mismatch_message(what, param_dtype, other)) if other else None


class EnergyMLP(nn.Module):
    r"""The LEBM prior energy: an MLP :math:`E_\alpha: \mathbb R^d \to \mathbb R`.

    ``latent_dim -> hidden -> ... -> hidden -> 1`` with ``depth`` hidden layers, each followed by ``activation``
    (GELU, as Pang et al. 2020: 100-200-200-1). The last layer is linear and the output is squeezed, so a batch
    ``(..., d)`` maps to energies ``(...)``. The prior it defines is :math:`e^{-E(z)}\mathcal N(z)/Z`.

    With ``context_dim=c`` it is a conditional energy :math:`E(z, x)`, called as ``energy(z, context)`` (as
    :class:`~tilted_priors.pyro.EnergyTilted` does with ``context=``): the first layer reads the concatenation
    ``[z, context]`` of width ``d + c``, their leading dimensions broadcast.

    Parameters
    ----------
    latent_dim : int
        :math:`d`, the event size of the prior.
    hidden : int
        Width of the hidden layers.
    depth : int
        Number of hidden layers (at least 1).
    activation : type of torch.nn.Module
        Activation constructor, called with no arguments (e.g. ``torch.nn.GELU``, ``lambda: nn.LeakyReLU(0.2)``).
    context_dim : int
        :math:`c`, the number of covariates of a conditional energy; 0 (the default) for :math:`E(z)`.

    Examples
    --------
    >>> import torch
    >>> energy = EnergyMLP(16)
    >>> energy(torch.randn(64, 16)).shape
    torch.Size([64])
    >>> EnergyMLP(2, 16, context_dim=3)(torch.randn(10, 5, 2), torch.randn(5, 3)).shape
    torch.Size([10, 5])
    """

    def __init__(self, latent_dim: int, hidden: int = 200, depth: int = 2, activation=nn.GELU, *,
                 context_dim: int = 0):
        super().__init__()
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        self.context_dim = check_nonnegative_int("context_dim", context_dim)
        check_positive_int("hidden", hidden)
        check_positive_int("depth", depth)
        if not callable(activation):
            raise TypeError(f"activation must be a module class or a callable returning a module (e.g. nn.GELU, "
                            f"lambda: nn.LeakyReLU(0.2)), got {describe(activation)}")
        layers: list[nn.Module] = []
        width = self.latent_dim + self.context_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), activation()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for what, x in (("z", z), ("context", context)):
            if x is not None and not isinstance(x, torch.Tensor):
                raise TypeError(f"EnergyMLP expects torch tensors, got {what} = {describe(x)}: convert it with "
                                f"torch.as_tensor({what}, dtype=torch.get_default_dtype())")
        if z.shape[-1:] != (self.latent_dim,):
            raise ValueError(f"EnergyMLP expects inputs of shape (..., {self.latent_dim}), got {tuple(z.shape)}")
        if self.context_dim:
            if context is None or context.shape[-1:] != (self.context_dim,):
                got = "none" if context is None else f"shape {tuple(context.shape)}"
                raise ValueError(f"EnergyMLP(context_dim={self.context_dim}) is a conditional energy: call it as "
                                 f"energy(z, context) with context of shape (..., {self.context_dim}) (got {got}); "
                                 "EnergyTilted(..., context=x) does so")
            lead = torch.broadcast_shapes(z.shape[:-1], context.shape[:-1])
            z = torch.cat([z.expand(lead + z.shape[-1:]), context.expand(lead + context.shape[-1:])], -1)
        elif context is not None:
            raise ValueError("EnergyMLP got a context but was built without one: build it with "
                             "EnergyMLP(latent_dim, ..., context_dim=c)")
        try:
            return self.net(z).squeeze(-1)
        except RuntimeError as err:  # torch's "mat1 and mat2 must have the same dtype": say which and what to do
            error = _dtype_error(self, "EnergyMLP", z=z)
            if error is None:
                raise
            raise error from err
