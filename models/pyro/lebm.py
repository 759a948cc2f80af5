r"""LEBM: a generator with a latent energy-based prior (Pang et al. 2020), for Pyro.

.. math:: z \sim p_\alpha(z) = \frac{e^{-E_\alpha(z)}\,\mathcal N(z; 0, I)}{Z(\alpha)}, \qquad
          x \mid z \sim \mathcal N\bigl(g_\beta(z), \sigma^2 I\bigr), \quad \sigma = 0.3,

with :math:`E_\alpha` an MLP (:class:`~tilted_priors.pyro.EnergyMLP`) and :math:`g_\beta` a transposed-convolution
:class:`Generator` (defined in :mod:`tilted_priors.models.pyro.generators`; its layers are :func:`generator_plan`'s:
the paper's SVHN network at 32x32, the CelebA network at 64x64, this project's own scaling at 28x28).
:func:`build` returns a :class:`LatentVariableModel` whose ``model`` is an ordinary Pyro program with one
:class:`~tilted_priors.pyro.EnergyTiltedNormal` site ``"z"`` and an observed site ``"x"``; the method is chosen by
the guide and the normalizer (LEBM: ``ShortRunPosterior`` and ``Contrastive``). ``prior="gaussian"`` gives the
alternating back-propagation baseline (Han et al. 2017): the same generator under a standard Normal prior.

Images are channels-last, ``(N, H, W, C)``, scaled to ``[-1, 1]`` (the generator ends with ``tanh``).

Hyper-parameters
----------------
``REFERENCE``: the paper's settings (the official SVHN code: latent 100, generator width ``ngf=64``). ``MNIST``: this
project's scaled-down choice for 28x28 digits on a CPU (latent 16, its own 28x28 generator of width 32, not the
paper's); keys not listed in ``MNIST`` are as in ``REFERENCE``. Learning rates: Adam with ``betas=(0.5, 0.999)``,
``2e-5`` for the energy, ``1e-4`` for the generator (:func:`optimizer`), decayed by ``0.998`` per epoch (left to the
training loop).

Parameter names (what :func:`parameter_group` reads): the model registers ``pyro.module("energy", energy)`` and
``pyro.module("generator", generator)``, so the param store holds ``"energy$$$net.0.weight"``, ...,
``"generator$$$net.0.weight"``, ... (Pyro's per-parameter optimiser callables see them as ``"energy.net.0.weight"``).

Examples
--------
>>> REFERENCE["latent_dim"], MNIST["latent_dim"], MNIST["image_shape"]
(100, 16, (28, 28, 1))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from tilted_priors.inference.pyro.modules import register_module
from tilted_priors._validation import check_positive_int
from tilted_priors.pyro import EnergyMLP, EnergyTiltedNormal, ShortRunLangevin
from tilted_priors.models.pyro.generators import Generator, generator_plan
from tilted_priors.models.reference import LEBM, LEBM_MNIST, PRIOR_KINDS, check_image_shape

__all__ = ["REFERENCE", "MNIST", "Generator", "generator_plan", "LatentVariableModel", "latent_prior", "build",
           "parameter_group", "optimizer"]

REFERENCE = LEBM  #: the paper's settings (see :mod:`tilted_priors.models.reference`)
MNIST = LEBM_MNIST  #: this project's MNIST scaling

def latent_prior(model, like: torch.Tensor, batch_shape=(), *, energy=None) -> dist.TorchDistribution:
    """The prior over ``z`` of a model with ``latent_dim``, ``prior_kind``, ``energy``, ``normalizer`` and
    ``prior_sampler`` attributes (LEBM's, the VAE-EBM's), in the dtype and on the device of ``like``:
    ``Normal(0, 1)`` per latent for ``"gaussian"``, else ``EnergyTiltedNormal(energy, 0, 1, ...)``; batch shape
    ``batch_shape``, event shape ``(latent_dim,)``.

    Parameters
    ----------
    model : LatentVariableModel or VAEModel
    like : torch.Tensor
        A tensor (e.g. one of the networks' parameters) whose dtype and device the prior's ``loc`` and ``scale``
        take.
    batch_shape : tuple of int
    energy : callable, optional
        The energy to tilt with (default ``model.energy``).

    Examples
    --------
    >>> import torch
    >>> latent_prior(build((28, 28, 1), 4, ngf=4, prior="gaussian"), torch.zeros(()), (3,)).batch_shape
    torch.Size([3])
    """
    shape = tuple(batch_shape) + (model.latent_dim,)
    loc = torch.zeros(shape, dtype=like.dtype, device=like.device)
    scale = torch.ones(shape, dtype=like.dtype, device=like.device)
    if model.prior_kind == "gaussian":
        return dist.Normal(loc, scale).to_event(1)
    return EnergyTiltedNormal(model.energy if energy is None else energy, loc, scale, normalizer=model.normalizer,
                              sampler=_prior_sampler(model))


def _prior_sampler(model) -> Any:
    """The model's prior sampler, LEBM's ``ShortRunLangevin(60, 0.4)`` by default (not the distributions' "auto"
    default: the reproductions run the paper's chain)."""
    if model.prior_sampler is not None:
        return model.prior_sampler
    return ShortRunLangevin(LEBM["prior_steps"], LEBM["prior_step_size"])


@dataclass(frozen=True, eq=False)
class LatentVariableModel:
    r"""A generator :math:`z \to x` with an energy-tilted (or standard Normal) prior, as a Pyro program.

    Made by :func:`build`. ``lvm.model`` is the program (pass it to ``SVI``, ``poutine.trace``, a guide):

    ``model(x=None, *, batch_size=None, index=None)`` registers the networks (``pyro.module("energy", ...)``
    when ``prior_kind == "ebm"``, ``pyro.module("generator", ...)``, both with ``update_module_params=True``: when
    the param store already holds parameters of these names — a loaded checkpoint, or an earlier model — the
    modules take them; call ``pyro.clear_param_store()`` to start afresh), then, in ``pyro.plate("data", N)``, samples
    ``"z"`` from :meth:`prior` with batch shape ``(N,)`` and observes ``"x" ~ Normal(decode(z),
    likelihood_sd).to_event(3)`` (``x`` of shape ``(N, H, W, C)``, or unobserved when ``x`` is ``None``). ``N`` is
    ``x.shape[0]`` or ``batch_size``. ``index`` (the data indices of the batch) is accepted and ignored: guides
    with persistent per-datum chains read it. Returns ``z``.

    Attributes
    ----------
    generator : Generator
        :math:`g_\beta`.
    energy : torch.nn.Module or None
        :math:`E_\alpha` (``None`` for the Gaussian baseline).
    latent_dim : int
    image_shape : tuple of int
        ``(H, W, C)``.
    likelihood_sd : float
        :math:`\sigma`.
    prior_kind : str
        ``"ebm"`` or ``"gaussian"``.
    normalizer, prior_sampler : optional
        Passed to :class:`~tilted_priors.pyro.EnergyTiltedNormal` (``None``: its defaults, ``Contrastive()`` and
        ``ShortRunLangevin(60, 0.4)``).

    Examples
    --------
    >>> import torch, pyro
    >>> lvm = build((28, 28, 1), 4, ngf=4)
    >>> tr = pyro.poutine.trace(lvm.model).get_trace(torch.zeros(3, 28, 28, 1))
    >>> tr.nodes["z"]["value"].shape, tr.nodes["x"]["fn"].event_shape
    (torch.Size([3, 4]), torch.Size([28, 28, 1]))
    """

    generator: Generator
    energy: nn.Module | None
    latent_dim: int
    image_shape: tuple[int, int, int]
    likelihood_sd: float
    prior_kind: str
    normalizer: Any = None
    prior_sampler: Any = None

    def prior(self, batch_shape: tuple[int, ...] | torch.Size = ()) -> dist.TorchDistribution:
        """The prior over ``z``, batch shape ``batch_shape``, event shape ``(latent_dim,)``.

        ``EnergyTiltedNormal(energy, 0, 1, normalizer, sampler)`` for ``prior_kind == "ebm"``, else
        ``Normal(0, 1).expand(...).to_event(1)``.

        Examples
        --------
        >>> lvm = build((28, 28, 1), 4, ngf=4, prior="gaussian")
        >>> lvm.prior((3,)).batch_shape, lvm.prior().event_shape
        (torch.Size([3]), torch.Size([4]))
        """
        return latent_prior(self, next(self.generator.parameters()), batch_shape)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The generator's mean image :math:`g_\\beta(z)`, shape ``(..., H, W, C)``, values in ``[-1, 1]``.

        Examples
        --------
        >>> import torch
        >>> lvm = build((32, 32, 3), 4, ngf=4)
        >>> lvm.decode(torch.zeros(2, 4)).shape
        torch.Size([2, 32, 32, 3])
        """
        return self.generator(z)

    def _batch_size(self, x, batch_size) -> int:
        if x is None:
            if batch_size is None:
                raise ValueError("model: pass the data x of shape (N, H, W, C) or a batch_size N")
            return check_positive_int("batch_size", batch_size)
        if tuple(x.shape[1:]) != self.image_shape or x.dim() != 4:
            raise ValueError(f"model: x must have shape (N, {', '.join(map(str, self.image_shape))}) "
                             f"(channels last), got {tuple(x.shape)}")
        if batch_size is not None and batch_size != x.shape[0]:
            raise ValueError(f"model: batch_size={batch_size} but x has {x.shape[0]} rows")
        return int(x.shape[0])

    def model(self, x: torch.Tensor | None = None, *, batch_size: int | None = None, index=None) -> torch.Tensor:
        """The Pyro program (see the class docstring).

        Examples
        --------
        >>> lvm = build((28, 28, 1), 4, ngf=4, prior="gaussian")
        >>> lvm.model(batch_size=2).shape
        torch.Size([2, 4])
        """
        if x is not None and not torch.is_tensor(x):
            x = torch.as_tensor(x, dtype=next(self.generator.parameters()).dtype)
        n = self._batch_size(x, batch_size)
        if self.prior_kind == "ebm":
            register_module("energy", self.energy)
        register_module("generator", self.generator)
        prior = self.prior((n,))
        with pyro.plate("data", n):
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Normal(self.generator(z), self.likelihood_sd).to_event(3), obs=x)
        return z


def build(image_shape: tuple[int, int, int] = (28, 28, 1), latent_dim: int = 16, *, prior: str = "ebm",
          ngf: int = 32, energy_hidden: int = 200, energy_depth: int = 2, likelihood_sd: float = 0.3,
          normalizer=None, prior_sampler=None, seed: int | None = 0) -> LatentVariableModel:
    r"""Build LEBM's networks and model for an image shape and latent size.

    Parameters
    ----------
    image_shape : tuple of int
        ``(H, W, C)``, channels last; ``H == W`` in ``{28, 32, 64}``, ``C >= 1``.
    latent_dim : int
        :math:`d` (reference 100 for SVHN, 16 for MNIST here).
    prior : {"ebm", "gaussian"}
        ``"ebm"``: LEBM's :class:`~tilted_priors.pyro.EnergyTiltedNormal` prior with an
        :class:`~tilted_priors.pyro.EnergyMLP` energy (``latent_dim -> energy_hidden x energy_depth -> 1``, GELU).
        ``"gaussian"``: a standard Normal (alternating back-propagation); ``energy`` is ``None``.
    ngf : int
        Generator width (see :func:`generator_plan`): 32 for MNIST, 64 for the reference (SVHN).
    energy_hidden, energy_depth : int
        The energy MLP's width and number of hidden layers.
    likelihood_sd : float
        :math:`\sigma` of the Gaussian likelihood (0.3).
    normalizer, prior_sampler : optional
        The prior's normalizer and sampler (``None``: ``Contrastive()`` and ``ShortRunLangevin(60, 0.4)``).
    seed : int or None
        Seed for the initial weights (``torch.manual_seed``; ``None`` leaves the global RNG alone). The state of
        torch's global RNG is restored afterwards.

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
    >>> from tilted_priors.pyro import ShortRunLangevin
    >>> lvm = build((28, 28, 1), 16, prior_sampler=ShortRunLangevin(2, 0.4))
    >>> lvm.decode(lvm.prior().sample((5,))).shape
    torch.Size([5, 28, 28, 1])
    """
    image_shape = check_image_shape(image_shape)
    latent_dim = check_positive_int("latent_dim", latent_dim)
    if prior not in PRIOR_KINDS:
        raise ValueError(f"prior must be one of {PRIOR_KINDS}, got {prior!r}")
    if isinstance(likelihood_sd, bool) or not isinstance(likelihood_sd, Real) or not (
            math.isfinite(likelihood_sd) and likelihood_sd > 0):
        raise ValueError(f"likelihood_sd must be a finite positive number, got {likelihood_sd!r}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        generator = Generator(latent_dim, image_shape, ngf)
        energy = EnergyMLP(latent_dim, energy_hidden, energy_depth) if prior == "ebm" else None
    return LatentVariableModel(generator=generator, energy=energy, latent_dim=latent_dim, image_shape=image_shape,
                               likelihood_sd=float(likelihood_sd), prior_kind=prior, normalizer=normalizer,
                               prior_sampler=prior_sampler)


def parameter_group(name: str) -> str:
    """The parameter group of a param-store name: ``"energy"``, ``"generator"`` or ``"other"``.

    Accepts both Pyro spellings (``"energy$$$net.0.weight"`` and the normalised ``"energy.net.0.weight"`` that
    per-parameter optimiser callables receive).

    Examples
    --------
    >>> parameter_group("energy$$$net.0.weight"), parameter_group("generator.net.6.bias"), parameter_group("b")
    ('energy', 'generator', 'other')
    """
    head = name.split("$$$", 1)[0].split(".", 1)[0]
    return head if head in ("energy", "generator") else "other"


def optimizer(lr_energy: float = REFERENCE["lr_energy"], lr_generator: float = REFERENCE["lr_generator"],
              betas: tuple[float, float] = REFERENCE["adam_betas"], lr_other: float | None = None
              ) -> pyro.optim.PyroOptim:
    """LEBM's optimiser: Adam with one learning rate for the energy and another for the generator.

    Parameters
    ----------
    lr_energy, lr_generator : float
        Learning rates of the ``"energy$$$..."`` and ``"generator$$$..."`` parameters (2e-5 and 1e-4).
    betas : tuple of float
        Adam's betas, (0.5, 0.999) as the paper.
    lr_other : float, optional
        For any other parameter (a guide's, a normalizer's); default ``lr_generator``.

    Returns
    -------
    pyro.optim.PyroOptim
        ``pyro.optim.Adam`` with a per-parameter callable (see :func:`parameter_group`).

    Examples
    --------
    >>> import pyro
    >>> opt = optimizer()
    >>> isinstance(opt, pyro.optim.PyroOptim)
    True
    """
    lrs = {"energy": lr_energy, "generator": lr_generator,
           "other": lr_generator if lr_other is None else lr_other}
    betas = tuple(betas)

    def per_param(name: str) -> dict:
        return {"lr": lrs[parameter_group(name)], "betas": betas}

    return pyro.optim.Adam(per_param)
