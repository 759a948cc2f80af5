"""tilted_priors.models.pyro.ntebm: the NT-EBM's densities, flow fit, energy fit, sampling and input checks (small and fast)."""
import math
from unittest import mock

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from tilted_priors.models.data import toy_mixture
from tilted_priors.models.pyro import ntebm
from tilted_priors.pyro import MALA


@pytest.fixture
def model():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    return ntebm.build(2, flow_layers=2, flow_hidden=16, energy_hidden=16, seed=0)


def test_model_log_density_is_tilted_flow(model):
    x = torch.as_tensor(toy_mixture(7, "ring", seed=1), dtype=torch.float32)
    with torch.no_grad():
        tr = poutine.trace(model.model).get_trace(x)
        lp = tr.nodes["x"]["fn"].log_prob(x)
        expected = -model.energy(x) + model.flow_dist().log_prob(x)
    assert tr.nodes["x"]["is_observed"]
    torch.testing.assert_close(lp, expected, rtol=1e-5, atol=1e-5)


def test_flow_log_density_is_change_of_variables(model):
    u = torch.randn(6, 2)
    with torch.no_grad():
        x, ladj = u, torch.zeros(6)
        for t in model.transforms:
            y = t(x)
            ladj = ladj + t.log_abs_det_jacobian(x, y).reshape(6, -1).sum(-1)
            x = y
        log_n = -0.5 * (u ** 2).sum(-1) - math.log(2 * math.pi)
        torch.testing.assert_close(model.flow_dist().log_prob(x), log_n - ladj, rtol=1e-4, atol=1e-4)


def test_fit_flow_lowers_ring_nll(model):
    data = toy_mixture(1024, "ring", seed=0)
    hist = ntebm.fit_flow(model, data, steps=40, batch_size=256, lr=1e-2)
    assert np.mean(hist[-5:]) < np.mean(hist[:5]) - 0.2


def test_cosine_schedule_is_numpyros(model):
    """``schedule="cosine"``: the rates optax gives NumPyro's fit_flow (warm-up, cosine decay to lr / 100)."""
    import optax

    steps, lr = 60, 1e-2
    expected = optax.warmup_cosine_decay_schedule(0.0, lr, 3, steps, lr / 100)
    rates = []
    with mock.patch.object(torch.optim.Adam, "step", lambda self, *a, **k: rates.append(self.param_groups[0]["lr"])):
        ntebm.fit_flow(model, toy_mixture(256, "ring", seed=0), steps=steps, lr=lr, schedule="cosine")
    np.testing.assert_allclose(rates, [float(expected(s)) for s in range(steps)], rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match="schedule"):
        ntebm.fit_flow(model, toy_mixture(16, "ring"), steps=1, schedule="linear")


def test_fit_energy_finite_and_only_energy_moves(model):
    flow_before = [p.detach().clone() for p in model.flow.parameters()]
    hist = ntebm.fit_energy(model, toy_mixture(256, "ring", seed=0), steps=3, chain_steps=5, step_size=0.2,
                            batch_size=32, reg=0.1)
    assert len(hist) == 3 and all(math.isfinite(h) for h in hist)
    assert all(torch.equal(a, b) for a, b in zip(flow_before, model.flow.parameters()))


@pytest.mark.parametrize("space", ["latent", "data"])
def test_sample_shapes(model, space):
    x = ntebm.sample(model, 9, MALA(5, 0.3), space=space)
    assert x.shape == (9, 2) and bool(torch.isfinite(x).all())


def test_latent_log_density_pullback(model):
    u = torch.randn(4, 2)
    with torch.no_grad():
        expected = -model.energy(model.transform()(u)) - 0.5 * (u ** 2).sum(-1)
        torch.testing.assert_close(ntebm.latent_log_density(model)(u), expected)


@pytest.mark.parametrize("bad, match", [(np.zeros((5, 3)), r"shape \(N, 2\)"), (np.zeros(4), r"shape \(N, 2\)"),
                                        (np.array([[0.0, np.nan]]), "non-finite"),
                                        (np.array([[np.inf, 0.0]]), "non-finite")])
def test_bad_data_raises(model, bad, match):
    with pytest.raises(ValueError, match=match):
        ntebm.fit_flow(model, bad, steps=1)
    with pytest.raises(ValueError, match=match):
        ntebm.fit_energy(model, bad, steps=1)
    with pytest.raises(ValueError, match=match):
        model.model(torch.as_tensor(bad))


def test_bad_arguments():
    with pytest.raises(ValueError, match="space"):
        ntebm.sample(ntebm.build(2, flow_layers=1, flow_hidden=4, energy_hidden=4), 2, space="u")
    with pytest.raises(ValueError, match="flow"):
        ntebm.build(2, flow="maf")
    with pytest.raises(ValueError, match="data_dim"):
        ntebm.build(1)


def test_mnist_sized_api():
    pyro.clear_param_store()
    m = ntebm.build(784, flow="affine", flow_layers=1, flow_hidden=8, energy_hidden=8)
    x = torch.rand(3, 784) * 2 - 1
    hist = ntebm.fit_flow(m, x, steps=1)
    assert math.isfinite(hist[0])
    assert ntebm.sample(m, 2, MALA(2, 0.05)).shape == (2, 784)


def test_build_defaults_and_transform_method():
    """flow_layers=None is the flow's default (4 coupling layers); transform() is a method, as on NumPyro."""
    from pyro.distributions.transforms import Permute

    pyro.clear_param_store()
    m = ntebm.build(2, flow_hidden=4, energy_hidden=4)
    assert sum(1 for t in m.transforms if not isinstance(t, Permute)) == ntebm.REFERENCE["flow_layers"] == 4
    u = torch.randn(3, 2)
    with torch.no_grad():
        x = u
        for t in m.transforms:
            x = t(x)
        torch.testing.assert_close(m.transform()(u), x)
        torch.testing.assert_close(m.transform().inv(x), u, rtol=1e-4, atol=1e-4)
