r"""Backend-free parts of the noise-contrastive loss (:mod:`tilted_priors.inference.pyro.nce`,
:mod:`tilted_priors.inference.numpyro.nce`): which wrappers lie between an observed site's distribution and its
tilted distribution, and the loss's error messages.

A datum is one element of the site's batch shape. Between the site's distribution and the tilted one there may be
``Independent`` wrappers (``to_event``: the datum's density is the product over the reinterpreted dimensions),
masks (``.mask(m)``: masked factors leave the product; a mask over whole data leaves those data out) and
``expand`` (nothing to do: the values carry the full shape).
"""
from __future__ import annotations

from tilted_priors._compat import distribution_mask

__all__ = ["datum_layers", "normalizer_message", "no_site_message"]


def datum_layers(fn, tilted, site: str) -> list[tuple[str, object]]:
    """The wrappers from ``tilted`` out to ``fn``, innermost first: ``("event", k)``, ``("mask", m)`` or
    ``("expand", None)``.

    Raises ``TypeError`` for any other wrapper.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> inner = dist.Normal(torch.zeros(3, 2), 1.0).to_event(1)
    >>> datum_layers(inner.mask(torch.tensor([True, True, False])).to_event(1), inner, "x")[0]
    ('mask', tensor([ True,  True, False]))
    """
    layers = []
    while fn is not tilted:
        if fn is None:  # pragma: no cover - find_tilted found it inside, so the chain reaches it
            raise ValueError(f"NoiseContrastive at site {site!r}: the tilted distribution is not inside the site's")
        if hasattr(fn, "reinterpreted_batch_ndims"):
            layers.append(("event", int(fn.reinterpreted_batch_ndims)))
        elif type(fn).__name__ == "MaskedDistribution":
            layers.append(("mask", distribution_mask(fn)))
        elif type(fn).__name__ == "ExpandedDistribution":
            layers.append(("expand", None))
        else:
            raise TypeError(f"NoiseContrastive at site {site!r}: the tilted distribution is wrapped in a "
                            f"{type(fn).__name__}, which the loss cannot see through; it handles Independent "
                            "(.to_event), .mask() and .expand() wrappers and plates")
        fn = getattr(fn, "base_dist", None)
    return layers[::-1]


def normalizer_message(site: str, normalizer, backend: str) -> str:
    """The error for an observed tilted site whose normalizer is not a constant NCE can learn.

    Examples
    --------
    >>> "LearnedLogZ" in normalizer_message("x", "Contrastive()", "pyro")
    True
    """
    return (f"NoiseContrastive at site {site!r}: the model's log density is -E(x) + log q(x) - c with a learned "
            f"constant c, which the site's distribution must declare, but its normalizer is {normalizer!r}. Build "
            f"it with normalizer=tilted_priors.{backend}.LearnedLogZ(name=...) (one name per observed tilted "
            "site), or Unnormalized() when the energy has its own free constant (c = 0)")


def no_site_message(sites: list[str]) -> str:
    """The error for a model with no observed energy-tilted site.

    Examples
    --------
    >>> no_site_message([]).startswith("NoiseContrastive found no observed")
    True
    """
    seen = f" (its sample sites: {', '.join(sites)})" if sites else ""
    return ("NoiseContrastive found no observed EnergyTilted site in the model" + seen + ": it trains the "
            "energies of observed sites, numpyro.sample / pyro.sample(name, EnergyTilted(...), obs=x); for "
            "tilted priors over latents use Trace_ELBO with the Contrastive or SelfNormalized normalizer")
