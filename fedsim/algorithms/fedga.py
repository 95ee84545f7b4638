"""FedGA (Dandi et al., AAAI 2022, "Implicit Gradient Alignment"; code ``epfml/GradientAlignment``).

Before local training, an extra exchange: each sampled client computes its full local gradient
``g_k = ∇f_k(w)`` over all its data and uploads it; the server averages them weighted by data
size, ``ḡ = Σ p̄_k g_k``, and sends ``ḡ`` back. Client ``k`` then starts its local SGD from
``y_k = w − β (ḡ − g_k)`` (``fedga_beta``) instead of ``w`` and runs plain SGD; it uploads
``y_k − w`` (measured from ``w``, shift included) and the server steps
``w ← w + η_g Σ p̄_k (y_k − w)`` with the same data-size weights as ``ḡ``, so the shifts
``Σ p̄_k (ḡ − g_k) = 0`` cancel in the aggregate. Communication: two exchanges of ``N`` floats
each way per client (``2×`` FedAvg).

Across ranks (``fedsim.distributed``) each rank computes the gradients of its share of the
clients and one all-reduce of ``Σ p_k g_k`` (N floats) and of ``Σ p_k`` gives every rank ``ḡ``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .base import Algorithm, ClientContext, ClientResult

if TYPE_CHECKING:
    from ..config import Config
    from ..server import Server


class FedGA(Algorithm):
    name = "fedga"
    #: local SGD steps (None: the configured local epochs / steps)
    local_steps: int | None = None

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._shift: dict[int, Tensor] = {}  # this round's ḡ − g_k, per sampled client

    def pre_round(self, server: Server, contexts: list[ClientContext]) -> None:
        grads = []
        for ctx in contexts:
            ctx.trainer.reset(ctx.global_params)
            grads.append(ctx.trainer.full_gradient(ctx.x, ctx.y))
        weights = [float(ctx.num_examples) for ctx in contexts]
        mean = torch.zeros_like(server.params)
        for g, p in zip(grads, weights):
            mean.add_(g, alpha=p)
        total = torch.tensor(sum(weights), dtype=torch.float64, device=mean.device)
        server.comm.all_reduce_(mean)  # Σ p_k g_k and Σ p_k over every rank's clients
        mean.div_(float(server.comm.all_reduce_(total)))
        self._shift = {ctx.client_id: g.neg_().add_(mean) for ctx, g in zip(contexts, grads)}

    def local_train(self, ctx: ClientContext) -> ClientResult:
        ctx.trainer.params.sub_(self._shift.pop(ctx.client_id), alpha=self.config.fedga_beta)
        loss = ctx.train(steps=self.local_steps)
        return ClientResult(ctx.client_id, ctx.update(), self.client_weight(ctx), loss)

    def communication(self, num_params: int) -> tuple[int, int]:
        """``w`` and ``ḡ`` down, ``g_k`` and ``y_k − w`` up."""
        return 2 * num_params, 2 * num_params
