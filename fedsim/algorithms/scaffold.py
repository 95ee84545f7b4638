"""SCAFFOLD (Karimireddy et al. 2020), option II, with control variates that persist across rounds.

Client ``k`` holds ``c_k`` (zero until it first takes part); the server holds ``c`` (zero at the
start). A sampled client downloads ``w`` and ``c``, runs ``K_s`` local steps
``y ← y − η_l (∇f_k(y) − c_k + c)`` (the correction ``c − c_k`` enters through the gradient
hook), then sets ``c_k⁺ = c_k − c + (w − y) / (K_s η_l)`` and uploads ``Δy = y − w`` and
``Δc = c_k⁺ − c_k``. The server steps ``w ← w + η_g mean(Δy)`` through its ``ServerOptimizer``
(GMA when masked; the mean is unweighted, as in the paper) and sets
``c ← c + (|S| / N) mean(Δc)`` (a plain mean, never masked), so ``c`` stays the mean of all
``N`` clients' ``c_k``.

Across ranks (``fedsim.distributed``) every rank keeps every client's ``c_k``, since a client
trained on one rank this round may be trained on another later: after local training the ranks
all-gather the new ``c_k⁺`` of the round's clients (``|S|`` rows of the corrected size; the
same volume as the clients' ``Δc`` uploads), and every rank computes ``Δc = c_k⁺ − c_k`` and
the sum over the clients in the sampled order from its own copies. So ``c`` and every ``c_k``
are bit-identical on all ranks, and to a one-process run given the same trained clients.

``FedPVR`` reuses all of this with the correction restricted to a tail of the flat buffer:
``correction_start`` is the first corrected index (0 here: every parameter).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gma_kernels import FlatLayout, GMAStats

from .base import Algorithm, ClientContext, ClientResult

if TYPE_CHECKING:
    from ..server import Server


class Scaffold(Algorithm):
    name = "scaffold"
    equal_weights = True

    def correction_start(self, layout: FlatLayout) -> int:
        """First flat index that gets the control-variate correction (all of them here)."""
        return 0

    def setup(self, server: Server) -> None:
        self.start = self.correction_start(server.flat.layout)
        self.c = torch.zeros_like(server.params[self.start:])  # the server control variate

    def local_train(self, ctx: ClientContext) -> ClientResult:
        start, c = self.start, self.c
        c_k = self.client_state.get(ctx.client_id, {}).get("c")
        correction = c.clone() if c_k is None else c - c_k  # c − c_k, with c_k = 0 if never seen
        steps = 0

        def corrected(grad: Tensor) -> None:
            nonlocal steps
            grad[start:].add_(correction)
            steps += 1

        loss = ctx.train(corrected)
        drift = ctx.global_params[start:] - ctx.trainer.params[start:]  # w − y
        c_new = drift.div_(steps * ctx.trainer.lr).sub_(c)  # c_k⁺ = c_k − c + (w − y)/(K_s η_l)
        if c_k is not None:
            c_new.add_(c_k)
        # c_k⁺ travels instead of Δc = c_k⁺ − c_k: aggregate forms Δc where c_k is kept
        return ClientResult(ctx.client_id, ctx.update(), self.client_weight(ctx), loss,
                            {"c": c_new})

    def aggregate(self, server: Server, results: list[ClientResult]) -> GMAStats:
        stats = server.step([r.update for r in results], [r.weight for r in results])
        comm = server.comm
        ids = comm.gather([torch.tensor(r.client_id, device=self.c.device) for r in results],
                          like=torch.zeros((), dtype=torch.int64, device=self.c.device))
        new = comm.gather([r.extras["c"] for r in results], like=self.c)
        self.c.add_(self.commit_control_variates([int(k) for k in ids], new),
                    alpha=1.0 / self.config.num_clients)  # (|S|/N) · mean(Δc)
        return stats

    def commit_control_variates(self, client_ids: list[int], new: list[Tensor]) -> Tensor:
        """Store the round's new ``c_k⁺`` (every sampled client, in the sampled order) and
        return ``Σ_k Δc_k``, ``Δc_k = c_k⁺ − c_k`` (``c_k⁺`` for a first-timer)."""
        total = torch.zeros_like(self.c)
        for k, c_new in zip(client_ids, new):
            c_k = self.client_state.get(k, {}).get("c")
            total.add_(c_new if c_k is None else c_new - c_k)
            self.client_state[k] = {"c": c_new}
        return total

    def communication(self, num_params: int) -> tuple[int, int]:
        """``w`` and ``c`` down, ``Δy`` and ``Δc`` up (``c`` covers the corrected part only)."""
        corrected = num_params - self.start
        return num_params + corrected, num_params + corrected

    def state_dict(self) -> dict:
        return {**super().state_dict(), "c": self.c.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = self.c.device  # checkpoints load on the CPU
        self.client_state = {k: {n: t.to(device) for n, t in v.items()}
                             for k, v in self.client_state.items()}
        if state["c"].shape != self.c.shape:
            raise ValueError(f"saved control variate has {state['c'].numel()} elements, "
                             f"this {self.name} corrects {self.c.numel()}")
        self.c.copy_(state["c"])
