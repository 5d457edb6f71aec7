"""The inventory: for every ORIGINAL file (as it was on the lab's disk), where it lives in
Dropbox now, kept in Dropbox beside the data as CSV so that any machine logged in to the account
can find one file years later; and a local SQLite cache that makes repeated searches instant.
Pure local code: the engines list, download and upload the inventory files.

## Which inventory files, and where (in Dropbox)

- `<archive>.inventory.csv` beside each archive this tool made (`s3.zip` -> `s3.zip.inventory.csv`,
  also when the archive is stored as `s3.zip_split_NNNN` parts): one record per member. Dropbox
  lists it right under its archive, so a user browsing dropbox.com sees which archive it belongs
  to; it can be written as soon as the archive exists (before the upload) and for archives
  uploaded before the inventory existed (their table of contents read with ranged requests)
  without touching any other inventory.
- `_inventory_<row>_<8 hex>.csv` in the Dropbox folder of an upload row (its `outputDir`): one
  record per other original of that row (plain files and split files). `<row>` is the name of the
  row's `inputFile` (the folder `D:\\Microscope\\2024` -> `2024`), so the user recognises the row;
  the 8 hex digits (from the SHA-256 of the whole `inputFile` text) keep apart two rows from
  folders of the same name uploaded into one Dropbox folder, and a rerun of the same row replaces
  its own inventory. The leading `_` sorts it at the top of the folder's listing.
- Each original file is listed in exactly ONE inventory (a member of an archive in the archive's
  one, anything else in its row's one). Two inventories listing the same file are not merged: a
  search then returns it once per inventory (`Match.inventory` says which).
Both names keep within Dropbox's rules (`names.name_problem`): a name that would be longer than
255 characters is shortened, keeping the hex digest so that it stays unique.
`is_inventory_name` recognises both.

## The CSV format (version 1), readable without this tool

UTF-8 with a byte-order mark (so that Excel shows non-ASCII names correctly), RFC 4180: fields
separated by commas, a field holding a comma, a quote, CR or LF is quoted and its quotes doubled,
records end with CRLF. A quoted field may span lines: a file name may hold a newline (legal on
Linux) and it round-trips; a name that is not valid text (bytes that are not UTF-8, possible on
Linux) or holds NUL cannot be written, and write_csv refuses it. The first row is exactly the
column names below, in this order: it is the version mark (a later version will add columns at
the end, and this reader refuses files that have them).

- `original_path`: the file's path as it was on the user's disk
  (`D:\\Microscope\\2024\\s3\\frame_0412.tif`, `\\\\nas01\\lab\\...`, `/data/...`).
- `size_bytes`: its size in bytes.
- `modified_utc`: its modification time for people, `YYYY-MM-DDTHH:MM:SSZ` (UTC, floored to the
  second; empty outside the years 1-9999).
- `mtime_ns`: the same time, exact: nanoseconds since 1970-01-01 UTC (negative before).
- `kind`: `file` (a plain Dropbox file), `member` (a member of a zip archive) or `parts` (a file
  split into parts).
- `dropbox_path`: where it lives, RELATIVE to the Dropbox folder holding this CSV, `/` between
  names: the file (`file`); the archive, by its `.zip` name also when it is split (`member`); the
  original's name (`parts`: `<name>_split_0001`, ... and `<name>_split_manifest.json` beside it).
- `member`: for `member`, the member's name in the archive's table of contents
  (`s3/frame_0412.tif`); else empty.
- `crc32`: for `member`, its CRC-32 as 8 hex digits; else empty.
- `compressed_bytes`: for `member`, its compressed size in bytes (what fetching it downloads);
  else empty.
- `header_offset`: for `member`, where its local header starts in the archive (counted in the
  joined parts when the archive is split); else empty.
- `parts`: how many `_split_NNNN` parts hold the bytes: 0 = stored whole (always for `file`), at
  least 1 for `parts`; for `member`, the parts of its archive.

Why relative paths: Dropbox folders are moved and renamed, and a shared folder sits at a different
path in each member's Dropbox; the CSV moves with the data, so its records stay true. Absolute
place = the CSV's own Dropbox folder + `/` + `dropbox_path`.

Why CSV (and not SQLite) in Dropbox: any spreadsheet, text editor or script reads it; it streams
(written and read one record at a time); Dropbox shows its text. Do not re-save it from Excel:
Excel shows `mtime_ns` rounded and may show a CRC-32 such as `12e45678` as a number; the file
itself is only ever read as text. Names starting with `=` are shown by Excel as formulas.

## The local cache (SQLite, `Cache`), schema version 1 in `PRAGMA user_version`

    sources(id INTEGER PRIMARY KEY, dropbox_path TEXT, path_lower TEXT UNIQUE, folder_lower TEXT,
            rev TEXT, entries INTEGER, loaded_at TEXT)
        one row per inventory loaded: its Dropbox path (as listed), names.case_key of it and of its
        folder, the Dropbox `rev` (or content hash) of the version loaded - NULL while loading, so
        an interrupted load is never searched and is loaded again - its record count, and when
        (ISO-8601 UTC).
    folders(source_id, folder_no, original TEXT, lower TEXT, PRIMARY KEY(source_id, folder_no)) WITHOUT ROWID
        the folder part of original paths, with its separator (`D:\\Microscope\\s3\\`), and the
        same case-keyed with `\\` as `/` (`d:/microscope/s3/`): thousands of files share a folder.
    locations(source_id, location_no, kind TEXT, dropbox_path TEXT, path_lower TEXT, parts INTEGER,
              PRIMARY KEY(source_id, location_no)) WITHOUT ROWID
        where records live (relative to the inventory's folder, as in the CSV): one row per archive
        or per plain or split file.
    entries(source_id, entry_no, folder_no, name TEXT, name_lower TEXT, size INTEGER, mtime_ns INTEGER,
            location_no, member TEXT, crc32 INTEGER, compressed_size INTEGER, header_offset INTEGER,
            PRIMARY KEY(source_id, entry_no)) WITHOUT ROWID
        one row per record; entry_no is its number in the CSV (1 = the first after the header).
    INDEX entries_by_name ON entries(name_lower); INDEX locations_by_path ON locations(path_lower)

A full original path is `folders.original || entries.name`; its search form `folders.lower ||
entries.name_lower`. Keyed by source, the tables drop a reloaded inventory with range deletes and
no extra index; a folder restriction is decided per source (an inventory inside the folder: all
its records; one above it: those whose location is under the rest of the folder), so no index on
absolute Dropbox paths is needed. An inventory is reloaded only when its rev changed; records are
inserted 10,000 per transaction. A cache of another schema version, or not a database, is
rebuilt (everything in it can be loaded again from Dropbox).

Errors: InventoryError (a FileProblem) names the inventory and the line; ValueError for a search
pattern or folder that cannot be used (`pattern_problem`, `folder_problem` say why first).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .deletion import discard_temporary
from .errors import FileProblem
from .localfs import fsync_folder, temporary_sibling
from .names import MAX_NAME_CHARS, case_key, is_valid_text, name_problem, shown

COLUMNS = ("original_path", "size_bytes", "modified_utc", "mtime_ns", "kind", "dropbox_path", "member",
           "crc32", "compressed_bytes", "header_offset", "parts")
FILE, MEMBER, PARTS = "file", "member", "parts"
KINDS = (FILE, MEMBER, PARTS)
ARCHIVE_SUFFIX = ".inventory.csv"
ROW_PREFIX = "_inventory_"
SCHEMA_VERSION = 1
BATCH_ROWS = 10_000
# Folder and location numbers are remembered for the most recent ones only, so that loading uses
# the same memory whatever the inventory's size (records come in walk order: neighbours share).
_REMEMBERED = 50_000
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_HEX = frozenset("0123456789abcdefABCDEF")
_CONTROL = re.compile("[\x00-\x1f\x7f]")
# Dropbox refuses / and \; the desktop app cannot sync the others to Windows.
_UNSYNCABLE = frozenset('/\\<>:"|?*')


class InventoryError(FileProblem):
    """An inventory cannot be written or read; the message names the file and the line."""

    title = "Inventory problem"


@dataclass(frozen=True, slots=True)
class Record:
    """One original file and where it lives (see the module docstring for each field's rules).
    Sizes in bytes; `mtime_ns` in ns since the epoch (UTC); `dropbox_path` relative to the
    inventory's Dropbox folder; crc32, compressed_size, header_offset: members only (else None)."""

    original_path: str
    size: int
    mtime_ns: int
    kind: str
    dropbox_path: str
    member: str = ""
    crc32: int | None = None
    compressed_size: int | None = None
    header_offset: int | None = None
    parts: int = 0

    @property
    def name(self) -> str:
        return split_original(self.original_path)[1]


def modified_text(mtime_ns: int) -> str:
    """`2024-03-15T13:02:11Z` (UTC, floored to the second); "" outside the years 1-9999."""
    try:
        moment = _EPOCH + timedelta(microseconds=mtime_ns // 1000)
    except OverflowError:
        return ""
    return (f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
            f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}Z")


def split_original(path: str) -> tuple[str, str]:
    """An original path as (folder with its trailing separator, name). A path starting with `/`
    is POSIX (only `/` separates: `\\` is a legal character of Linux names); any other one is
    Windows' (`D:\\x`, `\\\\nas\\share\\x`, or `D:/x`), where both separate."""
    cut = path.rfind("/") if path.startswith("/") else max(path.rfind("/"), path.rfind("\\"))
    return path[:cut + 1], path[cut + 1:]


def _text_problem(text: str, what: str) -> str | None:
    if not is_valid_text(text):
        return f"the {what} '{shown(text)}' is not valid text (UTF-8); an inventory cannot hold it"
    if "\x00" in text:
        return f"the {what} {shown(text)!r} contains a NUL character"
    return None


@lru_cache(maxsize=4096)  # the members of an archive all give its path: checked once
def _dropbox_path_problem(path: str) -> str | None:
    problem = _text_problem(path, "Dropbox path")
    if problem:
        return problem
    if path.startswith("/"):
        return f"the Dropbox path {path!r} must be relative to the inventory's folder (no leading /)"
    if _CONTROL.search(path) or any(name in ("", ".", "..") for name in path.split("/")):
        return f"the Dropbox path {shown(path)!r} has an empty, '.', '..' or control-character name"
    return None


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _kind_problem(record: Record) -> str | None:
    """What is wrong with the fields that depend on the kind, or None."""
    member_fields = (record.crc32, record.compressed_size, record.header_offset)
    if record.kind == MEMBER:
        if not record.member:
            return "a member record needs the member's name"
        if not (_is_count(record.crc32) and record.crc32 < 2 ** 32):
            return f"the CRC-32 {record.crc32!r} is not a number from 0 to 2^32 - 1"
        if not (_is_count(record.compressed_size) and _is_count(record.header_offset)):
            return "a member record needs its compressed size and header offset (whole numbers >= 0)"
        return _text_problem(record.member, "member name")
    if record.member or any(value is not None for value in member_fields):
        return f"a {record.kind} record has no member name, CRC-32, compressed size or header offset"
    if record.kind == FILE and record.parts != 0:
        return "a plain file has 0 parts"
    if record.kind == PARTS and record.parts < 1:
        return "a split file has at least 1 part"
    return None


def record_problem(record: Record) -> str | None:
    """Why this record cannot be written to an inventory (a sentence), or None."""
    if record.kind not in KINDS:
        return f"the kind {record.kind!r} is not one of {', '.join(KINDS)}"
    problem = _text_problem(record.original_path, "original path")
    if problem:
        return problem
    if not split_original(record.original_path)[1]:
        return f"the original path {shown(record.original_path)!r} does not end with a file name"
    if not _is_count(record.size):
        return f"the size {record.size!r} is not a whole number of bytes >= 0"
    if type(record.mtime_ns) is not int:
        return f"the modification time {record.mtime_ns!r} is not a whole number of nanoseconds"
    if not _is_count(record.parts):
        return f"the number of parts {record.parts!r} is not a whole number >= 0"
    return _dropbox_path_problem(record.dropbox_path) or _kind_problem(record)


# ============================================================================ inventory file names


def _fit(base: str, tail: str, digest: str) -> str:
    """`base + tail`, or when that is too long for a Dropbox name, `base` shortened + `~` +
    `digest` + `tail` (never ending the shortened part with a space or period)."""
    if len(base) + len(tail) <= MAX_NAME_CHARS:
        return base + tail
    keep = MAX_NAME_CHARS - len(tail) - len(digest) - 1
    return base[:keep].rstrip(" .") + "~" + digest + tail


def archive_inventory_name(archive_name: str) -> str:
    """`s3.zip` -> `s3.zip.inventory.csv`, the archive's inventory beside it."""
    digest = hashlib.sha256(archive_name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return _fit(archive_name, ARCHIVE_SUFFIX, digest)


def row_inventory_name(input_path: str) -> str:
    """The row inventory's name for an upload row's `inputFile` as the user wrote it:
    `D:\\Microscope\\2024` -> `_inventory_2024_<8 hex>.csv`. Characters Dropbox refuses, or
    that Windows cannot hold (`<>:"|?*`), become `_` (`D:\\` -> `D_`; `/` -> `root`)."""
    text = input_path.rstrip("/\\") or input_path
    name = split_original(text)[1] if text not in ("/", "\\") else ""
    name = name.encode("utf-8", "replace").decode("utf-8")  # bytes that were not UTF-8 become ?, then _
    name = "".join("_" if c in _UNSYNCABLE or ord(c) < 32 or ord(c) == 127 else c for c in name).rstrip(" .") or "root"
    digest = hashlib.sha256(input_path.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    result = _fit(ROW_PREFIX + name, f"_{digest}.csv", "")  # the tail holds the digest already
    assert name_problem(result) is None, result
    return result


def is_inventory_name(name: str) -> bool:
    """True for the names `archive_inventory_name` and `row_inventory_name` give (any case)."""
    lowered = name.lower()
    return lowered.endswith(ARCHIVE_SUFFIX) or (lowered.startswith(ROW_PREFIX) and lowered.endswith(".csv"))


# ============================================================================ CSV


def _csv_row(record: Record) -> tuple:
    member = record.kind == MEMBER
    return (record.original_path, record.size, modified_text(record.mtime_ns), record.mtime_ns, record.kind,
            record.dropbox_path, record.member, f"{record.crc32:08x}" if member else "",
            record.compressed_size if member else "", record.header_offset if member else "", record.parts)


def write_csv(records: Iterable[Record], path: Path | str) -> int:
    """Write `records` as an inventory at `path` (format in the module docstring), one record at
    a time, under a temporary name in the same folder that is renamed at the end (`.~` names are
    never synced by the Dropbox desktop app). Returns the number of records. Raises
    InventoryError naming the first record that cannot be written (the file is then left as
    it was), OSError when the disk refuses."""
    path = Path(path)
    temporary = temporary_sibling(path, "partial")
    count = 0
    try:
        with open(temporary, "w", encoding="utf-8-sig", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\r\n")
            writer.writerow(COLUMNS)
            for count, record in enumerate(records, 1):
                problem = record_problem(record)
                if problem:
                    raise InventoryError(f"inventory {path}, record {count}: {problem}; nothing was written",
                                         paths=[path])
                writer.writerow(_csv_row(record))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        discard_temporary(temporary)
        raise
    fsync_folder(path.parent)
    return count


def _number(text: str, column: str, *, signed: bool = False) -> int:
    digits = text[1:] if signed and text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"{column} {text!r} is not a whole number")
    return int(text)


def _optional(text: str, column: str) -> int | None:
    return None if text == "" else _number(text, column)


def _crc(text: str) -> int | None:
    if text == "":
        return None
    if len(text) != 8 or not _HEX.issuperset(text):
        raise ValueError(f"crc32 {text!r} is not 8 hex digits")
    return int(text, 16)


def _parse(fields: list[str]) -> Record:
    """One CSV record; ValueError says what is wrong."""
    if len(fields) != len(COLUMNS):
        raise ValueError(f"{len(fields)} fields instead of {len(COLUMNS)}")
    original, size, modified, mtime, kind, dropbox_path, member, crc, compressed, offset, parts = fields
    record = Record(original, _number(size, "size_bytes"), _number(mtime, "mtime_ns", signed=True), kind,
                    dropbox_path, member, _crc(crc), _optional(compressed, "compressed_bytes"),
                    _optional(offset, "header_offset"), _number(parts, "parts"))
    problem = record_problem(record)
    if problem:
        raise ValueError(problem)
    if modified != modified_text(record.mtime_ns):
        raise ValueError(f"modified_utc {modified!r} is not mtime_ns {mtime} as text "
                         f"({modified_text(record.mtime_ns)!r})")
    return record


def _header_problem(header: list[str]) -> str:
    if header[:len(COLUMNS)] == list(COLUMNS):
        return (f"it has {len(header) - len(COLUMNS)} column(s) more than this version knows: it was written "
                "by a newer version of this tool; update the tool")
    return f"its first line is not the inventory header ({','.join(COLUMNS)})"


def read_csv(source: Path | str | Iterable[str], name: str | None = None) -> Iterator[Record]:
    """The records of an inventory, one at a time: `source` is a file's path, or the file's
    lines as text with their line ends (as from a file opened with newline=""), then `name`
    (e.g. its Dropbox path) names it in messages. A byte-order mark is skipped. Raises
    InventoryError "inventory <name>, line <n>: <reason>" at the first line that breaks the
    format (lines counted at LF, as editors count them); OSError when the file cannot be read."""
    if isinstance(source, (str, os.PathLike)):
        where = name or str(source)
        with open(source, "rb") as handle:
            yield from _records(_without_bom(_decoded(handle, where)), where)
        return
    yield from _records(_without_bom(source), name or "inventory")


def _decoded(lines: Iterable[bytes], where: str) -> Iterator[str]:
    # Decoded line by line, so that bytes that are not UTF-8 are reported with their line.
    for number, raw in enumerate(lines, 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InventoryError(f"inventory {where}, line {number}: it is not UTF-8 text ({exc.reason} at "
                                 f"byte {exc.start + 1} of the line)", paths=[where]) from None


def _without_bom(lines: Iterable[str]) -> Iterator[str]:
    iterator = iter(lines)
    for first in iterator:
        yield first[1:] if first.startswith("\ufeff") else first
        break
    yield from iterator


def _records(lines: Iterable[str], where: str) -> Iterator[Record]:
    reader = csv.reader(lines, strict=True)
    line = 1
    try:
        header = next(reader, None)
        if header is None:
            raise ValueError("the file is empty (not even the header line)")
        if header != list(COLUMNS):
            raise ValueError(_header_problem(header))
        line = reader.line_num + 1
        for fields in reader:
            if not fields:
                raise ValueError("empty line")
            yield _parse(fields)
            line = reader.line_num + 1
    except (ValueError, csv.Error) as exc:
        raise InventoryError(f"inventory {where}, line {line}: {exc}", paths=[where]) from None


# ============================================================================ local cache

_SCHEMA = """
CREATE TABLE sources(id INTEGER PRIMARY KEY, dropbox_path TEXT NOT NULL, path_lower TEXT NOT NULL UNIQUE,
    folder_lower TEXT NOT NULL, rev TEXT, entries INTEGER NOT NULL DEFAULT 0, loaded_at TEXT);
CREATE TABLE folders(source_id INTEGER NOT NULL, folder_no INTEGER NOT NULL, original TEXT NOT NULL,
    lower TEXT NOT NULL, PRIMARY KEY(source_id, folder_no)) WITHOUT ROWID;
CREATE TABLE locations(source_id INTEGER NOT NULL, location_no INTEGER NOT NULL, kind TEXT NOT NULL,
    dropbox_path TEXT NOT NULL, path_lower TEXT NOT NULL, parts INTEGER NOT NULL,
    PRIMARY KEY(source_id, location_no)) WITHOUT ROWID;
CREATE TABLE entries(source_id INTEGER NOT NULL, entry_no INTEGER NOT NULL, folder_no INTEGER NOT NULL,
    name TEXT NOT NULL, name_lower TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    location_no INTEGER NOT NULL, member TEXT NOT NULL, crc32 INTEGER, compressed_size INTEGER,
    header_offset INTEGER, PRIMARY KEY(source_id, entry_no)) WITHOUT ROWID;
CREATE INDEX entries_by_name ON entries(name_lower);
CREATE INDEX locations_by_path ON locations(path_lower);
"""


def _folder_key(dropbox_path: str) -> str:
    """names.case_key of a Dropbox folder, as `/a/b` (the root is "")."""
    return case_key(dropbox_path).rstrip("/")


def _parent(dropbox_path: str) -> str:
    return dropbox_path.rstrip("/").rpartition("/")[0]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Source:
    """One inventory in the cache: its Dropbox path, the rev loaded, its record count, when."""

    dropbox_path: str
    rev: str
    entries: int
    loaded_at: str


class Cache:
    """The local SQLite cache of inventories (schema in the module docstring). Use as a context
    manager, or close(). Raises OSError / sqlite3.Error when the file cannot be opened."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.OperationalError:  # locked by another run, unreadable: not ours to delete
            db.close()
            raise
        except sqlite3.DatabaseError:  # not a database: a cache is rebuilt, never repaired
            db.close()
            discard_temporary(self.path)  # our own cache file, rebuilt from the inventories
            return self._open()
        if version != SCHEMA_VERSION or not tables:
            db.close()
            discard_temporary(self.path)
            db = sqlite3.connect(self.path, timeout=60)
            db.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
        db.execute("PRAGMA synchronous = NORMAL")
        return db

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def sources(self) -> list[Source]:
        """Every inventory fully loaded, by Dropbox path."""
        rows = self._db.execute("SELECT dropbox_path, rev, entries, loaded_at FROM sources WHERE rev IS NOT NULL "
                                "ORDER BY path_lower").fetchall()
        return [Source(*row) for row in rows]

    def needs_load(self, inventory_path: str, rev: str) -> bool:
        """True unless the inventory at this Dropbox path is loaded in exactly this rev."""
        row = self._db.execute("SELECT rev FROM sources WHERE path_lower = ?", (case_key(inventory_path),)).fetchone()
        return row is None or row[0] != rev

    def forget(self, inventory_path: str) -> None:
        """Drop an inventory (deleted from Dropbox, or unreadable) and its records."""
        with self._db:
            self._drop(case_key(inventory_path))

    def _drop(self, path_lower: str) -> None:
        row = self._db.execute("SELECT id FROM sources WHERE path_lower = ?", (path_lower,)).fetchone()
        if row:
            for table in ("entries", "folders", "locations"):
                self._db.execute(f"DELETE FROM {table} WHERE source_id = ?", row)
            self._db.execute("DELETE FROM sources WHERE id = ?", row)

    def load(self, inventory_path: str, rev: str, records: Iterable[Record]) -> int:
        """Replace what the cache holds of the inventory at Dropbox path `inventory_path` (e.g.
        `/Lab/2024/s3.zip.inventory.csv`) with `records` (read_csv's), as version `rev`. Commits
        every BATCH_ROWS records; memory does not grow with the count. Returns the count. When
        `records` raises (a damaged inventory), the inventory is dropped from the cache and the
        error passes on."""
        key = case_key(inventory_path)
        with self._db:
            self._drop(key)
            source_id = self._db.execute(
                "INSERT INTO sources(dropbox_path, path_lower, folder_lower) VALUES (?, ?, ?)",
                (inventory_path, key, _folder_key(_parent(inventory_path)))).lastrowid
        try:
            count = _Loader(self._db, source_id).run(records)
        except BaseException:
            self._db.rollback()
            with self._db:
                self._drop(key)
            raise
        with self._db:
            self._db.execute("UPDATE sources SET rev = ?, entries = ?, loaded_at = ? WHERE id = ?",
                             (rev, count, _now(), source_id))
        return count

    def refresh(self, listing: Iterable[tuple[str, str]], open_records: Callable[[str], Iterable[Record]],
                folder: str = "") -> dict[str, list]:
        """Bring the cache in line with the inventories Dropbox holds under `folder`: `listing`
        gives (Dropbox path, rev) of each one there; `open_records(path)` its records (only called
        for those new or changed). Inventories cached under `folder` but not listed are dropped.
        An inventory that raises InventoryError is dropped and reported; the others go on.
        Returns {"loaded": [paths], "unchanged": [paths], "dropped": [paths], "failed": [errors]}."""
        summary: dict[str, list] = {"loaded": [], "unchanged": [], "dropped": [], "failed": []}
        listed = set()
        for path, rev in listing:
            listed.add(case_key(path))
            if not self.needs_load(path, rev):
                summary["unchanged"].append(path)
                continue
            try:
                self.load(path, rev, open_records(path))
                summary["loaded"].append(path)
            except InventoryError as exc:
                summary["failed"].append(exc)
        scope = _folder_key(folder)
        for (path, path_lower) in self._db.execute("SELECT dropbox_path, path_lower FROM sources").fetchall():
            if path_lower not in listed and (not scope or path_lower.startswith(scope + "/")):
                self.forget(path)
                summary["dropped"].append(path)
        return summary


class _Loader:
    """Inserts one inventory's records in batches, numbering folders and locations as met."""

    def __init__(self, db: sqlite3.Connection, source_id: int):
        self.db = db
        self.source_id = source_id
        self._folder_count = self._location_count = 0  # rows already flushed
        self.folders: dict[str, int] = {}
        self.locations: dict[tuple, int] = {}
        self.new_folders: list[tuple] = []
        self.new_locations: list[tuple] = []
        self.entries: list[tuple] = []

    def _folder(self, folder: str) -> int:
        number = self.folders.get(folder)
        if number is None:
            if len(self.folders) >= _REMEMBERED:
                self.folders.clear()  # a folder met again gets a second row: harmless
            number = self.folders[folder] = len(self.new_folders) + self._folder_count
            self.new_folders.append((self.source_id, number, folder, case_key(folder).replace("\\", "/")))
        return number

    def _location(self, record: Record) -> int:
        key = (record.kind, record.dropbox_path, record.parts)
        number = self.locations.get(key)
        if number is None:
            if len(self.locations) >= _REMEMBERED:
                self.locations.clear()
            number = self.locations[key] = len(self.new_locations) + self._location_count
            self.new_locations.append((self.source_id, number, record.kind, record.dropbox_path,
                                       case_key(record.dropbox_path), record.parts))
        return number

    def run(self, records: Iterable[Record]) -> int:
        count = 0
        for count, record in enumerate(records, 1):
            folder, name = split_original(record.original_path)
            self.entries.append((self.source_id, count, self._folder(folder), name,
                                 case_key(name).replace("\\", "/"), record.size, record.mtime_ns,
                                 self._location(record), record.member, record.crc32, record.compressed_size,
                                 record.header_offset))
            if len(self.entries) >= BATCH_ROWS:
                self._flush()
        self._flush()
        return count

    def _flush(self) -> None:
        with self.db:
            self.db.executemany("INSERT INTO folders VALUES (?, ?, ?, ?)", self.new_folders)
            self.db.executemany("INSERT INTO locations VALUES (?, ?, ?, ?, ?, ?)", self.new_locations)
            self.db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", self.entries)
        self._folder_count += len(self.new_folders)
        self._location_count += len(self.new_locations)
        self.new_folders.clear()
        self.new_locations.clear()
        self.entries.clear()


# ============================================================================ search


@dataclass(frozen=True, slots=True)
class Match:
    """One record found. `dropbox_path` is absolute here (the inventory's folder joined with the
    record's relative path); `inventory` is the Dropbox path of the inventory that lists it.
    Sizes in bytes; `mtime_ns` in ns since the epoch (UTC)."""

    original_path: str
    size: int
    mtime_ns: int
    kind: str
    dropbox_path: str
    member: str
    crc32: int | None
    compressed_size: int | None
    header_offset: int | None
    parts: int
    inventory: str

    @property
    def download_size(self) -> int:
        """Bytes a download of just this file moves: the compressed size for a member."""
        return self.compressed_size if self.kind == MEMBER else self.size

    @property
    def modified(self) -> datetime | None:
        """The modification time (UTC, microseconds), None outside the years datetime holds."""
        try:
            return _EPOCH + timedelta(microseconds=self.mtime_ns // 1000)
        except OverflowError:
            return None

    @property
    def where(self) -> str:
        """For people: `/Lab/2024/s3.zip: s3/frame_0412.tif`, `/Lab/big.mrc (3 parts)`, or the path."""
        if self.kind == MEMBER:
            split_note = f" ({self.parts} parts)" if self.parts else ""
            return f"{self.dropbox_path}{split_note}: {self.member}"
        if self.kind == PARTS:
            return f"{self.dropbox_path} ({self.parts} parts)"
        return self.dropbox_path


def _is_path_pattern(pattern: str) -> bool:
    return "/" in pattern or "\\" in pattern


def pattern_problem(pattern: str) -> str | None:
    """Why `pattern` cannot be searched for (a sentence), or None."""
    if not pattern or not pattern.strip():
        return "the name or path pattern is empty"
    if not is_valid_text(pattern) or "\x00" in pattern:
        return f"the pattern '{shown(pattern)}' is not valid text"
    if _is_path_pattern(pattern) and not split_original(pattern.replace("\\", "/"))[1]:
        return f"the path pattern {pattern!r} ends with a separator: end it with a name or *"
    return None


def folder_problem(folder: str) -> str | None:
    """Why `folder` is not a Dropbox folder to search in ("" or "/" = everything), or None."""
    if folder and not folder.startswith("/"):
        return f"the Dropbox folder {folder!r} must start with / (for example /Lab/Microscope)"
    return None


def _glob(text: str) -> str:
    """SQLite GLOB pattern for Windows-like wildcards: `*` and `?`; `[` is a literal character."""
    return text.replace("[", "[[]")


def _condition(pattern: str) -> tuple[str, str]:
    """SQL condition and its parameter: name equality, name GLOB (index range on its literal
    prefix) or a GLOB on the whole case-keyed path with `/` separators. A path pattern not
    starting at a root (`/`, `\\\\`, `D:`) may match from any folder down: `s3\\frame_*.tif`."""
    key = case_key(pattern)
    if not _is_path_pattern(pattern):
        if "*" in key or "?" in key:
            return "e.name_lower GLOB ?", _glob(key)
        return "e.name_lower = ?", key
    key = key.replace("\\", "/")
    rooted = key.startswith("/") or (len(key) > 1 and key[1] == ":")
    return "f.lower || e.name_lower GLOB ?", _glob(key if rooted else "*/" + key)


def _scope(db: sqlite3.Connection, folder: str) -> tuple[dict[int, tuple[str, str]], str, list]:
    """The sources to search and an SQL condition on location: every source inside `folder`
    whole; one above it, only its locations under the rest of `folder`."""
    target = _folder_key(folder)
    sources: dict[int, tuple[str, str]] = {}
    whole, partial, parameters = [], [], []
    for source_id, path, folder_lower in db.execute(
            "SELECT id, dropbox_path, folder_lower FROM sources WHERE rev IS NOT NULL"):
        sources[source_id] = (path, _parent(path))
        if not target or folder_lower == target or folder_lower.startswith(target + "/"):
            whole.append(source_id)
        elif not folder_lower or target.startswith(folder_lower + "/"):
            rest = target[len(folder_lower) + 1:] if folder_lower else target.lstrip("/")
            partial.append("(e.source_id = ? AND (l.path_lower = ? OR substr(l.path_lower, 1, ?) = ?))")
            parameters += [source_id, rest, len(rest) + 1, rest + "/"]
    clauses = [f"e.source_id IN ({','.join(map(str, whole))})"] if whole else []
    return sources, "(" + " OR ".join(clauses + partial or ["0"]) + ")", parameters


def search(cache: Cache, folder: str, pattern: str) -> Iterator[Match]:
    """Records of the cached inventories matching `pattern`, one at a time (memory does not
    grow with the number of matches), in no particular order.

    `pattern` without `/` or `\\` is a name glob (`frame_0412*`, `metadata.xml`; `*` any
    characters, `?` one; compared ignoring case as Dropbox and Windows do, names.case_key);
    with one, a path glob on the original path (either separator; `*` crosses folders).
    `folder` ("" or "/" = all) keeps records whose Dropbox location is that folder or under it,
    ignoring case; a location equal to it counts too, so an archive's path gives its members.
    Raises ValueError (pattern_problem / folder_problem's sentence)."""
    problem = pattern_problem(pattern) or folder_problem(folder)
    if problem:
        raise ValueError(problem)
    condition, parameter = _condition(pattern)
    sources, scope, scope_parameters = _scope(cache._db, folder)
    if not sources:
        return
    query = ("SELECT e.source_id, f.original || e.name, e.size, e.mtime_ns, l.kind, l.dropbox_path, e.member, "
             "e.crc32, e.compressed_size, e.header_offset, l.parts FROM entries e "
             "JOIN folders f ON f.source_id = e.source_id AND f.folder_no = e.folder_no "
             "JOIN locations l ON l.source_id = e.source_id AND l.location_no = e.location_no "
             f"WHERE {condition} AND {scope}")
    cursor = cache._db.execute(query, [parameter, *scope_parameters])
    try:
        for source_id, original, size, mtime_ns, kind, path, member, crc, compressed, offset, parts in cursor:
            inventory, base = sources[source_id]
            yield Match(original, size, mtime_ns, kind, f"{base}/{path}", member, crc, compressed, offset, parts,
                        inventory)
    finally:
        cursor.close()
