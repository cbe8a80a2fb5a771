import pytest
import torch

from tldr_fast.models import MLP, PaperCNN


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 7, 9), (3, 1, 1)])
@pytest.mark.parametrize("cls", [PaperCNN, MLP])
def test_shapes_for_any_image_size(cls, shape):
    model = cls(in_channels=shape[0], num_classes=7, image_size=shape[1:]).eval()
    x = torch.rand(3, *shape)
    logits, feat = model.forward_with_features(x)
    assert logits.shape == (3, 7) and feat.shape == (3, 256)
    assert torch.allclose(model(x), logits)


def test_normalisation_is_inside_the_module():
    model = PaperCNN(1, 10, 28, mean=(0.1307,), std=(0.3081,)).eval()
    x = torch.rand(2, 1, 28, 28)
    shifted = PaperCNN(1, 10, 28).eval()
    shifted.load_state_dict(model.state_dict())  # buffers carry the statistics
    assert torch.allclose(model(x), shifted(x))
    assert torch.allclose(model.normalize(x), (x - 0.1307) / 0.3081)


def test_wrong_input_shape_names_both_shapes():
    model = PaperCNN(1, 10, 28)
    with pytest.raises(ValueError, match=r"image shape \(3, 32, 32\).*expects \(1, 28, 28\)"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        model(torch.rand(28, 28))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        PaperCNN(1, 1, 28)
    with pytest.raises(ValueError, match="image_size must be positive"):
        MLP(1, 10, (0, 28))
