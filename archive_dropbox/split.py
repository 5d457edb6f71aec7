"""Large files as numbered parts: the part plan and names, the manifest that lets a join prove
it is complete and correct, and one-pass hashing while bytes are copied. Knows nothing of Dropbox.

Parts are called `<name>_split_0001`, `<name>_split_0002`, ... (the original tool's names, so
old parts still join); the manifest `<name>_split_manifest.json` sits next to them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import queue
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

from .errors import FileProblem

MiB = 1024 * 1024
# Dropbox hashes files in 4 MiB blocks and concurrent upload sessions append 4 MiB multiples,
# so parts that are 4 MiB multiples can be hashed and uploaded without re-blocking.
DROPBOX_BLOCK = 4 * MiB
# Big sequential reads and writes; small enough that a few buffers in flight cost little memory.
CHUNK = 8 * MiB

SPLIT_TAG = "_split_"
MANIFEST_SUFFIX = "_split_manifest.json"
MANIFEST_FORMAT = "archive-big-data-dropbox split manifest"
MANIFEST_VERSION = 1

_PART_NAME = re.compile(r"^(?P<base>.+)_split_(?P<number>[0-9]{4,})$", re.DOTALL)
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

Progress = Callable[[int], Any]


class SplitError(FileProblem):
    """A part or a manifest cannot be used; the message names it and says what to do."""

    title = "Split file problem"


# ----------------------------------------------------------------------------- names


def part_digits(count: int) -> int:
    """Digits in part numbers: 4, or more when there are more than 9999 parts, so that the
    names of one series all have the same length and sort in order."""
    return max(4, len(str(count)))


def part_name(name: str, index: int, count: int) -> str:
    """`big.mrc`, 1, 3 -> `big.mrc_split_0001` (index is 1-based)."""
    if not 1 <= index <= count:
        raise ValueError(f"part index {index} is outside 1..{count}")
    return f"{name}{SPLIT_TAG}{index:0{part_digits(count)}d}"


def parse_part_name(name: str) -> tuple[str, int] | None:
    """`big.mrc_split_0003` -> ('big.mrc', 3); None when the name is not a part's."""
    match = _PART_NAME.match(name)
    if match is None:
        return None
    return match.group("base"), int(match.group("number"))


def manifest_name(name: str) -> str:
    """`big.mrc` -> `big.mrc_split_manifest.json`."""
    return f"{name}{MANIFEST_SUFFIX}"


def parse_manifest_name(name: str) -> str | None:
    """`big.mrc_split_manifest.json` -> 'big.mrc'; None for any other name."""
    if name.endswith(MANIFEST_SUFFIX) and len(name) > len(MANIFEST_SUFFIX):
        return name[: -len(MANIFEST_SUFFIX)]
    return None


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PartPlan:
    """One part: its 1-based index, where it starts in the original, how long it is, its name."""

    index: int
    offset: int
    length: int
    name: str | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length


def split_part_size(part_limit: int) -> int:
    """The size of every part but the last: the limit, rounded down to a 4 MiB multiple when
    the limit is at least 4 MiB."""
    if part_limit < 1:
        raise ValueError("part_limit must be at least 1 byte")
    if part_limit >= DROPBOX_BLOCK:
        return part_limit // DROPBOX_BLOCK * DROPBOX_BLOCK
    return part_limit


def needs_split(size: int, part_limit: int) -> bool:
    return size > part_limit


def plan_split(size: int, part_limit: int, name: str | None = None) -> list[PartPlan]:
    """Cut `size` bytes into parts of at most `part_limit` bytes, all the same size but the last.

    A file of at most `part_limit` bytes is not split: the plan is then a single part covering
    the whole file, named like the file itself (`name`), and callers send the file as it is,
    without `_split_` names or a manifest. With `name`, every part carries its final name.
    """
    if size < 0:
        raise ValueError("size cannot be negative")
    part_size = split_part_size(part_limit)
    if not needs_split(size, part_limit):
        return [PartPlan(1, 0, size, name)]
    count = math.ceil(size / part_size)
    plan = []
    for index in range(1, count + 1):
        offset = (index - 1) * part_size
        plan.append(PartPlan(index, offset, min(part_size, size - offset),
                             part_name(name, index, count) if name is not None else None))
    return plan


def _named(plan: Sequence[PartPlan], name: str) -> list[PartPlan]:
    return [p if p.name else replace(p, name=part_name(name, p.index, len(plan))) for p in plan]


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ManifestPart:
    name: str
    offset: int
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a join needs to prove it rebuilt the original exactly."""

    original_name: str
    size: int
    sha256: str
    mtime: float
    part_size: int
    parts: tuple[ManifestPart, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "original_name": self.original_name,
            "size": self.size,
            "sha256": self.sha256,
            "mtime": self.mtime,
            "part_size": self.part_size,
            "parts": [{"name": p.name, "offset": p.offset, "size": p.size, "sha256": p.sha256}
                      for p in self.parts],
        }

    def to_bytes(self) -> bytes:
        """The manifest file's content (API uploads send this without writing a local file)."""
        return (json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plain_file_name_problem(name: Any) -> str | None:
    if not isinstance(name, str) or not name:
        return "has no file name"
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return f"names {name!r}, which is not a plain file name"
    if re.match(r"^[A-Za-z]:", name):
        return f"names {name!r}, which starts with a drive letter"
    return None


def _manifest_from_dict(data: Any) -> Manifest:
    """Check every field; raise ValueError with the first reason the manifest is unusable."""
    if not isinstance(data, dict):
        raise ValueError("it is not a JSON object")
    if data.get("format") != MANIFEST_FORMAT:
        raise ValueError("it is not a split manifest of this tool (the 'format' field is wrong)")
    version = data.get("version")
    if _is_int(version) and version > MANIFEST_VERSION:
        raise ValueError(f"it was written by a newer version of this tool (manifest version {version}); "
                         "update this copy of the tool")
    if version != MANIFEST_VERSION:
        raise ValueError(f"its version {version!r} is not {MANIFEST_VERSION}")
    name = data.get("original_name")
    problem = _plain_file_name_problem(name)
    if problem:
        raise ValueError(f"original_name {problem}")
    size, digest, mtime, part_size = (data.get(k) for k in ("size", "sha256", "mtime", "part_size"))
    if not _is_int(size) or size < 0:
        raise ValueError("'size' is not a whole number of bytes")
    if not isinstance(digest, str) or not _SHA256_HEX.match(digest):
        raise ValueError("'sha256' is not a SHA-256 in hexadecimal")
    if isinstance(mtime, bool) or not isinstance(mtime, (int, float)) or not math.isfinite(mtime):
        raise ValueError("'mtime' is not a time in seconds")
    if not _is_int(part_size) or part_size < 1:
        raise ValueError("'part_size' is not a positive whole number of bytes")
    raw_parts = data.get("parts")
    if not isinstance(raw_parts, list) or not raw_parts:
        raise ValueError("it lists no parts")
    parts = []
    offset = 0
    for index, raw in enumerate(raw_parts, start=1):
        if not isinstance(raw, dict):
            raise ValueError(f"part {index} is not a JSON object")
        expected_name = part_name(name, index, len(raw_parts))
        if raw.get("name") != expected_name:
            raise ValueError(f"part {index} is called {raw.get('name')!r} instead of {expected_name!r}")
        if raw.get("offset") != offset or not _is_int(raw.get("offset")):
            raise ValueError(f"part {expected_name} does not start where the part before it ends")
        part_bytes = raw.get("size")
        if not _is_int(part_bytes) or part_bytes < 0 or part_bytes > part_size:
            raise ValueError(f"part {expected_name} has an impossible size {part_bytes!r}")
        if not isinstance(raw.get("sha256"), str) or not _SHA256_HEX.match(raw["sha256"]):
            raise ValueError(f"part {expected_name} has no valid SHA-256")
        parts.append(ManifestPart(expected_name, offset, part_bytes, raw["sha256"]))
        offset += part_bytes
    if offset != size:
        raise ValueError(f"its parts add up to {offset:,} bytes, not the {size:,} bytes of the file")
    return Manifest(name, size, digest, float(mtime), part_size, tuple(parts))


def build_manifest(original_name: str, size: int, sha256: str, mtime: float,
                   plan: Sequence[PartPlan], part_sha256: Sequence[str],
                   part_size: int | None = None) -> Manifest:
    """The manifest of a split file, from its plan and the hashes `hash_parts` returned."""
    if len(plan) != len(part_sha256):
        raise ValueError("one SHA-256 per part is needed")
    named = _named(plan, original_name)
    data = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "original_name": original_name,
        "size": size, "sha256": sha256, "mtime": float(mtime),
        "part_size": part_size if part_size is not None else max([p.length for p in plan] + [1]),
        "parts": [{"name": p.name, "offset": p.offset, "size": p.length, "sha256": h}
                  for p, h in zip(named, part_sha256)],
    }
    try:
        return _manifest_from_dict(data)
    except ValueError as exc:
        raise ValueError(f"inconsistent manifest for {original_name}: {exc}") from None


def parse_manifest(content: bytes | str, where: str) -> Manifest:
    """Read a manifest's content (`where` names it in messages, e.g. a path or Dropbox path)."""
    try:
        data = json.loads(content)
        return _manifest_from_dict(data)
    except (ValueError, UnicodeDecodeError) as exc:
        reason = "it is not valid JSON" if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise SplitError(
            f"The split manifest {where} cannot be used: {reason}. It should have been written by "
            "this tool next to the parts: copy or download it again. If it is lost, delete it and "
            "the parts will be joined by their numbers only, without verification.",
            paths=[where]) from None


def read_manifest(path: Path | str) -> Manifest:
    path = Path(path)
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise SplitError(f"The split manifest {path} cannot be read ({exc.strerror}).", paths=[path]) from None
    return parse_manifest(content, str(path))


# ----------------------------------------------------------------------------- hashing engine


class Digester:
    """SHA-256 of a stream of bytes and/or of its numbered pieces, computed in background
    threads so that hashing overlaps reading and writing.

    Bytes arrive in order, either as buffers taken from `buffer()` and handed back with
    `feed()`, or as `read_back()` requests for a range just written to a file (the copy itself
    then stays inside the kernel and the hash covers exactly what landed on disk). With both a
    whole-stream and a per-piece hash, each runs in its own thread on the same buffers: the
    bytes are read once.
    """

    _DONE = object()

    def __init__(self, *, whole: bool = True, pieces: bool = False, buffers: int = 6,
                 chunk_size: int = CHUNK):
        # Buffers are made on first need: hashing a small file should not zero 48 MiB.
        self._pool: queue.Queue[bytearray] = queue.Queue()
        self._buffer_size = chunk_size
        self._buffers_left = buffers
        self._buffers_lock = threading.Lock()
        # Bounded, so a slow hasher holds the copier back and read-backs hit the page cache.
        self._jobs: queue.Queue = queue.Queue(maxsize=buffers)
        self._whole = hashlib.sha256() if whole else None
        self._pieces: dict[int, Any] = {}
        self._errors: list[BaseException] = []
        self._streams: list[tuple[queue.Queue, threading.Thread]] = []
        self._closed = False
        updates = ([self._hash_whole] if whole else []) + ([self._hash_piece] if pieces else [])
        self._hashing = bool(updates)
        # One hash is computed by the reader thread itself; two get a thread each (two cores).
        self._inline = updates[0] if len(updates) == 1 else None
        if len(updates) > 1:
            for update in updates:
                self._add_stream(update)
        self._reader = threading.Thread(target=self._read_loop, name="digester-reader", daemon=True)
        self._reader.start()

    # -- caller side
    def buffer(self) -> bytearray:
        """A free buffer to read into; blocks while all buffers are being hashed."""
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            pass
        with self._buffers_lock:
            if self._buffers_left > 0:
                self._buffers_left -= 1
                return bytearray(self._buffer_size)
        return self._pool.get()

    def give_back(self, buffer: bytearray) -> None:
        """Return a buffer from `buffer()` that will not be fed."""
        self._pool.put(buffer)

    def feed(self, buffer: bytearray, length: int, piece: int = 0) -> None:
        """Hash `buffer[:length]` as the next bytes of `piece`; the buffer goes back to the pool."""
        self._jobs.put(("buffer", buffer, length, piece))

    def read_back(self, path: Path, offset: int, length: int, piece: int = 0) -> None:
        """Hash `length` bytes of `path` at `offset` (just written there) as the next bytes."""
        if self._hashing:
            self._jobs.put(("read", path, offset, length, piece))

    def release_file(self, path: Path) -> None:
        """Return once everything asked of `path` has been read, with the file closed: it may
        then be renamed (Windows refuses to rename an open file)."""
        self._jobs.put(("forget", path))
        self._jobs.join()

    def finish(self) -> tuple[str | None, dict[int, str]]:
        """Wait for every byte to be hashed: (whole SHA-256 or None, {piece: SHA-256})."""
        self._close()
        if self._errors:
            raise self._errors[0]
        pieces = {index: h.hexdigest() for index, h in self._pieces.items()}
        return (self._whole.hexdigest() if self._whole is not None else None), pieces

    def piece_digest(self, pieces: dict[int, str], index: int) -> str:
        # A piece with no bytes never reached a hasher.
        return pieces.get(index, hashlib.sha256(b"").hexdigest())

    def __enter__(self) -> "Digester":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._close()

    # -- threads
    def _add_stream(self, update: Callable[[memoryview, int], None]) -> None:
        inbox: queue.Queue = queue.Queue()
        thread = threading.Thread(target=self._stream_loop, args=(inbox, update),
                                  name="digester-hash", daemon=True)
        thread.start()
        self._streams.append((inbox, thread))

    def _hash_whole(self, data: memoryview, piece: int) -> None:
        self._whole.update(data)

    def _hash_piece(self, data: memoryview, piece: int) -> None:
        hasher = self._pieces.get(piece)
        if hasher is None:
            hasher = self._pieces[piece] = hashlib.sha256()
        hasher.update(data)

    def _dispatch(self, buffer: bytearray, length: int, piece: int) -> None:
        if not self._streams:
            try:
                if self._inline is not None and not self._errors:
                    self._inline(memoryview(buffer)[:length], piece)
            except BaseException as exc:
                self._errors.append(exc)
            finally:
                self._pool.put(buffer)
            return
        remaining = [len(self._streams)]
        lock = threading.Lock()
        for inbox, _ in self._streams:
            inbox.put((buffer, length, piece, remaining, lock))

    def _stream_loop(self, inbox: queue.Queue, update: Callable[[memoryview, int], None]) -> None:
        while True:
            item = inbox.get()
            if item is self._DONE:
                return
            buffer, length, piece, remaining, lock = item
            try:
                if not self._errors:
                    update(memoryview(buffer)[:length], piece)
            except BaseException as exc:  # never strand a buffer: the copier would wait forever
                self._errors.append(exc)
            finally:
                with lock:
                    remaining[0] -= 1
                    last = remaining[0] == 0
                if last:
                    self._pool.put(buffer)

    def _read_loop(self) -> None:
        handles: dict[Path, BinaryIO] = {}
        try:
            while True:
                job = self._jobs.get()
                try:
                    if job is self._DONE:
                        return
                    self._run_job(job, handles)
                finally:
                    self._jobs.task_done()
        finally:
            for handle in handles.values():
                handle.close()
            for inbox, _ in self._streams:
                inbox.put(self._DONE)

    def _run_job(self, job: tuple, handles: dict[Path, BinaryIO]) -> None:
        kind = job[0]
        if kind == "buffer":
            _, buffer, length, piece = job
            self._dispatch(buffer, length, piece)
            return
        if kind == "forget":
            handle = handles.pop(job[1], None)
            if handle is not None:
                handle.close()
            return
        _, path, offset, length, piece = job
        if self._errors:
            return
        try:
            handle = handles.get(path)
            if handle is None:
                handle = handles[path] = open(path, "rb", buffering=0)
            handle.seek(offset)
            while length > 0:
                buffer = self.buffer()
                got = handle.readinto(memoryview(buffer)[:min(length, len(buffer))])
                if not got:
                    self._pool.put(buffer)
                    raise OSError(errno.EIO, "file ended while reading back what was written", str(path))
                self._dispatch(buffer, got, piece)
                length -= got
        except BaseException as exc:
            self._errors.append(exc)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._jobs.put(self._DONE)
        self._reader.join()
        for _, thread in self._streams:
            thread.join()


# Errors meaning "this kernel or file system cannot copy_file_range these two files".
_NO_FAST_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM,
                 getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.EBADF}


class SourceEnded(Exception):
    """The source had fewer bytes than expected (truncated, or changed while being copied)."""

    def __init__(self, at: int):
        super().__init__(f"the file ended at byte {at:,}")
        self.at = at


class RangeCopier:
    """Copies byte ranges from source files to the end of destination files and hashes what
    was written. On Linux the bytes move inside the kernel (copy_file_range, as `cat` and
    `cp` do) and the digester reads the written range back from the page cache; elsewhere,
    or when the file system refuses, it falls back to big reads and writes whose buffers are
    hashed directly."""

    def __init__(self, digester: Digester, progress: Progress | None = None):
        self.digester = digester
        self.progress = progress
        self.fast = hasattr(os, "copy_file_range")

    def copy(self, source: BinaryIO, offset: int, length: int, target: BinaryIO, target_path: Path,
             piece: int = 0) -> None:
        """Append `length` bytes of `source` from `offset` to `target` (an unbuffered file whose
        position is its end). Raises SourceEnded when the source is shorter."""
        done = 0
        position = target.tell()
        while done < length:
            want = min(CHUNK, length - done)
            got = self._fast(source, target, offset + done, want) if self.fast else None
            if got is None:
                got = self._slow(source, target, offset + done, want, piece)
            else:
                self.digester.read_back(target_path, position + done, got, piece)
            done += got
            if self.progress is not None:
                self.progress(got)

    def _fast(self, source: BinaryIO, target: BinaryIO, offset: int, want: int) -> int | None:
        try:
            got = os.copy_file_range(source.fileno(), target.fileno(), want, offset)
        except OSError as exc:
            if exc.errno in _NO_FAST_COPY:
                self.fast = False
                return None
            raise
        if got == 0:
            raise SourceEnded(offset)
        return got

    def _slow(self, source: BinaryIO, target: BinaryIO, offset: int, want: int, piece: int) -> int:
        buffer = self.digester.buffer()
        try:
            view = memoryview(buffer)[:want]
            source.seek(offset)
            got = source.readinto(view)
            if not got:
                raise SourceEnded(offset)
            written = 0
            while written < got:
                written += target.write(view[written:got])
        except BaseException:
            self.digester.give_back(buffer)
            raise
        self.digester.feed(buffer, got, piece)
        return got


def sha256_file(path: Path | str, progress: Progress | None = None) -> str:
    """SHA-256 of a whole file, read in big sequential chunks."""
    hasher = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            got = handle.readinto(buffer)
            if not got:
                break
            hasher.update(view[:got])
            if progress is not None:
                progress(got)
    return hasher.hexdigest()
