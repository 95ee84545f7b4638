"""Models: every model on every input shape, the ``classifier`` head, sizes, no BatchNorm."""
import pytest
import torch
from torch import nn

from fedsim.models import MODELS, build_model

SHAPES = [(1, 8, 8), (3, 8, 8), (1, 28, 28), (3, 28, 28), (3, 32, 32)]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_and_head(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 7)
    out = model(torch.rand(4, *shape))
    assert out.shape == (4, 7) and out.dtype == torch.float32
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 7
    names = [n for n, _ in model.named_parameters()]
    assert names[-2:] == ["classifier.weight", "classifier.bias"]  # the head comes last (FedPVR split)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_parameter_counts():
    # McMahan et al. (2017): the MNIST CNN has 1,663,370 parameters and the 2NN 199,210.
    assert _count(build_model("cnn", (1, 28, 28), 10)) == 1_663_370
    assert _count(build_model("mlp", (1, 28, 28), 10)) == 199_210
    assert 5_000 < _count(build_model("cnn", (3, 8, 8), 2)) < 50_000  # sized down for 8x8 digits
    assert 50_000 < _count(build_model("resnet", (3, 32, 32), 10)) < 200_000
    assert any(isinstance(m, nn.GroupNorm) for m in build_model("resnet", (3, 32, 32), 10).modules())


def test_float32_even_with_float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = build_model("resnet", (3, 8, 8), 10)
    finally:
        torch.set_default_dtype(old)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bad_arguments():
    with pytest.raises(ValueError, match="cnn, mlp, leaky-mlp"):
        build_model("vgg", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="input_shape"):
        build_model("mlp", (28, 28), 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("cnn", (1, 28, 28), 0)
    with pytest.raises(ValueError, match="4x4"):
        build_model("cnn", (1, 2, 2), 10)


def test_trains_on_colored_digits():
    """A few full-batch steps reduce the loss: model and data fit together."""
    from fedsim.data import load_federated

    ds = load_federated("colored-digits", num_clients=2, split="iid")
    x, y = (t[:64] for t in ds.clients[0])
    for name in MODELS:
        torch.manual_seed(0)
        model = build_model(name, ds.input_shape, ds.num_classes)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for _ in range(8):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.97 * losses[0], name
