"""Getting data back (app.py with sheetName = 'dropboxDownload_API'): download the files and
folders listed in the tab, each verified by its Dropbox content hash, resumable after any crash,
then, with joinFlag = 1, join the split files among them.

Where things land (columns dropboxPath, localDir, joinFlag):
  - a file row `/Archive/run1/a.mrc` -> `<localDir>/a.mrc`;
  - a folder row `/Archive/run1` -> `<localDir>/run1/...`: the folder keeps its own name, as when
    a folder is dragged into another one, so restoring `/Archive/run1` into `D:\\restore` gives
    `D:\\restore\\run1\\...`; empty folders are created too. The Dropbox root `/` lands directly
    in localDir;
  - a row may name the original of a split file (`/Archive/big.mrc` when Dropbox holds
    `big.mrc_split_0001`, ... and `big.mrc_split_manifest.json`): its parts and manifest are
    downloaded into localDir;
  - a row with `member` filled in names a .zip archive (whole or split) and the member(s) to
    take out of it: only their bytes are fetched, with ranged requests (member_fetch.py).

Every file is written to `.~<hash of name>.partial` next to its final place (a short name, so
that names near the file system's limit fit too) and renamed only once its content hash equals
the one Dropbox reports; its modification time is set from Dropbox's `client_modified` (the
original file's time, to the second). A rerun continues a partial file
from its current size with a ranged request, re-hashing the bytes already on disk instead of
downloading them again. A file that fails verification is downloaded once more from scratch,
then reported. An existing local file is never overwritten: an identical one (same size and
content hash, or the journal says it was downloaded and its size and date are unchanged) is
kept, a different one is reported.

joinFlag = 1: once every part of a split file is verified, it is joined with
`archive_dropbox.joining` (checked against the SHA-256 in its manifest); the parts and the
manifest are then deleted, because a lab wants the original file back. Parts without a
manifest (made by the original tool) are joined but kept, since nothing can prove the join.

Stage 1 (checking the rows, listing what they bring, the plan against the disk and the journal)
is download_plan.py; this module is the transfer (Downloader) and the job as a whole (run).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from . import deletion, joining, member_fetch, sheets, split
from .cli import RunContext
from .content_hash import ContentHasher, file_content_hash, hash_range
from .download_plan import (COLUMNS, METADATA_POLICY, PARTIAL_TAG, Series, Task, ask, bind_items,
                            client_modified_epoch, create_folders, different_file, existing_file, journal_item,
                            plan_download, wait_for_room, write_all)
from .dropbox_client import DropboxClient, NetworkProblem, RangeNotSatisfiable, RateLimited, RemoteFile
from .errors import EXIT_OK, EXIT_SOME_FAILED, AuthError, FileProblem, SheetError, SheetProblem
from .job_setup import open_client
from .journal import Journal, Kind, State
from .localfs import legacy_temporary, rename_without_replacing
from .logs import PER_FILE
from .status import nap, status_of
from .transfer import (Backoff, ByteProgress, JobRunner, Pauses, Retrier, RetryPolicy, RunSummary, file_finished,
                       log_result, log_summary_end)
from .units import human_bytes

READ_CHUNK = 4 * 1024 * 1024
# FAT and exFAT keep modification times in 2-second steps.
MTIME_SLACK_S = 2


@dataclass
class Summary(RunSummary):
    downloaded: int = 0
    already_here: int = 0
    done_before: int = 0
    joined: int = 0
    joined_before: int = 0
    bytes_received: int = 0


@dataclass
class Options:
    """Seconds throughout: `sleep_seconds` between checks of a full local disk,
    `network_give_up_seconds` of network failure before a file is given up (FileProblem)."""

    workers: int = 4
    sleep_seconds: float = 1800
    network_give_up_seconds: float = 3600
    first_retry_delay: float = 1.0  # seconds; doubled after each failed attempt, up to a minute


class _Stopped(Exception):
    """Ctrl-C or a fatal error elsewhere: leave the partial file for the next run."""


@dataclass
class _Fill:
    """How far one partial file is written: `out` open for appending, `offset` bytes in it,
    `hasher` over them; `restarts` counts the times it started over (the file changed)."""

    out: BinaryIO
    offset: int
    hasher: ContentHasher
    restarts: int = 0


class Downloader:
    """Stage 2: downloads tasks into their partial files, verifies, renames, then joins split files.

    `pauses`: waits for local disk room (default: one built on options.sleep_seconds that ends
    when the run stops); tests give one with a stand-in disk usage."""

    def __init__(self, client: DropboxClient, journal: Journal | None, options: Options, log: logging.Logger,
                 pauses: Pauses | None = None):
        self.client = client
        self.journal = journal
        self.options = options
        self.log = log
        self.status = status_of(log)
        self.summary = Summary()
        self.failed_tasks: set[int] = set()
        self._runner = JobRunner({"download": options.workers}, options.workers * 4)
        self.pauses = pauses or Pauses(log, options.sleep_seconds, stop=self._stopping)
        self._network = RetryPolicy(give_up_seconds=options.network_give_up_seconds,
                                    first_delay=options.first_retry_delay)
        self._metadata = Retrier(log, METADATA_POLICY, stop=lambda: _Stopped() if self._stopping() else None)
        self._progress: ByteProgress | None = None
        self._summary_lock = threading.Lock()

    # -- helpers -----------------------------------------------------------------------------

    def _stopping(self) -> bool:
        return self._runner.stopping()

    def _advance(self, count: int, received: int = 0) -> None:
        """Move the bytes bar by `count` (negative: taken back) and count `received` bytes."""
        if received:
            with self._summary_lock:
                self.summary.bytes_received += received
        if self._progress is not None:
            self._progress.advance(count)

    def _log_result(self, task: Task, result: str, seconds: float) -> None:
        log_result(self.log, result, human_bytes(task.remote.size), seconds, task.dropbox_path, task.target,
                   logging.DEBUG if result == "DONE BEFORE" else logging.INFO)

    def _fail(self, task: Task, message: str) -> None:
        with self._summary_lock:
            self.summary.failures.append((task.dropbox_path, message))
            self.failed_tasks.add(id(task))
        if task.item is not None:
            self.journal.mark_failed(task.item, message)
        self.log.error("FAILED\t%s\t%s\t->\t%s: %s", human_bytes(task.remote.size), task.dropbox_path, task.target,
                       message)
        file_finished(self.log)

    def _count(self, field_name: str) -> None:
        with self._summary_lock:
            setattr(self.summary, field_name, getattr(self.summary, field_name) + 1)

    # -- one file ----------------------------------------------------------------------------

    def _existing(self, task: Task) -> str:
        """'download', 'done before' or 'here' for a task whose target may already exist;
        raises FileProblem when a different file (or a folder) is in the way."""
        target, remote, item = task.target, task.remote, task.item
        info = existing_file(target)
        if info is None:
            return "download"
        wanted_mtime = client_modified_epoch(remote.client_modified)
        if (item is not None and item.state == State.DONE and item.content_hash == remote.content_hash
                and info.st_size == remote.size and abs(int(info.st_mtime) - wanted_mtime) <= MTIME_SLACK_S):
            return "done before"
        if info.st_size == remote.size and (remote.content_hash is None
                                            or file_content_hash(target) == remote.content_hash):
            # The same bytes: give it Dropbox's date too, so the next run recognises it at once.
            try:
                os.utime(target, (info.st_atime, wanted_mtime))
            except OSError:
                pass  # a read-only file keeps its date; it is still the right file
            return "here"
        raise different_file(target, info.st_size, remote.size)

    def _resume_point(self, task: Task) -> tuple[int, ContentHasher]:
        """Continue a partial file left by an earlier run when it can belong to this version."""
        partial, remote, item = task.partial, task.remote, task.item
        legacy = legacy_temporary(task.target, "." + PARTIAL_TAG)
        if legacy is not None and not partial.exists():
            os.rename(legacy, partial)  # left by a version that named it `.~<name>.partial`
        try:
            size = os.lstat(partial).st_size
        except FileNotFoundError:
            return 0, ContentHasher()
        stale = item is not None and item.remote_rev and item.remote_rev != remote.rev
        if size > remote.size or stale or not partial.is_file():
            self.log.info("Discarding %s: it belongs to an older version of %s.", partial.name, task.dropbox_path)
            deletion.discard_temporary(partial)
            return 0, ContentHasher()
        if size:
            self.log.info("Resuming %s at %s of %s (partial download from an earlier run).", task.dropbox_path,
                          human_bytes(size), human_bytes(remote.size))
        hasher = hash_range(partial, 0, size)
        self._advance(size)
        return size, hasher

    def _fetch(self, task: Task, offset: int, hasher: ContentHasher) -> ContentHasher:
        """Fill the partial file up to the file's size, continuing after network trouble from
        the bytes already written (one Backoff: the trouble ends when a request's bytes all
        arrive). Returns the hasher of the whole partial file; raises FileProblem, _Stopped."""
        backoff = Backoff(self._network)
        with open(task.partial, "ab", buffering=0) as out:
            fill = _Fill(out, offset, hasher)
            while fill.offset < task.remote.size:
                if self._stopping():
                    raise _Stopped()
                try:
                    served, chunks = self.client.download_range(task.remote.path_lower, fill.offset, None,
                                                                chunk_size=READ_CHUNK)
                    self.status.network_ok()
                    if served.rev != task.remote.rev:
                        chunks.close()
                        self._restart_changed(task, fill, served)
                        continue
                    self._write_chunks(task, fill, chunks)
                    backoff.succeeded()
                except NetworkProblem as exc:
                    self._network_failed(task, fill.offset, backoff, exc)
                except RateLimited as exc:
                    nap(max(exc.retry_after, self._network.min_rate_wait), self._stopping)
                except RangeNotSatisfiable:
                    self._restart_shorter(task, fill)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise FileProblem(f"cannot write {task.partial} ({exc.strerror})",
                                          paths=[task.partial]) from None
                    self.pauses.wait_for_disk(task.partial.parent, task.remote.size - fill.offset,
                                              "the local disk is full")
            os.fsync(out.fileno())
        return fill.hasher

    def _write_chunks(self, task: Task, fill: _Fill, chunks: Iterator[bytes]) -> None:
        """Append what Dropbox serves; when the disk is nearly full, close the stream and wait
        for room (the caller asks again from the bytes written)."""
        folder = task.partial.parent
        for chunk in chunks:
            if not self.pauses.disk_has_room(folder, len(chunk)):
                chunks.close()
                self.pauses.wait_for_disk(folder, task.remote.size - fill.offset, "the local disk is nearly full")
                return
            try:
                write_all(fill.out, chunk)
            except OSError:
                chunks.close()
                os.ftruncate(fill.out.fileno(), fill.offset)  # drop a half-written chunk
                raise
            fill.hasher.update(chunk)
            fill.offset += len(chunk)
            self._advance(len(chunk), len(chunk))
            if self._stopping():
                chunks.close()
                raise _Stopped()

    def _network_failed(self, task: Task, offset: int, backoff: Backoff, exc: NetworkProblem) -> None:
        """Wait before asking again from `offset`; FileProblem once the trouble has lasted the give-up time."""
        if backoff.expired():
            raise FileProblem(f"the network failed for more than {self._network.give_up_seconds / 60:.0f} min "
                              f"({exc.message}); run again to continue from the bytes already downloaded",
                              paths=[task.dropbox_path]) from None
        delay = backoff.failed()
        # Each file says once where it continues; the shared status tells the rest.
        self.log.log(logging.INFO if backoff.first else logging.DEBUG, "%s: %s; continuing from byte %s in %.0f s.",
                     task.dropbox_path, exc.message, f"{offset:,}", delay)
        self.status.network_trouble(exc.message, delay, backoff.failures)
        nap(delay, self._stopping)

    def _restart_changed(self, task: Task, fill: _Fill, served: RemoteFile) -> None:
        """Dropbox serves another revision than the one listed: download that one from byte 0."""
        fill.restarts += 1
        if fill.restarts > 3:
            raise FileProblem("the file keeps changing in Dropbox while it is downloaded; try again later",
                              paths=[task.dropbox_path])
        self.log.info("%s changed in Dropbox since it was listed: downloading the new version.", task.dropbox_path)
        self._start_over(task, fill, served)
        if task.item is not None:
            self.journal.mark_downloading(task.item, served.rev)

    def _restart_shorter(self, task: Task, fill: _Fill) -> None:
        """The file is now shorter than the bytes already here (it changed in Dropbox): download
        its current version from byte 0; FileProblem when it is gone."""
        fresh = ask(self._metadata, "checking Dropbox", lambda: self.client.metadata(task.remote.path_lower))
        if not isinstance(fresh, RemoteFile):
            raise FileProblem("the file was deleted from Dropbox while it was downloaded",
                              paths=[task.dropbox_path]) from None
        self._start_over(task, fill, fresh)
        fill.restarts += 1

    def _start_over(self, task: Task, fill: _Fill, remote: RemoteFile) -> None:
        os.ftruncate(fill.out.fileno(), 0)
        self._advance(-fill.offset)
        fill.offset, fill.hasher, task.remote = 0, ContentHasher(), remote

    def _download(self, task: Task, started: float) -> None:
        remote, item = task.remote, task.item
        task.target.parent.mkdir(parents=True, exist_ok=True)
        for attempt in (1, 2):
            offset, hasher = self._resume_point(task)
            if item is not None and task.remote.size > READ_CHUNK:
                # Only a file big enough to leave a useful partial behind is worth a journal write.
                self.journal.mark_downloading(item, task.remote.rev)
            hasher = self._fetch(task, offset, hasher)
            remote = task.remote
            size = task.partial.stat().st_size
            local_hash = hasher.content_hash()
            if size == remote.size and (remote.content_hash is None or local_hash == remote.content_hash):
                break
            deletion.discard_temporary(task.partial)
            self._advance(-size)
            if attempt == 1:
                self.log.warning("%s: the downloaded bytes do not match Dropbox's content hash (corrupted on the "
                                 "way); downloading it again.", task.dropbox_path)
                continue
            raise FileProblem(f"the download was corrupted twice (its content hash {local_hash} differs from "
                              f"Dropbox's {remote.content_hash}); nothing was kept. Run again later.",
                              paths=[task.dropbox_path])
        wanted_mtime = client_modified_epoch(remote.client_modified)
        os.utime(task.partial, (time.time(), wanted_mtime))
        try:
            rename_without_replacing(task.partial, task.target)
        except FileExistsError:
            deletion.discard_temporary_quietly(task.partial)
            self._advance(-remote.size)
            raise FileProblem(f"{task.target} appeared while it was being downloaded; it was not replaced. "
                              "Move or rename it and run again.", paths=[task.target]) from None
        if item is not None:
            item.content_hash, item.remote_rev = local_hash, remote.rev
            self.journal.mark_done([item])
        self._count("downloaded")
        self._log_result(task, "DOWNLOADED", time.monotonic() - started)

    def _run_task(self, task: Task) -> None:
        if self._stopping():
            return
        started = time.monotonic()
        try:
            if task.problem:
                raise FileProblem(task.problem, paths=[task.dropbox_path])
            verdict = self._existing(task)
            if verdict == "done before":
                self._count("done_before")
                self._advance(task.remote.size)
                self._log_result(task, "DONE BEFORE", 0)
                return
            if verdict == "here":
                if task.item is not None:
                    task.item.content_hash, task.item.remote_rev = task.remote.content_hash, task.remote.rev
                    self.journal.mark_done([task.item])
                deletion.discard_temporary(task.partial)
                self._count("already_here")
                self._advance(task.remote.size)
                self._log_result(task, "ALREADY HERE", time.monotonic() - started)
                return
            self._download(task, started)
        except _Stopped:
            return
        except AuthError as exc:
            self._runner.fail(exc)
        except FileProblem as exc:
            self._fail(task, exc.message)
        except OSError as exc:
            self._fail(task, f"cannot write {exc.filename or task.target} ({exc.strerror})")

    # -- joining -----------------------------------------------------------------------------

    def join(self, series_list: list[Series]) -> None:
        for series in series_list:
            if self._stopping():
                return
            if series.state == "done":
                self._count("joined_before")
                self.log.debug("JOINED BEFORE\t%s\t%s", human_bytes(series.size), series.output)
                continue
            if any(id(t) in self.failed_tasks for t in series.tasks):
                message = "not joined: some of its parts could not be downloaded (see above)"
                self.summary.failures.append((str(series.output), message))
                self.log.error("NOT JOINED\t%s: %s", series.output, message)
                continue
            self._join_one(series)

    def _join_one(self, series: Series) -> None:
        started = time.monotonic()
        manifest = series.manifest_task
        first = min((t.target for t in series.tasks if split.parse_part_name(t.target.name)),
                    key=lambda p: split.parse_part_name(p.name)[1])
        start_from = first if first.exists() else (manifest.target if manifest else first)
        try:
            outcome = joining.join_split_file(start_from, delete_parts=manifest is not None, unzip=False,
                                              log=self.log)
        except FileProblem as exc:
            self.summary.failures.append((str(series.output), exc.message))
            self.log.error("NOT JOINED\t%s: %s", series.output, exc.message)
            return
        self._record_joined(series)
        self._count("joined")
        note = ("verified against its manifest; parts deleted" if manifest is not None else
                "NOT verified (no manifest); parts kept")
        self.log.info("JOINED\t%s\t%.1fs\t%d parts\t->\t%s (%s)", human_bytes(outcome.size),
                      time.monotonic() - started, len(series.tasks) - (manifest is not None),
                      series.output, note, extra=PER_FILE)

    def _record_joined(self, series: Series) -> None:
        """Remember the verified join so a rerun neither downloads the deleted parts again nor
        re-hashes the joined file: its size and modification time are the quick check."""
        info = series.output.stat()
        item = journal_item(self.journal.job, series.dropbox_key, series.output, Kind.JOINED, info.st_size,
                            info.st_mtime_ns)
        [item] = self.journal.sync_plan([item])
        item.content_hash, item.sha256 = series.signature, None
        self.journal.mark_done([item])

    # -- the whole job -----------------------------------------------------------------------

    def run(self, tasks: list[Task], series_list: list[Series], total_files: int) -> Summary:
        """Download `tasks` (per-file problems go to the summary), then join `series_list`.
        Raises what stops the run: AuthError, Ctrl-C, a bug; partial files stay for the next run."""
        started = time.monotonic()
        self.summary.files_total = total_files
        self._progress = ByteProgress(self.log, total=sum(t.remote.size for t in tasks), desc="Downloading",
                                      verb="download", files_total=len(tasks))
        try:
            with self._runner as runner:
                # Large files first, so one big file does not start last and finish alone.
                runner.run_each("download", self._run_task, sorted(tasks, key=lambda t: -t.remote.size))
        finally:
            self._progress.close()
        self._runner.raise_if_failed()
        self.join(series_list)
        self.summary.seconds = time.monotonic() - started
        return self.summary


def _connect(context: RunContext, problems: list[SheetProblem]) -> DropboxClient:
    """The logged-in client; without a login, the tab's own problems come first (SheetError)."""
    try:
        return open_client(context, workers=context.settings.workers)
    except AuthError:
        if problems:  # the tab's own problems first: they need no login to be fixed
            raise SheetError(problems) from None
        raise


def run(context: RunContext, sheet: str) -> int:
    """app.py with sheetName = 'dropboxDownload_API'."""
    settings, log = context.settings, context.log
    rows, problems = sheets.read_tab_with_problems(settings.excelName, sheet, COLUMNS)
    log.info("Download: %d row(s) in tab '%s' of %s.", len(rows), sheet, settings.excelName)
    with Journal(context.logs_root / "journal.sqlite3", sheet, log=context.log) as journal:
        client = _connect(context, problems)
        # Rows with a member name an archive: its table of contents is read now (Stage 1 too).
        members = member_fetch.plan_members(client, [row for row in rows if row["member"]], log)
        plan = plan_download(client, rows, [*problems, *members.problems], journal, log)
        clashes = member_fetch.clashes(members.tasks, (task.target for task in plan.tasks))
        if clashes:
            raise SheetError(clashes)
        member_fetch.log_plan(members, log)
        if context.args.dry_run:
            log.info("Dry run: nothing was downloaded.")
            return EXIT_OK
        todo = plan.todo
        bind_items(todo, journal)
        member_fetch.bind_items(members.tasks, journal)
        downloader = Downloader(client, journal, Options(workers=settings.workers,
                                                         sleep_seconds=settings.sleepTime_min * 60), log)
        wait_for_room(plan, downloader.pauses, log, member_fetch.space_needed(members.tasks))
        created_problems = create_folders(plan.folders)
        downloader.summary.failures.extend(created_problems)
        for path, message in created_problems:
            log.error("FAILED\t%s: %s", path, message)
        summary = downloader.summary
        if plan.tasks or not members.tasks:
            log.info("Downloading %d file(s), %s, with %d workers.", len(todo),
                     human_bytes(sum(t.remote.size for t in todo)), settings.workers)
            summary = downloader.run(todo, plan.series, len(plan.tasks))
        _fetch_members(context, client, journal, members, downloader.pauses, summary)
        _log_summary(context, summary)
        return EXIT_OK if summary.ok else EXIT_SOME_FAILED


def _fetch_members(context: RunContext, client: DropboxClient, journal: Journal, members: member_fetch.MemberPlan,
                   pauses: Pauses, summary: Summary) -> None:
    """Stage 2 of the rows with a member, counted in the run's summary."""
    if not members.tasks and not members.failures:
        return
    started = time.monotonic()
    fetcher = member_fetch.MemberFetcher(client, journal, context.log, pauses=pauses,
                                         workers=context.settings.workers)
    counts = fetcher.run(members.tasks)
    summary.files_total += len(members.tasks)
    summary.downloaded += counts.fetched
    summary.already_here += counts.already_here
    summary.done_before += counts.done_before
    summary.bytes_received += counts.bytes_received
    summary.failures.extend([*members.failures, *counts.failures])
    summary.seconds += time.monotonic() - started
    context.log.info("Archive members: %d fetched now with %d ranged request(s) (%s received), %d already here, "
                     "%d done in earlier runs; %d failed (each checked by its CRC-32 and size).", counts.fetched,
                     counts.requests, human_bytes(counts.bytes_received), counts.already_here, counts.done_before,
                     len(members.failures) + len(counts.failures))


def _log_summary(context: RunContext, summary: Summary) -> None:
    log = context.log
    speed = summary.bytes_received / summary.seconds if summary.seconds else 0
    log.info("Summary: %d files; %d downloaded now, %d already here, %d done in earlier runs; %d split file(s) "
             "joined now, %d joined earlier; %s received in %.0f s (%s/s); %d failed.",
             summary.files_total, summary.downloaded, summary.already_here, summary.done_before, summary.joined,
             summary.joined_before, human_bytes(summary.bytes_received), summary.seconds, human_bytes(speed),
             len(summary.failures))
    log_summary_end(log, summary, failed="Some files were not downloaded. Fix what the messages say and run "
                    "app.py again: finished files are not downloaded twice, and partial ones continue where they "
                    "stopped.", succeeded="Everything is downloaded and verified by content hash.",
                    log_path=context.log_path)
