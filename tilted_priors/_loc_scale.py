"""Backend-free: the error for an :class:`EnergyTiltedNormal` rebuilt from ``loc`` and ``scale`` alone, which is
what Pyro's and NumPyro's ``LocScaleReparam`` do (``type(fn)(loc=..., scale=...)``)."""
from __future__ import annotations

__all__ = ["missing_energy_message"]


def missing_energy_message(cls_name: str, backend: str) -> str:
    """Why ``LocScaleReparam`` cannot decentre a tilted site, and what to use instead.

    Examples
    --------
    >>> "FlowBackbone(AffineTransform(loc, scale))" in missing_energy_message("EnergyTiltedNormal", "pyro")
    True
    """
    handler = "poutine.reparam" if backend == "pyro" else "numpyro.handlers.reparam"
    return (f"{cls_name} was built from loc and scale without an energy. That is how {backend}'s LocScaleReparam "
            "rebuilds a site's distribution, and it cannot decentre an energy-tilted site: the energy would have to "
            "move with the site, E(loc + scale * u). Decentre it with "
            f"tilted_priors.inference.{backend}.FlowBackbone and an affine transform instead, "
            f"{handler}(model, config={{name: FlowBackbone(AffineTransform(loc, scale))}}) (exact for any energy), "
            "or leave the site centred")
