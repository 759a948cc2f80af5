"""Pyro and NumPyro give the same densities for the same parameters (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tilted_priors.numpyro as tn
import tilted_priors.pyro as tt


def _twin_energies(latent_dim=5, hidden=12, depth=2):
    """A torch EnergyMLP and a Flax one holding the same weights (float64)."""
    torch.manual_seed(0)
    e_torch = tt.EnergyMLP(latent_dim, hidden, depth).double()
    e_flax = tn.EnergyMLP(latent_dim, hidden, depth, rngs=1)
    linears = [m for m in e_torch.net if isinstance(m, torch.nn.Linear)]
    assert len(linears) == len(e_flax.layers) == depth + 1
    for lt, lf in zip(linears, e_flax.layers):
        lf.kernel.set_value(jnp.asarray(lt.weight.detach().numpy().T))
        lf.bias.set_value(jnp.asarray(lt.bias.detach().numpy()))
    return e_torch, e_flax


def test_energy_mlp_agrees():
    with jax.enable_x64(True):
        e_torch, e_flax = _twin_energies()
        z = np.random.default_rng(0).normal(size=(4, 3, 5))
        np.testing.assert_allclose(np.asarray(e_flax(jnp.asarray(z))),
                                   e_torch(torch.as_tensor(z)).detach().numpy(), rtol=1e-10, atol=1e-10)


def test_energy_mlp_copies_weights_from_and_to_its_torch_twin():
    """The public exchange (float32): torch state_dict() in, the same energies out, and back unchanged."""
    torch.manual_seed(3)
    e_torch = tt.EnergyMLP(4, 10, 3)
    e_flax = tn.EnergyMLP(4, 10, 3, rngs=5).load_torch_state_dict(e_torch.state_dict())
    z = np.random.default_rng(2).normal(size=(6, 4)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(e_flax(jnp.asarray(z))), e_torch(torch.as_tensor(z)).detach().numpy(),
                               rtol=1e-5, atol=1e-5)
    back = e_flax.torch_state_dict()
    assert set(back) == set(e_torch.state_dict())
    for name, value in e_torch.state_dict().items():
        np.testing.assert_array_equal(back[name], value.numpy())
    e_torch.load_state_dict({k: torch.as_tensor(v) for k, v in back.items()})  # and into torch again
    with pytest.raises(ValueError, match="does not match"):
        tn.EnergyMLP(4, 10, 2).load_torch_state_dict(e_torch.state_dict())  # one layer fewer


@pytest.mark.parametrize("batch", [(), (3,)])
def test_log_prob_agrees(batch):
    rng = np.random.default_rng(1)
    loc = rng.normal(size=batch + (5,))
    scale = rng.uniform(0.5, 2.0, size=batch + (5,))
    z = rng.normal(size=(7,) + batch + (5,))
    with jax.enable_x64(True):
        e_torch, e_flax = _twin_energies()
        lp_torch = tt.EnergyTiltedNormal(e_torch, torch.as_tensor(loc), torch.as_tensor(scale),
                                         normalizer=tt.Unnormalized()).log_prob(torch.as_tensor(z))
        lp_jax = tn.EnergyTiltedNormal(e_flax, jnp.asarray(loc), jnp.asarray(scale),
                                       normalizer=tn.Unnormalized()).log_prob(jnp.asarray(z))
        assert lp_jax.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(lp_jax), lp_torch.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_gradients_agree():
    """The gradients the samplers follow are the same too."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(6, 5))
    with jax.enable_x64(True):
        e_torch, e_flax = _twin_energies()
        pt = tt.EnergyTiltedNormal(e_torch, torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64),
                                   normalizer=tt.Unnormalized())
        pj = tn.EnergyTiltedNormal(e_flax, jnp.zeros(5), jnp.ones(5), normalizer=tn.Unnormalized())
        zt = torch.as_tensor(z).requires_grad_(True)
        (gt,) = torch.autograd.grad(pt.log_prob(zt).sum(), zt)
        gj = jax.grad(lambda x: pj.log_prob(x).sum())(jnp.asarray(z))
        np.testing.assert_allclose(np.asarray(gj), gt.numpy(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("shape", [(5,), (2, 3)])
def test_ula_info_has_the_same_fields_shapes_and_dtypes(shape):
    """ULA's step info and run info: one entry per chain on both backends (ones / True: every step is kept)."""
    from tilted_priors.numpyro import langevin as ln
    from tilted_priors.pyro import langevin as lt

    f_t = lambda z: -0.5 * (z ** 2).sum(-1)  # noqa: E731
    f_n = lambda z: -0.5 * (z ** 2).sum(-1)  # noqa: E731
    _, info_t = lt.ula_step(None, lt.init(torch.zeros(*shape, 2), f_t), f_t, 0.1)
    _, info_n = ln.ula_step(jax.random.PRNGKey(0), ln.init(jnp.zeros(shape + (2,)), f_n), f_n, 0.1)
    assert type(info_t).__name__ == type(info_n).__name__ == "LangevinInfo"
    assert info_t._fields == info_n._fields
    for a, b in zip(info_t, info_n):
        assert tuple(a.shape) == tuple(b.shape) == shape
        np.testing.assert_array_equal(a.numpy(), np.asarray(b))
    assert info_t.is_accepted.dtype == torch.bool and info_n.is_accepted.dtype == jnp.bool_

    _, run_t = tt.ShortRunLangevin(3, 0.1).run(f_t, torch.zeros(*shape, 2), return_info=True)
    _, run_n = tn.ShortRunLangevin(3, 0.1).run(jax.random.PRNGKey(0), f_n, jnp.zeros(shape + (2,)),
                                               return_info=True)
    assert run_t._fields == run_n._fields == ("acceptance_rate", "logdensity", "step_size")
    for a, b in zip(run_t, run_n):
        assert tuple(a.shape) == tuple(b.shape) == (() if a is run_t.step_size else shape)
        assert str(a.dtype).replace("torch.", "") == str(b.dtype)
    assert float(run_t.step_size) == pytest.approx(0.1) and float(run_n.step_size) == pytest.approx(0.1)
    np.testing.assert_array_equal(run_t.acceptance_rate.numpy(), np.ones(shape))
    np.testing.assert_array_equal(np.asarray(run_n.acceptance_rate), np.ones(shape))
