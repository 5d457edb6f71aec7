"""Dropbox content hashes of local files and byte ranges, computed while the bytes are read
for something else whenever possible.

The algorithm is Dropbox's (SHA-256 of the SHA-256 digests of 4 MiB blocks); the SDK's
`dropbox.content_hash.DropboxContentHasher` is the reference the tests compare against.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

BLOCK_SIZE = 4 * 1024 * 1024  # 4 MiB, Dropbox's block (the SDK's DropboxContentHasher.BLOCK_SIZE)
READ_SIZE = 8 * 1024 * 1024


class ContentHasher:
    """Content hash (and optionally SHA-256) of bytes fed once, in order.

    Written here rather than wrapping the SDK's hasher because it hashes memoryview slices
    without copying them and keeps the digests of the blocks since `mark()`: the content hash
    of one upload request, which Dropbox checks, then costs no second pass over the bytes.
    """

    def __init__(self, with_sha256: bool = False, tee=None):
        """`tee`: another hashlib object fed the same bytes (a split file's whole-file SHA-256
        carried across its parts)."""
        self.tee = tee
        self._overall = hashlib.sha256()
        self._block = hashlib.sha256()
        self._block_fill = 0
        self._marked: list[bytes] | None = []  # block digests since mark(); None: mark off a boundary
        self._sha256 = hashlib.sha256() if with_sha256 else None
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        position, length = 0, len(view)
        while position < length:
            take = min(BLOCK_SIZE - self._block_fill, length - position)
            self._block.update(view[position:position + take])
            self._block_fill += take
            position += take
            if self._block_fill == BLOCK_SIZE:
                digest = self._block.digest()
                self._overall.update(digest)
                if self._marked is not None:
                    self._marked.append(digest)
                self._block, self._block_fill = hashlib.sha256(), 0
        if self._sha256 is not None:
            self._sha256.update(view)
        if self.tee is not None:
            self.tee.update(view)
        self.size += length

    def mark(self) -> None:
        """Start a new request's worth of bytes (meaningful on a 4 MiB boundary only)."""
        self._marked = [] if self._block_fill == 0 else None

    def since_mark(self) -> str | None:
        """The content hash of the bytes fed since `mark()`, or None if it is not known."""
        if self._marked is None:
            return None
        result = hashlib.sha256(b"".join(self._marked))
        if self._block_fill:
            result.update(self._block.digest())
        return result.hexdigest()

    def content_hash(self) -> str:
        result = self._overall.copy()
        if self._block_fill:
            result.update(self._block.digest())
        return result.hexdigest()

    def sha256(self) -> str:
        if self._sha256 is None:
            raise ValueError("this hasher was created without SHA-256")
        return self._sha256.hexdigest()


def hash_range(path: Path, offset: int = 0, length: int | None = None, *, with_sha256: bool = False,
               progress: Callable[[int], None] | None = None, tee=None) -> ContentHasher:
    """Hash `length` bytes of `path` from `offset` (the whole file by default)."""
    hasher = ContentHasher(with_sha256=with_sha256, tee=tee)
    with open(path, "rb") as handle:
        handle.seek(offset)
        remaining = length
        while remaining is None or remaining > 0:
            want = READ_SIZE if remaining is None else min(READ_SIZE, remaining)
            data = handle.read(want)
            if not data:
                break
            hasher.update(data)
            if remaining is not None:
                remaining -= len(data)
            if progress is not None:
                progress(len(data))
    return hasher


def file_content_hash(path: Path) -> str:
    return hash_range(path).content_hash()


def bytes_content_hash(data: bytes | memoryview) -> str:
    hasher = ContentHasher()
    hasher.update(data)
    return hasher.content_hash()
