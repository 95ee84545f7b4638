"""The allocator tuning (``fedsim.heap``): in ``reused_heap`` a freed large block stays in the
heap for reuse, where glibc's defaults hand it back to the OS."""
import subprocess
import sys

import pytest

from fedsim.heap import _glibc


_HEAP_PROBE = """
import ctypes, sys
import torch
from fedsim.heap import _glibc, reused_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = _glibc()
libc.mallinfo2.restype = MallInfo2

def probe():
    block = torch.empty(6 << 20)  # 24 MiB, as a large activation or gradient would be
    block.fill_(1.0)
    alive = libc.mallinfo2()
    del block
    freed = libc.mallinfo2()
    print(alive.hblkhd >> 20, freed.fordblks >> 20)  # MiB mapped apart; MiB free, kept

if sys.argv[1] == "reused":
    with reused_heap():
        probe()
else:
    probe()
"""


@pytest.mark.skipif(_glibc() is None, reason="reused_heap acts on glibc's malloc only")
def test_a_freed_block_stays_in_the_heap_for_reuse(cli):
    """Under glibc's defaults a fresh process maps a 24 MiB block apart and unmaps it when it
    is freed, so the next one is faulted in page by page again; in ``reused_heap`` (where
    ``run_experiment`` trains) it comes from the heap and stays there, free for the next
    step. (Page faults themselves vary with transparent huge pages; glibc's own accounting,
    ``mallinfo2``, does not.) Each case in a fresh process: the settings stay for the
    process."""
    env = cli("fedsim.run")[1]  # the environment that finds this checkout
    mib = {}
    for case in ("default", "reused"):
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, case], env=env,
                             capture_output=True, text=True, check=True)
        mib[case] = [int(v) for v in out.stdout.split()]
    assert mib["default"][0] >= 24, mib  # mapped apart: handed back to the OS when freed
    assert mib["reused"][0] < 24 and mib["reused"][1] >= 24, mib  # from the heap, kept
