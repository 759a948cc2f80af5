"""The LEBM generator's layer plan (tilted_priors.models.reference.generator_plan) and the two networks built from it:
the 32x32 network is Pang et al. 2020's SVHN generator (the official ``train_svhn.py``), the 64x64 one its CelebA
extension, the 28x28 one this project's MNIST scaling, unchanged; both backends build the same layers and the
same number of parameters; weights of the old 32x32 network are refused with a message naming the mismatch."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from tilted_priors.models.reference import LEBM, LEBM_MNIST, GeneratorLayer, generator_plan, generator_layers

LRELU, TANH = "leaky_relu(0.2)", "tanh"

#: Pang et al. 2020, SVHN (train_svhn.py, nz=100, ngf=64, nc=3, g_batchnorm=False): ConvTranspose2d(in, out, k, s, p)
PAPER_SVHN = [("conv_transpose", 100, 512, 4, 1, 0, 4, LRELU),
              ("conv_transpose", 512, 256, 4, 2, 1, 8, LRELU),
              ("conv_transpose", 256, 128, 4, 2, 1, 16, LRELU),
              ("conv_transpose", 128, 3, 4, 2, 1, 32, TANH)]
PAPER_SVHN_PARAMETERS = 3_447_683  # 819,712 + 2,097,408 + 524,416 + 6,147

#: The 28x28 network as it was before the 32x32 network became the paper's (this project's MNIST scaling).
MNIST_LAYERS = [(16, 128, 7, 1, 0), (128, 64, 4, 2, 1), (64, 32, 4, 2, 1), (32, 1, 3, 1, 1)]
MNIST_PARAMETERS = 264_705  # measured on both backends before the change (d=16, ngf=32)


def _plan_parameters(plan) -> int:
    return sum(layer.in_channels * layer.out_channels * layer.kernel ** 2 + layer.out_channels for layer in plan)


def _torch_parameters(generator) -> int:
    return sum(p.numel() for p in generator.parameters())


def _jax_parameters(generator) -> int:
    import jax
    from flax import nnx

    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(generator, nnx.Param)))


# --- the plan (backend-free) ---------------------------------------------------------------------------------
def test_32x32_plan_is_the_papers_svhn_generator_layer_by_layer():
    plan = generator_plan((32, 32, 3), 100, 64)
    assert all(isinstance(layer, GeneratorLayer) for layer in plan)
    assert [tuple(layer) for layer in plan] == PAPER_SVHN
    assert _plan_parameters(plan) == PAPER_SVHN_PARAMETERS


def test_reference_settings_build_the_papers_network():
    assert (LEBM["image_shape"], LEBM["latent_dim"], LEBM["ngf"]) == ((32, 32, 3), 100, 64)
    assert [tuple(layer) for layer in generator_plan(LEBM["image_shape"], LEBM["latent_dim"], LEBM["ngf"])] \
        == PAPER_SVHN
    assert LEBM["generator_activation"] == LRELU


def test_64x64_plan_doubles_from_4x4_with_widths_8_4_2_1_ngf():
    plan = generator_plan((64, 64, 3), 100, 64)
    assert [tuple(layer) for layer in plan] == [
        ("conv_transpose", 100, 512, 4, 1, 0, 4, LRELU),
        ("conv_transpose", 512, 256, 4, 2, 1, 8, LRELU),
        ("conv_transpose", 256, 128, 4, 2, 1, 16, LRELU),
        ("conv_transpose", 128, 64, 4, 2, 1, 32, LRELU),
        ("conv_transpose", 64, 3, 4, 2, 1, 64, TANH)]
    assert _plan_parameters(plan) == 3_575_747
    assert _plan_parameters(generator_plan((64, 64, 3), 100, 128)) == 12_656_515


def test_28x28_plan_is_unchanged():
    assert (LEBM_MNIST["image_shape"], LEBM_MNIST["latent_dim"], LEBM_MNIST["ngf"]) == ((28, 28, 1), 16, 32)
    plan = generator_plan((28, 28, 1), 16, 32)
    assert generator_layers(16, (28, 28, 1), 32) == MNIST_LAYERS
    assert [layer.output_size for layer in plan] == [7, 14, 28, 28]
    assert [layer.activation for layer in plan] == [LRELU, LRELU, LRELU, TANH]
    assert _plan_parameters(plan) == MNIST_PARAMETERS


@pytest.mark.parametrize("image_shape", [(28, 28, 1), (32, 32, 3), (64, 64, 1)])
def test_plan_chains_channels_and_sizes(image_shape):
    plan = generator_plan(image_shape, 5, 3)
    assert plan[0].in_channels == 5 and plan[-1].out_channels == image_shape[2]
    assert plan[-1].output_size == image_shape[0]
    size = 1
    for before, after in zip(plan, plan[1:]):
        assert after.in_channels == before.out_channels
    for layer in plan:  # torch's ConvTranspose2d output size
        size = (size - 1) * layer.stride - 2 * layer.padding + layer.kernel
        assert layer.output_size == size


@pytest.mark.parametrize("image_shape, match", [((48, 48, 3), "image_shape"), ((64, 32, 3), "image_shape"),
                                                ((64, 64, 0), "channels")])
def test_plan_rejects_other_shapes(image_shape, match):
    with pytest.raises(ValueError, match=match):
        generator_plan(image_shape, 4, 2)


@pytest.mark.parametrize("kwargs, match", [({"latent_dim": 0}, "latent_dim"), ({"ngf": 1.5}, "ngf")])
def test_plan_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generator_plan(**{"image_shape": (32, 32, 3), "latent_dim": 4, "ngf": 2, **kwargs})


def test_both_backends_export_the_one_plan():
    from tilted_priors.models import reference
    from tilted_priors.models.numpyro import generators as jg, lebm as jl
    from tilted_priors.models.pyro import generators as tg, lebm as tl

    assert tl.generator_plan is jl.generator_plan is tg.generator_plan is jg.generator_plan is reference.generator_plan
    assert tl.Generator is tg.Generator and jl.Generator is jg.Generator
    assert tg.__all__ == jg.__all__ == ["Generator", "generator_plan"]


# --- the networks ----------------------------------------------------------------------------------------------
def test_reference_networks_have_the_papers_parameter_count():
    from tilted_priors.models.numpyro.lebm import Generator as JaxGenerator
    from tilted_priors.models.pyro.lebm import Generator as TorchGenerator

    args = (LEBM["latent_dim"], LEBM["image_shape"], LEBM["ngf"])
    assert _torch_parameters(TorchGenerator(*args)) == PAPER_SVHN_PARAMETERS
    assert _jax_parameters(JaxGenerator(*args)) == PAPER_SVHN_PARAMETERS


def test_mnist_networks_are_unchanged():
    from tilted_priors.models.numpyro.lebm import Generator as JaxGenerator
    from tilted_priors.models.pyro.lebm import Generator as TorchGenerator

    args = (LEBM_MNIST["latent_dim"], LEBM_MNIST["image_shape"], LEBM_MNIST["ngf"])
    torch_g, jax_g = TorchGenerator(*args), JaxGenerator(*args)
    assert _torch_parameters(torch_g) == _jax_parameters(jax_g) == MNIST_PARAMETERS
    shapes = {k: tuple(v.shape) for k, v in torch_g.state_dict().items()}
    expected = {}
    for i, (c_in, c_out, k, _, _) in enumerate(MNIST_LAYERS):
        expected |= {f"net.{2 * i}.weight": (c_in, c_out, k, k), f"net.{2 * i}.bias": (c_out,)}
    assert shapes == expected
    assert {k: v.shape for k, v in jax_g.torch_state_dict().items()} == shapes


@pytest.mark.parametrize("image_shape, latent_dim, ngf", [((28, 28, 1), 16, 32), ((28, 28, 3), 7, 5),
                                                          ((32, 32, 3), 100, 64), ((32, 32, 1), 8, 16),
                                                          ((64, 64, 3), 100, 32), ((64, 64, 1), 3, 2)])
def test_both_backends_have_the_plans_parameter_count(image_shape, latent_dim, ngf):
    from tilted_priors.models.numpyro.lebm import Generator as JaxGenerator
    from tilted_priors.models.pyro.lebm import Generator as TorchGenerator

    expected = _plan_parameters(generator_plan(image_shape, latent_dim, ngf))
    assert _torch_parameters(TorchGenerator(latent_dim, image_shape, ngf)) == expected
    assert _jax_parameters(JaxGenerator(latent_dim, image_shape, ngf)) == expected


@pytest.mark.parametrize("image_shape", [(28, 28, 1), (32, 32, 3), (64, 64, 3)])
def test_networks_are_built_from_the_plan(image_shape):
    from torch import nn

    from tilted_priors.models.numpyro.lebm import Generator as JaxGenerator
    from tilted_priors.models.pyro.lebm import Generator as TorchGenerator

    plan = generator_plan(image_shape, 4, 3)
    torch_g, jax_g = TorchGenerator(4, image_shape, 3), JaxGenerator(4, image_shape, 3)
    assert list(torch_g.plan) == list(jax_g.plan) == plan
    assert len(torch_g.net) == 2 * len(plan) and len(jax_g.layers) == len(plan)
    for i, layer in enumerate(plan):
        conv, act = torch_g.net[2 * i], torch_g.net[2 * i + 1]
        assert isinstance(conv, nn.ConvTranspose2d) and conv.bias is not None
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (
            layer.in_channels, layer.out_channels, (layer.kernel,) * 2, (layer.stride,) * 2, (layer.padding,) * 2)
        assert isinstance(act, nn.Tanh if layer.activation == TANH else nn.LeakyReLU)
        if isinstance(act, nn.LeakyReLU):
            assert act.negative_slope == 0.2
        jax_layer = jax_g.layers[i]
        assert jax_layer.kernel.get_value().shape == (layer.kernel, layer.kernel, layer.out_channels, layer.in_channels)
        assert (jax_layer.stride, jax_layer.padding) == (layer.stride, layer.padding)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in torch_g.modules())


@pytest.mark.parametrize("image_shape", [(32, 32, 3), (64, 64, 3)])
def test_output_shapes(image_shape):
    import jax
    import torch

    from tilted_priors.models.numpyro import lebm as jl
    from tilted_priors.models.pyro import lebm as tl

    x = tl.build(image_shape, 5, ngf=2, prior="gaussian").decode(torch.randn(3, 5)).detach().numpy()
    assert x.shape == (3,) + image_shape and np.all(np.abs(x) <= 1)
    y = np.asarray(jl.build(image_shape, 5, ngf=2, prior="gaussian").decode(jax.random.normal(jax.random.PRNGKey(0),
                                                                                              (3, 5))))
    assert y.shape == (3,) + image_shape and np.all(np.abs(y) <= 1)


def test_numpyro_generator_refuses_a_torch_state_dict_of_another_plan():
    from tilted_priors.models.numpyro.lebm import Generator as JaxGenerator
    from tilted_priors.models.pyro.lebm import Generator as TorchGenerator

    with pytest.raises(ValueError, match="does not fit this generator"):
        JaxGenerator(4, (64, 64, 3), 2).load_torch_state_dict(TorchGenerator(4, (32, 32, 3), 2).state_dict())


# --- weights of the old 32x32 network ----------------------------------------------------------------------------
#: The 32x32 network before it became the paper's: (in, out, kernel, stride, padding) with ngf=2, d=3, C=3.
OLD_32 = [(3, 8, 8, 1, 0), (8, 4, 4, 2, 1), (4, 2, 4, 2, 1), (2, 3, 3, 1, 1)]


def _config(backend):
    return {"method": "lebm", "backend": backend, "image_shape": [32, 32, 3], "latent_dim": 3, "ngf": 2}


def test_pyro_refuses_weights_of_the_old_32x32_network(tmp_path):
    from torch import nn

    from tilted_priors.inference.checkpoints import CheckpointError
    from tilted_priors.models.pyro import evaluate, lebm

    new = lebm.build((32, 32, 3), 3, ngf=2, energy_hidden=4)
    old = nn.Module()
    old.net = nn.Sequential(*[m for c_in, c_out, k, s, p in OLD_32 for m in (nn.ConvTranspose2d(c_in, c_out, k, s, p),
                                                                             nn.LeakyReLU(0.2))])
    path = evaluate.save_params(SimpleNamespace(generator=old, energy=new.energy), tmp_path / "weights.pt",
                                config=_config("pyro"))
    with pytest.raises(CheckpointError) as err:
        evaluate.load_params(new, path, config=_config("pyro"))
    message = str(err.value)
    assert "does not fit the model" in message
    assert "'generator.net.0.weight' has shape (3, 8, 8, 8), the model expects (3, 16, 4, 4)" in message
    assert "train the run again" in message


def test_numpyro_refuses_weights_of_the_old_32x32_network(tmp_path):
    import jax.numpy as jnp
    from flax import nnx

    from tilted_priors.inference.checkpoints import CheckpointError
    from tilted_priors.models.numpyro import evaluate, lebm

    class Layer(nnx.Module):
        def __init__(self, c_in, c_out, k):
            self.kernel = nnx.Param(jnp.zeros((k, k, c_out, c_in)))
            self.bias = nnx.Param(jnp.zeros((c_out,)))

    class Old(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([Layer(c_in, c_out, k) for c_in, c_out, k, _, _ in OLD_32])

    new = lebm.build((32, 32, 3), 3, ngf=2, energy_hidden=4)
    path = evaluate.save_params(SimpleNamespace(generator=Old(), energy=new.energy), tmp_path / "weights.npz",
                                config=_config("numpyro"))
    with np.load(path) as f:  # the file is what save_params writes for a generator of the old shapes
        assert json.loads(str(f["__manifest__"]))["config"] == _config("numpyro")
    with pytest.raises(CheckpointError) as err:
        evaluate.load_params(new, path, config=_config("numpyro"))
    message = str(err.value)
    assert "does not fit the model" in message
    assert "has shape (8, 8, 8, 3), the model expects (4, 4, 16, 3)" in message
    assert "train the run again" in message
