"""Memory for the API upload: the byte budget every buffer of file data is paid from, positioned
reads that several threads share on one file handle, and the glibc setting that gives a sent
chunk's memory back to the system at once."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import weakref

from .status import SLICE

CONNECTION_MEMORY = 256 * 1024  # bytes; measured: 8 connections in flight add about 1.3 MiB beyond the data


class ByteBudget:
    """Caps the file data held in memory across all threads: every buffer is paid for before it
    is read and refunded once Dropbox has it. Amounts in bytes; one larger than the capacity
    costs the whole capacity."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._used = 0
        self._peak = 0
        self._condition = threading.Condition()

    def take(self, count: int, wait: bool = True) -> bool:
        """Pay `count` bytes; without `wait`, False (and nothing paid) when they do not fit now."""
        count = min(count, self.capacity)
        with self._condition:
            while self._used + count > self.capacity:
                if not wait:
                    return False
                self._condition.wait(SLICE)  # in slices, so that Ctrl-C gets through on Windows
            self._used += count
            self._peak = max(self._peak, self._used)
            return True

    def give(self, count: int) -> None:
        count = min(count, self.capacity)
        with self._condition:
            self._used -= count
            self._condition.notify_all()

    @property
    def peak(self) -> int:
        return self._peak


def file_data_budget(memory_budget: int, connections: int, floor: int) -> ByteBudget:
    """The budget for file data out of `memory_budget` bytes, which covers the `connections`
    too (TLS buffers, response objects, thread stacks); never below `floor` bytes."""
    return_freed_buffers_at_once()
    return ByteBudget(max(memory_budget - connections * CONNECTION_MEMORY, floor))


def read_at(handle, position: int, size: int) -> bytes:
    """Up to `size` bytes from byte `position` of an open binary file; several threads can share
    the handle. Fewer bytes only at the end of the file."""
    if hasattr(os, "pread"):
        parts = []
        while size > 0:
            data = os.pread(handle.fileno(), size, position)
            if not data:
                break
            parts.append(data)
            position += len(data)
            size -= len(data)
        return b"".join(parts) if len(parts) != 1 else parts[0]
    with _handle_lock(handle):  # Windows has no pread: seek+read pairs on one handle take turns
        handle.seek(position)
        return handle.read(size)


# One lock per open file, not one for the process: workers reading different files (from a NAS,
# say) are never serialised with each other.
_HANDLE_LOCKS: "weakref.WeakKeyDictionary[object, threading.Lock]" = weakref.WeakKeyDictionary()
_HANDLE_LOCKS_GUARD = threading.Lock()


def _handle_lock(handle) -> threading.Lock:
    with _HANDLE_LOCKS_GUARD:
        lock = _HANDLE_LOCKS.get(handle)
        if lock is None:
            lock = _HANDLE_LOCKS[handle] = threading.Lock()
        return lock


def return_freed_buffers_at_once() -> None:
    """glibc raises its mmap threshold (up to 32 MiB) whenever a large buffer is freed, after
    which buffers of that size come from the heap, where freed ones stay in RSS. A fixed
    threshold keeps every chunk in a mapping of its own that goes back to the system the moment
    the chunk is sent, so the process's memory follows the byte budget."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass  # not glibc (musl returns large buffers to the system by itself)
