r"""Evaluating a trained Pyro latent-variable model: samples, reconstructions, test log-likelihood, weights files.

The test log-likelihood is an importance-sampling estimate per datum,

.. math:: \log \hat p(x) = \log \frac1M \sum_{m=1}^M \frac{p(x \mid z_m)\, p(z_m)}{q(z_m \mid x)},
          \qquad z_m \sim q(\cdot \mid x),

with :math:`q` a Laplace approximation of the posterior (centred at the mean of a few short-run posterior
chains of the datum refined by Newton steps, covariance from the Hessian of the log joint there, inflated), and the tilted prior normalised by an
annealed-importance estimate of :math:`\log Z`, :math:`\log p(z) = -E(z) + \log\mathcal N(z) - \log\hat Z`.
Its expectation is a lower bound of :math:`\log p(x)` when :math:`\log\hat Z` is exact (Jensen); the AIS error of
:math:`\log\hat Z` shifts every datum by the same amount and is reported beside it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from tilted_priors.inference.checkpoints import expect_arrays, make_manifest, read_file, verify_manifest
from tilted_priors.inference.files import atomic_write
from tilted_priors.inference.pyro import ShortRunPosterior
from tilted_priors.models.metrics import log_mean_exp
from tilted_priors.models.runfolder import MANIFEST, WEIGHTS_FIX, check_weights_config, manifest_of
from tilted_priors.pyro import MALA, AnnealedImportance, Unnormalized

__all__ = ["trained", "save_params", "load_params", "sample_images", "reconstruct", "log_likelihood"]


def _modules(lvm) -> dict[str, torch.nn.Module]:
    return {"generator": lvm.generator, **({"energy": lvm.energy} if lvm.energy is not None else {})}


def trained(lvm, result):
    """``lvm`` with the parameters of a :class:`~tilted_priors.inference.pyro.FitResult` copied into its networks.

    Pyro trains ``pyro.module`` parameters in place already; copying by name makes the result explicit (and
    correct after a resume that rebuilt the parameter store).
    """
    with torch.no_grad():
        for name, module in _modules(lvm).items():
            for key, param in module.named_parameters():
                value = result.params.get(f"{name}$$${key}")
                if value is not None:
                    param.copy_(torch.as_tensor(value, dtype=param.dtype))
    return lvm


def _state(lvm) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().cpu().clone() for name, m in _modules(lvm).items()
            for k, v in m.state_dict().items()}


def _as_numpy(value):
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else None


def save_params(lvm, path: str | os.PathLike, *, config: dict | None = None) -> Path:
    """Write the networks' weights as a flat ``{"<module>.<param>": tensor}`` file (atomic; tensors only) with a
    manifest (see :mod:`tilted_priors.inference.checkpoints`); ``config``, the settings that built the networks, is
    recorded.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from tilted_priors.models.pyro.lebm import build
    >>> lvm = build((28, 28, 1), 4, ngf=4)
    >>> p = save_params(lvm, pathlib.Path(tempfile.mkdtemp()) / "weights.pt")
    >>> load_params(build((28, 28, 1), 4, ngf=4, seed=1), p).generator.net[0].weight.equal(lvm.generator.net[0].weight)
    True
    """
    path = Path(path)
    state = _state(lvm)
    manifest = make_manifest(state, kind="weights", backend="pyro", config=config, as_array=_as_numpy)
    atomic_write(path, lambda f: torch.save({MANIFEST: json.dumps(manifest), **state}, f))
    return path


def load_params(lvm, path: str | os.PathLike, *, config: dict | None = None):
    """Load weights written by :func:`save_params` into ``lvm``'s networks (``weights_only``: no pickled code).

    The file's manifest is verified and every tensor must be one of ``lvm``'s with the same shape and dtype, and
    with ``config`` given, the file must have been written for the same settings; otherwise
    :class:`~tilted_priors.inference.checkpoints.CheckpointError`.
    """
    path = Path(path)
    state = read_file(path, lambda p: torch.load(p, weights_only=True, map_location="cpu"), what="weights file",
                      fix=WEIGHTS_FIX)
    if not isinstance(state, dict):
        state = {}
    manifest = manifest_of(path, state.pop(MANIFEST, None))
    verify_manifest(path, state, manifest, kind="weights", backend="pyro", as_array=_as_numpy)
    check_weights_config(path, manifest, config)
    expect_arrays(path, {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in state.items()},
                  {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in _state(lvm).items()},
                  fix=WEIGHTS_FIX)
    for name, module in _modules(lvm).items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return lvm


def sample_images(lvm, n: int, *, sampler=None, seed: int = 0) -> np.ndarray:
    """Draw ``n`` images :math:`g(z)`, :math:`z` from the prior (its own sampler, or ``sampler``); ``(n, H, W, C)``."""
    pyro.set_rng_seed(seed)
    prior = lvm.prior((n,))
    z = prior.sample() if sampler is None else prior.sample_with(sampler)
    with torch.no_grad():
        return lvm.decode(z).numpy()


def reconstruct(lvm, x: np.ndarray, *, steps: int = 20, step_size: float = 0.1, seed: int = 0,
                batch_size: int = 200) -> np.ndarray:
    """:math:`g(z^+)` with :math:`z^+` from the short-run posterior chain (LEBM's inference), same shape as ``x``."""
    pyro.set_rng_seed(seed)
    guide = ShortRunPosterior(lvm.model, steps=steps, step_size=step_size)
    out = []
    for i in range(0, len(x), batch_size):
        z = guide(torch.as_tensor(x[i:i + batch_size]))["z"]
        with torch.no_grad():
            out.append(lvm.decode(z).numpy())
    return np.concatenate(out)


def _grad_hessian(lvm, prior, xb: torch.Tensor, z: torch.Tensor):
    r"""Per datum: :math:`\nabla_z \log p(x, z)` and :math:`H = -\nabla^2_z \log p(x, z)` (symmetrised)."""
    z = z.detach().requires_grad_(True)
    log_joint = dist.Normal(lvm.decode(z), lvm.likelihood_sd).to_event(3).log_prob(xb) + prior.log_prob(z)
    (grad,) = torch.autograd.grad(log_joint.sum(), z, create_graph=True)
    rows = [torch.autograd.grad(grad[:, j].sum(), z, retain_graph=True)[0] for j in range(z.shape[-1])]
    hessian = -torch.stack(rows, 1).detach()
    return grad.detach(), 0.5 * (hessian + hessian.transpose(-1, -2))


def _laplace_proposal(lvm, prior, xb: torch.Tensor, start: torch.Tensor, inflate: float, newton_steps: int = 8):
    r"""Laplace approximation :math:`\mathcal N(\hat z, c^2 H^{-1})` after damped Newton steps from ``start``.

    :math:`H` has its eigenvalues floored at 0.01 (so it is a valid covariance where the log joint is not
    concave) and each Newton step is capped at length 2.
    """
    z = start.detach()
    for k in range(newton_steps + 1):
        grad, hessian = _grad_hessian(lvm, prior, xb, z)
        lam, vec = torch.linalg.eigh(hessian)
        lam = lam.clamp(min=1e-2)
        if k == newton_steps:
            break
        step = ((vec.transpose(-1, -2) @ grad.unsqueeze(-1)).squeeze(-1) / lam).unsqueeze(-1)
        step = (vec @ step).squeeze(-1)
        z = z + step / step.norm(dim=-1, keepdim=True).clamp(min=2.0) * 2.0
    cov = (vec * (inflate ** 2 / lam).unsqueeze(-2)) @ vec.transpose(-1, -2)
    return dist.MultivariateNormal(z, covariance_matrix=cov)


def log_likelihood(lvm, x: np.ndarray, *, num_samples: int = 64, num_chains: int = 4, steps: int = 60,
                   step_size: float = 0.1, inflate: float = 1.2, ais: AnnealedImportance | None = None,
                   log_z_chains: int = 500, seed: int = 0, batch_size: int = 50) -> dict:
    r"""Per-datum importance-sampling test log-likelihood (nats), with the prior's AIS :math:`\log Z`.

    The proposal is a Laplace approximation of the posterior: a few damped Newton steps from the mean of
    ``num_chains`` short-run posterior chains, then covariance ``inflate**2`` times the inverse Hessian of
    :math:`-\log p(x, z)` there (eigenvalues floored at 0.01); ``num_samples`` importance samples per image.
    :math:`\log Z` of a tilted prior: ``ais``, else ``AnnealedImportance(log_z_chains, 200, kernel=MALA(2, 0.3))``.
    Returns ``{"per_datum": array, "per_datum_stderr": array, "log_z": float, "log_z_stderr": float}``
    (``log_z`` 0 for a Normal prior).
    """
    pyro.set_rng_seed(seed)
    if lvm.prior_kind == "ebm":
        est = (ais or AnnealedImportance(log_z_chains, 200, kernel=MALA(2, 0.3))).estimate(lvm.prior(()))
        log_z, log_z_se = float(est.log_z), float(est.stderr)
    else:
        log_z, log_z_se = 0.0, 0.0
    guide = ShortRunPosterior(lvm.model, steps=steps, step_size=step_size)
    prior = lvm.prior(())
    if lvm.prior_kind == "ebm":
        prior = prior.replace(normalizer=Unnormalized())
    per_datum = []
    for i in range(0, len(x), batch_size):
        xb = torch.as_tensor(x[i:i + batch_size])
        b = xb.shape[0]
        chains = guide(xb.repeat_interleave(num_chains, 0))["z"].reshape(b, num_chains, -1)
        q = _laplace_proposal(lvm, prior, xb, chains.mean(1), inflate)
        with torch.no_grad():
            z = q.sample((num_samples,))  # (M, b, d)
            images = lvm.decode(z.reshape(num_samples * b, -1)).reshape((num_samples, b) + tuple(lvm.image_shape))
            log_lik = dist.Normal(images, lvm.likelihood_sd).to_event(3).log_prob(xb)
            log_w = log_lik + prior.log_prob(z) - log_z - q.log_prob(z)
        per_datum.append(log_mean_exp(log_w.numpy().astype(np.float64), axis=0))
    return {"per_datum": np.concatenate([e for e, _ in per_datum]),
            "per_datum_stderr": np.concatenate([se for _, se in per_datum]), "log_z": log_z, "log_z_stderr": log_z_se}
