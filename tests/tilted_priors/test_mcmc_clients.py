"""Real clients: the backends' own NUTS on a model with a tilted prior recovers the closed-form posterior."""
import arviz as az
import numpy as np
import pytest

from helpers import QuadraticCase, make_case

SIGMA = 0.7


def _posterior(case: QuadraticCase, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian likelihood x ~ N(z, SIGMA^2 I) on the tilted Gaussian prior: a Gaussian posterior."""
    P = case.precision + np.eye(case.dim) / SIGMA ** 2
    cov = np.linalg.inv(P)
    return cov @ (case.precision @ case.mean + x / SIGMA ** 2), cov


def _check(draws: np.ndarray, case: QuadraticCase, x: np.ndarray) -> None:
    mean, cov = _posterior(case, x)
    for j in range(case.dim):
        d = draws[..., j]
        assert abs(d.mean() - mean[j]) < 3.5 * float(az.mcse(d, method="mean")), j
        assert abs(d.std() - np.sqrt(cov[j, j])) < 3.5 * float(az.mcse(d, method="sd")), j


@pytest.mark.slow
def test_pyro_nuts():
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import MCMC, NUTS

    import tilted_priors.pyro as tp

    case = make_case(dim=2, seed=6)
    x = np.array([1.0, -0.5])
    energy = lambda z: 0.5 * ((z @ torch.tensor(case.A, dtype=torch.float32)) * z).sum(-1) \
        + z @ torch.tensor(case.b, dtype=torch.float32)

    def model(x):
        z = pyro.sample("z", tp.EnergyTiltedNormal(energy, torch.tensor(case.loc, dtype=torch.float32),
                                                   torch.tensor(case.scale, dtype=torch.float32),
                                                   normalizer=tp.Unnormalized()))
        pyro.sample("x", dist.Normal(z, SIGMA).to_event(1), obs=x)

    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(model), num_samples=800, warmup_steps=300, num_chains=1, disable_progbar=True)
    mcmc.run(torch.tensor(x, dtype=torch.float32))
    draws = mcmc.get_samples(group_by_chain=True)["z"].numpy()
    _check(draws, case, x)


def test_numpyro_nuts():
    import jax
    import numpyro
    import numpyro.distributions as dist
    from jax.tree_util import Partial
    from numpyro.infer import MCMC, NUTS

    import tilted_priors.numpyro as tp
    from helpers import _jax_quadratic_energy

    case = make_case(dim=2, seed=6)
    x = np.array([1.0, -0.5])
    energy = Partial(_jax_quadratic_energy, jax.numpy.asarray(case.A), jax.numpy.asarray(case.b))

    def model(x):
        z = numpyro.sample("z", tp.EnergyTiltedNormal(energy, case.loc, case.scale, normalizer=tp.Unnormalized()))
        numpyro.sample("x", dist.Normal(z, SIGMA).to_event(1), obs=x)

    mcmc = MCMC(NUTS(model), num_warmup=500, num_samples=2000, num_chains=1, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), x)
    draws = np.asarray(mcmc.get_samples(group_by_chain=True)["z"])
    _check(draws, case, x)
