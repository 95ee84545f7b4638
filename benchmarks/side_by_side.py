"""Median ms of the library's CPU calls on one case, as one JSON line: run it alternately on two
checkouts to compare them side by side (results/before-after/cpu-layout.md was made so):

    for i in 1 2 3; do for tree in OLD NEW; do
        (cd /tmp && PYTHONPATH=$tree python NEW/benchmarks/side_by_side.py 16 22 fp32); done; done
"""
import json
import statistics
import sys
import time

import torch

import gma_kernels as gk

k, logn, dt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dt]
n = 1 << logn
g = torch.Generator().manual_seed(0)
u = (torch.randn(k, n, generator=g) * 0.01).to(dtype)
rows = list(u.unbind(0))
w = (torch.rand(k, generator=g) + 0.5).tolist()
p = torch.randn(n, generator=g)
def med(fn, reps=9):
    fn(); ts = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3
out = {}
out["read floor (updates.sum())"] = med(lambda: u.sum())
out["gma_step[torch]"] = med(lambda: gk.gma_step(p, u, w, lr=0.1, backend="torch"))
out["gma_step[torch,unchecked]"] = med(lambda: gk.gma_step(p, u, w, lr=0.1, backend="torch", nonfinite="unchecked"))
out["gma_step[torch,list]"] = med(lambda: gk.gma_step(p, rows, w, lr=0.1, backend="torch"))
out["masked_mean[torch]"] = med(lambda: gk.masked_mean(u, w, backend="torch"))
opt = gk.ServerOptimizer(p, "adam", lr=0.01, backend="torch")
out["ServerOptimizer(adam).step"] = med(lambda: opt.step(u, w))
def acc():
    a = gk.Accumulator(n, backend="torch")
    for r, x in zip(rows, w): a.add(r, x)
    a.masked_mean()
out["accumulator[torch]"] = med(acc, reps=5)
print(json.dumps(out))
