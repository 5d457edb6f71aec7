"""Zip each folder of the zipDir tab into `<folder>.zip` beside it, prove the archive holds
exactly the folder's files, and only then (deleteFlag=1) delete the originals it holds. This is
the engine of preProcess/2_zipDir.py; its settings, flags and tab are read by zip_dir_cmd.py.

How one row goes, and why it is safe to stop at any moment:

1. Snapshot the folder: every file (size, modification time), symlink and empty folder.
2. Write the archive under a name that does not look finished, `.~<hash>.zip.partial`, with
   the engine zipEngine names: ISA-L's Deflate on every core (`deflate_zip`, the default), 7-Zip
   (`a -tzip`, the snapshot's entries fed as a list file, symlinks stored as links and never
   followed; Python's `zipfile` when 7-Zip is not installed) or Python's `zipfile` (ZIP64, files
   streamed, one core).
3. Test it (`verify_archive`: every member inflated, its size and CRC-32 checked against the
   central directory), compare its member list and sizes with the snapshot, and check that no
   file changed while it was being zipped.
4. Stamp the archive comment `archive-big-data-dropbox: verified ...` (the mark that this tool
   made and verified it; it travels with the file), fsync, and rename it to `<name>.zip` without
   ever replacing an existing file.
5. deleteFlag=1: delete the snapshot's files that are unchanged, then the emptied folders.

Steps 3-5 of a row run in a thread while the next row's folder is zipped (step 2 keeps both
cores busy; the test and the fsync then cost little wall time). Each row's own steps stay in
order, its log line waits for the rows before it, and when free space is short the previous
row's originals are deleted before the next folder is zipped.

A rerun skips rows whose archive carries the mark; a leftover `.partial` is removed and the row
redone; a `<name>.zip` without the mark is never touched. If a run stopped while deleting, the
rerun tests the archive again and deletes only files whose size and CRC match their member.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, NamedTuple, Sequence

from tqdm import tqdm

from . import deflate_zip, deletion
from .errors import FileProblem
from .deletion import discard_temporary, discard_temporary_quietly
from .localfs import fsync_folder, is_link_entry, legacy_temporary, rename_without_replacing, temporary_sibling
from .winconsole import kill_with_this_script

# Chosen by bench/bench_zip.py on a microscope-like mix (incompressible frames, noisy 16-bit
# images, sparse counting frames, text): with 7-Zip, level 1 makes archives of 68% of the data,
# level 5 of 66% for 3.2x the CPU time, and level 3 is the same as level 1; level 0 (store) is
# ~30x faster but keeps 100% of the bytes, all of which then have to be uploaded.
DEFAULT_COMPRESSION_LEVEL = 1
ENGINES = ("isal", "7zip", "zipfile")  # the values of zipEngine
# ISA-L's level for compressionLevel 1, 2 and 3-9 (0 stores). On the same mix, against 7-Zip
# level 1, ISA-L levels 1, 2 and 3 make archives 0.2%, 0.6% and 0.8% smaller in all, for 3% and
# 6% more CPU than level 1: sparse counting frames 16% smaller (deflate_zip codes them with
# Huffman alone), noisy 16-bit images 1.8%, 0.4% and 0.3% larger, text 2.5%, 2.8% and 0.8%
# larger. Level 2 by default: smaller than 7-Zip's archives on the mix, within 0.4% on images.
ISAL_LEVEL_BY_SETTING = (2, 2, 3)

MARK_PREFIX = "archive-big-data-dropbox: verified"
_MARK_PATTERN = re.compile(
    r"^archive-big-data-dropbox: verified (\d+) entries \((\d+) files, (\d+) bytes\)")
_EOCD_SIGNATURE = b"PK\x05\x06"
_EOCD_SIZE = 22
_COPY_CHUNK = 1 << 20

WINDOWS_SEVEN_ZIP = (
    Path("C:/Program Files/7-Zip/7z.exe"),
    Path("C:/Program Files (x86)/7-Zip/7z.exe"),
)
# 7-Zip writes its messages in the console's code page (cp850, cp437... on Windows, whatever
# the file names hold) unless told the charset: "-scc{UTF-8|WIN|DOS} : set charset for console
# input/output" (`7z --help`; 7-Zip's help, "Command Line Version > Switches"). With UTF-8 the
# names in an error message read back as they are on disk, on every system.
CONSOLE_UTF8 = ("-sccUTF-8",)


# --------------------------------------------------------------------------- the folder


@dataclass
class FolderSnapshot:
    """What a folder held when it was scanned; the archive must hold exactly this."""

    root: Path
    files: dict[str, tuple[int, int]] = field(default_factory=dict)  # relative -> (size, mtime_ns)
    links: dict[str, str] = field(default_factory=dict)  # relative -> link target
    directories: list[str] = field(default_factory=list)  # every subfolder, relative
    empty_directories: list[str] = field(default_factory=list)  # '' is the folder itself
    skipped: list[str] = field(default_factory=list)  # sockets, pipes, devices: not archived
    unreadable: list[str] = field(default_factory=list)
    bad_names: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(size for size, _ in self.files.values())

    @property
    def archived_bytes(self) -> int:
        """Bytes the archive's members hold: the files, plus each symlink's target text."""
        return self.total_bytes + sum(len(os.fsencode(t)) for t in self.links.values())

    def member_name(self, relative: str) -> str:
        return f"{self.root.name}/{relative}" if relative else f"{self.root.name}"

    def expected_members(self) -> dict[str, int]:
        """Archive member name -> uncompressed size (0 for folders, which end in '/')."""
        members = {self.member_name(rel): size for rel, (size, _) in self.files.items()}
        members.update({self.member_name(rel): len(os.fsencode(target))
                        for rel, target in self.links.items()})
        members.update({self.member_name(rel) + "/": 0 for rel in self.empty_directories})
        return members


def _is_encodable(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 (surrogate-escaped) cannot be stored
        return False
    return True


def scan_folder(folder: Path) -> FolderSnapshot:
    """Walk the folder once without following symlinks; never raises for one bad entry."""
    snapshot = FolderSnapshot(root=folder)
    pending = [""]
    while pending:
        relative = pending.pop()
        directory = folder / relative if relative else folder
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            snapshot.unreadable.append(f"{directory} ({exc.strerror or exc})")
            continue
        if not entries:
            snapshot.empty_directories.append(relative)
        for entry in entries:
            child = f"{relative}/{entry.name}" if relative else entry.name
            if not _is_encodable(entry.name):
                snapshot.bad_names.append(str(directory / entry.name))
                continue
            try:
                if entry.is_symlink():
                    snapshot.links[child] = os.readlink(entry.path)
                elif is_link_entry(entry):
                    # A Windows junction: 7-Zip cannot store it as a link, and following it
                    # would zip (and with deleteFlag delete) files outside the folder.
                    snapshot.skipped.append(child)
                elif entry.is_dir(follow_symlinks=False):
                    snapshot.directories.append(child)
                    pending.append(child)
                elif entry.is_file(follow_symlinks=False):
                    info = entry.stat(follow_symlinks=False)
                    snapshot.files[child] = (info.st_size, info.st_mtime_ns)
                else:
                    snapshot.skipped.append(child)
            except OSError as exc:
                snapshot.unreadable.append(f"{entry.path} ({exc.strerror or exc})")
    return snapshot


def changed_since(snapshot: FolderSnapshot) -> list[str]:
    """Files and links that differ from the snapshot now (size, time, target, or gone)."""
    changed = []
    for relative, (size, mtime_ns) in snapshot.files.items():
        try:
            info = os.lstat(snapshot.root / relative)
        except OSError:
            changed.append(f"{relative} (vanished)")
            continue
        if not stat.S_ISREG(info.st_mode) or info.st_size != size or info.st_mtime_ns != mtime_ns:
            changed.append(relative)
    for relative, target in snapshot.links.items():
        try:
            if os.readlink(snapshot.root / relative) != target:
                changed.append(relative)
        except OSError:
            changed.append(f"{relative} (vanished)")
    return changed


# --------------------------------------------------------------------------- archive mark


@dataclass(frozen=True)
class ArchiveMark:
    """The comment this tool writes into an archive once it has been verified."""

    entries: int
    files: int
    bytes: int

    def text(self) -> str:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return (f"{MARK_PREFIX} {self.entries} entries ({self.files} files, {self.bytes} bytes) "
                f"on {stamp}")


def _mark_of_members(members: Sequence[zipfile.ZipInfo]) -> ArchiveMark:
    files = [m for m in members if not m.is_dir()]
    return ArchiveMark(len(members), len(files), sum(m.file_size for m in files))


def read_archive_mark(archive: Path) -> ArchiveMark | None:
    """The verified mark of an archive this tool made, or None (not ours, or unreadable)."""
    try:
        with zipfile.ZipFile(archive) as book:
            comment = book.comment.decode("utf-8", "replace")
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    match = _MARK_PATTERN.match(comment)
    if not match:
        return None
    return ArchiveMark(*(int(group) for group in match.groups()))


def check_marked_archive(archive: Path, folder_name: str) -> tuple[ArchiveMark, list[zipfile.ZipInfo]]:
    """Members of an archive this tool made and verified; FileProblem when it is not one, or
    when its contents no longer match its mark."""
    mark = read_archive_mark(archive)
    if mark is None:
        raise FileProblem(
            f"{archive} already exists and was not made (or not finished) by this tool, so it is "
            "left untouched. Move or rename it if it is not needed, then run again.",
            paths=[archive], title="Archive exists")
    with zipfile.ZipFile(archive) as book:
        members = book.infolist()
    problems = []
    if _mark_of_members(members) != mark:
        problems.append("its contents do not match the count and size recorded when it was verified")
    outside = [m.filename for m in members
               if PurePosixPath(m.filename).parts[:1] != (folder_name,) or not _safe_member(m.filename)]
    if outside:
        problems.append(f"it holds entries outside the folder '{folder_name}', e.g. {outside[0]!r}")
    if problems:
        raise FileProblem(f"{archive} carries this tool's mark but " + "; ".join(problems)
                          + ". It may be damaged or belong to another folder: check it by hand.",
                          paths=[archive], title="Archive does not match")
    return mark, members


def _safe_member(name: str) -> bool:
    return not name.startswith("/") and ".." not in PurePosixPath(name).parts


def write_mark(archive: Path, mark: ArchiveMark) -> None:
    """Put the mark in the archive comment: the last bytes of a .zip, so only they change."""
    comment = mark.text().encode("utf-8")
    with open(archive, "r+b") as handle:
        handle.seek(-_EOCD_SIZE, os.SEEK_END)
        end_record = handle.read(_EOCD_SIZE)
        if end_record[:4] != _EOCD_SIGNATURE or end_record[20:22] != b"\0\0":
            raise FileProblem(f"{archive} does not end as expected for a .zip; it was not finished",
                              paths=[archive])
        handle.seek(-2, os.SEEK_END)
        handle.write(struct.pack("<H", len(comment)) + comment)
        handle.flush()
        os.fsync(handle.fileno())


# --------------------------------------------------------------------------- the archive test

# ISA-L's inflate reads the same Deflate streams with a third of zlib's CPU time (and of
# `7z t`'s; bench/bench_zip.py). isal is required: deflate_zip writes with it too.
from isal import isal_zlib as _isal_zlib  # noqa: E402

INFLATE = _isal_zlib  # what verify_archive decodes with unless told otherwise
_LOCAL_HEADER = struct.Struct("<4sHHHHHLLLHH")  # PKWARE APPNOTE 4.3.7, 30 bytes
_LOCAL_SIGNATURE = b"PK\x03\x04"
_MAX_INFLATED_PER_CALL = 4 << 20  # bounds memory whatever a member claims to hold
_TESTABLE_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # the two that both engines write


class TestStopped(Exception):
    """The archive test was asked to stop (Ctrl-C) before it finished."""


class _BadMember(Exception):
    def __init__(self, member: zipfile.ZipInfo, problem: str):
        super().__init__(f"{member.filename}: {problem}")


def verify_archive(archive: Path, *, threads: int = 1, library=None,
                   stop: threading.Event | None = None) -> list[zipfile.ZipInfo]:
    """The archive test; returns the archive's members (its central directory).

    Every member's data is read to its end: Deflate members are inflated, stored ones read,
    and each one's size and CRC-32 must equal those in the central directory. Each local
    header must carry the central directory's name and method, and no member's data may run
    into the next member or the directory. Raises FileProblem naming the first bad member.
    `library` is a module with zlib's decompressobj/crc32/error (default: INFLATE)."""
    library = library or INFLATE
    try:
        with zipfile.ZipFile(archive) as book:
            members = book.infolist()
            directory_start = getattr(book, "start_dir", None)
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise _test_failed(archive, f"its table of contents cannot be read ({exc})") from None
    if directory_start is None:
        directory_start = archive.stat().st_size
    ordered = sorted(members, key=lambda m: m.header_offset)
    limits = [m.header_offset for m in ordered[1:]] + [directory_start]
    work = list(zip(ordered, limits))
    groups = _balanced(work, max(1, min(threads, len(work))))
    failures: list[BaseException] = []

    def check_group(group: list[tuple[zipfile.ZipInfo, int]]) -> None:
        try:
            buffer = bytearray(_COPY_CHUNK)
            with open(archive, "rb", buffering=0) as handle:
                for member, limit in group:
                    _check_member(handle, member, limit, buffer, library, stop)
        except BaseException as exc:  # handed to the caller below
            failures.append(exc)

    if len(groups) == 1:
        check_group(groups[0])
    else:
        workers = [threading.Thread(target=check_group, args=(g,), daemon=True) for g in groups]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    for failure in failures:
        if isinstance(failure, _BadMember):
            raise _test_failed(archive, str(failure)) from None
    if failures:
        raise failures[0]
    return members


def _test_failed(archive: Path, detail: str) -> FileProblem:
    return FileProblem(f"the archive failed its test: {detail}", paths=[archive],
                       title="Archive test failed")


def _balanced(work: list[tuple[zipfile.ZipInfo, int]], count: int) -> list[list[tuple[zipfile.ZipInfo, int]]]:
    """Split the members into `count` groups of about equal compressed bytes."""
    groups: list[list[tuple[zipfile.ZipInfo, int]]] = [[] for _ in range(count)]
    loads = [0] * count
    for item in sorted(work, key=lambda item: item[0].compress_size, reverse=True):
        lightest = loads.index(min(loads))
        groups[lightest].append(item)
        loads[lightest] += item[0].compress_size + 1
    for group in groups:
        group.sort(key=lambda item: item[0].header_offset)  # read each file front to back
    return [group for group in groups if group]


def _check_member(handle, member: zipfile.ZipInfo, limit: int, buffer: bytearray, library,
                  stop: threading.Event | None) -> None:
    if member.flag_bits & 0x1:
        raise _BadMember(member, "it is encrypted")
    if member.compress_type not in _TESTABLE_METHODS:
        raise _BadMember(member, f"compression method {member.compress_type} is not one this tool makes")
    handle.seek(member.header_offset)
    header = handle.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
        raise _BadMember(member, "its local header is missing or damaged")
    fields = _LOCAL_HEADER.unpack(header)
    method, name_length, extra_length = fields[3], fields[9], fields[10]
    raw_name = handle.read(name_length)
    encoding = "utf-8" if member.flag_bits & 0x800 else "cp437"
    if raw_name.decode(encoding, "replace") != member.orig_filename or method != member.compress_type:
        raise _BadMember(member, "its local header does not match the table of contents")
    start = member.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    if start + member.compress_size > limit:
        raise _BadMember(member, "its data runs past the next member or the end of the archive")
    handle.seek(start)
    view = memoryview(buffer)
    left = member.compress_size
    crc = size = 0
    inflater = library.decompressobj(-zlib.MAX_WBITS) if member.compress_type == zipfile.ZIP_DEFLATED else None
    try:
        while left:
            if stop is not None and stop.is_set():
                raise TestStopped()
            deflate_zip.note_processed(len(buffer))  # memory stays flat, see there
            got = handle.readinto(view[:min(len(buffer), left)])
            if not got:
                raise _BadMember(member, "the archive ends inside its data (truncated)")
            left -= got
            chunk = view[:got]
            if inflater is None:
                crc = library.crc32(chunk, crc)
                size += got
                continue
            if inflater.eof:
                raise _BadMember(member, "it holds bytes after the end of its compressed data")
            while chunk:
                piece = inflater.decompress(chunk, _MAX_INFLATED_PER_CALL)
                crc = library.crc32(piece, crc)
                size += len(piece)
                if size > member.file_size:
                    raise _BadMember(member, f"it inflates to more than its {member.file_size:,} bytes")
                chunk = inflater.unconsumed_tail
        if inflater is not None:
            # Output held back by the per-call bound (at most one match, not a bomb).
            rest = inflater.flush()
            crc = library.crc32(rest, crc)
            size += len(rest)
            if not inflater.eof or inflater.unused_data:
                raise _BadMember(member, "its compressed data is cut short or followed by other bytes")
    except library.error as exc:
        raise _BadMember(member, f"its compressed data is damaged ({exc})") from None
    if size != member.file_size:
        raise _BadMember(member, f"it holds {size:,} bytes, not the {member.file_size:,} recorded")
    if crc != member.CRC:
        raise _BadMember(member, f"bad CRC-32: {crc:08x} read, {member.CRC:08x} recorded")


# --------------------------------------------------------------------------- engines


def resolve_program(value: str) -> Path | None:
    """The program `value` names (on PATH, or a path to an executable file), resolved; None
    when there is none."""
    text = str(value).strip().strip('"')
    if not text:
        return None
    found = shutil.which(text)
    if found is None and Path(text).expanduser().is_file() and os.access(Path(text).expanduser(), os.X_OK):
        found = str(Path(text).expanduser())
    return Path(found).resolve() if found else None


def find_seven_zip(configured: str | None = None) -> Path | None:
    """The 7-Zip program: the configured one, else 7zz / 7z / 7za on PATH, else the usual
    Windows install folders. None when there is none."""
    if configured and str(configured).strip():
        return resolve_program(configured)
    for name in ("7zz", "7z", "7za"):
        found = shutil.which(name)
        if found:
            return Path(found)
    if os.name == "nt":
        roots = [os.environ.get("ProgramFiles"), os.environ.get("ProgramFiles(x86)")]
        candidates = [Path(r) / "7-Zip" / "7z.exe" for r in roots if r] + list(WINDOWS_SEVEN_ZIP)
        for candidate in candidates:
            if candidate.is_file():
                return candidate
    return None


def every_core() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))  # honours container CPU limits
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


Progress = Callable[[int], None]  # called with the number of input bytes done so far


class PythonZip:
    """Python's zipfile: always available, one core, ZIP64 for large archives."""

    name = "Python zipfile"

    def __init__(self, level: int):
        self.level = level
        self.compression = zipfile.ZIP_STORED if level == 0 else zipfile.ZIP_DEFLATED

    def describe(self) -> str:
        return f"{self.name} (level {self.level})"

    def build(self, snapshot: FolderSnapshot, temporary: Path, progress: Progress) -> None:
        done = 0
        with _open_output(temporary) as raw, zipfile.ZipFile(
                raw, "w", compression=self.compression, allowZip64=True,
                strict_timestamps=False) as book:
            for relative in snapshot.empty_directories:
                path = snapshot.root / relative if relative else snapshot.root
                info = zipfile.ZipInfo(snapshot.member_name(relative) + "/", _zip_time(path))
                info.external_attr = ((stat.S_IFDIR | 0o755) << 16) | 0x10
                info.create_system = 0 if os.name == "nt" else 3
                book.writestr(info, b"", compress_type=zipfile.ZIP_STORED)
            for relative, target in snapshot.links.items():
                info = zipfile.ZipInfo(snapshot.member_name(relative), _zip_time(snapshot.root / relative))
                info.create_system = 3
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                book.writestr(info, os.fsencode(target), compress_type=zipfile.ZIP_STORED)
            for relative, (size, _) in snapshot.files.items():
                path = snapshot.root / relative
                info = zipfile.ZipInfo.from_file(path, snapshot.member_name(relative),
                                                 strict_timestamps=False)
                info.file_size = size  # as scanned: zipfile decides ZIP64 from it up front
                info.compress_type = self.compression
                info._compresslevel = None if self.level == 0 else self.level  # noqa: SLF001
                with open(path, "rb") as source, book.open(info, "w") as sink:
                    left = size
                    while left:
                        chunk = source.read(min(_COPY_CHUNK, left))
                        if not chunk:
                            raise FileProblem(f"{path} became shorter while it was being zipped",
                                              title="File changed")
                        sink.write(chunk)
                        left -= len(chunk)
                        done += len(chunk)
                        progress(done)


def isal_level(level: int) -> int:
    """ISA-L's level (0 = store, 1-3) for compressionLevel 0-9."""
    return 0 if level == 0 else ISAL_LEVEL_BY_SETTING[min(level, len(ISAL_LEVEL_BY_SETTING)) - 1]


class IsalZip:
    """ISA-L's Deflate on every core (`deflate_zip`): a standard .zip, several times faster than
    7-Zip at its fastest level and no larger."""

    name = "ISA-L"

    def __init__(self, level: int, threads: int):
        self.level = level
        self.threads = threads

    def describe(self) -> str:
        return (f"{self.name} (level {self.level}, ISA-L level {isal_level(self.level)}, "
                f"{self.threads} threads)")

    def build(self, snapshot: FolderSnapshot, temporary: Path, progress: Progress) -> None:
        members = [deflate_zip.Member(snapshot.member_name(relative) + "/", _mtime(snapshot.root / relative),
                                      mode=stat.S_IFDIR | 0o755)
                   for relative in snapshot.empty_directories]
        members += [deflate_zip.Member(snapshot.member_name(relative), _mtime(snapshot.root / relative),
                                       data=os.fsencode(target), mode=stat.S_IFLNK | 0o777)
                    for relative, target in snapshot.links.items()]
        members += [deflate_zip.Member(snapshot.member_name(relative), mtime_ns / 1e9,
                                       path=snapshot.root / relative, size=size)
                    for relative, (size, mtime_ns) in snapshot.files.items()]
        with _open_output(temporary) as sink:
            deflate_zip.write_zip(sink, members, level=isal_level(self.level), threads=self.threads,
                                  progress=progress)


def _mtime(path: Path) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return time.time()


def _open_output(path: Path):
    """Create the archive file; 'x' so that an existing file is never overwritten."""
    return open(path, "xb")


def _zip_time(path: Path) -> tuple[int, int, int, int, int, int]:
    try:
        seconds = os.lstat(path).st_mtime
    except OSError:
        seconds = time.time()
    stamp = time.localtime(seconds)[:6]
    # A .zip cannot store dates before 1980 or after 2107.
    if stamp[0] < 1980:
        return (1980, 1, 1, 0, 0, 0)
    if stamp[0] > 2107:
        return (2107, 12, 31, 23, 59, 58)
    return stamp  # type: ignore[return-value]


_PERCENT = re.compile(rb"(?:^|[\s\x08])(\d{1,3})%")


class SevenZip:
    """7-Zip, compressing several files at once (one per thread)."""

    name = "7-Zip"

    def __init__(self, executable: Path, level: int, threads: int):
        self.executable = executable
        self.level = level
        self.threads = threads

    def describe(self) -> str:
        return f"{self.name} {self.executable} (level {self.level}, {self.threads} threads)"

    def version(self) -> str:
        try:
            result = subprocess.run([str(self.executable)], capture_output=True, timeout=30,
                                    stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"could not be started ({exc})"
        lines = [l.strip() for l in result.stdout.decode("utf-8", "replace").splitlines() if l.strip()]
        return lines[0] if lines else f"gave no version (exit status {result.returncode})"

    @staticmethod
    def can_take_names(snapshot: FolderSnapshot) -> bool:
        names = list(snapshot.files) + list(snapshot.links) + snapshot.empty_directories
        return all(_list_file_safe(snapshot.member_name(n)) for n in names)

    def build(self, snapshot: FolderSnapshot, temporary: Path, progress: Progress) -> None:
        # Naming each entry (instead of the folder) keeps out files that appear after the scan
        # and pipes 7-Zip would block on; only empty folders are named, since 7-Zip adds a named
        # folder with everything in it.
        entries = [snapshot.member_name(r) for r in snapshot.files]
        entries += [snapshot.member_name(r) for r in snapshot.links]
        entries += [snapshot.member_name(r) for r in snapshot.empty_directories]
        handle, list_path = tempfile.mkstemp(prefix="zipDir_", suffix=".txt")
        try:
            with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as listing:
                for entry in entries:
                    listing.write(entry.replace("/", os.sep) + "\n")
            command = [str(self.executable), "a", "-tzip", f"-mx={self.level}", f"-mmt={self.threads}",
                       "-mcu=on",  # UTF-8 names, so every unzip tool reads the same names
                       "-spd",  # a '*' or '?' in a file name is a name, not a wildcard
                       "-scsUTF-8", *CONSOLE_UTF8, "-bso0", "-bse2", "-bsp1", "-y"]
            if snapshot.links:
                command.append("-snl")  # store symlinks as links; never follow them anywhere
            command += [str(temporary), f"@{list_path}"]
            total = snapshot.total_bytes
            self._run(command, cwd=snapshot.root.parent, what="zipping",
                      on_percent=lambda pct: progress(total * pct // 100))
        finally:
            discard_temporary_quietly(list_path)

    def _run(self, command: list[str], *, cwd: Path, what: str,
             on_percent: Callable[[int], None] | None = None) -> bytes:
        try:
            process = subprocess.Popen(command, cwd=str(cwd), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       **_die_with_parent())
            kill_with_this_script(process)  # Windows: the job object does what _die_with_parent does on Linux
        except OSError as exc:
            raise FileProblem(f"7-Zip ({self.executable}) could not be started for {what}: "
                              f"{exc.strerror or exc}", title="7-Zip failed") from None
        errors_seen: list[bytes] = []
        output: list[bytes] = []
        reader = threading.Thread(target=lambda: errors_seen.append(process.stderr.read()), daemon=True)
        reader.start()
        try:
            assert process.stdout is not None
            while True:
                chunk = process.stdout.read1(65536)
                if not chunk:
                    break
                if on_percent is not None:
                    found = _PERCENT.findall(chunk)
                    if found:
                        on_percent(min(100, int(found[-1])))
                else:
                    output.append(chunk)
            code = process.wait()
        except BaseException:
            _stop(process)
            raise
        reader.join()
        if code != 0:
            message = b"".join(errors_seen).decode("utf-8", "replace").strip()
            lines = [line.strip() for line in message.splitlines() if line.strip()]
            detail = " / ".join(lines[-12:]) or "no message"
            raise FileProblem(f"7-Zip stopped with exit status {code} while {what}: {detail}",
                              title="7-Zip failed")
        return b"".join(output)


def _list_file_safe(name: str) -> bool:
    """7-Zip's list files trim blanks around each line and hold one name per line."""
    return name == name.strip() and "\n" not in name and "\r" not in name


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _die_with_parent() -> dict:
    """On Linux, have the kernel stop 7-Zip if this script is killed, so no orphan keeps
    writing an archive that the next run removes."""
    if not sys.platform.startswith("linux"):
        return {}
    try:
        import ctypes  # Linux only, and only when 7-Zip is started: not loaded at every start

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return {}
    set_parent_death_signal = 1  # PR_SET_PDEATHSIG

    def arm() -> None:
        prctl(set_parent_death_signal, signal.SIGKILL)

    return {"preexec_fn": arm}


# --------------------------------------------------------------------------- one row


@dataclass
class RowOutcome:
    """What happened to one row; `ok` decides the exit status."""

    folder: Path
    ok: bool
    result: str
    subdirectories: int | None = None
    files: int | None = None
    size: int | None = None
    archive_size: int | None = None
    seconds: float = 0.0
    row: int | None = None

    def line(self) -> str:
        def number(value: int | None, unit: str) -> str:
            return f"{value:,} {unit}" if value is not None else f"? {unit}"

        def gigabytes(value: int | None) -> str:
            return human_size(value) if value is not None else "? GB"

        where = f"row {self.row}" if self.row is not None else "folder"
        return " | ".join([
            f"[{where}] {self.folder}", number(self.subdirectories, "subdirectories"),
            number(self.files, "files"), gigabytes(self.size),
            f"archive {gigabytes(self.archive_size)}", f"{self.seconds:.1f} s",
            ("OK: " if self.ok else "FAILED: ") + self.result,
        ])


def human_size(size: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.2f} {unit}"
        size /= 1000
    return f"{size:.3f} TB"


def archive_path(folder: Path) -> Path:
    return folder.with_name(folder.name + ".zip")


def partial_path(folder: Path) -> Path:
    """Where the archive is written until it is verified: a short `.~` name, so that a folder
    whose name is near the file system's limit can be zipped too."""
    return temporary_sibling(archive_path(folder), "zip.partial")


def _member_path(parent: Path, name: str) -> Path:
    return parent.joinpath(*PurePosixPath(name).parts)


def _subdirectories_of(members: Iterable[zipfile.ZipInfo]) -> int:
    folders: set[PurePosixPath] = set()
    for member in members:
        path = PurePosixPath(member.filename.rstrip("/"))
        parents = list(path.parents)[:-2]  # drop '.' and the top folder itself
        folders.update(parents)
        if member.is_dir() and len(path.parts) > 1:
            folders.add(path)
    return len(folders)


def _remove_partial(folder: Path, log) -> None:
    # Earlier versions named it `.~<name>.zip.partial`: a rerun after an upgrade removes that too.
    for temporary in (partial_path(folder), legacy_temporary(archive_path(folder), ".partial")):
        if temporary is not None:
            _remove_leftover(temporary, log)


def _remove_leftover(temporary: Path, log) -> None:
    if temporary.exists() or temporary.is_symlink():
        try:
            discard_temporary(temporary)
        except OSError as exc:
            raise FileProblem(
                f"{temporary} is left from an interrupted run and cannot be removed "
                f"({exc.strerror or exc}). If another copy of this script (or 7-Zip) is still "
                "running, wait for it to finish or stop it, then run again.",
                paths=[temporary], title="Leftover temporary file") from None
        log.info("Removed %s, left by an interrupted run; this folder is zipped again.", temporary)


def _publish(temporary: Path, archive: Path) -> None:
    """Rename the verified archive to its final name, never replacing an existing file."""
    rename_without_replacing(temporary, archive)
    fsync_folder(archive.parent)


def _compare_members(members: Sequence[zipfile.ZipInfo], snapshot: FolderSnapshot) -> list[str]:
    expected = snapshot.expected_members()
    found: dict[str, int] = {}
    problems = []
    for member in members:
        if member.filename in found:
            problems.append(f"{member.filename} is in the archive twice")
        found[member.filename] = member.file_size
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
    for label, names in (("missing from the archive", missing), ("unexpected in the archive", extra),
                         ("with a different size in the archive", wrong)):
        if names:
            problems.append(f"{len(names)} entries {label}, e.g. {names[0]}")
    return problems


def _crc_of(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_COPY_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


@dataclass
class _Deletion:
    deleted: int = 0
    already_gone: int = 0
    kept: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.deleted:,} original files deleted"
        if self.already_gone:
            text += f" ({self.already_gone:,} already deleted before)"
        if self.kept:
            text += f"; {len(self.kept):,} kept because they are not in the archive or differ from it"
        return text


def _remove_empty_folders(folder: Path, members: Iterable[str]) -> None:
    """Remove, deepest first, the folders the archive holds once they are empty."""
    archived = {PurePosixPath(name.rstrip("/")) for name in members}
    archived |= {parent for name in list(archived) for parent in name.parents}
    candidates = []
    for dirpath, dirnames, _ in os.walk(folder, topdown=True, followlinks=False):
        relative = PurePosixPath(folder.name, *Path(dirpath).relative_to(folder).parts)
        if relative in archived:
            candidates.append(Path(dirpath))
    deletion.remove_empty_folders(candidates)  # a folder holding files the archive does not stays


def _count(outcome: _Deletion, result: str, relative: str) -> None:
    if result == deletion.DELETED:
        outcome.deleted += 1
    elif result == deletion.ALREADY_GONE:
        outcome.already_gone += 1
    else:
        outcome.kept.append(relative)


def _left_over(folder: Path) -> str:
    count = sum(len(files) for _, _, files in os.walk(folder, followlinks=False))
    return f"it still holds {count:,} files that are not in the archive or differ from it"


def _delete_snapshot_files(snapshot: FolderSnapshot, log) -> _Deletion:
    """Delete the files just archived, each only if still exactly as it was zipped."""
    outcome = _Deletion()
    for relative, (size, mtime_ns) in snapshot.files.items():
        path = snapshot.root / relative
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            outcome.already_gone += 1
            continue
        result = deletion.CHANGED
        if stat.S_ISREG(info.st_mode):
            result, _ = deletion.delete_unchanged(path, deletion.LocalIdentity(size, mtime_ns))
        _count(outcome, result, relative)
        if result in (deletion.CHANGED, deletion.FAILED):
            log.warning("Kept %s: it changed after it was zipped, or cannot be deleted.", path)
    for relative, target in snapshot.links.items():
        result, _ = deletion.delete_link_if_same(snapshot.root / relative, target)
        _count(outcome, result, relative)
    names = list(snapshot.expected_members())
    _remove_empty_folders(snapshot.root, names)
    return outcome


def _delete_verified_against_archive(folder: Path, archive: Path, members: Sequence[zipfile.ZipInfo],
                                     log) -> _Deletion:
    """Finish a deletion that an earlier run started (or that deleteFlag asks for later):
    a file is deleted only when its size and CRC equal those of its member."""
    outcome = _Deletion()
    parent = folder.parent
    with zipfile.ZipFile(archive) as book:
        for member in members:
            if member.is_dir():
                continue
            path = _member_path(parent, member.filename)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                outcome.already_gone += 1
                continue
            is_link_member = stat.S_ISLNK(member.external_attr >> 16)
            try:
                if stat.S_ISLNK(info.st_mode):
                    same = is_link_member and os.fsencode(os.readlink(path)) == book.read(member)
                else:
                    same = (not is_link_member and stat.S_ISREG(info.st_mode)
                            and info.st_size == member.file_size and _crc_of(path) == member.CRC)
            except OSError as exc:
                log.warning("Kept %s: it could not be checked (%s).", path, exc.strerror or exc)
                same = False
            if same and stat.S_ISLNK(info.st_mode):
                _count(outcome, deletion.delete_link_if_same(path, os.readlink(path))[0], member.filename)
            elif same:
                _count(outcome, deletion.delete_unchanged(path, deletion.LocalIdentity.from_stat(info))[0],
                       member.filename)
            else:
                outcome.kept.append(member.filename)
                log.warning("Kept %s: it differs from its copy in the archive.", path)
    _remove_empty_folders(folder, [m.filename for m in members])
    return outcome


def zip_folder(folder: Path, *, engine, delete_originals: bool, log,
               progress_factory: Callable[[int, str], "tqdm"] | None = None) -> RowOutcome:
    """Zip one folder (or finish it, or skip it when done) and wait for its test. Per-row
    problems come back as a failed outcome; nothing is deleted unless the archive was verified."""
    job = start_row(folder, engine=engine, delete_originals=delete_originals, log=log,
                    progress_factory=progress_factory)
    job.start_test()
    return job.wait()


@dataclass
class _BuiltArchive:
    """A folder zipped into its temporary file, not yet tested."""

    snapshot: FolderSnapshot
    temporary: Path
    archive: Path
    delete_originals: bool


class RowJob:
    """One row. Zipping happens in `start_row`; the rest (test, checks, mark, rename, deletion)
    runs in a thread of its own, so that the next folder can be zipped meanwhile. Whatever
    stops it, the archive is renamed only after its test, and originals deleted only after that."""

    def __init__(self, folder: Path, log):
        self.folder = folder
        self.log = log
        self.outcome = RowOutcome(folder=folder, ok=False, result="")
        self.started = time.monotonic()
        self.built: _BuiltArchive | None = None
        self.test_threads = 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bug: BaseException | None = None

    @property
    def deletes_originals_later(self) -> bool:
        return self.built is not None and self.built.delete_originals

    def start_test(self) -> None:
        if self.built is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._finish, name=f"test {self.folder.name}",
                                        daemon=True)  # a daemon dies with the process, as with kill -9
        self._thread.start()

    def stop(self) -> None:
        """Ask the test to stop (Ctrl-C): the unfinished archive is then removed, nothing deleted."""
        self._stop.set()

    def discard(self) -> None:
        """Remove the archive of a row whose test never started (the run is stopping)."""
        if self.built is not None and self._thread is None:
            _remove_unfinished(self.built.temporary, self.log)

    def wait(self) -> RowOutcome:
        if self._thread is not None:
            self._thread.join()
        if self._bug is not None:
            raise self._bug
        return self.outcome

    def _finish(self) -> None:
        try:
            _test_and_publish(self.built, self.outcome, self.log, self.test_threads, self._stop)
        except (FileProblem, OSError, TestStopped) as exc:
            _record_failure(self.outcome, self.folder, exc)
        except BaseException as exc:  # a bug: raised again in the main thread by wait()
            self._bug = exc
        self.outcome.seconds = time.monotonic() - self.started


def start_row(folder: Path, *, engine, delete_originals: bool, log,
              progress_factory: Callable[[int, str], "tqdm"] | None = None,
              before_build: Callable[[FolderSnapshot], None] | None = None) -> RowJob:
    """Zip one folder into its temporary file (or finish or skip a row done earlier); the
    returned job's `start_test` does the rest. `before_build` sees the scan before zipping."""
    job = RowJob(folder, log)
    archive = archive_path(folder)
    try:
        _remove_partial(folder, log)
        if archive.exists() or archive.is_symlink():
            _finish_existing(folder, archive, engine, delete_originals, log, job.outcome)
        elif not folder.is_dir():
            raise FileProblem(f"{folder} no longer exists (and there is no {archive.name} beside it)",
                              paths=[folder], title="Folder missing")
        else:
            job.built = _zip_new(folder, archive, engine, delete_originals, log, job.outcome,
                                 progress_factory, before_build)
            job.test_threads = getattr(engine, "threads", 1)
    except (FileProblem, OSError) as exc:
        _record_failure(job.outcome, folder, exc)
    job.outcome.seconds = time.monotonic() - job.started
    return job


def _record_failure(outcome: RowOutcome, folder: Path, exc: BaseException) -> None:
    outcome.ok = False
    if isinstance(exc, TestStopped):
        outcome.result = ("stopped before its archive was tested; the unfinished archive was "
                          "removed and nothing was deleted")
    elif isinstance(exc, FileProblem):
        outcome.result = exc.message
        if any(sign in exc.message for sign in _DISK_FULL_SIGNS):
            outcome.result = _disk_full(folder, exc.message)
    elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        outcome.result = _disk_full(folder, exc.strerror or str(exc))
    else:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        outcome.result = f"{getattr(exc, 'strerror', None) or exc}{where}"


# How 7-Zip reports a full disk on Linux/macOS and on Windows.
_DISK_FULL_SIGNS = ("errno=28", "No space left on device", "not enough space on the disk")


def _disk_full(folder: Path, detail: str) -> str:
    return (f"the disk holding {folder.parent} is full ({detail}). The unfinished archive was "
            "removed and nothing was deleted; free some space and run again.")


def _finish_existing(folder: Path, archive: Path, engine, delete_originals: bool, log,
                     outcome: RowOutcome) -> None:
    mark, members = check_marked_archive(archive, folder.name)
    outcome.files, outcome.size = mark.files, mark.bytes
    outcome.subdirectories = _subdirectories_of(members)
    outcome.archive_size = archive.stat().st_size
    if not folder.exists():
        outcome.ok, outcome.result = True, "already done earlier (archive verified; folder already removed)"
        return
    if not delete_originals:
        now = scan_folder(folder)
        outcome.ok = True
        outcome.result = "skipped: already zipped and verified earlier"
        if len(now.files) + len(now.links) != mark.files or now.archived_bytes != mark.bytes:
            outcome.result += (f"; note: the folder has changed since ({len(now.files) + len(now.links):,} "
                               f"files, {now.archived_bytes:,} bytes now). To zip it again, move "
                               f"{archive.name} away and run again")
        return
    log.info("%s exists and is marked verified; testing it again before deleting originals in %s.",
             archive, folder)
    verify_archive(archive, threads=getattr(engine, "threads", 1))
    removed = _delete_verified_against_archive(folder, archive, members, log)
    outcome.ok = True
    outcome.result = "archive verified earlier and tested again; " + removed.summary()
    if folder.exists():
        outcome.result += f"; folder kept: {_left_over(folder)}"


def _zip_new(folder: Path, archive: Path, engine, delete_originals: bool, log, outcome: RowOutcome,
             progress_factory, before_build) -> _BuiltArchive:
    snapshot = scan_folder(folder)
    outcome.subdirectories = len(snapshot.directories)
    outcome.files = len(snapshot.files) + len(snapshot.links)
    outcome.size = snapshot.total_bytes
    if snapshot.unreadable:
        raise FileProblem(f"{len(snapshot.unreadable)} entries in {folder} cannot be read, e.g. "
                          f"{snapshot.unreadable[0]}. Fix the permissions and run again.",
                          paths=[folder], title="Unreadable files")
    if snapshot.bad_names:
        raise FileProblem(f"{len(snapshot.bad_names)} names in {folder} are not valid text (UTF-8) "
                          f"and cannot be stored in a .zip, e.g. {snapshot.bad_names[0]!r}. Rename "
                          "them and run again.", paths=[folder], title="Unusable file names")
    if snapshot.skipped:
        log.warning("%d special entries in %s (pipes, sockets, devices, junctions) are not archived "
                    "and stay in place, e.g. %s", len(snapshot.skipped), folder, snapshot.skipped[0])
    if before_build is not None:
        before_build(snapshot)
    free = shutil.disk_usage(folder.parent).free
    if free < snapshot.total_bytes:
        log.warning("Only %s free beside %s for an archive of up to %s; it may not fit.",
                    human_size(free), folder, human_size(snapshot.total_bytes))
    if isinstance(engine, SevenZip) and not engine.can_take_names(snapshot):
        log.info("Some names in %s begin or end with a blank, which 7-Zip's list file cannot "
                 "carry; this folder is zipped with Python's zipfile instead.", folder)
        engine = PythonZip(engine.level)
    log.info("Zipping %s (%s subdirectories, %s files, %s) with %s", folder,
             f"{outcome.subdirectories:,}", f"{outcome.files:,}", human_size(snapshot.total_bytes),
             engine.describe())

    temporary = partial_path(folder)
    bar = progress_factory(snapshot.total_bytes, folder.name) if progress_factory else None
    done = [0]

    def advance(total_done: int) -> None:
        if bar is not None and total_done > done[0]:
            bar.update(total_done - done[0])
            done[0] = total_done

    try:
        engine.build(snapshot, temporary, advance)
    except BaseException:
        _remove_unfinished(temporary, log)
        raise
    finally:
        if bar is not None:
            bar.close()
    return _BuiltArchive(snapshot, temporary, archive, delete_originals)


def _test_and_publish(built: _BuiltArchive, outcome: RowOutcome, log, threads: int,
                      stop: threading.Event) -> None:
    snapshot, temporary, archive, folder = built.snapshot, built.temporary, built.archive, built.snapshot.root
    published = False
    try:
        members = verify_archive(temporary, threads=threads, stop=stop)
        differences = _compare_members(members, snapshot)
        if differences:
            raise FileProblem("the archive does not match the folder: " + "; ".join(differences)
                              + ". Was something writing into the folder? Nothing was deleted.",
                              title="Archive does not match")
        changed = changed_since(snapshot)
        if changed:
            raise FileProblem(f"{len(changed)} files changed while they were being zipped, e.g. "
                              f"{folder / changed[0].split(' (')[0]}. Is something still writing into "
                              "this folder? Nothing was deleted; run again when it is finished.",
                              title="Files changed")
        write_mark(temporary, _mark_of_members(members))
        try:
            _publish(temporary, archive)
        except FileExistsError:
            raise FileProblem(f"{archive} appeared while this folder was being zipped; it is left "
                              "untouched and nothing was deleted.", paths=[archive]) from None
        published = True
    finally:
        if not published:
            _remove_unfinished(temporary, log)
    outcome.archive_size = archive.stat().st_size
    outcome.ok = True
    outcome.result = "zipped and verified"
    if built.delete_originals:
        removed = _delete_snapshot_files(snapshot, log)
        outcome.result += "; " + removed.summary()
        if folder.exists():
            outcome.result += f"; folder kept: {_left_over(folder)}"


def _remove_unfinished(temporary: Path, log) -> None:
    try:
        discard_temporary(temporary)
    except OSError as exc:
        log.warning("Could not remove the unfinished %s (%s); the next run removes it.",
                    temporary, exc.strerror or exc)


# --------------------------------------------------------------------------- a list of folders


class FolderJob(NamedTuple):
    """One folder to zip: the sheet row naming it, and whether its originals go once the
    archive is verified (deleteFlag)."""

    row: int
    folder: Path
    delete_originals: bool


def zip_folders(jobs: Sequence[FolderJob], *, engine, log) -> list[RowOutcome]:
    """Zip each folder in turn with `engine` (IsalZip, SevenZip or PythonZip), testing each
    archive while the next folder is zipped, and log one line per folder in list order. A folder
    that fails is logged and returned as such; the others go on. Ctrl-C (or a bug) stops the test
    under way, discards the unfinished archive and is re-raised."""
    log.info("One line per row: folder | subdirectories | files | size | archive size | seconds | result")

    def progress_factory(total: int, name: str):
        return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=name,
                    leave=False, disable=None, dynamic_ncols=True)

    outcomes: list[RowOutcome] = []
    in_test: RowJob | None = None  # the row whose archive is tested while the next one is zipped

    def settle() -> None:
        """Wait for the row in test and log its line: lines come in row order."""
        nonlocal in_test
        if in_test is None:
            return
        outcome = in_test.wait()
        in_test = None
        (log.info if outcome.ok else log.error)("%s", outcome.line())
        outcomes.append(outcome)

    def make_room(snapshot: FolderSnapshot) -> None:
        # Two archives on the disk at once is the price of testing one while zipping the next.
        # Zipping one folder after another, the previous row's originals would already be
        # deleted; so when that matters for space, do that first.
        if (in_test is not None and in_test.deletes_originals_later
                and shutil.disk_usage(snapshot.root.parent).free < snapshot.total_bytes):
            log.info("Little free space beside %s: first finishing the previous row (its test and "
                     "the deletion of its originals).", snapshot.root)
            settle()

    job: RowJob | None = None
    try:
        for index, (row, folder, delete_originals) in enumerate(jobs, start=1):
            log.info("Row %d (%d of %d): %s", row, index, len(jobs), folder)
            job = start_row(folder, engine=engine, delete_originals=delete_originals, log=log,
                            progress_factory=progress_factory, before_build=make_room)
            job.outcome.row = row
            settle()
            job.start_test()
            in_test = job
        settle()
    except BaseException:  # Ctrl-C, or a bug: stop the test under way and report that row
        if in_test is not None:
            in_test.stop()
            try:
                settle()
            except BaseException:  # noqa: BLE001 - the first error is the one to report
                pass
        if job is not None:
            job.discard()
        raise
    return outcomes


def planned_action(folder: Path, delete: bool) -> str:
    """What zip_folders would do with `folder` (for a dry run), in words; changes nothing."""
    archive = archive_path(folder)
    if archive.exists() or archive.is_symlink():
        if read_archive_mark(archive) is None:
            return f"would fail: {archive} exists and was not made by this tool"
        if not folder.exists():
            return "already done"
        return ("would test the archive again and delete the originals it holds" if delete
                else "would skip: already zipped and verified")
    return f"would zip {folder} into {archive}" + (" and then delete the originals" if delete else "")
