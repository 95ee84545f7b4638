"""Where a synchronized ``gma_step(backend="triton")`` call's host time goes, piece by piece, on
a case so small (N = 4096) that the GPU's own work is nil: the front's checks (configs, batch,
params, job), the row table, the backend's pass (row table and launch, with the guard's sync
or without the guard), and the whole call with and without the guard. The pieces are the
library's own internals, called as the call calls them; each is the best of 5 repeats of 300
calls, in µs. It tells which part a leaner
path must cut (the per-call target at N = 2^24 leaves a few tens of µs for all of it).

    python benchmarks/host_breakdown_gpu.py --out benchmarks/results/gpu/host-breakdown.json
    TRITON_INTERPRET=1 python benchmarks/host_breakdown_gpu.py --device cpu --calls 3 \\
        --out /tmp/host.json   # smoke test: the interpreter's times mean nothing
"""
from __future__ import annotations

import argparse
import json
import timeit

import torch

import gma_kernels as gk
from gma_kernels import MaskConfig, StepConfig
from gma_kernels.backends import triton_kernel as _triton
from gma_kernels.batch import check_params, make_batch
from gma_kernels.job import Job


def best_us(fn, calls: int, sync) -> float:
    """Best of 5 repeats of ``calls`` calls of ``fn``, the device synchronized after each
    repeat, in µs per call."""
    fn()
    sync()

    def repeat() -> None:
        for _ in range(calls):
            fn()
        sync()

    return min(timeit.repeat(repeat, number=1, repeat=5)) / calls * 1e6


def breakdown(device: torch.device, k: int, calls: int) -> dict[str, float]:
    n = 4096
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    updates = torch.randn(k, n, device=device) * 0.01
    params = torch.zeros(n, device=device)
    weights = [1.0] * k

    def front() -> Job:
        mask, step = MaskConfig(0.4, "soft", False, False), StepConfig("sgd", lr=1.0)
        batch = make_batch(updates, weights)
        check_params(params, batch)
        return Job(batch, mask, step, params)

    job = front()
    agree = (1.0,) * k
    flag = _triton._row_table(job.batch, job.batch.mean_weights, agree)[-1]
    unguarded = Job(job.batch, job.mask, job.step, params, guard=False)
    return {
        "front (configs, batch, params, job)": best_us(front, calls, sync),
        "row table (cached)": best_us(
            lambda: _triton._row_table(job.batch, job.batch.mean_weights, agree), calls, sync),
        "backend pass, no guard (async)": best_us(lambda: _triton.run(unguarded), calls, sync),
        "backend pass with guard (its sync included)": best_us(lambda: _triton.run(job), calls,
                                                               sync),
        "flag.item() alone (a sync)": best_us(lambda: flag.item(), calls, sync),
        "gma_step, unchecked": best_us(
            lambda: gk.gma_step(params, updates, weights, backend="triton",
                                nonfinite="unchecked"), calls, sync),
        "gma_step, default guard": best_us(
            lambda: gk.gma_step(params, updates, weights, backend="triton"), calls, sync),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--calls", type=int, default=300, help="calls per repeat")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    report = {"device": name, "torch": torch.__version__,
              "triton": __import__("triton").__version__, "us_per_call": {}}
    for k in (8, 64):
        report["us_per_call"][f"K={k}"] = row = breakdown(device, k, args.calls)
        print(f"K={k}", json.dumps({key: round(v, 1) for key, v in row.items()}), flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
