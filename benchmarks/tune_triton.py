"""Tune and check the fused Triton kernel on a CUDA GPU: correctness against a float64
reference, then the bandwidth of each (BLOCK, num_warps) candidate as a fraction of the
device's measured copy bandwidth. Usage: python benchmarks/tune_triton.py OUT.json"""
from __future__ import annotations

import json
import sys
import time

import torch

import gma_kernels as gk
from gma_kernels import MaskConfig, StepConfig
from gma_kernels.backends import triton_kernel as _triton
from gma_kernels.batch import make_batch
from gma_kernels.job import Job


def cuda_time(fn, reps: int = 20) -> float:
    """Median seconds of ``fn`` over ``reps`` runs, timed with CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / cuda_time(lambda: dst.copy_(src))


def host_overhead() -> dict[str, float]:
    """Microseconds of host time per ``gma_step`` call at a tiny N (the GPU work is negligible,
    so this is what a call costs the CPU: validation, the table copy and the launch)."""
    out = {}
    for k in (8, 64):
        U = torch.randn(k, 4096, device="cuda")
        p = torch.zeros(4096, device="cuda")
        w = [1.0] * k
        for layout, updates in (("matrix", U), ("list", list(U))):
            for guard in ("unchecked", "raise"):
                for _ in range(10):
                    gk.gma_step(p, updates, w, backend="triton", nonfinite=guard)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(200):
                    gk.gma_step(p, updates, w, backend="triton", nonfinite=guard)
                torch.cuda.synchronize()
                out[f"K={k}/{layout}/{guard}"] = (time.perf_counter() - start) / 200 * 1e6
    return out


def reference(U: torch.Tensor, w: torch.Tensor, params: torch.Tensor, tau: float, lr: float):
    U64, p = U.double(), (w.double() / w.double().sum())
    agree = torch.sign(U64).mean(0).abs()
    m = torch.where(agree >= tau, 1.0, agree)
    return params.double() + lr * m * (p[:, None] * U64).sum(0)


def main(out_path: str) -> None:
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": __import__("triton").__version__, "checks": [], "runs": []}
    bw = copy_bandwidth()
    results["copy_GBps"] = bw / 1e9
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for k, n in ((1, 4097), (7, 1_000_003), (64, 1 << 20), (256, 3001)):
            U = torch.randn(k, n, device="cuda", generator=gen).to(dtype)
            w = torch.rand(k, device="cuda", generator=gen) + 0.1
            p = torch.randn(n, device="cuda", generator=gen)
            expect = reference(U, w, p, 0.4, 0.7)
            got = gk.gma_step(p.clone(), U, w, lr=0.7, backend="triton")
            got_rows = gk.gma_step(p.clone(), list(U), w, lr=0.7, backend="triton")
            mask_t = gk.agreement(U, backend="triton")
            mask_c = gk.agreement(U, backend="torch")
            results["checks"].append({
                "dtype": str(dtype), "K": k, "N": n,
                "max_abs_err": float((got.double() - expect).abs().max()),
                "max_abs_err_rows": float((got_rows.double() - expect).abs().max()),
                "agreement_identical": bool(torch.equal(mask_t, mask_c))})
    results["host_overhead_us"] = host_overhead()
    default_launch = dict(_triton.LAUNCH)
    candidates = [(1024, 4, 1, 1), (1024, 4, 1, 4), (1024, 4, 3, 1), (2048, 4, 1, 2),
                  (2048, 8, 3, 2), (1024, 8, 1, 4)]
    for dtype in (torch.float32, torch.bfloat16):
        for k in (8, 64):
            for n in (1 << 24, 1 << 26):
                U = torch.randn(k, n, device="cuda", dtype=dtype)
                w = (torch.rand(k) + 0.1).tolist()  # host weights, as a server has them
                p = torch.randn(n, device="cuda")
                nbytes = k * n * U.element_size() + 8 * n
                row = {"dtype": str(dtype), "K": k, "N": n, "bytes": nbytes}
                for block, warps, stages, unroll in candidates:
                    _triton.LAUNCH.update(BLOCK=block, num_warps=warps, num_stages=stages,
                                          UNROLL=unroll)
                    for guard in ("unchecked", "raise"):
                        t = cuda_time(lambda: gk.gma_step(p, U, w, lr=1e-9, backend="triton",
                                                          nonfinite=guard))
                        row[f"{block}x{warps}s{stages}u{unroll}/{guard}"] = nbytes / t / bw
                wn = torch.tensor(w, device="cuda") / sum(w)

                def naive():
                    agree = torch.sign(U).float().mean(0).abs()
                    mean = (wn[:, None] * U.float()).sum(0)
                    p.add_(1e-9 * torch.where(agree >= 0.4, 1.0, agree) * mean)
                row["naive"] = nbytes / cuda_time(naive, reps=5) / bw
                _triton.LAUNCH.update(default_launch)
                row["list_default/unchecked"] = nbytes / cuda_time(
                    lambda: gk.gma_step(p, list(U), w, lr=1e-9, backend="triton",
                                        nonfinite="unchecked")) / bw
                batch = make_batch(U, w)
                job = Job(batch, MaskConfig(), StepConfig(lr=1e-9), p, guard=False)
                row["kernel_only_default"] = nbytes / cuda_time(lambda: _triton.run(job)) / bw
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
                del U
                torch.cuda.empty_cache()
    compiled = _triton._aggregate_kernel.device_caches[0][0].values()
    results["ptx_loads_v4_vs_scalar"] = [
        (k.asm["ptx"].count("ld.global.v4") + k.asm["ptx"].count("ld.global.nc.v4"),
         k.asm["ptx"].count("ld.global.b32") + k.asm["ptx"].count("ld.global.nc.b32"))
        for k in compiled]
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
