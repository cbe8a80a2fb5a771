"""The conditioned generator: shapes for every mode and image size, range, conditioning, stacking."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from tldr_fast import conditioning
from tldr_fast.models import Generator
from tldr_fast.models.generator import OUTPUT_ACTIVATIONS, _project_to_matrix, _to_image_channels

SMALL = {"width": 4, "latent_dim": 8}


@pytest.mark.parametrize("mode", conditioning.MODES)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_mode_gives_the_requested_shape(mode, shape):
    g = Generator(10, shape, conditioning=mode, **SMALL)
    labels = torch.arange(6) % 10
    with torch.no_grad():
        x = g(torch.randn(6, 8), labels, conditioning.soft_vectors(labels, 10))
    assert x.shape == (6, *shape)
    assert float(x.min()) >= 0 and float(x.max()) <= 1


@pytest.mark.parametrize("shape", [(1, 7, 5), (2, 13, 40), (1, 1, 1), (3, 64, 48), (1, 3, 30)])
@pytest.mark.parametrize("num_classes", [2, 10, 17])
def test_any_image_shape(shape, num_classes):
    g = Generator(num_classes, shape, **SMALL)
    labels = torch.arange(3) % num_classes
    x = g(torch.randn(3, 8), labels, conditioning.hot_vectors(labels, num_classes))
    assert x.shape == (3, *shape)


@pytest.mark.parametrize("activation", OUTPUT_ACTIVATIONS)
def test_output_activations_stay_in_unit_range(activation):
    g = Generator(10, (1, 12, 12), output_activation=activation, **SMALL)
    with torch.no_grad():
        for p in g.parameters():
            p.mul_(50)  # drive pre-activations far outside [0, 1]
    labels = torch.arange(4)
    with torch.no_grad():
        x = g(torch.randn(4, 8), labels, conditioning.hot_vectors(labels, 10))
    assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_matrix_conditioning_changes_the_image():
    torch.manual_seed(0)
    g = Generator(10, (1, 16, 16), conditioning="matrix", dropout=0.0, **SMALL).eval()
    z = torch.randn(1, 8).expand(2, -1)
    x = g(z, torch.tensor([1, 2]))
    assert not torch.allclose(x[0], x[1])


def test_vector_modes_require_vectors():
    g = Generator(10, (1, 8, 8), conditioning="vector", **SMALL)
    with pytest.raises(ValueError, match="needs vectors of shape"):
        g(torch.randn(2, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 8\)"):
        g(torch.randn(2, 9), torch.tensor([0, 1]), torch.rand(2, 10))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_classes": 1}, "num_classes"),
        ({"image_shape": (28, 28)}, "image_shape"),
        ({"conditioning": "embedding"}, "conditioning must be one of"),
        ({"output_activation": "relu"}, "output_activation"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"num_classes": 10, "image_shape": (1, 8, 8), **kwargs}
    with pytest.raises(ValueError, match=match):
        Generator(**args)


def test_stacked_generators_equal_separate_ones():
    torch.manual_seed(0)
    gens = [Generator(10, (1, 12, 12), dropout=0.0, **SMALL) for _ in range(3)]
    params, buffers = stack_module_state(gens)
    template = copy.deepcopy(gens[0]).to("meta")
    z = torch.randn(3, 5, 8)
    labels = torch.arange(5).expand(3, -1)
    vectors = conditioning.hot_vectors(labels, 10)

    def one(p, b, zk, yk, vk):
        return functional_call(template, (p, b), (zk, yk, vk))

    stacked = vmap(one)(params, buffers, z, labels, vectors)
    for k, g in enumerate(gens):
        assert torch.allclose(stacked[k], g(z[k], labels[k], vectors[k]), atol=1e-6)


def test_config_rebuilds_the_module():
    g = Generator(10, (3, 32, 32), conditioning="label", **SMALL)
    clone = Generator(**g.config())
    clone.load_state_dict(g.state_dict())
    assert clone.config() == g.config()


@pytest.mark.parametrize("mode", conditioning.MODES)
def test_first_layer_as_a_matrix_product_equals_the_transposed_convolution(mode):
    # The generator computes its 1 x 1 -> N x N transposed convolution as a GEMM: same values,
    # same gradients with respect to the input and the layer's parameters.
    torch.manual_seed(0)
    conv = Generator(7, (1, 16, 16), conditioning=mode).double().to_matrix_size[0]
    v = torch.randn(5, conv.in_channels, dtype=torch.float64, requires_grad=True)
    ours, reference = _project_to_matrix(conv, v), conv(v[:, :, None, None])
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    probe = torch.randn_like(ours)
    inputs = (v, conv.weight, conv.bias)
    for a, b in zip(
        torch.autograd.grad(ours, inputs, probe),
        torch.autograd.grad(reference, inputs, probe),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_uniform_mask_dropout_is_inverted_dropout():
    from tldr_fast.models.generator import UniformMaskDropout

    torch.manual_seed(0)
    p, n = 0.3, 200_000
    layer = UniformMaskDropout(p)
    x = torch.rand(n, dtype=torch.float64) + 0.5
    x.requires_grad_()
    y = layer(x)
    kept = y != 0
    # Binomial(n, 1 - p): 6 standard deviations either side.
    assert abs(float(kept.double().mean()) - (1 - p)) < 6 * ((p * (1 - p)) / n) ** 0.5
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-15, atol=0)
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(dx, kept.double() / (1 - p), rtol=1e-15, atol=0)
    assert torch.equal(layer.eval()(x), x) and torch.equal(UniformMaskDropout(0.0)(x), x)
    # Under vmap with randomness="different" (the engine's stacked generators) each member draws its own mask.
    masks = (
        vmap(lambda v: UniformMaskDropout(0.5)(v), randomness="different")(torch.ones(2, 1000)) != 0
    )
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 16, 16), (3, 20, 12), (1, 7, 9)])
def test_last_layer_by_fold_equals_the_transposed_convolution(shape):
    # On a CPU the generator's last transposed convolution is computed as W^T h, then fold: same
    # values and gradients as the module for every kernel, stride and padding the shapes give.
    torch.manual_seed(0)
    gen = Generator(10, shape, **SMALL).double()
    conv = gen.to_image[-1]
    channels = conv.in_channels
    size = {
        (1, 28, 28): (20, 20),
        (3, 32, 32): (20, 20),
        (1, 16, 16): (10, 10),
        (3, 20, 12): (20, 10),
        (1, 7, 9): (10, 10),
    }[shape]
    h = torch.randn(3, channels, *size, dtype=torch.float64, requires_grad=True)
    ours, reference = _to_image_channels(conv, h), conv(h)
    assert ours.shape == reference.shape == (3, shape[0], *shape[1:])
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    probe = torch.randn_like(ours)
    inputs = (h, conv.weight, conv.bias)
    for a, b in zip(
        torch.autograd.grad(ours, inputs, probe),
        torch.autograd.grad(reference, inputs, probe),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
