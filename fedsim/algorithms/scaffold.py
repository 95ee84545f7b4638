"""SCAFFOLD (Karimireddy et al. 2020), option II, with control variates that persist across rounds.

Client ``k`` holds ``c_k`` (zero until it first takes part); the server holds ``c`` (zero at the
start). A sampled client downloads ``w`` and ``c``, runs ``K_s`` local steps
``y ← y − η_l (∇f_k(y) − c_k + c)`` (the correction ``c − c_k`` enters through the gradient
hook: one ``[C, M]`` matrix for the cohort, the clients' ``c_k`` gathered as rows), then sets
``c_k⁺ = c_k − c + (w − y) / (K_s η_l)`` and uploads ``Δy = y − w`` and ``Δc = c_k⁺ − c_k``.
The server steps ``w ← w + η_g mean(Δy)`` through its ``ServerOptimizer`` (GMA when masked;
the mean is unweighted, as in the paper) and sets ``c ← c + (|S| / N) mean(Δc)`` (a plain
mean, never masked), so ``c`` stays the mean of all ``N`` clients' ``c_k``
(``num_clients``).

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

from ..client import Cohort
from .base import Algorithm, Round

if TYPE_CHECKING:
    from ..server import Server


class Scaffold(Algorithm):
    equal_weights = True
    hyperparameters = {"num_clients": "num_clients"}

    def __init__(self, num_clients: int) -> None:
        super().__init__()
        self.num_clients = num_clients

    def correction_start(self, layout: FlatLayout) -> int:
        """First flat index that gets the control-variate correction (all of them here)."""
        return 0

    def setup(self, server: Server) -> None:
        self.start = self.correction_start(server.flat.layout)
        self.c = torch.zeros_like(server.params[self.start:])  # the server control variate

    def _client_variates(self, ids: list[int]) -> Tensor:
        """``c_k`` of clients ``ids`` as rows (0 for a client never seen)."""
        zero = torch.zeros_like(self.c)
        return torch.stack([self.client_state.get(k, {}).get("c", zero) for k in ids])

    def begin_round(self, rnd: Round) -> None:
        super().begin_round(rnd)
        self._ids: list[int] = []
        self._new: list[Tensor] = []

    def local_train(self, rnd: Round, cohort: Cohort) -> Tensor:
        start = self.start
        self._c_k = self._client_variates(cohort.ids)  # this cohort's c_k, [C, M]
        correction = self.c - self._c_k

        def corrected(grads: Tensor, params: Tensor, rows: slice) -> None:
            grads[:, start:].add_(correction[rows])

        return rnd.trainer.train(cohort, corrected)

    def collect(self, rnd: Round, cohort: Cohort) -> None:
        updates = cohort.updates()
        scale = torch.tensor(cohort.steps, dtype=self.c.dtype, device=self.c.device)
        scale = scale.mul_(-rnd.trainer.lr)[:, None]  # −K_s η_l: (w − y)/(K_s η_l) = Δy/scale
        c_new = updates[:, self.start:] / scale
        c_new.sub_(self.c).add_(self._c_k)  # c_k⁺ = c_k − c + (w − y)/(K_s η_l)
        self._ids += cohort.ids
        # c_k⁺ travels instead of Δc: end_round forms Δc where c_k is kept; one row each, so
        # a stored c_k does not hold its cohort's whole matrix
        self._new += [row.clone() for row in c_new]
        rnd.updates.add(updates, self.weights(cohort))

    def end_round(self, rnd: Round) -> GMAStats:
        stats = rnd.updates.step()
        comm = rnd.server.comm
        ids = comm.gather([torch.tensor(k, device=self.c.device) for k in self._ids],
                          like=torch.zeros((), dtype=torch.int64, device=self.c.device))
        new = comm.gather(self._new, like=self.c)
        self.c.add_(self.commit_control_variates([int(k) for k in ids], new),
                    alpha=1.0 / self.num_clients)  # (|S|/N) · mean(Δc)
        self._ids, self._new = [], []
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
                             f"this {type(self).__name__} corrects {self.c.numel()}")
        self.c.copy_(state["c"])
