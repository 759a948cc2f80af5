"""The unnormalised log joint of a Pyro model over its latent sites, as the posterior guides' chains see it (Pyro).

:class:`Substitute` runs the model with given latent values and adds up every sample site's log density (scaled
and masked; per member of a plate when the chains run one per datum); :func:`trace_log_joint` adds up the same
terms from a trace without running the model again; :class:`BaseDraws` is the "sampler" that leaves a tilted
site at its base draw (the chains' "noise" start). Used by :mod:`tilted_priors.inference.pyro.guides` and the
amortised guides.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from tilted_priors.inference.pyro.handlers import map_tilted
from tilted_priors.pyro import Unnormalized

__all__ = ["BaseDraws", "Substitute", "LogJoint", "joint_term", "trace_log_joint", "per_member", "is_real"]


class BaseDraws:
    """A sampler that does not move: the tilted site's value is a draw from its base (the "noise" start)."""

    def run(self, log_density, init, **kwargs):
        return init


class Substitute(Messenger):
    """Set the latent sites in ``values`` and add up the log density of every sample site (scaled and masked).

    Lighter than ``trace`` + ``condition``: the chain runs the model once per gradient and keeps nothing else.
    """

    def __init__(self, values: dict[str, torch.Tensor], plate: tuple | None = None):
        super().__init__()
        self.values = values
        self.plate = plate  # (name, dim, size): add up per member of this plate instead
        self.total = 0.0

    def _process_message(self, msg):
        if msg["type"] != "sample":
            return
        if site_is_subsample(msg):  # a plate's indices: the same as in the start trace
            msg["value"] = self.values.get(msg["name"], msg["value"])
            return
        if not msg["is_observed"]:
            msg["value"] = self.values[msg["name"]]
        self.total = self.total + joint_term(msg, self.plate)


def joint_term(site: dict, plate: tuple | None) -> torch.Tensor:
    """A sample site's (message's or trace node's) term of the joint: its log density, scaled and masked, summed
    (per member of ``plate``, see :func:`per_member`)."""
    lp = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
    return lp.sum() if plate is None else per_member(lp, site["cond_indep_stack"], plate)


def trace_log_joint(trace: poutine.Trace, plate: tuple | None) -> torch.Tensor:
    """The unnormalised log joint at the values of ``trace`` from its sites (every tilted prior's normalizer off),
    as :class:`Substitute` adds it up, without running the model again."""
    unnormalized = Unnormalized()
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
            fn = map_tilted(site["fn"], lambda d: d.replace(normalizer=unnormalized))
            total = total + joint_term({**site, "fn": fn}, plate)
    return total


def per_member(log_prob, frames, plate: tuple) -> torch.Tensor:
    """A site's log density summed to one value per member of ``plate`` (``(name, dim, size)``); a site outside
    the plate, or not broadcast along it, is shared out evenly."""
    name, dim, size = plate
    log_prob = torch.as_tensor(log_prob)
    if any(f.name == name for f in frames) and log_prob.dim() >= -dim and log_prob.shape[dim] == size:
        return log_prob.movedim(dim, 0).reshape(size, -1).sum(-1)
    return log_prob.sum().div(size).expand(size)


class LogJoint(NamedTuple):
    """The model's unnormalised log joint ``fn(values, *inputs)`` and the call's tensors it reads (``inputs``: the
    model's arguments and the plates' subsamples), which a traced chain passes to its graph."""

    fn: Callable[..., torch.Tensor]
    inputs: tuple

    def __call__(self, values: dict) -> torch.Tensor:
        return self.fn(values, *self.inputs)


def is_real(support) -> bool:
    """Whether a site's support is the real line (a Langevin chain can move on it)."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real
