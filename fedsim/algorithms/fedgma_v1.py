"""FedGMA v1, the workshop algorithm (Tenison et al., ICLR 2021 DPML workshop, Algorithm 1).

Clients run FedAvg's local SGD and return both their final parameters ``w_k`` (as the update
``w_k − w``) and their last local gradient ``g_k`` (the gradient of the last local step: the
cohort's gradient matrix after training). The server sets

    w ← Σ p̄_k w_k − η_s · Σ p̄_k hardmask(g_k)

in two steps: one FedAvg of the parameters through the server optimizer (a ``τ = 0`` step:
with the defaults sgd and server_lr 1 exactly ``Σ p̄_k w_k``), then one step along the
hard-masked mean of the gradients (``gma_kernels``' masked mean with ``mask="hard"``) with the
workshop's threshold ``p`` (``fedgma_v1_p``, default 0.8; the paper's formula
``I{p·K ≤ |Σ sign g_k|}`` is ``A ≥ τ`` with ``τ = p``), scaled by ``η_s``
(``fedgma_v1_server_lr``, default: the local lr). Clients upload ``2N`` floats.

The round is all or nothing: a non-finite gradient mean, or a step that overflows float32,
raises ``NonFiniteError`` with the server's parameters and optimizer state as they were.

``fedgma-v1+gma`` also masks the parameter average, with the journal GMA (``gma_*`` settings).
The round's reported mask statistics are those of the gradient mask. Across ranks
(``fedsim.distributed``) and over several cohorts both steps go through accumulators.
"""
from __future__ import annotations

import torch
from torch import Tensor

from gma_kernels import GMAStats, MaskConfig, NonFiniteError

from ..client import Cohort
from .base import Algorithm, Round


class FedGMAv1(Algorithm):
    hyperparameters = {"p": "fedgma_v1_p", "server_lr": "fedgma_v1_server_lr", "local_lr": "lr"}

    def __init__(self, p: float, server_lr: float | None, local_lr: float) -> None:
        super().__init__()
        self.p = p
        self.server_lr = local_lr if server_lr is None else server_lr

    def begin_round(self, rnd: Round) -> None:
        super().begin_round(rnd)
        self._grads = rnd.server.aggregation(len(rnd.chunks), MaskConfig(self.p, "hard"))

    def local_train(self, rnd: Round, cohort: Cohort) -> Tensor:
        return rnd.trainer.train(cohort, last_gradient=True)

    def collect(self, rnd: Round, cohort: Cohort) -> None:
        super().collect(rnd, cohort)
        self._grads.add(cohort.grads, self.weights(cohort))  # the last step's gradients

    def end_round(self, rnd: Round) -> GMAStats:
        masked, stats = self._grads.masked_mean()  # raises before any step if not finite
        if not bool(torch.isfinite(masked).all()):
            raise NonFiniteError("FedGMA v1: the masked mean of the last gradients is not "
                                 "finite; params and optimizer state left unchanged")
        before = rnd.server.state_dict()
        rnd.updates.step()  # guarded: raises with the server as it was
        params = rnd.server.params.sub_(masked, alpha=self.server_lr)
        if not bool(torch.isfinite(params).all()):
            rnd.server.load_state_dict(before)
            raise NonFiniteError("FedGMA v1: the gradient step overflows float32; params and "
                                 "optimizer state left unchanged")
        return stats

    def communication(self, num_params: int) -> tuple[int, int]:
        """``w`` down; ``w_k`` and ``g_k`` up."""
        return num_params, 2 * num_params
