r"""The settings of ``step_size="auto"`` shared by both backends' samplers (plain Python, no array library).

A Langevin sampler run with ``step_size="auto"`` scales its step size :math:`h` to the target and adapts it within
each ``run``:

1. **Initial scale.** The gradient's local Lipschitz constant :math:`\hat L` is measured at the starting points
   by two power-iteration probes per chain, :math:`\|\nabla\log\pi(z + \delta) - \nabla\log\pi(z)\| / \|\delta\|`
   (the second :math:`\delta` along the first gradient difference), with :math:`\|\delta\|` a hundredth of the
   chains' spread (:data:`PROBE_RADIUS`; of :math:`1 + |z|` when all chains start at one point); :math:`\hat L`
   is the largest ratio over the chains. Then :math:`h_0 = \min(1, c)/\sqrt{\hat L}` (the standard deviation of a
   Gaussian of that curvature, at most the cap below; where :math:`\hat L` is 0 or not finite, the chains'
   spread, or 1).
2. **Warm-up.** During the first :func:`warmup_steps` steps (half of them) each step computes the
   Metropolis-Hastings acceptance probability :math:`\alpha` of every chain's Langevin proposal and accepts or
   rejects the move with it, for ULA too (for ULA :math:`\alpha` measures its discretisation error; rejecting
   during the warm-up keeps a chain that starts far out in a flat region, where the probe sees little curvature
   and the first steps are huge, from jumping to where the density overflows), and moves :math:`\log h` by
   Robbins-Monro towards the target acceptance
   :math:`\alpha^*` (:data:`TARGET_ACCEPT`):

   .. math:: \log h_{t+1} = \min\Bigl(\log h_t + \frac{e_t}{\sqrt t},\ \log\frac{c}{\sqrt{\hat L}}\Bigr),
             \qquad e_t = \begin{cases} (\bar\alpha_t - \alpha^*) / (1 - \alpha^*) & \bar\alpha_t > \alpha^* \\
             (\bar\alpha_t - \alpha^*) / \alpha^* & \text{otherwise} \end{cases}

   with :math:`\bar\alpha_t` the mean over the chains and :math:`c` the cap of :data:`STABILITY_CAP`: ULA never
   steps beyond :math:`0.8/\sqrt{\hat L}`, where its stationary variance on a Gaussian is at most
   :math:`1/(1 - 0.8^2/4) = 1.19` times the truth along the stiffest direction.
3. **Fixed.** The curvature is probed again where the warm-up has brought the chains and caps :math:`h` once more
   (:math:`h \le c/\sqrt{\hat L}`; far starting points can see much less curvature than the typical set). The
   remaining steps run with that :math:`h`, which ``SamplerInfo.step_size`` reports (and the
   acceptance rate is averaged over these steps only).

The stability rule behind the cap and behind the step size a :class:`~tilted_priors.ChainDivergenceError`
suggests: on a quadratic log density of curvature :math:`L` a Langevin step multiplies the distance to the mode by
:math:`1 - h^2 L / 2`, so the chain is stable only for :math:`h < 2/\sqrt L`; :func:`suggested_step_size` gives
half of that, :math:`1/\sqrt{\hat L}` (a margin for a probe that underestimates :math:`L`), and at most half the
step size that diverged.

**Runaway chains.** An unstable step need not overflow: on a quadratic it multiplies the distance to the mode by
:math:`|1 - h^2 L/2|` per step, and the chains can end at :math:`10^{10}` in float32 (:math:`10^{100}` in float64)
with a finite log density. Every sampler therefore checks its final positions :math:`z` once per ``run`` (one
reduction on the device, read with the divergence check: no per-step synchronisation) and calls the chains *out
of range* when

- the log density is that of a tilted distribution (its ``annealed_log_density``), whose base has a finite mean
  :math:`m` and standard deviation :math:`s`: :math:`\max_i |z_i - m_i| / s_i > R`, the chains :math:`R` base
  standard deviations out (a tilt that moves the mass that far would cost :math:`R^2/2 = 5\cdot 10^{11}` nats of
  base density);
- otherwise: :math:`\max_i |z_i| > R\,(1 + \max_i |z_{0,i}|)`, :math:`z_0` the initial positions (the ``1 +``
  keeps chains started at 0, or with a tiny jitter, from being judged on a scale of 0),

with :math:`R` = :data:`RANGE_FACTOR` :math:`= 10^6`, far beyond any draw of a proper target started from
reasonable points and far below where float32 overflows. They then warn with
:class:`~tilted_priors.ChainRangeWarning` (``strict=True``: raise :class:`~tilted_priors.ChainDivergenceError`).
A :class:`Persistent` sampler keeps the :math:`z_0` of its first call (a slow drift over many calls is seen too).
"""
from __future__ import annotations

import math
from numbers import Real

from tilted_priors._validation import check_probability, check_step_size

__all__ = ["AUTO", "TARGET_ACCEPT", "STABILITY_CAP", "PROBE_RADIUS", "warmup_steps", "check_step_size_or_auto",
           "check_target_accept", "format_step_size", "suggested_step_size", "STUCK_RATIO", "stuck_message",
           "RANGE_FACTOR"]

#: The value of ``step_size`` that asks for adaptation.
AUTO = "auto"

#: Default target acceptance per kind of chain: MALA's asymptotically optimal 0.574 (Roberts & Rosenthal 1998);
#: for ULA, whose acceptance is only measured, 0.95 — about LEBM's 0.4 on a standard normal in 100 dimensions, and
#: a stationary variance at most about 15% too wide in the stiffest direction at low dimension.
TARGET_ACCEPT = {"mala": 0.574, "ula": 0.95}

#: ``h <= cap / sqrt(L)`` during warm-up. ULA: 0.8 (0.4 of the stability bound 2 / sqrt(L); a stationary variance at
#: most 19% too wide); MALA: 2.5 (rejections keep it stable; the cap stops a chain far from the typical set, whose
#: proposals are all accepted, from growing h).
STABILITY_CAP = {"mala": 2.5, "ula": 0.8}

#: Size of the probe displacement relative to the chains' spread.
PROBE_RADIUS = 1e-2

#: Chains farther out than this many reference scales have run away (see "Runaway chains" above).
RANGE_FACTOR = 1e6


def warmup_steps(steps: int) -> int:
    """Steps that adapt ``h`` out of ``steps``: the first half (none for a one-step chain).

    Examples
    --------
    >>> warmup_steps(20), warmup_steps(1)
    (10, 0)
    """
    return steps // 2


def check_step_size_or_auto(value, name: str = "step_size") -> float | str:
    """Return ``value`` as a float, or ``"auto"``; raise ``ValueError`` for anything else.

    Examples
    --------
    >>> check_step_size_or_auto("auto"), check_step_size_or_auto(1)
    ('auto', 1.0)
    """
    if isinstance(value, str):
        if value == AUTO:
            return AUTO
        raise ValueError(f"{name} must be a finite positive number or 'auto' (adapted to the target in each run), "
                         f"got {value!r}")
    try:
        return check_step_size(value, name)
    except ValueError:
        raise ValueError(f"{name} must be a finite positive number or 'auto' (adapted to the target in each run), "
                         f"got {value!r}") from None


def check_target_accept(value, step_size, kind: str) -> float:
    """The target acceptance of an ``"auto"`` step size: ``value`` in (0, 1), or the default of ``kind``.

    Raises ``ValueError`` when ``value`` is given with a fixed step size (it would be ignored).

    Examples
    --------
    >>> check_target_accept(None, "auto", "mala"), check_target_accept(0.8, "auto", "ula")
    (0.574, 0.8)
    """
    if value is None:
        return TARGET_ACCEPT[kind]
    if step_size != AUTO:
        raise ValueError(f"target_accept={value!r} only applies to step_size='auto' (got step_size={step_size!r}): "
                         "drop target_accept or set step_size='auto'")
    return check_probability(value, "target_accept")


def format_step_size(step_size) -> str:
    """``0.4`` or ``'auto'``, as a repr shows it.

    Examples
    --------
    >>> format_step_size(0.4), format_step_size("auto")
    ('0.4', "'auto'")
    """
    return repr(step_size) if isinstance(step_size, str) else f"{step_size:g}"


def suggested_step_size(lipschitz: float | None, step_size) -> float | None:
    r"""A step size within the measured stability bound: :math:`\min(1/\sqrt{\hat L}, h/2)`.

    ``lipschitz`` is :math:`\hat L` (``None``, 0 or non-finite: unknown), ``step_size`` the one that diverged (a
    number, or ``"auto"`` when its adapted value is unknown). ``None`` when neither gives a bound.

    Examples
    --------
    >>> suggested_step_size(100.0, 0.4), suggested_step_size(1.0, 0.4), suggested_step_size(None, "auto")
    (0.1, 0.2, None)
    """
    candidates = []
    if isinstance(lipschitz, Real) and math.isfinite(lipschitz) and lipschitz > 0:
        candidates.append(1.0 / math.sqrt(lipschitz))
    if isinstance(step_size, Real) and not isinstance(step_size, bool) and math.isfinite(step_size) and step_size > 0:
        candidates.append(step_size / 2)
    return min(candidates) if candidates else None


#: A posterior chain whose root-mean-square displacement is below this fraction of its starting points' spread has
#: not moved (``ShortRunPosterior`` warns).
STUCK_RATIO = 1e-3


def stuck_message(who: str, displacement: float, scale: float, sampler) -> str | None:
    """The warning for a chain that moved ``displacement`` (root mean square) against a spread ``scale`` of its
    starting points, or ``None`` when it moved enough (or the spread is unknown: 0 or not finite).

    Examples
    --------
    >>> stuck_message("ShortRunPosterior", 1e-5, 1.0, None) is not None, stuck_message("G", 0.5, 1.0, None)
    (True, None)
    """
    if not (math.isfinite(scale) and scale > 0 and math.isfinite(displacement)):
        return None
    if displacement >= STUCK_RATIO * scale:
        return None
    step_size, steps = getattr(sampler, "step_size", None), getattr(sampler, "steps", None)
    now = []
    if isinstance(step_size, (Real, str)):
        now.append(f"step_size={format_step_size(step_size)}")
    if isinstance(steps, int):
        now.append(f"steps={steps}")
    settings = f" (now {', '.join(now)})" if now else ""
    auto = "" if step_size == AUTO else ", or step_size='auto' (scaled to the posterior in each call)"
    return (f"{who}: the posterior chain hardly moved: it moved {displacement:.3g} (root mean square) against a spread "
            f"of {scale:.3g} of its starting points, under {STUCK_RATIO:g} of it, so the guide returns about its "
            f"starting points and the model learns little from them. Increase the sampler's step_size or steps"
            f"{settings}{auto}.")
