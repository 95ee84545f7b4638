"""IRMv1 (Arjovsky et al. 2019, "Invariant Risk Minimization") as a client algorithm: each
client is one environment and adds its own IRMv1 penalty to its loss.

Client k's loss on a batch, with ``L_k(s) = Σ_i w_i CE(s z_i, y_i)`` (logits ``z_i``, example
weights ``w_i``)::

    pen_k = (∂L_k/∂s at s = 1)²,   ∂L_k/∂s|_{s=1} = Σ_i w_i (softmax(z_i) − onehot(y_i)) · z_i
    loss_k = (L_k(1) + λ_t pen_k + (ε/2)‖w‖²) / max(λ_t, 1)

(the closed form needs no double backward), ``λ_t = 1`` before round ``penalty_anneal_rounds``
(rounds counted from 0; with one local step per round a round is a step) and
``penalty_weight`` from it on; ``ε`` is the trainer's ``weight_decay`` (the paper's
``l2 Σ‖w‖²`` is ``weight_decay = 2 l2``), divided with the rest. With one full-batch local step
of lr 1, equal clients and full participation, the server's mean update is minus the gradient
of the paper's objective ``mean_k L_k + l2‖w‖² + λ_t mean_k pen_k`` (over ``max(λ_t, 1)``):
FedSGD with server Adam is centralized IRMv1.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..client import Cohort, LossFn, weighted_cross_entropy
from .base import Algorithm, Round


def irm_loss(penalty_weight: float, scale: float) -> LossFn:
    """``(L_k + penalty_weight · pen_k) / scale`` per client (``LossFn``)."""

    def loss(logits: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        residual = logits.softmax(-1) - F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
        slope = (weight[..., None] * residual * logits).sum((1, 2))  # ∂L_k/∂s at s = 1
        return (weighted_cross_entropy(logits, labels, weight) + penalty_weight * slope ** 2) / scale

    return loss


class IRM(Algorithm):
    hyperparameters = {"penalty_weight": "irm_penalty_weight",
                       "anneal_rounds": "irm_anneal_rounds"}

    def __init__(self, penalty_weight: float, anneal_rounds: int) -> None:
        super().__init__()
        self.penalty_weight, self.anneal_rounds = penalty_weight, anneal_rounds

    def weight_at(self, round_: int) -> float:
        """``λ_t`` of round ``round_`` (counted from 1, as ``Round.number``)."""
        return self.penalty_weight if round_ - 1 >= self.anneal_rounds else 1.0

    def local_train(self, rnd: Round, cohort: Cohort) -> Tensor:
        weight = self.weight_at(rnd.number)
        scale = max(weight, 1.0)
        decay = rnd.trainer.weight_decay * (1.0 - 1.0 / scale)

        def rescale_decay(grads: Tensor, params: Tensor, rows: slice) -> None:
            grads.sub_(params, alpha=decay)  # the trainer's ε w, now ε w / scale

        hook = rescale_decay if decay else None
        return rnd.trainer.train(cohort, hook, loss=irm_loss(weight, scale))
