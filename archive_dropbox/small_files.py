"""Small files of the API upload, sent together: for each request, start_batch opens a session
for each of its files, one append_batch carries all their bytes and closes the sessions, and
their commits join the commit queue like any closed session. Each file then costs Dropbox a
thousandth of a commit and this job a few hundredths of a request, instead of a round trip of
its own.

append_batch carries every entry (session id, length, close) in its Dropbox-API-Arg HTTP
header, for which Dropbox documents no limit while front ends refuse large headers: a request
of 500 entries (72 KB) was refused with HTTP 431, and retried as a network problem it stalled
the run (issue 18). So requests are sized by the bytes of that header (HEADER_CAP), sessions are
opened only for the files of the next request, and the run learns what the way to Dropbox
accepts (AppendBatchLimit): a refusal costs one request per run, after which requests keep to a
size that was accepted, or the files go one at a time."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .commit_queue import CommitQueue
from .content_hash import bytes_content_hash
from .dropbox_client import IncorrectOffset, RequestRefused, append_batch_arg_bytes
from .errors import ArchiveError, AuthError, FileProblem
from .journal import Item, Kind, State
from .localfs import read_into
from .status import SLICE
from .upload_run import Asked, UploadRun, became_shorter
from .upload_sessions import BLOCK

APPEND_BATCH_LIMIT = 500  # append_batch takes at most 500 entries

# Dropbox documents no limit on request headers. Front ends commonly refuse more than 8 KiB:
# nginx's default large_client_header_buffers is "4 8k" (one header line must fit in 8 KiB, or
# the request is refused), Apache's LimitRequestFieldSize is 8190 bytes. The unknown limit is
# taken on the conservative side: the whole header section within 8 KiB, 2 KiB of it left for
# the request line and the other headers (Authorization, Host, User-Agent, ...).
HEADER_LIMIT = 8 * 1024
HEADER_CAP = HEADER_LIMIT - 2 * 1024  # bytes of one append_batch's Dropbox-API-Arg value
SESSION_ID_BOUND = 128  # characters reckoned per session id until start_batch shows some (67 measured)

# The header, entry by entry, from the SDK's own encoding of an empty request and of one and
# two entries with empty session ids and length 0 (every request carries a 64-digit hash).
_HASH = "0" * 64
_EMPTY = append_batch_arg_bytes([], [], _HASH)
_FIRST = append_batch_arg_bytes([""], [0], _HASH) - _EMPTY
_NEXT = append_batch_arg_bytes(["", ""], [0, 0], _HASH) - _EMPTY - _FIRST  # with its comma


def arg_bytes(count: int, digits: int, id_bytes: int) -> int:
    """Bytes of the Dropbox-API-Arg header of an append_batch with `count` entries whose lengths
    have `digits` decimal digits in all, with session ids of `id_bytes` characters once JSON-
    encoded: exact when every id has that length, more when some are shorter."""
    if not count:
        return _EMPTY
    return _EMPTY + _FIRST + (count - 1) * _NEXT + count * id_bytes + digits - count


def encoded_length(session_id: str) -> int:
    """Characters of a session id in the header (JSON string, ASCII escapes, no quotes)."""
    return len(json.dumps(session_id)) - 2


@dataclass
class Slot:
    """What one request may be: at most `header_bytes` of header; `probe`: it may be larger
    than any request accepted so far (one such request is in flight at a time)."""

    header_bytes: int
    probe: bool


class AppendBatchLimit:
    """What this run learnt about append_batch requests, shared by every small-file worker
    (thread-safe). Sizes are bytes of the Dropbox-API-Arg header value.

    A request larger than any accepted so far is a probe, and only one probe is in flight at a
    time: the run's first request goes alone, and a larger one waits for the probe before it
    (or is the next). So whatever the server's limit, one refused request teaches the run:
    `cap` falls to the largest size accepted, or, when none was, append_batch is `off` and the
    small files go one by one for the rest of the run. Each of the two is said once in the log."""

    def __init__(self, log, cap: int = HEADER_CAP):
        self.log = log
        self.cap = cap
        self.largest_accepted = 0
        self.off = False
        self.refusals = 0
        self.id_bytes = SESSION_ID_BOUND  # the longest session id seen, once one is
        self._ids_seen = False
        self._probing = False
        self._cond = threading.Condition()

    def reserve(self, wanted: int, stop: Callable[[], bool]) -> Slot | None:
        """A slot for a request of `wanted` header bytes (give it back with accepted, refused
        or release): up to the largest size accepted when it fits there or the cap fell to it,
        else a probe up to the cap, once no other probe is in flight. None when append_batch is
        off or `stop()` is true."""
        with self._cond:
            while not (self.off or stop()):
                if wanted <= self.largest_accepted or self.cap <= self.largest_accepted:
                    return Slot(self.largest_accepted, probe=False)
                if not self._probing:
                    self._probing = True
                    return Slot(self.cap, probe=True)
                self._cond.wait(SLICE)
            return None

    def release(self, slot: Slot) -> None:
        """The request ended otherwise (not sent, failed for another reason); idempotent."""
        with self._cond:
            self._release(slot)

    def _release(self, slot: Slot) -> None:
        if slot.probe:
            slot.probe = False
            self._probing = False
            self._cond.notify_all()

    def accepted(self, slot: Slot, header_bytes: int) -> None:
        with self._cond:
            self.largest_accepted = max(self.largest_accepted, header_bytes)
            self._release(slot)

    def refused(self, slot: Slot, header_bytes: int, refusal: RequestRefused, files: int) -> None:
        """The request (`header_bytes`, 0 if refused before its header was made) was refused."""
        with self._cond:
            self.refusals += 1
            self._release(slot)
            if self.off:
                return
            shrink = 0 < self.largest_accepted < header_bytes
            if shrink:
                self.cap = self.largest_accepted
            else:
                self.off = True
        if shrink:
            self.log.info("Dropbox refused a request carrying %d small files together (%s; its header held %d "
                          "bytes). For the rest of this run small files travel in smaller groups, with headers of "
                          "at most %d bytes as Dropbox accepted before.", files, refusal.message, header_bytes,
                          self.cap)
        else:
            self.log.warning("Dropbox refused a request carrying %d small files together (%s). For the rest of "
                             "this run small files are sent one by one, which takes more requests; nothing is "
                             "lost.", files, refusal.message)

    def saw_session_ids(self, session_ids: Sequence[str]) -> None:
        if not session_ids:
            return
        longest = max(encoded_length(session_id) for session_id in session_ids)
        with self._cond:
            self.id_bytes = max(self.id_bytes, longest) if self._ids_seen else longest
            self._ids_seen = True

    def fitting(self, lengths: Sequence[int], header_bytes: int) -> tuple[int, int]:
        """How many of the first `lengths` (bytes of files) one request holds within
        `header_bytes`, reckoned with the longest session id seen (at most APPEND_BATCH_LIMIT),
        and that request's header bytes so reckoned."""
        count = digits = 0
        id_bytes = self.id_bytes
        for length in lengths[:APPEND_BATCH_LIMIT]:
            more = len(str(length))
            if arg_bytes(count + 1, digits + more, id_bytes) > header_bytes:
                break
            count += 1
            digits += more
        return count, arg_bytes(count, digits, id_bytes)


class SmallFileGroups:
    """Cuts the run's small files into groups of at most `group_bytes` bytes, APPEND_BATCH_LIMIT
    files and one request's header at the run's current cap (`limit`; without one, HEADER_CAP
    and SESSION_ID_BOUND), as they come."""

    def __init__(self, group_bytes: int, limit: AppendBatchLimit | None = None):
        self.group_bytes = group_bytes
        self.file_limit = min(BLOCK, group_bytes)  # bytes: larger files are not grouped
        self.limit = limit
        self._items: list[Item] = []
        self._bytes = 0
        self._digits = 0  # decimal digits of the lengths of the files in the group

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
        if self._items and not self._fits(item):
            full, self._items, self._bytes, self._digits = self._items, [], 0, 0
        self._items.append(item)
        self._bytes += item.length
        self._digits += len(str(item.length))
        return full

    def _fits(self, item: Item) -> bool:
        if self._bytes + item.length > self.group_bytes or len(self._items) >= APPEND_BATCH_LIMIT:
            return False
        cap, id_bytes = (HEADER_CAP, SESSION_ID_BOUND) if self.limit is None else (self.limit.cap,
                                                                                  self.limit.id_bytes)
        return arg_bytes(len(self._items) + 1, self._digits + len(str(item.length)), id_bytes) <= cap

    def rest(self) -> list[Item]:
        """The last group (possibly empty)."""
        rest, self._items, self._bytes, self._digits = self._items, [], 0, 0
        return rest


class SmallFileSender:
    """Sends one group at a time (thread-safe: groups share the run, the queue and the limit)."""

    def __init__(self, run: UploadRun, commits: CommitQueue, send_alone: Callable[[list[Item]], None]):
        """`send_alone([item])`: how a file goes that could not travel with its group."""
        self._run = run
        self._commits = commits
        self._send_alone = send_alone
        self.limit = AppendBatchLimit(run.log)

    def send(self, group: list[Item]) -> None:
        """Files already in Dropbox are recorded, unreadable ones failed, the others sent in
        requests of two calls each (start_batch, append_batch) and queued for their commit; a
        file no request could take goes alone."""
        if self.limit.off:
            for item in group:
                self._send_alone([item])
            return
        run = self._run
        paid = sum(item.length for item in group)
        # The files are read into one buffer, and each request's bytes copied once from it into
        # the bytes the SDK wants: at most twice the group's bytes, and no small buffers left to
        # fragment the heap.
        run.budget.take(2 * paid)
        alone: list[Item] = []
        try:
            started = time.monotonic()
            buffer = bytearray(paid)
            ready, _ = self._read(group, memoryview(buffer))
            if ready:
                alone = self._send_requests(ready, buffer, started)
            del buffer  # sent: let it go before the budget is given back
        finally:
            run.budget.give(2 * paid)
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

    def _send_requests(self, ready: list[Item], buffer: bytearray, started: float) -> list[Item]:
        """Send `ready` (their bytes one after another in `buffer`) in requests sized by the
        run's limit; returns the items to send alone. Sessions opened for a request that was
        refused serve the next one."""
        run = self._run
        alone: list[Item] = []
        spare: list[str] = []  # sessions opened and not used yet
        done = start = 0
        while done < len(ready):
            _, wanted = self.limit.fitting([item.length for item in ready[done:done + APPEND_BATCH_LIMIT]],
                                           self.limit.cap)
            slot = self.limit.reserve(wanted, run.jobs.stopping)
            if slot is None:
                if not run.jobs.stopping():
                    alone.extend(ready[done:])
                break
            try:
                taken, left_out = self._request(ready[done:], buffer, start, slot, spare, started)
            finally:
                self.limit.release(slot)
            alone.extend(left_out)
            start += sum(item.length for item in ready[done:done + taken])
            done += taken
        return alone

    def _request(self, items: list[Item], buffer: bytearray, start: int, slot: Slot, spare: list[str],
                 started: float) -> tuple[int, list[Item]]:
        """One request for as many of `items` (their bytes in `buffer` from `start`) as `slot`
        allows; returns how many it dealt with (0: refused, try again) and those to send alone."""
        run, limit = self._run, self.limit
        lengths = [item.length for item in items]
        count, _ = limit.fitting(lengths, slot.header_bytes)
        header = 0
        try:
            if len(spare) < count:
                opened = run.call("upload", lambda: run.client.session_start_batch(count - len(spare)))
                limit.saw_session_ids(opened)
                spare.extend(opened)
            # A session id longer than reckoned leaves its session for the next request.
            while count and append_batch_arg_bytes(spare[:count], lengths[:count], _HASH) > slot.header_bytes:
                count -= 1
            if not count:
                return 1, items[:1]  # one entry over the cap: nothing smaller to send
            header = append_batch_arg_bytes(spare[:count], lengths[:count], _HASH)
            session_ids = spare[:count]
            end = start + sum(lengths[:count])
            with memoryview(buffer) as whole, whole[start:end] as part:
                body = bytes(part)
            pieces = [(sid, item.length, item.destination) for sid, item in zip(session_ids, items)]
            outcomes: list[ArchiveError | None] = run.call(
                "upload", lambda: run.client.append_batch(pieces, body, bytes_content_hash(body)), needed=len(body))
        except RequestRefused as exc:
            limit.refused(slot, header, exc, count)
            return 0, []
        except FileProblem as exc:
            run.log.warning("Sending %d small files together failed (%s); they are sent one by one.",
                            count, exc.message)
            del spare[:count]
            return count, items[:count]
        except AuthError as exc:
            run.jobs.fail(exc)
            return len(items), []
        del spare[:count]
        limit.accepted(slot, header)
        return count, self._arrived(items[:count], session_ids, outcomes, started)

    def _arrived(self, items: list[Item], session_ids: list[str], outcomes: list[ArchiveError | None],
                 started: float) -> list[Item]:
        """Record the sessions that arrived and queue their commits; returns the items to send alone."""
        run = self._run
        arrived: list[tuple[Item, str]] = []
        alone: list[Item] = []
        for item, session_id, outcome in zip(items, session_ids, outcomes):
            # A retried request whose first attempt got through finds the session full.
            if outcome is None or (isinstance(outcome, IncorrectOffset) and outcome.correct_offset == item.length):
                arrived.append((item, session_id))
            else:
                run.log.debug("%s: %s; sent on its own instead", item.destination, outcome.message)
                alone.append(item)
        run.journal.record_closed_sessions(arrived, time.time())
        for item, session_id in arrived:
            run.advance(item.length)
            self._commits.add(item, run.commit_request(item, session_id, item.length), started)
        return alone
