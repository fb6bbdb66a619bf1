"""Memory: the resident set, its resettable high-water mark, glibc's allocator, the bytes a cache holds."""

from __future__ import annotations

import ctypes
import gc
import sys
from typing import Any

# glibc: every allocation above 128 KiB is its own mapping, returned to the system when freed, so the
# resident set follows the live tensors and the RSS growth of a step measures what it needs (with the
# default adaptive threshold, freed chunks linger in the heap and the high-water mark varies by +-100 MiB
# between identical runs). Set in the environment of the worker processes, before glibc reads it.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def status_kib(name: str) -> int | None:
    """A field of /proc/self/status in KiB (``VmRSS``, ``VmHWM``), None where unavailable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:  # not Linux: the callers fall back (ru_maxrss) or report 0
        return None
    return None


def rss_bytes() -> int:
    """Resident set size now (0 where /proc/self/status is unavailable)."""
    return (status_kib("VmRSS") or 0) * 1024


def peak_rss_bytes() -> int:
    """Resident set high-water mark since the last :func:`reset_peak_rss` (0 where unavailable)."""
    return (status_kib("VmHWM") or 0) * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        return False
    return True


def ru_maxrss_bytes() -> int:
    """The process's lifetime peak RSS from ``getrusage`` (cannot be reset: the fallback of :func:`peak_rss_bytes`)."""
    import resource  # Unix only: imported here so that importing this module works everywhere

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def set_malloc_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """glibc's ``mallopt(M_MMAP_THRESHOLD)`` and ``mallopt(M_TRIM_THRESHOLD)``; False where unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, mmap_threshold)) and bool(libc.mallopt(-1, trim_threshold))
    except (OSError, AttributeError):
        return False


def release_free_memory() -> None:
    """Collect garbage and return the C heap's free pages to the system (glibc)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cache_sizes(cache: Any) -> tuple[int, int]:
    """``(bytes held, bytes allocated)`` of a cache's keys and values (a growing layer's headroom counts).

    Held bytes are the library's count (``kv_bytes``: a ragged layer's heads' real lengths).
    """
    from kvpress_mm.cache.surgery import kv_bytes

    held = allocated = 0
    for layer in getattr(cache, "layers", ()):
        layer_held = kv_bytes(layer)
        allocated_bytes = getattr(layer, "allocated_bytes", None)
        held += layer_held
        allocated += int(allocated_bytes()) if callable(allocated_bytes) else layer_held
    return held, allocated
