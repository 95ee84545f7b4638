"""CPU calls beside busy neighbours: each contender's per-call time with the machine idle, then
with one and with two other processes busy beside it (each a 2-thread torch matmul loop, as a
Flower simulation's client training would be), all in one run.

    python benchmarks/busy_neighbour.py [--calls 200] [--out benchmarks/results/cpu/busy-neighbour]

Target: beside one and beside two busy processes, every contender's median at most 2x and its
90th percentile at most 5x its idle median. Writes ``OUT.json`` and ``OUT.md``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import gma_kernels as gk


def _busy(stop: mp.Event) -> None:
    """A neighbour: 2 torch threads multiplying matrices until told to stop."""
    torch.set_num_threads(2)
    a = torch.randn(512, 512)
    while not stop.is_set():
        a = torch.tanh(a @ a) * 0.5


def contenders() -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(0)
    small = torch.randn(100_000, generator=gen) * 0.01
    acc = gk.Accumulator(100_000)
    k16 = [torch.randn(100_000, generator=gen) * 0.01 for _ in range(16)]
    params = torch.zeros(100_000)
    big = torch.randn(16, 1 << 22, generator=gen) * 0.01
    big_params = torch.zeros(1 << 22)
    adam = gk.ServerOptimizer(torch.zeros(100_000), "adam", lr=1e-3)
    return {
        "Accumulator.add, N=1e5": lambda: acc.add(small, 1.0),
        "gma_step, K=16, N=1e5": lambda: gk.gma_step(params, k16, lr=0.1),
        "ServerOptimizer(adam).step, K=16, N=1e5": lambda: adam.step(k16),
        "gma_step, K=16, N=2^22": lambda: gk.gma_step(big_params, big, lr=0.1),
        "torch.add_, N=1e5 (for reference)": lambda: params.add_(small),
    }


def measure(fn: Callable[[], object], calls: int) -> list[float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/cpu/busy-neighbour")
    args = parser.parse_args()
    fns = contenders()
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in fns}
    ctx = mp.get_context("spawn")
    for busy in (0, 1, 2):
        stop = ctx.Event()
        procs = [ctx.Process(target=_busy, args=(stop,), daemon=True) for _ in range(busy)]
        for p in procs:
            p.start()
        time.sleep(1.0 if busy else 0.0)
        for name, fn in fns.items():
            calls = args.calls if "2^22" not in name else max(20, args.calls // 10)
            t = measure(fn, calls)
            q = statistics.quantiles(t, n=10)
            results[name][f"busy{busy}"] = {"median_ms": statistics.median(t) * 1e3,
                                            "p90_ms": q[-1] * 1e3, "max_ms": max(t) * 1e3}
            print(f"{busy} busy  {name:42s} median {statistics.median(t) * 1e3:8.3f} ms  "
                  f"p90 {q[-1] * 1e3:8.3f} ms", flush=True)
        stop.set()
        for p in procs:
            p.join(5)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": mp.cpu_count(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version()}
    lines = ["# Per-call time beside busy neighbours (CPU)", "",
             f"* {machine}; each neighbour: a process running 2-thread torch matmuls",
             "* target: beside 1 and 2 busy processes, median <= 2x and p90 <= 5x the idle "
             "median", "",
             "| contender | idle median ms | 1 busy: median / p90 (x idle) | "
             "2 busy: median / p90 (x idle) | met |", "|---|---|---|---|---|"]
    for name, r in results.items():
        idle = r["busy0"]["median_ms"]
        cells, met = [], True
        for b in ("busy1", "busy2"):
            med, p90 = r[b]["median_ms"] / idle, r[b]["p90_ms"] / idle
            met &= med <= 2 and p90 <= 5
            cells.append(f"{r[b]['median_ms']:.3f} / {r[b]['p90_ms']:.3f} "
                         f"({med:.2f}x / {p90:.2f}x)")
        lines.append(f"| {name} | {idle:.3f} | {cells[0]} | {cells[1]} | "
                     f"{'yes' if met else 'no'} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "results": results},
                                                   indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
