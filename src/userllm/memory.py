"""Process memory on Linux: the resident set, and handing freed heap pages back to the operating system.

Used below every layer that measures or bounds memory: the memory available sizes training micro-batches and
scoring and serving batches (:func:`usable_bytes`), ``bench.measure`` measures a request's peak above the
live working set, and ``tasks.experiment`` keeps each cell's peak from stacking on the last one's freed heap.
"""

from __future__ import annotations

import ctypes
import gc
import os


def release_memory() -> bool:
    """Collect garbage, then return freed heap pages to the OS (glibc ``malloc_trim``): glibc keeps freed
    pages mapped (once large blocks have been freed its dynamic mmap threshold rises and later ones come from
    the heap), so without a trim they count in the resident set until reused. True where there was a glibc
    to trim; False elsewhere (macOS, musl), where there is nothing to do."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def rss_bytes() -> int:
    """This process's resident set size in bytes (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int:
    """Memory this process may still take: the system's available memory (``MemAvailable``), or less where a
    cgroup (a container's limit) or this process's own limit (``ulimit -d``/``-v``: ``RLIMIT_DATA``,
    ``RLIMIT_AS``, less what it has already mapped) leaves less."""
    import resource

    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    free = info.get("MemAvailable", info.get("MemFree", 0))
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    with open("/proc/self/status") as f:
        mapped = {
            line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(("VmData", "VmSize"))
        }
    for kind, field in ((resource.RLIMIT_DATA, "VmData"), (resource.RLIMIT_AS, "VmSize")):
        soft = resource.getrlimit(kind)[0]
        if soft != resource.RLIM_INFINITY and field in mapped:
            free = min(free, soft - mapped[field])
    return max(0, free)


# beyond the estimates: the allocator's arenas and fragmentation, a step's own buffers (about 80 MB measured
# under RLIMIT_DATA in tests/tasks/test_memory.py's setting)
RESERVED = 128 * 2**20


def usable_bytes(available: int | None = None) -> int:
    """What batches are sized to by default: 80% of the memory available (``available``, else
    :func:`available_bytes` now) less a fixed :data:`RESERVED`, which matters only under a tight limit."""
    available = available_bytes() if available is None else available
    return int(0.8 * max(0, available - RESERVED))


def memory_budget(
    max_memory_gb: float | None, flag: str = "max_memory_gb", available: int | None = None
) -> tuple[int, str]:
    """The bytes batches are sized to, and where the figure comes from: ``max_memory_gb`` (named ``flag`` in
    messages) when set, else :func:`usable_bytes` (of ``available``, when given)."""
    if max_memory_gb is not None:
        return int(max_memory_gb * 2**30), f"{flag} {max_memory_gb:g}"
    return usable_bytes(available), "the memory available"


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
