"""FedProx (Li et al. 2020): FedAvg whose clients minimise ``F_k(y) + (μ/2)‖y − w‖²``.

The proximal term enters through the trainer's gradient hook, ``G += μ (P − w)`` before each
local step (every client's row at once); uploads and aggregation are FedAvg's. ``μ = 0`` is
FedAvg exactly (the hook is skipped).
"""
from __future__ import annotations

from torch import Tensor

from ..client import Cohort
from .base import Algorithm, Round


class FedProx(Algorithm):
    hyperparameters = {"mu": "fedprox_mu"}

    def __init__(self, mu: float) -> None:
        super().__init__()
        self.mu = mu

    def local_train(self, rnd: Round, cohort: Cohort) -> Tensor:
        mu, w = self.mu, cohort.global_params

        def proximal(grads: Tensor, params: Tensor, rows: slice) -> None:
            grads.add_(params, alpha=mu).sub_(w, alpha=mu)

        return rnd.trainer.train(cohort, proximal if mu else None)
