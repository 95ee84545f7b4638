"""Host work per call: µs of the library's calls on a case so small (K = 16, N = 64 by default,
one thread) that the kernel's own work is nil, as one JSON line; the best of 7 repeats of 2,000
calls each. ``N`` sets the update size; ``--thread-time`` times the calling thread's CPU time
(``time.thread_time``) instead of the wall clock, which a busy VM disturbs less. Run it
alternately on two checkouts to compare them side by side:

    for i in 1 2 3; do for tree in OLD NEW; do
        (cd /tmp && PYTHONPATH=$tree python NEW/benchmarks/call_overhead.py [N] [--thread-time]); done; done
"""
import argparse
import json
import time
import timeit

import torch

import gma_kernels as gk

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("n", nargs="?", type=int, default=64, help="elements per update")
parser.add_argument("--thread-time", action="store_true", help="time the thread's CPU time")
args = parser.parse_args()
timer = time.thread_time if args.thread_time else time.perf_counter
torch.set_num_threads(1)
k, n = 16, args.n
g = torch.Generator().manual_seed(0)
u = torch.randn(k, n, generator=g) * 0.01
rows = list(u.unbind(0))
w = (torch.rand(k, generator=g) + 0.5).tolist()
p = torch.randn(n, generator=g)
opt = gk.ServerOptimizer(p.clone(), "adam", lr=0.01, backend="torch")
acc = gk.Accumulator(n, backend="torch").add(u, w)


def best_us(fn, number: int = 2000) -> float:
    for _ in range(200):
        fn()
    return round(min(timeit.repeat(fn, number=number, repeat=7, timer=timer)) / number * 1e6, 1)


print(json.dumps({
    "gma_step": best_us(lambda: gk.gma_step(p, u, w, lr=0.1, backend="torch")),
    "gma_step[list]": best_us(lambda: gk.gma_step(p, rows, w, lr=0.1, backend="torch")),
    "masked_mean": best_us(lambda: gk.masked_mean(u, w, backend="torch")),
    "ServerOptimizer(adam).step": best_us(lambda: opt.step(u, w)),
    "Accumulator(n).add": best_us(lambda: gk.Accumulator(n, backend="torch").add(u, w)),
    "acc.masked_mean": best_us(lambda: acc.masked_mean()),
}))
