"""``fit`` with several arrays (a tuple passed positionally, a dict passed by name) and ``guide=None``, on both
backends: a regression with a known answer, a conditional energy-tilted density of y given x, clear errors, and
checkpoints / resume with structured data."""
from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

N = 200


def fit_function(backend):
    return importlib.import_module(f"tilted_priors.inference.{backend.name}.train").fit


def primitives(backend):
    return backend.pyro if backend.name == "pyro" else backend.numpyro


def distributions(backend):
    return importlib.import_module(f"{backend.name}.distributions")


def regression_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (N, 1)).astype(np.float32)
    return x, (2.0 * x - 1.0 + 0.5 * rng.normal(size=(N, 1))).astype(np.float32)


def regression_model(backend):
    """``model(x, y)``: y ~ N(w x + c, 0.5^2), observed; w and c are params (no latents)."""
    prim, dist = primitives(backend), distributions(backend)

    def model(x, y):
        w = prim.param("w", backend.array(0.0))
        c = prim.param("c", backend.array(0.0))
        with prim.plate("data", x.shape[0]):
            prim.sample("y", dist.Normal(w * x[..., 0] + c, 0.5), obs=y[..., 0])

    return model


@pytest.mark.parametrize("structure", ["tuple", "dict"])
def test_fit_passes_a_tuple_positionally_and_a_dict_by_name(backend, structure):
    x, y = regression_data()
    data = (x, y) if structure == "tuple" else {"y": y, "x": x}  # a dict is passed by name, in any order
    result = fit_function(backend)(regression_model(backend), None, data, num_steps=150, batch_size=50, lr=0.05,
                                   betas=(0.9, 0.999), progress=False)
    assert result.losses[:10].mean() > result.losses[-10:].mean()
    w, c = float(result.params["w"]), float(result.params["c"])
    # least squares on 200 points with noise sd 0.5: standard errors ~0.06 (w) and ~0.035 (c)
    assert abs(w - 2.0) < 0.25 and abs(c + 1.0) < 0.15, (w, c)


def conditional_density_model(backend, energy, b_net):
    """``model(x, y)``: y | x ~ exp(-E(y, x)) N(y; 0, 2^2) / Z(x), an EnergyMLP with a context, learned by the SNL
    bound with an amortised b(x)."""
    prim = primitives(backend)
    register = importlib.import_module(f"tilted_priors.inference.{backend.name}.modules").register_module
    snl = backend.tp.SelfNormalized(32, name="b", b=b_net)

    def model(x, y):
        e = register("energy", energy)
        density = backend.tp.EnergyTiltedNormal(e, backend.array(np.zeros(1)), backend.array(2 * np.ones(1)),
                                                context=x, normalizer=snl)
        with prim.plate("data", x.shape[0]):
            prim.sample("y", density, obs=y)

    return model


def energy_network(backend, hidden: int):
    """``EnergyMLP(1, hidden, context_dim=1)`` with tanh (XLA compiles the exact GELU's gradient slowly)."""
    if backend.name == "pyro":
        import torch

        return backend.tp.EnergyMLP(1, hidden, activation=torch.nn.Tanh, context_dim=1)
    return backend.tp.EnergyMLP(1, hidden, activation=backend.jnp.tanh, context_dim=1)


def b_network(backend):
    if backend.name == "pyro":
        import torch

        return torch.nn.Linear(1, 1)
    from flax import nnx

    return nnx.Linear(1, 1, rngs=nnx.Rngs(0))


def test_fit_learns_a_conditional_density_with_no_guide(backend):
    """Bimodal y | x (modes at 0.5 x +- 1.5): the bound on -log p(y | x) decreases as the energy learns."""
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (N, 1)).astype(np.float32)
    y = (0.5 * x + 1.5 * rng.choice([-1.0, 1.0], (N, 1)) + 0.3 * rng.normal(size=(N, 1))).astype(np.float32)
    model = conditional_density_model(backend, energy_network(backend, 8), b_network(backend))
    result = fit_function(backend)(model, None, (x, y), num_steps=100, batch_size=50, lr=1e-2,
                                   betas=(0.9, 0.999), progress=False)
    assert np.all(np.isfinite(result.losses))
    first, last = result.losses[:20].mean() / 50, result.losses[-20:].mean() / 50  # per datum
    assert first - last > 0.1, (first, last)


def test_bad_data_and_guides_are_refused_in_the_users_words(backend):
    fit = fit_function(backend)
    x, y = regression_data()
    model = regression_model(backend)
    kwargs = dict(num_steps=1, batch_size=10, progress=False)
    with pytest.raises(ValueError, match=r"share their first dimension.*data\[0\] has 200, data\[1\] has 199"):
        fit(model, None, (x, y[:-1]), **kwargs)
    with pytest.raises(ValueError, match=r"data\['y'\] has 150"):
        fit(model, None, {"x": x, "y": y[:150]}, **kwargs)
    with pytest.raises(TypeError, match="list of arrays"):
        fit(model, None, [x, y], **kwargs)
    with pytest.raises(TypeError, match="identifiers"):
        fit(model, None, {"x": x, 1: y}, **kwargs)
    with pytest.raises(ValueError, match=r"data\[1\] holds 1 non-finite"):
        fit(model, None, (x, np.where(np.arange(N)[:, None] == 3, np.nan, y)), **kwargs)
    with pytest.raises(ValueError, match="empty tuple"):
        fit(model, None, (), **kwargs)
    prim, dist = primitives(backend), distributions(backend)

    def latent_model(x, y):
        w = prim.sample("w", dist.Normal(0.0, 1.0))
        prim.sample("y", dist.Normal(w * x[..., 0], 1.0).to_event(1), obs=y[..., 0])

    with pytest.raises(ValueError, match=r"latent site\(s\) \['w'\]"):
        fit(latent_model, None, (x, y), **kwargs)

    def parameter_free(x, y):
        prim.sample("y", dist.Normal(x[..., 0], 1.0).to_event(1), obs=y[..., 0])

    with pytest.raises(ValueError, match="no parameters"):
        fit(parameter_free, None, (x, y), **kwargs)


def test_checkpoints_resume_with_several_arrays_and_refuse_other_data(backend, tmp_path):
    """A run resumed from its checkpoint gives the same losses as one never interrupted (parameters and Adam's
    state restored); the checkpoint records the tuple's shapes, and refuses dict data of the same arrays."""
    fit = fit_function(backend)
    x, y = regression_data(2)

    def run(out, num_steps, resume=False, data=None):
        if backend.name == "pyro":
            backend.pyro.clear_param_store()
        return fit(regression_model(backend), None, (x, y) if data is None else data, num_steps=num_steps,
                   batch_size=20, lr=0.05, out=out, resume=resume, progress=False)

    straight = run(tmp_path / "a", 12)
    run(tmp_path / "b", 5)
    resumed = run(tmp_path / "b", 12, resume=True)
    np.testing.assert_array_equal(resumed.losses, straight.losses)
    config = json.loads((tmp_path / "b" / "history.json").read_text())["config"]
    assert config["data_shape"] == [[N, 1], [N, 1]]
    with pytest.raises(ValueError, match="cannot resume"):
        run(tmp_path / "b", 14, resume=True, data={"x": x, "y": y})
    with pytest.raises(ValueError, match="cannot resume"):
        run(tmp_path / "b", 14, resume=True, data=(x, y[:, [0, 0]]))
