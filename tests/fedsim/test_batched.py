"""The cohort engine's layer-by-layer forward, and its hand-written gradient, against
``torch.func.vmap`` over the model itself and autograd, in float64, on awkward sizes."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from fedsim.batched import chain_forward, chain_gradient, chain_of
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
    chain = chain_of(model)
    assert chain is not None
    forward = chain_forward(chain)
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
    assert chain_of(model) is None


class LinearChain(nn.Module):
    """Every layer ``chain_gradient`` supports: a ReLU straight on the (flattened) input, a
    linear layer without bias, an in-place ReLU, two ReLUs in a row."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(2 * 3 * 2, 7, bias=False),
                                  nn.ReLU(inplace=True), nn.ReLU(), nn.Linear(7, 5))
        self.classifier = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


@pytest.mark.parametrize("model, shape", [(build_model("mlp", (1, 5, 3), 6), (1, 5, 3)),
                                          (LinearChain(), (2, 3, 2))], ids=["mlp", "every-layer"])
def test_gradient_by_hand(model, shape):
    """Losses and gradients against autograd through ``vmap`` of the model, with per-example
    weights that include zeros (padding) and a client whose weights are all zero."""
    model, clients, batch = model.double(), 4, 6
    torch.manual_seed(2)
    params = {k: torch.randn(clients, *v.shape, dtype=torch.float64) * 0.5
              for k, v in model.named_parameters()}
    x = torch.randn(clients, batch, *shape, dtype=torch.float64)
    x_before = x.clone()
    y = torch.randint(0, 4, (clients, batch))
    weight = torch.rand(clients, batch, dtype=torch.float64)
    weight[1, 4:] = 0
    weight[3] = 0
    gradient = chain_gradient(chain_of(model))
    assert gradient is not None
    grads = {k: torch.full_like(v, float("nan")) for k, v in params.items()}  # poisoned
    losses = gradient(params, grads, x, y, weight)
    theirs = {k: v.clone().requires_grad_() for k, v in params.items()}
    logits = vmap(lambda p, xb: functional_call(model, p, (xb,)))(theirs, x)
    ce = F.cross_entropy(logits.reshape(clients * batch, -1), y.reshape(-1), reduction="none")
    want = (ce.view(clients, batch) * weight).sum(1)
    wanted = torch.autograd.grad(want.sum(), list(theirs.values()))
    torch.testing.assert_close(losses, want, rtol=1e-12, atol=1e-12)
    for name, w in zip(theirs, wanted):
        torch.testing.assert_close(grads[name], w, rtol=1e-10, atol=1e-12, msg=name)
    assert torch.equal(x, x_before)  # the caller's inputs are left as they were
    # with lr=η: the SGD step taken in the backward, every layer's gradient at the old θ
    stepped = {k: v.clone() for k, v in params.items()}
    torch.testing.assert_close(gradient(stepped, None, x, y, weight, lr=0.3), want,
                               rtol=1e-12, atol=1e-12)
    for name, w in zip(theirs, wanted):
        torch.testing.assert_close(stepped[name], params[name] - 0.3 * w, rtol=1e-10,
                                   atol=1e-12, msg=name)
    assert torch.equal(x, x_before)


def test_gradient_into_rows_of_a_matrix():
    """The gradients land in strided ``[C, *shape]`` views of one ``[C, N]`` matrix (as the
    cohort engine passes them), the rest of the matrix untouched."""
    model = build_model("mlp", (1, 2, 3), 3).double()
    shapes = {k: v.shape for k, v in model.named_parameters()}
    n = sum(s.numel() for s in shapes.values())
    matrix = torch.full((3, n + 1), -7.0, dtype=torch.float64)  # one spare column at the end
    views, offset = {}, 0
    for k, s in shapes.items():
        views[k] = matrix[:, offset:offset + s.numel()].view(3, *s)
        offset += s.numel()
    params = {k: torch.randn(3, *s, dtype=torch.float64) for k, s in shapes.items()}
    x, y = torch.randn(3, 5, 1, 2, 3, dtype=torch.float64), torch.randint(0, 3, (3, 5))
    weight = torch.full((3, 5), 0.2, dtype=torch.float64)
    dense = {k: torch.empty(3, *s, dtype=torch.float64) for k, s in shapes.items()}
    gradient = chain_gradient(chain_of(model))
    gradient(params, dense, x, y, weight)
    gradient(params, views, x, y, weight)
    for k in shapes:
        torch.testing.assert_close(views[k], dense[k], rtol=0, atol=0)
    assert torch.all(matrix[:, -1] == -7.0)


class Twice(nn.Module):
    """One linear layer applied twice: its gradient is the sum of two uses (autograd's)."""

    def __init__(self) -> None:
        super().__init__()
        self.flat, self.relu, self.layer = nn.Flatten(), nn.ReLU(), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.relu(self.layer(self.flat(x))))


@pytest.mark.parametrize("model", [
    build_model("cnn", (1, 8, 8), 3),  # convolutions and poolings: autograd
    nn.Sequential(nn.Flatten(), nn.ReLU()),  # no linear layer
    Twice(),
], ids=["cnn", "no-linear", "layer-twice"])
def test_gradient_by_hand_only_for_linear_chains(model):
    assert chain_of(model) is not None and chain_gradient(chain_of(model)) is None


def test_a_layer_applied_twice_trains_as_autograd_says():
    compare(Twice(), (1, 2, 2))
