r"""NT-EBM: a data-space energy-based model as an exponential tilting of a normalising flow (Nijkamp et al. 2022),
NumPyro.

.. math:: p(x) = \frac{e^{-E(x)}\, q_T(x)}{Z}, \qquad x = T(u),\ u \sim \mathcal N(0, I)
          \quad\Longrightarrow\quad
          p(u) = \frac{e^{-E(T(u))}\, \mathcal N(u; 0, I)}{Z}

(the Jacobian of :math:`T` cancels). The same public names as :mod:`tilted_priors.models.pyro.ntebm`. The flow :math:`T` is a
stack of :class:`numpyro.distributions.flows.InverseAutoregressiveTransform` layers (MADE networks from
:func:`numpyro.nn.AutoregressiveNN`, tanh) with reversing permutations between them; its parameters are a pytree
held by :class:`NTEBM` (``flow_params``) and :meth:`NTEBM.transform` builds the transform from any parameter value,
so learning and sampling are jitted functions of the parameters. :math:`T(u)` is parallel; :math:`T^{-1}` (needed
for :math:`\log q_T(x)`: maximum likelihood and data-space chains) takes :math:`d` network passes per layer —
cheap in 2-D, costly for 784-d images. (``BlockNeuralAutoregressiveTransform`` has no inverse, so it cannot be fit
by maximum likelihood on data; it would do as a :class:`~tilted_priors.inference.numpyro.FlowBackbone` for latent priors only.)
The energy is a Flax NNX :class:`~tilted_priors.numpyro.EnergyMLP`.

``model`` is an ordinary NumPyro program with one observed site ``x ~ EnergyTilted(E, TransformedDistribution(N(0,
I), T))``. Learning follows the paper: :func:`fit_flow` (maximum likelihood of the flow, optax Adam), then, with the
flow fixed, :func:`fit_energy` (the contrastive gradient :math:`\mathbb E_{\text{data}}[\nabla E] -
\mathbb E_p[\nabla E]`, negatives from short-run Langevin chains in :math:`u` started from :math:`\mathcal N(0,
I)`, pushed through :math:`T`). The model's site is observed and :class:`~tilted_priors.numpyro.Contrastive` would
run its chains in data space, while :class:`~tilted_priors.inference.numpyro.FlowBackbone` reparameterises latent sites only, so
:func:`fit_energy` writes the contrastive loss directly (one jitted step). :func:`sample` runs the prior program
under :class:`~tilted_priors.inference.numpyro.FlowBackbone` (``space="latent"``) or the sampler on :math:`-E(x) + \log q_T(x)`
(``space="data"``).

Hyper-parameters
----------------
``REFERENCE`` (2-D toy mixtures, CPU) and ``MNIST`` (784-d; supported by the API, but the IAF inverse makes a
maximum-likelihood fit on 784 dimensions slow here: use the Pyro coupling flow for MNIST). This project's choices;
the paper's code is not public.

Examples
--------
>>> REFERENCE["flow_layers"], MNIST["data_dim"]
(6, 784)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from flax import nnx
from jax.example_libraries import stax
from numpyro import handlers
from numpyro.distributions.flows import InverseAutoregressiveTransform
from numpyro.distributions.transforms import ComposeTransform, PermuteTransform
from numpyro.nn import AutoregressiveNN

from tilted_priors.inference.numpyro.reparam import FlowBackbone
from tilted_priors.models.data import batch_stream
from tilted_priors._validation import check_positive_int, check_step_size
from tilted_priors.numpyro import EnergyMLP, EnergyTilted, ShortRunLangevin, Unnormalized

__all__ = ["REFERENCE", "MNIST", "NTEBM", "build", "fit_flow", "fit_energy", "sample", "latent_log_density"]

#: 2-D toy mixtures (the ring of 8 Gaussians): this project's CPU settings.
REFERENCE: dict[str, Any] = {
    "data_dim": 2,
    "flow": "iaf",
    "flow_layers": 6,
    "flow_hidden": 64,
    "energy_hidden": 64,
    "energy_depth": 2,
    "flow_steps": 3000,
    "flow_lr": 3e-3,
    "energy_steps": 500,
    "energy_lr": 1e-3,
    "batch_size": 256,
    "chain_steps": 40,
    "step_size": 0.2,
}

#: MNIST-5k flattened to 784 in ``[-1, 1]`` (a tiny flow; see the module notes on the IAF inverse's cost).
MNIST: dict[str, Any] = {**REFERENCE, "data_dim": 784, "flow_layers": 2, "flow_hidden": 1024, "energy_hidden": 256,
                         "flow_steps": 3000, "flow_lr": 1e-3, "energy_steps": 1000, "energy_lr": 1e-4,
                         "batch_size": 100, "chain_steps": 60, "step_size": 0.1}


def _make_transform(arn_applies: tuple, perm: np.ndarray, params: list) -> ComposeTransform:
    parts: list = []
    for i, (apply, p) in enumerate(zip(arn_applies, params)):
        if i:
            parts.append(PermuteTransform(perm))
        parts.append(InverseAutoregressiveTransform(partial(apply, p)))
    return ComposeTransform(parts)


@dataclass
class NTEBM:
    r"""A flow :math:`T` (parameters ``flow_params``) and an energy :math:`E` defining
    :math:`p(x) \propto e^{-E(x)} q_T(x)` (see :func:`build`).

    Attributes
    ----------
    data_dim : int
        :math:`d`.
    flow_params : list
        One MADE parameter pytree per IAF layer (what :func:`fit_flow` trains).
    energy : EnergyMLP
        :math:`E` (Flax NNX; :func:`fit_energy` updates it in place).
    arn_applies : tuple
        The MADE ``apply`` functions (static).
    permutation : numpy.ndarray
        The permutation between layers (reversal).

    Examples
    --------
    >>> import jax
    >>> m = build(2, flow_layers=2, flow_hidden=8, energy_hidden=8)
    >>> m.flow_dist().sample(jax.random.PRNGKey(0), (3,)).shape
    (3, 2)
    """

    data_dim: int
    flow_params: list
    energy: EnergyMLP
    arn_applies: tuple
    permutation: np.ndarray

    def transform(self, params: Optional[list] = None) -> ComposeTransform:
        r"""The flow :math:`T: u \mapsto x` at ``params`` (default ``flow_params``)."""
        return _make_transform(self.arn_applies, self.permutation, self.flow_params if params is None else params)

    def base(self) -> dist.Distribution:
        r""":math:`\mathcal N(0, I_d)` with event shape ``(d,)``."""
        return dist.Normal(jnp.zeros(self.data_dim), 1.0).to_event(1)

    def flow_dist(self, params: Optional[list] = None) -> dist.TransformedDistribution:
        r""":math:`q_T = T_\#\mathcal N(0, I)`."""
        return dist.TransformedDistribution(self.base(), self.transform(params))

    def prior(self, *, normalizer=None, sampler=None, rng_key=None) -> EnergyTilted:
        r"""``EnergyTilted(E, q_T)``: the model's distribution of :math:`x` (default normalizer ``Contrastive``, default
        sampler ``ShortRunLangevin(60, 0.4)``, the distributions' former default, which the reproductions keep)."""
        sampler = ShortRunLangevin(60, 0.4) if sampler is None else sampler
        return EnergyTilted(self.energy, self.flow_dist(), normalizer=normalizer, sampler=sampler, rng_key=rng_key)

    def model(self, x) -> None:
        r"""The NumPyro program: ``x ~ EnergyTilted(E, q_T)`` observed, one datum per ``"data"`` plate entry.

        The site's log density is :math:`-E(x) + \log q_T(x)` minus the normalizer's term (0 in value for the
        default :class:`~tilted_priors.numpyro.Contrastive`, which runs data-space chains for its gradient; use
        :func:`~tilted_priors.inference.numpyro.handlers.normalizer` with ``Unnormalized()`` to evaluate it without chains).
        """
        x = check_data(x, self.data_dim)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", self.prior(), obs=x)


def check_data(x: Any, data_dim: int, name: str = "data") -> jax.Array:
    """``x`` as a float array of shape ``(N, data_dim)`` with finite entries, else ``ValueError``."""
    x = np.asarray(x, dtype=np.float32) if not isinstance(x, jax.Array) else x.astype(jnp.float32)
    if x.ndim != 2 or x.shape[-1] != data_dim:
        raise ValueError(f"{name} must have shape (N, {data_dim}), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not bool(np.isfinite(np.asarray(x)).all()):
        raise ValueError(f"{name} has non-finite entries (nan or inf)")
    return jnp.asarray(x)


_DEFAULT_LAYERS = 6  #: IAF layers when build(flow_layers=None)


def build(data_dim: int, *, flow: str = "iaf", flow_layers: Optional[int] = None, flow_hidden: int = 64,
          energy_hidden: int = 64, energy_depth: int = 2, bound: float = 5.0, seed: int = 0) -> NTEBM:
    r"""Build an NT-EBM: an IAF flow :math:`T` on :math:`\mathbb R^d` and an energy MLP.

    .. math:: T = A_L \circ P \circ A_{L-1} \circ \dots \circ P \circ A_1, \qquad
              A_i(u) = \mu_i(u) + \sigma_i(u) \odot u, \qquad p(x) \propto e^{-E(x)}\, q_T(x),

    with :math:`(\mu_i, \log\sigma_i)` a MADE network (two hidden layers of ``flow_hidden``, tanh) and :math:`P`
    the reversal permutation.

    Parameters
    ----------
    data_dim : int
        :math:`d \ge 2`.
    flow : {"iaf"}
        Flow type (the only one with an inverse in :mod:`numpyro.distributions.flows`; Pyro's twin builds
        ``"spline"`` and ``"affine"`` coupling flows).
    flow_layers : int, optional
        IAF layers (``None``: 6).
    flow_hidden : int
        MADE width (at least ``data_dim``).
    energy_hidden, energy_depth : int
        Width and depth of :class:`~tilted_priors.numpyro.EnergyMLP`.
    bound : float
        The spline interval half-width of Pyro's ``"spline"`` flow; checked (positive) but unused by ``"iaf"``,
        so that one call builds on both backends.
    seed : int
        Initial weights.

    Returns
    -------
    NTEBM

    Examples
    --------
    >>> m = build(2, flow_layers=2, flow_hidden=8, energy_hidden=8, seed=0)
    >>> len(m.flow_params), m.transform().domain.event_dim
    (2, 1)
    """
    d = check_positive_int("data_dim", data_dim)
    if d < 2:
        raise ValueError(f"data_dim must be at least 2, got {d}")
    if flow != "iaf":
        raise ValueError(f"flow must be 'iaf' on NumPyro, got {flow!r}")
    layers = check_positive_int("flow_layers", _DEFAULT_LAYERS if flow_layers is None else flow_layers)
    hidden = check_positive_int("flow_hidden", flow_hidden)
    check_step_size(bound, "bound")
    if hidden < d:
        raise ValueError(f"flow_hidden must be at least data_dim={d} (a MADE constraint), got {hidden}")
    key = jax.random.PRNGKey(seed)
    applies, params = [], []
    for k in jax.random.split(key, layers):
        init_fn, apply_fn = AutoregressiveNN(d, [hidden, hidden], nonlinearity=stax.Tanh)
        _, p = init_fn(k, (d,))
        # start near the identity: shrink the last layer
        p = list(p)
        w, b = p[-1]
        p[-1] = (w * 0.01, b * 0.0)
        applies.append(apply_fn)
        params.append(p)
    energy = EnergyMLP(d, check_positive_int("energy_hidden", energy_hidden),
                       check_positive_int("energy_depth", energy_depth), rngs=seed)
    return NTEBM(d, params, energy, tuple(applies), np.arange(d)[::-1].copy())


def fit_flow(ntebm: NTEBM, data: Any, steps: int, *, batch_size: int = 256, lr: float = 3e-3,
             seed: int = 0, schedule: str = "constant") -> list[float]:
    r"""Fit the flow alone by maximum likelihood: minimise :math:`-\frac1B\sum_i \log q_T(x_i)` with optax Adam.

    .. math:: \log q_T(x) = \log\mathcal N(T^{-1}(x); 0, I) - \log\bigl|\det \partial T/\partial u\,(T^{-1}(x))\bigr|

    Updates ``ntebm.flow_params``.

    Parameters
    ----------
    ntebm : NTEBM
    data : array_like
        ``(N, d)`` finite training points.
    steps, batch_size : int
        Adam steps and minibatch size (without replacement, reshuffled each epoch).
    lr : float
        Adam learning rate (the peak rate with ``schedule="cosine"``).
    seed : int
        Minibatch order.
    schedule : {"constant", "cosine"}
        ``"cosine"``: linear warm-up over the first 5% of the steps, then cosine decay to ``lr / 100``, with the
        gradient's global norm clipped at 10 (a longer, steadier fit for deep flows).

    Returns
    -------
    list of float
        The minibatch NLL (nats per point) at each step.

    Examples
    --------
    >>> from tilted_priors.models.data import toy_mixture
    >>> m = build(2, flow_layers=2, flow_hidden=16, energy_hidden=8)
    >>> hist = fit_flow(m, toy_mixture(512, "ring"), steps=30, lr=1e-2)
    >>> hist[-1] < hist[0]
    True
    """
    x = np.asarray(check_data(data, ntebm.data_dim))
    steps = check_positive_int("steps", steps)
    lr = check_step_size(lr, "lr")
    if schedule == "constant":
        opt = optax.adam(lr)
    elif schedule == "cosine":
        warmup = max(1, steps // 20)
        rate = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr / 100)
        opt = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(rate))
    else:
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    applies, perm = ntebm.arn_applies, ntebm.permutation

    def nll(params, xb):
        q = dist.TransformedDistribution(ntebm.base(), _make_transform(applies, perm, params))
        return -jnp.mean(q.log_prob(xb))

    @jax.jit
    def step(params, opt_state, xb):
        loss, g = jax.value_and_grad(nll)(params, xb)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state = ntebm.flow_params, opt.init(ntebm.flow_params)
    history = []
    for xb in batch_stream(x, check_positive_int("batch_size", batch_size), steps, seed=seed):
        params, opt_state, loss = step(params, opt_state, xb)
        history.append(float(loss))
        if not math.isfinite(history[-1]):
            raise FloatingPointError(f"fit_flow: non-finite NLL at step {len(history) - 1}; lower lr")
    ntebm.flow_params = params
    return history


def _latent_log_density(energy, transform, u):
    return -energy(transform(u)) - 0.5 * jnp.sum(u * u, -1)


def latent_log_density(ntebm: NTEBM) -> Callable:
    r"""The latent chains' target :math:`u \mapsto -E(T(u)) + \log\mathcal N(u; 0, I)` (up to a constant).

    Examples
    --------
    >>> m = build(2, flow_layers=1, flow_hidden=8, energy_hidden=8)
    >>> latent_log_density(m)(jnp.zeros((4, 2))).shape
    (4,)
    """
    return partial(_latent_log_density, ntebm.energy, ntebm.transform())


def sample(ntebm: NTEBM, n: int, sampler=None, *, rng_key=None, space: str = "latent") -> jax.Array:
    r"""Draw ``n`` points of :math:`p(x)` with ``sampler`` (default ``ShortRunLangevin(40, 0.2)``), one chain each.

    ``space="latent"``: chains on :math:`p(u) \propto e^{-E(T(u))}\mathcal N(u; 0, I)` from :math:`u_0 \sim
    \mathcal N(0, I)`, pushed through :math:`T` — the prior program ``x ~ EnergyTilted(E, q_T)`` reparameterised
    with :class:`~tilted_priors.inference.numpyro.FlowBackbone`, so the site's own sampler runs on :math:`u`.
    ``space="data"``: chains on :math:`-E(x) + \log q_T(x)` from :math:`x_0 \sim q_T`.

    Returns
    -------
    jax.Array
        ``(n, d)``.

    Examples
    --------
    >>> import jax
    >>> from tilted_priors.numpyro import MALA
    >>> m = build(2, flow_layers=1, flow_hidden=8, energy_hidden=8)
    >>> k = jax.random.PRNGKey(0)
    >>> sample(m, 5, MALA(10, 0.3), rng_key=k).shape, sample(m, 5, MALA(10, 0.3), rng_key=k, space="data").shape
    ((5, 2), (5, 2))
    """
    n = check_positive_int("n", n)
    sampler = ShortRunLangevin(40, 0.2) if sampler is None else sampler
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    if space == "data":
        return ntebm.prior(normalizer=Unnormalized(), sampler=sampler).sample(rng_key, (n,))
    if space != "latent":
        raise ValueError(f"space must be 'latent' or 'data', got {space!r}")

    def program():
        with numpyro.plate("chains", n):
            return numpyro.sample("x", ntebm.prior(normalizer=Unnormalized(), sampler=sampler))

    reparam = handlers.reparam(program, config={"x": FlowBackbone()})
    return handlers.trace(handlers.seed(reparam, rng_key)).get_trace()["x"]["value"]


def fit_energy(ntebm: NTEBM, data: Any, steps: int, *, chain_steps: int = 40, step_size: float = 0.2,
               sampler=None, batch_size: int = 256, lr: float = 1e-3, reg: float = 0.0,
               seed: int = 0) -> list[float]:
    r"""Learn the energy with the flow fixed: the contrastive loss with latent-space negatives.

    .. math:: L(\theta) = \frac1B\sum_i E_\theta(x_i) - \frac1B\sum_j E_\theta(T(u^-_j))
              + \lambda \bigl(\overline{E(x)^2} + \overline{E(T(u^-))^2}\bigr),

    :math:`u^-_j` from ``sampler`` (default ``ShortRunLangevin(chain_steps, step_size)``) on
    :func:`latent_log_density`, started from :math:`\mathcal N(0, I)`; its gradient is
    :math:`\mathbb E_{\text{data}}[\nabla E] - \mathbb E_p[\nabla E]`. Only the energy moves (in place). One
    jitted step per minibatch (chains inlined).

    Parameters
    ----------
    ntebm : NTEBM
    data : array_like
        ``(N, d)`` finite training points.
    steps : int
        Adam steps.
    chain_steps, step_size
        Langevin steps and step size in :math:`u`.
    sampler : sampler, optional
        Overrides ``chain_steps`` / ``step_size``.
    batch_size : int
        Data points and negative chains per step.
    lr : float
        Adam learning rate (``b1=0.5``, as LEBM).
    reg : float
        :math:`\lambda \ge 0`.
    seed : int
        Minibatch order and chain keys.

    Returns
    -------
    list of float
        The contrastive loss (without the penalty) per step.

    Examples
    --------
    >>> import math
    >>> from tilted_priors.models.data import toy_mixture
    >>> m = build(2, flow_layers=1, flow_hidden=8, energy_hidden=8)
    >>> hist = fit_energy(m, toy_mixture(256, "ring"), steps=3, chain_steps=5, batch_size=32)
    >>> len(hist), all(math.isfinite(h) for h in hist)
    (3, True)
    """
    x = np.asarray(check_data(data, ntebm.data_dim))
    steps = check_positive_int("steps", steps)
    sampler = sampler or ShortRunLangevin(check_positive_int("chain_steps", chain_steps), check_step_size(step_size))
    if not (isinstance(reg, (int, float)) and reg >= 0 and math.isfinite(reg)):
        raise ValueError(f"reg must be a finite number >= 0, got {reg!r}")
    opt = optax.adam(check_step_size(lr, "lr"), b1=0.5, b2=0.999)
    graphdef, state = nnx.split(ntebm.energy)
    applies, perm, d = ntebm.arn_applies, ntebm.permutation, ntebm.data_dim

    @jax.jit
    def step(state, opt_state, flow_params, xb, key):
        transform = _make_transform(applies, perm, flow_params)
        energy = nnx.merge(graphdef, state)
        u0 = jax.random.normal(jax.random.fold_in(key, 1), xb.shape)
        u = sampler.run(key, partial(_latent_log_density, energy, transform), u0)
        neg = jax.lax.stop_gradient(transform(u))

        def loss_fn(state):
            e = nnx.merge(graphdef, state)
            e_pos, e_neg = e(xb), e(neg)
            loss = e_pos.mean() - e_neg.mean()
            return loss + reg * (jnp.mean(e_pos ** 2) + jnp.mean(e_neg ** 2)), loss

        (_, loss), g = jax.value_and_grad(loss_fn, has_aux=True)(state)
        updates, opt_state = opt.update(g, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    opt_state = opt.init(state)
    key = jax.random.PRNGKey(seed)
    history = []
    for i, xb in enumerate(batch_stream(x, check_positive_int("batch_size", batch_size), steps, seed=seed)):
        state, opt_state, loss = step(state, opt_state, ntebm.flow_params, xb, jax.random.fold_in(key, i))
        history.append(float(loss))
        if not math.isfinite(history[-1]):
            raise FloatingPointError(f"fit_energy: non-finite loss at step {i}; lower lr or step_size")
    nnx.update(ntebm.energy, state)
    return history
