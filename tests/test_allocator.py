"""pipeline.core.allocator: applied on glibc Linux, skipped where the user chose an allocator setting."""
import os
import platform
import subprocess
import sys

import pytest

CODE = "from pipeline.core.allocator import tune_allocator as t; print(t(), t())"


def _run(code: str = CODE, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("PIPELINE_MALLOC", "GLIBC_TUNABLES", "LD_PRELOAD")
            and not k.startswith("MALLOC_")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                          check=True).stdout.split()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_applied_once_on_glibc():
    assert _run() == ["True", "True"]  # the second call reports the first's outcome


@pytest.mark.parametrize("env", [{"PIPELINE_MALLOC": "default"}, {"MALLOC_MMAP_THRESHOLD_": "1048576"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}])
def test_users_choice_wins(env):
    assert _run(**env) == ["False", "False"]


MMAPPED = """
import ctypes, torch
from pipeline.core.allocator import tune_allocator
tune_allocator()
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblkhd
x = torch.empty(64 * 2**20 // 4)  # a 64 MiB block: above glibc's largest mmap threshold
print(libc.mallinfo2().hblkhd - before >= 64 * 2**20)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_large_blocks_come_from_the_heap():
    """A block above the 32 MiB mmap ceiling is served from the heap (reused, no page faults per step),
    and by its own mmap without the tuning."""
    if not hasattr(__import__("ctypes").CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("glibc without mallinfo2 (< 2.33)")

    assert _run(MMAPPED)[-1] == "False"
    assert _run(MMAPPED, PIPELINE_MALLOC="default")[-1] == "True"
