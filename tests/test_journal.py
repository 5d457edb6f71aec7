"""The journal: plans are merged without losing progress, changed files start over, every
write survives kill -9, and a second process on the same sheet is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from archive_dropbox.errors import JournalLocked
from archive_dropbox.journal import Item, Journal

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
