"""The ``tilt`` effect handler: any site(s) of any model, both backends, against closed forms.

The hierarchical reference: z1 ~ N(0, 1), z2 | z1 ~ N(z1, 1) (a Gaussian base with covariance S0 = [[1, 1],
[1, 2]]) tilted jointly by E(z) = z^T A z / 2 + b^T z is the Gaussian N(m, P^-1) with P = S0^-1 + A,
m = P^-1 (-b) and log Z = -log|S0| / 2 - log|P| / 2 + m^T P m / 2.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

A = np.array([[1.0, 0.5], [0.5, 2.0]])
B = np.array([0.3, -0.5])
S0 = np.array([[1.0, 1.0], [1.0, 2.0]])
PRECISION = np.linalg.inv(S0) + A
COV = np.linalg.inv(PRECISION)
MEAN = COV @ -B
LOG_Z = float(-0.5 * np.linalg.slogdet(S0)[1] - 0.5 * np.linalg.slogdet(PRECISION)[1] + 0.5 * MEAN @ PRECISION @ MEAN)


def _hierarchical(backend):
    dist = _dist(backend)

    def model():
        z1 = backend.site("z1", dist.Normal(0.0, 1.0))
        backend.site("z2", dist.Normal(z1, 1.0))

    A_, b_ = backend.array(A), backend.array(B)
    stack = backend.torch.stack if backend.name == "pyro" else backend.jnp.stack

    def energy(v):
        z1, z2 = v["z1"], v["z2"]
        z = stack([z1 + 0 * z2, z2 + 0 * z1], -1)
        return 0.5 * ((z @ A_) * z).sum(-1) + z @ b_

    return model, energy


def _dist(backend):
    if backend.name == "pyro":
        import pyro.distributions as dist
    else:
        import numpyro.distributions as dist
    return dist


def _ess(x: np.ndarray) -> float:
    from numpyro.diagnostics import effective_sample_size

    return float(effective_sample_size(x[None]))


def test_one_site_tilt_is_energy_tilted_normal(backend):
    dist = _dist(backend)
    loc, scale = backend.array([0.5, -1.0]), backend.array([2.0, 0.5])

    def model():
        with backend.pyro.plate("data", 3) if backend.name == "pyro" else backend.numpyro.plate("data", 3):
            backend.site("z", dist.Normal(loc, scale).to_event(1))

    energy = lambda v: 0.5 * (v["z"] ** 2).sum(-1) + v["z"][..., 0]
    tilted = backend.handlers.tilt(model, energy, "z", normalizer=backend.tp.Unnormalized(),
                                   sampler=backend.tp.MALA(5, 0.1))
    value, fn = backend.trace(tilted)["z"]
    assert tuple(value.shape) == (3, 2)
    reference = backend.tp.EnergyTiltedNormal(lambda z: 0.5 * (z ** 2).sum(-1) + z[..., 0], loc, scale,
                                              normalizer=backend.tp.Unnormalized())
    z = backend.array(np.random.default_rng(0).normal(size=(4, 3, 2)))
    np.testing.assert_allclose(backend.numpy(fn.log_prob(z)), backend.numpy(reference.log_prob(z)), rtol=1e-6)


def test_constrained_scalar_site_in_plate(backend):
    """HalfNormal(1) tilted by E(s) = 2 s: exact density ratios, and the mean by long-run MALA in u = log s."""
    dist = _dist(backend)

    def model():
        with backend.pyro.plate("p", 2000) if backend.name == "pyro" else backend.numpyro.plate("p", 2000):
            backend.site("s", dist.HalfNormal(1.0))

    tilted = backend.handlers.tilt(model, lambda v: 2.0 * v["s"], "s", normalizer=backend.tp.Unnormalized(),
                                   sampler=backend.tp.MALA(300, 0.3))
    value, fn = backend.trace(tilted)["s"]
    s = backend.numpy(value)
    assert s.shape == (2000,) and np.all(s > 0)
    a, b = backend.array(0.5), backend.array(1.5)
    ratio = backend.numpy(fn.log_prob(a) - fn.log_prob(b)).ravel()[0]
    assert ratio == pytest.approx(-2.0 * (0.5 - 1.5) - 0.5 * (0.25 - 2.25), abs=1e-5)
    grid = np.linspace(0.0, 10.0, 200001)
    density = np.exp(-2.0 * grid - 0.5 * grid ** 2)
    mean = np.trapezoid(grid * density, grid) / np.trapezoid(density, grid)
    sd = math.sqrt(np.trapezoid(grid ** 2 * density, grid) / np.trapezoid(density, grid) - mean ** 2)
    assert abs(s.mean() - mean) < 4 * sd / math.sqrt(2000)


def test_joint_tilt_log_density_and_prior_draws(backend):
    model, energy = _hierarchical(backend)
    tilted = backend.handlers.tilt(model, energy, ["z1", "z2"], normalizer=backend.tp.Unnormalized(),
                                   sampler=backend.tp.MALA(100, 0.5))
    z1, z2 = 0.5, -1.0
    expected = (-0.5 * z1 ** 2 - 0.5 * (z2 - z1) ** 2 - math.log(2 * math.pi)
                - (0.5 * np.array([z1, z2]) @ A @ np.array([z1, z2]) + B @ np.array([z1, z2])))
    assert backend.log_density(tilted, {"z1": z1, "z2": z2}) == pytest.approx(expected, abs=1e-4)
    draws = backend.trace(tilted)
    assert type(draws["z1"][1]).__name__ == "_JointFirst" and type(draws["z2"][1]).__name__ == "_JointLast"


@pytest.mark.parametrize("kernel", ["nuts", "langevin"])
def test_joint_tilt_moments_under_mcmc(backend, kernel):
    """NUTS and the MALA kernel on the tilted model as written (default Contrastive normalizer)."""
    model, energy = _hierarchical(backend)
    tilted = backend.handlers.tilt(model, energy, ["z1", "z2"], sampler=backend.tp.MALA(20, 0.5))
    make = backend.nuts if kernel == "nuts" else backend.langevin
    _, draws = backend.mcmc(make(tilted), num_warmup=300, num_samples=800)
    for i, site in enumerate(["z1", "z2"]):
        x = draws[site][0]
        mcse = x.std() / math.sqrt(_ess(x))
        assert abs(x.mean() - MEAN[i]) < 3.5 * mcse, (site, x.mean(), MEAN[i], mcse)


def test_joint_tilt_log_z_by_ais(backend):
    model, energy = _hierarchical(backend)
    tilted = backend.handlers.tilt(model, energy, ["z1", "z2"], sampler=backend.tp.MALA(20, 0.5))
    joint = backend.handlers.find_tilted(backend.trace(tilted)["z2"][1])
    est = backend.estimate(backend.tp.AnnealedImportance(400, 40), joint)
    assert abs(float(est.log_z) - LOG_Z) < 4 * float(est.stderr) + 0.01


class _Counting:
    """A sampler that counts its runs (and delegates to MALA)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def run(self, *args, **kwargs):
        self.calls += 1
        return self.inner.run(*args, **kwargs)


def test_nuts_on_model_as_written_runs_no_prior_chain(backend, quadratic_case):
    dist = _dist(backend)
    counting = _Counting(backend.tp.MALA(5, 0.1))

    def model(x):
        z = backend.site("z", backend.prior(quadratic_case, normalizer=backend.tp.Contrastive(sampler=counting)))
        sample = backend.pyro.sample if backend.name == "pyro" else backend.numpyro.sample
        sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    _, draws = backend.mcmc(backend.nuts(model), np.zeros(quadratic_case.dim), num_warmup=20, num_samples=20)
    assert draws["z"].shape == (1, 20, quadratic_case.dim)
    assert counting.calls == 0


def test_settings_handlers_reach_tilted_sites_and_tilts_nest(backend):
    dist = _dist(backend)

    def model():
        backend.site("a", dist.Normal(0.0, 1.0))
        backend.site("b", dist.Normal(0.0, 1.0).expand([2]).to_event(1))

    inner = backend.handlers.tilt(model, lambda v: v["a"] ** 2, "a", sampler=backend.tp.MALA(5, 0.1))
    outer = backend.handlers.tilt(inner, lambda v: (v["b"] ** 2).sum(-1), "b", sampler=backend.tp.MALA(5, 0.1))
    swapped = backend.handlers.normalizer(outer, backend.tp.Unnormalized())
    sites = backend.trace(swapped)
    for name in ("a", "b"):
        assert isinstance(backend.handlers.find_tilted(sites[name][1]).normalizer, backend.tp.Unnormalized)


def test_bad_arguments_are_named(backend):
    dist = _dist(backend)
    tilt = backend.handlers.tilt

    def model():
        backend.site("k", dist.Poisson(3.0))
        with backend.pyro.plate("p", 3) if backend.name == "pyro" else backend.numpyro.plate("p", 3):
            backend.site("w", dist.Normal(0.0, 1.0))
        backend.site("v", dist.Normal(0.0, 1.0))

    with pytest.raises(TypeError, match="energy must be a callable"):
        tilt(model, None, "w")
    with pytest.raises(TypeError, match="sites must be"):
        tilt(model, lambda v: 0.0, [])
    with pytest.raises(TypeError, match="context manager"):
        tilt(None, lambda v: 0.0, ["w", "v"])
    with pytest.raises(TypeError, match="discrete"):
        backend.trace(tilt(model, lambda v: 0.0, "k"))
    with pytest.raises(ValueError, match="same plate"):
        backend.trace(tilt(model, lambda v: v["w"] + v["v"], ["w", "v"], normalizer=backend.tp.Unnormalized()))


def test_joint_tilt_contrastive_gradient_is_the_maximum_likelihood_gradient(backend):
    """d/dtheta log p(z*) = -z1*^2 / 2 + E_p[z1^2] / 2 for E = theta z1^2 / 2 over the hierarchical base."""
    dist = _dist(backend)
    theta0, z_star = 0.5, (0.8, -0.3)
    cov = np.linalg.inv(np.linalg.inv(S0) + np.diag([theta0, 0.0]))
    expected = -0.5 * z_star[0] ** 2 + 0.5 * cov[0, 0]
    normalizer = backend.tp.Contrastive(num_samples=4000)

    def model():
        z1 = backend.site("z1", dist.Normal(0.0, 1.0))
        backend.site("z2", dist.Normal(z1, 1.0))

    if backend.name == "pyro":
        theta = backend.torch.tensor(theta0, requires_grad=True)
        tilted = backend.handlers.tilt(model, lambda v: 0.5 * theta * v["z1"] ** 2 + 0 * v["z2"], ["z1", "z2"],
                                       normalizer=normalizer, sampler=backend.tp.MALA(60, 0.6))
        cond = backend.pyro.poutine.condition(tilted, {"z1": backend.array(z_star[0]), "z2": backend.array(z_star[1])})
        backend.pyro.poutine.trace(cond).get_trace().log_prob_sum().backward()
        grad = float(theta.grad)
    else:
        from jax.tree_util import Partial
        from numpyro import handlers
        from numpyro.infer.util import log_density

        def energy(theta, v):
            return 0.5 * theta * v["z1"] ** 2 + 0 * v["z2"]

        key = backend.key()

        def log_joint(theta):
            tilted = backend.handlers.tilt(model, Partial(energy, theta), ["z1", "z2"], normalizer=normalizer,
                                           sampler=backend.tp.MALA(60, 0.6))
            values = {"z1": backend.array(z_star[0]), "z2": backend.array(z_star[1])}
            return log_density(handlers.seed(tilted, key), (), {}, values)[0]

        grad = float(backend.jax.grad(log_joint)(backend.array(theta0)))
    se = cov[0, 0] * math.sqrt(2.0) / 2 / math.sqrt(4000)
    assert abs(grad - expected) < 5 * se + 0.01, (grad, expected, se)


def test_network_energy_is_registered_and_trained_by_svi(backend):
    sites = ["z2", "z1"]
    dist = _dist(backend)
    plate = backend.pyro.plate if backend.name == "pyro" else backend.numpyro.plate

    def model(x):
        with plate("data", x.shape[0]):
            z2 = backend.site("z2", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            z1 = backend.site("z1", dist.Normal(z2, 1.0).to_event(1))
            sample = backend.pyro.sample if backend.name == "pyro" else backend.numpyro.sample
            sample("x", dist.Normal(z1, 0.5).to_event(1), obs=x)

    tilted = backend.handlers.tilt(model, backend.tp.EnergyMLP(4, 8), sites, sampler=backend.tp.MALA(5, 0.3))
    x = backend.array(np.random.default_rng(0).normal(size=(16, 2)))
    name = "energy_" + "_".join(sites)
    if backend.name == "pyro":
        from pyro.infer import SVI, Trace_ELBO

        from tilted_priors.inference.pyro import ShortRunPosterior

        svi = SVI(tilted, ShortRunPosterior(tilted, steps=5, step_size=0.1), backend.pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        svi.step(x)
        store = backend.pyro.get_param_store()
        before = {k: v.detach().clone() for k, v in store.items() if k.startswith(name + "$$$")}
        for _ in range(3):
            svi.step(x)
        assert before and any(not np.allclose(backend.numpy(store[k]), backend.numpy(v)) for k, v in before.items())
    else:
        import optax
        from numpyro.infer import SVI, Trace_ELBO

        from tilted_priors.inference.numpyro import ShortRunPosterior

        svi = SVI(tilted, ShortRunPosterior(tilted, steps=5, step_size=0.1), optax.adam(1e-2), Trace_ELBO())
        key = backend.key()
        before = svi.get_params(svi.init(key, x))[name + "$params"]
        after = svi.run(key, 3, x, progress_bar=False).params[name + "$params"]
        changed = backend.jax.tree_util.tree_map(lambda a, b: not np.allclose(a, b), before, after)
        assert any(backend.jax.tree_util.tree_leaves(changed))


def test_default_prior_sampler_draws_a_constrained_site_one_chain_per_run(backend):
    """Predictive draws one chain per run from the tilted HalfNormal (E = 0: the HalfNormal itself) with the default
    ``"auto"`` sampler; chains starting far out (u = log s << 0, a flat region) must not overflow."""
    dist = _dist(backend)

    def model():
        backend.site("s", dist.HalfNormal(1.0))

    draws = backend.predictive(backend.handlers.tilt(model, lambda v: 0.0 * v["s"], "s"), 400)["s"]
    assert np.isfinite(draws).all() and (draws > 0).all()
    mean, sd = math.sqrt(2 / math.pi), math.sqrt(1 - 2 / math.pi)
    assert abs(draws.mean() - mean) < 4 * sd / math.sqrt(400) + 0.05
