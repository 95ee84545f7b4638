"""The server: the global model as one flat buffer, stepped in place by ``gma_kernels``, and
the round's aggregations (the clients' uploads folded in as their cohorts finish)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from gma_kernels import (Accumulator, FlatParams, GMAStats, MaskConfig, ServerOptimizer, StepConfig,
                         masked_mean)

from .config import Config
from .distributed import Collective


class Server:
    """Holds the global model, whose parameters are views into ``params`` (one flat float32
    buffer), and a ``ServerOptimizer`` on that buffer. ``masked=False`` aggregates with
    ``τ = 0``: exactly weighted FedAvg through the same kernel. ``optimizer`` names the server
    optimizer kind (default: the configured one); its learning rate is
    ``config.server_lr_for(kind, masked)``. ``comm``: the ranks that share the clients (default: one
    process); every rank holds a replica of the server and steps it identically."""

    def __init__(self, model: nn.Module, config: Config, *, masked: bool,
                 optimizer: str | None = None, comm: Collective | None = None) -> None:
        self.model = model
        self.comm = comm or Collective()
        self.flat = FlatParams(model)
        kind = optimizer or config.server_optimizer
        self.mask = MaskConfig(config.gma_tau if masked else 0.0, config.gma_mask,
                               config.gma_weighted_agreement, masked and config.gma_rescale)
        self.weight_decay = config.server_weight_decay
        step = StepConfig(kind, config.server_lr_for(kind, masked), config.server_momentum,
                          config.server_beta1, config.server_beta2, config.server_eps,
                          config.gma_mask_placement,
                          config.server_bias_correction and kind == "adam")
        # with weight decay the mask is applied before the optimizer sees g (Aggregation.step)
        self.optimizer = ServerOptimizer.from_configs(
            self.flat.buffer, step, MaskConfig(0.0) if self.weight_decay else self.mask)

    @property
    def params(self) -> Tensor:
        """The global parameters ``w`` (the flat buffer itself, not a copy)."""
        return self.flat.buffer

    def aggregation(self, chunks: int, mask: MaskConfig | None = None) -> Aggregation:
        """An empty aggregation for a round whose clients come in ``chunks`` cohorts on this
        rank; ``mask``: the mask of ``Aggregation.masked_mean`` (default: the method's,
        ``self.mask``)."""
        return Aggregation(self, streaming=chunks != 1 or self.comm.distributed,
                           mask=mask or self.mask)

    def state_dict(self) -> dict:
        return {"params": self.params.clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.flat.copy_(state["params"])
        self.optimizer.load_state_dict(state["optimizer"])


class Aggregation:
    """A round's uploads of one kind (model updates, last gradients), added cohort by cohort.

    One cohort in one process: its ``[C, N]`` matrix goes to ``gma_kernels`` as it is (the
    batch kernel, read in place). Otherwise (several cohorts, or several ranks) each cohort is
    folded into a streaming ``Accumulator`` as it finishes, and the ranks' accumulators are
    summed (one all-reduce) when the round ends: the batch result to float32 summation order,
    with the identical unweighted mask, in ``2N + 2`` floats of memory."""

    def __init__(self, server: Server, *, streaming: bool, mask: MaskConfig) -> None:
        self.server, self.mask = server, mask
        self._batch: tuple[Tensor | Sequence[Tensor], list[float]] | None = None
        self._acc: Accumulator | None = None
        if streaming:
            opt = server.optimizer
            self._acc = Accumulator(server.params.numel(), device=server.params.device,
                                    weighted_agreement=mask.weighted_agreement,
                                    backend=opt.backend, nonfinite=opt.nonfinite)

    def add(self, rows: Tensor | Sequence[Tensor], weights: Sequence[float]) -> None:
        """Fold in a cohort's rows (``[C, N]``, or C 1-D tensors) with their weights."""
        weights = [float(w) for w in weights]
        if self._acc is None:
            if self._batch is not None:
                raise RuntimeError("a one-cohort aggregation takes one cohort")
            self._batch = (rows, weights)
        elif len(weights):
            self._acc.add(rows, weights)

    def _reduced(self) -> Accumulator:
        return self.server.comm.reduce_accumulator(self._acc)

    def step(self) -> GMAStats:
        """Step the server optimizer with the aggregate (every rank the same step). With the
        server's ``weight_decay`` λ the optimizer steps on ``g = m ⊙ Σ p̄_k Δ_k − λ w``: L2
        on every coordinate, masked or not, as ``torch.optim.Adam``'s ``weight_decay`` adds
        it to a masked gradient."""
        if self.server.weight_decay:
            g, stats = self.masked_mean()
            g.add_(self.server.params, alpha=-self.server.weight_decay)
            self.server.optimizer.step(g[None], [1.0])
            return stats
        if self._acc is None:
            return self.server.optimizer.step(*self._batch)
        return self.server.optimizer.step_accumulated(self._reduced())

    def masked_mean(self) -> tuple[Tensor, GMAStats]:
        """``m ⊙ Σ p̄_k x_k`` with this aggregation's mask, and its stats."""
        if self._acc is None:
            rows, weights = self._batch
            return masked_mean(rows, weights, tau=self.mask.tau, mask=self.mask.mask,
                               weighted_agreement=self.mask.weighted_agreement,
                               rescale=self.mask.rescale, return_stats=True)
        mean, m, stats = self._reduced().finalize(self.mask)
        return mean.mul_(m), stats

