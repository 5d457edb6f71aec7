"""Stage 2 through the Dropbox API: send every planned item, verify it by content hash, record
it in the journal, and only then delete originals that were asked to go.

Small files go up in closed upload sessions and are committed a thousand at a time with
finish_batch_v2 (one commit per account at a time, clear of too_many_write_operations). Larger
files use a sequential session whose confirmed offset is journaled after every chunk, so a
rerun continues a 300 GB file where it stopped. The SDK already retries 429 and 5xx; this
module adds what it cannot know: resume across runs, offsets after dropped connections,
pausing on a full account, and verification.
"""

from __future__ import annotations

import concurrent.futures as futures
import ctypes
import hashlib
import logging
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from tqdm import tqdm

from . import deletion, destinations, prepare, split, units
from .cli import RunContext
from .content_hash import ContentHasher, bytes_content_hash, hash_range
from .dropbox_client import (CommitRequest, ContentHashMismatch, DropboxClient,
                             IncorrectOffset, InsufficientSpace, NetworkProblem, RateLimited,
                             RemoteConflict, RemoteFile, SessionClosed, SessionGone, TransportLimit,
                             mtime_to_client_modified)
from .errors import EXIT_OK, EXIT_SOME_FAILED, ArchiveError, AuthError, FileProblem, SheetError
from .job_setup import bind_account, open_client, plan_rows, prepare_rows, settle_interrupted_deletions, with_dropbox_side
from .journal import Item, Journal
from .localfs import read_into
from .prepare import Plan, case_key
from .status import SLICE, every, locked, nap, result, shutdown, status_of, wait_futures
from .units import MIB, human_bytes

BATCH_LIMIT = 1000  # finish_batch_v2 takes at most 1000 entries
APPEND_BATCH_LIMIT = 500  # and append_batch at most 500
BLOCK = 4 * MIB  # concurrent-session appends are multiples of this, except the closing one
MIN_APPEND = 16 * MIB  # at 20 MiB/s per connection, 50 ms of latency costs 6 % of such an append
CONNECTION_MEMORY = 256 * 1024  # measured: 8 connections in flight add about 1.3 MiB beyond the data


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
    # File data held in memory at once (chunks read ahead, appends in flight, small files).
    memory_budget: int = 1024 * MIB
    small_file_workers: int = 32
    # Bytes of small files sent in one append_batch request (Dropbox takes up to 150 MiB).
    small_group_bytes: int = 16 * MIB


@dataclass
class Summary:
    files_total: int = 0
    items_done_before: int = 0
    items_uploaded: int = 0
    items_already_there: int = 0
    bytes_sent: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    deleted_sources: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


class ByteBudget:
    """Caps the file data held in memory across all threads: every buffer is paid for before it
    is read and refunded once Dropbox has it."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._used = 0
        self._peak = 0
        self._condition = threading.Condition()

    def take(self, count: int, wait: bool = True) -> bool:
        count = min(count, self.capacity)
        with self._condition:
            while self._used + count > self.capacity:
                if not wait:
                    return False
                self._condition.wait(SLICE)  # in slices, so that Ctrl-C gets through on Windows
            self._used += count
            self._peak = max(self._peak, self._used)
            return True

    def give(self, count: int) -> None:
        count = min(count, self.capacity)
        with self._condition:
            self._used -= count
            self._condition.notify_all()

    @property
    def peak(self) -> int:
        return self._peak


def read_at(handle, position: int, size: int) -> bytes:
    """Positioned read that several threads can share on one handle."""
    if hasattr(os, "pread"):
        parts = []
        while size > 0:
            data = os.pread(handle.fileno(), size, position)
            if not data:
                break
            parts.append(data)
            position += len(data)
            size -= len(data)
        return b"".join(parts) if len(parts) != 1 else parts[0]
    with _handle_lock(handle):  # Windows has no pread: seek+read pairs on one handle take turns
        handle.seek(position)
        return handle.read(size)


# One lock per open file, not one for the process: workers reading different files (from a NAS,
# say) are never serialised with each other.
_HANDLE_LOCKS: "weakref.WeakKeyDictionary[object, threading.Lock]" = weakref.WeakKeyDictionary()
_HANDLE_LOCKS_GUARD = threading.Lock()


def _handle_lock(handle) -> threading.Lock:
    with _HANDLE_LOCKS_GUARD:
        lock = _HANDLE_LOCKS.get(handle)
        if lock is None:
            lock = _HANDLE_LOCKS[handle] = threading.Lock()
        return lock


def _return_freed_buffers_at_once() -> None:
    """glibc raises its mmap threshold (up to 32 MiB) whenever a large buffer is freed, after
    which buffers of that size come from the heap, where freed ones stay in RSS. A fixed
    threshold keeps every chunk in a mapping of its own that goes back to the system the moment
    the chunk is sent, so the process's memory follows the byte budget."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass  # not glibc (musl returns large buffers to the system by itself)


class Pauser:
    """Holds every worker while Dropbox is full or the data-transport limit is reached, and
    re-checks every `sleep_seconds` until it is safe to go on."""

    def __init__(self, client: DropboxClient, log: logging.Logger, sleep_seconds: float,
                 stop: Callable[[], bool] = lambda: False):
        """`stop`: true once the run is stopping (Ctrl-C, a fatal error): a pause then ends at once."""
        self._client = client
        self._log = log
        self._status = status_of(log)
        self._sleep = sleep_seconds
        self._stop = stop
        self._lock = threading.Lock()

    def wait_for_space(self, needed: int, reason: str) -> None:
        """Hold until Dropbox has `needed` bytes free; the status says the pause and what is left."""
        with locked(self._lock):
            while True:
                usage = self._client.space_usage()
                if usage.free is None or usage.free >= needed:
                    self._status.resumed("Dropbox has room again (%s free): continuing." % (
                        "unlimited" if usage.free is None else human_bytes(usage.free)))
                    return
                self._status.paused(f"PAUSED: {reason}: {human_bytes(usage.free)} free in Dropbox, "
                                    f"{human_bytes(needed)} needed. Free some space or raise the quota; checking "
                                    f"again every {every(self._sleep)}. Nothing is lost while paused")
                nap(self._sleep, self._stop)
                if self._stop():
                    self._status.resumed()
                    return

    def wait_transport(self) -> None:
        with locked(self._lock):
            self._status.paused(f"PAUSED: Dropbox reports the team's monthly data-transport limit is reached. "
                                f"Trying again every {every(self._sleep)}; nothing is lost while paused")
            nap(self._sleep, self._stop)
            self._status.resumed()  # the next request tells whether the limit still holds


class ApiUploader:
    def __init__(self, client: DropboxClient, journal: Journal, options: UploadOptions, log: logging.Logger):
        self.client = client
        self.journal = journal
        self.options = options
        self.log = log
        self.pauser = Pauser(client, log, options.sleep_seconds, stop=lambda: self._fatal is not None)
        self.status = status_of(log)
        self.summary = Summary()
        self._progress: tqdm | None = None
        self._progress_lock = threading.Lock()
        self._bytes_left = 0  # of this job, for the status line; tqdm counts nothing when hidden
        self._commit_lock = threading.Lock()  # Dropbox asks for one batch commit per account at a time
        self._pending_commits: list[tuple[Item, CommitRequest, float]] = []
        self._pending_lock = threading.Lock()
        self._fatal: BaseException | None = None
        self._remote: dict[str, RemoteFile] = {}
        self._whole_file_sha: dict[str, tuple[int, object]] = {}  # source -> (bytes hashed so far, sha256)
        self.sources_to_delete: set[str] = set()
        # memory_budget covers the connections too (TLS buffers, response objects, thread
        # stacks): what is left is for file data.
        connections = options.workers * (options.appends_per_file + 1) + options.small_file_workers
        _return_freed_buffers_at_once()
        self.budget = ByteBudget(max(options.memory_budget - connections * CONNECTION_MEMORY, 2 * options.chunk_size))
        # Small files travel together in append_batch requests of this many bytes; a quarter of
        # the budget at most, since a request's bytes are held twice while its body is built.
        self._group_bytes = min(options.small_group_bytes, self.budget.capacity // 4)
        self._group_file_limit = min(BLOCK, self._group_bytes)
        # Memory, not the link, limits how many appends of a concurrent session are in flight:
        # pieces small enough that every file in flight can keep all its connections busy
        # within the budget, but not so small that request latency starts to count.
        per_append = self.budget.capacity // max(1, options.workers * options.appends_per_file)
        self._append_size = max(min(MIN_APPEND, options.chunk_size), min(options.chunk_size, per_append // BLOCK * BLOCK))
        self._readahead = futures.ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="read")
        self._appends = futures.ThreadPoolExecutor(max_workers=max(1, options.appends_per_file * 2),
                                                   thread_name_prefix="append")

    # -- helpers -----------------------------------------------------------------------------

    def _advance(self, count: int, *, sent: bool = True) -> None:
        """Move the progress by `count` bytes (negative: taken back). `sent`: this run put them
        on the wire; bytes Dropbox held from an earlier run move the bar but are not counted as
        sent, so that the summary's amount and speed are this run's."""
        with self._progress_lock:
            if sent and count > 0:
                self.summary.bytes_sent += count
            self._bytes_left -= count
            if self._progress is not None:
                self._progress.update(count)

    def _retrying(self, what: str, call: Callable[[], object], *, needed: int = 0) -> object:
        """Run one request, riding out network trouble, rate limits and pauses; per-file and
        offset errors go back to the caller."""
        started = time.monotonic()
        delay = 1.0
        failures = 0
        transport_paused = False
        while True:
            if self._fatal is not None:
                raise self._fatal
            try:
                answer = call()
                self.status.network_ok()
                if transport_paused:
                    self.log.info("Dropbox accepts transfers again (data-transport limit): continuing.")
                return answer
            except NetworkProblem as exc:
                if time.monotonic() - started > self.options.network_give_up_seconds:
                    raise FileProblem(f"{what}: the network failed for more than "
                                      f"{self.options.network_give_up_seconds / 60:.0f} min ({exc.message})") from None
                failures += 1
                self.log.debug("%s: %s; retrying in %.0f s", what, exc.message, delay)
                self.status.network_trouble(exc.message, delay, failures)
                nap(delay, lambda: self._fatal is not None)
                delay = min(delay * 2, 60.0)
            except RateLimited as exc:
                nap(max(exc.retry_after, 0.5), lambda: self._fatal is not None)
            except InsufficientSpace:
                self.pauser.wait_for_space(max(needed, 1), "Dropbox is full")
            except TransportLimit:
                transport_paused = True
                self.pauser.wait_transport()
            except ContentHashMismatch as exc:
                self.log.warning("%s", exc.message)
                time.sleep(delay)
                delay = min(delay * 2, 60.0)

    def _client_modified(self, item: Item):
        return mtime_to_client_modified(item.source_mtime_ns / 1e9)

    def _commit_request(self, item: Item, session_id: str, offset: int) -> CommitRequest:
        return CommitRequest(session_id=session_id, offset=offset, path=item.destination,
                             client_modified=self._client_modified(item),
                             overwrite=self.options.if_exists == "overwrite" or item.kind == "manifest",
                             autorename=self.options.if_exists == "rename")

    def _source_unchanged(self, item: Item) -> None:
        try:
            info = os.stat(item.source)
        except OSError as exc:
            raise FileProblem(f"the file vanished or cannot be read during upload ({exc.strerror}); "
                              "it will be sent on the next run", paths=[item.source]) from None
        if info.st_size != item.source_size or info.st_mtime_ns != item.source_mtime_ns:
            raise FileProblem("the file changed while it was being uploaded; it is sent again on the next run",
                              paths=[item.source])

    def _unchanged_after_commit(self, item: Item, remote: RemoteFile) -> None:
        """A file written to while it was read gives a copy that matches no version of it:
        remove that copy (it is this run's own upload) so the rerun can send the file cleanly."""
        try:
            self._source_unchanged(item)
        except FileProblem:
            self._retrying("removing an inconsistent copy", lambda: self.client.delete(remote.path_display))
            raise FileProblem("the file changed while it was being uploaded; the inconsistent copy was removed "
                              "from Dropbox and the file is sent again on the next run", paths=[item.source]) from None

    def _hasher_for(self, item: Item, upto: int = 0) -> ContentHasher:
        """A hasher holding the item's first `upto` bytes (read back from disk). A part also
        carries its file's whole SHA-256 along when the parts before it were hashed in this run,
        so that the manifest needs no second read of a file of many terabytes."""
        tee = None
        if item.kind == "part":
            chain = self._whole_file_sha.get(item.source)
            if chain is not None and chain[0] == item.part_offset:
                tee = chain[1].copy()
            elif item.part_offset == 0:
                tee = hashlib.sha256()
        if upto:
            return hash_range(Path(item.source), item.part_offset, upto, with_sha256=item.kind == "part", tee=tee)
        return ContentHasher(with_sha256=item.kind == "part", tee=tee)

    def _keep_part_hashes(self, item: Item, hasher: ContentHasher) -> None:
        item.sha256 = hasher.sha256()
        if hasher.tee is not None and hasher.size == item.length:
            self._whole_file_sha[item.source] = (item.part_offset + item.length, hasher.tee)

    def _verified(self, item: Item, remote: RemoteFile, hasher: ContentHasher | None = None) -> None:
        if remote.content_hash != item.content_hash:
            raise FileProblem(f"Dropbox's content hash of {remote.path_display} does not match the local file "
                              f"(Dropbox {remote.content_hash}, local {item.content_hash}): the copy in Dropbox is "
                              "not trusted and the original is kept", paths=[item.source])
        item.remote_rev, item.remote_path, item.hash_local = remote.rev, remote.path_display, 1
        if hasher is not None and item.kind == "part":
            self._keep_part_hashes(item, hasher)

    def _log_result(self, item: Item, result: str, seconds: float, size: int | None = None) -> None:
        """`size`: bytes stored, when not the item's planned length (a manifest is planned as 0)."""
        self.log.info("%s\t%s\t%.1fs\t%s\t->\t%s", result, _shown_size(item, size), seconds, item.source,
                      item.destination)

    # -- one item ----------------------------------------------------------------------------

    def _upload_item(self, item: Item) -> None:
        if item.length >= self.options.concurrent_above and self.options.appends_per_file > 1:
            self._upload_concurrent(item)
        else:
            self._upload_sequential(item)

    def _upload_sequential(self, item: Item) -> None:
        """Send one item through a sequential session, reading the next chunk while the current
        one is on the wire; an item of one chunk goes up in a closed session and waits for a
        batch commit."""
        started = time.monotonic()
        self._source_unchanged(item)
        chunk = self.options.chunk_size
        with_sha = item.kind == "part"
        hasher = self._hasher_for(item)
        offset = 0
        session_id = item.session_id
        if session_id and item.confirmed_offset and not item.confirmed_chunks:
            # Rebuild the hash of what Dropbox already holds from the local disk, not the network.
            offset = item.confirmed_offset
            hasher = self._hasher_for(item, offset)
            self._advance(offset, sent=False)
            self.log.info("Resuming %s at %s of %s (upload session from an earlier run).", item.destination,
                          human_bytes(offset), human_bytes(item.length))
            # An empty append asks Dropbox where the session really stands (the journal may lag
            # one chunk behind after a crash) without sending that chunk again.
            try:
                self._retrying("upload", lambda: self.client.session_append(session_id, offset, b"",
                                                                            path=item.destination))
            except IncorrectOffset as exc:
                if exc.correct_offset > item.length:
                    session_id = None
                elif exc.correct_offset != offset:
                    self._advance(exc.correct_offset - offset, sent=False)
                    offset = exc.correct_offset
                    hasher = self._hasher_for(item, offset)
                    self.journal.confirm_offset(item, offset)
            except SessionGone as exc:
                # Closed: a finish refused at its commit in an earlier run left the whole item
                # there, and only the commit is missing. Otherwise consumed by a commit whose
                # answer the crash lost, or expired.
                if isinstance(exc, SessionClosed) and self._finish_closed(
                        item, session_id, self._hasher_for(item, item.length), started):
                    self._advance(item.length - offset, sent=False)
                    return
                if self._committed_earlier(item, started):
                    return
                self.log.info("The upload session of %s has expired; starting that file again.", item.destination)
                self.journal.forget_session(item)
                self._advance(-offset)
                session_id, offset, hasher = None, 0, self._hasher_for(item)
        else:
            session_id = None
        ahead: tuple[int, futures.Future] | None = None

        def read(position: int, paid: bool) -> bytes:
            size = min(chunk, item.length - position)
            if not paid:
                self.budget.take(size)
            return read_at(handle, item.part_offset + position, size)

        with open(item.source, "rb") as handle:
            try:
                while True:
                    size = min(chunk, item.length - offset)
                    if ahead is not None and ahead[0] == offset:
                        data = result(ahead[1])
                    else:
                        if ahead is not None:  # an offset jump made the read-ahead useless
                            self.budget.give(len(result(ahead[1])))
                        data = read(offset, paid=False)
                    ahead = None
                    last = offset + len(data) >= item.length
                    nxt = offset + len(data)
                    if not last and self.budget.take(min(chunk, item.length - nxt), wait=False):
                        ahead = (nxt, self._readahead.submit(read, nxt, True))
                    try:
                        if len(data) != size:
                            raise FileProblem("the file became shorter while it was being uploaded; it is sent "
                                              "again on the next run", paths=[item.source])
                        # Hashed before sending: the request carries its own content hash, so
                        # Dropbox checks it and the SDK need not hash the bytes a second time.
                        hasher.mark()
                        hasher.update(data)
                        request_hash = hasher.since_mark()
                        if session_id is None:
                            session_id = self._retrying("upload", lambda: self.client.session_start(
                                data, close=last and item.length <= chunk, path=item.destination,
                                content_hash=request_hash), needed=item.length)
                            if last:
                                item.content_hash = hasher.content_hash()
                                if with_sha:
                                    self._keep_part_hashes(item, hasher)
                            self.journal.start_session(item, session_id, time.time(), len(data))
                            self._advance(len(data))
                            offset = len(data)
                            if last:
                                self._queue_commit(item, self._commit_request(item, session_id, offset), started)
                                return
                            continue
                        if last:
                            item.content_hash = hasher.content_hash()
                            request = self._commit_request(item, session_id, offset)
                            self._source_unchanged(item)
                            try:
                                remote = self._retrying("upload", lambda: self.client.session_finish(
                                    request, data, content_hash=request_hash), needed=item.length)
                            except SessionClosed:
                                # An earlier attempt of this finish was refused at its commit
                                # (too_many_write_operations, Dropbox full) after its closing
                                # bytes were appended: only the commit is left.
                                self._advance(len(data))
                                if self._finish_closed(item, session_id, hasher, started):
                                    return
                                self._advance(-len(data))
                                raise
                            self._advance(len(data))
                            self._verified(item, remote, hasher)
                            self._unchanged_after_commit(item, remote)
                            self.journal.mark_done([item])
                            self.summary.items_uploaded += 1
                            self._log_result(item, "UPLOADED", time.monotonic() - started)
                            return
                        current = offset
                        self._retrying("upload", lambda: self.client.session_append(
                            session_id, current, data, path=item.destination, content_hash=request_hash),
                            needed=item.length)
                        self._advance(len(data))
                        offset += len(data)
                        self.journal.confirm_offset(item, offset)
                    except IncorrectOffset as exc:
                        # A retried request had reached Dropbox, or the journal lags the server by
                        # one chunk after a crash: continue from the server's offset.
                        self.log.debug("%s: server offset %d, ours %d", item.destination, exc.correct_offset, offset)
                        if exc.correct_offset > item.length:
                            raise FileProblem("Dropbox's upload session holds more bytes than the file",
                                              paths=[item.source]) from None
                        self._advance(exc.correct_offset - offset)
                        offset = exc.correct_offset
                        hasher = self._hasher_for(item, offset)
                        self.journal.confirm_offset(item, offset)
                        if offset == item.length:
                            # Every byte arrived; only the commit is missing.
                            item.content_hash = hasher.content_hash()
                            self._finish_without_data(item, session_id, hasher, started)
                            return
                    except SessionGone:
                        if last and offset and self._already_committed(item, hasher, b""):
                            self._log_result(item, "UPLOADED", time.monotonic() - started)
                            return
                        self.log.info("The upload session of %s has expired; starting that file again.",
                                      item.destination)
                        self.journal.forget_session(item)
                        self._advance(-offset)
                        session_id, offset, hasher = None, 0, self._hasher_for(item)
                    finally:
                        # Let go of the chunk before refunding it, or the next read-ahead could
                        # fill memory while this chunk still lingers.
                        held, data = len(data), None
                        self.budget.give(held)
            finally:
                if ahead is not None:
                    self.budget.give(len(result(ahead[1])))

    def _upload_concurrent(self, item: Item) -> None:
        """Send one large item through a concurrent session: chunks are read and hashed in order
        here, and up to `appends_per_file` of them travel at once on their own connections.
        The closing append goes last, after every other chunk is confirmed, as Dropbox requires."""
        started = time.monotonic()
        self._source_unchanged(item)
        # A session resumed from the journal keeps the pieces it was cut into. All are multiples
        # of 4 MiB, as concurrent appends must be.
        chunk = (item.chunk_piece_size() or self.options.chunk_size) if item.confirmed_chunks else self._append_size
        # The closing append must wait until every other append succeeded, so it carries only
        # the last (at most 4 MiB) block: a whole last chunk would cross the link alone.
        tail = item.length - ((item.length - 1) // BLOCK) * BLOCK if item.length else 0
        body = item.length - tail
        pieces = [(start, min(chunk, body - start)) for start in range(0, body, chunk)] + [(body, tail)]
        count = len(pieces)
        while True:
            hasher = self._hasher_for(item)
            confirmed = item.chunk_set() if item.session_id else set()
            session_id = item.session_id if confirmed else None
            if session_id is None:
                session_id = self._retrying("upload", lambda: self.client.session_start(
                    b"", concurrent=True, path=item.destination), needed=item.length)
                self.journal.start_session(item, session_id, time.time(), 0)
            else:
                self.log.info("Resuming %s: %d of %d chunks are already in Dropbox.", item.destination,
                              len(confirmed), count)
            lock = threading.Lock()
            in_flight: set[futures.Future] = set()
            queued_bytes: dict[futures.Future, int] = {}

            def send(index: int, box: list[bytes], close: bool, request_hash: str | None) -> None:
                # The chunk comes in a box the sender empties, so that nothing (not even the
                # executor's copy of the arguments) keeps it alive once it is refunded.
                data = box.pop()
                try:
                    try:
                        self._retrying("upload", lambda: self.client.session_append(
                            session_id, pieces[index][0], data, close=close, path=item.destination,
                            content_hash=request_hash), needed=item.length)
                    except IncorrectOffset:
                        # A retried append whose first attempt had arrived: Dropbox holds the
                        # chunk already (the final content-hash check would catch any doubt).
                        pass
                    self._advance(len(data))
                    with lock:
                        confirmed.add(index)
                        self.journal.confirm_chunks(item, set(confirmed), chunk)
                finally:
                    held, data = len(data), None
                    self.budget.give(held)

            try:
                with open(item.source, "rb") as handle:
                    for index in range(count):
                        start, size = pieces[index]
                        self.budget.take(size)
                        data = read_at(handle, item.part_offset + start, size)
                        if len(data) != size:
                            self.budget.give(size)
                            raise FileProblem("the file became shorter while it was being uploaded; it is sent "
                                              "again on the next run", paths=[item.source])
                        hasher.mark()
                        hasher.update(data)
                        request_hash = hasher.since_mark()
                        if index in confirmed:
                            self.budget.give(size)
                            self._advance(size, sent=False)
                            continue
                        if index == count - 1:
                            # The closing append must come after all the others succeeded.
                            done, in_flight = wait_futures(in_flight), set()
                            for future in done.done:
                                future.result()
                            send(index, [data], True, request_hash)
                            data = None
                            continue
                        while len(in_flight) >= self.options.appends_per_file:
                            finished, in_flight = wait_futures(in_flight, futures.FIRST_COMPLETED)
                            for future in finished:
                                future.result()
                        future = self._appends.submit(send, index, [data], False, request_hash)
                        in_flight.add(future)
                        queued_bytes[future] = size
                        data = None  # the sender owns it now; do not keep it alive past its refund
                    for future in wait_futures(in_flight).done:
                        future.result()
                    if len(confirmed) != count:
                        raise FileProblem("not every chunk reached Dropbox", paths=[item.source])
                item.content_hash = hasher.content_hash()
                self._source_unchanged(item)
                self._finish_without_data(item, session_id, hasher, started)
                return
            except SessionGone:
                for future in in_flight:
                    if future.cancel():  # never sent, so never refunded by its sender
                        self.budget.give(queued_bytes[future])
                wait_futures(in_flight)
                self.log.info("The upload session of %s has expired; starting that file again.", item.destination)
                self.journal.forget_session(item)
                self._advance(-sum(pieces[i][1] for i in confirmed))

    def _finish_without_data(self, item: Item, session_id: str, hasher: ContentHasher, started: float) -> None:
        request = self._commit_request(item, session_id, item.length)
        try:
            remote = self._retrying("upload", lambda: self.client.session_finish(request, b""), needed=item.length)
        except SessionGone:
            if not self._already_committed(item, hasher, b""):
                raise
            self._log_result(item, "UPLOADED", time.monotonic() - started)
            return
        self._verified(item, remote, hasher)
        self._unchanged_after_commit(item, remote)
        self.journal.mark_done([item])
        self.summary.items_uploaded += 1
        self._log_result(item, "UPLOADED", time.monotonic() - started)

    def _finish_closed(self, item: Item, session_id: str, hasher: ContentHasher, started: float) -> bool:
        """Commit a closed sequential session that holds the whole item: an empty finish at
        offset item.length. `hasher` holds all of the item's bytes.

        Dropbox closes the session of a finish whose commit it refuses after appending the
        closing bytes, and then answers `lookup_failed/closed` to the same finish sent again;
        what it asks for is "retry with empty data body and updated offset" (Dropbox API spec,
        UploadSessionFinishError.path). Seen with `insufficient_space` and
        `too_many_write_operations` (issue 13). False when the session turns out not to hold the
        item (another offset, or gone): the caller sends the file again."""
        item.content_hash = hasher.content_hash()
        self.journal.confirm_offset(item, item.length)
        try:
            self._finish_without_data(item, session_id, hasher, started)
        except (IncorrectOffset, SessionGone) as exc:
            self.log.debug("%s: the closed session cannot be committed (%s)", item.destination, exc.message)
            return False
        return True

    def _committed_earlier(self, item: Item, started: float) -> bool:
        """Is the item already in Dropbox, identical to the local bytes (checked from disk)?"""
        remote = self._retrying("checking", lambda: self.client.metadata(item.destination))
        if not isinstance(remote, RemoteFile) or remote.size != item.length:
            return False
        local = self._hasher_for(item, item.length)
        if local.content_hash() != remote.content_hash:
            return False
        item.content_hash = local.content_hash()
        self._verified(item, remote, local)
        self.journal.mark_done([item])
        self.summary.items_uploaded += 1
        self._advance(item.length - item.confirmed_offset, sent=False)
        self._log_result(item, "UPLOADED", time.monotonic() - started)
        return True

    def _already_committed(self, item: Item, hasher: ContentHasher, last_data: bytes) -> bool:
        """After a lost answer to a commit: is the file already there, identical?"""
        expected = hasher.content_hash_with(last_data)
        remote = self._retrying("checking", lambda: self.client.metadata(item.destination))
        if isinstance(remote, RemoteFile) and remote.content_hash == expected and remote.size == item.length:
            item.content_hash = expected
            full = self._hasher_for(item, item.length)
            self._verified(item, remote, full)
            self.journal.mark_done([item])
            self.summary.items_uploaded += 1
            return True
        return False

    # -- batch commits -----------------------------------------------------------------------

    def _queue_commit(self, item: Item, request: CommitRequest, started: float) -> None:
        with self._pending_lock:
            self._pending_commits.append((item, request, started))
            full = len(self._pending_commits) >= BATCH_LIMIT
        if full:
            self.flush_commits(only_full=True)

    def flush_commits(self, only_full: bool = False) -> None:
        """Commit what waits; with `only_full`, only whole batches of 1000, so that commits
        stay few while other threads keep adding (the last, partial batch comes at the end)."""
        with locked(self._commit_lock):
            while True:
                with self._pending_lock:
                    if only_full and len(self._pending_commits) < BATCH_LIMIT:
                        return
                    batch = self._pending_commits[:BATCH_LIMIT]
                    del self._pending_commits[:BATCH_LIMIT]
                if not batch:
                    return
                self._commit_batch(batch)

    def _commit_batch(self, batch: list[tuple[Item, CommitRequest, float]]) -> None:
        needed = sum(item.length for item, _, _ in batch)
        retry: list[tuple[Item, CommitRequest, float]] = batch
        attempts = 0
        while retry:
            attempts += 1
            requests = [request for _, request, _ in retry]
            outcomes = self._retrying("batch commit", lambda: self.client.finish_batch(requests), needed=needed)
            done: list[Item] = []
            again: list[tuple[Item, CommitRequest, float]] = []
            refused_for_space = 0  # bytes of this batch's files Dropbox had no room for
            for (item, request, started), outcome in zip(retry, outcomes):
                if isinstance(outcome, RemoteFile):
                    try:
                        self._verified(item, outcome)
                        self._unchanged_after_commit(item, outcome)
                    except FileProblem as exc:
                        self._fail(item, exc)
                        continue
                    done.append(item)
                    self._log_result(item, "UPLOADED", time.monotonic() - started)
                elif isinstance(outcome, (RateLimited, NetworkProblem)) and attempts < 20:
                    again.append((item, request, started))
                elif isinstance(outcome, InsufficientSpace):
                    refused_for_space += item.length
                    again.append((item, request, started))
                elif isinstance(outcome, SessionGone):
                    self._recommit_lost_session(item, started)
                else:
                    self._fail(item, outcome if isinstance(outcome, ArchiveError) else
                               FileProblem(str(outcome), paths=[item.source]))
            if done:
                self.journal.mark_done(done)
                self.summary.items_uploaded += len(done)
            if refused_for_space:
                # One pause for what these commits need, not one per file.
                self.pauser.wait_for_space(refused_for_space, "Dropbox is full")
            if again:
                time.sleep(min(2.0 * attempts, 30))
            retry = again

    def _recommit_lost_session(self, item: Item, started: float) -> None:
        """A journaled session Dropbox no longer knows: either its commit went through before a
        crash (the file is there, identical) or it expired; in that case send the file again."""
        remote = self._retrying("checking", lambda: self.client.metadata(item.destination))
        if isinstance(remote, RemoteFile) and remote.content_hash == item.content_hash:
            item.remote_rev, item.remote_path, item.hash_local = remote.rev, remote.path_display, 1
            self.journal.mark_done([item])
            self.summary.items_uploaded += 1
            self._log_result(item, "UPLOADED", time.monotonic() - started)
            return
        self.journal.forget_session(item)
        self._advance(-item.length)
        try:
            self._upload_item(item)
        except FileProblem as exc:
            self._fail(item, exc)

    # -- the whole job -----------------------------------------------------------------------

    def _fail(self, item: Item, problem: ArchiveError) -> None:
        message = problem.message if isinstance(problem, ArchiveError) else str(problem)
        self.journal.mark_failed(item, message)
        self.summary.failures.append((item.destination, message))
        self.log.error("FAILED\t%s\t%s\t->\t%s: %s", _shown_size(item), item.source, item.destination, message)

    def _check_existing(self, item: Item) -> str:
        """'upload', 'done' or 'conflict' for an item whose destination may already exist."""
        remote = self._remote.get(case_key(item.destination))
        if remote is None:
            return "upload"
        quick_match = remote.size == item.length and remote.client_modified == self._client_modified(item)
        # Parts need their SHA-256 for the manifest, and a file to be deleted needs proof:
        # both are hashed locally even when the quick check matches.
        must_hash = self.options.checksum or item.kind == "part" or item.source in self.sources_to_delete
        if quick_match and not must_hash:
            # Dropbox's hash, not the local bytes': the deletion gate hashes the file before trusting it.
            item.content_hash, item.remote_rev, item.remote_path = remote.content_hash, remote.rev, remote.path_display
            item.hash_local = 0
            return "done"
        if remote.size == item.length:
            local = self._hasher_for(item, item.length)
            if local.content_hash() == remote.content_hash:
                item.content_hash, item.remote_rev = local.content_hash(), remote.rev
                item.remote_path, item.hash_local = remote.path_display, 1
                if item.kind == "part":
                    self._keep_part_hashes(item, local)
                return "done"
        return "upload" if self.options.if_exists in ("overwrite", "rename") else "conflict"

    def _already_there(self, item: Item) -> bool:
        """True when the destination already holds this very file (then recorded as done);
        RemoteConflict when it holds a different one that may not be replaced."""
        verdict = self._check_existing(item)
        if verdict == "done":
            self.journal.mark_done([item])
            self.summary.items_already_there += 1
            self._advance(item.length, sent=False)
            self._log_result(item, "ALREADY IN DROPBOX", 0)
            return True
        if verdict == "conflict":
            raise RemoteConflict(f"a different file already exists at {item.destination}; it was not overwritten. "
                                 "Set ifExists = 'overwrite' or 'rename' in app.py to choose otherwise",
                                 paths=[item.source])
        return False

    def _groupable(self, source_items: list[Item]) -> bool:
        """A small whole file never sent before: it can share requests with others."""
        if len(source_items) != 1:
            return False
        item = source_items[0]
        return (item.kind == "file" and item.state != "done" and not item.session_id
                and item.length <= self._group_file_limit)

    def _send_small_files(self, group: list[Item]) -> None:
        """Many small files in two requests: start_batch opens a session for each, and one
        append_batch carries all their bytes and closes the sessions. Their commits then join
        the finish_batch_v2 queue like any closed session, so each file still costs Dropbox one
        thousandth of a commit and this job two thousandths of a request."""
        paid = sum(item.length for item in group)
        # The files are read into one buffer, then copied once into the bytes the SDK wants:
        # twice the bytes for a moment, and no small buffers left to fragment the heap.
        self.budget.take(2 * paid)
        unpaid = 2 * paid
        try:
            started = time.monotonic()
            ready: list[Item] = []
            buffer = bytearray(paid)
            view = memoryview(buffer)
            filled = 0
            for item in group:
                if self._fatal is not None:
                    return
                piece = view[filled:filled + item.length]
                try:
                    if self._already_there(item):
                        continue
                    self._source_unchanged(item)
                    with open(item.source, "rb", buffering=0) as handle:
                        handle.seek(item.part_offset)
                        got = read_into(handle, piece)
                    if got != item.length:
                        raise FileProblem("the file became shorter while it was being uploaded; it is sent "
                                          "again on the next run", paths=[item.source])
                except FileProblem as exc:
                    self._fail(item, exc)
                    continue
                except OSError as exc:
                    self._fail(item, FileProblem(f"cannot read the file ({exc.strerror})", paths=[item.source]))
                    continue
                item.content_hash = bytes_content_hash(piece)
                ready.append(item)
                filled += item.length
            if not ready:
                return
            body = bytes(view[:filled])
            piece.release()
            view.release()
            del buffer
            self.budget.give(paid)
            unpaid -= paid
            body_hash = bytes_content_hash(body)
            try:
                session_ids = self._retrying("upload", lambda: self.client.session_start_batch(len(ready)))
                pieces = [(sid, item.length, item.destination) for sid, item in zip(session_ids, ready)]
                outcomes: list[ArchiveError | None] = self._retrying(
                    "upload", lambda: self.client.append_batch(pieces, body, body_hash), needed=paid)
            except FileProblem as exc:
                self.log.warning("Sending %d small files together failed (%s); they are sent one by one.",
                                 len(ready), exc.message)
                session_ids, outcomes = [""] * len(ready), [exc] * len(ready)
            except AuthError as exc:
                self._fatal = exc
                return
            body = b""  # sent: let it go before the commits are queued
            arrived: list[tuple[Item, str]] = []
            alone: list[Item] = []
            for item, session_id, outcome in zip(ready, session_ids, outcomes):
                # A retried request whose first attempt got through finds the session full.
                if outcome is None or (isinstance(outcome, IncorrectOffset) and outcome.correct_offset == item.length):
                    arrived.append((item, session_id))
                else:
                    self.log.debug("%s: %s; sent on its own instead", item.destination, outcome.message)
                    alone.append(item)
            self.journal.record_closed_sessions(arrived, time.time())
            for item, session_id in arrived:
                self._advance(item.length)
                self._queue_commit(item, self._commit_request(item, session_id, item.length), started)
        finally:
            self.budget.give(unpaid)
        for item in alone:
            self._run_source([item])

    def _run_source(self, source_items: list[Item]) -> None:
        """Upload one local file: its single item, or its parts in order then the manifest."""
        for item in source_items:
            if self._fatal is not None:
                return
            if item.state == "done":
                continue
            try:
                if item.kind == "manifest":
                    self._upload_manifest(item, source_items)
                    continue
                if not item.session_id and self._already_there(item):
                    continue
                if item.session_id and item.confirmed_offset == item.length and item.length <= self.options.chunk_size:
                    # Sent and closed in an earlier run; only its commit was missing.
                    if item.content_hash is None:
                        item.content_hash = hash_range(Path(item.source), item.part_offset, item.length).content_hash()
                    self._advance(item.length, sent=False)
                    self._queue_commit(item, self._commit_request(item, item.session_id, item.length),
                                       time.monotonic())
                    continue
                self._upload_item(item)
            except (AuthError,) as exc:
                self._fatal = exc
                return
            except FileProblem as exc:
                self._fail(item, exc)
                if item.kind == "part":
                    return  # the remaining parts and the manifest wait for the next run
            except OSError as exc:
                self._fail(item, FileProblem(f"cannot read the file ({exc.strerror})", paths=[item.source]))
                return

    def _upload_manifest(self, manifest_item: Item, source_items: list[Item]) -> None:
        parts = [i for i in source_items if i.kind == "part"]
        if self._pending_commits:
            self.flush_commits()
        if any(p.state != "done" for p in parts):
            return
        started = time.monotonic()
        carried = self._whole_file_sha.pop(manifest_item.source, None)
        if carried is not None and carried[0] == manifest_item.source_size:
            whole = carried[1].hexdigest()
        else:  # some parts were sent in an earlier run: read the file once more
            whole = hash_range(Path(manifest_item.source), with_sha256=True).sha256()
        self._source_unchanged(manifest_item)
        name = manifest_item.destination.rsplit("/", 1)[1]
        plan = [split.PartPlan(index, p.part_offset, p.length) for index, p in enumerate(parts, start=1)]
        manifest = split.build_manifest(split.parse_manifest_name(name) or name, manifest_item.source_size, whole,
                                        manifest_item.source_mtime_ns / 1e9, plan, [p.sha256 for p in parts],
                                        part_size=parts[0].length)
        data = manifest.to_bytes()
        manifest_item.content_hash = bytes_content_hash(data)
        manifest_item.sha256 = hashlib.sha256(data).hexdigest()
        request = self._commit_request(manifest_item, "", 0)
        remote = self._retrying("upload", lambda: self.client.upload(data, request))
        self._verified(manifest_item, remote)
        self.journal.mark_done([manifest_item])
        self.summary.items_uploaded += 1
        self._log_result(manifest_item, "UPLOADED", time.monotonic() - started, size=len(data))

    def create_empty_folders(self, folders: Iterable[str]) -> list[tuple[str, str]]:
        """Empty local folders exist in Dropbox too (creating an existing one is harmless)."""
        failures: list[tuple[str, str]] = []
        for folder in folders:
            try:
                self._retrying("creating a folder", lambda: self.client.create_folder(folder))
                self.log.debug("FOLDER\t%s", folder)
            except FileProblem as exc:
                failures.append((folder, exc.message))
                self.log.error("FAILED\tfolder %s: %s", folder, exc.message)
        return failures

    def _reconcile(self, job_items: list[Item]) -> None:
        """Items the journal calls done that Dropbox no longer holds as sent (deleted, moved or
        replaced by someone, or another account) are sent again - never called verified. A
        replaced file is left alone with ifExists = 'report' (both kept, and said so)."""
        reopen: list[Item] = []
        for item in job_items:
            if item.state != "done":
                continue
            remote = self._remote.get(case_key(item.remote_key_path))
            if isinstance(remote, RemoteFile) and remote.content_hash == item.content_hash:
                continue
            if remote is None:
                self.log.warning("NOT IN DROPBOX\t%s: uploaded earlier, but Dropbox does not hold it now (deleted "
                                 "or moved by someone, or another account); it is sent again.", item.remote_key_path)
                reopen.append(item)
            elif self.options.if_exists == "report":
                self._fail(item, RemoteConflict(
                    f"Dropbox now holds different bytes at {item.remote_key_path} than were uploaded from "
                    f"{item.source} (replaced by someone). Both are kept (ifExists = 'report'): the original is not "
                    "deleted. Set ifExists = 'overwrite' to upload it again over that file, or 'rename' to keep "
                    "both in Dropbox", paths=[item.source]))
            else:
                self.log.warning("REPLACED IN DROPBOX\t%s: Dropbox holds different bytes now; it is sent again "
                                 "(ifExists = '%s').", item.remote_key_path, self.options.if_exists)
                reopen.append(item)
        if reopen:
            self.journal.reopen(reopen)

    def _bytes_to_store(self, items: Iterable[Item]) -> int:
        """Bytes the items not done yet will add to the Dropbox account (quota counts committed
        files, so a file already there costs nothing and a replaced one only what it grows by):
        a destination holding a file of the same size is taken to be that file (it is checked
        before sending), one holding another file costs nothing with ifExists = 'report' (it is
        not sent), the difference with 'overwrite', the whole file with 'rename'. Unit: bytes."""
        total = 0
        for item in items:
            if item.state == "done":
                continue
            remote = self._remote.get(case_key(item.destination))
            if not isinstance(remote, RemoteFile) or (remote.size != item.length
                                                      and self.options.if_exists == "rename"):
                total += item.length
            elif remote.size != item.length and self.options.if_exists == "overwrite":
                total += max(0, item.length - remote.size)
        return total

    def run(self, job_items: list[Item], remote_folders: Iterable[str]) -> Summary:
        """Send every item not yet done; `remote_folders` are listed once to find what is there."""
        started = time.monotonic()
        by_source: dict[str, list[Item]] = {}
        for item in job_items:
            by_source.setdefault(item.source, []).append(item)
        self.summary.files_total = len(by_source)
        if job_items:
            # The journal says what was sent, not what Dropbox holds now: look, then decide.
            for folder in deletion.topmost_folders(remote_folders):
                listed = self._retrying("listing Dropbox", lambda: self.client.list_files(folder))
                self._remote.update({case_key(k): v for k, v in listed.items()})
            self._reconcile(job_items)
        todo = {source: items for source, items in by_source.items() if any(i.state != "done" for i in items)}
        self.summary.items_done_before = sum(1 for i in job_items if i.state == "done")
        total_bytes = sum(i.length for i in job_items)
        remaining_bytes = sum(i.length for items in todo.values() for i in items if i.state != "done")
        self._bytes_left = remaining_bytes
        self.status.remaining(lambda: f"{human_bytes(max(0, self._bytes_left))} still to send")
        if todo:
            self.log.info("%d of %d files still to send (%s); %d items were finished in earlier runs and are in "
                          "Dropbox now.", len(todo), len(by_source), human_bytes(remaining_bytes),
                          self.summary.items_done_before)
            to_store = self._bytes_to_store(item for items in todo.values() for item in items)
            usage = self.client.space_usage()
            if usage.free is not None and usage.free < to_store:
                self.pauser.wait_for_space(to_store, "not enough space in Dropbox for what is left of this job")
        else:
            self.log.info("Every file of this sheet is in Dropbox now, identical (checked by content hash); "
                          "nothing to send.")
        self._progress = self.status.show(tqdm(
            total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="Uploading", disable=None,
            initial=total_bytes - remaining_bytes, dynamic_ncols=True))
        pool = futures.ThreadPoolExecutor(max_workers=self.options.workers, thread_name_prefix="upload")
        # Small files cost one round trip each and almost no bandwidth: many more of them travel
        # at once than large ones, or latency alone would bound the job.
        small_pool = futures.ThreadPoolExecutor(max_workers=self.options.small_file_workers,
                                                thread_name_prefix="small")
        try:
            pending: set[futures.Future] = set()

            def submit(executor: futures.ThreadPoolExecutor, work: Callable, argument: list[Item]) -> None:
                nonlocal pending
                pending.add(executor.submit(work, argument))
                if len(pending) >= (self.options.workers + self.options.small_file_workers) * 4:
                    finished, pending = wait_futures(pending, futures.FIRST_COMPLETED)
                    _raise_bugs(finished)

            group: list[Item] = []
            group_bytes = 0
            for items in sorted(todo.values(), key=lambda group: -sum(i.length for i in group)):
                if self._fatal is not None:
                    break
                if self._groupable(items):
                    if group and (group_bytes + items[0].length > self._group_bytes
                                  or len(group) >= APPEND_BATCH_LIMIT):
                        submit(small_pool, self._send_small_files, group)
                        group, group_bytes = [], 0
                    group.append(items[0])
                    group_bytes += items[0].length
                    continue
                small = len(items) == 1 and items[0].length <= self.options.chunk_size
                submit(small_pool if small else pool, self._run_source, items)
            if group and self._fatal is None:
                submit(small_pool, self._send_small_files, group)
            finished, _ = wait_futures(pending)
            _raise_bugs(finished)
            if self._fatal is None:
                self.flush_commits()
                # Manifests wait for their parts' batch commits; a second pass sends them.
                for items in todo.values():
                    if any(i.kind == "manifest" and i.state != "done" for i in items):
                        self._run_source(items)
        except BaseException as exc:
            # Ctrl-C or a bug: stop the workers between chunks instead of letting them finish
            # the whole job; the journal already holds every confirmed chunk.
            if self._fatal is None:
                self._fatal = exc if isinstance(exc, Exception) else KeyboardInterrupt()
            raise
        finally:
            for executor in (pool, small_pool, self._appends, self._readahead):
                shutdown(executor)
            self.status.hide(self._progress)
            self.status.remaining(None)
            self._progress.close()
        if self._fatal is not None:
            raise self._fatal
        self.summary.seconds = time.monotonic() - started
        return self.summary


def _shown_size(item: Item, size: int | None = None) -> str:
    """The size for a log line; a manifest's is known only once it is written."""
    if size is None and item.kind == "manifest":
        return "manifest"
    return human_bytes(item.length if size is None else size)


def _raise_bugs(finished: Iterable[futures.Future]) -> None:
    for future in finished:
        future.result()


def delete_verified_sources(client: DropboxClient, plan: Plan, journal: Journal,
                            log: logging.Logger) -> tuple[int, list[tuple[str, str]]]:
    """Delete the originals asked to go whose every item is done, each only once the deletion
    gate has seen Dropbox hold identical bytes now and the file unchanged. Returns (deleted,
    [(path, why kept)])."""
    wanted = {str(s.source): s for s in plan.sources if s.delete_after}
    if not wanted:
        return 0, []
    by_source: dict[str, list[Item]] = {}
    for item in journal.items():
        if item.source in wanted:
            by_source.setdefault(item.source, []).append(item)
    originals = []
    for path, items in by_source.items():
        if all(i.state == "done" for i in items):
            root = wanted[path].row["inputFile"]
            originals.append(deletion.uploaded_original(items, root if isinstance(root, Path) and root.is_dir()
                                                        else None))
    report = deletion.delete_uploaded_originals(client, originals, journal=journal, log=log)
    if originals:
        log.info("Deletion proof: %d original(s) checked against Dropbox with %d lookup(s) in %.2f s, then on "
                 "disk and deleted in %.2f s; %d deleted.", len(originals), report.remote_calls, report.remote_seconds,
                 report.local_seconds, len(report.deleted))
    return len(report.deleted), [(str(path), reason) for path, reason in report.kept]


# ============================================================================ entry point


def run(context: RunContext, sheet: str) -> int:
    """app.py with sheetName = 'dropboxUpload_API'."""
    settings = context.settings
    chunk = max(4, settings.chunkSize_MB // 4 * 4) * MIB  # 4 MiB multiples match Dropbox's hash blocks
    if settings.chunkSize_MB % 4:
        context.log.info("chunkSize_MB %d is used as %d (a multiple of 4 MiB).", settings.chunkSize_MB, chunk // MIB)
    part_limit = int(min(settings.fileSizeLimit_GB * units.GB, prepare.DROPBOX_API_MAX_FILE))
    with Journal(context.logs_root / "journal.sqlite3", sheet) as journal:
        settle_interrupted_deletions(journal, context.log)
        workers = settings.workers * (settings.connectionsPerFile + 1)
        try:
            plan = prepare_rows(context, sheet, destination_of_row=lambda row: row["outputDir"],
                                part_limit=part_limit, already_done=journal.deleted_sources(), mode="API",
                                bytes_per_second=50e6)
        except SheetError as exc:
            # All of Stage 1's problems in one pass: the Dropbox side of what could be planned too.
            raise with_dropbox_side(exc, context, lambda: open_client(context, workers=workers)) from None
        if context.args.dry_run:
            client = destinations.client_for_dry_run(lambda: open_client(context, workers=workers), context.log)
            if client is not None:
                destinations.refuse_blocked(client, plan, destination_of_row=lambda row: row["outputDir"],
                                            log=context.log)
            context.log.info("Dry run: nothing was sent.")
            return EXIT_OK
        client = open_client(context, workers=workers)
        # Before the first byte: Dropbox would refuse a blocked destination only at commit time.
        destinations.refuse_blocked(client, plan, destination_of_row=lambda row: row["outputDir"], log=context.log)
        bind_account(journal, client, context.log)
        items = journal.sync_plan(prepare.iter_items(plan, sheet))
        options = UploadOptions(chunk_size=chunk, workers=settings.workers, if_exists=settings.ifExists,
                                checksum=settings.checksum, sleep_seconds=settings.sleepTime_min * 60,
                                appends_per_file=settings.connectionsPerFile,
                                concurrent_above=4 * chunk,
                                memory_budget=max(settings.memoryLimit_MB * MIB, 2 * chunk))
        uploader = ApiUploader(client, journal, options, context.log)
        uploader.sources_to_delete = {str(s.source) for s in plan.sources if s.delete_after}
        context.log.info("Stage 2, upload through the Dropbox API with %d workers, %d MiB chunks.",
                         settings.workers, chunk // MIB)
        summary = uploader.run(items, {row["outputDir"] for row in plan_rows(plan)})
        summary.failures.extend(uploader.create_empty_folders(plan.empty_folders))
        deleted, delete_failures = delete_verified_sources(client, plan, journal, context.log)
        summary.deleted_sources = deleted
        for path, message in delete_failures:
            summary.failures.append((path, message))
            context.log.error("NOT DELETED\t%s: %s", path, message)
        _log_summary(context, summary)
        return EXIT_OK if summary.ok else EXIT_SOME_FAILED


def _log_summary(context: RunContext, summary) -> None:
    log = context.log
    summary.failures.extend(context.stage1_failures)
    speed = summary.bytes_sent / summary.seconds if summary.seconds else 0
    log.info("Summary: %d files in the sheet; %d items sent now, %d already in Dropbox, %d done in earlier runs; "
             "%s sent in %.0f s (%s/s); %d originals deleted after verification; %d failed.",
             summary.files_total, summary.items_uploaded, summary.items_already_there, summary.items_done_before,
             units.human_bytes(summary.bytes_sent), summary.seconds, units.human_bytes(speed),
             summary.deleted_sources, len(summary.failures))
    for destination, message in summary.failures[:50]:
        log.error("  failed: %s: %s", destination, message)
    if summary.failures:
        log.error("Some files did not reach Dropbox. Fix what the messages say and run app.py again: finished "
                  "files are not sent twice.")
    else:
        log.info("Everything is in Dropbox and verified by content hash.")
    log.info("Log: %s", context.log_path)
    sys.stdout.flush()
