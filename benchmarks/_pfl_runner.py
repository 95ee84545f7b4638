"""FedAvg with Apple's pfl-research simulator (PyTorch backend, CPU), for the simulator benchmark.

Caveats of pfl 0.6 that the timing includes and that cannot be switched off through the public API:
* Round 0 always runs pfl's local evaluation (one full-batch forward pass before and one after local
  training, per client), since ``iteration % evaluation_frequency == 0`` at iteration 0.
* Each round pfl assembles a ``Metrics`` object and runs its ``asyncio`` event loop around the backend.
* Local batches come in the same order every epoch and every round: pfl's ``Dataset.iter`` does not
  shuffle (the last batch may be smaller).
* Importing ``pfl.model.pytorch`` sets torch's multiprocessing start method to 'forkserver'.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import pfl
from pfl.aggregate.simulate import SimulatedBackend
from pfl.aggregate.weighting import WeightByDatapoints
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.pytorch import PyTorchTensorDataset
from pfl.hyperparam import NNTrainHyperParams
from pfl.metrics import Weighted
from pfl.model.pytorch import PyTorchModel


class _Classifier(torch.nn.Module):
    """Wraps a torch module with the ``loss``/``metrics`` methods pfl's ``PyTorchModel`` requires."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.train()
        return F.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Weighted]:
        self.eval()
        logits = self(x)
        n = len(y)
        return {"loss": Weighted(F.cross_entropy(logits, y, reduction="sum").item(), n),
                "accuracy": Weighted((logits.argmax(1) == y).sum().item(), n)}


class _RoundSampler:
    """pfl user sampler (``() -> user_id``): uniform without replacement within each round.

    pfl calls it ``clients_per_round`` times per round; the ids of one round are drawn at once."""

    def __init__(self, num_users: int, per_round: int, seed: int):
        self._n, self._k = num_users, per_round
        self._rng = np.random.RandomState(seed)
        self._buf: list[int] = []

    def __call__(self) -> int:
        if not self._buf:
            self._buf = self._rng.choice(self._n, self._k, replace=False).tolist()
        return self._buf.pop()


def run_pfl(clients: list[tuple[torch.Tensor, torch.Tensor]], make_model: Callable[[], torch.nn.Module],
            *, rounds: int, clients_per_round: int, lr: float, batch_size: int, local_epochs: int,
            test: tuple[torch.Tensor, torch.Tensor], seed: int = 0) -> dict:
    """FedAvg in pfl-research: ``clients[k] = (x_k float32 [n_k, C, H, W], y_k int64 [n_k])``.

    Each round samples ``clients_per_round`` clients uniformly without replacement; each runs
    ``local_epochs`` epochs of plain SGD (lr ``lr``, batch ``batch_size``, mean cross-entropy) from the
    global model; the server averages the model updates weighted by client size
    (``WeightByDatapoints``) and applies them with SGD at lr 1.0. No DP, no evaluation callbacks.
    ``seed`` seeds numpy's global RNG (pfl's internal RNGs are drawn from it), torch (before
    ``make_model()``) and the client sampler. Runs on CPU (forces ``PFL_PYTORCH_DEVICE=cpu`` during
    the call); torch's thread count is left alone.

    Returns ``{"seconds": wall time of ``FederatedAveraging.run`` only (all pfl objects are built
    before the clock starts), "test_acc": accuracy of the final global model on ``test``,
    "pfl_version": pfl.__version__}``.
    """
    old_device = os.environ.get("PFL_PYTORCH_DEVICE")
    os.environ["PFL_PYTORCH_DEVICE"] = "cpu"
    try:
        np.random.seed(seed)
        torch.manual_seed(seed)
        net = _Classifier(make_model())
        model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,  # SGD(params, lr=...)
                             central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))

        datasets = [PyTorchTensorDataset((x, y), user_id=str(k)) for k, (x, y) in enumerate(clients)]
        fed_data = FederatedDataset(make_dataset_fn=datasets.__getitem__,
                                    user_sampler=_RoundSampler(len(clients), clients_per_round, seed))
        # val_data is never sampled (val_cohort_size=None).
        backend = SimulatedBackend(training_data=fed_data, val_data=fed_data,
                                   postprocessors=[WeightByDatapoints()])
        algorithm_params = NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=rounds + 1,
                                             train_cohort_size=clients_per_round, val_cohort_size=None)
        train_params = NNTrainHyperParams(local_num_epochs=local_epochs, local_learning_rate=lr,
                                          local_batch_size=batch_size)
        algorithm = FederatedAveraging()

        start = time.perf_counter()
        algorithm.run(algorithm_params=algorithm_params, backend=backend, model=model,
                      model_train_params=train_params, callbacks=[], send_metrics_to_platform=False)
        seconds = time.perf_counter() - start

        net.eval()
        with torch.no_grad():
            x_test, y_test = test
            acc = (net(x_test).argmax(1) == y_test).float().mean().item()
    finally:
        if old_device is None:
            os.environ.pop("PFL_PYTORCH_DEVICE", None)
        else:
            os.environ["PFL_PYTORCH_DEVICE"] = old_device
    return {"seconds": seconds, "test_acc": acc, "pfl_version": pfl.__version__}
