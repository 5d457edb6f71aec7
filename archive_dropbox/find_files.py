"""Finding original files in Dropbox (app.py with sheetName = 'findFiles'): each row of the tab
names a Dropbox folder (dropboxFolder) and a name or path pattern (pattern, as inventory.search
takes it), one search per row.

How a run goes:
1. Each row's folder is listed recursively (a folder inside another row's folder is covered by
   that listing, not listed twice).
2. Every inventory found there (inventory.is_inventory_name) is loaded into the local cache,
   logs/inventory_cache.sqlite3, only when it is new or its Dropbox rev changed; inventories
   cached under a listed folder but gone from Dropbox are dropped.
3. Every `.zip` archive there (stored whole, or as `<x>.zip_split_NNNN` parts with or without
   their manifest) that has no `<x>.zip.inventory.csv` beside it - an archive uploaded before
   the inventory existed, or by another tool - has its table of contents read with ranged
   requests (member_fetch.read_toc: one or two requests, a few more across parts), and its
   members are cached as the inventory it would have, under that name, with a revision made
   from its parts' revisions: it is read again only when the archive changes in Dropbox.
   The original path of such a member is not known (a zip does not record the lab's disk): it
   is the member's path under the archive's Dropbox folder (`/Lab/2024/s3.zip` holding
   `s3/frame_0412.tif` gives `/Lab/2024/s3/frame_0412.tif`); its date is the zip's (exact when
   the zip holds one, else its 2-second MS-DOS time read as this computer's local time).
   That inventory is also uploaded beside the archive when it has at most CSV_UPLOAD_LIMIT
   bytes (never replacing an existing file; not in a --dry-run; a refusal, such as a read-only
   shared folder, is only noted), so the next search anywhere needs no table of contents.
4. inventory.search per row. Every match goes to logs/findFiles/<timestamp>_matches.xlsx
   (`_matches_2.xlsx` for a second run in the same second; tab `matches`: original path, size,
   date, where it is, what fetching it downloads, and the dropboxPath and member to paste into
   the dropboxDownload_API tab; tab `searches`: one line per row); the console shows a summary
   per row, the first SHOWN matches and the workbook's path.

Exit status 0 when every folder was searched completely; 1 when an archive or inventory could
not be read (the matches found elsewhere are still written); 2 for a tab problem.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import inventory, member_fetch, names, sheets, split, tabs
from .cli import RunContext
from .deletion import discard_temporary_quietly
from .download_plan import METADATA_POLICY, ask, client_modified_epoch
from .dropbox_client import CommitRequest, DropboxClient, RemoteConflict, RemoteFile, RemoteFolder
from .errors import (EXIT_OK, EXIT_SOME_FAILED, ArchiveError, AuthError, EnvironmentProblem, FileProblem, SheetError,
                     SheetProblem)
from .inventory import InventoryError, Record
from .job_setup import open_client
from .localfs import temporary_sibling
from .logs import new_log_path
from .member_fetch import RemoteArchive, name_of
from .transfer import Retrier
from .units import MIB, human_bytes
from .zip_index import Directory

COLUMNS = list(tabs.FIND_FILES.columns)
CACHE_NAME = "inventory_cache.sqlite3"
TOC_REV_PREFIX = "toc:"  # Dropbox revs are hex digits: no inventory file has such a rev
CSV_UPLOAD_LIMIT = 32 * MIB
SHOWN = 20
MAX_ROWS = 1_000_000  # a spreadsheet tab holds 1,048,576 rows
MATCH_HEADER = ["row", "original path", "size (bytes)", "modified (UTC)", "where it is", "download size (bytes)",
                "dropboxPath", "member"]
SEARCH_HEADER = ["row", "dropboxFolder", "pattern", "matches", "download size (bytes)"]


def _folder_of(remote: RemoteFile) -> str:
    return (remote.path_display or remote.path_lower).rsplit("/", 1)[0]


# ----------------------------------------------------------------------------- what a folder holds


@dataclass
class Candidate:
    """A zip archive without an inventory beside it: `path` its Dropbox path as one file,
    `files` the listed files holding it (the file, or its `_split_NNNN` parts), `manifest` a
    split archive's manifest when listed."""

    path: str
    files: list[RemoteFile]
    manifest: RemoteFile | None = None
    split: bool = False

    @property
    def inventory_path(self) -> str:
        folder, name = self.path.rsplit("/", 1)
        return f"{folder}/{inventory.archive_inventory_name(name)}"

    @property
    def rev(self) -> str:
        """Changes whenever a part or the manifest changes in Dropbox."""
        listed = sorted(f"{f.path_lower}\0{f.rev}\0{f.size}" for f in [*self.files, *filter(None, [self.manifest])])
        return TOC_REV_PREFIX + hashlib.sha256("\n".join(listed).encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _is_relevant(entry: RemoteFile | RemoteFolder) -> bool:
    """Inventories, archives, and the parts and manifests of split archives (all a listing of
    millions of files needs to keep)."""
    if not isinstance(entry, RemoteFile):
        return False
    name = name_of(entry)
    if inventory.is_inventory_name(name) or name.lower().endswith(".zip"):
        return True
    parsed = split.parse_part_name(name)
    base = parsed[0] if parsed else split.parse_manifest_name(name)
    return base is not None and base.lower().endswith(".zip")


@dataclass
class Survey:
    """A listing sorted out: the inventories, and the archives that have none."""

    inventories: list[RemoteFile] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)


def survey(entries: Iterable[RemoteFile]) -> Survey:
    """Sort out the relevant files of a listing (any order)."""
    found = Survey()
    whole: dict[str, Candidate] = {}
    parted: dict[str, Candidate] = {}
    for entry in entries:
        folder, name = _folder_of(entry), name_of(entry)
        if inventory.is_inventory_name(name):
            found.inventories.append(entry)
            continue
        parsed = split.parse_part_name(name)
        base = parsed[0] if parsed else split.parse_manifest_name(name)
        if base is not None and base.lower().endswith(".zip"):
            candidate = parted.setdefault(names.case_key(f"{folder}/{base}"),
                                          Candidate(f"{folder}/{base}", [], split=True))
            if parsed:
                candidate.files.append(entry)
            else:
                candidate.manifest = entry
        elif name.lower().endswith(".zip"):
            whole[names.case_key(entry.path_display or entry.path_lower)] = Candidate(
                entry.path_display or entry.path_lower, [entry])
    have = {names.case_key(entry.path_display or entry.path_lower) for entry in found.inventories}
    for key, candidate in [*whole.items(), *((k, c) for k, c in parted.items() if k not in whole)]:
        if candidate.files and names.case_key(candidate.inventory_path) not in have:
            found.candidates.append(candidate)
    return found


# ----------------------------------------------------------------------------- archives' own records


def toc_records(archive: RemoteArchive, directory: Directory, skipped: list[str] | None = None) -> Iterator[Record]:
    """The inventory records of an archive read from its table of contents (see the module
    docstring for the original path and date); folder entries, and members an inventory cannot
    hold (names that are not text), are left out (their names go to `skipped`)."""
    folder, archive_name = archive.path.rsplit("/", 1)
    fallback_ns = client_modified_epoch(archive.parts[0].client_modified) * 1_000_000_000
    for member in directory:
        if member.is_dir or directory.find(member.name) is not member:
            continue
        record = Record(f"{folder}/{member.name}", member.size, member_fetch.member_mtime_ns(member, fallback_ns),
                        inventory.MEMBER, archive_name, member.name, member.crc32, member.compressed_size,
                        member.header_offset, archive.part_count)
        if inventory.record_problem(record) is None:
            yield record
        elif skipped is not None:
            skipped.append(member.name)


class Loader:
    """Opens the records of each inventory the cache needs (Cache.refresh's `open_records`):
    an inventory file downloaded from Dropbox, or an archive's table of contents read by ranges
    (then uploaded as the archive's inventory when `upload`). Counts what it read."""

    def __init__(self, client: DropboxClient, log: logging.Logger, work: Path, *, upload: bool):
        self.client, self.log, self.work, self.upload = client, log, work, upload
        self.retrier = Retrier(log, METADATA_POLICY)
        self.files: dict[str, RemoteFile] = {}
        self.candidates: dict[str, Candidate] = {}
        self.tocs_read = self.requests = self.bytes_read = self.uploaded = 0

    def listing(self, found: Survey) -> list[tuple[str, str]]:
        """(Dropbox path, rev) of every inventory, real or to be read from an archive."""
        listed = []
        for entry in found.inventories:
            path = entry.path_display or entry.path_lower
            self.files[names.case_key(path)] = entry
            listed.append((path, entry.rev))
        for candidate in found.candidates:
            self.candidates[names.case_key(candidate.inventory_path)] = candidate
            listed.append((candidate.inventory_path, candidate.rev))
        return listed

    def open_records(self, path: str) -> Iterator[Record]:
        key = names.case_key(path)
        if key in self.candidates:
            return self._toc(self.candidates[key])
        return self._csv(self.files[key])

    def _temporary(self, dropbox_path: str) -> Path:
        """Where an inventory of this Dropbox path is written or downloaded (logs/findFiles)."""
        self.work.mkdir(parents=True, exist_ok=True)
        return temporary_sibling(self.work / hashlib.sha256(dropbox_path.encode("utf-8", "surrogateescape")).hexdigest(),
                                 "csv")

    def _csv(self, remote: RemoteFile) -> Iterator[Record]:
        local = self._temporary(remote.path_lower)
        try:
            try:
                ask(self.retrier, f"reading the inventory {remote.path_display}",
                    lambda: self.client.download_to(remote.path_lower, local))
            except FileProblem as exc:
                raise InventoryError(f"inventory {remote.path_display}: {exc.message}",
                                     paths=[remote.path_display]) from None
            yield from inventory.read_csv(local, remote.path_display)
        finally:
            discard_temporary_quietly(local)

    def _archive(self, candidate: Candidate) -> RemoteArchive:
        if not candidate.split:
            return member_fetch.whole_archive(candidate.files[0])
        manifest = None
        if candidate.manifest is not None:
            manifest = member_fetch.read_manifest(self.client, self.retrier, candidate.manifest)
        return member_fetch.split_archive(candidate.path, candidate.files, manifest)

    def _toc(self, candidate: Candidate) -> Iterator[Record]:
        local = self._temporary(candidate.inventory_path.lower())
        try:
            try:
                archive = self._archive(candidate)
                directory, reader = member_fetch.read_toc(archive, self.client, self.retrier)
            except FileProblem as exc:  # damaged, changed, unsupported, a bad manifest, no network
                raise InventoryError(f"archive {candidate.path}: its table of contents cannot be read: "
                                     f"{exc.message}", paths=[candidate.path]) from None
            self.tocs_read += 1
            self.requests += reader.requests
            self.bytes_read += reader.bytes_read
            skipped: list[str] = []
            count = inventory.write_csv(toc_records(archive, directory, skipped), local)
            if skipped:
                self.log.info("%s: %d member(s) not listed (names that are not text): %s", candidate.path,
                              len(skipped), ", ".join(names.shown(n) for n in skipped[:5]))
            self.log.info("Read the table of contents of %s (%d files; it has no inventory yet).", candidate.path,
                          count)
            self._upload(candidate, local)
            yield from inventory.read_csv(local, candidate.inventory_path)
        finally:
            discard_temporary_quietly(local)

    def _upload(self, candidate: Candidate, local: Path) -> None:
        """Put the inventory beside its archive, never over an existing file; a refusal is noted."""
        size = local.stat().st_size
        if not self.upload or size > CSV_UPLOAD_LIMIT:
            return
        request = CommitRequest("", 0, candidate.inventory_path, datetime.now(timezone.utc).replace(tzinfo=None))
        try:
            self.retrier.call("uploading an inventory", lambda: self.client.upload(local.read_bytes(), request))
        except RemoteConflict:
            self.log.info("%s: not written, something else is already there.", candidate.inventory_path)
            return
        except ArchiveError as exc:  # a read-only folder, a full Dropbox: the search goes on without it
            self.log.info("%s: not written (%s); the next search reads the archive's table of contents again.",
                          candidate.inventory_path, exc.message)
            return
        self.uploaded += 1
        self.log.info("Wrote %s (%s): the next search does not need the archive's table of contents.",
                      candidate.inventory_path, human_bytes(size))


# ----------------------------------------------------------------------------- the job


def _row_check(row: sheets.SheetRow) -> list:
    pattern = row["pattern"]
    problem = inventory.pattern_problem(pattern) if pattern is not None else None
    return [row.problem(f"pattern {pattern!r}: {problem}", "pattern")] if problem else []


def _folder_key(folder: str) -> str:
    return names.case_key(folder).rstrip("/")


def folders_to_list(folders: Iterable[str]) -> list[str]:
    """The distinct folders, without those inside another one (its listing covers them)."""
    chosen: list[str] = []
    for folder in sorted(set(folders), key=lambda f: (len(_folder_key(f)), f)):
        key = _folder_key(folder)
        if not any(other == "" or key == other or key.startswith(other + "/") for other in map(_folder_key, chosen)):
            chosen.append(folder)
    return chosen


def _check_folders(client: DropboxClient, rows: list[sheets.SheetRow], retrier: Retrier,
                   earlier: list[SheetProblem]) -> None:
    """Every row's folder must be a folder in Dropbox: SheetError listing every one that is not,
    with the tab's own problems (`earlier`)."""
    problems = list(earlier)
    for row in rows:
        folder = row["dropboxFolder"]
        if folder is None or folder == "/":
            continue
        remote = ask(retrier, "checking Dropbox", lambda: client.metadata(folder))
        if remote is None:
            problems.append(row.problem(f"dropboxFolder {folder} does not exist in Dropbox: check the spelling (a "
                                        "Dropbox path starts with '/', e.g. /Archive/2024)", "dropboxFolder"))
        elif not isinstance(remote, RemoteFolder):
            problems.append(row.problem(f"dropboxFolder {folder} is a file: give the folder to search in",
                                        "dropboxFolder"))
    if problems:
        raise SheetError(sorted(problems, key=lambda problem: problem.row or 0))


def _connect(context: RunContext, problems: list[SheetProblem]) -> DropboxClient:
    """The logged-in client; without a login, the tab's own problems come first (SheetError)."""
    try:
        return open_client(context, workers=context.settings.workers)
    except AuthError:
        if problems:  # they need no login to be fixed
            raise SheetError(problems) from None
        raise


@dataclass
class Refreshed:
    """What bringing the cache up to date did, over every listed folder."""

    loaded: int = 0
    unchanged: int = 0
    dropped: int = 0
    failed: list[InventoryError] = field(default_factory=list)


def refresh(cache: inventory.Cache, client: DropboxClient, loader: Loader, folders: list[str],
            log: logging.Logger) -> Refreshed:
    """List each folder and bring the cache in line with what it holds (module docstring, 1-3)."""
    done = Refreshed()
    for folder in folders:
        entries = ask(loader.retrier, f"listing {folder}",
                      lambda: [entry for entry in client.iter_entries(folder) if _is_relevant(entry)])
        found = survey(entries)
        log.info("%s: %d inventory file(s), %d archive(s) without one.", folder, len(found.inventories),
                 len(found.candidates))
        summary = cache.refresh(loader.listing(found), loader.open_records, folder)
        done.loaded += len(summary["loaded"])
        done.unchanged += len(summary["unchanged"])
        done.dropped += len(summary["dropped"])
        done.failed += summary["failed"]
    return done


@dataclass
class RowResult:
    row: sheets.SheetRow
    matches: int = 0
    download: int = 0  # bytes fetching every match would download


def _cell(value: Any) -> Any:
    """A value a spreadsheet shows as it is: control characters (a Linux name may hold them)
    cannot be stored in .xlsx, and text starting with `=` would be taken for a formula (the
    space added before it is dropped again when the cell is pasted into a tab of inputs.xlsx)."""
    if not isinstance(value, str):
        return value
    text = "".join(c if c in "\t\n\r" or ord(c) >= 32 else "?" for c in value)
    return " " + text if text.startswith("=") else text


def _match_line(row: sheets.SheetRow, match: inventory.Match) -> list[Any]:
    member = match.member if match.kind == inventory.MEMBER else ""
    return [_cell(value) for value in (row.row, match.original_path, match.size, inventory.modified_text(match.mtime_ns),
                                       match.where, match.download_size, match.dropbox_path, member)]


def search_rows(cache: inventory.Cache, rows: list[sheets.SheetRow]) -> tuple[list[RowResult], list[list[Any]]]:
    """Every row's matches counted, and the first MAX_ROWS as workbook lines sorted by row and
    original path."""
    results, table = [], []
    for row in rows:
        result = RowResult(row)
        for match in inventory.search(cache, row["dropboxFolder"], row["pattern"]):
            result.matches += 1
            result.download += match.download_size
            if len(table) < MAX_ROWS:
                table.append(_match_line(row, match))
        results.append(result)
    table.sort(key=lambda line: (line[0], names.case_key(str(line[1]))))
    return results, table


def write_matches(folder: Path, results: list[RowResult], table: list[list[Any]]) -> Path:
    """logs/findFiles/<timestamp>_matches.xlsx (a new name each run)."""
    path = new_log_path(folder, "matches", ".xlsx")
    searches = [[r.row.row, _cell(r.row["dropboxFolder"]), _cell(r.row["pattern"]), r.matches, r.download]
                for r in results]
    return sheets.write_workbook(path, {"matches": (MATCH_HEADER, table), "searches": (SEARCH_HEADER, searches)})


def _log_results(log: logging.Logger, results: list[RowResult], table: list[list[Any]], workbook: Path) -> None:
    for result in results:
        row = result.row
        log.info("Row %d: '%s' in %s: %d match(es), %s to download.%s", row.row, row["pattern"], row["dropboxFolder"],
                 result.matches, human_bytes(result.download),
                 "" if result.matches else " (check the pattern: a name such as frame_0412.tif, a pattern such as "
                 "frame_04*, or a path pattern with / such as s3/*.xml)")
    total = sum(result.matches for result in results)
    if table:
        log.info("First %d of %d match(es), by original path (size, where it is):", min(SHOWN, len(table)), total)
        for line in table[:SHOWN]:
            log.info("  %s\t%s\t%s", line[1], human_bytes(line[2]), line[4])
    note = f" (the first {MAX_ROWS:,} of them)" if total > len(table) else ""
    log.info("Found %d match(es); fetching them all downloads %s. Every match%s is in %s (copy its dropboxPath and "
             "member into the dropboxDownload_API tab to get it back).", total,
             human_bytes(sum(result.download for result in results)), note, workbook)


def run(context: RunContext, sheet: str) -> int:
    """app.py with sheetName = 'findFiles'."""
    settings, log = context.settings, context.log
    rows, problems = sheets.read_tab_with_problems(settings.excelName, sheet, COLUMNS, row_check=_row_check)
    log.info("Find: %d search(es) in tab '%s' of %s.", len(rows), sheet, settings.excelName)
    client = _connect(context, problems)
    started = time.monotonic()
    loader = Loader(client, log, context.logs_root / "findFiles", upload=not context.args.dry_run)
    _check_folders(client, rows, loader.retrier, problems)
    cache_path = context.logs_root / CACHE_NAME
    try:
        cache = inventory.Cache(cache_path)
    except (OSError, sqlite3.Error) as exc:
        raise EnvironmentProblem(f"the inventory cache {cache_path} cannot be opened ({exc}). Is another findFiles "
                                 "run using it? Wait for it, or delete the file (it is rebuilt from Dropbox).",
                                 paths=[cache_path]) from None
    with cache:
        done = refresh(cache, client, loader, folders_to_list(row["dropboxFolder"] for row in rows), log)
        results, table = search_rows(cache, rows)
    log.info("Inventories: %d loaded now (%d read from archives' tables of contents with %d ranged request(s), %s), "
             "%d unchanged, %d dropped; %d written beside their archives; %.0f s.", done.loaded, loader.tocs_read,
             loader.requests, human_bytes(loader.bytes_read), done.unchanged, done.dropped, loader.uploaded,
             time.monotonic() - started)
    workbook = write_matches(context.logs_root / "findFiles", results, table)
    _log_results(log, results, table, workbook)
    for failure in done.failed:
        log.error("FAILED\t%s", failure.message)
    if done.failed:
        log.error("%d inventory or archive(s) could not be read (above): the files they list are missing from these "
                  "results. Run again later, or see what the messages say.", len(done.failed))
        return EXIT_SOME_FAILED
    return EXIT_OK
