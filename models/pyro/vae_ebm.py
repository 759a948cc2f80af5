r"""VAE with an energy-tilted latent prior (VAE-EBM; Senetaire et al., self-normalised likelihood), for Pyro.

.. math:: z \sim p(z) = \frac{e^{-E(z)}\,\mathcal N(z; 0, I)}{Z}, \qquad
          x \mid z \sim \operatorname{Bernoulli}\bigl(\sigma(f_\theta(z))\bigr) \ \text{(each pixel)},

with :math:`E` an :class:`~tilted_priors.pyro.EnergyMLP` (3 x 200, LeakyReLU 0.2), :math:`f_\theta` an MLP decoder
giving one logit per pixel of a binarised image, and an MLP :class:`Encoder` for the amortised guide
:math:`q_\phi(z \mid x) = \mathcal N(\mu_\phi(x), \operatorname{diag} \sigma_\phi(x)^2)`. :func:`build` returns a
:class:`VAEModel`: ``vae.model`` is an ordinary Pyro program (one
:class:`~tilted_priors.pyro.EnergyTiltedNormal` site ``"z"``, observed ``"x"``) and ``vae.guide()`` its
:class:`~tilted_priors.inference.pyro.AmortizedGuide`. The prior's default normalizer is
:class:`~tilted_priors.pyro.SelfNormalized`, so ``SVI(vae.model, vae.guide(), optim, Trace_ELBO())`` maximises the
SNELBO; ``RefinedGuide(vae.guide())`` or ``ShortRunPosterior(vae.model)`` train the same model otherwise.
``prior="gaussian"`` is the plain VAE.

Images are channels-last ``(N, 28, 28, 1)`` with values in :math:`\{0, 1\}`
(``tilted_priors.models.data.load_mnist(binarize="stochastic")``).

``REFERENCE``: the paper's settings (:data:`tilted_priors.models.reference.VAE_EBM`); ``CPU``: this project's budget for
MNIST-5k on two cores. Parameter names: the model registers ``pyro.module("energy", ...)`` and
``pyro.module("decoder", ...)``, the guide ``"encoder"``, the SNELBO's scalar is ``"snl_b"``.

Examples
--------
>>> REFERENCE["latent_dim"], REFERENCE["energy_depth"], CPU["iterations"]
(16, 3, 3000)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from tilted_priors.inference.pyro import AmortizedGuide
from tilted_priors.inference.pyro.modules import register_module
from tilted_priors.models.metrics import log_mean_exp, summarize_with_log_z
from tilted_priors.models.pyro.lebm import latent_prior
from tilted_priors.models.reference import PRIOR_KINDS, VAE_EBM, VAE_EBM_CPU, check_likelihood, mlp_sizes
from tilted_priors._validation import check_positive_int
from tilted_priors.pyro import AnnealedImportance, EnergyMLP, SelfNormalized

__all__ = ["REFERENCE", "CPU", "Encoder", "Decoder", "VAEModel", "build", "log_likelihood"]

REFERENCE = VAE_EBM  #: the paper's settings (see :mod:`tilted_priors.models.reference`)
CPU = VAE_EBM_CPU  #: this project's CPU budget


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    r"""The amortised guide's network: an image to :math:`(\mu_\phi(x), \sigma_\phi(x))`, each ``(N, latent_dim)``.

    An MLP ``pixels -> hidden... -> 2 latent_dim`` with ReLU; :math:`\sigma = \operatorname{softplus}(\cdot) +
    10^{-4}`. Called with the model's arguments (``batch_size`` and ``index`` are accepted and ignored).

    Examples
    --------
    >>> import torch
    >>> loc, scale = Encoder(4, (28, 28, 1), (8,))(torch.zeros(3, 28, 28, 1))
    >>> loc.shape, bool((scale > 0).all())
    (torch.Size([3, 4]), True)
    """

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int] = (28, 28, 1), hidden=(512, 256)):
        super().__init__()
        self.net = _mlp(mlp_sizes(image_shape, latent_dim, hidden)[0])

    def forward(self, x: torch.Tensor, *, batch_size: int | None = None, index=None):
        if x is None:
            raise ValueError("the encoder needs the data x: the guide is for observed images")
        loc, raw = self.net(x.reshape(x.shape[0], -1)).chunk(2, dim=-1)
        return loc, nn.functional.softplus(raw) + 1e-4


class Decoder(nn.Module):
    r""":math:`f_\theta`: latent vectors ``(..., latent_dim)`` to Bernoulli logits ``(..., H, W, C)``.

    Examples
    --------
    >>> import torch
    >>> Decoder(4, (28, 28, 1), (8,))(torch.zeros(2, 5, 4)).shape
    torch.Size([2, 5, 28, 28, 1])
    """

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int] = (28, 28, 1), hidden=(512, 256)):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.net = _mlp(mlp_sizes(image_shape, latent_dim, hidden)[1])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).reshape(z.shape[:-1] + self.image_shape)


@dataclass
class VAEModel:
    r"""A VAE whose prior is energy-tilted (or standard Normal), as a Pyro program. Made by :func:`build`.

    ``model(x=None, *, batch_size=None, index=None)`` registers the energy (``prior_kind == "ebm"``) and the
    decoder, then in ``pyro.plate("data", N)`` samples ``"z"`` from :meth:`prior` and observes
    ``"x" ~ Bernoulli(logits=decoder(z)).to_event(3)``. Returns ``z``.

    Attributes
    ----------
    encoder : Encoder
    decoder : Decoder
    energy : torch.nn.Module or None
    latent_dim : int
    image_shape : tuple of int
    prior_kind : str
        ``"ebm"`` or ``"gaussian"``.
    normalizer, prior_sampler : optional
        Of the :class:`~tilted_priors.pyro.EnergyTiltedNormal` prior.
    likelihood : str
        ``"bernoulli"`` (binary images, the decoder's output as logits) or ``"gaussian"``
        (``Normal(sigmoid(decoder(z)), obs_scale)`` per pixel).
    obs_scale : float
        The Gaussian likelihood's standard deviation.

    Examples
    --------
    >>> import torch, pyro
    >>> pyro.clear_param_store()
    >>> vae = build(4, hidden=(8,))
    >>> tr = pyro.poutine.trace(vae.model).get_trace(torch.zeros(3, 28, 28, 1))
    >>> tr.nodes["z"]["value"].shape, tr.nodes["x"]["fn"].event_shape
    (torch.Size([3, 4]), torch.Size([28, 28, 1]))
    """

    encoder: Encoder
    decoder: Decoder
    energy: nn.Module | None
    latent_dim: int
    image_shape: tuple[int, int, int]
    prior_kind: str
    normalizer: Any = None
    prior_sampler: Any = None
    likelihood: str = "bernoulli"
    obs_scale: float = 0.1

    def observation(self, z: torch.Tensor) -> dist.TorchDistribution:
        r"""The likelihood :math:`p(x \mid z)`, normalised, event shape ``image_shape``.

        Examples
        --------
        >>> build(4, hidden=(8,)).observation(torch.zeros(3, 4)).event_shape
        torch.Size([28, 28, 1])
        """
        out = self.decoder(z)
        if self.likelihood == "gaussian":
            return dist.Normal(torch.sigmoid(out), self.obs_scale).to_event(3)
        return dist.Bernoulli(logits=out).to_event(3)

    def prior(self, batch_shape: tuple[int, ...] | torch.Size = ()) -> dist.TorchDistribution:
        """The prior over ``z``: batch shape ``batch_shape``, event shape ``(latent_dim,)``; normalised for the
        Gaussian baseline, for the tilted prior as its normalizer makes it.

        Examples
        --------
        >>> build(4, hidden=(8,), prior="gaussian").prior((3,)).batch_shape
        torch.Size([3])
        """
        return latent_prior(self, next(self.decoder.parameters()), batch_shape)

    def model(self, x: torch.Tensor | None = None, *, batch_size: int | None = None, index=None) -> torch.Tensor:
        """The Pyro program (see the class docstring).

        Examples
        --------
        >>> pyro.clear_param_store()
        >>> build(4, hidden=(8,), prior="gaussian").model(batch_size=2).shape
        torch.Size([2, 4])
        """
        if x is None:
            n = check_positive_int("batch_size", batch_size)
        else:
            x = torch.as_tensor(x, dtype=torch.get_default_dtype())
            if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
                raise ValueError(f"model: x must have shape (N, {', '.join(map(str, self.image_shape))}) "
                                 f"(channels last, values 0 or 1), got {tuple(x.shape)}")
            n = x.shape[0]
            if batch_size is not None and batch_size != n:
                raise ValueError(f"model: batch_size={batch_size} but x has {n} rows")
        if self.prior_kind == "ebm":
            register_module("energy", self.energy)
        register_module("decoder", self.decoder)
        with pyro.plate("data", n):
            z = pyro.sample("z", self.prior((n,)))
            pyro.sample("x", self.observation(z), obs=x)
        return z

    def guide(self) -> AmortizedGuide:
        """The amortised guide ``AmortizedGuide(model, encoder, name="encoder")`` (wrap it in
        :class:`~tilted_priors.inference.pyro.RefinedGuide` for MCMC refinement).

        Examples
        --------
        >>> build(4, hidden=(8,)).guide()
        AmortizedGuide(...)
        """
        return AmortizedGuide(self.model, self.encoder, "z", name="encoder")


def build(latent_dim: int = VAE_EBM["latent_dim"], *, image_shape: tuple[int, int, int] = (28, 28, 1),
          prior: str = "ebm", hidden=VAE_EBM["hidden"], energy_hidden: int = VAE_EBM["energy_hidden"],
          energy_depth: int = VAE_EBM["energy_depth"], normalizer=None, prior_sampler=None,
          likelihood: str = "bernoulli", obs_scale: float = 0.1, seed: int | None = 0) -> VAEModel:
    r"""Build the VAE-EBM's networks (or the plain VAE's) and model.

    Parameters
    ----------
    latent_dim : int
        16 in the reference.
    image_shape : tuple of int
        ``(H, W, C)`` of the binary images.
    prior : {"ebm", "gaussian"}
        The tilted prior (energy ``latent_dim -> energy_hidden x energy_depth -> 1``, LeakyReLU 0.2) or
        :math:`\mathcal N(0, I)`.
    hidden : sequence of int
        Encoder widths (the decoder mirrors them).
    normalizer : optional
        The prior's; default ``SelfNormalized(REFERENCE["snl_samples"])`` (the SNELBO).
    prior_sampler : optional
        The prior's sampler (default ``ShortRunLangevin(60, 0.4)``).
    likelihood : {"bernoulli", "gaussian"}
        Of the images given the latent (see :class:`VAEModel`).
    obs_scale : float
        Standard deviation of the Gaussian likelihood.
    seed : int or None
        Seed of the initial weights (torch's global RNG is restored afterwards).

    Examples
    --------
    >>> vae = build(16)
    >>> vae.normalizer
    SelfNormalized(num_samples=256, name='snl_b')
    """
    latent_dim = check_positive_int("latent_dim", latent_dim)
    if prior not in PRIOR_KINDS:
        raise ValueError(f"prior must be one of {PRIOR_KINDS}, got {prior!r}")
    image_shape = tuple(int(s) for s in image_shape)
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be three positive integers (H, W, C), got {image_shape!r}")
    likelihood, obs_scale = check_likelihood(likelihood, obs_scale)
    if prior == "ebm" and normalizer is None:
        normalizer = SelfNormalized(VAE_EBM["snl_samples"])
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        encoder = Encoder(latent_dim, image_shape, hidden)
        decoder = Decoder(latent_dim, image_shape, hidden)
        energy = (EnergyMLP(latent_dim, energy_hidden, energy_depth, activation=lambda: nn.LeakyReLU(0.2))
                  if prior == "ebm" else None)
    return VAEModel(encoder, decoder, energy, latent_dim, image_shape, prior, normalizer, prior_sampler,
                    likelihood, obs_scale)


def log_likelihood(vae: VAEModel, x, *, num_samples: int = VAE_EBM["eval_importance_samples"],
                   log_z_chains: int = VAE_EBM["eval_log_z_samples"], log_z_steps: int = 100,
                   batch_size: int = 100, seed: int = 0, proposal=None) -> dict[str, Any]:
    r"""Importance-weighted test log-likelihood with the encoder (or ``proposal``) as proposal, :math:`\log Z` by AIS.

    .. math:: \log p(x) \approx \log \frac1K \sum_{k=1}^K
              \frac{p(x \mid z_k)\, e^{-E(z_k)} \mathcal N(z_k; 0, I)}{Z\, q_\phi(z_k \mid x)},
              \qquad z_k \sim q_\phi(\cdot \mid x),

    a stochastic lower bound (in expectation) that tightens as :math:`K` grows. :math:`\log Z` comes from
    :class:`~tilted_priors.pyro.AnnealedImportance` (``log_z_chains`` chains, ``log_z_steps`` temperatures; 0 for
    the Gaussian prior). The reported ``stderr`` combines the spread over the test set with the standard error of
    :math:`\log \hat Z` (shared by every datum). ``proposal``: a callable ``x -> q(z | x)`` (a distribution of
    batch shape ``(B,)`` and event shape ``(latent_dim,)``, e.g. a mixture of encoders), default the encoder's
    Normal.

    Returns
    -------
    dict
        ``per_datum`` (numpy array), ``mean``, ``stderr``, ``data_stderr``, ``log_z``, ``log_z_stderr``,
        ``num_samples``, ``log_z_chains``, ``n``.

    Examples
    --------
    >>> import torch
    >>> vae = build(2, hidden=(8,), prior="gaussian")
    >>> out = log_likelihood(vae, torch.zeros(3, 28, 28, 1), num_samples=4)
    >>> out["per_datum"].shape, out["log_z"]
    ((3,), 0.0)
    """
    num_samples = check_positive_int("num_samples", num_samples)
    batch_size = check_positive_int("batch_size", batch_size)
    x = torch.as_tensor(np.asarray(x), dtype=torch.get_default_dtype())
    if x.dim() != 4 or tuple(x.shape[1:]) != vae.image_shape or x.shape[0] < 1 or not bool(torch.isfinite(x).all()):
        raise ValueError(f"x must be finite with shape (N, {', '.join(map(str, vae.image_shape))}), N >= 1")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        if vae.prior_kind == "ebm":
            est = AnnealedImportance(log_z_chains, log_z_steps).estimate(vae.prior())
            log_z, log_z_se = float(est.log_z), float(est.stderr)
        else:
            log_z, log_z_se = 0.0, 0.0
        like = next(vae.decoder.parameters())
        zeros = torch.zeros(vae.latent_dim, dtype=like.dtype, device=like.device)
        base = dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)
        per_datum = []
        for xb in x.split(batch_size):
            q = dist.Normal(*vae.encoder(xb)).to_event(1) if proposal is None else proposal(xb)
            z = q.sample((num_samples,))
            log_prior = base.log_prob(z) - (vae.energy(z) if vae.energy is not None else 0.0) - log_z
            log_w = vae.observation(z).log_prob(xb) + log_prior - q.log_prob(z)
            per_datum.append(log_mean_exp(log_w.numpy().astype(np.float64), axis=0)[0])
    return {**summarize_with_log_z(np.concatenate(per_datum), log_z, log_z_se), "num_samples": num_samples,
            "log_z_chains": log_z_chains if vae.prior_kind == "ebm" else 0}
