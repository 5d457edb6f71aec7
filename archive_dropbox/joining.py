"""Joining split files back into the original (the engine of joinFiles.py, whose settings, flags
and tab are read by join_files_cmd.py, and of the download stage's joinFlag): find every part,
check them against the manifest, join into a temporary file while hashing, verify, rename; then,
when asked, delete the parts and unzip the result without letting any entry land outside its
folder. Every step can be rerun after a crash."""

from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from . import deletion
from .errors import FileProblem
from .localfs import read_into as _read_into  # a module name of its own: tests replace it to corrupt a read
from .localfs import fsync_folder, legacy_temporary, rename_without_replacing, temporary_sibling
from .names import local_case_clashes, local_name_problem
from .split import (CHUNK, Digester, Manifest, RangeCopier, SourceEnded, manifest_name, parse_manifest_name,
                    parse_part_name, read_manifest, sha256_file)

Progress = Callable[[int], object]

# Keep a little room on the disk so the join does not fill it to the last byte.
SPACE_MARGIN = 64 * 1024 * 1024


class JoinProblem(FileProblem):
    """One split file cannot be joined (or unzipped); the others go on."""

    title = "Cannot join"


def human_size(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1000
    return f"{size:,.1f} TB"


# ----------------------------------------------------------------------------- finding the parts

JOIN = "join"                # the parts are all there: join them
VERIFY_EXISTING = "verify"   # the joined file exists already: check it, then finish the clean-up
DONE_BEFORE = "done"         # nothing left to do: joined (and cleaned up) by an earlier run


@dataclass
class SplitSeries:
    """Everything found about one split file, before anything is changed."""

    folder: Path
    name: str                       # the original file's name
    parts: list[Path]               # the parts present, in order
    part_sizes: list[int]
    manifest: Manifest | None
    state: str
    note: str = ""

    @property
    def output(self) -> Path:
        return self.folder / self.name

    @property
    def partial(self) -> Path:
        return temporary_sibling(self.output, "partial")

    @property
    def manifest_path(self) -> Path:
        return self.folder / manifest_name(self.name)

    @property
    def size(self) -> int:
        return self.manifest.size if self.manifest is not None else sum(self.part_sizes)


def _number_ranges(numbers: Sequence[int]) -> str:
    spans: list[list[int]] = []
    for number in sorted(numbers):
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _listing(folder: Path) -> list[str]:
    try:
        return [entry.name for entry in os.scandir(folder)]
    except OSError as exc:
        raise JoinProblem(f"the folder {folder} cannot be read ({exc.strerror}).", paths=[folder]) from None


def _series_base(path: Path, names: list[str]) -> str | None:
    """The original file's name for a part or manifest path, in the spelling found on disk
    (a sheet may type a name in another case on Windows or macOS)."""
    name = path.name
    if name not in names:
        folded = [n for n in names if n.casefold() == name.casefold()]
        if len(folded) == 1:
            name = folded[0]
    parsed = parse_part_name(name)
    return parsed[0] if parsed else parse_manifest_name(name)


def _os_problem(exc: OSError, what: str) -> JoinProblem:
    hint = " The disk is full: free some space and run again." if exc.errno == 28 else ""
    where = f" ({exc.filename})" if exc.filename else ""
    return JoinProblem(f"{what}: {exc.strerror or exc}{where}.{hint}", paths=[exc.filename] if exc.filename else [])


def inspect_series(path: Path | str) -> SplitSeries:
    """Find the parts of the split file that `path` (any of its parts, or its manifest) belongs
    to, and check them without reading their content. Raises JoinProblem naming what is wrong
    (a missing, extra or truncated part, a bad manifest, a different file in the way)."""
    try:
        return _inspect(Path(path))
    except OSError as exc:
        raise _os_problem(exc, f"the parts of {Path(path).name} cannot be examined") from None


def _inspect(path: Path) -> SplitSeries:
    folder = path.parent
    if parse_part_name(path.name) is None and parse_manifest_name(path.name) is None:
        raise JoinProblem(f"{path.name} is not a part of a split file: give the first part, whose "
                          "name ends in _split_0001.", paths=[path])
    if not folder.is_dir():
        raise JoinProblem(f"the folder {folder} does not exist: check the path of {path.name}.", paths=[path])
    names = _listing(folder)
    base = _series_base(path, names)
    numbered: dict[int, list[str]] = {}
    for name in names:
        parsed = parse_part_name(name)
        if parsed is not None and parsed[0] == base:
            numbered.setdefault(parsed[1], []).append(name)
    manifest_file = folder / manifest_name(base)
    manifest = read_manifest(manifest_file) if manifest_name(base) in names else None
    output = folder / base
    output_exists = output.exists() or output.is_symlink()
    if output_exists and not output.is_file():
        raise JoinProblem(f"{output} is a folder or a special file, so the joined file cannot be "
                          "written there: rename it and run again.", paths=[output])
    for number, clashing in sorted(numbered.items()):
        if len(clashing) > 1:
            raise JoinProblem(f"{' and '.join(sorted(clashing))} are both part {number} of {base}: "
                              "keep only the right one and run again.", paths=[folder])
    if manifest is not None and manifest.original_name != base:
        raise JoinProblem(f"the manifest {manifest_file.name} describes {manifest.original_name!r}, not "
                          f"{base!r}: it does not belong to these parts.", paths=[manifest_file])

    if not numbered and manifest is None:
        if output_exists:
            return SplitSeries(folder, base, [], [], None, DONE_BEFORE,
                               f"{base} is already joined and its parts were deleted by an earlier run")
        unpacked = folder / base[:-4] if base.lower().endswith(".zip") else None
        if unpacked is not None and unpacked.is_dir():
            return SplitSeries(folder, base, [], [], None, DONE_BEFORE,
                               f"{base} was already joined, unzipped into {unpacked} and cleaned up by an earlier run")
        raise JoinProblem(f"{path.name} does not exist, and no other part of {base} is in {folder}. "
                          "Check the name and the folder. (If this file was joined and cleaned up by "
                          "an earlier run, remove it from the list.)", paths=[path])

    if manifest is not None:
        return _series_from_manifest(folder, base, numbered, manifest, manifest_file, output, output_exists)
    return _series_from_numbers(folder, base, numbered, output, output_exists)


def _sizes(paths: list[Path]) -> list[int]:
    return [p.stat().st_size for p in paths]


def _series_from_manifest(folder: Path, base: str, numbered: dict[int, list[str]], manifest: Manifest,
                          manifest_file: Path, output: Path, output_exists: bool) -> SplitSeries:
    """The parts the manifest lists, all present with their sizes (or the joined file already there)."""
    present = {name for clashing in numbered.values() for name in clashing}
    listed = [folder / p.name for p in manifest.parts]
    if output_exists:
        if output.stat().st_size != manifest.size:
            raise JoinProblem(f"{output} already exists and is not the joined file: it has "
                              f"{output.stat().st_size:,} bytes, the original had {manifest.size:,}. "
                              "Move or rename it and run again; it was not touched.", paths=[output])
        kept = [p for p in listed if p.name in present]
        return SplitSeries(folder, base, kept, _sizes(kept), manifest, VERIFY_EXISTING)
    extras = sorted(present - {p.name for p in manifest.parts})
    if extras:
        raise JoinProblem(f"{extras[0]} is not one of the {len(manifest.parts)} parts listed in "
                          f"{manifest_file.name}: it may come from a different split. Move it away "
                          "and run again.", paths=[folder / extras[0]])
    missing = [p.name for p in manifest.parts if p.name not in present]
    if missing:
        raise JoinProblem(f"part {missing[0]} is missing"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                          + f": {len(manifest.parts) - len(missing)} of the {len(manifest.parts)} parts "
                          f"listed in {manifest_file.name} are in {folder}. Copy or download the "
                          "missing part next to the others and run again.", paths=[folder / missing[0]])
    actual = _sizes(listed)
    for part, size in zip(manifest.parts, actual):
        if size != part.size:
            kind = "incomplete (cut short)" if size < part.size else "longer than it should be"
            raise JoinProblem(f"part {part.name} has {size:,} bytes but should have {part.size:,}: "
                              f"it is {kind}. Copy or download it again and run again.",
                              paths=[folder / part.name])
    return SplitSeries(folder, base, listed, actual, manifest, JOIN)


def _series_from_numbers(folder: Path, base: str, numbered: dict[int, list[str]], output: Path,
                         output_exists: bool) -> SplitSeries:
    """Without a manifest: parts 1 to the highest number found, none missing."""
    numbers = sorted(numbered)
    parts = [folder / numbered[n][0] for n in numbers]
    width = len(numbered[numbers[-1]][0]) - len(base) - len("_split_")
    missing_numbers = [n for n in range(1, numbers[-1] + 1) if n not in numbered]
    if output_exists:
        if output.stat().st_size != sum(_sizes(parts)) or missing_numbers:
            raise JoinProblem(f"{output} already exists and is not the join of the parts found: move or "
                              "rename it and run again; it was not touched.", paths=[output])
        return SplitSeries(folder, base, parts, _sizes(parts), None, VERIFY_EXISTING)
    if missing_numbers:
        first = f"{base}_split_{missing_numbers[0]:0{width}d}"
        raise JoinProblem(f"part {first} is missing"
                          + (f" (and {len(missing_numbers) - 1} more)" if len(missing_numbers) > 1 else "")
                          + f": only parts {_number_ranges(numbers)} of {base} are in {folder}. Copy or "
                          "download the missing part next to the others and run again.",
                          paths=[folder / first])
    return SplitSeries(folder, base, parts, _sizes(parts), None, JOIN)


# ----------------------------------------------------------------------------- joining


@dataclass
class Hashes:
    whole: str
    parts: list[str] | None  # only computed when the parts have no manifest


def _hash_series(series: SplitSeries, progress: Progress | None) -> Hashes:
    with Digester(whole=True, pieces=True) as digester:
        for index, part in enumerate(series.parts, start=1):
            with open(part, "rb", buffering=0) as handle:
                while True:
                    buffer = digester.buffer()
                    got = handle.readinto(buffer)
                    if not got:
                        digester.feed(buffer, 0, index)
                        break
                    digester.feed(buffer, got, index)
                    if progress is not None:
                        progress(got)
        whole, pieces = digester.finish()
    return Hashes(whole, [digester.piece_digest(pieces, i) for i in range(1, len(series.parts) + 1)])


def _verify_existing(series: SplitSeries, log: logging.Logger, progress: Progress | None) -> Hashes | None:
    """The joined file is already there: prove it is the right one before anything else."""
    output = series.output
    if series.manifest is not None:
        log.info("%s already exists: checking it against the manifest", output.name)
        if sha256_file(output, progress) != series.manifest.sha256:
            raise JoinProblem(f"{output} already exists but is not the original file described by "
                              f"{series.manifest_path.name} (different content). Move or rename it and run "
                              "again; nothing was deleted.", paths=[output])
        return None
    log.info("%s already exists: comparing it with the parts", output.name)
    hashes = _hash_series(series, progress)
    if sha256_file(output) != hashes.whole:
        raise JoinProblem(f"{output} already exists and differs from the join of its parts. Move or "
                          "rename it and run again; nothing was deleted.", paths=[output])
    return hashes


def _check_free_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + SPACE_MARGIN:
        raise JoinProblem(f"not enough free space in {folder} to {what}: {human_size(needed)} needed, "
                          f"{human_size(free)} free. Free some space and run again; nothing was deleted.",
                          paths=[folder])


def _find_damaged_parts(series: SplitSeries, differing: list[int], log: logging.Logger) -> list[str]:
    """Which parts whose copy in the joined file differs from the manifest are damaged on disk
    themselves (the others were copied wrong)."""
    log.info("The joined file does not match the manifest: checking the parts concerned")
    return [series.parts[index].name for index in differing
            if sha256_file(series.parts[index]) != series.manifest.parts[index].sha256]


def _lock(handle) -> bool:
    """Take this process's claim on an open temporary file; False when another run holds it.
    (POSIX only: Windows already refuses to delete a file another process has open.)"""
    if fcntl is None:
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _remove_leftover(partial: Path, name: str, log: logging.Logger) -> None:
    if not (partial.exists() or partial.is_symlink()):
        return
    if partial.is_file() and not partial.is_symlink():
        with open(partial, "rb") as handle:
            if not _lock(handle):
                raise JoinProblem(f"another run is joining {name} right now ({partial.name} is in use): "
                                  "let it finish, or stop it, then run again.", paths=[partial])
    log.warning("Removing %s, left by an interrupted run; joining %s again", partial.name, name)
    deletion.discard_temporary(partial)


# Direct I/O needs the buffer, the file offset and the length aligned to the disk's block size;
# 4096 covers every common disk.
_DIRECT_ALIGNMENT = 4096


class _ParallelPartCopier:
    """Copies every part into its place in the output on several threads, each part hashed on
    its way, so the manifest's per-part SHA-256s are checked on all cores at once (a SHA-256 of
    the whole file is one stream that only one core can compute).

    What is hashed is what the output file holds. Where the platform allows (Linux, aligned
    ranges), a chunk goes from the buffer straight to the disk (O_DIRECT): the disk reads that
    very buffer, so hashing it hashes what was written, and the data skips the page cache (no
    copy into it, no write-back queue to drain at the fsync). Any other chunk is written through
    the page cache and read back from there for hashing, as before."""

    def __init__(self, series: SplitSeries, partial: Path, progress: Progress | None):
        self.series, self.partial = series, partial
        self.digests: list[str] = [""] * len(series.parts)
        self._progress = progress
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        offsets, offset = [], 0
        for size in series.part_sizes:
            offsets.append(offset)
            offset += size
        self._todo = list(zip(range(len(series.parts)), series.parts, series.part_sizes, offsets))
        self._todo.reverse()  # popped from the end: parts go out in order, written front to back
        self._direct_fd: int | None = None
        self._direct_usable = True

    def run(self) -> list[str]:
        """The SHA-256 of the bytes written for each part, in order."""
        # Twice the cores: while one thread waits for its write to reach the disk, another hashes.
        threads = [threading.Thread(target=self._work, name=f"join-copy-{n}", daemon=True)
                   for n in range(max(1, min(len(self._todo), 2 * (os.cpu_count() or 1), 8)))]
        try:
            self._open_direct()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            if self._direct_fd is not None:
                os.close(self._direct_fd)
        if self._errors:
            raise self._errors[0]
        return self.digests

    def _open_direct(self) -> None:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag or not self.series.size:
            return
        try:
            self._direct_fd = os.open(self.partial, os.O_WRONLY | flag)
        except OSError:
            return  # this file system has no direct I/O (tmpfs, some network shares)
        try:
            # Reserve the blocks up front: direct writes into allocated space run in parallel,
            # where writes that extend the file would be serialised by the file system.
            os.posix_fallocate(self._direct_fd, 0, self.series.size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise

    def _next(self) -> tuple[int, Path, int, int] | None:
        with self._lock:
            if self._errors or not self._todo:
                return None
            return self._todo.pop()

    def _advance(self, done: int) -> None:
        if self._progress is not None:
            with self._lock:  # progress bars are not thread-safe
                self._progress(done)

    def _work(self) -> None:
        try:
            staging = mmap.mmap(-1, CHUNK)  # page-aligned, as direct I/O needs
            check = bytearray(CHUNK)
            with open(self.partial, "r+b", buffering=0) as output:
                while (job := self._next()) is not None:
                    index, part, size, offset = job
                    self.digests[index] = self._copy_part(part, size, offset, output,
                                                          memoryview(staging), memoryview(check))
        except BaseException as exc:
            with self._lock:
                self._errors.append(exc)

    def _copy_part(self, part: Path, size: int, offset: int, output, staging: memoryview,
                   check: memoryview) -> str:
        hasher = hashlib.sha256()
        with open(part, "rb", buffering=0) as source:
            if os.fstat(source.fileno()).st_size != size:
                raise _size_changed(part, self.series.name)
            done = 0
            while done < size:
                if self._errors:
                    return ""  # another part failed: the join is abandoned anyway
                data = staging[:min(CHUNK, size - done)]
                if _read_into(source, data) < len(data):
                    raise _became_shorter(part, self.series.name)
                at = offset + done
                direct = self._write_direct(data, at)
                hasher.update(data[:direct])
                if direct < len(data):
                    rest = data[direct:]
                    _write_at(output, rest, at + direct)
                    hasher.update(_read_back(output, check[:len(rest)], at + direct))
                done += len(data)
                self._advance(len(data))
        return hasher.hexdigest()

    def _write_direct(self, data: memoryview, at: int) -> int:
        """Write what can go straight to the disk from the start of `data`; how many bytes."""
        fd = self._direct_fd
        if fd is None or not self._direct_usable or at % _DIRECT_ALIGNMENT or len(data) % _DIRECT_ALIGNMENT:
            return 0
        written = 0
        while written < len(data):
            try:
                got = os.pwrite(fd, data[written:], at + written)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # The file system refuses direct writes after all. The descriptor stays open until
                # every thread is done: closing it now could let another file reuse its number.
                self._direct_usable = False
                return written
            if got <= 0 or got % _DIRECT_ALIGNMENT:
                return written + max(got, 0)  # the rest, if any, goes through the page cache
            written += got
        return written


def _write_at(handle, data: memoryview, at: int) -> None:
    handle.seek(at)
    written = 0
    while written < len(data):
        written += handle.write(data[written:])


def _read_back(handle, view: memoryview, at: int) -> memoryview:
    handle.seek(at)
    if _read_into(handle, view) < len(view):
        raise OSError(errno.EIO, "the joined file ended while reading back what was written")
    return view


def _size_changed(part: Path, name: str) -> JoinProblem:
    return JoinProblem(f"part {part.name} changed size while {name} was being joined: wait until nothing "
                       "writes to it and run again.", paths=[part])


def _became_shorter(part: Path, name: str) -> JoinProblem:
    return JoinProblem(f"part {part.name} became shorter while {name} was being joined: wait until nothing "
                       "writes to it and run again.", paths=[part])


def _copy_hashing_the_whole(series: SplitSeries, partial: Path, target, progress: Progress | None
                            ) -> tuple[str, list[str]]:
    """Parts without a manifest: one stream, so that the whole file's SHA-256 (reported, and
    written into a new manifest before the parts are deleted) comes out of the same pass."""
    with Digester(whole=True, pieces=True) as digester:
        copier = RangeCopier(digester, progress)
        for index, (part, size) in enumerate(zip(series.parts, series.part_sizes), start=1):
            with open(part, "rb", buffering=0) as source:
                if os.fstat(source.fileno()).st_size != size:
                    raise _size_changed(part, series.name)
                try:
                    copier.copy(source, 0, size, target, partial, index)
                except SourceEnded:
                    raise _became_shorter(part, series.name) from None
        whole, pieces = digester.finish()
    return whole, [digester.piece_digest(pieces, i) for i in range(1, len(series.parts) + 1)]


def _join(series: SplitSeries, log: logging.Logger, progress: Progress | None) -> Hashes:
    """Join the parts into `.~<hash of name>.partial`, verify it, and rename it to the original name."""
    partial, output = series.partial, series.output
    for leftover in (partial, legacy_temporary(output, ".partial")):
        if leftover is not None:
            _remove_leftover(leftover, series.name, log)
    _check_free_space(series.folder, series.size, f"join {series.name}")
    whole, pieces = None, None
    try:
        with open(partial, "xb", buffering=0) as target:
            _lock(target)
            if series.manifest is None:
                whole, pieces = _copy_hashing_the_whole(series, partial, target, progress)
            else:
                written = _ParallelPartCopier(series, partial, progress).run()
            os.fsync(target.fileno())  # the parts may be deleted next: the join must be on disk first
        joined_size = partial.stat().st_size
        if joined_size != series.size:
            raise JoinProblem(f"{series.name} came out with {joined_size:,} bytes instead of {series.size:,}; "
                              "nothing was kept. Run again.", paths=[output])
        if series.manifest is not None:
            differing = [index for index, (digest, listed) in enumerate(zip(written, series.manifest.parts))
                         if digest != listed.sha256]
        if series.manifest is not None and differing:
            damaged = _find_damaged_parts(series, differing, log)
            if damaged:
                raise JoinProblem(f"{series.name} was not joined: part {damaged[0]}"
                                  + (f" (and {', '.join(damaged[1:])})" if len(damaged) > 1 else "")
                                  + " is damaged: its content does not match the SHA-256 in the manifest. "
                                  "Copy or download it again and run again; nothing was deleted.",
                                  paths=[series.folder / damaged[0]])
            raise JoinProblem(f"{series.name} was not joined: every part matches the manifest but the joined "
                              "copy does not, so the disk may have written wrong data. Check the disk and run "
                              "again; nothing was deleted.", paths=[output])
        if series.manifest is not None:
            os.utime(partial, (time.time(), series.manifest.mtime))
        try:
            rename_without_replacing(partial, output)
        except FileExistsError:
            raise JoinProblem(f"{output} appeared while {series.name} was being joined; it was not replaced. "
                              "Move or rename it and run again.", paths=[output]) from None
        fsync_folder(series.folder)
    except OSError as exc:
        raise _os_problem(exc, f"{series.name} could not be joined (nothing was deleted)") from None
    finally:
        deletion.discard_temporary_quietly(partial)
    if series.manifest is None:
        return Hashes(whole, pieces)
    return Hashes(series.manifest.sha256, None)


def _part_identities(series: SplitSeries) -> list[tuple[Path, deletion.LocalIdentity]]:
    """The parts as they are before the join reads them: a part that changes afterwards is kept."""
    return [(part, deletion.LocalIdentity.of(part)) for part in series.parts]


def _delete_parts(series: SplitSeries, identities: list[tuple[Path, deletion.LocalIdentity]],
                  log: logging.Logger) -> int:
    """Delete the parts, then the manifest, of a join verified in this run against its manifest
    (through the deletion gate). Raises JoinProblem when there is no manifest: parts are then
    never deleted, since a missing last part would go unnoticed."""
    try:
        freed = deletion.delete_joined_parts(identities, series.manifest_path if series.manifest else None,
                                             joined=series.output, joined_size=series.size,
                                             manifest_verified=series.manifest is not None, log=log)
    except deletion.NotProven as exc:
        raise JoinProblem(f"{series.name} was joined, but {exc.message}", paths=exc.paths) from None
    log.info("Deleted the %d part(s) of %s (%s freed)", len(series.parts), series.name, human_size(freed))
    return freed


@dataclass
class JoinOutcome:
    output: Path
    action: str                       # "joined", "verified" (earlier join checked), "resumed", "skipped"
    size: int = 0
    seconds: float = 0.0
    verified: bool = False
    unzipped_into: Path | None = None
    notes: list[str] = field(default_factory=list)
    unzip_problem: str | None = None  # the join stands, but unzipping was refused (the zip is kept)


def process_series(series: SplitSeries, *, delete_parts: bool, unzip: bool, log: logging.Logger,
                   progress: Progress | None = None) -> JoinOutcome:
    """Join (or check an earlier join), then delete the parts and unzip when asked. Raises
    JoinProblem (nothing deleted) when the file cannot be joined; an unzip refused after a good
    join is returned in `unzip_problem` (the zip is kept)."""
    try:
        return _process(series, delete_parts, unzip, log, progress)
    except OSError as exc:
        raise _os_problem(exc, f"{series.name} could not be processed; nothing was deleted") from None


def _process(series: SplitSeries, delete_parts: bool, unzip: bool, log: logging.Logger,
             progress: Progress | None) -> JoinOutcome:
    started = time.monotonic()
    outcome = JoinOutcome(series.output, "skipped", series.size)
    hashes = None
    identities = _part_identities(series) if delete_parts and series.state != DONE_BEFORE else []
    if series.state == DONE_BEFORE:
        outcome.notes.append(series.note)
        if not (unzip and series.name.lower().endswith(".zip") and series.output.is_file()):
            return outcome
        # An earlier run deleted the parts of a verified join, then stopped before unzipping.
        outcome.action = "resumed"
    elif series.state == VERIFY_EXISTING:
        hashes = _verify_existing(series, log, progress)
        outcome.action = "verified"
    else:
        if series.manifest is None:
            log.warning("%s has no manifest (%s): its parts are joined in the order of their numbers, "
                        "but the result cannot be verified.", series.name, series.manifest_path.name)
        hashes = _join(series, log, progress)
        outcome.action = "joined"
        if series.manifest is None:
            outcome.notes.append(f"not verified (no manifest); SHA-256 of the joined file: {hashes.whole}")
    outcome.verified = series.manifest is not None
    deleted = False
    if delete_parts and series.state != DONE_BEFORE and (series.parts or series.manifest_path.exists()):
        _delete_parts(series, identities, log)
        deleted = True
    if unzip:
        if series.name.lower().endswith(".zip"):
            try:
                summary = extract_zip(series.output, log, progress=None)
            except JoinProblem as exc:
                # The join stands (checked, and its parts perhaps deleted): it is counted as
                # joined, and the refused unzip is reported on its own.
                parts = "its parts were deleted" if deleted else "its parts were kept"
                outcome.unzip_problem = f"{series.name} is joined and checked ({parts}), but {exc.message}"
                outcome.seconds = time.monotonic() - started
                return outcome
            outcome.unzipped_into = series.folder
            outcome.notes.append(f"unzipped {summary.files:,} file(s), {human_size(summary.bytes)}; "
                                 f"{series.name} deleted")
        else:
            log.warning("%s is not a .zip file, so it was not unzipped (unzipFlag=1)", series.name)
    outcome.seconds = time.monotonic() - started
    return outcome


def join_split_file(path: Path | str, *, delete_parts: bool = False, unzip: bool = False,
                    log: logging.Logger, progress: Progress | None = None) -> JoinOutcome:
    """Join one split file given any of its parts or its manifest (the download stage's joinFlag)."""
    return process_series(inspect_series(path), delete_parts=delete_parts, unzip=unzip, log=log,
                          progress=progress)


# ----------------------------------------------------------------------------- unzipping


@dataclass
class _Member:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]
    link_target: str | None = None  # a symbolic link (its target as stored), else None

    @property
    def is_dir(self) -> bool:
        return self.info.is_dir() and self.link_target is None


def _is_link(info: zipfile.ZipInfo) -> bool:
    """A Unix symbolic link, as Info-ZIP and 7-Zip store one (2_zipDir.py does): host system 3
    (Unix) with S_IFLNK in the high 16 bits of the external attributes, the target as the data.
    Source: Info-ZIP's zipinfo / APPNOTE.TXT 4.4.2 and 4.4.15 (external file attributes)."""
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)


def _link_problem(target: str, parts: Sequence[str], root: str) -> str | None:
    """Why a link stored at `parts` (below `root`) pointing at `target` must not be recreated:
    an absolute target, or one that resolves outside the extraction folder. A link staying
    inside the folder (latest.tif -> frames/frame_0004.tif) is what the zipped folder held."""
    if not target or "\0" in target:
        return "is a symbolic link with an empty or invalid target"
    if target.startswith(("/", "\\")) or _DRIVE.match(target):
        return f"is a symbolic link to the absolute path '{target}'"
    landing = os.path.normpath(os.path.join(root, *parts[:-1], *re.split(r"[\\/]+", target)))
    try:
        outside = os.path.commonpath([root, landing]) != root
    except ValueError:  # another drive (Windows)
        outside = True
    if outside:
        return f"is a symbolic link to '{target}', which points outside the folder"
    return None


@dataclass
class ExtractSummary:
    files: int
    folders: int
    bytes: int


_DRIVE = re.compile(r"^[A-Za-z]:")


def _unsafe_reason(info: zipfile.ZipInfo, parts: list[str]) -> str | None:
    name = info.filename
    mode = info.external_attr >> 16
    if "\0" in name:
        return "contains a NUL character"
    if name.startswith(("/", "\\")):
        return "is an absolute path"
    if _DRIVE.match(name) or any(_DRIVE.match(p) for p in parts):
        return "names a drive letter"
    if ".." in parts:
        return "climbs out of the folder with '..'"
    if os.name == "nt" and any(":" in p for p in parts):
        return "contains ':', which Windows reads as a drive or a hidden stream"
    if info.create_system == 3 and stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)
                                                              or stat.S_ISLNK(mode)):
        return "is a device or other special file"
    if info.flag_bits & 0x1:
        return "is password-protected"
    return None


def _checked_members(archive: zipfile.ZipFile, zip_path: Path, target: Path) -> list[_Member]:
    """Every entry, with its path split into safe components; raise before anything is
    extracted when one entry could land outside `target`, is a link pointing outside it (or
    absolute), is not a file, folder or link, or has a name this computer cannot hold (names.py:
    CON, aux.txt, a trailing dot on Windows; A.txt beside a.txt on Windows and macOS)."""
    unsafe: list[str] = []
    not_here = 0  # entries refused by this computer's name rules, not by the zip's own content
    members: list[_Member] = []
    seen: dict[tuple[str, ...], bool] = {}
    root = os.path.normpath(os.path.abspath(target))
    for info in archive.infolist():
        parts = [p for p in re.split(r"[\\/]+", info.filename) if p not in ("", ".")]
        reason = _unsafe_reason(info, parts)
        if reason is None and parts:
            landing = os.path.normpath(os.path.join(root, *parts))
            try:
                outside = os.path.commonpath([root, landing]) != root or landing == root
            except ValueError:  # another drive (Windows)
                outside = True
            if outside:
                reason = "would land outside the folder"
        if reason is None and tuple(parts) in seen:
            reason = "is listed twice"
        if reason is None:
            # Windows would fail on it mid-unzip, or write to a device (CON, NUL) or to a
            # shortened name (a trailing dot): refused before anything is written.
            local = next(filter(None, map(local_name_problem, parts)), None)
            if local:
                reason = f"cannot be written on this computer: {local}"
                not_here += 1
        link_target = None
        if reason is None and parts and _is_link(info):
            link_target = archive.read(info).decode("utf-8", "surrogateescape")
            reason = _link_problem(link_target, parts, root)
        if reason is not None:
            unsafe.append(f"'{info.filename}' {reason}")
            continue
        if not parts:
            continue  # an entry for "." itself carries nothing
        member = _Member(info, tuple(parts), link_target)
        seen[tuple(parts)] = member.is_dir
        members.append(member)
    for member in members:
        for depth in range(1, len(member.parts)):
            if seen.get(member.parts[:depth]) is False:
                unsafe.append(f"'{'/'.join(member.parts[:depth])}' is both a file and a folder")
    for first, second in local_case_clashes(m.parts for m in members):
        unsafe.append(f"'{first}' and '{second}' differ only in case, and this computer's file system "
                      "keeps them as one name: one would overwrite the other")
        not_here += 1
    if unsafe:
        what_to_do = ("\nExtract it on Linux (its file systems hold these names), or rename these entries "
                      "inside the zip (7-Zip File Manager, F2) and run again.") if not_here else ""
        raise JoinProblem(f"{zip_path.name} was not unzipped: {len(unsafe)} entr{'y is' if len(unsafe) == 1 else 'ies are'} "
                          f"unsafe, so nothing was extracted and the zip was kept:\n{_first_ten(unsafe)}{what_to_do}",
                          paths=[zip_path])
    return members


def _first_ten(reasons: list[str]) -> str:
    """A message's list of reasons: the first ten, and how many more."""
    more = f"\n  - ... and {len(reasons) - 10} more" if len(reasons) > 10 else ""
    return "\n".join(f"  - {reason}" for reason in reasons[:10]) + more


def _crc32_file(path: Path) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _sort_against_disk(members: list[_Member], target: Path, zip_path: Path) -> list[_Member]:
    """The members still to extract. A file already in place with the same size and CRC (from
    an interrupted earlier run) is kept; anything else in the way stops the unzip."""
    todo, conflicts = [], []
    for member in members:
        place = target
        for name in member.parts[:-1]:
            place = place / name
            if place.is_symlink():
                conflicts.append(f"{place} is a symbolic link: extracting through it could write elsewhere")
                break
            if place.exists() and not place.is_dir():
                conflicts.append(f"{place} is a file, but the archive has a folder there")
                break
        else:
            place = target.joinpath(*member.parts)
            if member.link_target is not None:
                if place.is_symlink() and os.readlink(place) == member.link_target:
                    continue  # recreated by an interrupted earlier run
                if place.exists() or place.is_symlink():
                    conflicts.append(f"{place} already exists, but the archive has a link there")
                else:
                    todo.append(member)
            elif place.is_symlink():
                conflicts.append(f"{place} is a symbolic link")
            elif member.is_dir:
                if place.exists() and not place.is_dir():
                    conflicts.append(f"{place} is a file, but the archive has a folder there")
                elif not place.exists():
                    todo.append(member)
            elif place.is_dir():
                conflicts.append(f"{place} is a folder, but the archive has a file there")
            elif place.exists():
                if place.stat().st_size != member.info.file_size or _crc32_file(place) != member.info.CRC:
                    conflicts.append(f"{place} already exists and differs from the copy in the archive")
            else:
                todo.append(member)
    if conflicts:
        raise JoinProblem(f"{zip_path.name} was not unzipped because files are in the way (nothing was "
                          f"extracted, the zip was kept; move them away and run again):\n{_first_ten(conflicts)}",
                          paths=[zip_path])
    return todo


def _extract_with_seven_zip(zip_path: Path, staging: Path) -> None:
    """For compression methods Python's zipfile cannot read (Deflate64, for instance)."""
    from .zipping import CONSOLE_UTF8, find_seven_zip  # the zip stage's search: PATH, then Windows folders

    seven_zip = find_seven_zip()
    if seven_zip is None:
        raise JoinProblem(f"{zip_path.name} uses a compression method Python cannot read; install 7-Zip "
                          "(https://www.7-zip.org) and run again. The zip was kept.", paths=[zip_path])
    # Without -sccUTF-8 7-Zip answers in the console's code page, which no text mode here decodes.
    result = subprocess.run([str(seven_zip), "x", "-y", "-bd", *CONSOLE_UTF8, f"-o{staging}", "--",
                             str(zip_path)], capture_output=True, encoding="utf-8", errors="replace")
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-3:]
        raise JoinProblem(f"7-Zip could not extract {zip_path.name} (exit status {result.returncode}: "
                          f"{' '.join(detail)}). The zip was kept.", paths=[zip_path])


def _extract_into(archive: zipfile.ZipFile, todo: list[_Member], staging: Path, zip_path: Path,
                  progress: Progress | None, flush_each: bool) -> None:
    for member in todo:
        staged = staging.joinpath(*member.parts)
        if member.is_dir:
            staged.mkdir(parents=True, exist_ok=True)
            continue
        staged.parent.mkdir(parents=True, exist_ok=True)
        if member.link_target is not None:
            try:
                os.symlink(member.link_target, staged)
            except OSError as exc:  # Windows without the right to create links
                raise JoinProblem(f"{zip_path.name}: the link {'/'.join(member.parts)} -> {member.link_target} "
                                  f"cannot be created here ({exc.strerror}); the zip was kept. Unzip it where "
                                  "links can be made (on Windows: Developer Mode, or as administrator).",
                                  paths=[zip_path]) from None
            continue
        with archive.open(member.info) as source, open(staged, "xb") as target:
            while chunk := source.read(CHUNK):  # zipfile checks the CRC when the entry ends
                target.write(chunk)
                if progress is not None:
                    progress(len(chunk))
            if flush_each:
                target.flush()
                os.fsync(target.fileno())


def _entry_time(member: _Member) -> float | None:
    try:
        return time.mktime(member.info.date_time + (0, 0, -1))
    except (OverflowError, ValueError):
        return None


def _move_into_place(staged_folder: Path, target_folder: Path) -> None:
    """Move the staged tree into the target: whole folders in one rename when they are new,
    merging file by file where a folder already exists."""
    for entry in os.scandir(staged_folder):
        source, destination = Path(entry.path), target_folder / entry.name
        if not (destination.exists() or destination.is_symlink()):
            os.rename(source, destination)
        elif entry.is_dir(follow_symlinks=False) and destination.is_dir() and not destination.is_symlink():
            _move_into_place(source, destination)
        else:
            raise FileExistsError(destination)


def extract_zip(zip_path: Path | str, log: logging.Logger, progress: Progress | None = None) -> ExtractSummary:
    """Unzip `zip_path` into the folder that holds it, then delete it.

    Every entry is checked first: one that would land outside the folder (absolute path, '..',
    drive letter, symbolic link) stops the unzip before anything is written. Entries go to a
    `.~<hash of zip name>.extracting` folder and are moved into place when all of them are out and
    checked; the zip is deleted only when every member is in place with the right size. Rerunning
    after a crash keeps the files already in place (same size and CRC) and extracts the rest.
    """
    zip_path = Path(zip_path)
    try:
        return _extract(zip_path, log, progress)
    except OSError as exc:
        raise _os_problem(exc, f"{zip_path.name} could not be unzipped (the zip was kept)") from None


def _remove_staging_leftover(staging: Path, log: logging.Logger) -> None:
    """Remove a staging folder (or a file in its place) that an interrupted unzip left."""
    if staging.is_dir() and not staging.is_symlink():
        log.warning("Removing %s, left by an interrupted run", staging.name)
    deletion.discard_temporary(staging)


def _extract(zip_path: Path, log: logging.Logger, progress: Progress | None) -> ExtractSummary:
    target = zip_path.parent
    identity = deletion.LocalIdentity.of(zip_path)  # the zip must still be this one when it is deleted
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise JoinProblem(f"{zip_path.name} cannot be opened as a zip archive ({exc}); it was kept.",
                          paths=[zip_path]) from None
    staging = temporary_sibling(zip_path, "extracting")
    with archive:
        members = _checked_members(archive, zip_path, target)
        todo = _sort_against_disk(members, target, zip_path)
        files = [m for m in members if not m.is_dir]
        total = sum(m.info.file_size for m in files)
        _check_free_space(target, sum(m.info.file_size for m in todo if not m.is_dir), f"unzip {zip_path.name}")
        log.info("Unzipping %s: %d file(s), %s, into %s", zip_path.name, len(files), human_size(total), target)
        for leftover in (staging, legacy_temporary(zip_path, ".extracting")):
            if leftover is not None:
                _remove_staging_leftover(leftover, log)
        staging.mkdir()
        flush_each = not hasattr(os, "sync")
        try:
            try:
                _extract_into(archive, todo, staging, zip_path, progress, flush_each)
            except NotImplementedError:
                deletion.discard_temporary(staging)
                staging.mkdir()
                _extract_with_seven_zip(zip_path, staging)
                wanted = {m.parts for m in todo}
                for member in members:  # keep only what the earlier run did not already put in place
                    staged = staging.joinpath(*member.parts)
                    if member.parts not in wanted and not member.is_dir and staged.is_file():
                        deletion.discard_temporary(staged)
            for member in todo:
                staged = staging.joinpath(*member.parts)
                if member.is_dir:
                    continue
                if member.link_target is not None:
                    _check_staged_link(staged, member, staging, zip_path)
                    continue
                if not staged.is_file() or staged.stat().st_size != member.info.file_size:
                    raise JoinProblem(f"{'/'.join(member.parts)} did not come out of {zip_path.name} complete; "
                                      "the zip was kept.", paths=[zip_path])
                when = _entry_time(member)
                if when is not None:
                    os.utime(staged, (when, when))
            _move_into_place(staging, target)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise JoinProblem(f"{zip_path.name} is damaged ({exc}): it was not unzipped completely and was "
                              "kept. Files already extracted were left in "
                              f"{staging.name} for inspection.", paths=[zip_path]) from None
        except FileExistsError as exc:
            raise JoinProblem(f"{exc.args[0] if exc.args else 'a file'} appeared while {zip_path.name} was "
                              "being unzipped; the zip was kept. Run again.", paths=[zip_path]) from None
        for member in sorted((m for m in todo if m.is_dir), key=lambda m: -len(m.parts)):
            when = _entry_time(member)
            if when is not None:
                try:
                    os.utime(target.joinpath(*member.parts), (when, when))
                except OSError:
                    pass

    missing = [m for m in members if not _in_place(target.joinpath(*m.parts), m)]
    if missing:
        raise JoinProblem(f"after unzipping {zip_path.name}, {'/'.join(missing[0].parts)} is missing or has the "
                          f"wrong size ({len(missing)} entr{'y' if len(missing) == 1 else 'ies'} in all); the zip "
                          "was kept.", paths=[zip_path])
    if hasattr(os, "sync"):
        os.sync()  # everything on disk before the only other copy, the zip, goes
    deletion.discard_temporary_quietly(staging)
    try:
        deletion.delete_extracted_archive(zip_path, identity, all_in_place=not missing)
    except deletion.NotProven as exc:
        raise JoinProblem(exc.message, paths=exc.paths) from None
    fsync_folder(target)
    return ExtractSummary(len(files), len(members) - len(files), total)


def _check_staged_link(staged: Path, member: _Member, staging: Path, zip_path: Path) -> None:
    """The recreated link is the archive's, and resolves (through every other link now in
    place) inside the extraction folder: the lexical check before extracting cannot see chains
    of links."""
    name = "/".join(member.parts)
    if not staged.is_symlink() or os.readlink(staged) != member.link_target:
        raise JoinProblem(f"the link {name} did not come out of {zip_path.name} as stored; the zip was kept.",
                          paths=[zip_path])
    root = os.path.realpath(staging)
    if os.path.commonpath([root, os.path.realpath(staged)]) != root:
        raise JoinProblem(f"{zip_path.name} was not unzipped: the link {name} -> {member.link_target} leads outside "
                          "the folder through other links; the zip was kept.", paths=[zip_path])


def _in_place(path: Path, member: _Member) -> bool:
    if member.link_target is not None:
        return path.is_symlink() and os.readlink(path) == member.link_target
    if path.is_symlink():
        return False
    if member.is_dir:
        return path.is_dir()
    return path.is_file() and path.stat().st_size == member.info.file_size


# ----------------------------------------------------------------------------- a list of split files


@dataclass
class JoinJob:
    """One split file (named by any of its parts) or one whole .zip to process; `where` names it
    in messages ("row 3", or the path as typed)."""

    source: Path
    delete_parts: bool
    unzip: bool
    where: str


Ready = list[tuple[JoinJob, "SplitSeries | None"]]  # None: a whole .zip to unzip


def preflight(jobs: Sequence[JoinJob]) -> tuple[Ready, list[tuple[int, str]]]:
    """Inspect every job before changing anything. Returns the jobs ready to run, each with its
    series, and the problems found: (position in `jobs`, message), in job order."""
    problems: list[tuple[int, str]] = []
    ready: Ready = []
    claimed: dict[Path, JoinJob] = {}
    for index, job in enumerate(jobs):
        if job.source.suffix.lower() == ".zip" and parse_part_name(job.source.name) is None:
            # A whole .zip (never split, or joined by the download's joinFlag): unzip only.
            if not job.unzip:
                problems.append((index, f"{job.source.name} is a .zip, not a split part: set unzipFlag = 1 "
                                        "(or --unzip) to unzip it"))
            elif job.source.is_file() or job.source.with_suffix("").is_dir():
                ready.append((job, None))
            else:
                problems.append((index, f"{job.source} does not exist"))
            continue
        try:
            series = inspect_series(job.source)
        except FileProblem as exc:
            problems.append((index, exc.message))
            continue
        key = series.output.resolve()
        if key in claimed:
            problems.append((index, f"{series.name} is already listed ({claimed[key].where}): list each split "
                                    "file once"))
            continue
        claimed[key] = job
        ready.append((job, series))
    return ready, problems


def _unzip_only(job: JoinJob, log: logging.Logger) -> str:
    """Unzip a whole .zip named in a row; a rerun after a finished unzip has nothing to do."""
    if not job.source.is_file():
        log.info("%s: %s: already unzipped into %s", job.where, job.source.name, job.source.with_suffix(""))
        return "skipped"
    try:
        extract_zip(job.source, log)
    except FileProblem as exc:
        log.error("%s: %s: FAILED\n%s", job.where, job.source.name, exc.describe())
        return "failed"
    log.info("%s: %s: unzipped next to it", job.where, job.source.name)
    return "joined"


@dataclass
class JoinTally:
    """How the jobs of one run ended: how many of each outcome ("joined", "verified", "resumed",
    "skipped", "failed", and "not unzipped" among the joined), bytes joined, seconds taken."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("joined", "verified", "resumed", "skipped", "failed", "not unzipped"), 0))
    joined_bytes: int = 0
    seconds: float = 0.0


def process_jobs(ready: Ready, log: logging.Logger) -> JoinTally:
    """Run every job preflight found ready, one after the other, with a progress bar on stderr and
    one result line each; a job that fails is logged and counted, and the others go on."""
    tally, started = JoinTally(), time.monotonic()
    for job, series in ready:
        if series is None:
            tally.counts[_unzip_only(job, log)] += 1
        else:
            _process_job(job, series, log, tally)
    tally.seconds = time.monotonic() - started
    return tally


def _process_job(job: JoinJob, series: SplitSeries, log: logging.Logger, tally: JoinTally) -> None:
    counts = tally.counts
    bar = tqdm(total=series.size if series.state != DONE_BEFORE else 0, unit="B", unit_scale=True,
               unit_divisor=1000, desc=series.name[:40], leave=False, disable=None, file=sys.stderr)
    try:
        outcome = process_series(series, delete_parts=job.delete_parts, unzip=job.unzip, log=log,
                                 progress=bar.update)
    except FileProblem as exc:
        counts["failed"] += 1
        log.error("%s: %s: FAILED\n%s", job.where, series.name, exc.describe())
        return
    finally:
        bar.close()
    counts[outcome.action] += 1
    if outcome.unzip_problem is not None:
        counts["not unzipped"] += 1
        log.error("%s: %s: NOT UNZIPPED\n%s", job.where, series.name, outcome.unzip_problem)
    if outcome.action == "skipped":
        log.info("%s: %s: nothing to do; %s", job.where, series.name, "; ".join(outcome.notes))
        return
    if outcome.action == "joined":
        tally.joined_bytes += outcome.size
    rate = f", {human_size(outcome.size / outcome.seconds)}/s" if outcome.action == "joined" and outcome.seconds > 0 else ""
    verdict = {"joined": "joined" + (", verified against the manifest" if outcome.verified else ""),
               "verified": "already joined; checked" + (" against the manifest" if outcome.verified else
                                                       " against its parts"),
               "resumed": "already joined by an earlier run"}[outcome.action]
    log.info("%s: %s -> %s: %s (%d part(s), %s in %.1f s%s)%s", job.where, series.name, outcome.output,
             verdict, len(series.parts), human_size(outcome.size), outcome.seconds, rate,
             "".join(f"; {note}" for note in outcome.notes))
