r"""LEBM: a generator with a latent energy-based prior (Pang et al. 2020), for NumPyro.

.. math:: z \sim p_\alpha(z) = \frac{e^{-E_\alpha(z)}\,\mathcal N(z; 0, I)}{Z(\alpha)}, \qquad
          x \mid z \sim \mathcal N\bigl(g_\beta(z), \sigma^2 I\bigr), \quad \sigma = 0.3,

with :math:`E_\alpha` an MLP (:class:`~tilted_priors.numpyro.EnergyMLP`) and :math:`g_\beta` a
transposed-convolution :class:`Generator` (Flax NNX modules; the generator is defined in
:mod:`tilted_priors.models.numpyro.generators` and its layers are :func:`generator_plan`'s: the paper's SVHN network
at 32x32, the CelebA network at 64x64, this project's own scaling at 28x28). :func:`build` returns a
:class:`LatentVariableModel` whose ``model`` is an ordinary NumPyro program with one
:class:`~tilted_priors.numpyro.EnergyTiltedNormal` site ``"z"`` and an observed site ``"x"``; the method is chosen
by the guide and the normalizer (LEBM: ``ShortRunPosterior`` and ``Contrastive``). ``prior="gaussian"`` gives the
alternating back-propagation baseline (Han et al. 2017): the same generator under a standard Normal prior. The same
public names as :mod:`tilted_priors.models.pyro.lebm`.

Images are channels-last, ``(N, H, W, C)``, scaled to ``[-1, 1]`` (the generator ends with ``tanh``).

Hyper-parameters
----------------
``REFERENCE``: the paper's settings (the official SVHN code: latent 100, generator width ``ngf=64``). ``MNIST``: this
project's scaled-down choice for 28x28 digits on a CPU (latent 16, its own 28x28 generator of width 32, not the
paper's); keys not listed in ``MNIST`` are as in ``REFERENCE``. Learning rates: Adam with ``b1=0.5, b2=0.999``,
``2e-5`` for the energy, ``1e-4`` for the generator (:func:`optimizer`), decayed by ``0.998`` per epoch (left to the
training loop).

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
from numbers import Real
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import numpyro.optim
import optax
from flax import nnx

from tilted_priors._validation import check_positive_int
from tilted_priors.inference.numpyro.modules import register_module
from tilted_priors.numpyro import EnergyMLP, EnergyTiltedNormal, ShortRunLangevin
# _symmetric_uniform: vae_ebm imports it from here
from tilted_priors.models.numpyro.generators import Generator, _symmetric_uniform, generator_plan  # noqa: F401
from tilted_priors.models.reference import LEBM, LEBM_MNIST, PRIOR_KINDS, check_image_shape

__all__ = ["REFERENCE", "MNIST", "Generator", "generator_plan", "LatentVariableModel", "latent_prior", "build",
           "parameter_group", "optimizer"]

REFERENCE = LEBM  #: the paper's settings (see :mod:`tilted_priors.models.reference`)
MNIST = LEBM_MNIST  #: this project's MNIST scaling

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
        ``(H, W, C)``, channels last; ``H == W`` in ``{28, 32, 64}``, ``C >= 1``.
    latent_dim : int
        :math:`d` (reference 100 for SVHN, 16 for MNIST here).
    prior : {"ebm", "gaussian"}
        ``"ebm"``: LEBM's :class:`~tilted_priors.numpyro.EnergyTiltedNormal` prior with an
        :class:`~tilted_priors.numpyro.EnergyMLP` energy (``latent_dim -> energy_hidden x energy_depth -> 1``,
        GELU). ``"gaussian"``: a standard Normal (alternating back-propagation); ``energy`` is ``None``.
    ngf : int
        Generator width (see :func:`generator_plan`): 32 for MNIST, 64 for the reference (SVHN).
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
