"""Stage 1, data preparation: expand the sheet's rows into the files to send, map each to its
Dropbox path, plan the parts of files too large for Dropbox, and find every problem (case
collisions, names Dropbox refuses, unreadable files) before anything is sent."""

from __future__ import annotations

import logging
import os
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from . import split
from .errors import SheetError, SheetProblem
from .journal import Item
from .localfs import TEMP_PREFIX
from .units import GB, human_bytes, human_duration
from .sheets import SheetRow

# Dropbox's per-file limit through an upload session in its older documentation (newer: 2 TiB);
# API mode never plans a part above it unless a setting raises it.
DROPBOX_API_MAX_FILE = 350 * GB
# Names the Dropbox desktop app never syncs; sending them through the API would differ from
# what a synced folder holds.
IGNORED_NAMES = {"desktop.ini", "thumbs.db", ".ds_store", "._.ds_store", ".dropbox", ".dropbox.attr", "icon\r"}
TEMPORARY_PREFIX = TEMP_PREFIX  # this tool's own temporary files (zip, split and copy in progress)
MAX_NAME_CHARS = 255
LONG_PATH_CHARS = 260


@dataclass(slots=True)
class PlannedSource:
    """One local file and where it goes; `parts` is set when it is sent split."""

    row: SheetRow
    source: Path
    size: int
    mtime_ns: int
    destination: str  # Dropbox path (for a split file: the original name; parts are siblings)
    delete_after: bool
    parts: list[split.PartPlan] | None = None
    file_id: str | None = None  # "st_dev:st_ino" when listed (None on Windows, where scandir has no inode)

    @property
    def destination_folder(self) -> str:
        return self.destination.rsplit("/", 1)[0] or "/"

    @property
    def name(self) -> str:
        return self.destination.rsplit("/", 1)[1]

    def part_destination(self, part: split.PartPlan) -> str:
        return join_dropbox(self.destination_folder, split.part_name(self.name, part.index, len(self.parts or [])))

    def manifest_destination(self) -> str:
        return join_dropbox(self.destination_folder, split.manifest_name(self.name))

    def items(self, job: str) -> list[Item]:
        """The journal items that together put this file into Dropbox."""
        common = dict(id=None, job=job, source=str(self.source), source_size=self.size,
                      source_mtime_ns=self.mtime_ns, source_id=self.file_id)
        if not self.parts:
            return [Item(destination=self.destination, kind="file", part_offset=0, length=self.size, **common)]
        items = [Item(destination=self.part_destination(part), kind="part", part_offset=part.offset,
                      length=part.length, **common) for part in self.parts]
        items.append(Item(destination=self.manifest_destination(), kind="manifest", part_offset=0, length=0,
                          **common))
        return items


@dataclass
class Plan:
    sources: list[PlannedSource] = field(default_factory=list)
    skipped_ignored: int = 0
    skipped_links: int = 0
    warnings: list[str] = field(default_factory=list)
    done_rows: list[SheetRow] = field(default_factory=list)  # rows whose sources were uploaded and deleted
    empty_folders: list[str] = field(default_factory=list)  # Dropbox paths of folders with nothing inside

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.sources)

    @property
    def split_count(self) -> int:
        return sum(1 for s in self.sources if s.parts)

    @property
    def part_count(self) -> int:
        return sum(len(s.parts) for s in self.sources if s.parts)


def join_dropbox(folder: str, *names: str) -> str:
    path = folder.rstrip("/")
    for name in names:
        path += "/" + name
    return path or "/"


def is_ignored(name: str) -> bool:
    return name.lower() in IGNORED_NAMES or name.startswith(TEMPORARY_PREFIX)


def name_problem(name: str) -> str | None:
    """Why Dropbox would refuse this name, or None."""
    if name in (".", ".."):
        return f"the name {name!r} cannot be used in Dropbox"
    if "\\" in name or "/" in name:
        return f"the name {name!r} contains a slash or backslash, which Dropbox does not allow"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"the name {name!r} contains a control character"
    if len(name) > MAX_NAME_CHARS:
        return f"the name is {len(name)} characters long; Dropbox allows {MAX_NAME_CHARS}"
    return None


def case_key(dropbox_path: str) -> str:
    """Dropbox compares paths ignoring case (and Unicode normalisation)."""
    return unicodedata.normalize("NFC", dropbox_path).casefold()


def _walk_files(root: Path, plan: Plan, problems: list[str],
                empty_folders: list[Path]) -> Iterator[tuple[Path, os.stat_result]]:
    """Every regular file below root, without following links; iterative, one scandir per folder.
    Folders with nothing in them are collected so that they exist in Dropbox too."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                listed = list(entries)
        except OSError as exc:
            problems.append(f"cannot read the folder {folder} ({exc.strerror})")
            continue
        if not listed and folder != root:
            empty_folders.append(folder)
        for entry in sorted(listed, key=lambda e: e.name):
            if is_ignored(entry.name):
                plan.skipped_ignored += 1
                continue
            try:
                if entry.is_symlink():
                    plan.skipped_links += 1
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                    continue
                info = entry.stat(follow_symlinks=False)
            except OSError as exc:
                problems.append(f"cannot read {entry.path} ({exc.strerror})")
                continue
            if stat.S_ISREG(info.st_mode):
                yield Path(entry.path), info


def _readable(path: Path) -> str | None:
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return f"cannot open {path} for reading ({exc.strerror})"


def build_plan(rows: Sequence[SheetRow], *, input_column: str, output_column: str, delete_column: str,
               destination_of_row, part_limit: int, log: logging.Logger,
               already_done_sources: set[str] = frozenset(), check_readable: bool = True) -> Plan:
    """Expand every row; raise SheetError listing every problem so nothing starts half-planned.

    `destination_of_row(row) -> str` gives the Dropbox folder a row's files land in.
    """
    plan = Plan()
    problems: list[SheetProblem] = []
    seen: dict[str, tuple[Path, SheetRow]] = {}
    for row in rows:
        source_root: Path = row[input_column]
        target_folder = destination_of_row(row)
        row_problems: list[str] = []
        if not source_root.exists() and not source_root.is_symlink():
            if str(source_root) in already_done_sources:
                plan.done_rows.append(row)
                continue
            problems.append(row.problem(f"{input_column} {source_root} does not exist: check the spelling, and "
                                        "that the drive is connected", input_column))
            continue
        if source_root.is_symlink():
            problems.append(row.problem(f"{input_column} {source_root} is a link; give the real file or folder",
                                        input_column))
            continue
        if source_root.is_dir():
            empty: list[Path] = []
            found = ((path, info, path.relative_to(source_root).parts) for path, info in
                     _walk_files(source_root, plan, row_problems, empty))
        else:
            if is_ignored(source_root.name):
                plan.skipped_ignored += 1
                continue
            found = iter([(source_root, source_root.stat(), (source_root.name,))])
        for path, info, parts in found:
            bad = next((p for p in map(name_problem, parts) if p), None)
            if bad:
                row_problems.append(f"{path}: {bad}")
                continue
            destination = join_dropbox(target_folder, *parts)
            key = case_key(destination)
            if key in seen:
                other, other_row = seen[key]
                row_problems.append(f"{path} and {other} (row {other_row.row}) would both become "
                                    f"{destination} in Dropbox, which ignores upper/lower case: rename one")
                continue
            if check_readable:
                unreadable = _readable(path)
                if unreadable:
                    row_problems.append(unreadable)
                    continue
            seen[key] = (path, row)
            if len(destination) > LONG_PATH_CHARS:
                plan.warnings.append(f"{destination} is {len(destination)} characters long; the Dropbox "
                                     "desktop app on Windows may not sync paths over 260 characters")
            source = PlannedSource(row, path, info.st_size, info.st_mtime_ns, destination,
                                   bool(row[delete_column]), file_id=f"{info.st_dev}:{info.st_ino}" if info.st_ino else None)
            if info.st_size > part_limit:
                source.parts = split.plan_split(info.st_size, part_limit)
            plan.sources.append(source)
        if source_root.is_dir():
            plan.empty_folders.extend(join_dropbox(target_folder, *folder.relative_to(source_root).parts)
                                      for folder in empty)
        for text in row_problems[:50]:
            problems.append(row.problem(text, input_column))
        if len(row_problems) > 50:
            problems.append(row.problem(f"... and {len(row_problems) - 50} more problems like these", input_column))
    if problems:
        raise SheetError(problems)
    return plan


def log_plan(plan: Plan, log: logging.Logger, *, mode: str, bytes_per_second: float) -> None:
    log.info("Plan (%s): %d files, %s, %d split into %d parts; skipped %d names Dropbox ignores and %d links.",
             mode, len(plan.sources), human_bytes(plan.total_bytes), plan.split_count, plan.part_count,
             plan.skipped_ignored, plan.skipped_links)
    if plan.done_rows:
        log.info("%d row(s) were finished earlier and their originals deleted: nothing left to do for them.",
                 len(plan.done_rows))
    for warning in plan.warnings[:20]:
        log.warning("Warning: %s", warning)
    seconds = plan.total_bytes / bytes_per_second if bytes_per_second else 0
    log.info("Estimated time at %s/s: %s.", human_bytes(bytes_per_second), human_duration(seconds))


def iter_items(plan: Plan, job: str) -> Iterable[Item]:
    for source in plan.sources:
        yield from source.items(job)
