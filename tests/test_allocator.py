"""pipeline.core.allocator: applied on glibc Linux, skipped where the user chose an allocator setting."""
import os
import platform
import subprocess
import sys

import pytest

CODE = "from pipeline.core.allocator import tune_allocator as t; print(t(), t())"


def _run(**env):
    full = {k: v for k, v in os.environ.items() if k not in ("PIPELINE_MALLOC", "GLIBC_TUNABLES", "LD_PRELOAD")
            and not k.startswith("MALLOC_")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", CODE], env=full, capture_output=True, text=True,
                          check=True).stdout.split()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_applied_once_on_glibc():
    assert _run() == ["True", "True"]  # the second call reports the first's outcome


@pytest.mark.parametrize("env", [{"PIPELINE_MALLOC": "default"}, {"MALLOC_MMAP_THRESHOLD_": "1048576"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}])
def test_users_choice_wins(env):
    assert _run(**env) == ["False", "False"]
