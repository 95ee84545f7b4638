"""The client-algorithm interface: what a client does in a round, what it uploads, and how the
server folds the uploads in.

A round, as the loop drives it::

    algorithm.pre_round(server, contexts)          # optional extra exchange (FedGA)
    results = [algorithm.local_train(ctx) for ctx in contexts]   # trainer reset to w before each
    stats = algorithm.aggregate(server, results)   # one ServerOptimizer step (or more)

Per-client state that persists across rounds (SCAFFOLD's control variates) lives in
``client_state[client_id]`` and is saved with ``state_dict()``; a subclass with server-side state
extends ``state_dict``/``load_state_dict``. Extra uploaded tensors go in ``ClientResult.extras``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from gma_kernels import GMAStats

from ..client import ClientTrainer, GradHook

if TYPE_CHECKING:
    from ..config import Config
    from ..server import Server


@dataclass
class ClientContext:
    """One sampled client in one round: its data (on the device), the global parameters ``w``
    (the server's flat buffer, read only) and the shared trainer and shuffling generator."""

    client_id: int
    x: Tensor
    y: Tensor
    global_params: Tensor
    trainer: ClientTrainer
    generator: torch.Generator

    @property
    def num_examples(self) -> int:
        return len(self.y)

    def train(self, grad_hook: GradHook | None = None) -> Tensor:
        """Local SGD from wherever the trainer's parameters are; returns the mean loss."""
        return self.trainer.train(self.x, self.y, self.generator, grad_hook)

    def update(self) -> Tensor:
        """``Δ_k = w_k − w``: the trained parameters minus the global ones (a new flat tensor)."""
        return self.trainer.params - self.global_params


@dataclass
class ClientResult:
    """What one client uploads: its update, its aggregation weight, its mean local loss, and any
    extra tensors the algorithm sends (a control-variate delta, a last gradient)."""

    client_id: int
    update: Tensor
    weight: float
    loss: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


class Algorithm:
    """Plain local SGD, upload ``Δ_k``, aggregate weighted by client size (FedAvg's behaviour).

    ``masked`` algorithms aggregate with gradient masked averaging (``gma_*`` settings); the
    others with ``τ = 0``, which is exactly weighted averaging.
    """

    name: ClassVar[str]
    masked: ClassVar[bool] = False

    def __init__(self, config: Config) -> None:
        self.config = config
        self.client_state: dict[int, dict[str, Tensor]] = {}

    def pre_round(self, server: Server, contexts: list[ClientContext]) -> None:
        """An exchange before local training (none by default)."""

    def local_train(self, ctx: ClientContext) -> ClientResult:
        loss = ctx.train()
        return ClientResult(ctx.client_id, ctx.update(), float(ctx.num_examples), loss)

    def aggregate(self, server: Server, results: list[ClientResult]) -> GMAStats:
        return server.step([r.update for r in results], [r.weight for r in results])

    def state_dict(self) -> dict:
        return {"client_state": self.client_state}

    def load_state_dict(self, state: dict) -> None:
        self.client_state = state["client_state"]
