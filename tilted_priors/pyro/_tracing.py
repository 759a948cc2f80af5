r"""Log densities whose value and gradient replay a traced graph (torch).

A Langevin chain evaluates one log density at every step, only at another position. When that log density runs a
Pyro model (effect handlers, parameter-store lookups, distributions built and checked) the Python around the
arithmetic costs more than the arithmetic on small models. :class:`TracedLogDensity` captures the value and the
gradient once as a graph of torch operations (``torch.fx.experimental.proxy_tensor.make_fx``, with Pyro's argument
validation off: the eager runs around it keep validating) and replays it at the chain's later positions, with no
autograd tape and no Python of the model's.

What makes the replay right, and what is checked instead:

- a graph is traced per *key*: the position's and the inputs' shapes, dtypes, devices and layouts, and every
  non-tensor part of the inputs (which must be hashable); the tensors that change from call to call (the model's
  arguments, plate subsamples) are the graph's ``inputs``. It is traced at the key's second chain, not its first:
  a function made anew at every call (a lambda energy built inside the model, with a cache of its own) is then
  never traced, only run eagerly as before;
- a function whose Python reads the values of the position or the inputs (``if z.sum() > 0``, ``float(x.max())``)
  cannot be traced (torch refuses): it runs eagerly, as does one that returns no tensor of the chains' shape or
  whose value does not reach the position through torch operations (the eager path then says so);
- tensors the graph captured from elsewhere (parameters, constants) are read when it is replayed, so in-place
  updates (an optimiser's step) are seen; a tensor *replaced* by another (a re-assigned parameter, a Python
  number that changed) would not be. Hence the first evaluation of every chain compares the graph's value with
  the eager function's at the same position; when they differ the key is traced again (a key traced again more
  than ``max_retraces`` times, or a function whose eager value differs from a fresh graph's, e.g. a random one,
  runs eagerly from then on). A cache that has traced ``max_traces`` keys stops tracing (arguments whose shapes
  or settings change at every call).

Replays run the same aten operations as the eager function, in the same order, so they give the same numbers
(:func:`tilted_priors.pyro._graph_passes.simplify` only drops, folds and merges operations), except where a
transposed convolution of a 1 x 1 input runs as the matrix product it is (see :mod:`tilted_priors.pyro._graph_passes`):
there they agree to rounding.
"""
from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from typing import Any, Callable

import pyro
import torch
from torch.utils import _pytree

from ._graph_passes import simplify

__all__ = ["GraphCache", "TracedLogDensity"]

_LOG = logging.getLogger(__name__)


class _Untraceable(Exception):
    """The function cannot be replayed from a graph (the reason is the message)."""


class GraphCache:
    """Traced graphs of one log density's value and gradient, one per key (see the module notes).

    Parameters
    ----------
    max_graphs : int
        Graphs kept (least recently used dropped first).
    max_traces : int
        Keys traced before the cache gives up tracing (every later log density runs eagerly).
    max_retraces : int
        Times one key is traced again after its graph went stale (disagreed with the eager function).
    trace_first : bool
        Trace a key at its first chain rather than its second: for a log density that is one object for a long
        run (an MCMC kernel's potential), not one made anew at every call.

    Examples
    --------
    >>> import torch
    >>> cache, fn = GraphCache(), lambda z, loc: -0.5 * ((z - loc) ** 2).sum(-1)
    >>> cache.log_density(fn, (torch.ones(2),)).replay(torch.zeros(3, 2)) is None   # first chain: eager
    True
    >>> lp, grad = cache.log_density(fn, (torch.ones(2),)).replay(torch.zeros(3, 2))   # traced, checked
    >>> grad.tolist(), cache.traced
    ([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]], 1)
    """

    def __init__(self, max_graphs: int = 8, max_traces: int = 32, max_retraces: int = 8, trace_first: bool = False):
        self.max_graphs, self.max_traces, self.max_retraces = max_graphs, max_traces, max_retraces
        self.trace_first = trace_first
        self._graphs: OrderedDict[Any, torch.fx.GraphModule | None] = OrderedDict()  # None: runs eagerly
        self._retraces: dict[Any, int] = {}
        self._sighted: OrderedDict[Any, None] = OrderedDict()  # keys seen once (traced from their second chain)
        self.traced = 0
        #: Why the last log density that runs eagerly does (``None`` when all replay).
        self.reason: str | None = None

    def log_density(self, fn: Callable[..., torch.Tensor], inputs: Any = (), static: Any = (),
                    reference: tuple[torch.Tensor, Callable[[], torch.Tensor]] | None = None
                    ) -> "TracedLogDensity":
        """``fn(z, *inputs)`` as a :class:`TracedLogDensity` of ``z`` whose graphs live in this cache.

        ``inputs`` is a tuple of tensors or of (nested) lists, tuples and dicts holding tensors and hashable
        settings; ``static`` (hashable) adds settings of ``fn`` that the inputs do not show to the graph's key;
        ``reference``: ``(position, value)``, with ``value()`` the eager function's value at the chain's starting
        position computed from what the caller has already (the check at the chain's start then runs no eager
        evaluation of ``fn``; ``value`` is called only when that check happens)."""
        return TracedLogDensity(fn, inputs, self, static, reference)

    # --- graphs ------------------------------------------------------------------------------------------------
    def _graph(self, key, trace: Callable[[], torch.fx.GraphModule]) -> tuple[torch.fx.GraphModule | None, bool]:
        """``(graph or None, whether it was traced just now)``."""
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key], False
        if self.traced >= self.max_traces:
            return self._eager(key, f"{self.traced} different shapes or settings were traced already "
                                    "(the arguments change at every call)"), False
        self.traced += 1
        try:
            graph = trace()
        except _Untraceable as err:
            return self._eager(key, str(err)), True
        except Exception as err:  # noqa: BLE001 - torch refuses Python that reads tensor values, among others
            first = str(err).splitlines()[0] if str(err) else ""
            return self._eager(key, f"it cannot be traced ({type(err).__name__}: {first})"), True
        self._keep(key, graph)
        return graph, True

    def _ready(self, key) -> bool:
        """Whether a chain with this key should use a graph: not on the key's first sighting (a function built anew
        at every call, e.g. a lambda energy made inside the model, would otherwise be traced at every call) and not
        when the key runs eagerly."""
        if key in self._graphs:
            return self._graphs[key] is not None
        if key in self._sighted or self.trace_first:
            return True
        self._sighted[key] = None
        while len(self._sighted) > 4 * self.max_graphs:
            self._sighted.popitem(last=False)
        return False

    def _keep(self, key, graph) -> None:
        self._graphs[key] = graph
        self._graphs.move_to_end(key)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)

    def _eager(self, key, reason: str) -> None:
        self.reason = reason
        _LOG.debug("log density runs eagerly: %s", reason)
        if key is not None:
            self._keep(key, None)
        return None

    def _retrace(self, key) -> bool:
        """Forget ``key``'s stale graph; whether it may be traced again."""
        self._graphs.pop(key, None)
        self._retraces[key] = self._retraces.get(key, 0) + 1
        return self._retraces[key] <= self.max_retraces


class _TensorLeaf:
    """Where a tensor input goes among the non-tensor parts of the inputs."""

    def __repr__(self) -> str:
        return "<tensor>"


_TENSOR = _TensorLeaf()


def _meta(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.dtype, t.device, t.requires_grad, t.is_contiguous())


class TracedLogDensity:
    r"""A log density :math:`z \mapsto` ``fn(z, *inputs)`` whose value and gradient replay a traced graph.

    Calling it runs ``fn`` eagerly (a tensor with autograd, as any log density); :meth:`replay` gives the value and
    the gradient with respect to ``z`` from the cache's graph for the key of ``z`` and ``inputs`` (traced at the
    key's second chain), or ``None`` when this log density runs eagerly (see the module notes).
    :func:`tilted_priors.pyro.langevin.value_and_grad` uses :meth:`replay` when it can. Whether the log density is
    normalised is up to ``fn``.

    Examples
    --------
    >>> import torch
    >>> cache, fn, s = GraphCache(), lambda z, s: -0.5 * (z / s).square().sum(-1), torch.tensor(2.0)
    >>> [TracedLogDensity(fn, (s,), cache).replay(torch.ones(1, 2)) is None for chain in range(2)]
    [True, False]
    >>> lp, grad = TracedLogDensity(fn, (s,), cache).replay(torch.ones(1, 2))
    >>> lp.tolist(), grad.tolist()
    ([-0.25], [[-0.25, -0.25]])
    """

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: Any, cache: GraphCache, static: Any = (),
                 reference: tuple[torch.Tensor, Callable[[], torch.Tensor]] | None = None):
        self.fn, self.cache, self.reference = fn, cache, reference
        leaves, spec = _pytree.tree_flatten(tuple(inputs))
        self._tensors = tuple(v for v in leaves if isinstance(v, torch.Tensor))
        self._spec = spec
        self._static = tuple(_TENSOR if isinstance(v, torch.Tensor) else v for v in leaves)
        self.inputs = tuple(inputs)
        try:
            self._key = (static, str(spec), self._static, tuple(_meta(t) for t in self._tensors))
            hash(self._key)
        except TypeError:  # an unhashable setting: no key to cache a graph under
            self._key = None
        self._graphs: dict[tuple, torch.fx.GraphModule | None] = {}  # by the position's shape (None: eager)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.fn(z, *self.inputs)

    def _rebuild(self, tensors) -> tuple:
        it = iter(tensors)
        leaves = [next(it) if v is _TENSOR else v for v in self._static]
        return _pytree.tree_unflatten(leaves, self._spec)

    def _trace(self, position: torch.Tensor) -> torch.fx.GraphModule:
        from torch.fx.experimental.proxy_tensor import make_fx

        def value_and_grad(z, *tensors):
            with torch.enable_grad():
                z = z.detach().requires_grad_(True)
                lp = self.fn(z, *self._rebuild(tensors))
                if not isinstance(lp, torch.Tensor) or lp.shape != z.shape[:-1] or not lp.requires_grad:
                    raise _Untraceable("the log density returns no tensor of the chains' shape that depends on z")
                (grad,) = torch.autograd.grad(lp.sum(), z, allow_unused=True)
                if grad is None:
                    raise _Untraceable("the log density does not depend on z through torch operations")
            return lp.detach(), grad

        with pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the eager evaluation before it has given them
            graph = make_fx(value_and_grad)(position.detach(), *self._tensors)
        simplify(graph)
        return graph

    def _run(self, graph, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = graph(position.detach(), *self._tensors)
            if graph.meta["aliases"]:  # an output is (a view of) one of the graph's constants: hand out copies
                out = tuple(t.clone() for t in out)
        return out

    def replay(self, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(log density, gradient)`` at ``position`` from the graph, both detached; ``None``: evaluate eagerly.

        The first call compares the graph's value with the eager function's at ``position`` (see the module
        notes)."""
        meta = _meta(position)
        graph = self._graphs.get(meta, False)
        if graph is False:  # the first evaluation at this shape: checked
            graph = self._checked(position, meta)
            if isinstance(graph, tuple):  # the graph and its first evaluation, done while checking
                self._graphs[meta], first = graph
                return first
            self._graphs[meta] = graph
        if graph is None:
            return None
        return self._run(graph, position)

    def _checked(self, position: torch.Tensor, meta: tuple):
        """``(graph, first evaluation)`` when the graph agrees with the eager function at ``position``, else None."""
        if self._key is None:
            return self.cache._eager(None, "a setting among the inputs cannot be hashed")
        key = (self._key, meta)
        if not self.cache._ready(key):
            return None
        with torch.no_grad():
            if self.reference is not None and self.reference[0] is position:
                expected = self.reference[1]()
            else:
                expected = self(position.detach())
        if not isinstance(expected, torch.Tensor) or expected.shape != position.shape[:-1]:
            return None  # the eager evaluation explains what is wrong
        while True:
            graph, fresh = self.cache._graph(key, lambda: self._trace(position))
            if graph is None:
                return None
            out = self._run(graph, position)
            if torch.allclose(out[0], expected.to(out[0]), rtol=1e-5, atol=1e-6, equal_nan=True):
                return graph, out
            if fresh:
                return self.cache._eager(key, "a fresh graph disagrees with the eager function (it is random, or "
                                              "its Python depends on something else than its inputs)")
            if not self.cache._retrace(key):
                return self.cache._eager(key, f"its graph went stale {self.cache.max_retraces} times (state it "
                                              "reads, other than its inputs, is replaced between calls)")
