"""Placeholder end-to-end benchmark: a short ``fedsim`` run (``python -m fedsim.run``) with
FedAvg and with FedGMA on the bundled colored digits, so that the cost of a whole round (local
training, aggregation through gma_kernels, evaluation) is tracked next to the kernels. It is
dominated by local training; the aggregation benchmarks are in test_aggregation.py."""
from __future__ import annotations

import pytest
import torch

run = pytest.importorskip("fedsim.run", reason="fedsim.run is not available")

SETTINGS = {"num_clients": 4, "clients_per_round": 4, "max_train": 240, "model": "mlp",
            "rounds": 3, "seeds": "0", "eval_every": 3, "batch_size": 16, "threads": 1}


@pytest.mark.parametrize("algorithm", ["fedavg", "fedgma"])
def test_fedsim_short_run(benchmark, algorithm, tmp_path, capsys):
    argv = ["--quiet", "--algorithms", algorithm, "--out-dir", str(tmp_path)]
    for key, value in SETTINGS.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    threads = torch.get_num_threads()     # fedsim sets the thread count for its run
    benchmark.group = "fedsim|colored-digits|mlp"
    try:
        summary = benchmark.pedantic(lambda: run.main(argv), rounds=3, warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    assert algorithm in summary
    benchmark.extra_info.update(fedsim_algorithm=algorithm, fedsim_settings=SETTINGS,
                                torch_version=torch.__version__)
    stats = getattr(benchmark.stats, "stats", None) if benchmark.stats else None
    if stats is not None:
        benchmark.extra_info["seconds_per_round"] = stats.median / SETTINGS["rounds"]
