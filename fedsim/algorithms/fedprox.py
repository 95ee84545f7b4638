"""FedProx (Li et al. 2020): FedAvg whose clients minimise ``F_k(y) + (μ/2)‖y − w‖²``.

The proximal term enters through the trainer's gradient hook, ``grad += μ (y − w)`` before each
local step (``fedprox_mu``); uploads and aggregation are FedAvg's. ``μ = 0`` is FedAvg exactly
(the hook is skipped).
"""
from __future__ import annotations

from torch import Tensor

from .base import Algorithm, ClientContext, ClientResult


class FedProx(Algorithm):
    name = "fedprox"

    def local_train(self, ctx: ClientContext) -> ClientResult:
        mu, y, w = self.config.fedprox_mu, ctx.trainer.params, ctx.global_params

        def proximal(grad: Tensor) -> None:
            grad.add_(y - w, alpha=mu)

        loss = ctx.train(proximal if mu else None)
        return ClientResult(ctx.client_id, ctx.update(), self.client_weight(ctx), loss)
