"""EBM regression: a conditional energy tilting a Gaussian regression, learned by SNL and NCE, against a Gaussian
regression and a mixture density network (reproduction (b) of the SNL paper, Senetaire et al., at CPU scale;
NumPyro).

Data:

- **toy**: :math:`x \\sim U(-3, 3)`, and :math:`y \\mid x` a two-component Gaussian mixture whose modes part and
  whose widths grow with :math:`x` (bimodal, heteroscedastic; :func:`toy_log_density` is the true density, so the
  true test NLL is reported too). 1,000 train / 500 validation / 1,000 test points;
- **diabetes**: scikit-learn's bundled ``load_diabetes`` (442 x 10), split at random 60 / 20 / 20 %, inputs and
  target standardised with the training split's statistics (so the NLL is in units of the standardised target).

Models of :math:`y \\mid x` (no latents; ``fit(model, None, arrays, ...)`` with several arrays):

- **Gaussian regression**: an MLP for :math:`(\\mu(x), \\log s(x))`, maximum likelihood;
- **MDN**: an MLP for the weights, means and log-scales of ``--components`` Gaussians, maximum likelihood;
- **EBM**: :math:`p(y \\mid x) \\propto e^{-E(y, x)}\\, \\mathcal N(y; \\mu(x), (k\\, s(x))^2)`, the trained Gaussian
  regression widened by :math:`k` = ``--base-widen`` as the fixed base (its :math:`\\mu, s` enter the model as
  data arrays), ``EnergyTilted(EnergyMLP(1, hidden, tanh, context_dim=c), base, context=x)``, learned by

  - **SNL**: ``SelfNormalized(draws, b=b_net)``, an **amortised** :math:`b(x)` (an MLP, trained with the energy):
    ``fit`` shuffles the rows, so a per-row :math:`b` (``b="per_row"``, for fixed rows) does not apply;
  - **NCE**: the ``NoiseContrastive`` loss with ``LearnedLogZ``: one constant :math:`c`, the noise being the base
    (so the conditional energy has to absorb :math:`\\log Z(x)` itself).

Training: Adam on minibatches of ``--batch-size`` rows, ``--steps`` updates at ``--lr`` (the toy); diabetes' 264
training rows are overfitted within a few hundred updates at that rate, so it runs ``DIABETES``'s shorter
schedule (1,000 updates at 3e-4, checked every 100) unless those options are given. Every model is early-stopped
with one rule: every ``--eval-every`` updates its validation NLL is estimated (the EBMs' :math:`\\log Z(x)` per row
by ``Importance`` with ``--valid-draws`` base draws) and the best state is kept.

Test NLL per datum. For an EBM, :math:`\\log \\hat Z(x)` per test row from ``--test-draws`` base draws
(``Importance(n).estimate``); with :math:`\\ell = -E(y, x) + \\log q(y \\mid x)`:

- **IS**: :math:`-(\\ell - \\log \\hat Z(x))`, biased **low** in expectation (:math:`\\log \\hat Z` is biased low);
- **SNL bound**: :math:`-(\\ell - b - e^{-b}\\hat Z(x) + 1)`, an unbiased estimate of an **upper** bound on the NLL
  for any fixed :math:`b`: the learned :math:`b(x)` (SNL) or :math:`c` (NCE).

± is the standard error over the test rows, combined with the rows' :math:`\\log \\hat Z` errors; the paired column
is the mean per-row difference to the Gaussian regression (IS estimate for the EBMs), with its standard error.

Run: ``.venv/bin/python benchmarks/ebm_regression.py`` (a few minutes on one core; ``--quick`` for a smoke run of a
few seconds on the toy; ``--json out.json`` also writes the numbers).
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

DATASETS = ("toy", "diabetes")
METHODS = ("gaussian", "mdn", "snl", "nce")
LABELS = {"gaussian": "Gaussian regression (MLP)", "base": "the EBMs' base alone (E = 0)", "mdn": "MDN",
          "snl": "EBM, SNL (amortised b(x))", "nce": "EBM, NCE"}

DEFAULTS = dict(hidden=64, steps=6000, eval_every=250, batch_size=64, lr=1e-3, components=5, base_widen=1.5,
                snl_draws=64, nce_noise=8, valid_draws=1000, test_draws=10_000)
#: diabetes' 264 training rows are overfitted within a few hundred updates at the toy's rate: a lower rate, a
#: shorter run and closer checks (used unless given on the command line)
DIABETES = dict(steps=1000, eval_every=100, lr=3e-4)
QUICK = dict(hidden=16, steps=30, eval_every=30, snl_draws=8, nce_noise=2, valid_draws=100, test_draws=500)
TOY_N = (1000, 500, 1000)
CELLS = 250_000  # rows x draws per importance-sampling call


# --- data ---------------------------------------------------------------------------------------------------
def toy_params(x):
    """The toy's mixture: weights, means and sds of its two components at ``x`` (arrays of x's shape + (2,))."""
    centre = np.sin(x)
    half_gap = 0.3 + 0.25 * (x + 3.0)          # the modes part as x grows
    sd = 0.05 + 0.06 * (x + 3.0)               # and widen
    means = np.stack([centre - half_gap, centre + half_gap], -1)
    sds = np.stack([sd, 1.5 * sd], -1)
    weights = np.broadcast_to(np.array([0.4, 0.6]), means.shape)
    return weights, means, sds


def toy_log_density(x, y):
    """The toy's true :math:`\\log p(y \\mid x)` (``x``, ``y`` of the same shape)."""
    w, m, s = toy_params(x)
    y = np.asarray(y)[..., None]
    comp = np.log(w) - 0.5 * ((y - m) / s) ** 2 - np.log(s) - 0.5 * math.log(2 * math.pi)
    top = comp.max(-1)
    return top + np.log(np.exp(comp - top[..., None]).sum(-1))


def toy(seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for n in TOY_N:
        x = rng.uniform(-3.0, 3.0, n)
        w, m, s = toy_params(x)
        k = (rng.uniform(size=n) < w[:, 1]).astype(int)
        y = m[np.arange(n), k] + s[np.arange(n), k] * rng.normal(size=n)
        out.append((x[:, None].astype(np.float32), y[:, None].astype(np.float32)))
    return out


def diabetes(seed: int):
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    x, y = load_diabetes(return_X_y=True)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=0.2, random_state=seed)
    train, valid = train_test_split(rest, test_size=0.25, random_state=seed)
    mx, sx, my, sy = x[train].mean(0), x[train].std(0), y[train].mean(), y[train].std()
    return [(((x[i] - mx) / sx).astype(np.float32), ((y[i, None] - my) / sy).astype(np.float32))
            for i in (train, valid, test)]


def norm_log_pdf(y, loc, scale):
    return -0.5 * ((y - loc) / scale) ** 2 - np.log(scale) - 0.5 * math.log(2 * math.pi)


def mean_se(values) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


# --- networks and models --------------------------------------------------------------------------------------
def mlp(c: int, out: int, hidden: int, seed: int):
    """A two-hidden-layer tanh MLP (Flax NNX) from ``c`` inputs to ``out`` outputs."""
    import jax.numpy as jnp
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(c, hidden, rngs=rngs), nnx.Linear(hidden, hidden, rngs=rngs),
                                    nnx.Linear(hidden, out, rngs=rngs)])

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = jnp.tanh(layer(x))
            return self.layers[-1](x)

    return MLP(nnx.Rngs(seed))


def gaussian_model(net):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    from tilted_priors.inference.numpyro import register_module

    def model(x, y):
        out = register_module("net", net)(x)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", dist.Normal(out[..., :1], jnp.exp(out[..., 1:])).to_event(1), obs=y)

    return model


def mdn_model(net, k: int):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    from tilted_priors.inference.numpyro import register_module

    def model(x, y):
        out = register_module("net", net)(x)
        mix = dist.MixtureSameFamily(dist.Categorical(logits=out[..., :k]),
                                     dist.Normal(out[..., k:2 * k], jnp.exp(out[..., 2 * k:])))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", mix, obs=y[..., 0])

    return model


def ebm_model(method: str, energy, b_net, args):
    """``model(x, loc, scale, y)``: y | x ~ EnergyTilted(energy, N(loc, scale^2), context=x)."""
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import Trace_ELBO

    from tilted_priors.inference.numpyro import NoiseContrastive, register_module
    from tilted_priors.numpyro import EnergyTilted, LearnedLogZ, SelfNormalized

    if method == "snl":
        normalizer, loss = SelfNormalized(args.snl_draws, name="b", b=b_net), Trace_ELBO()
    else:
        normalizer, loss = LearnedLogZ("log_z"), NoiseContrastive(num_noise=args.nce_noise)

    def model(x, loc, scale, y):
        e = register_module("energy", energy)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", EnergyTilted(e, dist.Normal(loc, scale).to_event(1), context=x,
                                             normalizer=normalizer), obs=y)

    return model, loss


def site_dist(model, *arrays, seed: int = 0):
    from numpyro import handlers

    return handlers.trace(handlers.seed(model, seed)).get_trace(*arrays)["y"]["fn"]


# --- training with early stopping -------------------------------------------------------------------------------
def train(model, loss, data, valid_score, args):
    """``fit`` in chunks of ``eval_every`` updates (one run, resumed), keeping the best validation score."""
    from tilted_priors.inference.numpyro import TrainingDiverged, fit

    best, best_step, best_score, scores, error = None, 0, -math.inf, {}, None
    t_train = 0.0
    with tempfile.TemporaryDirectory() as out:
        for step in range(args.eval_every, args.steps + 1, args.eval_every):
            t0 = time.perf_counter()
            try:
                result = fit(model, None, data, num_steps=step, batch_size=min(args.batch_size, len(data[0])),
                             lr=args.lr, betas=(0.9, 0.999), loss=loss, seed=args.seed, out=out, resume=True,
                             checkpoint_every=10 ** 9, progress=False)
            except TrainingDiverged as err:
                error = f"diverged before update {step}: {str(err).splitlines()[0]}"
                t_train += time.perf_counter() - t0
                break
            t_train += time.perf_counter() - t0
            score = scores[step] = valid_score(result, step)
            if np.isfinite(score) and score > best_score:
                best, best_step, best_score = result, step, score
    return best, best_step, scores, t_train, error


def ebm_rows(model, arrays, draws: int, key):
    """Per row: ``ell``, ``log Zhat``, its standard error, the SNL term's ``b`` (learned b(x) or c), the ESS."""
    import jax

    from tilted_priors.inference.numpyro.handlers import find_tilted
    from tilted_priors.numpyro import Importance, SelfNormalized

    n, rows = len(arrays[0]), max(1, CELLS // draws)
    ell, log_z, se, b, ess = [], [], [], [], []
    for i, start in enumerate(range(0, n, rows)):
        chunk = [a[start:start + rows] for a in arrays]
        tilted = find_tilted(site_dist(model, *chunk))
        est = Importance(draws).estimate(tilted, jax.random.fold_in(key, i))
        ell.append(np.asarray(tilted.log_tilted(chunk[-1]), np.float64))
        log_z.append(np.asarray(est.log_z, np.float64))
        se.append(np.asarray(est.stderr, np.float64))
        ess.append(np.asarray(est.ess, np.float64))
        norm = tilted.normalizer
        value = norm.b_value(tilted) if isinstance(norm, SelfNormalized) else norm.term(tilted)
        b.append(np.broadcast_to(np.asarray(value, np.float64), log_z[-1].shape))
    return [np.concatenate(v) for v in (ell, log_z, se, b, ess)]


# --- one data set -----------------------------------------------------------------------------------------------
def dataset_args(name: str, args):
    """The settings for ``name``: ``args`` with DIABETES's values for diabetes (unless given or ``--quick``)."""
    args = argparse.Namespace(**vars(args))
    if name == "diabetes" and not args.quick:
        for k, v in DIABETES.items():
            if k not in args.given:
                setattr(args, k, v)
    return args


def run_dataset(name: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tilted_priors.numpyro import EnergyMLP

    args = dataset_args(name, args)
    (xtr, ytr), (xva, yva), (xte, yte) = toy(args.seed) if name == "toy" else diabetes(args.seed)
    c = xtr.shape[1]
    out = {"n": [len(xtr), len(xva), len(xte)], "c": c, "methods": {},
           "settings": {k: getattr(args, k) for k in ("steps", "eval_every", "lr")}}
    rows = out["methods"]
    if name == "toy":
        true = toy_log_density(xte[:, 0], yte[:, 0])
        out["true_nll"] = mean_se(-true)
    key = jax.random.PRNGKey(args.seed + 2000)
    preds = {}

    for method in ("gaussian", "mdn", "snl", "nce"):
        if method not in args.methods and not (method == "gaussian" and {"snl", "nce"} & set(args.methods)):
            continue
        t_start = time.perf_counter()
        if method in ("gaussian", "mdn"):
            k = args.components
            net = mlp(c, 2 if method == "gaussian" else 3 * k, args.hidden, args.seed)
            model = gaussian_model(net) if method == "gaussian" else mdn_model(net, k)
            data, loss = (xtr, ytr), None

            def nll_points(result, x, y):
                d = site_dist(result.model, x, y)
                value = y if method == "gaussian" else y[..., 0]
                return -np.asarray(d.log_prob(value), np.float64)

            def valid_score(result, step):
                return -float(nll_points(result, xva, yva).mean())

            best, best_step, scores, t_train, error = train(model, loss, data, valid_score, args)
            row = {"best_step": best_step, "valid_curve": scores, "train_s": t_train, "error": error}
            if best is not None:
                test = nll_points(best, xte, yte)
                row.update(test_points=test.tolist(), nll_is=mean_se(test), nll_bound=mean_se(test))
                if method == "gaussian":
                    def base_of(x, y):
                        d = site_dist(best.model, x, y).base_dist
                        return np.asarray(d.loc), np.asarray(d.scale) * args.base_widen

                    preds = {"train": base_of(xtr, ytr), "valid": base_of(xva, yva), "test": base_of(xte, yte)}
                    loc, scale = preds["test"]  # the EBMs' base alone (E = 0): the widened Gaussian regression
                    base_nll = -np.asarray(norm_log_pdf(yte, loc, scale)[..., 0], np.float64)
                    rows["base"] = {"test_points": base_nll.tolist(), "nll_is": mean_se(base_nll),
                                    "nll_bound": mean_se(base_nll), "best_step": best_step}
        else:
            if not preds:
                rows[method] = {"error": "needs the Gaussian regression as its base, which failed"}
                continue
            energy = EnergyMLP(1, args.hidden, activation=jnp.tanh, context_dim=c, rngs=args.seed)
            b_net = mlp(c, 1, 32, args.seed + 1)
            model, loss = ebm_model(method, energy, b_net, args)
            data = (xtr, *preds["train"], ytr)
            valid_arrays = (xva, *preds["valid"], yva)

            def valid_score(result, step):
                ell, log_z, _, _, _ = ebm_rows(result.model, valid_arrays, args.valid_draws,
                                            jax.random.fold_in(key, step))
                return float(np.mean(ell - log_z))

            best, best_step, scores, t_train, error = train(model, loss, data, valid_score, args)
            row = {"best_step": best_step, "valid_curve": scores, "train_s": t_train, "error": error}
            if best is not None:
                ell, log_z, se, b, ess = ebm_rows(best.model, (xte, *preds["test"], yte), args.test_draws,
                                             jax.random.fold_in(key, 10 ** 6))
                n = len(ell)
                nll_is = -(ell - log_z)
                nll_bound = -(ell - (b + np.exp(log_z - b) - 1.0))
                mu, s = mean_se(nll_is)
                mu_b, s_b = mean_se(nll_bound)
                row.update(test_points=nll_is.tolist(),
                           nll_is=(mu, math.hypot(s, math.sqrt(np.sum(se ** 2)) / n)),
                           nll_bound=(mu_b, math.hypot(s_b, math.sqrt(np.sum((np.exp(log_z - b) * se) ** 2)) / n)),
                           log_z_mean=float(log_z.mean()), log_z_se_max=float(se.max()),
                           b_minus_log_z=float(np.mean(b - log_z)), ess_min=float(ess.min()))
        row["total_s"] = time.perf_counter() - t_start
        rows[method] = row
    base = rows.get("gaussian", {}).get("test_points")
    for method, row in rows.items():
        if base is not None and method != "gaussian" and "test_points" in row:
            row["vs_gaussian"] = mean_se(np.asarray(row["test_points"]) - np.asarray(base))
        if name == "toy" and "test_points" in row:
            row["vs_true"] = mean_se(np.asarray(row["test_points"]) + true)
    return out


# --- output -----------------------------------------------------------------------------------------------------
def _pm(pair, digits=3) -> str:
    mu, se = pair
    return "n/a" if not np.isfinite(mu) else f"{mu:.{digits}f} ± {se:.{digits}f}"


def paired_line(rows: dict, pairs, what: str) -> list[str]:
    """A line of paired differences (mean ± standard error over the test points) between pairs of models."""
    diffs = [f"{LABELS[a]} − {LABELS[b]}: "
             f"{_pm(mean_se(np.subtract(rows[a]['test_points'], rows[b]['test_points'])))}"
             for a, b in pairs if "test_points" in rows.get(a, {}) and "test_points" in rows.get(b, {})]
    return [f"\nPaired differences of the {what}, per point: " + "; ".join(diffs) + "."] if diffs else []


def table(results: dict) -> str:
    lines = []
    for name, res in results.items():
        n_train, n_valid, n_test = res["n"]
        st = res["settings"]
        lines.append(f"\n**{name}** ({res['c']} input(s); {n_train} train / {n_valid} validation / {n_test} test "
                     f"points; up to {st['steps']} updates at rate {st['lr']:g}, checked every {st['eval_every']})\n")
        extra = " | − true (paired)" if name == "toy" else ""
        lines.append("| model | test NLL, IS (biased low) | test NLL, SNL bound (upper, in expectation) "
                     f"| − Gaussian regr. (paired){extra} | mean b − log Ẑ(x) | min ESS of IS | selected update "
                     "| train (s) |")
        lines.append("| --- | ---: | ---: | ---:" + (" | ---:" if name == "toy" else "")
                     + " | ---: | ---: | ---: | ---: |")
        if name == "toy":
            lines.append(f"| true density | {_pm(res['true_nll'])} (exact) | | | | | | | |")
        for method in ("gaussian", "base", "mdn", "snl", "nce"):
            row = res["methods"].get(method)
            if row is None:
                continue
            secs = f"{row['train_s']:.0f}" if "train_s" in row else ""
            if "test_points" not in row:
                blank = " |" if name == "toy" else ""
                lines.append(f"| {LABELS[method]} | failed | failed | |{blank} | | | {row.get('best_step', '')} "
                             f"| {secs} |")
                continue
            exact = method in ("gaussian", "base", "mdn")
            is_col = _pm(row["nll_is"]) + (" (exact)" if exact else "")
            bound = _pm(row["nll_bound"]) + (" (exact)" if exact else "")
            paired = _pm(row["vs_gaussian"]) if "vs_gaussian" in row else ""
            true_col = f" | {_pm(row['vs_true'])}" if name == "toy" else ""
            gap = f"{row['b_minus_log_z']:+.3f}" if "b_minus_log_z" in row else ""
            ess = f"{row['ess_min']:.0f}" if "ess_min" in row else ""
            lines.append(f"| {LABELS[method]} | {is_col} | {bound} | {paired}{true_col} | {gap} | {ess} "
                         f"| {row['best_step']} | {secs} |")
        lines.extend(paired_line(res["methods"], (("snl", "nce"), ("snl", "mdn")),
                                 "test NLL (IS estimates for the EBMs)"))
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
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (toy, tiny settings)")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=None)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seed", type=int, default=0, help="data, initial weights, minibatches and draws")
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=None, help=f"default {v}")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.given = {k for k in DEFAULTS if getattr(args, k) is not None}
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, QUICK.get(k, v) if args.quick else v)
    if args.datasets is None:
        args.datasets = ["toy"] if args.quick else list(DATASETS)
    t0 = time.perf_counter()
    results = {name: run_dataset(name, args) for name in args.datasets}
    elapsed = time.perf_counter() - t0
    settings = ", ".join(f"{k}={getattr(args, k)}" for k in DEFAULTS)
    print(f"# EBM regression (seed {args.seed}; {settings})")
    print(f"# {versions()}; {elapsed:.0f} s in all")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": {k: getattr(args, k) for k in DEFAULTS}, "seed": args.seed,
                       "elapsed_s": elapsed, "versions": versions(), "results": results}, f, indent=1,
                      default=float)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
