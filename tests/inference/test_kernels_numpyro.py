"""tilted_priors.inference.numpyro.Langevin under NumPyro's MCMC: arguments, adaptation, chain methods, ArviZ, divergences."""
import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC

from helpers import NumPyroBackend, make_case
from tilted_priors import ChainRangeWarning
from tilted_priors.inference.diagnostics import to_inference_data
from tilted_priors.inference.numpyro import Langevin
from tilted_priors.inference.numpyro.kernels import LangevinKernelState
from tilted_priors.numpyro import langevin

SIGMA = 0.7
X = np.array([1.0, -0.5])
FIELDS = ("accept_prob", "step_size", "potential_energy", "diverging")


@pytest.fixture(scope="module")
def regression():
    """The shared quadratic case's regression model (tilted prior with the default Contrastive normalizer)."""
    backend = NumPyroBackend(seed=0)
    return backend.regression_model(make_case(dim=2, seed=6), SIGMA), backend.array(X)


def run(kernel, *args, key=0, num_warmup=300, num_samples=500, num_chains=1, chain_method="sequential", **kw):
    mcmc = MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains,
                chain_method=chain_method, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(key), *args, extra_fields=FIELDS, **kw)
    return mcmc


def model_of_normal():
    numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))


@pytest.mark.parametrize("step_size", [0.0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_step_size(step_size):
    with pytest.raises(ValueError, match="step_size"):
        Langevin(model_of_normal, step_size=step_size)


@pytest.mark.parametrize("target", [0.0, 1.0, 1.5, -0.2, float("nan")])
def test_bad_target_accept_prob(target):
    with pytest.raises(ValueError, match="target_accept_prob"):
        Langevin(model_of_normal, target_accept_prob=target)


def test_needs_exactly_one_of_model_and_potential_fn():
    with pytest.raises(ValueError, match="neither"):
        Langevin()
    with pytest.raises(ValueError, match="both"):
        Langevin(model_of_normal, potential_fn=lambda z: 0.5 * (z ** 2).sum())
    kernel = Langevin(potential_fn=lambda z: 0.5 * (z ** 2).sum())
    with pytest.raises(ValueError, match="init_params"):
        MCMC(kernel, num_warmup=2, num_samples=2, progress_bar=False).run(jax.random.PRNGKey(0))


def test_transition_is_the_cores_mala_step():
    """One kernel transition is ``langevin.mala_step`` on the flattened latents, with the same key."""
    kernel = Langevin(model_of_normal, step_size=0.8, adapt_step_size=False)
    state = kernel.init(jax.random.PRNGKey(0), 0, None, (), {})
    assert isinstance(state, LangevinKernelState)
    new = jax.jit(lambda s: kernel.sample(s, (), {}))(state)
    f = lambda z: dist.Normal().log_prob(z).sum(-1)  # noqa: E731 - the model's log density (unconstrained)
    _, key_step = jax.random.split(state.rng_key)
    expected, info = langevin.mala_step(key_step, langevin.init(state.z["z"], f), f, 0.8)
    np.testing.assert_allclose(new.z["z"], expected.position, rtol=1e-6)
    np.testing.assert_allclose(new.potential_energy, -expected.logdensity, rtol=1e-6)
    np.testing.assert_allclose(new.accept_prob, info.acceptance_rate, rtol=1e-6)
    assert new.z_grad["z"].shape == (2,) and not bool(new.diverging)


def test_adapted_step_size_reaches_the_target_acceptance(regression):
    """Dual averaging in warm-up only: after it the step size is fixed and the acceptance is near the target."""
    model, x = regression
    # the step size alone (mass-matrix adaptation restarts it per window, leaving it the 50-step end buffer)
    mcmc = run(Langevin(model, step_size=0.05, adapt_mass_matrix=False), x, num_warmup=500, num_samples=1000,
               num_chains=4, chain_method="vectorized")
    extra = mcmc.get_extra_fields(group_by_chain=True)
    step = np.asarray(extra["step_size"])
    assert np.all(step == step[:, :1]) and np.all(step[:, 0] > 0.2)  # moved far from 0.05, then frozen
    accept = np.asarray(extra["accept_prob"]).mean(1)
    assert np.all(np.abs(accept - 0.57) < 0.1), accept
    # continuing from the post-warm-up state keeps the adapted step size
    mcmc.post_warmup_state = mcmc.last_state
    mcmc.run(jax.random.PRNGKey(1), x, extra_fields=FIELDS)
    again = np.asarray(mcmc.get_extra_fields(group_by_chain=True)["step_size"])
    np.testing.assert_allclose(again, np.broadcast_to(step[:, :1], again.shape))


@pytest.mark.parametrize("chain_method", ["vectorized", "sequential"])
def test_four_chains_agree(regression, chain_method):
    model, x = regression
    mcmc = run(Langevin(model, step_size=0.3), x, num_chains=4, chain_method=chain_method)
    z = np.asarray(mcmc.get_samples(group_by_chain=True)["z"])
    assert z.shape == (4, 500, 2)
    assert not np.allclose(z[0], z[1])  # independent chains
    rhat = np.asarray(az.rhat(z[..., 0])), np.asarray(az.rhat(z[..., 1]))
    assert max(map(float, rhat)) < 1.05, rhat


def test_potential_fn_with_init_params():
    """A pytree of parameters and a hand-written potential; vectorized chains take batched init_params."""
    mu = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
    sd = {"a": jnp.array([0.5, 1.0]), "b": jnp.array(2.0)}

    def potential(z):
        return sum(0.5 * jnp.sum(((z[k] - mu[k]) / sd[k]) ** 2) for k in z)

    init = {"a": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    mcmc = run(Langevin(potential_fn=potential, step_size=0.5), num_warmup=300, num_samples=1500, num_chains=2,
               chain_method="vectorized", init_params=init)
    samples = mcmc.get_samples()
    assert samples["a"].shape == (3000, 2) and samples["b"].shape == (3000,)
    grouped = mcmc.get_samples(group_by_chain=True)
    for k in mu:
        draws = np.asarray(grouped[k]).reshape(2, 1500, -1)
        for j in range(draws.shape[-1]):
            mcse = float(az.mcse(draws[..., j], method="mean"))
            assert abs(draws[..., j].mean() - np.ravel(mu[k])[j]) < 4 * mcse, (k, j, draws[..., j].mean())
    pe = np.asarray(mcmc.get_extra_fields()["potential_energy"])
    np.testing.assert_allclose(pe[:5], [float(potential({k: v[i] for k, v in samples.items()})) for i in range(5)],
                               rtol=1e-5)


def test_arviz_reads_the_run(regression):
    model, x = regression
    mcmc = run(Langevin(model, step_size=0.3), x, num_warmup=100, num_samples=200, num_chains=2,
               chain_method="vectorized")
    idata = az.from_numpyro(mcmc)
    assert idata.posterior["z"].shape == (2, 200, 2)
    stats = idata.sample_stats
    for name in ("acceptance_rate", "step_size", "lp", "diverging"):  # ArviZ's names for our fields
        assert stats[name].shape == (2, 200), name
    np.testing.assert_allclose(stats["lp"].values, -np.asarray(mcmc.get_extra_fields(True)["potential_energy"]))
    assert "x" in idata.log_likelihood
    ours = to_inference_data(mcmc)  # tilted_priors.inference.diagnostics reads the same fields under the same names
    for name in ("acceptance_rate", "step_size", "lp", "diverging"):
        np.testing.assert_array_equal(np.asarray(ours.sample_stats[name]), stats[name].values)


def test_ula_marks_divergence_on_an_exploding_model():
    """ULA with h far above 2 sd explodes: non-finite values propagate and ``diverging`` flags them; MALA
    rejects the same proposals and stays finite."""
    def stiff():
        numpyro.sample("z", dist.Normal(0.0, 0.01).expand([2]).to_event(1))

    with pytest.warns(ChainRangeWarning, match="ran away"):  # before the values become non-finite
        ula = run(Langevin(stiff, step_size=1.0, adjusted=False, adapt_step_size=False), num_warmup=0,
                  num_samples=60)
    diverging = np.asarray(ula.get_extra_fields()["diverging"])
    z = np.asarray(ula.get_samples()["z"])
    assert diverging.any() and diverging[-1]
    assert not np.isfinite(z[-1]).all()
    first = int(np.argmax(diverging))
    assert np.isfinite(z[:first]).all()  # it is flagged at the first non-finite state
    assert np.asarray(ula.get_extra_fields()["accept_prob"])[-1] == 0.0

    mala = run(Langevin(stiff, step_size=1.0, adapt_step_size=False), num_warmup=0, num_samples=60)
    assert np.isfinite(np.asarray(mala.get_samples()["z"])).all()


def test_ula_reports_the_acceptance_it_would_have_had():
    """Unadjusted: every proposal is kept, accept_prob is the MH probability in (0, 1]."""
    mcmc = run(Langevin(model_of_normal, step_size=1.5, adjusted=False, adapt_step_size=False), num_warmup=0,
               num_samples=300)
    z = np.asarray(mcmc.get_samples()["z"])
    assert np.all(np.diff(z[:, 0]) != 0)  # never stays put
    accept = np.asarray(mcmc.get_extra_fields()["accept_prob"])
    assert np.all((accept >= 0) & (accept <= 1)) and 0.05 < accept.mean() < 0.95
