"""One item through one Dropbox upload session, resumable across runs.

- `SequentialSession`: chunks in order; the cursor's offset is journaled after every chunk, so
  a rerun continues a 300 GB file where it stopped; the next chunk is hashed while the current
  one is on the wire. An item of one chunk goes up in a closed session and its commit waits in
  the commit queue.
- `ConcurrentSession`: a large item cut into pieces (multiples of 4 MiB) of which several are
  appended at once, each on its own connection; the confirmed pieces are journaled, and the
  closing append goes last, as Dropbox requires.

No request holds its bytes: each is hashed by a pass over its range of the file just before it
is sent (the item's hasher, in order, which also gives the request's content hash), then sent
as a body streamed from the file (upload_memory.FileRangeBody), so memory per request in flight
is one small buffer whatever the chunk size. Dropbox refuses a request whose bytes do not match
its content hash; when the file's range no longer hashes as it did, the file changed between
the two reads, and the item fails as changed (nothing of that request was appended).

Both walk the phases of `Phase`; a session Dropbox no longer knows (expired, or consumed by a
commit whose answer was lost) is either found committed or started again.
"""

from __future__ import annotations

import concurrent.futures as futures
import threading
import time
from enum import Enum

from pathlib import Path
from typing import Callable, TypeVar

from .commit_queue import CommitQueue
from .content_hash import ContentHasher, hash_range
from .dropbox_client import ContentHashMismatch, IncorrectOffset, SessionClosed, SessionGone
from .errors import FileProblem
from .journal import Item, Kind
from .status import result, wait_futures
from .units import MIB, human_bytes
from .upload_memory import STREAM_PIECE, FileRangeBody, readinto_at
from .upload_run import Asked, UploadRun, became_shorter

T = TypeVar("T")

BLOCK = 4 * MIB  # concurrent-session appends are multiples of this, except the closing one
MIN_APPEND = 16 * MIB  # at 20 MiB/s per connection, 50 ms of latency costs 6 % of such an append
CHANGED = "the file changed while it was being uploaded; it is sent again on the next run"


class Phase(Enum):
    """Where one item's upload session stands."""

    NOT_STARTED = "no upload session: the next request starts one"
    APPENDING = "a session is open; Dropbox holds its confirmed offset (or pieces)"
    COMPLETE = "Dropbox holds every byte in the session; only the commit is missing"
    QUEUED = "closed with every byte in it; the commit waits in the commit queue"
    COMMITTED = "committed, verified and recorded done"


def append_size(length: int, chunk_size: int, appends_per_file: int) -> int:
    """Bytes per append of a new concurrent session of an item of `length` bytes: the chunk
    size, or less so that each of the file's connections has a piece to send, but not so small
    that request latency starts to count (MIN_APPEND); a multiple of BLOCK. Memory does not
    enter into it: a request in flight holds one STREAM_PIECE, whatever its size."""
    per_connection = -(-length // max(1, appends_per_file))
    per_connection = -(-per_connection // BLOCK) * BLOCK
    return max(min(MIN_APPEND, chunk_size), min(chunk_size, per_connection))


def range_body(item: Item, start: int, size: int) -> FileRangeBody:
    """The item's bytes [start, start + size) as a request body streamed from its file."""

    def problem(error: OSError | None) -> FileProblem:
        if error is None:
            return became_shorter(item)
        return FileProblem(f"cannot read the file ({error.strerror})", paths=[item.source])

    return FileRangeBody(item.source, item.part_offset + start, size, problem)


def hash_pass(run: UploadRun, hasher: ContentHasher, handle, item: Item, start: int, size: int) -> str:
    """Feed the item's bytes [start, start + size) to `hasher` (which holds those before
    `start`), read from `handle` just before they are sent (so from the page cache when they are
    read again to be sent); returns their content hash, which the request carries and Dropbox
    checks against the bytes it receives. FileProblem when the file is shorter."""
    # The hasher gives a range's hash from its block digests when the range starts on a block;
    # otherwise a second hasher sees the range alone.
    alone = None if hasher.size % BLOCK == 0 else ContentHasher()
    hasher.mark()
    run.budget.take(STREAM_PIECE)
    try:
        view = memoryview(bytearray(max(1, min(STREAM_PIECE, size))))
        done = 0
        while done < size:
            want = min(len(view), size - done)
            if readinto_at(handle, view[:want], item.part_offset + start + done) < want:
                raise became_shorter(item)
            hasher.update(view[:want])
            if alone is not None:
                alone.update(view[:want])
            done += want
    finally:
        run.budget.give(STREAM_PIECE)
    return alone.content_hash() if alone is not None else hasher.since_mark()


def sent_as_hashed(item: Item, start: int, size: int, request_hash: str, send: Callable[[], T]) -> T:
    """`send()`, a request carrying the item's bytes [start, start + size) streamed from the
    file with `request_hash`. Dropbox refuses them as not matching their hash either because the
    bytes changed on the wire (ContentHashMismatch goes on: the retry policy sends them again)
    or because the file changed between the hash pass and the sending: then its range hashes
    differently now, and the item fails as changed."""
    try:
        return send()
    except ContentHashMismatch:
        if hash_range(Path(item.source), item.part_offset + start, size).content_hash() != request_hash:
            raise FileProblem(CHANGED, paths=[item.source]) from None
        raise


class _Session:
    """What both kinds of session share: the item, its session id, phase and hasher."""

    def __init__(self, run: UploadRun, item: Item):
        self.run = run
        self.item = item
        self.started = time.monotonic()
        self.session_id: str | None = None
        self.phase = Phase.NOT_STARTED
        self.hasher: ContentHasher = run.hashes.hasher_for(item)

    def _commit_complete(self) -> None:
        """COMPLETE -> COMMITTED: a finish without data at offset item.length; `hasher` holds
        every byte. A session gone meanwhile is fine if its commit had gone through."""
        run, item = self.run, self.item
        item.content_hash = self.hasher.content_hash()
        request = run.commit_request(item, self.session_id, item.length)
        try:
            remote = run.call("upload", lambda: run.client.session_finish(request, b""), needed=item.length)
        except SessionGone:
            if not run.already_in_dropbox(item, Asked.SESSION_LOST, started=self.started, local=self.hasher):
                raise
        else:
            run.record_uploaded(item, remote, self.hasher, self.started)
        self.phase = Phase.COMMITTED

    def _say_expired(self) -> None:
        self.run.log.info("The upload session of %s has expired; starting that file again.", self.item.destination)
        self.run.journal.forget_session(self.item)


class ChunkHashes:
    """An item's chunks hashed in order into the session's hasher, each just before it is sent
    (hash_pass); the next chunk is hashed on another thread while the current one is on the
    wire, into the same hasher, which is used only if the current one went as planned."""

    def __init__(self, run: UploadRun, pool: futures.Executor, handle, item: Item, chunk: int):
        self._run, self._pool, self._handle = run, pool, handle
        self._item, self._chunk = item, chunk
        self._ahead: tuple[int, ContentHasher, futures.Future] | None = None

    def _hash(self, hasher: ContentHasher, position: int) -> tuple[int, str]:
        size = min(self._chunk, self._item.length - position)
        return size, hash_pass(self._run, hasher, self._handle, self._item, position, size)

    def next(self, hasher: ContentHasher, position: int) -> tuple[int, str]:
        """(size, content hash) of the chunk at byte `position` of the item, its bytes fed to
        `hasher` (which holds the item's bytes before `position`)."""
        if self._ahead is not None and self._ahead[0] == position and self._ahead[1] is hasher:
            found = result(self._ahead[2])
        else:
            self.close()  # an offset jump or a new hasher made the hash ahead useless
            found = self._hash(hasher, position)
        self._ahead = None
        following = position + found[0]
        if following < self._item.length:
            self._ahead = (following, hasher, self._pool.submit(self._hash, hasher, following))
        return found

    def close(self) -> None:
        """Wait for a hash ahead that will not be used (it reads the session's file handle)."""
        if self._ahead is not None:
            wait_futures([self._ahead[2]])
            self._ahead = None


class SequentialSession(_Session):
    """One item through a sequential upload session (see the module's docstring).

    NOT_STARTED -> (start) APPENDING -> (appends) ... -> (finish with the last chunk) COMMITTED;
    an item of one chunk: NOT_STARTED -> (start, closed) QUEUED. A session from an earlier run
    resumes at the journal's confirmed offset after asking Dropbox where it stands; one whose
    bytes all arrived is COMPLETE and only committed."""

    def __init__(self, run: UploadRun, commits: CommitQueue, readahead: futures.Executor, item: Item):
        super().__init__(run, item)
        self.commits = commits
        self.readahead = readahead
        self.chunk = run.options.chunk_size
        self.offset = 0  # bytes of the item Dropbox holds in the session (the cursor's offset)

    def send(self) -> Phase:
        """Upload the item; returns COMMITTED, or QUEUED for a closed session whose commit waits
        in the queue. FileProblem (and its subclasses) when the item cannot be sent now."""
        item = self.item
        self.run.source_unchanged(item)
        if item.session_id and item.confirmed_offset == item.length and item.length <= self.chunk:
            self._queue_closed()
        elif item.session_id and item.confirmed_offset and not item.confirmed_chunks:
            self._resume()
        if self.phase in (Phase.NOT_STARTED, Phase.APPENDING, Phase.COMPLETE):
            self._send_chunks()
        return self.phase

    def _queue_closed(self) -> None:
        """Sent and closed in an earlier run; only its commit was missing."""
        run, item = self.run, self.item
        if item.content_hash is None:
            item.content_hash = run.hashes.hasher_for(item, item.length).content_hash()
        run.advance(item.length, sent=False)
        self.commits.add(item, run.commit_request(item, item.session_id, item.length), time.monotonic())
        self.phase = Phase.QUEUED

    def _resume(self) -> None:
        """APPENDING at the journal's offset, then an empty append asks Dropbox where the session
        really stands (the journal may lag one chunk behind after a crash) without sending that
        chunk again."""
        run, item = self.run, self.item
        self.session_id, self.offset, self.phase = item.session_id, item.confirmed_offset, Phase.APPENDING
        # Rebuild the hash of what Dropbox already holds from the local disk, not the network.
        self.hasher = run.hashes.hasher_for(item, self.offset)
        run.advance(self.offset, sent=False)
        run.log.info("Resuming %s at %s of %s (upload session from an earlier run).", item.destination,
                     human_bytes(self.offset), human_bytes(item.length))
        session_id, offset = self.session_id, self.offset
        try:
            run.call("upload", lambda: run.client.session_append(session_id, offset, b"", path=item.destination))
        except IncorrectOffset as exc:
            if exc.correct_offset > item.length:
                run.log.debug("%s: the session holds more bytes than the file; a new one", item.destination)
                run.journal.forget_session(item)
                self._start_over()
            elif exc.correct_offset != self.offset:
                self._jump(exc.correct_offset, sent=False)
        except SessionGone as exc:
            self._resumed_session_gone(closed=isinstance(exc, SessionClosed))
        if self.phase is Phase.APPENDING and self.offset == item.length:
            self.phase = Phase.COMPLETE

    def _resumed_session_gone(self, closed: bool) -> None:
        """Closed: a finish refused at its commit in an earlier run left the whole item there,
        and only the commit is missing. Otherwise consumed by a commit whose answer the crash
        lost, or expired."""
        run, item = self.run, self.item
        if closed:
            self.hasher = run.hashes.hasher_for(item, item.length)
            if self._commit_closed():
                run.advance(item.length - self.offset, sent=False)
                return
        if run.already_in_dropbox(item, Asked.SESSION_LOST, started=self.started,
                                  unsent=item.length - self.offset):
            self.phase = Phase.COMMITTED
            return
        self._say_expired()
        self._start_over()

    def _start_over(self) -> None:
        """Back to NOT_STARTED: the bytes counted for the old session are taken back."""
        self.run.advance(-self.offset)
        self.session_id, self.offset, self.phase = None, 0, Phase.NOT_STARTED
        self.hasher = self.run.hashes.hasher_for(self.item)

    def _jump(self, offset: int, *, sent: bool) -> None:
        """Dropbox holds `offset` bytes, not what we thought: continue from there."""
        run, item = self.run, self.item
        run.advance(offset - self.offset, sent=sent)
        self.offset = offset
        self.hasher = run.hashes.hasher_for(item, offset)
        run.journal.confirm_offset(item, offset)
        if offset == item.length:
            self.phase = Phase.COMPLETE  # every byte arrived; only the commit is missing

    def _send_chunks(self) -> None:
        with open(self.item.source, "rb") as handle:
            hashes = ChunkHashes(self.run, self.readahead, handle, self.item, self.chunk)
            try:
                while self.phase in (Phase.NOT_STARTED, Phase.APPENDING, Phase.COMPLETE):
                    if self.phase is Phase.COMPLETE:
                        self._commit_complete()
                        continue
                    size, request_hash = hashes.next(self.hasher, self.offset)
                    self._send_chunk(size, request_hash)
            finally:
                hashes.close()

    def _send_chunk(self, size: int, request_hash: str) -> None:
        """The chunk of `size` bytes at the session's offset, hashed into `hasher` already."""
        item = self.item
        last = self.offset + size >= item.length
        body = range_body(item, self.offset, size)
        self.run.budget.take(STREAM_PIECE)
        try:
            if self.phase is Phase.NOT_STARTED:
                self._start(body, last, request_hash)
            elif last:
                self._finish(body, request_hash)
            else:
                self._append(body, request_hash)
        except IncorrectOffset as exc:
            # A retried request had reached Dropbox, or the journal lags the server by one chunk
            # after a crash: continue from the server's offset.
            self.run.log.debug("%s: server offset %d, ours %d", item.destination, exc.correct_offset, self.offset)
            if exc.correct_offset > item.length:
                raise FileProblem("Dropbox's upload session holds more bytes than the file",
                                  paths=[item.source]) from None
            self._jump(exc.correct_offset, sent=True)
        except SessionGone:
            if last and self.offset and self.run.already_in_dropbox(item, Asked.SESSION_LOST, started=self.started,
                                                                   local=self.hasher):
                self.phase = Phase.COMMITTED
                return
            self._say_expired()
            self._start_over()
        finally:
            self.run.budget.give(STREAM_PIECE)

    def _sent(self, data: FileRangeBody, request_hash: str, send: Callable[[], T]) -> T:
        """run.call(send) for a request carrying `data`, the chunk at the session's offset."""
        item, offset = self.item, self.offset
        return self.run.call("upload", lambda: sent_as_hashed(item, offset, len(data), request_hash, send),
                             needed=item.length)

    def _start(self, data: FileRangeBody, last: bool, request_hash: str) -> None:
        """NOT_STARTED -> APPENDING, or QUEUED when the first chunk is the whole item."""
        run, item = self.run, self.item
        session_id = self._sent(data, request_hash, lambda: run.client.session_start(
            data, close=last and item.length <= self.chunk, path=item.destination, content_hash=request_hash))
        if last:
            item.content_hash = self.hasher.content_hash()
            if item.kind == Kind.PART:
                run.hashes.keep(item, self.hasher)
        run.journal.start_session(item, session_id, time.time(), len(data))
        run.advance(len(data))
        self.session_id, self.offset, self.phase = session_id, len(data), Phase.APPENDING
        if last:
            self.commits.add(item, run.commit_request(item, session_id, self.offset), self.started)
            self.phase = Phase.QUEUED

    def _append(self, data: FileRangeBody, request_hash: str) -> None:
        run, item = self.run, self.item
        session_id, offset = self.session_id, self.offset
        self._sent(data, request_hash, lambda: run.client.session_append(
            session_id, offset, data, path=item.destination, content_hash=request_hash))
        run.advance(len(data))
        self.offset += len(data)
        run.journal.confirm_offset(item, self.offset)

    def _finish(self, data: FileRangeBody, request_hash: str) -> None:
        """APPENDING -> COMMITTED with the last chunk."""
        run, item = self.run, self.item
        item.content_hash = self.hasher.content_hash()
        request = run.commit_request(item, self.session_id, self.offset)
        run.source_unchanged(item)
        try:
            remote = self._sent(data, request_hash,
                                lambda: run.client.session_finish(request, data, content_hash=request_hash))
        except SessionClosed:
            # An earlier attempt of this finish was refused at its commit (too_many_write_operations,
            # Dropbox full) after its closing bytes were appended: only the commit is left.
            run.advance(len(data))
            if self._commit_closed():
                return
            run.advance(-len(data))
            raise
        run.advance(len(data))
        run.record_uploaded(item, remote, self.hasher, self.started)
        self.phase = Phase.COMMITTED

    def _commit_closed(self) -> bool:
        """Commit a closed session that holds the whole item: an empty finish at offset
        item.length. `hasher` holds all of the item's bytes.

        Dropbox closes the session of a finish whose commit it refuses after appending the
        closing bytes, and then answers `lookup_failed/closed` to the same finish sent again;
        what it asks for is "retry with empty data body and updated offset" (Dropbox API spec,
        UploadSessionFinishError.path). Seen with `insufficient_space` and
        `too_many_write_operations` (issue 13). False when the session turns out not to hold the
        item (another offset, or gone): the caller sends the file again."""
        self.item.content_hash = self.hasher.content_hash()
        self.run.journal.confirm_offset(self.item, self.item.length)
        try:
            self._commit_complete()
        except (IncorrectOffset, SessionGone) as exc:
            self.run.log.debug("%s: the closed session cannot be committed (%s)", self.item.destination, exc.message)
            return False
        return True


class ConcurrentSession(_Session):
    """One large item through a concurrent upload session (see the module's docstring).

    NOT_STARTED -> (start, no data) APPENDING -> (every piece confirmed, the closing one last)
    COMPLETE -> (finish without data) COMMITTED. Pieces are hashed in order here, each while
    those before it are on the wire, and appended from the file on the `appends` pool, at most
    `appends_per_file` at once. A session from an earlier run keeps the pieces it was cut into
    and sends only those not confirmed."""

    def __init__(self, run: UploadRun, appends: futures.Executor, item: Item, piece_size: int):
        """`piece_size`: bytes per append of a new session (a multiple of BLOCK)."""
        super().__init__(run, item)
        self.appends = appends
        # A session resumed from the journal keeps the pieces it was cut into. All are multiples
        # of 4 MiB, as concurrent appends must be.
        if item.confirmed_chunks:
            piece_size = item.chunk_piece_size() or run.options.chunk_size
        # The closing append must wait until every other append succeeded, so it carries only
        # the last (at most 4 MiB) block: a whole last piece would cross the link alone.
        tail = item.length - ((item.length - 1) // BLOCK) * BLOCK if item.length else 0
        body = item.length - tail
        self.piece_size = piece_size
        self.pieces = [(start, min(piece_size, body - start)) for start in range(0, body, piece_size)] + [(body, tail)]
        self.confirmed: set[int] = set()
        self._lock = threading.Lock()
        self._in_flight: set[futures.Future] = set()

    def send(self) -> Phase:
        """Upload the item; returns COMMITTED. FileProblem when it cannot be sent now."""
        self.run.source_unchanged(self.item)
        while self.phase is not Phase.COMMITTED:
            self._open()
            try:
                self._append_all()
                self.item.content_hash = self.hasher.content_hash()
                self.run.source_unchanged(self.item)
                self._commit_complete()
            except SessionGone:
                self._expired()
        return self.phase

    def _open(self) -> None:
        """NOT_STARTED -> APPENDING: a new session, or the journal's with its confirmed pieces."""
        run, item = self.run, self.item
        self.hasher = run.hashes.hasher_for(item)
        self.confirmed = item.chunk_set() if item.session_id else set()
        self.session_id = item.session_id if self.confirmed else None
        if self.session_id is None:
            self.session_id = run.call("upload", lambda: run.client.session_start(
                b"", concurrent=True, path=item.destination), needed=item.length)
            run.journal.start_session(item, self.session_id, time.time(), 0)
        else:
            run.log.info("Resuming %s: %d of %d chunks are already in Dropbox.", item.destination,
                         len(self.confirmed), len(self.pieces))
        self.phase = Phase.APPENDING

    def _append_all(self) -> None:
        """APPENDING -> COMPLETE: every piece not yet confirmed, the closing one last."""
        run, item = self.run, self.item
        last = len(self.pieces) - 1
        with open(item.source, "rb") as handle:
            for index, (start, size) in enumerate(self.pieces):
                # Hashed while the pieces before it are on the wire; in order, as the item's
                # content hash needs.
                request_hash = hash_pass(run, self.hasher, handle, item, start, size)
                if index in self.confirmed:
                    run.advance(size, sent=False)
                elif index == last:
                    self._wait_until(0)  # the closing append must come after all the others succeeded
                    self._send_piece(self.session_id, index, True, request_hash)
                else:
                    self._wait_until(self.run.options.appends_per_file - 1)
                    self._in_flight.add(self.appends.submit(self._send_piece, self.session_id, index, False,
                                                            request_hash))
            self._wait_until(0)
        if len(self.confirmed) != len(self.pieces):
            raise FileProblem("not every chunk reached Dropbox", paths=[item.source])
        self.phase = Phase.COMPLETE

    def _wait_until(self, at_most: int) -> None:
        """Wait until at most `at_most` appends are in flight. A failed append's error is raised
        here."""
        while len(self._in_flight) > at_most:
            finished, self._in_flight = wait_futures(self._in_flight, futures.FIRST_COMPLETED)
            for future in finished:
                future.result()

    def _send_piece(self, session_id: str, index: int, close: bool, request_hash: str) -> None:
        run, item = self.run, self.item
        start, size = self.pieces[index]
        data = range_body(item, start, size)
        run.budget.take(STREAM_PIECE)
        try:
            try:
                run.call("upload", lambda: sent_as_hashed(item, start, size, request_hash, lambda: (
                    run.client.session_append(session_id, start, data, close=close, path=item.destination,
                                              content_hash=request_hash))), needed=item.length)
            except IncorrectOffset:
                # A retried append whose first attempt had arrived: Dropbox holds the piece
                # already (the final content-hash check would catch any doubt).
                pass
        finally:
            run.budget.give(STREAM_PIECE)
        run.advance(size)
        with self._lock:
            self.confirmed.add(index)
            run.journal.confirm_chunks(item, set(self.confirmed), self.piece_size)

    def _expired(self) -> None:
        """Back to NOT_STARTED: appends not yet sent are dropped, the pieces counted taken back."""
        for future in self._in_flight:
            future.cancel()
        wait_futures(self._in_flight)
        self._in_flight = set()
        self._say_expired()
        self.run.advance(-sum(self.pieces[i][1] for i in self.confirmed))
        self.phase = Phase.NOT_STARTED
