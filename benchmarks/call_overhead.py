"""Host work per call: µs of the library's calls on a case so small (K = 16, N = 64, one
thread) that the kernel's own work is nil, as one JSON line; the best of 7 repeats of 2,000
calls each. Run it alternately on two checkouts to compare them side by side:

    for i in 1 2 3; do for tree in OLD NEW; do
        (cd /tmp && PYTHONPATH=$tree python NEW/benchmarks/call_overhead.py); done; done
"""
import json
import timeit

import torch

import gma_kernels as gk

torch.set_num_threads(1)
k, n = 16, 64
g = torch.Generator().manual_seed(0)
u = torch.randn(k, n, generator=g) * 0.01
rows = list(u.unbind(0))
w = (torch.rand(k, generator=g) + 0.5).tolist()
p = torch.randn(n, generator=g)
opt = gk.ServerOptimizer(p.clone(), "adam", lr=0.01, backend="torch")


def best_us(fn, number: int = 2000) -> float:
    for _ in range(200):
        fn()
    return round(min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6, 1)


print(json.dumps({
    "gma_step": best_us(lambda: gk.gma_step(p, u, w, lr=0.1, backend="torch")),
    "gma_step[list]": best_us(lambda: gk.gma_step(p, rows, w, lr=0.1, backend="torch")),
    "masked_mean": best_us(lambda: gk.masked_mean(u, w, backend="torch")),
    "ServerOptimizer(adam).step": best_us(lambda: opt.step(u, w)),
    "Accumulator(n).add": best_us(lambda: gk.Accumulator(n, backend="torch").add(u, w)),
}))
