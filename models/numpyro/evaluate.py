r"""Evaluating a trained NumPyro latent-variable model: samples, reconstructions, test log-likelihood, weights files.

The same functions as :mod:`tilted_priors.models.pyro.evaluate` (see there for the estimator). Weights files are flat ``.npz``
archives (``"<module>/<path>"`` keys), read with ``allow_pickle=False``; :func:`load_params` returns the model
with those weights (:meth:`~tilted_priors.models.numpyro.lebm.LatentVariableModel.with_params`). The chains run inside one
:func:`jax.jit` per batch shape.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from flax import nnx
from numpyro import handlers

from tilted_priors.inference.checkpoints import expect_arrays, make_manifest, read_file, verify_manifest
from tilted_priors.inference.files import atomic_write, flatten_state, unflatten_state
from tilted_priors.inference.numpyro import ShortRunPosterior
from tilted_priors.models.metrics import log_mean_exp
from tilted_priors.models.runfolder import MANIFEST, WEIGHTS_FIX, check_weights_config, manifest_of
from tilted_priors.numpyro import MALA, AnnealedImportance, Unnormalized

__all__ = ["trained", "save_params", "load_params", "sample_images", "reconstruct", "log_likelihood"]


def _modules(lvm) -> dict:
    return {"generator": lvm.generator, **({"energy": lvm.energy} if lvm.energy is not None else {})}


def trained(lvm, result):
    """The model with the parameters of a :class:`~tilted_priors.inference.numpyro.FitResult` (flat ``"site/..."`` names)."""
    nested = unflatten_state({k: jnp.asarray(v) for k, v in result.params.items()}, int_keys=True)
    return lvm.with_params({f"{name}$params": nested[f"{name}$params"] for name in _modules(lvm)
                            if f"{name}$params" in nested})


def _flat(lvm) -> dict:
    return {k: np.asarray(v) for k, v in flatten_state(
        {name: nnx.to_pure_dict(nnx.state(module, nnx.Param)) for name, module in _modules(lvm).items()}).items()}


def save_params(lvm, path: str | os.PathLike, *, config: dict | None = None) -> Path:
    """Write the networks' weights as a flat ``.npz`` (atomic; arrays only) with a manifest (see
    :mod:`tilted_priors.inference.checkpoints`); ``config``, the settings that built the networks, is recorded.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import jax.numpy as jnp
    >>> from tilted_priors.models.numpyro.lebm import build
    >>> lvm = build((28, 28, 1), 4, ngf=4)
    >>> p = save_params(lvm, pathlib.Path(tempfile.mkdtemp()) / "weights.npz")
    >>> other = load_params(build((28, 28, 1), 4, ngf=4, seed=1), p)
    >>> bool(jnp.all(other.decode(jnp.ones(4)) == lvm.decode(jnp.ones(4))))
    True
    """
    path = Path(path)
    flat = _flat(lvm)
    manifest = make_manifest(flat, kind="weights", backend="numpyro", config=config)
    atomic_write(path, lambda f: np.savez(f, **{MANIFEST: np.array(json.dumps(manifest))}, **flat))
    return path


def load_params(lvm, path: str | os.PathLike, *, config: dict | None = None):
    """The model with the weights of a :func:`save_params` file (``allow_pickle=False``).

    The file's manifest is verified and every array must be one of ``lvm``'s networks with the same shape and
    dtype, and with ``config`` given, the file must have been written for the same settings; otherwise
    :class:`~tilted_priors.inference.checkpoints.CheckpointError`.
    """
    path = Path(path)

    def load(p):
        with np.load(p, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    arrays = read_file(path, load, what="weights file", fix=WEIGHTS_FIX)
    manifest = manifest_of(path, arrays.pop(MANIFEST, None))
    verify_manifest(path, arrays, manifest, kind="weights", backend="numpyro")
    check_weights_config(path, manifest, config)
    expect_arrays(path, {k: (v.dtype.name, v.shape) for k, v in arrays.items()},
                  {k: (v.dtype.name, v.shape) for k, v in _flat(lvm).items()}, fix=WEIGHTS_FIX)
    nested = unflatten_state({k: jnp.asarray(v) for k, v in arrays.items()}, int_keys=True)
    return lvm.with_params({f"{name}$params": nested[name] for name in _modules(lvm) if name in nested})


def sample_images(lvm, n: int, *, sampler=None, seed: int = 0) -> np.ndarray:
    """Draw ``n`` images :math:`g(z)`, :math:`z` from the prior (its own sampler, or ``sampler``); ``(n, H, W, C)``."""
    key = jax.random.PRNGKey(seed)
    prior = lvm.prior((n,))
    z = prior.sample(key) if sampler is None else prior.sample_with(key, sampler)
    return np.asarray(lvm.decode(z))


def _batched(fn, x: np.ndarray, batch_size: int, seed: int) -> list:
    """Apply a jitted ``fn(key, batch)`` to fixed-size batches (the last one padded), one compilation."""
    n = len(x)
    batch_size = min(batch_size, n)
    keys = jax.random.split(jax.random.PRNGKey(seed), -(-n // batch_size))
    out = []
    for key, i in zip(keys, range(0, n, batch_size)):
        xb = x[i:i + batch_size]
        pad = batch_size - len(xb)
        if pad:
            xb = np.concatenate([xb, np.repeat(xb[-1:], pad, 0)])
        out.append(np.asarray(fn(key, jnp.asarray(xb)))[:batch_size - pad])
    return out


def reconstruct(lvm, x: np.ndarray, *, steps: int = 20, step_size: float = 0.1, seed: int = 0,
                batch_size: int = 200) -> np.ndarray:
    """:math:`g(z^+)` with :math:`z^+` from the short-run posterior chain (LEBM's inference), same shape as ``x``."""
    guide = ShortRunPosterior(lvm.model, steps=steps, step_size=step_size)

    @jax.jit
    def run(key, xb):
        return lvm.decode(handlers.seed(guide, key)(xb)["z"])

    return np.concatenate(_batched(run, x, batch_size, seed))


def _laplace_proposal(lvm, prior, xb, start, inflate: float, newton_steps: int = 8):
    r"""Laplace approximation :math:`\mathcal N(\hat z, c^2 H^{-1})` after damped Newton steps from ``start``
    (see :func:`tilted_priors.models.pyro.evaluate.log_likelihood`)."""
    def log_joint(z, x):
        image = lvm.decode(z[None])[0]
        return dist.Normal(image, lvm.likelihood_sd).to_event(3).log_prob(x) + prior.log_prob(z)

    grad_fn, hess_fn = jax.vmap(jax.grad(log_joint)), jax.vmap(jax.hessian(log_joint))
    z = start
    for k in range(newton_steps + 1):
        hessian = -hess_fn(z, xb)
        lam, vec = jnp.linalg.eigh(0.5 * (hessian + jnp.swapaxes(hessian, -1, -2)))
        lam = jnp.maximum(lam, 1e-2)
        if k == newton_steps:
            break
        step = jnp.einsum("bij,bj->bi", vec, jnp.einsum("bji,bj->bi", vec, grad_fn(z, xb)) / lam)
        z = z + step / jnp.maximum(jnp.linalg.norm(step, axis=-1, keepdims=True), 2.0) * 2.0
    cov = (vec * (inflate ** 2 / lam)[..., None, :]) @ jnp.swapaxes(vec, -1, -2)
    return dist.MultivariateNormal(z, covariance_matrix=cov)


def log_likelihood(lvm, x: np.ndarray, *, num_samples: int = 64, num_chains: int = 4, steps: int = 60,
                   step_size: float = 0.1, inflate: float = 1.2, ais: AnnealedImportance | None = None,
                   log_z_chains: int = 500, seed: int = 0, batch_size: int = 50) -> dict:
    r"""Per-datum importance-sampling test log-likelihood (nats), with the prior's AIS :math:`\log Z`.

    The Laplace proposal and the AIS settings of :func:`tilted_priors.models.pyro.evaluate.log_likelihood`.
    Returns ``{"per_datum": array, "per_datum_stderr": array, "log_z": float, "log_z_stderr": float}`` (``log_z``
    0 for a Normal prior).
    """
    k_ais = jax.random.PRNGKey(seed)
    if lvm.prior_kind == "ebm":
        est = (ais or AnnealedImportance(log_z_chains, 200, kernel=MALA(2, 0.3))).estimate(lvm.prior(()), k_ais)
        log_z, log_z_se = float(est.log_z), float(est.stderr)
        prior = lvm.prior(()).replace(normalizer=Unnormalized())
    else:
        log_z, log_z_se = 0.0, 0.0
        prior = lvm.prior(())
    guide = ShortRunPosterior(lvm.model, steps=steps, step_size=step_size)

    @jax.jit
    def per_batch(key, xb):
        k_chain, k_q = jax.random.split(key)
        b = xb.shape[0]
        chains = handlers.seed(guide, k_chain)(jnp.repeat(xb, num_chains, 0))["z"].reshape(b, num_chains, -1)
        q = _laplace_proposal(lvm, prior, xb, chains.mean(1), inflate)
        z = q.sample(k_q, (num_samples,))
        images = lvm.decode(z.reshape(num_samples * b, -1)).reshape((num_samples, b) + tuple(lvm.image_shape))
        log_lik = dist.Normal(images, lvm.likelihood_sd).to_event(3).log_prob(xb)
        return log_lik + prior.log_prob(z) - log_z - q.log_prob(z)

    log_w = np.concatenate(_batched(lambda k, xb: per_batch(k, xb).T, x, batch_size, seed + 1), 0)
    estimate, stderr = log_mean_exp(log_w.astype(np.float64), axis=1)
    return {"per_datum": estimate, "per_datum_stderr": stderr, "log_z": log_z, "log_z_stderr": log_z_se}
