"""Shared helpers of the gma_kernels tests: the device, random inputs in every layout, tolerances."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from gma_kernels.backends import native as _native

#: CUDA when present (the Triton kernel then runs compiled), else the CPU (Triton's interpreter,
#: enabled by tests/conftest.py before triton is imported).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
BACKENDS = ("torch", "triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("matrix", "list", "transposed", "rowslice", "strided_list", "row_views")
PARAM_DTYPES = pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
F64 = torch.float64
needs_native = pytest.mark.skipif(not _native.available(),
                                  reason="native CPU kernel not built (no C compiler at install)")
#: the two paths of backend="torch" on CPU (the ``path`` fixture of tests/gma_kernels/backends)
CPU_PATHS = [pytest.param("native", marks=needs_native), "torch_ops"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_values(g: torch.Generator, k: int, n: int, *, scale: float = 1.0,
                  zeros: float = 0.05) -> Tensor:
    """``[K, N]`` float64 values with a per-coordinate bias (so agreement varies from 0 to 1
    across coordinates), heavy-ish tails and a fraction of exact zeros (sign 0)."""
    bias = torch.randn(n, generator=g, dtype=F64) * torch.rand(n, generator=g, dtype=F64) * 2
    noise = torch.randn(k, n, generator=g, dtype=F64)
    spread = torch.exp(torch.randn(k, 1, generator=g, dtype=F64) * 0.5)  # clients differ in scale
    values = (bias + noise) * spread * scale
    if zeros > 0:
        values[torch.rand(k, n, generator=g, dtype=F64) < zeros] = 0.0
    return values


def random_weights(g: torch.Generator, k: int) -> list[float]:
    """Positive, very uneven raw weights (example counts), as Python floats."""
    return [float(x) for x in torch.randint(1, 1000, (k,), generator=g)]


def layout(values: Tensor, dtype: torch.dtype, kind: str, device=DEVICE):
    """The values (rounded to ``dtype``) laid out as ``kind``; returns (updates, float64 [K, N]
    of exactly the values the package reads)."""
    k, n = values.shape
    low = values.to(dtype)
    exact = low.to(F64)
    if kind == "matrix":
        out = low.to(device).contiguous()
    elif kind == "list":
        out = [low[i].clone().to(device) for i in range(k)]
    elif kind == "transposed":  # an [N, K] tensor's transpose: column-major rows, stride(1) = K
        out = low.t().contiguous().to(device).t()
        assert out.stride(1) == k or k == 1
    elif kind == "rowslice":  # a column slice of a wider tensor: unit stride, odd row offsets
        wide = torch.full((k, n + 7), 12345.0, dtype=dtype, device=device)
        wide[:, 3:3 + n] = low.to(device)
        out = wide[:, 3:3 + n]
        assert out.stride(1) == 1 and not out.is_contiguous()
    elif kind == "strided_list":  # 1-D views with stride 2 into a bigger buffer
        big = torch.full((k, 2 * n), -777.0, dtype=dtype, device=device)
        big[:, ::2] = low.to(device)
        out = [big[i, ::2] for i in range(k)]
        assert all(u.stride(0) == 2 for u in out)
    elif kind == "row_views":  # the rows of one matrix, passed as a list (views, not copies)
        mat = torch.empty((k, n + 1), dtype=dtype, device=device)
        mat[:, :n] = low.to(device)
        mat[:, n] = 99.0
        out = list(mat[:, :n].unbind(0))
    else:
        raise ValueError(kind)
    return out, exact


def make(seed: int, k: int, n: int, dtype=torch.float32, kind: str = "matrix", *,
         scale: float = 1.0, zeros: float = 0.05, weights: bool = True, device=DEVICE):
    """Random updates in ``kind`` layout on ``device``, their float64 values and raw weights
    (or None)."""
    g = gen(seed)
    values = random_values(g, k, n, scale=scale, zeros=zeros)
    w = random_weights(g, k) if weights else None
    updates, exact = layout(values, dtype, kind, device)
    return updates, exact, w


def snapshot(updates):
    """A deep copy of updates, to check that the package never writes into them."""
    if isinstance(updates, Tensor):
        return updates.clone()
    return [u.clone() for u in updates]


def assert_unchanged(updates, before) -> None:
    if isinstance(updates, Tensor):
        assert torch.equal(updates, before)
    else:
        for u, b in zip(updates, before):
            assert torch.equal(u, b)


def assert_close(actual: Tensor, expected: Tensor, *, scale: float, rtol: float = 1e-5,
                 atol: float = 1e-6) -> None:
    """``actual`` (any float dtype, any device) against the float64 reference, within
    ``rtol·|expected| + atol·scale`` (``scale``: the data's magnitude)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a = actual.detach().to("cpu", F64)
    e = expected.to("cpu", F64)
    assert torch.isfinite(a).all(), "non-finite output"
    tol = rtol * e.abs() + atol * scale
    err = (a - e).abs()
    bad = err > tol
    if bad.any():
        j = int((err - tol).argmax())
        raise AssertionError(f"{int(bad.sum())}/{a.numel()} elements off; worst at {j}: "
                             f"got {float(a[j])!r}, expected {float(e[j])!r}, tol {float(tol[j])!r}")


def assert_state_close(opt, model, step_scale: float) -> None:
    """A ``ServerOptimizer``'s params and state against the float64 ``reference.Optimizer``
    (``step_scale``: how far the reference's last step moved the params)."""
    assert_close(opt.params, model.params, scale=1.0 + step_scale)
    for s, r in zip(opt.states, model.states):
        assert_close(s, r, scale=float(r.abs().max()) + 1e-12)


def data_scale(exact: Tensor) -> float:
    s = float(exact.abs().max())
    return s if s > 0 else 1.0


def tie_columns(k: int, g: torch.Generator) -> Tensor:
    """``[K, n]`` float64 columns realising every sign count ``c`` in ``[-K, K]`` in every way
    (``P`` positive, ``Q`` negative, ``K − P − Q`` zero entries, shuffled), with random
    magnitudes so that the weighted mean is non-zero wherever ``P + Q > 0``."""
    cols = []
    for p in range(k + 1):
        for q in range(k + 1 - p):
            col = torch.zeros(k, dtype=F64)
            col[:p] = 1.0
            col[p:p + q] = -1.0
            cols.append(col[torch.randperm(k, generator=g)])
    signs = torch.stack(cols, 1)
    mags = 0.5 + torch.rand(signs.shape, generator=g, dtype=F64) * 1.5
    return signs * mags


def is_close_to_threshold(a: Tensor, tau: float, eps: float = 1e-5) -> Tensor:
    return (a - tau).abs() <= eps * max(1.0, abs(tau))


def assert_no_weighted_ties(exact: Tensor, weights, tau: float) -> None:
    """Weighted agreement is compared in float32 by the package: inputs of tests that compare
    its weighted mask with the float64 reference must stay clear of the threshold."""
    from reference import agreement
    a = agreement(exact, weights, weighted=True)
    assert not is_close_to_threshold(a, tau).any(), "pick another seed: weighted tie at tau"
