"""The dispatcher (``dispatch.py``): which backend a call runs on, that each is a ``Backend``,
the non-finite policy, and the density rescale's two passes."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import gma_kernels as gk
from gma_kernels import dispatch
from gma_kernels.backends import Backend, native, torch_ops, triton_kernel
from gma_kernels.batch import make_batch

from gk_util import BACKENDS, DEVICE, make


@pytest.mark.parametrize("backend", ["auto"])
def test_auto_backend_matches_explicit(backend):
    updates, _, w = make(24, 5, 2000, kind="list")
    explicit = "triton" if DEVICE.type == "cuda" else "torch"
    assert torch.equal(gk.masked_mean(updates, w, backend="auto"),
                       gk.masked_mean(updates, w, backend=explicit))


def test_the_backend_for_each_choice(monkeypatch):
    """"torch" on CPU is the C kernel when usable, else PyTorch ops; "triton" (on CPU only
    under the interpreter, as these tests run) the Triton kernels; "auto" Triton on CUDA."""
    cpu = torch.device("cpu")
    assert dispatch.resolve_backend("torch", cpu) is (native if native.usable() else torch_ops)
    monkeypatch.setattr(native, "ENABLED", False)
    assert dispatch.resolve_backend("torch", cpu) is torch_ops
    assert dispatch.resolve_backend("triton", DEVICE) is triton_kernel
    assert dispatch.resolve_backend("auto", cpu) is torch_ops
    with pytest.raises(ValueError, match="backend='gpu' is not one of"):
        dispatch.resolve_backend("gpu", cpu)


@pytest.mark.parametrize("module", [torch_ops, native, triton_kernel],
                         ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_every_backend_module_is_a_backend(module):
    """Each module has every entry point of ``Backend``, with its parameter names and kinds
    (keyword-only where the protocol's are)."""
    for name, method in inspect.getmembers(Backend, inspect.isfunction):
        if name.startswith("_"):
            continue
        want = [(p.name, p.kind) for p in inspect.signature(method).parameters.values()][1:]
        got = [(p.name, p.kind) for p in inspect.signature(getattr(module, name)).parameters.values()]
        assert got == want, name


def test_triton_on_cpu_without_interpreter_is_refused():
    code = textwrap.dedent("""
        import torch, gma_kernels as gk
        try:
            gk.masked_mean(torch.ones(2, 4), backend="triton")
        except ValueError as err:
            assert "backend='triton'" in str(err) and "TRITON_INTERPRET" in str(err), err
            print("REFUSED")
        # auto falls back to torch on CPU
        assert torch.equal(gk.masked_mean(torch.ones(2, 4)), torch.ones(4))
    """)
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "REFUSED" in out.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_policies_screen_the_clients(backend):
    """"raise" names every bad client, "drop" keeps the others, "unchecked" reads nothing."""
    updates, _, _ = make(7, 4, 300, kind="list")
    updates[1][5] = float("nan")
    updates[3][0] = float("inf")
    batch = make_batch(updates, None)
    impl = dispatch.resolve_backend(backend, DEVICE)

    def screen(policy):
        return dispatch.screen_nonfinite(impl, batch, policy, name=lambda k: f"client {k}",
                                         untouched="nothing written")

    with pytest.raises(gk.NonFiniteError, match="client 1, client 3 contain .*nothing written"):
        screen("raise")
    assert screen("drop") == [0, 2]
    assert screen("unchecked") == [0, 1, 2, 3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rescale_is_the_masked_mean_over_its_density(backend):
    """The two passes: ``g`` first, then ``g / (mean(m) + 1e-12)``, bit for bit; and the step
    on it is ``params + lr · g``."""
    updates, _, w = make(8, 5, 3001, kind="list")
    g, stats = gk.masked_mean(updates, w, backend=backend, return_stats=True)
    rescaled = gk.masked_mean(updates, w, rescale=True, backend=backend)
    density = stats.sums[:, 0].sum() / 3001
    assert torch.equal(rescaled, g * (1.0 / (density + 1e-12)))
    params = torch.zeros(3001, device=DEVICE)
    gk.gma_step(params, updates, w, lr=1.0, rescale=True, backend=backend)
    assert torch.equal(params, rescaled)
