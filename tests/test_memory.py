import platform
import sys

import pytest
import torch

from userllm.memory import available_bytes, release_memory, rss_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_release_memory_trims_the_glibc_heap():
    """Between experiment cells (and before a request's memory is measured) freed heap pages are handed back
    (malloc_trim): a freed large tensor's pages stop counting in the resident set."""
    big = torch.ones(1024 * 1024)
    del big  # a freed 4 MiB block raises glibc's mmap threshold above the blocks below
    release_memory()
    x = [torch.ones(64 * 1024) for _ in range(2048)]  # 512 MiB in 256 KiB blocks, now from the heap
    del x[::2]  # every other block freed: holes in the heap that only a trim returns
    before = rss_bytes()
    assert release_memory()
    assert rss_bytes() < before - 128 * 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_rss_counts_touched_memory():
    release_memory()  # else the new tensor may reuse heap pages earlier tests freed but glibc kept resident
    before = rss_bytes()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written
    assert rss_bytes() - before > 48 * 2**20
    del x


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA and /proc are Linux's")
def test_available_memory_respects_the_process_limit():
    """``ulimit -d``: what the process may still map is its limit less what it has mapped."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    with open("/proc/self/status") as f:
        mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData"))
    resource.setrlimit(resource.RLIMIT_DATA, (mapped + 64 * 2**20, hard))
    try:
        assert available_bytes() <= 64 * 2**20
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    assert available_bytes() > 64 * 2**20
