r"""Post-hoc tilting of a trained, frozen VAE's prior by an energy fitted to its aggregate posterior (Pyro).

The "post-hoc" experiment of Senetaire et al. (SNL) and NCP-VAE (Aneja et al. 2021): a VAE trained with an
ordinary prior :math:`p(z)` leaves a gap between that prior and the aggregate posterior
:math:`\bar q(z) = \frac1N \sum_i q_\phi(z \mid x_i)`, and the prior that best fits the trained decoder is
:math:`\bar q` itself. :func:`posthoc_tilt` closes part of the gap without touching the VAE: it fits an energy
:math:`E` so that

.. math:: p_E(z) = \frac{e^{-E(z)}\, p(z)}{Z} \approx \bar q(z),

and returns the VAE with its prior tilted by :math:`E` (:class:`~tilted_priors.inference.pyro.handlers.tilt`). The
NumPyro twin is :func:`tilted_priors.inference.numpyro.posthoc.posthoc_tilt`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pyro
import torch
from pyro import poutine

from tilted_priors.inference._posthoc import (PosthocResult, check_draws, check_options, guide_batches,
                                             site_error)
from tilted_priors.inference._plan import check_data
from tilted_priors.inference.pyro.handlers import find_tilted, tilt
from tilted_priors.inference.pyro.modules import register_module
from tilted_priors.inference.pyro.nce import NoiseContrastive
from tilted_priors.inference.pyro.train import fit
from tilted_priors.pyro import EnergyTilted, Importance, LearnedLogZ, LogZEstimate, SelfNormalized

__all__ = ["posthoc_tilt", "PosthocResult"]


def _tensors(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    dtype = torch.get_default_dtype()
    return (tuple(torch.as_tensor(a, dtype=dtype) for a in args),
            {k: torch.as_tensor(v, dtype=dtype) for k, v in kwargs.items()})


def _prior(model: Callable, site: str, args: tuple, kwargs: dict):
    """The prior of ``site`` for one datum (batch shape ``(1,)``, event ``(d,)``), from a trace of the model."""
    with torch.no_grad():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    latent = [n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]]
    if site not in latent:
        raise site_error(site, latent, "the model's latent sites")
    fn = trace.nodes[site]["fn"]
    if find_tilted(fn) is not None:
        raise ValueError(f"the prior of site {site!r} is already energy-tilted ({type(fn).__name__}); post-hoc "
                         "tilting starts from a VAE trained with an ordinary prior, e.g. "
                         "Normal(0, 1).expand([d]).to_event(1)")
    if len(fn.event_shape) != 1 or int(np.prod(tuple(fn.batch_shape))) != 1:
        raise ValueError(f"the prior of site {site!r} has batch shape {tuple(fn.batch_shape)} and event shape "
                         f"{tuple(fn.event_shape)} for one datum; post-hoc tilting needs one (d,) vector per datum "
                         "in the data plate, e.g. Normal(0, 1).expand([d]).to_event(1)")
    return fn.expand(torch.Size([1])) if tuple(fn.batch_shape) != (1,) else fn


def _forget(name: str) -> None:
    """Remove this run's own parameters (``name + "_energy$$$..."``, ``name + "_log_z"``) from the param store, so
    that the energy starts from the module's own weights."""
    store = pyro.get_param_store()
    for key in list(store.keys()):
        if key.startswith(f"{name}_energy$$$") or key == f"{name}_log_z":
            del store[key]


def posthoc_tilt(model: Callable, guide: Callable, data, energy: Callable, *, site: str = "z",
                 objective: str = "nce", num_noise: int = 10, snl_samples: int = 256, draws_per_datum: int = 1,
                 epochs: int | None = None, num_steps: int | None = None, batch_size: int = 256, lr: float = 1e-3,
                 betas: Sequence[float] = (0.9, 0.999), lr_decay: float = 1.0, name: str = "posthoc",
                 log_z=None, guide_batch_size: int = 500, seed: int = 0,
                 progress: bool = False) -> PosthocResult:
    r"""Fit an energy to a frozen VAE's aggregate posterior and return the VAE with its prior tilted by it.

    With the VAE's prior :math:`p(z)` at ``site`` and its encoder :math:`q_\phi(z \mid x)` (the guide), both frozen,
    the aggregate posterior of the training data is sampled once,

    .. math:: z_{ij} \sim q_\phi(z \mid x_i), \qquad i = 1..N,\ j = 1..\text{draws\_per\_datum},

    and the energy :math:`E` is fitted to these draws as the density of ``site`` in a small model
    ``sample(site, EnergyTilted(E, p, normalizer=...), obs=z)`` (:func:`~tilted_priors.inference.pyro.fit`, no
    guide), so that

    .. math:: p_E(z) = \frac{e^{-E(z)}\, p(z)}{Z} \approx \bar q(z) = \frac1N \sum_i q_\phi(z \mid x_i).

    - ``objective="nce"``: :class:`~tilted_priors.inference.pyro.NoiseContrastive` with the prior as noise
      (``num_noise`` draws per datum) and a learned constant :math:`c` (:class:`~tilted_priors.pyro.LearnedLogZ`),
      which tends to :math:`\log Z`. No MCMC; the logit is :math:`-E(z) - c - \log\nu`.
    - ``objective="snl"``: maximum likelihood with the self-normalised bound
      (:class:`~tilted_priors.pyro.SelfNormalized`, ``snl_samples`` prior draws per step), a learned :math:`b`
      that tends to :math:`\log Z`: per draw :math:`-E(z) + \log p(z) - (b + e^{-b}\hat Z - 1)`.

    Only the energy and the constant are trained (as the parameters ``name + "_energy$$$..."`` and
    ``name + "_log_z"``); the VAE's parameters are read, never updated. Since the decoder and encoder stay as they
    were, the tilted model's log marginal likelihood :math:`\log \int p(x \mid z)\, p_E(z)\, dz` can be compared with
    the VAE's on held-out data, with the same encoder as proposal.

    Parameters
    ----------
    model : callable
        The trained VAE, called with the data as ``fit`` calls it (``model(x_batch)``); it samples ``site`` from an
        ordinary (not energy-tilted) prior with event shape ``(d,)`` inside the data plate, and the prior does not
        depend on the data. Its parameters are the param store's.
    guide : callable
        The trained encoder guide (e.g. :class:`~tilted_priors.inference.pyro.AmortizedGuide`, or
        ``FitResult.guide``), called with the same arguments; it samples ``site``, one ``(d,)`` vector per datum.
    data : numpy.ndarray, tuple or dict of numpy.ndarray
        The training data, as for ``fit`` (one array, a tuple passed positionally, a dict passed by name).
    energy : callable
        :math:`E`, mapping ``(..., d) -> (...)``, e.g. :class:`~tilted_priors.pyro.EnergyMLP` ``(d, ...)``. A torch
        module is registered as ``name + "_energy"`` and trained in place, from its own weights.
    site : str
        The latent site whose prior is tilted.
    objective : {"nce", "snl"}
        How the energy is fitted (above).
    num_noise : int
        NCE's noise draws from the prior per aggregate-posterior draw.
    snl_samples : int
        SNL's prior draws per step for :math:`\hat Z`.
    draws_per_datum : int
        Draws from :math:`q_\phi(z \mid x_i)` per training datum (drawn once, then fixed).
    epochs, num_steps : int, optional
        Length of the energy's training (at most one; ``num_steps=1000`` when neither is given).
    batch_size : int
        Minibatch of draws per step (at most the number of draws).
    lr, betas, lr_decay : float, pair of float, float
        Adam's settings, as for ``fit``.
    name : str
        Prefix of the learned parameters' names; parameters already stored under it are replaced.
    log_z : estimator, optional
        How the returned ``log_z`` of the trained tilt is estimated: an object with ``.estimate(dist)``,
        default ``Importance(10_000)`` (draws from the prior; enough in a few dimensions). In more dimensions, or
        when the tilt is strong (a small ESS in the result), use ``AnnealedImportance(2000, 100)``.
    guide_batch_size : int
        Data per call of the guide when drawing.
    seed : int
        Seeds the draws, the training and the :math:`\log Z` estimate (``pyro.set_rng_seed``).
    progress : bool
        Show ``fit``'s progress bar.

    Returns
    -------
    PosthocResult
        ``model`` (the tilted VAE), ``energy``, ``params``, ``log_z`` (a :class:`~tilted_priors.pyro.LogZEstimate`),
        ``learned_log_z``, ``draws``, ``fit``, ``site``, ``objective``.

    Raises
    ------
    ValueError
        For an unknown objective, a site the model does not sample as a latent (or the guide does not sample), a
        prior that is already tilted or not one ``(d,)`` vector per datum, or bad counts.

    Examples
    --------
    A "VAE" whose encoder puts the aggregate posterior at :math:`\pm 1.5`, far from its prior :math:`\mathcal N(0, 1)`:

    >>> import numpy as np, torch, pyro, pyro.distributions as dist
    >>> from tilted_priors.pyro import EnergyMLP
    >>> def vae(x):
    ...     with pyro.plate("data", x.shape[0]):
    ...         z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
    ...         pyro.sample("x", dist.Normal(z, 0.1).to_event(1), obs=x)
    >>> def encoder(x):
    ...     with pyro.plate("data", x.shape[0]):
    ...         pyro.sample("z", dist.Normal(x, 0.1).to_event(1))
    >>> x = np.random.default_rng(0).choice([-1.5, 1.5], size=(500, 1))
    >>> pyro.clear_param_store()
    >>> result = posthoc_tilt(vae, encoder, x, EnergyMLP(1, 16), num_steps=300, batch_size=250, lr=1e-2)
    >>> energy = result.energy(torch.tensor([[0.0], [1.5]])).detach()
    >>> bool(energy[0] > energy[1] + 1.0)   # the tilt moves prior mass from 0 to the modes
    True
    """
    opts = check_options(site=site, objective=objective, num_noise=num_noise, snl_samples=snl_samples,
                         draws_per_datum=draws_per_datum, guide_batch_size=guide_batch_size,
                         log_z=log_z, name=name, epochs=epochs, num_steps=num_steps)
    if not callable(model) or not callable(guide):
        raise TypeError("model and guide must be callable: the trained VAE's model and its encoder guide")
    if not callable(energy):
        raise TypeError(f"energy must be callable (..., d) -> (...), e.g. EnergyMLP(d), got {type(energy).__name__}")
    arrays, names = check_data(data)
    energy_name, c_name = f"{name}_energy", f"{name}_log_z"
    pyro.set_rng_seed(seed)
    first_args, first_kwargs = _tensors(*next(guide_batches([a[:1] for a in arrays], names, 1, 1)))
    prior = _prior(model, site, first_args, first_kwargs)

    parts = []
    with torch.no_grad():
        for args, kwargs in guide_batches(arrays, names, opts["guide_batch_size"], opts["draws_per_datum"]):
            args, kwargs = _tensors(args, kwargs)
            trace = poutine.trace(guide).get_trace(*args, **kwargs)
            if site not in trace.nodes or trace.nodes[site]["type"] != "sample":
                drawn = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
                raise site_error(site, drawn, "the guide's sample sites")
            rows = (args[0] if args else next(iter(kwargs.values()))).shape[0]
            parts.append(check_draws(trace.nodes[site]["value"].cpu().numpy(), site, rows))
    draws = np.concatenate(parts)
    d = draws.shape[1]
    if tuple(prior.event_shape) != (d,):
        raise ValueError(f"the guide draws {d}-vectors at site {site!r}, but the model's prior there has event shape "
                         f"{tuple(prior.event_shape)}")

    nce = opts["objective"] == "nce"

    def density(z):
        e = register_module(energy_name, energy) if isinstance(energy, torch.nn.Module) else energy
        normalizer = LearnedLogZ(c_name) if nce else SelfNormalized(opts["snl_samples"], name=c_name)
        with pyro.plate("data", z.shape[0]):
            pyro.sample(site, EnergyTilted(e, prior.expand(torch.Size([z.shape[0]])), normalizer=normalizer),
                        obs=z)

    _forget(name)
    trained = fit(density, None, draws, epochs=opts["epochs"], num_steps=opts["num_steps"],
                  batch_size=min(int(batch_size), draws.shape[0]), lr=lr, betas=betas, lr_decay=lr_decay,
                  loss=NoiseContrastive(opts["num_noise"]) if nce else None, seed=seed, progress=progress)

    with torch.no_grad():
        est = (Importance(10_000) if log_z is None else log_z).estimate(EnergyTilted(energy, prior))
    log_z_estimate = LogZEstimate(*(t.reshape(()) for t in est))

    learned_c = float(trained.params[c_name])

    normalizer = LearnedLogZ(c_name, init=learned_c)
    if isinstance(energy, torch.nn.Module):  # tilt registers it as energy_name at every run: the trained weights
        tilted_model = tilt(model, energy, site, normalizer=normalizer, name=energy_name)
    else:
        tilted_model = tilt(model, lambda v: energy(v[site]), site, normalizer=normalizer)
    return PosthocResult(tilted_model, energy, dict(trained.params), log_z_estimate, learned_c, draws,
                         trained, site, opts["objective"])
