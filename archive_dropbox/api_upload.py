"""Stage 2 through the Dropbox API: send every planned item, verify it by content hash, record
it in the journal, and only then delete originals that were asked to go.

This module plans and schedules; the jobs live in their own modules:
- upload_run: what the parts share (retry and pause policy, progress, summary, verification,
  the one "does Dropbox already hold this?" check, split files' hash bookkeeping);
- upload_sessions: one item through a sequential or a concurrent upload session, resumable
  across runs from the journal's confirmed offset or pieces;
- small_files: small files sent together (append_batch);
- commit_queue: closed sessions committed a thousand at a time with finish_batch_v2, one commit
  per account at a time, clear of too_many_write_operations;
- upload_memory: the byte budget, request bodies streamed from the file, positioned reads.
The SDK already retries 429 and 5xx; these add what it cannot know: resume across runs, offsets
after dropped connections, pausing on a full account, and verification.
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator

from . import deletion, destinations, plan_items, prepare, split, units
from .cli import RunContext
from .content_hash import bytes_content_hash
from .commit_queue import CommitQueue
from .dropbox_client import DropboxClient, RemoteConflict, RemoteFile
from .errors import EXIT_OK, EXIT_SOME_FAILED, AuthError, FileProblem, SheetError
from .inventory_writer import write_upload_inventories
from .job_setup import (bind_account, open_client, plan_rows, prepare_rows, settle_interrupted_deletions,
                        with_dropbox_side)
from .journal import Item, Journal, Kind, State, file_id_numbers, folder_digest, settled_key
from .names import case_key
from .prepare import Plan
from .sheets import SheetRow
from .small_files import SmallFileGroups, SmallFileSender
from .transfer import ByteProgress, JobRunner, log_summary_end
from .units import MIB, human_bytes
from .upload_memory import STREAM_PIECE, file_data_budget
from .upload_run import Asked, Summary, UploadOptions, UploadRun
from .upload_sessions import ConcurrentSession, SequentialSession, append_size

__all__ = ["ApiUploader", "Summary", "UploadOptions", "delete_verified_sources", "run"]


class ApiUploader:
    """Plans what one job still has to send, schedules it on the run's pools and sums it up."""

    def __init__(self, client: DropboxClient, journal: Journal, options: UploadOptions, log: logging.Logger):
        self.client = client
        self.journal = journal
        self.options = options
        self.log = log
        # memory_budget covers the connections too (TLS buffers, response objects, thread
        # stacks): what is left is for file data. Requests stream their bytes from the file, so
        # a chunk need not fit: the floor is a few streamed requests' buffers.
        connections = options.workers * (options.appends_per_file + 1) + options.small_file_workers
        budget = file_data_budget(options.memory_budget, connections, 4 * STREAM_PIECE)
        self._readahead = futures.ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="read")
        self._appends = futures.ThreadPoolExecutor(max_workers=max(1, options.appends_per_file * 2),
                                                   thread_name_prefix="append")
        # Small files cost one round trip each and almost no bandwidth: many more of them travel
        # at once than large ones, or latency alone would bound the job.
        self.jobs = JobRunner({"upload": options.workers, "small": options.small_file_workers},
                              in_flight=(options.workers + options.small_file_workers) * 4,
                              extra=(self._appends, self._readahead))
        self.shared = UploadRun(client, journal, options, log, budget, self.jobs)
        self.commits = CommitQueue(self.shared, self._upload_item)
        self.small_files = SmallFileSender(self.shared, self.commits, lambda items: self._run_source(items))
        # Small files travel together in append_batch requests of this many bytes; a quarter of
        # the budget at most, since a request's bytes are held twice while its body is built.
        self._group_bytes = min(options.small_group_bytes, budget.capacity // 4)

    @property
    def summary(self) -> Summary:
        return self.shared.summary

    # -- one local file ----------------------------------------------------------------------

    def _upload_item(self, item: Item) -> None:
        if item.length >= self.options.concurrent_above and self.options.appends_per_file > 1:
            ConcurrentSession(self.shared, self._appends, item,
                              append_size(item.length, self.options.chunk_size, self.options.appends_per_file)).send()
        else:
            SequentialSession(self.shared, self.commits, self._readahead, item).send()

    def _run_source(self, source_items: list[Item]) -> None:
        """Upload one local file: its single item, or its parts in order then the manifest."""
        for item in source_items:
            if self.jobs.stopping():
                return
            if item.state == State.DONE:
                continue
            try:
                if item.kind == Kind.MANIFEST:
                    self._upload_manifest(item, source_items)
                elif item.session_id or not self.shared.already_in_dropbox(item, Asked.BEFORE_SENDING):
                    self._upload_item(item)
            except AuthError as exc:
                self.jobs.fail(exc)
                return
            except FileProblem as exc:
                self.shared.fail(item, exc)
                if item.kind == Kind.PART:
                    return  # the remaining parts and the manifest wait for the next run
            except OSError as exc:
                self.shared.fail(item, FileProblem(f"cannot read the file ({exc.strerror})", paths=[item.source]))
                return

    def _upload_manifest(self, manifest_item: Item, source_items: list[Item]) -> None:
        parts = [i for i in source_items if i.kind == Kind.PART]
        if self.commits.waiting:
            self.commits.flush()
        if any(p.state != State.DONE for p in parts):
            return
        started = time.monotonic()
        whole = self.shared.hashes.whole_file_sha256(manifest_item)
        self.shared.source_unchanged(manifest_item)
        name = manifest_item.destination.rsplit("/", 1)[1]
        plan = [split.PartPlan(index, p.part_offset, p.length) for index, p in enumerate(parts, start=1)]
        manifest = split.build_manifest(split.parse_manifest_name(name) or name, manifest_item.source_size, whole,
                                        manifest_item.source_mtime_ns / 1e9, plan, [p.sha256 for p in parts],
                                        part_size=parts[0].length)
        data = manifest.to_bytes()
        manifest_item.content_hash = bytes_content_hash(data)
        manifest_item.sha256 = hashlib.sha256(data).hexdigest()
        request = self.shared.commit_request(manifest_item, "", 0)
        remote = self.shared.call("upload", lambda: self.client.upload(data, request))
        self.shared.verify(manifest_item, remote)
        self.journal.mark_done([manifest_item])
        self.summary.items_uploaded += 1
        self.shared.log_result(manifest_item, "UPLOADED", time.monotonic() - started, size=len(data))

    def create_empty_folders(self, folders: Iterable[str]) -> list[tuple[str, str]]:
        """Empty local folders exist in Dropbox too (creating an existing one is harmless)."""
        failures: list[tuple[str, str]] = []
        for folder in folders:
            try:
                self.shared.call("creating a folder", lambda: self.client.create_folder(folder))
                self.log.debug("FOLDER\t%s", folder)
            except FileProblem as exc:
                failures.append((folder, exc.message))
                self.log.error("FAILED\tfolder %s: %s", folder, exc.message)
        return failures

    # -- planning ----------------------------------------------------------------------------

    def _list(self, remote_folders: Iterable[str]) -> None:
        """The journal says what was sent, not what Dropbox holds now: look (into shared.listing)
        before deciding (_reconcile)."""
        for folder in deletion.topmost_folders(remote_folders):
            found = self.shared.call("listing Dropbox", lambda: self.client.list_files(folder))
            self.shared.listing.update({case_key(k): v for k, v in found.items()})

    def _reconcile(self, job_items: list[Item]) -> None:
        """Items the journal calls done that Dropbox no longer holds as sent (deleted, moved or
        replaced by someone, or another account) are sent again - never called verified. A
        replaced file is left alone with ifExists = 'report' (both kept, and said so)."""
        reopen: list[Item] = []
        for item in job_items:
            if item.state != State.DONE:
                continue
            remote = self.shared.listing.get(case_key(item.remote_key_path))
            if isinstance(remote, RemoteFile) and remote.content_hash == item.content_hash:
                continue
            if remote is None:
                self.log.warning("NOT IN DROPBOX\t%s: uploaded earlier, but Dropbox does not hold it now (deleted "
                                 "or moved by someone, or another account); it is sent again.", item.remote_key_path)
                reopen.append(item)
            elif self.options.if_exists == "report":
                self.shared.fail(item, RemoteConflict(
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
            if item.state == State.DONE:
                continue
            remote = self.shared.listing.get(case_key(item.destination))
            if not isinstance(remote, RemoteFile) or (remote.size != item.length
                                                      and self.options.if_exists == "rename"):
                total += item.length
            elif remote.size != item.length and self.options.if_exists == "overwrite":
                total += max(0, item.length - remote.size)
        return total

    def _announce(self, todo_files: int, files_total: int, remaining_bytes: int, to_store: int) -> None:
        """Say what is left, and wait for room in Dropbox for it first (`to_store`: bytes, see
        _bytes_to_store)."""
        if not todo_files:
            settled = self.summary.settled_files
            if settled:
                self.log.info("Nothing to send: %d file(s) checked against Dropbox now are there, identical (content "
                              "hash); %d more are in folders unchanged since every file in them was sent and verified "
                              "in an earlier run, and were not looked up again (`python app.py --verify` compares "
                              "every file with Dropbox now).", files_total - settled, settled)
            else:
                self.log.info("Every file of this sheet is in Dropbox now, identical (checked by content hash); "
                              "nothing to send.")
            return
        self.log.info("%d of %d files still to send (%s); %d items were finished in earlier runs.",
                      todo_files, files_total, human_bytes(remaining_bytes), self.summary.items_done_before)
        usage = self.client.space_usage()
        if usage.free is not None and usage.free < to_store:
            self.shared.pauses.wait_for_dropbox_space(to_store, "not enough space in Dropbox for what is left "
                                                                "of this job")

    # -- the whole job -----------------------------------------------------------------------

    def _schedule(self, todo: list[list[Item]]) -> None:
        """Largest files first; small whole files in groups, other one-chunk files on the small
        pool, the rest on the upload pool. Returns once every job has finished."""
        groups = SmallFileGroups(self._group_bytes, self.small_files.limit)
        for items in sorted(todo, key=lambda group: -sum(i.length for i in group)):
            if self.jobs.stopping():
                break
            if groups.groupable(items):
                full = groups.add(items[0])
                if full:
                    self.jobs.submit("small", self.small_files.send, full)
                continue
            small = len(items) == 1 and items[0].length <= self.options.chunk_size
            self.jobs.submit("small" if small else "upload", self._run_source, items)
        rest = groups.rest()
        if rest and not self.jobs.stopping():
            self.jobs.submit("small", self.small_files.send, rest)
        self.jobs.wait_all()

    def _look_over(self, pages: Pages, settled: tuple[int, int]) -> tuple[int, int, int, int]:
        """The first read of the plan: every done item checked against the listing (_reconcile),
        and what is left counted. (files to send, bytes of the items to send, bytes of them all,
        bytes to store in Dropbox); the summary gets the files and the items done before."""
        files, done_before = settled[0], settled[0]  # a settled file counts as one item, whole or split
        todo_files = remaining = to_store = 0
        total = settled[1]
        for page in pages():
            self._reconcile([item for items in page for item in items])
            for items in page:
                files += 1
                waiting = [item for item in items if item.state != State.DONE]
                done_before += len(items) - len(waiting)
                total += sum(item.length for item in items)
                if waiting:
                    todo_files += 1
                    remaining += sum(item.length for item in waiting)
                    to_store += self._bytes_to_store(waiting)
        self.summary.files_total, self.summary.items_done_before = files, done_before
        self.summary.settled_files = settled[0]
        return todo_files, remaining, total, to_store

    def run(self, job_items: list[Item] | Pages, remote_folders: Iterable[str], *, listed: bool = False,
            settled: tuple[int, int] = (0, 0)) -> Summary:
        """Send every item not yet done. `job_items`: all the plan's items, or `pages()` giving
        them a page at a time as lists of one file's items (plan_items.pages; read twice: to
        count, then to send, so that only a page is held). `remote_folders` are listed once to
        find what is there (`listed`: they were, by Stage 1's destination check, into
        shared.listing). `settled`: (files, bytes) of the sheet that Stage 1 left out of the
        plan, settled in earlier runs (counted as done before). Raises the run's fatal error
        (AuthError, Ctrl-C, a bug) after stopping every worker."""
        started = time.monotonic()
        pages = job_items if callable(job_items) else _one_page(job_items)
        if not listed:
            self._list(remote_folders)
        todo_files, remaining, total, to_store = self._look_over(pages, settled)
        self.shared.progress = ByteProgress(self.log, total=total, done=total - remaining, desc="Uploading",
                                            verb="send", files_total=self.summary.files_total,
                                            files_done=self.summary.items_done_before)
        try:
            self._announce(todo_files, self.summary.files_total, remaining, to_store)
            # Ctrl-C or a bug: the runner stops the workers between chunks instead of letting
            # them finish the whole job; the journal already holds every confirmed chunk.
            with self.jobs:
                for page in pages() if todo_files else ():
                    todo = [items for items in page if any(i.state != State.DONE for i in items)]
                    self._schedule(todo)
                    if self.jobs.stopping():
                        break
                    self.commits.flush()
                    # Manifests wait for their parts' batch commits; a second pass sends them.
                    for items in todo:
                        if any(i.kind == Kind.MANIFEST and i.state != State.DONE for i in items):
                            self._run_source(items)
        finally:
            self.shared.progress.close()
        self.jobs.raise_if_failed()
        self.summary.seconds = time.monotonic() - started
        return self.summary


# pages() -> the plan's items a page at a time, each page a list of one file's items in order.
Pages = Callable[[], Iterator[list[list[Item]]]]


def _one_page(job_items: list[Item]) -> Pages:
    """Pages for items given in one list: one page, a file's items together (in the list's order)."""
    by_source: dict[str, list[Item]] = {}
    for item in job_items:
        by_source.setdefault(item.source, []).append(item)
    return lambda: iter([list(by_source.values())] if by_source else [])


def journal_pages(plan: Plan, journal: Journal) -> Pages:
    """Pages of the plan's items read from the journal (plan_items.pages)."""
    return lambda: ([chunk for _, _, chunk in page] for page in plan_items.pages(plan, journal))


def delete_verified_sources(client: DropboxClient, plan: Plan, journal: Journal, log: logging.Logger,
                            keep_rows: Collection[int] = ()) -> tuple[int, list[tuple[str, str]]]:
    """Delete the originals asked to go whose every item is done, each only once the deletion
    gate has seen Dropbox hold identical bytes now and the file unchanged; rows whose id() is in
    `keep_rows` keep theirs. The plan's items are read from the journal a page at a time; what
    is held is one record per original to delete (the gate proves them together). Returns
    (deleted, [(path, why kept)])."""
    if not any(row["deleteAfterUpload"] and id(row) not in keep_rows for row in plan_rows(plan)):
        return 0, []
    folder_of = _folder_rows()
    wanted: dict[str, tuple[list[Item], Path | None]] = {}  # a file may go to two places: all must be done
    for _, source, chunk in plan_items.pairs(plan, journal):
        if source.delete_after and id(source.row) not in keep_rows:
            entry = wanted.setdefault(str(source.source), ([], folder_of(source.row)))
            entry[0].extend(chunk)
    originals = [deletion.uploaded_original(items, root) for items, root in wanted.values()
                 if all(i.state == State.DONE for i in items)]
    report = deletion.delete_uploaded_originals(client, originals, journal=journal, log=log)
    if originals:
        log.info("Deletion proof: %d original(s) checked against Dropbox with %d lookup(s) in %.2f s, then on "
                 "disk and deleted in %.2f s; %d deleted.", len(originals), report.remote_calls, report.remote_seconds,
                 report.local_seconds, len(report.deleted))
    return len(report.deleted), [(str(path), reason) for path, reason in report.kept]


def _folder_rows() -> Callable[[SheetRow], Path | None]:
    """row -> its inputFile when that is a folder, else None; the disk is asked once per row."""
    known: dict[int, Path | None] = {}

    def folder_of(row: SheetRow) -> Path | None:
        if id(row) not in known:
            root = row["inputFile"]
            known[id(row)] = root if isinstance(root, Path) and root.is_dir() else None
        return known[id(row)]

    return folder_of


def record_settled_folders(journal: Journal, pairs: Iterable[plan_items.Pair], failed_rows: Collection[int]) -> int:
    """After the upload, settle the folders whose files are all done now: for every folder of a
    folder row that deletes nothing and whose inventory was written, the journal records the
    folder_digest of its files, so that the next run's Stage 1 leaves the folder out while
    nothing in it changes (prepare.build_plan). A folder's files are consecutive in the plan
    (the walk lists a folder at a time), so one folder is held at a time. Returns how many."""
    settled: list[tuple[int, bytes]] = []
    folder_of = _folder_rows()
    current: int | None = None
    names: list[str] = []
    numbers: list[int] = []
    file_ids: list[int] = []
    all_done = True
    for _, source, chunk in pairs:
        key = None
        if not source.delete_after and id(source.row) not in failed_rows and folder_of(source.row) is not None:
            path = str(source.source)
            key = settled_key(os.path.dirname(path), source.destination_folder)
        if key != current:
            if current is not None and all_done:
                settled.append((current, folder_digest(names, numbers, file_ids)))
            current, names, numbers, file_ids, all_done = key, [], [], [], True
        if key is not None:
            names.append(os.path.basename(path))
            numbers += (source.size, source.mtime_ns, len(source.parts) if source.parts else 0)
            file_ids += file_id_numbers(source.file_id)
            all_done = all_done and all(item.state == State.DONE for item in chunk)
    if current is not None and all_done:
        settled.append((current, folder_digest(names, numbers, file_ids)))
    journal.settled_folders.record(settled)
    return len(settled)


# ============================================================================ entry point


def run(context: RunContext, sheet: str) -> int:
    """app.py with sheetName = 'dropboxUpload_API'."""
    settings = context.settings
    chunk = max(4, settings.chunkSize_MB // 4 * 4) * MIB  # 4 MiB multiples match Dropbox's hash blocks
    if settings.chunkSize_MB % 4:
        context.log.info("chunkSize_MB %d is used as %d (a multiple of 4 MiB).", settings.chunkSize_MB, chunk // MIB)
    part_limit = int(min(settings.fileSizeLimit_GB * units.GB, prepare.DROPBOX_API_MAX_FILE))
    with Journal(context.logs_root / "journal.sqlite3", sheet, log=context.log) as journal:
        settle_interrupted_deletions(journal, context.log)
        workers = settings.workers * (settings.connectionsPerFile + 1)
        def plan_the_rows(settled: bool) -> Plan:
            return prepare_rows(context, sheet, destination_of_row=lambda row: row["outputDir"],
                                part_limit=part_limit, already_done=journal.deleted_sources(),
                                sent_unchanged=journal.sent_unchanged_among, mode="API", bytes_per_second=50e6,
                                settled_folder=journal.settled_folders.holds if settled else None)

        try:
            plan = plan_the_rows(journal.settled_folders.any())
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
        if bind_account(journal, client, context.log) and plan.settled_files:
            # Settled meant "in the other account": nothing is, here. Stage 1 again, in full.
            plan = plan_the_rows(False)
        # Before the first byte: Dropbox would refuse a blocked destination only at commit time.
        # The same listing tells the upload what Dropbox holds: the destinations are listed once.
        listing: dict[str, RemoteFile] = {}
        destinations.refuse_blocked(client, plan, destination_of_row=lambda row: row["outputDir"], log=context.log,
                                    files=listing)
        # Stage 2 reads the plan's items from the journal a page at a time (plan_items).
        pages = journal_pages(plan, journal)
        options = UploadOptions(chunk_size=chunk, workers=settings.workers, if_exists=settings.ifExists,
                                checksum=settings.checksum, sleep_seconds=settings.sleepTime_min * 60,
                                appends_per_file=settings.connectionsPerFile,
                                concurrent_above=4 * chunk,
                                memory_budget=settings.memoryLimit_MB * MIB)
        uploader = ApiUploader(client, journal, options, context.log)
        uploader.shared.sources_to_delete = {str(s.source) for s in plan.sources if s.delete_after}
        context.log.info("Stage 2, upload through the Dropbox API with %d workers, %d MiB chunks.",
                         settings.workers, chunk // MIB)
        uploader.shared.listing.update(listing)
        summary = uploader.run(pages, {row["outputDir"] for row in plan_rows(plan)}, listed=True,
                               settled=(plan.settled_files, plan.settled_bytes))
        summary.failures.extend(uploader.create_empty_folders(plan.empty_folders))
        # Before any original goes: a row whose inventory is not in Dropbox keeps its originals.
        # With settled folders the listing covers only the planned files' folders, not where the
        # row inventories are: each is looked up instead.
        def pairs(start: int, stop: int) -> Iterator[plan_items.Pair]:
            return plan_items.pairs(plan, journal, start, stop)

        inventories = write_upload_inventories(client, plan, pairs=pairs, destination_of_row=lambda row: row["outputDir"],
                                               logs_root=context.logs_root, job=sheet, log=context.log,
                                               call=uploader.shared.call,
                                               listing=None if plan.settled_files else uploader.shared.listing)
        summary.failures.extend(inventories.failures)
        deleted, delete_failures = delete_verified_sources(client, plan, journal, context.log,
                                                           keep_rows=inventories.failed_rows)
        summary.deleted_sources = deleted
        for path, message in delete_failures:
            summary.failures.append((path, message))
            context.log.error("NOT DELETED\t%s: %s", path, message)
        record_settled_folders(journal, pairs(0, len(plan.sources)), inventories.failed_rows)
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
    log_summary_end(log, summary, failed="Some files did not reach Dropbox. Fix what the messages say and run "
                    "app.py again: finished files are not sent twice.",
                    succeeded="Everything is in Dropbox and verified by content hash" + (
                        "." if not summary.settled_files else
                        ": in this run, or, for folders unchanged since, in an earlier one."), log_path=context.log_path)
    sys.stdout.flush()
