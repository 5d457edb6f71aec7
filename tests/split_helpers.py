"""Split-file helpers that only tests and benchmarks use: writing the parts of a file into a
folder (resumable), with its manifest; hashing a file's parts in one pass; reading one part
straight from the original. The tool itself uploads parts from the original (api_upload,
desktop_upload) and joins them (joining); these build the inputs its tests and benchmarks need.

Moved out of archive_dropbox/split.py unchanged; import it as `from tests import split_helpers`
(bench scripts put the repository root on sys.path first).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from archive_dropbox import deletion
from archive_dropbox.localfs import fsync_folder, legacy_temporary, temporary_sibling
from archive_dropbox.split import (CHUNK, Digester, Manifest, PartPlan, Progress, RangeCopier, SourceEnded, SplitError,
                                   build_manifest, manifest_name, part_name, read_manifest, sha256_file)


def _discard_legacy_temporary(final: Path) -> None:
    """Earlier versions wrote `final` as `.~<name>`; a rerun overwrote that leftover, which the
    new temporary name no longer does, so it is removed here."""
    legacy = legacy_temporary(final)
    if legacy is not None:
        deletion.discard_temporary_quietly(legacy)


def write_manifest(path: Path | str, manifest: Manifest) -> Path:
    """Write atomically: a temporary `.~` name, flushed to disk, then renamed over the old one."""
    path = Path(path)
    temporary = temporary_sibling(path, "partial")
    _discard_legacy_temporary(path)
    with open(temporary, "wb") as handle:
        handle.write(manifest.to_bytes())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_folder(path.parent)
    return path


def hash_parts(path: Path | str, plan: Sequence[PartPlan], progress: Progress | None = None
               ) -> tuple[str, list[str]]:
    """(SHA-256 of the whole file, [SHA-256 of each part]) reading the file once, sequentially;
    the two kinds of hash are computed in parallel threads on the same buffers."""
    path = Path(path)
    with open(path, "rb", buffering=0) as handle, Digester(whole=True, pieces=True) as digester:
        for part in plan:
            handle.seek(part.offset)
            remaining = part.length
            while remaining > 0:
                buffer = digester.buffer()
                got = handle.readinto(memoryview(buffer)[:min(remaining, len(buffer))])
                if not got:
                    digester.give_back(buffer)
                    raise SplitError(f"{path} became shorter while it was being read "
                                     f"(it ended before byte {part.offset + part.length - remaining:,}); "
                                     "wait until nothing writes to it and run again.", paths=[path])
                digester.feed(buffer, got, part.index)
                remaining -= got
                if progress is not None:
                    progress(got)
        whole, pieces = digester.finish()
    return whole, [digester.piece_digest(pieces, part.index) for part in plan]


def iter_part_chunks(path: Path | str, offset: int, length: int, chunk_size: int = CHUNK) -> Iterator[bytes]:
    """The bytes of one part, read from the original file in chunks (nothing is written)."""
    with PartReader(path, PartPlan(1, offset, length)) as reader:
        while True:
            chunk = reader.read(chunk_size)
            if not chunk:
                return
            yield chunk


class PartReader(io.RawIOBase):
    """A read-only, seekable file object showing one part of the original file, so a part can
    be uploaded straight from the original (never split in place). Position 0 is the part's
    first byte. Raises SplitError when the original is shorter than the part needs."""

    def __init__(self, path: Path | str, part: PartPlan):
        super().__init__()
        self.path = Path(path)
        self.part = part
        self._handle = open(self.path, "rb", buffering=0)
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.part.length}[whence]
        target = base + offset
        if target < 0:
            raise ValueError("negative seek position")
        self._position = target
        return target

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self.part.length - self._position)
        if want <= 0:
            return 0
        self._handle.seek(self.part.offset + self._position)
        got = self._handle.readinto(view[:want])
        if not got:
            raise SplitError(f"{self.path} is shorter than expected: part {self.part.index} needs bytes "
                             f"up to {self.part.end:,}; the file may have changed since it was planned.",
                             paths=[self.path])
        self._position += got
        return got

    def close(self) -> None:
        if not self.closed:
            self._handle.close()
        super().close()


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _matching_manifest(path: Path, name: str, size: int, mtime: float, plan: Sequence[PartPlan]
                       ) -> Manifest | None:
    """An existing manifest that describes this very source and plan, else None."""
    if not path.is_file():
        return None
    try:
        manifest = read_manifest(path)
    except SplitError:
        return None
    same_plan = [(p.name, p.offset, p.size) for p in manifest.parts] == [(p.name, p.offset, p.length) for p in plan]
    if manifest.original_name != name or manifest.size != size or abs(manifest.mtime - mtime) > 1e-6 or not same_plan:
        return None
    return manifest


def _part_is_complete(path: Path, size: int, sha256: str) -> bool:
    try:
        if not path.is_file() or path.stat().st_size != size:
            return False
        return sha256_file(path) == sha256
    except OSError:
        return False


def write_parts(src: Path | str, dest_dir: Path | str, plan: Sequence[PartPlan], *,
                name: str | None = None, progress: Progress | None = None,
                log: logging.Logger | None = None) -> Manifest:
    """Write the parts of `src` into `dest_dir` (e.g. inside the Dropbox folder), then its manifest.

    Each part is written under `.~<part name>`, flushed to disk and renamed when complete, so
    nothing ever sees half a part. A rerun continues: parts already in place whose size and
    SHA-256 match are left untouched (not rewritten, so the desktop app does not upload them
    again). When an earlier run stopped before writing the manifest, the source is hashed first
    to recognise its complete parts. The original is only read. Raises SplitError when the
    source changes meanwhile (the manifest is then not written; run again later).
    """
    src, dest_dir = Path(src), Path(dest_dir)
    name = name or src.name
    # Always the canonical names, even for a one-part plan (which plan_split names like the file).
    plan = [replace(p, name=part_name(name, p.index, len(plan))) for p in plan]
    stat = src.stat()
    signature = (stat.st_size, stat.st_mtime_ns)
    if sum(p.length for p in plan) != stat.st_size:
        raise ValueError(f"the plan covers {sum(p.length for p in plan):,} bytes but {src} has {stat.st_size:,}")
    part_size = max([p.length for p in plan] + [1])
    manifest_path = dest_dir / manifest_name(name)
    expected = _matching_manifest(manifest_path, name, stat.st_size, stat.st_mtime, plan)
    if expected is None and any((dest_dir / p.name).exists() for p in plan):
        if log is not None:
            log.info("%s: parts from an earlier, unfinished run found in %s; checking them against "
                     "the source", name, dest_dir)
        whole, hashes = hash_parts(src, plan)
        expected = build_manifest(name, stat.st_size, whole, stat.st_mtime, plan, hashes, part_size)

    to_write = []
    for part, info in zip(plan, expected.parts if expected else [None] * len(plan)):
        if info is not None and _part_is_complete(dest_dir / part.name, part.length, info.sha256):
            if log is not None:
                log.info("%s: already complete, kept", part.name)
            if progress is not None:
                progress(part.length)
        else:
            to_write.append(part)

    with open(src, "rb", buffering=0) as source, \
            Digester(whole=expected is None, pieces=True) as digester:
        copier = RangeCopier(digester, progress)
        for part in to_write:
            temporary = temporary_sibling(dest_dir / part.name, "partial")
            _discard_legacy_temporary(dest_dir / part.name)
            try:
                with open(temporary, "wb", buffering=0) as target:
                    copier.copy(source, part.offset, part.length, target, temporary, part.index)
                    os.fsync(target.fileno())
                digester.release_file(temporary)
            except SourceEnded:
                deletion.discard_temporary_quietly(temporary)
                raise SplitError(f"{src} became shorter while its parts were being written; wait until "
                                 "nothing writes to it and run again.", paths=[src]) from None
            except BaseException:
                deletion.discard_temporary_quietly(temporary)
                raise
            os.replace(temporary, dest_dir / part.name)
        whole, pieces = digester.finish()
    fsync_folder(dest_dir)

    if _signature(src) != signature:
        raise SplitError(f"{src} changed while its parts were being written; no manifest was written. "
                         "Run again once nothing writes to it.", paths=[src])
    if expected is None:
        manifest = build_manifest(name, stat.st_size, whole, stat.st_mtime, plan,
                                  [digester.piece_digest(pieces, p.index) for p in plan], part_size)
    else:
        changed = [p.name for p, info in zip(plan, expected.parts)
                   if p in to_write and digester.piece_digest(pieces, p.index) != info.sha256]
        if changed:
            raise SplitError(f"{src} no longer matches its earlier parts ({', '.join(changed)} differ) "
                             "although its size and date did not change; delete the parts and the manifest "
                             f"in {dest_dir} and run again.", paths=[src])
        manifest = expected
    write_manifest(manifest_path, manifest)
    return manifest
