"""Adapters of ``fit``'s tests: the same tiny models on Pyro and NumPyro (``side`` fixtures), and run helpers."""
from __future__ import annotations

import contextlib

import numpy as np

__all__ = ["N", "BATCH", "SPE", "PyroSide", "NumPyroSide", "side_fixture", "run_fit", "assert_identical", "data"]

N = 24          # data size
BATCH = 6       # 4 steps per epoch
SPE = N // BATCH


def data(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(3.0, 1.0, size=N).astype(np.float32)


# --- backend adapters: the same tiny models on Pyro and NumPyro ---------------------------------------------
class PyroSide:
    name, ckpt = "pyro", "checkpoint.pt"

    def __init__(self):
        import pyro
        import pyro.distributions as dist
        import torch
        from pyro.infer.autoguide import AutoNormal

        from tilted_priors.inference.pyro.train import fit

        self.pyro, self.dist, self.torch, self.AutoNormal, self.fit = pyro, dist, torch, AutoNormal, fit

    def no_validation(self):
        return self.pyro.validation_enabled(False)

    def fresh(self):
        """A new process, as far as Pyro can tell: empty param store, scrambled RNG."""
        self.pyro.clear_param_store()
        self.torch.manual_seed(12345)

    def latent_model(self, nan_above=None, nan_in_scale=False):
        """``mu`` a param, per-datum latent ``z``: needs the RNG, so resume must restore it. With ``nan_above``
        the loss turns nan once ``mu`` exceeds it (through a factor, or through a distribution's scale)."""
        pyro, dist, torch = self.pyro, self.dist, self.torch

        def model(x, index=None):
            mu = pyro.param("mu", torch.zeros(()))
            bad = torch.zeros(()) if nan_above is None else \
                torch.where(mu > nan_above, torch.tensor(float("nan")), torch.zeros(()))
            if not nan_in_scale:
                pyro.factor("guard", bad)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(mu, 1.0))
                pyro.sample("obs", dist.Normal(z, 0.5 + (bad if nan_in_scale else 0.0)), obs=x)
        return model

    def auto_guide(self, model):
        return self.AutoNormal(model)

    def two_param_model(self):
        pyro, dist, torch = self.pyro, self.dist, self.torch

        def model(x):
            a = pyro.param("frozen_a", torch.zeros(()))
            b = pyro.param("moving_b", torch.zeros(()))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(a + b, 1.0), obs=x)
        return model, (lambda x: None), ("frozen_a", "moving_b")

    def unbounded_model(self):
        """A model whose loss, -theta^2, falls without bound: it drifts away step by step, never jumping."""
        pyro = self.pyro

        def model(x):
            theta = pyro.param("theta", self.torch.ones(()))
            pyro.factor("runaway", theta ** 2)
        return model

    def unused_param_model(self):
        """A model whose loss does not depend on its parameter: training cannot move it."""
        pyro, dist, torch = self.pyro, self.dist, self.torch

        def model(x):
            pyro.param("unused", torch.zeros(()))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(0.0, 1.0), obs=x)
        return model

    def load(self, path) -> dict:
        ckpt = self.torch.load(path, weights_only=True)["payload"]
        return {"step": ckpt["step"], "params": {k: v.numpy() for k, v in ckpt["params"].items()}}


class NumPyroSide:
    name, ckpt = "numpyro", "checkpoint.npz"

    def __init__(self):
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist
        from numpyro.infer.autoguide import AutoNormal

        from tilted_priors.inference.numpyro.train import fit

        self.jnp, self.numpyro, self.dist, self.AutoNormal, self.fit = jnp, numpyro, dist, AutoNormal, fit

    def fresh(self):
        pass

    def no_validation(self):
        return contextlib.nullcontext()

    def latent_model(self, nan_above=None, nan_in_scale=False):
        numpyro, dist, jnp = self.numpyro, self.dist, self.jnp

        def model(x, index=None):
            mu = numpyro.param("mu", jnp.zeros(()))
            bad = jnp.zeros(()) if nan_above is None else jnp.where(mu > nan_above, jnp.nan, 0.0)
            if not nan_in_scale:
                numpyro.factor("guard", bad)
            with numpyro.plate("data", x.shape[0]):
                z = numpyro.sample("z", dist.Normal(mu, 1.0))
                numpyro.sample("obs", dist.Normal(z, 0.5 + (bad if nan_in_scale else 0.0)), obs=x)
        return model

    def auto_guide(self, model):
        return self.AutoNormal(model)

    def two_param_model(self):
        numpyro, dist, jnp = self.numpyro, self.dist, self.jnp

        def model(x):
            a = numpyro.param("frozen_a", jnp.zeros(()))
            b = numpyro.param("moving_b", jnp.zeros(()))
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("obs", dist.Normal(a + b, 1.0), obs=x)
        return model, (lambda x: None), ("frozen_a", "moving_b")

    def unbounded_model(self):
        """A model whose loss, -theta^2, falls without bound: it drifts away step by step, never jumping."""
        numpyro = self.numpyro

        def model(x):
            theta = numpyro.param("theta", self.jnp.ones(()))
            numpyro.factor("runaway", theta ** 2)
        return model

    def unused_param_model(self):
        """A model whose loss does not depend on its parameter: training cannot move it."""
        numpyro, dist, jnp = self.numpyro, self.dist, self.jnp

        def model(x):
            numpyro.param("unused", jnp.zeros(()))
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("obs", dist.Normal(0.0, 1.0), obs=x)
        return model

    def load(self, path) -> dict:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        return {"step": int(arrays["step"]),
                "params": {k: v for k, v in arrays.items() if k.startswith("svi_state/")}}


def side_fixture(request):
    return PyroSide() if request.param == "pyro" else NumPyroSide()


def run_fit(side, nan_above=None, nan_in_scale=False, **kwargs):
    model = side.latent_model(nan_above, nan_in_scale)
    kwargs.setdefault("batch_size", BATCH)
    kwargs.setdefault("progress", False)
    return side.fit(model, side.auto_guide(model), kwargs.pop("data", data()), **kwargs)


def assert_identical(a, b):
    assert a.steps == b.steps
    assert [r["step"] for r in a.history] == list(range(1, a.steps + 1))
    assert [r["step"] for r in b.history] == list(range(1, b.steps + 1))
    np.testing.assert_array_equal(a.losses, b.losses)
    assert a.params.keys() == b.params.keys()
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name
