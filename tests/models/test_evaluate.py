"""The test log-likelihood estimator against a closed form, on both backends.

A linear-Gaussian generator x = W z + c + sigma eps under the quadratic-energy tilted prior (a Gaussian
N(m, S)) has the marginal x ~ N(W m + c, W S W^T + sigma^2 I): the estimate (with its AIS log Z) must match it.
"""
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from helpers import make_case

P, SIGMA = 5, 0.5


@dataclass
class LinearLVM:
    """Duck-types models.*.lebm.LatentVariableModel for a linear generator with image shape (1, 1, P)."""

    backend: Any
    case: Any
    W: np.ndarray
    c: np.ndarray
    prior_kind: str = "ebm"
    likelihood_sd: float = SIGMA

    @property
    def latent_dim(self):
        return self.case.dim

    @property
    def image_shape(self):
        return (1, 1, P)

    def prior(self, batch_shape=()):
        tp, be, d = self.backend.tp, self.backend, self.case.dim
        zeros = be.array(np.zeros(tuple(batch_shape) + (d,)))
        return tp.EnergyTiltedNormal(be.quadratic_energy(self.case), zeros, zeros + 1.0)

    def decode(self, z):
        be = self.backend
        return (z @ be.array(self.W) + be.array(self.c)).reshape(tuple(z.shape[:-1]) + (1, 1, P))

    def model(self, x, index=None):
        if self.backend.name == "pyro":
            import pyro as ppl
            import pyro.distributions as dist
        else:
            import numpyro as ppl
            import numpyro.distributions as dist
        with ppl.plate("data", x.shape[0]):
            z = ppl.sample("z", self.prior((x.shape[0],)))
            ppl.sample("x", dist.Normal(self.decode(z), SIGMA).to_event(3), obs=x)


def test_log_likelihood_matches_the_closed_form(backend):
    import importlib

    evaluate = importlib.import_module(f"tilted_priors.models.{backend.name}.evaluate")
    case = make_case(dim=2, seed=8, standard_base=True)
    rng = np.random.default_rng(0)
    W, c = rng.normal(size=(2, P)), rng.normal(size=P)
    lvm = LinearLVM(backend, case, W, c)
    marginal = stats.multivariate_normal(case.mean @ W + c, W.T @ case.cov @ W + SIGMA ** 2 * np.eye(P))
    x = marginal.rvs(40, random_state=1).reshape(40, 1, 1, P).astype(np.float32)
    exact = marginal.logpdf(x.reshape(40, P))
    got = evaluate.log_likelihood(lvm, x, num_samples=256, seed=0, batch_size=20,
                                  ais=backend.tp.AnnealedImportance(400, 40, kernel=backend.tp.MALA(2, 0.6)))
    # the prior's AIS log Z within its reported error ...
    assert abs(got["log_z"] - case.log_z) < 4 * got["log_z_stderr"] + 1e-3
    # ... which shifts every datum alike; with it replaced by the exact value, each datum's importance-sampling
    # estimate (a Laplace proposal on a Gaussian posterior) is within its own Monte Carlo error
    err = got["per_datum"] + (got["log_z"] - case.log_z) - exact
    se = got["per_datum_stderr"]
    assert np.all(se < 0.05) and np.all(np.abs(err) < 4 * se + 1e-3), (err, se)
