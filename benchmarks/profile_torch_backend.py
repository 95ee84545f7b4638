"""Where the time of ``gma_step(backend="torch")`` goes on CPU, and what a few changes to
``gma_kernels/backends/torch_ops.py`` would buy (measured here, without editing the package).

    python benchmarks/profile_torch_backend.py [--k 16] [--log2n 22] [--dtype fp32]
                                                [--threads 0] [--repeat 7]

Prints, as median milliseconds per call:

1. ``gma_step`` as shipped, with the default guard and ``nonfinite="unchecked"``;
2. the same with backends/torch_ops.py's size constants (``CPU_CHUNK_BYTES``, ``MASK_BLOCK``) patched;
3. the ops that gma_kernels' code calls, timed one by one with ``sys.setprofile`` (so it
   follows backends/torch_ops.py as it is now), summed per source line;
4. a sketch of a compiled path: the aggregation written as reductions over K and run
   through ``torch.compile`` (K static, N dynamic; one fused pass over the updates), checked against
   ``gma_step``'s result, with its one-off compile time.

The torch profiler is not used: on this 2-core machine it slowed the small ops tenfold.
"""
from __future__ import annotations

import argparse
import linecache
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from fractions import Fraction

import torch

import gma_kernels as gk
from gma_kernels.backends import torch_ops as _torch


#: module constants of backends/torch_ops.py tried in section 2 (those that exist)
PATCHABLE = {"CPU_CHUNK_BYTES": (1 << 18, 1 << 20, 1 << 21, 1 << 22, 1 << 23, 1 << 24),
             "MASK_BLOCK": (1 << 14, 1 << 16, 1 << 17, 1 << 18, 1 << 20)}


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def op_breakdown(fn, repeat: int) -> tuple[float, list[tuple[str, int, str, float, int]]]:
    """Time every C-level call (torch ops, tensor methods) that ``gma_kernels`` code makes
    while ``fn`` runs, via ``sys.setprofile``: (median wall ms of ``fn``, [(file, line, op,
    median ms per call of fn summed over that line's calls, calls)]). The hook adds ~1 µs per
    op, so this runs the code as it is now, whatever backends/torch_ops.py looks like."""
    fn()
    walls, runs = [], []
    for _ in range(repeat):
        totals: dict[tuple, list] = defaultdict(lambda: [0.0, 0])
        stack: list = []

        def hook(frame, event, arg):
            if event == "c_call":
                stack.append((frame, arg, time.perf_counter()))
            elif event in ("c_return", "c_exception") and stack:
                caller, func, start = stack.pop()
                filename = caller.f_code.co_filename
                if f"{os.sep}gma_kernels{os.sep}" in filename:
                    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", "?")
                    entry = totals[(os.path.basename(filename), caller.f_lineno, name)]
                    entry[0] += time.perf_counter() - start
                    entry[1] += 1

        start = time.perf_counter()
        sys.setprofile(hook)
        try:
            fn()
        finally:
            sys.setprofile(None)
        walls.append(time.perf_counter() - start)
        runs.append(totals)
    keys = set().union(*runs)
    rows = [(f, line, op, 1e3 * statistics.median(r[(f, line, op)][0] if (f, line, op) in r
                                                   else 0.0 for r in runs),
             runs[0].get((f, line, op), [0, 0])[1]) for f, line, op in keys]
    return 1e3 * statistics.median(walls), sorted(rows, key=lambda r: -r[3])


def fused_body(x: torch.Tensor, w: torch.Tensor, threshold: float, scale: float):
    """The whole aggregation written as reductions over K (no matmul, which inductor would
    hand to BLAS as a separate pass): under torch.compile it becomes one loop that reads each
    update element once. Returns g and the three scalars the backend needs (Σm, ΣA, Σg for
    the guard)."""
    x = x.float()
    mean = (w[:, None] * x).sum(0)
    score = torch.sign(x).sum(0).abs()
    agree = score * scale
    m = torch.where(score >= threshold, 1.0, agree)
    g = m * mean
    return g, m.sum(), agree.sum(), g.sum()


def compiled_step(compiled, params, updates, weights, tau, lr):
    """A sketch of a compiled CPU path: one fused pass for g and the statistics, the guard on
    the scalar Σg (a non-finite value makes it NaN/inf; the precise check would follow only
    then), the SGD step as one vectorized op."""
    k = updates.shape[0]
    p = torch.tensor(weights, dtype=torch.float64)
    w = (p / p.sum()).to(torch.float32)
    threshold = float(math.ceil(Fraction(tau) * k))
    scale = float(torch.tensor(1.0 / k, dtype=torch.float32))
    g, mask_sum, agreement_sum, check = compiled(updates, w, threshold, scale)
    if not bool(torch.isfinite(check)):
        raise ValueError("non-finite (the real code would then run the precise check)")
    params.add_(g, alpha=lr)
    return mask_sum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--log2n", type=int, default=22)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true",
                        help="skip section 4 (torch.compile takes ~30-60 s on 2 cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    k, n = args.k, 1 << args.log2n
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    updates = torch.randn(k, n).to(dtype)
    weights = [float(w) for w in torch.randint(32, 257, (k,)).tolist()]
    params = torch.randn(n)
    tau, lr = 0.4, 1.0
    knobs = {name: getattr(_torch, name) for name in PATCHABLE if hasattr(_torch, name)}
    print(f"K={k} N=2^{args.log2n} {args.dtype}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, backends/torch_ops.py settings {knobs}")

    def step(nonfinite="raise"):
        return lambda: gk.gma_step(params, updates, weights, tau=tau, lr=lr, backend="torch",
                                   nonfinite=nonfinite)

    print("\n1. gma_step as shipped (median ms)")
    print(f"   guard (default)        {median_ms(step(), args.repeat):8.1f}")
    print(f"   nonfinite='unchecked'  {median_ms(step('unchecked'), args.repeat):8.1f}")

    print("\n2. backends/torch_ops.py's size constants patched one at a time, default guard (median ms)")
    for name, shipped in knobs.items():
        try:
            for value in PATCHABLE[name]:
                setattr(_torch, name, value)
                print(f"   {name} = {value:>10d}  {median_ms(step(), args.repeat):8.1f}"
                      + ("  (shipped)" if value == shipped else ""))
        finally:
            setattr(_torch, name, shipped)

    print("\n3. gma_step's own ops, line by line (sys.setprofile; median ms per call)")
    wall, rows = op_breakdown(step(), args.repeat)
    accounted = sum(r[3] for r in rows)
    for filename, line, op, ms, calls in rows[:18]:
        source = linecache.getline(os.path.join(os.path.dirname(gk.__file__), filename),
                                   line).strip()
        print(f"   {ms:7.1f}  {100 * ms / wall:4.1f}%  {calls:5d}x  {filename}:{line} {op}: "
              f"{source[:70]}")
    print(f"   {wall - accounted:7.1f}  {100 * (wall - accounted) / wall:4.1f}%         "
          f"Python between the ops (and the hook's own cost)")
    print(f"   {wall:7.1f}  wall time under the hook; {sum(r[4] for r in rows)} ops per call")

    if args.no_compile:
        return
    print("\n4. sketch: the aggregation as one torch.compile'd pass (K static, N dynamic: one "
          "compilation per K and dtype)")
    compiled = torch.compile(fused_body, dynamic=False)
    torch._dynamo.mark_dynamic(updates, 1)
    trial, reference = params.clone(), params.clone()
    start = time.perf_counter()
    compiled_step(compiled, trial, updates, weights, tau, lr)
    compile_s = time.perf_counter() - start
    gk.gma_step(reference, updates, weights, tau=tau, lr=lr, backend="torch")
    err = float((trial - reference).abs().max())
    ms = median_ms(lambda: compiled_step(compiled, params, updates, weights, tau, lr), args.repeat)
    print(f"   first call (compilation) {compile_s:6.1f} s; then {ms:.1f} ms per step "
          f"(gma_step: {median_ms(step(), args.repeat):.1f} ms); "
          f"max |compiled - gma_step| {err:.1e}")


if __name__ == "__main__":
    main()
