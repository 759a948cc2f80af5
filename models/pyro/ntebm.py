r"""NT-EBM: a data-space energy-based model as an exponential tilting of a normalising flow (Nijkamp et al. 2022), Pyro.

.. math:: p(x) = \frac{e^{-E(x)}\, q_T(x)}{Z}, \qquad x = T(u),\ u \sim \mathcal N(0, I)
          \quad\Longrightarrow\quad
          p(u) = \frac{e^{-E(T(u))}\, \mathcal N(u; 0, I)}{Z}

(the Jacobian of :math:`T` cancels), with :math:`q_T = T_\#\mathcal N(0, I)` a flow (``spline_coupling`` or
``affine_coupling`` layers from :mod:`pyro.distributions.transforms`, with reversing permutations between them)
and :math:`E` an :class:`~tilted_priors.pyro.EnergyMLP`. :func:`build` returns an :class:`NTEBM` whose ``model`` is
an ordinary Pyro program with one observed site ``x ~ EnergyTilted(E, TransformedDistribution(N(0, I), T))``.

Learning follows the paper: the flow is fit first by maximum likelihood (:func:`fit_flow`), then, with the flow
fixed, the energy by the contrastive gradient (:func:`fit_energy`)

.. math:: \nabla_\theta \bigl(-\log p(x)\bigr) = \mathbb E_{\text{data}}[\nabla_\theta E(x)]
          - \mathbb E_{p}[\nabla_\theta E(x^-)], \qquad x^- = T(u^-),

whose negatives :math:`u^-` are short-run Langevin chains in the flow's latent space started from
:math:`\mathcal N(0, I)`: the prior program's site is reparameterised with
:class:`~tilted_priors.inference.pyro.FlowBackbone` and its own sampler runs on :math:`u` (:func:`sample` with
``space="latent"``). ``space="data"`` runs the same sampler on :math:`-E(x) + \log q_T(x)` in data space, from the
flow's samples, for comparison (``benchmarks/mixing.py``).

Why the energy is not learned by SVI on ``model``: the model's site is observed, and
:class:`~tilted_priors.pyro.Contrastive` draws its negatives with the *site's* sampler in the site's own space
(data space, from flow samples); :class:`~tilted_priors.inference.pyro.FlowBackbone` reparameterises latent sites only. So
:func:`fit_energy` writes the contrastive loss directly with latent-space negatives.

Hyper-parameters
----------------
``REFERENCE`` (2-D toy mixtures, CPU), ``MNIST`` (flattened 28x28 digits in ``[-1, 1]``; a tiny affine-coupling flow
that fits this machine: the paper's Glow-sized flows do not). The paper's code is not public; these are this
project's choices. Keys: the :func:`build` arguments and the learning settings of :func:`fit_flow` /
:func:`fit_energy`.

Examples
--------
>>> REFERENCE["flow"], MNIST["data_dim"]
('spline', 784)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro import poutine
from torch import nn

from tilted_priors.inference.pyro.reparam import FlowBackbone
from tilted_priors.models.data import batch_stream
from tilted_priors._validation import check_positive_int, check_step_size
from tilted_priors.pyro import EnergyMLP, EnergyTilted, ShortRunLangevin, Unnormalized

__all__ = ["REFERENCE", "MNIST", "NTEBM", "build", "fit_flow", "fit_energy", "sample", "latent_log_density"]

#: 2-D toy mixtures (the ring of 8 Gaussians): this project's CPU settings.
REFERENCE: dict[str, Any] = {
    "data_dim": 2,
    "flow": "spline",
    "flow_layers": 4,
    "flow_hidden": 64,
    "energy_hidden": 64,
    "energy_depth": 2,
    "flow_steps": 2000,
    "flow_lr": 3e-3,
    "energy_steps": 500,
    "energy_lr": 1e-3,
    "batch_size": 256,
    "chain_steps": 40,
    "step_size": 0.2,
}

#: MNIST-5k, flattened to 784 and scaled to ``[-1, 1]``: a tiny affine-coupling flow (CPU-sized, not the paper's).
MNIST: dict[str, Any] = {**REFERENCE, "data_dim": 784, "flow": "affine", "flow_layers": 4, "flow_hidden": 256,
                         "energy_hidden": 256, "flow_steps": 3000, "flow_lr": 1e-3, "energy_steps": 1000,
                         "energy_lr": 1e-4, "batch_size": 100, "chain_steps": 60, "step_size": 0.1}

_FLOWS = ("spline", "affine")


@dataclass
class NTEBM:
    r"""A flow :math:`T` and an energy :math:`E` defining :math:`p(x) \propto e^{-E(x)} q_T(x)` (see :func:`build`).

    Attributes
    ----------
    data_dim : int
        :math:`d`.
    transforms : list of torch.distributions.transforms.Transform
        The flow's layers in order :math:`u \to x` (coupling layers and permutations).
    energy : EnergyMLP
        :math:`E`.
    flow : torch.nn.ModuleList
        The trainable layers of ``transforms`` (for optimisers and ``pyro.module``).

    Examples
    --------
    >>> pyro.clear_param_store()
    >>> m = build(2, flow_layers=2, flow_hidden=8, energy_hidden=8)
    >>> x = m.flow_dist().sample((3,))
    >>> x.shape, m.prior().event_shape
    (torch.Size([3, 2]), torch.Size([2]))
    """

    data_dim: int
    transforms: list
    energy: EnergyMLP
    flow: nn.ModuleList = field(repr=False)

    def transform(self) -> T.ComposeTransform:
        r"""The flow :math:`T: u \mapsto x` as one ``ComposeTransform`` (the same layer objects).

        A method, as on NumPyro (where it also takes the flow's parameters): ``m.transform()(u)``.
        """
        return T.ComposeTransform(list(self.transforms))

    def base(self) -> dist.Distribution:
        r""":math:`\mathcal N(0, I_d)` with event shape ``(d,)``."""
        p = next(self.energy.parameters())
        return dist.Normal(torch.zeros(self.data_dim, dtype=p.dtype, device=p.device), 1.0).to_event(1)

    def flow_dist(self) -> dist.TransformedDistribution:
        r""":math:`q_T = T_\#\mathcal N(0, I)`."""
        return dist.TransformedDistribution(self.base(), list(self.transforms))

    def prior(self, *, normalizer=None, sampler=None) -> EnergyTilted:
        r"""``EnergyTilted(E, q_T)``: the model's distribution of :math:`x` (default normalizer ``Contrastive``, default
        sampler ``ShortRunLangevin(60, 0.4)``, the distributions' former default, which the reproductions keep)."""
        sampler = ShortRunLangevin(60, 0.4) if sampler is None else sampler
        return EnergyTilted(self.energy, self.flow_dist(), normalizer=normalizer, sampler=sampler)

    def model(self, x: torch.Tensor) -> None:
        r"""The Pyro program: ``x ~ EnergyTilted(E, q_T)`` observed, one datum per ``"data"`` plate entry.

        The site's ``log_prob`` is :math:`-E(x) + \log q_T(x)` (unnormalised; with gradients on, the default
        :class:`~tilted_priors.pyro.Contrastive` normalizer adds a zero-valued term whose gradient runs
        data-space chains). Both networks are registered (``"energy"``, ``"flow"``).
        """
        x = check_data(x, self.data_dim, dtype=_dtype(self))
        pyro.module("energy", self.energy)
        pyro.module("flow", self.flow)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", self.prior(), obs=x)


def check_data(x: Any, data_dim: int, name: str = "data", dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` as a float tensor (``dtype``, default torch's) of shape ``(N, data_dim)`` with finite entries, else
    ``ValueError``."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    x = x.to(torch.get_default_dtype() if dtype is None else dtype)
    if x.ndim != 2 or x.shape[-1] != data_dim:
        raise ValueError(f"{name} must have shape (N, {data_dim}), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has non-finite entries (nan or inf)")
    return x


def _dtype(ntebm: NTEBM) -> torch.dtype:
    return next(ntebm.energy.parameters()).dtype


_DEFAULT_LAYERS = 4  #: coupling layers when build(flow_layers=None)


def build(data_dim: int, *, flow: str = "spline", flow_layers: Optional[int] = None, flow_hidden: int = 64,
          energy_hidden: int = 64, energy_depth: int = 2, bound: float = 5.0, seed: Optional[int] = 0) -> NTEBM:
    r"""Build an NT-EBM: a coupling flow :math:`T` on :math:`\mathbb R^d` and an energy MLP.

    .. math:: T = C_L \circ P \circ C_{L-1} \circ \dots \circ P \circ C_1, \qquad p(x) \propto e^{-E(x)}\, q_T(x),

    with :math:`C_i` coupling layers (``"spline"``: :func:`pyro.distributions.transforms.spline_coupling`,
    rational-quadratic splines on ``[-bound, bound]``, identity outside; ``"affine"``:
    :func:`~pyro.distributions.transforms.affine_coupling`, RealNVP) and :math:`P` the reversal permutation.
    Both directions of a coupling flow are parallel, so :math:`\log q_T(x)` (maximum likelihood, data-space
    chains) and :math:`T(u)` (latent chains) are cheap.

    Parameters
    ----------
    data_dim : int
        :math:`d \ge 2`.
    flow : {"spline", "affine"}
        Coupling type. (NumPyro's twin builds ``"iaf"`` flows: the backends' flow libraries differ.)
    flow_layers : int, optional
        Coupling layers (``None``: 4).
    flow_hidden : int
        Width of the two hidden layers of each coupling network.
    energy_hidden, energy_depth : int
        Width and depth of :class:`~tilted_priors.pyro.EnergyMLP` (GELU).
    bound : float
        Spline interval half-width (``"spline"`` only).
    seed : int, optional
        ``torch.manual_seed`` before the networks are initialised (``None``: leave the global RNG alone).

    Returns
    -------
    NTEBM

    Examples
    --------
    >>> pyro.clear_param_store()
    >>> m = build(2, flow_layers=2, flow_hidden=8, energy_hidden=8, seed=0)
    >>> len(m.transforms), sum(p.numel() for p in m.energy.parameters())
    (3, 105)
    """
    d = check_positive_int("data_dim", data_dim)
    if d < 2:
        raise ValueError(f"data_dim must be at least 2 for a coupling flow, got {d}")
    if flow not in _FLOWS:
        raise ValueError(f"flow must be one of {_FLOWS}, got {flow!r}")
    layers = check_positive_int("flow_layers", _DEFAULT_LAYERS if flow_layers is None else flow_layers)
    hidden = check_positive_int("flow_hidden", flow_hidden)
    if seed is not None:
        torch.manual_seed(seed)
    transforms: list = []
    reverse = torch.arange(d - 1, -1, -1)
    for i in range(layers):
        if i:
            transforms.append(T.Permute(reverse))
        if flow == "spline":
            transforms.append(T.spline_coupling(d, hidden_dims=[hidden, hidden], count_bins=8, bound=float(bound)))
        else:
            transforms.append(T.affine_coupling(d, hidden_dims=[hidden, hidden]))
    energy = EnergyMLP(d, check_positive_int("energy_hidden", energy_hidden),
                       check_positive_int("energy_depth", energy_depth))
    modules = nn.ModuleList([t for t in transforms if isinstance(t, nn.Module)])
    return NTEBM(d, transforms, energy, modules)


def fit_flow(ntebm: NTEBM, data: Any, steps: int, *, batch_size: int = 256, lr: float = 3e-3,
             seed: int = 0, schedule: str = "constant") -> list[float]:
    r"""Fit the flow alone by maximum likelihood: minimise :math:`-\frac1B\sum_i \log q_T(x_i)` with Adam.

    .. math:: \log q_T(x) = \log\mathcal N(T^{-1}(x); 0, I) - \log\bigl|\det \partial T/\partial u\,(T^{-1}(x))\bigr|

    Parameters
    ----------
    ntebm : NTEBM
    data : array_like
        ``(N, d)`` finite training points.
    steps, batch_size : int
        Adam steps and minibatch size (minibatches drawn without replacement, reshuffled each epoch).
    lr : float
        Adam learning rate (the peak rate with ``schedule="cosine"``).
    seed : int
        Minibatch order.
    schedule : {"constant", "cosine"}
        ``"cosine"``: linear warm-up over the first 5% of the steps, then cosine decay to ``lr / 100``, with the
        gradient's global norm clipped at 10 (a longer, steadier fit for deep flows); the rates of NumPyro's
        ``fit_flow`` (``optax.warmup_cosine_decay_schedule``).

    Returns
    -------
    list of float
        The minibatch NLL (nats per point) at each step.

    Raises
    ------
    ValueError
        Bad data shape or non-finite data, an unknown ``schedule``.

    Examples
    --------
    >>> from tilted_priors.models.data import toy_mixture
    >>> pyro.clear_param_store()
    >>> m = build(2, flow_layers=2, flow_hidden=16, energy_hidden=8)
    >>> hist = fit_flow(m, toy_mixture(512, "ring"), steps=30, lr=1e-2)
    >>> hist[-1] < hist[0]
    True
    """
    x = check_data(data, ntebm.data_dim, dtype=_dtype(ntebm))
    steps = check_positive_int("steps", steps)
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    opt = torch.optim.Adam(ntebm.flow.parameters(), lr=check_step_size(lr, "lr"))
    rate = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda s: 1.0) if schedule == "constant" else (lambda s: _warmup_cosine(s, steps)))
    history = []
    for xb in batch_stream(x, check_positive_int("batch_size", batch_size), steps, seed=seed):
        loss = -ntebm.flow_dist().log_prob(xb).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"fit_flow: non-finite NLL at step {len(history)}; lower lr")
        opt.zero_grad()
        loss.backward()
        if schedule == "cosine":
            torch.nn.utils.clip_grad_norm_(ntebm.flow.parameters(), 10.0)
        opt.step()
        rate.step()
        history.append(float(loss.detach()))
    return history


def _warmup_cosine(step: int, steps: int) -> float:
    """The factor of the peak rate at update ``step`` (0-based) of ``steps``: linear from 0 over the first 5%, then
    a cosine down to 1/100 (``optax.warmup_cosine_decay_schedule(0, 1, warmup, steps, 0.01)``)."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return step / warmup
    decay = max(steps, warmup + 1) - warmup
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, decay) / decay))


def latent_log_density(ntebm: NTEBM) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""The latent chains' target :math:`u \mapsto -E(T(u)) + \log\mathcal N(u; 0, I)` (up to a constant).

    Examples
    --------
    >>> pyro.clear_param_store()
    >>> m = build(2, flow_layers=1, flow_hidden=8, energy_hidden=8)
    >>> latent_log_density(m)(torch.zeros(4, 2)).shape
    torch.Size([4])
    """
    transform = ntebm.transform()

    def log_density(u: torch.Tensor) -> torch.Tensor:
        return -ntebm.energy(transform(u)) - 0.5 * (u * u).sum(-1)

    return log_density


def sample(ntebm: NTEBM, n: int, sampler=None, *, space: str = "latent") -> torch.Tensor:
    r"""Draw ``n`` points of :math:`p(x)` with ``sampler`` (default ``ShortRunLangevin(40, 0.2)``), one chain each.

    ``space="latent"``: chains on :math:`p(u) \propto e^{-E(T(u))}\mathcal N(u; 0, I)` from :math:`u_0 \sim
    \mathcal N(0, I)`, pushed through :math:`T` — the prior program ``x ~ EnergyTilted(E, q_T)`` reparameterised
    with :class:`~tilted_priors.inference.pyro.FlowBackbone`, so the site's own sampler runs on :math:`u`.
    ``space="data"``: chains on :math:`-E(x) + \log q_T(x)` from :math:`x_0 \sim q_T`.

    Returns
    -------
    torch.Tensor
        ``(n, d)``, detached.

    Examples
    --------
    >>> from tilted_priors.pyro import MALA
    >>> pyro.clear_param_store()
    >>> m = build(2, flow_layers=1, flow_hidden=8, energy_hidden=8)
    >>> sample(m, 5, MALA(10, 0.3)).shape, sample(m, 5, MALA(10, 0.3), space="data").shape
    (torch.Size([5, 2]), torch.Size([5, 2]))
    """
    n = check_positive_int("n", n)
    sampler = ShortRunLangevin(40, 0.2) if sampler is None else sampler
    if space == "data":
        return ntebm.prior(normalizer=Unnormalized(), sampler=sampler).sample((n,)).detach()
    if space != "latent":
        raise ValueError(f"space must be 'latent' or 'data', got {space!r}")

    def program():
        with pyro.plate("chains", n):
            return pyro.sample("x", ntebm.prior(normalizer=Unnormalized(), sampler=sampler))

    tr = poutine.trace(poutine.reparam(program, config={"x": FlowBackbone()})).get_trace()
    return tr.nodes["x"]["value"].detach()


def fit_energy(ntebm: NTEBM, data: Any, steps: int, *, chain_steps: int = 40, step_size: float = 0.2,
               sampler=None, batch_size: int = 256, lr: float = 1e-3, reg: float = 0.0,
               seed: int = 0) -> list[float]:
    r"""Learn the energy with the flow fixed: the contrastive loss with latent-space negatives.

    .. math:: L(\theta) = \frac1B\sum_i E_\theta(x_i) - \frac1B\sum_j E_\theta(T(u^-_j))
              + \lambda \bigl(\overline{E(x)^2} + \overline{E(T(u^-))^2}\bigr),

    :math:`u^-_j` from ``sampler`` (default ``ShortRunLangevin(chain_steps, step_size)``) on
    :func:`latent_log_density`, started from :math:`\mathcal N(0, I)` (via :func:`sample`); its gradient is
    :math:`\mathbb E_{\text{data}}[\nabla E] - \mathbb E_p[\nabla E]`. Only the energy's parameters move.

    Parameters
    ----------
    ntebm : NTEBM
    data : array_like
        ``(N, d)`` finite training points.
    steps : int
        Adam steps.
    chain_steps : int
        Langevin steps per negative chain.
    step_size : float
        Langevin step size in :math:`u`.
    sampler : sampler, optional
        Overrides ``chain_steps`` / ``step_size``.
    batch_size : int
        Data points and negative chains per step.
    lr : float
        Adam learning rate (``betas=(0.5, 0.999)``, as LEBM).
    reg : float
        :math:`\lambda \ge 0`, a penalty on energy magnitudes (0: the plain contrastive loss).
    seed : int
        Minibatch order and the chains (``pyro.set_rng_seed``).

    Returns
    -------
    list of float
        The contrastive loss (without the penalty) per step.

    Examples
    --------
    >>> import math
    >>> from tilted_priors.models.data import toy_mixture
    >>> pyro.clear_param_store()
    >>> m = build(2, flow_layers=1, flow_hidden=8, energy_hidden=8)
    >>> hist = fit_energy(m, toy_mixture(256, "ring"), steps=3, chain_steps=5, batch_size=32)
    >>> len(hist), all(math.isfinite(h) for h in hist)
    (3, True)
    """
    x = check_data(data, ntebm.data_dim, dtype=_dtype(ntebm))
    steps = check_positive_int("steps", steps)
    sampler = sampler or ShortRunLangevin(check_positive_int("chain_steps", chain_steps), check_step_size(step_size))
    if not (isinstance(reg, (int, float)) and reg >= 0 and math.isfinite(reg)):
        raise ValueError(f"reg must be a finite number >= 0, got {reg!r}")
    pyro.set_rng_seed(seed)
    opt = torch.optim.Adam(ntebm.energy.parameters(), lr=check_step_size(lr, "lr"), betas=(0.5, 0.999))
    history = []
    for xb in batch_stream(x, check_positive_int("batch_size", batch_size), steps, seed=seed):
        neg = sample(ntebm, xb.shape[0], sampler, space="latent")
        e_pos, e_neg = ntebm.energy(xb), ntebm.energy(neg)
        loss = e_pos.mean() - e_neg.mean()
        total = loss + reg * ((e_pos ** 2).mean() + (e_neg ** 2).mean()) if reg else loss
        if not torch.isfinite(total):
            raise FloatingPointError(f"fit_energy: non-finite loss at step {len(history)}; lower lr or step_size")
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(float(loss.detach()))
    return history
