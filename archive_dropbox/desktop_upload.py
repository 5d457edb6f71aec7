"""Stage 2 through the Dropbox desktop app: copy the planned files into the local Dropbox
folder one batch at a time, let the app upload them, confirm through the API that every file
arrived intact (same size and content hash), and only then delete the originals that were
asked to go and start the next batch.

Why it is built this way:
- Each file is written under a `.~` name (the app never syncs those), flushed to disk, and
  renamed when complete, so the app never uploads half a file; the content hash is computed
  from the same bytes while they are copied, so every byte is read once.
- Batch membership is recorded in the journal when an item is first planned, so a rerun
  continues the batch it was on even after verified originals were deleted.
- Arrival is judged by Dropbox's content hash, never by existence: a corrupted upload keeps its
  original, stops the run and is named. Nothing inside the Dropbox folder is ever deleted.
"""

from __future__ import annotations

import concurrent.futures as futures
import errno
import hashlib
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import psutil
from tqdm import tqdm

from . import deletion, destinations, prepare, split
from .cli import RunContext
from .content_hash import ContentHasher, bytes_content_hash
from .dropbox_client import NetworkProblem, RateLimited, RemoteFile, RemoteFolder
from .errors import (EXIT_OK, EXIT_SOME_FAILED, ArchiveError, EnvironmentProblem, FileProblem, SettingsError,
                     SheetProblem)
from .job_setup import bind_account, open_client, prepare_rows, settle_interrupted_deletions
from .journal import Item, Journal
from .localfs import legacy_temporary, temporary_sibling
from .names import case_key
from .prepare import Plan
from .status import join, put, result, shutdown, status_of, wait_event
from .units import GB, human_bytes, human_duration
from .sheets import SheetRow

MIB = 1024 * 1024
# Copy blocks above this gain nothing on any disk and only cost memory (a few are in flight).
MAX_COPY_BLOCK = 128 * MIB
# Up to this many files still expected, ask for each file's metadata; beyond, list the folders.
METADATA_LOOKUP_LIMIT = 200
LOOKUP_WORKERS = 8
# A wrong arrival must be seen on this many consecutive checks before it counts as a failure
# (the app may still be replacing it).
MISMATCH_CHECKS = 2
# Estimate for the plan: the desktop app moves about 1.5-2 TB a day (the original README).
APP_BYTES_PER_SECOND = 20e6


# ============================================================================ the Dropbox folder


def _comparable_parts(path: Path) -> tuple[str, ...]:
    """Path components for containment tests: links resolved; Windows and macOS ignore case."""
    parts = Path(os.path.realpath(path)).parts
    if os.name == "nt" or sys.platform == "darwin":
        parts = tuple(part.casefold() for part in parts)
    return parts


def is_inside(path: Path, folder: Path) -> bool:
    """True when `path` is `folder` or lies below it (whole path components)."""
    inner, outer = _comparable_parts(path), _comparable_parts(folder)
    return inner[:len(outer)] == outer


@dataclass(frozen=True)
class DropboxFolder:
    """The local Dropbox folder and how its paths map to Dropbox paths: its top level is the
    root the API client addresses (the team space when `teamSpace` is on and the account has
    one, else the member's own Dropbox)."""

    root: Path

    def contains(self, path: Path) -> bool:
        return is_inside(path, self.root)

    def dropbox_path(self, local_folder: Path) -> str:
        """'/' + the folder's path below the Dropbox folder (the folder must be inside it)."""
        real = Path(os.path.realpath(local_folder)).parts
        below = real[len(Path(os.path.realpath(self.root)).parts):]
        return "/" + "/".join(below) if below else "/"

    def local_path(self, dropbox_path: str) -> Path:
        return self.root.joinpath(*[part for part in dropbox_path.split("/") if part])


def check_dropbox_dir(value: Path | None, script: Path) -> DropboxFolder:
    """The dropboxDir setting, which desktop-app mode cannot do without."""
    fix = (f"Set dropboxDir at the top of {script.name} to your local Dropbox folder (the folder the "
           "Dropbox desktop app keeps in sync, for example C:\\Users\\you\\Dropbox or /home/you/Dropbox).")
    if value is None:
        raise SettingsError(f"setting 'dropboxDir' is empty, but uploading through the desktop app "
                            f"(sheetName = 'dropboxUpload_APP') needs it. {fix}", paths=[script])
    if not value.exists():
        raise SettingsError(f"setting 'dropboxDir' = {str(value)!r} does not exist. {fix} Is the drive "
                            "connected and the Dropbox app installed?", paths=[script, value])
    if not value.is_dir():
        raise SettingsError(f"setting 'dropboxDir' = {str(value)!r} is a file, not a folder. {fix}",
                            paths=[script, value])
    return DropboxFolder(Path(os.path.realpath(value)))


def row_checker(folder: DropboxFolder) -> Callable[[SheetRow], list[SheetProblem]]:
    """Sheet problems particular to desktop-app mode, found before anything is copied."""

    def check(row: SheetRow) -> list[SheetProblem]:
        problems = []
        output: Path = row["outputDir"]
        source: Path = row["inputFile"]
        if not folder.contains(output):
            problems.append(row.problem(
                f"outputDir {output} is not inside the Dropbox folder {folder.root} (the dropboxDir setting): "
                "the desktop app only uploads what is inside it. Give a folder inside the Dropbox folder",
                "outputDir"))
        if folder.contains(source):
            problems.append(row.problem(
                f"inputFile {source} is inside the Dropbox folder {folder.root}: it is already synced, and this "
                "tool never copies or deletes anything inside the Dropbox folder. Move it out of the Dropbox "
                "folder first, or remove the row", "inputFile"))
        elif is_inside(folder.root, source):
            problems.append(row.problem(
                f"inputFile {source} contains the Dropbox folder {folder.root}: it would copy the Dropbox folder "
                "into itself. Give a folder that does not contain the Dropbox folder", "inputFile"))
        return problems

    return check


# ============================================================================ batches


@dataclass
class Batch:
    number: int
    items: list[Item] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(item.length for item in self.items)

    def bytes_to_copy(self) -> int:
        return sum(item.length for item in self.items if item.state not in ("copied", "done"))

    @property
    def done(self) -> bool:
        return all(item.state == "done" for item in self.items)


def count_batches(lengths: Iterable[int], batch_bytes: int) -> int:
    count, current, members = 0, 0, 0
    for length in lengths:
        if members == 0 or (length > 0 and current + length > batch_bytes):
            count, current, members = count + 1, 0, 0
        current += length
        members += 1
    return count


def assign_batches(items: Sequence[Item], batch_bytes: int, recorded: dict[int, int]) -> tuple[list[Batch], dict[int, int]]:
    """Group items (in plan order) into batches of at most `batch_bytes`.

    Items recorded in an earlier run keep their batch; new items fill new batches after the
    last recorded one, never an old batch (which may be verified already). An item larger
    than a batch gets a batch of its own. Empty items (a split file's manifest, empty files)
    never open a batch, so a manifest always travels with its last part.
    Returns (batches in order, the new assignments to record)."""
    by_number: dict[int, Batch] = {}
    new: dict[int, int] = {}
    next_number = max(recorded.values(), default=0) + 1
    current: Batch | None = None
    current_bytes = 0
    for item in items:
        number = recorded.get(item.id)  # type: ignore[arg-type]
        if number is None:
            if current is None or (item.length > 0 and current_bytes + item.length > batch_bytes):
                current = by_number.setdefault(next_number, Batch(next_number))
                next_number += 1
                current_bytes = 0
            current_bytes += item.length
            number = current.number
            new[item.id] = number  # type: ignore[index]
        by_number.setdefault(number, Batch(number)).items.append(item)
    return [by_number[n] for n in sorted(by_number)], new


# ============================================================================ hashing while copying


class _SideBySideHashes:
    """Feeds each copied block to several hashers, each in its own thread (hashlib releases the
    GIL on large blocks), so the content hash, a part's SHA-256 and the whole file's SHA-256 are
    computed side by side while the disk copies, from bytes read once."""

    _END = object()

    def __init__(self, updates: Sequence[Callable[[bytes], object]]):
        self._errors: list[BaseException] = []
        self._lanes: list[tuple[queue.Queue, threading.Thread]] = []
        for update in updates:
            lane: queue.Queue = queue.Queue(maxsize=2)  # bounded: memory stays a few blocks
            thread = threading.Thread(target=self._work, args=(lane, update), name="app-copy-hash", daemon=True)
            thread.start()
            self._lanes.append((lane, thread))

    def _work(self, lane: queue.Queue, update: Callable[[bytes], object]) -> None:
        while True:
            block = lane.get()
            if block is self._END:
                return
            if not self._errors:
                try:
                    update(block)
                except BaseException as exc:  # noqa: BLE001 - re-raised by close()
                    self._errors.append(exc)

    # The copy runs in the main thread: its waits on the hashers are sliced for Ctrl-C.
    def feed(self, block: bytes) -> None:
        for lane, _ in self._lanes:
            put(lane, block)

    def close(self) -> None:
        for lane, _ in self._lanes:
            put(lane, self._END)
        for _, thread in self._lanes:
            join(thread)
        self._lanes = []
        if self._errors:
            raise self._errors[0]


@dataclass
class _WholeFile:
    """The SHA-256 of a split file, built from its parts as they are copied in order, so the
    manifest rarely needs the file read a second time."""

    hasher: "hashlib._Hash"
    next_offset: int = 0


class SourceChanged(FileProblem):
    title = "File changed"


class LocalConflict(FileProblem):
    title = "Already in the Dropbox folder"


class RemoteConflict(FileProblem):
    title = "Already in Dropbox"


class CorruptArrival(FileProblem):
    title = "Dropbox received a different file"


# ============================================================================ waiting


class Waiter:
    """Sleeps between checks; someone at the keyboard can press Enter to check at once."""

    def __init__(self, log: logging.Logger):
        self._log = log
        self._wake = threading.Event()
        self._listening = False
        self._interactive = bool(getattr(sys.stdin, "isatty", lambda: False)())

    @property
    def interactive(self) -> bool:
        return self._interactive

    def _listen(self) -> None:
        def read_lines() -> None:
            while True:
                try:
                    line = sys.stdin.readline()
                except (OSError, ValueError):
                    return
                if not line:
                    return
                self._wake.set()

        if self._interactive and not self._listening:
            self._listening = True
            threading.Thread(target=read_lines, name="enter-rechecks", daemon=True).start()

    def sleep(self, seconds: float) -> bool:
        """Wait `seconds`; True when Enter cut the wait short."""
        if not self._interactive:
            time.sleep(seconds)
            return False
        self._listen()
        woken = wait_event(self._wake, seconds)
        self._wake.clear()
        return woken


# ============================================================================ the uploader


@dataclass
class AppOptions:
    batch_bytes: int
    copy_block: int
    sleep_seconds: float
    time_limit_seconds: float


@dataclass
class AppSummary:
    files_total: int = 0
    items_total: int = 0
    items_copied: int = 0
    items_already_there: int = 0
    items_verified: int = 0
    items_done_before: int = 0
    bytes_copied: int = 0
    batches_total: int = 0
    batches_verified: int = 0
    deleted_sources: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    stopped: str | None = None  # why the run stopped before the last batch
    unfinished: int = 0  # items not verified in Dropbox at the end
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures and self.stopped is None and self.unfinished == 0


class AppUploader:
    """Runs the batches in order: space check, copy, wait for Dropbox, delete originals."""

    def __init__(self, client, journal: Journal, folder: DropboxFolder, plan: Plan, options: AppOptions,
                 log: logging.Logger):
        self.client = client
        self.journal = journal
        self.folder = folder
        self.options = options
        self.log = log
        self.waiter = Waiter(log)
        self.status = status_of(log)
        self.summary = AppSummary()
        self._sources = {str(source.source): source for source in plan.sources}
        self._items_of: dict[str, list[Item]] = {}
        self._whole: dict[str, _WholeFile] = {}
        self._given_up: set[str] = set()  # sources with a failed part: later parts and the manifest wait
        self._copied_at: dict[int, float] = {}

    # -- logging -----------------------------------------------------------------------------

    def _line(self, result: str, item: Item, seconds: float, level: int = logging.INFO) -> None:
        self.log.log(level, "%s\t%s\t%.1fs\t%s\t->\t%s", result, human_bytes(item.length), seconds, item.source,
                     item.destination)

    def _fail(self, item: Item, problem: ArchiveError) -> None:
        self.journal.mark_failed(item, problem.message)
        self.summary.failures.append((item.destination, problem.message))
        self._line("FAILED", item, 0, logging.ERROR)
        self.log.error("  %s: %s", item.destination, problem.message)

    # -- space -------------------------------------------------------------------------------

    def _no_room(self, needed_local: int, needed_dropbox: int) -> str | None:
        """Why the batch cannot start now, or None."""
        try:
            local_free = psutil.disk_usage(str(self.folder.root)).free
        except OSError as exc:
            raise EnvironmentProblem(f"the Dropbox folder {self.folder.root} cannot be reached ({exc.strerror}); "
                                     "is its drive connected? Run app.py again when it is: nothing is lost",
                                     paths=[self.folder.root]) from None
        if local_free < needed_local:
            return (f"the disk holding the Dropbox folder has {human_bytes(local_free)} free; this batch needs "
                    f"{human_bytes(needed_local)} (twice its size, room for the Dropbox app's own work). Free some "
                    "space there (the app's 'online-only' setting frees synced files)")
        if needed_dropbox:
            usage = self.client.space_usage()
            if usage.free is not None and usage.free < needed_dropbox:
                return (f"Dropbox has {human_bytes(usage.free)} free; this batch needs {human_bytes(needed_dropbox)}. "
                        "Free some space in Dropbox or raise the quota")
        return None

    def wait_for_space(self, batch: Batch, to_copy: int) -> None:
        paused, failures = False, 0
        while True:
            try:
                reason = self._no_room(2 * to_copy, to_copy)
                self.status.network_ok()
            except (NetworkProblem, RateLimited) as exc:
                failures += 1
                self.status.network_trouble(f"reading Dropbox's free space: {exc.message}",
                                            self.options.sleep_seconds, failures)
                self.waiter.sleep(self.options.sleep_seconds)
                continue
            if reason is None:
                self.status.resumed(f"Space is available again: batch {batch.number} continues." if paused else None)
                return
            paused = True
            self.status.paused(f"PAUSED before batch {batch.number}: {reason}. Checking again every "
                               f"{every(self.options.sleep_seconds)}; nothing is lost while paused")
            self.waiter.sleep(self.options.sleep_seconds)

    def check_disk_is_big_enough(self, batches: Sequence[Batch]) -> None:
        largest = max((b.bytes_to_copy() for b in batches), default=0)
        total = psutil.disk_usage(str(self.folder.root)).total
        if 2 * largest > total:
            raise SettingsError(
                f"the largest batch to copy is {human_bytes(largest)}, but the disk holding the Dropbox folder "
                f"({self.folder.root}) holds only {human_bytes(total)} and each batch needs twice its size free. "
                "Lower batchSize_GB (and fileSizeLimit_GB, so that large files are split into smaller parts) at "
                "the top of app.py.")

    # -- remote lookups ----------------------------------------------------------------------

    def lookup(self, items: Sequence[Item]) -> dict[str, RemoteFile | RemoteFolder]:
        """What Dropbox holds at these items' paths, by case_key(path). A destination keeps the
        local spelling (NFD on a Mac, as the desktop app uploads it); the client asks Dropbox in
        NFC, the only form its lookups find (dropbox_client.lookup_path), and case_key compares
        NFC on both sides."""
        found: dict[str, RemoteFile | RemoteFolder] = {}
        if len(items) <= METADATA_LOOKUP_LIMIT:
            pool = futures.ThreadPoolExecutor(max_workers=LOOKUP_WORKERS, thread_name_prefix="lookup")
            try:
                asked = [pool.submit(self.client.metadata, item.destination) for item in items]
                for item, answer in zip(items, asked):
                    remote = result(answer)  # sliced: this is the main thread, Ctrl-C must get through
                    if remote is not None:
                        found[case_key(item.destination)] = remote
            finally:
                shutdown(pool)
            return found
        folders = deletion.topmost_folders({deletion.parent_folder(item.destination) for item in items})
        for folder in folders:
            for remote in self.client.list_files(folder).values():
                found[case_key(remote.path_display)] = remote
        return found

    # -- copying -----------------------------------------------------------------------------

    def _source_signature_ok(self, item: Item) -> None:
        try:
            info = os.stat(item.source)
        except OSError as exc:
            raise SourceChanged(f"the original vanished or cannot be read ({exc.strerror}); it is tried again on "
                                "the next run", paths=[item.source]) from None
        if (info.st_size, info.st_mtime_ns) != (item.source_size, item.source_mtime_ns):
            raise SourceChanged("the original changed since it was listed; it is copied on the next run, once "
                                "nothing writes to it any more", paths=[item.source])

    def _hash_source(self, item: Item) -> ContentHasher:
        """Hash the item's bytes of the original (to compare with a copy already in place)."""
        hasher = ContentHasher(with_sha256=item.kind == "part")
        whole = self._whole_for(item)
        try:
            with open(item.source, "rb") as handle:
                handle.seek(item.part_offset)
                remaining = item.length
                while remaining > 0:
                    block = handle.read(min(self.options.copy_block, remaining))
                    if not block:
                        raise SourceChanged("the original became shorter; it is tried again on the next run",
                                            paths=[item.source])
                    hasher.update(block)
                    if whole is not None:
                        whole.hasher.update(block)
                    remaining -= len(block)
        except BaseException:
            self._whole.pop(item.source, None)  # it saw part of this item: useless now
            raise
        if whole is not None:
            whole.next_offset += item.length
        return hasher

    def _whole_for(self, item: Item) -> _WholeFile | None:
        """The running SHA-256 of a split file when this part continues it, else None."""
        if item.kind != "part":
            return None
        whole = self._whole.get(item.source)
        if whole is None and item.part_offset == 0:
            whole = self._whole[item.source] = _WholeFile(hashlib.sha256())
        if whole is not None and whole.next_offset != item.part_offset:
            del self._whole[item.source]
            return None
        return whole

    def _copy_bytes(self, item: Item, temporary: Path, progress: tqdm) -> ContentHasher:
        """Copy the item's bytes to `temporary`, hashing them on the way; flushed to disk."""
        hasher = ContentHasher(with_sha256=False)
        part_sha = hashlib.sha256() if item.kind == "part" else None
        whole = self._whole_for(item)
        updates: list[Callable[[bytes], object]] = [hasher.update]
        if part_sha is not None:
            updates.append(part_sha.update)
        if whole is not None:
            updates.append(whole.hasher.update)
        hashes = _SideBySideHashes(updates)
        try:
            with open(item.source, "rb", buffering=0) as source, open(temporary, "wb") as target:
                source.seek(item.part_offset)
                remaining = item.length
                while remaining > 0:
                    block = source.read(min(self.options.copy_block, remaining))
                    if not block:
                        raise SourceChanged("the original became shorter while it was copied; it is copied "
                                            "again on the next run", paths=[item.source])
                    hashes.feed(block)
                    target.write(block)
                    remaining -= len(block)
                    progress.update(len(block))
                target.flush()
                os.fsync(target.fileno())
            hashes.close()
        except BaseException:
            self._whole.pop(item.source, None)  # it saw part of this item: useless now
            try:
                hashes.close()
            except BaseException:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        if whole is not None:
            whole.next_offset += item.length
        item.content_hash = hasher.content_hash()
        item.sha256 = part_sha.hexdigest() if part_sha is not None else None
        return hasher

    def _publish(self, temporary: Path, destination: Path, mtime_ns: int) -> None:
        """Give the finished copy its real name (the moment the app may start uploading it)."""
        os.utime(temporary, ns=(time.time_ns(), mtime_ns))  # Dropbox shows the original's date
        # On POSIX a rename replaces silently, so look first (Windows refuses by itself).
        if destination.exists():
            raise LocalConflict(f"a file appeared at {destination} while this one was being copied; it was not "
                                "overwritten", paths=[destination])
        os.rename(temporary, destination)

    def _manifest_bytes(self, item: Item) -> bytes:
        parts = [i for i in self._items_of[item.source] if i.kind == "part"]
        missing = [p.destination for p in parts if p.state not in ("copied", "done") or not p.sha256]
        if missing:
            raise FileProblem(f"its parts are not all copied yet ({', '.join(missing[:3])}); the manifest is "
                              "written on the next run", paths=[item.source])
        whole = self._whole.get(item.source)
        if whole is not None and whole.next_offset == item.source_size:
            digest = whole.hasher.hexdigest()
        else:
            self.log.info("Reading %s once more for the SHA-256 its manifest records (its parts were copied "
                          "in an earlier run).", item.source)
            digest = split.sha256_file(item.source)
        self._source_signature_ok(item)
        name = split.parse_manifest_name(item.destination.rsplit("/", 1)[1]) or ""
        plan = [split.PartPlan(index, p.part_offset, p.length) for index, p in enumerate(parts, start=1)]
        manifest = split.build_manifest(name, item.source_size, digest, item.source_mtime_ns / 1e9, plan,
                                        [p.sha256 for p in parts], part_size=parts[0].length)
        return manifest.to_bytes()

    def _existing_copy_matches(self, item: Item, destination: Path, manifest: bytes | None) -> bool:
        """A file is already at the destination in the Dropbox folder: is it this item?"""
        if destination.is_dir():
            raise LocalConflict(f"a folder is in the way at {destination}; rename or move it", paths=[destination])
        if destination.stat().st_size != (len(manifest) if manifest is not None else item.length):
            return False
        if manifest is not None:
            same = destination.read_bytes() == manifest
            if same:
                item.content_hash, item.sha256 = bytes_content_hash(manifest), hashlib.sha256(manifest).hexdigest()
            return same
        mine = self._hash_source(item)
        theirs = ContentHasher(with_sha256=False)
        with open(destination, "rb") as handle:
            while True:
                block = handle.read(self.options.copy_block)
                if not block:
                    break
                theirs.update(block)
        if theirs.content_hash() != mine.content_hash():
            return False
        item.content_hash = mine.content_hash()
        item.sha256 = mine.sha256() if item.kind == "part" else None
        return True

    def copy_item(self, item: Item, remote: RemoteFile | RemoteFolder | None, progress: tqdm) -> None:
        """Put one item into the Dropbox folder (or recognise it is already there)."""
        started = time.monotonic()
        destination = self.folder.local_path(item.destination)
        # A `.~` name: the desktop app does not sync the copy before it is complete.
        temporary = temporary_sibling(destination, "partial")
        manifest = self._manifest_bytes(item) if item.kind == "manifest" else None
        if manifest is None:
            self._source_signature_ok(item)
        for leftover in (temporary, legacy_temporary(destination)):
            if leftover is not None and leftover.exists():
                self.log.info("Removing %s, left half-written by an interrupted run.", leftover)
                deletion.discard_temporary(leftover)
        if destination.exists() or destination.is_symlink():
            if not self._existing_copy_matches(item, destination, manifest):
                item.content_hash = item.sha256 = None
                raise LocalConflict(f"a different file already exists at {destination} in the Dropbox folder; it "
                                    "was not overwritten. Move it away (or remove the row) and run again. (If it "
                                    "is this tool's copy of an earlier version of the original, which changed "
                                    "since, delete it from the Dropbox folder.)", paths=[destination])
            self.journal.mark_copied(item)
            self._copied_at[item.id] = time.monotonic()
            self.summary.items_already_there += 1
            progress.update(item.length)
            self._line("ALREADY IN DROPBOX FOLDER", item, time.monotonic() - started)
            return
        if remote is not None:
            self._already_in_dropbox(item, remote, manifest, progress, started)
            return
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            if manifest is not None:
                with open(temporary, "wb") as target:
                    target.write(manifest)
                    target.flush()
                    os.fsync(target.fileno())
                item.content_hash = bytes_content_hash(manifest)
                item.sha256 = hashlib.sha256(manifest).hexdigest()
            else:
                self._copy_bytes(item, temporary, progress)
                self._source_signature_ok(item)
            self._publish(temporary, destination, item.source_mtime_ns)
        except BaseException:
            deletion.discard_temporary_quietly(temporary)
            raise
        self.journal.mark_copied(item)
        self._copied_at[item.id] = time.monotonic()
        self.summary.items_copied += 1
        self.summary.bytes_copied += item.length
        self._line("COPIED", item, time.monotonic() - started)

    def _already_in_dropbox(self, item: Item, remote: RemoteFile | RemoteFolder, manifest: bytes | None,
                            progress: tqdm, started: float) -> None:
        """Dropbox has something at this path although the Dropbox folder does not (online-only
        or selective sync). Copying would make the app create a 'conflicted copy'."""
        if isinstance(remote, RemoteFile) and remote.size == (len(manifest) if manifest is not None else item.length):
            if manifest is not None:
                local_hash, sha = bytes_content_hash(manifest), hashlib.sha256(manifest).hexdigest()
            else:
                hasher = self._hash_source(item)
                local_hash, sha = hasher.content_hash(), hasher.sha256() if item.kind == "part" else None
            if _same_content(remote, local_hash, len(manifest) if manifest is not None else item.length):
                item.content_hash, item.sha256, item.remote_rev = local_hash, sha, remote.rev
                item.remote_path, item.hash_local = remote.path_display, 1
                self.journal.mark_done([item])
                self.summary.items_already_there += 1
                progress.update(item.length)
                self._line("ALREADY IN DROPBOX", item, time.monotonic() - started)
                return
        raise RemoteConflict(f"a different {'folder' if isinstance(remote, RemoteFolder) else 'file'} already "
                             f"exists at {item.destination} in Dropbox (not in the local Dropbox folder, e.g. "
                             "online-only); copying would make the Dropbox app create a 'conflicted copy'. Nothing "
                             "was copied: move or rename one of them and run again", paths=[item.source])

    def copy_batch(self, batch: Batch) -> None:
        pending = [item for item in batch.items if item.state not in ("copied", "done")]
        to_copy = sum(item.length for item in pending)
        self.log.info("Batch %d: copying %d item(s), %s, into the Dropbox folder.", batch.number, len(pending),
                      human_bytes(to_copy))
        self.journal.set_batch_state(batch.number, "copying")
        remote = self._lookup_patiently(pending)
        touched: set[Path] = set()
        with tqdm(total=to_copy, unit="B", unit_scale=True, unit_divisor=1000, desc=f"Batch {batch.number}",
                  disable=None, dynamic_ncols=True) as progress, self.status.showing(progress):
            for item in pending:
                if item.source in self._given_up:
                    continue
                while True:
                    try:
                        self.copy_item(item, remote.get(case_key(item.destination)), progress)
                        touched.add(self.folder.local_path(item.destination).parent)
                    except FileProblem as exc:
                        self._fail(item, exc)
                        if item.kind == "part":
                            self._given_up.add(item.source)
                    except OSError as exc:
                        if exc.errno == errno.ENOSPC:
                            self.log.warning("The disk holding the Dropbox folder is full.")
                            self.wait_for_space(batch, sum(i.length for i in pending if i.state == "pending"))
                            continue
                        self._fail(item, FileProblem(f"cannot be copied into the Dropbox folder ({exc.strerror}: "
                                                     f"{exc.filename or item.source})", paths=[item.source]))
                        if item.kind == "part":
                            self._given_up.add(item.source)
                    break
        for folder in touched:
            split.fsync_folder(folder)
        self.journal.set_batch_state(batch.number, "waiting")

    # -- waiting for the app -----------------------------------------------------------------

    def _lookup_patiently(self, items: Sequence[Item]) -> dict[str, RemoteFile | RemoteFolder]:
        failures = 0
        while True:
            try:
                found = self.lookup(items) if items else {}
            except (NetworkProblem, RateLimited) as exc:
                failures += 1
                self.status.network_trouble(exc.message, self.options.sleep_seconds, failures)
                self.waiter.sleep(self.options.sleep_seconds)
                continue
            self.status.network_ok()
            return found

    def await_batch(self, batch: Batch) -> list[Item]:
        """Check every `sleep_seconds` until each copied item of the batch is in Dropbox with
        its content hash. Returns the items that arrived wrong (then the batch has failed)."""
        waiting = [item for item in batch.items if item.state == "copied"]
        if not waiting:
            return []
        started = time.monotonic()
        warned = False
        mismatches: dict[int, int] = {}
        last_count = -1
        hint = " (press Enter to check at once)" if self.waiter.interactive else ""
        self.log.info("Batch %d: waiting for the Dropbox app to upload %d item(s); checking every %s%s.",
                      batch.number, len(waiting), every(self.options.sleep_seconds), hint)
        failures = 0
        while True:
            try:
                remote = self.lookup(waiting)
                self.status.network_ok()
                failures = 0
            except (NetworkProblem, RateLimited) as exc:
                failures += 1
                self.status.network_trouble(exc.message, self.options.sleep_seconds, failures)
                remote = None
            if remote is not None:
                arrived, wrong = [], []
                for item in waiting:
                    found = remote.get(case_key(item.destination))
                    if found is None:
                        mismatches.pop(item.id, None)
                    elif isinstance(found, RemoteFile) and _same_content(found, item.content_hash,
                                                                         _expected_length(item)):
                        item.remote_rev, item.remote_path, item.hash_local = found.rev, found.path_display, 1
                        arrived.append(item)
                    else:
                        mismatches[item.id] = mismatches.get(item.id, 0) + 1
                        if mismatches[item.id] >= MISMATCH_CHECKS:
                            wrong.append((item, found))
                if arrived:
                    self.journal.mark_done(arrived)
                    for item in arrived:
                        self.summary.items_verified += 1
                        self._line("VERIFIED", item, time.monotonic() - self._copied_at.get(item.id, started))
                    waiting = [item for item in waiting if item.state != "done"]
                if wrong:
                    for item, found in wrong:
                        self._fail(item, _corrupt_arrival(item, found))
                    return [item for item, _ in wrong]
                if not waiting:
                    return []
                if len(waiting) != last_count:
                    last_count = len(waiting)
                    self.log.info("Batch %d: %d of %d item(s) verified in Dropbox; %d still expected.", batch.number,
                                  len(batch.items) - len(waiting) - sum(i.state == "failed" for i in batch.items),
                                  len(batch.items), len(waiting))
            elapsed = time.monotonic() - started
            if not warned and elapsed > self.options.time_limit_seconds:
                warned = True
                self.log.warning(
                    "Batch %d is not in Dropbox after %s (batchTimeLimit_hour): please check the Dropbox app - is it "
                    "running, signed in, not paused, and is its disk not full? %d item(s) still expected, e.g. %s. "
                    "Still waiting; nothing is deleted before the batch is verified%s.", batch.number,
                    human_duration(elapsed), len(waiting), waiting[0].destination, hint)
            if self.waiter.sleep(self.options.sleep_seconds):
                self.log.info("Checking now (Enter pressed).")

    # -- deleting originals ------------------------------------------------------------------

    def delete_originals(self, batch: Batch) -> None:
        """Delete the originals of this batch that were asked to go, through the deletion gate:
        only when Dropbox holds every item of the original now (content hash, asked now through
        the API) and the original did not change since it was copied."""
        originals = []
        for source_path in dict.fromkeys(item.source for item in batch.items):
            source = self._sources.get(source_path)
            if source is None or not source.delete_after:
                continue
            items = self._items_of[source_path]
            if any(item.state != "done" for item in items):
                continue  # e.g. a split file whose last parts are in a later batch
            root = source.row["inputFile"]
            originals.append(deletion.uploaded_original(items, root if isinstance(root, Path) and root.is_dir()
                                                        else None))
        if not originals:
            return
        report = deletion.delete_uploaded_originals(self.client, originals, journal=self.journal, log=self.log,
                                                    protected=self.folder.contains)
        self.summary.deleted_sources += len(report.deleted)
        for path, reason in report.kept:
            self.summary.failures.append((str(path), f"not deleted: {reason}"))
            self.log.error("NOT DELETED\t%s: %s", path, reason)
        if report.missing:
            missing = {str(path) for path in report.missing}
            self.journal.reopen([item for item in batch.items if item.source in missing])

    def reconcile_done(self, items: Sequence[Item]) -> None:
        """Items the journal calls done, whose originals are still here: Dropbox is asked now.
        Missing ones (deleted on dropbox.com, moved) are copied again; ones Dropbox holds with
        other bytes fail and keep their originals. The journal is never taken as proof."""
        done = [item for item in items if item.state == "done" and not item.source_deleted
                and os.path.lexists(item.source)]
        if not done:
            return
        remote = self._lookup_patiently(done)
        missing = []
        for item in done:
            found = remote.get(case_key(item.destination))
            if found is None:
                self.log.warning("NOT IN DROPBOX\t%s: verified earlier, but Dropbox does not hold it now (deleted "
                                 "on dropbox.com or moved); it is copied again.", item.destination)
                missing.append(item)
            elif not (isinstance(found, RemoteFile) and _same_content(found, item.content_hash,
                                                                        _expected_length(item))):
                self._fail(item, _corrupt_arrival(item, found))
        for item in missing:
            self.journal.mark_pending(item)

    # -- the whole job -----------------------------------------------------------------------

    def prepare_batches(self, items: Sequence[Item]) -> None:
        """Recover items left by earlier runs: failed or copied items whose copy is gone are
        copied again; failed copies whose verification failed are checked again; done items
        are looked up in Dropbox again."""
        self.reconcile_done(items)
        for item in items:
            self._items_of.setdefault(item.source, []).append(item)
            if item.state == "failed":
                if item.content_hash and self.folder.local_path(item.destination).exists():
                    self.journal.mark_copied(item)  # a wrong arrival earlier: check Dropbox again
                else:
                    self.journal.mark_pending(item)
            elif item.state == "copied" and not self.folder.local_path(item.destination).exists():
                self.log.info("%s was copied in an earlier run but is no longer in the Dropbox folder; it is "
                              "copied again.", item.destination)
                self.journal.mark_pending(item)
            elif item.state not in ("pending", "copied", "done"):
                self.journal.mark_pending(item)

    def run(self, batches: Sequence[Batch]) -> AppSummary:
        started = time.monotonic()
        self.summary.batches_total = len(batches)
        self.summary.items_total = sum(len(b.items) for b in batches)
        self.summary.files_total = len(self._items_of)
        self.summary.items_done_before = sum(1 for b in batches for i in b.items if i.state == "done")
        self.status.remaining(lambda: _not_verified_yet(batches))
        for batch in batches:
            if batch.done:
                self.summary.batches_verified += 1
                if self.journal.batch_state(batch.number) != "deleted":
                    self.delete_originals(batch)
                    self.journal.set_batch_state(batch.number, "deleted")
                continue
            self.log.info("Batch %d of %d: %d item(s), %s.", batch.number, batches[-1].number, len(batch.items),
                          human_bytes(batch.size))
            to_copy = batch.bytes_to_copy()
            if to_copy or any(i.state == "pending" for i in batch.items):
                self.wait_for_space(batch, to_copy)
                self.copy_batch(batch)
            else:
                self.journal.set_batch_state(batch.number, "waiting")
            wrong = self.await_batch(batch)
            if wrong:
                self.journal.set_batch_state(batch.number, "failed")
                names = ", ".join(item.destination for item in wrong[:10])
                self.summary.stopped = (
                    f"batch {batch.number} is not verified: Dropbox holds a different file than the one copied for "
                    f"{names}. Nothing of this batch was deleted and the next batches were not started. Check those "
                    "files in Dropbox (dropbox.com); delete the wrong copy there, or re-save the file in the Dropbox "
                    "folder so the app uploads it again, then run app.py again")
                self.log.error("STOPPED: %s.", self.summary.stopped)
                break
            if any(item.state == "failed" for item in batch.items):
                self.log.warning("Batch %d: every copied item is verified; %d item(s) could not be copied (see "
                                 "above) and are tried again on the next run.", batch.number,
                                 sum(item.state == "failed" for item in batch.items))
            else:
                self.log.info("Batch %d verified: all %d item(s) are in Dropbox with matching content hashes.",
                              batch.number, len(batch.items))
                self.summary.batches_verified += 1
            self.journal.set_batch_state(batch.number, "verified")
            self.delete_originals(batch)
            if batch.done:
                self.journal.set_batch_state(batch.number, "deleted")
        self.summary.unfinished = sum(1 for b in batches for i in b.items if i.state != "done")
        self.summary.seconds = time.monotonic() - started
        self.status.remaining(None)
        return self.summary


def _not_verified_yet(batches: Sequence[Batch]) -> str:
    """What is left of the job, for the status line (MB = 10^6 bytes)."""
    left = [item for batch in batches for item in batch.items if item.state != "done"]
    return f"{len(left)} item(s), {human_bytes(sum(item.length for item in left))}, not yet verified in Dropbox"


def _same_content(remote: RemoteFile, content_hash: str | None, length: int | None) -> bool:
    """`length` None: a manifest, whose planned length is 0 until it is written; its content
    hash alone decides."""
    if length is not None and remote.size != length:
        return False
    if length == 0:
        return True  # Dropbox may report no hash for an empty file
    return remote.content_hash is not None and remote.content_hash == content_hash


def _expected_length(item: Item) -> int | None:
    return None if item.kind == "manifest" else item.length


def every(seconds: float) -> str:
    """How often a wait is re-checked, for "checking every ...": units.human_duration, whose
    sub-minute form ("36 s", "0.6 s") keeps a sleepTime_min below 1 from reading as 0 min."""
    return human_duration(seconds)


def _corrupt_arrival(item: Item, found: RemoteFile | RemoteFolder) -> CorruptArrival:
    if isinstance(found, RemoteFolder):
        what = "a folder"
    elif item.kind != "manifest" and found.size != item.length:
        what = f"a file of {found.size:,} bytes instead of {item.length:,}"
    else:
        what = f"a file with content hash {found.content_hash} instead of {item.content_hash}"
    return CorruptArrival(f"Dropbox holds {what} at {item.destination} (checked twice): the upload by the Dropbox "
                          "app is not the file that was copied. The original is kept", paths=[item.source])


# ============================================================================ entry point


def run(context: RunContext, sheet: str) -> int:
    """app.py with sheetName = 'dropboxUpload_APP'."""
    settings = context.settings
    log = context.log
    folder = check_dropbox_dir(settings.dropboxDir, context.script)
    batch_bytes = max(1, int(settings.batchSize_GB * GB))
    part_limit = max(1, int(settings.fileSizeLimit_GB * GB))
    block = max(1, min(settings.chunkSizeSplit_MB * MIB, MAX_COPY_BLOCK))
    options = AppOptions(batch_bytes=batch_bytes, copy_block=block, sleep_seconds=settings.sleepTime_min * 60,
                         time_limit_seconds=settings.batchTimeLimit_hour * 3600)

    def describe(plan: Plan, logger: logging.Logger) -> None:
        lengths = [item.length for item in prepare.iter_items(plan, sheet)]
        logger.info("Desktop-app batches of at most %s: %d (a file larger than a batch gets one of its own; "
                    "files planned in an earlier run keep their batch).", human_bytes(batch_bytes),
                    count_batches(lengths, batch_bytes))

    log.info("Local Dropbox folder: %s", folder.root)
    with Journal(context.logs_root / "journal.sqlite3", sheet) as journal:
        settle_interrupted_deletions(journal, log)
        plan = prepare_rows(context, sheet, destination_of_row=lambda row: folder.dropbox_path(row["outputDir"]),
                            part_limit=part_limit, already_done=journal.deleted_sources(), mode="desktop app",
                            bytes_per_second=APP_BYTES_PER_SECOND, row_check=row_checker(folder),
                            describe_plan=describe)
        destination_of_row = lambda row: folder.dropbox_path(row["outputDir"])  # noqa: E731
        if context.args.dry_run:
            client = destinations.client_for_dry_run(lambda: open_client(context), log)
            if client is not None:
                destinations.refuse_blocked(client, plan, destination_of_row=destination_of_row, log=log)
            log.info("Dry run: nothing was copied.")
            return EXIT_OK
        client = open_client(context)
        # A folder in Dropbox where a file goes would give a conflicted copy the run waits for in vain.
        destinations.refuse_blocked(client, plan, destination_of_row=destination_of_row, log=log)
        bind_account(journal, client, log)
        items = journal.sync_plan(prepare.iter_items(plan, sheet))
        batches, new = assign_batches(items, batch_bytes, journal.item_batches())
        journal.record_item_batches(new)
        team = bool(client.account and client.account.team_root and settings.teamSpace)
        log.info("The top of %s is taken to be the top of %s (teamSpace = %s).", folder.root,
                 "the team space (/Team Folder/...)" if team else "your own Dropbox", settings.teamSpace)
        uploader = AppUploader(client, journal, folder, plan, options, log)
        uploader.prepare_batches(items)
        uploader.check_disk_is_big_enough(batches)
        log.info("Stage 2, upload through the Dropbox desktop app: %d batch(es) of at most %s.", len(batches),
                 human_bytes(batch_bytes))
        summary = uploader.run(batches)
        _log_summary(context, summary)
        return EXIT_OK if summary.ok else EXIT_SOME_FAILED


def _log_summary(context: RunContext, summary: AppSummary) -> None:
    log = context.log
    summary.failures.extend(context.stage1_failures)  # set by job_setup.prepare_rows
    speed = summary.bytes_copied / summary.seconds if summary.seconds else 0
    log.info("Summary: %d files in the sheet (%d items in %d batches); %d verified in Dropbox now, %d done in earlier "
             "runs; %d copied into the Dropbox folder (%s at %s/s), %d already there; %d originals deleted after "
             "verification; %d failed; %.0f s.", summary.files_total, summary.items_total, summary.batches_total,
             summary.items_verified, summary.items_done_before, summary.items_copied,
             human_bytes(summary.bytes_copied), human_bytes(speed), summary.items_already_there,
             summary.deleted_sources, len(summary.failures), summary.seconds)
    for destination, message in summary.failures[:50]:
        log.error("  failed: %s: %s", destination, message)
    if summary.unfinished and not summary.failures and not summary.stopped:
        log.error("%d item(s) are not verified in Dropbox yet; run app.py again to continue.", summary.unfinished)
    if summary.stopped:
        log.error("The run stopped early: %s.", summary.stopped)
    elif summary.failures:
        log.error("Some files are not in Dropbox yet. Fix what the messages say and run app.py again: finished "
                  "files are not copied twice.")
    else:
        log.info("Everything is in Dropbox and verified by content hash.")
    log.info("Log: %s", context.log_path)
