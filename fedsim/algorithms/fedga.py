"""FedGA (Dandi et al., AAAI 2022, "Implicit Gradient Alignment"; code ``epfml/GradientAlignment``).

Before local training, an extra exchange: each sampled client computes its full local gradient
``g_k = ∇f_k(w)`` over all its data and uploads it; the server averages them weighted by data
size, ``ḡ = Σ p̄_k g_k``, and sends ``ḡ`` back. Client ``k`` then starts its local SGD from
``y_k = w − β (ḡ − g_k)`` (``beta``, the ``fedga_beta`` setting) instead of ``w`` and runs
plain SGD; it uploads ``y_k − w`` (measured from ``w``, shift included) and the server steps
``w ← w + η_g Σ p̄_k (y_k − w)`` with the same data-size weights as ``ḡ``, so the shifts
``Σ p̄_k (ḡ − g_k) = 0`` cancel in the aggregate. Communication: two exchanges of ``N`` floats
each way per client (``2×`` FedAvg).

The gradients of a cohort are one ``[C, N]`` matrix, read over each client's data in chunks of
examples. A round of one cohort keeps it until training starts; a round of several cohorts
keeps only ``Σ p_k g_k`` and recomputes each cohort's ``g_k`` before it trains (twice the
gradient work, memory bounded by the cohort size). Across ranks (``fedsim.distributed``) one
all-reduce of ``Σ p_k g_k`` (N floats) and of ``Σ p_k`` gives every rank ``ḡ``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..client import Cohort
from .base import Algorithm, Round


class FedGA(Algorithm):
    hyperparameters = {"beta": "fedga_beta"}
    #: local SGD steps (None: the configured local epochs / steps)
    local_steps: int | None = None

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta
        self._mean: Tensor | None = None  # this round's ḡ
        self._kept: Tensor | None = None  # the one cohort's g_k, [C, N]

    def begin_round(self, rnd: Round) -> None:
        super().begin_round(rnd)
        mean = torch.zeros_like(rnd.server.params)
        total = 0.0
        for ids in rnd.chunks:
            cohort = rnd.cohort(ids)
            grads = rnd.trainer.full_gradient(cohort)
            weights = torch.tensor(self.weights(cohort), device=mean.device)
            mean.addmv_(grads.t(), weights)  # Σ p_k g_k
            total += float(weights.sum())
            if len(rnd.chunks) == 1:
                self._kept = grads.clone()
        total_t = torch.tensor(total, dtype=torch.float64, device=mean.device)
        rnd.server.comm.all_reduce_(mean)  # Σ p_k g_k and Σ p_k over every rank's clients
        self._mean = mean.div_(float(rnd.server.comm.all_reduce_(total_t)))

    def local_train(self, rnd: Round, cohort: Cohort) -> Tensor:
        grads = self._kept if self._kept is not None else rnd.trainer.full_gradient(cohort).clone()
        self._kept = None
        cohort.params.sub_(grads.neg_().add_(self._mean), alpha=self.beta)  # y_k = w − β (ḡ − g_k)
        return rnd.trainer.train(cohort, steps=self.local_steps)

    def communication(self, num_params: int) -> tuple[int, int]:
        """``w`` and ``ḡ`` down, ``g_k`` and ``y_k − w`` up."""
        return 2 * num_params, 2 * num_params
