"""FedAvg (McMahan et al. 2017): local SGD, weighted averaging of the updates."""
from __future__ import annotations

from .base import Algorithm


class FedAvg(Algorithm):
    """The base behaviour, as is (``Algorithm``); also the client side of FedAvgM, FedAdam,
    FedYogi and FedAdagrad, whose names fix the server optimizer (``fedsim.methods``)."""
