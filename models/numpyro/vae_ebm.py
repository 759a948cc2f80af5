r"""VAE with an energy-tilted latent prior (VAE-EBM; Senetaire et al., self-normalised likelihood), for NumPyro.

.. math:: z \sim p(z) = \frac{e^{-E(z)}\,\mathcal N(z; 0, I)}{Z}, \qquad
          x \mid z \sim \operatorname{Bernoulli}\bigl(\sigma(f_\theta(z))\bigr) \ \text{(each pixel)},

with :math:`E` an :class:`~tilted_priors.numpyro.EnergyMLP` (3 x 200, LeakyReLU 0.2), :math:`f_\theta` an MLP
:class:`Decoder` giving one logit per pixel of a binarised image, and an MLP :class:`Encoder` for the amortised
guide :math:`q_\phi(z \mid x) = \mathcal N(\mu_\phi(x), \operatorname{diag} \sigma_\phi(x)^2)` (Flax NNX modules).
:func:`build` returns a :class:`VAEModel`: ``vae.model`` is an ordinary NumPyro program (one
:class:`~tilted_priors.numpyro.EnergyTiltedNormal` site ``"z"``, observed ``"x"``) and ``vae.guide()`` its
:class:`~tilted_priors.inference.numpyro.AmortizedGuide`. The prior's default normalizer is
:class:`~tilted_priors.numpyro.SelfNormalized`, so ``SVI(vae.model, vae.guide(), optax.adam(...), Trace_ELBO())``
maximises the SNELBO; ``RefinedGuide(vae.guide())`` or ``ShortRunPosterior(vae.model)`` train the same model
otherwise. ``prior="gaussian"`` is the plain VAE. The same public names and semantics as
:mod:`tilted_priors.models.pyro.vae_ebm`; with the same weights (:meth:`VAEModel.load_torch_state_dicts`) the two backends'
networks and log densities agree to rounding.

Images are channels-last ``(N, 28, 28, 1)`` with values in :math:`\{0, 1\}`
(``tilted_priors.models.data.load_mnist(binarize="stochastic")``).

``REFERENCE``: the paper's settings (:data:`tilted_priors.models.reference.VAE_EBM`); ``CPU``: this project's budget for
MNIST-5k on two cores. Parameter names: the model registers its networks with
:func:`numpyro.contrib.module.nnx_module`, so its parameters are the pytree param sites ``"energy$params"`` (EBM
prior only) and ``"decoder$params"``; the guide's is ``"encoder$params"`` and the SNELBO's scalar is ``"snl_b"``.
``svi.get_params(state)`` returns them; :meth:`VAEModel.with_params` puts them back into the modules (the modules
held by the model keep their initial weights while SVI trains).

Examples
--------
>>> REFERENCE["latent_dim"], REFERENCE["energy_depth"], CPU["iterations"]
(16, 3, 3000)
"""
from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from flax import nnx

from tilted_priors.inference.numpyro import AmortizedGuide
from tilted_priors.models.metrics import log_mean_exp, summarize_with_log_z
from tilted_priors.inference.numpyro.modules import register_module
from tilted_priors.models.numpyro.lebm import _symmetric_uniform, _with_pure_params, latent_prior
from tilted_priors.models.reference import PRIOR_KINDS, VAE_EBM, VAE_EBM_CPU, check_likelihood, mlp_sizes
from tilted_priors._validation import check_positive_int
from tilted_priors.numpyro import AnnealedImportance, EnergyMLP, SelfNormalized
from tilted_priors.numpyro.energies import _TorchTwin

__all__ = ["REFERENCE", "CPU", "Encoder", "Decoder", "VAEModel", "build", "log_likelihood"]

REFERENCE = VAE_EBM  #: the paper's settings (see :mod:`tilted_priors.models.reference`)
CPU = VAE_EBM_CPU  #: this project's CPU budget


def _leaky_relu(x):
    """LeakyReLU with slope 0.2, the energy's activation (torch's ``nn.LeakyReLU(0.2)``).

    A module-level function rather than a lambda: it is static data of the energy's graph, so two energies built
    alike share compiled chains.
    """
    return jax.nn.leaky_relu(x, 0.2)


def _rngs(rngs) -> nnx.Rngs:
    if isinstance(rngs, int) and not isinstance(rngs, bool):
        return nnx.Rngs(rngs)
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"rngs must be an int seed or flax.nnx.Rngs, got {type(rngs).__name__}")
    return rngs


def _linear_layers(sizes: list[int], rngs: nnx.Rngs) -> nnx.List:
    r"""``nnx.Linear`` layers ``sizes[0] -> sizes[1] -> ...``, initialised as torch's ``nn.Linear``: kernel and bias
    uniform on :math:`\pm 1/\sqrt{\text{fan\_in}}` (the energy's law, see ``_torch_linear_init`` in
    :mod:`tilted_priors.numpyro.energies`), drawn by NumPy from the JAX key as :mod:`tilted_priors.models.numpyro.lebm` does, so
    that no sampler is compiled per layer shape."""
    layers = []
    for w_in, w_out in zip(sizes[:-1], sizes[1:]):
        init = _symmetric_uniform(1.0 / math.sqrt(w_in))
        layers.append(nnx.Linear(w_in, w_out, kernel_init=init, bias_init=init, rngs=rngs))
    return nnx.List(layers)


def _mlp(layers, h):
    """The layers with ReLU between them (none after the last), as the torch twin's ``nn.Sequential``."""
    for layer in layers[:-1]:
        h = jax.nn.relu(layer(h))
    return layers[-1](h)


class Encoder(_TorchTwin, nnx.Module):
    r"""The amortised guide's network: an image to :math:`(\mu_\phi(x), \sigma_\phi(x))`, each ``(N, latent_dim)``.

    An MLP ``pixels -> hidden... -> 2 latent_dim`` with ReLU (Flax NNX); the first ``latent_dim`` outputs are
    :math:`\mu`, the others give :math:`\sigma = \operatorname{softplus}(\cdot) + 10^{-4}`. Called with the model's
    arguments (``batch_size`` and ``index`` are accepted and ignored). ``layers[i]`` has a ``kernel`` of shape
    ``(in, out)``, the transpose of the torch twin's ``net[2 i].weight``; weights start as torch initialises
    ``nn.Linear`` (uniform on :math:`\pm 1/\sqrt{\text{fan\_in}}`).

    Parameters
    ----------
    latent_dim : int
    image_shape : tuple of int
        ``(H, W, C)``.
    hidden : sequence of int
        Hidden widths (see :func:`tilted_priors.models.reference.mlp_sizes`).
    rngs : int or flax.nnx.Rngs
        Seed or NNX random streams for the initial weights.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> loc, scale = Encoder(4, (28, 28, 1), (8,))(jnp.zeros((3, 28, 28, 1)))
    >>> loc.shape, bool((scale > 0).all())
    ((3, 4), True)
    """

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int] = (28, 28, 1), hidden=(512, 256), *,
                 rngs: int | nnx.Rngs = 0):
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.layers = _linear_layers(mlp_sizes(self.image_shape, self.latent_dim, hidden)[0], _rngs(rngs))

    def __call__(self, x: jax.Array, *, batch_size: int | None = None, index=None) -> tuple[jax.Array, jax.Array]:
        if x is None:
            raise ValueError("the encoder needs the data x: the guide is for observed images")
        kernel = self.layers[0].kernel.get_value()
        x = jnp.asarray(x, kernel.dtype)
        if x.ndim < 1 or int(np.prod(x.shape[1:])) != kernel.shape[0]:
            raise ValueError(f"Encoder expects images of shape (N, {', '.join(map(str, self.image_shape))}), got "
                             f"{tuple(x.shape)}")
        out = _mlp(self.layers, x.reshape(x.shape[0], -1))
        loc, raw = jnp.split(out, 2, axis=-1)
        return loc, jax.nn.softplus(raw) + 1e-4


class Decoder(_TorchTwin, nnx.Module):
    r""":math:`f_\theta`: latent vectors ``(..., latent_dim)`` to Bernoulli logits ``(..., H, W, C)`` (Flax NNX).

    An MLP ``latent_dim -> reversed(hidden)... -> pixels`` with ReLU, laid out and initialised as
    :class:`Encoder`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> Decoder(4, (28, 28, 1), (8,))(jnp.zeros((2, 5, 4))).shape
    (2, 5, 28, 28, 1)
    """

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int] = (28, 28, 1), hidden=(512, 256), *,
                 rngs: int | nnx.Rngs = 0):
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.layers = _linear_layers(mlp_sizes(self.image_shape, self.latent_dim, hidden)[1], _rngs(rngs))

    def __call__(self, z: jax.Array) -> jax.Array:
        z = jnp.asarray(z)
        if z.shape[-1:] != (self.latent_dim,):
            raise ValueError(f"Decoder expects latents of shape (..., {self.latent_dim}), got {tuple(z.shape)}")
        return _mlp(self.layers, z).reshape(z.shape[:-1] + self.image_shape)


@dataclass(frozen=True, eq=False)
class VAEModel:
    r"""A VAE whose prior is energy-tilted (or standard Normal), as a NumPyro program. Made by :func:`build`.

    ``model(x=None, *, batch_size=None, index=None)`` registers the energy (``prior_kind == "ebm"``) and the
    decoder with :func:`numpyro.contrib.module.nnx_module` (param sites ``"energy$params"`` and
    ``"decoder$params"``), then in ``numpyro.plate("data", N)`` samples ``"z"`` from the prior and observes
    ``"x" ~ Bernoulli(logits=decoder(z)).to_event(3)``. Returns ``z``. Inside a seeded model (SVI) the
    :class:`~tilted_priors.numpyro.EnergyTiltedNormal` prior draws its normalizer's key from the seed.

    The modules held here keep their initial weights: training changes the param sites in the SVI state, and
    :meth:`with_params` returns the model with trained weights (for :meth:`prior`, :func:`log_likelihood`).

    Attributes
    ----------
    encoder : Encoder
    decoder : Decoder
    energy : flax.nnx.Module or None
    latent_dim : int
    image_shape : tuple of int
    prior_kind : str
        ``"ebm"`` or ``"gaussian"``.
    normalizer, prior_sampler : optional
        Of the :class:`~tilted_priors.numpyro.EnergyTiltedNormal` prior.
    likelihood : str
        ``"bernoulli"`` (binary images, the decoder's output as logits) or ``"gaussian"``
        (``Normal(sigmoid(decoder(z)), obs_scale)`` per pixel).
    obs_scale : float
        The Gaussian likelihood's standard deviation.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from numpyro import handlers
    >>> vae = build(4, hidden=(8,))
    >>> tr = handlers.trace(handlers.seed(vae.model, 0)).get_trace(jnp.zeros((3, 28, 28, 1)))
    >>> tr["z"]["value"].shape, tr["x"]["fn"].event_shape
    ((3, 4), (28, 28, 1))
    >>> sorted(name for name, site in tr.items() if site["type"] == "param")
    ['decoder$params', 'energy$params', 'snl_b']
    """

    encoder: Encoder
    decoder: Decoder
    energy: nnx.Module | None
    latent_dim: int
    image_shape: tuple[int, int, int]
    prior_kind: str
    normalizer: Any = None
    prior_sampler: Any = None
    likelihood: str = "bernoulli"
    obs_scale: float = 0.1

    def observation(self, z: jax.Array) -> dist.Distribution:
        r"""The likelihood :math:`p(x \mid z)`, normalised, event shape ``image_shape``, with the decoder's current
        weights (see :meth:`with_params`).

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> build(4, hidden=(8,)).observation(jnp.zeros((3, 4))).event_shape
        (28, 28, 1)
        """
        return _observation(self.likelihood, self.obs_scale, self.decoder(z))

    def _prior_with(self, energy, batch_shape, rng_key=None) -> dist.Distribution:
        return latent_prior(self, self.decoder.layers[0].kernel.get_value(), batch_shape, energy=energy,
                            rng_key=rng_key)

    def prior(self, batch_shape: tuple[int, ...] = (), *, rng_key: jax.Array | None = None) -> dist.Distribution:
        """The prior over ``z``: batch shape ``batch_shape``, event shape ``(latent_dim,)``; normalised for the
        Gaussian baseline, for the tilted prior as its normalizer makes it (``rng_key`` is for the normalizer, see
        :class:`~tilted_priors.numpyro.EnergyTilted`). Uses the modules' current weights (see :meth:`with_params`).

        Examples
        --------
        >>> build(4, hidden=(8,), prior="gaussian").prior((3,)).batch_shape
        (3,)
        """
        return self._prior_with(self.energy, batch_shape, rng_key)

    def _data(self, x, batch_size):
        if x is None:
            return None, check_positive_int("batch_size", batch_size)
        if jnp.ndim(x) != 4 or tuple(jnp.shape(x)[1:]) != self.image_shape:
            raise ValueError(f"model: x must have shape (N, {', '.join(map(str, self.image_shape))}) "
                             f"(channels last, values 0 or 1), got {tuple(jnp.shape(x))}")
        n = int(jnp.shape(x)[0])
        if batch_size is not None and batch_size != n:
            raise ValueError(f"model: batch_size={batch_size} but x has {n} rows")
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(self.decoder.layers[0].kernel.get_value().dtype)
        return x, n

    def model(self, x: jax.Array | None = None, *, batch_size: int | None = None, index=None) -> jax.Array:
        """The NumPyro program (see the class docstring).

        Examples
        --------
        >>> from numpyro import handlers
        >>> handlers.seed(build(4, hidden=(8,), prior="gaussian").model, 0)(batch_size=2).shape
        (2, 4)
        """
        x, n = self._data(x, batch_size)
        energy = register_module("energy", self.energy) if self.prior_kind == "ebm" else None
        decoder = register_module("decoder", self.decoder)
        prior = self._prior_with(energy, (n,))
        with numpyro.plate("data", n):
            z = numpyro.sample("z", prior)
            numpyro.sample("x", _observation(self.likelihood, self.obs_scale, decoder(z)), obs=x)
        return z

    def guide(self) -> AmortizedGuide:
        """The amortised guide ``AmortizedGuide(model, encoder, "z", name="encoder")`` (wrap it in
        :class:`~tilted_priors.inference.numpyro.RefinedGuide` for MCMC refinement).

        Examples
        --------
        >>> build(4, hidden=(8,)).guide()
        AmortizedGuide(encoder=Encoder, sites=('z',), name='encoder')
        """
        return AmortizedGuide(self.model, self.encoder, "z", name="encoder")

    def with_params(self, params: Mapping[str, Any]) -> "VAEModel":
        """A copy whose modules hold the values of the param sites in ``params`` (e.g. ``svi.get_params(state)``):
        ``"encoder$params"``, ``"decoder$params"``, ``"energy$params"``.

        Sites absent from ``params`` leave their module as it is; the original is not changed.

        Examples
        --------
        >>> import jax, jax.numpy as jnp
        >>> from numpyro import handlers
        >>> vae = build(2, image_shape=(2, 2, 1), hidden=(8,), prior="gaussian")
        >>> tr = handlers.trace(handlers.seed(vae.model, 0)).get_trace(batch_size=1)
        >>> zeros = jax.tree.map(jnp.zeros_like, tr["decoder$params"]["value"])
        >>> float(jnp.abs(vae.with_params({"decoder$params": zeros}).decoder(jnp.ones(2))).max())
        0.0
        """
        changes = {}
        for name in ("encoder", "decoder", "energy"):
            module = getattr(self, name)
            if module is not None and f"{name}$params" in params:
                changes[name] = _with_pure_params(module, params[f"{name}$params"])
        return dataclasses.replace(self, **changes)

    def load_torch_state_dicts(self, *, encoder: Mapping[str, Any] | None = None,
                               decoder: Mapping[str, Any] | None = None,
                               energy: Mapping[str, Any] | None = None) -> "VAEModel":
        """Copy the Pyro twin's weights (its modules' ``state_dict()``) into these modules, in place; returns
        ``self``. Torch ``Linear`` weights ``(out, in)`` become NNX kernels ``(in, out)``; ``None`` skips a module.

        Examples
        --------
        >>> vae = build(2, image_shape=(2, 2, 1), hidden=(8,), energy_hidden=4)
        >>> vae.load_torch_state_dicts(decoder=vae.decoder.torch_state_dict()) is vae
        True
        """
        if encoder is not None:
            self.encoder.load_torch_state_dict(encoder)
        if decoder is not None:
            self.decoder.load_torch_state_dict(decoder)
        if energy is not None:
            if self.energy is None:
                raise ValueError("load_torch_state_dicts: this VAE has a Gaussian prior and no energy")
            self.energy.load_torch_state_dict(energy)
        return self


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
    energy_hidden, energy_depth : int
        The energy MLP's width and number of hidden layers.
    normalizer : optional
        The prior's; default ``SelfNormalized(REFERENCE["snl_samples"])`` (the SNELBO).
    prior_sampler : optional
        The prior's sampler (default ``ShortRunLangevin(60, 0.4)``).
    likelihood : {"bernoulli", "gaussian"}
        Of the images given the latent (see :class:`VAEModel`).
    obs_scale : float
        Standard deviation of the Gaussian likelihood.
    seed : int or None
        Seed of the initial weights (the encoder, decoder and energy get separate streams); ``None`` draws a fresh
        one.

    Returns
    -------
    VAEModel

    Raises
    ------
    ValueError
        For a non-positive latent size or width, an unknown ``prior`` or a malformed ``image_shape``.

    Examples
    --------
    >>> vae = build(16)
    >>> vae.normalizer
    SelfNormalized(num_samples=256, name='snl_b')
    """
    latent_dim = check_positive_int("latent_dim", latent_dim)
    if prior not in PRIOR_KINDS:
        raise ValueError(f"prior must be one of {PRIOR_KINDS}, got {prior!r}")
    try:
        image_shape = tuple(int(s) for s in image_shape)
    except (TypeError, ValueError):
        raise ValueError(f"image_shape must be three positive integers (H, W, C), got {image_shape!r}") from None
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be three positive integers (H, W, C), got {image_shape!r}")
    if seed is None:
        seed = secrets.randbits(31)
    elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    likelihood, obs_scale = check_likelihood(likelihood, obs_scale)
    if prior == "ebm" and normalizer is None:
        normalizer = SelfNormalized(VAE_EBM["snl_samples"])
    key_enc, key_dec, key_e = jax.random.split(jax.random.PRNGKey(int(seed)), 3)
    encoder = Encoder(latent_dim, image_shape, hidden, rngs=nnx.Rngs(params=key_enc))
    decoder = Decoder(latent_dim, image_shape, hidden, rngs=nnx.Rngs(params=key_dec))
    energy = (EnergyMLP(latent_dim, energy_hidden, energy_depth, activation=_leaky_relu,
                        rngs=nnx.Rngs(params=key_e)) if prior == "ebm" else None)
    return VAEModel(encoder, decoder, energy, latent_dim, image_shape, prior, normalizer, prior_sampler,
                    likelihood, obs_scale)


def _observation(likelihood: str, obs_scale: float, out: jax.Array) -> dist.Distribution:
    if likelihood == "gaussian":
        return dist.Normal(jax.nn.sigmoid(out), obs_scale).to_event(3)
    return dist.Bernoulli(logits=out).to_event(3)


def _encoder_proposal(encoder, x) -> dist.Distribution:
    return dist.Normal(*encoder(x)).to_event(1)


@partial(jax.jit, static_argnames=("num_samples", "likelihood", "obs_scale"))
def _importance_log_weights(proposal, decoder, energy, x, rng_key, log_z, num_samples: int, likelihood: str,
                            obs_scale: float):
    r"""``(num_samples, B)`` log weights :math:`\log p(x \mid z) + \log p(z) - \log q(z \mid x)`, :math:`z \sim q`."""
    q = proposal(x)
    z = q.sample(rng_key, (num_samples,))
    base = dist.Normal(jnp.zeros(z.shape[-1], z.dtype), 1.0).to_event(1)
    log_prior = base.log_prob(z) - log_z
    if energy is not None:
        log_prior = log_prior - energy(z)
    log_lik = _observation(likelihood, obs_scale, decoder(z)).log_prob(x)
    return log_lik + log_prior - q.log_prob(z)


def log_likelihood(vae: VAEModel, x, *, num_samples: int = VAE_EBM["eval_importance_samples"],
                   log_z_chains: int = VAE_EBM["eval_log_z_samples"], log_z_steps: int = 100,
                   batch_size: int = 100, seed: int = 0, proposal=None) -> dict[str, Any]:
    r"""Importance-weighted test log-likelihood with the encoder (or ``proposal``) as proposal, :math:`\log Z` by AIS.

    .. math:: \log p(x) \approx \log \frac1K \sum_{k=1}^K
              \frac{p(x \mid z_k)\, e^{-E(z_k)} \mathcal N(z_k; 0, I)}{Z\, q_\phi(z_k \mid x)},
              \qquad z_k \sim q_\phi(\cdot \mid x),

    a stochastic lower bound (in expectation) that tightens as :math:`K` grows. :math:`\log Z` comes from
    :class:`~tilted_priors.numpyro.AnnealedImportance` (``log_z_chains`` chains, ``log_z_steps`` temperatures; 0
    for the Gaussian prior). The reported ``stderr`` combines the spread over the test set with the standard error
    of :math:`\log \hat Z` (shared by every datum). The log weights of each batch of ``batch_size`` images are one
    compiled computation (float32); their log-mean-exp is taken in float64 on the host.

    Parameters
    ----------
    vae : VAEModel
        The trained model: ``vae.with_params(svi.get_params(state))`` (the modules' own weights are used).
    x : array_like
        Binary images ``(N, H, W, C)``.
    num_samples : int
        :math:`K`, importance samples per datum.
    log_z_chains, log_z_steps : int
        Of the AIS estimate of :math:`\log Z`.
    batch_size : int
        Images per compiled batch.
    seed : int
        Seed of the AIS chains and the importance samples.
    proposal : callable, optional
        ``x -> q(z | x)``, a distribution of batch shape ``(B,)`` and event shape ``(latent_dim,)`` (e.g. a mixture
        of encoders), passed to :func:`jax.jit` as a pytree (a :class:`jax.tree_util.Partial` or an NNX module);
        default the encoder's Normal.

    Returns
    -------
    dict
        ``per_datum`` (numpy array), ``mean``, ``stderr``, ``data_stderr``, ``log_z``, ``log_z_stderr``,
        ``num_samples``, ``log_z_chains``, ``n``.

    Raises
    ------
    ValueError
        When ``x`` is not finite or not of shape ``(N, H, W, C)``, or a count is not a positive integer.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> vae = build(2, hidden=(8,), prior="gaussian")
    >>> out = log_likelihood(vae, jnp.zeros((3, 28, 28, 1)), num_samples=4)
    >>> out["per_datum"].shape, out["log_z"]
    ((3,), 0.0)
    """
    num_samples = check_positive_int("num_samples", num_samples)
    batch_size = check_positive_int("batch_size", batch_size)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 4 or tuple(x.shape[1:]) != vae.image_shape or x.shape[0] < 1 or not np.isfinite(x).all():
        raise ValueError(f"x must be finite with shape (N, {', '.join(map(str, vae.image_shape))}), N >= 1")
    dtype = vae.decoder.layers[0].kernel.get_value().dtype
    if proposal is None:
        proposal = jax.tree_util.Partial(_encoder_proposal, vae.encoder)
    key_z, key_is = jax.random.split(jax.random.PRNGKey(seed))
    if vae.prior_kind == "ebm":
        log_z_chains = check_positive_int("log_z_chains", log_z_chains)
        est = AnnealedImportance(log_z_chains, check_positive_int("log_z_steps", log_z_steps)).estimate(
            vae.prior(), key_z)
        log_z, log_z_se = float(est.log_z), float(est.stderr)
    else:
        log_z, log_z_se = 0.0, 0.0
    per_datum = []
    for i, start in enumerate(range(0, x.shape[0], batch_size)):
        xb = jnp.asarray(x[start:start + batch_size], dtype)
        log_w = _importance_log_weights(proposal, vae.decoder, vae.energy, xb, jax.random.fold_in(key_is, i),
                                        jnp.asarray(log_z, dtype), num_samples=num_samples,
                                        likelihood=vae.likelihood, obs_scale=vae.obs_scale)
        per_datum.append(log_mean_exp(np.asarray(log_w, dtype=np.float64), axis=0)[0])
    return {**summarize_with_log_z(np.concatenate(per_datum), log_z, log_z_se), "num_samples": num_samples,
            "log_z_chains": log_z_chains if vae.prior_kind == "ebm" else 0}
