r"""The RME VAE (Kim and Pavlovic 2020) on MNIST-5k as a Pyro program.

The VAE of :mod:`tilted_priors.models.pyro.vae_ebm` (Bernoulli or Gaussian image likelihood, a standard Normal or an energy-tilted
prior) with its amortised posterior grown as a recursive mixture of ``M`` encoders
(:class:`~tilted_priors.inference.pyro.RecursiveMixtureGuide`):

.. math:: Q_m(z \mid x) = \bigl(1 - e_m(x)\bigr) Q_{m-1}(z \mid x) + e_m(x)\, q_m(z \mid x),

with amortised weights :math:`e_m(x)` from a small MLP. Train it with :func:`tilted_priors.inference.pyro.fit_recursive`
(component :math:`m` on :math:`\mathrm{ELBO}(q_m) + \min(\mathrm{KL}(q_m \| Q_{m-1}), C)`, the weights and the
decoder on :math:`\mathrm{ELBO}(Q_m)`); evaluate it with :func:`log_likelihood`, importance sampling with the
mixture as proposal. Component 0 is the VAE's own encoder, so with ``M = 1`` it is the VAE. The NumPyro twin is
:mod:`tilted_priors.models.numpyro.rme`.

Examples
--------
>>> import numpy as np, pyro
>>> from tilted_priors.inference.pyro import fit_recursive
>>> pyro.clear_param_store()
>>> rme = build(2, latent_dim=2, hidden=(8,), mixing_hidden=4)
>>> x = (np.random.default_rng(0).random((16, 28, 28, 1)) < 0.3).astype(np.float32)
>>> stages = fit_recursive(rme.model, rme.guide, x, 2, batch_size=8, lr=1e-3, progress=False)
>>> log_likelihood(rme, x[:4], num_samples=3)["per_datum"].shape
(4,)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
from torch import nn

from tilted_priors.inference.pyro import RecursiveMixtureGuide
from tilted_priors.models.pyro import vae_ebm
from tilted_priors.models.reference import RME
from tilted_priors._validation import check_positive_int

__all__ = ["REFERENCE", "MixingNet", "RMEModel", "build", "log_likelihood"]

REFERENCE = RME  #: this project's settings (see :mod:`tilted_priors.models.reference`)


class MixingNet(nn.Module):
    r"""The amortised mixing logits :math:`\ell_2(x), \dots, \ell_M(x)`: a one-hidden-layer MLP (ReLU).

    The output layer starts at weight 0 and bias :math:`\ell_k = -\log(k - 1)`, so every stage starts with equal
    weights among its active components, as the guide's global default does.

    Examples
    --------
    >>> MixingNet(3, hidden=4)(torch.zeros(5, 28, 28, 1)).shape
    torch.Size([5, 2])
    """

    def __init__(self, num_components: int, image_shape: tuple[int, int, int] = (28, 28, 1),
                 hidden: int = RME["mixing_hidden"]):
        super().__init__()
        pixels = image_shape[0] * image_shape[1] * image_shape[2]
        self.net = nn.Sequential(nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, num_components - 1))
        with torch.no_grad():
            self.net[-1].weight.zero_()
            self.net[-1].bias.copy_(-torch.log(torch.arange(1, num_components, dtype=torch.float32)))

    def forward(self, x: torch.Tensor, *, batch_size: int | None = None, index=None) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1))


@dataclass
class RMEModel:
    """The VAE, its ``M`` encoders (``encoders[0]`` is ``vae.encoder``), the mixing network and the guide.

    Examples
    --------
    >>> rme = build(3, latent_dim=2, hidden=(8,), mixing_hidden=4)
    >>> rme.guide.num_components, rme.encoders[0] is rme.vae.encoder
    (3, True)
    """

    vae: vae_ebm.VAEModel
    encoders: list
    mixing: MixingNet | None
    guide: RecursiveMixtureGuide

    @property
    def model(self):
        """The VAE's Pyro model (the mixture does not change it)."""
        return self.vae.model

    def proposal(self, x: torch.Tensor) -> dist.TorchDistribution:
        r""":math:`Q_m(z \mid x)` of the guide's active components as one distribution (batch ``(N,)``, event
        ``(latent_dim,)``), **normalised**: the importance-sampling proposal of :func:`log_likelihood`.

        Examples
        --------
        >>> rme = build(2, latent_dim=2, hidden=(8,), mixing_hidden=4)
        >>> rme.proposal(torch.zeros(5, 28, 28, 1)).event_shape
        torch.Size([2])
        """
        pairs = [enc(x) for enc in self.encoders[:self.guide.num_active]]
        components = dist.Normal(torch.stack([p[0] for p in pairs], -2),
                                 torch.stack([p[1] for p in pairs], -2)).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.guide.log_weights(x)), components)


def build(num_components: int = RME["num_components"], latent_dim: int = RME["latent_dim"], *,
          hidden=RME["hidden"], mixing_hidden: int | None = RME["mixing_hidden"], barrier: float = RME["barrier"],
          prior: str = "gaussian", likelihood: str = "bernoulli", seed: int | None = 0,
          **vae_kwargs: Any) -> RMEModel:
    r"""Build the RME VAE: the VAE of :func:`tilted_priors.models.pyro.vae_ebm.build` and ``num_components`` encoders.

    Parameters
    ----------
    num_components : int
        :math:`M`.
    latent_dim, hidden, prior, likelihood
        Of the VAE (:func:`tilted_priors.models.pyro.vae_ebm.build`; ``prior="ebm"`` tilts the prior).
    mixing_hidden : int or None
        Width of :class:`MixingNet`; ``None`` for global (not amortised) weights.
    barrier : float
        :math:`C` of the diversity bonus.
    seed : int or None
        Seed of the initial weights; component ``k`` is initialised from ``seed + k``.
    **vae_kwargs
        Passed on to :func:`tilted_priors.models.pyro.vae_ebm.build` (``image_shape``, ``obs_scale``, ``normalizer``, ...).

    Examples
    --------
    >>> build(2, latent_dim=2, hidden=(8,)).guide
    RecursiveMixtureGuide(...)
    """
    num_components = check_positive_int("num_components", num_components)
    vae = vae_ebm.build(latent_dim, hidden=hidden, prior=prior, likelihood=likelihood, seed=seed, **vae_kwargs)
    with torch.random.fork_rng(devices=[]):
        encoders = [vae.encoder]
        for k in range(1, num_components):
            if seed is not None:
                torch.manual_seed(seed + k)
            encoders.append(vae_ebm.Encoder(latent_dim, vae.image_shape, hidden))
        mixing = None
        if mixing_hidden is not None and num_components > 1:
            if seed is not None:
                torch.manual_seed(seed + num_components)
            mixing = MixingNet(num_components, vae.image_shape, check_positive_int("mixing_hidden", mixing_hidden))
    guide = RecursiveMixtureGuide(vae.model, encoders, mixing, barrier=barrier, name="rme")
    return RMEModel(vae, encoders, mixing, guide)


def log_likelihood(rme: RMEModel, x, **kwargs: Any) -> dict[str, Any]:
    r"""Importance-weighted log-likelihood with the mixture :math:`Q_m` as proposal (:math:`\log Z` by AIS for a
    tilted prior): :func:`tilted_priors.models.pyro.vae_ebm.log_likelihood` with ``proposal=rme.proposal``; the same keywords
    (``num_samples`` :math:`K`, ``log_z_chains``, ``batch_size``, ``seed``) and the same result.

    Examples
    --------
    >>> import torch
    >>> rme = build(2, latent_dim=2, hidden=(8,), mixing_hidden=4)
    >>> log_likelihood(rme, torch.zeros(3, 28, 28, 1), num_samples=4)["num_samples"]
    4
    """
    return vae_ebm.log_likelihood(rme.vae, x, proposal=rme.proposal, **kwargs)
