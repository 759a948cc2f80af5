"""Each normalizer against the closed-form log Z of the quadratic case, on both backends."""
import numpy as np
import pytest

from helpers import make_case


def test_importance_log_z_within_its_reported_error(backend, quadratic_case):
    est = backend.estimate(backend.tp.Importance(20000), backend.prior(quadratic_case))
    log_z, se = float(est.log_z), float(est.stderr)
    assert 0 < se < 0.05
    assert abs(log_z - quadratic_case.log_z) < 3 * se, (log_z, quadratic_case.log_z, se)


def test_annealed_importance_log_z_within_its_reported_error(backend, quadratic_case):
    tp = backend.tp
    est = backend.estimate(tp.AnnealedImportance(400, 40, kernel=tp.MALA(2, 0.6)), backend.prior(quadratic_case))
    log_z, se = float(est.log_z), float(est.stderr)
    assert 0 < se < 0.05
    assert abs(log_z - quadratic_case.log_z) < 3 * se, (log_z, quadratic_case.log_z, se)
    assert float(est.ess) > 100  # annealing keeps the weights even


def test_annealed_importance_is_batched(backend):
    cases = [make_case(dim=2, seed=s) for s in (4, 5)]
    tp = backend.tp
    prior = tp.EnergyTiltedNormal(backend.quadratic_energy(cases[0]), backend.array([c.loc for c in cases]),
                                  backend.array([c.scale for c in cases]))
    est = backend.estimate(tp.AnnealedImportance(300, 30, kernel=tp.MALA(2, 0.6)), prior)
    assert est.log_z.shape == (2,)
    for i, c in enumerate(cases):
        exact = make_case_like(c, cases[0])
        assert abs(float(est.log_z[i]) - exact) < 4 * float(est.stderr[i])


def make_case_like(base_case, energy_case):
    """log Z of energy_case's energy tilting base_case's base."""
    from helpers import QuadraticCase

    return QuadraticCase(energy_case.A, energy_case.b, base_case.loc, base_case.scale).log_z


def test_importance_term_is_what_log_prob_subtracts(backend, quadratic_case):
    tp = backend.tp
    prior = backend.prior(quadratic_case, normalizer=tp.Importance(5000))
    z = backend.array(np.zeros((1, quadratic_case.dim)))
    unnormalised = backend.prior(quadratic_case, normalizer=tp.Unnormalized()).log_prob(z)
    term = backend.numpy(backend.log_normalizer(prior))  # computed once, then cached for log_prob
    assert abs(float(term) - quadratic_case.log_z) < 0.1
    np.testing.assert_allclose(backend.numpy(prior.log_prob(z)), backend.numpy(unnormalised) - term, rtol=1e-6)


def _optimise_b_pyro(backend, case, steps):
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    prior = lambda: backend.prior(case, normalizer=backend.tp.SelfNormalized(2000, name="b"))
    model = lambda: pyro.factor("snl", -prior().log_normalizer())
    svi = SVI(model, lambda: None, pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.997}), Trace_ELBO())
    for _ in range(steps):
        svi.step()
    return float(pyro.param("b").detach())


def _optimise_b_numpyro(backend, case, steps):
    import numpyro
    import optax
    from numpyro.infer import SVI, Trace_ELBO

    prior = lambda: backend.prior(case, normalizer=backend.tp.SelfNormalized(2000, name="b"))
    model = lambda: numpyro.factor("snl", -prior().log_normalizer())
    optim = optax.adam(optax.exponential_decay(0.05, 1, 0.997))
    result = SVI(model, lambda: None, optim, Trace_ELBO()).run(backend.key(), steps, progress_bar=False)
    return float(result.params["b"])


def test_self_normalized_b_converges_to_log_z(backend, quadratic_case):
    optimise = {"pyro": _optimise_b_pyro, "numpyro": _optimise_b_numpyro}[backend.name]
    b = optimise(backend, quadratic_case, 600)
    assert abs(b - quadratic_case.log_z) < 0.03, (b, quadratic_case.log_z)


def test_self_normalized_is_an_upper_bound_on_log_z(backend, quadratic_case):
    """term(b) = b + exp(-b) Zhat - 1 >= log Z in expectation, for every b, with equality at b = log Z."""
    tp = backend.tp
    for offset in (-1.0, 0.0, 1.0):
        b = quadratic_case.log_z + offset
        prior = backend.prior(quadratic_case, normalizer=tp.SelfNormalized(50000, init=b, name=f"b{offset}"))
        term = float(backend.numpy(backend.log_normalizer(prior)))
        expected = b + np.exp(quadratic_case.log_z - b) - 1
        assert abs(term - expected) < 0.05 * max(1.0, np.exp(quadratic_case.log_z - b))
        assert term >= quadratic_case.log_z - 0.02


# --- the learning signal ------------------------------------------------------------------------------
class ExactSampler:
    """Draws exactly from the tilted Gaussian of the current parameters (ignores the start)."""

    def __init__(self, backend, case, A, b):
        self.backend, self.case, self.A, self.b = backend, case, A, b

    def _moments(self):
        A, b = self.backend.numpy(self.A).astype(np.float64), self.backend.numpy(self.b).astype(np.float64)
        c = make_exact(self.case, A, b)
        return c.mean, np.linalg.cholesky(c.cov)

    def run(self, *args, **kwargs):
        init = args[-1]
        mean, L = self._moments()
        eps = np.random.default_rng(7).normal(size=init.shape)
        return self.backend.array(mean + eps @ L.T)

    def __hash__(self):
        return id(self)


def make_exact(case, A, b):
    from helpers import QuadraticCase

    return QuadraticCase(A, b, case.loc, case.scale)


def _grad_mean_log_prob(backend, case, data, normalizer_factory):
    """Gradient of mean_i log p(x_i) w.r.t. the energy's (A, b), through the library's log_prob."""
    if backend.name == "pyro":
        A = backend.array(case.A).requires_grad_(True)
        b = backend.array(case.b).requires_grad_(True)
        prior = backend.tp.EnergyTiltedNormal(backend.quadratic_energy(case, A, b), backend.array(case.loc),
                                              backend.array(case.scale),
                                              normalizer=normalizer_factory(ExactSampler(backend, case, A, b)))
        prior.log_prob(backend.array(data)).mean().backward()
        return A.grad.numpy(), b.grad.numpy()
    import jax

    def objective(params):
        A, b = params
        sampler = ExactSampler(backend, case, jax.lax.stop_gradient(A), jax.lax.stop_gradient(b))
        prior = backend.tp.EnergyTiltedNormal(backend.quadratic_energy(case, A, b), backend.array(case.loc),
                                              backend.array(case.scale), normalizer=normalizer_factory(sampler),
                                              rng_key=backend.key())
        return prior.log_prob(backend.array(data)).mean()

    gA, gb = jax.grad(objective)((backend.array(case.A), backend.array(case.b)))
    return np.asarray(gA), np.asarray(gb)



@pytest.mark.parametrize("num_samples", [20000])
def test_contrastive_gives_the_maximum_likelihood_gradient(backend, num_samples):
    """With an exact sampler, Contrastive's gradient is the MLE gradient within MC error; Unnormalized's is not."""
    case = make_case(dim=2, seed=2)
    data = np.random.default_rng(3).normal(size=(500, 2)) + 1.0  # data away from the model: a large gradient
    tp = backend.tp
    # exact: d/db [mean(-E(x)) - log Z] = -mean(x) + m;  d/dA = -mean(x x^T)/2 + (S + m m^T)/2
    m, S = case.mean, case.cov
    exact_b = -data.mean(0) + m
    exact_A = -0.5 * (data.T @ data) / len(data) + 0.5 * (S + np.outer(m, m))
    # MC standard errors of the prior-sample averages, from the exact law
    se_b = np.sqrt(np.diag(S) / num_samples)
    z = np.random.default_rng(4).multivariate_normal(m, S, size=100000)
    se_A = 0.5 * np.einsum("ni,nj->nij", z, z).std(0) / np.sqrt(num_samples)

    gA, gb = _grad_mean_log_prob(backend, case, data, lambda s: tp.Contrastive(sampler=s, num_samples=num_samples))
    assert np.all(np.abs(gb - exact_b) < 4 * se_b), (gb, exact_b, se_b)
    # A enters symmetrically: compare the symmetrised gradient
    gA = 0.5 * (gA + gA.T)
    assert np.all(np.abs(gA - exact_A) < 4 * se_A + 1e-5), (gA, exact_A, se_A)

    # without the normalizer the gradient misses E_p[grad E] = (m, (S + m m^T)/2): far outside the error
    gA_u, gb_u = _grad_mean_log_prob(backend, case, data, lambda s: tp.Unnormalized())
    assert np.abs(gb_u - exact_b).max() > 20 * se_b.max()
    np.testing.assert_allclose(gb_u, -data.mean(0), rtol=1e-5)


def test_contrastive_value_is_zero(backend, quadratic_case):
    prior = backend.prior(quadratic_case, normalizer=backend.tp.Contrastive(num_samples=8))
    assert float(backend.numpy(backend.log_normalizer(prior))) == 0.0


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_sample_counts_are_rejected(backend, bad):
    tp = backend.tp
    for make in (lambda: tp.Importance(bad), lambda: tp.SelfNormalized(bad), lambda: tp.AnnealedImportance(bad, 10),
                 lambda: tp.AnnealedImportance(10, bad), lambda: tp.Contrastive(num_samples=bad)):
        with pytest.raises(ValueError, match="positive integer"):
            make()
