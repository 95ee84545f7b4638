"""gma-kernels: fused gradient masked averaging (FedGMA) for federated learning."""
from .api import agreement, gma_step, masked_mean
from .config import MaskConfig, NonFiniteError, StepConfig, tau_from_agreeing_fraction
from .engine import GMAStats
from .flat import FlatLayout, FlatParams, flatten, unflatten
from .optim import ServerOptimizer
from .streaming import Accumulator

__all__ = ["agreement", "masked_mean", "gma_step", "ServerOptimizer", "Accumulator",
           "FlatParams", "FlatLayout", "flatten", "unflatten", "MaskConfig", "StepConfig",
           "GMAStats", "NonFiniteError", "tau_from_agreeing_fraction"]
__version__ = "0.1.0"
