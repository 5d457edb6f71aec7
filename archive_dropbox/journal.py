"""The SQLite journal: what has been sent where, so that any run can be stopped at any moment
(Ctrl-C, crash, kill -9, power cut) and a rerun continues without redoing finished work.

One database in logs/ holds every job; a job is one sheet (dropboxUpload_API, ...). Items are
keyed by (job, source, destination), so the same file in two sheets or to two destinations is
tracked separately. The key's index holds 64-bit hashes of the two paths (path_key), not the
paths, and each item names its job by number: a journal of tens of millions of items stays
about 300-400 bytes per item (bench/bench_plan_scale.py). WAL mode keeps every committed write across a process crash; one lock
file per job refuses a second copy of the same script on the same sheet.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import threading
import time
from array import array
from dataclasses import dataclass
from enum import Enum, IntEnum
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import JournalError, JournalLocked
from .localfs import on_network_drive
from .units import human_bytes


class _Stored(str, Enum):
    """A value the journal stores as text. A member IS that text: it compares and hashes equal to
    it (so `item.state == "done"` holds), and shows as it in f-strings, logs and SQL parameters.
    (enum.StrEnum would do this, but only from Python 3.11; the tool supports 3.9.)"""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class State(_Stored):
    """Where one item stands (items.state), and which engine sets it.

    PENDING      nothing of it is in Dropbox (or on disk) as far as the journal knows: newly planned,
                 its source changed, or reopened because Dropbox no longer holds it (every engine)
    UPLOADING    API upload: an upload session is open; session_id, confirmed_offset and
                 confirmed_chunks say how far Dropbox has it
    COPIED       desktop-app upload: complete under its real name in the local Dropbox folder, its
                 hashes recorded; the app has yet to upload it and Dropbox to report them
    DOWNLOADING  download: a partial file is being written from Dropbox revision remote_rev
    DONE         finished: in Dropbox with content_hash (both uploads; hash_local says whether it
                 was checked against the local bytes), on disk with the content hash Dropbox
                 reports (download), or joined from its parts (download, kind JOINED)
    FAILED       given up on in this run (error says why); every engine tries it again next run
    """

    PENDING = "pending"
    UPLOADING = "uploading"
    COPIED = "copied"
    DOWNLOADING = "downloading"
    DONE = "done"
    FAILED = "failed"


class Kind(_Stored):
    """What one item is (items.kind).

    FILE      a whole file: uploaded as it is, or (download) one Dropbox file written to disk
    PART      one part of a split file: the source's bytes part_offset .. part_offset + length
    MANIFEST  a split file's manifest, made from its parts' SHA-256s (length 0 in the plan)
    JOINED    download: a split file joined from its downloaded parts (content_hash holds the
              series' signature), so a rerun neither downloads nor joins it again
    """

    FILE = "file"
    PART = "part"
    MANIFEST = "manifest"
    JOINED = "joined"


class BatchState(_Stored):
    """Where one batch of the desktop-app upload stands (batches.state; set by that engine only).

    COPYING   its items are being copied into the local Dropbox folder
    WAITING   copied; waiting for the app to upload them and Dropbox to report their hashes
    FAILED    Dropbox holds a different file than the one copied: nothing of it was deleted
    VERIFIED  every copied item is in Dropbox with the expected hash; its originals may go
    DELETED   finished: every item done and the originals deleted (when the settings ask)
    """

    COPYING = "copying"
    WAITING = "waiting"
    FAILED = "failed"
    VERIFIED = "verified"
    DELETED = "deleted"


class SourceDeleted(IntEnum):
    """Whether an item's local original was deleted (items.source_deleted; set by the deletion
    gate of the uploads). DELETING is written ahead of the unlink, so a rerun after a crash
    between the unlink and the bookkeeping finds it and settles it (finish_interrupted_deletions)."""

    KEPT = 0
    DELETED = 1
    DELETING = 2

    def __str__(self) -> str:  # "2", not "SourceDeleted.DELETING" (Python < 3.11)
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


# Stored value -> member, for every Item built: a dict lookup costs a tenth of State(text), and
# a journal holds up to millions of items.
_STATE_OF = {member.value: member for member in State}
_KIND_OF = {member.value: member for member in Kind}
_SOURCE_DELETED_OF = {member.value: member for member in SourceDeleted}


def _member(members: dict, enum: type, value):
    """The member stored as `value` (or `value` itself when a member); ValueError for a value no
    release writes (a bug)."""
    member = members.get(value)
    return member if member is not None else enum(value)


# The schema this release writes; PRAGMA user_version holds it. Version 0 is a journal written
# before the version was recorded (or a new, empty file). Raise it with a step in _UPGRADES.
SCHEMA_VERSION = 3


def path_key(path: str) -> int:
    """The 64-bit key of a path in the items index (signed, as SQLite stores integers): the first
    8 bytes of its BLAKE2b, stable across processes and releases. Two paths may share a key;
    every lookup also compares the paths themselves."""
    digest = hashlib.blake2b(path.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def settled_key(local_folder: str, dropbox_folder: str) -> int:
    """The key of one (local folder, Dropbox folder) pair in settled_folders: a row maps a local
    folder to one Dropbox folder, but two rows may send one local folder to two places."""
    return path_key(f"{local_folder}\0{dropbox_folder}")


def item_folder_key(source: str, destination: str) -> int:
    """settled_key of the folders an item's file lives in, locally and in Dropbox (a split
    file's parts and manifest sit beside it)."""
    return settled_key(os.path.dirname(source), destination.rsplit("/", 1)[0] or "/")


def folder_digest(names: Sequence[str], numbers: Sequence[int], file_ids: Sequence[int]) -> bytes:
    """16-byte BLAKE2b of a folder's files as Stage 1 finds them, in name order: `names`;
    `numbers`: each file's size in bytes, mtime_ns and number of parts (0 when sent whole), one
    file after another; `file_ids`: each file's st_dev and st_ino (see file_id_numbers). Equal
    digests mean the same names, sizes, dates, files and split (a changed fileSizeLimit_GB that
    splits a file differently changes it). Built from arrays, not a text per file: it is
    computed for every file of every folder a rerun reads."""
    digest = hashlib.blake2b("\0".join(names).encode("utf-8", "surrogatepass"), digest_size=16)
    digest.update(array("q", numbers).tobytes())
    digest.update(array("Q", file_ids).tobytes())
    return digest.digest()


def file_id_numbers(file_id: str | None) -> tuple[int, int]:
    """(st_dev, st_ino) of a planned file's "st_dev:st_ino", (0, 0) when unknown (Windows)."""
    if not file_id:
        return 0, 0
    device, inode = file_id.split(":")
    return int(device), int(inode)


def _pack_hash(text: str | None):
    """A hash as stored: 32 bytes for the 64 lower-case hex digits of a content hash or SHA-256
    (half the space), anything else as it is, so that _unpack_hash gives back the same text."""
    if text is not None and len(text) == 64:
        try:
            packed = bytes.fromhex(text)
        except ValueError:
            return text
        if packed.hex() == text:
            return packed
    return text


def _unpack_hash(value) -> str | None:
    return value.hex() if isinstance(value, bytes) else value


# A new journal's tables. The comments list every value of the enums above (a test holds them
# to it) and hold no ';' (the text is split on it to run in one transaction).
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE        -- the sheet, e.g. dropboxUpload_API
);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    job INTEGER NOT NULL,            -- jobs.id
    source_key INTEGER NOT NULL,     -- path_key(source)
    destination_key INTEGER NOT NULL,  -- path_key(destination)
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    kind TEXT NOT NULL,              -- file | part | manifest | joined
    part_offset INTEGER NOT NULL,    -- where this item's bytes start in the source
    length INTEGER NOT NULL,         -- how many bytes this item holds
    source_size INTEGER NOT NULL,
    source_mtime_ns INTEGER NOT NULL,
    state TEXT NOT NULL,             -- pending | uploading | copied | downloading | done | failed
    session_id TEXT,
    session_started REAL,
    confirmed_offset INTEGER NOT NULL DEFAULT 0,
    content_hash BLOB,               -- Dropbox content hash of the item's bytes (32 bytes, see _pack_hash)
    sha256 BLOB,                     -- SHA-256 of the item's bytes (split parts), as content_hash
    remote_rev TEXT,
    error TEXT,
    source_deleted INTEGER NOT NULL DEFAULT 0,  -- 0 kept | 2 deleting (written ahead) | 1 deleted
    updated REAL NOT NULL,
    confirmed_chunks TEXT,           -- concurrent sessions: indexes of the chunks Dropbox confirmed
    source_id TEXT,                  -- "st_dev:st_ino" of the source when planned (NULL: unknown)
    hash_local INTEGER NOT NULL DEFAULT 0,  -- 1: content_hash was computed from the local bytes
    remote_path TEXT                 -- where Dropbox put it when not at destination (autorename), else NULL
);
CREATE INDEX IF NOT EXISTS items_key ON items (job, source_key, destination_key);
CREATE INDEX IF NOT EXISTS items_job_state ON items (job, state);
CREATE TABLE IF NOT EXISTS settled_folders (
    job INTEGER NOT NULL,            -- jobs.id
    folder_key INTEGER NOT NULL,     -- settled_key(local folder, Dropbox folder)
    digest BLOB NOT NULL,            -- folder_digest of its files when every item of them was done
    PRIMARY KEY (job, folder_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    job TEXT NOT NULL,
    number INTEGER NOT NULL,
    state TEXT NOT NULL,             -- copying | waiting | failed | verified | deleted
    started REAL,
    updated REAL NOT NULL,
    PRIMARY KEY (job, number)
);
CREATE TABLE IF NOT EXISTS accounts (
    job TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,        -- the Dropbox account whose files the job's "done" describes
    root_namespace TEXT NOT NULL,    -- the root namespace its paths were relative to
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_items (
    item_id INTEGER PRIMARY KEY,     -- items.id
    job TEXT NOT NULL,
    batch INTEGER NOT NULL           -- the desktop-app batch the item was given when first planned
);
"""
# Columns a version-0 journal may lack, added by releases before the version was recorded.
ADDED_COLUMNS = (("confirmed_chunks", "TEXT"), ("source_id", "TEXT"),
                 ("hash_local", "INTEGER NOT NULL DEFAULT 0"), ("remote_path", "TEXT"))


def _upgrade_from_0(db: sqlite3.Connection) -> None:
    """Version 0 -> 1. Every version-0 journal has items and batches; the earliest lack the
    added columns and accounts, and batch_items was created only once the desktop-app mode first
    ran. The tables are written out here, not taken from SCHEMA, so that this step stays
    true when SCHEMA moves on."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(items)")}
    for name, definition in ADDED_COLUMNS:
        if name not in columns:
            db.execute(f"ALTER TABLE items ADD COLUMN {name} {definition}")
    db.execute("CREATE TABLE IF NOT EXISTS accounts (job TEXT PRIMARY KEY, account_id TEXT NOT NULL, "
               "root_namespace TEXT NOT NULL, updated REAL NOT NULL)")
    db.execute("CREATE TABLE IF NOT EXISTS batch_items (item_id INTEGER PRIMARY KEY, job TEXT NOT NULL, "
               "batch INTEGER NOT NULL)")


def _upgrade_from_1(db: sqlite3.Connection) -> None:
    """Version 1 -> 2: items keyed by path hashes and a job number instead of a UNIQUE index on
    the job's name and both paths (which took ~270 of the ~740 bytes of a done item), hashes as
    bytes, remote_path kept only where it differs. Ids stay (batch_items refers to them). The
    version-2 table is written out here, not taken from SCHEMA (see _upgrade_from_0)."""
    db.create_function("path_key", 1, path_key, deterministic=True)
    db.create_function("pack_hash", 1, _pack_hash, deterministic=True)
    db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)")
    db.execute("INSERT INTO jobs (name) SELECT DISTINCT job FROM items ORDER BY job")
    db.execute(
        "CREATE TABLE items_v2 (id INTEGER PRIMARY KEY, job INTEGER NOT NULL, source_key INTEGER NOT NULL, "
        "destination_key INTEGER NOT NULL, source TEXT NOT NULL, destination TEXT NOT NULL, kind TEXT NOT NULL, "
        "part_offset INTEGER NOT NULL, length INTEGER NOT NULL, source_size INTEGER NOT NULL, "
        "source_mtime_ns INTEGER NOT NULL, state TEXT NOT NULL, session_id TEXT, session_started REAL, "
        "confirmed_offset INTEGER NOT NULL DEFAULT 0, content_hash BLOB, sha256 BLOB, remote_rev TEXT, error TEXT, "
        "source_deleted INTEGER NOT NULL DEFAULT 0, updated REAL NOT NULL, confirmed_chunks TEXT, source_id TEXT, "
        "hash_local INTEGER NOT NULL DEFAULT 0, remote_path TEXT)")
    db.execute(
        "INSERT INTO items_v2 SELECT i.id, j.id, path_key(i.source), path_key(i.destination), i.source, "
        "i.destination, i.kind, i.part_offset, i.length, i.source_size, i.source_mtime_ns, i.state, i.session_id, "
        "i.session_started, i.confirmed_offset, pack_hash(i.content_hash), pack_hash(i.sha256), i.remote_rev, "
        "i.error, i.source_deleted, i.updated, i.confirmed_chunks, i.source_id, i.hash_local, "
        "NULLIF(i.remote_path, i.destination) FROM items AS i JOIN jobs AS j ON j.name = i.job")
    db.execute("DROP TABLE items")  # its indexes go with it
    db.execute("ALTER TABLE items_v2 RENAME TO items")
    db.execute("CREATE INDEX items_key ON items (job, source_key, destination_key)")
    db.execute("CREATE INDEX items_job_state ON items (job, state)")


def _upgrade_from_2(db: sqlite3.Connection) -> None:
    """Version 2 -> 3: settled_folders, so that a rerun's Stage 1 skips folders whose files were
    all sent and have not changed. The version rises so that an older release, which would
    reopen items without forgetting their folder's entry, refuses the journal."""
    db.execute("CREATE TABLE settled_folders (job INTEGER NOT NULL, folder_key INTEGER NOT NULL, "
               "digest BLOB NOT NULL, PRIMARY KEY (job, folder_key)) WITHOUT ROWID")


# Versions below this one have their items table rewritten by the upgrade (minutes for tens of
# millions of items, then compacted); from it on, an upgrade only adds tables.
_ITEMS_REWRITTEN_UP_TO = 2

# version -> the step that brings a journal of that version to the next one.
_UPGRADES: dict[int, Callable[[sqlite3.Connection], None]] = {0: _upgrade_from_0, 1: _upgrade_from_1,
                                                              2: _upgrade_from_2}


def _schema_version(db: sqlite3.Connection, path: Path) -> int:
    """The journal's schema version; JournalError when a newer release wrote it."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise JournalError(
            f"the journal {path} was written by a newer release of this tool (journal version "
            f"{version}; this release knows up to version {SCHEMA_VERSION}). Use that newer release; "
            "or, to go on with this one, move the journal aside (finished files will then be checked "
            "against Dropbox again).", paths=[path])
    return version


def _os_lock(handle, *, unlock: bool = False) -> None:
    """Take, without waiting, or release the OS lock on the first byte of an open lock file;
    OSError when another process holds it. The OS drops it when the process dies, even by kill -9."""
    if os.name == "nt":
        import msvcrt  # Windows-only module

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK if unlock else msvcrt.LK_NBLCK, 1)
    else:
        import fcntl  # POSIX-only module

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN if unlock else fcntl.LOCK_EX | fcntl.LOCK_NB)


def _held_by_another(lock: Path) -> bool:
    """Whether another process holds this job lock file now (see _JobLock)."""
    try:
        handle = open(lock, "a+b")
    except OSError:
        return False
    try:
        _os_lock(handle)
        _os_lock(handle, unlock=True)
        return False
    except OSError:
        return True
    finally:
        handle.close()


def _check_before_upgrading(path: Path, own_lock: Path | None) -> None:
    """An upgrade rewrites the items table: refused (JournalError, nothing changed) while another
    sheet's script has the journal open - an older release there would go on writing to a table
    that is gone, and a newer one would wait for the upgrade in silence - or when its disk lacks
    room for the rewritten table and the compaction after it (about twice the journal)."""
    for lock in sorted(path.parent.glob(f"{path.stem}_*.lock")):
        if lock != own_lock and _held_by_another(lock):
            raise JournalError(
                f"the journal {path} must be brought up to date for this release, and another script is "
                f"using it now (its lock: {lock.name}). Let that run finish, or close its window, then start this "
                "one again. Nothing was changed.", paths=[path])
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    free = shutil.disk_usage(path.parent).free
    if free < 2 * size:
        raise JournalError(
            f"the journal {path} ({human_bytes(size)}) must be brought up to date for this release, which "
            f"needs about {human_bytes(2 * size)} free on its disk for a while ({human_bytes(free)} free now). "
            "Free some space there and run again. Nothing was changed.", paths=[path])


def _bring_schema_up_to_date(db: sqlite3.Connection, path: Path, own_lock: Path | None = None,
                             log: logging.Logger | None = None) -> None:
    """Create a new journal, or upgrade one an earlier release wrote, in one transaction (an
    interrupted upgrade leaves the journal as it was). JournalError for a newer journal, or when
    an upgrade cannot run now (_check_before_upgrading); sqlite3.DatabaseError when the file
    cannot be read or written. `own_lock`: this process's job lock file; `log` hears of an upgrade
    (it may take minutes for tens of millions of items)."""
    found = _schema_version(db, path)
    if found == SCHEMA_VERSION:
        return
    started = time.monotonic()
    # Only the steps up to version 2 rewrite the items table; later ones add a table.
    rewrites = found < _ITEMS_REWRITTEN_UP_TO and bool(
        db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'items'").fetchone())
    if rewrites:
        _check_before_upgrading(path, own_lock)
        if log is not None:
            log.info("The journal %s was written by an earlier release: bringing it up to date for this one, once "
                     "(about 15 s per million files; if stopped, it stays as it was and the next run does it).",
                     path)
    # IMMEDIATE: another sheet's script opening the same file waits here, then finds the
    # version current.
    db.execute("BEGIN IMMEDIATE")
    upgraded = False
    try:
        version = _schema_version(db, path)
        if version < SCHEMA_VERSION:
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'items'").fetchone():
                for step in range(version, SCHEMA_VERSION):
                    _UPGRADES[step](db)
                upgraded = rewrites
            else:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # SQLite may have rolled back already (disk full)
            db.execute("ROLLBACK")
        raise
    if upgraded:
        # The upgrade rewrote the items table: give the old one's pages back to the disk
        # (1M items: ~0.7 GB). Not needed for anything, so a busy or full disk only skips it.
        try:
            db.execute("VACUUM")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the WAL held the whole rewritten file
        except sqlite3.OperationalError:
            pass
        if log is not None:
            log.info("The journal is up to date (%.0f s).", time.monotonic() - started)

# What an item forgets when Dropbox no longer holds what the journal says (local hashes stay).
_FORGET_DROPBOX = (f"state = '{State.PENDING}', session_id = NULL, session_started = NULL, confirmed_offset = 0, "
                   "confirmed_chunks = NULL, remote_rev = NULL, remote_path = NULL")
# An item whose bytes go into an upload session (parameters: state first, as the columns).
_START_SESSION = ("UPDATE items SET state = ?, session_id = ?, session_started = ?, confirmed_offset = ?, "
                  "confirmed_chunks = NULL, content_hash = ?, sha256 = ?, error = NULL, updated = ? WHERE id = ?")
# A source's items (parameters: job, path_key(source), source): the key finds them in the index,
# the path itself rules out another path with the same key.
_OF_SOURCE = "job = ? AND source_key = ? AND source = ?"
# The deletion marks of a source's items (parameters: updated, then those of _OF_SOURCE).
_MARK_DELETING = f"UPDATE items SET source_deleted = {SourceDeleted.DELETING}, updated = ? WHERE {_OF_SOURCE}"
_MARK_DELETED = f"UPDATE items SET source_deleted = {SourceDeleted.DELETED}, updated = ? WHERE {_OF_SOURCE}"
_TAKE_BACK_DELETING = (f"UPDATE items SET source_deleted = {SourceDeleted.KEPT}, updated = ? "
                       f"WHERE {_OF_SOURCE} AND source_deleted = {SourceDeleted.DELETING}")

ITEM_COLUMNS = ("id", "job", "source", "destination", "kind", "part_offset", "length", "source_size",
                "source_mtime_ns", "state", "session_id", "session_started", "confirmed_offset",
                "content_hash", "sha256", "remote_rev", "error", "source_deleted", "confirmed_chunks", "source_id",
                "hash_local", "remote_path")
# Item's fields as selected: the job comes from the Journal (a number in the table), hashes as text.
_SELECT_ITEMS = "SELECT " + ", ".join("NULL" if column == "job" else column for column in ITEM_COLUMNS) + " FROM items"
_CONTENT_HASH, _SHA256 = ITEM_COLUMNS.index("content_hash"), ITEM_COLUMNS.index("sha256")


@dataclass(slots=True)
class Item:
    """One thing to put at one Dropbox path: a whole file, one part of a split file, or a
    split file's manifest; for a download, one Dropbox file to write to disk, or a split file
    joined from its downloaded parts (see Kind). kind, state and source_deleted may be given as
    their stored values; the item holds the enum members."""

    id: int | None
    job: str
    source: str
    destination: str
    kind: Kind
    part_offset: int
    length: int
    source_size: int
    source_mtime_ns: int
    state: State = State.PENDING
    session_id: str | None = None
    session_started: float | None = None
    confirmed_offset: int = 0
    content_hash: str | None = None
    sha256: str | None = None
    remote_rev: str | None = None
    error: str | None = None
    source_deleted: SourceDeleted = SourceDeleted.KEPT
    # "@<piece size>;0,1,5": pieces of a concurrent session already in Dropbox ("0,1,5" in
    # journals written before the piece size was recorded: pieces were then chunkSize_MB).
    confirmed_chunks: str | None = None
    source_id: str | None = None   # "st_dev:st_ino" when planned; compared when known
    hash_local: int = 0            # content_hash came from the local bytes (not from Dropbox)
    remote_path: str | None = None  # the path Dropbox answered with (autorename may change it)

    def __post_init__(self) -> None:
        # Rows and engines give the stored text ("file"); an item always carries the members.
        self.kind = _member(_KIND_OF, Kind, self.kind)
        self.state = _member(_STATE_OF, State, self.state)
        self.source_deleted = _member(_SOURCE_DELETED_OF, SourceDeleted, self.source_deleted)

    @property
    def remote_key_path(self) -> str:
        """Where Dropbox holds (or should hold) this item."""
        return self.remote_path or self.destination

    def chunk_set(self) -> set[int]:
        listed = (self.confirmed_chunks or "").rpartition(";")[2]
        return {int(x) for x in listed.split(",")} if listed else set()

    def chunk_piece_size(self) -> int | None:
        """The piece size the confirmed pieces were cut with, when the journal recorded it."""
        text = self.confirmed_chunks or ""
        return int(text[1:text.index(";")]) if text.startswith("@") and ";" in text else None

    @property
    def key(self) -> tuple[str, str]:
        return (self.source, self.destination)


class _JobLock:
    """An OS-level lock on a small file: released by the OS when the process dies, even by
    kill -9, so a crash never leaves a stale lock behind."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = open(path, "a+b")
        try:
            _os_lock(self._handle)
        except OSError:
            self._handle.close()
            raise JournalLocked(
                "another copy of this script is already working on this sheet (its journal is "
                "locked). Let it finish, or close its window first; two copies at once would send "
                "the same files twice.", paths=[path]) from None
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(f"{os.getpid()}\n".encode())
        self._handle.flush()

    def release(self) -> None:
        try:
            self._handle.close()
        except OSError:
            pass


class SettledFolders:
    """One job's settled folders in the journal (the settled_folders table): folders whose every
    file was sent, verified and recorded done, by their folder_digest. A rerun's Stage 1 leaves
    a folder out while its files give the same digest (prepare.build_plan); the Journal forgets a
    folder as soon as one of its items is no longer done. Shares the Journal's connection and lock."""

    def __init__(self, journal: "Journal"):
        self._journal = journal

    def any(self) -> bool:
        """Whether any folder of this job is recorded (else Stage 1 need not ask)."""
        journal = self._journal
        with journal._mutex:
            return journal._db.execute("SELECT 1 FROM settled_folders WHERE job = ? LIMIT 1",
                                       (journal._job_id,)).fetchone() is not None

    def holds(self, key: int, digest: bytes) -> bool:
        """Whether the folder pair `key` (settled_key) was recorded with exactly this folder_digest:
        every file it has now was sent, verified and recorded done, and has not changed since."""
        journal = self._journal
        with journal._mutex:
            row = journal._db.execute("SELECT digest FROM settled_folders WHERE job = ? AND folder_key = ?",
                                      (journal._job_id, key)).fetchone()
        return row is not None and row[0] == digest

    def record(self, folders: Iterable[tuple[int, bytes]]) -> None:
        """Record (settled_key, folder_digest) pairs in one transaction: call only for folders
        whose every file's items are done now (and listed in their row's inventory)."""
        journal = self._journal
        rows = [(journal._job_id, key, digest) for key, digest in folders]
        if not rows:
            return
        with journal._mutex:
            try:
                journal._db.execute("BEGIN")
                journal._db.executemany(
                    "INSERT OR REPLACE INTO settled_folders (job, folder_key, digest) VALUES (?, ?, ?)", rows)
                journal._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                journal._db.execute("ROLLBACK")
                raise JournalError(f"cannot write to the journal {journal.path} ({exc}); is the disk full?",
                                   paths=[journal.path]) from None

    def forget(self, items: Iterable[Item]) -> None:
        """Forget these items' folders; inside the caller's transaction and the journal's lock."""
        journal = self._journal
        keys = {item_folder_key(item.source, item.destination) for item in items}
        journal._db.executemany("DELETE FROM settled_folders WHERE job = ? AND folder_key = ?",
                                [(journal._job_id, key) for key in keys])

    def forget_one(self, item: Item) -> None:
        """Forget one item's folder (takes the journal's lock)."""
        self._journal._write("DELETE FROM settled_folders WHERE job = ? AND folder_key = ?",
                             (self._journal._job_id, item_folder_key(item.source, item.destination)))

    def forget_all(self) -> None:
        self._journal._write("DELETE FROM settled_folders WHERE job = ?", (self._journal._job_id,))


class Journal:
    """Thread-safe access to one job's rows of the journal database."""

    def __init__(self, path: Path, job: str, log: logging.Logger | None = None):
        self.path = Path(path)
        self.job = job
        self.path.parent.mkdir(parents=True, exist_ok=True)
        safe_job = "".join(c if c.isalnum() or c in "-_" else "_" for c in job)
        self._lock_file = _JobLock(self.path.with_name(f"{self.path.stem}_{safe_job}.lock"))
        self._mutex = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self.settled_folders = SettledFolders(self)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60,
                                       isolation_level=None)
            # WAL keeps every commit across a crash at little cost, but SQLite says it does not
            # work over a network file system (the tool kept on Z:\): roll-back journal there.
            self.wal = not on_network_drive(self.path.parent)
            self._db.execute("PRAGMA journal_mode=WAL" if self.wal else "PRAGMA journal_mode=DELETE")
            self._db.execute("PRAGMA synchronous=NORMAL")
            _bring_schema_up_to_date(self._db, self.path, self._lock_file.path, log)
            self._db.execute("INSERT OR IGNORE INTO jobs (name) VALUES (?)", (job,))
            self._job_id = self._db.execute("SELECT id FROM jobs WHERE name = ?", (job,)).fetchone()[0]
        except (sqlite3.DatabaseError, JournalError) as exc:
            if self._db is not None:
                self._db.close()
            self._lock_file.release()
            if isinstance(exc, JournalError):
                raise
            raise JournalError(f"the journal {self.path} cannot be opened ({exc}). If the disk "
                               "is full, free some space; if the file is damaged, move it aside "
                               "(finished files will then be checked against Dropbox again).",
                               paths=[self.path]) from None

    def close(self) -> None:
        with self._mutex:
            self._db.close()
        self._lock_file.release()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, sql: str, params: Iterable = ()) -> sqlite3.Cursor:
        with self._mutex:
            try:
                return self._db.execute(sql, tuple(params))
            except sqlite3.OperationalError as exc:
                raise JournalError(f"cannot write to the journal {self.path} ({exc}); is the disk "
                                   "full?", paths=[self.path]) from None

    # -- reading -----------------------------------------------------------------------------

    def _item(self, row: tuple) -> Item:
        values = list(row)
        values[1] = self.job
        values[_CONTENT_HASH], values[_SHA256] = _unpack_hash(values[_CONTENT_HASH]), _unpack_hash(values[_SHA256])
        return Item(*values)  # Item converts the stored text to members

    def items(self, state: State | str | None = None) -> list[Item]:
        sql = f"{_SELECT_ITEMS} WHERE job = ?"
        params: list = [self._job_id]
        if state is not None:
            sql += " AND state = ?"
            params.append(State(state).value)
        with self._mutex:
            rows = self._db.execute(sql + " ORDER BY id", params).fetchall()
        return [self._item(row) for row in rows]

    def items_by_key(self) -> dict[tuple[str, str], Item]:
        return {item.key: item for item in self.items()}

    def deleted_sources(self) -> set[str]:
        with self._mutex:
            rows = self._db.execute("SELECT DISTINCT source FROM items WHERE job = ? AND source_deleted != ?",
                                    (self._job_id, SourceDeleted.KEPT.value)).fetchall()
        return {row[0] for row in rows}

    def sent_unchanged(self, source: str, size: int, mtime_ns: int) -> bool:
        """True when every item of `source` is done and was planned from a file of this size and
        modification time: a rerun's Stage 1 need not open it to see whether it can be read."""
        return bool(self.sent_unchanged_among([(source, size, mtime_ns)]))

    def sent_unchanged_among(self, files: list[tuple[str, int, int]]) -> set[str]:
        """The sources among `files` ((source, size, mtime_ns), up to a folder's worth) of which
        sent_unchanged holds: one indexed query for them all (the items_key index), no per-file
        memory beyond the list."""
        wanted = {source: (size, mtime_ns) for source, size, mtime_ns in files}
        keys = list({path_key(source) for source in wanted})
        done: dict[str, bool] = {}
        for start in range(0, len(keys), 500):  # well under SQLite's limit of bound parameters
            chunk = keys[start:start + 500]
            with self._mutex:
                rows = self._db.execute(
                    f"SELECT source, source_size, source_mtime_ns, state FROM items WHERE job = ? AND source_key "
                    f"IN ({', '.join('?' * len(chunk))})", (self._job_id, *chunk)).fetchall()
            for source, size, mtime_ns, state in rows:
                # Items planned from another size or date are of an earlier version: not counted.
                if wanted.get(source) == (size, mtime_ns):
                    done[source] = done.get(source, True) and state == State.DONE.value
        return {source for source, all_done in done.items() if all_done}

    # -- planning ----------------------------------------------------------------------------

    def sync_plan(self, planned: Iterable[Item]) -> list[Item]:
        """Bring the journal in line with this run's plan and return the plan's items with
        their recorded state. A source whose size or modification time changed starts over.
        Each item is looked up by its key (no item of the job is held beyond the plan's)."""
        result: list[Item] = []
        inserts: list[Item] = []
        resets: list[Item] = []
        ids: list[Item] = []  # items from journals that did not record the file id yet
        # The table has no UNIQUE index (see the module doc): a plan giving one (source,
        # destination) twice would be sent twice, so it is refused here, as the index did.
        new_keys: set[int] = set()
        for item in planned:
            old = self._recorded(item.source, item.destination)
            if old is None:
                key = hash(item.key)
                if key in new_keys and any(other.key == item.key for other in inserts):
                    raise RuntimeError(f"the plan gives {item.source} -> {item.destination} twice (a bug)")
                new_keys.add(key)
                inserts.append(item)
                result.append(item)
            elif (old.source_size, old.source_mtime_ns, old.part_offset, old.length, old.kind) != (
                    item.source_size, item.source_mtime_ns, item.part_offset, item.length, item.kind) or (
                    old.source_id and item.source_id and old.source_id != item.source_id):
                item.id = old.id
                resets.append(item)
                result.append(item)
            else:
                if item.source_id and not old.source_id:
                    old.source_id = item.source_id
                    ids.append(old)
                result.append(old)
        now = time.time()
        with self._mutex:
            try:
                self._db.execute("BEGIN")
                for item in inserts:
                    cursor = self._db.execute(
                        "INSERT INTO items (job, source_key, destination_key, source, destination, kind, part_offset, "
                        "length, source_size, source_mtime_ns, state, updated, source_id) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (self._job_id, path_key(item.source), path_key(item.destination), item.source,
                         item.destination, item.kind.value, item.part_offset, item.length, item.source_size,
                         item.source_mtime_ns, State.PENDING.value, now, item.source_id))
                    item.id = cursor.lastrowid
                for item in resets:
                    self._db.execute(
                        "UPDATE items SET kind = ?, part_offset = ?, length = ?, source_size = ?, "
                        "source_mtime_ns = ?, state = ?, session_id = NULL, session_started = NULL, "
                        "confirmed_offset = 0, content_hash = NULL, sha256 = NULL, remote_rev = NULL, "
                        "error = NULL, source_deleted = ?, confirmed_chunks = NULL, source_id = ?, hash_local = 0, "
                        "remote_path = NULL, updated = ? WHERE id = ?",
                        (item.kind.value, item.part_offset, item.length, item.source_size, item.source_mtime_ns,
                         State.PENDING.value, SourceDeleted.KEPT.value, item.source_id, now, item.id))
                for item in ids:
                    self._db.execute("UPDATE items SET source_id = ? WHERE id = ?", (item.source_id, item.id))
                self.settled_folders.forget(resets)
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._db.execute("ROLLBACK")
                raise JournalError(f"cannot write to the journal {self.path} ({exc}); is the disk full?",
                                   paths=[self.path]) from None
        return result

    def _recorded(self, source: str, destination: str) -> Item | None:
        """The job's item for (source, destination), or None."""
        with self._mutex:
            row = self._db.execute(
                f"{_SELECT_ITEMS} WHERE {_OF_SOURCE} AND destination_key = ? AND destination = ?",
                (self._job_id, path_key(source), source, path_key(destination), destination)).fetchone()
        return None if row is None else self._item(row)

    # -- progress ----------------------------------------------------------------------------

    def start_session(self, item: Item, session_id: str, started: float, offset: int) -> None:
        item.session_id, item.session_started, item.confirmed_offset = session_id, started, offset
        item.state, item.confirmed_chunks = State.UPLOADING, None
        # The item's hashes go along: a closed small session is known complete in one write.
        self._write(_START_SESSION, (State.UPLOADING.value, session_id, started, offset,
                                     _pack_hash(item.content_hash), _pack_hash(item.sha256), time.time(), item.id))

    def record_closed_sessions(self, sessions: Iterable[tuple[Item, str]], started: float) -> None:
        """Small files whose whole content sits in a closed session, waiting for their batch
        commit: recorded in one transaction (they arrive by the thousand)."""
        now = time.time()
        with self._mutex:
            self._db.execute("BEGIN")
            for item, session_id in sessions:
                item.session_id, item.session_started, item.confirmed_offset = session_id, started, item.length
                item.state, item.confirmed_chunks = State.UPLOADING, None
                self._db.execute(_START_SESSION, (State.UPLOADING.value, session_id, started, item.length,
                                                  _pack_hash(item.content_hash), _pack_hash(item.sha256), now,
                                                  item.id))
            self._db.execute("COMMIT")

    def confirm_offset(self, item: Item, offset: int) -> None:
        item.confirmed_offset = offset
        self._write("UPDATE items SET confirmed_offset = ?, updated = ? WHERE id = ?",
                    (offset, time.time(), item.id))

    def forget_session(self, item: Item) -> None:
        item.session_id, item.session_started, item.confirmed_offset = None, None, 0
        item.confirmed_chunks = None
        self._write("UPDATE items SET session_id = NULL, session_started = NULL, confirmed_offset = 0, "
                    "confirmed_chunks = NULL, updated = ? WHERE id = ?", (time.time(), item.id))

    def confirm_chunks(self, item: Item, chunks: set[int], piece_size: int) -> None:
        """Concurrent sessions: these pieces are in Dropbox (appends arrive in any order)."""
        item.confirmed_chunks = f"@{piece_size};" + ",".join(str(c) for c in sorted(chunks))
        self._write("UPDATE items SET confirmed_chunks = ?, updated = ? WHERE id = ?",
                    (item.confirmed_chunks, time.time(), item.id))

    def mark_done(self, items: Iterable[Item]) -> None:
        """Record verified items in one transaction (small files are committed by the thousand)."""
        items = list(items)
        now = time.time()
        with self._mutex:
            self._db.execute("BEGIN")
            for item in items:
                item.state, item.error = State.DONE, None
                self._db.execute(
                    "UPDATE items SET state = ?, content_hash = ?, sha256 = ?, remote_rev = ?, "
                    "error = NULL, session_id = NULL, hash_local = ?, remote_path = ?, updated = ? WHERE id = ?",
                    (State.DONE.value, _pack_hash(item.content_hash), _pack_hash(item.sha256), item.remote_rev,
                     item.hash_local, None if item.remote_path == item.destination else item.remote_path, now,
                     item.id))
            self._db.execute("COMMIT")

    def mark_failed(self, item: Item, error: str) -> None:
        item.state, item.error = State.FAILED, error
        self._write("UPDATE items SET state = ?, error = ?, updated = ? WHERE id = ?",
                    (State.FAILED.value, error, time.time(), item.id))
        self.settled_folders.forget_one(item)

    def mark_source_deleting(self, source: str) -> None:
        """Written ahead of the unlink: a rerun after a crash between the unlink and
        mark_source_deleted finds the mark and finishes the bookkeeping."""
        self._write(_MARK_DELETING, (time.time(), self._job_id, path_key(source), source))

    def mark_source_deleted(self, source: str) -> None:
        self._write(_MARK_DELETED, (time.time(), self._job_id, path_key(source), source))

    def clear_source_deleting(self, source: str) -> None:
        self._write(_TAKE_BACK_DELETING, (time.time(), self._job_id, path_key(source), source))

    def mark_sources_deleting(self, sources: Iterable[str]) -> None:
        """mark_source_deleting for many sources in one transaction."""
        now = time.time()
        self._in_one_transaction([(_MARK_DELETING, [(now, self._job_id, path_key(source), source)
                                                    for source in sources])])

    def settle_sources(self, deleted: Iterable[str], kept: Iterable[str]) -> None:
        """After the unlinks: 'deleted' for these, the 'deleting' mark taken back for those."""
        now = time.time()
        self._in_one_transaction([
            (_MARK_DELETED, [(now, self._job_id, path_key(source), source) for source in deleted]),
            (_TAKE_BACK_DELETING, [(now, self._job_id, path_key(source), source) for source in kept])])

    def _in_one_transaction(self, statements: list[tuple[str, list]]) -> None:
        with self._mutex:
            try:
                self._db.execute("BEGIN")
                for sql, rows in statements:
                    self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._db.execute("ROLLBACK")
                raise JournalError(f"cannot write to the journal {self.path} ({exc}); is the disk full?",
                                   paths=[self.path]) from None

    def finish_interrupted_deletions(self) -> list[tuple[str, bool]]:
        """Settle the 'deleting' marks an interrupted run left: gone -> deleted, still there ->
        kept (its deletion is proven again). Returns (source, was deleted) pairs."""
        with self._mutex:
            rows = self._db.execute("SELECT DISTINCT source FROM items WHERE job = ? AND source_deleted = ?",
                                    (self._job_id, SourceDeleted.DELETING.value)).fetchall()
        settled = []
        for (source,) in rows:
            gone = not os.path.lexists(source)
            if gone:
                self.mark_source_deleted(source)
            else:
                self.clear_source_deleting(source)
            settled.append((source, gone))
        return settled

    def reopen(self, items: Iterable[Item]) -> None:
        """Items the journal called done that Dropbox no longer holds: to be sent again (their
        local hashes stay; sessions and Dropbox facts are forgotten)."""
        items = list(items)
        now = time.time()
        with self._mutex:
            self._db.execute("BEGIN")
            for item in items:
                item.state, item.session_id, item.session_started = State.PENDING, None, None
                item.confirmed_offset, item.confirmed_chunks, item.remote_rev, item.remote_path = 0, None, None, None
                self._db.execute(f"UPDATE items SET {_FORGET_DROPBOX}, updated = ? WHERE id = ?", (now, item.id))
            self.settled_folders.forget(items)
            self._db.execute("COMMIT")

    # -- whose Dropbox -----------------------------------------------------------------------

    def bind_account(self, account_id: str, root_namespace: str) -> tuple[str, str] | None:
        """Record the account and root namespace this job now works in. Returns the earlier
        (account_id, root_namespace) when it was another one: everything the journal calls done
        or in flight then describes another Dropbox, and is forgotten here (local hashes stay),
        so the run looks in this Dropbox and sends what is missing."""
        with self._mutex:
            row = self._db.execute("SELECT account_id, root_namespace FROM accounts WHERE job = ?",
                                   (self.job,)).fetchone()
        previous = tuple(row) if row else None
        if previous is not None and previous != (account_id, root_namespace):
            self._write(f"UPDATE items SET {_FORGET_DROPBOX}, updated = ? WHERE job = ? AND state != ?",
                        (time.time(), self._job_id, State.PENDING.value))
            self.settled_folders.forget_all()
        if previous != (account_id, root_namespace):
            self._write("INSERT INTO accounts (job, account_id, root_namespace, updated) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (job) DO UPDATE SET account_id = excluded.account_id, "
                        "root_namespace = excluded.root_namespace, updated = excluded.updated",
                        (self.job, account_id, root_namespace, time.time()))
        return previous if previous is not None and previous != (account_id, root_namespace) else None

    # -- batches (desktop-app mode) ----------------------------------------------------------

    def batch_state(self, number: int) -> BatchState | None:
        with self._mutex:
            row = self._db.execute("SELECT state FROM batches WHERE job = ? AND number = ?",
                                   (self.job, number)).fetchone()
        return BatchState(row[0]) if row else None

    def set_batch_state(self, number: int, state: BatchState | str) -> None:
        """ValueError for a state BatchState does not have (a bug)."""
        self._write("INSERT INTO batches (job, number, state, started, updated) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (job, number) DO UPDATE SET state = excluded.state, updated = excluded.updated",
                    (self.job, number, BatchState(state).value, time.time(), time.time()))

    # -- desktop-app mode: copied items and batch membership ------------------------------------

    def mark_copied(self, item: Item) -> None:
        """The item sits complete under its real name in the local Dropbox folder; its hashes
        (computed while copying) are what Dropbox must later report."""
        item.state, item.error = State.COPIED, None
        self._write("UPDATE items SET state = ?, content_hash = ?, sha256 = ?, error = NULL, updated = ? "
                    "WHERE id = ?", (State.COPIED.value, _pack_hash(item.content_hash), _pack_hash(item.sha256),
                                     time.time(), item.id))

    def mark_pending(self, item: Item) -> None:
        """Forget an item's copy (it is to be copied again)."""
        item.state, item.error, item.content_hash, item.sha256 = State.PENDING, None, None, None
        self._write("UPDATE items SET state = ?, content_hash = NULL, sha256 = NULL, error = NULL, "
                    "updated = ? WHERE id = ?", (State.PENDING.value, time.time(), item.id))
        self.settled_folders.forget_one(item)

    def item_batches(self) -> dict[int, int]:
        """Item id -> the batch it was given when first planned (stable across reruns)."""
        with self._mutex:
            rows = self._db.execute("SELECT item_id, batch FROM batch_items WHERE job = ?", (self.job,)).fetchall()
        return dict(rows)

    def record_item_batches(self, batches: dict[int, int]) -> None:
        """Record the batch of newly planned items, all in one transaction."""
        if not batches:
            return
        with self._mutex:
            try:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO batch_items (item_id, job, batch) VALUES (?, ?, ?)",
                                     [(item_id, self.job, batch) for item_id, batch in batches.items()])
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._db.execute("ROLLBACK")
                raise JournalError(f"cannot write to the journal {self.path} ({exc}); is the disk full?",
                                   paths=[self.path]) from None

    # -- downloads ---------------------------------------------------------------------------

    def mark_downloading(self, item: Item, remote_rev: str) -> None:
        """A download into a partial file has started from this Dropbox revision; a rerun
        continues the partial only while Dropbox still holds the same revision."""
        item.state, item.remote_rev, item.error = State.DOWNLOADING, remote_rev, None
        self._write("UPDATE items SET state = ?, remote_rev = ?, error = NULL, updated = ? WHERE id = ?",
                    (State.DOWNLOADING.value, remote_rev, time.time(), item.id))

