"""What this install of gma_kernels can use here (``python -m gma_kernels``), in the manner of
``torch.utils.collect_env``: versions, the native CPU kernel, Triton, the CUDA device."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from pathlib import Path

import torch

from . import __version__
from .backends import native

#: the native kernel's instruction-set clones (``target_clones`` in ``csrc/gma_cpu.c``), best
#: first; the CPU runs the first one whose flag it has
NATIVE_CLONES = ("avx512f", "avx2")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux's ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def native_status() -> str:
    """One line: whether the native CPU kernel is built, loaded and on, and its clone here."""
    if not native.available():
        return ("not built or not loadable: the CPU path runs in PyTorch (reinstall with a C "
                "compiler at hand to build it)")
    flags = _cpu_flags()
    clone = next((c for c in NATIVE_CLONES if c in flags), "baseline" if flags else "unknown")
    state = "in use" if native.usable() else "built, but switched off by GMA_KERNELS_NATIVE=0"
    return f"{state}; instruction set: {clone} ({platform.machine()})"


def triton_status() -> str:
    """One line: whether the Triton kernel can run here, on a GPU or only in the interpreter."""
    if importlib.util.find_spec("triton") is None:
        return "not installed (pip install triton): GPU tensors use the PyTorch path"
    if torch.cuda.is_available():
        return f"{_version('triton')}: the fused kernel runs on CUDA tensors"
    return (f"{_version('triton')}, no CUDA device: only through the interpreter "
            "(TRITON_INTERPRET=1, on CPU tensors)")


def cuda_status() -> str:
    if not torch.cuda.is_available():
        return f"none (torch built for CUDA {torch.version.cuda})" if torch.version.cuda \
            else "none (a CPU-only torch)"
    props = torch.cuda.get_device_properties(0)
    return (f"{torch.cuda.device_count()} × {props.name}, {props.total_memory / 2**30:.0f} GiB, "
            f"compute capability {props.major}.{props.minor}, CUDA {torch.version.cuda}")


def report() -> str:
    """The lines ``python -m gma_kernels`` prints."""
    rows = [("gma_kernels", f"{__version__} ({Path(__file__).parent})"),
            ("python", platform.python_version()), ("torch", torch.__version__),
            ("triton", _version("triton")), ("numpy", _version("numpy")),
            ("native CPU kernel", native_status()), ("Triton kernel", triton_status()),
            ("CUDA device", cuda_status())]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
