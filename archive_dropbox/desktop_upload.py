"""Stage 2 through the Dropbox desktop app: copy the planned files into the local Dropbox
folder one batch at a time, let the app upload them, confirm through the API that every file
arrived intact (same size and content hash), and only then delete the originals that were
asked to go and start the next batch.

Why it is built this way:
- Each file is written under a `.~` name (the app never syncs those), flushed to disk, and
  renamed when complete, so the app never uploads half a file; the content hash is computed
  from the same bytes while they are copied, so every byte is read once (desktop_copy).
- Batch membership is recorded in the journal when an item is first planned, so a rerun
  continues the batch it was on even after verified originals were deleted (desktop_batches).
- Arrival is judged by Dropbox's content hash, never by existence: a corrupted upload keeps its
  original, stops the run and is named (desktop_arrivals). Nothing inside the Dropbox folder is
  ever deleted.
- A verified batch's inventories (inventory_writer) are written through the API before any of
  its originals goes, since the originals are deleted batch by batch: the row inventory of
  every row the batch touches is merged with the one Dropbox holds, so at the end it lists every
  batch. The app then syncs the CSVs down into the Dropbox folder; they are no items of the
  plan, so the lookups and the copy never look at them. A row whose inventory cannot be written
  keeps that batch's originals (a failure of the run).

This module runs the batches in order (space, copy, wait, inventories, delete) and holds app.py's
run for sheetName = 'dropboxUpload_APP'.
"""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path
from typing import Collection, Sequence

import psutil
from tqdm import tqdm

from . import deletion, destinations, prepare
from .cli import RunContext
from .desktop_arrivals import DesktopArrivals
from .desktop_batches import Batch, assign_batches, count_batches
from .desktop_copy import ALREADY_IN_DROPBOX, COPIED, DesktopCopier
from .desktop_folder import DropboxFolder, check_dropbox_dir, row_checker
from .desktop_job import DesktopJob, DesktopOptions, DesktopSummary, every
from .dropbox_client import RemoteFile, RemoteFolder
from .errors import EXIT_OK, EXIT_SOME_FAILED, EnvironmentProblem, FileProblem, SettingsError
from .inventory_writer import done_part, write_upload_inventories
from .job_setup import bind_account, open_client, prepare_rows, settle_interrupted_deletions
from .journal import BatchState, Item, Journal, Kind, State
from .localfs import fsync_folder
from .names import case_key
from .prepare import Plan
from .transfer import Pauses, log_failures
from .units import GB, MIB, human_bytes

# Copy blocks above this gain nothing on any disk and only cost memory (a few are in flight).
MAX_COPY_BLOCK = 128 * MIB
# Estimate for the plan: the desktop app moves about 1.5-2 TB a day (the original README).
APP_BYTES_PER_SECOND = 20e6


class DesktopUploader:
    """Runs the batches in order: space check, copy, wait for Dropbox, inventories, delete originals."""

    def __init__(self, client, journal: Journal, folder: DropboxFolder, plan: Plan, options: DesktopOptions,
                 log: logging.Logger, *, logs_root: Path | None = None):
        """`client`: a DropboxClient; `plan`: Stage 1's plan (which originals may be deleted, what
        the inventories list); `logs_root`: where the inventories are written before they are
        uploaded (a temporary folder; default: the journal's folder)."""
        self.job = DesktopJob(client, journal, folder, options, log)
        self.client, self.journal, self.folder, self.options, self.log = client, journal, folder, options, log
        self.summary = self.job.summary
        self.status = self.job.status
        self.arrivals = DesktopArrivals(self.job)
        self._items_of: dict[str, list[Item]] = {}
        self.copier = DesktopCopier(folder, options.copy_block, self._items_of, log)
        self.pauses = Pauses(log, options.sleep_seconds, sleep=self.job.waiter.sleep)
        self._plan = plan
        self._logs_root = logs_root if logs_root is not None else journal.path.parent
        self._sources = {str(source.source): source for source in plan.sources}
        self._given_up: set[str] = set()  # sources with a failed part: later parts and the manifest wait

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
            usage = self.job.retrier.call("reading Dropbox's free space", self.client.space_usage,
                                          what_in_status=True)
            if usage.free is not None and usage.free < needed_dropbox:
                return (f"Dropbox has {human_bytes(usage.free)} free; this batch needs {human_bytes(needed_dropbox)}. "
                        "Free some space in Dropbox or raise the quota")
        return None

    def wait_for_space(self, batch: Batch, to_copy: int) -> None:
        """Hold until the disk of the Dropbox folder has twice `to_copy` bytes free and Dropbox
        `to_copy`, checking every sleepTime_min."""
        self.pauses.hold(lambda: self._no_room(2 * to_copy, to_copy),
                         lambda reason: f"PAUSED before batch {batch.number}: {reason}. Checking again every "
                                        f"{every(self.options.sleep_seconds)}; nothing is lost while paused",
                         f"Space is available again: batch {batch.number} continues.")

    def check_disk_is_big_enough(self, batches: Sequence[Batch]) -> None:
        largest = max((b.bytes_to_copy() for b in batches), default=0)
        total = psutil.disk_usage(str(self.folder.root)).total
        if 2 * largest > total:
            raise SettingsError(
                f"the largest batch to copy is {human_bytes(largest)}, but the disk holding the Dropbox folder "
                f"({self.folder.root}) holds only {human_bytes(total)} and each batch needs twice its size free. "
                "Lower batchSize_GB (and fileSizeLimit_GB, so that large files are split into smaller parts) at "
                "the top of app.py.")

    # -- copying -----------------------------------------------------------------------------

    def _copy_one(self, item: Item, remote: RemoteFile | RemoteFolder | None, progress: tqdm) -> None:
        """Place one item and record the outcome in the journal, the summary and the log."""
        started = time.monotonic()
        outcome = self.copier.place(item, remote, progress)
        if outcome == ALREADY_IN_DROPBOX:
            self.journal.mark_done([item])
        else:
            self.journal.mark_copied(item)
            self.job.copied_at[item.id] = time.monotonic()
        if outcome == COPIED:
            self.summary.items_copied += 1
            self.summary.bytes_copied += item.length
        else:
            self.summary.items_already_there += 1
            progress.update(item.length)
        self.job.line(outcome, item, time.monotonic() - started)

    def _copy_or_fail(self, batch: Batch, pending: Sequence[Item], item: Item,
                      remote: RemoteFile | RemoteFolder | None, progress: tqdm) -> bool:
        """Copy one item, pausing while the disk is full; a problem fails it (and the later
        parts of its split file). True when it was placed."""
        while True:
            try:
                self._copy_one(item, remote, progress)
                return True
            except FileProblem as exc:
                problem = exc
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    self.log.warning("The disk holding the Dropbox folder is full.")
                    self.wait_for_space(batch, sum(i.length for i in pending if i.state == State.PENDING))
                    continue
                problem = FileProblem(f"cannot be copied into the Dropbox folder ({exc.strerror}: "
                                      f"{exc.filename or item.source})", paths=[item.source])
            self.job.fail(item, problem)
            if item.kind == Kind.PART:
                self._given_up.add(item.source)
            return False

    def copy_batch(self, batch: Batch) -> None:
        pending = [item for item in batch.items if item.state not in (State.COPIED, State.DONE)]
        to_copy = sum(item.length for item in pending)
        self.log.info("Batch %d: copying %d item(s), %s, into the Dropbox folder.", batch.number, len(pending),
                      human_bytes(to_copy))
        self.journal.set_batch_state(batch.number, BatchState.COPYING)
        remote = self.arrivals.lookup_patiently(pending)
        touched: set[Path] = set()
        with tqdm(total=to_copy, unit="B", unit_scale=True, unit_divisor=1000, desc=f"Batch {batch.number}",
                  disable=None, dynamic_ncols=True) as progress, self.status.showing(progress):
            for item in pending:
                if item.source in self._given_up:
                    continue
                if self._copy_or_fail(batch, pending, item, remote.get(case_key(item.destination)), progress):
                    touched.add(self.folder.local_path(item.destination).parent)
        for folder in touched:
            fsync_folder(folder)
        self.journal.set_batch_state(batch.number, BatchState.WAITING)

    # -- inventories -------------------------------------------------------------------------

    def write_inventories(self, batches: Sequence[Batch]) -> frozenset[int]:
        """Write or refresh through the API the inventories of the files of `batches` that are in
        Dropbox (inventory_writer): each archive's, and the row inventory of every row they
        touch, merged with the one Dropbox holds. Returns the ids (id()) of the rows whose
        inventory could not be written (their failures are in the summary); raises AuthError
        and EnvironmentProblem."""
        touched = {item.source for batch in batches for item in batch.items}
        part, items = done_part(self._plan, self._items_of, touched)
        if not part.sources:
            return frozenset()
        result = write_upload_inventories(
            self.client, part, items, destination_of_row=lambda row: self.folder.dropbox_path(row["outputDir"]),
            logs_root=self._logs_root, job=self.journal.job, log=self.log, call=self.job.retrier.call)
        self.summary.failures.extend(result.failures)
        return frozenset(result.failed_rows)

    # -- deleting originals ------------------------------------------------------------------

    def delete_originals(self, batch: Batch, keep_rows: Collection[int] = ()) -> bool:
        """Delete the originals of this batch that were asked to go, through the deletion gate:
        only when Dropbox holds every item of the original now (content hash, asked now through
        the API) and the original did not change since it was copied. Those of the rows in
        `keep_rows` (id() of the row: its inventory could not be written) stay; True when one
        stayed for that reason."""
        originals = []
        held = False
        for source_path in dict.fromkeys(item.source for item in batch.items):
            source = self._sources.get(source_path)
            if source is None or not source.delete_after:
                continue
            items = self._items_of[source_path]
            if any(item.state != State.DONE for item in items):
                continue  # e.g. a split file whose last parts are in a later batch
            if id(source.row) in keep_rows:
                held = True
                continue
            root = source.row["inputFile"]
            originals.append(deletion.uploaded_original(items, root if isinstance(root, Path) and root.is_dir()
                                                        else None))
        if not originals:
            return held
        report = deletion.delete_uploaded_originals(self.client, originals, journal=self.journal, log=self.log,
                                                    protected=self.folder.contains)
        self.summary.deleted_sources += len(report.deleted)
        for path, reason in report.kept:
            self.summary.failures.append((str(path), f"not deleted: {reason}"))
            self.log.error("NOT DELETED\t%s: %s", path, reason)
        if report.missing:
            missing = {str(path) for path in report.missing}
            self.journal.reopen([item for item in batch.items if item.source in missing])
        return held

    # -- the whole job -----------------------------------------------------------------------

    def prepare_batches(self, items: Sequence[Item]) -> None:
        """Recover items left by earlier runs: failed or copied items whose copy is gone are
        copied again; failed copies whose verification failed are checked again; done items
        are looked up in Dropbox again."""
        self.arrivals.reconcile_done(items)
        for item in items:
            self._items_of.setdefault(item.source, []).append(item)
            if item.state == State.FAILED:
                if item.content_hash and self.folder.local_path(item.destination).exists():
                    self.journal.mark_copied(item)  # a wrong arrival earlier: check Dropbox again
                else:
                    self.journal.mark_pending(item)
            elif item.state == State.COPIED and not self.folder.local_path(item.destination).exists():
                self.log.info("%s was copied in an earlier run but is no longer in the Dropbox folder; it is "
                              "copied again.", item.destination)
                self.journal.mark_pending(item)
            elif item.state not in (State.PENDING, State.COPIED, State.DONE):
                self.journal.mark_pending(item)

    def _finish_verified(self, batch: Batch, keep_rows: Collection[int]) -> None:
        """A batch verified in an earlier run: its originals go, if they have not yet (not those
        of `keep_rows`, whose inventory is not in Dropbox)."""
        self.summary.batches_verified += 1
        if self.journal.batch_state(batch.number) != BatchState.DELETED:
            if not self.delete_originals(batch, keep_rows):
                self.journal.set_batch_state(batch.number, BatchState.DELETED)

    def _run_batch(self, batch: Batch, last: int) -> bool:
        """Copy, wait for and verify one batch, then delete its originals that may go. False
        when Dropbox holds a wrong file for it (then the run stops: `summary.stopped`)."""
        self.log.info("Batch %d of %d: %d item(s), %s.", batch.number, last, len(batch.items),
                      human_bytes(batch.size))
        to_copy = batch.bytes_to_copy()
        if to_copy or any(i.state == State.PENDING for i in batch.items):
            self.wait_for_space(batch, to_copy)
            self.copy_batch(batch)
        else:
            self.journal.set_batch_state(batch.number, BatchState.WAITING)
        wrong = self.arrivals.await_batch(batch)
        if wrong:
            self.journal.set_batch_state(batch.number, BatchState.FAILED)
            names = ", ".join(item.destination for item in wrong[:10])
            self.summary.stopped = (
                f"batch {batch.number} is not verified: Dropbox holds a different file than the one copied for "
                f"{names}. Nothing of this batch was deleted and the next batches were not started. Check those "
                "files in Dropbox (dropbox.com); delete the wrong copy there, or re-save the file in the Dropbox "
                "folder so the app uploads it again, then run app.py again")
            self.log.error("STOPPED: %s.", self.summary.stopped)
            return False
        failed = sum(item.state == State.FAILED for item in batch.items)
        if failed:
            self.log.warning("Batch %d: every copied item is verified; %d item(s) could not be copied (see "
                             "above) and are tried again on the next run.", batch.number, failed)
        else:
            self.log.info("Batch %d verified: all %d item(s) are in Dropbox with matching content hashes.",
                          batch.number, len(batch.items))
            self.summary.batches_verified += 1
        self.journal.set_batch_state(batch.number, BatchState.VERIFIED)
        held = self.delete_originals(batch, self.write_inventories([batch]))
        if batch.done and not held:
            self.journal.set_batch_state(batch.number, BatchState.DELETED)
        return True

    def run(self, batches: Sequence[Batch]) -> DesktopSummary:
        started = time.monotonic()
        self.summary.batches_total = len(batches)
        self.summary.items_total = sum(len(b.items) for b in batches)
        self.summary.files_total = len(self._items_of)
        self.summary.items_done_before = sum(1 for b in batches for i in b.items if i.state == State.DONE)
        self.status.remaining(lambda: _not_verified_yet(batches))
        # Batches verified in earlier runs, in one go: a run stopped between a verification and
        # its deletions, or files uploaded before inventories were written, get theirs now.
        verified_before = [batch for batch in batches if batch.done]
        keep_rows = self.write_inventories(verified_before)
        for batch in batches:
            if batch.done:
                self._finish_verified(batch, keep_rows)
            elif not self._run_batch(batch, batches[-1].number):
                break
        self.summary.unfinished = sum(1 for b in batches for i in b.items if i.state != State.DONE)
        self.summary.seconds = time.monotonic() - started
        self.status.remaining(None)
        return self.summary


def _not_verified_yet(batches: Sequence[Batch]) -> str:
    """What is left of the job, for the status line (MB = 10^6 bytes)."""
    left = [item for batch in batches for item in batch.items if item.state != State.DONE]
    return f"{len(left)} item(s), {human_bytes(sum(item.length for item in left))}, not yet verified in Dropbox"


# ============================================================================ entry point


def run(context: RunContext, sheet: str) -> int:
    """app.py with sheetName = 'dropboxUpload_APP'."""
    settings = context.settings
    log = context.log
    folder = check_dropbox_dir(settings.dropboxDir, context.script)
    batch_bytes = max(1, int(settings.batchSize_GB * GB))
    part_limit = max(1, int(settings.fileSizeLimit_GB * GB))
    block = max(1, min(settings.chunkSizeSplit_MB * MIB, MAX_COPY_BLOCK))
    options = DesktopOptions(batch_bytes=batch_bytes, copy_block=block, sleep_seconds=settings.sleepTime_min * 60,
                             time_limit_seconds=settings.batchTimeLimit_hour * 3600)

    def describe(plan: Plan, logger: logging.Logger) -> None:
        lengths = [item.length for item in prepare.iter_items(plan, sheet)]
        logger.info("Desktop-app batches of at most %s: %d (a file larger than a batch gets one of its own; "
                    "files planned in an earlier run keep their batch).", human_bytes(batch_bytes),
                    count_batches(lengths, batch_bytes))

    def destination_of_row(row) -> str:
        return folder.dropbox_path(row["outputDir"])

    log.info("Local Dropbox folder: %s", folder.root)
    with Journal(context.logs_root / "journal.sqlite3", sheet, log=context.log) as journal:
        settle_interrupted_deletions(journal, log)
        plan = prepare_rows(context, sheet, destination_of_row=destination_of_row, part_limit=part_limit,
                            already_done=journal.deleted_sources(),
                            sent_unchanged=journal.sent_unchanged_among, mode="desktop app",
                            bytes_per_second=APP_BYTES_PER_SECOND, row_check=row_checker(folder),
                            describe_plan=describe)
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
        uploader = DesktopUploader(client, journal, folder, plan, options, log, logs_root=context.logs_root)
        uploader.prepare_batches(items)
        uploader.check_disk_is_big_enough(batches)
        log.info("Stage 2, upload through the Dropbox desktop app: %d batch(es) of at most %s.", len(batches),
                 human_bytes(batch_bytes))
        summary = uploader.run(batches)
        _log_summary(context, summary)
        return EXIT_OK if summary.ok else EXIT_SOME_FAILED


def _log_summary(context: RunContext, summary: DesktopSummary) -> None:
    log = context.log
    summary.failures.extend(context.stage1_failures)  # set by job_setup.prepare_rows
    speed = summary.bytes_copied / summary.seconds if summary.seconds else 0
    log.info("Summary: %d files in the sheet (%d items in %d batches); %d verified in Dropbox now, %d done in earlier "
             "runs; %d copied into the Dropbox folder (%s at %s/s), %d already there; %d originals deleted after "
             "verification; %d failed; %.0f s.", summary.files_total, summary.items_total, summary.batches_total,
             summary.items_verified, summary.items_done_before, summary.items_copied,
             human_bytes(summary.bytes_copied), human_bytes(speed), summary.items_already_there,
             summary.deleted_sources, len(summary.failures), summary.seconds)
    log_failures(log, summary.failures)
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
