"""Local SGD on one reusable client model, whose parameters and gradients are two flat buffers."""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gma_kernels import FlatParams

GradHook = Callable[[Tensor], None]


def client_generator(seed: int, round_: int, client_id: int,
                     device: torch.device | str = "cpu") -> torch.Generator:
    """The generator that shuffles client ``client_id``'s batches in round ``round_`` of the run
    seeded ``seed``: a pure function of the three (``numpy.random.SeedSequence`` mixes them),
    so a client's batches do not depend on which clients trained before it, or on which rank
    trains it."""
    state = np.random.SeedSequence([seed, round_, client_id]).generate_state(1, dtype=np.uint64)
    return torch.Generator(device).manual_seed(int(state[0]))


class ClientTrainer:
    """Trains every client in turn on the same model: ``reset`` loads the global flat buffer,
    ``train`` runs local SGD. Each step is one forward, one backward and one fused update of the
    whole flat buffer (``params -= lr · grad``), with no per-parameter Python loop."""

    def __init__(self, model: nn.Module, *, lr: float, batch_size: int, local_epochs: int,
                 local_steps: int | None = None, weight_decay: float = 0.0) -> None:
        self.model = model
        self.flat = FlatParams(model)
        self.grad = torch.zeros_like(self.flat.buffer)
        for p, g in zip(model.parameters(), self.flat.layout.views(self.grad).values()):
            p.grad = g  # autograd accumulates into these views, in place
        self.lr, self.weight_decay = lr, weight_decay
        self.batch_size, self.local_epochs, self.local_steps = batch_size, local_epochs, local_steps

    @property
    def params(self) -> Tensor:
        """The client model's parameters as one flat buffer (views of the model's tensors)."""
        return self.flat.buffer

    def reset(self, params: Tensor) -> None:
        """Start from ``params`` (the global flat buffer)."""
        self.flat.copy_(params)

    def train(self, x: Tensor, y: Tensor, generator: torch.Generator,
              grad_hook: GradHook | None = None, *, steps: int | None = None) -> Tensor:
        """Local SGD on ``(x, y)``; ``grad_hook`` may edit the flat gradient before each step
        (a proximal term, a control variate); ``steps`` overrides the configured number of
        steps. Returns the mean training loss (0-d tensor). Afterwards ``grad`` still holds the
        last step's gradient (hook included)."""
        self.model.train()
        total = torch.zeros((), device=x.device)
        taken = 0
        for xb, yb in self._batches(x, y, generator, steps):
            self.grad.zero_()
            loss = F.cross_entropy(self.model(xb), yb)
            loss.backward()
            if self.weight_decay:
                self.grad.add_(self.params, alpha=self.weight_decay)
            if grad_hook is not None:
                grad_hook(self.grad)
            self.params.add_(self.grad, alpha=-self.lr)
            total += loss.detach()
            taken += 1
        return total / taken

    def full_gradient(self, x: Tensor, y: Tensor, chunk: int = 1024) -> Tensor:
        """``∇f_k`` at the current parameters over the whole of ``(x, y)`` (mean loss, weight
        decay included), as a new flat tensor; read in chunks of ``chunk`` examples."""
        self.model.train()
        self.grad.zero_()
        for xb, yb in zip(x.split(chunk), y.split(chunk)):
            (F.cross_entropy(self.model(xb), yb, reduction="sum") / len(y)).backward()
        if self.weight_decay:
            self.grad.add_(self.params, alpha=self.weight_decay)
        return self.grad.clone()

    def _batches(self, x: Tensor, y: Tensor, generator: torch.Generator,
                 steps: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled mini-batches (one gather per epoch, then views): ``local_epochs`` passes, or
        exactly ``local_steps`` (or ``steps``) batches drawn from as many passes as that takes."""
        def passes() -> Iterator[tuple[Tensor, Tensor]]:
            while True:
                perm = torch.randperm(len(y), generator=generator, device=generator.device)
                yield from zip(x[perm].split(self.batch_size), y[perm].split(self.batch_size))

        count = steps or self.local_steps or self.local_epochs * math.ceil(len(y) / self.batch_size)
        return itertools.islice(passes(), count)
