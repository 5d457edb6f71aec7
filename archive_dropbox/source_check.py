"""Two things both uploads (API and desktop app) need to know about a local original:

- `check_unchanged`: it still has the size and modification time it was listed with. A file
  written to while it is read gives a copy that matches no version of it, so each upload
  checks before and after it reads.
- `WholeFileSha256`: a split file's SHA-256 (which its manifest records), carried from part to
  part while the parts are hashed in order in one run, so that the manifest needs no second
  read of a file of many terabytes.
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol

from .errors import FileProblem


class Listed(Protocol):
    """What the journal recorded of an original when it was listed (journal.Item has these)."""

    source: str
    source_size: int       # bytes
    source_mtime_ns: int   # st_mtime_ns


def check_unchanged(item: Listed, *, vanished: str, changed: str, problem: type[FileProblem] = FileProblem) -> None:
    """Raise `problem` unless `item.source` still has its listed size and st_mtime_ns.

    `vanished`: the message when it cannot be stat'ed, where "{reason}" stands for the system's
    words ("No such file or directory"); `changed`: the message when its size or time differ.
    The exception names `item.source` as its path."""
    try:
        info = os.stat(item.source)
    except OSError as exc:
        raise problem(vanished.format(reason=exc.strerror), paths=[item.source]) from None
    if (info.st_size, info.st_mtime_ns) != (item.source_size, item.source_mtime_ns):
        raise problem(changed, paths=[item.source])


class WholeFileSha256:
    """The SHA-256 of each split file, by source path, built from its parts in order.

    For each part: `begin(source, offset)` gives the hasher to feed the part's bytes to (or
    None: the parts before it were not hashed in this run), and `finish(source, end, sha)`
    records it once every byte up to `end` went in. `begin` hands out a copy, so a part whose
    hashing broke off (a read error, a retry) leaves the carried state as it was.
    `digest(source, size)` is the file's SHA-256 when all `size` bytes were carried, else None
    (then the caller reads the file once more). Not thread-safe: one caller per source."""

    def __init__(self) -> None:
        self._carried: dict[str, tuple[int, "hashlib._Hash"]] = {}  # source -> (bytes hashed, sha256)

    def begin(self, source: str, offset: int) -> "hashlib._Hash | None":
        carried = self._carried.get(source)
        if carried is not None and carried[0] == offset:
            return carried[1].copy()
        return hashlib.sha256() if offset == 0 else None

    def finish(self, source: str, end: int, sha: "hashlib._Hash") -> None:
        self._carried[source] = (end, sha)

    def digest(self, source: str, size: int) -> str | None:
        """Hex SHA-256 of the whole file, or None; the carried state stays (a retried manifest
        finds it again)."""
        carried = self._carried.get(source)
        return carried[1].hexdigest() if carried is not None and carried[0] == size else None
