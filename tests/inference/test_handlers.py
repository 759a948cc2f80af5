"""The effect handlers ``sampler`` / ``normalizer`` on both backends: model first, as a wrapper or a context manager."""
from __future__ import annotations

import numpy as np
import pytest


def _model(backend):
    """A model with one tilted site ``z`` (the backend's default sampler and normalizer)."""
    prior = backend.tp.EnergyTiltedNormal(lambda z: z.sum(-1), backend.array(np.zeros(2)), backend.array(np.ones(2)))
    return lambda: backend.site("z", prior)


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
    for form, make in _wrapped_forms(backend.handlers.sampler, _model(backend), s,
                                     backend.name == "pyro").items():
        assert backend.site_fn(make(), "z").sampler is s, form


def test_normalizer_wraps_a_model_in_every_form(backend):
    n = backend.tp.Unnormalized()
    for form, make in _wrapped_forms(backend.handlers.normalizer, _model(backend), n,
                                     backend.name == "pyro").items():
        assert backend.site_fn(make(), "z").normalizer is n, form


def test_handlers_are_context_managers(backend):
    s, n = backend.tp.MALA(3, 0.1), backend.tp.Unnormalized()
    with backend.handlers.sampler(s), backend.handlers.normalizer(n):
        site = backend.site_fn(_model(backend), "z")
    assert site.sampler is s and site.normalizer is n
    site = backend.site_fn(_model(backend), "z")  # outside the block the model's own settings are back
    assert site.sampler is not s and site.normalizer is not n


def test_wrapped_model_passes_arguments_and_returns_the_model_value(backend):
    model, seen = _model(backend), []

    def with_args(a, *, b):
        seen.append((a, b))
        return model(), "returned"

    wrapped = backend.handlers.normalizer(with_args, backend.tp.Unnormalized())
    out = []
    site = backend.site_fn(lambda: out.append(wrapped(1, b=2)), "z")
    assert seen == [(1, 2)] and out[0][1] == "returned"
    assert isinstance(site.normalizer, backend.tp.Unnormalized)


def test_handlers_name_the_missing_or_wrong_argument(backend):
    h, tp, model = backend.handlers, backend.tp, _model(backend)
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
