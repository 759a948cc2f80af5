"""``step_size="auto"``: the samplers scale their step size to the target (both backends).

Targets of very different scales (Gaussians of sd 0.05 and 5, tilted priors of base scale 0.01 and 10) get step sizes
in proportion, MALA reaches its target acceptance, ULA's moments match the quadratic case, the distributions' default
sampler gives finite draws under ``Predictive`` and ``init_to_median``, and a diverging chain's error names a step
size within the stability bound it measured.
"""
import math

import numpy as np
import pytest

from tilted_priors import ChainDivergenceError
from tilted_priors._adapt import TARGET_ACCEPT


def _gaussian(backend, sd: float):
    """The log density of N(0, sd^2 I), unnormalised."""
    return lambda z: -0.5 * ((z / sd) ** 2).sum(-1)


@pytest.mark.parametrize("sd", [0.05, 5.0])
def test_mala_auto_reaches_its_target_acceptance_at_any_scale(backend, sd):
    # The same starting points (sd 1) for both targets: 20 times too wide for one, 5 times too narrow for the other.
    # Tolerance: after 200 warm-up steps the Robbins-Monro iterate log h fluctuates by about 0.02 (gain
    # 1/sqrt(200) times the noise of the mean acceptance of 64 chains, 0.08 after normalising), and MALA's
    # acceptance moves by about 1.1 per unit of log h near 0.574 in 10 dimensions: sd about 0.025; the acceptance
    # averaged over the 200 fixed steps of 64 chains adds a standard error under 0.01. 0.08 is 3 of them.
    init = backend.array(np.random.default_rng(1).normal(size=(64, 10)))
    z, info = backend.run(backend.tp.MALA(400, "auto"), _gaussian(backend, sd), init, return_info=True)
    acceptance = float(np.mean(backend.numpy(info.acceptance_rate)))
    assert abs(acceptance - TARGET_ACCEPT["mala"]) < 0.08, acceptance
    # The step size is in the target's units: about 1.65 d^(-1/6) sd = 1.1 sd at MALA's optimum (Roberts-Rosenthal).
    h = float(backend.numpy(info.step_size))
    assert 0.8 * sd < h < 1.5 * sd, h / sd
    var = backend.numpy(z).var(0).mean()
    assert abs(var / sd ** 2 - 1) < 0.15, var / sd ** 2  # 640 draws: the variance's standard error is 0.06


@pytest.mark.parametrize("sd", [0.05, 5.0])
def test_ula_auto_scales_its_step_size_to_the_target(backend, sd):
    init = backend.array(np.random.default_rng(2).normal(size=(64, 10)))
    z, info = backend.run(backend.tp.ShortRunLangevin(60, "auto"), _gaussian(backend, sd), init, return_info=True)
    h = float(backend.numpy(info.step_size))
    assert 0.4 * sd < h <= 0.8 * sd * 1.01, h / sd  # never beyond 0.8 / sqrt(L): 0.4 of ULA's stability bound
    assert np.all(backend.numpy(info.acceptance_rate) == 1.0)  # ULA reports no rejections
    assert np.isfinite(backend.numpy(z)).all()


def test_ula_auto_moments_match_the_quadratic_case(backend, quadratic_case):
    case, tp = quadratic_case, backend.tp
    log_density = backend.prior(case, normalizer=tp.Unnormalized()).annealed_log_density(1.0)
    n = 2000
    init = backend.array(case.loc + case.scale * np.random.default_rng(3).normal(size=(n, case.dim)))
    z, info = backend.run(tp.ShortRunLangevin(300, "auto"), log_density, init, return_info=True)
    z, h = backend.numpy(z).astype(np.float64), float(backend.numpy(info.step_size))
    var, se_var = z.var(0), np.sqrt(((z - z.mean(0)) ** 2).var(0) / n)
    # ULA's mean is exact on a Gaussian, its variance the closed form at the adapted step size (O(h^2) wide).
    assert np.all(np.abs(z.mean(0) - case.mean) < 4 * np.sqrt(var / n)), (z.mean(0), case.mean)
    assert np.all(np.abs(var - np.diag(case.ula_cov(h))) < 4 * se_var), (var, np.diag(case.ula_cov(h)))
    # And the adapted h keeps that bias small: h <= 0.8 / sqrt(L) inflates no direction's variance by more than
    # 1 / (1 - 0.8^2 / 4) - 1 = 0.19 (if the probe finds L), plus 4 standard errors of a variance ratio (0.03 each).
    assert np.all(np.abs(var / case.sd ** 2 - 1) < 0.19 + 4 * np.sqrt(2 / n)), var / case.sd ** 2
    lam_max = np.linalg.eigvalsh(case.precision).max()
    assert 0.3 / math.sqrt(lam_max) < h < 1.0 / math.sqrt(lam_max), h * math.sqrt(lam_max)


def test_auto_samplers_are_immutable_settings(backend):
    tp = backend.tp
    assert repr(tp.MALA(10, "auto", target_accept=0.7)) == "MALA(steps=10, step_size='auto', target_accept=0.7)"
    assert repr(tp.ShortRunLangevin(60, "auto")) == "ShortRunLangevin(steps=60, step_size='auto', noise=True)"
    if backend.name == "numpyro":  # frozen, hashed by settings (jit cache keys)
        assert tp.MALA(10, "auto") == tp.MALA(10, "auto") != tp.MALA(10, "auto", target_accept=0.7)
        assert hash(tp.MALA(10, "auto")) == hash(tp.MALA(10, "auto"))
        with pytest.raises(AttributeError, match="immutable"):
            tp.MALA(10, "auto").step_size = 0.1


@pytest.mark.parametrize("bad, match", [("Auto", "finite positive number or 'auto'"),
                                        (None, "finite positive number or 'auto'"),
                                        (-1.0, "finite positive number or 'auto'")])
def test_bad_step_size_names_auto(backend, bad, match):
    for cls in (backend.tp.ShortRunLangevin, backend.tp.MALA):
        with pytest.raises(ValueError, match=match):
            cls(10, bad)


def test_target_accept_needs_auto_and_noise(backend):
    tp = backend.tp
    with pytest.raises(ValueError, match="only applies to step_size='auto'"):
        tp.MALA(10, 0.1, target_accept=0.6)
    with pytest.raises(ValueError, match="target_accept"):
        tp.MALA(10, "auto", target_accept=1.5)
    with pytest.raises(ValueError, match="noise=False"):
        tp.ShortRunLangevin(10, "auto", noise=False)


# --- the distributions' default sampler under the backends' prior draws ------------------------------------
def _steep_prior(backend, scale: float, energy: str):
    """A tilted prior of base scale ``scale``: a quadratic energy of curvature ~ 1/scale^2 (a Gaussian of sd ~ scale),
    or an EnergyMLP of the standardised latent; default sampler and normalizer."""
    from helpers import make_case

    case = make_case()
    d = case.dim
    loc, sd = backend.array(np.zeros(d)), backend.array(np.full(d, scale))
    if energy == "quadratic":
        fn = backend.quadratic_energy(case, A=backend.array(case.A / scale ** 2), b=backend.array(np.zeros(d)))
    else:
        mlp = backend.tp.EnergyMLP(d, 16, **({} if backend.name == "pyro" else {"rngs": 0}))
        fn = lambda z: mlp(z / scale)  # noqa: E731
    return backend.tp.EnergyTiltedNormal(fn, loc, sd)


def _predictive_and_median(backend, make_prior, median: bool = True):
    """Draws of ``z ~ make_prior()`` by the backend's ``Predictive`` (20) and its ``init_to_median`` (15 prior
    draws; ``None`` unless ``median``); the prior is built inside the model, as models do."""
    if backend.name == "pyro":
        import pyro
        from pyro.infer import Predictive
        from pyro.infer.autoguide.initialization import InitMessenger, init_to_median

        def model():
            pyro.sample("z", make_prior())

        draws = backend.numpy(Predictive(model, num_samples=20)()["z"])
        if not median:
            return draws, None
        trace = pyro.poutine.trace(InitMessenger(init_to_median(num_samples=15))(model)).get_trace()
        return draws, backend.numpy(trace.nodes["z"]["value"])
    import numpyro
    from numpyro.infer import Predictive, init_to_median
    from numpyro.infer.util import initialize_model

    def model():
        numpyro.sample("z", make_prior())

    draws = backend.numpy(Predictive(model, num_samples=20)(backend.key())["z"])
    if not median:
        return draws, None
    info = initialize_model(backend.key(), model, init_strategy=init_to_median(num_samples=15))
    return draws, backend.numpy(info.param_info.z["z"])


@pytest.mark.parametrize("energy", ["quadratic", "mlp"])
@pytest.mark.parametrize("scale", [0.01, 10.0])
def test_default_prior_sampler_gives_finite_draws_under_predictive_and_init_to_median(backend, scale, energy):
    prior = _steep_prior(backend, scale, energy)
    assert repr(prior.sampler) == repr(backend.tp.ShortRunLangevin(60, "auto"))
    # Unnormalized: the potential that init_to_median's initialisation evaluates needs no negative samples (the
    # default Contrastive would run the same traced chain as Predictive once more, compiling for seconds).
    make_prior = lambda: prior.__class__(prior.energy, prior.loc, prior.scale,  # noqa: E731
                                         normalizer=backend.tp.Unnormalized())
    # (init_to_median on the quadratic energies only: on NumPyro each case compiles the chain for seconds.)
    draws, median = _predictive_and_median(backend, make_prior, median=energy == "quadratic")
    assert draws.shape == (20, 3) and np.isfinite(draws).all()
    # On the prior's own scale: the tilted densities here have sd of the order of the base scale.
    assert np.abs(draws).max() < 10 * scale, np.abs(draws).max() / scale
    assert draws.std() > 0.05 * scale  # and the chains moved
    if median is not None:
        assert np.isfinite(median).all() and np.abs(median).max() < 5 * scale, median / scale


def test_old_fixed_default_diverges_where_auto_does_not(backend):
    """The motivating case: LEBM's 0.4 on a prior of base scale 0.01 diverges (stability bound 2 sd)."""
    prior = _steep_prior(backend, 0.01, "quadratic")
    fixed = prior.__class__(prior.energy, prior.loc, prior.scale, sampler=backend.tp.ShortRunLangevin(60, 0.4))
    with pytest.raises(ChainDivergenceError, match="the sampler of the prior EnergyTiltedNormal"):
        backend.sample(fixed, (16,))
    assert np.isfinite(backend.numpy(backend.sample(prior, (16,)))).all()


# --- the divergence message ---------------------------------------------------------------------------------
def test_divergence_message_names_a_stable_step_size(backend):
    sd = 0.01  # curvature L = 1e4: ULA is stable for h < 2 / sqrt(L) = 0.02
    log_density = _gaussian(backend, sd)
    init = backend.array(np.ones((8, 2)))
    with pytest.raises(ChainDivergenceError, match=r"smaller step size than 0\.1.*L = 1e\+04.*< 2/sqrt\(L\) = "
                                                   r"0\.02.*try step_size=0\.01") as err:
        backend.run(backend.tp.ShortRunLangevin(100, 0.1), log_density, init)
    suggested = err.value.suggested_step_size
    assert err.value.lipschitz == pytest.approx(1e4, rel=1e-3) and suggested < 2 * sd
    z = backend.run(backend.tp.ShortRunLangevin(100, suggested), log_density, init)  # stable: it converges
    assert np.isfinite(backend.numpy(z)).all() and backend.numpy(z).std() < 3 * sd


def test_divergence_error_pickles_with_its_context():
    import pickle

    err = ChainDivergenceError("MALA", 3, 0.5, 2, lipschitz=100.0).add_context(label="the prior")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.label == "the prior" and back.suggested_step_size == 0.1
