"""``python -m gma_kernels``: the versions and backends it reports are this machine's."""
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import torch

from gma_kernels import __version__, info
from gma_kernels.backends import native


def run(**env):
    out = subprocess.run([sys.executable, "-m", "gma_kernels"], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True, timeout=120)
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.stdout.splitlines())


def test_the_report_names_this_machines_versions_and_backends():
    lines = run()
    assert lines["gma_kernels"].startswith(__version__)
    assert lines["torch"] == torch.__version__ and lines["numpy"] == np.__version__
    assert lines["native CPU kernel"].startswith("in use" if native.usable() else "not built")
    assert ("runs on CUDA" in lines["Triton kernel"]) == torch.cuda.is_available()
    assert lines["CUDA device"].startswith("none") != torch.cuda.is_available()
    if native.available():
        assert "switched off" in run(GMA_KERNELS_NATIVE="0")["native CPU kernel"]


def test_a_missing_native_kernel_or_triton_is_said_plainly(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    assert info.native_status().startswith("not built or not loadable")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert info.triton_status().startswith("not installed")


def test_the_clone_is_the_best_the_cpu_has(monkeypatch):
    if not native.available():
        return
    for flags, clone in (({"avx2", "avx512f"}, "avx512f"), ({"sse2", "avx2"}, "avx2"),
                         ({"sse2"}, "baseline")):
        monkeypatch.setattr(info, "_cpu_flags", lambda flags=flags: flags)
        assert f"instruction set: {clone}" in info.native_status()
