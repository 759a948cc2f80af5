"""Backend-free parts of the SIR sampler (:mod:`tilted_priors.pyro.sir`, :mod:`tilted_priors.numpyro.sir`): its
error messages and argument check."""
from __future__ import annotations

__all__ = ["needs_base_message", "bad_weights_message", "check_tilted"]


def check_tilted(dist, who: str) -> None:
    """Raise ``TypeError`` unless ``dist`` is a tilted distribution (it has a ``base`` and an energy): what SIR
    draws from.

    Examples
    --------
    >>> check_tilted([1.0], "SIR.sample_tilted")
    Traceback (most recent call last):
    ...
    TypeError: SIR.sample_tilted: dist must be a tilted distribution (EnergyTilted, ...
    """
    if not (hasattr(dist, "base") and callable(getattr(dist, "_energy", None))):
        raise TypeError(f"{who}: dist must be a tilted distribution (EnergyTilted, EnergyTiltedNormal), whose base "
                        f"it draws from, got {type(dist).__name__}")


def needs_base_message(call: str) -> str:
    """Why ``SIR.run`` cannot work: it draws from a distribution's base, which a bare log density does not give.

    Examples
    --------
    >>> needs_base_message("run(log_density, init)").startswith("SIR.run(log_density, init)")
    True
    """
    return (f"SIR.{call} got a bare log density, but SIR draws its proposals from a tilted distribution's base q "
            "and weights them by exp(-E): it needs the distribution itself. Use it as a distribution's sampler "
            "(EnergyTilted(..., sampler=SIR(1000))), inside Contrastive(sampler=SIR(1000)), with the sampler "
            "handler, or call SIR.sample_tilted on the distribution; for a log density with no base (a posterior, "
            "a guide's chains) use ShortRunLangevin or MALA")


def bad_weights_message(num_bad: int, num_draws: int, num_proposals: int) -> str:
    """The error for non-finite importance weights (an energy that is nan or -inf, or +inf at every proposal).

    Examples
    --------
    >>> bad_weights_message(2, 10, 100).startswith("SIR: 2 of the 10 draws")
    True
    """
    return (f"SIR: {num_bad} of the {num_draws} draws got unusable weights exp(-E) from their {num_proposals} "
            "proposals (the energy was nan or -inf at some proposal, or +inf at all of them); check that the "
            "energy is finite on the base's support")
