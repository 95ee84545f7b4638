"""Adaptive and momentum server optimizers (Hsu et al. 2019; Reddi et al. 2021, "Adaptive
Federated Optimization"): FedAvg's clients, the server's ``gma_kernels.ServerOptimizer`` of
kind momentum (FedAvgM), adam (FedAdam), yogi (FedYogi) or adagrad (FedAdagrad).

The algorithm name fixes the server optimizer for that method, so ``--compare fedavg,fedadam``
compares them on the same data; the learning rate is ``momentum_server_lr`` or
``adaptive_server_lr`` when set, else ``server_lr``. The other algorithms use
``server_optimizer`` (default sgd). With GMA (``fedadam+gma``) ``gma_placement`` decides
whether the optimizer sees the masked average (before) or the mask multiplies its step (after).
"""
from __future__ import annotations

from .fedavg import FedAvg


class FedAvgM(FedAvg):
    name = "fedavgm"
    server_optimizer = "momentum"


class FedAdam(FedAvg):
    name = "fedadam"
    server_optimizer = "adam"


class FedYogi(FedAvg):
    name = "fedyogi"
    server_optimizer = "yogi"


class FedAdagrad(FedAvg):
    name = "fedadagrad"
    server_optimizer = "adagrad"
