"""The client-algorithm interface: what a client does in a round, what it uploads, and how the
server folds the uploads in.

A round, as the loop drives it (``fedsim.loop.play_round``), on every rank::

    contexts = this rank's share of the sampled clients (all of them in one process)
    algorithm.pre_round(server, contexts)          # optional extra exchange (FedGA)
    results = [algorithm.local_train(ctx) for ctx in contexts]   # trainer reset to w before each
    stats = algorithm.aggregate(server, results)   # one ServerOptimizer step (or more)

Across ranks (``fedsim.distributed``) every rank runs the round on its share and must end it
with the same server state: ``server.step`` already combines the ranks' updates, and an
algorithm that needs more from the other ranks' clients uses ``server.comm`` (``all_reduce_``
for a sum over clients, ``gather`` for per-client values in the sampled order). In one process
these are the identity, so an algorithm written this way runs unchanged in both.

``setup(server)`` runs once, after the server exists and before any round or
``load_state_dict``: algorithms that keep server-side tensors (SCAFFOLD's ``c``) allocate them
there, sized by the server's flat layout.

Per-client state that persists across rounds (SCAFFOLD's control variates) lives in
``client_state[client_id]`` and is saved with ``state_dict()``. Any rank may train a client
in a later round, so every rank keeps every client's state: update it in ``aggregate`` from
what ``server.comm.gather`` returns, not in ``local_train``. A subclass with server-side state
extends ``state_dict``/``load_state_dict``. Extra uploaded tensors go in ``ClientResult.extras``.

Every algorithm has a GMA twin, ``<name>+gma`` (``masked_variant``): same clients, same uploads,
but the server aggregates the model updates with gradient masked averaging (``gma_*``
settings). Without GMA the server uses ``τ = 0``, which ``gma_kernels`` guarantees is exactly
weighted averaging, so the plain algorithm is reproduced bit for bit.
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
    (the server's flat buffer, read only), the shared trainer, and the client's own shuffling
    generator for this round (``fedsim.client.client_generator``)."""

    client_id: int
    x: Tensor
    y: Tensor
    global_params: Tensor
    trainer: ClientTrainer
    generator: torch.Generator

    @property
    def num_examples(self) -> int:
        return len(self.y)

    def train(self, grad_hook: GradHook | None = None, *, steps: int | None = None) -> Tensor:
        """Local SGD from wherever the trainer's parameters are (``steps`` overrides the
        configured epochs / steps); returns the mean loss."""
        return self.trainer.train(self.x, self.y, self.generator, grad_hook, steps=steps)

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

    Class attributes a subclass may set:

    * ``masked``: aggregate with gradient masked averaging (``gma_*`` settings); else ``τ = 0``.
    * ``server_optimizer``: the server optimizer kind this algorithm is defined by (FedAdam:
      ``"adam"``); ``None`` uses the configured ``server_optimizer``.
    * ``equal_weights``: aggregate with equal client weights (SCAFFOLD, FedPVR) instead of the
      clients' example counts.
    """

    name: ClassVar[str]
    masked: ClassVar[bool] = False
    server_optimizer: ClassVar[str | None] = None
    equal_weights: ClassVar[bool] = False

    def __init__(self, config: Config) -> None:
        self.config = config
        self.client_state: dict[int, dict[str, Tensor]] = {}

    def setup(self, server: Server) -> None:
        """Once, after the server is built (allocate server-side state here)."""

    def pre_round(self, server: Server, contexts: list[ClientContext]) -> None:
        """An exchange before local training (none by default)."""

    def client_weight(self, ctx: ClientContext) -> float:
        """The client's aggregation weight: its number of examples, or 1 (``equal_weights``)."""
        return 1.0 if self.equal_weights else float(ctx.num_examples)

    def local_train(self, ctx: ClientContext) -> ClientResult:
        loss = ctx.train()
        return ClientResult(ctx.client_id, ctx.update(), self.client_weight(ctx), loss)

    def aggregate(self, server: Server, results: list[ClientResult]) -> GMAStats:
        return server.step([r.update for r in results], [r.weight for r in results])

    def communication(self, num_params: int) -> tuple[int, int]:
        """Floats (down, up) one participating client exchanges with the server in a round, for
        a model of ``num_params`` parameters. FedAvg: the model down, its update up."""
        return num_params, num_params

    def state_dict(self) -> dict:
        return {"client_state": self.client_state}

    def load_state_dict(self, state: dict) -> None:
        self.client_state = state["client_state"]


def masked_variant(cls: type[Algorithm], name: str | None = None) -> type[Algorithm]:
    """``cls`` with GMA switched on, called ``<cls.name>+gma`` unless ``name`` is given."""
    variant_name = name or f"{cls.name}+gma"
    doc = f"{cls.name} with gradient masked averaging at the server (``{variant_name}``).\n\n" \
          + (cls.__doc__ or "")
    return type(f"{cls.__name__}GMA", (cls,), {"name": variant_name, "masked": True,
                                                "__doc__": doc, "__module__": cls.__module__})
