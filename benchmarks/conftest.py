"""pytest-benchmark configuration of the aggregation benchmarks.

Run with ``pytest benchmarks --benchmark-only`` (see README.md beside this file). The grid is
one benchmark group per (device, dtype, K, N); the options below narrow it.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile

# torch.compile's compile time is recorded cold: inductor gets a fresh cache folder per session
# unless the caller chose one (set before torch._inductor is first imported).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _INDUCTOR_CACHE = tempfile.mkdtemp(prefix="gma-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE
else:
    _INDUCTOR_CACHE = None

import pytest  # noqa: E402
import torch  # noqa: E402

import _harness  # noqa: E402

K_VALUES = (2, 8, 16, 64, 256)
N_EXPONENTS_CPU = (16, 18, 20, 22)
N_EXPONENTS_CUDA = (16, 18, 20, 22, 24, 26)
#: torch.compile on CPU costs ~30 s per shape: only these groups by default ("few")
CPU_COMPILE_GROUPS = {("fp32", 16, 1 << 22), ("bf16", 16, 1 << 22), ("fp32", 64, 1 << 20)}
CPU_MAX_INPUT_BYTES = int(1.5 * (1 << 30))     # K·N·4 above this: the group is skipped on CPU


def pytest_addoption(parser):
    group = parser.getgroup("gma-bench", "gma-kernels aggregation benchmarks")
    group.addoption("--bench-device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="auto: CPU, plus CUDA when torch.cuda.is_available()")
    group.addoption("--bench-k", default="", help="comma-separated K values (default: all)")
    group.addoption("--bench-n", default="",
                    help="comma-separated log2(N) values (default: 16,18,20,22; "
                         "CUDA adds 24,26)")
    group.addoption("--bench-dtype", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    group.addoption("--bench-contenders", default="",
                    help="comma-separated substrings; a contender runs if its name holds one")
    group.addoption("--bench-compile", default="auto", choices=("auto", "few", "all", "none"),
                    help="which groups run torch.compile: few (CPU default: K=16 N=2^22 both "
                         "dtypes, K=64 N=2^20 fp32), all (CUDA default), none")
    group.addoption("--bench-rounds", type=int, default=0,
                    help="timed rounds per benchmark (default 0: 10 for fast calls down to 3 "
                         "for calls over a second)")
    group.addoption("--bench-max-gib", type=float, default=CPU_MAX_INPUT_BYTES / (1 << 30),
                    help="skip CPU groups whose K·N·4 bytes exceed this (GiB)")
    group.addoption("--bench-threads", type=int, default=0,
                    help="torch.set_num_threads for the session (default: torch's default)")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def pytest_configure(config):
    threads = config.getoption("--bench-threads", default=0)
    if threads:
        torch.set_num_threads(threads)


def pytest_sessionfinish(session, exitstatus):
    if _INDUCTOR_CACHE is not None:
        shutil.rmtree(_INDUCTOR_CACHE, ignore_errors=True)


def _devices(config) -> list[str]:
    choice = config.getoption("--bench-device")
    cuda = torch.cuda.is_available()
    if choice == "cpu":
        return ["cpu"]
    if choice == "cuda":
        return ["cuda"] if cuda else []
    return ["cpu", "cuda"] if cuda else ["cpu"]


def _cuda_input_cap() -> int:
    """K·N·4 bytes above which a CUDA group is skipped: 40% of the GPU's memory (the naive
    contenders need about twice the input again)."""
    return int(0.4 * torch.cuda.get_device_properties(0).total_memory)


def pytest_generate_tests(metafunc):
    """Parametrize ``case_key`` × ``contender_name`` for tests that ask for both, group-major
    so that the contenders of one group run one after the other on the same inputs."""
    if not {"case_key", "contender_name"} <= set(metafunc.fixturenames):
        return
    config = metafunc.config
    contenders = metafunc.module.CONTENDERS
    wanted = [s for s in config.getoption("--bench-contenders").split(",") if s.strip()]
    ks = _ints(config.getoption("--bench-k")) or list(K_VALUES)
    dtypes = [d.strip() for d in config.getoption("--bench-dtype").split(",") if d.strip()]
    for d in dtypes:
        if d not in _harness.DTYPES:
            raise pytest.UsageError(f"--bench-dtype: unknown dtype {d!r} (fp32, bf16, fp16)")
    compile_choice = config.getoption("--bench-compile")
    cpu_cap = int(config.getoption("--bench-max-gib") * (1 << 30))
    params, ids = [], []
    for device in _devices(config):
        exps = _ints(config.getoption("--bench-n")) or list(
            N_EXPONENTS_CUDA if device == "cuda" else N_EXPONENTS_CPU)
        for dtype_name in dtypes:
            for k in ks:
                for e in exps:
                    n = 1 << e
                    size_reason = None
                    if device == "cpu" and k * n * 4 > cpu_cap:
                        size_reason = (f"K*N*4 = {k * n * 4 / (1 << 30):.1f} GiB exceeds the "
                                       f"CPU cap of {cpu_cap / (1 << 30):.1f} GiB")
                    elif device == "cuda" and k * n * 4 > _cuda_input_cap():
                        size_reason = f"K*N*4 = {k * n * 4 / (1 << 30):.1f} GiB: too big for the GPU"
                    for name, contender in contenders.items():
                        if wanted and not any(s in name for s in wanted):
                            continue
                        reason = size_reason or contender.skip_reason(device, dtype_name, k, n)
                        if reason is None and contender.compiles:
                            reason = _compile_skip(compile_choice, device, dtype_name, k, n)
                        key = (device, dtype_name, k, n)
                        marks = [pytest.mark.skip(reason=reason)] if reason else []
                        params.append(pytest.param(key, name, marks=marks))
                        ids.append(f"{device}-{dtype_name}-K{k}-N2^{e}-{name}")
    metafunc.parametrize(("case_key", "contender_name"), params, ids=ids)


def _compile_skip(choice: str, device: str, dtype_name: str, k: int, n: int) -> str | None:
    if choice == "auto":
        choice = "all" if device == "cuda" else "few"
    if choice == "none":
        return "torch.compile disabled (--bench-compile=none)"
    if choice == "few" and (dtype_name, k, n) not in CPU_COMPILE_GROUPS:
        groups = ", ".join(f"{d} K={k} N=2^{log2(n)}" for d, k, n in sorted(CPU_COMPILE_GROUPS))
        return (f"torch.compile costs ~30 s per shape on CPU: only {groups} by default "
                f"(--bench-compile=all for every group)")
    return None


@pytest.fixture(scope="session")
def copy_bw():
    """``copy_bw(device)``: the session's copy bandwidth on that device, measured once."""
    measured: dict[str, dict] = {}

    def get(device: torch.device) -> dict:
        if device.type not in measured:
            measured[device.type] = _harness.copy_bandwidth(device)
        return measured[device.type]

    return get


@pytest.fixture(scope="session")
def session_first_calls():
    """The first call's time of each contender in this session (any group)."""
    return {}


@pytest.fixture(scope="session")
def machine():
    return _harness.machine_info()


def pytest_report_header(config):
    info = _harness.machine_info()
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"gma-bench: torch {info['torch_version']}, triton {info['triton_version']}, "
            f"flwr {info['flwr_version']}, declearn {info['declearn_version']}; "
            f"CPU {info['cpu']} x{info['cpu_count']} (torch threads {info['torch_threads']}); "
            f"CUDA {cuda}; host memory: {_harness.HOST_MEMORY_METHOD.split(':')[0]}")


def log2(n: int) -> int:
    return int(math.log2(n))
