"""The inventories an API upload leaves in Dropbox (issue 16, the write side: inventory_writer):
app.py run as users run it (a subprocess) against the local Dropbox test server, with archives
made by preProcess/2_zipDir.py; the writer's upload rules driven in-process."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import openpyxl
import pytest

from conftest import REPO, make_tree, run_script, script_env, write_xlsx
from tests.dropbox_server import DropboxTestServer
from tests.test_api_upload import app_env
from tests.test_small_files import client  # noqa: F401 - the package's DropboxClient bound to `server`

from archive_dropbox import inventory, inventory_writer
from archive_dropbox.journal import State
from archive_dropbox.prepare import Plan, PlannedSource
from archive_dropbox.sheets import SheetRow

SPLIT_LIMIT_GB = "0.00006"  # 60,000 bytes: big.bin and s3.zip are split, the rest stays whole
FRAMES = 30
UPLOAD_ROUTES = ("files/upload", "files/upload_session/start", "files/upload_session/append_v2",
                 "files/upload_session/finish", "files/upload_session/append_batch",
                 "files/upload_session/finish_batch_v2")


# -- the data ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    """s3.zip (30 frames of noise, split when uploaded) and tiny.zip, made once by 2_zipDir.py,
    with the folders they were made from (kept to compare with)."""
    staging = tmp_path_factory.mktemp("staging")
    frames = {f"hour_{i // 10}/frame_{i:04d}.tif": 3000 + i for i in range(FRAMES)}
    make_tree(staging / "s3", frames)
    make_tree(staging / "tiny", {"readme.txt": b"tiny archive\n", "data/x.csv": b"a,b\n1,2\n"})
    for index, path in enumerate(sorted((staging / "s3").rglob("*.tif"))):
        moment = 1_700_000_000 + 2 * index
        os.utime(path, (moment, moment))
    book = write_xlsx(staging / "zipDir.xlsx", {"zipDir": [["inputDir", "deleteFlag"], [str(staging / "s3"), 0],
                                                           [str(staging / "tiny"), 0]]})
    made = run_script(REPO / "preProcess" / "2_zipDir.py", "--excelName", str(book), "--logs", str(staging / "logs"))
    assert made.returncode == 0, made.stdout + made.stderr
    return {"s3": staging / "s3.zip", "tiny": staging / "tiny.zip", "s3 folder": staging / "s3"}


def make_row(root: Path, archives: dict[str, Path], *, big: bool = True) -> Path:
    """A row's folder: plain files, another tool's zip, 2_zipDir's archives (their folders gone,
    as after deleteFlag = 1) and, when `big`, a file that is split."""
    files: dict[str, bytes | int] = {"notes.txt": b"lab notes\n", "sub/a.dat": 5000, "other.zip": b""}
    if big:
        files["big.bin"] = 130_000
    make_tree(root, files)
    with zipfile.ZipFile(root / "other.zip", "w") as other:
        other.writestr("inner/data.txt", b"from another tool")
    for name in ("s3", "tiny"):
        shutil.copy2(archives[name], root / f"{name}.zip")
    return root


def sheet(tmp_path: Path, rows: list[list], name: str = "inputs.xlsx") -> Path:
    return write_xlsx(tmp_path / name, {"dropboxUpload_API": [["inputFile", "outputDir", "deleteAfterUpload"], *rows]})


def upload(server: DropboxTestServer, book: Path, logs: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(REPO / "app.py"), "--excelName", str(book), "--sheetName", "dropboxUpload_API",
            "--logs", str(logs), "--caBundle", server.ca_file, "--sleepTime_min", "0.02", *extra]
    return subprocess.run(args, env=script_env(app_env(server)), capture_output=True, text=True, timeout=240,
                          stdin=subprocess.DEVNULL, encoding="utf-8")


def start_upload(server: DropboxTestServer, book: Path, logs: Path) -> subprocess.Popen:
    args = [sys.executable, str(REPO / "app.py"), "--excelName", str(book), "--sheetName", "dropboxUpload_API",
            "--logs", str(logs), "--caBundle", server.ca_file, "--sleepTime_min", "0.02"]
    return subprocess.Popen(args, env=script_env(app_env(server)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, stdin=subprocess.DEVNULL, encoding="utf-8")


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def records_at(server: DropboxTestServer, path: str) -> list[inventory.Record]:
    text = server.read_file(path).decode("utf-8")
    return list(inventory.read_csv(text.splitlines(keepends=True), path))


def row_inventory(folder: str, row: Path) -> str:
    return f"{folder}/{inventory.row_inventory_name(str(row))}"


def original(folder: Path, member: str) -> str:
    return os.path.join(str(folder), *member.split("/"))


def expected_members(archive: Path, folder: Path, parts: int) -> list[inventory.Record]:
    """What the archive inventory must say, from zipfile's reading of the same archive."""
    with zipfile.ZipFile(archive) as book:
        return [inventory.Record(original(folder, info.filename), info.file_size,
                                 int(time.mktime(info.date_time + (0, 0, -1))) * 10 ** 9, inventory.MEMBER,
                                 archive.name, info.filename, info.CRC, info.compress_size, info.header_offset, parts)
                for info in book.infolist() if not info.is_dir()]


def upload_calls(server: DropboxTestServer) -> list[dict]:
    return [call for call in server.calls() if call["route"] in UPLOAD_ROUTES]


# -- app.py through the API ----------------------------------------------------------------------


def test_an_upload_leaves_row_and_archive_inventories_that_match_the_originals(tmp_path, server, archives):
    row = make_row(tmp_path / "data" / "row", archives)
    book = sheet(tmp_path, [[str(row), "/Archive/row", 0]])
    logs = tmp_path / "logs"
    first = upload(server, book, logs, "--fileSizeLimit_GB", SPLIT_LIMIT_GB)
    assert first.returncode == 0, output(first)
    stored = server.files()
    assert [p for p in stored if p.startswith("/Archive/row/s3.zip_split_0")] == [
        "/Archive/row/s3.zip_split_0001", "/Archive/row/s3.zip_split_0002"]

    # The archives of 2_zipDir.py: one record per member, as zipfile reads the archive; the
    # original is the member's path beside the archive (where 2_zipDir.py found the folder).
    s3 = records_at(server, "/Archive/row/s3.zip.inventory.csv")
    assert s3 == expected_members(row / "s3.zip", row, parts=2)
    assert len(s3) == FRAMES
    for record in s3:  # the frames' own sizes and dates (a zip keeps 2-second steps)
        frame = archives["s3 folder"] / record.member.split("/", 1)[1]
        assert record.size == frame.stat().st_size
        assert abs(record.mtime_ns - frame.stat().st_mtime_ns) < 2 * 10 ** 9
    assert records_at(server, "/Archive/row/tiny.zip.inventory.csv") == expected_members(row / "tiny.zip", row, 0)
    # Another tool's zip: its members under the archive's folder, and the zip itself an original of the row.
    assert records_at(server, "/Archive/row/other.zip.inventory.csv") == expected_members(row / "other.zip", row, 0)
    assert "was not made by 2_zipDir.py" in output(first)

    # The row inventory: every other original, where it is (relative to the CSV's folder).
    path = row_inventory("/Archive/row", row)
    listed = {record.original_path: record for record in records_at(server, path)}
    assert sorted(listed) == sorted(str(row / name) for name in ("notes.txt", "sub/a.dat", "other.zip", "big.bin"))
    for name, record in ((n, listed[str(row / n)]) for n in ("notes.txt", "sub/a.dat", "other.zip")):
        info = (row / name).stat()
        assert (record.kind, record.dropbox_path, record.parts) == (inventory.FILE, name, 0)
        assert (record.size, record.mtime_ns) == (info.st_size, info.st_mtime_ns)
        assert f"/Archive/row/{name}" in stored
    big = listed[str(row / "big.bin")]
    assert (big.kind, big.dropbox_path, big.parts, big.size) == (inventory.PARTS, "big.bin", 3, 130_000)
    assert "/Archive/row/big.bin_split_0003" in stored and "/Archive/row/big.bin_split_manifest.json" in stored
    assert not [p for p in logs.iterdir() if p.name.startswith(".~")]  # the temporary folder is gone

    # A rerun that changes nothing sends nothing, inventories included.
    server.clear_log()
    again = upload(server, book, logs, "--fileSizeLimit_GB", SPLIT_LIMIT_GB)
    assert again.returncode == 0, output(again)
    assert upload_calls(server) == [] and server.calls("files/download") == []

    # A new file: the row inventory is replaced, each original listed once.
    (row / "sub" / "new.txt").write_bytes(b"added later")
    server.clear_log()
    third = upload(server, book, logs, "--fileSizeLimit_GB", SPLIT_LIMIT_GB)
    assert third.returncode == 0, output(third)
    originals = [record.original_path for record in records_at(server, path)]
    assert sorted(originals) == sorted([*listed, str(row / "sub" / "new.txt")])
    assert [c["path"] for c in server.calls("files/upload")] == [path]  # the archives' inventories are unchanged
    assert {p for p in server.files() if inventory.is_inventory_name(p.rsplit("/", 1)[1])} == {
        path, "/Archive/row/other.zip.inventory.csv", "/Archive/row/s3.zip.inventory.csv",
        "/Archive/row/tiny.zip.inventory.csv"}


def test_with_delete_after_upload_the_inventories_are_in_dropbox_before_any_original_goes(tmp_path, server,
                                                                                           archives):
    row = make_row(tmp_path / "data" / "row", archives, big=False)  # no manifests: every files/upload is an inventory
    originals = sorted(p for p in row.rglob("*") if p.is_file())
    book = sheet(tmp_path, [[str(row), "/Archive/row", 1]])
    hold = server.hold("files/upload")
    process = start_upload(server, book, tmp_path / "logs")
    try:
        assert hold.wait_held(1, timeout=120), "no inventory was uploaded"
        assert all(p.exists() for p in originals)  # the first inventory is on its way: nothing deleted yet
    finally:
        hold.release()
    text, _ = process.communicate(timeout=240)
    assert process.returncode == 0, text
    assert not [p for p in originals if p.exists()]
    calls = server.calls()
    inventories = [i for i, c in enumerate(calls) if c["route"] == "files/upload"]
    assert [calls[i]["path"] for i in inventories] == [
        "/Archive/row/other.zip.inventory.csv", "/Archive/row/s3.zip.inventory.csv",
        "/Archive/row/tiny.zip.inventory.csv", row_inventory("/Archive/row", row)]
    assert all(calls[i]["status"] == 200 for i in inventories)
    # The deletion gate looks at Dropbox after the inventories, right before it deletes.
    looks = [i for i, c in enumerate(calls) if c["route"] in ("files/list_folder", "files/get_metadata")]
    assert looks and max(inventories) < max(looks)

    # Later, the folder gets a new file: the rerun's inventory keeps the originals deleted earlier.
    row.mkdir(parents=True, exist_ok=True)
    (row / "late.txt").write_bytes(b"late")
    rerun = upload(server, book, tmp_path / "logs")
    assert rerun.returncode == 0, output(rerun)
    listed = [record.original_path for record in records_at(server, row_inventory("/Archive/row", row))]
    assert sorted(listed) == sorted(str(row / n) for n in ("notes.txt", "sub/a.dat", "other.zip", "late.txt"))
    assert not (row / "late.txt").exists()


def test_a_row_whose_inventory_cannot_be_written_keeps_its_originals_and_the_run_fails(tmp_path, server):
    kept = make_tree(tmp_path / "data" / "A", {"a1.txt": b"a1", "deep/a2.txt": b"a2"})
    gone = make_tree(tmp_path / "data" / "B", {"b1.txt": b"b1"})
    book = sheet(tmp_path, [[str(kept), "/Archive/A", 1], [str(gone), "/Archive/B", 1]])
    broken = row_inventory("/Archive/A", kept)
    server.set_faults(corrupt_stored_paths=frozenset({broken}))  # Dropbox stores other bytes than were sent
    first = upload(server, book, tmp_path / "logs")
    assert first.returncode == 1, output(first)
    assert (kept / "a1.txt").exists() and (kept / "deep" / "a2.txt").exists()
    assert not (gone / "b1.txt").exists()  # another row's inventory is there: its originals went
    assert f"INVENTORY NOT WRITTEN\t{broken}: Dropbox's content hash" in output(first)
    assert "Row 2: its inventory is not complete in Dropbox, so none of its originals is deleted" in output(first)

    # What Dropbox holds there now cannot be read: it is never replaced, the originals stay.
    server.set_faults()
    second = upload(server, book, tmp_path / "logs")
    assert second.returncode == 1, output(second)
    assert "cannot be merged, so it is not replaced" in output(second)
    assert (kept / "a1.txt").exists()

    server.sdk_client().files_delete_v2(broken)  # moved away by the user
    third = upload(server, book, tmp_path / "logs")
    assert third.returncode == 0, output(third)
    assert not (kept / "a1.txt").exists() and not (kept / "deep" / "a2.txt").exists()
    assert sorted(r.original_path for r in records_at(server, broken)) == [str(kept / "a1.txt"),
                                                                           str(kept / "deep" / "a2.txt")]


def test_find_files_finds_an_original_through_the_uploaded_inventories_alone(tmp_path, server, archives):
    row = make_row(tmp_path / "data" / "row", archives)
    up = upload(server, sheet(tmp_path, [[str(row), "/Archive/row", 0]]), tmp_path / "logs",
                "--fileSizeLimit_GB", SPLIT_LIMIT_GB)
    assert up.returncode == 0, output(up)

    # Another computer: a fresh logs folder, no journal, no cache.
    server.clear_log()
    logs = tmp_path / "fresh-logs"
    book = write_xlsx(tmp_path / "find.xlsx", {"findFiles": [["dropboxFolder", "pattern"],
                                                             ["/Archive", "frame_0007.tif"], ["/Archive", "big.bin"],
                                                             ["/Archive/row", "NOTES.TXT"]]})
    found = run_script("app.py", "--excelName", str(book), "--sheetName", "findFiles", "--logs", str(logs),
                       "--caBundle", server.ca_file, env=app_env(server))
    assert found.returncode == 0, output(found)
    workbook = sorted((logs / "findFiles").glob("*_matches.xlsx"))[-1]
    rows = list(openpyxl.load_workbook(workbook)["matches"].iter_rows(values_only=True))
    matches = {row_[1]: dict(zip(rows[0], row_)) for row_ in rows[1:]}
    frame = matches[original(row, "s3/hour_0/frame_0007.tif")]
    assert (frame["dropboxPath"], frame["member"]) == ("/Archive/row/s3.zip", "s3/hour_0/frame_0007.tif")
    assert frame["size (bytes)"] == 3007
    assert matches[str(row / "big.bin")]["where it is"] == "/Archive/row/big.bin (3 parts)"
    assert matches[str(row / "notes.txt")]["dropboxPath"] == "/Archive/row/notes.txt"
    assert len(matches) == 3
    # Only the inventories were read: never the archives' tables of contents.
    read = [call["path"] for call in server.calls("files/download")]
    assert read and all(inventory.is_inventory_name(p.rsplit("/", 1)[1]) for p in read), read


# -- the writer in-process ---------------------------------------------------------------------


def planned(row: SheetRow, folder: Path, names: list[str]) -> tuple[Plan, list]:
    """A plan of `names` under `folder` (files that need not exist, but zips must), all uploaded."""
    sources = []
    for name in names:
        path = folder / name
        info = path.stat() if path.exists() else None
        sources.append(PlannedSource(row, path, info.st_size if info else 10, info.st_mtime_ns if info else 0,
                                     f"/In/{name}", True))
    items = [item for source in sources for item in source.items("dropboxUpload_API")]
    for item in items:
        item.state = State.DONE
    return Plan(sources=sources), items


def test_a_large_inventory_goes_in_pieces_and_a_user_file_is_never_replaced(tmp_path, server, client, monkeypatch):
    monkeypatch.setattr(inventory_writer, "SINGLE_UPLOAD", 64 * 1024)
    monkeypatch.setattr(inventory_writer, "SESSION_CHUNK", 64 * 1024)
    folder = tmp_path / "lab"
    folder.mkdir()
    with zipfile.ZipFile(folder / "x.zip", "w") as book:
        book.writestr("x/one.txt", b"one")
    row = SheetRow(tmp_path / "inputs.xlsx", "dropboxUpload_API", 2,
                   {"inputFile": folder, "outputDir": "/In", "deleteAfterUpload": 1})
    names = [f"session {i // 100}/frame_{i:05d} with a long descriptive name.tif" for i in range(2000)]
    plan, items = planned(row, folder, ["x.zip", *names])
    server.put_file("/In/x.zip.inventory.csv", b"a user's own notes")
    log = logging.getLogger("test_inventory_upload")

    def write() -> inventory_writer.InventoryResult:
        return inventory_writer.write_upload_inventories(client, plan, items, destination_of_row=lambda r: "/In",
                                                         logs_root=tmp_path / "logs", job="test", log=log)

    result = write()
    path = row_inventory("/In", folder)
    assert server.count_calls("files/upload_session/append_v2") >= 3
    assert [r.original_path for r in records_at(server, path)] == [str(folder / "x.zip"),
                                                                  *(str(folder / n) for n in names)]
    assert server.read_file("/In/x.zip.inventory.csv") == b"a user's own notes"
    assert [what for what, _ in result.failures] == ["/In/x.zip"]
    assert "is not an inventory of this tool" in result.failures[0][1]
    # The row keeps every original: delete_verified_sources keeps the failed rows' (keep_rows).
    assert plan.sources and {id(s.row) for s in plan.sources} <= result.failed_rows

    server.clear_log()
    assert write().unchanged == 1 and upload_calls(server) == []
