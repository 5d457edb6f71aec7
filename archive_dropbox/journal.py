"""The SQLite journal: what has been sent where, so that any run can be stopped at any moment
(Ctrl-C, crash, kill -9, power cut) and a rerun continues without redoing finished work.

One database in logs/ holds every job; a job is one sheet (dropboxUpload_API, ...). Items are
keyed by (job, source, destination), so the same file in two sheets or to two destinations is
tracked separately. WAL mode keeps every committed write across a process crash; one lock
file per job refuses a second copy of the same script on the same sheet.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .errors import JournalError, JournalLocked
from .localfs import on_network_drive

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    job TEXT NOT NULL,
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    kind TEXT NOT NULL,              -- file | part | manifest
    part_offset INTEGER NOT NULL,    -- where this item's bytes start in the source
    length INTEGER NOT NULL,         -- how many bytes this item holds
    source_size INTEGER NOT NULL,
    source_mtime_ns INTEGER NOT NULL,
    state TEXT NOT NULL,             -- pending | uploading | done | failed
    session_id TEXT,
    session_started REAL,
    confirmed_offset INTEGER NOT NULL DEFAULT 0,
    content_hash TEXT,               -- local Dropbox content hash of the item's bytes
    sha256 TEXT,                     -- SHA-256 of the item's bytes (split parts)
    remote_rev TEXT,
    error TEXT,
    source_deleted INTEGER NOT NULL DEFAULT 0,  -- 0 kept | 2 deleting (written ahead) | 1 deleted
    updated REAL NOT NULL,
    confirmed_chunks TEXT,           -- concurrent sessions: indexes of the chunks Dropbox confirmed
    source_id TEXT,                  -- "st_dev:st_ino" of the source when planned (NULL: unknown)
    hash_local INTEGER NOT NULL DEFAULT 0,  -- 1: content_hash was computed from the local bytes
    remote_path TEXT,                -- where Dropbox put it (differs from destination after autorename)
    UNIQUE (job, source, destination)
);
CREATE INDEX IF NOT EXISTS items_job_state ON items (job, state);
CREATE TABLE IF NOT EXISTS batches (
    job TEXT NOT NULL,
    number INTEGER NOT NULL,
    state TEXT NOT NULL,             -- copying | waiting | verified | deleted
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
"""
# Columns added after the first journals were written: (name, definition).
ADDED_COLUMNS = (("confirmed_chunks", "TEXT"), ("source_id", "TEXT"),
                 ("hash_local", "INTEGER NOT NULL DEFAULT 0"), ("remote_path", "TEXT"))

# What an item forgets when Dropbox no longer holds what the journal says (local hashes stay).
_FORGET_DROPBOX = ("state = 'pending', session_id = NULL, session_started = NULL, confirmed_offset = 0, "
                   "confirmed_chunks = NULL, remote_rev = NULL, remote_path = NULL")

ITEM_COLUMNS = ("id", "job", "source", "destination", "kind", "part_offset", "length", "source_size",
                "source_mtime_ns", "state", "session_id", "session_started", "confirmed_offset",
                "content_hash", "sha256", "remote_rev", "error", "source_deleted", "confirmed_chunks", "source_id",
                "hash_local", "remote_path")


@dataclass
class Item:
    """One thing to put at one Dropbox path: a whole file, one part of a split file, or a
    split file's manifest."""

    id: int | None
    job: str
    source: str
    destination: str
    kind: str
    part_offset: int
    length: int
    source_size: int
    source_mtime_ns: int
    state: str = "pending"
    session_id: str | None = None
    session_started: float | None = None
    confirmed_offset: int = 0
    content_hash: str | None = None
    sha256: str | None = None
    remote_rev: str | None = None
    error: str | None = None
    source_deleted: int = 0
    # "@<piece size>;0,1,5": pieces of a concurrent session already in Dropbox ("0,1,5" in
    # journals written before the piece size was recorded: pieces were then chunkSize_MB).
    confirmed_chunks: str | None = None
    source_id: str | None = None   # "st_dev:st_ino" when planned; compared when known
    hash_local: int = 0            # content_hash came from the local bytes (not from Dropbox)
    remote_path: str | None = None  # the path Dropbox answered with (autorename may change it)

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
            if os.name == "nt":
                import msvcrt

                self._handle.seek(0)
                msvcrt.locking(self._handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
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


class Journal:
    """Thread-safe access to one job's rows of the journal database."""

    def __init__(self, path: Path, job: str):
        self.path = Path(path)
        self.job = job
        self.path.parent.mkdir(parents=True, exist_ok=True)
        safe_job = "".join(c if c.isalnum() or c in "-_" else "_" for c in job)
        self._lock_file = _JobLock(self.path.with_name(f"{self.path.stem}_{safe_job}.lock"))
        self._mutex = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60,
                                       isolation_level=None)
            # WAL keeps every commit across a crash at little cost, but SQLite says it does not
            # work over a network file system (the tool kept on Z:\): roll-back journal there.
            self.wal = not on_network_drive(self.path.parent)
            self._db.execute("PRAGMA journal_mode=WAL" if self.wal else "PRAGMA journal_mode=DELETE")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(items)")}
            for name, definition in ADDED_COLUMNS:  # journals written by earlier versions
                if name not in columns:
                    self._db.execute(f"ALTER TABLE items ADD COLUMN {name} {definition}")
        except sqlite3.DatabaseError as exc:
            self._lock_file.release()
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

    def items(self, state: str | None = None) -> list[Item]:
        sql = f"SELECT {', '.join(ITEM_COLUMNS)} FROM items WHERE job = ?"
        params: list = [self.job]
        if state is not None:
            sql += " AND state = ?"
            params.append(state)
        with self._mutex:
            rows = self._db.execute(sql + " ORDER BY id", params).fetchall()
        return [Item(*row) for row in rows]

    def items_by_key(self) -> dict[tuple[str, str], Item]:
        return {item.key: item for item in self.items()}

    def sources_done(self) -> dict[str, bool]:
        """For every source: True when all of its items are done."""
        with self._mutex:
            rows = self._db.execute(
                "SELECT source, MIN(state = 'done'), MAX(source_deleted) FROM items WHERE job = ? "
                "GROUP BY source", (self.job,)).fetchall()
        return {source: bool(done) for source, done, _ in rows}

    def deleted_sources(self) -> set[str]:
        with self._mutex:
            rows = self._db.execute("SELECT DISTINCT source FROM items WHERE job = ? AND source_deleted != 0",
                                    (self.job,)).fetchall()
        return {row[0] for row in rows}

    # -- planning ----------------------------------------------------------------------------

    def sync_plan(self, planned: Iterable[Item]) -> list[Item]:
        """Bring the journal in line with this run's plan and return the plan's items with
        their recorded state. A source whose size or modification time changed starts over."""
        known = self.items_by_key()
        result: list[Item] = []
        inserts: list[Item] = []
        resets: list[Item] = []
        ids: list[Item] = []  # items from journals that did not record the file id yet
        for item in planned:
            old = known.get(item.key)
            if old is None:
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
                        "INSERT INTO items (job, source, destination, kind, part_offset, length, source_size, "
                        "source_mtime_ns, state, updated, source_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                        (self.job, item.source, item.destination, item.kind, item.part_offset, item.length,
                         item.source_size, item.source_mtime_ns, now, item.source_id))
                    item.id = cursor.lastrowid
                for item in resets:
                    self._db.execute(
                        "UPDATE items SET kind = ?, part_offset = ?, length = ?, source_size = ?, "
                        "source_mtime_ns = ?, state = 'pending', session_id = NULL, session_started = NULL, "
                        "confirmed_offset = 0, content_hash = NULL, sha256 = NULL, remote_rev = NULL, "
                        "error = NULL, source_deleted = 0, confirmed_chunks = NULL, source_id = ?, hash_local = 0, "
                        "remote_path = NULL, updated = ? WHERE id = ?",
                        (item.kind, item.part_offset, item.length, item.source_size, item.source_mtime_ns,
                         item.source_id, now, item.id))
                for item in ids:
                    self._db.execute("UPDATE items SET source_id = ? WHERE id = ?", (item.source_id, item.id))
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._db.execute("ROLLBACK")
                raise JournalError(f"cannot write to the journal {self.path} ({exc}); is the disk full?",
                                   paths=[self.path]) from None
        return result

    # -- progress ----------------------------------------------------------------------------

    def start_session(self, item: Item, session_id: str, started: float, offset: int) -> None:
        item.session_id, item.session_started, item.confirmed_offset = session_id, started, offset
        item.state, item.confirmed_chunks = "uploading", None
        # The item's hashes go along: a closed small session is known complete in one write.
        self._write("UPDATE items SET state = 'uploading', session_id = ?, session_started = ?, "
                    "confirmed_offset = ?, confirmed_chunks = NULL, content_hash = ?, sha256 = ?, error = NULL, "
                    "updated = ? WHERE id = ?",
                    (session_id, started, offset, item.content_hash, item.sha256, time.time(), item.id))

    def record_closed_sessions(self, sessions: Iterable[tuple[Item, str]], started: float) -> None:
        """Small files whose whole content sits in a closed session, waiting for their batch
        commit: recorded in one transaction (they arrive by the thousand)."""
        now = time.time()
        with self._mutex:
            self._db.execute("BEGIN")
            for item, session_id in sessions:
                item.session_id, item.session_started, item.confirmed_offset = session_id, started, item.length
                item.state, item.confirmed_chunks = "uploading", None
                self._db.execute(
                    "UPDATE items SET state = 'uploading', session_id = ?, session_started = ?, "
                    "confirmed_offset = ?, confirmed_chunks = NULL, content_hash = ?, sha256 = ?, error = NULL, "
                    "updated = ? WHERE id = ?",
                    (session_id, started, item.length, item.content_hash, item.sha256, now, item.id))
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
                item.state, item.error = "done", None
                self._db.execute(
                    "UPDATE items SET state = 'done', content_hash = ?, sha256 = ?, remote_rev = ?, "
                    "error = NULL, session_id = NULL, hash_local = ?, remote_path = ?, updated = ? WHERE id = ?",
                    (item.content_hash, item.sha256, item.remote_rev, item.hash_local, item.remote_path, now,
                     item.id))
            self._db.execute("COMMIT")

    def mark_failed(self, item: Item, error: str) -> None:
        item.state, item.error = "failed", error
        self._write("UPDATE items SET state = 'failed', error = ?, updated = ? WHERE id = ?",
                    (error, time.time(), item.id))

    def set_hashes(self, item: Item) -> None:
        self._write("UPDATE items SET content_hash = ?, sha256 = ?, updated = ? WHERE id = ?",
                    (item.content_hash, item.sha256, time.time(), item.id))

    def mark_source_deleting(self, source: str) -> None:
        """Written ahead of the unlink: a rerun after a crash between the unlink and
        mark_source_deleted finds the mark and finishes the bookkeeping."""
        self._write("UPDATE items SET source_deleted = 2, updated = ? WHERE job = ? AND source = ?",
                    (time.time(), self.job, source))

    def mark_source_deleted(self, source: str) -> None:
        self._write("UPDATE items SET source_deleted = 1, updated = ? WHERE job = ? AND source = ?",
                    (time.time(), self.job, source))

    def clear_source_deleting(self, source: str) -> None:
        self._write("UPDATE items SET source_deleted = 0, updated = ? WHERE job = ? AND source = ? "
                    "AND source_deleted = 2", (time.time(), self.job, source))

    def mark_sources_deleting(self, sources: Iterable[str]) -> None:
        """mark_source_deleting for many sources in one transaction."""
        self._in_one_transaction([("UPDATE items SET source_deleted = 2, updated = ? WHERE job = ? AND source = ?",
                                   [(time.time(), self.job, source) for source in sources])])

    def settle_sources(self, deleted: Iterable[str], kept: Iterable[str]) -> None:
        """After the unlinks: 'deleted' for these, the 'deleting' mark taken back for those."""
        now = time.time()
        self._in_one_transaction([
            ("UPDATE items SET source_deleted = 1, updated = ? WHERE job = ? AND source = ?",
             [(now, self.job, source) for source in deleted]),
            ("UPDATE items SET source_deleted = 0, updated = ? WHERE job = ? AND source = ? AND source_deleted = 2",
             [(now, self.job, source) for source in kept])])

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
            rows = self._db.execute("SELECT DISTINCT source FROM items WHERE job = ? AND source_deleted = 2",
                                    (self.job,)).fetchall()
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
                item.state, item.session_id, item.session_started = "pending", None, None
                item.confirmed_offset, item.confirmed_chunks, item.remote_rev, item.remote_path = 0, None, None, None
                self._db.execute(f"UPDATE items SET {_FORGET_DROPBOX}, updated = ? WHERE id = ?", (now, item.id))
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
            self._write(f"UPDATE items SET {_FORGET_DROPBOX}, updated = ? WHERE job = ? AND state != 'pending'",
                        (time.time(), self.job))
        if previous != (account_id, root_namespace):
            self._write("INSERT INTO accounts (job, account_id, root_namespace, updated) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (job) DO UPDATE SET account_id = excluded.account_id, "
                        "root_namespace = excluded.root_namespace, updated = excluded.updated",
                        (self.job, account_id, root_namespace, time.time()))
        return previous if previous is not None and previous != (account_id, root_namespace) else None

    # -- batches (desktop-app mode) ----------------------------------------------------------

    def batch_state(self, number: int) -> str | None:
        with self._mutex:
            row = self._db.execute("SELECT state FROM batches WHERE job = ? AND number = ?",
                                   (self.job, number)).fetchone()
        return row[0] if row else None

    def set_batch_state(self, number: int, state: str) -> None:
        self._write("INSERT INTO batches (job, number, state, started, updated) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (job, number) DO UPDATE SET state = excluded.state, updated = excluded.updated",
                    (self.job, number, state, time.time(), time.time()))

    # -- desktop-app mode: copied items and batch membership ------------------------------------

    def mark_copied(self, item: Item) -> None:
        """The item sits complete under its real name in the local Dropbox folder; its hashes
        (computed while copying) are what Dropbox must later report."""
        item.state, item.error = "copied", None
        self._write("UPDATE items SET state = 'copied', content_hash = ?, sha256 = ?, error = NULL, updated = ? "
                    "WHERE id = ?", (item.content_hash, item.sha256, time.time(), item.id))

    def mark_pending(self, item: Item) -> None:
        """Forget an item's copy (it is to be copied again)."""
        item.state, item.error, item.content_hash, item.sha256 = "pending", None, None, None
        self._write("UPDATE items SET state = 'pending', content_hash = NULL, sha256 = NULL, error = NULL, "
                    "updated = ? WHERE id = ?", (time.time(), item.id))

    def _ensure_batch_items(self) -> None:
        self._write("CREATE TABLE IF NOT EXISTS batch_items (item_id INTEGER PRIMARY KEY, job TEXT NOT NULL, "
                    "batch INTEGER NOT NULL)")

    def item_batches(self) -> dict[int, int]:
        """Item id -> the batch it was given when first planned (stable across reruns)."""
        self._ensure_batch_items()
        with self._mutex:
            rows = self._db.execute("SELECT item_id, batch FROM batch_items WHERE job = ?", (self.job,)).fetchall()
        return dict(rows)

    def record_item_batches(self, batches: dict[int, int]) -> None:
        """Record the batch of newly planned items, all in one transaction."""
        if not batches:
            return
        self._ensure_batch_items()
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
        item.state, item.remote_rev, item.error = "downloading", remote_rev, None
        self._write("UPDATE items SET state = 'downloading', remote_rev = ?, error = NULL, updated = ? WHERE id = ?",
                    (remote_rev, time.time(), item.id))

    def iter_states(self) -> Iterator[tuple[str, int]]:
        with self._mutex:
            rows = self._db.execute("SELECT state, COUNT(*) FROM items WHERE job = ? GROUP BY state",
                                    (self.job,)).fetchall()
        yield from rows
