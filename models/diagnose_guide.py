"""The explanations ``diagnose`` writes under its tables (``diagnostics.md``): what each column and line measures,
which direction is good, the thresholds, and why some numbers have a floor above 1 (R-hat of short chains, nested
R-hat), built from the report's own settings and numbers (see :mod:`tilted_priors.models.diagnose`)."""
from __future__ import annotations

import numpy as np

__all__ = ["prior_guide", "posterior_guide"]


def prior_guide(report, coupling, num_starts: int, chains_per_start: int) -> list[str]:
    """How to read the prior's table of ``diagnostics.md`` and the lines below it, with this report's numbers.

    Parameters
    ----------
    report : ShortVsLongReport
        What :func:`tilted_priors.inference.diagnostics.short_vs_long` returned for the prior's chains.
    coupling : CouplingBound or None
        The prior sampler's coupling bound, ``None`` when it was skipped.
    num_starts, chains_per_start : int
        The N(0, I) starts and the chains per start of the report.

    Returns
    -------
    list of str
        Markdown lines: a paragraph, then one bullet per column and per line under the table.
    """

    def recorded(steps: np.ndarray) -> str:
        half = steps[len(steps) // 2:]
        gaps = np.unique(np.diff(half))
        every = f"{int(gaps[0])}" if len(gaps) == 1 else f"{int(gaps.min())}-{int(gaps.max())}"
        return (f"the {len(half)} states recorded at steps {int(half[0])} to {int(half[-1])} (every {every} "
                f"steps), each chain split into two halves of {len(half) // 2} states")

    alpha, short_steps = report.alpha, int(report.short_steps[-1])
    lines = [
        "**How to read this table.** Each row compares the final states of the "
        f"{report.short.shape[0]} chains ({num_starts} N(0, I) starts x {chains_per_start} chains) after the short "
        f"run ({short_steps} steps) and after the long run ({int(report.long_steps[-1])} steps). A row `latent j` is "
        "coordinate j of z; the row `energy` is -log pi(z) = E(z) - log N(z; 0, I) at the final state "
        "(unnormalised: only differences matter; lower is more probable).", "",
        "- **mean short, mean long**: the mean over the chains' final states. Good: equal up to Monte Carlo noise "
        "(see z).",
        "- **z**: (mean short - mean long) divided by its standard error, sqrt(var short / n + var long / n) for n "
        "chains, treating the chains as independent. When both runs reach the same law it is roughly standard "
        "Normal: |z| under 2 is noise, |z| over 3 says the short run's mean is off. Chains that share a start are "
        "not quite independent after a short run, so z is a rough guide, and over many rows an |z| above 2 now "
        "and then is expected by chance.",
        "- **sd short, sd long**: the standard deviation over the final states. Good: equal. A smaller sd short "
        "means the short run is too narrow (it misses part of the prior), a larger one that it is too spread out.",
        "- **R-hat between**: rank-normalised split R-hat of two \"chains\", the short run's final states and the "
        "long run's (in random order). About 1 when both runs reach the same law; above about 1.01 (the threshold "
        "of Vehtari et al. 2021) they likely differ. With few chains it is noisy: the energy-distance test below "
        "is the verdict.",
        "- **R-hat short, R-hat long**: rank-normalised split R-hat of each run's own chains over the second half of "
        f"its recorded trajectory: for the short run {recorded(report.short_steps)}; for the long run "
        f"{recorded(report.long_steps)}. R-hat long at most 1.01 says the long run has mixed; above that it is not a "
        "reliable reference (raise `long_steps`). **R-hat short has a floor above 1 even when the short run's final "
        f"states have exactly the right law**: each short chain is only {short_steps} steps long, so the states it "
        "is judged on are a few strongly correlated states a few small Langevin steps apart. Their within-chain "
        "variance W is much smaller than the spread of the prior, while the between-chain variance B comes from "
        "chains that started at independent N(0, I) points, and R-hat = sqrt((n - 1)/n + B/(n W)) is then well "
        "above 1. A short-run sampler is a generator of samples, not a chain meant to mix, so a large R-hat short "
        "is expected and is no verdict: judge the short run by R-hat between, the energy distance, the KSD and "
        "nR-hat against its baseline. The same floor shows in R-hat long when its recorded states are only a few "
        "steps apart (a small `long_steps`).",
    ]
    baseline = report.nested_rhat_baseline
    if baseline is not None:
        lines.append(
            "- **nR-hat short, nR-hat long**: nested R-hat (Margossian et al. 2022) of each run's final states, the "
            f"{chains_per_start} chains of each start forming a super-chain: sqrt(1 + B/W), B the variance of the "
            "super-chains' mean final states, W the variance of the final states within a super-chain. It asks "
            "whether the chains have forgotten where they started. It too has a floor above 1: with one final state "
            "per chain, chains that have completely forgotten their start still give B about sigma^2/M and W about "
            f"sigma^2 (M = {chains_per_start} chains per start), so the value to compare with is the baseline "
            f"sqrt(1 + 1/M) = {baseline:.3f} (`nested_rhat_baseline` in diagnostics.json), not 1. Near the baseline: "
            "the final states no longer depend on the start; clearly above it, in most coordinates: they still do "
            "(expected of a short run from N(0, I) starts that has not reached the prior; a problem for the long "
            "run, the reference). With few starts the values scatter around the baseline by chance.")
    lines.append(
        f"- **Energy distance** (the line under the table): the distance between the laws of the short and the long "
        "run's final states (0 only for equal laws), with a permutation p-value: the share of random relabellings of "
        "the pooled states that give at least as large a distance. The final states **differ** when the p-value is "
        f"below {alpha:g}; a larger p-value with few chains does not prove the laws equal.")
    if report.ksd_short is not None:
        lines.append(
            "- **Kernel Stein discrepancy (KSD)**: how far each run's final states are from the tilted prior itself, "
            "from the prior's score (gradient of its log density; IMQ kernel), so it needs no long run. Lower is "
            "better, but for a finite sample it is never exactly 0 and it is not scale-free: compare the short run "
            "with the long one. Its bootstrap p-value tests \"the final states are independent draws from the "
            f"prior\": below {alpha:g}, they are not (\"not from the target\"). Chains that share a start are not "
            "independent after a short run, which makes this p-value smaller than it should be.")
    if coupling is not None:
        lines.append(
            f"- **Coupling bound**: from {coupling.num_pairs} pairs of coupled chains with lag {coupling.lag} "
            "(Biswas, Jacob and Vanetti 2019), an upper bound on the total variation distance between the law of "
            "the short-run sampler after t steps and its own stationary law (0: the start is forgotten; 1 says "
            f"nothing). Good: under 0.1 by the short run's {short_steps} steps; \"N steps bring it under 0.1\" says "
            "how many steps that takes. It is an estimate (a mean over the pairs, with its standard error in "
            "diagnostics.json) and can exceed 1. It bounds the distance to the short-run sampler's own stationary "
            "law, which differs from the tilted prior by a bias of order the squared step size: it says whether the "
            "short run forgets its start, not whether it is unbiased (the energy distance and the KSD say that). "
            f"When a pair did not meet within the budget ({coupling.max_steps} steps) the bound is infinite and no "
            "step count is given: raise `coupling_steps`.")
    return lines


def posterior_guide(d: int, short_chains: int, num_chains: int, num_samples: int) -> list[str]:
    """How to read the posterior's table of ``diagnostics.md``.

    Parameters
    ----------
    d : int
        The latent dimension.
    short_chains, num_chains, num_samples : int
        The short-run guide's chains per image; the MALA and NUTS chains and draws per chain.

    Returns
    -------
    list of str
        Markdown lines: a paragraph, then one bullet per column.

    Examples
    --------
    >>> lines = posterior_guide(16, 200, 2, 200)
    >>> lines[0].startswith("**How to read this table.**") and any("**KSD p**" in line for line in lines)
    True
    """
    return [
        "**How to read this table.** One row per test image and method; NUTS is the reference for max mean diff "
        "/ NUTS sd, median sd / NUTS sd and p vs NUTS.", "",
        f"- **draws**: the draws pooled in the row: the final state of each of the {short_chains} independent "
        f"chains of the short-run guide; {num_chains} chains x {num_samples} draws of MALA and of NUTS.",
        f"- **max mean diff / NUTS sd**: the largest, over the {d} latent coordinates, of |posterior mean - NUTS's "
        "posterior mean| / NUTS's posterior sd (0 for NUTS itself). Good: near 0. Monte Carlo error alone gives "
        "about sqrt(1/ESS + 1/ESS of NUTS) per coordinate (more for the largest of several), so a few tenths can "
        "be noise with few effective draws; above 1 the method's posterior is centred more than a posterior sd "
        "away from NUTS's.",
        "- **median sd / NUTS sd**: the median, over the coordinates, of the ratio of posterior sds. Good: 1. "
        "Below 1 the method is too narrow (a chain stuck in one mode, a collapsed guide), above 1 too wide (a "
        "guide that has not contracted from its noise starts).",
        "- **KSD**: the kernel Stein discrepancy of the method's draws (thinned to about one per effective sample) "
        "against the posterior itself, from the score in z of the unnormalised log joint log p(x, z) (IMQ kernel). "
        "Lower is better, but for a finite sample it is never exactly 0 and it is not scale-free: compare methods "
        "on the same image, minding their numbers of draws (fewer draws give larger values).",
        "- **KSD p**: the wild-bootstrap p-value of \"these draws are independent draws from the posterior\". "
        "Below 0.05 (0.01 for a stricter reading) they are not; a large p-value from few draws is weak evidence. "
        "It needs no reference, so it judges NUTS as well.",
        "- **p vs NUTS**: the permutation p-value (100 permutations, so never below about 0.01) of the energy "
        "distance between the method's thinned draws and NUTS's. Below 0.05 the method's draws differ from "
        "NUTS's; empty for NUTS itself.",
        "- **max R-hat**: the largest, over the coordinates, of the rank-normalised split R-hat of the method's "
        f"{num_chains} chains (MALA and NUTS; empty for the short-run guide, whose chains hold one draw each). "
        "Good: at most 1.01 (Vehtari et al. 2021); above that the chains disagree and have not mixed (raise the "
        "warm-up and the draws; for NUTS the reference itself is then in doubt). nan: undefined, e.g. chains that "
        "did not move.",
        "- **min ESS bulk**: the smallest, over the coordinates, of the bulk effective sample size: how many "
        "independent draws the chains are worth. Larger is better; Vehtari et al. (2021) ask for at least 100 per "
        "chain before trusting R-hat and the means. The KSD and p-value columns use about this many thinned draws, "
        "so a small ESS also makes those tests weak.",
    ]
