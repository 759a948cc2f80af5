"""The effect handlers ``sampler`` / ``normalizer`` on both backends: model first, as a wrapper or a context manager."""
from __future__ import annotations

import pytest


class _Pyro:
    def __init__(self):
        import pyro
        import torch

        import tilted_priors.pyro as tp
        from tilted_priors.inference.pyro import handlers

        self.tp, self.handlers = tp, handlers
        self._pyro, self._torch = pyro, torch

    def model(self):
        tp, torch = self.tp, self._torch
        return lambda: self._pyro.sample("z", tp.EnergyTiltedNormal(lambda z: z.sum(-1), torch.zeros(2),
                                                                    torch.ones(2)))

    def site(self, model):
        return self._pyro.poutine.trace(model).get_trace().nodes["z"]["fn"]


class _NumPyro:
    def __init__(self):
        import jax.numpy as jnp
        import numpyro

        import tilted_priors.numpyro as tp
        from tilted_priors.inference.numpyro import handlers

        self.tp, self.handlers = tp, handlers
        self._numpyro, self._jnp = numpyro, jnp

    def model(self):
        tp, jnp = self.tp, self._jnp
        return lambda: self._numpyro.sample("z", tp.EnergyTiltedNormal(lambda z: z.sum(-1), jnp.zeros(2),
                                                                       jnp.ones(2)))

    def site(self, model):
        from numpyro import handlers

        return handlers.trace(handlers.seed(model, 0)).get_trace()["z"]["fn"]


@pytest.fixture(params=["pyro", "numpyro"])
def backend(request):
    return _Pyro() if request.param == "pyro" else _NumPyro()


def _wrapped_forms(handler, model, setting, pyro: bool) -> dict:
    forms = {
        "handler(model, setting)": lambda: handler(model, setting),
        "keywords": lambda: handler(fn=model, **{handler.__name__: setting}),
        "handler(setting, model) (older order)": lambda: handler(setting, model),
    }
    if pyro:
        forms["handler(setting)(model) (decorator)"] = lambda: handler(setting)(model)
    return forms


def test_sampler_wraps_a_model_in_every_form(backend):
    s = backend.tp.MALA(3, 0.1)
    for form, make in _wrapped_forms(backend.handlers.sampler, backend.model(), s,
                                     isinstance(backend, _Pyro)).items():
        assert backend.site(make()).sampler is s, form


def test_normalizer_wraps_a_model_in_every_form(backend):
    n = backend.tp.Unnormalized()
    for form, make in _wrapped_forms(backend.handlers.normalizer, backend.model(), n,
                                     isinstance(backend, _Pyro)).items():
        assert backend.site(make()).normalizer is n, form


def test_handlers_are_context_managers(backend):
    s, n = backend.tp.MALA(3, 0.1), backend.tp.Unnormalized()
    with backend.handlers.sampler(s), backend.handlers.normalizer(n):
        site = backend.site(backend.model())
    assert site.sampler is s and site.normalizer is n
    site = backend.site(backend.model())  # outside the block the model's own settings are back
    assert site.sampler is not s and site.normalizer is not n


def test_wrapped_model_passes_arguments_and_returns_the_model_value(backend):
    model, seen = backend.model(), []

    def with_args(a, *, b):
        seen.append((a, b))
        return model(), "returned"

    wrapped = backend.handlers.normalizer(with_args, backend.tp.Unnormalized())
    out = []
    site = backend.site(lambda: out.append(wrapped(1, b=2)))
    assert seen == [(1, 2)] and out[0][1] == "returned"
    assert isinstance(site.normalizer, backend.tp.Unnormalized)


def test_handlers_name_the_missing_or_wrong_argument(backend):
    h, tp, model = backend.handlers, backend.tp, backend.model()
    with pytest.raises(TypeError, match=r"sampler\(\) needs a sampler: wrap a model with sampler\(model, "):
        h.sampler()
    with pytest.raises(TypeError, match=r"normalizer\(\) needs a normalizer"):
        h.normalizer(model)
    with pytest.raises(TypeError, match=r"sampler must be an object with \.run"):
        h.sampler(model, 3)
    with pytest.raises(TypeError, match=r"normalizer must be an object with \.term"):
        h.normalizer(model, tp.MALA(3, 0.1))  # a sampler is not a normalizer
    with pytest.raises(TypeError, match=r"fn must be the model to wrap \(a callable\)"):
        h.sampler(3, tp.MALA(3, 0.1))


def test_handler_signatures_put_the_model_first(backend):
    import inspect

    for name in ("sampler", "normalizer"):
        params = list(inspect.signature(getattr(backend.handlers, name)).parameters)
        assert params == ["fn", name]
