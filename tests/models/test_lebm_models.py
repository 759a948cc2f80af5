"""LEBM models (tilted_priors.models.pyro.lebm, tilted_priors.models.numpyro.lebm): generator shapes, validation, the program's sites and
parameters, one SVI step, and the generator's exact agreement across backends."""
from __future__ import annotations

import numpy as np
import pytest

LATENT, NGF, N = 3, 2, 2  # tiny: every test is about shapes and plumbing, not quality


class _Pyro:
    name = "pyro"

    def __init__(self):
        import pyro
        import torch

        from tilted_priors.models.pyro import lebm
        import tilted_priors.pyro as tp

        self.pyro, self.torch, self.lebm, self.tp = pyro, torch, lebm, tp
        pyro.set_rng_seed(0)
        pyro.clear_param_store()

    def generator(self, image_shape):
        return self.lebm.Generator(LATENT, image_shape, ngf=NGF)

    def randn(self, *shape):
        return self.torch.randn(*shape)

    def numpy(self, x):
        return x.detach().numpy()

    def trace(self, model, *args, **kwargs):
        tr = self.pyro.poutine.trace(model).get_trace(*args, **kwargs)
        sites = {name: node for name, node in tr.nodes.items() if node["type"] == "sample"}
        params = {name for name, node in tr.nodes.items() if node["type"] == "param"}
        return sites, params | set(self.pyro.get_param_store().keys())

    def param_prefixes(self, params):
        return {name.split("$$$")[0] for name in params}

    def svi_loss(self, lvm, x):
        from pyro.infer import SVI, Trace_ELBO
        from pyro.infer.autoguide import AutoNormal

        svi = SVI(lvm.model, AutoNormal(lvm.model), self.lebm.optimizer(lr_energy=1e-2, lr_generator=1e-2),
                  Trace_ELBO())
        w0 = lvm.generator.net[0].weight.detach().clone()
        e0 = lvm.energy.net[0].weight.detach().clone()
        loss = svi.step(x)
        changed = (not self.torch.equal(w0, lvm.generator.net[0].weight.detach())
                   and not self.torch.equal(e0, lvm.energy.net[0].weight.detach()))
        return loss, changed


class _NumPyro:
    name = "numpyro"

    def __init__(self):
        import jax
        import jax.numpy as jnp
        from numpyro import handlers

        from tilted_priors.models.numpyro import lebm
        import tilted_priors.numpyro as tp

        self.jax, self.jnp, self.handlers, self.lebm, self.tp = jax, jnp, handlers, lebm, tp
        self.key = jax.random.PRNGKey(0)

    def generator(self, image_shape):
        return self.lebm.Generator(LATENT, image_shape, ngf=NGF)

    def randn(self, *shape):
        self.key, sub = self.jax.random.split(self.key)
        return self.jax.random.normal(sub, shape)

    def numpy(self, x):
        return np.asarray(x)

    def trace(self, model, *args, **kwargs):
        tr = self.handlers.trace(self.handlers.seed(model, 0)).get_trace(*args, **kwargs)
        sites = {name: site for name, site in tr.items() if site["type"] == "sample"}
        params = {name for name, site in tr.items() if site["type"] == "param"}
        return sites, params

    def param_prefixes(self, params):
        return {name.split("$")[0] for name in params}

    def svi_loss(self, lvm, x):
        import numpyro
        import numpyro.distributions as dist
        from numpyro.infer import SVI, Trace_ELBO

        jnp = self.jnp

        def guide(x=None, *, batch_size=None, index=None):  # AutoDelta-style; AutoNormal's set-up costs ~10 s
            loc = numpyro.param("z_loc", jnp.linspace(-1.0, 1.0, x.shape[0] * lvm.latent_dim).reshape(
                x.shape[0], lvm.latent_dim))  # not 0: the first layers' kernels get no gradient at z = 0
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("z", dist.Delta(loc).to_event(1))

        svi = SVI(lvm.model, guide, self.lebm.optimizer(lr_energy=1e-2, lr_generator=1e-2), Trace_ELBO())
        state = svi.init(self.jax.random.PRNGKey(0), x)
        p0 = svi.get_params(state)
        state, loss = self.jax.jit(svi.update)(state, x)
        p1 = svi.get_params(state)
        changed = all(
            not np.array_equal(np.asarray(p0[f"{name}$params"]["layers"][0]["kernel"]),
                               np.asarray(p1[f"{name}$params"]["layers"][0]["kernel"]))
            for name in ("energy", "generator"))
        return float(loss), changed


@pytest.fixture(params=["pyro", "numpyro"])
def be(request):
    return {"pyro": _Pyro, "numpyro": _NumPyro}[request.param]()


def _fast_sampler(be):
    return be.tp.ShortRunLangevin(2, 0.4)


# --- generator -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_shape", [(28, 28, 1), (32, 32, 3), (64, 64, 3)])
def test_generator_output_shape_and_range(be, image_shape):
    g = be.generator(image_shape)
    x = be.numpy(g(4.0 * be.randn(2, N, LATENT)))
    assert x.shape == (2, N) + image_shape
    assert np.all(np.abs(x) <= 1.0) and np.isfinite(x).all()
    assert be.numpy(g(be.randn(LATENT))).shape == image_shape


def test_generator_rejects_wrong_latent_size(be):
    g = be.generator((28, 28, 1))
    with pytest.raises(ValueError, match="latents of shape"):
        g(be.randn(N, LATENT + 1))


@pytest.mark.parametrize("image_shape", [(28, 28, 1), (32, 32, 3), (64, 64, 3)])
def test_generator_layer_shapes_agree_across_backends(image_shape):
    from tilted_priors.models.numpyro.lebm import Generator as JaxGenerator
    from tilted_priors.models.pyro.lebm import Generator as TorchGenerator
    from tilted_priors.models.reference import generator_plan

    torch_shapes = {k: tuple(v.shape) for k, v in TorchGenerator(LATENT, image_shape, NGF).state_dict().items()}
    state = JaxGenerator(LATENT, image_shape, NGF).torch_state_dict()
    jax_shapes = {k: v.shape for k, v in state.items()}
    assert torch_shapes == jax_shapes
    assert all(v.flags.writeable and v.flags.c_contiguous for v in state.values())  # torch.as_tensor takes them
    plan = generator_plan(image_shape, LATENT, NGF)
    expected = {}
    for i, layer in enumerate(plan):
        expected[f"net.{2 * i}.weight"] = (layer.in_channels, layer.out_channels, layer.kernel, layer.kernel)
        expected[f"net.{2 * i}.bias"] = (layer.out_channels,)
    assert torch_shapes == expected
    assert torch_shapes["net.0.weight"][:2] == (LATENT, (4 if image_shape[0] == 28 else 8) * NGF)
    assert torch_shapes[f"net.{2 * len(plan) - 2}.weight"][1] == image_shape[2]


@pytest.mark.parametrize("image_shape", [(28, 28, 2), (32, 32, 3), (64, 64, 1)])
def test_generator_outputs_and_gradients_agree_across_backends_in_float64(image_shape):
    import jax
    import jax.numpy as jnp
    import torch

    from tilted_priors.models.numpyro.lebm import Generator as JaxGenerator
    from tilted_priors.models.pyro.lebm import Generator as TorchGenerator

    from flax import nnx

    torch.manual_seed(1)
    tg = TorchGenerator(LATENT, image_shape, NGF).double()
    z = (2.0 * torch.randn(N, LATENT, dtype=torch.float64)).requires_grad_()
    w = torch.randn(N, *image_shape, dtype=torch.float64)
    out = tg(z)
    (out * w).sum().backward()
    expected = out.detach().numpy()
    with jax.enable_x64(True):
        jg = JaxGenerator(LATENT, image_shape, NGF, param_dtype=jnp.float64).load_torch_state_dict(tg.state_dict())
        got = np.asarray(jg(jnp.asarray(z.detach().numpy())))
        back = jg.torch_state_dict()
        graphdef, params = nnx.split(jg)
        loss = lambda params, z: (nnx.merge(graphdef, params)(z) * jnp.asarray(w.numpy())).sum()
        grad_params, grad_z = jax.grad(loss, (0, 1))(params, jnp.asarray(z.detach().numpy()))
        nnx.update(jg, grad_params)  # the module now holds the gradients, read back in torch's layout
        grads = jg.torch_state_dict()
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, atol=1e-10, rtol=0)
    for k, v in tg.state_dict().items():
        np.testing.assert_array_equal(back[k], v.numpy())
    np.testing.assert_allclose(np.asarray(grad_z), z.grad.numpy(), atol=1e-9, rtol=0)
    for k, v in tg.named_parameters():
        np.testing.assert_allclose(grads[k], v.grad.numpy(), atol=1e-9, rtol=0, err_msg=k)


# --- build: validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("image_shape", [(30, 30, 1), (28, 32, 1), (48, 48, 3), (128, 128, 3), (28, 28, 0),
                                         (28, 28), (28.0, 28, 1), "28x28", 28])
def test_build_rejects_bad_image_shape(be, image_shape):
    with pytest.raises(ValueError, match="image_shape"):
        be.lebm.build(image_shape, LATENT, ngf=NGF)


@pytest.mark.parametrize("kwargs, match", [({"latent_dim": 0}, "latent_dim"), ({"latent_dim": 2.5}, "latent_dim"),
                                           ({"latent_dim": -3}, "latent_dim"), ({"prior": "flow"}, "prior"),
                                           ({"likelihood_sd": 0.0}, "likelihood_sd"), ({"ngf": 0}, "ngf")])
def test_build_rejects_bad_arguments(be, kwargs, match):
    kwargs = {"latent_dim": LATENT, "ngf": NGF, **kwargs}
    with pytest.raises(ValueError, match=match):
        be.lebm.build((28, 28, 1), **kwargs)


def test_reference_hyperparameters_are_the_same_on_both_backends():
    from tilted_priors.models.numpyro import lebm as jl
    from tilted_priors.models.pyro import lebm as tl

    assert tl.REFERENCE is jl.REFERENCE and tl.MNIST is jl.MNIST  # one backend-free definition
    assert tl.REFERENCE["latent_dim"] == 100 and tl.MNIST["latent_dim"] == 16
    assert (tl.REFERENCE["ngf"], tl.MNIST["ngf"]) == (64, 32)  # the paper's SVHN width; this project's MNIST one
    assert (tl.REFERENCE["lr_energy"], tl.REFERENCE["lr_generator"]) == (2e-5, 1e-4)


# --- the program ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_shape", [(28, 28, 1), (32, 32, 3)])
def test_ebm_model_sites_and_parameters(be, image_shape):
    lvm = be.lebm.build(image_shape, LATENT, ngf=NGF, prior_sampler=_fast_sampler(be))
    assert lvm.prior_kind == "ebm" and lvm.energy is not None and lvm.image_shape == image_shape
    x = 0.5 * np.tanh(be.numpy(be.randn(N, *image_shape)))
    x = be.torch.as_tensor(x, dtype=be.torch.float32) if be.name == "pyro" else be.jnp.asarray(x)
    sites, params = be.trace(lvm.model, x, index=np.arange(N))
    z, obs = sites["z"], sites["x"]
    assert isinstance(z["fn"], be.tp.EnergyTiltedNormal)
    assert tuple(z["fn"].batch_shape) == (N,) and tuple(z["fn"].event_shape) == (LATENT,)
    assert tuple(z["value"].shape) == (N, LATENT) and not z["is_observed"]
    assert obs["is_observed"] and tuple(obs["fn"].event_shape) == image_shape
    assert tuple(obs["fn"].batch_shape) == (N,)
    assert be.param_prefixes(params) == {"energy", "generator"}
    if be.name == "pyro":
        assert "energy$$$net.0.weight" in params and "generator$$$net.0.weight" in params
        assert {be.lebm.parameter_group(p) for p in params} == {"energy", "generator"}
    else:
        assert params == {"energy$params", "generator$params"}
        assert {be.lebm.parameter_group(p) for p in params} == {"energy", "generator"}


def test_model_samples_images_without_data(be):
    lvm = be.lebm.build((28, 28, 1), LATENT, ngf=NGF, prior_sampler=_fast_sampler(be))
    sites, _ = be.trace(lvm.model, batch_size=N)
    assert not sites["x"]["is_observed"]
    x = be.numpy(sites["x"]["value"])
    assert x.shape == (N, 28, 28, 1) and np.isfinite(x).all()
    decoded = be.numpy(lvm.decode(sites["z"]["value"]))
    assert decoded.shape == (N, 28, 28, 1) and np.all(np.abs(decoded) <= 1)


def test_model_argument_errors(be):
    lvm = be.lebm.build((28, 28, 1), LATENT, ngf=NGF, prior="gaussian")
    with pytest.raises(ValueError, match="batch_size"):
        lvm.model()
    bad = np.zeros((N, 28, 28))
    bad = be.torch.as_tensor(bad) if be.name == "pyro" else be.jnp.asarray(bad)
    with pytest.raises(ValueError, match="channels last"):
        lvm.model(bad)


def test_gaussian_baseline_has_no_energy(be):
    lvm = be.lebm.build((28, 28, 1), LATENT, ngf=NGF, prior="gaussian")
    assert lvm.energy is None and lvm.prior_kind == "gaussian"
    prior = lvm.prior((N,))
    assert not isinstance(prior, be.tp.EnergyTilted)
    assert tuple(prior.batch_shape) == (N,) and tuple(prior.event_shape) == (LATENT,)
    sites, params = be.trace(lvm.model, batch_size=N)
    assert not isinstance(sites["z"]["fn"], be.tp.EnergyTilted)
    assert be.param_prefixes(params) == {"generator"}


def test_prior_of_ebm_model(be):
    sampler = _fast_sampler(be)
    lvm = be.lebm.build((28, 28, 1), LATENT, ngf=NGF, prior_sampler=sampler)
    prior = lvm.prior((N,))
    assert isinstance(prior, be.tp.EnergyTiltedNormal) and prior.sampler == sampler
    assert tuple(prior.batch_shape) == (N,) and tuple(prior.event_shape) == (LATENT,)


def test_one_svi_step_gives_a_finite_loss_and_trains_both_networks(be):
    lvm = be.lebm.build((28, 28, 1), LATENT, ngf=NGF, energy_hidden=8, prior_sampler=_fast_sampler(be))
    x = 0.5 * np.tanh(be.numpy(be.randn(N, 28, 28, 1)))
    x = be.torch.as_tensor(x, dtype=be.torch.float32) if be.name == "pyro" else be.jnp.asarray(x)
    loss, changed = be.svi_loss(lvm, x)
    assert np.isfinite(loss)
    assert changed


def test_parameter_groups(be):
    group = be.lebm.parameter_group
    if be.name == "pyro":
        names = {"energy$$$net.2.bias": "energy", "energy.net.2.bias": "energy",
                 "generator$$$net.0.weight": "generator", "AutoNormal.locs.z": "other"}
    else:
        names = {"energy$params": "energy", "generator$params": "generator", "z_auto_loc": "other",
                 "energy_b": "other"}
    assert {name: group(name) for name in names} == names


def test_numpyro_with_params_puts_trained_weights_into_the_modules():
    import jax
    import jax.numpy as jnp
    from numpyro import handlers

    from tilted_priors.models.numpyro import lebm

    from tilted_priors.numpyro import ShortRunLangevin

    lvm = lebm.build((28, 28, 1), LATENT, ngf=NGF, energy_hidden=4, prior_sampler=ShortRunLangevin(2, 0.4))
    tr = handlers.trace(handlers.seed(lvm.model, 0)).get_trace(batch_size=1)
    params = {name: jax.tree.map(jnp.zeros_like, tr[name]["value"]) for name in ("energy$params", "generator$params")}
    trained = lvm.with_params(params)
    assert float(jnp.abs(trained.decode(jnp.ones(LATENT))).max()) == 0.0
    assert float(jnp.abs(trained.energy(jnp.ones(LATENT)))) == 0.0
    assert float(jnp.abs(lvm.decode(jnp.ones(LATENT))).max()) > 0.0  # the original is unchanged


def test_pyro_param_store_is_the_source_of_truth():
    import pyro
    import torch

    from tilted_priors.models.pyro import lebm

    pyro.clear_param_store()
    first = lebm.build((28, 28, 1), LATENT, ngf=NGF, prior="gaussian", seed=0)
    first.model(batch_size=1)
    second = lebm.build((28, 28, 1), LATENT, ngf=NGF, prior="gaussian", seed=1)
    assert not torch.equal(first.generator.net[0].weight, second.generator.net[0].weight)
    second.model(batch_size=1)  # resumes from the store (as after pyro.get_param_store().load(...))
    assert second.generator.net[0].weight is pyro.get_param_store()["generator$$$net.0.weight"]
    assert torch.equal(first.generator.net[0].weight, second.generator.net[0].weight)
    wider = lebm.build((28, 28, 1), LATENT, ngf=NGF + 1, prior="gaussian")
    with pytest.raises(ValueError, match="clear_param_store"):
        wider.model(batch_size=1)
    pyro.clear_param_store()


@pytest.mark.parametrize("prior", ["ebm", "gaussian"])
def test_latent_prior_same_call_on_both_backends(be, prior):
    """``latent_prior(model, like, batch_shape, *, energy=None)``: dtype (and device) of ``like``."""
    lvm = be.lebm.build((28, 28, 1), LATENT, ngf=NGF, prior=prior)
    like = be.randn(1)
    d = be.lebm.latent_prior(lvm, like, (4,))
    assert tuple(d.batch_shape) == (4,) and tuple(d.event_shape) == (LATENT,)
    assert tuple(be.lebm.latent_prior(lvm, like).batch_shape) == ()
    if prior == "ebm":
        assert d.energy is lvm.energy
        other = be.tp.EnergyMLP(LATENT, 4, 1) if be.name == "pyro" else be.tp.EnergyMLP(LATENT, 4, 1, rngs=1)
        assert be.lebm.latent_prior(lvm, like, (4,), energy=other).energy is other


def test_numpyro_latent_prior_takes_an_array_or_a_dtype():
    import jax.numpy as jnp

    from tilted_priors.models.numpyro import lebm

    lvm = lebm.build((28, 28, 1), LATENT, ngf=NGF)
    for like in (jnp.zeros((), jnp.float16), jnp.float16):
        d = lebm.latent_prior(lvm, like, (2,))
        assert d.base.base_dist.loc.dtype == jnp.float16
