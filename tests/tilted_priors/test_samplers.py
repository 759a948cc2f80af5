"""Sampler correctness on the quadratic reference case, every kernel on both backends."""
import math

import arviz as az
import numpy as np
import pytest

from tilted_priors import ChainDivergenceError


def _draws(backend, sampler, log_density, init, num_draws):
    """Call ``run`` repeatedly, feeding each output back: a thinned chain, shape (chain, draw, d)."""
    out, z = [], init
    for _ in range(num_draws):
        z = backend.run(sampler, log_density, z)
        out.append(backend.numpy(z))
    return np.stack(out, axis=1)


def test_mala_recovers_moments(backend, quadratic_case):
    case, tp = quadratic_case, backend.tp
    prior = backend.prior(case, normalizer=tp.Unnormalized())
    log_density = prior.annealed_log_density(1.0)
    init = backend.array(case.loc + case.scale * np.random.default_rng(1).normal(size=(64, case.dim)))
    burn = backend.run(tp.MALA(200, 0.6), log_density, init)
    draws = _draws(backend, tp.MALA(4, 0.6), log_density, burn, 150)  # (64, 150, d)
    for j in range(case.dim):
        x = draws[..., j]
        se_mean = float(az.mcse(x, method="mean"))
        se_sd = float(az.mcse(x, method="sd"))
        assert abs(x.mean() - case.mean[j]) < 3 * se_mean, (j, x.mean(), case.mean[j], se_mean)
        assert abs(x.std() - case.sd[j]) < 3 * se_sd, (j, x.std(), case.sd[j], se_sd)
    _, info = backend.run(tp.MALA(20, 0.6), log_density, burn, return_info=True)
    assert 0.5 < float(np.mean(backend.numpy(info.acceptance_rate))) < 0.99


@pytest.mark.slow
def test_ula_bias_is_the_closed_form_ula_bias_and_shrinks(backend):
    from helpers import make_case

    case = make_case(dim=2, seed=1)
    tp = backend.tp
    log_density = backend.prior(case, normalizer=tp.Unnormalized()).annealed_log_density(1.0)
    n = 4000
    init = backend.array(np.tile(case.mean, (n, 1)))
    lam_min = np.linalg.eigvalsh(case.precision).min()
    bias = []
    for h in (0.9, 0.45, 0.15):
        steps = int(8 / (0.5 * h * h * lam_min)) + 1  # mixing time of the slowest mode, times 8
        z = backend.numpy(backend.run(tp.ShortRunLangevin(steps, h), log_density, init)).astype(np.float64)
        var = z.var(0)
        se = np.sqrt(((z - z.mean(0)) ** 2).var(0) / n)
        ula_var = np.diag(case.ula_cov(h))
        assert np.all(np.abs(var - ula_var) < 4 * se), (h, var, ula_var, se)  # exactly ULA's O(h^2) bias
        assert np.all(np.abs(z.mean(0) - case.mean) < 4 * np.sqrt(var / n))  # the mean is unbiased
        bias.append((np.abs(var - np.diag(case.cov)).max(), se.max()))
    assert bias[0][0] > 5 * bias[0][1]  # at h = 0.9 the bias is plainly visible
    assert bias[0][0] > bias[1][0] > bias[2][0]
    assert bias[2][0] < 4 * bias[2][1]  # and at h = 0.15 it is within the noise


def test_langevin_without_noise_finds_the_mode(backend, quadratic_case):
    case, tp = quadratic_case, backend.tp
    log_density = backend.prior(case, normalizer=tp.Unnormalized()).annealed_log_density(1.0)
    z = backend.run(tp.ShortRunLangevin(400, 0.5, noise=False), log_density, backend.array(np.zeros((3, case.dim))))
    np.testing.assert_allclose(backend.numpy(z), np.tile(case.mean, (3, 1)), atol=1e-4)


def test_persistent_continues_from_the_stored_state(backend, quadratic_case):
    case, tp = quadratic_case, backend.tp
    log_density = backend.prior(case, normalizer=tp.Unnormalized()).annealed_log_density(1.0)
    init = backend.array(np.zeros((4, case.dim)))
    persistent = tp.Persistent(tp.ShortRunLangevin(5, 0.3, noise=False))
    backend.run(persistent, log_density, init)
    twice = backend.run(persistent, log_density, init)
    once = backend.run(tp.ShortRunLangevin(10, 0.3, noise=False), log_density, init)
    np.testing.assert_allclose(backend.numpy(twice), backend.numpy(once), rtol=1e-5, atol=1e-6)
    persistent.reset()
    again = backend.run(persistent, log_density, init)
    five = backend.run(tp.ShortRunLangevin(5, 0.3, noise=False), log_density, init)
    np.testing.assert_allclose(backend.numpy(again), backend.numpy(five), rtol=1e-5, atol=1e-6)


def test_output_has_the_shape_of_init(backend, quadratic_case):
    case, tp = quadratic_case, backend.tp
    log_density = backend.prior(case, normalizer=tp.Unnormalized()).annealed_log_density(1.0)
    for sampler in (tp.ShortRunLangevin(3, 0.1), tp.MALA(3, 0.1)):
        for shape in [(case.dim,), (5, case.dim), (2, 3, case.dim)]:
            assert backend.run(sampler, log_density, backend.array(np.zeros(shape))).shape == shape


def test_divergence_names_the_step_and_the_remedy(backend):
    tp = backend.tp
    quartic = (lambda z: -(z ** 4).sum(-1))
    init = backend.array(np.full((8, 2), 1.0))
    with pytest.raises(ChainDivergenceError, match=r"step [1-9]\d*.*smaller step size") as err:
        backend.run(tp.ShortRunLangevin(200, 2.0), quartic, init)
    assert 1 <= err.value.step < 200
    with pytest.raises(ChainDivergenceError, match="initial state"):
        backend.run(tp.ShortRunLangevin(5, 0.1), quartic, backend.array(np.full((8, 2), np.nan)))


@pytest.mark.parametrize("bad", [0.0, -0.1, math.inf, math.nan, "0.1"])
def test_bad_step_size_is_rejected(backend, bad):
    for cls in (backend.tp.ShortRunLangevin, backend.tp.MALA):
        with pytest.raises(ValueError, match="step_size"):
            cls(10, bad)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_steps_is_rejected(backend, bad):
    with pytest.raises(ValueError, match="steps"):
        backend.tp.ShortRunLangevin(bad, 0.1)


def test_log_density_of_the_wrong_shape_is_rejected(backend):
    with pytest.raises(ValueError, match=r"\(\.\.\., d\) to \(\.\.\.\)"):
        backend.run(backend.tp.MALA(2, 0.1), lambda z: -(z ** 2), backend.array(np.zeros((4, 2))))
