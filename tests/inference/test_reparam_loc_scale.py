"""The backends' own LocScaleReparam on a tilted site: a clear error that names FlowBackbone with an affine transform,
and that advice decentres the site (z = loc + scale * u)."""
import importlib

import numpy as np
import pytest


def _trace(backend, model) -> dict:
    """``{site: value}`` of one run of ``model()`` (sample and deterministic sites)."""
    if backend.name == "pyro":
        return {n: s["value"] for n, s in backend.pyro.poutine.trace(model).get_trace().nodes.items()
                if s["type"] == "sample"}
    from numpyro import handlers

    return {n: s["value"] for n, s in handlers.trace(handlers.seed(model, backend.key())).get_trace().items()
            if s["type"] in ("sample", "deterministic")}


@pytest.mark.parametrize("centered", [0.0, None])
def test_loc_scale_reparam_on_a_tilted_site_names_flow_backbone(backend, quadratic_case, centered):
    case = quadratic_case
    reparam_module = importlib.import_module(f"{backend.name}.infer.reparam")
    if backend.name == "pyro":
        reparam = backend.pyro.poutine.reparam
    else:
        from numpyro.handlers import reparam
    model = lambda: backend.site("z", backend.prior(case))  # noqa: E731
    with pytest.raises(TypeError, match=r"FlowBackbone and an affine transform"):
        _trace(backend, reparam(model, config={"z": reparam_module.LocScaleReparam(centered)}))


def test_the_advice_decentres_the_tilted_site(backend, quadratic_case):
    case = quadratic_case
    inference = importlib.import_module(f"tilted_priors.inference.{backend.name}")
    transforms = importlib.import_module(f"{backend.name}.distributions.transforms")
    if backend.name == "pyro":
        reparam = backend.pyro.poutine.reparam
    else:
        from numpyro.handlers import reparam
    loc, scale = backend.array(case.loc), backend.array(case.scale)
    model = lambda: backend.site("z", backend.prior(case, sampler=backend.tp.MALA(5, 0.3)))  # noqa: E731
    flow = inference.FlowBackbone(transforms.AffineTransform(loc, scale))
    values = _trace(backend, reparam(model, config={"z": flow}))
    np.testing.assert_allclose(backend.numpy(values["z"]), backend.numpy(loc + scale * values["z_u"]), rtol=1e-5)
