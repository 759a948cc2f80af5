r"""LEBM: a generator with a latent energy-based prior (Pang et al. 2020), for NumPyro.

.. math:: z \sim p_\alpha(z) = \frac{e^{-E_\alpha(z)}\,\mathcal N(z; 0, I)}{Z(\alpha)}, \qquad
          x \mid z \sim \mathcal N\bigl(g_\beta(z), \sigma^2 I\bigr), \quad \sigma = 0.3,

with :math:`E_\alpha` an MLP (:class:`~tilted_priors.numpyro.EnergyMLP`) and :math:`g_\beta` a
transposed-convolution :class:`Generator` (Flax NNX modules). :func:`build` returns a :class:`LatentVariableModel`
whose ``model`` is an ordinary NumPyro program with one :class:`~tilted_priors.numpyro.EnergyTiltedNormal` site
``"z"`` and an observed site ``"x"``; the method is chosen by the guide and the normalizer (LEBM:
``ShortRunPosterior`` and ``Contrastive``). ``prior="gaussian"`` gives the alternating back-propagation baseline
(Han et al. 2017): the same generator under a standard Normal prior. The same public names as
:mod:`tilted_priors.models.pyro.lebm`.

Images are channels-last, ``(N, H, W, C)``, scaled to ``[-1, 1]`` (the generator ends with ``tanh``).

Hyper-parameters
----------------
``REFERENCE``: the paper's settings (SVHN reference code, latent 100). ``MNIST``: this project's scaled-down
choice for 28x28 digits on a CPU (latent 16, a narrower generator); keys not listed in ``MNIST`` are as in
``REFERENCE``. Learning rates: Adam with ``b1=0.5, b2=0.999``, ``2e-5`` for the energy, ``1e-4`` for the
generator (:func:`optimizer`), decayed by ``0.998`` per epoch (left to the training loop).

Parameter names (what :func:`parameter_group` reads): the model registers its networks with
``numpyro.contrib.module.nnx_module``, so the parameters are two pytree param sites, ``"energy$params"`` and
``"generator$params"`` (``svi.get_params(state)`` returns them; :meth:`LatentVariableModel.with_params` puts them
back into the modules).

Examples
--------
>>> REFERENCE["latent_dim"], MNIST["latent_dim"], MNIST["image_shape"]
(100, 16, (28, 28, 1))
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from numbers import Real
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import numpyro.optim
import optax
from flax import nnx
from jax import lax
from jax.custom_derivatives import SymbolicZero

from tilted_priors._validation import check_positive_int
from tilted_priors.inference.numpyro.modules import register_module
from tilted_priors.numpyro import EnergyMLP, EnergyTiltedNormal, ShortRunLangevin
from tilted_priors.models.reference import LEBM, LEBM_MNIST, PRIOR_KINDS, check_image_shape, generator_layers

__all__ = ["REFERENCE", "MNIST", "Generator", "LatentVariableModel", "latent_prior", "build", "parameter_group",
           "optimizer"]

REFERENCE = LEBM  #: the paper's settings (see :mod:`tilted_priors.models.reference`)
MNIST = LEBM_MNIST  #: this project's MNIST scaling

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

    Four transposed convolutions (Pang et al. 2020's SVHN generator, scaled by the image size ``H``), the same
    as the torch :class:`tilted_priors.models.pyro.lebm.Generator`:

    ==============================================  =======================  ====================
    layer                                           kernel, stride, padding  output (H = 28 / 32)
    ==============================================  =======================  ====================
    ``layers[0]``: d -> 4 ngf, leaky_relu(0.2)      H/4, 1, 0                7x7 / 8x8
    ``layers[1]``: 4 ngf -> 2 ngf, leaky_relu(0.2)  4, 2, 1                  14x14 / 16x16
    ``layers[2]``: 2 ngf -> ngf, leaky_relu(0.2)    4, 2, 1                  28x28 / 32x32
    ``layers[3]``: ngf -> C, tanh                   3, 1, 1                  28x28 / 32x32
    ==============================================  =======================  ====================

    (Kernel, stride and padding in torch's ``ConvTranspose2d`` sense: each layer computes exactly torch's map, via
    :func:`jax.lax.conv_transpose` with ``transpose_kernel=True`` and padding ``k - 1 - p`` on each side; the
    stride-2 layers take their kernel gradient through an equivalent sub-pixel convolution, because XLA's CPU
    kernel gradient of ``conv_transpose`` is about 15x slower.) Inputs ``(..., d)`` map to ``(..., H, W, C)``.

    Weights: ``layers[i].kernel`` has shape ``(k, k, out, in)`` and equals the torch generator's
    ``net[2 i].weight.permute(2, 3, 1, 0)`` (torch: ``(in, out, k, k)``); ``layers[i].bias`` equals
    ``net[2 i].bias``. :meth:`load_torch_state_dict` and :meth:`torch_state_dict` convert; with the same weights
    the two backends' outputs (and gradients) agree to rounding. Initial weights follow torch's default law for
    ``ConvTranspose2d`` (uniform on :math:`\pm 1/\sqrt{\text{out}\cdot k^2}`, weight and bias), so both backends
    start from the same distribution of networks.

    Parameters
    ----------
    latent_dim : int
        :math:`d`.
    image_shape : tuple of int
        ``(H, W, C)`` with ``H == W`` in ``{28, 32}`` and ``C >= 1``.
    ngf : int
        Width: the hidden layers have ``4 ngf``, ``2 ngf`` and ``ngf`` channels (reference 128; 32 for MNIST).
    rngs : int or flax.nnx.Rngs
        Seed or NNX random streams for the initial weights.
    param_dtype : dtype
        Parameter dtype (``jnp.float32``; ``jnp.float64`` needs ``jax_enable_x64``).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> g = Generator(16, (28, 28, 1), ngf=8)
    >>> g(jnp.zeros((5, 16))).shape
    (5, 28, 28, 1)
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
        self.layers = nnx.List([_ConvTranspose2d(c_in, c_out, k, s, p, rngs=rngs, param_dtype=param_dtype)
                                for c_in, c_out, k, s, p in generator_layers(self.latent_dim, self.image_shape,
                                                                          self.ngf)])

    def __call__(self, z: jax.Array) -> jax.Array:
        z = jnp.asarray(z)
        if z.shape[-1:] != (self.latent_dim,):
            raise ValueError(f"Generator expects latents of shape (..., {self.latent_dim}), got {tuple(z.shape)}")
        batch = z.shape[:-1]
        h = z.reshape(-1, 1, 1, self.latent_dim)
        for layer in self.layers[:-1]:
            h = jax.nn.leaky_relu(layer(h), 0.2)
        x = jnp.tanh(self.layers[-1](h))
        return x.reshape(*batch, *self.image_shape)

    def load_torch_state_dict(self, state_dict: Mapping[str, Any]) -> "Generator":
        """Copy weights from the torch generator's ``state_dict()`` (in place; returns ``self``).

        Arrays are converted with :func:`numpy.asarray` (torch tensors from ``state_dict()`` work directly) and cast
        to this module's parameter dtype.

        Examples
        --------
        >>> g = Generator(4, (28, 28, 1), ngf=2)
        >>> g.load_torch_state_dict(g.torch_state_dict()) is g
        True
        """
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


def _with_pure_params(module: nnx.Module, params) -> nnx.Module:
    graphdef, state, rest = nnx.split(module, nnx.Param, nnx.Not(nnx.Param))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state, rest)


def latent_prior(model, like, batch_shape=(), *, energy=None, rng_key: jax.Array | None = None) -> dist.Distribution:
    """The prior over ``z`` of a model with ``latent_dim``, ``prior_kind``, ``energy``, ``normalizer`` and
    ``prior_sampler`` attributes (LEBM's, the VAE-EBM's), in the dtype of ``like``: ``Normal(0, 1)`` per latent
    for ``"gaussian"``, else ``EnergyTiltedNormal(energy, 0, 1, ...)``; batch shape ``batch_shape``, event shape
    ``(latent_dim,)``.

    Parameters
    ----------
    model : LatentVariableModel or VAEModel
    like : array_like or dtype
        An array (e.g. one of the networks' parameters) whose dtype the prior's ``loc`` and ``scale`` take, or
        the dtype itself.
    batch_shape : tuple of int
    energy : callable, optional
        The energy to tilt with (default ``model.energy``); inside the model, the module returned by
        :func:`~tilted_priors.inference.numpyro.register_module`.
    rng_key : jax.Array, optional
        For the tilted prior's normalizer (see :class:`~tilted_priors.numpyro.EnergyTilted`).

    Examples
    --------
    >>> latent_prior(build((28, 28, 1), 4, ngf=4, prior="gaussian"), jnp.zeros(()), (3,)).batch_shape
    (3,)
    """
    shape = tuple(batch_shape) + (model.latent_dim,)
    dtype = jnp.result_type(like)
    loc, scale = jnp.zeros(shape, dtype), jnp.ones(shape, dtype)
    if model.prior_kind == "gaussian":
        return dist.Normal(loc, scale).to_event(1)
    return EnergyTiltedNormal(model.energy if energy is None else energy, loc, scale, normalizer=model.normalizer,
                              sampler=_prior_sampler(model), rng_key=rng_key)


def _prior_sampler(model) -> Any:
    """The model's prior sampler, LEBM's ``ShortRunLangevin(60, 0.4)`` by default (not the distributions' "auto"
    default: the reproductions run the paper's chain)."""
    if model.prior_sampler is not None:
        return model.prior_sampler
    return ShortRunLangevin(LEBM["prior_steps"], LEBM["prior_step_size"])


@dataclass(frozen=True, eq=False)
class LatentVariableModel:
    r"""A generator :math:`z \to x` with an energy-tilted (or standard Normal) prior, as a NumPyro program.

    Made by :func:`build`. ``lvm.model`` is the program (pass it to ``SVI``, ``handlers.trace``, a guide):

    ``model(x=None, *, batch_size=None, index=None)`` registers the networks with
    :func:`numpyro.contrib.module.nnx_module` (param sites ``"energy$params"`` when ``prior_kind == "ebm"``, and
    ``"generator$params"``), then, in ``numpyro.plate("data", N)``, samples ``"z"`` from the prior with batch
    shape ``(N,)`` and observes ``"x" ~ Normal(g(z), likelihood_sd).to_event(3)`` (``x`` of shape ``(N, H, W, C)``,
    or unobserved when ``x`` is ``None``). ``N`` is ``x.shape[0]`` or ``batch_size``. ``index`` (the data indices
    of the batch) is accepted and ignored: guides with persistent per-datum chains read it. Returns ``z``. Inside
    the model the prior's energy is the module with the param site's values (a pytree, see ``nnx_module``), so its
    chains compile once.

    The modules held here keep their initial weights: training changes the param sites in the SVI state, and
    :meth:`with_params` returns the model with trained weights (for :meth:`decode` and :meth:`prior`).

    Attributes
    ----------
    generator : Generator
        :math:`g_\beta`.
    energy : flax.nnx.Module or None
        :math:`E_\alpha` (``None`` for the Gaussian baseline).
    latent_dim : int
    image_shape : tuple of int
        ``(H, W, C)``.
    likelihood_sd : float
        :math:`\sigma`.
    prior_kind : str
        ``"ebm"`` or ``"gaussian"``.
    normalizer, prior_sampler : optional
        Passed to :class:`~tilted_priors.numpyro.EnergyTiltedNormal` (``None``: its defaults, ``Contrastive()``
        and ``ShortRunLangevin(60, 0.4)``).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from numpyro import handlers
    >>> lvm = build((28, 28, 1), 4, ngf=4)
    >>> tr = handlers.trace(handlers.seed(lvm.model, 0)).get_trace(jnp.zeros((3, 28, 28, 1)))
    >>> tr["z"]["value"].shape, tr["x"]["fn"].event_shape
    ((3, 4), (28, 28, 1))
    """

    generator: Generator
    energy: nnx.Module | None
    latent_dim: int
    image_shape: tuple[int, int, int]
    likelihood_sd: float
    prior_kind: str
    normalizer: Any = None
    prior_sampler: Any = None

    def _prior_with(self, energy, batch_shape, rng_key=None) -> dist.Distribution:
        return latent_prior(self, self.generator.layers[0].kernel.get_value(), batch_shape, energy=energy,
                            rng_key=rng_key)

    def prior(self, batch_shape: tuple[int, ...] = (), *, rng_key: jax.Array | None = None) -> dist.Distribution:
        """The prior over ``z``, batch shape ``batch_shape``, event shape ``(latent_dim,)``.

        ``EnergyTiltedNormal(energy, 0, 1, normalizer, sampler, rng_key)`` for ``prior_kind == "ebm"`` (``rng_key``
        is for its normalizer, see :class:`~tilted_priors.numpyro.EnergyTilted`), else
        ``Normal(0, 1).expand(...).to_event(1)``. Uses the module's current weights (see :meth:`with_params`).

        Examples
        --------
        >>> lvm = build((28, 28, 1), 4, ngf=4, prior="gaussian")
        >>> lvm.prior((3,)).batch_shape, lvm.prior().event_shape
        ((3,), (4,))
        """
        return self._prior_with(self.energy, batch_shape, rng_key)

    def decode(self, z: jax.Array) -> jax.Array:
        """The generator's mean image :math:`g_\\beta(z)`, shape ``(..., H, W, C)``, values in ``[-1, 1]``.

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> lvm = build((32, 32, 3), 4, ngf=4)
        >>> lvm.decode(jnp.zeros((2, 4))).shape
        (2, 32, 32, 3)
        """
        return self.generator(z)

    def with_params(self, params: Mapping[str, Any]) -> "LatentVariableModel":
        """A copy whose modules hold the values of the param sites in ``params`` (e.g. ``svi.get_params(state)``).

        Sites absent from ``params`` leave their module as it is; the original is not changed.

        Examples
        --------
        >>> import jax, jax.numpy as jnp
        >>> from numpyro import handlers
        >>> lvm = build((28, 28, 1), 4, ngf=4, prior="gaussian")
        >>> tr = handlers.trace(handlers.seed(lvm.model, 0)).get_trace(batch_size=1)
        >>> zeros = jax.tree.map(jnp.zeros_like, tr["generator$params"]["value"])
        >>> float(lvm.with_params({"generator$params": zeros}).decode(jnp.ones(4)).max())
        0.0
        """
        changes = {}
        for name in ("energy", "generator"):
            module = getattr(self, name)
            if module is not None and f"{name}$params" in params:
                changes[name] = _with_pure_params(module, params[f"{name}$params"])
        return dataclasses.replace(self, **changes)

    def _batch_size(self, x, batch_size) -> int:
        if x is None:
            if batch_size is None:
                raise ValueError("model: pass the data x of shape (N, H, W, C) or a batch_size N")
            return check_positive_int("batch_size", batch_size)
        if jnp.ndim(x) != 4 or tuple(jnp.shape(x)[1:]) != self.image_shape:
            raise ValueError(f"model: x must have shape (N, {', '.join(map(str, self.image_shape))}) "
                             f"(channels last), got {tuple(jnp.shape(x))}")
        if batch_size is not None and batch_size != jnp.shape(x)[0]:
            raise ValueError(f"model: batch_size={batch_size} but x has {jnp.shape(x)[0]} rows")
        return int(jnp.shape(x)[0])

    def model(self, x: jax.Array | None = None, *, batch_size: int | None = None, index=None) -> jax.Array:
        """The NumPyro program (see the class docstring).

        Examples
        --------
        >>> from numpyro import handlers
        >>> lvm = build((28, 28, 1), 4, ngf=4, prior="gaussian")
        >>> handlers.seed(lvm.model, 0)(batch_size=2).shape
        (2, 4)
        """
        n = self._batch_size(x, batch_size)
        energy = register_module("energy", self.energy) if self.prior_kind == "ebm" else None
        generator = register_module("generator", self.generator)
        prior = self._prior_with(energy, (n,))
        with numpyro.plate("data", n):
            z = numpyro.sample("z", prior)
            numpyro.sample("x", dist.Normal(generator(z), self.likelihood_sd).to_event(3), obs=x)
        return z


def build(image_shape: tuple[int, int, int] = (28, 28, 1), latent_dim: int = 16, *, prior: str = "ebm",
          ngf: int = 32, energy_hidden: int = 200, energy_depth: int = 2, likelihood_sd: float = 0.3,
          normalizer=None, prior_sampler=None, seed: int = 0) -> LatentVariableModel:
    r"""Build LEBM's networks and model for an image shape and latent size.

    Parameters
    ----------
    image_shape : tuple of int
        ``(H, W, C)``, channels last; ``H == W`` in ``{28, 32}``, ``C >= 1``.
    latent_dim : int
        :math:`d` (reference 100 for SVHN, 16 for MNIST here).
    prior : {"ebm", "gaussian"}
        ``"ebm"``: LEBM's :class:`~tilted_priors.numpyro.EnergyTiltedNormal` prior with an
        :class:`~tilted_priors.numpyro.EnergyMLP` energy (``latent_dim -> energy_hidden x energy_depth -> 1``,
        GELU). ``"gaussian"``: a standard Normal (alternating back-propagation); ``energy`` is ``None``.
    ngf : int
        Generator width (see :class:`Generator`): 32 for MNIST, 128 for the reference.
    energy_hidden, energy_depth : int
        The energy MLP's width and number of hidden layers.
    likelihood_sd : float
        :math:`\sigma` of the Gaussian likelihood (0.3).
    normalizer, prior_sampler : optional
        The prior's normalizer and sampler (``None``: ``Contrastive()`` and ``ShortRunLangevin(60, 0.4)``).
    seed : int
        Seed for the initial weights (``flax.nnx.Rngs``; the generator and the energy get separate streams).

    Returns
    -------
    LatentVariableModel

    Raises
    ------
    ValueError
        For an unsupported image shape, a non-positive latent size or width, an unknown ``prior`` or a
        non-positive ``likelihood_sd``.

    Examples
    --------
    >>> import jax
    >>> from tilted_priors.numpyro import ShortRunLangevin
    >>> lvm = build((28, 28, 1), 16, prior_sampler=ShortRunLangevin(2, 0.4))
    >>> lvm.decode(lvm.prior().sample(jax.random.PRNGKey(0), (5,))).shape
    (5, 28, 28, 1)
    """
    image_shape = check_image_shape(image_shape)
    latent_dim = check_positive_int("latent_dim", latent_dim)
    if prior not in PRIOR_KINDS:
        raise ValueError(f"prior must be one of {PRIOR_KINDS}, got {prior!r}")
    if isinstance(likelihood_sd, bool) or not isinstance(likelihood_sd, Real) or not (
            math.isfinite(likelihood_sd) and likelihood_sd > 0):
        raise ValueError(f"likelihood_sd must be a finite positive number, got {likelihood_sd!r}")
    key_g, key_e = jax.random.split(jax.random.PRNGKey(seed))
    generator = Generator(latent_dim, image_shape, ngf, rngs=nnx.Rngs(params=key_g))
    energy = (EnergyMLP(latent_dim, energy_hidden, energy_depth, rngs=nnx.Rngs(params=key_e))
              if prior == "ebm" else None)
    return LatentVariableModel(generator=generator, energy=energy, latent_dim=latent_dim, image_shape=image_shape,
                               likelihood_sd=float(likelihood_sd), prior_kind=prior, normalizer=normalizer,
                               prior_sampler=prior_sampler)


def parameter_group(name: str) -> str:
    """The parameter group of a param site name: ``"energy"``, ``"generator"`` or ``"other"``.

    Examples
    --------
    >>> parameter_group("energy$params"), parameter_group("generator$params"), parameter_group("auto_loc")
    ('energy', 'generator', 'other')
    """
    head = name.split("$", 1)[0]
    return head if head in ("energy", "generator") and name == f"{head}$params" else "other"


def optimizer(lr_energy: float = REFERENCE["lr_energy"], lr_generator: float = REFERENCE["lr_generator"],
              betas: tuple[float, float] = REFERENCE["adam_betas"], lr_other: float | None = None):
    """LEBM's optimiser: Adam with one learning rate for the energy and another for the generator.

    An :func:`optax.multi_transform` of three Adams labelled by :func:`parameter_group` over the top-level param
    site names, wrapped with :func:`numpyro.optim.optax_to_numpyro` for ``SVI``. A learning-rate schedule (the
    paper's 0.998 per epoch) can be had by building the same transform with ``optax`` schedules.

    Parameters
    ----------
    lr_energy, lr_generator : float
        Learning rates of ``"energy$params"`` and ``"generator$params"`` (2e-5 and 1e-4).
    betas : tuple of float
        Adam's ``(b1, b2)``, (0.5, 0.999) as the paper.
    lr_other : float, optional
        For any other param site (a guide's, a normalizer's); default ``lr_generator``.

    Returns
    -------
    object
        A NumPyro optimiser (what :func:`numpyro.optim.optax_to_numpyro` returns), for ``SVI`` and ``fit``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> opt = optimizer()
    >>> state = opt.init({"energy$params": jnp.zeros(2), "auto_loc": jnp.zeros(3)})
    >>> opt.get_params(state)["auto_loc"].shape
    (3,)
    """
    b1, b2 = betas
    lrs = {"energy": lr_energy, "generator": lr_generator,
           "other": lr_generator if lr_other is None else lr_other}
    transforms = {group: optax.adam(lr, b1=b1, b2=b2) for group, lr in lrs.items()}

    def labels(params):
        return {name: jax.tree.map(lambda _: parameter_group(name), value) for name, value in params.items()}

    return numpyro.optim.optax_to_numpyro(optax.multi_transform(transforms, labels))
