"""The journal: plans are merged without losing progress, changed files start over, every
write survives kill -9, and a second process on the same sheet is refused."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from types import SimpleNamespace
from pathlib import Path

import pytest

from archive_dropbox.errors import JournalError, JournalLocked
import archive_dropbox.journal as journal_module
from archive_dropbox.journal import SCHEMA, SCHEMA_VERSION, BatchState, Item, Journal, Kind, SourceDeleted, State

REPO = Path(__file__).resolve().parent.parent


def _item(destination: str, size: int = 10, mtime_ns: int = 1, source: str = "/data/a") -> Item:
    return Item(None, "dropboxUpload_API", source, destination, "file", 0, size, size, mtime_ns)


def test_plan_merge_keeps_progress_and_restarts_changed_sources(tmp_path):
    with Journal(tmp_path / "j.sqlite3", "dropboxUpload_API") as journal:
        first, second = journal.sync_plan([_item("/x/a"), _item("/x/b", source="/data/b")])
        journal.start_session(first, "sess-1", 100.0, 4)
        second.content_hash = "h"
        journal.mark_done([second])
    with Journal(tmp_path / "j.sqlite3", "dropboxUpload_API") as journal:
        again = {i.destination: i for i in journal.sync_plan([_item("/x/a"), _item("/x/b", source="/data/b")])}
        assert (again["/x/a"].session_id, again["/x/a"].confirmed_offset, again["/x/a"].state) == ("sess-1", 4, "uploading")
        assert again["/x/b"].state == "done"
        changed = {i.destination: i for i in journal.sync_plan([_item("/x/a", mtime_ns=2)])}
        assert changed["/x/a"].state == "pending" and changed["/x/a"].session_id is None
        assert journal.items_by_key()[("/data/a", "/x/a")].confirmed_offset == 0


def test_same_file_in_two_sheets_is_tracked_separately(tmp_path):
    with Journal(tmp_path / "j.sqlite3", "dropboxUpload_API") as api:
        (item,) = api.sync_plan([_item("/x/a")])
        api.mark_done([item])
    with Journal(tmp_path / "j.sqlite3", "dropboxUpload_APP") as app:
        (other,) = app.sync_plan([Item(None, "dropboxUpload_APP", "/data/a", "/x/a", "file", 0, 10, 10, 1)])
        assert other.state == "pending"


def _holder(journal_path: Path) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from archive_dropbox.journal import Journal
        journal = Journal({str(journal_path)!r}, "dropboxUpload_API")
        (item,) = journal.sync_plan([__import__("archive_dropbox.journal", fromlist=["Item"]).Item(
            None, "dropboxUpload_API", "/data/a", "/x/a", "file", 0, 10, 10, 1)])
        journal.start_session(item, "sess", 1.0, 8)
        print("ready", flush=True)
        time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_second_process_is_refused_and_kill_9_releases_the_lock_keeping_writes(tmp_path):
    path = tmp_path / "j.sqlite3"
    holder = _holder(path)
    try:
        with pytest.raises(JournalLocked, match="already working on this sheet"):
            Journal(path, "dropboxUpload_API")
        Journal(path, "dropboxUpload_APP").close()  # another sheet is independent
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with Journal(path, "dropboxUpload_API") as journal:
        (item,) = journal.items()
        assert (item.session_id, item.confirmed_offset) == ("sess", 8)


def test_journal_on_a_network_drive_uses_the_rollback_journal(tmp_path, monkeypatch):
    """Issue 14, item 15: SQLite's WAL mode does not work over a network file system."""
    import archive_dropbox.journal as journal_module

    monkeypatch.setattr(journal_module, "on_network_drive", lambda path: True)
    with journal_module.Journal(tmp_path / "journal.sqlite3", "job") as journal:
        assert not journal.wal
        assert journal._db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    monkeypatch.setattr(journal_module, "on_network_drive", lambda path: False)
    with journal_module.Journal(tmp_path / "local.sqlite3", "job") as journal:
        assert journal._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_network_mounts_are_recognised_from_the_mount_table():
    from archive_dropbox.localfs import NETWORK_FILE_SYSTEMS, mount_type

    table = ("/dev/sda1 / ext4 rw 0 0\nnas:/lab /mnt/lab nfs4 rw 0 0\n"
             "//srv/share /mnt/my\\040share cifs rw 0 0\n/dev/sdb1 /mnt/lab/local ext4 rw 0 0\n")
    assert mount_type(Path("/mnt/lab/run1/x.tif"), table) in NETWORK_FILE_SYSTEMS
    assert mount_type(Path("/mnt/my share/x"), table) == "cifs"
    assert mount_type(Path("/mnt/lab/local/x"), table) == "ext4"  # the deepest mount wins
    assert mount_type(Path("/mnt/labx"), table) == "ext4"  # whole path components only


# -- states and kinds as enums; the schema and its version ---------------------------------------

# Every value the engines store, found on 2026-11 by grepping archive_dropbox/ for `state ==`,
# `.state in`, `kind=`, `mark_*` and `set_batch_state(`: items.state is written only by the
# journal's mark_*/start_session/reopen methods, items.kind by the plans (prepare.py: file, part,
# manifest; download.py: file, joined), batches.state by the desktop-app engine. A new value
# must be added to the enum (and the schema comment) and here.
ITEM_STATES = ["pending", "uploading", "copied", "downloading", "done", "failed"]
ITEM_KINDS = ["file", "part", "manifest", "joined"]
BATCH_STATES = ["copying", "waiting", "failed", "verified", "deleted"]

# The schema the first release wrote (commit 838b876): no confirmed_chunks, source_id,
# hash_local or remote_path, no accounts, no batch_items, user_version 0.
FIRST_RELEASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, job TEXT NOT NULL, source TEXT NOT NULL, destination TEXT NOT NULL,
    kind TEXT NOT NULL, part_offset INTEGER NOT NULL, length INTEGER NOT NULL, source_size INTEGER NOT NULL,
    source_mtime_ns INTEGER NOT NULL, state TEXT NOT NULL, session_id TEXT, session_started REAL,
    confirmed_offset INTEGER NOT NULL DEFAULT 0, content_hash TEXT, sha256 TEXT, remote_rev TEXT, error TEXT,
    source_deleted INTEGER NOT NULL DEFAULT 0, updated REAL NOT NULL, UNIQUE (job, source, destination));
CREATE INDEX IF NOT EXISTS items_job_state ON items (job, state);
CREATE TABLE IF NOT EXISTS batches (job TEXT NOT NULL, number INTEGER NOT NULL, state TEXT NOT NULL,
    started REAL, updated REAL NOT NULL, PRIMARY KEY (job, number));
"""


def test_enum_members_are_their_stored_text():
    assert [m.value for m in State] == ITEM_STATES
    assert [m.value for m in Kind] == ITEM_KINDS
    assert [m.value for m in BatchState] == BATCH_STATES
    assert [(m.name, m.value) for m in SourceDeleted] == [("KEPT", 0), ("DELETED", 1), ("DELETING", 2)]
    for member in [*State, *Kind, *BatchState]:
        assert member == member.value and member.value == member and hash(member) == hash(member.value)
        # Shown as the text everywhere: f-strings, %-formatting (logging), str(), a padded format.
        assert (f"{member}", "%s" % member, str(member), f"{member:>12}") == (
            member.value, member.value, member.value, f"{member.value:>12}")
    assert {"done": 1}[State.DONE] == 1 and State.DONE in ("done",) and State("done") is State.DONE
    assert (f"{SourceDeleted.DELETING}", str(SourceDeleted.DELETING), SourceDeleted.DELETED == 1) == ("2", "2", True)
    assert not SourceDeleted.KEPT


def test_schema_comments_list_every_state_and_kind():
    def listed(column: str, table_starts: str) -> list[str]:
        line = next(line for line in SCHEMA[SCHEMA.index(table_starts):].splitlines()
                    if line.strip().startswith(column + " "))
        return [word.strip() for word in line.split("--")[1].split("|")]

    assert listed("kind", "CREATE TABLE IF NOT EXISTS items") == ITEM_KINDS
    assert listed("state", "CREATE TABLE IF NOT EXISTS items") == ITEM_STATES
    assert listed("state", "CREATE TABLE IF NOT EXISTS batches") == BATCH_STATES


def test_items_carry_members_and_the_journal_stores_the_text(tmp_path):
    with Journal(tmp_path / "j.sqlite3", "dropboxUpload_API") as journal:
        item, small = journal.sync_plan([_item("/x/a"), _item("/x/b", size=7, source="/data/b")])
        assert (type(item.kind), type(item.state), type(item.source_deleted)) == (Kind, State, SourceDeleted)
        small.content_hash = "h"
        journal.record_closed_sessions([(small, "s-small")], 5.0)
        assert journal.items(State.UPLOADING) == [small]
        assert (small.state, small.session_id, small.session_started, small.confirmed_offset, small.content_hash) == (
            "uploading", "s-small", 5.0, 7, "h")
        journal.mark_failed(small, "gone")
        journal.mark_copied(item)
        journal.set_batch_state(1, "waiting")
        journal.mark_source_deleting(item.source)
        stored = journal._db.execute("SELECT kind, typeof(kind), state, typeof(state), source_deleted "
                                     "FROM items WHERE id = ?", (item.id,)).fetchone()
        assert stored == ("file", "text", "copied", "text", 2)
        (read,) = journal.items(State.COPIED)
        assert (read.kind, read.state, read.source_deleted) == (Kind.FILE, State.COPIED, SourceDeleted.DELETING)
        assert type(read.state) is State and journal.items("copied") == [read]
        assert journal.batch_state(1) is BatchState.WAITING and journal.batch_state(2) is None
        counts = journal._db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall()
        assert dict(counts) == {State.COPIED: 1, State.FAILED: 1}
        with pytest.raises(ValueError):
            journal.set_batch_state(1, "finished")  # not a batch state: a bug, refused before writing
        assert journal.batch_state(1) == "waiting"


def _first_release_journal(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(FIRST_RELEASE_SCHEMA)
    db.executemany("INSERT INTO items (job, source, destination, kind, part_offset, length, source_size, "
                   "source_mtime_ns, state, confirmed_offset, content_hash, source_deleted, updated) "
                   "VALUES ('job', ?, ?, ?, ?, 5, 10, 1, ?, ?, ?, ?, 0)",
                   [("/data/a", "/x/a.part1", "part", 0, "done", 5, "h1", 1),
                    ("/data/a", "/x/a.part2", "part", 5, "uploading", 3, None, 0)])
    db.execute("INSERT INTO batches VALUES ('job', 1, 'verified', 0, 0)")
    db.commit()
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()


def test_a_journal_of_an_earlier_release_is_upgraded_once_keeping_its_rows(tmp_path):
    path = tmp_path / "j.sqlite3"
    _first_release_journal(path)
    with Journal(path, "job") as journal:
        done, open_session = journal.items()
        assert (done.destination, done.kind, done.state, done.content_hash, done.source_deleted) == (
            "/x/a.part1", Kind.PART, State.DONE, "h1", SourceDeleted.DELETED)
        assert (open_session.state, open_session.confirmed_offset, open_session.hash_local) == (State.UPLOADING, 3, 0)
        assert journal.batch_state(1) is BatchState.VERIFIED
        # What the upgrade added is usable: batch_items, accounts and the added columns.
        journal.record_item_batches({done.id: 1, open_session.id: 2})
        assert journal.item_batches() == {done.id: 1, open_session.id: 2}
        assert journal.bind_account("acc", "ns") is None
        open_session.remote_path = "/x/a (1).part2"
        journal.mark_done([open_session])
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert {row[1] for row in db.execute("PRAGMA table_info(items)")} >= {
        "confirmed_chunks", "source_id", "hash_local", "remote_path"}
    assert db.execute("SELECT remote_path FROM items WHERE destination = '/x/a.part2'").fetchone() == ("/x/a (1).part2",)
    db.close()
    with Journal(path, "job") as journal:  # a second opening finds it current and changes nothing
        assert [i.state for i in journal.items()] == ["done", "done"]


def test_a_new_journal_gets_the_whole_schema_and_the_version(tmp_path):
    with Journal(tmp_path / "j.sqlite3", "job") as journal:
        tables = {row[0] for row in journal._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {"jobs", "items", "settled_folders", "batches", "accounts", "batch_items"}
        assert journal._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_an_interrupted_upgrade_leaves_the_journal_as_it_was(tmp_path, monkeypatch):
    import archive_dropbox.journal as journal_module

    path = tmp_path / "j.sqlite3"
    _first_release_journal(path)

    def add_one_column_then_fail(db):
        db.execute("ALTER TABLE items ADD COLUMN confirmed_chunks TEXT")
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setitem(journal_module._UPGRADES, 0, add_one_column_then_fail)
    with pytest.raises(JournalError, match="cannot be opened .database or disk is full"):
        Journal(path, "job")
    db = sqlite3.connect(path)
    assert "confirmed_chunks" not in {row[1] for row in db.execute("PRAGMA table_info(items)")}
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()
    monkeypatch.undo()
    with Journal(path, "job") as journal:  # the lock was released; the real upgrade then runs
        assert len(journal.items()) == 2


def test_a_journal_of_a_newer_release_is_refused_with_a_message(tmp_path):
    path = tmp_path / "j.sqlite3"
    Journal(path, "job").close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(JournalError) as refused:
        Journal(path, "job")
    assert refused.value.describe() == (
        f"Journal problem: the journal {path} was written by a newer release of this tool (journal version "
        f"{SCHEMA_VERSION + 1}; this release knows up to version {SCHEMA_VERSION}). Use that newer release; or, "
        "to go on with this one, move the journal aside (finished files will then be checked against Dropbox "
        f"again).\n  path: {path}")
    with pytest.raises(JournalError):  # refused again: the lock was released, nothing was changed
        Journal(path, "job")
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    db.close()


# The schema version 1 wrote (commit 049b831): items keyed by UNIQUE (job, source, destination)
# with the job's name, hashes as hex text, remote_path always set.
VERSION_1_SCHEMA = """
CREATE TABLE items (id INTEGER PRIMARY KEY, job TEXT NOT NULL, source TEXT NOT NULL, destination TEXT NOT NULL,
    kind TEXT NOT NULL, part_offset INTEGER NOT NULL, length INTEGER NOT NULL, source_size INTEGER NOT NULL,
    source_mtime_ns INTEGER NOT NULL, state TEXT NOT NULL, session_id TEXT, session_started REAL,
    confirmed_offset INTEGER NOT NULL DEFAULT 0, content_hash TEXT, sha256 TEXT, remote_rev TEXT, error TEXT,
    source_deleted INTEGER NOT NULL DEFAULT 0, updated REAL NOT NULL, confirmed_chunks TEXT, source_id TEXT,
    hash_local INTEGER NOT NULL DEFAULT 0, remote_path TEXT, UNIQUE (job, source, destination));
CREATE INDEX items_job_state ON items (job, state);
CREATE TABLE batches (job TEXT NOT NULL, number INTEGER NOT NULL, state TEXT NOT NULL, started REAL,
    updated REAL NOT NULL, PRIMARY KEY (job, number));
CREATE TABLE accounts (job TEXT PRIMARY KEY, account_id TEXT NOT NULL, root_namespace TEXT NOT NULL,
    updated REAL NOT NULL);
CREATE TABLE batch_items (item_id INTEGER PRIMARY KEY, job TEXT NOT NULL, batch INTEGER NOT NULL);
PRAGMA user_version = 1;
"""
CONTENT_HASH = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_a_version_1_journal_is_upgraded_keeping_every_item_of_every_job(tmp_path):
    path = tmp_path / "j.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(VERSION_1_SCHEMA)
    db.executemany(
        "INSERT INTO items (id, job, source, destination, kind, part_offset, length, source_size, source_mtime_ns, "
        "state, content_hash, sha256, remote_rev, source_deleted, updated, source_id, hash_local, remote_path) "
        "VALUES (?, ?, ?, ?, 'file', 0, 5, 5, 7, ?, ?, ?, ?, ?, 0, '1:2', ?, ?)",
        [(3, "dropboxUpload_API", "/data/a", "/x/a", "done", CONTENT_HASH, None, "rev1", 1, 1, "/x/a"),
         (5, "dropboxUpload_API", "/data/b", "/x/b", "done", "h-short", CONTENT_HASH, "rev2", 0, 0, "/x/b (1)"),
         (9, "dropboxUpload_APP", "/data/a", "/x/a", "pending", None, None, None, 0, 0, None)])
    db.execute("INSERT INTO batch_items VALUES (9, 'dropboxUpload_APP', 4)")
    db.commit()
    db.close()
    with Journal(path, "dropboxUpload_API") as journal:
        first, second = journal.items()
        assert (first.id, first.job, first.content_hash, first.remote_rev, first.source_deleted, first.remote_path) \
            == (3, "dropboxUpload_API", CONTENT_HASH, "rev1", SourceDeleted.DELETED, None)
        assert first.remote_key_path == "/x/a"
        assert (second.id, second.content_hash, second.sha256, second.remote_path) == (5, "h-short", CONTENT_HASH,
                                                                                       "/x/b (1)")
        assert journal.sent_unchanged("/data/a", 5, 7) and not journal.sent_unchanged("/data/a", 5, 8)
        assert journal.deleted_sources() == {"/data/a"}
        [again, _] = journal.sync_plan([Item(None, "dropboxUpload_API", "/data/a", "/x/a", "file", 0, 5, 5, 7),
                                        Item(None, "dropboxUpload_API", "/data/b", "/x/b", "file", 0, 5, 5, 7)])
        assert (again.id, again.state) == (3, State.DONE)
        stored = journal._db.execute("SELECT typeof(content_hash), length(content_hash) FROM items WHERE id = 3")
        assert stored.fetchone() == ("blob", 32)
    with Journal(path, "dropboxUpload_APP") as other:
        [pending] = other.items()
        assert (pending.id, pending.source, pending.state) == (9, "/data/a", State.PENDING)
        assert other.item_batches() == {9: 4}
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert db.execute("PRAGMA freelist_count").fetchone()[0] == 0  # the old table's pages went back to the disk
    assert {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = "
                                         "'items'")} == {"items_key", "items_job_state"}
    db.close()


def test_paths_sharing_a_key_stay_apart(tmp_path, monkeypatch):
    """path_key is a 64-bit hash: two paths may share it, and nothing may then mix them up."""
    monkeypatch.setattr(journal_module, "path_key", lambda path: 42)
    with Journal(tmp_path / "j.sqlite3", "dropboxUpload_API") as journal:
        a, b, c = journal.sync_plan([_item("/x/a"), _item("/x/b"), _item("/x/c", source="/data/c")])
        a.content_hash = CONTENT_HASH
        journal.mark_done([a])
        again = journal.sync_plan([_item("/x/a"), _item("/x/b"), _item("/x/c", source="/data/c")])
        assert [(i.id, i.state) for i in again] == [(a.id, "done"), (b.id, "pending"), (c.id, "pending")]
        assert not journal.sent_unchanged("/data/a", 10, 1)  # /x/b of the same source is not done
        journal.mark_sources_deleting(["/data/c"])
        assert {i.destination: i.source_deleted for i in journal.items()} == {
            "/x/a": SourceDeleted.KEPT, "/x/b": SourceDeleted.KEPT, "/x/c": SourceDeleted.DELETING}
        journal.mark_done([b])
        assert journal.sent_unchanged("/data/a", 10, 1) and not journal.sent_unchanged("/data/c", 10, 1)


def _version_1_journal(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(VERSION_1_SCHEMA)
    db.execute("INSERT INTO items (job, source, destination, kind, part_offset, length, source_size, "
               "source_mtime_ns, state, updated) VALUES ('dropboxUpload_API', '/data/a', '/x/a', 'file', 0, 5, 5, "
               "7, 'done', 0)")
    db.commit()
    db.close()


def _version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


def test_the_upgrade_waits_until_no_other_script_uses_the_journal(tmp_path):
    """An older release still running in another window would write to a table that is gone."""
    path = tmp_path / "journal.sqlite3"
    _version_1_journal(path)
    other = journal_module._JobLock(tmp_path / "journal_dropboxUpload_APP.lock")  # another sheet, running
    try:
        with pytest.raises(JournalError, match="another script is using it now .its lock: "
                                               "journal_dropboxUpload_APP.lock.*Nothing was changed"):
            Journal(path, "dropboxUpload_API")
        assert _version(path) == 1
    finally:
        other.release()
    import logging

    told = []
    handler = logging.Handler()
    handler.emit = lambda record: told.append(record.getMessage())
    log = logging.getLogger("test_journal.upgrade")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    with Journal(path, "dropboxUpload_API", log=log) as journal:  # once it has finished
        assert [i.source for i in journal.items()] == ["/data/a"]
    assert _version(path) == SCHEMA_VERSION
    assert "written by an earlier release: bringing it up to date" in told[0] and "up to date (" in told[1]


def test_the_upgrade_needs_room_for_the_rewritten_table(tmp_path, monkeypatch):
    path = tmp_path / "journal.sqlite3"
    _version_1_journal(path)
    monkeypatch.setattr(journal_module.shutil, "disk_usage", lambda folder: SimpleNamespace(free=1000))
    with pytest.raises(JournalError, match=r"needs about .* free on its disk for a while \(1.00 KB free now\)"):
        Journal(path, "dropboxUpload_API")
    assert _version(path) == 1


def test_hashes_come_back_as_they_were_written(tmp_path):
    written = [CONTENT_HASH, CONTENT_HASH.upper(), "crc32:0a1b2c3d", "x" * 64, None, " " + CONTENT_HASH[1:]]
    with Journal(tmp_path / "j.sqlite3", "job") as journal:
        items = journal.sync_plan([_item(f"/x/{n}") for n in range(len(written))])
        for item, value in zip(items, written):
            item.content_hash = item.sha256 = value
        journal.mark_done(items)
        assert [(i.content_hash, i.sha256) for i in journal.items()] == [(v, v) for v in written]


def test_a_plan_giving_one_item_twice_is_refused(tmp_path):
    with Journal(tmp_path / "j.sqlite3", "job") as journal:
        with pytest.raises(RuntimeError, match="twice"):
            journal.sync_plan([_item("/x/a"), _item("/x/b"), _item("/x/a")])
        assert journal.items() == []  # nothing of that plan was written
