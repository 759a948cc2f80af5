"""LEBM's generator network for NumPyro (Flax NNX), built from the backend-free layer plan
:func:`~tilted_priors.models.reference.generator_plan`; :mod:`tilted_priors.models.pyro.generators` has the same
public names and the same layers in ``torch.nn``. :mod:`tilted_priors.models.numpyro.lebm` re-exports both names.

Each transposed convolution computes exactly torch's ``ConvTranspose2d`` map on channels-last arrays (see
``_ConvTranspose2d``), so weights copied from the torch twin give the same outputs and gradients.

Examples
--------
>>> [(layer.out_channels, layer.output_size) for layer in generator_plan((32, 32, 3), 100, 64)]
[(512, 4), (256, 8), (128, 16), (3, 32)]
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.custom_derivatives import SymbolicZero

from tilted_priors._validation import check_positive_int
from tilted_priors.models.reference import check_image_shape, generator_plan

__all__ = ["Generator", "generator_plan"]

#: The plan's activation names as JAX functions.
_ACTIVATIONS = {"leaky_relu(0.2)": partial(jax.nn.leaky_relu, negative_slope=0.2), "tanh": jnp.tanh}


def _symmetric_uniform(bound: float):
    """Initializer ``U(-bound, bound)`` drawn by NumPy from a stream seeded by the JAX key.

    Deterministic in the key like ``jax.random.uniform``, but with no per-shape XLA compilation (each new
    parameter shape would otherwise compile a sampler, about a second each on a loaded two-core machine).
    """
    def init(key, shape, dtype=jnp.float32):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        rng = np.random.default_rng(np.asarray(key).ravel().tolist())
        return jnp.asarray(rng.uniform(-bound, bound, shape), dtype)

    return init


def _lax_conv_transpose(x, kernel, stride: int, padding: int):
    """torch's ``conv_transpose2d`` (no bias) in NHWC, with ``kernel`` of shape ``(k, k, out, in)``."""
    k = kernel.shape[0]
    pad = ((k - 1 - padding, k - 1 - padding),) * 2
    return lax.conv_transpose(x, kernel, (stride, stride), pad, transpose_kernel=True,
                              dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _phase_tables(k: int, stride: int, padding: int):
    """Index tables of the sub-pixel form of a transposed convolution (see :func:`_subpixel_conv_transpose`).

    Output row ``i = stride * m + r`` (phase ``r``) sums input rows ``m + delta`` times kernel tap
    ``a = r + padding - stride * delta``. Returns ``(lo, hi, idx, valid)``: the range of ``delta`` and, for window
    position ``t`` (``delta = lo + t``) and phase ``r``, the tap ``idx[t, r]`` and whether it exists.
    """
    deltas = [(r + padding - a) // stride for r in range(stride) for a in range(k) if (r + padding - a) % stride == 0]
    lo, hi = min(deltas), max(deltas)
    idx = np.zeros((hi - lo + 1, stride), dtype=np.int32)
    valid = np.zeros((hi - lo + 1, stride), dtype=bool)
    for t in range(hi - lo + 1):
        for r in range(stride):
            a = r + padding - stride * (lo + t)
            if 0 <= a < k:
                idx[t, r], valid[t, r] = a, True
    return lo, hi, idx, valid


def _subpixel_conv_transpose(x, kernel, stride: int, padding: int):
    """The same map as :func:`_lax_conv_transpose` (when ``k - 2 padding == stride``), computed as a stride-1
    convolution with ``stride**2`` phases of output channels followed by a depth-to-space shuffle.

    Used for the kernel's derivative only: XLA's CPU gradient of ``conv_transpose`` with respect to the kernel is
    about 15x slower than this form's (a plain convolution's weight gradient), while its forward pass and input
    gradient are faster than this form's.
    """
    k, _, c_out, c_in = kernel.shape
    lo, hi, idx, valid = _phase_tables(k, stride, padding)
    taps = kernel[idx[:, None, :, None], idx[None, :, None, :]]           # (T, T, s, s, out, in)
    mask = (valid[:, None, :, None] & valid[None, :, None, :])[..., None, None]
    taps = jnp.where(mask, taps, jnp.zeros((), kernel.dtype))
    window = hi - lo + 1
    phased = taps.transpose(0, 1, 5, 2, 3, 4).reshape(window, window, c_in, stride * stride * c_out)
    y = lax.conv_general_dilated(x, phased, (1, 1), ((-lo, hi), (-lo, hi)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    b, h, w, _ = y.shape
    y = y.reshape(b, h, w, stride, stride, c_out).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, h * stride, w * stride, c_out)


@partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _conv_transpose(x, kernel, stride: int, padding: int):
    return _lax_conv_transpose(x, kernel, stride, padding)


def _conv_transpose_jvp(stride, padding, primals, tangents):
    x, kernel = primals
    dx, dkernel = tangents
    y = _lax_conv_transpose(x, kernel, stride, padding)
    dy = jnp.zeros_like(y)
    if not isinstance(dx, SymbolicZero):
        dy = dy + _lax_conv_transpose(dx, kernel, stride, padding)
    if not isinstance(dkernel, SymbolicZero):
        dy = dy + _subpixel_conv_transpose(x, dkernel, stride, padding)
    return y, dy


_conv_transpose.defjvp(_conv_transpose_jvp, symbolic_zeros=True)


class _ConvTranspose2d(nnx.Module):
    r"""torch's ``ConvTranspose2d(c_in, c_out, k, stride, padding)`` on channels-last inputs (Flax NNX).

    ``kernel`` has shape ``(k, k, c_out, c_in)`` (torch's weight ``.permute(2, 3, 1, 0)``; the layout of
    :class:`flax.nnx.ConvTranspose` with ``transpose_kernel=True``), ``bias`` shape ``(c_out,)``. The forward pass
    is :func:`jax.lax.conv_transpose`; for ``stride > 1`` (with ``k - 2 padding == stride``) the kernel's derivative
    is taken through the equivalent sub-pixel convolution, which XLA differentiates much faster on CPU.
    Initialisation as torch's: both uniform on :math:`\pm 1/\sqrt{c_\text{out} k^2}`.
    """

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, padding: int, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        bound = 1.0 / math.sqrt(c_out * k * k)  # torch: the fan_in of an (in, out, k, k) weight is out * k * k
        self.kernel = nnx.Param(_symmetric_uniform(bound)(rngs.params(), (k, k, c_out, c_in), param_dtype))
        self.bias = nnx.Param(_symmetric_uniform(bound)(rngs.params(), (c_out,), param_dtype))
        self.stride, self.padding = stride, padding

    def __call__(self, x):
        kernel, bias = self.kernel[...], self.bias[...]
        dtype = jnp.result_type(x, kernel)
        x, kernel, bias = x.astype(dtype), kernel.astype(dtype), bias.astype(dtype)
        k = kernel.shape[0]
        if self.stride > 1 and k - 2 * self.padding == self.stride:
            y = _conv_transpose(x, kernel, self.stride, self.padding)
        else:
            y = _lax_conv_transpose(x, kernel, self.stride, self.padding)
        return y + bias


class Generator(nnx.Module):
    r"""LEBM's generator :math:`g_\beta`: latent vectors to channels-last images in ``[-1, 1]`` (Flax NNX).

    One transposed convolution per layer of :func:`~tilted_priors.models.reference.generator_plan`, each followed
    by its activation (leaky_relu(0.2), tanh after the last), the same network as the torch
    :class:`tilted_priors.models.pyro.generators.Generator`. The plans (``in -> out``, kernel/stride/padding,
    output size):

    - 32x32, Pang et al. 2020's SVHN generator: ``d -> 8 ngf`` (4/1/0, 4x4), ``8 ngf -> 4 ngf`` (4/2/1, 8x8),
      ``4 ngf -> 2 ngf`` (4/2/1, 16x16), ``2 ngf -> C`` (4/2/1, 32x32). With ``ngf=64``, ``d=100``: 100 -> 512 ->
      256 -> 128 -> 3, 3,447,683 parameters.
    - 64x64 (CelebA): ``d -> 8 ngf`` (4x4), ``-> 4 ngf`` (8x8), ``-> 2 ngf`` (16x16), ``-> ngf`` (32x32), ``-> C``
      (64x64); 4/1/0 then 4/2/1.
    - 28x28, this project's MNIST scaling (not the paper's): ``d -> 4 ngf`` (7/1/0, 7x7), ``4 ngf -> 2 ngf``
      (4/2/1, 14x14), ``2 ngf -> ngf`` (4/2/1, 28x28), ``ngf -> C`` (3/1/1, 28x28).

    (Kernel, stride and padding in torch's ``ConvTranspose2d`` sense: each layer computes exactly torch's map, via
    :func:`jax.lax.conv_transpose` with ``transpose_kernel=True`` and padding ``k - 1 - p`` on each side; the
    stride-2 layers take their kernel gradient through an equivalent sub-pixel convolution, because XLA's CPU
    kernel gradient of ``conv_transpose`` is about 15x slower.) No batch norm (the official LEBM code's default).
    Inputs ``(..., d)`` map to ``(..., H, W, C)``.

    Weights: ``layers[i].kernel`` has shape ``(k, k, out, in)`` and equals the torch generator's
    ``net[2 i].weight.permute(2, 3, 1, 0)`` (torch: ``(in, out, k, k)``); ``layers[i].bias`` equals
    ``net[2 i].bias``. :meth:`load_torch_state_dict` and :meth:`torch_state_dict` convert; with the same weights
    the two backends' outputs (and gradients) agree to rounding. Initial weights follow torch's default law for
    ``ConvTranspose2d`` (uniform on :math:`\pm 1/\sqrt{\text{out}\cdot k^2}`, weight and bias), so both backends
    start from the same distribution of networks (the official LEBM code uses ``xavier_normal_`` for the
    convolution weights; not reproduced).

    Parameters
    ----------
    latent_dim : int
        :math:`d`.
    image_shape : tuple of int
        ``(H, W, C)`` with ``H == W`` in ``{28, 32, 64}`` and ``C >= 1``.
    ngf : int
        Width (see :func:`~tilted_priors.models.reference.generator_plan`): 64 for the paper's SVHN network, 32 for
        this project's MNIST one.
    rngs : int or flax.nnx.Rngs
        Seed or NNX random streams for the initial weights.
    param_dtype : dtype
        Parameter dtype (``jnp.float32``; ``jnp.float64`` needs ``jax_enable_x64``).

    Attributes
    ----------
    plan : tuple of GeneratorLayer
        The layers, as :func:`~tilted_priors.models.reference.generator_plan` gives them.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> g = Generator(16, (28, 28, 1), ngf=8)
    >>> g(jnp.zeros((5, 16))).shape
    (5, 28, 28, 1)
    >>> Generator(100, (64, 64, 3), ngf=4)(jnp.zeros((2, 100))).shape
    (2, 64, 64, 3)
    """

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int] = (28, 28, 1), ngf: int = 32, *,
                 rngs: int | nnx.Rngs = 0, param_dtype=jnp.float32):
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        self.image_shape = check_image_shape(image_shape)
        self.ngf = check_positive_int("ngf", ngf)
        if isinstance(rngs, int) and not isinstance(rngs, bool):
            rngs = nnx.Rngs(rngs)
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an int seed or flax.nnx.Rngs, got {type(rngs).__name__}")
        self.plan = tuple(generator_plan(self.image_shape, self.latent_dim, self.ngf))  # static: a tuple of tuples
        self.layers = nnx.List([_ConvTranspose2d(layer.in_channels, layer.out_channels, layer.kernel, layer.stride,
                                                 layer.padding, rngs=rngs, param_dtype=param_dtype)
                                for layer in self.plan])

    def __call__(self, z: jax.Array) -> jax.Array:
        z = jnp.asarray(z)
        if z.shape[-1:] != (self.latent_dim,):
            raise ValueError(f"Generator expects latents of shape (..., {self.latent_dim}), got {tuple(z.shape)}")
        batch = z.shape[:-1]
        h = z.reshape(-1, 1, 1, self.latent_dim)
        for layer, spec in zip(self.layers, self.plan):
            h = _ACTIVATIONS[spec.activation](layer(h))
        return h.reshape(*batch, *self.image_shape)

    def load_torch_state_dict(self, state_dict: Mapping[str, Any]) -> "Generator":
        """Copy weights from the torch generator's ``state_dict()`` (in place; returns ``self``).

        Arrays are converted with :func:`numpy.asarray` (torch tensors from ``state_dict()`` work directly) and cast
        to this module's parameter dtype. A ``ValueError`` names the difference when the names or shapes are those of
        another plan (another image size, latent size or width).

        Examples
        --------
        >>> g = Generator(4, (28, 28, 1), ngf=2)
        >>> g.load_torch_state_dict(g.torch_state_dict()) is g
        True
        """
        expected = {f"net.{2 * i}.{name}" for i in range(len(self.layers)) for name in ("weight", "bias")}
        if set(state_dict) != expected:
            missing, extra = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
            raise ValueError(f"the torch state_dict does not fit this generator ({len(self.layers)} layers for "
                             f"{self.image_shape}): missing {missing}, unexpected {extra}")
        for i, layer in enumerate(self.layers):
            kernel, bias = layer.kernel.get_value(), layer.bias.get_value()
            w = np.asarray(state_dict[f"net.{2 * i}.weight"]).transpose(2, 3, 1, 0)
            b = np.asarray(state_dict[f"net.{2 * i}.bias"])
            if w.shape != kernel.shape or b.shape != bias.shape:
                k, _, c_out, c_in = kernel.shape
                raise ValueError(f"net.{2 * i}: the torch weight {w.transpose(3, 2, 0, 1).shape} and bias {b.shape} do "
                                 f"not match this generator's layer ({(c_in, c_out, k, k)} and {bias.shape})")
            layer.kernel.set_value(jnp.asarray(w, kernel.dtype))
            layer.bias.set_value(jnp.asarray(b, bias.dtype))
        return self

    def torch_state_dict(self) -> dict[str, np.ndarray]:
        """The weights in torch's names and layouts (numpy arrays), for ``torch_generator.load_state_dict``.

        Use ``{k: torch.as_tensor(v) for k, v in g.torch_state_dict().items()}``.

        Examples
        --------
        >>> Generator(4, (28, 28, 1), ngf=2).torch_state_dict()["net.0.weight"].shape   # (in, out, k, k)
        (4, 8, 7, 7)
        """
        out = {}
        for i, layer in enumerate(self.layers):
            # copies: writable and contiguous, as torch.as_tensor / load_state_dict want them
            out[f"net.{2 * i}.weight"] = np.ascontiguousarray(np.array(layer.kernel.get_value()).transpose(3, 2, 0, 1))
            out[f"net.{2 * i}.bias"] = np.array(layer.bias.get_value())
        return out
