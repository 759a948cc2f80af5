r"""Guides for models with energy-tilted priors (Pyro).

:class:`ShortRunPosterior` is LEBM's posterior sampler written as a guide: it runs a short Langevin chain on the
model's joint log density over its latent sites and records the result as ``Delta`` sites, so that

.. code-block:: python

    svi = SVI(model, ShortRunPosterior(model, steps=20, step_size=0.1), optim, Trace_ELBO())

takes exactly the LEBM maximum-likelihood step (Pang et al. 2020): the generator gets
:math:`\nabla \log p(x \mid z^+)` and the energy :math:`-\nabla E(z^+) + \mathbb E_{p}[\nabla E]` (the latter from the
prior's :class:`~tilted_priors.pyro.Contrastive` normalizer), with :math:`z^+` the detached posterior samples.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger

from inference.pyro.handlers import normalizer, sampler
from tilted_priors._validation import check_positive_int
from tilted_priors.pyro import ShortRunLangevin, Unnormalized

__all__ = ["ShortRunPosterior"]


class _BaseDraws:
    """A sampler that does not move: the tilted site's value is a draw from its base (the "noise" start)."""

    def run(self, log_density, init, **kwargs):
        return init


class _Substitute(Messenger):
    """Set the latent sites in ``values`` and add up the log density of every sample site (scaled and masked).

    Lighter than ``trace`` + ``condition``: the chain runs the model once per gradient and keeps nothing else.
    """

    def __init__(self, values: dict[str, torch.Tensor]):
        super().__init__()
        self.values = values
        self.total = 0.0

    def _process_message(self, msg):
        if msg["type"] != "sample":
            return
        if type(msg["fn"]).__name__ == "_Subsample":  # a plate's indices: the same as in the start trace
            msg["value"] = self.values.get(msg["name"], msg["value"])
            return
        if not msg["is_observed"]:
            msg["value"] = self.values[msg["name"]]
        lp = msg["fn"].log_prob(msg["value"])
        self.total = self.total + scale_and_mask(lp, msg["scale"], msg["mask"]).sum()


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


class ShortRunPosterior:
    r"""Short-run Langevin posterior as a guide (LEBM; Pang et al. 2020).

    On each call it finds the model's latent sites (a trace of the model under the same arguments), starts a chain
    at ``init``, runs ``sampler`` (default ``ShortRunLangevin(steps, step_size)``) on the **unnormalised** joint
    log density

    .. math:: \log \tilde p(x, z) = \sum_{\text{sites}} \log p(\cdot) \text{ with every tilted prior's normalizer off}

    (:func:`~inference.pyro.handlers.normalizer` with :class:`~tilted_priors.pyro.Unnormalized`; :math:`\log Z`
    is constant in :math:`z`), and records the final state as ``Delta`` sites (log density 0) inside the model's
    plates. Its parameters are not trained: the samples are detached, as in LEBM. All latent sites form one
    chain (their gradient is that of the summed joint, so per-datum chains under a data plate are exactly
    LEBM's); with ``MALA`` the accept step is then joint over the batch.

    Parameters
    ----------
    model : callable
        The Pyro model; the guide is called with the model's arguments.
    steps, step_size : int, float
        Of the default ULA sampler (LEBM: 20 x 0.1).
    init : {"noise", "prior", "persistent"} or callable
        Where chains start: ``"noise"`` draws tilted sites from their base (LEBM's :math:`\mathcal N(0, I)`) and
        other latent sites from their prior; ``"prior"`` from the prior itself (the tilted prior's own sampler);
        a guide (callable with the model's arguments) starts from its sample (e.g. an amortised encoder);
        ``"persistent"`` continues per-datum chains from the previous visit of each datum, which needs
        ``num_data`` and an ``index`` keyword (the data indices of the batch, which the model must accept too)
        and keeps the chains in :meth:`state_dict`.
    sampler : sampler, optional
        Overrides ``steps`` / ``step_size`` (e.g. ``MALA(50, 0.05)``).
    num_data : int, optional
        Data set size, for ``init="persistent"``; sites' first dimension must index the batch.

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro.infer import SVI, Trace_ELBO
    >>> from tilted_priors.pyro import EnergyTiltedNormal, EnergyMLP
    >>> energy = EnergyMLP(2, 16)
    >>> def model(x):
    ...     pyro.module("energy", energy)
    ...     with pyro.plate("data", x.shape[0]):
    ...         z = pyro.sample("z", EnergyTiltedNormal(energy, torch.zeros(2), torch.ones(2)))
    ...         pyro.sample("x", dist.Normal(z, 0.3).to_event(1), obs=x)
    >>> guide = ShortRunPosterior(model, steps=20, step_size=0.1)
    >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    >>> loss = svi.step(torch.randn(8, 2))
    >>> guide(torch.randn(8, 2))["z"].shape
    torch.Size([8, 2])
    """

    def __init__(self, model: Callable, steps: int = 20, step_size: float = 0.1, init="noise", *,
                 sampler=None, num_data: int | None = None):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.model = model
        self.sampler = ShortRunLangevin(steps, step_size) if sampler is None else sampler
        if not callable(getattr(self.sampler, "run", None)):
            raise TypeError(f"sampler needs .run(log_density, init), got {self.sampler!r}")
        if not (callable(init) or init in ("noise", "prior", "persistent")):
            raise ValueError(f"init must be 'noise', 'prior', 'persistent' or a guide, got {init!r}")
        self.init = init
        self.num_data = None
        if init == "persistent":
            if num_data is None:
                raise ValueError("init='persistent' keeps one chain per datum: give num_data (the data set size)")
            self.num_data = check_positive_int("num_data", num_data)
        self._chains: dict[str, torch.Tensor] = {}
        self._seen: torch.Tensor | None = None

    # --- where chains start --------------------------------------------------------------------------------
    def _start_trace(self, args, kwargs) -> poutine.Trace:
        model = self.model if self.init == "prior" else sampler(_BaseDraws())(self.model)
        with poutine.block(), torch.no_grad():
            if callable(self.init):
                guide_trace = poutine.trace(self.init).get_trace(*args, **kwargs)
                model = poutine.replay(model, trace=guide_trace)
            return poutine.trace(model).get_trace(*args, **kwargs)

    @staticmethod
    def _latent_sites(trace: poutine.Trace) -> dict:
        sites = {name: site for name, site in trace.nodes.items()
                 if site["type"] == "sample" and not site["is_observed"]
                 and type(site["fn"]).__name__ != "_Subsample"}
        if not sites:
            raise ValueError("ShortRunPosterior found no latent sample site in the model")
        for name, site in sites.items():
            if not _is_real(site["fn"].support):
                raise ValueError(f"ShortRunPosterior runs Langevin chains on real-valued latents, but site "
                                 f"{name!r} has support {site['fn'].support}; reparameterise it onto the real line "
                                 "or use NUTS")
        return sites

    def _persistent_start(self, values: dict, kwargs) -> torch.Tensor:
        index = kwargs.get("index")
        if index is None:
            raise ValueError("init='persistent' needs the batch's data indices: call the model and guide with "
                             "index=<indices> (fit(..., pass_index=True) does this)")
        index = torch.as_tensor(index, dtype=torch.long)
        if index.dim() != 1 or (index.numel() and (index.min() < 0 or index.max() >= self.num_data)):
            raise ValueError(f"index must be a 1-d array of data indices in [0, {self.num_data}), got {index}")
        if self._seen is None:
            self._seen = torch.zeros(self.num_data, dtype=torch.bool)
        seen = self._seen[index]
        for name, value in values.items():
            if value.shape[:1] != index.shape:
                raise ValueError(f"init='persistent': site {name!r} has shape {tuple(value.shape)}, whose first "
                                 f"dimension should index the batch of {index.numel()} data")
            store = self._chains.get(name)
            if store is None:
                store = self._chains[name] = value.new_zeros((self.num_data,) + value.shape[1:])
            keep = seen.reshape((-1,) + (1,) * (value.dim() - 1))
            values[name] = torch.where(keep, store[index], value)
        return index

    # --- the chain -----------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        trace = self._start_trace(args, kwargs)
        sites = self._latent_sites(trace)
        start = {name: site["value"].detach() for name, site in sites.items()}
        index = self._persistent_start(start, kwargs) if self.init == "persistent" else None

        names = list(start)
        shapes = [start[n].shape for n in names]
        sizes = [start[n].numel() for n in names]
        model = normalizer(Unnormalized())(self.model)
        subsamples = {name: site["value"] for name, site in trace.nodes.items()
                      if site["type"] == "sample" and type(site["fn"]).__name__ == "_Subsample"}

        def log_density(flat: torch.Tensor) -> torch.Tensor:
            values = {n: v.reshape(s) for n, v, s in zip(names, flat.split(sizes), shapes)}
            joint = _Substitute({**subsamples, **values})
            with poutine.block():
                joint(model)(*args, **kwargs)
            return joint.total

        flat = torch.cat([start[n].reshape(-1) for n in names])
        flat = self.sampler.run(log_density, flat)
        result = {n: v.reshape(s) for n, v, s in zip(names, flat.split(sizes), shapes)}

        if index is not None:
            for name, value in result.items():
                self._chains[name][index] = value
            self._seen[index] = True
        for name, value in result.items():
            self._record(trace, sites[name], value)
        return result

    @staticmethod
    def _record(trace: poutine.Trace, site: dict, value: torch.Tensor) -> None:
        """``pyro.sample(name, Delta(value))`` inside the plates the model put the site in."""
        with contextlib.ExitStack() as stack:
            for frame in site["cond_indep_stack"]:
                if not frame.vectorized:
                    continue
                sub = trace.nodes.get(frame.name, {}).get("value")
                stack.enter_context(pyro.plate(frame.name, frame.full_size or frame.size, dim=frame.dim,
                                               subsample=sub if torch.is_tensor(sub) else None))
            pyro.sample(site["name"], dist.Delta(value, event_dim=site["fn"].event_dim))

    # --- persistent chains in checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The persistent chains (arrays only; empty unless ``init='persistent'``)."""
        out = {f"chains.{name}": value.clone() for name, value in self._chains.items()}
        if self._seen is not None:
            out["seen"] = self._seen.clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._chains = {k[len("chains."):]: v.clone() for k, v in state.items() if k.startswith("chains.")}
        self._seen = state["seen"].clone() if "seen" in state else None

    def __repr__(self) -> str:
        return f"ShortRunPosterior(sampler={self.sampler!r}, init={self.init!r})"
