"""Test helpers shared by the whole suite (the fixtures in conftest.py wrap them).

``QuadraticCase``: the sampler-correctness reference used by every kernel on both backends. The energy
:math:`E(z) = \\tfrac12 z^T A z + b^T z` tilts :math:`\\mathcal N(m_0, S_0)` into the Gaussian
:math:`\\mathcal N(m, P^{-1})`, :math:`P = S_0^{-1} + A`, :math:`m = P^{-1}(S_0^{-1} m_0 - b)`, with

.. math:: \\log Z = -\\tfrac12 \\log|S_0| - \\tfrac12 \\log|P| + \\tfrac12 m^T P m - \\tfrac12 m_0^T S_0^{-1} m_0 .

``PyroBackend`` / ``NumPyroBackend``: adapters with one interface over Pyro and NumPyro, so that each statistical test is written once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuadraticCase:
    A: np.ndarray
    b: np.ndarray
    loc: np.ndarray
    scale: np.ndarray

    @property
    def dim(self) -> int:
        return self.b.shape[0]

    @property
    def precision(self) -> np.ndarray:
        return np.diag(self.scale ** -2.0) + self.A

    @property
    def cov(self) -> np.ndarray:
        return np.linalg.inv(self.precision)

    @property
    def mean(self) -> np.ndarray:
        return self.cov @ (self.loc / self.scale ** 2 - self.b)

    @property
    def sd(self) -> np.ndarray:
        return np.sqrt(np.diag(self.cov))

    @property
    def log_z(self) -> float:
        m, P = self.mean, self.precision
        return float(-np.log(self.scale).sum() - 0.5 * np.linalg.slogdet(P)[1] + 0.5 * m @ P @ m
                     - 0.5 * np.sum(self.loc ** 2 / self.scale ** 2))

    def energy_np(self, z: np.ndarray) -> np.ndarray:
        return 0.5 * np.einsum("...i,ij,...j->...", z, self.A, z) + z @ self.b

    def ula_cov(self, h: float) -> np.ndarray:
        """Stationary covariance of ULA with step size h on this Gaussian: Sigma = M Sigma M + h^2 I."""
        lam, V = np.linalg.eigh(self.precision)
        var = h * h / (1.0 - (1.0 - 0.5 * h * h * lam) ** 2)
        return (V * var) @ V.T


def make_case(dim: int = 3, seed: int = 0, standard_base: bool = False) -> QuadraticCase:
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    A = Q @ np.diag(np.linspace(-0.3, 1.5, dim)) @ Q.T  # indefinite energy, positive-definite precision
    b = rng.normal(size=dim)
    loc = np.zeros(dim) if standard_base else rng.normal(scale=0.5, size=dim)
    scale = np.ones(dim) if standard_base else rng.uniform(0.8, 1.3, size=dim)
    case = QuadraticCase(A, b, loc, scale)
    assert np.all(np.linalg.eigvalsh(case.precision) > 0)
    return case


# --- backends ------------------------------------------------------------------------------------------
class PyroBackend:
    """Adapter: the same calls on Pyro (torch's global RNG, seeded)."""

    name = "pyro"

    def __init__(self, seed: int = 0):
        import pyro
        import torch

        import tilted_priors.pyro as tp
        from tilted_priors.inference.pyro import handlers

        self.torch, self.pyro, self.tp, self.handlers = torch, pyro, tp, handlers
        pyro.set_rng_seed(seed)
        pyro.clear_param_store()

    def array(self, x, dtype=None):
        return self.torch.as_tensor(np.asarray(x), dtype=dtype or self.torch.get_default_dtype())

    def numpy(self, x) -> np.ndarray:
        return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)

    def quadratic_energy(self, case: QuadraticCase, A=None, b=None):
        A = self.array(case.A) if A is None else A
        b = self.array(case.b) if b is None else b
        return lambda z: 0.5 * ((z @ A) * z).sum(-1) + z @ b

    def prior(self, case: QuadraticCase, **kwargs):
        return self.tp.EnergyTiltedNormal(self.quadratic_energy(case), self.array(case.loc), self.array(case.scale),
                                          **kwargs)

    def run(self, sampler, log_density, init, **kwargs):
        return sampler.run(log_density, init, **kwargs)

    def sample(self, dist, shape=()):
        return dist.sample(shape)

    def estimate(self, normalizer, dist):
        return normalizer.estimate(dist)

    def log_normalizer(self, dist):
        return dist.log_normalizer()

    def site(self, name: str, dist):
        """A sample statement ``name ~ dist`` (inside a model)."""
        return self.pyro.sample(name, dist)

    def site_fn(self, model, name: str):
        """The distribution of site ``name`` in a trace of ``model()``, after the handlers around it."""
        return self.pyro.poutine.trace(model).get_trace().nodes[name]["fn"]

    # --- whole models under the backend's own MCMC -----------------------------------------------------
    def trace(self, model, *args):
        """``{site: (value, fn)}`` of one (seeded) run of ``model(*args)``."""
        tr = self.pyro.poutine.trace(model).get_trace(*args)
        return {k: (v["value"], v["fn"]) for k, v in tr.nodes.items() if v["type"] == "sample"}

    def log_density(self, model, values: dict, *args) -> float:
        """The model's log joint at ``values`` (all sample sites given)."""
        cond = self.pyro.poutine.condition(model, {k: self.array(v) for k, v in values.items()})
        tr = self.pyro.poutine.trace(cond).get_trace(*args)
        return float(tr.log_prob_sum().detach())

    def predictive(self, model, num_samples: int, *args) -> dict:
        from pyro.infer import Predictive

        return {k: self.numpy(v) for k, v in Predictive(model, num_samples=num_samples)(*args).items()}

    def regression_model(self, case: QuadraticCase, sigma: float):
        """``model(x)``: z ~ the tilted prior of ``case`` (default normalizer), x ~ N(z, sigma^2 I) observed."""
        import pyro.distributions as dist

        def model(x):
            z = self.pyro.sample("z", self.prior(case))
            self.pyro.sample("x", dist.Normal(z, sigma).to_event(1), obs=x)

        return model

    def nuts(self, model, **kwargs):
        """Pyro's NUTS on the model as written (the contrastive term runs no chain for gradients in the latents)."""
        from pyro.infer import NUTS

        return NUTS(model, **kwargs)

    def langevin(self, model, **kwargs):
        from tilted_priors.inference.pyro import Langevin

        return Langevin(model, **kwargs)

    def mcmc(self, kernel, *args, num_warmup: int, num_samples: int, num_chains: int = 1):
        """Run the backend's ``MCMC``; return it and its draws as numpy ``(chain, draw, ...)`` per site.

        Several chains run one after the other in this process (Pyro would start worker processes when it sees
        enough cores): the same draws on any machine, and no fork of a process that holds torch threads.
        """
        import warnings
        from unittest import mock

        from pyro.infer import MCMC
        from pyro.infer.mcmc import api

        with mock.patch.object(api.mp, "cpu_count", lambda: 1), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"num_chains=\d+ is more than available_cpu",
                                    category=UserWarning)
            mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=num_warmup, num_chains=num_chains,
                        disable_progbar=True)
        mcmc.run(*(self.array(a) for a in args))
        return mcmc, {k: self.numpy(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}


class NumPyroBackend:
    """Adapter: the same calls on NumPyro (explicit keys, split from one seed)."""

    name = "numpyro"

    def __init__(self, seed: int = 0):
        import jax
        import jax.numpy as jnp

        import numpyro

        import tilted_priors.numpyro as tp
        from tilted_priors.inference.numpyro import handlers

        self.jax, self.jnp, self.numpyro, self.tp, self.handlers = jax, jnp, numpyro, tp, handlers
        self._key = jax.random.PRNGKey(seed)

    def key(self):
        self._key, sub = self.jax.random.split(self._key)
        return sub

    def array(self, x, dtype=None):
        return self.jnp.asarray(np.asarray(x), dtype=dtype or self.jnp.zeros(()).dtype)

    def numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    def quadratic_energy(self, case: QuadraticCase, A=None, b=None):
        from jax.tree_util import Partial

        A = self.array(case.A) if A is None else A
        b = self.array(case.b) if b is None else b
        return Partial(_jax_quadratic_energy, A, b)

    def prior(self, case: QuadraticCase, **kwargs):
        return self.tp.EnergyTiltedNormal(self.quadratic_energy(case), self.array(case.loc), self.array(case.scale),
                                          **kwargs)

    def run(self, sampler, log_density, init, **kwargs):
        return sampler.run(self.key(), log_density, init, **kwargs)

    def sample(self, dist, shape=()):
        return dist.sample(self.key(), shape)

    def estimate(self, normalizer, dist):
        return normalizer.estimate(dist, self.key())

    def log_normalizer(self, dist):
        return dist.log_normalizer(self.key())

    def site(self, name: str, dist):
        """A sample statement ``name ~ dist`` (inside a model)."""
        return self.numpyro.sample(name, dist)

    def site_fn(self, model, name: str):
        """The distribution of site ``name`` in a seeded trace of ``model()``, after the handlers around it."""
        from numpyro import handlers

        return handlers.trace(handlers.seed(model, self.key())).get_trace()[name]["fn"]

    # --- whole models under the backend's own MCMC -----------------------------------------------------
    def trace(self, model, *args):
        """``{site: (value, fn)}`` of one (seeded) run of ``model(*args)``."""
        from numpyro import handlers

        tr = handlers.trace(handlers.seed(model, self.key())).get_trace(*args)
        return {k: (v["value"], v["fn"]) for k, v in tr.items() if v["type"] == "sample"}

    def log_density(self, model, values: dict, *args) -> float:
        """The model's log joint at ``values`` (all sample sites given)."""
        from numpyro import handlers
        from numpyro.infer.util import log_density

        seeded = handlers.seed(model, self.key())
        return float(log_density(seeded, args, {}, {k: self.array(v) for k, v in values.items()})[0])

    def predictive(self, model, num_samples: int, *args) -> dict:
        from numpyro.infer import Predictive

        out = Predictive(model, num_samples=num_samples)(self.key(), *args)
        return {k: self.numpy(v) for k, v in out.items()}

    def regression_model(self, case: QuadraticCase, sigma: float):
        """``model(x)``: z ~ the tilted prior of ``case`` (default normalizer), x ~ N(z, sigma^2 I) observed."""
        import numpyro
        import numpyro.distributions as dist

        def model(x):
            z = numpyro.sample("z", self.prior(case))
            numpyro.sample("x", dist.Normal(z, sigma).to_event(1), obs=x)

        return model

    def nuts(self, model, **kwargs):
        """NumPyro's NUTS on the model as written (the contrastive term is 0 inside MCMC's potential)."""
        from numpyro.infer import NUTS

        return NUTS(model, **kwargs)

    def langevin(self, model, **kwargs):
        from tilted_priors.inference.numpyro import Langevin

        return Langevin(model, **kwargs)

    def mcmc(self, kernel, *args, num_warmup: int, num_samples: int, num_chains: int = 1):
        """Run the backend's ``MCMC``; return it and its draws as numpy ``(chain, draw, ...)`` per site."""
        from numpyro.infer import MCMC

        mcmc = MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains,
                    chain_method="vectorized" if num_chains > 1 else "sequential", progress_bar=False)
        mcmc.run(self.key(), *(self.array(a) for a in args))
        return mcmc, {k: self.numpy(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}


def _jax_quadratic_energy(A, b, z):
    return 0.5 * ((z @ A) * z).sum(-1) + z @ b


BACKENDS = {"pyro": PyroBackend, "numpyro": NumPyroBackend}

