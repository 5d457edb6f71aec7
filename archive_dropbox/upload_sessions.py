"""One item through one Dropbox upload session, resumable across runs.

- `SequentialSession`: chunks in order; the cursor's offset is journaled after every chunk, so
  a rerun continues a 300 GB file where it stopped; the next chunk is read while the current
  one is on the wire. An item of one chunk goes up in a closed session and its commit waits in
  the commit queue.
- `ConcurrentSession`: a large item cut into pieces (multiples of 4 MiB) of which several are
  appended at once, each on its own connection; the confirmed pieces are journaled, and the
  closing append goes last, as Dropbox requires.

Both walk the phases of `Phase`; a session Dropbox no longer knows (expired, or consumed by a
commit whose answer was lost) is either found committed or started again.
"""

from __future__ import annotations

import concurrent.futures as futures
import threading
import time
from enum import Enum

from .commit_queue import CommitQueue
from .content_hash import ContentHasher
from .dropbox_client import IncorrectOffset, SessionClosed, SessionGone
from .errors import FileProblem
from .journal import Item, Kind
from .status import result, wait_futures
from .units import MIB, human_bytes
from .upload_memory import ByteBudget, read_at
from .upload_run import Asked, UploadRun, became_shorter

BLOCK = 4 * MIB  # concurrent-session appends are multiples of this, except the closing one
MIN_APPEND = 16 * MIB  # at 20 MiB/s per connection, 50 ms of latency costs 6 % of such an append


class Phase(Enum):
    """Where one item's upload session stands."""

    NOT_STARTED = "no upload session: the next request starts one"
    APPENDING = "a session is open; Dropbox holds its confirmed offset (or pieces)"
    COMPLETE = "Dropbox holds every byte in the session; only the commit is missing"
    QUEUED = "closed with every byte in it; the commit waits in the commit queue"
    COMMITTED = "committed, verified and recorded done"


def append_size(budget: ByteBudget, chunk_size: int, workers: int, appends_per_file: int) -> int:
    """Bytes per append of a new concurrent session. Memory, not the link, limits how many
    appends are in flight: pieces small enough that every file in flight can keep all its
    connections busy within the budget, but not so small that request latency starts to count."""
    per_append = budget.capacity // max(1, workers * appends_per_file)
    return max(min(MIN_APPEND, chunk_size), min(chunk_size, per_append // BLOCK * BLOCK))


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


class ChunkReader:
    """An item's chunks in order, each paid from the byte budget (the caller refunds it once
    sent); the next chunk is read on another thread meanwhile when the budget has room for it
    without waiting."""

    def __init__(self, run: UploadRun, pool: futures.Executor, handle, item: Item, chunk: int):
        self._budget, self._pool, self._handle = run.budget, pool, handle
        self._item, self._chunk = item, chunk
        self._ahead: tuple[int, futures.Future] | None = None

    def _read(self, position: int, paid: bool) -> bytes:
        size = min(self._chunk, self._item.length - position)
        if not paid:
            self._budget.take(size)
        return read_at(self._handle, self._item.part_offset + position, size)

    def read(self, position: int) -> bytes:
        """The chunk at byte `position` of the item (short only if the file shrank)."""
        if self._ahead is not None and self._ahead[0] == position:
            data = result(self._ahead[1])
        else:
            self.close()  # an offset jump made the read-ahead useless
            data = self._read(position, paid=False)
        self._ahead = None
        following = position + len(data)
        if following < self._item.length and self._budget.take(min(self._chunk, self._item.length - following),
                                                                wait=False):
            self._ahead = (following, self._pool.submit(self._read, following, True))
        return data

    def close(self) -> None:
        """Refund a chunk read ahead and not used."""
        if self._ahead is not None:
            self._budget.give(len(result(self._ahead[1])))
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
        budget = self.run.budget
        with open(self.item.source, "rb") as handle:
            reader = ChunkReader(self.run, self.readahead, handle, self.item, self.chunk)
            try:
                while self.phase in (Phase.NOT_STARTED, Phase.APPENDING, Phase.COMPLETE):
                    if self.phase is Phase.COMPLETE:
                        self._commit_complete()
                        continue
                    data = reader.read(self.offset)
                    try:
                        self._send_chunk(data)
                    finally:
                        # Let go of the chunk before refunding it, or the next read-ahead could
                        # fill memory while this chunk still lingers.
                        held, data = len(data), None
                        budget.give(held)
            finally:
                reader.close()

    def _send_chunk(self, data: bytes) -> None:
        item = self.item
        last = self.offset + len(data) >= item.length
        if len(data) != min(self.chunk, item.length - self.offset):
            raise became_shorter(item)
        # Hashed before sending: the request carries its own content hash, so Dropbox checks it
        # and the SDK need not hash the bytes a second time.
        self.hasher.mark()
        self.hasher.update(data)
        request_hash = self.hasher.since_mark()
        try:
            if self.phase is Phase.NOT_STARTED:
                self._start(data, last, request_hash)
            elif last:
                self._finish(data, request_hash)
            else:
                self._append(data, request_hash)
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

    def _start(self, data: bytes, last: bool, request_hash: str | None) -> None:
        """NOT_STARTED -> APPENDING, or QUEUED when the first chunk is the whole item."""
        run, item = self.run, self.item
        session_id = run.call("upload", lambda: run.client.session_start(
            data, close=last and item.length <= self.chunk, path=item.destination, content_hash=request_hash),
            needed=item.length)
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

    def _append(self, data: bytes, request_hash: str | None) -> None:
        run, item = self.run, self.item
        session_id, offset = self.session_id, self.offset
        run.call("upload", lambda: run.client.session_append(session_id, offset, data, path=item.destination,
                                                             content_hash=request_hash), needed=item.length)
        run.advance(len(data))
        self.offset += len(data)
        run.journal.confirm_offset(item, self.offset)

    def _finish(self, data: bytes, request_hash: str | None) -> None:
        """APPENDING -> COMMITTED with the last chunk."""
        run, item = self.run, self.item
        item.content_hash = self.hasher.content_hash()
        request = run.commit_request(item, self.session_id, self.offset)
        run.source_unchanged(item)
        try:
            remote = run.call("upload", lambda: run.client.session_finish(request, data, content_hash=request_hash),
                              needed=item.length)
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
    COMPLETE -> (finish without data) COMMITTED. Pieces are read and hashed in order here and
    appended on the `appends` pool, at most `appends_per_file` at once. A session from an
    earlier run keeps the pieces it was cut into and sends only those not confirmed."""

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
        self._queued_bytes: dict[futures.Future, int] = {}

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
                run.budget.take(size)
                data = read_at(handle, item.part_offset + start, size)
                if len(data) != size:
                    run.budget.give(size)
                    raise became_shorter(item)
                self.hasher.mark()
                self.hasher.update(data)
                request_hash = self.hasher.since_mark()
                if index in self.confirmed:
                    run.budget.give(size)
                    run.advance(size, sent=False)
                elif index == last:
                    self._wait_until(0, paid=size)  # the closing append must come after all the others succeeded
                    self._send_piece(self.session_id, index, [data], True, request_hash)
                else:
                    self._wait_until(self.run.options.appends_per_file - 1, paid=size)
                    future = self.appends.submit(self._send_piece, self.session_id, index, [data], False,
                                                 request_hash)
                    self._in_flight.add(future)
                    self._queued_bytes[future] = size
                data = None  # the sender owns it now; do not keep it alive past its refund
            self._wait_until(0)
        if len(self.confirmed) != len(self.pieces):
            raise FileProblem("not every chunk reached Dropbox", paths=[item.source])
        self.phase = Phase.COMPLETE

    def _wait_until(self, at_most: int, paid: int = 0) -> None:
        """Wait until at most `at_most` appends are in flight. A failed append's error is raised
        here, after refunding `paid` (the bytes of a piece read and not handed to a sender)."""
        try:
            while len(self._in_flight) > at_most:
                finished, self._in_flight = wait_futures(self._in_flight, futures.FIRST_COMPLETED)
                for future in finished:
                    future.result()
        except BaseException:
            self.run.budget.give(paid)
            raise

    def _send_piece(self, session_id: str, index: int, box: list[bytes], close: bool,
                    request_hash: str | None) -> None:
        # The piece comes in a box the sender empties, so that nothing (not even the executor's
        # copy of the arguments) keeps it alive once it is refunded.
        run, item = self.run, self.item
        data = box.pop()
        try:
            try:
                run.call("upload", lambda: run.client.session_append(
                    session_id, self.pieces[index][0], data, close=close, path=item.destination,
                    content_hash=request_hash), needed=item.length)
            except IncorrectOffset:
                # A retried append whose first attempt had arrived: Dropbox holds the piece
                # already (the final content-hash check would catch any doubt).
                pass
            run.advance(len(data))
            with self._lock:
                self.confirmed.add(index)
                run.journal.confirm_chunks(item, set(self.confirmed), self.piece_size)
        finally:
            held, data = len(data), None
            run.budget.give(held)

    def _expired(self) -> None:
        """Back to NOT_STARTED: appends not yet sent are dropped, the pieces counted taken back."""
        for future in self._in_flight:
            if future.cancel():  # never sent, so never refunded by its sender
                self.run.budget.give(self._queued_bytes[future])
        wait_futures(self._in_flight)
        self._in_flight, self._queued_bytes = set(), {}
        self._say_expired()
        self.run.advance(-sum(self.pieces[i][1] for i in self.confirmed))
        self.phase = Phase.NOT_STARTED
