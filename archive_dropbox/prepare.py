"""Stage 1, data preparation: expand the sheet's rows into the files to send, map each to its
Dropbox path, plan the parts of files too large for Dropbox, and find every problem (two items
Dropbox would take for one, names Dropbox refuses) across all rows in one pass, before anything
is sent. Names the desktop app ignores, links, special files and unreadable entries are skipped
and listed (unreadable ones also count as failures of the run). The name rules are in names.py."""

from __future__ import annotations

import logging
import operator
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Callable, Iterable, Iterator, Sequence

from tqdm import tqdm

from . import split
from .errors import SheetError, SheetProblem
from .journal import Item, Kind, folder_digest, settled_key
from .localfs import is_link_entry
from .plan_store import PlannedSource, PlanStore, join_dropbox  # noqa: F401 - re-exported, as before
# Re-exported: the upload engines, deletion and the tests import these from here.
from .names import (IGNORED_NAMES, MAX_NAME_CHARS, TEMPORARY_PREFIX, case_key, differ_only_in_form,  # noqa: F401
                    dropbox_path_problem, ignored_reason, is_ignored, name_problem, shown)
from .units import GB, human_bytes, human_duration
from .sheets import SheetRow

# Dropbox's per-file limit through an upload session in its older documentation (newer: 2 TiB);
# API mode never plans a part above it unless a setting raises it.
DROPBOX_API_MAX_FILE = 350 * GB
LONG_PATH_CHARS = 260
SKIPPED_ON_SCREEN = 20  # unreadable entries shown on screen; the dataPrep log lists them all
# Per-file cost of Stage 2 for the estimate, in seconds per file Dropbox stores (the bytes' time
# comes on top: a file costs requests and commits whatever its size). API: issue 17's target for
# small files, 600 files/s at 8 workers with 50 ms per request (866 files/s measured against the
# local test server, README's benchmark table). Desktop app: assumed, not measured here - the app
# syncs and indexes file by file; 20 files/s is a conservative figure for trees of small files.
SECONDS_PER_FILE = {"API": 1 / 600, "desktop app": 1 / 20}
PLAN_BAR_EVERY = 2.0  # seconds between redraws of Stage 1's counter on a terminal
PLAN_SAY_EVERY = 60.0  # seconds between Stage 1's progress lines in the run log (and on the console)
FOLDER_BATCH = 500  # files of one folder looked up in the journal together


@dataclass
class Plan:
    """What Stage 1 found. `sources`: the files to send, in order; build_plan gives a PlanStore (on
    disk, read in pages), tests and the inventory writer may give a list."""

    sources: Sequence[PlannedSource] = field(default_factory=list)
    skipped_ignored: int = 0
    skipped_links: int = 0
    skipped_other: int = 0  # pipes, sockets, devices
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path as shown, why), for the dataPrep log
    # (path as shown, reason): not sent; the run's summary counts them as failures (exit 1).
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the first SKIPPED_ON_SCREEN of them
    long_paths: int = 0  # destinations over LONG_PATH_CHARS (the first ones are among the warnings)
    done_rows: list[SheetRow] = field(default_factory=list)  # rows whose sources were uploaded and deleted
    empty_folders: list[str] = field(default_factory=list)  # Dropbox paths of folders with nothing inside
    folders_listed: int = 0  # folders read while walking the rows (for the progress of Stage 1)
    # case_key of every Dropbox folder the plan puts files in or creates (and the folders above
    # them); None when not known (a plan not made by build_plan). A tree has far fewer folders
    # than files, so this is what the destination check keeps of Dropbox's files.
    folder_keys: set[str] | None = None
    # Files of settled folders (every file sent, verified and unchanged since, by the journal's
    # folder digest): not listed in `sources`, not opened, not looked up in Dropbox.
    settled_files: int = 0
    settled_bytes: int = 0

    # A PlanStore counts as it is filled; a list is counted here.
    @property
    def total_bytes(self) -> int:
        counted = getattr(self.sources, "total_bytes", None)
        return counted if counted is not None else sum(s.size for s in self.sources)

    @property
    def split_count(self) -> int:
        counted = getattr(self.sources, "split_count", None)
        return counted if counted is not None else sum(1 for s in self.sources if s.parts)

    @property
    def part_count(self) -> int:
        counted = getattr(self.sources, "part_count", None)
        return counted if counted is not None else sum(len(s.parts) for s in self.sources if s.parts)

    @property
    def files_to_store(self) -> int:
        """The files Dropbox will hold: one per source, parts instead of a split one (plus its manifest)."""
        return len(self.sources) + self.part_count


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _skip_special(plan: Plan, path: str, info: os.stat_result) -> bool:
    """Links, pipes, sockets and devices are never sent: counted, and listed in the dataPrep log."""
    if stat.S_ISLNK(info.st_mode):
        plan.skipped_links += 1
        plan.skipped.append((shown(path), "a link (links are never followed)"))
    elif not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        plan.skipped_other += 1
        plan.skipped.append((shown(path), "not a regular file (a pipe, socket or device)"))
    else:
        return False
    return True


@dataclass(frozen=True, slots=True)
class SettledFolder:
    """A folder whose files are all settled (see Plan.settled_files): `relative` is its path
    relative to the row's folder; `files` and `size` (bytes) count its files."""

    relative: tuple[str, ...]
    files: int
    size: int

    def count_in(self, plan: "Plan", progress: "PlanProgress | None") -> None:
        plan.settled_files += self.files
        plan.settled_bytes += self.size
        if progress is not None:
            progress.file(self.size, plan, count=self.files)


_NAME = operator.attrgetter("name")

# settled(local folder, its parts relative to the row's folder, its files as (entry, stat) in
# name order) -> whether they are all settled (then they are not yielded one by one).
SettledCheck = Callable[[str, tuple[str, ...], list[tuple[os.DirEntry, os.stat_result]]], bool]


def _walk_files(root: Path, plan: Plan, problems: list[str], empty_folders: list[Path],
                settled: SettledCheck | None = None
                ) -> Iterator[tuple[str, os.stat_result, tuple[str, ...]] | SettledFolder]:
    """Every regular file below root whose name Dropbox takes, without following links; iterative,
    one scandir per folder. Refused names go to `problems` (folders with one are still walked, so
    that everything to rename is listed at once); what is not sent goes to plan.skipped or, when it
    cannot be read, plan.unreadable. Folders with nothing in them are collected so that they exist
    in Dropbox too. Yields (path as text, stat, its parts relative to root): the folder's parts are
    kept with it, and no Path is made per file, since pathlib's parsing cost more than the walk.
    A folder `settled` accepts is yielded as one SettledFolder instead of its files, and its
    files' names are not checked again (they were when they were sent)."""
    stack: list[tuple[Path, tuple[str, ...]]] = [(root, ())]
    while stack:
        folder, relative = stack.pop()
        try:
            with os.scandir(folder) as entries:
                listed = list(entries)
        except OSError as exc:
            plan.unreadable.append((shown(folder), f"{_reason(exc)}; a folder, so nothing inside it is sent"))
            continue
        plan.folders_listed += 1
        if not listed and folder != root:
            empty_folders.append(folder)
        files: list[tuple[os.DirEntry, os.stat_result]] = []
        for entry in sorted(listed, key=_NAME):
            why = ignored_reason(entry.name)
            if why:
                plan.skipped_ignored += 1
                plan.skipped.append((shown(entry.path), why))
                continue
            try:
                info = entry.stat(follow_symlinks=False)
                # A regular file's lstat is never a link or junction (those read as links or
                # folders): the common case skips the link and special-file checks.
                if S_ISREG(info.st_mode):
                    files.append((entry, info))
                    continue
                linked = is_link_entry(entry)
            except OSError as exc:
                plan.unreadable.append((shown(entry.path), _reason(exc)))
                continue
            if linked:
                # A Windows junction's lstat says "folder": walked, its files would be uploaded and
                # then deleted (deleteAfterUpload) where it points, outside the folder the user named.
                plan.skipped_links += 1
                plan.skipped.append((shown(entry.path), "a link or junction (links are never followed)"))
                continue
            if _skip_special(plan, entry.path, info):
                continue
            bad = name_problem(entry.name)  # a folder: regular files went to `files` above
            if bad:
                problems.append(f"{shown(entry.path)}: {bad}")
            stack.append((Path(entry.path), (*relative, entry.name)))
        if settled is not None and files and settled(str(folder), relative, files):
            yield SettledFolder(relative, len(files), sum(info.st_size for _, info in files))
            continue
        for entry, info in files:
            bad = name_problem(entry.name)
            if bad:
                problems.append(f"{shown(entry.path)}: {bad}")
            else:
                yield entry.path, info, (*relative, entry.name)


def _unreadable(path: str) -> str | None:
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return _reason(exc)


class _Namespace:
    """Every path the plan creates in Dropbox, to find two items Dropbox would take for one before
    anything is sent: two files (caught by the plan store's UNIQUE index), or a file and a folder
    (`run` beside `RUN/`). Folders are held here by case_key: a tree has far fewer folders than
    files, and each folder is registered once (build_plan checks a folder's chain once)."""

    def __init__(self, store: PlanStore) -> None:
        self.store = store
        self.folders: dict[str, tuple[str, str, SheetRow]] = {}  # key -> (destination, where it comes from, row)
        # Dropbox folders (by the case_key of their path) -> the first local folder whose files
        # are planned into it / the settled local folders (with their rows) in it. A Dropbox
        # folder filled from one local folder needs no more: its names were checked together.
        self.filled: dict[str, str] = {}
        self.settled: dict[str, list[tuple[str, SheetRow]]] = {}
        self._settled_names: dict[str, dict[str, str]] = {}  # local folder -> case_key(name) -> name

    def fills(self, folder_key: str, local_folder: str) -> None:
        """Files of `local_folder` are planned into the Dropbox folder `folder_key`."""
        self.filled.setdefault(folder_key, local_folder)

    def settle(self, folder_key: str, local_folder: str, row: SheetRow) -> bool:
        """Whether a settled local folder may stay out of the plan: not when files of another
        local folder are planned into the same Dropbox folder (their names must meet in the
        plan store)."""
        other = self.filled.get(folder_key)
        if other is not None and other != local_folder:
            return False
        self.settled.setdefault(folder_key, []).append((local_folder, row))
        return True

    def _settled_clash(self, path: str, row: SheetRow, destination: str, key: str) -> str | None:
        """The problem when a settled file of another local folder would be `destination` too."""
        folder_key, _, name_key = key.rpartition("/")
        for local_folder, other_row in self.settled.get(folder_key, ()):
            if local_folder == os.path.dirname(path):
                continue
            names = self._settled_names.get(local_folder)
            if names is None:
                with os.scandir(local_folder) as entries:
                    names = {case_key(entry.name): entry.name for entry in entries}
                self._settled_names[local_folder] = names
            other = names.get(name_key)
            if other is not None:
                other_destination = destination.rsplit("/", 1)[0] + "/" + other
                return _file_clash(shown(path), destination,
                                   (other_destination, os.path.join(local_folder, other), other_row))
        return None

    def add_file(self, row: SheetRow, path: str, info: os.stat_result, destination: str,
                 delete_after: bool) -> str | None:
        """Plan a file; the problem when Dropbox would take it for another item (nothing planned then)."""
        key = case_key(destination)
        if key in self.folders:
            return _folder_clash(shown(path), row, destination, self.folders[key])
        if self.settled and (clash := self._settled_clash(path, row, destination, key)):
            return clash
        other = self.store.add(row, path, info.st_size, info.st_mtime_ns, destination, delete_after,
                               f"{info.st_dev}:{info.st_ino}" if info.st_ino else None, key)
        if other is None and info.st_size > self.store.part_limit:
            # Its parts and manifest are files in Dropbox too: beside it, named after it.
            planned = PlannedSource(row, Path(path), info.st_size, 0, destination, delete_after,
                                    split.plan_split(info.st_size, self.store.part_limit))
            siblings = [planned.part_destination(part) for part in planned.parts] + [planned.manifest_destination()]
            for sibling in siblings if self.settled else ():
                if clash := self._settled_clash(path, row, sibling, case_key(sibling)):
                    return clash
            other = self.store.claim(row, path, siblings)
            if other is not None:
                return _file_clash(shown(path), other[0], other)
        return None if other is None else _file_clash(shown(path), destination, other)

    def add_folders(self, chain: Iterable[tuple[str, str]], row: SheetRow) -> str | None:
        """Register folders, deepest first, as (destination, where); stops at one already known
        (its parents are known too). The problem when one of them is a planned file."""
        for destination, where in chain:
            key = case_key(destination)
            if key in self.folders:
                return None
            other = self.store.file_at(destination)
            if other is not None:
                other_destination, other_path, other_row = other
                return _folder_clash(shown(other_path), other_row, other_destination, (destination, where, row))
            self.folders[key] = (destination, where, row)
        return None


def _file_clash(path: str, destination: str, other: tuple[str, Path, SheetRow]) -> str:
    other_destination, other_file, other_row = other
    other_path = shown(other_file)
    both = f"{path} and {other_path} (row {other_row.row})"
    if os.path.realpath(path) == os.path.realpath(other_path):
        return (f"{path} is given twice: row {other_row.row} sends it to {destination} already (a file row "
                "inside a folder row?): remove one of the two rows")
    if destination == other_destination:
        return (f"{both} would both be {destination} in Dropbox: rename one, or send them to different "
                "folders")
    if differ_only_in_form(destination, other_destination):
        return (f"{both} have names that differ only in Unicode form (accents written composed or "
                f"decomposed, as macOS writes them); Dropbox stores both as one name, {destination}: rename "
                "or remove one")
    return (f"{both} would both become {destination} in Dropbox, which ignores upper/lower case: "
            "rename one")


def _folder_clash(file_path: str, file_row: SheetRow, destination: str,
                  folder: tuple[str, str, SheetRow]) -> str:
    folder_destination, where, folder_row = folder
    return (f"the file {file_path} (row {file_row.row}) and the folder {where} (row {folder_row.row}) would "
            f"both be {folder_destination} in Dropbox, which ignores upper/lower case; a file and a folder "
            "cannot share a name there: rename one")


def _folder_chain(target_folder: str, source_root: Path, folder_parts: Sequence[str],
                  output_column: str, row: SheetRow) -> Iterator[tuple[str, str]]:
    """The Dropbox folders that a folder at `folder_parts` (relative to the row's folder) needs,
    itself first, each with what it comes from: a local folder, or the row's output folder and
    the folders above it."""
    for depth in range(len(folder_parts), 0, -1):
        yield join_dropbox(target_folder, *folder_parts[:depth]), shown(source_root.joinpath(*folder_parts[:depth]))
    folder = target_folder
    while folder not in ("", "/"):
        yield folder, f"{folder} ({output_column} of row {row.row}, or a folder above it)"
        folder = folder.rsplit("/", 1)[0]


class PlanProgress:
    """What Stage 1 has found so far, while it walks the rows: a counter on a terminal (stderr,
    redrawn at most every PLAN_BAR_EVERY seconds; nothing when not a terminal) and a line in
    `log` every PLAN_SAY_EVERY seconds ("Stage 1: 1,234,567 files (1.20 TB) in 45,678 folders so
    far, 5,120 files/s; sheet row 4 (3 of 5): D:\\data\\run1"), so that a long walk never looks hung."""

    def __init__(self, log: logging.Logger, *, clock=time.monotonic):
        self._log, self._clock = log, clock
        self.files = self.bytes = 0
        self._row = ""
        self._started = self._drawn = self._said = clock()
        self._bar = tqdm(unit=" files", desc="Stage 1: listing", disable=None, mininterval=0, dynamic_ncols=True,
                         leave=False)

    def row(self, row: SheetRow, number: int, count: int, source: object) -> None:
        """Row `number` of `count` (1-based) is walked now."""
        self._row = f"sheet row {row.row} ({number} of {count}): {source}"

    def file(self, size: int, plan: Plan, count: int = 1) -> None:
        """One more file found (`size` bytes), or `count` files of `size` bytes in all; `plan`
        holds the folders listed so far."""
        self.files += count
        self.bytes += size
        now = self._clock()
        if now - self._drawn >= PLAN_BAR_EVERY:
            self._drawn = now
            if not self._bar.disable:
                row = self._row if len(self._row) <= 80 else "..." + self._row[-77:]
                self._bar.set_postfix_str(f"{human_bytes(self.bytes)} in {plan.folders_listed:,} folders; {row}",
                                          refresh=False)
                self._bar.update(self.files - self._bar.n)
            if now - self._said >= PLAN_SAY_EVERY:
                self._said = now
                self._log.info("%s", self.describe(plan))

    def describe(self, plan: Plan) -> str:
        elapsed = self._clock() - self._started
        rate = self.files / elapsed if elapsed > 0 else 0.0
        return (f"Stage 1: {self.files:,} files ({human_bytes(self.bytes)}) in {plan.folders_listed:,} folders so "
                f"far, {rate:,.0f} files/s; {self._row}")

    def close(self) -> None:
        self._bar.close()


def build_plan(rows: Sequence[SheetRow], *, input_column: str, output_column: str, delete_column: str,
               destination_of_row, part_limit: int, log: logging.Logger,
               already_done_sources: set[str] = frozenset(), check_readable: bool = True,
               progress: PlanProgress | None = None,
               sent_unchanged: Callable[[list[tuple[str, int, int]]], set[str]] | None = None,
               settled_folder: Callable[[int, bytes], bool] | None = None) -> Plan:
    """Expand every row; raise SheetError listing every problem so nothing starts half-planned.

    `destination_of_row(row) -> str` gives the Dropbox folder a row's files land in. Files that
    cannot be read are not a problem of the sheet: they go to plan.unreadable and the rest is sent.
    `progress` hears of every row and file found. `sent_unchanged([(path, size, mtime_ns), ...])`
    gives those of a folder's files that went up in an earlier run and have not changed since
    (journal.sent_unchanged_among): they are not opened to check they can be read, so a rerun
    costs what changed. `settled_folder(settled_key, folder_digest)` (journal.settled_folders.holds)
    says whether a folder's files are all as they were when every one of them was sent: such a
    folder of a row that deletes nothing is counted (plan.settled_files) and not planned.
    """
    plan = Plan(sources=PlanStore(part_limit))
    problems: list[SheetProblem] = []
    namespace = _Namespace(plan.sources)
    for number, row in enumerate(rows, start=1):
        if progress is not None:
            progress.row(row, number, len(rows), row[input_column])
        target_folder = destination_of_row(row)
        bad_output = dropbox_path_problem(target_folder)
        if bad_output:
            problems.append(row.problem(f"{output_column} {row[output_column]}: {bad_output}", output_column))
        row_problems: list[str] = []
        settled = None
        if settled_folder is not None and not row[delete_column]:
            settled = _settled_check(settled_folder, namespace, row, target_folder, part_limit)
        expanded = _expand_row(row, row[input_column], input_column, plan, problems, row_problems,
                               already_done_sources, settled)
        if expanded is not None:
            source_root, found, empty = expanded
            registered: tuple[str, ...] | None = None  # the folder whose Dropbox chain is known to be fine
            for entry in _with_journal(found, sent_unchanged if check_readable else None):
                if type(entry) is SettledFolder:
                    entry.count_in(plan, progress)
                    clash = namespace.add_folders(
                        _folder_chain(target_folder, source_root, entry.relative, output_column, row), row)
                    if clash:
                        row_problems.append(clash)
                    registered = None
                    continue
                path, info, parts, unchanged = entry
                if progress is not None:
                    progress.file(info.st_size, plan)
                if check_readable and not unchanged and (reason := _unreadable(path)):
                    plan.unreadable.append((shown(path), reason))
                    continue
                destination = join_dropbox(target_folder, *parts)
                _check_length(destination, plan)
                clash = namespace.add_file(row, path, info, destination, bool(row[delete_column]))
                # A folder's files come one after another: its chain of Dropbox folders is checked
                # once, not once per file.
                if not clash and parts[:-1] != registered:
                    clash = namespace.add_folders(
                        _folder_chain(target_folder, source_root, parts[:-1], output_column, row), row)
                    registered = None if clash else parts[:-1]
                    namespace.fills(case_key(destination).rpartition("/")[0], os.path.dirname(path))
                if clash:
                    row_problems.append(clash)
            for folder in empty:
                relative = folder.relative_to(source_root).parts
                plan.empty_folders.append(join_dropbox(target_folder, *relative))
                clash = namespace.add_folders(_folder_chain(target_folder, source_root, relative, output_column, row),
                                              row)
                if clash:
                    row_problems.append(clash)
        for text in row_problems[:50]:
            problems.append(row.problem(text, input_column))
        if len(row_problems) > 50:
            problems.append(row.problem(f"... and {len(row_problems) - 50} more problems like these", input_column))
    plan.folder_keys = set(namespace.folders)
    if problems:
        raise SheetError(problems, plan=plan)
    return plan


def _settled_check(settled_folder: Callable[[int, bytes], bool], namespace: _Namespace, row: SheetRow,
                   target_folder: str, part_limit: int) -> SettledCheck:
    """The walk's question for one row: are all of a folder's files settled? The digest is
    computed as the upload recorded it (record_settled_folders in the engines), from what the
    walk already has: no file is opened."""

    def parts(size: int) -> int:
        return len(split.plan_split(size, part_limit))

    def settled(local_folder: str, relative: tuple[str, ...],
                files: list[tuple[os.DirEntry, os.stat_result]]) -> bool:
        # Both folder names as a file's destination gives them (journal.item_folder_key and
        # add_file's key), so that every side agrees, at the top ("/") too.
        probe = join_dropbox(target_folder, *relative, "-")
        dropbox_folder = probe.rsplit("/", 1)[0] or "/"
        # As the upload records it from the plan (api_upload.record_settled_folders): a file
        # id only where the walk gives one an inode (Windows' listing gives none).
        digest = folder_digest([entry.name for entry, _ in files],
                               [number for _, info in files for number in
                                (info.st_size, info.st_mtime_ns, parts(info.st_size) if info.st_size > part_limit else 0)],
                               [number for _, info in files for number in
                                ((info.st_dev, info.st_ino) if info.st_ino else (0, 0))])
        return (settled_folder(settled_key(local_folder, dropbox_folder), digest)
                and namespace.settle(case_key(probe).rpartition("/")[0], local_folder, row))

    return settled


def _with_journal(found: Iterable[tuple[str, os.stat_result, tuple[str, ...]] | SettledFolder],
                  sent_unchanged: Callable[[list[tuple[str, int, int]]], set[str]] | None
                  ) -> Iterator[tuple[str, os.stat_result, tuple[str, ...], bool] | SettledFolder]:
    """`found` with, for each file, whether the journal has it sent and unchanged; asked once per
    folder (a folder's files come one after another), since a query per file cost more than
    opening the file. Settled folders pass through as they are."""
    if sent_unchanged is None:
        for entry in found:
            yield entry if type(entry) is SettledFolder else (*entry, False)
        return
    batch: list[tuple[str, os.stat_result, tuple[str, ...]]] = []

    def flush() -> Iterator[tuple[str, os.stat_result, tuple[str, ...], bool]]:
        known = sent_unchanged([(path, info.st_size, info.st_mtime_ns) for path, info, _ in batch])
        for path, info, parts in batch:
            yield path, info, parts, path in known
        batch.clear()

    for entry in found:
        if type(entry) is SettledFolder:
            if batch:
                yield from flush()
            yield entry
            continue
        if batch and (entry[2][:-1] != batch[0][2][:-1] or len(batch) >= FOLDER_BATCH):
            yield from flush()
        batch.append(entry)
    if batch:
        yield from flush()


def _expand_row(row: SheetRow, source_root: Path, input_column: str, plan: Plan, problems: list[SheetProblem],
                row_problems: list[str], already_done_sources: set[str], settled: SettledCheck | None = None
                ) -> tuple[Path, Iterator[tuple[str, os.stat_result, tuple[str, ...]] | SettledFolder],
                           list[Path]] | None:
    """(the row's file or folder, its files as (path, stat, parts relative to the row's folder), the
    empty folders found on the way: filled while the files are read), or None: nothing to plan."""
    if not source_root.exists() and not source_root.is_symlink():
        if str(source_root) in already_done_sources:
            plan.done_rows.append(row)
            return None
        problems.append(row.problem(f"{input_column} {source_root} does not exist: check the spelling, and "
                                    "that the drive is connected", input_column))
        return None
    if source_root.is_symlink():
        problems.append(row.problem(f"{input_column} {source_root} is a link; give the real file or folder",
                                    input_column))
        return None
    empty: list[Path] = []
    if source_root.is_dir():
        found = _walk_files(source_root, plan, row_problems, empty, settled)
        return source_root, found, empty
    why = ignored_reason(source_root.name)
    if why:
        plan.skipped_ignored += 1
        plan.skipped.append((shown(source_root), why))
        return None
    info = source_root.stat()
    if _skip_special(plan, str(source_root), info):
        return None
    bad = name_problem(source_root.name)
    if bad:
        row_problems.append(f"{shown(source_root)}: {bad}")
        return None
    return source_root.parent, iter([(str(source_root), info, (source_root.name,))]), empty


def _check_length(destination: str, plan: Plan) -> None:
    if len(destination) > LONG_PATH_CHARS:
        plan.long_paths += 1
        if len(plan.warnings) < SKIPPED_ON_SCREEN:
            plan.warnings.append(f"{destination} is {len(destination)} characters long; the Dropbox "
                                 "desktop app on Windows may not sync paths over 260 characters")


def log_plan(plan: Plan, log: logging.Logger, *, mode: str, bytes_per_second: float) -> None:
    log.info("Plan (%s): %d files, %s, %d split into %d parts; skipped %d names the Dropbox desktop app ignores, "
             "%d links, %d special files (pipes, sockets, devices) and %d entries that cannot be read%s.",
             mode, len(plan.sources), human_bytes(plan.total_bytes), plan.split_count, plan.part_count,
             plan.skipped_ignored, plan.skipped_links, plan.skipped_other, len(plan.unreadable),
             " (every skipped path is listed in the dataPrep log)" if plan.skipped or plan.unreadable else "")
    if plan.settled_files:
        log.info("Left out: %d files (%s) in folders where nothing changed since every file in them was sent and "
                 "verified in an earlier run (not opened, not looked up in Dropbox again; `python app.py --verify` "
                 "compares everything with Dropbox).", plan.settled_files, human_bytes(plan.settled_bytes))
    for path, reason in plan.unreadable[:SKIPPED_ON_SCREEN]:
        log.warning("%s cannot be read (%s): skipped, and counted as failed. Make it readable and run app.py "
                    "again.", path, reason)
    if len(plan.unreadable) > SKIPPED_ON_SCREEN:
        log.warning("... and %d more that cannot be read (all listed in the dataPrep log).",
                    len(plan.unreadable) - SKIPPED_ON_SCREEN)
    if plan.done_rows:
        log.info("%d row(s) were finished earlier and their originals deleted: nothing left to do for them.",
                 len(plan.done_rows))
    for warning in plan.warnings[:20]:
        log.warning("Warning: %s", warning)
    if plan.long_paths > SKIPPED_ON_SCREEN:
        log.warning("Warning: ... and %d more paths over %d characters.", plan.long_paths - SKIPPED_ON_SCREEN,
                    LONG_PATH_CHARS)
    log.info("Estimated time at %s/s and %s files/s: %s.", human_bytes(bytes_per_second),
             f"{1 / SECONDS_PER_FILE[mode]:,.0f}", human_duration(estimated_seconds(plan, mode, bytes_per_second)))


def estimated_seconds(plan: Plan, mode: str, bytes_per_second: float) -> float:
    """Stage 2's time for the whole plan: its bytes at `bytes_per_second` plus SECONDS_PER_FILE[mode]
    for every file Dropbox will hold (KeyError for a mode without a figure)."""
    return (plan.total_bytes / bytes_per_second if bytes_per_second else 0.0) + \
        plan.files_to_store * SECONDS_PER_FILE[mode]


def log_skipped(plan: Plan, log: logging.Logger) -> None:
    """Every path not sent, one line each, for the dataPrep log (the screen gets the counts)."""
    for path, why in plan.skipped:
        log.info("SKIPPED\t%s\t%s", path, why)
    for path, reason in plan.unreadable:
        log.info("SKIPPED\t%s\tcannot be read (%s): skipped", path, reason)


def iter_items(plan: Plan, job: str) -> Iterable[Item]:
    for source in plan.sources:
        yield from source.items(job)
