"""A rerun costs what changed (issue 18): Stage 1 does not open files an earlier run sent and
that have not changed since, checks a folder's Dropbox chain once, not once per file, and the
destination is listed once per run (the destination check's listing serves the upload)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from archive_dropbox import prepare
from archive_dropbox.journal import Item, Journal, Kind
from archive_dropbox.sheets import SheetRow

from conftest import REPO, client_env, make_tree, run_script, write_xlsx

JOB = "dropboxUpload_API"


def _row(tmp_path: Path, source: Path) -> SheetRow:
    return SheetRow(tmp_path / "inputs.xlsx", JOB, 2, {"inputFile": source, "outputDir": "/Archive/data",
                                                        "deleteAfterUpload": 0})


def _plan(row: SheetRow, **options) -> prepare.Plan:
    return prepare.build_plan([row], input_column="inputFile", output_column="outputDir",
                              delete_column="deleteAfterUpload", destination_of_row=lambda r: r["outputDir"],
                              part_limit=10**12, log=logging.getLogger("test"), **options)


def test_a_rerun_opens_only_the_files_that_changed(tmp_path, monkeypatch):
    data = make_tree(tmp_path / "data", {f"run{r}/frame_{f:03d}.tif": 10 for r in range(3) for f in range(20)})
    opened: list[str] = []
    real = prepare._unreadable
    monkeypatch.setattr(prepare, "_unreadable", lambda path: opened.append(str(path)) or real(path))
    row = _row(tmp_path, data)
    first = _plan(row)
    assert len(opened) == len(first.sources) == 60

    with Journal(tmp_path / "journal.sqlite3", JOB) as journal:
        items = journal.sync_plan(prepare.iter_items(first, JOB))
        journal.mark_done(items)
        touched = data / "run1" / "frame_007.tif"
        info = touched.stat()
        os.utime(touched, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
        opened.clear()
        again = _plan(row, sent_unchanged=journal.sent_unchanged_among)
    assert opened == [str(touched)]
    assert len(again.sources) == 60  # still planned: Stage 2 decides what to send


def test_sent_unchanged_needs_every_item_done_and_the_same_size_and_date(tmp_path):
    def item(destination: str, kind: Kind = Kind.FILE, source: str = "/data/big") -> Item:
        return Item(None, JOB, source, destination, kind, 0, 10, 10, 5)

    with Journal(tmp_path / "journal.sqlite3", JOB) as journal:
        part1, part2 = journal.sync_plan([item("/x/big_split_0001", Kind.PART), item("/x/big_split_0002", Kind.PART)])
        journal.mark_done([part1])
        assert not journal.sent_unchanged("/data/big", 10, 5)  # one part still to send
        journal.mark_done([part2])
        assert journal.sent_unchanged("/data/big", 10, 5)
        assert not journal.sent_unchanged("/data/big", 10, 6)  # modified since
        assert not journal.sent_unchanged("/data/big", 11, 5)  # another size
        assert not journal.sent_unchanged("/data/other", 10, 5)  # never planned


def test_a_folders_dropbox_chain_is_checked_once_not_once_per_file(tmp_path, monkeypatch):
    data = make_tree(tmp_path / "data", {f"deep/er/run{r}/frame_{f:03d}.tif": 1 for r in range(2) for f in range(50)})
    chains: list[tuple[str, ...]] = []
    real = prepare._folder_chain

    def counting(target_folder, source_root, folder_parts, output_column, row):
        chains.append(tuple(folder_parts))
        return real(target_folder, source_root, folder_parts, output_column, row)

    monkeypatch.setattr(prepare, "_folder_chain", counting)
    plan = _plan(_row(tmp_path, data), check_readable=False)
    assert len(plan.sources) == 100
    assert sorted(chains) == [("deep", "er", "run0"), ("deep", "er", "run1")]


def test_a_rerun_lists_the_destination_once_and_sends_only_what_changed(tmp_path, server):
    """Stage 1's destination check and the upload's look at what Dropbox holds share one
    listing: a rerun with one file touched lists the destination once, sends that file alone."""
    data = make_tree(tmp_path / "data", {f"run{r}/frame_{f:03d}.tif": 10 + f for r in range(3) for f in range(20)})
    book = write_xlsx(tmp_path / "inputs.xlsx", {JOB: [["inputFile", "outputDir", "deleteAfterUpload"],
                                                       [str(data), "/Archive/data", 0]]})

    def upload() -> None:
        done = run_script(REPO / "app.py", "--excelName", str(book), "--sheetName", JOB, "--logs",
                          str(tmp_path / "logs"), "--caBundle", server.ca_file, "--ifExists", "overwrite",
                          env=client_env(server))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    upload()
    (data / "run1" / "frame_007.tif").write_bytes(b"touched")
    server.clear_log()
    upload()
    assert server.count_calls("files/list_folder") == 1  # was 2: the check, then the upload again
    assert server.count_calls("files/list_folder/continue") == 0
    commits = ("files/upload", "files/upload_session/finish", "files/upload_session/finish_batch_v2")
    sent = [call["path"] for call in server.calls() if call["route"] in commits]
    # The row's inventory is written again too (it lists the touched file's new size and date).
    assert [path for path in sent if "_inventory_" not in path] == ["/Archive/data/run1/frame_007.tif"], sent
