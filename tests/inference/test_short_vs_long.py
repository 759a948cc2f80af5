"""short_vs_long with the library's own samplers, both backends (the numpy protocol is in test_diagnostics.py)."""
import numpy as np
import pytest

from helpers import make_case
from tilted_priors.inference.diagnostics import short_vs_long


def gaussian_log_density(backend, case):
    """The quadratic reference case's tilted prior, unnormalised: a Gaussian with known moments."""
    energy = backend.quadratic_energy(case)
    loc, scale = backend.array(case.loc), backend.array(case.scale)
    return lambda z: -energy(z) - 0.5 * (((z - loc) / scale) ** 2).sum(-1)


def bimodal_log_density(backend):
    """Equal mixture of N(+-2 e1, 0.5^2 I) in 2-D, unnormalised."""
    centres = backend.array([[-2.0, 0.0], [2.0, 0.0]])
    if backend.name == "pyro":
        logsumexp = lambda a: a.logsumexp(-1)  # noqa: E731
    else:
        import jax

        logsumexp = lambda a: jax.nn.logsumexp(a, -1)  # noqa: E731
    return lambda z: logsumexp(-((z[..., None, :] - centres) ** 2).sum(-1) / 0.5)


def test_converged_short_chains_do_not_differ(backend):
    case = make_case(dim=2, seed=3)
    starts = np.random.default_rng(0).normal(size=(50, 2))
    r = short_vs_long(backend.tp.MALA(200, 0.7), backend.tp.MALA(1000, 0.7), gaussian_log_density(backend, case),
                      starts, num_draws=10, seed=1)
    assert not r.differs
    assert np.all(r.rhat_long < 1.05)
    final = r.long[:, -1]
    assert np.all(np.abs(final.mean(0) - case.mean) < 4 * case.sd / np.sqrt(len(final)))  # chains forgot starts
    # the Stein discrepancy judges both runs against the target itself: neither rejected, and the path falls
    assert not r.ksd_short.reject and not r.ksd_long.reject
    assert r.ksd_short_path.shape == r.short_steps.shape and r.ksd_short_path[-1] < 0.5 * r.ksd_short_path[0]
    assert "Kernel Stein discrepancy" in r.to_markdown()


def test_ten_step_chains_on_a_bimodal_energy_differ(backend):
    starts = np.random.default_rng(1).normal(size=(50, 2))
    r = short_vs_long(backend.tp.ShortRunLangevin(10, 0.1), backend.tp.MALA(600, 0.5), bimodal_log_density(backend),
                      starts, num_draws=10, seed=2)
    assert r.differs
    assert r.rhat_between[0] > 1.1
    assert np.all(r.nested_rhat_short > r.nested_rhat_baseline + 0.3)
    assert r.short_steps.tolist() == list(range(11)) and r.long_steps[-1] == 600
    assert r.ksd_short.reject and r.ksd_short.ksd > 2 * r.ksd_long.ksd  # no reference run needed to see it


def test_samplers_of_two_backends_or_persistent_are_refused(backend):
    other = __import__("tilted_priors.numpyro" if backend.name == "pyro" else "tilted_priors.pyro",
                       fromlist=["MALA"])
    with pytest.raises(TypeError, match="one backend"):
        short_vs_long(backend.tp.MALA(5, 0.1), other.MALA(5, 0.1), None, np.zeros((4, 2)))
    with pytest.raises(TypeError, match="Persistent"):
        short_vs_long(backend.tp.Persistent(backend.tp.MALA(5, 0.1)), backend.tp.MALA(5, 0.1), None,
                      np.zeros((4, 2)))
