"""``register_module`` on both backends: a network's parameters become the model's (Pyro: param store; NumPyro: a
pytree param site whose values the returned module holds)."""
from __future__ import annotations

import numpy as np
import pytest


# --- Pyro --------------------------------------------------------------------------------------------------------
def test_pyro_register_module_puts_the_parameters_in_the_param_store():
    import pyro
    import torch

    from tilted_priors.inference.pyro import register_module

    pyro.clear_param_store()
    net = torch.nn.Linear(2, 3)
    assert register_module("net", net) is net
    store = pyro.get_param_store()
    assert set(store.keys()) == {"net$$$weight", "net$$$bias"}
    assert store["net$$$weight"] is net.weight


def test_pyro_register_module_names_a_shape_clash():
    import pyro
    import torch

    from tilted_priors.inference.pyro import register_module

    pyro.clear_param_store()
    register_module("net", torch.nn.Linear(2, 3))
    with pytest.raises(ValueError, match=r"'net\$\$\$weight' with shape \(3, 2\).*give each module its own name"):
        register_module("net", torch.nn.Linear(2, 4))
    pyro.clear_param_store()


# --- NumPyro -----------------------------------------------------------------------------------------------------
@pytest.fixture
def energy():
    from tilted_priors.numpyro import EnergyMLP

    return EnergyMLP(2, 4, 1, rngs=0)  # layers in a list: the pure dict has integer keys


def _trace(fn, data=None):
    from numpyro import handlers

    fn = handlers.seed(fn, 0)
    if data is not None:
        fn = handlers.substitute(fn, data=data)
    return handlers.trace(fn).get_trace()


def test_numpyro_register_module_declares_one_pytree_param_site(energy):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tilted_priors.inference.numpyro import register_module

    z = jnp.ones((3, 2))
    tr = _trace(lambda: register_module("energy", energy)(z))
    assert [n for n, s in tr.items() if s["type"] == "param"] == ["energy$params"]
    want = nnx.to_pure_dict(nnx.state(energy, nnx.Param))
    assert jax.tree.structure(tr["energy$params"]["value"]) == jax.tree.structure(want)
    # outside any handler: the module's own weights
    np.testing.assert_allclose(register_module("energy", energy)(z), energy(z))


def test_numpyro_register_module_returns_a_copy_holding_the_site_values(energy):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tilted_priors.inference.numpyro import register_module

    zeros = jax.tree.map(jnp.zeros_like, nnx.to_pure_dict(nnx.state(energy, nnx.Param)))
    out = []
    _trace(lambda: out.append(register_module("energy", energy)), data={"energy$params": zeros})
    bound = out[0]
    assert isinstance(bound, type(energy)) and bound is not energy
    np.testing.assert_allclose(bound(jnp.ones((3, 2))), 0.0)
    assert float(jnp.abs(energy(jnp.ones((3, 2)))).sum()) > 0  # the module itself keeps its weights


def test_numpyro_register_module_accepts_string_list_indices(energy):
    """A checkpoint restored from a flat file may spell the list indices as strings."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tilted_priors.inference.numpyro import register_module

    pure = nnx.to_pure_dict(nnx.state(energy, nnx.Param))
    stringly = {k: ({str(i): jax.tree.map(jnp.zeros_like, v) for i, v in layers.items()}
                    if isinstance(layers, dict) else layers) for k, layers in pure.items()}
    out = []
    _trace(lambda: out.append(register_module("energy", energy)), data={"energy$params": stringly})
    np.testing.assert_allclose(out[0](jnp.ones((3, 2))), 0.0)


def test_numpyro_register_module_names_a_shape_or_structure_clash(energy):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tilted_priors.inference.numpyro import register_module

    pure = nnx.to_pure_dict(nnx.state(energy, nnx.Param))
    wider = jax.tree.map(lambda x: jnp.zeros(x.shape + (1,)), pure)
    with pytest.raises(ValueError, match=r"'energy\$params' holds .* with shape .* give each module its own name"):
        _trace(lambda: register_module("energy", energy), data={"energy$params": wider})
    with pytest.raises(ValueError, match=r"holds other parameters than the module's \(missing"):
        _trace(lambda: register_module("energy", energy), data={"energy$params": {"other": jnp.zeros(2)}})


def test_numpyro_register_module_wants_an_nnx_module():
    from tilted_priors.inference.numpyro import register_module

    with pytest.raises(TypeError, match="module must be a flax.nnx.Module"):
        register_module("net", lambda x: x)
