"""Names near the file system's limit (255 bytes on Linux): the tool's temporary files must fit
whatever the final name, so uploading, downloading, zipping and unzipping such files works.
Temporary names used to be the final name with a prefix and a suffix, which went over the limit."""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from pathlib import Path

import pytest

from conftest import log_files, make_tree, run_script, write_xlsx, client_env
from tests.dropbox_server import DropboxTestServer

from archive_dropbox import inventory, joining, localfs, prepare, zipping

NAME_MAX = 255
# 250 characters, ASCII: `.~<name>.partial` would be 260.
ASCII_NAME = ("scan of sample 0042 " * 13)[:246] + ".bin"
# 250 bytes in 127 characters of two-byte UTF-8.
ACCENTED_NAME = "é" * 123 + ".txt"
UPLOAD_HEADER = ["inputFile", "outputDir", "deleteAfterUpload"]
DOWNLOAD_HEADER = ["dropboxPath", "localDir", "joinFlag"]
ZIP_SCRIPT = "preProcess/2_zipDir.py"


def name_bytes(name: str) -> int:
    return len(name.encode("utf-8"))


def run_app(server: DropboxTestServer, book: Path, sheet: str, logs: Path):
    return run_script("app.py", "--excelName", str(book), "--sheet", sheet, "--logs", str(logs),
                      "--caBundle", server.ca_file, "--sleepTime_min", "0.01", env=client_env(server))


def output(result) -> str:
    return result.stdout + result.stderr


def long_names_this_disk_takes(folder: Path) -> list[str]:
    """ASCII_NAME, and ACCENTED_NAME where the file system stores it (some limit characters,
    not bytes, and some refuse non-ASCII names)."""
    names = [ASCII_NAME]
    try:
        (folder / ACCENTED_NAME).write_bytes(b"")
        (folder / ACCENTED_NAME).unlink()
        names.append(ACCENTED_NAME)
    except (OSError, UnicodeEncodeError):
        pass
    return names


# ----------------------------------------------------------------------------- the name itself


def test_temporary_sibling_is_short_stable_distinct_and_never_synced(tmp_path):
    finals = [tmp_path / ASCII_NAME, tmp_path / ACCENTED_NAME, tmp_path / "a.txt", tmp_path / "A.txt",
              tmp_path / ("x" * NAME_MAX), tmp_path / os.fsdecode(b"raw \xff\xfe name")]
    seen = set()
    for final in finals:
        for tag in ("partial", "zip.partial", "extracting"):
            temporary = localfs.temporary_sibling(final, tag)
            assert temporary.parent == final.parent
            assert temporary.name.startswith(".~") and temporary.name.endswith("." + tag)
            assert len(temporary.name) <= 40 and name_bytes(temporary.name) <= 40
            assert temporary == localfs.temporary_sibling(final, tag)  # a rerun finds the leftover
            assert temporary == localfs.temporary_sibling(str(final), tag)
            assert prepare.is_ignored(temporary.name)  # never uploaded, never synced by the app
            seen.add(temporary)
    assert len(seen) == len(finals) * 3
    # The same name in another folder: the same temporary name, in that folder.
    assert localfs.temporary_sibling(tmp_path / "sub" / "a.txt", "partial").name == \
        localfs.temporary_sibling(tmp_path / "a.txt", "partial").name


def test_temporary_sibling_can_be_created_for_a_name_at_the_limit(tmp_path):
    for name in long_names_this_disk_takes(tmp_path) + ["z" * NAME_MAX]:
        final = tmp_path / name
        temporary = localfs.temporary_sibling(final, "zip.partial")
        temporary.write_bytes(b"half")
        os.rename(temporary, final)
        assert final.read_bytes() == b"half"


# ----------------------------------------------------------------------------- upload and download


@pytest.fixture
def server(tmp_path):
    with DropboxTestServer(tmp_path / "server") as running:
        yield running


def test_files_with_names_near_the_limit_go_up_and_come_back_identical(tmp_path, server):
    data = tmp_path / "data"
    data.mkdir()
    names = long_names_this_disk_takes(data)
    assert all(name_bytes(name) <= NAME_MAX for name in names)
    contents = {name: os.urandom(70_000 + index) for index, name in enumerate(names)}
    make_tree(data, contents)

    up = write_xlsx(tmp_path / "up.xlsx", {"dropboxUpload_API": [UPLOAD_HEADER, [str(data), "/Archive/long", 0]]})
    result = run_app(server, up, "dropboxUpload_API", tmp_path / "logs")
    assert result.returncode == 0, output(result)
    assert {f"/Archive/long/{name}" for name in names} <= set(server.files())

    restore = tmp_path / "restore"
    down = write_xlsx(tmp_path / "down.xlsx", {"dropboxDownload_API": [DOWNLOAD_HEADER,
                                                                      ["/Archive/long", str(restore), 0]]})
    result = run_app(server, down, "dropboxDownload_API", tmp_path / "logs")
    assert result.returncode == 0, output(result)
    restored = restore / "long"
    assert sorted(p.name for p in restored.iterdir() if not inventory.is_inventory_name(p.name)) == sorted(
        names)  # no temporary file left
    for name, content in contents.items():
        assert hashlib.sha256((restored / name).read_bytes()).digest() == hashlib.sha256(content).digest()


# ----------------------------------------------------------------------------- zip and unzip


@pytest.mark.parametrize("seven_zip", ["True", "False"])
def test_a_folder_named_near_the_limit_is_zipped_and_verified(tmp_path, logs_root, seven_zip):
    if seven_zip == "True" and zipping.find_seven_zip() is None:
        pytest.skip("7-Zip is not installed")
    folder = make_tree(tmp_path / ("run 2023-10-01 grid 7 " * 12)[:245],
                       {"frame_0001.tif": 3000, "sub/frame_0002.tif": 2000, "notes.txt": b"hello"})
    assert len(folder.name) == 245
    book = write_xlsx(tmp_path / "zipDir.xlsx", {"zipDir": [["inputDir", "deleteFlag"], [str(folder), 0]]})
    result = run_script(ZIP_SCRIPT, "--excelName", str(book), "--logs", str(logs_root), "--useSevenZip", seven_zip)
    assert result.returncode == 0, output(result)
    log = log_files(logs_root, "preProcess")[-1].read_text(encoding="utf-8")
    assert "OK: zipped and verified" in log, log
    archive = zipping.archive_path(folder)
    with zipfile.ZipFile(archive) as zipped:
        assert zipped.testzip() is None
        assert zipped.comment.startswith(zipping.MARK_PREFIX.encode())
        assert sorted(zipped.namelist()) == sorted(f"{folder.name}/{member}" for member in
                                                   ("frame_0001.tif", "sub/frame_0002.tif", "notes.txt"))
        assert zipped.read(f"{folder.name}/notes.txt") == b"hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folder.name, archive.name, "logs", "zipDir.xlsx"])


def test_leftovers_of_interrupted_runs_are_found_and_removed_on_rerun(tmp_path):
    long_folder = make_tree(tmp_path / ("x" * 245), {"a.tif": 1000})
    zipping.partial_path(long_folder).write_bytes(b"half an archive")  # left by a crash
    short_folder = make_tree(tmp_path / "001", {"a.tif": 1000})
    (tmp_path / ".~001.zip.partial").write_bytes(b"half an archive")  # by an earlier version
    for folder in (long_folder, short_folder):
        outcome = zipping.zip_folder(folder, engine=zipping.PythonZip(1), delete_originals=False,
                                     log=logging.getLogger("test"))
        assert outcome.ok, outcome.result
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["001", "001.zip", long_folder.name,
                                                                 long_folder.name + ".zip"])


def test_a_zip_named_near_the_limit_is_unzipped(tmp_path):
    archive = tmp_path / (("grid square 12 " * 17)[:244] + ".zip")
    with zipfile.ZipFile(archive, "w") as book:
        book.writestr("movie/frame_0001.tif", b"frame")
    summary = joining.extract_zip(archive, logging.getLogger("test"))
    assert summary.files == 1
    assert (tmp_path / "movie" / "frame_0001.tif").read_bytes() == b"frame"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["movie"]  # zip deleted, no staging left
