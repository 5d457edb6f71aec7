"""Getting data back (app.py with sheetName = 'dropboxDownload_API'): download the files and
folders listed in the tab, each verified by its Dropbox content hash, resumable after any crash,
then, with joinFlag = 1, join the split files among them.

Where things land (columns dropboxPath, localDir, joinFlag):
  - a file row `/Archive/run1/a.mrc` -> `<localDir>/a.mrc`;
  - a folder row `/Archive/run1` -> `<localDir>/run1/...`: the folder keeps its own name, as when
    a folder is dragged into another one, so restoring `/Archive/run1` into `D:\\restore` gives
    `D:\\restore\\run1\\...`; empty folders are created too. The Dropbox root `/` lands directly
    in localDir;
  - a row may name the original of a split file (`/Archive/big.mrc` when Dropbox holds
    `big.mrc_split_0001`, ... and `big.mrc_split_manifest.json`): its parts and manifest are
    downloaded into localDir.

Every file is written to `.~<hash of name>.partial` next to its final place (a short name, so
that names near the file system's limit fit too) and renamed only once its content hash equals
the one Dropbox reports; its modification time is set from Dropbox's `client_modified` (the
original file's time, to the second). A rerun continues a partial file
from its current size with a ranged request, re-hashing the bytes already on disk instead of
downloading them again. A file that fails verification is downloaded once more from scratch,
then reported. An existing local file is never overwritten: an identical one (same size and
content hash, or the journal says it was downloaded and its size and date are unchanged) is
kept, a different one is reported.

joinFlag = 1: once every part of a split file is verified, it is joined with
`archive_dropbox.joining` (checked against the SHA-256 in its manifest); the parts and the
manifest are then deleted, because a lab wants the original file back. Parts without a
manifest (made by the original tool) are joined but kept, since nothing can prove the join.
"""

from __future__ import annotations

import concurrent.futures as futures
import datetime as dt
import errno
import hashlib
import logging
import os
import stat
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import psutil
from tqdm import tqdm

from . import deletion, joining, names, sheets, split
from .cli import RunContext
from .content_hash import ContentHasher, file_content_hash, hash_range
from .dropbox_client import (DropboxClient, DropboxProblem, NetworkProblem, RangeNotSatisfiable, RateLimited, RemoteFile,
                             RemoteFolder)
from .errors import EXIT_OK, EXIT_SOME_FAILED, AuthError, FileProblem, SheetError, SheetProblem
from .localfs import legacy_temporary, rename_without_replacing, temporary_sibling
from .job_setup import open_client
from .journal import Item, Journal
from .prepare import human_bytes
from .status import every, locked, shutdown, status_of, wait_futures

COLUMNS = [sheets.Column("dropboxPath", sheets.DROPBOX_PATH),
           sheets.Column("localDir", sheets.LOCAL_DIR),
           sheets.Column("joinFlag", sheets.FLAG)]

PARTIAL_TAG = "partial"
READ_CHUNK = 4 * 1024 * 1024
# Room kept free on the target disk so a download never fills it to the last byte.
SPACE_MARGIN = 64 * 1024 * 1024
# FAT and exFAT keep modification times in 2-second steps.
MTIME_SLACK_S = 2

T = TypeVar("T")


# -- what to download --------------------------------------------------------------------------

@dataclass
class SplitOriginal:
    """A row naming a file that Dropbox holds only as split parts and their manifest."""

    path: str
    manifest: RemoteFile
    parts: list[RemoteFile]


@dataclass
class Task:
    """One Dropbox file to one local path."""

    row: sheets.SheetRow
    remote: RemoteFile
    target: Path
    item: Item | None = None
    problem: str | None = None  # known before starting (a name this system refuses)

    @property
    def partial(self) -> Path:
        return temporary_sibling(self.target, PARTIAL_TAG)

    @property
    def source(self) -> str:
        return self.remote.path_display or self.remote.path_lower


@dataclass
class Series:
    """The parts (and manifest) of one split file found among a joinFlag row's downloads."""

    folder: Path
    base: str
    tasks: list[Task] = field(default_factory=list)
    state: str = "join"  # join | verify (joined earlier, clean-up may be unfinished) | done

    @property
    def output(self) -> Path:
        return self.folder / self.base

    @property
    def manifest_task(self) -> Task | None:
        return next((t for t in self.tasks if split.parse_manifest_name(t.target.name)), None)

    @property
    def key_source(self) -> str:
        """The Dropbox path that stands for the whole series in the journal."""
        anchor = self.manifest_task or min(self.tasks, key=lambda t: t.target.name)
        return anchor.remote.path_lower

    @property
    def signature(self) -> str:
        """Changes when any part or the manifest changes in Dropbox."""
        digest = hashlib.sha256()
        for task in sorted(self.tasks, key=lambda t: t.remote.path_lower):
            digest.update(f"{task.remote.path_lower}\0{task.remote.content_hash}\0{task.remote.size}\n".encode())
        return digest.hexdigest()

    @property
    def size(self) -> int:
        return sum(t.remote.size for t in self.tasks if split.parse_part_name(t.target.name))


@dataclass
class DownloadPlan:
    tasks: list[Task] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    duplicates: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(t.remote.size for t in self.tasks)


@dataclass
class Summary:
    files_total: int = 0
    downloaded: int = 0
    already_here: int = 0
    done_before: int = 0
    joined: int = 0
    joined_before: int = 0
    bytes_received: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class Options:
    workers: int = 4
    sleep_seconds: float = 1800
    network_give_up_seconds: float = 3600
    first_retry_delay: float = 1.0  # seconds; doubled after each failed attempt, up to a minute


# -- small helpers -----------------------------------------------------------------------------

def client_modified_epoch(moment: dt.datetime) -> int:
    """Dropbox's client_modified (naive UTC, whole seconds) as a Unix time."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return int(moment.timestamp())


def _case_key(path: Path | str) -> str:
    return unicodedata.normalize("NFC", str(path)).casefold()


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _unwritable_name(row: sheets.SheetRow, dropbox_path: str, target: Path, seen: set[str]) -> SheetProblem | None:
    """The first name on the way from the row's localDir to `target` that this computer cannot
    hold (names.local_name_problem), as the Dropbox path holding it; each such path once."""
    relative = target.relative_to(row["localDir"]).parts
    remote = [p for p in dropbox_path.split("/") if p]
    for depth, name in enumerate(relative, 1):
        why = names.local_name_problem(name)
        if why is None:
            continue
        place = "/" + "/".join(remote[:len(remote) - len(relative) + depth])
        if place in seen:
            return None
        seen.add(place)
        return row.problem(f"{place}: {why}. Rename it in Dropbox (on dropbox.com) and run again, or "
                           "restore this row on macOS or Linux", "dropboxPath")
    return None


def _write_all(handle, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = handle.write(view)
        view = view[written:]


def with_retries(what: str, call: Callable[[], T], log: logging.Logger, *, give_up_seconds: float = 600) -> T:
    """One metadata or listing call, riding out dropped connections and rate limits."""
    started, delay, failures = time.monotonic(), 1.0, 0
    status = status_of(log)
    while True:
        try:
            answer = call()
            status.network_ok()
            return answer
        except RateLimited as exc:
            time.sleep(max(exc.retry_after, 0.5))
        except NetworkProblem as exc:
            if time.monotonic() - started > give_up_seconds:
                raise
            failures += 1
            log.debug("%s: %s; trying again in %.0f s", what, exc.message, delay)
            status.network_trouble(f"{what}: {exc.message}", delay, failures)
            time.sleep(delay)
            delay = min(delay * 2, 60.0)


def _sleep(seconds: float, stop: Callable[[], bool]) -> None:
    """Sleep, but wake within a second when the run is being stopped."""
    deadline = time.monotonic() + seconds
    while not stop():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 1.0))


class DiskGuard:
    """Keeps downloads from filling the local disk: waits (logging why, re-checking every
    `sleep_seconds`) until the disk holding a folder has the room asked for."""

    def __init__(self, log: logging.Logger, sleep_seconds: float, usage: Callable = psutil.disk_usage):
        self._log = log
        self._status = status_of(log)
        self._sleep = sleep_seconds
        self._usage = usage
        self._lock = threading.Lock()
        self.paused_seconds = 0.0

    def free(self, folder: Path) -> int:
        return int(self._usage(str(_existing_ancestor(folder))).free)

    def has_room(self, folder: Path, needed: int) -> bool:
        return self.free(folder) >= needed + SPACE_MARGIN

    def wait_for_room(self, folder: Path, needed: int, reason: str, stop: Callable[[], bool] = lambda: False) -> None:
        if self.has_room(folder, needed):
            return
        # One worker reports and waits; the others queue behind it and re-check after.
        with locked(self._lock):
            paused = False
            while not self.has_room(folder, needed):
                if stop():
                    self._status.resumed()
                    return
                paused = True
                self._status.paused(
                    f"PAUSED: {reason}: {human_bytes(self.free(folder))} free on the disk holding "
                    f"{_existing_ancestor(folder)}, {human_bytes(needed)} needed (plus {human_bytes(SPACE_MARGIN)} "
                    f"kept free). Free some space; checking again every {every(self._sleep)}. Nothing is lost "
                    "while paused")
                _sleep(self._sleep, stop)
                self.paused_seconds += self._sleep
            if paused:
                self._status.resumed(f"The disk holding {_existing_ancestor(folder)} has room again "
                                     f"({human_bytes(self.free(folder))} free): continuing.")


# -- stage 1: check the rows and list what to download -----------------------------------------

def _dropbox_parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _find_split_original(client: DropboxClient, path: str, log: logging.Logger
                         ) -> tuple[SplitOriginal | None, str | None]:
    """`path` is missing: is it the original of a split file? (result, problem)"""
    name = path.rsplit("/", 1)[1]
    parent = _dropbox_parent(path)
    manifest_path = parent.rstrip("/") + "/" + split.manifest_name(name)
    manifest = with_retries("checking Dropbox", lambda: client.metadata(manifest_path), log)
    if not isinstance(manifest, RemoteFile):
        return None, None

    def read() -> bytes:
        _, chunks = client.download_range(manifest.path_lower, 0, None)
        return b"".join(chunks)

    try:
        parsed = split.parse_manifest(with_retries("reading a split manifest", read, log), manifest.path_display)
    except split.SplitError as exc:
        return None, f"{path} is split in Dropbox, but its manifest cannot be used: {exc.message}"
    parts: list[RemoteFile] = []
    for part in parsed.parts:
        part_path = parent.rstrip("/") + "/" + part.name
        remote = with_retries("checking Dropbox", lambda: client.metadata(part_path), log)
        if not isinstance(remote, RemoteFile):
            return None, (f"{path} is split in Dropbox, but its part {part.name} is missing there "
                          f"({len(parsed.parts)} parts are listed in {manifest.path_display})")
        parts.append(remote)
    return SplitOriginal(path, manifest, parts), None


def check_rows(client: DropboxClient, rows: list[sheets.SheetRow], log: logging.Logger,
               earlier: Iterable[SheetProblem] = ()) -> dict[int, RemoteFile | RemoteFolder | SplitOriginal]:
    """Every row's Dropbox path must exist and its localDir must be creatable; every problem is
    listed together (SheetError) before anything is downloaded, after `earlier` (the tab's own
    problems, from sheets.read_tab_with_problems): a cell that could not be read is None, and the
    rest of its row is still checked."""
    problems: list[SheetProblem] = list(earlier)
    troubled = {(problem.row, problem.column) for problem in problems}
    roots: dict[int, RemoteFile | RemoteFolder | SplitOriginal] = {}
    for row in rows:
        local: Path | None = row["localDir"]
        if local is not None and (row.row, "localDir") not in troubled:
            ancestor = _existing_ancestor(local)
            if not ancestor.is_dir():
                problems.append(row.problem(f"localDir {local} cannot be created: {ancestor} is a file. Give a "
                                            "folder", "localDir"))
            elif not os.access(ancestor, os.W_OK | os.X_OK):
                problems.append(row.problem(f"localDir {local} cannot be written to (no permission on "
                                            f"{ancestor}). Choose another folder or ask for write access", "localDir"))
        if row["dropboxPath"] is None:
            continue
        # A path pasted from a Mac (Finder, a macOS file name) may be decomposed (NFD); Dropbox
        # finds an existing name only by its NFC form (see dropbox_client.lookup_path).
        path: str = unicodedata.normalize("NFC", row["dropboxPath"])
        if path == "/":
            roots[row.row] = RemoteFolder("/", "/")
            continue
        try:
            remote = with_retries("checking Dropbox", lambda: client.metadata(path), log)
        except DropboxProblem as exc:
            problems.append(row.problem(f"dropboxPath {path}: {exc.message}", "dropboxPath"))
            continue
        if remote is None:
            original, problem = _find_split_original(client, path, log)
            if original is not None:
                roots[row.row] = original
                continue
            problems.append(row.problem(problem or (
                f"dropboxPath {path} does not exist in Dropbox: check the spelling (a Dropbox path starts "
                "with '/', e.g. /Archive/2024/run1; team folders start with the team folder's name)"),
                "dropboxPath"))
            continue
        roots[row.row] = remote
        if isinstance(remote, RemoteFile) and local is not None:
            name = (remote.path_display or path).rsplit("/", 1)[1]
            in_the_way = local / name
            if in_the_way.is_dir():
                problems.append(row.problem(f"{in_the_way} is a folder, so the file {name} cannot be saved "
                                            "there. Rename the folder or choose another localDir", "localDir"))
    if problems:
        raise SheetError(sorted(problems, key=lambda problem: problem.row or 0))
    return roots


def _relative_parts(root_lower: str, entry: RemoteFile | RemoteFolder) -> list[str] | None:
    """The entry's path below the root folder, in Dropbox's display spelling. (Only the last
    component of path_display is guaranteed to be spelled right, so the count of components
    comes from path_lower.)"""
    root = [p for p in root_lower.split("/") if p]
    lower = [p for p in entry.path_lower.split("/") if p]
    display = [p for p in (entry.path_display or entry.path_lower).split("/") if p]
    if len(display) != len(lower):
        display = lower
    if lower[:len(root)] != root:
        return None
    return display[len(root):]


def expand(client: DropboxClient, rows: list[sheets.SheetRow],
           roots: dict[int, RemoteFile | RemoteFolder | SplitOriginal], log: logging.Logger) -> DownloadPlan:
    """Every file (and folder) each row brings, mapped to its local path; raises SheetError when
    two files would land at the same local path, or a name cannot be held here (names.py:
    Windows refuses CON, aux.txt, a trailing dot...), before anything is written."""
    plan = DownloadPlan()
    claimed: dict[str, Task] = {}
    problems: list[SheetProblem] = []
    folders: dict[str, Path] = {}
    unwritable: set[str] = set()

    def check_name(row: sheets.SheetRow, dropbox_path: str, target: Path) -> None:
        # Found here, a name Windows refuses stops the run before anything is written; found by
        # open() it failed late, as "file not found" or by writing to a device (CON, NUL).
        problem = _unwritable_name(row, dropbox_path, target, unwritable)
        if problem is not None:
            problems.append(problem)

    def add(row: sheets.SheetRow, remote: RemoteFile, target: Path) -> None:
        check_name(row, remote.path_display or remote.path_lower, target)
        key = _case_key(target)
        other = claimed.get(key)
        if other is not None:
            if other.remote.path_lower == remote.path_lower:
                plan.duplicates += 1
                return
            if other.row is row:
                problems.append(row.problem(
                    f"{remote.path_display} and {other.remote.path_display} differ only in case (or Unicode "
                    f"form): both would be saved as {target}, and Windows and macOS keep such names as one "
                    "file. Rename one of them in Dropbox and run again", "dropboxPath"))
                return
            problems.append(row.problem(f"{remote.path_display} would be saved as {target}, where row "
                                        f"{other.row.row} already puts {other.remote.path_display}. Give one of "
                                        "the rows another localDir", "localDir"))
            return
        task = Task(row, remote, target)
        claimed[key] = task
        plan.tasks.append(task)

    for row in rows:
        root = roots[row.row]
        local: Path = row["localDir"]
        folders.setdefault(_case_key(local), local)
        if isinstance(root, RemoteFile):
            add(row, root, local / (root.path_display or root.path_lower).rsplit("/", 1)[1])
        elif isinstance(root, SplitOriginal):
            for remote in [*root.parts, root.manifest]:
                add(row, remote, local / (remote.path_display or remote.path_lower).rsplit("/", 1)[1])
        else:
            name = "" if root.path_lower == "/" else (root.path_display or root.path_lower).rsplit("/", 1)[1]
            base = local / name if name else local
            check_name(row, root.path_display or root.path_lower, base)
            folders.setdefault(_case_key(base), base)
            entries = with_retries(f"listing {root.path_display}",
                                   lambda: list(client.iter_entries(root.path_lower)), log)
            for entry in entries:
                parts = _relative_parts(root.path_lower, entry)
                if parts is None:
                    continue
                target = base.joinpath(*parts) if parts else base
                if isinstance(entry, RemoteFolder):
                    check_name(row, entry.path_display or entry.path_lower, target)
                    folders.setdefault(_case_key(target), target)
                elif parts:
                    add(row, entry, target)
    if problems:
        raise SheetError(problems)
    plan.folders = sorted(folders.values(), key=lambda p: len(p.parts))
    return plan


def find_series(plan: DownloadPlan) -> list[Series]:
    """The split files among the downloads of joinFlag rows, grouped by folder and name."""
    found: dict[tuple[str, str], Series] = {}
    for task in plan.tasks:
        if not task.row["joinFlag"]:
            continue
        name = task.target.name
        parsed = split.parse_part_name(name)
        base = parsed[0] if parsed else split.parse_manifest_name(name)
        if base is None:
            continue
        key = (_case_key(task.target.parent), base)
        found.setdefault(key, Series(task.target.parent, base)).tasks.append(task)
    return [s for s in found.values() if any(split.parse_part_name(t.target.name) for t in s.tasks)]


# -- stage 2: download -------------------------------------------------------------------------

class _Stopped(Exception):
    """Ctrl-C or a fatal error elsewhere: leave the partial file for the next run."""


class Downloader:
    def __init__(self, client: DropboxClient, journal: Journal, options: Options, log: logging.Logger,
                 disk: DiskGuard | None = None):
        self.client = client
        self.journal = journal
        self.options = options
        self.log = log
        self.disk = disk or DiskGuard(log, options.sleep_seconds)
        self.status = status_of(log)
        self.summary = Summary()
        self._progress: tqdm | None = None
        self._progress_lock = threading.Lock()
        self._bytes_left = 0  # for the status line; tqdm counts nothing when hidden
        self._summary_lock = threading.Lock()
        self._fatal: BaseException | None = None
        self.failed_tasks: set[int] = set()

    # -- helpers -----------------------------------------------------------------------------

    def _stopping(self) -> bool:
        return self._fatal is not None

    def _advance(self, count: int, received: int = 0) -> None:
        with self._progress_lock:
            self.summary.bytes_received += received
            self._bytes_left -= count
            if self._progress is not None:
                self._progress.update(count)

    def _log_result(self, task: Task, result: str, seconds: float) -> None:
        level = logging.DEBUG if result == "DONE BEFORE" else logging.INFO
        self.log.log(level, "%s\t%s\t%.1fs\t%s\t->\t%s", result, human_bytes(task.remote.size), seconds,
                     task.source, task.target)

    def _fail(self, task: Task, message: str) -> None:
        with self._summary_lock:
            self.summary.failures.append((task.source, message))
            self.failed_tasks.add(id(task))
        if task.item is not None:
            self.journal.mark_failed(task.item, message)
        self.log.error("FAILED\t%s\t%s\t->\t%s: %s", human_bytes(task.remote.size), task.source, task.target,
                       message)

    def _count(self, field_name: str) -> None:
        with self._summary_lock:
            setattr(self.summary, field_name, getattr(self.summary, field_name) + 1)

    # -- one file ----------------------------------------------------------------------------

    def _existing(self, task: Task) -> str:
        """'download', 'done before' or 'here' for a task whose target may already exist;
        raises FileProblem when a different file (or a folder) is in the way."""
        target, remote, item = task.target, task.remote, task.item
        try:
            info = os.lstat(target)
        except FileNotFoundError:
            return "download"
        if not stat.S_ISREG(info.st_mode):
            raise FileProblem(f"{target} already exists and is a folder or a link, so the file was not saved. "
                              "Rename it and run again.", paths=[target])
        wanted_mtime = client_modified_epoch(remote.client_modified)
        if (item is not None and item.state == "done" and item.content_hash == remote.content_hash
                and info.st_size == remote.size and abs(int(info.st_mtime) - wanted_mtime) <= MTIME_SLACK_S):
            return "done before"
        if info.st_size == remote.size and (remote.content_hash is None
                                            or file_content_hash(target) == remote.content_hash):
            # The same bytes: give it Dropbox's date too, so the next run recognises it at once.
            try:
                os.utime(target, (info.st_atime, wanted_mtime))
            except OSError:
                pass  # a read-only file keeps its date; it is still the right file
            return "here"
        raise FileProblem(f"a different file already exists at {target} ({human_bytes(info.st_size)}; the "
                          f"Dropbox file has {human_bytes(remote.size)}{' and other content' if info.st_size == remote.size else ''}). "
                          "It was not overwritten: move or rename it and run again.", paths=[target])

    def _resume_point(self, task: Task) -> tuple[int, ContentHasher]:
        """Continue a partial file left by an earlier run when it can belong to this version."""
        partial, remote, item = task.partial, task.remote, task.item
        legacy = legacy_temporary(task.target, "." + PARTIAL_TAG)
        if legacy is not None and not partial.exists():
            os.rename(legacy, partial)  # left by a version that named it `.~<name>.partial`
        try:
            size = os.lstat(partial).st_size
        except FileNotFoundError:
            return 0, ContentHasher()
        stale = item is not None and item.remote_rev and item.remote_rev != remote.rev
        if size > remote.size or stale or not partial.is_file():
            self.log.info("Discarding %s: it belongs to an older version of %s.", partial.name, task.source)
            deletion.discard_temporary(partial)
            return 0, ContentHasher()
        if size:
            self.log.info("Resuming %s at %s of %s (partial download from an earlier run).", task.source,
                          human_bytes(size), human_bytes(remote.size))
        hasher = hash_range(partial, 0, size)
        self._advance(size)
        return size, hasher

    def _fetch(self, task: Task, offset: int, hasher: ContentHasher) -> ContentHasher:
        """Fill the partial file up to the file's size, continuing after network trouble from
        the bytes already written. Returns the hasher of the whole partial file."""
        partial = task.partial
        trouble_since: float | None = None
        delay = self.options.first_retry_delay
        restarts = failures = 0
        with open(partial, "ab", buffering=0) as out:
            while offset < task.remote.size:
                if self._stopping():
                    raise _Stopped()
                try:
                    served, chunks = self.client.download_range(task.remote.path_lower, offset, None,
                                                                chunk_size=READ_CHUNK)
                    self.status.network_ok()
                    if served.rev != task.remote.rev:
                        chunks.close()
                        restarts += 1
                        if restarts > 3:
                            raise FileProblem("the file keeps changing in Dropbox while it is downloaded; try "
                                              "again later", paths=[task.source])
                        self.log.info("%s changed in Dropbox since it was listed: downloading the new version.",
                                      task.source)
                        os.ftruncate(out.fileno(), 0)
                        self._advance(-offset)
                        offset, hasher = 0, ContentHasher()
                        task.remote = served
                        if task.item is not None:
                            self.journal.mark_downloading(task.item, served.rev)
                        continue
                    for chunk in chunks:
                        if not self.disk.has_room(partial.parent, len(chunk)):
                            chunks.close()
                            self.disk.wait_for_room(partial.parent, task.remote.size - offset,
                                                    "the local disk is nearly full", self._stopping)
                            break
                        try:
                            _write_all(out, chunk)
                        except OSError:
                            chunks.close()
                            os.ftruncate(out.fileno(), offset)  # drop a half-written chunk
                            raise
                        hasher.update(chunk)
                        offset += len(chunk)
                        self._advance(len(chunk), len(chunk))
                        if self._stopping():
                            chunks.close()
                            raise _Stopped()
                    trouble_since, delay = None, self.options.first_retry_delay
                except NetworkProblem as exc:
                    now = time.monotonic()
                    first = trouble_since is None
                    trouble_since = trouble_since or now
                    if now - trouble_since > self.options.network_give_up_seconds:
                        raise FileProblem(f"the network failed for more than "
                                          f"{self.options.network_give_up_seconds / 60:.0f} min ({exc.message}); "
                                          "run again to continue from the bytes already downloaded",
                                          paths=[task.source]) from None
                    failures = 1 if first else failures + 1
                    # Each file says once where it continues; the shared status tells the rest.
                    self.log.log(logging.INFO if first else logging.DEBUG, "%s: %s; continuing from byte %s in %.0f s.",
                                 task.source, exc.message, f"{offset:,}", delay)
                    self.status.network_trouble(exc.message, delay, failures)
                    _sleep(delay, self._stopping)
                    delay = min(delay * 2, 60.0)
                except RateLimited as exc:
                    _sleep(max(exc.retry_after, 0.5), self._stopping)
                except RangeNotSatisfiable:
                    fresh = with_retries("checking Dropbox", lambda: self.client.metadata(task.remote.path_lower),
                                         self.log)
                    if not isinstance(fresh, RemoteFile):
                        raise FileProblem("the file was deleted from Dropbox while it was downloaded",
                                          paths=[task.source]) from None
                    os.ftruncate(out.fileno(), 0)
                    self._advance(-offset)
                    offset, hasher, task.remote = 0, ContentHasher(), fresh
                    restarts += 1
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise FileProblem(f"cannot write {partial} ({exc.strerror})", paths=[partial]) from None
                    self.disk.wait_for_room(partial.parent, task.remote.size - offset, "the local disk is full",
                                            self._stopping)
            os.fsync(out.fileno())
        return hasher

    def _download(self, task: Task, started: float) -> None:
        remote, item = task.remote, task.item
        task.target.parent.mkdir(parents=True, exist_ok=True)
        for attempt in (1, 2):
            offset, hasher = self._resume_point(task)
            if item is not None and task.remote.size > READ_CHUNK:
                # Only a file big enough to leave a useful partial behind is worth a journal write.
                self.journal.mark_downloading(item, task.remote.rev)
            hasher = self._fetch(task, offset, hasher)
            remote = task.remote
            size = task.partial.stat().st_size
            local_hash = hasher.content_hash()
            if size == remote.size and (remote.content_hash is None or local_hash == remote.content_hash):
                break
            deletion.discard_temporary(task.partial)
            self._advance(-size)
            if attempt == 1:
                self.log.warning("%s: the downloaded bytes do not match Dropbox's content hash (corrupted on the "
                                 "way); downloading it again.", task.source)
                continue
            raise FileProblem(f"the download was corrupted twice (its content hash {local_hash} differs from "
                              f"Dropbox's {remote.content_hash}); nothing was kept. Run again later.",
                              paths=[task.source])
        wanted_mtime = client_modified_epoch(remote.client_modified)
        os.utime(task.partial, (time.time(), wanted_mtime))
        try:
            rename_without_replacing(task.partial, task.target)
        except FileExistsError:
            deletion.discard_temporary_quietly(task.partial)
            self._advance(-remote.size)
            raise FileProblem(f"{task.target} appeared while it was being downloaded; it was not replaced. "
                              "Move or rename it and run again.", paths=[task.target]) from None
        if item is not None:
            item.content_hash, item.remote_rev = local_hash, remote.rev
            self.journal.mark_done([item])
        self._count("downloaded")
        self._log_result(task, "DOWNLOADED", time.monotonic() - started)

    def _run_task(self, task: Task) -> None:
        if self._stopping():
            return
        started = time.monotonic()
        try:
            if task.problem:
                raise FileProblem(task.problem, paths=[task.source])
            verdict = self._existing(task)
            if verdict == "done before":
                self._count("done_before")
                self._advance(task.remote.size)
                self._log_result(task, "DONE BEFORE", 0)
                return
            if verdict == "here":
                if task.item is not None:
                    task.item.content_hash, task.item.remote_rev = task.remote.content_hash, task.remote.rev
                    self.journal.mark_done([task.item])
                deletion.discard_temporary(task.partial)
                self._count("already_here")
                self._advance(task.remote.size)
                self._log_result(task, "ALREADY HERE", time.monotonic() - started)
                return
            self._download(task, started)
        except _Stopped:
            return
        except AuthError as exc:
            self._fatal = exc
        except FileProblem as exc:
            self._fail(task, exc.message)
        except OSError as exc:
            self._fail(task, f"cannot write {exc.filename or task.target} ({exc.strerror})")

    # -- joining -----------------------------------------------------------------------------

    def join(self, series_list: list[Series]) -> None:
        for series in series_list:
            if self._stopping():
                return
            if series.state == "done":
                self._count("joined_before")
                self.log.debug("JOINED BEFORE\t%s\t%s", human_bytes(series.size), series.output)
                continue
            if any(id(t) in self.failed_tasks for t in series.tasks):
                message = "not joined: some of its parts could not be downloaded (see above)"
                self.summary.failures.append((str(series.output), message))
                self.log.error("NOT JOINED\t%s: %s", series.output, message)
                continue
            started = time.monotonic()
            manifest = series.manifest_task
            first = min((t.target for t in series.tasks if split.parse_part_name(t.target.name)),
                        key=lambda p: split.parse_part_name(p.name)[1])
            start_from = first if first.exists() else (manifest.target if manifest else first)
            try:
                outcome = joining.join_split_file(start_from, delete_parts=manifest is not None, unzip=False,
                                                  log=self.log)
            except FileProblem as exc:
                self.summary.failures.append((str(series.output), exc.message))
                self.log.error("NOT JOINED\t%s: %s", series.output, exc.message)
                continue
            self._record_joined(series)
            self._count("joined")
            note = ("verified against its manifest; parts deleted" if manifest is not None else
                    "NOT verified (no manifest); parts kept")
            self.log.info("JOINED\t%s\t%.1fs\t%d parts\t->\t%s (%s)", human_bytes(outcome.size),
                          time.monotonic() - started, len(series.tasks) - (manifest is not None),
                          series.output, note)

    def _record_joined(self, series: Series) -> None:
        """Remember the verified join so a rerun neither downloads the deleted parts again nor
        re-hashes the joined file: its size and modification time are the quick check."""
        info = series.output.stat()
        item = Item(id=None, job=self.journal.job, source=series.key_source, destination=str(series.output),
                    kind="joined", part_offset=0, length=info.st_size, source_size=info.st_size,
                    source_mtime_ns=info.st_mtime_ns)
        [item] = self.journal.sync_plan([item])
        item.content_hash, item.sha256 = series.signature, None
        self.journal.mark_done([item])

    # -- the whole job -----------------------------------------------------------------------

    def run(self, tasks: list[Task], series_list: list[Series], total_files: int) -> Summary:
        started = time.monotonic()
        self.summary.files_total = total_files
        total = sum(t.remote.size for t in tasks)
        self._bytes_left = total
        self.status.remaining(lambda: f"{human_bytes(max(0, self._bytes_left))} still to download")
        self._progress = self.status.show(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000,
                                               desc="Downloading", disable=None, dynamic_ncols=True))
        pool = futures.ThreadPoolExecutor(max_workers=self.options.workers, thread_name_prefix="download")
        try:
            pending: set[futures.Future] = set()
            # Large files first, so one big file does not start last and finish alone.
            for task in sorted(tasks, key=lambda t: -t.remote.size):
                pending.add(pool.submit(self._run_task, task))
                if len(pending) >= self.options.workers * 4:
                    finished, pending = wait_futures(pending, futures.FIRST_COMPLETED)
                    _raise_bugs(finished)
                if self._fatal is not None:
                    break
            finished, _ = wait_futures(pending)
            _raise_bugs(finished)
        except BaseException as exc:
            # Ctrl-C or a bug: stop the workers between chunks; partial files stay for the next run.
            if self._fatal is None:
                self._fatal = exc if isinstance(exc, Exception) else KeyboardInterrupt()
            raise
        finally:
            shutdown(pool)
            self.status.hide(self._progress)
            self.status.remaining(None)
            self._progress.close()
        if self._fatal is not None:
            raise self._fatal
        self.join(series_list)
        self.summary.seconds = time.monotonic() - started
        return self.summary


def _raise_bugs(finished: Iterable[futures.Future]) -> None:
    for future in finished:
        future.result()


# -- planning against the local disk and the journal -------------------------------------------

def _series_state(series: Series, recorded: dict[tuple[str, str], Item]) -> str:
    output = series.output
    try:
        info = os.lstat(output)
    except FileNotFoundError:
        return "join"
    item = recorded.get((series.key_source, str(output)))
    if (item is not None and item.state == "done" and item.kind == "joined" and item.content_hash == series.signature
            and info.st_size == item.length and info.st_mtime_ns == item.source_mtime_ns):
        return "done"
    manifest = series.manifest_task
    if manifest is not None and manifest.target.is_file():
        # Joined by an earlier run that stopped while deleting the parts: the join step checks
        # the file against the manifest and finishes the clean-up; nothing is downloaded again.
        return "verify"
    return "join"


def bytes_needed(tasks: Iterable[Task]) -> int:
    """Bytes still to write for these tasks (partial files already on disk count as written)."""
    needed = 0
    for task in tasks:
        if task.target.exists():
            continue
        try:
            have = task.partial.stat().st_size
        except OSError:
            have = 0
        needed += max(0, task.remote.size - have)
    return needed


def space_needed(tasks: list[Task], series_list: list[Series]) -> dict[Path, int]:
    """Bytes to write per local disk (named by the first row folder found on it): the downloads
    still missing, plus a joined copy of every split file to join (its parts are deleted only
    after the join is verified, so both exist for a while)."""
    by_device: dict[int, Path] = {}
    needed: dict[Path, int] = {}

    def add(folder: Path, count: int) -> None:
        anchor = _existing_ancestor(folder)
        name = by_device.setdefault(anchor.stat().st_dev, anchor)
        needed[name] = needed.get(name, 0) + count

    for task in tasks:
        add(task.row["localDir"], bytes_needed([task]))
    for series in series_list:
        if series.state == "join":
            add(series.tasks[0].row["localDir"], series.size)
    return needed


def _log_plan(plan: DownloadPlan, todo: list[Task], log: logging.Logger) -> None:
    log.info("Plan: %d files (%s) in %d folders; %d split file(s) to join%s.", len(plan.tasks),
             human_bytes(plan.total_bytes), len(plan.folders),
             sum(1 for s in plan.series if s.state != "done"),
             f"; {plan.duplicates} listed twice (downloaded once)" if plan.duplicates else "")
    done = len(plan.tasks) - len(todo)
    if done:
        log.info("%d file(s) belong to split files joined by an earlier run: not downloaded again.", done)


def run(context: RunContext, sheet: str) -> int:
    """app.py with sheetName = 'dropboxDownload_API'."""
    settings, log = context.settings, context.log
    rows, problems = sheets.read_tab_with_problems(settings.excelName, sheet, COLUMNS)
    log.info("Download: %d row(s) in tab '%s' of %s.", len(rows), sheet, settings.excelName)
    with Journal(context.logs_root / "journal.sqlite3", sheet) as journal:
        try:
            client = open_client(context, workers=settings.workers)
        except AuthError:
            if problems:  # the tab's own problems first: they need no login to be fixed
                raise SheetError(problems) from None
            raise
        # One pass: the tab's problems and the Dropbox side (paths that do not exist) together.
        roots = check_rows(client, rows, log, problems)
        plan = expand(client, rows, roots, log)
        recorded = journal.items_by_key()
        plan.series = find_series(plan)
        skipped: set[int] = set()
        for series in plan.series:
            series.state = _series_state(series, recorded)
            if series.state in ("done", "verify"):
                skipped.update(id(t) for t in series.tasks)
        todo = [t for t in plan.tasks if id(t) not in skipped]
        _log_plan(plan, todo, log)
        if context.args.dry_run:
            log.info("Dry run: nothing was downloaded.")
            return EXIT_OK

        items = journal.sync_plan(
            Item(id=None, job=sheet, source=t.remote.path_lower, destination=str(t.target), kind="file",
                 part_offset=0, length=t.remote.size, source_size=t.remote.size,
                 source_mtime_ns=client_modified_epoch(t.remote.client_modified) * 1_000_000_000)
            for t in todo)
        for task, item in zip(todo, items):
            task.item = item

        disk = DiskGuard(log, settings.sleepTime_min * 60)
        for folder, needed in space_needed(todo, plan.series).items():
            if not needed:
                continue
            log.info("Local disk holding %s: %s free, %s to write.", folder, human_bytes(disk.free(folder)),
                     human_bytes(needed))
            disk.wait_for_room(folder, needed, "not enough free space for this download")

        created_problems = []
        for folder in plan.folders:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                created_problems.append((str(folder), f"the folder cannot be created ({exc.strerror})"))
        downloader = Downloader(client, journal, Options(workers=settings.workers,
                                                         sleep_seconds=settings.sleepTime_min * 60), log, disk)
        downloader.summary.failures.extend(created_problems)
        for path, message in created_problems:
            log.error("FAILED\t%s: %s", path, message)
        log.info("Downloading %d file(s), %s, with %d workers.", len(todo), human_bytes(sum(t.remote.size for t in todo)),
                 settings.workers)
        summary = downloader.run(todo, plan.series, len(plan.tasks))
        _log_summary(context, summary)
        return EXIT_OK if summary.ok else EXIT_SOME_FAILED


def _log_summary(context: RunContext, summary: Summary) -> None:
    log = context.log
    speed = summary.bytes_received / summary.seconds if summary.seconds else 0
    log.info("Summary: %d files; %d downloaded now, %d already here, %d done in earlier runs; %d split file(s) "
             "joined now, %d joined earlier; %s received in %.0f s (%s/s); %d failed.",
             summary.files_total, summary.downloaded, summary.already_here, summary.done_before, summary.joined,
             summary.joined_before, human_bytes(summary.bytes_received), summary.seconds, human_bytes(speed),
             len(summary.failures))
    for source, message in summary.failures[:50]:
        log.error("  failed: %s: %s", source, message)
    if summary.failures:
        log.error("Some files were not downloaded. Fix what the messages say and run app.py again: finished "
                  "files are not downloaded twice, and partial ones continue where they stopped.")
    else:
        log.info("Everything is downloaded and verified by content hash.")
    log.info("Log: %s", context.log_path)
