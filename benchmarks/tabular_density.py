"""Density estimation on small tabular data sets: energy-tilted Gaussians learned by SNL, NCE and contrastive
divergence, against a Gaussian and a normalising flow (reproduction (a) of the SNL paper, Senetaire et al., at CPU
scale; NumPyro).

Data: scikit-learn's bundled ``load_wine`` (178 x 13) and ``load_breast_cancer`` (569 x 30), all features, no
PCA. Each is split at random (``--seed``) into 60 % train, 20 % validation and 20 % test, standardised with the
training mean and standard deviation, then whitened with the training covariance (:math:`x \\mapsto W x`,
:math:`W = \\Sigma^{-1/2}`): the models are fitted to the whitened data, and every log-likelihood is reported for
the *standardised* data (plus :math:`\\log|\\det W|`), so the Gaussian row is that of the standardised data.
Whitening leaves the comparison unchanged (a fixed linear map shifts every model by the same constant) but lets
isotropic Langevin moves work: breast cancer's standardised features are nearly collinear (covariance
eigenvalues down to about 1e-4), and MALA chains on them barely moved.

Models of the data ``x`` (one observed site, no latents; ``fit(model, None, x_train, ...)``):

- **Gaussian**: the maximum-likelihood Gaussian of the training split (mean and full covariance), closed form;
  after whitening it is :math:`\\mathcal N(0, I)`;
- **EBM**: ``EnergyTilted(EnergyMLP(d, hidden, tanh), base)`` with that Gaussian as the fixed base
  :math:`q`, :math:`p(x) = e^{-E(x)} q(x) / Z`, learned by

  - **SNL**: the ``SelfNormalized`` normalizer (a learned scalar :math:`b`, :math:`\\hat Z` from base draws),
    ``Trace_ELBO``;
  - **NCE**: the ``NoiseContrastive`` loss with the ``LearnedLogZ`` normalizer (a learned constant :math:`c`),
    noise = the base;
  - **contrastive**: the default ``Contrastive`` normalizer with MALA negative samples started at base draws
    (one chain per datum), ``Trace_ELBO`` (the maximum-likelihood gradient);
- **flow**: a masked autoregressive flow (affine; NumPyro's ``InverseAutoregressiveTransform`` used in its
  one-pass density direction, MADE networks from ``numpyro.nn.AutoregressiveNN``, reversals between the layers) on
  a standard normal, maximum likelihood with the same ``fit``.

Training: Adam on the whole training split per update (``--batch-size 0``), the rate decayed by ``--lr-decay`` per
update. Every trained model is early-stopped with one rule: every ``--eval-every`` updates, its validation
log-likelihood is estimated (the EBMs' :math:`\\log Z` by ``AnnealedImportance`` with ``--valid-chains`` chains and
``--valid-temps`` temperatures, a fresh key each time: plain importance sampling from the base misses the narrow
wells some energies grow, which would favour exactly those models) and the best state is kept
(``fit(..., out=..., resume=True)`` continues the same run between checks).

Test log-likelihood per datum, nats. For an EBM, with :math:`\\ell(x) = -E(x) + \\log q(x)` and
:math:`\\hat Z = \\frac1n\\sum_i e^{-E(z_i)}`, :math:`z_i \\sim q` (``Importance(n).estimate``, ``--test-draws``
draws):

- **upper (in expectation)**: :math:`\\ell(x) - \\log \\hat Z`. :math:`\\hat Z` is unbiased, so
  :math:`\\mathbb E[\\log \\hat Z] \\le \\log Z` and this is biased **high** (by about half the squared relative
  error of :math:`\\hat Z`);
- **lower bound**: :math:`\\ell(x) - (b + e^{-b}\\hat Z - 1)`, the SNL bound: for any fixed :math:`b`,
  :math:`\\log Z \\le b + e^{-b} Z - 1`, and the estimate is unbiased, so its expectation is a lower bound on
  the true log-likelihood. :math:`b` is the learned :math:`b` (SNL), the learned :math:`c` (NCE), and for the
  contrastive EBM, which learns no constant, :math:`\\log\\hat Z` from an independent set of as many draws.

A third column checks :math:`\\log Z` independently: :math:`\\ell(x) - \\log\\hat Z_{\\text{AIS}}`, with
``AnnealedImportance(--ais-chains, --ais-temps)`` (MALA moves). The effective sample sizes of both estimates are
given next to them.

± is the standard error over the test points, combined (in quadrature) with the standard error of
:math:`\\log\\hat Z` (delta method) for the EBMs; the paired column is the mean per-point difference to the
Gaussian (upper estimate for the EBMs) with its standard error.

Run: ``.venv/bin/python benchmarks/tabular_density.py`` (about 5 minutes on one core; ``--quick`` for a smoke run
of a few seconds on the wine data; ``--json out.json`` also writes the numbers).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import numpy as np  # noqa: E402

DATASETS = ("wine", "breast_cancer")
METHODS = ("gaussian", "flow", "snl", "nce", "contrastive")
LABELS = {"gaussian": "Gaussian (closed form)", "flow": "flow (MAF)", "snl": "EBM, SNL",
          "nce": "EBM, NCE", "contrastive": "EBM, contrastive (MALA)"}

#: the full run's settings (``--quick`` overrides some of them with QUICK)
#: the full run's settings (``--quick`` overrides some of them with QUICK); batch_size 0 = all training points
DEFAULTS = dict(hidden=64, steps=1500, eval_every=100, batch_size=0, lr=1e-3, lr_decay=0.999, snl_draws=1024,
                nce_noise=8, mala_steps=20, valid_chains=1000, valid_temps=200, test_draws=1_000_000,
                ais_chains=5000, ais_temps=500, flow_layers=3, flow_hidden=32, flow_steps=1000, flow_lr=1e-3)
QUICK = dict(hidden=16, steps=20, eval_every=20, snl_draws=128, mala_steps=5, valid_chains=100, valid_temps=10,
             test_draws=5000, ais_chains=100, ais_temps=10, flow_layers=2, flow_hidden=16, flow_steps=20)
CHUNK = 100_000  # importance draws per call


def load(name: str, seed: int, whiten: bool = True):
    """``(train, valid, test)`` float32 arrays, standardised with the training split's statistics."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    x = getattr(datasets, f"load_{name}")().data.astype(np.float64)
    rest, test = train_test_split(x, test_size=0.2, random_state=seed)
    train, valid = train_test_split(rest, test_size=0.25, random_state=seed)
    mean, sd = train.mean(0), train.std(0)
    train, valid, test = ((a - mean) / sd for a in (train, valid, test))
    if not whiten:
        return tuple(a.astype(np.float32) for a in (train, valid, test)) + (0.0,)
    # whitening by the training covariance: x -> W x with W = Cov^{-1/2} (symmetric); densities of the
    # standardised data are those of the whitened data plus log|det W|
    lam, vec = np.linalg.eigh(np.cov(train.T, bias=True))
    w = (vec / np.sqrt(lam)) @ vec.T
    return tuple((a @ w).astype(np.float32) for a in (train, valid, test)) + (float(-0.5 * np.log(lam).sum()),)


def mean_se(values) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


# --- models ---------------------------------------------------------------------------------------------
def ebm_model(method: str, energy, base, args):
    """``model(x)``: x ~ EnergyTilted(energy, base) observed, with the method's normalizer."""
    import numpyro
    from numpyro.infer import Trace_ELBO

    from tilted_priors.inference.numpyro import NoiseContrastive, register_module
    from tilted_priors.numpyro import MALA, Contrastive, EnergyTilted, LearnedLogZ, SelfNormalized

    normalizer, loss = {
        "snl": (SelfNormalized(args.snl_draws, name="snl_b"), Trace_ELBO()),
        "nce": (LearnedLogZ("log_z"), NoiseContrastive(num_noise=args.nce_noise)),
        "contrastive": (Contrastive(sampler=MALA(args.mala_steps, "auto")), Trace_ELBO()),
    }[method]

    def model(x):
        e = register_module("energy", energy)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", EnergyTilted(e, base, normalizer=normalizer), obs=x)

    return model, loss


def flow_model(d: int, args):
    """``model(x)``: x ~ a masked autoregressive flow on N(0, I), its MADE networks registered with
    ``numpyro.module``."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions.flows import InverseAutoregressiveTransform
    from numpyro.distributions.transforms import PermuteTransform
    from numpyro.nn import AutoregressiveNN

    from jax.example_libraries import stax

    made = AutoregressiveNN(d, [args.flow_hidden] * 2, nonlinearity=stax.Tanh)
    reverse = jnp.arange(d)[::-1]

    def model(x):
        parts = []
        for i in range(args.flow_layers):
            if i:
                parts.append(PermuteTransform(reverse))
            apply = numpyro.module(f"made{i}", made, (d,))
            # x = IAF^{-1}(u): log q(x) needs one MADE pass per layer (IAF(x)); sampling would need d passes
            parts.append(InverseAutoregressiveTransform(apply).inv)
        flow = dist.TransformedDistribution(dist.Normal(jnp.zeros(d), 1.0).to_event(1), parts)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", flow, obs=x)

    return model


def site_dist(model, x, seed: int = 0):
    """The distribution of the observed site ``x`` in one run of a (trained) model on ``x``."""
    from numpyro import handlers

    return handlers.trace(handlers.seed(model, seed)).get_trace(x)["x"]["fn"]


def log_z_importance(tilted, num_draws: int, key):
    """:math:`\\log\\hat Z` from ``num_draws`` base draws (``Importance.estimate`` in chunks, pooled exactly), its
    delta-method standard error and the weights' ESS; ``tilted`` has batch shape ``(1,)``."""
    import jax

    from tilted_priors.numpyro import Importance

    sizes = [CHUNK] * (num_draws // CHUNK) + ([num_draws % CHUNK] if num_draws % CHUNK else [])
    log_means, sds, ess_sum, n_all = [], [], [], []
    for size, k in zip(sizes, jax.random.split(key, len(sizes))):
        est = Importance(size).estimate(tilted, k)
        log_means.append(float(est.log_z[0]))
        # sd(w) / mean(w) of the chunk, from its delta-method error; ESS = n / (1 + cv^2)
        sds.append(float(est.stderr[0]) * math.sqrt(size))
        ess_sum.append(float(est.ess[0]))
        n_all.append(size)
    log_means, cv, n_all = np.array(log_means), np.array(sds), np.array(n_all, np.float64)
    shift = log_means.max()
    means = np.exp(log_means - shift)  # chunk means of the weights, relative
    total = n_all.sum()
    mean = float((n_all * means).sum() / total)
    second = float((n_all * means ** 2 * (cv ** 2 * (n_all - 1) / n_all + 1.0)).sum() / total)
    var = max(second - mean ** 2, 0.0)
    log_z = shift + math.log(mean)
    return log_z, math.sqrt(var / total) / mean, total * mean ** 2 / second


# --- training with early stopping -------------------------------------------------------------------------
def train(model, loss, x_train, valid_score, args, steps: int, lr: float):
    """``fit`` in chunks of ``eval_every`` updates (one run, resumed), keeping the state with the best validation
    score. Returns ``(best FitResult, best step, scores by step, train seconds, check seconds)``."""
    from tilted_priors.inference.numpyro import TrainingDiverged, fit

    best, best_step, best_score, scores = None, 0, -math.inf, {}
    t_train = t_check = 0.0
    error = None
    batch = len(x_train) if args.batch_size <= 0 else min(args.batch_size, len(x_train))
    with tempfile.TemporaryDirectory() as out:
        for step in range(args.eval_every, steps + 1, args.eval_every):
            t0 = time.perf_counter()
            try:
                result = fit(model, None, x_train, num_steps=step, batch_size=batch,
                             lr=lr, betas=(0.9, 0.999), lr_decay=args.lr_decay, loss=loss, seed=args.seed, out=out,
                             resume=True, checkpoint_every=10 ** 9, progress=False)
            except TrainingDiverged as err:
                error = f"diverged before update {step}: {str(err).splitlines()[0]}"
                t_train += time.perf_counter() - t0
                break
            t1 = time.perf_counter()
            score = valid_score(result, step)
            t_check += time.perf_counter() - t1
            t_train += t1 - t0
            scores[step] = score
            if np.isfinite(score) and score > best_score:
                best, best_step, best_score = result, step, score
    return best, best_step, scores, t_train, t_check, error


# --- one data set -------------------------------------------------------------------------------------------
def run_dataset(name: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpyro.distributions as dist

    from tilted_priors.inference.numpyro.handlers import find_tilted
    from tilted_priors.numpyro import AnnealedImportance, ChainDivergenceError, EnergyMLP, LearnedLogZ, SelfNormalized

    x_train, x_valid, x_test, log_det = load(name, args.seed)
    d = x_train.shape[1]
    # the maximum-likelihood Gaussian of the whitened training data is N(0, I) (mean 0, covariance I exactly)
    base = dist.Normal(jnp.zeros(d), 1.0).to_event(1)
    xv, xt = jnp.asarray(x_valid), jnp.asarray(x_test)
    out = {"n": [len(x_train), len(x_valid), len(x_test)], "d": d, "log_det_whitening": log_det, "methods": {}}
    gauss_test = np.asarray(base.log_prob(xt), np.float64) + log_det
    rows = out["methods"]
    rows["gaussian"] = {"test_points": gauss_test.tolist(), "lower": mean_se(gauss_test),
                        "upper": mean_se(gauss_test), "valid": float(base.log_prob(xv).mean()) + log_det}
    key = jax.random.PRNGKey(args.seed + 1000)

    def tilted_of(result):
        return find_tilted(site_dist(result.model, xt[:1]))

    for method in args.methods:
        if method == "gaussian":
            continue
        t_start = time.perf_counter()
        if method == "flow":
            model, loss, steps, lr = flow_model(d, args), None, args.flow_steps, args.flow_lr

            def valid_score(result, step):
                return float(site_dist(result.model, xv).log_prob(xv).mean()) + log_det
        else:
            energy = EnergyMLP(d, args.hidden, activation=jnp.tanh, rngs=args.seed)
            model, loss = ebm_model(method, energy, base, args)
            steps, lr = args.steps, args.lr

            def valid_score(result, step):
                tilted = tilted_of(result)
                try:
                    est = AnnealedImportance(args.valid_chains, args.valid_temps).estimate(
                        tilted, jax.random.fold_in(key, step))
                except ChainDivergenceError:
                    return -math.inf
                return float(tilted.log_tilted(xv).mean()) - float(est.log_z[0]) + log_det

        best, best_step, scores, t_train, t_check, error = train(model, loss, x_train, valid_score, args, steps, lr)
        row = {"best_step": best_step, "valid_curve": scores, "train_s": t_train, "check_s": t_check,
               "error": error}
        if best is None:
            row.update(lower=(math.nan, math.nan), upper=(math.nan, math.nan))
            rows[method] = row
            continue
        row["valid"] = scores[best_step]
        if method == "flow":
            test = np.asarray(site_dist(best.model, xt).log_prob(xt), np.float64) + log_det
            row.update(test_points=test.tolist(), lower=mean_se(test), upper=mean_se(test))
        else:
            tilted = tilted_of(best)
            k_test, k_b = jax.random.split(jax.random.fold_in(key, 10 ** 6))
            log_z, se_log_z, ess = log_z_importance(tilted, args.test_draws, k_test)
            if isinstance(tilted.normalizer, SelfNormalized):
                b, b_from = float(tilted.normalizer.b_value(tilted)), "learned b"
            elif isinstance(tilted.normalizer, LearnedLogZ):
                b, b_from = float(tilted.normalizer.term(tilted)), "learned c"
            else:
                b, b_from = log_z_importance(tilted, args.test_draws, k_b)[0], "independent IS"
            ell = np.asarray(tilted.log_tilted(xt), np.float64) + log_det
            upper = ell - log_z
            # SNL bound term b + exp(-b) Zhat - 1 and its error: d/dlogZ = Zhat e^{-b}
            term = b + math.exp(log_z - b) - 1.0
            lower = ell - term
            mu, se = mean_se(upper)
            lo_mu, lo_se = mean_se(lower)
            row.update(test_points=upper.tolist(), upper=(mu, math.hypot(se, se_log_z)),
                       lower=(lo_mu, math.hypot(lo_se, math.exp(log_z - b) * se_log_z)),
                       log_z=log_z, log_z_se=se_log_z, ess=ess, b=b, b_from=b_from)
            try:  # a check of log Z by annealed importance sampling (MALA moves), independent of the draws above
                ais = AnnealedImportance(args.ais_chains, args.ais_temps).estimate(tilted, jax.random.fold_in(key, 7))
                ais_log_z, ais_se = float(ais.log_z[0]), float(ais.stderr[0])
                row.update(ais_log_z=ais_log_z, ais_se=ais_se, ais_ess=float(ais.ess[0]),
                           ais_ll=(float(np.mean(ell)) - ais_log_z, math.hypot(se, ais_se)))
            except ChainDivergenceError as err:
                row["ais_error"] = str(err).splitlines()[0]
        row["total_s"] = time.perf_counter() - t_start
        rows[method] = row
        print(f"[{name}] {method}: update {best_step} selected, {row['total_s']:.0f} s", file=sys.stderr, flush=True)
    for method, row in rows.items():
        if "test_points" in row and method != "gaussian":
            diff = np.asarray(row["test_points"]) - gauss_test
            row["vs_gaussian"] = mean_se(diff)
    return out


# --- output -----------------------------------------------------------------------------------------------------
def _pm(pair, digits=2) -> str:
    mu, se = pair
    return "n/a" if not np.isfinite(mu) else f"{mu:.{digits}f} ± {se:.{digits}f}"


def paired_line(rows: dict, pairs, what: str) -> list[str]:
    """A line of paired differences (mean ± standard error over the test points) between pairs of models."""
    diffs = [f"{LABELS[a]} − {LABELS[b]}: "
             f"{_pm(mean_se(np.subtract(rows[a]['test_points'], rows[b]['test_points'])))}"
             for a, b in pairs if "test_points" in rows.get(a, {}) and "test_points" in rows.get(b, {})]
    return [f"\nPaired differences of the {what}, per point: " + "; ".join(diffs) + "."] if diffs else []


def table(results: dict, args) -> str:
    lines = []
    for name, res in results.items():
        n_train, n_valid, n_test = res["n"]
        lines.append(f"\n**{name}** (d = {res['d']}; {n_train} train / {n_valid} validation / {n_test} test points)\n")
        lines.append("| model | test LL, lower bound | test LL, upper (in expectation) | test LL, AIS log Ẑ "
                     "| − Gaussian (paired) | log Ẑ, IS (ESS) | log Ẑ, AIS (ESS) | b | selected update "
                     "| train (s) |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for method in METHODS:
            row = res["methods"].get(method)
            if row is None:
                continue
            if row.get("error") and "test_points" not in row:
                lines.append(f"| {LABELS[method]} | failed | failed | | | | | | | {row['train_s']:.0f} |")
                continue
            exact = method in ("gaussian", "flow")
            lower = _pm(row["lower"]) + (" (exact)" if exact else "")
            upper = _pm(row["upper"]) + (" (exact)" if exact else "")
            paired = _pm(row["vs_gaussian"]) if "vs_gaussian" in row else ""
            log_z = f"{row['log_z']:.3f} ± {row['log_z_se']:.3f} ({row['ess']:.0f})" if "log_z" in row else ""
            b = f"{row['b']:.3f} ({row['b_from']})" if "b" in row else ""
            ais = (f"{row['ais_log_z']:.3f} ± {row['ais_se']:.3f} ({row['ais_ess']:.0f})" if "ais_log_z" in row else
                   "diverged" if "ais_error" in row else "")
            ais_ll = _pm(row["ais_ll"]) if "ais_ll" in row else ""
            step = str(row.get("best_step", "")) if method != "gaussian" else ""
            secs = f"{row['train_s']:.0f}" if "train_s" in row else ""
            lines.append(f"| {LABELS[method]} | {lower} | {upper} | {ais_ll} | {paired} | {log_z} | {ais} | {b} "
                         f"| {step} | {secs} |")
        lines.extend(paired_line(res["methods"], (("snl", "nce"), ("snl", "contrastive"), ("snl", "flow")),
                                 "test LL (upper estimates for the EBMs)"))
        notes = [f"{LABELS[m]}: {r['error']}" for m, r in res["methods"].items() if r.get("error")]
        if notes:
            lines.append("\n" + "; ".join(notes))
    return "\n".join(lines)


def versions() -> str:
    import flax
    import jax
    import numpyro
    import sklearn

    return (f"numpyro {numpyro.__version__}, jax {jax.__version__}, flax {flax.__version__}, scikit-learn "
            f"{sklearn.__version__}, Python {platform.python_version()}, {platform.machine()}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (wine, tiny settings)")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=None)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seed", type=int, default=0, help="split, initial weights, minibatches and draws")
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=None, help=f"default {v}")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, QUICK.get(k, v) if args.quick else v)
    if args.datasets is None:
        args.datasets = ["wine"] if args.quick else list(DATASETS)
    t0 = time.perf_counter()
    results = {name: run_dataset(name, args) for name in args.datasets}
    elapsed = time.perf_counter() - t0
    settings = ", ".join(f"{k}={getattr(args, k)}" for k in DEFAULTS)
    print(f"# Tabular density estimation (seed {args.seed}; {settings})")
    print(f"# {versions()}; {elapsed:.0f} s in all")
    print(table(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": {k: getattr(args, k) for k in DEFAULTS}, "seed": args.seed,
                       "elapsed_s": elapsed, "versions": versions(), "results": results}, f, indent=1,
                      default=float)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
