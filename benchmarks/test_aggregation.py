"""Aggregation benchmarks: one server round of GMA (or FedAvg) over K client updates of N
elements, per (device, dtype, K, N) group, for every contender below.

Every contender's first call in a group is checked against a float64 reference on the same
inputs before anything is timed. Run: ``pytest benchmarks --benchmark-only`` (README.md).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import operator
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import _harness
import gma_kernels as gk
from gma_kernels.backends import native as _native


@dataclass
class Prepared:
    """A contender set up on a group's inputs: ``fn`` is the timed call, ``output`` the tensor
    compared with the reference after the first call."""

    fn: Callable[[], object]
    output: Callable[[], torch.Tensor]


@dataclass
class Contender:
    name: str
    description: str
    build: Callable[[_harness.Case], Prepared]
    #: reference it is checked against: "step" (params0 + lr·g, unweighted agreement),
    #: "step_weighted" (agreement weighted by p̄_k) or "mean" (weighted FedAvg, no step)
    check: str = "step"
    #: False: compared with loose tolerances (computes in the input dtype, or its threshold is
    #: a float comparison that may flip near-ties); the errors are recorded either way
    strict: bool = True
    compiles: bool = False
    host_side: bool = False
    requires: tuple[str, ...] = ()
    cuda_only: bool = False
    cpu_only: bool = False
    fp32_only: str | None = None
    max_bytes_cuda: int | None = None

    def skip_reason(self, device: str, dtype_name: str, k: int, n: int) -> str | None:
        if self.cuda_only and device != "cuda":
            return f"{self.name} runs on CUDA only (Triton's CPU interpreter is no benchmark)"
        if self.cpu_only and device != "cpu":
            return f"{self.name} differs from gma_step[torch] on CPU only"
        for module in self.requires:
            reason = _import_problem(module)
            if reason:
                return reason
        if self.fp32_only and dtype_name != "fp32":
            return self.fp32_only
        if device == "cuda" and self.max_bytes_cuda and k * n * 4 > self.max_bytes_cuda:
            return (f"{self.name} runs on the host: skipped above "
                    f"{self.max_bytes_cuda >> 20} MiB of updates in CUDA groups")
        return None


@functools.cache
def _import_problem(module: str) -> str | None:
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return f"{module} is not installed"
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - any import failure means: skip, saying why
        return f"{module} does not import: {type(err).__name__}: {err}"
    return None


# ----------------------------------------------------------------------------- contenders


def gma_step_contender(backend: str, nonfinite: str = "raise", layout: str = "matrix",
                       native: bool = True) -> Callable[[_harness.Case], Prepared]:
    """``native=False``: the torch backend's pure-PyTorch CPU path (native kernel switched off
    for the call)."""
    def build(case: _harness.Case) -> Prepared:
        params = case.params0.clone()
        updates = case.updates if layout == "matrix" else list(case.updates.unbind(0))
        weights = case.weights

        def step():
            gk.gma_step(params, updates, weights, lr=case.lr, tau=case.tau, backend=backend,
                        nonfinite=nonfinite)

        def without_native():
            saved, _native.ENABLED = _native.ENABLED, False
            try:
                step()
            finally:
                _native.ENABLED = saved
        return Prepared(step if native else without_native, lambda: params)
    return build


def accumulator_contender(backend: str) -> Callable[[_harness.Case], Prepared]:
    """Streaming: a fresh accumulator, the K updates folded in one at a time as they would
    arrive, then the masked mean and the step."""
    def build(case: _harness.Case) -> Prepared:
        params = case.params0.clone()
        rows = list(case.updates.unbind(0))
        weights = [(w,) for w in case.weights]

        def fn():
            acc = gk.Accumulator(case.n, device=case.device, backend=backend)
            for row, w in zip(rows, weights):
                acc.add(row, w)
            params.add_(acc.masked_mean(tau=case.tau), alpha=case.lr)
        return Prepared(fn, lambda: params)
    return build


def naive_step(params: torch.Tensor, updates: torch.Tensor, w: torch.Tensor, tau: float,
               lr: float) -> None:
    """The textbook formula, one full-size temporary after another."""
    A = torch.sign(updates).float().mean(0).abs()
    mean = (w[:, None] * updates.float()).sum(0)
    m = torch.where(A >= tau, 1, A)
    params += lr * m * mean


def build_naive(case: _harness.Case) -> Prepared:
    params = case.params0.clone()

    def fn():
        naive_step(params, case.updates, case.mean_weights32, case.tau, case.lr)
    return Prepared(fn, lambda: params)


def build_naive_compiled(case: _harness.Case) -> Prepared:
    """torch.compile of the naive formula, compiled afresh for this group (the first call,
    timed as ``first_call_s``, is the compilation)."""
    torch._dynamo.reset()
    compiled = torch.compile(naive_step, dynamic=False, fullgraph=True)
    params = case.params0.clone()

    def fn():
        compiled(params, case.updates, case.mean_weights32, case.tau, case.lr)
    return Prepared(fn, lambda: params)


def build_flower(case: _harness.Case) -> Prepared:
    """Flower's server-side FedAvg (``aggregate_arrayrecords``, what its FedAvg strategy calls
    on the clients' replies) on RecordDicts holding the same updates as one flat array each
    (the most favourable layout for it: one array per client), built outside the timing."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    records = [RecordDict({"arrays": ArrayRecord({"params": Array(row.cpu().numpy())}),
                           "metrics": MetricRecord({"num-examples": int(w)})})
               for row, w in zip(case.updates.unbind(0), case.weights)]
    result = {}

    def fn():
        result["out"] = aggregate_arrayrecords(records, "num-examples")
    return Prepared(fn, lambda: torch.from_numpy(result["out"]["params"].numpy()))


def build_declearn(case: _harness.Case) -> Prepared:
    """declearn's GradientMaskedAveraging aggregator: client-side ``prepare_for_sharing``
    (outside the timing), then the server's sum of the K shared updates, ``finalize_updates``
    and the step. Its agreement is weighted by the clients' step counts (here the weights)."""
    from declearn.aggregator import GradientMaskedAveraging
    from declearn.model.torch import TorchVector

    aggregator = GradientMaskedAveraging(threshold=case.tau, steps_weighted=True)
    shared = [aggregator.prepare_for_sharing(TorchVector({"params": row}), int(w))
              for row, w in zip(case.updates.unbind(0), case.weights)]
    params = case.params0.clone()

    def fn():
        total = functools.reduce(operator.add, shared)
        g = aggregator.finalize_updates(total).coefs["params"]
        params.add_(g, alpha=case.lr)
    return Prepared(fn, lambda: params)


_BF16_NUMPY = "numpy has no bfloat16: Flower's Array cannot carry bf16 updates"

CONTENDERS: dict[str, Contender] = {c.name: c for c in [
    Contender("gma_step[triton]", "gma_kernels.gma_step, fused Triton kernel, default "
              "non-finite guard", gma_step_contender("triton"), cuda_only=True,
              requires=("triton",)),
    Contender("gma_step[triton,unchecked]", "gma_step, Triton, nonfinite='unchecked' (no guard)",
              gma_step_contender("triton", "unchecked"), cuda_only=True, requires=("triton",)),
    Contender("gma_step[torch]", "gma_kernels.gma_step, chunked PyTorch backend, [K,N] tensor, "
              "default non-finite guard", gma_step_contender("torch")),
    Contender("gma_step[torch,unchecked]", "gma_step, PyTorch backend, nonfinite='unchecked'",
              gma_step_contender("torch", "unchecked")),
    Contender("gma_step[torch,pure]", "gma_step, PyTorch backend without the native CPU "
              "kernel (PyTorch ops on cache-sized chunks)",
              gma_step_contender("torch", native=False), cpu_only=True),
    Contender("gma_step[torch,list]", "gma_step, PyTorch backend, updates as a list of K "
              "1-D tensors", gma_step_contender("torch", layout="list")),
    Contender("accumulator[triton]", "streaming gma_kernels.Accumulator, Triton fold, "
              "one add per client + masked_mean + step", accumulator_contender("triton"),
              cuda_only=True, requires=("triton",)),
    Contender("accumulator[torch]", "streaming gma_kernels.Accumulator, PyTorch fold, "
              "one add per client + masked_mean + step", accumulator_contender("torch")),
    Contender("naive_eager", "the naive formula in eager PyTorch (sign/mean/where on full "
              "K x N temporaries)", build_naive),
    Contender("naive_compile", "torch.compile(naive formula, dynamic=False); compile time in "
              "extra_info.compile_s, not in the timings", build_naive_compiled, compiles=True),
    Contender("flower_fedavg", "Flower aggregate_arrayrecords (plain weighted FedAvg, no mask, "
              "no step), numpy on the host", build_flower, check="mean", host_side=True,
              requires=("flwr.serverapp.strategy.strategy_utils",), fp32_only=_BF16_NUMPY,
              max_bytes_cuda=1 << 30),
    Contender("declearn_gma", "declearn GradientMaskedAveraging: sum of shared updates + "
              "finalize_updates + step, in the updates' dtype", build_declearn,
              check="step_weighted", strict=False,
              requires=("declearn.aggregator", "declearn.model.torch")),
]}


# ----------------------------------------------------------------------------- the benchmark


def _tolerances(contender: Contender, dtype_name: str) -> dict:
    """Strict: every element within rtol 1e-5 and 1e-5 × the largest update element of the
    float64 reference. Loose (declearn): in fp32 a bounded fraction of near-tie mask flips and
    a relative L2 error of 1e-3; in bf16 (it sums in bf16) a sanity bound of 25%."""
    if contender.strict:
        return {"max_bad_fraction": 0.0, "max_rel_l2": 1e-5}
    if dtype_name == "fp32":
        return {"max_bad_fraction": 1e-3, "max_rel_l2": 1e-3}
    # bf16 sums of K weighted updates: 5-11% relative error measured at K=16-64; this bound
    # only catches a broken setup, the error itself is recorded and shown in the report
    return {"max_bad_fraction": 1.0, "max_rel_l2": 0.25}


def _skip_if_oom(err: BaseException) -> None:
    _harness.release_case()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    pytest.skip(f"out of memory: {str(err).splitlines()[0][:200]}")


def test_aggregation(benchmark, case_key, contender_name, copy_bw, session_first_calls,
                     machine, request):
    contender = CONTENDERS[contender_name]
    device, dtype_name, k, n = case_key
    try:
        case = _harness.get_case(*case_key)
        prepared = contender.build(case)
        dev = case.device
        first = _harness.timed_call(prepared.fn, dev)
    except torch.cuda.OutOfMemoryError as err:
        _skip_if_oom(err)

    # -- correctness, before any timing
    base = case.params0 if contender.check.startswith("step") else None
    errors = _harness.compare(prepared.output(), case.reference(contender.check), base)
    tol = _tolerances(contender, dtype_name)
    passed = (errors["bad_fraction"] <= tol["max_bad_fraction"]
              and errors["rel_l2_err"] <= tol["max_rel_l2"])
    benchmark.extra_info["correctness"] = {"reference": contender.check, **errors, **tol,
                                           "passed": passed}
    assert passed, (f"{contender_name} differs from the float64 reference "
                    f"({contender.check}): {errors}, tolerances {tol}")
    session_first_calls.setdefault(contender_name, (first, case.group))

    # -- peak extra memory, in a warm call whose time picks the number of rounds
    try:
        start = time.perf_counter()
        peak, method = _harness.peak_extra_memory(prepared.fn, dev, contender.host_side)
        estimate = time.perf_counter() - start
    except torch.cuda.OutOfMemoryError as err:
        _skip_if_oom(err)
    rounds = _harness.choose_rounds(estimate, request.config.getoption("--bench-rounds"))

    target = prepared.fn
    if dev.type == "cuda":
        def target():
            prepared.fn()
            torch.cuda.synchronize(dev)

    benchmark.group = case.group
    with _harness.HostLoad() as load:
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=1 if estimate < 0.5 else 0,
                           iterations=1)

    # the read-only pass over the same updates, timed right after: the honest roofline of a
    # read-dominated kernel (a copy's bandwidth counts a write too)
    floor = statistics.median(_harness.timed_call(case.updates.sum, dev) for _ in range(7))
    bw = copy_bw(dev)
    traffic = _harness.traffic_bytes(k, n, case.dtype)
    info = benchmark.extra_info
    info.update(contender=contender_name, description=contender.description, device=device,
                device_name=_harness.device_name(dev), dtype=dtype_name, K=k, N=n,
                group=case.group, tau=case.tau, lr=case.lr, bytes=traffic,
                rounds=rounds, peak_extra_bytes=peak, peak_extra_per_N4=peak / (4 * n),
                memory_method=method, first_call_s=first,
                session_first_call_s=session_first_calls[contender_name][0],
                session_first_call_group=session_first_calls[contender_name][1],
                host_side=contender.host_side, **bw, **load.result, **machine)
    stats = getattr(benchmark.stats, "stats", None) if benchmark.stats else None
    if stats is not None:
        info.update(read_floor_s=floor, vs_read_floor=stats.median / floor)
        info.update(median_s=stats.median, min_s=stats.min, mean_s=stats.mean,
                    stddev_s=stats.stddev, iqr_s=stats.iqr,
                    gbps=traffic / stats.median / 1e9,
                    frac_copy_bw=traffic / stats.median / 1e9 / bw["copy_gbps"])
        if contender.compiles:
            info["compile_s"] = max(0.0, first - stats.median)
    if dev.type == "cuda" and not contender.host_side:
        per_call = _harness.back_to_back(prepared.fn)
        info.update(b2b_s=per_call, b2b_gbps=traffic / per_call / 1e9,
                    b2b_frac_copy_bw=traffic / per_call / 1e9 / bw["copy_b2b_gbps"])
