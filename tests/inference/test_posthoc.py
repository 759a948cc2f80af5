"""posthoc_tilt on both backends: a tiny VAE (2-d latent) trained on a ring of 8 clusters, whose aggregate posterior
is far from its N(0, I) prior, is tilted post hoc; the VAE stays frozen, and the held-out log-likelihood rises by many
standard errors, both as ``log_likelihood`` estimates it (encoder proposal) and exactly (quadrature over the 2-d
latent space); the errors name the fix."""
from __future__ import annotations

import importlib
import math

import numpy as np
import pytest

from scipy.special import logsumexp

from tilted_priors.models.data import toy_mixture

N_TRAIN, N_TEST = 1000, 100  # training points; test points for the exact held-out log-likelihood
N_IS, K = 10, 8000  # of which the first N_IS by log_likelihood too (one call, K draws from the encoder)
OBS_SCALE = 0.15


def _data():
    x = toy_mixture(N_TRAIN + N_TEST, "ring", modes=8, radius=2.0, sd=0.15, seed=0).astype(np.float32)
    return x[:N_TRAIN], x[N_TRAIN:]


class _Pyro:
    """The toy VAE on Pyro: ``train()`` -> (model, guide); ``evaluate`` / ``params`` as below."""

    name = "pyro"

    def __init__(self):
        import pyro
        import pyro.distributions as dist
        import torch

        from tilted_priors.inference.pyro import AmortizedGuide
        from tilted_priors.pyro import EnergyMLP

        self.pyro, self.torch, self.EnergyMLP = pyro, torch, EnergyMLP
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        pyro.set_rng_seed(0)
        pyro.clear_param_store()
        nn = torch.nn

        class Encoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 4))

            def forward(self, x):
                loc, raw = self.net(x).chunk(2, -1)
                return loc, nn.functional.softplus(raw) + 1e-3

        self.decoder = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))
        self.encoder = Encoder()

        def model(x):
            pyro.module("toy_decoder", self.decoder)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(self.decoder(z), OBS_SCALE).to_event(1), obs=x)

        self.model, self.guide = model, AmortizedGuide(model, self.encoder, "z", name="toy_encoder")

    def close(self):
        self.torch.set_num_threads(self.threads)

    def energy(self):
        self.torch.manual_seed(0)
        return self.EnergyMLP(2, 32, 2)

    def vae_params(self) -> dict:
        store = self.pyro.get_param_store()
        return {k: v.detach().clone().numpy() for k, v in store.named_parameters() if k.startswith("toy_")}

    def decode(self, z: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self.decoder(self.torch.as_tensor(z, dtype=self.torch.float32)).double().numpy()

    def energy_values(self, energy, z: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return energy(self.torch.as_tensor(z, dtype=self.torch.float32)).double().numpy()

    def log_likelihood(self, model, x, **kwargs):
        from tilted_priors.inference.pyro import log_likelihood

        self.pyro.set_rng_seed(1)
        return log_likelihood(model, self.torch.as_tensor(x), **kwargs)


class _NumPyro:
    name = "numpyro"

    def __init__(self):
        import jax
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist
        from flax import nnx

        from tilted_priors.inference.numpyro import AmortizedGuide, register_module
        from tilted_priors.numpyro import EnergyMLP

        self.jax, self.numpyro, self.EnergyMLP = jax, numpyro, EnergyMLP

        class Encoder(nnx.Module):
            def __init__(self, rngs):
                self.hidden, self.out = nnx.Linear(2, 32, rngs=rngs), nnx.Linear(32, 4, rngs=rngs)

            def __call__(self, x):
                out = self.out(jnp.tanh(self.hidden(x)))
                return out[..., :2], jax.nn.softplus(out[..., 2:]) + 1e-3

        class Decoder(nnx.Module):
            def __init__(self, rngs):
                self.hidden, self.out = nnx.Linear(2, 32, rngs=rngs), nnx.Linear(32, 2, rngs=rngs)

            def __call__(self, z):
                return self.out(jnp.tanh(self.hidden(z)))

        decoder = Decoder(nnx.Rngs(1))

        def model(x):
            net = register_module("toy_decoder", decoder)
            with numpyro.plate("data", x.shape[0]):
                z = numpyro.sample("z", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
                numpyro.sample("x", dist.Normal(net(z), OBS_SCALE).to_event(1), obs=x)

        self.decoder = decoder
        self.model, self.guide = model, AmortizedGuide(model, Encoder(nnx.Rngs(0)), "z", name="toy_encoder")

    def close(self):
        pass

    def energy(self):
        return self.EnergyMLP(2, 32, 2)

    def vae_params(self) -> dict:
        from numpyro import handlers

        trace = handlers.trace(handlers.seed(self.model, 0)).get_trace(np.zeros((1, 2), np.float32))
        trace.update(handlers.trace(handlers.seed(self.guide, 0)).get_trace(np.zeros((1, 2), np.float32)))
        leaves = {}
        for name, site in trace.items():
            if site["type"] == "param":
                for i, leaf in enumerate(self.jax.tree_util.tree_leaves(site["value"])):
                    leaves[f"{name}/{i}"] = np.array(leaf)
        return leaves

    def decode(self, z: np.ndarray) -> np.ndarray:
        from numpyro import handlers

        from tilted_priors.inference.numpyro import register_module

        trace = handlers.trace(handlers.seed(self.model, 0)).get_trace(np.zeros((1, 2), np.float32))
        with handlers.substitute(data={"toy_decoder$params": trace["toy_decoder$params"]["value"]}):
            decoder = register_module("toy_decoder", self.decoder)  # with the trained weights
        return np.asarray(decoder(self.jax.numpy.asarray(z, dtype=np.float32)), dtype=np.float64)

    def energy_values(self, energy, z: np.ndarray) -> np.ndarray:
        return np.asarray(energy(self.jax.numpy.asarray(z, dtype=np.float32)), dtype=np.float64)

    def log_likelihood(self, model, x, **kwargs):
        from tilted_priors.inference.numpyro import log_likelihood

        return log_likelihood(model, self.jax.numpy.asarray(x), rng_key=self.jax.random.PRNGKey(1), **kwargs)


def _inference(name: str):
    return importlib.import_module(f"tilted_priors.inference.{name}")


@pytest.fixture(scope="module", params=["pyro", "numpyro"])
def trained_vae(request):
    """The toy VAE trained for 400 steps (ELBO), frozen afterwards: (adapter, x_train, x_test)."""
    vae = (_Pyro if request.param == "pyro" else _NumPyro)()
    x_train, x_test = _data()
    result = _inference(vae.name).fit(vae.model, vae.guide, x_train, num_steps=400, batch_size=100, lr=1e-2,
                                      betas=(0.9, 0.999), progress=False)
    if vae.name == "numpyro":  # the trained parameters travel with the model and the guide
        vae.model, vae.guide = result.model, result.guide
    vae.plain = None  # the untilted VAE's held-out log-likelihoods, measured once
    yield vae, x_train, x_test
    vae.close()


def _estimated(vae, model, x, log_z=None):
    r"""``log_likelihood(model, x, proposal=guide, num_samples=K)``: the estimate of :math:`\log p(x)` for the few
    points ``x`` together (more at once would make the importance weights degenerate)."""
    kwargs = {} if log_z is None else {"log_z": log_z}
    return vae.log_likelihood(model, x, proposal=vae.guide, num_samples=K, **kwargs)


def _exact(vae, x, energy=None) -> tuple[np.ndarray, float]:
    r"""Per point :math:`\log p(x) = \log \int N(x; f(z), s^2 I)\, p(z)\, dz` by quadrature on a grid over the 2-d
    latent space (spacing 0.03, finer than the posteriors' widths), with :math:`p(z) = e^{-E(z)} N(z; 0, I) / Z` and
    :math:`\log Z` by the same quadrature when an energy is given; returns the values and that :math:`\log Z`."""
    g = np.linspace(-4.5, 4.5, 301)
    log_cell = 2 * math.log(g[1] - g[0])
    z = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    log_prior = -0.5 * (z ** 2).sum(-1) - math.log(2 * math.pi)
    log_z = 0.0
    if energy is not None:
        log_prior = log_prior - vae.energy_values(energy, z)
        log_z = float(logsumexp(log_prior) + log_cell)
        log_prior = log_prior - log_z
    mean = vae.decode(z)
    const = -2 * math.log(OBS_SCALE) - math.log(2 * math.pi)
    out = [logsumexp(log_prior - 0.5 * ((xi - mean) ** 2).sum(-1) / OBS_SCALE ** 2) + const + log_cell for xi in x]
    return np.array(out), log_z


@pytest.mark.parametrize("objective", ["nce", "snl"])
def test_posthoc_tilt_raises_the_held_out_likelihood_and_leaves_the_vae_frozen(trained_vae, objective):
    vae, x_train, x_test = trained_vae
    before = vae.vae_params()
    result = _inference(vae.name).posthoc_tilt(vae.model, vae.guide, x_train, vae.energy(), objective=objective,
                                               draws_per_datum=4, num_steps=500, lr=3e-3, guide_batch_size=1000)
    after = vae.vae_params()
    assert sorted(before) == sorted(after) and before
    for key in before:  # the VAE's parameters did not move
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    assert sorted(result.params) and all(k.startswith("posthoc_") for k in result.params)
    assert result.draws.shape == (4 * N_TRAIN, 2) and result.site == "z" and result.objective == objective

    if vae.plain is None:
        vae.plain = _estimated(vae, vae.model, x_test[:N_IS]), _exact(vae, x_test)[0]
    plain, plain_exact = vae.plain
    tilted_exact, exact_log_z = _exact(vae, x_test, result.energy)

    # log Z: the importance-sampling estimate is the quadrature's, and the learned constant is close to it
    log_z, log_z_se = float(result.log_z.log_z), float(result.log_z.stderr)
    assert abs(log_z - exact_log_z) < 4 * log_z_se + 0.01, (log_z, log_z_se, exact_log_z)
    assert abs(result.learned_log_z - exact_log_z) < 0.25, (result.learned_log_z, exact_log_z)

    # exactly: the tilt adds log-likelihood on held-out points, many paired standard errors over 100 points
    gain = tilted_exact - plain_exact
    assert gain.mean() > 0.3 and gain.mean() > 5 * gain.std(ddof=1) / math.sqrt(len(gain)), gain.mean()

    # as log_likelihood estimates it with the encoder as proposal: higher by many standard errors
    tilted = _estimated(vae, result.model, x_test[:N_IS], {"z": result.log_z})
    assert tilted.log_likelihood - plain.log_likelihood > 5 * math.hypot(plain.stderr, tilted.stderr), (tilted, plain)
    # the encoder is a good proposal for the tilted model (its prior now matches the aggregate posterior), so its
    # estimate is the exact value; for the untilted VAE the weights are heavy-tailed (prior mass between the
    # clusters), and the estimate, a stochastic lower bound, is at most the exact value
    assert tilted.ess > 100, tilted.ess
    exact_is = tilted_exact[:N_IS].sum() + N_IS * (exact_log_z - log_z)  # with the same log Z as the estimate
    assert abs(tilted.log_likelihood - exact_is) < 4 * tilted.stderr + 0.02 * N_IS, (tilted, exact_is)
    assert plain.log_likelihood < plain_exact[:N_IS].sum() + 4 * plain.stderr, (plain, plain_exact[:N_IS].sum())


def test_posthoc_tilt_errors_name_the_fix(trained_vae):
    vae, x_train, _ = trained_vae
    posthoc = _inference(vae.name).posthoc_tilt
    x = x_train[:8]
    with pytest.raises(ValueError, match="objective must be 'nce'"):
        posthoc(vae.model, vae.guide, x, vae.energy(), objective="ml")
    with pytest.raises(ValueError, match="site='w' is not one of the model's latent sites"):
        posthoc(vae.model, vae.guide, x, vae.energy(), site="w")
    with pytest.raises(ValueError, match="site='x' is not one of the model's latent sites"):
        posthoc(vae.model, vae.guide, x, vae.energy(), site="x")
    with pytest.raises(ValueError, match="draws_per_datum must be a positive integer"):
        posthoc(vae.model, vae.guide, x, vae.energy(), draws_per_datum=0)
    with pytest.raises(TypeError, match="energy must be callable"):
        posthoc(vae.model, vae.guide, x, "mlp")
    # a prior that is already energy-tilted is not a post-hoc tilt
    tilted = _inference(vae.name).handlers.tilt(vae.model, lambda v: 0.0 * v["z"].sum(-1), "z")
    with pytest.raises(ValueError, match="already energy-tilted"):
        posthoc(tilted, vae.guide, x, vae.energy())
