r"""The RME VAE (Kim and Pavlovic 2020) on MNIST-5k as a NumPyro program.

The VAE of :mod:`tilted_priors.models.numpyro.vae_ebm` (Bernoulli or Gaussian image likelihood, a standard Normal or an
energy-tilted prior) with its amortised posterior grown as a recursive mixture of ``M`` encoders
(:class:`~tilted_priors.inference.numpyro.RecursiveMixtureGuide`):

.. math:: Q_m(z \mid x) = \bigl(1 - e_m(x)\bigr) Q_{m-1}(z \mid x) + e_m(x)\, q_m(z \mid x),

with amortised weights :math:`e_m(x)` from a small MLP. Train it with :func:`tilted_priors.inference.numpyro.fit_recursive`
(component :math:`m` on :math:`\mathrm{ELBO}(q_m) + \min(\mathrm{KL}(q_m \| Q_{m-1}), C)`, the weights and the
decoder on :math:`\mathrm{ELBO}(Q_m)`), put the trained parameters back with :meth:`RMEModel.with_params`, and
evaluate with :func:`log_likelihood`, importance sampling with the mixture as proposal. Component 0 is the VAE's own
encoder, so with ``M = 1`` it is the VAE. The same public names and meanings as :mod:`tilted_priors.models.pyro.rme`.

Parameter names: the decoder is ``"decoder$params"`` (and ``"energy$params"`` for a tilted prior), component ``k``
is ``"rme.component{k}$params"``, the mixing network ``"rme.mixing$params"`` (``"rme.mixing"``, an array of
``M - 1`` logits, for global weights).

Examples
--------
>>> import numpy as np
>>> from tilted_priors.inference.numpyro import fit_recursive
>>> rme = build(2, latent_dim=2, hidden=(8,), mixing_hidden=4)
>>> x = (np.random.default_rng(0).random((16, 28, 28, 1)) < 0.3).astype(np.float32)
>>> stages = fit_recursive(rme.model, rme.guide, x, 2, batch_size=8, lr=1e-3, progress=False)
>>> trained = rme.with_params(stages[-1].params)
>>> log_likelihood(trained, x[:4], num_samples=3)["per_datum"].shape
(4,)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from flax import nnx

from tilted_priors.inference.files import unflatten_state
from tilted_priors.inference.numpyro import RecursiveMixtureGuide
from tilted_priors.inference.numpyro.mixture import _log_pi
from tilted_priors.models.numpyro import vae_ebm
from tilted_priors.models.numpyro.lebm import _with_pure_params
from tilted_priors.models.numpyro.vae_ebm import _linear_layers, _mlp
from tilted_priors.models.reference import RME
from tilted_priors._validation import check_positive_int

__all__ = ["REFERENCE", "MixingNet", "RMEModel", "build", "log_likelihood"]

REFERENCE = RME  #: this project's settings (see :mod:`tilted_priors.models.reference`)


class MixingNet(nnx.Module):
    r"""The amortised mixing logits :math:`\ell_2(x), \dots, \ell_M(x)`: a one-hidden-layer MLP (ReLU, Flax NNX).

    The output layer starts at kernel 0 and bias :math:`\ell_k = -\log(k - 1)`, so every stage starts with equal
    weights among its active components, as the guide's global default does.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> MixingNet(3, hidden=4)(jnp.zeros((5, 28, 28, 1))).shape
    (5, 2)
    """

    def __init__(self, num_components: int, image_shape: tuple[int, int, int] = (28, 28, 1),
                 hidden: int = RME["mixing_hidden"], *, rngs: int | nnx.Rngs = 0):
        num_components = check_positive_int("num_components", num_components)
        if num_components < 2:
            raise ValueError("MixingNet needs num_components >= 2 (one component has no weights to learn)")
        pixels = image_shape[0] * image_shape[1] * image_shape[2]
        self.layers = _linear_layers([pixels, check_positive_int("hidden", hidden), num_components - 1],
                                     vae_ebm._rngs(rngs))
        last = self.layers[-1]
        last.kernel.set_value(jnp.zeros_like(last.kernel.get_value()))
        last.bias.set_value(-jnp.log(jnp.arange(1, num_components, dtype=last.bias.get_value().dtype)))

    def __call__(self, x: jax.Array, *, batch_size: int | None = None, index=None) -> jax.Array:
        x = jnp.asarray(x, self.layers[0].kernel.get_value().dtype)
        return _mlp(self.layers, x.reshape(x.shape[0], -1))


def _mixture_proposal(encoders, mixing, x) -> dist.Distribution:
    r""":math:`Q_m(z \mid x)` of ``encoders`` (the active ones) with ``mixing`` (a module, an array of global
    logits, or ``None`` for one component): a pytree-friendly function for :func:`jax.tree_util.Partial`."""
    pairs = [encoder(x) for encoder in encoders]
    components = dist.Normal(jnp.stack([p[0] for p in pairs], -2), jnp.stack([p[1] for p in pairs], -2)).to_event(1)
    m, n = len(encoders), x.shape[0]
    if m == 1:
        log_pi = jnp.zeros((n, 1), pairs[0][0].dtype)
    else:
        logits = mixing(x) if isinstance(mixing, nnx.Module) else jnp.broadcast_to(mixing, (n, mixing.shape[-1]))
        log_pi = _log_pi(logits, m)
    return dist.MixtureSameFamily(dist.Categorical(logits=log_pi), components)


@dataclass(frozen=True, eq=False)
class RMEModel:
    """The VAE, its ``M`` encoders (``encoders[0]`` is ``vae.encoder``), the mixing network and the guide.

    ``mixing`` is a :class:`MixingNet`, or for global weights ``None`` with the logits in ``global_logits``.
    The modules keep their initial weights while SVI trains: :meth:`with_params` returns the trained model.

    Examples
    --------
    >>> rme = build(3, latent_dim=2, hidden=(8,), mixing_hidden=4)
    >>> rme.guide.num_components, rme.encoders[0] is rme.vae.encoder
    (3, True)
    """

    vae: vae_ebm.VAEModel
    encoders: tuple
    mixing: MixingNet | None
    guide: RecursiveMixtureGuide
    global_logits: jax.Array | None = None

    @property
    def model(self):
        """The VAE's NumPyro model (the mixture does not change it)."""
        return self.vae.model

    @property
    def proposal(self) -> jax.tree_util.Partial:
        r""":math:`Q_m(z \mid x)` of the guide's active components as a function ``x -> distribution`` (batch
        ``(N,)``, event ``(latent_dim,)``), **normalised**: the importance-sampling proposal of
        :func:`log_likelihood`. A :class:`jax.tree_util.Partial`, so it is a pytree argument of compiled code.

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> rme = build(2, latent_dim=2, hidden=(8,), mixing_hidden=4)
        >>> rme.proposal(jnp.zeros((5, 28, 28, 1))).event_shape
        (2,)
        """
        mixing = self.mixing if self.mixing is not None else self.global_logits
        return jax.tree_util.Partial(_mixture_proposal, tuple(self.encoders[:self.guide.num_active]), mixing)

    def with_params(self, params: Mapping[str, Any]) -> "RMEModel":
        """A copy whose modules hold the trained values in ``params``: ``svi.get_params(state)`` (nested) or
        :attr:`~tilted_priors.inference.numpyro.FitResult.params` (flat ``site/key/...`` names). Component 0 is read from
        ``"rme.component0$params"``, or from ``"encoder$params"`` when the model was trained as the plain VAE
        (``rme.vae.guide()``). Sites absent from ``params`` leave their module as it is; the guide is rebuilt over
        the new modules with the same ``num_active`` and barrier.

        Examples
        --------
        >>> import jax, jax.numpy as jnp
        >>> rme = build(2, latent_dim=2, hidden=(8,), mixing_hidden=4)
        >>> zeros = jax.tree.map(jnp.zeros_like, nnx.to_pure_dict(nnx.state(rme.encoders[1], nnx.Param)))
        >>> loc, _ = rme.with_params({"rme.component1$params": zeros}).encoders[1](jnp.ones((1, 28, 28, 1)))
        >>> float(jnp.abs(loc).max())
        0.0
        """
        if any("/" in key for key in params):
            params = unflatten_state({k: jnp.asarray(v) for k, v in params.items()}, int_keys=True)
        name = self.guide.name

        def trained(module, site):
            return module if site not in params else _with_pure_params(module, params[site])

        encoders = tuple(trained(e, f"{name}.component{k}$params") for k, e in enumerate(self.encoders))
        if f"{name}.component0$params" not in params:  # trained as the plain VAE (``vae.guide()``)
            encoders = (trained(encoders[0], "encoder$params"),) + encoders[1:]
        vae = dataclasses.replace(self.vae.with_params(params), encoder=encoders[0])
        mixing = None if self.mixing is None else trained(self.mixing, f"{name}.mixing$params")
        global_logits = params.get(f"{name}.mixing", self.global_logits) if self.mixing is None else None
        guide = RecursiveMixtureGuide(vae.model, encoders, mixing, barrier=self.guide.barrier, name=name)
        guide.num_active = self.guide.num_active
        return RMEModel(vae, encoders, mixing, guide, None if global_logits is None else jnp.asarray(global_logits))


def build(num_components: int = RME["num_components"], latent_dim: int = RME["latent_dim"], *,
          hidden=RME["hidden"], mixing_hidden: int | None = RME["mixing_hidden"], barrier: float = RME["barrier"],
          prior: str = "gaussian", likelihood: str = "bernoulli", seed: int = 0, **vae_kwargs: Any) -> RMEModel:
    r"""Build the RME VAE: the VAE of :func:`tilted_priors.models.numpyro.vae_ebm.build` and ``num_components`` encoders.

    Parameters
    ----------
    num_components : int
        :math:`M`.
    latent_dim, hidden, prior, likelihood
        Of the VAE (:func:`tilted_priors.models.numpyro.vae_ebm.build`; ``prior="ebm"`` tilts the prior).
    mixing_hidden : int or None
        Width of :class:`MixingNet`; ``None`` for global (not amortised) weights, a param site ``"rme.mixing"``.
    barrier : float
        :math:`C` of the diversity bonus.
    seed : int
        Seed of the initial weights; component ``k`` is initialised from ``seed + k``.
    **vae_kwargs
        Passed on to :func:`tilted_priors.models.numpyro.vae_ebm.build` (``image_shape``, ``obs_scale``, ``normalizer``, ...).

    Examples
    --------
    >>> build(2, latent_dim=2, hidden=(8,)).guide
    RecursiveMixtureGuide(num_components=2, num_active=2, barrier=2.0, name='rme')
    """
    num_components = check_positive_int("num_components", num_components)
    vae = vae_ebm.build(latent_dim, hidden=hidden, prior=prior, likelihood=likelihood, seed=seed, **vae_kwargs)
    encoders = (vae.encoder,) + tuple(vae_ebm.Encoder(latent_dim, vae.image_shape, hidden, rngs=seed + k)
                                      for k in range(1, num_components))
    mixing = global_logits = None
    if num_components > 1:
        if mixing_hidden is not None:
            mixing = MixingNet(num_components, vae.image_shape, mixing_hidden, rngs=seed + num_components)
        else:
            global_logits = -jnp.log(jnp.arange(1, num_components, dtype=jnp.result_type(float)))
    guide = RecursiveMixtureGuide(vae.model, encoders, mixing, barrier=barrier, name="rme")
    return RMEModel(vae, encoders, mixing, guide, global_logits)


def log_likelihood(rme: RMEModel, x, **kwargs: Any) -> dict[str, Any]:
    r"""Importance-weighted log-likelihood with the mixture :math:`Q_m` as proposal (:math:`\log Z` by AIS for a
    tilted prior): :func:`tilted_priors.models.numpyro.vae_ebm.log_likelihood` with ``proposal=rme.proposal``; the same keywords
    (``num_samples`` :math:`K`, ``log_z_chains``, ``batch_size``, ``seed``) and the same result. Pass the trained
    model (:meth:`RMEModel.with_params`).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> rme = build(2, latent_dim=2, hidden=(8,), mixing_hidden=4)
    >>> log_likelihood(rme, jnp.zeros((3, 28, 28, 1)), num_samples=4)["num_samples"]
    4
    """
    return vae_ebm.log_likelihood(rme.vae, x, proposal=rme.proposal, **kwargs)
