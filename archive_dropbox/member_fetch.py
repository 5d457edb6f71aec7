"""Reading inside zip archives kept in Dropbox, whole or split into `_split_NNNN` parts, through
byte ranges only: an archive's table of contents (findFiles, and download rows with a `member`),
and the members a dropboxDownload_API row names in its `member` column.

An archive in Dropbox is a `RemoteArchive`: the Dropbox files holding its bytes in order (one
when it is stored whole) and each one's size (from the split manifest when there is one, else
from the listing). `open_reader` makes it a zip_index.PartedReader whose reads are ranged
`files/download` requests on the right part(s); each answer must come from the revision the
archive was listed with, so a part replaced or rewritten in Dropbox meanwhile is reported
(ArchiveChanged) instead of mixing two versions.

A download row with a member (columns dropboxPath, localDir, member):
  - dropboxPath is the archive (`/Lab/2024/s3.zip`; for a split archive the same name, as
    Dropbox holds `s3.zip_split_0001`, ... and `s3.zip_split_manifest.json` beside it);
  - member is a member's path in the archive (`s3/frame_0412.tif`) or a glob compared ignoring
    case: without `/` it matches names in any folder (`frame_04*.tif`, `metadata.xml`), with one
    the member's path from any folder down (`s3/*.xml`); `*` also crosses folders there;
  - each member lands at `<localDir>/<its path in the archive>` (its folders kept).
Stage 1 reads each archive's table of contents (one or two ranged requests, a few more when
they cross parts) and picks the members. Stage 2 fetches each one's local header and compressed
bytes with ranged requests (neighbouring members in one request when their bytes are close
together: at most SPAN_LIMIT bytes), inflates them into `.~<hash>.partial` beside the final
name, checks its size and CRC-32 against the table of contents, fsyncs, gives it the member's
modification time (the zip's exact time when it holds one, else its 2-second MS-DOS time),
and renames it into place, never over an existing file. A member is small enough to fetch
whole again: an interrupted one restarts from its first byte on the next run (no partial
resume). A CRC or size mismatch is fetched once more (as a download whose content hash differs
is), then reported; nothing unverified ever has the final name. The journal records each
member as an item whose source is `<archive path, lower case>#<member path>`, so a rerun skips
the finished ones without a request beyond the table of contents.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import logging
import os
import threading
import time
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from . import deletion, names, sheets, split, zip_index
from .download_plan import (METADATA_POLICY, PARTIAL_TAG, ask, client_modified_epoch, different_file, existing_file,
                            journal_item, write_all)
from .dropbox_client import DropboxClient, DropboxProblem, RangeNotSatisfiable, RemoteFile, RemoteFolder
from .errors import AuthError, FileProblem, SheetProblem
from .journal import Item, Journal, Kind, State
from .localfs import rename_without_replacing, temporary_sibling
from .transfer import ByteProgress, JobRunner, Pauses, Retrier, RetryPolicy, file_finished, log_result
from .units import MIB, human_bytes
from .zip_index import DamagedArchive, Directory, Member, PartedReader

# Neighbouring members whose bytes lie within SPAN_GAP of each other are fetched in one request
# of at most SPAN_LIMIT bytes: downloading a small gap costs less than one more request.
SPAN_LIMIT = 8 * MIB
SPAN_GAP = 256 * 1024
# Bytes of a local header read with it: zip_index's own slack for the extra field.
_HEADER_SLACK = 30 + 1024
MTIME_SLACK_S = 2  # FAT and exFAT keep modification times in 2-second steps
CRC_TAG = "crc32:"  # the journal's content_hash of a fetched member: its CRC-32


class ArchiveChanged(DamagedArchive):
    """A part of the archive is not the revision (or size) listed when its table of contents
    was read: it was replaced or rewritten in Dropbox since."""


class _Stopped(Exception):
    """Ctrl-C or a fatal error elsewhere: leave the member for the next run."""


class _DiskFull(Exception):
    """The local disk is (nearly) full: the member restarts once there is room."""


# ----------------------------------------------------------------------------- archives in Dropbox


def name_of(remote: RemoteFile) -> str:
    """The last name of a Dropbox file's path, as Dropbox spells it."""
    return (remote.path_display or remote.path_lower).rsplit("/", 1)[1]


@dataclass(frozen=True)
class RemoteArchive:
    """A zip archive in Dropbox. `path`: its Dropbox path as one file (`/Lab/s3.zip`, also when
    it is split); `parts`: the Dropbox files holding its bytes, in order; `sizes`: each part's
    size in bytes as its manifest says (the listing's when there is no manifest); `split`: it is
    stored as `_split_NNNN` parts."""

    path: str
    parts: tuple[RemoteFile, ...]
    sizes: tuple[int, ...]
    split: bool

    @property
    def size(self) -> int:
        return sum(self.sizes)

    @property
    def part_count(self) -> int:
        """Parts as an inventory counts them: 0 when stored whole."""
        return len(self.parts) if self.split else 0

    @property
    def key(self) -> str:
        return names.case_key(self.path)

    @property
    def signature(self) -> str:
        """Changes whenever any part changes in Dropbox (its revision or size)."""
        digest = hashlib.sha256()
        for part, size in zip(self.parts, self.sizes):
            digest.update(f"{part.path_lower}\0{part.rev}\0{size}\n".encode())
        return digest.hexdigest()[:32]

    def check_sizes(self) -> None:
        """Raises ArchiveChanged when a part in Dropbox is not the size its manifest says."""
        for part, size in zip(self.parts, self.sizes):
            if part.size != size:
                raise ArchiveChanged(
                    f"archive {self.path}: its part {name_of(part)} has {part.size:,} bytes in Dropbox where "
                    f"its manifest says {size:,}: the part was replaced or changed after the archive was split.",
                    paths=[self.path])


def whole_archive(remote: RemoteFile) -> RemoteArchive:
    return RemoteArchive(remote.path_display or remote.path_lower, (remote,), (remote.size,), False)


def split_archive(path: str, parts: Sequence[RemoteFile], manifest: split.Manifest | None) -> RemoteArchive:
    """The archive `path` stored as `parts` (Dropbox files named `<name>_split_NNNN`, any order).
    With its manifest, the parts and sizes it lists; without, the parts numbered 1..N and their
    listed sizes. Raises ArchiveChanged when a part is missing (a last part missing without a
    manifest shows later, as a table of contents that cannot be found)."""
    by_name = {names.case_key(name_of(part)): part for part in parts}
    if manifest is not None:
        listed = []
        for entry in manifest.parts:
            remote = by_name.get(names.case_key(entry.name))
            if remote is None:
                raise ArchiveChanged(f"archive {path}: its part {entry.name} is missing in Dropbox "
                                     f"({len(manifest.parts)} parts are listed in its manifest).", paths=[path])
            listed.append(remote)
        return RemoteArchive(path, tuple(listed), tuple(entry.size for entry in manifest.parts), True)
    numbered = sorted((split.parse_part_name(name_of(part))[1], part) for part in parts
                      if split.parse_part_name(name_of(part)))
    for expected, (number, part) in enumerate(numbered, 1):
        if number != expected:
            raise ArchiveChanged(f"archive {path}: its part number {expected} is missing in Dropbox (found "
                                 f"{name_of(part)}).", paths=[path])
    return RemoteArchive(path, tuple(part for _, part in numbered), tuple(part.size for _, part in numbered), True)


def read_manifest(client: DropboxClient, retrier: Retrier, remote: RemoteFile) -> split.Manifest:
    """A split manifest in Dropbox, downloaded and parsed; raises split.SplitError."""
    def read() -> bytes:
        _, chunks = client.download_range(remote.path_lower, 0, None)
        return b"".join(chunks)

    return split.parse_manifest(ask(retrier, "reading a split manifest", read), remote.path_display)


def _close(chunks: Iterator[bytes]) -> None:
    """Drop a download's body: its connection goes back to the pool (the generator opens the
    response only once started, and closes it when closed)."""
    next(chunks, None)
    chunks.close()  # type: ignore[attr-defined]


def _read_range(client: DropboxClient, retrier: Retrier, archive: RemoteArchive, part: RemoteFile,
                offset: int, length: int) -> bytes:
    """`length` bytes of one part from `offset`, from the revision listed (ArchiveChanged when
    Dropbox now holds another one); network trouble is retried by `retrier`."""
    def request() -> bytes:
        served, chunks = client.download_range(part.path_lower, offset, offset + length)
        if served.rev != part.rev:
            _close(chunks)
            raise ArchiveChanged(f"archive {archive.path}: {name_of(part)} changed in Dropbox after its table "
                                 "of contents was read (a part was replaced or the archive rewritten); run again "
                                 "to read its current version.", paths=[archive.path])
        return b"".join(chunks)

    try:
        return retrier.call(f"reading {archive.path}", request)
    except RangeNotSatisfiable:
        raise ArchiveChanged(f"archive {archive.path}: {name_of(part)} is now shorter than {offset + length:,} "
                             "bytes in Dropbox: it was replaced.", paths=[archive.path]) from None


def open_reader(archive: RemoteArchive, client: DropboxClient, retrier: Retrier) -> PartedReader:
    """The archive as a RangeReader over its parts in Dropbox: one ranged request per part a
    read touches (PartedReader's counters count them and their bytes)."""
    def reader_of(part: RemoteFile) -> Callable[[int, int], bytes]:
        return lambda offset, length: _read_range(client, retrier, archive, part, offset, length)

    return PartedReader([(size, reader_of(part)) for part, size in zip(archive.parts, archive.sizes)],
                        archive.path, labels=[name_of(part) for part in archive.parts])


def read_toc(archive: RemoteArchive, client: DropboxClient, retrier: Retrier) -> tuple[Directory, PartedReader]:
    """The archive's table of contents, and the reader that read it (its counters). Raises
    ArchiveChanged / DamagedArchive / UnsupportedArchive, FileProblem after the retrier's
    give-up time without network."""
    archive.check_sizes()
    reader = open_reader(archive, client, retrier)
    return zip_index.read_directory(reader), reader


class SpanReader:
    """A RangeReader serving reads inside [start, end) from one read of the whole span (made at
    the first such read), and any other read from `base`: the members of one span cost one
    request (one per part the span touches)."""

    def __init__(self, base: zip_index.RangeReader, start: int, end: int):
        self.base, self.name, self.size = base, base.name, base.size
        self.start, self.end = start, end
        self._data: bytes | None = None

    def read(self, offset: int, length: int) -> bytes:
        if self.start <= offset and offset + length <= self.end:
            if self._data is None:
                self._data = self.base.read(self.start, self.end - self.start)
            at = offset - self.start
            return self._data[at:at + length]
        return self.base.read(offset, length)


def member_span(member: Member) -> tuple[int, int]:
    """The bytes fetching `member` reads first: its local header with zip_index's slack for the
    extra field, and its compressed data (all of it, for a member up to zip_index.CHUNK)."""
    end = member.header_offset + _HEADER_SLACK + len(member.raw_name) + member.compressed_size
    return member.header_offset, min(end, member.toc_offset)


# ----------------------------------------------------------------------------- members


def member_matcher(pattern: str) -> Callable[[str], bool]:
    """Whether a member path matches `pattern` (see the module docstring), ignoring case as
    Dropbox and Windows compare names; `[` is a literal character as in findFiles."""
    key = names.case_key(pattern.replace("\\", "/")).lstrip("/").replace("[", "[[]")
    if "/" not in key:
        return lambda name: fnmatch.fnmatchcase(names.case_key(name.rstrip("/").rsplit("/", 1)[-1]), key)
    return lambda name: (fnmatch.fnmatchcase(names.case_key(name), key)
                         or fnmatch.fnmatchcase(names.case_key(name), "*/" + key))


def select_members(directory: Directory, pattern: str) -> list[Member]:
    """The files (not folder entries) of the archive matching `pattern`, in archive order; of two
    entries with one name, the last (the one unzipping keeps)."""
    matches = member_matcher(pattern)
    return [member for member in directory if not member.is_dir and directory.find(member.name) is member
            and matches(member.name)]


def member_target(local_dir: Path, member: Member) -> tuple[Path | None, str | None]:
    """Where the member lands: its path in the archive under `local_dir` (`\\` counts as a
    separator, as Windows tools meant it). (None, why) for a name that would land outside
    `local_dir` (absolute, a drive, `..`), a link, or a name this computer cannot hold."""
    name = member.name
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        return None, f"its name {name!r} would put it outside localDir; it was not extracted"
    if member.is_symlink:
        return None, "it is a symbolic link, which is not extracted; download the whole archive to get it"
    parts = [part for part in parts if part not in ("", ".")]
    for part in parts:
        why = names.local_name_problem(part)
        if why is not None:
            return None, f"{why}; it was not extracted"
    return local_dir.joinpath(*parts), None


def member_mtime_ns(member: Member, fallback_ns: int) -> int:
    """The member's modification time in ns: exact when the zip holds one, else its MS-DOS time
    (2-second steps, read as local time); `fallback_ns` when it has none."""
    if member.exact_mtime_ns is not None:
        return member.exact_mtime_ns
    seconds = member.mtime
    return int(seconds) * 1_000_000_000 if seconds is not None else fallback_ns


@dataclass
class MemberTask:
    """One member of one archive to one local path (`target`)."""

    row: sheets.SheetRow
    archive: RemoteArchive
    member: Member
    target: Path
    mtime_ns: int
    item: Item | None = None
    problem: str | None = None  # known before any request (a name this computer cannot hold)

    @property
    def partial(self) -> Path:
        return temporary_sibling(self.target, PARTIAL_TAG)

    @property
    def source(self) -> str:
        """For messages: `/Lab/s3.zip: s3/frame_0412.tif`."""
        return f"{self.archive.path}: {self.member.name}"

    @property
    def journal_source(self) -> str:
        return f"{self.archive.key}#{self.member.name}"


@dataclass
class MemberPlan:
    """Stage 1 of the member rows: `tasks`; `problems` (sheet problems: no such archive, no
    matching member, two members to one local path); `failures` (archive path, why) of archives
    whose table of contents cannot be read (damaged, changed); what reading them cost."""

    tasks: list[MemberTask] = field(default_factory=list)
    problems: list[SheetProblem] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    archives: int = 0
    requests: int = 0
    bytes_read: int = 0
    duplicates: int = 0


def _split_parts(client: DropboxClient, retrier: Retrier, folder: str, manifest: split.Manifest
                 ) -> tuple[list[RemoteFile], str | None]:
    parts = []
    for entry in manifest.parts:
        part_path = f"{folder}/{entry.name}"
        remote = ask(retrier, "checking Dropbox", lambda: client.metadata(part_path))
        if not isinstance(remote, RemoteFile):
            return [], (f"its part {entry.name} is missing in Dropbox ({len(manifest.parts)} parts are listed "
                        "in its manifest)")
        parts.append(remote)
    return parts, None


def _parts_without_manifest(client: DropboxClient, retrier: Retrier, path: str) -> list[RemoteFile]:
    """`<path>_split_0001`, `_0002`, ... as long as they exist (parts the original tool wrote,
    without a manifest; up to 9,999 parts, which is as far as 4-digit numbers go)."""
    parts: list[RemoteFile] = []
    for index in range(1, 10_000):
        part_path = f"{path}{split.SPLIT_TAG}{index:04d}"
        remote = ask(retrier, "checking Dropbox", lambda: client.metadata(part_path))
        if not isinstance(remote, RemoteFile):
            return parts
        parts.append(remote)
    return parts


def locate_archive(client: DropboxClient, path: str, retrier: Retrier) -> tuple[RemoteArchive | None, str | None]:
    """The archive a member row's dropboxPath names: the file, or the original of split parts
    (with their manifest, or numbered from _split_0001 without one). (None, sentence) when there
    is none. Raises ArchiveChanged when a part is missing or not its manifest's size."""
    remote = ask(retrier, "checking Dropbox", lambda: client.metadata(path))
    if isinstance(remote, RemoteFolder):
        return None, (f"dropboxPath {path} is a folder; with member filled in, dropboxPath must be a .zip "
                      "archive (findFiles shows which archive holds a file)")
    if isinstance(remote, RemoteFile):
        return whole_archive(remote), None
    folder, name = path.rsplit("/", 1)
    manifest_file = ask(retrier, "checking Dropbox", lambda: client.metadata(f"{folder}/{split.manifest_name(name)}"))
    if not isinstance(manifest_file, RemoteFile):
        parts = _parts_without_manifest(client, retrier, path)
        if parts:
            return split_archive(path, parts, None), None
        return None, (f"dropboxPath {path} does not exist in Dropbox (neither as a file nor as split parts): check "
                      "the spelling, or run findFiles to see which archive holds the file")
    try:
        manifest = read_manifest(client, retrier, manifest_file)
    except split.SplitError as exc:
        return None, f"{path} is split in Dropbox, but its manifest cannot be used: {exc.message}"
    parts, problem = _split_parts(client, retrier, folder, manifest)
    if problem is not None:
        raise ArchiveChanged(f"archive {path}: {problem}.", paths=[path])
    archive = split_archive(path, parts, manifest)
    archive.check_sizes()
    return archive, None


def _archive_failed(plan: MemberPlan, log: logging.Logger, path: str, message: str) -> None:
    """An archive that cannot be read: its row's failure (the other rows go on)."""
    plan.failures.append((path, message))
    log.error("FAILED\t%s: %s", path, message)


def _row_archive(client: DropboxClient, row: sheets.SheetRow, retrier: Retrier, plan: MemberPlan,
                 read: dict[str, tuple[RemoteArchive, Directory] | None], log: logging.Logger
                 ) -> tuple[RemoteArchive, Directory] | None:
    """The row's archive and its table of contents (read once per run), or None after recording
    why not (a sheet problem, or the archive's failure)."""
    path = unicodedata.normalize("NFC", row["dropboxPath"])
    key = names.case_key(path)
    if key in read:
        return read[key]
    read[key] = None
    try:
        archive, problem = locate_archive(client, path, retrier)
    except DropboxProblem as exc:  # a path Dropbox refuses: the row's problem, as for a whole file
        archive, problem = None, f"dropboxPath {path}: {exc.message}"
    except DamagedArchive as exc:  # a part missing or replaced
        return _archive_failed(plan, log, path, exc.message)
    if archive is None:
        plan.problems.append(row.problem(problem, "dropboxPath"))
        return None
    try:
        directory, reader = read_toc(archive, client, retrier)
    except FileProblem as exc:  # damaged, changed, unsupported, a part gone
        return _archive_failed(plan, log, path, exc.message)
    plan.archives += 1
    plan.requests += reader.requests
    plan.bytes_read += reader.bytes_read
    read[key] = archive, directory
    return read[key]


def plan_members(client: DropboxClient, rows: Sequence[sheets.SheetRow], log: logging.Logger) -> MemberPlan:
    """Stage 1 of the rows with a member: each archive found and its table of contents read
    (once per run), the members picked and mapped to their local paths. Rows with an unreadable
    cell are skipped (their problem is reported with the tab's). Raises NetworkProblem after
    10 min without Dropbox."""
    retrier = Retrier(log, METADATA_POLICY)
    plan = MemberPlan()
    read: dict[str, tuple[RemoteArchive, Directory] | None] = {}
    claimed: dict[str, MemberTask] = {}
    for row in rows:
        if row["dropboxPath"] is None or row["localDir"] is None or not row["member"]:
            continue
        found = _row_archive(client, row, retrier, plan, read, log)
        if found is None:
            continue
        archive, directory = found
        selected = select_members(directory, row["member"])
        if not selected:
            plan.problems.append(row.problem(
                f"member {row['member']!r} matches no file of {archive.path} ({len(directory):,} entries): check "
                "the spelling (a path inside the archive, or a pattern such as frame_04*.tif); findFiles lists "
                "what the archive holds", "member"))
        fallback_ns = client_modified_epoch(archive.parts[0].client_modified) * 1_000_000_000
        for member in selected:
            target, problem = member_target(row["localDir"], member)
            if problem is None and member.unsupported:
                problem = (f"it cannot be extracted here: {member.unsupported}; download the whole archive and open "
                           "it with 7-Zip")
            # A member that cannot be extracted is reported against the row's folder.
            _claim(plan, claimed, MemberTask(row, archive, member, target or row["localDir"],
                                             member_mtime_ns(member, fallback_ns), problem=problem))
    return plan


def _local_key(path: Path) -> str:
    return unicodedata.normalize("NFC", str(path)).casefold()


def _claim(plan: MemberPlan, claimed: dict[str, MemberTask], task: MemberTask) -> None:
    if task.problem is not None:
        plan.tasks.append(task)
        return
    key = _local_key(task.target)
    other = claimed.get(key)
    if other is None:
        claimed[key] = task
        plan.tasks.append(task)
    elif other.journal_source == task.journal_source:
        plan.duplicates += 1
    else:
        plan.problems.append(task.row.problem(
            f"{task.source} would be saved as {task.target}, where {other.source} goes too (row {other.row.row}). "
            "Give one of the rows another localDir, or a narrower member pattern", "member"))


def clashes(tasks: Iterable[MemberTask], local_targets: Iterable[Path]) -> list[SheetProblem]:
    """Members that would land where a whole-file row of the same run puts a file."""
    taken = {_local_key(path) for path in local_targets}
    return [task.row.problem(f"{task.source} would be saved as {task.target}, where another row downloads a "
                             "file. Give one of the rows another localDir", "localDir")
            for task in tasks if task.problem is None and _local_key(task.target) in taken]


def log_plan(plan: MemberPlan, log: logging.Logger) -> None:
    """One line for the member rows' plan (none when the tab has no such row)."""
    if not plan.tasks and not plan.failures:
        return
    log.info("Archive members: %d file(s) from %d archive(s), %s to write, %s to fetch; table(s) of contents "
             "read with %d ranged request(s) (%s)%s.", len(plan.tasks), plan.archives,
             human_bytes(sum(t.member.size for t in plan.tasks)),
             human_bytes(sum(t.member.compressed_size for t in plan.tasks)), plan.requests,
             human_bytes(plan.bytes_read), f"; {plan.duplicates} listed twice (fetched once)" if plan.duplicates else "")


def bind_items(tasks: list[MemberTask], journal: Journal) -> None:
    """Give every task its journal item (created or found again): source `<archive>#<member>`."""
    usable = [task for task in tasks if task.problem is None]
    items = journal.sync_plan(journal_item(journal.job, task.journal_source, task.target, Kind.FILE,
                                           task.member.size, task.mtime_ns) for task in usable)
    for task, item in zip(usable, items):
        task.item = item


def space_needed(tasks: Iterable[MemberTask]) -> list[tuple[Path, int]]:
    """(row's localDir, bytes) of every member not on disk yet: download_plan.wait_for_room's `extra`."""
    return [(task.row["localDir"], task.member.size) for task in tasks
            if task.problem is None and not task.target.exists()]


# ----------------------------------------------------------------------------- Stage 2


def file_crc32(path: Path) -> int:
    """The CRC-32 of a local file's bytes (what a zip records of each member)."""
    crc = 0
    with open(path, "rb", buffering=0) as handle:
        while True:
            data = handle.read(4 * MIB)
            if not data:
                return crc
            crc = zlib.crc32(data, crc)


def spans(tasks: Sequence[MemberTask]) -> list[list[MemberTask]]:
    """The tasks in groups fetched together: members of one archive whose bytes (member_span)
    are at most SPAN_GAP apart, a group spanning at most SPAN_LIMIT bytes."""
    groups: list[list[MemberTask]] = []
    ordered = sorted(tasks, key=lambda task: (task.archive.key, task.member.header_offset))
    end = -1
    for task in ordered:
        start, stop = member_span(task.member)
        group = groups[-1] if groups else None
        if (group is not None and group[0].archive.key == task.archive.key and start - end <= SPAN_GAP
                and stop - member_span(group[0].member)[0] <= SPAN_LIMIT):
            group.append(task)
            end = max(end, stop)
        else:
            groups.append([task])
            end = stop
    return groups


@dataclass
class FetchCounts:
    """What Stage 2 of the member rows did: members fetched now, already here, done in earlier
    runs; ranged requests and bytes received; (source, why) of each failure."""

    fetched: int = 0
    already_here: int = 0
    done_before: int = 0
    requests: int = 0
    bytes_received: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


class MemberFetcher:
    """Stage 2 of the member rows: checks what is already on disk, fetches the rest in span
    groups on `workers` threads, verifies, renames, and records each member in the journal.
    `pauses` waits for local disk room (the download's own)."""

    def __init__(self, client: DropboxClient, journal: Journal | None, log: logging.Logger, *, pauses: Pauses,
                 workers: int = 4, network_give_up_seconds: float = 3600, first_retry_delay: float = 1.0):
        self.client = client
        self.journal = journal
        self.log = log
        self.pauses = pauses
        self.counts = FetchCounts()
        self._runner = JobRunner({"fetch": workers}, workers * 4)
        self._reads = Retrier(log, RetryPolicy(give_up_seconds=network_give_up_seconds, first_delay=first_retry_delay),
                              stop=lambda: _Stopped() if self._runner.stopping() else None)
        self._lock = threading.Lock()
        self._progress: ByteProgress | None = None

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self.counts, name, getattr(self.counts, name) + amount)

    def _fail(self, task: MemberTask, message: str) -> None:
        with self._lock:
            self.counts.failures.append((task.source, message))
        if task.item is not None and self.journal is not None:
            self.journal.mark_failed(task.item, message)
        self.log.error("FAILED\t%s\t%s\t->\t%s: %s", human_bytes(task.member.size), task.source, task.target, message)
        file_finished(self.log)

    def _advance(self, count: int) -> None:
        if self._progress is not None:
            self._progress.advance(count)

    def _existing(self, task: MemberTask) -> str:
        """'fetch', 'done before' or 'here'; FileProblem when a different file (or a folder) is
        in the way."""
        target, member, item = task.target, task.member, task.item
        info = existing_file(target)
        if info is None:
            return "fetch"
        tag = f"{CRC_TAG}{member.crc32:08x}"
        same_time = abs(info.st_mtime_ns - task.mtime_ns) <= MTIME_SLACK_S * 1_000_000_000
        if item is not None and item.state == State.DONE and item.content_hash == tag \
                and info.st_size == member.size and same_time:
            return "done before"
        if info.st_size == member.size and file_crc32(target) == member.crc32:
            try:
                os.utime(target, ns=(info.st_atime_ns, task.mtime_ns))
            except OSError:
                pass  # a read-only file keeps its date; it is still the right file
            return "here"
        raise different_file(target, info.st_size, member.size, "the member")

    def _done(self, task: MemberTask, result: str, started: float) -> None:
        if task.item is not None and self.journal is not None:
            task.item.content_hash = f"{CRC_TAG}{task.member.crc32:08x}"
            task.item.remote_rev = task.archive.signature
            self.journal.mark_done([task.item])
        log_result(self.log, result, human_bytes(task.member.size), time.monotonic() - started, task.source,
                   task.target, logging.DEBUG if result == "DONE BEFORE" else logging.INFO)

    def _triage(self, tasks: Sequence[MemberTask]) -> list[MemberTask]:
        """Settle the tasks that need no request (problems, files already here); return the rest."""
        to_fetch = []
        for task in tasks:
            started = time.monotonic()
            try:
                if task.problem:
                    raise FileProblem(task.problem, paths=[task.source])
                verdict = self._existing(task)
            except FileProblem as exc:
                self._fail(task, exc.message)
                continue
            except OSError as exc:
                self._fail(task, f"cannot read {exc.filename or task.target} ({exc.strerror})")
                continue
            if verdict == "fetch":
                to_fetch.append(task)
                continue
            self._count("done_before" if verdict == "done before" else "already_here")
            if verdict == "here":
                deletion.discard_temporary(task.partial)
            self._done(task, "DONE BEFORE" if verdict == "done before" else "ALREADY HERE", started)
        return to_fetch

    def run(self, tasks: Sequence[MemberTask]) -> FetchCounts:
        """Fetch every task (per-member problems go to `counts.failures`). Raises what stops the
        run: AuthError, Ctrl-C, a bug; an unfinished member restarts whole next run."""
        to_fetch = self._triage(tasks)
        if not to_fetch:
            return self.counts
        self._progress = ByteProgress(self.log, total=sum(t.member.size for t in to_fetch), desc="Fetching members",
                                      verb="fetch", files_total=len(to_fetch))
        try:
            with self._runner as runner:
                runner.run_each("fetch", self._run_group, spans(to_fetch))
        finally:
            self._progress.close()
        self._runner.raise_if_failed()
        return self.counts

    def _run_group(self, group: list[MemberTask]) -> None:
        archive = group[0].archive
        base = open_reader(archive, self.client, self._reads)
        reader: zip_index.RangeReader = base
        if len(group) > 1:
            reader = SpanReader(base, member_span(group[0].member)[0], max(member_span(t.member)[1] for t in group))
        changed: str | None = None
        try:
            for task in group:
                if self._runner.stopping():
                    return
                if changed is not None:  # the same answer for every member: no more requests
                    self._fail(task, changed)
                    continue
                changed = self._run_task(task, reader)
        finally:
            self._count("requests", base.requests)
            self._count("bytes_received", base.bytes_read)

    def _run_task(self, task: MemberTask, reader: zip_index.RangeReader) -> str | None:
        """Fetch one member; returns the message when its archive changed in Dropbox."""
        started = time.monotonic()
        try:
            self._fetch(task, reader)
        except _Stopped:
            deletion.discard_temporary_quietly(task.partial)
            return None
        except AuthError as exc:
            self._runner.fail(exc)
            return None
        except ArchiveChanged as exc:
            self._fail(task, exc.message)
            return exc.message
        except FileProblem as exc:
            self._fail(task, exc.message)
            return None
        except OSError as exc:
            self._fail(task, f"cannot write {exc.filename or task.target} ({exc.strerror})")
            return None
        self._count("fetched")
        self._done(task, "DOWNLOADED", started)
        return None

    def _fetch(self, task: MemberTask, reader: zip_index.RangeReader) -> None:
        """Extract the member into its partial file and rename it into place. A CRC or size
        mismatch is fetched once more with fresh requests; a full disk waits, then restarts."""
        task.target.parent.mkdir(parents=True, exist_ok=True)
        attempt = 1
        fresh: list[PartedReader] = []
        try:
            while True:
                try:
                    self._extract(task, reader)
                    break
                except _DiskFull:
                    self.pauses.wait_for_disk(task.target.parent, task.member.size, "the local disk is nearly full")
                except ArchiveChanged:
                    raise
                except DamagedArchive as exc:
                    if attempt == 2:
                        raise FileProblem(f"{exc.message} Fetched twice with the same result; nothing was kept.",
                                          paths=[task.source]) from None
                    self.log.warning("%s: %s; fetching it again.", task.source, exc.message)
                    attempt += 1
                if self._runner.stopping():
                    raise _Stopped()
                fresh.append(open_reader(task.archive, self.client, self._reads))  # new bytes, not the span's
                reader = fresh[-1]
        finally:
            for used in fresh:
                self._count("requests", used.requests)
                self._count("bytes_received", used.bytes_read)
        self._publish(task)

    def _extract(self, task: MemberTask, reader: zip_index.RangeReader) -> None:
        """The member's checked content into its partial file ("wb": a leftover of an earlier run
        starts over), fsynced. Raises DamagedArchive (partial removed), _DiskFull, _Stopped."""
        partial = task.partial
        folder = partial.parent
        written = 0

        def write(data: bytes) -> None:
            nonlocal written
            if self._runner.stopping():
                raise _Stopped()
            if not self.pauses.disk_has_room(folder, len(data)):
                raise _DiskFull()
            write_all(out, data)
            written += len(data)
            self._advance(len(data))

        try:
            with open(partial, "wb", buffering=0) as out:
                zip_index.fetch_member(reader, task.member, write)
                os.fsync(out.fileno())
        except OSError as exc:
            self._advance(-written)
            deletion.discard_temporary_quietly(partial)
            if exc.errno == errno.ENOSPC:
                raise _DiskFull() from None
            raise
        except BaseException:
            self._advance(-written)
            deletion.discard_temporary_quietly(partial)
            raise

    def _publish(self, task: MemberTask) -> None:
        os.utime(task.partial, ns=(time.time_ns(), task.mtime_ns))
        try:
            rename_without_replacing(task.partial, task.target)
        except FileExistsError:
            deletion.discard_temporary_quietly(task.partial)
            self._advance(-task.member.size)
            raise FileProblem(f"{task.target} appeared while it was being fetched; it was not replaced. "
                              "Move or rename it and run again.", paths=[task.target]) from None
