"""Dropbox content hashes of local files and byte ranges, computed while the bytes are read
for something else whenever possible.

The algorithm itself is the SDK's `dropbox.content_hash.DropboxContentHasher` (a pure hash
class, not an API call, so importing it here keeps SDK calls inside dropbox_client.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from dropbox.content_hash import DropboxContentHasher

BLOCK_SIZE = DropboxContentHasher.BLOCK_SIZE  # 4 MiB
READ_SIZE = 8 * 1024 * 1024


class ContentHasher:
    """Content hash and SHA-256 of the same bytes, fed once.

    The SDK hasher copies each slice; feeding it whole 4 MiB blocks keeps that cheap.
    """

    def __init__(self, with_sha256: bool = False):
        self._content = DropboxContentHasher()
        self._sha256 = hashlib.sha256() if with_sha256 else None
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        data = bytes(data) if isinstance(data, memoryview) else data
        self._content.update(data)
        if self._sha256 is not None:
            self._sha256.update(data)
        self.size += len(data)

    def content_hash(self) -> str:
        return self._content.copy().hexdigest()

    def content_hash_with(self, data: bytes) -> str:
        """The content hash once `data` is added, leaving this hasher as it is."""
        probe = self._content.copy()
        probe.update(data)
        return probe.hexdigest()

    def sha256(self) -> str:
        if self._sha256 is None:
            raise ValueError("this hasher was created without SHA-256")
        return self._sha256.hexdigest()


def hash_range(path: Path, offset: int = 0, length: int | None = None, *, with_sha256: bool = False,
               progress: Callable[[int], None] | None = None) -> ContentHasher:
    """Hash `length` bytes of `path` from `offset` (the whole file by default)."""
    hasher = ContentHasher(with_sha256=with_sha256)
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


def bytes_content_hash(data: bytes) -> str:
    hasher = DropboxContentHasher()
    hasher.update(data)
    return hasher.hexdigest()
