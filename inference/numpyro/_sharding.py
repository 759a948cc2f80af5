"""Data-parallel placement for NumPyro's :func:`~tilted_priors.inference.numpyro.fit` (``devices=``): a
one-axis :class:`jax.sharding.Mesh` over the devices, each minibatch split along its batch axis over them, and
everything else (the data set, the parameters, the optimizer and mutable state, the RNG key) replicated on each.

The jitted update is the one of a single device: ``jax.jit`` follows the shardings of its inputs, and XLA's SPMD
partitioner turns the sums over the batch (the ELBO's, and so its gradients') into per-device partial sums and a
cross-device reduction. The result equals one device's up to the order of floating-point additions.
"""
from __future__ import annotations

from numbers import Integral
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["DataParallel", "data_parallel"]

#: The mesh axis that ``fit`` builds when ``devices`` is a count or a list.
AXIS = "batch"
_CPU_FIX = ("for N virtual CPU devices, set the environment variable "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N before jax is imported (in a fresh process)")


class DataParallel:
    """The shardings of a data-parallel ``fit`` on ``mesh`` (one axis): batch split, the rest replicated."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.axis = mesh.axis_names[0]
        self.size = int(mesh.devices.size)
        self.batch = NamedSharding(mesh, PartitionSpec(self.axis))
        self.replicated = NamedSharding(mesh, PartitionSpec())

    def __repr__(self) -> str:
        return f"DataParallel({self.size} devices on axis {self.axis!r})"

    def check_batch_size(self, batch_size: int) -> None:
        """``ValueError`` unless every device takes the same share of a minibatch."""
        n = self.size
        if batch_size % n:
            lower, upper = batch_size - batch_size % n, batch_size + n - batch_size % n
            hint = f"{lower} or {upper}" if lower > 0 else f"{upper}"
            raise ValueError(f"batch_size={batch_size} cannot be split evenly over the {n} devices of devices=: "
                             f"each device takes an equal share of every minibatch. Use a batch_size that is a "
                             f"multiple of {n} (e.g. {hint}), or fewer devices")

    # --- outside jit: placing arrays -------------------------------------------------------------------------
    def replicate(self, tree: Any) -> Any:
        """A copy of every array of ``tree`` on each device of the mesh."""
        return jax.device_put(tree, self.replicated)

    def split(self, array) -> jax.Array:
        """``array`` split along its first (batch) axis over the devices."""
        return jax.device_put(array, self.batch)

    # --- inside jit: keeping the layout ----------------------------------------------------------------------
    def constrain_batch(self, arrays):
        """Each array (a batch) split along its first axis: the devices compute on their own shares."""
        return [jax.lax.with_sharding_constraint(a, self.batch) for a in arrays]

    def constrain_replicated(self, tree: Any) -> Any:
        """Every array of ``tree`` (the new SVI state) whole on each device."""
        return jax.lax.with_sharding_constraint(tree, self.replicated)


def _available() -> str:
    found = jax.devices()
    kinds = sorted({d.platform for d in found})
    return f"{len(found)} device(s) available ({', '.join(kinds)})"


def _check_devices(devices: list, where: str) -> None:
    if not devices:
        raise ValueError(f"devices: {where} is empty; give at least one device, or devices=None for the default one")
    for d in devices:
        if not isinstance(d, jax.Device):
            raise TypeError(f"devices: {where} must hold jax devices (from jax.devices()), got "
                            f"{type(d).__name__}: {d!r}")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices: {where} names a device more than once ({devices!r}); give each device once")
    platforms = sorted({d.platform for d in devices})
    if len(platforms) > 1:
        raise ValueError(f"devices: {where} mixes platforms ({', '.join(platforms)}); give devices of one kind, "
                         "e.g. jax.devices('gpu')")
    here = jax.process_index()
    if any(d.process_index != here for d in devices):
        raise ValueError(f"devices: {where} holds devices of another process; fit trains in one process, on "
                         "jax.local_devices()")


def data_parallel(devices) -> DataParallel | None:
    """The :class:`DataParallel` of ``fit``'s ``devices`` argument (``None`` for ``None``: one device, as JAX places
    arrays by default). ``devices`` is a count (the first ones of ``jax.devices()``), a sequence of jax devices,
    or a one-axis :class:`jax.sharding.Mesh`; anything else is a ``TypeError``, and a count or list that cannot
    be met a ``ValueError`` naming the fix.

    Examples
    --------
    >>> data_parallel(None) is None
    True
    >>> parallel = data_parallel(jax.devices()[:1])
    >>> parallel.size, parallel.axis, parallel.replicated.is_fully_replicated
    (1, 'batch', True)
    >>> data_parallel(0)
    Traceback (most recent call last):
    ...
    ValueError: devices=0: give at least 1 device (or devices=None for the default one)
    """
    if devices is None:
        return None
    if isinstance(devices, Mesh):
        if len(devices.axis_names) != 1:
            raise ValueError(f"devices: the Mesh must have one axis (the batch is split along it), got axes "
                             f"{tuple(devices.axis_names)}; build Mesh(jax.devices()[:n], ('batch',))")
        listed = list(devices.devices.flat)
        _check_devices(listed, "the Mesh")
        return DataParallel(devices)
    if isinstance(devices, bool) or isinstance(devices, (str, bytes)) or not (
            isinstance(devices, Integral) or isinstance(devices, (list, tuple))):
        raise TypeError(f"devices must be None, a number of devices, a list of jax devices or a jax.sharding.Mesh "
                        f"with one axis, got {type(devices).__name__}: {devices!r}")
    if isinstance(devices, Integral):
        n, available = int(devices), jax.devices()
        if n < 1:
            raise ValueError(f"devices={n}: give at least 1 device (or devices=None for the default one)")
        if n > len(available):
            raise ValueError(f"devices={n}, but {_available()}. Use devices<={len(available)}; "
                             f"{_CPU_FIX}")
        listed = list(available[:n])
    else:
        listed = list(devices)
        _check_devices(listed, "the list")
    return DataParallel(Mesh(np.array(listed), (AXIS,)))
