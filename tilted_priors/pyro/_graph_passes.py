r"""Passes over a traced graph of aten operations (torch): fewer operations, the same numbers.

:func:`simplify` is what :class:`tilted_priors.pyro._tracing.TracedLogDensity` runs on every graph it traces. It
keeps the eager function's operations and their order, so a replay gives the eager numbers bit for bit, with one
exception, :func:`matmul_convolutions`: transposed convolutions that are plain matrix products run as such. Of a
:math:`1 \times 1` input (the first layer of most image generators, :math:`d` latents to a :math:`k \times k` map),

.. math:: y_{n, o, i, j} = b_o + \sum_c x_{n, c} W_{c, o, i, j},

which oneDNN's convolution computes several times slower on a CPU (2.5 ms against 0.45 ms for the value and
gradient of LEBM's SVHN generator's first layer, batch 16); to a few channels (an image's last layer), each input
pixel's product added into the output by ``col2im``. There the replay agrees with the eager function to rounding.
"""
from __future__ import annotations

import operator
from typing import Any

import torch

__all__ = ["FEW_CHANNELS", "matmul_convolutions", "simplify"]

_aten = torch.ops.aten
_getitem = operator.getitem
#: Operations that make a tensor from nothing but their arguments (no tensor read, no randomness).
_FACTORIES = frozenset({_aten.zeros.default, _aten.ones.default, _aten.full.default, _aten.scalar_tensor.default,
                        _aten.arange.default, _aten.arange.start, _aten.arange.start_step})
#: Operations whose value depends on their input's shape and dtype alone (fixed for a graph): the gradient's seed.
_LIKE = frozenset({_aten.ones_like.default, _aten.zeros_like.default, _aten.full_like.default})


def _mutates(node: torch.fx.Node) -> bool:
    """Whether ``node`` writes into one of its arguments (``add_``, ``index_put_``, a batch norm's running stats)."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def simplify(graph: torch.fx.GraphModule) -> None:
    """Fewer operations to replay, the same numbers: ``detach`` dropped (replays run without autograd), what depends
    on constants alone computed once (tensors made from literals or by factories, never parameters or buffers, which
    may change in place), repeated operations computed once, dead code removed (random operations count as impure
    and stay). A graph that writes into a tensor in place (the model's ``out[:, 0] = ...`` on a tensor it made)
    keeps every operation: a folded or shared tensor could then be changed between two reads. Last,
    :func:`matmul_convolutions` (the same numbers to rounding)."""
    functional = not any(_mutates(node) for node in graph.graph.nodes)
    constant: dict[torch.fx.Node, Any] = {}
    seen: dict[tuple, torch.fx.Node] = {}  # pure operations by their arguments: one of each is computed
    for node in list(graph.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _aten.detach.default:
            node.replace_all_uses_with(node.args[0])
            continue
        if node.is_impure() or not functional:
            continue
        same = seen.setdefault((node.target, str(node.args), str(node.kwargs)), node)
        if same is not node:
            node.replace_all_uses_with(same)
            continue
        inputs = node.all_input_nodes
        if node.target is _aten.lift_fresh_copy.default and inputs[0].op == "get_attr":
            constant[node] = getattr(graph, inputs[0].target).clone()
        elif node.target in _LIKE:
            val = inputs[0].meta["val"]  # a fake tensor: its shape, dtype and device
            constant[node] = node.target(torch.empty(val.shape, dtype=val.dtype, device=val.device), *node.args[1:],
                                         **node.kwargs)
        elif (node.target in _FACTORIES and not inputs) or (inputs and all(n in constant for n in inputs)):
            constant[node] = node.target(*torch.fx.node.map_arg(node.args, constant.__getitem__),
                                         **torch.fx.node.map_arg(node.kwargs, constant.__getitem__))
    for i, (node, value) in enumerate(constant.items()):
        if not isinstance(value, torch.Tensor) or all(user in constant for user in node.users):
            continue
        name = f"_folded{i}"
        graph.register_buffer(name, value)
        with graph.graph.inserting_before(node):
            node.replace_all_uses_with(graph.graph.get_attr(name))
    graph.graph.eliminate_dead_code()
    matmul_convolutions(graph)
    graph.recompile()
    output = next(n for n in reversed(graph.graph.nodes) if n.op == "output")
    graph.meta["aliases"] = any(_aliases_constant(n) for n in output.all_input_nodes)


def _aliases_constant(node: torch.fx.Node) -> bool:
    """Whether ``node``'s value may be (a view of) one of the graph's constants (parameters, folded tensors)."""
    while node.op == "call_function" and getattr(node.target, "is_view", False) and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node.op == "get_attr"


#: A transposed 2-d convolution with at most this many output channels (an image's last layer) runs as a product and
#: ``col2im``: 0.6 ms against 1.8 ms for LEBM's SVHN generator's last layer (128 -> 3 channels, 16 x 16 -> 32 x 32,
#: batch 16), 1.6 ms against 5.0 ms for its MNIST one (32 -> 1, 28 x 28, batch 100); with 16 channels it is slower.
FEW_CHANNELS = 8


def _settings(node: torch.fx.Node) -> str | None:
    """``"dense"`` for a transposed convolution of a 1 x 1 (x ...) input, ``"fold"`` for a transposed 2-d one with
    at most :data:`FEW_CHANNELS` output channels (on the CPU, where these were measured; no padding of the output,
    dilation or groups in either case; the stride does not matter for the first), else None. ``node`` is a
    convolution or its backward."""
    x, weight = node.args[0:2] if node.target is _aten.convolution.default else node.args[1:3]
    transposed, output_padding, groups = node.args[-3:] if len(node.args) == 9 else node.args[-4:-1]
    padding, dilation = node.args[4:6] if len(node.args) == 9 else node.args[5:7]
    val, kernel = (n.meta.get("val") if isinstance(n, torch.fx.Node) else None for n in (x, weight))
    if (not isinstance(val, torch.Tensor) or not isinstance(kernel, torch.Tensor) or val.device.type != "cpu"
            or not transposed or groups != 1 or val.dim() < 3 or not val.is_floating_point()
            or any(output_padding) or any(d != 1 for d in dilation)):
        return None
    if all(s == 1 for s in val.shape[2:]) and not any(padding):
        return "dense"
    return "fold" if val.dim() == 4 and kernel.shape[1] <= FEW_CHANNELS else None


def matmul_convolutions(graph: torch.fx.GraphModule) -> None:
    r"""Transposed convolutions on the CPU that are faster as matrix products (see the module notes); others (and
    all on other devices, where the convolutions were not measured) are left as they are.

    - Of a :math:`1 \times 1` input: with :math:`x` of shape ``(n, c, 1, 1)`` and the weight :math:`W` of shape
      ``(c, o, k, k)``, the convolution is ``(x.reshape(n, c) @ W.reshape(c, o k k)).reshape(n, o, k, k) + b`` and
      its gradient :math:`g` (shape ``(n, o, k, k)``) goes back to the input as
      ``(W.reshape(c, o k k) @ g.reshape(n, o k k).T).T`` (the product in this order is the fast one for a few rows).
    - 2-d with at most :data:`FEW_CHANNELS` output channels: each input pixel's contribution
      ``W.reshape(c, o k k).T @ x.reshape(n, c, h w)``, added up into the output by ``col2im`` (``F.fold``); its
      gradient keeps the convolution's backward (faster there).

    Gradients with respect to the weight or the bias (not in a chain's graph, which differentiates with respect to
    the position only) keep the convolution's own backward.

    Examples
    --------
    >>> import torch
    >>> from torch.fx.experimental.proxy_tensor import make_fx
    >>> layer = torch.nn.ConvTranspose2d(3, 4, 2)
    >>> graph = make_fx(lambda x: layer(x))(torch.randn(5, 3, 1, 1))
    >>> matmul_convolutions(graph)
    >>> sorted({str(n.target) for n in graph.graph.nodes if n.op == "call_function"})
    ['aten.add.Tensor', 'aten.mm.default', 'aten.reshape.default']
    >>> x = torch.randn(5, 3, 1, 1)
    >>> torch.testing.assert_close(graph(x), layer(x))
    """
    g = graph.graph
    for node in list(g.nodes):
        if node.op != "call_function" or node.kwargs:
            continue
        if node.target is _aten.convolution.default and len(node.args) == 9:
            kind = _settings(node)
            if kind is None:
                continue
            with g.inserting_before(node):
                out = (_dense_forward if kind == "dense" else _fold_forward)(g, node)
                bias, shape = node.args[2], node.meta["val"].shape
                if bias is not None:
                    out = g.call_function(_aten.add.Tensor, (out, g.call_function(
                        _aten.reshape.default, (bias, [shape[1]] + [1] * (len(shape) - 2)))))
            out.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(out)
            g.erase_node(node)
        elif node.target is _aten.convolution_backward.default and len(node.args) == 11:
            users = list(node.users)
            if (list(node.args[-1]) != [True, False, False] or _settings(node) != "dense"
                    or not all(u.target is _getitem and u.args[1] == 0 for u in users)):
                continue
            grad, x, weight = node.args[:3]
            shape = list(x.meta["val"].shape)
            with g.inserting_before(node):
                rows = g.call_function(_aten.t.default, (g.call_function(_aten.reshape.default,
                                                                          (grad, [shape[0], -1])),))
                out = g.call_function(_aten.mm.default, (_matrix(g, weight, shape[1]), rows))
                out = g.call_function(_aten.clone.default, (g.call_function(_aten.t.default, (out,)),),
                                      {"memory_format": torch.contiguous_format})
                out = g.call_function(_aten.reshape.default, (out, shape))
            out.meta["val"] = x.meta["val"]
            for user in users:
                user.replace_all_uses_with(out)
                g.erase_node(user)
            g.erase_node(node)


def _matrix(g: torch.fx.Graph, weight: torch.fx.Node, channels: int) -> torch.fx.Node:
    return g.call_function(_aten.reshape.default, (weight, [channels, -1]))


def _dense_forward(g: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    x, weight = node.args[:2]
    n, channels = x.meta["val"].shape[:2]
    flat = g.call_function(_aten.reshape.default, (x, [n, channels]))
    out = g.call_function(_aten.mm.default, (flat, _matrix(g, weight, channels)))
    return g.call_function(_aten.reshape.default, (out, list(node.meta["val"].shape)))


def _fold_forward(g: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    x, weight, _, stride, padding = node.args[:5]
    n, channels, height, width = x.meta["val"].shape
    pixels = g.call_function(_aten.reshape.default, (x, [n, channels, height * width]))
    kernel = g.call_function(_aten.t.default, (_matrix(g, weight, channels),))
    columns = g.call_function(_aten.matmul.default, (kernel, pixels))  # (n, o k k, h w)
    return g.call_function(_aten.col2im.default, (columns, list(node.meta["val"].shape[2:]),
                                                  list(weight.meta["val"].shape[2:]), [1, 1], list(padding),
                                                  list(stride)))
