"""What the parts of one API upload share (`UploadRun`): the client, journal, retry and pause
policy, byte budget, progress and summary; the checks that a local file did not change while it
was sent; the hash bookkeeping of split files' parts (`PartHashes`); how an item is verified and
recorded; and the one check "does Dropbox already hold this item?" (`UploadRun.already_in_dropbox`).

The sessions (upload_sessions), the small-file groups (small_files) and the commit queue
(commit_queue) each send items their own way and record them through this object.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, TypeVar

from .content_hash import ContentHasher, hash_range
from .dropbox_client import CommitRequest, DropboxClient, RemoteConflict, RemoteFile, mtime_to_client_modified
from .errors import ArchiveError, FileProblem
from .journal import Item, Journal, Kind
from .names import case_key
from .source_check import WholeFileSha256, check_unchanged
from .transfer import (ByteProgress, JobRunner, Pauses, Retrier, RetryPolicy, RunSummary, file_finished,
                       log_result)
from .units import MIB, human_bytes
from .upload_memory import ByteBudget

T = TypeVar("T")


@dataclass
class UploadOptions:
    chunk_size: int = 128 * MIB
    workers: int = 4
    if_exists: str = "report"  # report | overwrite | rename
    checksum: bool = False
    sleep_seconds: float = 1800
    network_give_up_seconds: float = 3600
    # Files at least this large go through a concurrent upload session with several appends in
    # flight, so one huge file is not bound to one connection.
    concurrent_above: int = 512 * MIB
    appends_per_file: int = 8
    # File data held in memory at once: small files waiting in a shared request, and one
    # STREAM_PIECE per request in flight and per chunk being hashed (requests stream from the file).
    memory_budget: int = 256 * MIB
    small_file_workers: int = 32
    # Bytes of small files sent in one append_batch request (Dropbox takes up to 150 MiB).
    small_group_bytes: int = 16 * MIB


@dataclass
class Summary(RunSummary):
    items_done_before: int = 0
    items_uploaded: int = 0
    items_already_there: int = 0
    bytes_sent: int = 0
    deleted_sources: int = 0
    settled_files: int = 0  # left out by Stage 1: verified in an earlier run, their folders unchanged since


class Asked(Enum):
    """When "does Dropbox already hold this item?" is asked (see UploadRun.already_in_dropbox)."""

    BEFORE_SENDING = "before sending"  # planning: from the run's listing of the destinations
    SESSION_LOST = "session lost"      # an upload session of the item is gone: look it up now


def became_shorter(item: Item) -> FileProblem:
    return FileProblem("the file became shorter while it was being uploaded; it is sent again on the next run",
                       paths=[item.source])


def shown_size(item: Item, size: int | None = None) -> str:
    """The size for a log line; a manifest's is known only once it is written."""
    if size is None and item.kind == Kind.MANIFEST:
        return "manifest"
    return human_bytes(item.length if size is None else size)


class PartHashes:
    """Hashers for items, with the whole-file SHA-256 a split file's parts carry along
    (source_check.WholeFileSha256): a part hashed in this run hands the SHA-256 of the file up
    to its end to the next part, so that the manifest needs no second read of the file."""

    def __init__(self):
        self._whole = WholeFileSha256()

    def hasher_for(self, item: Item, upto: int = 0) -> ContentHasher:
        """A hasher holding the item's first `upto` bytes (read back from disk)."""
        tee = self._whole.begin(item.source, item.part_offset) if item.kind == Kind.PART else None
        if upto:
            return hash_range(Path(item.source), item.part_offset, upto, with_sha256=item.kind == Kind.PART, tee=tee)
        return ContentHasher(with_sha256=item.kind == Kind.PART, tee=tee)

    def keep(self, item: Item, hasher: ContentHasher) -> None:
        """A part's SHA-256 for the manifest, and the carried whole-file SHA-256 up to its end."""
        item.sha256 = hasher.sha256()
        if hasher.tee is not None and hasher.size == item.length:
            self._whole.finish(item.source, item.part_offset + item.length, hasher.tee)

    def whole_file_sha256(self, manifest: Item) -> str:
        """The split file's SHA-256 (hex): carried by its parts, or read once more when some
        parts were sent in an earlier run."""
        return (self._whole.digest(manifest.source, manifest.source_size)
                or hash_range(Path(manifest.source), with_sha256=True).sha256())


class UploadRun:
    """One run of the API upload as its parts see it. Thread-safe where workers share it
    (progress, summary counters under the GIL, the journal's own lock)."""

    def __init__(self, client: DropboxClient, journal: Journal, options: UploadOptions, log: logging.Logger,
                 budget: ByteBudget, jobs: JobRunner):
        """`jobs`: the run's JobRunner; its fatal error stops every retry and pause."""
        self.client = client
        self.journal = journal
        self.options = options
        self.log = log
        self.budget = budget
        self.jobs = jobs
        self.pauses = Pauses(log, options.sleep_seconds, client=client, stop=jobs.stopping)
        self.retrier = Retrier(log, RetryPolicy(give_up_seconds=options.network_give_up_seconds), self.pauses,
                               stop=lambda: jobs.fatal)
        self.hashes = PartHashes()
        self.summary = Summary()
        self.progress: ByteProgress | None = None
        self.listing: dict[str, RemoteFile] = {}  # case_key(Dropbox path) -> what the run's listing found
        self.sources_to_delete: set[str] = set()
        self._sent_lock = threading.Lock()

    def call(self, what: str, request: Callable[[], T], *, needed: int = 0) -> T:
        """`request()` under the run's retry and pause policy (transfer.Retrier.call)."""
        return self.retrier.call(what, request, needed=needed)

    def advance(self, count: int, *, sent: bool = True) -> None:
        """Move the progress by `count` bytes (negative: taken back). `sent`: this run put them
        on the wire; bytes Dropbox held from an earlier run move the bar but are not counted as
        sent, so that the summary's amount and speed are this run's."""
        if sent and count > 0:
            with self._sent_lock:
                self.summary.bytes_sent += count
        if self.progress is not None:
            self.progress.advance(count)

    # -- the local file --------------------------------------------------------------------------

    def source_unchanged(self, item: Item) -> None:
        """FileProblem unless the source still has the size and modification time planned."""
        check_unchanged(item, vanished="the file vanished or cannot be read during upload ({reason}); it will be "
                                       "sent on the next run",
                        changed="the file changed while it was being uploaded; it is sent again on the next run")

    def unchanged_after_commit(self, item: Item, remote: RemoteFile) -> None:
        """A file written to while it was read gives a copy that matches no version of it:
        remove that copy (it is this run's own upload) so the rerun can send the file cleanly."""
        try:
            self.source_unchanged(item)
        except FileProblem:
            self.call("removing an inconsistent copy", lambda: self.client.delete(remote.path_display))
            raise FileProblem("the file changed while it was being uploaded; the inconsistent copy was removed "
                              "from Dropbox and the file is sent again on the next run", paths=[item.source]) from None

    # -- commits and their records ---------------------------------------------------------------

    def commit_request(self, item: Item, session_id: str, offset: int) -> CommitRequest:
        return CommitRequest(session_id=session_id, offset=offset, path=item.destination,
                             client_modified=mtime_to_client_modified(item.source_mtime_ns / 1e9),
                             overwrite=self.options.if_exists == "overwrite" or item.kind == Kind.MANIFEST,
                             autorename=self.options.if_exists == "rename")

    def verify(self, item: Item, remote: RemoteFile, hasher: ContentHasher | None = None) -> None:
        """FileProblem unless Dropbox's content hash is the item's; then the item takes Dropbox's
        revision and path, and a part keeps its hashes from `hasher` (all of its bytes)."""
        if remote.content_hash != item.content_hash:
            raise FileProblem(f"Dropbox's content hash of {remote.path_display} does not match the local file "
                              f"(Dropbox {remote.content_hash}, local {item.content_hash}): the copy in Dropbox is "
                              "not trusted and the original is kept", paths=[item.source])
        item.remote_rev, item.remote_path, item.hash_local = remote.rev, remote.path_display, 1
        if hasher is not None and item.kind == Kind.PART:
            self.hashes.keep(item, hasher)

    def record_uploaded(self, item: Item, remote: RemoteFile, hasher: ContentHasher | None, started: float) -> None:
        """One commit answered: verified, the source unchanged, recorded done, said."""
        self.verify(item, remote, hasher)
        self.unchanged_after_commit(item, remote)
        self.journal.mark_done([item])
        self.summary.items_uploaded += 1
        self.log_result(item, "UPLOADED", time.monotonic() - started)

    def log_result(self, item: Item, result: str, seconds: float, size: int | None = None) -> None:
        """`size`: bytes stored, when not the item's planned length (a manifest is planned as 0)."""
        log_result(self.log, result, shown_size(item, size), seconds, item.source, item.destination)

    def fail(self, item: Item, problem: ArchiveError) -> None:
        message = problem.message if isinstance(problem, ArchiveError) else str(problem)
        self.journal.mark_failed(item, message)
        self.summary.failures.append((item.destination, message))
        self.log.error("FAILED\t%s\t%s\t->\t%s: %s", shown_size(item), item.source, item.destination, message)
        file_finished(self.log)

    # -- does Dropbox already hold it? -----------------------------------------------------------

    def already_in_dropbox(self, item: Item, asked: Asked, *, started: float = 0.0,
                           local: ContentHasher | str | None = None, unsent: int = 0) -> bool:
        """Does Dropbox hold exactly this item's bytes at its destination? If so the item is
        verified, recorded done and said, and True comes back. The one check for every moment
        the question comes up; `asked` says which, and the moments truly differ:

        - BEFORE_SENDING (planning, nothing sent yet): Dropbox's side is the run's listing (no
          request). The same size and modification time count as the same file unless proof
          is needed (checksum setting, a part whose SHA-256 the manifest needs, an original to
          be deleted); the item then takes Dropbox's hash (hash_local 0). A yes counts as
          "ALREADY IN DROPBOX" and moves the progress by the whole item. A different file there
          raises RemoteConflict with ifExists = 'report' (False otherwise: it is sent).
        - SESSION_LOST (an upload session of the item is gone: its commit may have gone through
          before a crash or a lost answer): Dropbox's side is looked up now (the listing is
          stale). A yes means this run's or an earlier run's commit landed: counted and logged
          as UPLOADED after `started` (time.monotonic()), moving the progress by `unsent` bytes
          (those not yet counted).

        `local`: a hasher holding every byte of the item (what a session sent), or the content
        hash of what was sent; None: the local file is hashed from disk (only when the sizes
        match)."""
        if asked is Asked.BEFORE_SENDING:
            remote = self.listing.get(case_key(item.destination))
            if remote is None:
                return False
        else:
            remote = self.call("checking", lambda: self.client.metadata(item.destination))
        if not self._holds(item, remote, local, quick=asked is Asked.BEFORE_SENDING and not self._needs_proof(item)):
            if asked is Asked.BEFORE_SENDING and self.options.if_exists not in ("overwrite", "rename"):
                raise RemoteConflict(f"a different file already exists at {item.destination}; it was not "
                                     "overwritten. Set ifExists = 'overwrite' or 'rename' in app.py to choose "
                                     "otherwise", paths=[item.source])
            return False
        self.journal.mark_done([item])
        if asked is Asked.BEFORE_SENDING:
            self.summary.items_already_there += 1
            self.advance(item.length, sent=False)
            self.log_result(item, "ALREADY IN DROPBOX", 0)
        else:
            self.summary.items_uploaded += 1
            self.advance(unsent, sent=False)
            self.log_result(item, "UPLOADED", time.monotonic() - started)
        return True

    def _needs_proof(self, item: Item) -> bool:
        # Parts need their SHA-256 for the manifest, and a file to be deleted needs proof:
        # both are hashed locally even when the quick check matches.
        return self.options.checksum or item.kind == Kind.PART or item.source in self.sources_to_delete

    def _holds(self, item: Item, remote, local: ContentHasher | str | None, quick: bool) -> bool:
        """Do `remote` (Dropbox's answer or listing entry) and the local bytes match? On a match
        the item takes the content hash, revision and path."""
        if not isinstance(remote, RemoteFile) or remote.size != item.length:
            return False
        if quick and remote.client_modified == mtime_to_client_modified(item.source_mtime_ns / 1e9):
            # Dropbox's hash, not the local bytes': the deletion gate hashes the file before trusting it.
            item.content_hash, item.remote_rev, item.remote_path = remote.content_hash, remote.rev, remote.path_display
            item.hash_local = 0
            return True
        hasher = None if isinstance(local, str) else local or self.hashes.hasher_for(item, item.length)
        content_hash = local if isinstance(local, str) else hasher.content_hash()
        if content_hash != remote.content_hash:
            return False
        item.content_hash = content_hash
        self.verify(item, remote, hasher)
        return True
