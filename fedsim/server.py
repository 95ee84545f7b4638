"""The server: the global model as one flat buffer, stepped in place by ``gma_kernels``."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from gma_kernels import Accumulator, FlatParams, GMAStats, ServerOptimizer

from .config import Config
from .distributed import Collective


class Server:
    """Holds the global model, whose parameters are views into ``params`` (one flat float32
    buffer), and a ``ServerOptimizer`` on that buffer. ``masked=False`` aggregates with
    ``τ = 0``: exactly weighted FedAvg through the same kernel. ``optimizer`` names the server
    optimizer kind (default: the configured one); its learning rate is
    ``config.server_lr_for(kind)``. ``comm``: the ranks that share the clients (default: one
    process); every rank holds a replica of the server and steps it identically."""

    def __init__(self, model: nn.Module, config: Config, *, masked: bool,
                 optimizer: str | None = None, comm: Collective | None = None) -> None:
        self.model = model
        self.comm = comm or Collective()
        self.flat = FlatParams(model)
        kind = optimizer or config.server_optimizer
        self.optimizer = ServerOptimizer(
            self.flat.buffer, kind, lr=config.server_lr_for(kind),
            momentum=config.server_momentum, beta1=config.server_beta1,
            beta2=config.server_beta2, eps=config.server_eps, mask_placement=config.gma_placement,
            tau=config.gma_tau if masked else 0.0, mask=config.gma_mask,
            weighted_agreement=config.gma_weighted_agreement,
            rescale=masked and config.gma_rescale)

    @property
    def params(self) -> Tensor:
        """The global parameters ``w`` (the flat buffer itself, not a copy)."""
        return self.flat.buffer

    def step(self, updates: Sequence[Tensor], weights: Sequence[float]) -> GMAStats:
        """Aggregate the clients' flat updates (read where they lie) and step ``w`` in place.

        One process: the batch kernel over ``updates``. Across ranks, ``updates`` are this
        rank's clients': folded into an ``Accumulator``, summed over the ranks (one all-reduce)
        and stepped with ``step_accumulated``, the same step on every rank (equal to the batch
        path's to float32 summation order, with the identical unweighted mask)."""
        if not self.comm.distributed:
            return self.optimizer.step(updates, weights)
        return self.optimizer.step_accumulated(
            self.comm.accumulate(self.new_accumulator(), updates, weights))

    def new_accumulator(self) -> Accumulator:
        """An empty accumulator matching the server optimizer's mask and policies."""
        opt = self.optimizer
        return Accumulator(self.params.numel(), device=self.params.device,
                           weighted_agreement=opt.mask_config.weighted_agreement,
                           backend=opt.backend, nonfinite=opt.nonfinite)

    def state_dict(self) -> dict:
        return {"params": self.params.clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.flat.copy_(state["params"])
        self.optimizer.load_state_dict(state["optimizer"])
