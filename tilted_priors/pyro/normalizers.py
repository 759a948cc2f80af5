r"""Normalizers: what :meth:`~tilted_priors.pyro.EnergyTilted.log_prob` subtracts for :math:`\log Z` (torch / Pyro).

For a tilted density :math:`p(z) = e^{-E(z)} q(z) / Z` with base :math:`q`,

.. math:: \log p(z) = \underbrace{-E(z) + \log q(z)}_{\text{log\_tilted}} - \text{term},

and each normalizer decides what ``term`` is. Its meaning (and so the meaning of ``log_prob``) is stated on each
class. ``term(dist)`` returns a tensor broadcastable to the distribution's batch shape; the distribution computes
it at most once per instance (:meth:`~tilted_priors.pyro.EnergyTilted.log_normalizer`). :class:`Importance`
and :class:`AnnealedImportance` also give :meth:`~Importance.estimate`, a :class:`LogZEstimate` with its standard
error; these estimators of :math:`\log Z` for evaluation are written in the private module
``tilted_priors.pyro._log_z`` and imported from here.
"""
from __future__ import annotations

import math

import pyro
import torch

from tilted_priors._validation import check_finite_number, check_name, check_positive_int, check_protocol, check_snl_b
from tilted_priors.pyro._distribution_checks import dtype_device
from tilted_priors.pyro._log_z import (AnnealedImportance, Importance, LogZEstimate, check_proposal,
                                       importance_log_weights, log_mean_exp_with_error, per_element)

__all__ = ["LogZEstimate", "log_mean_exp_with_error", "Contrastive", "SelfNormalized", "Importance", "AnnealedImportance", "Unnormalized", "LearnedLogZ"]


def _leaf_tensors(t: torch.Tensor) -> list:
    """The leaf tensors (parameters) that ``t`` depends on, found by walking its autograd graph."""
    seen, leaves, stack = set(), [], [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.append(variable)
        else:
            stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


class _LazyTerm(torch.autograd.Function):
    r"""Value 0; its backward runs the chains and returns :math:`\mathbb E_p[\nabla \ell]` for the leaves.

    So a gradient that does not reach the parameters (NUTS's gradient in the latents) never runs a chain.
    """

    @staticmethod
    def forward(ctx, compute, shape, *leaves):
        ctx.compute, ctx.leaves = compute, leaves
        return torch.zeros(shape, dtype=leaves[0].dtype, device=leaves[0].device)

    @staticmethod
    def backward(ctx, grad):
        with torch.enable_grad():
            lt = ctx.compute()
            grads = torch.autograd.grad(lt, ctx.leaves, grad_outputs=grad.expand_as(lt), allow_unused=True)
        return (None, None, *grads)


class Contrastive:
    r"""Maximum-likelihood learning signal from prior samples (LEBM): value 0, gradient :math:`\nabla\log Z`.

    .. math:: \text{term} = \overline{\ell(z^-)} - \operatorname{stopgrad}\bigl(\overline{\ell(z^-)}\bigr),
              \qquad \ell = -E + \log q,\ z^- \sim \text{sampler}

    so that :math:`\nabla_\theta \log p(x) = -\nabla_\theta E(x) + \mathbb E_{p}[\nabla_\theta E(z)]`
    (for the energy's parameters; the base's parameters get the matching term). ``log_prob`` values are
    **unnormalised** (the term is 0); only their gradients are those of the normalised density, exactly so when
    the sampler is exact. The chains run lazily, in the backward pass, and only when the gradient reaches the
    parameters: with gradients off (``torch.no_grad``), or when only gradients in the latents are taken (NUTS on
    the model as written), no chain is run.

    Parameters
    ----------
    sampler : sampler, optional
        Draws the negative samples; the distribution's own sampler when ``None``.
    num_samples : int, optional
        Chains per batch element, averaged; ``None`` runs one chain per batch element (LEBM's setting: one prior
        sample per datum when the prior sits in a data plate).

    Examples
    --------
    >>> import torch
    >>> from tilted_priors.pyro import EnergyTiltedNormal, EnergyMLP
    >>> d = EnergyTiltedNormal(EnergyMLP(2, 8), torch.zeros(2), torch.ones(2), normalizer=Contrastive(num_samples=16))
    >>> float(d.log_normalizer().detach())
    0.0
    """

    def __init__(self, sampler=None, num_samples: int | None = None):
        self.sampler = check_protocol(sampler, "sampler", "run", "MALA(100, 0.1)", optional=True)
        self.num_samples = None if num_samples is None else check_positive_int("num_samples", num_samples)

    def term(self, dist) -> torch.Tensor:
        if not torch.is_grad_enabled():
            dtype, device = dtype_device(dist)
            return torch.zeros((), dtype=dtype, device=device)
        with torch.no_grad():
            probe_z = dist.base.sample()
        probe = dist.log_tilted(probe_z)
        leaves = _leaf_tensors(probe)
        if not leaves:
            return torch.zeros((), dtype=probe.dtype, device=probe.device)
        shape = () if self.num_samples is None else (self.num_samples,)

        def mean_log_tilted() -> torch.Tensor:
            lt = dist.log_tilted(dist.sample_with(self.sampler or dist.sampler, shape))
            return lt if self.num_samples is None else lt.mean(0)

        return _LazyTerm.apply(mean_log_tilted, probe.shape, *leaves)

    def __repr__(self) -> str:
        return f"Contrastive(sampler={self.sampler!r}, num_samples={self.num_samples})"


_PER_ROW_HELP = ("a per-row b belongs to fixed rows, the same contexts in the same order at every step (SVI on a "
                 "fixed batch; fit shuffles the rows), so for minibatches or changing rows use an amortised "
                 "b(context)")


class SelfNormalized:
    r"""Self-normalised bound (SNL / SNELBO, Senetaire et al.): a learned :math:`b` with

    .. math:: \text{term} = b + e^{-b}\hat Z - 1 \;\ge\; \log Z, \qquad
              \hat Z = \frac1n \sum_{i=1}^n \frac{e^{-E(z_i)} q(z_i)}{r(z_i)},\ z_i \sim r,

    from :math:`\log u \le u - 1`, tight at :math:`b = \log Z`; :math:`\hat Z` is unbiased, so ``log_prob`` is an
    unbiased estimate of a **lower bound** of the normalised log density, and maximising it over :math:`b` drives
    :math:`b \to \log Z`. No MCMC. The bound holds row by row (per batch element), so :math:`b` may be one
    scalar (the Pyro param ``name``, initialised at ``init``), one value per row (``b="per_row"``), or amortised,
    :math:`b(x)` of the distribution's context :math:`x` (``b=`` a module or function): for a conditional density
    whose :math:`\log Z(x)` varies with :math:`x`, a scalar :math:`b` is tight for no row but on average.

    Parameters
    ----------
    num_samples : int
        Draws from the proposal **per row** (batch element), when the distribution has a ``context`` or ``b`` is
        not the shared scalar. With no context and the scalar ``b`` (the default) the rows are exchangeable and
        the draws are pooled: ``num_samples`` in all, shared out over the batch (at least one per row); when the
        rows share one base (a prior expanded over a plate) the summed bound equals that of the pooled estimate.
    proposal : Distribution, optional
        :math:`r`; the base :math:`q` when ``None`` (then the weights are :math:`e^{-E(z_i)}`). Reparameterised
        draws are used when available. A distribution over the same vectors as the tilted distribution: event
        shape ``(d,)`` (``dist.Normal(loc, scale).to_event(1)``), batch shape broadcasting to its batch shape;
        checked when first used (``ValueError``).
    name : str
        Name of the param :math:`b` (of the module's params, ``name$$$...``, for an amortised ``b``); give each
        tilted prior in a model its own.
    init : float
        Starting value of :math:`b` (of each row's with ``"per_row"``; unused with an amortised ``b``). The param
        is created with the dtype and device of the distribution's base (its ``loc``, or its parameters).
    b : None, "per_row" or callable
        ``None``: one scalar param. ``"per_row"``: a param of the distribution's batch shape, one :math:`b` per
        row, for fixed rows (the same contexts in the same order at every step, as in SVI on a fixed batch;
        ``fit`` shuffles the rows, so with it, or with minibatches, use an amortised :math:`b`). A callable: the
        amortised :math:`b(x)`, mapping the context ``batch_shape + (c,)`` to ``batch_shape`` (a trailing
        dimension of size 1 is dropped), e.g. ``torch.nn.Linear(c, 1)``; a torch module is registered as
        ``pyro.module(name, b)``, so SVI trains it with the model. Needs the distribution's ``context``.

    Examples
    --------
    >>> import torch
    >>> from tilted_priors.pyro import EnergyTiltedNormal
    >>> d = EnergyTiltedNormal(lambda z: 0.0 * z.sum(-1), torch.zeros(2), torch.ones(2),
    ...                        normalizer=SelfNormalized(100, name="doc_b"))
    >>> float(d.log_normalizer().detach())  # b = 0 and Z = 1: the bound is tight
    0.0

    An amortised :math:`b(x)` for a conditional density (here :math:`\log Z(x) = x^2 / 2`):

    >>> x = torch.linspace(-1, 1, 4)[:, None]
    >>> snl = SelfNormalized(64, name="doc_bx", b=torch.nn.Linear(1, 1))
    >>> d = EnergyTiltedNormal(lambda z, x: (z * x).sum(-1), torch.zeros(1), torch.ones(1), context=x,
    ...                        normalizer=snl)
    >>> snl.b_value(d).shape, d.log_normalizer().shape
    (torch.Size([4]), torch.Size([4]))
    """

    def __init__(self, num_samples: int, proposal=None, name: str = "snl_b", init: float = 0.0, b=None):
        self.num_samples = check_positive_int("num_samples", num_samples)
        self.proposal = check_proposal(proposal)
        self.name, self.init = check_name(name, "name"), check_finite_number(init, "init")
        self.b = check_snl_b(b)

    def _pooled(self, dist) -> bool:
        return self.b is None and getattr(dist, "context", None) is None

    def log_z_hat(self, dist) -> torch.Tensor:
        r""":math:`\log \hat Z` per batch element (a biased-low estimate of :math:`\log Z`)."""
        n = per_element(self.num_samples, dist.batch_shape) if self._pooled(dist) else self.num_samples
        log_w = importance_log_weights(dist, n, self.proposal)
        return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])

    def register_params(self, dist=None) -> dict:
        """Declare :math:`b`'s params (``pyro.param``, or ``pyro.module`` for an amortised module); returns
        ``{name: b}`` (the module for an amortised :math:`b`, nothing for a plain function).

        The distribution calls this when it is built (``dist`` is the distribution), i.e. while the model runs, so
        that the params are sites of the model's trace: Pyro's ELBOs differentiate only when the model or the guide
        has a param site, and ``log_prob`` (where the term is computed) runs after the model.
        """
        dtype, device = dtype_device(dist)
        if self.b is None:
            return {self.name: pyro.param(self.name, lambda: torch.tensor(self.init, dtype=dtype, device=device))}
        if isinstance(self.b, str):  # "per_row"
            if dist is None:
                raise ValueError("SelfNormalized(b='per_row').register_params needs the distribution (its batch "
                                 "shape is the shape of b)")
            batch_shape = dist.batch_shape
            b = pyro.param(self.name, lambda: torch.full(batch_shape, self.init, dtype=dtype, device=device))
            if b.shape != batch_shape:
                raise ValueError(f"SelfNormalized(b='per_row'): the param {self.name!r} has shape {tuple(b.shape)}, "
                                 f"the distribution's batch shape is {tuple(batch_shape)}: {_PER_ROW_HELP}, or a "
                                 "new name / pyro.clear_param_store()")
            return {self.name: b}
        if isinstance(self.b, torch.nn.Module):
            return {self.name: pyro.module(self.name, self.b, update_module_params=True)}
        return {}

    def b_value(self, dist) -> torch.Tensor:
        r"""The learned :math:`b` for ``dist``: a scalar, or of the batch shape (``"per_row"``, amortised), where
        it estimates :math:`\log Z` row by row once trained."""
        b = self.register_params(dist).get(self.name, self.b)
        if self.b is None or isinstance(self.b, str):
            return b
        context = getattr(dist, "context", None)
        if context is None:
            raise ValueError(f"SelfNormalized(b={self.b!r}) computes b from the distribution's context, but the "
                             "distribution has none: build it with context=..., or use b=None or b='per_row'")
        batch_shape = dist.batch_shape
        value = b(context.expand(batch_shape + context.shape[-1:]))
        if value.shape == batch_shape + (1,):
            value = value.squeeze(-1)
        if value.shape != batch_shape:
            raise ValueError(f"SelfNormalized: the amortised b maps the context {tuple(batch_shape)} + (c,) to shape "
                             f"{tuple(value.shape)}; it must give the batch shape {tuple(batch_shape)} (or "
                             f"{tuple(batch_shape) + (1,)})")
        return value

    def term(self, dist) -> torch.Tensor:
        b = self.b_value(dist)
        return b + torch.exp(self.log_z_hat(dist) - b) - 1.0

    def __repr__(self) -> str:
        b = "" if self.b is None else f", b={self.b if isinstance(self.b, str) else type(self.b).__name__!r}"
        return f"SelfNormalized(num_samples={self.num_samples}, name={self.name!r}{b})"


class Unnormalized:
    r"""No normalizer: term 0 (of the distribution's dtype and device), ``log_prob`` is the **unnormalised**
    :math:`-E(z) + \log q(z)`.

    Right inside MCMC over the latents, where :math:`\log Z` is constant; wrong for learning the energy (its
    gradient misses :math:`\nabla\log Z`).

    Examples
    --------
    >>> float(Unnormalized().term(None))
    0.0
    """

    def term(self, dist) -> torch.Tensor:
        dtype, device = dtype_device(dist)
        return torch.zeros((), dtype=dtype, device=device)

    def __repr__(self) -> str:
        return "Unnormalized()"


class LearnedLogZ:
    r"""A learned constant for :math:`\log Z`: term :math:`c`, the Pyro param ``name``, what
    :class:`~tilted_priors.inference.pyro.NoiseContrastive` trains.

    .. math:: \log p(x) = -E(x) + \log q(x) - c

    Noise-contrastive estimation (Gutmann & Hyvärinen 2010) treats :math:`c` as one more parameter of the model,
    learned with the energy; at its optimum :math:`c = \log Z`, so ``log_prob`` is then an **estimate** of the
    normalised log density that costs no sampling. Only NCE gives :math:`c` a learning signal: under a likelihood
    objective (``Trace_ELBO``) the gradient of ``log_prob`` in :math:`c` is always :math:`-1` and :math:`c` runs off
    (use :class:`Contrastive` or :class:`SelfNormalized` there). Check a trained :math:`c` against
    :class:`Importance` or :class:`AnnealedImportance`.

    Parameters
    ----------
    name : str
        Name of the param :math:`c`; give each tilted distribution in a model its own.
    init : float
        Starting value of :math:`c`, a param of the dtype and device of the distribution's base (torch's default
        when it is declared with no distribution).

    Examples
    --------
    >>> import torch
    >>> from tilted_priors.pyro import EnergyTiltedNormal
    >>> d = EnergyTiltedNormal(lambda z: (z ** 2).sum(-1), torch.zeros(1), torch.ones(1),
    ...                        normalizer=LearnedLogZ("doc_c", init=-0.549))
    >>> round(float(d.log_normalizer().detach()), 3)   # c, here set at log Z = -log(3) / 2
    -0.549
    """

    def __init__(self, name: str = "log_z", init: float = 0.0):
        self.name, self.init = check_name(name, "name"), check_finite_number(init, "init")

    def register_params(self, dist=None) -> dict:
        """Declare :math:`c` with ``pyro.param`` (initialised at ``init``, with the dtype and device of ``dist``'s
        base when given); returns ``{name: c}``."""
        dtype, device = dtype_device(dist)
        return {self.name: pyro.param(self.name, lambda: torch.tensor(self.init, dtype=dtype, device=device))}

    def term(self, dist) -> torch.Tensor:
        """:math:`c` (a scalar, the same for every batch element)."""
        return self.register_params(dist)[self.name]

    def __repr__(self) -> str:
        return f"LearnedLogZ(name={self.name!r})"
