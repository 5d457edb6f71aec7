"""The commit queue of the API upload: closed upload sessions wait here and are committed up to
a thousand at a time with finish_batch_v2, with only one batch being committed per account at
a time (Dropbox serialises commits per namespace and answers too_many_write_operations to
overlapping ones). Shape learnt from rclone's lib/batcher."""

from __future__ import annotations

import threading
import time
from typing import Callable, NamedTuple

from .dropbox_client import CommitRequest, InsufficientSpace, NetworkProblem, RateLimited, RemoteFile, SessionGone
from .errors import ArchiveError, FileProblem
from .journal import Item
from .status import locked, nap
from .upload_run import Asked, UploadRun

BATCH_LIMIT = 1000  # finish_batch_v2 takes at most 1000 entries
ENTRY_ATTEMPTS = 20  # a batch entry refused for a rate limit or network trouble is tried this often


class Waiting(NamedTuple):
    item: Item
    request: CommitRequest
    started: float  # time.monotonic() when the item's upload began, for its result line


class CommitQueue:
    """Closed sessions waiting for their commit. `add` commits whole batches as they fill,
    `flush` the rest; a thread that finds another committing waits for it (`committing`)."""

    def __init__(self, run: UploadRun, resend: Callable[[Item], None]):
        """`resend(item)`: send an item again whose session Dropbox no longer knows (it may
        raise FileProblem, recorded as the item's failure)."""
        self._run = run
        self._resend = resend
        # Held while a batch is being committed; re-entrant, because a lost session sent again
        # from inside a commit queues its own commit (and may fill a batch).
        self.committing = threading.RLock()
        self._waiting: list[Waiting] = []
        self._waiting_lock = threading.Lock()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def add(self, item: Item, request: CommitRequest, started: float) -> None:
        """Queue one closed session holding all of `item`; a full batch is committed now."""
        with self._waiting_lock:
            self._waiting.append(Waiting(item, request, started))
            full = len(self._waiting) >= BATCH_LIMIT
        if full:
            self.flush(only_full=True)

    def flush(self, only_full: bool = False) -> None:
        """Commit what waits; with `only_full`, only whole batches of 1000, so that commits
        stay few while other threads keep adding (the last, partial batch comes at the end)."""
        with locked(self.committing):
            while True:
                with self._waiting_lock:
                    if only_full and len(self._waiting) < BATCH_LIMIT:
                        return
                    batch = self._waiting[:BATCH_LIMIT]
                    del self._waiting[:BATCH_LIMIT]
                if not batch:
                    return
                self._commit(batch)

    def _commit(self, batch: list[Waiting]) -> None:
        """One batch, its refused entries tried again: rate limits and network trouble up to
        ENTRY_ATTEMPTS times, a full Dropbox after one pause for all of them."""
        run = self._run
        needed = sum(entry.item.length for entry in batch)
        attempts = 0
        while batch:
            attempts += 1
            requests = [entry.request for entry in batch]
            outcomes = run.call("batch commit", lambda: run.client.finish_batch(requests), needed=needed)
            again, refused_for_space = self._settle(batch, outcomes, attempts)
            if refused_for_space:
                # One pause for what these commits need, not one per file.
                run.pauses.wait_for_dropbox_space(refused_for_space, "Dropbox is full")
            if again:
                nap(min(2.0 * attempts, 30), run.jobs.stopping)
            batch = again

    def _settle(self, batch: list[Waiting], outcomes: list, attempts: int) -> tuple[list[Waiting], int]:
        """Record each entry's outcome; returns the entries to try again and the bytes of those
        Dropbox had no room for."""
        run = self._run
        done: list[Item] = []
        again: list[Waiting] = []
        refused_for_space = 0
        for entry, outcome in zip(batch, outcomes):
            item = entry.item
            if isinstance(outcome, RemoteFile):
                try:
                    run.verify(item, outcome)
                    run.unchanged_after_commit(item, outcome)
                except FileProblem as exc:
                    run.fail(item, exc)
                    continue
                done.append(item)
                run.log_result(item, "UPLOADED", time.monotonic() - entry.started)
            elif isinstance(outcome, (RateLimited, NetworkProblem)) and attempts < ENTRY_ATTEMPTS:
                again.append(entry)
            elif isinstance(outcome, InsufficientSpace):
                refused_for_space += item.length
                again.append(entry)
            elif isinstance(outcome, SessionGone):
                self._lost_session(item, entry.started)
            else:
                run.fail(item, outcome if isinstance(outcome, ArchiveError) else
                         FileProblem(str(outcome), paths=[item.source]))
        if done:
            run.journal.mark_done(done)
            run.summary.items_uploaded += len(done)
        return again, refused_for_space

    def _lost_session(self, item: Item, started: float) -> None:
        """A journaled session Dropbox no longer knows: either its commit went through before a
        crash (the file is there, identical) or it expired; in that case send the file again."""
        run = self._run
        if run.already_in_dropbox(item, Asked.SESSION_LOST, started=started, local=item.content_hash):
            return
        run.journal.forget_session(item)
        run.advance(-item.length)
        try:
            self._resend(item)
        except FileProblem as exc:
            run.fail(item, exc)
