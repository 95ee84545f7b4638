"""FedGMA v1, the workshop algorithm (Tenison et al., ICLR 2021 DPML workshop, Algorithm 1).

Clients run FedAvg's local SGD and return both their final parameters ``w_k`` (as the update
``w_k − w``) and their last local gradient ``g_k`` (the gradient of the last local step). The
server sets

    w ← Σ p̄_k w_k − η_s · Σ p̄_k hardmask(g_k)

in two steps: one FedAvg of the parameters through the server optimizer (a ``τ = 0`` step:
with the defaults sgd and server_lr 1 exactly ``Σ p̄_k w_k``), then one step along the
hard-masked mean of the gradients, ``gma_kernels.masked_mean(g, p, tau=p, mask="hard")`` with
the workshop's threshold ``p = fedgma_v1_p`` (default 0.8; the paper's formula
``I{p·K ≤ |Σ sign g_k|}`` is ``A ≥ τ`` with ``τ = p``), scaled by ``η_s = fedgma_v1_server_lr``
(default: the local lr). Clients upload ``2N`` floats.

``fedgma-v1+gma`` also masks the parameter average, with the journal GMA (``gma_*`` settings).
The round's reported mask statistics are those of the gradient mask. Across ranks
(``fedsim.distributed``) both steps go through all-reduced accumulators.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from gma_kernels import GMAStats

from .base import Algorithm, ClientContext, ClientResult

if TYPE_CHECKING:
    from ..server import Server


class FedGMAv1(Algorithm):
    name = "fedgma-v1"

    def local_train(self, ctx: ClientContext) -> ClientResult:
        loss = ctx.train()
        return ClientResult(ctx.client_id, ctx.update(), self.client_weight(ctx), loss,
                            {"grad": ctx.trainer.grad.clone()})  # the last step's gradient

    def aggregate(self, server: Server, results: list[ClientResult]) -> GMAStats:
        weights = [r.weight for r in results]
        server.step([r.update for r in results], weights)
        masked, stats = server.comm.masked_mean([r.extras["grad"] for r in results], weights,
                                                server.params, tau=self.config.fedgma_v1_p,
                                                mask="hard")
        lr = self.config.fedgma_v1_server_lr
        lr = self.config.lr if lr is None else lr
        server.params.sub_(masked, alpha=lr)
        return stats

    def communication(self, num_params: int) -> tuple[int, int]:
        """``w`` down; ``w_k`` and ``g_k`` up."""
        return num_params, 2 * num_params
