"""tilted_priors.inference.diagnostics against known answers, independent computations and ArviZ itself.

Backend-free: this file needs numpy, scipy and ArviZ only, and ``make test`` runs it twice — under the project's
Python with ArviZ 0.2x and in a light Python >= 3.12 environment with ArviZ 1.x.
"""
from __future__ import annotations

import numpy as np
import pytest

from tilted_priors.inference.diagnostics import (compare_chains, energy_distance, ess, mcse, nested_rhat, rhat, short_vs_long,
                                   summary, to_inference_data)
from tilted_priors.inference.diagnostics._arviz import arviz_major, arviz_module

az = arviz_module()


def autocorrelated(shape, rho=0.7, seed=0) -> np.ndarray:
    """AR(1) chains ``(chain, draw, d)`` with unit marginal variance, plus ties (rounded stretches)."""
    rng = np.random.default_rng(seed)
    x = np.empty(shape)
    x[:, 0] = rng.normal(size=(shape[0],) + shape[2:])
    for t in range(1, shape[1]):
        x[:, t] = rho * x[:, t - 1] + np.sqrt(1 - rho ** 2) * rng.normal(size=(shape[0],) + shape[2:])
    x[:, 10:30, 0] = np.round(x[:, 10:30, 0], 1)  # ties, as repeated states of rejected MALA proposals give
    return x


# --- known answers ----------------------------------------------------------------------------------------
def test_iid_draws_have_rhat_one_and_ess_near_the_draw_count():
    x = np.random.default_rng(1).normal(size=(4, 1000, 3))
    assert np.all((rhat(x) >= 0.99) & (rhat(x) <= 1.01))
    for method in ("bulk", "tail", "mean"):
        assert np.all(np.abs(ess(x, method) / 4000 - 1) < 0.15), method
    s = summary(x)
    assert np.all(np.abs(s.mean) < 4 * s.mcse_mean)  # the true mean is 0
    assert np.all(np.abs(s.sd - 1) < 4 * s.mcse_sd)


def test_chains_stuck_in_separated_modes_have_large_rhat():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 500, 2)) * 0.5
    x[:2] += 3.0  # two chains in each of two modes
    x[2:] -= 3.0
    assert np.all(rhat(x) > 1.2)
    assert np.all(summary(x).rhat > 1.2)


def test_autocorrelation_lowers_ess_as_ar1_theory_says():
    """An AR(1) chain with coefficient rho has ESS/N = (1 - rho) / (1 + rho)."""
    rho = 0.6
    x = autocorrelated((8, 2000, 2), rho=rho, seed=3)[:, :, 1:]
    ratio = float(ess(x, "mean")[0]) / x[..., 0].size
    assert abs(ratio / ((1 - rho) / (1 + rho)) - 1) < 0.15


# --- the same numbers as ArviZ ----------------------------------------------------------------------------
def _arviz_per_dim(fn, x, **kwargs) -> np.ndarray:
    return np.array([float(np.asarray(fn(x[..., j], **kwargs))) for j in range(x.shape[-1])])


def test_rhat_ess_mcse_equal_arviz():
    x = autocorrelated((6, 101, 3), seed=4)  # odd draw count: split chains drop the middle draw
    tail = {"prob": 0.95} if arviz_major() >= 1 else {}
    s = summary(x)
    checks = [
        (rhat(x), _arviz_per_dim(az.rhat, x), s.rhat),
        (ess(x), _arviz_per_dim(az.ess, x), s.ess_bulk),
        (ess(x, "tail"), _arviz_per_dim(az.ess, x, method="tail", **tail), s.ess_tail),
        (ess(x, "mean"), _arviz_per_dim(az.ess, x, method="mean"), None),
        (ess(x, "sd"), _arviz_per_dim(az.ess, x, method="sd"), None),
        (mcse(x), _arviz_per_dim(az.mcse, x), s.mcse_mean),
        (mcse(x, "sd"), _arviz_per_dim(az.mcse, x, method="sd"), s.mcse_sd),
    ]
    for ours, theirs, from_summary in checks:
        np.testing.assert_allclose(ours, theirs, rtol=1e-10)
        if from_summary is not None:
            np.testing.assert_allclose(from_summary, theirs, rtol=1e-10)


def test_constant_dimension_has_full_ess():
    x = np.random.default_rng(5).normal(size=(2, 50, 2))
    x[..., 1] = 1.0
    assert ess(x, "mean")[1] == 100


# --- nested R-hat -----------------------------------------------------------------------------------------
def nested_rhat_by_the_paper(x: np.ndarray, ids: np.ndarray) -> float:
    """Margossian et al. (2022), eq. 4-8, written out with loops over one scalar quantity x (chain, draw)."""
    groups = sorted(set(ids.tolist()))
    K, N = len(groups), x.shape[1]
    super_means, within = [], []
    for k in groups:
        chains = x[ids == k]
        M = chains.shape[0]
        means = [c.mean() for c in chains]
        sm = sum(means) / M
        super_means.append(sm)
        b = sum((m - sm) ** 2 for m in means) / (M - 1) if M > 1 else 0.0
        w = sum(sum((v - m) ** 2 for v in c) / (N - 1) for c, m in zip(chains, means)) / M if N > 1 else 0.0
        within.append(b + w)
    grand = sum(super_means) / K
    B = sum((s - grand) ** 2 for s in super_means) / (K - 1)
    W = sum(within) / K
    return float(np.sqrt(1 + B / W))


@pytest.mark.parametrize("num_super,per,draws", [(10, 4, 1), (10, 4, 6), (6, 1, 8), (5, 3, 2)])
def test_nested_rhat_equals_the_published_formula(num_super, per, draws):
    rng = np.random.default_rng(num_super * 100 + per * 10 + draws)
    starts = rng.normal(scale=2.0, size=(num_super, 1, 1, 2))  # super-chains start apart and have not mixed
    x = (starts + rng.normal(size=(num_super, per, draws, 2))).reshape(num_super * per, draws, 2)
    ids = np.repeat(np.arange(num_super), per)
    perm = rng.permutation(len(ids))  # ids need not be sorted
    x, ids = x[perm], ids[perm]
    expected = [nested_rhat_by_the_paper(x[..., j], ids) for j in range(2)]
    np.testing.assert_allclose(nested_rhat(x, ids), expected, rtol=1e-10)
    assert np.all(nested_rhat(x, ids) > 1.2)


def test_nested_rhat_of_mixed_chains_is_its_stationary_value():
    """Independent draws: B ~ sigma^2 / (M N), W ~ sigma^2 (1 / N + 1), so nR-hat ~ sqrt(1 + 1 / (M (N + 1)))."""
    x = np.random.default_rng(7).normal(size=(2000, 2, 3))
    expected = np.sqrt(1 + 1 / (4 * 3))
    assert np.all(np.abs(nested_rhat(x, np.repeat(np.arange(500), 4)) - expected) < 0.01)


def test_nested_rhat_rejects_unequal_super_chains():
    x = np.zeros((5, 3, 1)) + np.arange(15.0).reshape(5, 3, 1)
    with pytest.raises(ValueError, match="same number of chains"):
        nested_rhat(x, [0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="one id per chain"):
        nested_rhat(x, [0, 1])


# --- bad input ----------------------------------------------------------------------------------------------
def test_non_finite_draws_are_refused_with_the_chain_named():
    x = np.random.default_rng(8).normal(size=(3, 20, 2))
    x[1, 7, 0] = np.nan
    for fn in (rhat, ess, mcse, summary, to_inference_data):
        with pytest.raises(ValueError, match="chain 1"):
            fn(x)


def test_wrong_shapes_and_methods_are_refused():
    with pytest.raises(ValueError, match="shape"):
        rhat(np.zeros(10))
    with pytest.raises(ValueError, match="at least"):
        ess(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="method"):
        rhat(np.zeros((2, 10)), method="bulk")
    with pytest.raises(ValueError, match="prob"):
        ess(np.ones((2, 10)), "tail", prob=0.7)


# --- ArviZ data -------------------------------------------------------------------------------------------
def test_to_inference_data_from_arrays_and_dicts():
    x = autocorrelated((4, 60, 3), seed=9)
    data = to_inference_data(x, sample_stats={"lp": -np.ones((4, 60))})
    assert dict(data.posterior.sizes) == {"chain": 4, "draw": 60, "latent": 3}
    assert data.posterior["z"].dims == ("chain", "draw", "latent")
    assert "lp" in data.sample_stats
    np.testing.assert_allclose(np.asarray(az.rhat(data)["z"]), rhat(x), rtol=1e-10)
    two = to_inference_data({"z": x, "tau": x[..., 0]})
    assert two.posterior["z"].dims == ("chain", "draw", "latent") and two.posterior["tau"].dims == ("chain", "draw")
    with pytest.raises(ValueError, match="same"):
        to_inference_data({"a": x, "b": x[:2]})
    with pytest.raises(ValueError, match="sample_stats"):
        to_inference_data(x, sample_stats={"lp": np.ones(3)})
    if arviz_major() >= 1:
        import xarray

        assert isinstance(data, xarray.DataTree)
    else:
        assert isinstance(data, az.InferenceData)


# --- two-sample distance and the short-vs-long report --------------------------------------------------------
def test_energy_distance_matches_scipy_in_one_dimension():
    from scipy.stats import energy_distance as scipy_energy

    rng = np.random.default_rng(10)
    a, b = rng.normal(size=150), rng.normal(0.3, 1.2, size=120)
    ours = energy_distance(a[:, None], b[:, None], num_permutations=10)
    assert ours.statistic == pytest.approx(scipy_energy(a, b) ** 2, rel=1e-10)  # scipy gives the square root
    alone = energy_distance(a[:, None], b[:, None], num_permutations=0)  # the statistic without a test
    assert alone.statistic == ours.statistic and np.isnan(alone.p_value) and alone.num_permutations == 0
    with pytest.raises(ValueError, match="non-negative integer"):
        energy_distance(a[:, None], b[:, None], num_permutations=-1)


def test_energy_distance_p_value_is_calibrated():
    """Under the null the permutation p-value is uniform: about alpha of the repeats fall below alpha."""
    rng = np.random.default_rng(11)
    p = [energy_distance(rng.normal(size=(30, 2)), rng.normal(size=(30, 2)), num_permutations=99, seed=i).p_value
         for i in range(60)]
    assert 0.04 < np.mean(np.array(p) < 0.3) / 0.3 * 0.3 < 0.6  # about 30% below 0.3 (binomial sd ~ 6%)


CENTRES = np.array([[-2.5, 0.0], [2.5, 0.0]])


def bimodal_log_density(z: np.ndarray) -> np.ndarray:
    """Equal mixture of N(+-2.5 e1, 0.5^2 I), unnormalised."""
    sq = ((z[..., None, :] - CENTRES) ** 2).sum(-1) / (2 * 0.25)
    return np.logaddexp(-sq[..., 0], -sq[..., 1])


def bimodal_grad(z: np.ndarray) -> np.ndarray:
    sq = ((z[..., None, :] - CENTRES) ** 2).sum(-1) / (2 * 0.25)
    w = np.exp(-sq - np.logaddexp(-sq[..., :1], -sq[..., 1:]))  # responsibilities
    return -((z[..., None, :] - CENTRES) * w[..., None]).sum(-2) / 0.25


class ExactBimodal:
    """An exact sampler for the bimodal target: i.i.d. draws whatever the start (numpy sampler protocol)."""

    def __init__(self, steps=1, seed=0):
        self.steps, self.rng = steps, np.random.default_rng(seed)

    def run(self, log_density, init):
        n = init.shape[0]
        return CENTRES[self.rng.integers(0, 2, n)] + 0.5 * self.rng.normal(size=(n, 2))


class NumpyULA:
    """Unadjusted Langevin on the bimodal target, with its gradient given (numpy sampler protocol)."""

    def __init__(self, steps, step_size, seed=0):
        self.steps, self.step_size, self.rng = steps, step_size, np.random.default_rng(seed)

    def run(self, log_density, init):
        z, h = init.copy(), self.step_size
        for _ in range(self.steps):
            z = z + 0.5 * h * h * bimodal_grad(z) + h * self.rng.normal(size=z.shape)
        return z


def test_short_vs_long_finds_no_difference_between_exact_samplers():
    starts = np.random.default_rng(12).normal(size=(100, 2))
    r = short_vs_long(ExactBimodal(10, seed=1), ExactBimodal(1000, seed=2), bimodal_log_density, starts)
    assert not r.differs
    assert r.distance.p_value > 0.05
    assert r.nested_rhat_baseline == pytest.approx(np.sqrt(1.25))  # 4 chains per start
    assert np.all(np.abs(r.nested_rhat_short - r.nested_rhat_baseline) < 0.05)
    assert np.all(r.rhat_between < 1.05)
    assert all(abs(row["z"]) < 3.5 for row in r.table())


def test_short_vs_long_flags_a_ten_step_chain_on_a_bimodal_energy():
    starts = np.random.default_rng(13).normal(size=(100, 2))
    r = short_vs_long(NumpyULA(10, 0.1, seed=1), ExactBimodal(1000, seed=2), bimodal_log_density, starts)
    assert r.differs and r.distance.p_value < 0.01
    assert r.rhat_between[0] > 1.1  # the first coordinate carries the modes
    assert np.all(r.nested_rhat_short > r.nested_rhat_baseline + 0.5)  # ten small steps remember the start
    energy = r.table()[-1]
    assert energy["quantity"] == "energy" and energy["z"] > 5  # short-run states sit on the barrier
    md = r.to_markdown()
    assert "**differ**" in md and "| latent 0 |" in md


def test_short_vs_long_writes_its_plots(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from tilted_priors.inference.diagnostics import plots

    traced, plot_trace = [], plots.plot_trace
    monkeypatch.setattr(plots, "plot_trace", lambda chains, path: traced.append(chains) or plot_trace(chains, path))
    starts = np.random.default_rng(14).normal(size=(20, 2))
    r = short_vs_long(NumpyULA(10, 0.1), NumpyULA(50, 0.01), bimodal_log_density, starts, num_draws=10,
                      out=tmp_path, chains_per_start=3)
    # the trace shows 8 chains from 8 different starts, first and last included (tiny steps: near their starts)
    np.testing.assert_allclose(traced[0][:, 0], starts[[0, 3, 5, 8, 11, 14, 16, 19]], atol=0.3)
    assert [p.name for p in r.figures] == ["short_vs_long_energy.png", "short_vs_long_marginals.png",
                                           "short_vs_long_rank.png", "short_vs_long_trace.png"]
    assert all(p.stat().st_size > 1000 for p in r.figures)


def test_compare_chains_validates_its_input():
    with pytest.raises(ValueError, match="same chains"):
        compare_chains(np.zeros((10, 3, 2)), np.zeros((8, 3, 2)))
    with pytest.raises(ValueError, match="at least 4"):
        compare_chains(np.zeros((3, 3, 2)), np.zeros((3, 3, 2)))
    with pytest.raises(ValueError, match="alpha"):
        compare_chains(np.zeros((4, 3, 2)), np.zeros((4, 3, 2)), alpha=1.5)
    with pytest.raises(ValueError, match="num_permutations"):  # its verdict needs the permutation test
        compare_chains(np.zeros((4, 3, 2)), np.zeros((4, 3, 2)), num_permutations=0)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        short_vs_long(ExactBimodal(), ExactBimodal(), bimodal_log_density, np.zeros(5))
