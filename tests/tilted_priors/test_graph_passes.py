"""Passes over traced graphs (Pyro): transposed convolutions of 1 x 1 inputs or to few channels replay as matrix
products with the eager value and gradient (to rounding); other convolutions and weights' gradients are kept."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from tilted_priors.pyro._graph_passes import matmul_convolutions
from tilted_priors.pyro._tracing import GraphCache
from tilted_priors.pyro.langevin import value_and_grad

_CONV = {torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default}


def _targets(graph) -> set:
    return {n.target for n in graph.graph.nodes if n.op == "call_function"}


def _generator(dim: int, bias: bool, dtype: torch.dtype) -> torch.nn.Module:
    """A DCGAN-style generator: latents (1 x 1) to a 4 x 4 map, to 8 x 8 (12 channels), to 16 x 16 (3 channels)."""
    conv = {1: torch.nn.ConvTranspose1d, 2: torch.nn.ConvTranspose2d}[dim]
    return torch.nn.Sequential(conv(5, 16, 4, bias=bias), torch.nn.LeakyReLU(0.2),
                               conv(16, 12, 4, stride=2, padding=1), torch.nn.LeakyReLU(0.2),
                               conv(12, 3, 4, stride=2, padding=1, bias=bias)).to(dtype)


def _count(graph, target) -> int:
    return sum(n.target is target for n in graph.graph.nodes)


@pytest.mark.parametrize("dim, bias, dtype", [(2, True, torch.float32), (2, False, torch.float64),
                                              (1, True, torch.float64)])
def test_a_chain_replays_transposed_convolutions_as_matrix_products_with_the_eager_numbers(dim, bias, dtype):
    torch.manual_seed(0)
    net, cache = _generator(dim, bias, dtype), GraphCache()
    target = torch.randn((3, 3) + (16,) * dim, dtype=dtype)

    def fn(z):
        out = net(z.reshape((-1, 5) + (1,) * dim))
        return -0.5 * (out - target).square().flatten(1).sum(-1) - 0.5 * z.square().sum(-1)

    z = torch.randn(3, 5, dtype=dtype)
    assert cache.log_density(fn).replay(z) is None  # the key's first chain runs eagerly
    density = cache.log_density(fn)
    for _ in range(2):  # the first evaluation (checked against the eager value) and a replay
        lp, grad = density.replay(z)
        want = value_and_grad(fn, z)
        torch.testing.assert_close(lp, want[0].detach())
        torch.testing.assert_close(grad, want[1])
        assert grad.is_contiguous()
        z = z + 0.1 * grad
    (graph,) = cache._graphs.values()
    # kept: the 12-channel layer's convolution (and, in 1-d, the 3-channel one's); both layers' gradients
    assert _count(graph, torch.ops.aten.convolution.default) == {1: 2, 2: 1}[dim]
    assert _count(graph, torch.ops.aten.convolution_backward.default) == 2
    assert _count(graph, torch.ops.aten.mm.default) == 2  # the first layer, forward and back
    assert _count(graph, torch.ops.aten.col2im.default) == {1: 0, 2: 1}[dim]


@pytest.mark.parametrize("layer, size", [(torch.nn.ConvTranspose2d(5, 16, 3, padding=1), 1),
                                         (torch.nn.ConvTranspose2d(5, 16, 2, dilation=2), 1),
                                         (torch.nn.ConvTranspose2d(4, 16, 2, groups=2), 1),
                                         (torch.nn.Conv2d(5, 16, 1), 1),
                                         (torch.nn.ConvTranspose2d(5, 16, 2), 2),
                                         (torch.nn.ConvTranspose2d(5, 3, 2, dilation=2), 4),
                                         (torch.nn.ConvTranspose2d(5, 3, 3, stride=2, output_padding=1), 4)],
                         ids=["padding", "dilation", "groups", "not-transposed", "channels", "few-dilation",
                              "few-output-padding"])
def test_other_convolutions_are_kept(layer, size):
    graph = make_fx(layer)(torch.randn(3, layer.in_channels, size, size))
    matmul_convolutions(graph)
    assert torch.ops.aten.convolution.default in _targets(graph)


def test_the_gradient_with_respect_to_the_weight_keeps_the_convolutions_backward():
    torch.manual_seed(0)
    layer = torch.nn.ConvTranspose2d(5, 6, 4)

    def grads(x):
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(layer(x).square().sum(), (x, layer.weight))

    x = torch.randn(3, 5, 1, 1)
    graph = make_fx(grads)(x)
    matmul_convolutions(graph)
    graph.recompile()
    assert torch.ops.aten.convolution_backward.default in _targets(graph)
    assert torch.ops.aten.convolution.default not in _targets(graph)  # the forward is a product all the same
    for got, want in zip(graph(x), grads(x)):
        torch.testing.assert_close(got, want)
