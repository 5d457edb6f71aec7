"""Small files of the API upload, sent together: start_batch opens a session for each file of a
group, one append_batch carries all their bytes and closes the sessions, and their commits join
the commit queue like any closed session. Each file then costs Dropbox a thousandth of a commit
and this job two thousandths of a request, instead of a round trip of its own."""

from __future__ import annotations

import time
from typing import Callable

from .commit_queue import CommitQueue
from .content_hash import bytes_content_hash
from .dropbox_client import IncorrectOffset
from .errors import ArchiveError, AuthError, FileProblem
from .journal import Item, Kind, State
from .localfs import read_into
from .upload_run import Asked, UploadRun, became_shorter
from .upload_sessions import BLOCK

APPEND_BATCH_LIMIT = 500  # append_batch takes at most 500 entries


class SmallFileGroups:
    """Cuts the run's small files into groups of at most `group_bytes` bytes and
    APPEND_BATCH_LIMIT files, as they come."""

    def __init__(self, group_bytes: int):
        self.group_bytes = group_bytes
        self.file_limit = min(BLOCK, group_bytes)  # bytes: larger files are not grouped
        self._items: list[Item] = []
        self._bytes = 0

    def groupable(self, source_items: list[Item]) -> bool:
        """A small whole file never sent before: it can share requests with others."""
        if len(source_items) != 1:
            return False
        item = source_items[0]
        return (item.kind == Kind.FILE and item.state != State.DONE and not item.session_id
                and item.length <= self.file_limit)

    def add(self, item: Item) -> list[Item] | None:
        """Add one file; returns the group it closed, if it did not fit in it."""
        full = None
        if self._items and (self._bytes + item.length > self.group_bytes or len(self._items) >= APPEND_BATCH_LIMIT):
            full, self._items, self._bytes = self._items, [], 0
        self._items.append(item)
        self._bytes += item.length
        return full

    def rest(self) -> list[Item]:
        """The last group (possibly empty)."""
        rest, self._items, self._bytes = self._items, [], 0
        return rest


class SmallFileSender:
    """Sends one group at a time (thread-safe: groups share nothing but the run and the queue)."""

    def __init__(self, run: UploadRun, commits: CommitQueue, send_alone: Callable[[list[Item]], None]):
        """`send_alone([item])`: how a file goes that could not travel with its group."""
        self._run = run
        self._commits = commits
        self._send_alone = send_alone

    def send(self, group: list[Item]) -> None:
        """Files already in Dropbox are recorded, unreadable ones failed, the others sent in two
        requests and queued for their commit; a file the group could not take goes alone."""
        run = self._run
        paid = sum(item.length for item in group)
        # The files are read into one buffer, then copied once into the bytes the SDK wants:
        # twice the bytes for a moment, and no small buffers left to fragment the heap.
        run.budget.take(2 * paid)
        unpaid = 2 * paid
        alone: list[Item] = []
        try:
            started = time.monotonic()
            buffer = bytearray(paid)
            ready, filled = self._read(group, memoryview(buffer))
            if not ready:
                return
            body = bytes(memoryview(buffer)[:filled])
            del buffer
            run.budget.give(paid)
            unpaid -= paid
            arrived, alone = self._send_body(ready, body)
            del body  # sent: let it go before the commits are queued
            run.journal.record_closed_sessions(arrived, time.time())
            for item, session_id in arrived:
                run.advance(item.length)
                self._commits.add(item, run.commit_request(item, session_id, item.length), started)
        finally:
            run.budget.give(unpaid)
        for item in alone:
            self._send_alone([item])

    def _read(self, group: list[Item], view: memoryview) -> tuple[list[Item], int]:
        """Read the files not yet in Dropbox one after another into `view`; returns those read
        and the bytes filled."""
        run = self._run
        ready: list[Item] = []
        filled = 0
        with view:
            for item in group:
                if run.jobs.stopping():
                    return [], 0
                with view[filled:filled + item.length] as piece:
                    try:
                        if run.already_in_dropbox(item, Asked.BEFORE_SENDING):
                            continue
                        run.source_unchanged(item)
                        with open(item.source, "rb", buffering=0) as handle:
                            handle.seek(item.part_offset)
                            got = read_into(handle, piece)
                        if got != item.length:
                            raise became_shorter(item)
                    except FileProblem as exc:
                        run.fail(item, exc)
                        continue
                    except OSError as exc:
                        run.fail(item, FileProblem(f"cannot read the file ({exc.strerror})", paths=[item.source]))
                        continue
                    item.content_hash = bytes_content_hash(piece)
                ready.append(item)
                filled += item.length
        return ready, filled

    def _send_body(self, ready: list[Item], body: bytes) -> tuple[list[tuple[Item, str]], list[Item]]:
        """start_batch, then one append_batch closing every session; returns (item, session id)
        of those that arrived and the items to send alone."""
        run = self._run
        body_hash = bytes_content_hash(body)
        try:
            session_ids = run.call("upload", lambda: run.client.session_start_batch(len(ready)))
            pieces = [(sid, item.length, item.destination) for sid, item in zip(session_ids, ready)]
            outcomes: list[ArchiveError | None] = run.call(
                "upload", lambda: run.client.append_batch(pieces, body, body_hash), needed=len(body))
        except FileProblem as exc:
            run.log.warning("Sending %d small files together failed (%s); they are sent one by one.",
                            len(ready), exc.message)
            session_ids, outcomes = [""] * len(ready), [exc] * len(ready)
        except AuthError as exc:
            run.jobs.fail(exc)
            return [], []
        arrived: list[tuple[Item, str]] = []
        alone: list[Item] = []
        for item, session_id, outcome in zip(ready, session_ids, outcomes):
            # A retried request whose first attempt got through finds the session full.
            if outcome is None or (isinstance(outcome, IncorrectOffset) and outcome.correct_offset == item.length):
                arrived.append((item, session_id))
            else:
                run.log.debug("%s: %s; sent on its own instead", item.destination, outcome.message)
                alone.append(item)
        return arrived, alone
