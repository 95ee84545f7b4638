"""FedAvg (McMahan et al. 2017): local SGD, weighted averaging of the updates."""
from __future__ import annotations

from .base import Algorithm


class FedAvg(Algorithm):
    name = "fedavg"
