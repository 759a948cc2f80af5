"""FlowBackbone gives the same reparameterised density on Pyro and NumPyro for the same flow and energy (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as ndist
import pyro
import pyro.distributions as pdist
import pytest
import torch
from numpyro import handlers
from numpyro.distributions.transforms import LowerCholeskyAffine as JaxLowerCholeskyAffine
from pyro import poutine
from pyro.distributions.transforms import LowerCholeskyAffine as TorchLowerCholeskyAffine

import tilted_priors.inference.numpyro as inn
import tilted_priors.inference.pyro as inp
import tilted_priors.numpyro as tn
import tilted_priors.pyro as tt

N, D = 4, 3
LOC = np.array([0.4, -1.2, 0.7])
TRIL = np.array([[1.3, 0.0, 0.0], [0.5, 0.6, 0.0], [-0.8, 0.2, 2.1]])
BASE_LOC, BASE_SCALE = np.array([0.5, -0.3, 1.0]), np.array([0.8, 1.4, 0.6])


def _twin_energies(latent_dim=D, hidden=12, depth=2):
    """A torch EnergyMLP and a Flax one holding the same weights (float64), as in test_cross_backend.py."""
    torch.manual_seed(0)
    e_torch = tt.EnergyMLP(latent_dim, hidden, depth).double()
    e_flax = tn.EnergyMLP(latent_dim, hidden, depth, rngs=1)
    for lt, lf in zip([m for m in e_torch.net if isinstance(m, torch.nn.Linear)], e_flax.layers):
        lf.kernel.set_value(jnp.asarray(lt.weight.detach().numpy().T))
        lf.bias.set_value(jnp.asarray(lt.bias.detach().numpy()))
    return e_torch, e_flax


def _pyro_u_log_prob(energy, form, u):
    flow = TorchLowerCholeskyAffine(torch.as_tensor(LOC), torch.as_tensor(TRIL))
    if form == "a":
        prior = tt.EnergyTilted(energy, pdist.TransformedDistribution(
            pdist.Normal(torch.zeros(D, dtype=torch.float64), 1.0).to_event(1), flow))
    else:
        prior = tt.EnergyTiltedNormal(energy, torch.as_tensor(BASE_LOC), torch.as_tensor(BASE_SCALE))

    def model():
        with pyro.plate("data", N):
            return pyro.sample("z", prior)

    model_u = inp.handlers.normalizer(poutine.reparam(model, config={"z": inp.FlowBackbone(flow)}), tt.Unnormalized())
    tr = poutine.trace(poutine.condition(model_u, data={"z_u": torch.as_tensor(u)})).get_trace()
    return tr.nodes["z_u"]["fn"].log_prob(tr.nodes["z_u"]["value"]).detach().numpy(), tr.nodes["z"]["value"].numpy()


def _numpyro_u_log_prob(energy, form, u):
    flow = JaxLowerCholeskyAffine(jnp.asarray(LOC), jnp.asarray(TRIL))
    if form == "a":
        prior = tn.EnergyTilted(energy, ndist.TransformedDistribution(ndist.Normal(jnp.zeros(D), 1.0).to_event(1),
                                                                      flow))
    else:
        prior = tn.EnergyTiltedNormal(energy, jnp.asarray(BASE_LOC), jnp.asarray(BASE_SCALE))

    def model():
        with numpyro.plate("data", N):
            return numpyro.sample("z", prior)

    model_u = inn.handlers.normalizer(handlers.reparam(model, config={"z": inn.FlowBackbone(flow)}), tn.Unnormalized())
    tr = handlers.trace(handlers.substitute(handlers.seed(model_u, 0), data={"z_u": jnp.asarray(u)})).get_trace()
    return np.asarray(tr["z_u"]["fn"].log_prob(tr["z_u"]["value"])), np.asarray(tr["z"]["value"])


@pytest.mark.parametrize("form", ["a", "b"])
def test_reparameterised_density_agrees_across_backends(form):
    u = np.random.default_rng(0).normal(size=(N, D))
    with jax.enable_x64(True):
        e_torch, e_flax = _twin_energies()
        lp_torch, z_torch = _pyro_u_log_prob(e_torch, form, u)
        lp_jax, z_jax = _numpyro_u_log_prob(e_flax, form, u)
    assert lp_jax.dtype == np.float64 and lp_torch.shape == lp_jax.shape == (N,)
    np.testing.assert_allclose(z_jax, z_torch, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(z_torch, u @ TRIL.T + LOC, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lp_jax, lp_torch, rtol=1e-10, atol=1e-10)
