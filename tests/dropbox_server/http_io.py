"""Request-body streaming for the Dropbox test server (test infrastructure only).

One job: read an HTTP request body (Content-Length or chunked) from the connection in bounded
slices, throttled by the connection's bandwidth cap, hashing it in Dropbox's 4 MiB blocks and
writing it straight to disk at a file offset — so a 150 MiB append never sits in memory — and
trigger the "drop mid-body" fault at the chosen byte.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .storage import BLOCK, block_digests_hash

READ_SLICE = 1 << 20
# Windows opens descriptors in text mode unless told otherwise (\n would become \r\n).
WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0)


def write_at(fd: int, data, offset: int) -> int:
    """os.pwrite where it exists; Windows has none, and each descriptor here serves one
    request on one thread, so a seek on it followed by a write is just as safe."""
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.write(fd, data)


def read_at(fd: int, size: int, offset: int) -> bytes:
    """os.pread, or a seek and a read on a descriptor used by one thread only."""
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, size)


class ClientGone(Exception):
    """The client closed the connection before sending the whole body."""


class DropConnection(Exception):
    """A fault asks for the connection to be cut now."""


class BadFraming(Exception):
    """Malformed chunked encoding."""


class BlockHasher:
    """Per-4-MiB-block SHA-256 digests of a byte stream (Dropbox's content-hash building
    blocks); the content hash is the SHA-256 of their concatenation."""

    def __init__(self):
        self.digests: list[bytes] = []
        self._hash = hashlib.sha256()
        self._pos = 0

    def update(self, data) -> None:
        view, i = memoryview(data), 0
        while i < len(view):
            take = min(BLOCK - self._pos, len(view) - i)
            self._hash.update(view[i:i + take])
            self._pos += take
            i += take
            if self._pos == BLOCK:
                self.digests.append(self._hash.digest())
                self._hash, self._pos = hashlib.sha256(), 0

    def finish(self) -> list[bytes]:
        if self._pos:
            self.digests.append(self._hash.digest())
            self._hash, self._pos = hashlib.sha256(), 0
        return self.digests


@dataclass
class BodyResult:
    nbytes: int
    digests: list = field(default_factory=list)
    too_long: bool = False

    @property
    def content_hash(self) -> str:
        return block_digests_hash(self.digests)


class RequestBody:
    def __init__(self, rfile, length: Optional[int], chunked: bool, throttle, sock=None):
        """`sock`: the connection's socket, read directly once `rfile` (the buffered reader the
        headers came through) holds no more of a Content-Length body: each read of a TLS socket
        yields one record (16 KiB), and the buffered reader's and socket file's Python layers
        around every record cost the server a quarter of its CPU at 100 MiB/s."""
        self._rfile = rfile
        self._sock = None if chunked else sock
        self._direct = False
        self.length = None if chunked else (length or 0)
        self.chunked = chunked
        self._throttle = throttle
        self.received = 0
        self.drop_at: Optional[int] = None
        self._chunk_left = 0
        self._eof = not chunked and not length

    @property
    def finished(self) -> bool:
        return self._eof

    def _read_into(self, view: memoryview) -> int:
        """Read up to len(view) body bytes; 0 means the body is complete."""
        if self._eof:
            return 0
        if self.chunked:
            if self._chunk_left == 0:
                self._chunk_left = self._next_chunk_size()
                if self._chunk_left == 0:
                    self._eof = True
                    return 0
            want = min(len(view), self._chunk_left)
        else:
            want = min(len(view), self.length - self.received)
        want = min(want, self._throttle.chunk_size(READ_SLICE))
        if self.drop_at is not None:
            want = max(1, min(want, self.drop_at - self.received))
        n = self._readinto(view[:want])
        if not n:
            raise ClientGone()
        self.received += n
        self._throttle.spend(n)
        if self.drop_at is not None and self.received >= self.drop_at:
            raise DropConnection()
        if self.chunked:
            self._chunk_left -= n
            if self._chunk_left == 0 and self._rfile.readline(8) not in (b"\r\n", b"\n"):
                raise BadFraming("missing CRLF after chunk")
        elif self.received >= self.length:
            self._eof = True
        return n

    def _readinto(self, view: memoryview) -> int:
        """Up to len(view) bytes of the stream (all of them once read from the socket itself); 0
        at its end."""
        if self._direct:
            # The TLS object's own read, where there is one: SSLSocket.recv_into adds two Python
            # calls per record around it (a tenth of the server's CPU at 100 MiB/s). A ragged end
            # then raises ssl.SSLError instead of reading as the end: a dropped connection either way.
            read = getattr(self._sock, "_sslobj", None)
            read = read.read if read is not None else lambda size, into: self._sock.recv_into(into, size)
            filled, size = 0, len(view)
            while filled < size:
                n = read(size - filled, view[filled:])
                if not n:
                    break
                filled += n
            return filled
        if self._sock is None:
            return self._rfile.readinto(view)
        held = len(self._rfile.peek())  # what the reader holds (one read of the socket if nothing)
        if held > len(view):
            return self._rfile.readinto(view)
        # Emptying the reader: the rest of the body is read from the socket itself, and the next
        # request's headers through the (empty) reader again.
        self._direct = bool(held)
        return self._rfile.readinto(view[:held]) if held else 0

    def _next_chunk_size(self) -> int:
        line = self._rfile.readline(1024)
        if not line:
            raise ClientGone()
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadFraming("bad chunk size line")
        if size == 0:
            # Trailer section ends with an empty line.
            while self._rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                pass
        return size

    def consume(self, path: Optional[Path], offset: int, limit: Optional[int] = None) -> BodyResult:
        """Read the rest of the body, writing it to `path` at `offset` (when given) and hashing
        it. Past `limit` bytes the rest is drained and `too_long` is set."""
        hasher = BlockHasher()
        fd = os.open(path, WRITE_FLAGS, 0o644) if path is not None else None
        buf = bytearray(READ_SLICE)
        view = memoryview(buf)
        written = 0
        try:
            while True:
                n = self._read_into(view)
                if not n:
                    break
                if limit is not None and written + n > limit:
                    self.drain()
                    return BodyResult(self.received, [], too_long=True)
                chunk = view[:n]
                hasher.update(chunk)
                if fd is not None:
                    done = 0
                    while done < n:
                        done += write_at(fd, chunk[done:], offset + written + done)
                written += n
        finally:
            if fd is not None:
                os.close(fd)
        return BodyResult(written, hasher.finish())

    def read_bytes(self, limit: int) -> Optional[bytes]:
        """The whole body in memory (RPC arguments, forms); None when it exceeds `limit`."""
        out = bytearray()
        buf = bytearray(64 * 1024)
        view = memoryview(buf)
        while True:
            n = self._read_into(view)
            if not n:
                return bytes(out)
            out += view[:n]
            if len(out) > limit:
                self.drain()
                return None

    def drain(self) -> int:
        buf = bytearray(READ_SLICE)
        view = memoryview(buf)
        total = 0
        while True:
            n = self._read_into(view)
            if not n:
                return total
            total += n


class FileSliceBody:
    """A byte range of a file standing in for a request body, so that each entry of an
    upload_session/append_batch request goes through the same append rules as its own request."""

    def __init__(self, source: Path, start: int, length: int):
        self._source, self._start = source, start
        self.length = length
        self.received = length

    def consume(self, path: Optional[Path], offset: int, limit: Optional[int] = None) -> BodyResult:
        if limit is not None and self.length > limit:
            return BodyResult(self.length, [], too_long=True)
        hasher = BlockHasher()
        done = 0
        with open(self._source, "rb") as source:
            fd = os.open(path, WRITE_FLAGS, 0o644) if path is not None else None
            try:
                while done < self.length:
                    chunk = read_at(source.fileno(), min(READ_SLICE, self.length - done), self._start + done)
                    if not chunk:
                        break
                    hasher.update(chunk)
                    if fd is not None:
                        write_at(fd, chunk, offset + done)
                    done += len(chunk)
            finally:
                if fd is not None:
                    os.close(fd)
        return BodyResult(done, hasher.finish())
