"""Memory checks before large allocations: refuse with a clear message instead of being killed.

A 30000 x 30000 image's probabilities alone take 3.4 GiB as float32; numpy reserves such arrays
lazily, so running out of memory would surface later as the operating system killing the
process (taking a napari session and its unsaved edits with it). Callers ask
:func:`require_memory` first. Torch-free.
"""

from __future__ import annotations

import os
import sys

from .errors import R2UNetError

GIB = 1024**3
HEADROOM = 0.85  # never plan to use more than this share of the memory that is free now


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now, or None if unknown on this system."""
    if sys.platform.startswith("linux"):  # what psutil reads too, without its 8 ms import on the first image
        try:
            with open("/proc/meminfo") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    try:
        import psutil  # optional: exact on every platform

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def require_memory(nbytes: int, what: str, hint: str) -> None:
    """Raise :class:`R2UNetError` if ``nbytes`` more would not fit in the memory free now."""
    free = available_memory()
    if free is None or nbytes <= HEADROOM * free:
        return
    raise R2UNetError(f"{what} needs about {nbytes / GIB:.1f} GiB of memory but only {free / GIB:.1f} GiB is free; {hint}")
