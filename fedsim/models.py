"""Models for fedsim: a small CNN, an MLP and a GroupNorm ResNet-8 (no BatchNorm: federated).

Every model ends in a linear layer named ``classifier`` (parameters ``classifier.weight`` and
``classifier.bias``), FedPVR's default split point, and has float32 parameters only.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

MODELS: tuple[str, ...] = ("cnn", "mlp", "leaky-mlp", "irm-mlp", "resnet")


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build model ``name`` (one of :data:`MODELS`) for ``(C, H, W)`` images and ``num_classes``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    if len(input_shape) != 3 or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    c, h, w = (int(s) for s in input_shape)
    if name == "cnn":
        model: nn.Module = CNN(c, h, w, num_classes)
    elif name == "mlp":
        model = MLP(c * h * w, num_classes)
    elif name == "leaky-mlp":
        model = MLP(c * h * w, num_classes, hidden=256, depth=3, activation=nn.LeakyReLU)
        for layer in model.modules():  # the paper's initialization
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight)
                nn.init.constant_(layer.bias, 0.01)
    elif name == "irm-mlp":
        model = MLP(c * h * w, num_classes, hidden=390)
        for layer in model.modules():  # the IRM code's initialization
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
    else:
        model = ResNet8(c, num_classes)
    return model.float()


@functools.lru_cache(maxsize=None)
def parameter_names(name: str) -> tuple[str, ...]:
    """The names of model ``name``'s parameters, in ``named_parameters()`` order (they do not
    depend on the input size or the number of classes)."""
    if name not in MODELS:
        return ()
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # no memory, no RNG draw
        return tuple(n for n, _ in build_model(name, (1, 8, 8), 2).named_parameters())


class CNN(nn.Module):
    """Two conv layers (each ReLU + 2x2 max-pool) and two fully connected layers.

    For 16x16 inputs and larger it is McMahan et al.'s (2017) MNIST CNN (5x5 convs with 32 and 64
    channels, 512 hidden units); smaller inputs such as the 8x8 digits get 3x3 convs with 16 and
    32 channels and 64 hidden units.
    """

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        if min(height, width) < 4:
            raise ValueError(f"cnn needs inputs of at least 4x4, got {height}x{width}")
        large = min(height, width) >= 16
        k, c1, c2, hidden = (5, 32, 64, 512) if large else (3, 16, 32, 64)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, k, padding=k // 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, k, padding=k // 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(c2 * (height // 4) * (width // 4), hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc(self.features(x)))


class MLP(nn.Module):
    """``depth`` hidden layers of ``hidden`` units, each followed by ``activation``. The
    defaults are McMahan et al.'s (2017) "2NN" (two hidden layers of 200 ReLU units, model
    ``mlp``); ``leaky-mlp`` is the synthetic-task MLP of Parascandolo et al. (2021), three
    hidden layers of 256 LeakyReLU units, weights ``N(0, 2/fan_in)`` and biases 0.01;
    ``irm-mlp`` is Arjovsky et al.'s (2019) IRM MLP, two hidden layers of 390 ReLU units
    (392 → 390 → 390 → 2 on their 2 × 14 × 14 images), Xavier-uniform weights, zero biases.
    Their model has one logit ``ℓ`` and the loss ``BCE(ℓ, y)``; with 2-class cross-entropy over
    logits ``(a, b)``, which depends on ``b − a`` alone (``= BCE(b − a, y)``), it is the same
    model up to that overparameterization."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 200, depth: int = 2,
                 activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else hidden, hidden), activation()]
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs with GroupNorm and a residual connection (a 1x1 projection on shape change)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.GroupNorm(groups, out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet8(nn.Module):
    """ResNet-8 for 32x32 CIFAR-10 with GroupNorm (2 groups, as Hsieh et al. 2020 advise for FL).

    A 3x3 stem and three stages of one basic block (16, 32, 64 channels; strides 1, 2, 2), then
    global average pooling: about 78k parameters, and any input size works.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: tuple[int, int, int] = (16, 32, 64),
        groups: int = 2,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.GroupNorm(groups, widths[0]),
            nn.ReLU(),
        )
        blocks, in_ch = [], widths[0]
        for i, out_ch in enumerate(widths):
            blocks.append(BasicBlock(in_ch, out_ch, 1 if i == 0 else 2, groups))
            in_ch = out_ch
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.layers(self.stem(x))))
