"""Memory for the API upload: the byte budget every buffer of file data is paid from, request
bodies streamed from the file while they are sent (`FileRangeBody`), positioned reads that
several threads share on one file handle, and the glibc setting that gives a freed buffer's
memory back to the system at once."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import Callable, Iterator

from .dropbox_client import StreamedBody
from .localfs import read_into
from .status import SLICE

CONNECTION_MEMORY = 256 * 1024  # bytes; measured: 8 connections in flight add about 1.3 MiB beyond the data
# Bytes a streamed request body reads and sends at a time: what one request in flight holds of
# its file, whatever its size. TLS cuts it into 16 KiB records anyway; larger pieces only cost
# memory, smaller ones Python's per-piece overhead.
STREAM_PIECE = 1024 * 1024


class FileRangeBody(StreamedBody):
    """`length` bytes of the file at `path` from byte `position`, as an upload request's body
    (dropbox_client.StreamedBody): read STREAM_PIECE bytes at a time into one buffer while they
    are sent. Every sending opens the file anew, so senders never share a file position and a
    request sent again sends the same range from its start.

    `problem(error)`: the exception to raise when the file cannot be opened or read (`error`,
    the OSError) or ends before the range does (`error` None): raised in the middle of the
    request, which is then abandoned (the connection closed), so Dropbox applies nothing."""

    def __new__(cls, path: str | Path, position: int, length: int,
                problem: Callable[[OSError | None], Exception]):
        body = super().__new__(cls, length)
        body.path, body.position, body.problem = path, position, problem
        return body

    def pieces(self) -> Iterator[memoryview]:
        view = memoryview(bytearray(min(STREAM_PIECE, self.length)))
        try:
            handle = open(self.path, "rb", buffering=0)
        except OSError as exc:
            raise self.problem(exc) from None
        with handle:
            done = 0
            while done < self.length:
                want = min(len(view), self.length - done)
                try:
                    if not done:
                        handle.seek(self.position)
                    count = read_into(handle, view[:want])
                except OSError as exc:
                    raise self.problem(exc) from None
                if count < want:
                    raise self.problem(None)
                # The sender is done with a piece before it asks for the next: one buffer serves all.
                yield view[:count]
                done += count


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


def readinto_at(handle, view: memoryview, position: int) -> int:
    """Fill `view` from byte `position` of an open binary file; several threads can share the
    handle. The count is short only at the end of the file."""
    if hasattr(os, "preadv"):
        filled = 0
        while filled < len(view):
            count = os.preadv(handle.fileno(), [view[filled:]], position + filled)
            if not count:
                break
            filled += count
        return filled
    with _handle_lock(handle):  # no preadv (Windows): seek+read pairs on one handle take turns
        handle.seek(position)
        return read_into(handle, view)


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
    threshold keeps every large buffer (a small-file group's bytes, a streamed body's piece) in
    a mapping of its own that goes back to the system the moment it is sent, so the process's
    memory follows the byte budget."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass  # not glibc (musl returns large buffers to the system by itself)
