# -*- test-case-name: llmproxy.test.test_allocator -*-
"""
Tuning glibc's allocator for a process that copies large request bodies.

A large body is copied a few times on its way through (joined from the
received chunks, parsed, sent), and orjson's parser takes a scratch buffer
several times the size of its input (it touches only what it needs). By
default glibc serves every allocation of more than 128 KiB (a threshold it
raises to at most 32 MiB as it sees such blocks freed) with a fresh C{mmap},
and gives freed memory at the top of the heap back to the system soon after.
A fresh mapping is zero-filled page by page on first touch, so a 5 MB body
paid over 4,000 page faults: most of the proxy's overhead on a 5 MB request
in the benchmark (2x a direct connection before, about 1.3x after).

With the thresholds raised, those blocks come from the heap and freed ones
are reused. The cost is that up to L{TRIM_THRESHOLD} of freed memory may stay
with the process after a burst of large bodies instead of going back to the
system; peak memory is unchanged.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""C{mallopt} parameter numbers, from glibc's C{malloc.h}."""

MMAP_THRESHOLD = 64 * 1024 * 1024
"""
Blocks at least this large still get their own mapping. The parser's scratch
buffer for a body of a few MB is tens of MB, so the threshold sits above it.
"""

TRIM_THRESHOLD = 128 * 1024 * 1024
"""Free memory at the top of the heap kept for reuse before it is returned."""


def tune_allocator() -> bool:
    """
    Raise glibc's mmap and trim thresholds. Returns whether it could (not
    on a C library without C{mallopt}, such as musl or macOS's).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
