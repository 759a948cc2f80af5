r"""The parts of the Langevin MCMC kernel (JAX), used by :mod:`tilted_priors.inference.numpyro.kernels`: the checks of
a given inverse mass matrix, the mass matrix's blocks and factors, its windowed adaptation during warm-up (that of
NumPyro's HMC), the preconditioned proposal, and the range check of the chains' states from the compiled loop.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax, random
from jax.flatten_util import ravel_pytree
from jax.scipy.linalg import solve_triangular
from numpyro.infer.hmc_util import dual_averaging, welford_covariance

from tilted_priors._adapt import RANGE_FACTOR
from tilted_priors._mass_matrix import check_mass_matrix_shapes, mass_matrix_blocks
from tilted_priors.numpyro import langevin

__all__ = ["MAX_LOG_RATIO_ERROR", "InverseMassMatrix", "check_inverse_mass_matrix", "mass_matrix_factors",
           "init_mass_matrix", "adapt_step_size", "adapt_mass", "preconditioned_proposal", "check_range"]

#: A proposal whose Metropolis-Hastings log-ratio is below minus this counts as a divergence (HMC's threshold).
MAX_LOG_RATIO_ERROR = 1000.0

#: :math:`M^{-1}` as given: one array, or a dict ``{tuple of site names: block}``.
InverseMassMatrix = jax.Array | dict[tuple[str, ...], jax.Array]


def check_inverse_mass_matrix(value) -> InverseMassMatrix | None:
    """``inverse_mass_matrix`` as arrays (one, or a dict by block of site names), each positive definite."""
    if value is None:
        return None
    if isinstance(value, dict):
        bad = [k for k in value if not (isinstance(k, tuple) and k and all(isinstance(n, str) for n in k))]
        if bad:
            raise ValueError(f"inverse_mass_matrix as a dict must be keyed by tuples of site names (as "
                             f"HMCAdaptState.inverse_mass_matrix), got the keys {bad}")
        return {k: _check_matrix(v, f"inverse_mass_matrix[{k!r}]") for k, v in value.items()}
    return _check_matrix(value, "inverse_mass_matrix")


def _check_matrix(value, name: str) -> jax.Array:
    m = np.asarray(value)
    if not np.issubdtype(m.dtype, np.floating):
        m = m.astype(jnp.zeros(()).dtype)
    if m.ndim not in (1, 2) or m.ndim == 2 and m.shape[0] != m.shape[1]:
        raise ValueError(f"{name} must be a vector (a diagonal) or a square matrix, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError(f"{name} has non-finite entries")
    if m.ndim == 1 and not (m > 0).all():
        raise ValueError(f"{name} is a diagonal with entries <= 0: an inverse mass matrix is positive definite")
    if m.ndim == 2:
        try:
            ok = np.allclose(m, m.T) and bool(np.isfinite(np.linalg.cholesky(m)).all())
        except np.linalg.LinAlgError:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be symmetric positive definite (a covariance of the unconstrained "
                             "latents)")
    return jnp.asarray(m)


def mass_matrix_factors(inverse_mass_matrix: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(M^-1, T, S)`` as :func:`numpyro.infer.hmc_util.welford_covariance`'s ``final_fn`` returns them."""
    if jnp.ndim(inverse_mass_matrix) == 1:
        sqrt = jnp.sqrt(inverse_mass_matrix)
        return inverse_mass_matrix, jnp.reciprocal(sqrt), sqrt
    tril_inv = jnp.swapaxes(jnp.linalg.cholesky(inverse_mass_matrix[..., ::-1, ::-1])[..., ::-1, ::-1], -2, -1)
    eye = jnp.identity(inverse_mass_matrix.shape[-1], inverse_mass_matrix.dtype)
    return inverse_mass_matrix, solve_triangular(tril_inv, eye, lower=True), tril_inv


def init_mass_matrix(z, dtype, dense_mass,
                     given: InverseMassMatrix | None) -> tuple[tuple[Any, Any, Any], list, Any]:
    """The blocks of the mass matrix for latents ``z`` (one chain), and the starting ``(M^-1, T, S)``.

    Returns ``(factors, block_index, mm_size)``: the factors (arrays, or dicts by block when ``dense_mass`` is a
    list of tuples of site names), each block's site names and positions in the flat vector (for a dict ``z``;
    else ``[]``), and the shapes of the Welford state (:func:`numpyro.infer.hmc_util.welford_covariance`).
    ``given`` is the checked ``inverse_mass_matrix`` (``None``: the identity).
    """
    structured = isinstance(dense_mass, list)
    block_index: list[tuple[tuple[str, ...], np.ndarray]] = []
    if isinstance(z, dict):
        names = sorted(z)  # ravel_pytree's order
        sizes = {k: int(np.size(z[k])) for k in names}
        blocks = mass_matrix_blocks(dense_mass, sizes)
        offsets = dict(zip(names, np.cumsum([0] + [sizes[k] for k in names]).tolist()))
        block_index = [(b, np.concatenate([np.arange(offsets[n], offsets[n] + sizes[n]) for n in b]))
                       for b, _, _ in blocks]
    elif structured:
        raise ValueError("dense_mass as blocks of site names needs the latent values as a dict by site name; "
                         f"the potential's argument is a {type(z).__name__}: pass dense_mass=True or False")
    else:  # one block over a pytree without site names
        blocks = [((), dense_mass, int(ravel_pytree(z)[0].size))]
    if given is not None and blocks:
        check_mass_matrix_shapes({b: m.shape for b, m in given.items()} if isinstance(given, dict)
                                 else given.shape, blocks)
    if not isinstance(given, dict):
        given = {blocks[0][0]: given} if blocks else {}
    matrices = {}
    for b, dense, k in blocks:
        m = given.get(b)
        if m is None:
            m = jnp.identity(k, dtype) if dense else jnp.ones(k, dtype)
        elif dense and m.ndim == 1:
            m = jnp.diag(m)
        matrices[b] = mass_matrix_factors(jnp.asarray(m, dtype))
    mm_size = {b: ((k, k) if dense else (k,)) for b, dense, k in blocks}
    if not structured:
        mm_size = mm_size[blocks[0][0]] if blocks else (0,)
        return (matrices[blocks[0][0]] if blocks else (jnp.ones(0, dtype),) * 3), block_index, mm_size
    return tuple({b: f[j] for b, f in matrices.items()} for j in range(3)), block_index, mm_size


def adapt_step_size(i: jax.Array, adapt, accept_prob: jax.Array, h: jax.Array, *, target_accept_prob: float,
                    num_warmup: int) -> tuple[Any, jax.Array]:
    """One step of the step-size adaptation: dual averaging of ``log h`` (:func:`numpyro.infer.hmc_util.dual_averaging`,
    as NumPyro's HMC) towards ``target_accept_prob`` during warm-up (iterations ``i < num_warmup``).

    Returns the updated ``adapt`` (a :class:`~tilted_priors.inference.numpyro.kernels.LangevinAdaptState`,
    unchanged after warm-up) and the step size of the next transition (``h`` after warm-up).
    """
    warming = i < num_warmup
    _, ss_update = dual_averaging()
    updated = ss_update(target_accept_prob - accept_prob, tuple(adapt[:5]))
    updated = adapt._replace(**dict(zip(adapt._fields[:5], updated)))
    adapt = jax.tree.map(lambda a, b: jnp.where(warming, a, b), updated, adapt)
    # the iterate during warm-up, its average from the last warm-up step on (as NumPyro's HMC)
    log_h = jnp.where(i == num_warmup - 1, adapt.log_step_size_avg, adapt.log_step_size)
    finfo = jnp.finfo(h.dtype)
    return adapt, jnp.where(warming, jnp.clip(jnp.exp(log_h), finfo.tiny, finfo.max).astype(h.dtype), h)


def adapt_mass(i: jax.Array, adapt, sample: Any, step_size: jax.Array, *, schedule: np.ndarray, dense_mass,
               mm_size: Any, prox_factor: float | None):
    """One warm-up step of the windowed mass-matrix adaptation (that of NumPyro's ``warmup_adapter``).

    Welford-update the window's (co)variance with the new draw ``sample`` (a dict by site for blocks of site
    names, else the flat vector) in a middle window of ``schedule``; at a middle window's end, make it
    :math:`M^{-1}` and, with a ``prox_factor``, restart the step-size adaptation centred at
    ``log(prox_factor * step_size)`` (10 for MALA, 1 for ULA; ``None`` when the step size is not adapted).
    ``adapt`` is a :class:`~tilted_priors.inference.numpyro.kernels.LangevinAdaptState`.
    """
    mm_init, mm_update, mm_final = welford_covariance(diagonal=not dense_mass)
    num_windows = len(schedule)
    window_idx = adapt.window_idx
    is_middle = (0 < window_idx) & (window_idx < num_windows - 1)
    mm_state = lax.cond(is_middle, lambda s: mm_update(sample, s), lambda s: s, adapt.mm_state)
    at_end = i == jnp.asarray(schedule)[window_idx, 1]
    adapt = adapt._replace(mm_state=mm_state, window_idx=jnp.where(at_end, window_idx + 1, window_idx))

    def end_window(adapt):
        new = adapt._replace(**dict(zip(("inverse_mass_matrix", "mass_matrix_sqrt", "mass_matrix_sqrt_inv"),
                                        mm_final(adapt.mm_state, regularize=True))),
                             mm_state=mm_init(mm_size))
        if prox_factor is not None:
            ss_init, _ = dual_averaging()
            new = new._replace(**dict(zip(new._fields[:5], ss_init(jnp.log(prox_factor) + jnp.log(step_size)))))
        return jax.tree.map(lambda a, b: jnp.asarray(a, jnp.result_type(b)), new, adapt)

    return lax.cond(at_end & is_middle, end_window, lambda a: a, adapt)


def _precondition(x: jax.Array, matrix: Any, block_index: list | None, transpose: bool = False) -> jax.Array:
    """``matrix @ x`` (or ``matrix.T @ x``) for the flat vector ``x``, block by block (``None``: one block)."""
    def product(m, v):
        return m * v if jnp.ndim(m) == 1 else (v @ m if transpose else m @ v)

    if block_index is None:
        return product(matrix, x)
    out = x
    for names, index in block_index:
        out = out.at[index].set(product(matrix[names], x[index]))
    return out


def preconditioned_proposal(rng_key: jax.Array, current: langevin.LangevinState, log_density: Callable,
                            h: jax.Array, factors: tuple[Any, Any, Any],
                            block_index: list | None) -> tuple[langevin.LangevinState, jax.Array]:
    """The proposal z + (h^2/2) M^-1 grad + h S^T xi, evaluated, with its Metropolis-Hastings log-ratio.

    ``factors`` is ``(M^-1, T, S)`` (as in the adaptation state), ``block_index`` the blocks' site names and
    positions in the flat vector when the mass matrix is a dict of blocks, else ``None``.
    """
    inverse_mass_matrix, mass_matrix_sqrt, mass_matrix_sqrt_inv = factors

    def mean(s: langevin.LangevinState) -> jax.Array:
        return s.position + (0.5 * h * h) * _precondition(s.logdensity_grad, inverse_mass_matrix, block_index)

    def log_q(to: jax.Array, frm: langevin.LangevinState) -> jax.Array:  # up to a shared constant
        diff = _precondition(to - mean(frm), mass_matrix_sqrt, block_index, transpose=True)  # |T^T d|^2 = d^T M d
        return -jnp.sum(diff * diff, -1) / (2.0 * h * h)

    z = current.position
    noise = random.normal(rng_key, z.shape, z.dtype)
    moved = mean(current) + h * _precondition(noise, mass_matrix_sqrt_inv, block_index, transpose=True)
    new = langevin.LangevinState(moved, *langevin.value_and_grad(log_density, moved))
    log_ratio = new.logdensity - current.logdensity + log_q(z, new) - log_q(moved, current)
    valid = jnp.isfinite(new.logdensity) & ~jnp.isnan(log_ratio)
    return new, jnp.where(valid, log_ratio, -jnp.inf)  # reject nan and +-inf, as langevin's ratio


def _range_ratio(state) -> jax.Array:
    """Per chain (shape ``()`` or ``(num_chains,)``): ``max|z| / range_scale`` over the unconstrained latents."""
    batch = jnp.shape(state.i)
    leaves = [jnp.abs(leaf).reshape(batch + (-1,)) for leaf in jax.tree.leaves(state.z) if jnp.size(leaf)]
    if not leaves:
        return jnp.zeros(batch)
    top = jnp.max(jnp.concatenate(leaves, -1), -1, initial=0.0)
    return top / state.range_scale


def check_range(state, report: Callable) -> None:
    """Call ``report(step, worst ratio, chains out, step size, range scale)`` on the host
    (:func:`jax.debug.callback`) from the compiled loop when some chain's state is out of range; ``state`` is a
    :class:`~tilted_priors.inference.numpyro.kernels.LangevinKernelState`."""
    ratio = _range_ratio(state)  # per chain
    worst = jnp.max(ratio)

    def call():
        jax.debug.callback(report, jnp.max(state.i), worst, jnp.sum(ratio > RANGE_FACTOR),
                           jnp.max(state.step_size), jnp.max(state.range_scale))

    lax.cond(worst > RANGE_FACTOR, call, lambda: None)
