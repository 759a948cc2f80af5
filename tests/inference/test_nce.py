"""NoiseContrastive (NCE) on both backends: recovery of a Gaussian family, the loss's value and bookkeeping (data,
wrappers, masks, latent sites, a given noise), and its errors."""
import importlib
import math

import numpy as np
import pytest


def _nce(backend):
    return importlib.import_module(f"tilted_priors.inference.{backend.name}")


def _dist(backend):
    return importlib.import_module(f"{backend.name}.distributions")


def _model(backend, *, energy_params=True, normalizer=None, wrap=lambda d: d, latent=False):
    """``model(x)``: ``x`` (shape (N, 1)) ~ EnergyTilted(E(v) = a v^2 / 2 + b v, N(0, 1)) in a data plate, with
    learnable a, b (or a = b = 0) and the normalizer LearnedLogZ("c") unless given; ``latent`` adds a site
    s ~ N(0, 1) that nothing uses."""
    ppl, dist, tp = getattr(backend, backend.name), _dist(backend), backend.tp
    zero = backend.array(0.0)

    def model(x):  # each param gets its own initial tensor: Pyro's param store adopts (and updates) the tensor
        if latent:
            ppl.sample("s", dist.Normal(zero, 1.0))
        a = ppl.param("a", backend.array(0.0)) if energy_params else zero
        b = ppl.param("b", backend.array(0.0)) if energy_params else zero
        tilted = tp.EnergyTilted(lambda v: 0.5 * a * (v ** 2).sum(-1) + b * v.sum(-1),
                                 dist.Normal(backend.array(np.zeros(1)), 1.0).to_event(1),
                                 normalizer=tp.LearnedLogZ("c") if normalizer is None else normalizer)
        with ppl.plate("data", x.shape[0]):
            ppl.sample("x", wrap(tilted), obs=x)

    return model


def _loss(backend, loss, model, guide, x) -> float:
    """The loss's value at the params' initial values (a = b = c = 0)."""
    if backend.name == "pyro":
        return float(loss.loss(model, guide, x))
    from numpyro import handlers

    params = {name: site["value"] for name, site in handlers.trace(handlers.seed(model, 0)).get_trace(x).items()
              if site["type"] == "param"}
    return float(loss.loss(backend.key(), params, model, guide, x))


def _chance(nu: int) -> float:
    """-J per datum of a model that is the noise: log(1 + nu) + nu log(1 + 1/nu)."""
    return math.log(1 + nu) + nu * math.log(1 + 1 / nu)


def test_nce_recovers_a_gaussian_and_its_log_z(backend):
    # Data N(mu, s^2); the family exp(-a x^2/2 - b x) N(x; 0, 1) holds it at a = 1/s^2 - 1, b = -mu/s^2, with
    # log Z(a, b) = -log(1 + a)/2 + b^2 / (2 (1 + a)).
    mu, s, n, nu = 1.0, 0.7, 2000, 10
    data = np.random.default_rng(0).normal(mu, s, size=(n, 1))
    result = _nce(backend).fit(_model(backend), lambda x: None, data, num_steps=400, batch_size=n, lr=0.2,
                               betas=(0.9, 0.999), lr_decay=0.99, loss=_nce(backend).NoiseContrastive(num_noise=nu),
                               progress=False)
    a, b, c = (float(result.params[k]) for k in "abc")
    # Maximum likelihood's sampling sd (Fisher information of (precision P = 1 + a, b = -mu P)): NCE's estimate
    # has at most (1 + 1/nu) times its variance, and the optimiser averages over fresh noise at every step.
    P = 1 / s ** 2
    sd_a, sd_b = P * math.sqrt(2 / n), P * math.sqrt((s ** 2 + 2 * mu ** 2) / n)
    inflate = math.sqrt(1 + 1 / nu)
    assert abs(a - (P - 1)) < 4 * inflate * sd_a, (a, P - 1, sd_a)
    assert abs(b + mu * P) < 4 * inflate * sd_b, (b, -mu * P, sd_b)
    # ... and differs from this data set's maximum-likelihood estimate only through the noise
    m, v = data.mean(), data.var()
    assert abs(a - (1 / v - 1)) < 4 * sd_a / math.sqrt(nu) and abs(b + m / v) < 4 * sd_b / math.sqrt(nu)
    # c is the fitted model's log Z (NCE self-normalises), to within a log-mean's error over n data
    log_z = -0.5 * math.log(1 + a) + b ** 2 / (2 * (1 + a))
    assert abs(c - log_z) < 4 / math.sqrt(n), (c, log_z)


def test_nce_loss_of_a_model_that_is_the_noise_is_chance(backend):
    nce, nu = _nce(backend).NoiseContrastive(num_noise=4), 4
    x = backend.array(np.random.default_rng(0).normal(size=(7, 1)))
    assert _loss(backend, nce, _model(backend), lambda x: None, x) == pytest.approx(7 * _chance(nu), rel=1e-5)
    # a latent site whose guide is its prior adds log p - log q = 0
    dist, ppl = _dist(backend), getattr(backend, backend.name)
    guide = lambda x: ppl.sample("s", dist.Normal(backend.array(0.0), 1.0))  # noqa: E731
    value = _loss(backend, nce, _model(backend, latent=True), guide, x)
    assert value == pytest.approx(7 * _chance(nu), rel=1e-5)


def test_nce_data_are_the_batch_elements_of_the_site(backend):
    # to_event(1) over the plate makes the 7 rows one datum; a mask leaves masked data out.
    nce, nu = _nce(backend).NoiseContrastive(num_noise=3), 3
    x = backend.array(np.random.default_rng(0).normal(size=(7, 1)))
    tp = backend.tp

    def wrapped(wrap):
        ppl, dist = getattr(backend, backend.name), _dist(backend)

        def model(x):
            tilted = tp.EnergyTilted(lambda v: 0.0 * v.sum(-1),
                                     dist.Normal(backend.array(np.zeros(1)), 1.0).to_event(1).expand([7]),
                                     normalizer=tp.Unnormalized())
            ppl.sample("x", wrap(tilted), obs=x)

        return model

    mask = np.array([True, False, True, True, False, True, True])
    mask = backend.torch.as_tensor(mask) if backend.name == "pyro" else backend.jnp.asarray(mask)
    cases = [(lambda d: d.to_event(1), 1), (lambda d: d.mask(mask), 5), (lambda d: d, 7)]
    for wrap, num_data in cases:
        assert _loss(backend, nce, wrapped(wrap), lambda x: None, x) == pytest.approx(num_data * _chance(nu),
                                                                                      rel=1e-5)


def test_nce_with_the_base_given_as_noise_is_the_default(backend):
    # The generic logit -E + log q - c - log r - log nu equals the default's -E - c - log nu when r = q.
    dist = _dist(backend)
    base = dist.Normal(backend.array(np.zeros(1)), 1.0).to_event(1)
    x = backend.array(np.random.default_rng(0).normal(1.0, 0.5, size=(9, 1)))

    def model(x):
        tilted = backend.tp.EnergyTilted(lambda v: (v ** 2).sum(-1) - v.sum(-1), base,
                                         normalizer=backend.tp.Unnormalized())
        with getattr(backend, backend.name).plate("data", 9):
            getattr(backend, backend.name).sample("x", tilted, obs=x)

    values = []
    for noise in (None, base):
        if backend.name == "pyro":
            backend.pyro.set_rng_seed(3)
        else:
            backend._key = backend.jax.random.PRNGKey(3)
        values.append(_loss(backend, _nce(backend).NoiseContrastive(num_noise=6, noise=noise), model,
                            lambda x: None, x))
    assert values[0] == pytest.approx(values[1], rel=1e-5)


def test_nce_errors_name_the_fix(backend):
    nce = _nce(backend).NoiseContrastive(num_noise=2)
    x = backend.array(np.zeros((3, 1)))
    with pytest.raises(TypeError, match="LearnedLogZ"):
        _loss(backend, nce, _model(backend, normalizer=backend.tp.Contrastive()), lambda x: None, x)
    ppl, dist = getattr(backend, backend.name), _dist(backend)

    def plain(x):
        with ppl.plate("data", 3):
            ppl.sample("x", dist.Normal(backend.array(np.zeros(1)), 1.0).to_event(1), obs=x)

    with pytest.raises(ValueError, match="no observed EnergyTilted site"):
        _loss(backend, nce, plain, lambda x: None, x)
    with pytest.raises(ValueError, match="num_noise"):
        _nce(backend).NoiseContrastive(num_noise=0)
    with pytest.raises(TypeError, match="noise must be"):
        _nce(backend).NoiseContrastive(noise="normal")
