"""The cohort engine's layer-by-layer forward against ``torch.func.vmap`` over the model itself,
in float64, values and gradients, on awkward sizes."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from fedsim.batched import chain_forward
from fedsim.models import build_model


class Chain(nn.Module):
    """Every supported layer with its less common options."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.ReLU(),
            nn.Conv2d(4, 6, (3, 1), padding=(1, 0), groups=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(2, stride=1), nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
            nn.Flatten())
        self.head = nn.Linear(6 * 3 * 2, 5, bias=False)
        self.classifier = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.features(x)))


def compare(model: nn.Module, shape: tuple[int, ...], clients: int = 3, batch: int = 5) -> None:
    model = model.double()
    torch.manual_seed(1)
    params = {k: torch.randn(clients, *v.shape, dtype=torch.float64) * 0.3
              for k, v in model.named_parameters()}
    x = torch.randn(clients, batch, *shape, dtype=torch.float64)
    forward = chain_forward(model)
    assert forward is not None
    reference = vmap(lambda p, xb: functional_call(model, p, (xb,)))
    ours = {k: v.clone().requires_grad_() for k, v in params.items()}
    theirs = {k: v.clone().requires_grad_() for k, v in params.items()}
    y, want = forward(ours, x), reference(theirs, x)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    seed = torch.randn_like(want)  # a loss whose gradient differs per output
    grads = torch.autograd.grad((y * seed).sum(), list(ours.values()))
    wanted = torch.autograd.grad((want * seed).sum(), list(theirs.values()))
    for name, g, w in zip(ours, grads, wanted):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)
        if name.endswith("weight") and g.dim() == 3:  # a linear layer's: in its own layout
            assert g.is_contiguous(), name


@pytest.mark.parametrize("name, shape", [("mlp", (1, 8, 8)), ("cnn", (2, 8, 8)),
                                         ("cnn", (1, 17, 23))])
def test_fedsim_models(name, shape):
    compare(build_model(name, shape, 7), shape)


def test_every_supported_layer_and_option():
    compare(Chain(), (3, 9, 7), clients=2, batch=3)


def test_one_client():
    compare(build_model("cnn", (2, 8, 8), 4), (2, 8, 8), clients=1, batch=1)


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class Dynamic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if x.sum() > 0 else x  # data-dependent: fx cannot trace it


@pytest.mark.parametrize("model", [
    build_model("resnet", (3, 8, 8), 10),  # residual additions, GroupNorm
    nn.Sequential(nn.Linear(4, 4), nn.Tanh()),  # a layer without a batched version
    nn.Sequential(nn.Conv2d(2, 2, 3, padding="same")),  # padding given by name
    nn.Sequential(nn.Flatten(start_dim=2)),
    Branching(), Dynamic(),
], ids=["resnet", "tanh", "padding-same", "flatten-dim", "branching", "dynamic"])
def test_anything_else_is_left_to_vmap(model):
    assert chain_forward(model) is None
