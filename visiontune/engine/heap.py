"""The C heap under PyTorch's CPU tensors: glibc's malloc, tuned for training's large, short-lived blocks."""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
# Blocks up to this size stay in the heap once freed. ``python bench/heap.py`` (one epoch each, 2 cores, medians of 3):
# ``full`` on ants and bees 11.4 against 12.3 s (0.93x), peak memory 2.9-3.0 against 2.4-2.6 GB; Mask R-CNN on 48
# Penn-Fudan images 14.8 against 16.5 s (0.90x), 2.6-2.8 against 2.6-2.7 GB. 1 GB trained no faster and held more
# (``full`` 3.0-3.4 GB); 64 MB gained nothing.
CEILING = 128 << 20


def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed blocks of up to 128 MB for the next allocation instead of unmapping them.

    By default a block above 32 MB is mapped when allocated and unmapped when freed, so each training step faults in
    its large activations again (a 51 MB tensor of Mask R-CNN's RoI features: 12 ms to allocate and zero, 2 ms when
    kept); measured above ``CEILING``. ``release_free_memory`` still returns the pages between phases.
    Elsewhere (not glibc), nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(CEILING))
        libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(CEILING))
    except (OSError, AttributeError):
        pass


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim), between phases that allocate differently.

    A training epoch leaves ~1 GB of freed activations in glibc's arenas; without this, validation's larger batches
    come on top of them (one full epoch over 300 images: peak RSS 3.1-3.3 GB without, 2.7-2.8 GB with it).
    Elsewhere (not glibc), nothing."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
