"""Energy networks (torch)."""
from __future__ import annotations

import torch
from torch import nn

from tilted_priors._validation import check_positive_int

__all__ = ["EnergyMLP"]


class EnergyMLP(nn.Module):
    r"""The LEBM prior energy: an MLP :math:`E_\alpha: \mathbb R^d \to \mathbb R`.

    ``latent_dim -> hidden -> ... -> hidden -> 1`` with ``depth`` hidden layers, each followed by ``activation``
    (GELU, as Pang et al. 2020: 100-200-200-1). The last layer is linear and the output is squeezed, so a batch
    ``(..., d)`` maps to energies ``(...)``. The prior it defines is :math:`e^{-E(z)}\mathcal N(z)/Z`.

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

    Examples
    --------
    >>> import torch
    >>> energy = EnergyMLP(16)
    >>> energy(torch.randn(64, 16)).shape
    torch.Size([64])
    """

    def __init__(self, latent_dim: int, hidden: int = 200, depth: int = 2, activation=nn.GELU):
        super().__init__()
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        check_positive_int("hidden", hidden)
        check_positive_int("depth", depth)
        layers: list[nn.Module] = []
        width = self.latent_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), activation()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1:] != (self.latent_dim,):
            raise ValueError(f"EnergyMLP expects inputs of shape (..., {self.latent_dim}), got {tuple(z.shape)}")
        return self.net(z).squeeze(-1)
