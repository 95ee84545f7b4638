"""Measurement helpers shared by the benchmark suites (not collected by pytest).

* ``Case``: the inputs of one benchmark group (device, dtype, K, N): K client updates, their
  weights, the starting parameters, and the float64 reference results, built once per group
  and shared by every contender of that group (one group is held in memory at a time).
* ``peak_extra_memory``: memory a call allocates beyond what was there before it.
* ``copy_bandwidth``: ``dst.copy_(src)`` of a large buffer, the roofline we compare with.
* ``compare``: a contender's output against the float64 reference.
* ``machine_info``: versions and device names recorded with every result.
"""
from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import statistics
import threading
import time
import zlib
from dataclasses import dataclass, field
from fractions import Fraction

import torch

TAU = 0.4          # the journal version's default threshold, soft mask
LR = 1.0           # server learning rate: w ← w + g, GMA as a drop-in for averaging
WEIGHT_RANGE = (32, 256)   # client weights: sample counts, integers exact in bf16


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn, device: torch.device) -> float:
    """Wall time of one call of ``fn``, the device synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def back_to_back(fn, min_seconds: float = 0.05, max_calls: int = 500) -> float:
    """Seconds per call of ``fn`` called back to back on the GPU, timed by CUDA events around
    the whole loop with one sync at the end: the kernel's throughput with the host work of the
    next call overlapping the GPU work of this one (as in a loop of aggregations that reads
    nothing back). A call that syncs internally (the non-finite guard) still pays its host
    work in full here."""
    fn()
    torch.cuda.synchronize()
    calls = max(3, min(max_calls, int(min_seconds / max(timed_call(fn, torch.device("cuda")),
                                                        1e-6))))
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / 1e3 / calls


def choose_rounds(call_s: float, override: int = 0) -> int:
    """Timed rounds for a call of ``call_s`` seconds: 10 for fast calls down to 3 for slow ones,
    so that the whole CPU suite stays within a few minutes."""
    if override > 0:
        return override
    if call_s < 0.05:
        return 10
    if call_s < 0.25:
        return 7
    if call_s < 1.0:
        return 5
    return 3


# ----------------------------------------------------------------------------- host load

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat_cpu() -> tuple[float, float] | None:
    """(busy seconds of all CPUs, steal seconds) since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    values = [int(v) for v in fields[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return busy / _CLK_TCK, steal / _CLK_TCK


class HostLoad:
    """CPU time that other processes (``foreign_cpu_s``) and the hypervisor (``steal_s``) took
    while a benchmark ran: large values mean the timings are noisy. Linux only."""

    def __enter__(self) -> HostLoad:
        self.start = _proc_stat_cpu()
        self.own = time.process_time()
        self.wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        end = _proc_stat_cpu()
        self.wall = time.perf_counter() - self.wall
        own = time.process_time() - self.own
        if self.start is None or end is None:
            self.result = {}
            return
        busy = end[0] - self.start[0]
        self.result = {
            "load_wall_s": round(self.wall, 4),
            "foreign_cpu_s": round(max(0.0, busy - own), 3),
            "steal_s": round(end[1] - self.start[1], 3),
            "loadavg_1m": round(os.getloadavg()[0], 2),
        }


# ----------------------------------------------------------------------------- memory


def _read_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_hwm() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):
    _LIBC = None


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS, so a call that reuses it shows up in RSS."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _hwm_method_works() -> bool:
    return (os.path.exists("/proc/self/clear_refs") and _read_status_kib("VmHWM") is not None
            and _reset_hwm())


HOST_MEMORY_METHOD = (
    "rss-hwm: glibc malloc_trim(0), then /proc/self/clear_refs=5 resets the peak RSS; "
    "peak extra = VmHWM after the call - RSS before it"
    if _hwm_method_works() else
    "rss-sampling: process RSS sampled every 0.5 ms in a thread during the call, "
    "max - RSS before it (may miss short peaks)")
CUDA_MEMORY_METHOD = ("cuda-allocator: torch.cuda.max_memory_allocated() during the call - "
                      "memory_allocated() before it (the caching allocator's view)")


def _host_peak_extra(fn) -> int:
    _trim_heap()
    if HOST_MEMORY_METHOD.startswith("rss-hwm"):
        before = _rss_bytes()
        _reset_hwm()
        fn()
        return max(0, _read_status_kib("VmHWM") * 1024 - before)
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], _rss_bytes())
    return max(0, peak[0] - before)


def peak_extra_memory(fn, device: torch.device, host_side: bool = False) -> tuple[int, str]:
    """(bytes a call of ``fn`` needs beyond the memory already in use, how it was measured).
    ``host_side``: the contender computes on the host even for a CUDA group (Flower)."""
    if device.type == "cuda" and not host_side:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before), CUDA_MEMORY_METHOD
    return _host_peak_extra(fn), HOST_MEMORY_METHOD


# ----------------------------------------------------------------------------- copy bandwidth


def copy_bandwidth(device: torch.device, nbytes: int | None = None, rounds: int = 10) -> dict:
    """Median bandwidth of ``dst.copy_(src)`` (bytes moved = 2 × size: one read, one write)."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (1 << 28)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        timed_call(lambda: dst.copy_(src), device)
    times = [timed_call(lambda: dst.copy_(src), device) for _ in range(rounds)]
    median = statistics.median(times)
    result = {"copy_bytes": 2 * nbytes, "copy_median_s": median,
              "copy_gbps": 2 * nbytes / median / 1e9,
              "copy_best_gbps": 2 * nbytes / min(times) / 1e9}
    if device.type == "cuda":
        result["copy_b2b_gbps"] = 2 * nbytes / back_to_back(lambda: dst.copy_(src)) / 1e9
    del src, dst
    _trim_heap()
    return result


# ----------------------------------------------------------------------------- cases

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def traffic_bytes(k: int, n: int, dtype: torch.dtype) -> int:
    """Minimum traffic of one step: each update read once, params read and written once."""
    return k * n * torch.tensor([], dtype=dtype).element_size() + 8 * n


@dataclass
class Case:
    """One benchmark group's inputs and its float64 references."""

    device: torch.device
    dtype_name: str
    k: int
    n: int
    updates: torch.Tensor            # [K, N] in the group's dtype
    weights: list[float]             # raw weights p_k (integers)
    mean_weights32: torch.Tensor     # p̄_k as float32 on the device (for the naive formula)
    params0: torch.Tensor            # starting parameters, float32 [N]
    tau: float = TAU
    lr: float = LR
    _refs: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return (self.device.type, self.dtype_name, self.k, self.n)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def group(self) -> str:
        return group_name(self.device.type, self.dtype_name, self.k, self.n)

    def reference(self, kind: str) -> torch.Tensor:
        """float64 reference of kind ``mean`` (weighted FedAvg Σ p̄_k Δ_k), ``g`` (masked mean,
        agreement a_k = 1/K, exact count), ``g_weighted`` (agreement a_k = p̄_k), ``step``
        (params0 + lr·g) or ``step_weighted``."""
        if kind not in self._refs:
            self._compute_references()
        return self._refs[kind]

    def _compute_references(self) -> None:
        k, n = self.k, self.n
        p = torch.tensor(self.weights, dtype=torch.float64, device=self.device)
        p = p / p.sum()
        count_threshold = math.ceil(Fraction(self.tau) * k)
        mean = torch.empty(n, dtype=torch.float64, device=self.device)
        g = torch.empty_like(mean)
        gw = torch.empty_like(mean)
        step = max(1, (1 << 25) // k)
        for start in range(0, n, step):
            block = self.updates[:, start:start + step].double()
            m = p @ block
            signs = torch.sign(block)
            count = signs.sum(0).abs()
            mask = torch.where(count >= count_threshold, 1.0, count / k)
            agree_w = (p @ signs).abs()
            mask_w = torch.where(agree_w >= self.tau, 1.0, agree_w)
            mean[start:start + step] = m
            g[start:start + step] = mask * m
            gw[start:start + step] = mask_w * m
            del block, signs
        base = self.params0.double()
        self._refs.update(mean=mean, g=g, g_weighted=gw, step=base + self.lr * g,
                          step_weighted=base + self.lr * gw)


def group_name(device: str, dtype_name: str, k: int, n: int) -> str:
    return f"{device}|{dtype_name}|K={k}|N=2^{int(math.log2(n))}"


_CURRENT: dict[str, Case] = {}


def get_case(device: str, dtype_name: str, k: int, n: int) -> Case:
    """The group's inputs, built on first use; the previous group's are freed first."""
    key = (device, dtype_name, k, n)
    case = _CURRENT.get("case")
    if case is not None and case.key == key:
        return case
    _CURRENT.clear()
    del case
    _trim_heap()
    if device == "cuda":
        torch.cuda.empty_cache()
    dev = torch.device(device)
    seed = zlib.crc32(repr(key).encode())
    gen = torch.Generator(device="cpu").manual_seed(seed)
    weights = torch.randint(WEIGHT_RANGE[0], WEIGHT_RANGE[1] + 1, (k,), generator=gen)
    weights = [float(w) for w in weights.tolist()]
    torch.manual_seed(seed)
    updates = torch.empty(k, n, dtype=DTYPES[dtype_name], device=dev)
    rows = max(1, (1 << 26) // n)     # fill in slabs: no K×N float32 temporary for bf16
    for start in range(0, k, rows):
        updates[start:start + rows] = torch.randn(min(rows, k - start), n, device=dev)
    params0 = torch.randn(n, device=dev)
    p = torch.tensor(weights, dtype=torch.float64)
    mean_weights32 = (p / p.sum()).to(torch.float32).to(dev)
    case = Case(dev, dtype_name, k, n, updates, weights, mean_weights32, params0)
    _CURRENT["case"] = case
    return case


def release_case() -> None:
    _CURRENT.clear()
    _trim_heap()


# ----------------------------------------------------------------------------- correctness


def compare(out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor | None = None,
            rtol: float = 1e-5, atol_rel: float = 1e-5) -> dict:
    """Error of ``out`` against the float64 ``ref``. ``base`` (the starting parameters for a
    step) is subtracted for the relative L2 error, so it measures the error of the update.
    An element is "bad" when ``|out − ref| > atol + rtol·|ref|`` with ``atol = atol_rel ·
    max|ref − base|`` (the size of the update)."""
    out = out.to(ref.device, torch.float64)
    diff = (out - ref).abs()
    delta = ref - base if base is not None else ref
    scale = float(delta.abs().max()) or 1.0
    bad = diff > (atol_rel * scale + rtol * ref.abs())
    return {"max_abs_err": float(diff.max()),
            "rel_l2_err": float(diff.norm() / (delta.norm() + 1e-300)),
            "bad_fraction": float(bad.double().mean()),
            "bad_count": int(bad.sum())}


# ----------------------------------------------------------------------------- environment


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001 - not installed or no metadata
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def source_digest() -> str:
    """SHA-1 of gma_kernels' sources as they are now (the results name the code they timed,
    also when the working tree differs from the commit)."""
    import hashlib
    from pathlib import Path

    import gma_kernels
    root = Path(gma_kernels.__file__).parent
    digest = hashlib.sha1()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".c")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def machine_info() -> dict:
    return {
        "gma_kernels_src_sha1": source_digest(),
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "flwr_version": _version("flwr"),
        "declearn_version": _version("declearn"),
        "numpy_version": _version("numpy"),
        "python_version": platform.python_version(),
        "cuda_version": torch.version.cuda,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
