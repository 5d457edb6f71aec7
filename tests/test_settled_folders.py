"""Settled folders (issue 18): once every file of a folder was sent and verified, the upload
records a digest of the folder's files (names, sizes, dates, file ids, split); a rerun's Stage 1
leaves a folder whose files still give that digest out of the plan - no file opened, nothing
asked of Dropbox about it. Anything that makes one of its items not done forgets the folder."""

from __future__ import annotations

import csv
import io
import logging
import os
import sqlite3
from pathlib import Path

import pytest

from archive_dropbox import api_upload, plan_items, prepare
from archive_dropbox import journal as journal_module
from archive_dropbox.errors import SheetError
from archive_dropbox.journal import Journal, State
from archive_dropbox.sheets import SheetRow

from conftest import REPO, client_env, make_tree, run_script, write_xlsx

JOB = "dropboxUpload_API"
HEADER = ["inputFile", "outputDir", "deleteAfterUpload"]


def _row(tmp_path: Path, source: Path, output: str = "/Archive/data", delete: int = 0, number: int = 2) -> SheetRow:
    return SheetRow(tmp_path / "inputs.xlsx", JOB, number, {"inputFile": source, "outputDir": output,
                                                             "deleteAfterUpload": delete})


def _plan(rows: list[SheetRow], journal: Journal | None = None, part_limit: int = 10**12) -> prepare.Plan:
    return prepare.build_plan(rows, input_column="inputFile", output_column="outputDir",
                              delete_column="deleteAfterUpload", destination_of_row=lambda r: r["outputDir"],
                              part_limit=part_limit, log=logging.getLogger("test"),
                              sent_unchanged=journal.sent_unchanged_among if journal else None,
                              settled_folder=journal.settled_folders.holds if journal else None)


def _upload_done(journal: Journal, plan: prepare.Plan) -> list:
    """What a finished upload leaves in the journal: every item done, the folders settled."""
    items = journal.sync_plan(prepare.iter_items(plan, JOB))
    for item in items:
        item.content_hash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    journal.mark_done(items)
    api_upload.record_settled_folders(journal, plan_items.pairs(plan, journal), failed_rows=())
    return items


def _touch(path: Path, seconds: int = 1) -> None:
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + seconds * 10**9))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data", {f"run{r}/frame_{f:03d}.tif": 10 + f for r in range(3) for f in range(20)})


def test_a_rerun_leaves_settled_folders_out_and_opens_nothing(tmp_path, tree, monkeypatch):
    row = _row(tmp_path, tree)
    with Journal(tmp_path / "journal.sqlite3", JOB) as journal:
        _upload_done(journal, _plan([row]))
        opened: list[str] = []
        monkeypatch.setattr(prepare, "_unreadable", lambda path: opened.append(path))
        names: list[str] = []
        real_name_problem = prepare.name_problem
        monkeypatch.setattr(prepare, "name_problem", lambda name: names.append(name) or real_name_problem(name))
        again = _plan([row], journal)
    assert (len(again.sources), again.settled_files, again.settled_bytes) == (0, 60, 3 * sum(10 + f for f in range(20)))
    assert opened == [] and names == ["run0", "run1", "run2"]  # folder names only
    assert again.folder_keys >= {"/archive/data/run0", "/archive/data/run1", "/archive/data/run2"}


@pytest.mark.parametrize("change", ["touched", "grown", "added", "removed", "replaced"])
def test_a_change_in_a_folder_plans_that_folder_again(tmp_path, tree, change):
    row = _row(tmp_path, tree)
    folder = tree / "run1"
    with Journal(tmp_path / "journal.sqlite3", JOB) as journal:
        _upload_done(journal, _plan([row]))
        if change == "touched":
            _touch(folder / "frame_007.tif")
        elif change == "grown":
            info = (folder / "frame_007.tif").stat()
            (folder / "frame_007.tif").write_bytes(b"x" * 500)
            os.utime(folder / "frame_007.tif", ns=(info.st_atime_ns, info.st_mtime_ns))  # same date, other size
        elif change == "added":
            (folder / "frame_999.tif").write_bytes(b"new")
        elif change == "removed":
            (folder / "frame_007.tif").unlink()
        else:  # another file under the same name, size and date (restored from a copy)
            info = (folder / "frame_007.tif").stat()
            copy = folder / "copy.tmp"  # exists beside the old file: another inode
            copy.write_bytes((folder / "frame_007.tif").read_bytes())
            os.utime(copy, ns=(info.st_atime_ns, info.st_mtime_ns))
            os.replace(copy, folder / "frame_007.tif")
            assert (folder / "frame_007.tif").stat().st_ino != info.st_ino
        again = _plan([row], journal)
    expected = {"touched": 20, "grown": 20, "added": 21, "removed": 19, "replaced": 20}[change]
    assert {str(s.source.parent) for s in again.sources} == {str(folder)}
    assert (len(again.sources), again.settled_files) == (expected, 40)


def test_rows_that_delete_their_originals_are_never_left_out(tmp_path, tree):
    with Journal(tmp_path / "journal.sqlite3", JOB) as journal:
        _upload_done(journal, _plan([_row(tmp_path, tree)]))
        again = _plan([_row(tmp_path, tree, delete=1)], journal)
    assert (len(again.sources), again.settled_files) == (60, 0)  # each to be proven and deleted


def test_one_folder_sent_to_two_places_is_settled_for_each_on_its_own(tmp_path, tree):
    first, second = _row(tmp_path, tree), _row(tmp_path, tree / "run1", output="/Elsewhere", number=3)
    with Journal(tmp_path / "journal.sqlite3", JOB) as journal:
        _upload_done(journal, _plan([first]))
        again = _plan([first, second], journal)
    assert (again.settled_files, [str(s.source.parent) for s in again.sources]) == (60, [str(tree / "run1")] * 20)
    assert {s.destination.rsplit("/", 1)[0] for s in again.sources} == {"/Elsewhere"}


def test_a_new_split_setting_plans_the_big_files_folder_again(tmp_path):
    data = make_tree(tmp_path / "data", {"a/big.bin": 5000, "a/small.bin": 10, "b/small.bin": 10})
    row = _row(tmp_path, data)
    with Journal(tmp_path / "journal.sqlite3", JOB) as journal:
        _upload_done(journal, _plan([row], part_limit=10**6))
        again = _plan([row], journal, part_limit=2000)
    assert [s.source.name for s in again.sources] == ["big.bin", "small.bin"] and again.settled_files == 1


@pytest.mark.parametrize("undo", ["reopen", "failed", "pending", "another account", "reset by sync_plan"])
def test_an_item_no_longer_done_forgets_its_folder(tmp_path, tree, undo):
    row = _row(tmp_path, tree)
    with Journal(tmp_path / "journal.sqlite3", JOB) as journal:
        journal.bind_account("dbid:one", "1")
        plan = _plan([row])
        items = _upload_done(journal, plan)
        item = next(i for i in items if i.source.endswith(os.path.join("run2", "frame_003.tif")))
        if undo == "reopen":
            journal.reopen([item])
        elif undo == "failed":
            journal.mark_failed(item, "replaced in Dropbox")
        elif undo == "pending":
            journal.mark_pending(item)
        elif undo == "another account":
            journal.bind_account("dbid:two", "2")
        else:
            changed = journal_module.Item(None, JOB, item.source, item.destination, item.kind, 0, 99, 99, 1)
            journal.sync_plan([changed])
        again = _plan([row], journal)
    if undo == "another account":
        assert (len(again.sources), again.settled_files) == (60, 0)
    else:
        assert {str(s.source.parent) for s in again.sources} == {str(tree / "run2")}
        assert again.settled_files == 40


def test_a_folder_with_a_failed_file_is_not_settled(tmp_path, tree):
    row = _row(tmp_path, tree)
    with Journal(tmp_path / "journal.sqlite3", JOB) as journal:
        plan = _plan([row])
        items = journal.sync_plan(prepare.iter_items(plan, JOB))
        journal.mark_done([i for i in items if "frame_005" not in i.source or "run0" not in i.source])
        assert api_upload.record_settled_folders(journal, plan_items.pairs(plan, journal), failed_rows=()) == 2
        assert api_upload.record_settled_folders(journal, plan_items.pairs(plan, journal), failed_rows={id(row)}) == 0
        again = _plan([row], journal)
    assert {str(s.source.parent) for s in again.sources} == {str(tree / "run0")}


def test_a_new_file_that_would_take_a_settled_files_name_is_refused(tmp_path):
    """Two local folders filling one Dropbox folder: a new file of one may clash with a settled
    file of the other, whichever comes first in the sheet."""
    first = make_tree(tmp_path / "one", {"a.txt": 5, "b.txt": 6})
    second = make_tree(tmp_path / "two", {"c.txt": 7})
    rows = [_row(tmp_path, first, output="/Lab"), _row(tmp_path, second, output="/Lab", number=3)]
    with Journal(tmp_path / "journal.sqlite3", JOB) as journal:
        _upload_done(journal, _plan(rows))
        (second / "A.TXT").write_bytes(b"clash")  # the settled one/a.txt comes first
        with pytest.raises(SheetError) as first_settled:
            _plan(rows, journal)
        assert "one/a.txt" in str(first_settled.value) and "A.TXT" in str(first_settled.value)
        assert "ignores upper/lower case" in str(first_settled.value)
        # The other order: the folder with the new file is planned first; the settled one
        # meets it in the plan instead of being left out.
        with pytest.raises(SheetError) as new_first:
            _plan(list(reversed(rows)), journal)
        assert "one" in str(new_first.value) and "A.TXT" in str(new_first.value)


def test_a_version_2_journal_gets_the_settled_folders_table_without_a_rewrite(tmp_path):
    path = tmp_path / "journal.sqlite3"
    with Journal(path, JOB):
        pass
    db = sqlite3.connect(path)
    db.execute("DROP TABLE settled_folders")
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    # Another script holding the journal does not stop this upgrade: it only adds a table.
    other = journal_module._JobLock(tmp_path / "journal_dropboxUpload_APP.lock")
    try:
        with Journal(path, JOB) as journal:
            assert not journal.settled_folders.any()
            journal.settled_folders.record([(1, b"d" * 16)])
            assert journal.settled_folders.holds(1, b"d" * 16) and not journal.settled_folders.holds(1, b"e" * 16)
    finally:
        other.release()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == journal_module.SCHEMA_VERSION == 3
    db.close()


# ============================================================================ app.py, as users run it


def _app(book: Path, tmp_path: Path, server, *args: str):
    done = run_script(REPO / "app.py", "--excelName", str(book), "--sheetName", JOB, "--logs", str(tmp_path / "logs"),
                      "--caBundle", server.ca_file, *args, env=client_env(server))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _inventory(server, folder: str) -> list[dict]:
    [name] = [p for p in server.files() if p.startswith(f"{folder}/_inventory_")]
    text = server.read_file(name).decode("utf-8-sig")
    return list(csv.DictReader(io.StringIO(text)))


def test_a_rerun_asks_dropbox_nothing_about_settled_folders_and_keeps_the_inventory_whole(tmp_path, tree, server):
    book = write_xlsx(tmp_path / "inputs.xlsx", {JOB: [HEADER, [str(tree), "/Archive/data", 0]]})
    _app(book, tmp_path, server, "--ifExists", "overwrite")
    assert len(_inventory(server, "/Archive/data")) == 60

    server.clear_log()
    unchanged = _app(book, tmp_path, server, "--ifExists", "overwrite")
    routes = [call["route"] for call in server.calls()]
    assert not any(route.startswith(("files/list_folder", "files/upload", "files/get_metadata")) for route in routes), \
        routes
    assert "Left out: 60 files" in unchanged.stdout and "60 done in earlier runs" in unchanged.stdout
    # Nothing was looked up this run: it must not say it checked those files by content hash.
    assert "Nothing to send: 0 file(s) checked against Dropbox now" in unchanged.stdout
    assert "60 more are in folders unchanged" in unchanged.stdout and "(checked by content hash)" not in unchanged.stdout
    assert "verified by content hash: in this run, or, for folders unchanged since, in an earlier one" in \
        unchanged.stdout
    assert "Checking each row's destination" not in unchanged.stdout

    (tree / "run1" / "frame_007.tif").write_bytes(b"touched")
    server.clear_log()
    _app(book, tmp_path, server, "--ifExists", "overwrite")
    listed = [call["path"] for call in server.calls() if call["route"].startswith("files/list_folder")]
    assert listed == ["/Archive/data/run1"], listed
    commits = ("files/upload", "files/upload_session/finish", "files/upload_session/finish_batch_v2")
    sent = [call["path"] for call in server.calls() if call["route"] in commits]
    assert [path for path in sent if "_inventory_" not in path] == ["/Archive/data/run1/frame_007.tif"], sent
    records = _inventory(server, "/Archive/data")
    assert len(records) == 60  # the settled folders' files are carried from the inventory there
    assert server.read_file("/Archive/data/run1/frame_007.tif") == b"touched"


def test_another_account_gets_every_file_of_settled_folders(tmp_path, tree, server):
    from tests.dropbox_server import DropboxTestServer

    book = write_xlsx(tmp_path / "inputs.xlsx", {JOB: [HEADER, [str(tree), "/Archive/data", 0]]})
    _app(book, tmp_path, server)
    other = DropboxTestServer(tmp_path / "other-account")
    try:
        moved = _app(book, tmp_path, other)
        assert "another Dropbox account" in moved.stdout
        assert len([p for p in other.files() if p.endswith(".tif")]) == 60
    finally:
        other.stop()


# ============================================================================ Stage 2 in pages


def test_plan_pages_give_each_file_its_items_and_later_reads_the_recorded_state(tmp_path):
    data = make_tree(tmp_path / "data", {f"f{i:02d}.bin": 10 + i for i in range(10)} | {"big.bin": 5000})
    plan = _plan([_row(tmp_path, data)], part_limit=2000)
    with Journal(tmp_path / "journal.sqlite3", JOB) as journal:
        first = list(plan_items.pages(plan, journal, size=4))
        assert [len(page) for page in first] == [4, 4, 3]
        flat = [pair for page in first for pair in page]
        assert [position for position, _, _ in flat] == list(range(11))
        assert all(chunk[0].source == str(source.source) for _, source, chunk in flat)
        [big] = [chunk for _, source, chunk in flat if source.name == "big.bin"]
        assert [item.kind.value for item in big] == ["part", "part", "part", "manifest"]
        journal.mark_done(big)
        again = {source.name: chunk for _, source, chunk in plan_items.pairs(plan, journal)}
        assert len(again) == 11 and all(item.state == State.DONE for item in again["big.bin"])
        assert [item.id for item in again["big.bin"]] == [item.id for item in big]  # read, not added again
        middle = list(plan_items.pairs(plan, journal, 2, 5))
        assert [(position, source.name) for position, source, _ in middle] == [(2, "f01.bin"), (3, "f02.bin"),
                                                                               (4, "f03.bin")]


def test_an_upload_holds_one_page_of_items_at_a_time(tmp_path, server, monkeypatch):
    """app.py, run in this process with pages of 4 files: the journal is asked for at most 4
    files' items at once, and every file (split ones across pages too) lands, inventoried."""
    import sys

    from archive_dropbox import start

    spec = __import__("importlib.util").util.spec_from_file_location("app_under_test", REPO / "app.py")
    app = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(app)
    files = {f"run{r}/frame_{f:02d}.tif": 100 + f for r in range(3) for f in range(5)} | {"run1/big.bin": 50_000}
    data = make_tree(tmp_path / "data", files)
    book = write_xlsx(tmp_path / "inputs.xlsx", {JOB: [HEADER, [str(data), "/Archive/data", 0]]})
    monkeypatch.setattr(plan_items, "PAGE_FILES", 4)
    asked: list[int] = []
    real = Journal.sync_plan

    def counting(self, planned):
        items = real(self, planned)
        asked.append(len({item.source for item in items}))
        return items

    monkeypatch.setattr(Journal, "sync_plan", counting)
    for name, value in client_env(server).items():
        monkeypatch.setenv(name, value)
    # In this process the SDK read its hosts (and the token refresh's) when first imported: an
    # access token needs no refresh, and the hosts are set here.
    monkeypatch.delenv("DROPBOX_REFRESH_TOKEN")
    monkeypatch.setenv("DROPBOX_ACCESS_TOKEN", server.access_token)
    import dropbox.dropbox_client as sdk

    for name in ("API_HOST", "API_CONTENT_HOST", "API_NOTIFICATION_HOST"):
        monkeypatch.setattr(sdk, name, server.address)
    monkeypatch.setattr(sys, "argv", ["app.py", "--excelName", str(book), "--sheetName", JOB, "--logs",
                                      str(tmp_path / "logs"), "--caBundle", server.ca_file,
                                      "--fileSizeLimit_GB", "0.00002"])
    assert start.launch(str(REPO / "app.py"), app.__doc__, app.SETTINGS, "app", is_double_clicked=lambda: False) == 0
    assert asked and max(asked) <= 4 and sum(asked) >= 3 * len(files)  # counted, sent, inventoried
    stored = server.files()
    assert all(f"/Archive/data/{name}" in stored for name in files if name != "run1/big.bin")
    assert len([p for p in stored if p.startswith("/Archive/data/run1/big.bin_split_0")]) == 3
    assert len(_inventory(server, "/Archive/data")) == len(files)


def test_a_file_verify_finds_gone_from_dropbox_is_sent_by_the_next_upload(tmp_path, tree, server):
    """A settled folder is not looked up by the upload; --verify looks, and what it finds missing
    has its folder looked at again, so that "sent again on the next run" holds."""
    book = write_xlsx(tmp_path / "inputs.xlsx", {JOB: [HEADER, [str(tree), "/Archive/data", 0]]})
    _app(book, tmp_path, server)
    gone = "/Archive/data/run2/frame_003.tif"
    server.sdk_client().files_delete_v2(gone)
    _app(book, tmp_path, server)
    assert gone not in server.files()  # left out: not noticed by the upload
    verify = run_script(REPO / "app.py", "--excelName", str(book), "--sheetName", JOB, "--logs",
                        str(tmp_path / "logs"), "--caBundle", server.ca_file, "--verify", env=client_env(server))
    assert verify.returncode == 1 and "sent again on the next run" in verify.stdout + verify.stderr
    again = _app(book, tmp_path, server)
    assert gone in server.files() and server.read_file(gone) == (tree / "run2" / "frame_003.tif").read_bytes()
    assert "Left out: 40 files" in again.stdout
