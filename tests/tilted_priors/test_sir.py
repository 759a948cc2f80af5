"""SIR (sampling-importance-resampling from the base) on both backends: convergence on the quadratic reference
case, use as a distribution's sampler, inside Contrastive, with the sampler handler, and its errors."""
import numpy as np
import pytest


def _moments_z(backend, case, num_proposals: int, n: int):
    """z-scores (error / Monte Carlo standard error) of the mean and variance of ``n`` SIR draws, per coordinate."""
    prior = backend.prior(case, sampler=backend.tp.SIR(num_proposals), normalizer=backend.tp.Unnormalized())
    z = backend.numpy(backend.sample(prior, (n,))).astype(np.float64)
    var = np.diag(case.cov)
    z_mean = (z.mean(0) - case.mean) / np.sqrt(var / n)  # the draws are independent
    z_var = (z.var(0) - var) / (var * np.sqrt(2.0 / (n - 1)))
    return np.abs(z_mean), np.abs(z_var)


def test_sir_converges_to_the_tilted_gaussian(backend, quadratic_case):
    # K = 1 would be the base itself; K = 2 is far off, K = 1000 is exact within the Monte Carlo error.
    n = 4000
    few_mean, few_var = _moments_z(backend, quadratic_case, 2, n)
    many_mean, many_var = _moments_z(backend, quadratic_case, 1000, n)
    assert few_mean.max() > 10 and few_mean.max() > 4 * many_mean.max(), (few_mean, many_mean)
    assert many_mean.max() < 4 and many_var.max() < 4, (many_mean, many_var)


def test_sir_info_reports_ess_and_log_z(backend):
    tp = backend.tp
    zero = backend.tp.EnergyTiltedNormal(lambda z: 0.0 * z.sum(-1), backend.array(np.zeros(2)),
                                         backend.array(np.ones(2)))
    args = (zero, (5,))
    z, info = (tp.SIR(40).sample_tilted(*args, return_info=True) if backend.name == "pyro"
               else tp.SIR(40).sample_tilted(backend.key(), *args, return_info=True))
    assert z.shape == (5, 2)
    np.testing.assert_allclose(backend.numpy(info.ess), 40.0, rtol=1e-5)  # E = 0: equal weights
    np.testing.assert_allclose(backend.numpy(info.log_z), 0.0, atol=1e-5)


def test_sir_inside_contrastive_gives_the_gradient_of_log_z(backend, quadratic_case):
    # d/db log Z = -E_p[z] for E(z) = z'Az/2 + b'z: the Contrastive term's gradient with SIR's negative samples.
    case, tp, n = quadratic_case, backend.tp, 4000
    normalizer = tp.Contrastive(sampler=tp.SIR(1000), num_samples=n)
    if backend.name == "pyro":
        b = backend.array(case.b).requires_grad_()
        prior = tp.EnergyTiltedNormal(backend.quadratic_energy(case, b=b), backend.array(case.loc),
                                      backend.array(case.scale), normalizer=normalizer)
        prior.log_normalizer().backward()
        grad = backend.numpy(b.grad)
    else:
        key = backend.key()

        def term(b):
            prior = tp.EnergyTiltedNormal(backend.quadratic_energy(case, b=b), backend.array(case.loc),
                                          backend.array(case.scale), normalizer=normalizer)
            return prior.log_normalizer(key)

        grad = backend.numpy(backend.jax.jit(backend.jax.grad(term))(backend.array(case.b)))
    se = np.sqrt(np.diag(case.cov) / n)
    assert np.all(np.abs(grad + case.mean) < 4 * se), (grad, -case.mean, se)


def test_sir_through_the_sampler_handler(backend, quadratic_case):
    tp = backend.tp
    model = lambda: backend.site("z", backend.prior(quadratic_case))  # noqa: E731
    fn = backend.site_fn(backend.handlers.sampler(model, tp.SIR(10)), "z")
    assert repr(fn.sampler) == "SIR(num_proposals=10)"
    assert tuple(backend.sample(fn, (3,)).shape) == (3, quadratic_case.dim)


def test_sir_run_without_a_distribution_is_a_clear_type_error(backend):
    tp = backend.tp
    with pytest.raises(TypeError, match="needs the distribution itself"):
        backend.run(tp.SIR(10), lambda z: -(z ** 2).sum(-1), backend.array(np.zeros((4, 2))))
    with pytest.raises(ValueError, match="num_proposals"):
        tp.SIR(0)


def test_sir_unusable_weights_raise(backend):
    tp = backend.tp
    prior = tp.EnergyTiltedNormal(lambda z: float("nan") * z.sum(-1), backend.array(np.zeros(2)),
                                  backend.array(np.ones(2)), sampler=tp.SIR(5))
    with pytest.raises(FloatingPointError, match="SIR: 3 of the 3 draws"):
        backend.sample(prior, (3,))


def test_sir_numpyro_is_frozen_and_runs_under_jit():
    import jax
    import jax.numpy as jnp

    from tilted_priors.numpyro import SIR, EnergyTiltedNormal

    s = SIR(20)
    assert s == SIR(20) and hash(s) == hash(SIR(20)) and s != SIR(21)
    with pytest.raises(AttributeError, match="immutable"):
        s.num_proposals = 3
    prior = EnergyTiltedNormal(lambda z: (z ** 2).sum(-1), jnp.zeros(2), jnp.ones(2), sampler=s)
    draw = jax.jit(lambda key, loc: EnergyTiltedNormal(prior.energy, loc, jnp.ones(2), sampler=s).sample(key, (7,)))
    z = draw(jax.random.PRNGKey(0), jnp.zeros(2))
    assert z.shape == (7, 2) and bool(jnp.all(jnp.isfinite(z)))
