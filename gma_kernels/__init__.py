"""gma-kernels: fused gradient masked averaging (FedGMA) for federated learning.

Layout: ``api`` (the three functions), ``optim`` (``ServerOptimizer``), ``streaming``
(``Accumulator``) and ``flat`` are the public entry points; ``config`` holds the public types;
``formula`` the formula's pieces; ``dispatch`` picks a backend in ``backends/`` (``torch_ops``,
``native``, ``triton_kernel``) and applies the non-finite policy; ``integrations/`` adapts
Flower, plain arrays and (``distributed``) torch.distributed.
"""
from .api import agreement, gma_step, masked_mean
from .config import GMAStats, MaskConfig, NonFiniteError, StepConfig, tau_from_agreeing_fraction
from .flat import FlatLayout, FlatParams, flatten, unflatten
from .optim import ServerOptimizer
from .streaming import Accumulator

__all__ = ["agreement", "masked_mean", "gma_step", "ServerOptimizer", "Accumulator",
           "FlatParams", "FlatLayout", "flatten", "unflatten", "MaskConfig", "StepConfig",
           "GMAStats", "NonFiniteError", "tau_from_agreeing_fraction"]
__version__ = "0.1.0"
