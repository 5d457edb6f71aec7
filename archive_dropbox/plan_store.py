"""Stage 1's plan kept on disk, not in memory: every file to send, in plan order, in a scratch
SQLite database, so that planning ten million files holds what is in flight (one folder's
listing, the folders' names, SQLite's page cache) and not one object per file.

The database is SQLite's private temporary database (`sqlite3.connect("")`): a file in the
system's temporary folder that SQLite deletes when the connection closes, and that the operating
system drops even after a kill -9 (SQLite opens it delete-on-close), so a stopped run leaves
nothing behind. About 200 bytes of disk per file (1M files: ~200 MB in %TEMP% or $TMPDIR).

Two files Dropbox would take for one are caught by the database: a UNIQUE index on a 64-bit hash
of the Dropbox-side key (names.case_key of the destination). A hash match is only a candidate:
the stored destination's key is compared, and the rare different key with the same hash is kept
beside the table (`_overflow`), so a collision of hashes never reports a clash of names.

Why not the journal: the plan of a --dry-run must not change the journal, and a plan with a
problem in it must leave the journal as it was (nothing starts half-planned).
"""

from __future__ import annotations

import sqlite3
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, overload

from . import split
from .errors import EnvironmentProblem
from .journal import Item, Kind
from .names import case_key
from .sheets import SheetRow

# SQLite's page cache for the plan, in KiB (negative cache_size): enough to keep the UNIQUE index's
# hot pages; beyond it pages go to the temporary file, which is what bounds the memory.
CACHE_KIB = 32 * 1024
PAGE_ROWS = 2000  # rows fetched per step while reading the plan back
# The 64-bit key of a case_key: Python's own string hash (SipHash, salted per process, which is
# all a scratch database that lives one process needs). A name, so tests can force collisions.
key_hash = hash


def join_dropbox(folder: str, *names: str) -> str:
    path = folder.rstrip("/")
    for name in names:
        path += "/" + name
    return path or "/"


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
            return [Item(destination=self.destination, kind=Kind.FILE, part_offset=0, length=self.size, **common)]
        items = [Item(destination=self.part_destination(part), kind=Kind.PART, part_offset=part.offset,
                      length=part.length, **common) for part in self.parts]
        items.append(Item(destination=self.manifest_destination(), kind=Kind.MANIFEST, part_offset=0, length=0,
                          **common))
        return items


_SCHEMA = """
CREATE TABLE files (
    id INTEGER PRIMARY KEY,          -- plan order, 1, 2, 3, ... (never deleted)
    key INTEGER,                     -- 64-bit hash of case_key(destination), NULL when in _overflow
    row INTEGER NOT NULL,            -- index into PlanStore.rows
    source TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    destination TEXT NOT NULL,
    delete_after INTEGER NOT NULL,
    file_id TEXT
);
CREATE UNIQUE INDEX files_key ON files (key);
CREATE TABLE claims (                -- the parts and manifests of split files: names no file may take
    key INTEGER NOT NULL,            -- key_hash of case_key(destination), not unique (compared by key)
    destination TEXT NOT NULL,
    source TEXT NOT NULL,            -- the split file
    row INTEGER NOT NULL
);
CREATE INDEX claims_key ON claims (key)
"""
_COLUMNS = "id, row, source, size, mtime_ns, destination, delete_after, file_id"
_INSERT = ("INSERT INTO files (key, row, source, size, mtime_ns, destination, delete_after, file_id) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


@contextmanager
def _scratch_space():
    """SQLite errors of the scratch database as the user's problem they are: its disk is full."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        raise EnvironmentProblem(
            f"Stage 1 keeps its list of files in a temporary file in {tempfile.gettempdir()}, and it cannot "
            f"be written ({exc}). Free some space there (about 200 bytes per file to send), or point the "
            "TEMP and TMP environment variables (TMPDIR on Linux and macOS) to a folder on a disk with room, "
            "then run again. Nothing was sent.") from None


class PlanStore(Sequence[PlannedSource]):
    """The files of a plan, in the order they were added: iterated in pages, indexed by position
    (0-based, like a list), counted without reading them. Thread-safe; read many times.

    `part_limit` (bytes): a file larger is planned in parts (split.plan_split), recomputed when
    it is read back rather than stored."""

    def __init__(self, part_limit: int):
        self.part_limit = part_limit
        self.rows: list[SheetRow] = []       # each row once, in the order its first file came
        self._row_index: dict[int, int] = {}  # id(row) -> index in rows
        self._overflow: dict[str, tuple[str, Path, SheetRow]] = {}  # case_key -> clash details; see the module doc
        self._count = 0
        self._claims = 0
        self.total_bytes = 0   # of every file added
        self.split_count = 0   # files sent in parts
        self.part_count = 0    # their parts
        self._lock = threading.Lock()
        with _scratch_space():
            self._db = sqlite3.connect("", check_same_thread=False, isolation_level=None)
            self._db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            self._db.execute("PRAGMA journal_mode = OFF")  # a scratch plan: nothing to roll back to after a crash
            self._db.execute("PRAGMA synchronous = OFF")
            for statement in _SCHEMA.split(";"):
                self._db.execute(statement)
            self._db.execute("BEGIN")
        self._open = True  # a write transaction, committed when the plan is read (see _readable)

    # -- writing (Stage 1, one thread) ----------------------------------------------------------

    def add(self, row: SheetRow, source: str | Path, size: int, mtime_ns: int, destination: str, delete_after: bool,
            file_id: str | None, key: str | None = None) -> tuple[str, Path, SheetRow] | None:
        """Add one file. When Dropbox would take it for a file added before, nothing is added
        and (that file's destination, local path, row) is returned. `key`: case_key(destination),
        when the caller has it already."""
        key = case_key(destination) if key is None else key
        row_index = self._row_index.get(id(row))
        if row_index is None:
            row_index = self._row_index[id(row)] = len(self.rows)
            self.rows.append(row)
        with self._lock, _scratch_space():
            claimed = self._claimed(key) if self._claims else None
            if claimed is not None:
                return claimed
            record = (row_index, str(source), size, mtime_ns, destination, int(delete_after), file_id)
            try:
                self._db.execute(_INSERT, (key_hash(key), *record))
            except sqlite3.IntegrityError:
                other = self._same_hash(key)
                if other is not None:
                    return other
                if key in self._overflow:
                    return self._overflow[key]
                self._overflow[key] = (destination, Path(source), row)
                self._db.execute(_INSERT, (None, *record))
        self._count += 1
        self.total_bytes += size
        if size > self.part_limit:
            self.split_count += 1
            self.part_count += len(split.plan_split(size, self.part_limit))
        return None

    def claim(self, row: SheetRow, source: str | Path, destinations: Sequence[str]
              ) -> tuple[str, Path, SheetRow] | None:
        """Reserve the Dropbox paths a split file's parts and manifest take (`destinations`), so that
        no file is planned there. Returns the first planned file or reservation one of them
        clashes with, as add does."""
        row_index = self._row_index[id(row)]
        with self._lock, _scratch_space():
            for destination in destinations:
                key = case_key(destination)
                other = self._overflow.get(key) or self._same_hash(key) or self._claimed(key)
                if other is not None:
                    return other
                self._db.execute("INSERT INTO claims (key, destination, source, row) VALUES (?, ?, ?, ?)",
                                 (key_hash(key), destination, str(source), row_index))
                self._claims += 1
        return None

    def _claimed(self, key: str) -> tuple[str, Path, SheetRow] | None:
        for destination, source, row in self._db.execute("SELECT destination, source, row FROM claims WHERE key = ?",
                                                         (key_hash(key),)):
            if case_key(destination) == key:
                return destination, Path(source), self.rows[row]
        return None

    def _same_hash(self, key: str) -> tuple[str, Path, SheetRow] | None:
        found = self._db.execute("SELECT destination, source, row FROM files WHERE key = ?", (key_hash(key),)).fetchone()
        if found is None or case_key(found[0]) != key:
            return None
        return found[0], Path(found[1]), self.rows[found[2]]

    def file_at(self, destination: str) -> tuple[str, Path, SheetRow] | None:
        """The planned file Dropbox would take `destination` for, as (its destination, local path,
        row), or None."""
        key = case_key(destination)
        with self._lock:
            return self._overflow.get(key) or self._same_hash(key) or (self._claimed(key) if self._claims else None)

    # -- reading ------------------------------------------------------------------------------

    def _readable(self) -> None:
        if self._open:
            self._db.execute("COMMIT")
            self._open = False

    def _source(self, record: tuple) -> PlannedSource:
        _, row, source, size, mtime_ns, destination, delete_after, file_id = record
        parts = split.plan_split(size, self.part_limit) if size > self.part_limit else None
        return PlannedSource(self.rows[row], Path(source), size, mtime_ns, destination, bool(delete_after), parts,
                             file_id)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[PlannedSource]:
        last = 0
        while True:
            with self._lock, _scratch_space():
                self._readable()
                page = self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE id > ? ORDER BY id LIMIT ?",
                                        (last, PAGE_ROWS)).fetchall()
            if not page:
                return
            for record in page:
                yield self._source(record)
            last = page[-1][0]

    def between(self, start: int, stop: int) -> Iterator[PlannedSource]:
        """The files at positions start <= i < stop (0-based, as slicing), read in pages."""
        last, stop = max(start, 0), min(stop, self._count)
        while last < stop:
            with self._lock, _scratch_space():
                self._readable()
                page = self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
                                        (last, stop, PAGE_ROWS)).fetchall()
            if not page:
                return
            for record in page:
                yield self._source(record)
            last = page[-1][0]

    @overload
    def __getitem__(self, index: int) -> PlannedSource: ...

    @overload
    def __getitem__(self, index: slice) -> list[PlannedSource]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        position = index + self._count if index < 0 else index
        if not 0 <= position < self._count:
            raise IndexError(index)
        with self._lock, _scratch_space():
            self._readable()
            record = self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE id = ?", (position + 1,)).fetchone()
        return self._source(record)

    def close(self) -> None:
        """Drop the scratch database now (it goes anyway when the process ends)."""
        with self._lock:
            self._db.close()
