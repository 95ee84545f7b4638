"""A large model's updates folded into an ``Accumulator`` on one GPU, one client at a time.

The default is a model of 7·10^9 parameters with bfloat16 updates (the target: every fold at
least 80 % of the GPU's copy bandwidth, O(N) memory). Memory: the accumulator ``8N + 8`` bytes,
one update ``2N``, float32 params ``4N``, and the SGD step from the sums the params' backup
``4N`` more: 7·10^9 parameters need about 98 GB to fold and 112 GB at the step's peak.

Each client's update is drawn on the device from its own seeded generator into one reused
buffer; the fold (``Accumulator.add``, the non-finite screen included) is timed with the
device synchronized around it. Its traffic counts the update read once and the sums read and
written once (``2N + 16N`` bytes). Then ``ServerOptimizer.step_accumulated`` (SGD) is timed.
A sample of columns, the last ones (past 2^31 elements when N is that large) among them, is
checked against a float64 fold of the same values.

    python benchmarks/accumulator_gpu.py --out benchmarks/results/gpu/accumulator.json
    python benchmarks/accumulator_gpu.py --device cpu --numel 1e6 --out /tmp/acc.json  # smoke test
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import gma_kernels as gk


def synced(device: torch.device, fn) -> float:
    """Seconds of ``fn()`` with the device synchronized before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def copy_bandwidth(device: torch.device, numel: int) -> float:
    """GB/s of ``dst.copy_(src)`` (read and write counted), best of 5, on float32 buffers."""
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    best = min(synced(device, lambda: dst.copy_(src)) for _ in range(5))
    return 2 * 4 * numel / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--numel", type=float, default=7e9, help="parameters N")
    parser.add_argument("--clients", type=int, default=4, help="updates folded, one at a time")
    parser.add_argument("--sample", type=int, default=100_000, help="columns checked")
    parser.add_argument("--out", default="benchmarks/results/gpu/accumulator.json")
    args = parser.parse_args()
    device, n = torch.device(args.device), int(args.numel)
    need = 8 * n + 2 * n + 4 * n + 4 * n  # sums, one update, params, the step's backup
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > free:
            raise SystemExit(f"N = {n:.3g} needs about {need / 1e9:.0f} GB (8N sums + 2N update"
                             f" + 4N params + 4N backup); the GPU has {free / 1e9:.0f} GB free")
    bandwidth = copy_bandwidth(device, min(n, 1 << 28))
    acc = gk.Accumulator(n, device=device)
    update = torch.empty(n, dtype=torch.bfloat16, device=device)
    columns = torch.randint(0, n, (args.sample,), device=device)
    columns[-8:] = torch.arange(n - 8, n, device=device)  # the last ones, past 2^31 if N is
    expected_total = torch.zeros(args.sample, dtype=torch.float64)
    expected_count = torch.zeros(args.sample, dtype=torch.float64)
    folds = []
    for k in range(args.clients):
        gen = torch.Generator(device).manual_seed(k)
        update.normal_(0.0, 0.01, generator=gen)
        weight = 1.0 + k
        seconds = synced(device, lambda: acc.add(update, weight))
        sampled = update[columns].double().cpu()
        expected_total += weight * sampled
        expected_count += torch.sign(sampled)
        gbps = 18 * n / seconds / 1e9
        folds.append({"client": k, "seconds": seconds, "gbps": gbps,
                      "frac_copy_bw": gbps / bandwidth})
        print(json.dumps(folds[-1]), flush=True)
    got_total = acc.total[columns].double().cpu()
    total_err = float(((got_total - expected_total).abs()
                       / expected_total.abs().clamp_min(1e-6)).max())
    count_exact = bool(torch.equal(acc.count[columns].double().cpu(), expected_count))
    peak_fold = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del update
    params = torch.zeros(n, device=device)
    opt = gk.ServerOptimizer(params, "sgd", lr=1.0, tau=0.4)
    step_s = synced(device, lambda: opt.step_accumulated(acc))
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "numel": n, "update_dtype": "bfloat16",
        "copy_bandwidth_gbps": bandwidth, "folds": folds,
        "fold_frac_copy_bw_min": min(f["frac_copy_bw"] for f in folds[1:] or folds),
        "step_accumulated_s": step_s,
        "peak_memory_fold_gb": peak_fold / 1e9 if peak_fold else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9
        if device.type == "cuda" else None,
        "memory_formula_gb": {"fold": (8 * n + 2 * n + 4 * n) / 1e9, "step": need / 1e9},
        "check": {"columns": args.sample, "last_column": n - 1,
                  "total_max_rel_err": total_err, "count_exact": count_exact},
    }
    print(json.dumps({k: v for k, v in report.items() if k != "folds"}), flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
