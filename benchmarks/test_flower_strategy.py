"""Flower strategies: our ``GMAFedAvg`` (and ``GMAFedAdam``) ``aggregate_train`` against Flower's
own ``FedAvg`` (and ``FedAdam``) ``aggregate_train`` on the same 16 replies of a ~4.2M-parameter
model (five float32 arrays), as a Flower ServerApp receives them: ``Message`` objects whose
``ArrayRecord`` holds serialized ``.npy`` bytes.

The timed call is ``aggregate_train`` alone: reply validation, reading the arrays, aggregation,
the server step and building the returned ``ArrayRecord``. The GMA strategies also read the
global arrays once per round in ``configure_train`` (``set_global_arrays``), timed as its own
contender; Flower's FedAdam deserializes them there too (``current_arrays``). Two more
contenders split ``GMAFedAvg``'s call into its unavoidable parts: ``fedgma.read_updates`` (the
replies' bytes read into one ``[K, N]`` float32 matrix of updates) and ``gma_step`` (the bare
library call on that matrix).

Run: ``pytest benchmarks/test_flower_strategy.py --benchmark-only``. Skipped without Flower.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
try:
    from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAdam, FedAvg
except ImportError as err:
    pytest.skip(f"Flower's Message API strategies are missing: {err}", allow_module_level=True)

import _harness  # noqa: E402
import gma_kernels as gk  # noqa: E402
from gma_kernels.integrations.flower import GMAFedAdam, GMAFedAvg  # noqa: E402

K = 16
SHAPES = {"embed.weight": (2048, 1024), "fc1.weight": (1024, 1536), "fc1.bias": (1536,),
          "fc2.weight": (512, 1000), "fc2.bias": (1000,)}
N = sum(math.prod(s) for s in SHAPES.values())   # 4,184,552
ROUNDS = 5


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


CONTENDERS = {
    # name: (factory(device) -> strategy, device-dependent)
    "flower_fedavg": (lambda device: FedAvg(), False),
    "fedgma": (lambda device: GMAFedAvg(gma_tau=0.4, device=device), True),
    "fedgma[streaming]": (lambda device: GMAFedAvg(gma_tau=0.4, device=device, streaming=True),
                          True),
    "flower_fedadam": (lambda device: FedAdam(), False),
    "gma_fedadam": (lambda device: GMAFedAdam(gma_tau=0.4, device=device), True),
    "fedgma.set_global_arrays": (lambda device: GMAFedAvg(gma_tau=0.4, device=device), True),
    "fedgma.read_updates": (lambda device: GMAFedAvg(gma_tau=0.4, device=device), True),
    "gma_step": (lambda device: GMAFedAvg(gma_tau=0.4, device=device), True),
}


@pytest.fixture(scope="module")
def inputs():
    """The global model and 16 replies (built once: ~270 MB of serialized arrays)."""
    rng = np.random.default_rng(0)
    model = {k: rng.standard_normal(s, dtype=np.float32) for k, s in SHAPES.items()}
    replies = []
    for k in range(K):
        arrays = {key: v + np.float32(0.01) * rng.standard_normal(v.shape, dtype=np.float32)
                  for key, v in model.items()}
        content = RecordDict({
            "arrays": ArrayRecord({key: Array(v) for key, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": int(rng.integers(50, 500)),
                                     "train_loss": float(rng.random())})})
        metadata = Metadata(1, "", 100 + k, 0, "", "1", 0.0, 3600.0, MessageType.TRAIN)
        replies.append(Message(content, metadata=metadata))
    return ArrayRecord({key: Array(v) for key, v in model.items()}), replies


def _params():
    params = []
    for device in _devices():
        for name, (_, on_device) in CONTENDERS.items():
            if device != "cpu" and not on_device:
                continue  # Flower aggregates with NumPy on the host: one CPU entry
            params.append(pytest.param(device, name, id=f"{device}-{name}"))
    return params


@pytest.mark.parametrize(("device", "name"), _params())
def test_flower_aggregate_train(benchmark, inputs, device, name, machine):
    global_arrays, replies = inputs
    factory, _ = CONTENDERS[name]
    strategy = factory(device)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)   # Flower logs every reply; keep the timing clean
    try:
        if hasattr(strategy, "set_global_arrays"):   # what configure_train does
            strategy.set_global_arrays(global_arrays)
        elif isinstance(strategy, FedAdam):          # what FedOpt.configure_train does
            strategy.current_arrays = {k: a.numpy() for k, a in global_arrays.items()}
        records = [next(iter(m.content.array_records.values())) for m in replies]
        nodes = [m.metadata.src_node_id for m in replies]
        if name.endswith("set_global_arrays"):
            def fn():
                strategy.set_global_arrays(global_arrays)
        elif name.endswith("read_updates"):
            def fn():
                strategy._read_updates(records, nodes)
        elif name == "gma_step":
            updates = strategy._read_updates(records, nodes).clone()
            weights = [float(m.content["metrics"]["num-examples"]) for m in replies]
            params = torch.zeros(N, device=device)

            def fn():
                gk.gma_step(params, updates, weights, tau=0.4)
        else:
            def fn():
                arrays, metrics = strategy.aggregate_train(1, replies)
                assert arrays is not None and "train_loss" in metrics
        target = fn
        if device == "cuda":
            def target():
                fn()
                torch.cuda.synchronize()
        benchmark.group = f"flower aggregate_train|{device}|K={K}|N={N}"
        benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    finally:
        flwr_logger.setLevel(level)
    info = benchmark.extra_info
    info.update(strategy=name, device=device, K=K, N=N, arrays=len(SHAPES),
                device_name=_harness.device_name(torch.device(device)), **machine)
    stats = getattr(benchmark.stats, "stats", None) if benchmark.stats else None
    if stats is not None:
        info.update(median_s=stats.median, min_s=stats.min, mean_s=stats.mean)
