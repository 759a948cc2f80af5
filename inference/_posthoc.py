r"""Backend-free parts of ``posthoc_tilt`` (:mod:`tilted_priors.inference.pyro.posthoc` and
:mod:`tilted_priors.inference.numpyro.posthoc`): the result, the checks of the options, and the batches of data the
frozen guide is run on.

Post-hoc tilting (the "post-hoc" experiment of Senetaire et al.'s SNL paper; NCP-VAE, Aneja et al. 2021) takes a
trained VAE with an ordinary prior :math:`p(z)` and a trained encoder :math:`q_\phi(z \mid x)`, both frozen, and
fits an energy so that the tilted prior

.. math:: p_E(z) = \frac{e^{-E(z)}\, p(z)}{Z}, \qquad Z = \mathbb E_{p}\bigl[e^{-E(z)}\bigr],

matches the aggregate posterior :math:`\bar q(z) = \frac1N \sum_i q_\phi(z \mid x_i)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Iterator, Sequence

import numpy as np

__all__ = ["OBJECTIVES", "PosthocResult", "check_options", "guide_batches", "check_draws", "site_error"]

#: The objectives ``posthoc_tilt`` fits the energy with: noise-contrastive estimation against the prior, or the
#: self-normalised likelihood (SNL).
OBJECTIVES = ("nce", "snl")


@dataclass(eq=False)
class PosthocResult:
    r"""What ``posthoc_tilt`` returns: the tilted model and what was learned.

    Attributes
    ----------
    model : callable
        The tilted model, ``handlers.tilt(model, E, site, normalizer=LearnedLogZ(name + "_log_z"),
        name=name + "_energy")`` with the trained energy: the VAE's prior at ``site`` times :math:`e^{-E(z)}`, its
        ``log_prob`` normalised by the learned constant (:math:`c` for NCE, :math:`b` for SNL). Called with the
        model's arguments; ready for ``log_likelihood(result.model, x, proposal=guide, log_z={site: result.log_z})``
        and ``Predictive``. Pyro: the energy's parameters are the param store's (``name + "_energy$$$..."``);
        NumPyro: they are substituted (``handlers.substitute``).
    energy : callable
        The trained energy, ``(..., d) -> (...)``. Pyro: the module passed in, trained in place. NumPyro: a copy of
        the module holding the trained parameters (the module passed in keeps its own).
    params : dict of str to numpy.ndarray
        The learned parameters by name (the energy's, and the constant ``name + "_log_z"``), as ``FitResult.params``
        names them.
    log_z : LogZEstimate
        :math:`\log \hat Z` of the trained tilt (by ``posthoc_tilt``'s ``log_z`` estimator; default importance
        sampling from the prior), with its standard error: the value to evaluate the tilted model with.
    learned_log_z : float
        The learned constant: NCE's :math:`c` or SNL's :math:`b`, each an estimate of :math:`\log Z` at its optimum
        (compare with ``log_z``).
    draws : numpy.ndarray
        The frozen draws from the aggregate posterior the energy was fitted to, shape ``(N * draws_per_datum, d)``.
    fit : FitResult
        The training run of the energy (``history``, ``losses``, ...).
    site : str
        The tilted site.
    objective : str
        ``"nce"`` or ``"snl"``.

    Examples
    --------
    >>> r = PosthocResult(None, None, {}, None, -0.1, np.zeros((4, 2)), None, "z", "nce")
    >>> r.site, r.draws.shape
    ('z', (4, 2))
    """

    model: Any = field(repr=False)
    energy: Any = field(repr=False)
    params: dict = field(repr=False)
    log_z: Any
    learned_log_z: float
    draws: np.ndarray = field(repr=False)
    fit: Any = field(repr=False)
    site: str
    objective: str


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_options(*, site, objective, num_noise, snl_samples, draws_per_datum, guide_batch_size, log_z, name,
                  epochs, num_steps) -> dict:
    """Check the options of ``posthoc_tilt``; returns them normalised, with the training length
    (``num_steps=1000`` when neither ``epochs`` nor ``num_steps`` is given).

    Examples
    --------
    >>> opts = check_options(site="z", objective="NCE", num_noise=10, snl_samples=256, draws_per_datum=1,
    ...                      guide_batch_size=500, log_z=None, name="posthoc", epochs=None, num_steps=None)
    >>> opts["objective"], opts["num_steps"], opts["epochs"]
    ('nce', 1000, None)
    """
    if not isinstance(site, str) or not site:
        raise ValueError(f"site must be the name of the model's latent sample site to tilt (a str such as 'z'), "
                         f"got {site!r}")
    if not isinstance(objective, str) or objective.lower() not in OBJECTIVES:
        raise ValueError(f"objective must be 'nce' (noise-contrastive estimation against the prior) or 'snl' (the "
                         f"self-normalised likelihood), got {objective!r}")
    if not isinstance(name, str) or not name or "$" in name or "/" in name:
        raise ValueError(f"name must be a non-empty string without '$' or '/' (the prefix of the learned "
                         f"parameters' names), got {name!r}")
    if log_z is not None and not callable(getattr(log_z, "estimate", None)):
        raise TypeError(f"log_z must be an estimator of log Z with .estimate(dist), e.g. Importance(10_000) or "
                        f"AnnealedImportance(2000, 100), got {log_z!r}")
    if epochs is None and num_steps is None:
        num_steps = 1000
    return {"site": site, "objective": objective.lower(), "num_noise": _positive_int("num_noise", num_noise),
            "snl_samples": _positive_int("snl_samples", snl_samples),
            "draws_per_datum": _positive_int("draws_per_datum", draws_per_datum),
            "guide_batch_size": _positive_int("guide_batch_size", guide_batch_size),
            "name": name, "epochs": epochs, "num_steps": num_steps}


def guide_batches(arrays: Sequence[np.ndarray], names: Sequence[str] | None, batch_size: int,
                  repeats: int) -> Iterator[tuple[tuple, dict]]:
    """``(args, kwargs)`` for the guide: the data in order, ``repeats`` times over, in batches of at most
    ``batch_size`` rows (numpy arrays; the backend converts them).

    Examples
    --------
    >>> x = np.arange(5.0)[:, None]
    >>> [args[0].ravel().tolist() for args, _ in guide_batches([x], None, 3, 2)]
    [[0.0, 1.0, 2.0], [3.0, 4.0], [0.0, 1.0, 2.0], [3.0, 4.0]]
    """
    n = arrays[0].shape[0]
    for _ in range(repeats):
        for start in range(0, n, batch_size):
            batch = [a[start:start + batch_size] for a in arrays]
            if names is not None:
                yield (), dict(zip(names, batch))
            else:
                yield tuple(batch), {}


def site_error(site: str, sites: Sequence[str], what: str) -> ValueError:
    """The error for a ``site`` that the model (or the guide) does not sample.

    Examples
    --------
    >>> str(site_error("w", ["z", "x"], "the model's latent sites"))[:40]
    "site='w' is not one of the model's laten"
    """
    return ValueError(f"site={site!r} is not one of {what} {sorted(sites)!r}: pass the name of the latent site whose "
                      "prior is tilted (the one the encoder guide samples), e.g. site='z'")


def check_draws(value: np.ndarray, site: str, rows: int) -> np.ndarray:
    """The guide's draws at ``site`` for a batch of ``rows`` data, checked to be one ``(d,)`` vector per datum.

    Examples
    --------
    >>> check_draws(np.zeros((3, 2)), "z", 3).shape
    (3, 2)
    """
    value = np.asarray(value, dtype=np.float64)
    if value.ndim != 2 or value.shape[0] != rows:
        raise ValueError(f"the guide's draws at site {site!r} have shape {value.shape} for a batch of {rows} data; "
                         f"post-hoc tilting needs one latent vector per datum, shape ({rows}, d): the site must sit "
                         "in the data plate with event shape (d,), e.g. Normal(0, 1).expand([d]).to_event(1)")
    if not np.isfinite(value).all():
        raise ValueError(f"the guide's draws at site {site!r} are not all finite: is the guide trained (its "
                         "parameters loaded, FitResult.guide on NumPyro)?")
    return value
