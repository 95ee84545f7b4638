"""FedPVR (Li et al., CVPR 2023; official code ``lyn1874/fedpvr``): partial variance reduction.

SCAFFOLD's control variates on the final layers only: the parameters from ``start_layer``
(``fedpvr_start_layer``) on, in ``named_parameters()`` order (default ``classifier.weight``,
the last linear layer of every fedsim model), get SCAFFOLD's option-II correction; the others
have ``c = c_k = 0`` and plain SGD. Since the flat buffer follows ``named_parameters()``, that
is the tail of the buffer from ``layout.offset_of(start_layer)``: only that part of ``c`` and
``c_k`` is kept and exchanged, so a round costs ``N + M`` floats each way for ``M`` corrected
parameters (a little above FedAvg's ``N``). The server takes the unweighted mean of the client
models.
"""
from __future__ import annotations

from gma_kernels import FlatLayout

from .scaffold import Scaffold


class FedPVR(Scaffold):
    equal_weights = True
    hyperparameters = {"num_clients": "num_clients", "start_layer": "fedpvr_start_layer"}

    def __init__(self, num_clients: int, start_layer: str) -> None:
        super().__init__(num_clients)
        self.start_layer = start_layer

    def correction_start(self, layout: FlatLayout) -> int:
        try:
            return layout.offset_of(self.start_layer)
        except KeyError as err:
            raise ValueError(f"fedpvr_start_layer: {err.args[0]}") from None
