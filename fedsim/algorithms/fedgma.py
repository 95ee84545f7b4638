"""FedGMA (Tenison et al., "Gradient Masked Averaging for Federated Learning", TMLR 2023):
FedAvg's clients; the server masks the averaged update
coordinate-wise by the clients' sign agreement (soft or hard mask, threshold ``gma_tau``)."""
from __future__ import annotations

from .fedavg import FedAvg


class FedGMA(FedAvg):
    name = "fedgma"
    masked = True
