"""Builds the optional native CPU kernel (plain C, loaded with ctypes). If no C compiler is at
hand the build is skipped and gma_kernels uses its pure-PyTorch CPU path instead.
``-ffp-contract=off``: no fused multiply-adds, so every instruction-set clone (AVX-512, AVX2,
baseline) rounds the same way and results do not depend on the machine. ``-fno-math-errno``:
``sqrtf`` need not set errno, so the optimizer step's loops vectorize (the values are the
same). ``-fno-wrapv``: undoes the ``-fwrapv`` of Python's own CFLAGS, under which signed loop
counters may wrap and many of the kernel's loops were not vectorized as well (measured in
docs/performance.md; the code never relies on signed overflow)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("gma_kernels.backends._gma_cpu",
                             ["gma_kernels/backends/csrc/gma_cpu.c"],
                             extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off",
                                                 "-fno-math-errno", "-fno-wrapv"],
                             optional=True)])
