"""Whether the desktop app has uploaded what was copied, asked through the API.

Arrival is judged by size and Dropbox's content hash, never by existence: a file Dropbox holds
with other bytes (seen on MISMATCH_CHECKS checks in a row, since the app may still be replacing
it) fails its batch, which then deletes nothing. Items the journal calls done are looked up
again on every run: the journal is never taken as proof.
"""

from __future__ import annotations

import concurrent.futures as futures
import os
import time
from typing import Sequence

from . import deletion
from .desktop_batches import Batch
from .desktop_job import DesktopJob, every
from .dropbox_client import NetworkProblem, RateLimited, RemoteFile, RemoteFolder
from .errors import FileProblem
from .journal import Item, Kind, State
from .names import case_key
from .status import result, shutdown
from .transfer import Backoff
from .units import human_duration

# Up to this many files still expected, ask for each file's metadata; beyond, list the folders.
METADATA_LOOKUP_LIMIT = 200
LOOKUP_WORKERS = 8
# A wrong arrival must be seen on this many consecutive checks before it counts as a failure
# (the app may still be replacing it).
MISMATCH_CHECKS = 2

Found = dict[str, "RemoteFile | RemoteFolder"]  # case_key(Dropbox path) -> what Dropbox holds there


class CorruptArrival(FileProblem):
    title = "Dropbox received a different file"


def lookup(client, items: Sequence[Item]) -> Found:
    """What Dropbox holds at these items' paths, by case_key(path). A destination keeps the
    local spelling (NFD on a Mac, as the desktop app uploads it); the client asks Dropbox in
    NFC, the only form its lookups find (dropbox_client.lookup_path), and case_key compares
    NFC on both sides. Raises the client's errors (NetworkProblem, RateLimited, ...)."""
    found: Found = {}
    if len(items) <= METADATA_LOOKUP_LIMIT:
        pool = futures.ThreadPoolExecutor(max_workers=LOOKUP_WORKERS, thread_name_prefix="lookup")
        try:
            asked = [pool.submit(client.metadata, item.destination) for item in items]
            for item, answer in zip(items, asked):
                remote = result(answer)  # sliced: this is the main thread, Ctrl-C must get through
                if remote is not None:
                    found[case_key(item.destination)] = remote
        finally:
            shutdown(pool)
        return found
    folders = deletion.topmost_folders({deletion.parent_folder(item.destination) for item in items})
    for folder in folders:
        for remote in client.list_files(folder).values():
            found[case_key(remote.path_display)] = remote
    return found


def same_content(remote: RemoteFile, content_hash: str | None, length: int | None) -> bool:
    """Dropbox holds `length` bytes (None: a manifest, whose planned length is 0 until it is
    written; its content hash alone decides) with this content hash."""
    if length is not None and remote.size != length:
        return False
    if length == 0:
        return True  # Dropbox may report no hash for an empty file
    return remote.content_hash is not None and remote.content_hash == content_hash


def expected_length(item: Item) -> int | None:
    return None if item.kind == Kind.MANIFEST else item.length


def corrupt_arrival(item: Item, found: RemoteFile | RemoteFolder) -> CorruptArrival:
    if isinstance(found, RemoteFolder):
        what = "a folder"
    elif item.kind != Kind.MANIFEST and found.size != item.length:
        what = f"a file of {found.size:,} bytes instead of {item.length:,}"
    else:
        what = f"a file with content hash {found.content_hash} instead of {item.content_hash}"
    return CorruptArrival(f"Dropbox holds {what} at {item.destination} (checked twice): the upload by the Dropbox "
                          "app is not the file that was copied. The original is kept", paths=[item.source])


def _arrived(item: Item, found: RemoteFile | RemoteFolder | None) -> bool:
    return isinstance(found, RemoteFile) and same_content(found, item.content_hash, expected_length(item))


class DesktopArrivals:
    """Looks up in Dropbox what the app uploaded, for one desktop-app upload."""

    def __init__(self, job: DesktopJob):
        self.job = job
        self.log = job.log

    def lookup_patiently(self, items: Sequence[Item]) -> Found:
        """`lookup`, riding out network trouble for as long as it lasts."""
        if not items:
            return {}
        return self.job.retrier.call("looking up files in Dropbox", lambda: lookup(self.job.client, items))

    def reconcile_done(self, items: Sequence[Item]) -> None:
        """Items the journal calls done, whose originals are still here: Dropbox is asked now.
        Missing ones (deleted on dropbox.com, moved) are copied again; ones Dropbox holds with
        other bytes fail and keep their originals. The journal is never taken as proof."""
        done = [item for item in items if item.state == State.DONE and not item.source_deleted
                and os.path.lexists(item.source)]
        if not done:
            return
        remote = self.lookup_patiently(done)
        missing = []
        for item in done:
            found = remote.get(case_key(item.destination))
            if found is None:
                self.log.warning("NOT IN DROPBOX\t%s: verified earlier, but Dropbox does not hold it now (deleted "
                                 "on dropbox.com or moved); it is copied again.", item.destination)
                missing.append(item)
            elif not _arrived(item, found):
                self.job.fail(item, corrupt_arrival(item, found))
        for item in missing:
            self.job.journal.mark_pending(item)

    # -- waiting for a batch -----------------------------------------------------------------

    def await_batch(self, batch: Batch) -> list[Item]:
        """Check every `sleep_seconds` until each copied item of the batch is in Dropbox with
        its content hash. Returns the items that arrived wrong (then the batch has failed)."""
        waiting = [item for item in batch.items if item.state == State.COPIED]
        if not waiting:
            return []
        started = time.monotonic()
        warned = False
        mismatches: dict[int, int] = {}  # item id -> wrong arrivals seen in a row
        last_count = -1
        backoff = Backoff(self.job.policy)
        hint = " (press Enter to check at once)" if self.job.waiter.interactive else ""
        self.log.info("Batch %d: waiting for the Dropbox app to upload %d item(s); checking every %s%s.",
                      batch.number, len(waiting), every(self.job.options.sleep_seconds), hint)
        while True:
            remote = self._look(waiting, backoff)
            if remote is not None:
                waiting, wrong = self._sort(waiting, remote, mismatches, started)
                if wrong:
                    for item, found in wrong:
                        self.job.fail(item, corrupt_arrival(item, found))
                    return [item for item, _ in wrong]
                if not waiting:
                    return []
                if len(waiting) != last_count:
                    last_count = len(waiting)
                    self._say_progress(batch, waiting)
            elapsed = time.monotonic() - started
            if not warned and elapsed > self.job.options.time_limit_seconds:
                warned = True
                self._say_late(batch, waiting, elapsed, hint)
            if self.job.waiter.sleep(self.job.options.sleep_seconds):
                self.log.info("Checking now (Enter pressed).")

    def _look(self, waiting: Sequence[Item], backoff: Backoff) -> Found | None:
        """One lookup; None on network trouble (the status says so; the wait goes on)."""
        try:
            remote = lookup(self.job.client, waiting)
        except (NetworkProblem, RateLimited) as exc:
            self.job.status.network_trouble(exc.message, backoff.failed(), backoff.failures)
            return None
        self.job.status.network_ok()
        backoff.succeeded()
        return remote

    def _sort(self, waiting: Sequence[Item], remote: Found, mismatches: dict[int, int], started: float
              ) -> tuple[list[Item], list[tuple[Item, RemoteFile | RemoteFolder]]]:
        """Record the arrived items as done. Returns (items still expected, items that arrived
        wrong on MISMATCH_CHECKS checks in a row with what Dropbox holds)."""
        arrived, wrong = [], []
        for item in waiting:
            found = remote.get(case_key(item.destination))
            if found is None:
                mismatches.pop(item.id, None)
            elif _arrived(item, found):
                item.remote_rev, item.remote_path, item.hash_local = found.rev, found.path_display, 1
                arrived.append(item)
            else:
                mismatches[item.id] = mismatches.get(item.id, 0) + 1
                if mismatches[item.id] >= MISMATCH_CHECKS:
                    wrong.append((item, found))
        if arrived:
            self.job.journal.mark_done(arrived)
            for item in arrived:
                self.job.summary.items_verified += 1
                self.job.line("VERIFIED", item, time.monotonic() - self.job.copied_at.get(item.id, started))
        return [item for item in waiting if item.state != State.DONE], wrong

    def _say_progress(self, batch: Batch, waiting: Sequence[Item]) -> None:
        self.log.info("Batch %d: %d of %d item(s) verified in Dropbox; %d still expected.", batch.number,
                      len(batch.items) - len(waiting) - sum(i.state == State.FAILED for i in batch.items),
                      len(batch.items), len(waiting))

    def _say_late(self, batch: Batch, waiting: Sequence[Item], elapsed: float, hint: str) -> None:
        self.log.warning(
            "Batch %d is not in Dropbox after %s (batchTimeLimit_hour): please check the Dropbox app - is it "
            "running, signed in, not paused, and is its disk not full? %d item(s) still expected, e.g. %s. "
            "Still waiting; nothing is deleted before the batch is verified%s.", batch.number,
            human_duration(elapsed), len(waiting), waiting[0].destination, hint)
