"""joinFiles.py run as users run it: from the joinFiles tab or with parts on the command line;
verified joins, refused damage (missing, truncated, altered parts), safe unzipping, deletion
only after verification, and reruns after a crash."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, log_files, run_script, script_env, write_xlsx

from archive_dropbox import joining, split
from tests import split_helpers
from archive_dropbox.localfs import temporary_sibling

SCRIPT = "joinFiles.py"
HEADER = ["inputFile", "deleteFlag", "unzipFlag"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_parts(folder: Path, name: str, data: bytes, limit: int, *, manifest: bool = True,
               mtime: float = 1_650_000_000.0) -> list[Path]:
    """Split `data` the way the upload stages do (or, without manifest, as the original tool did)."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = split.plan_split(len(data), limit, name)
    if manifest:
        original = folder.parent / f"original-of-{name}"
        original.write_bytes(data)
        os.utime(original, (mtime, mtime))
        split_helpers.write_parts(original, folder, plan, name=name)
        original.unlink()
    else:
        for part in plan:
            (folder / part.name).write_bytes(data[part.offset:part.end])
    return [folder / part.name for part in plan]


def join_sheet(tmp_path: Path, logs_root: Path, rows: list[list]) -> subprocess.CompletedProcess:
    workbook = write_xlsx(tmp_path / "inputs.xlsx", {"joinFiles": [HEADER, *rows]})
    return run_script(SCRIPT, "--excelName", str(workbook), "--logs", str(logs_root))


def join_args(logs_root: Path, *args: str) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, *args, "--logs", str(logs_root))


def output_of(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def zip_bytes(tmp_path: Path, entries: dict[str, bytes | None], name: str = "build.zip") -> bytes:
    """A zip whose entries are stored as given (None makes a folder entry)."""
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for entry, content in entries.items():
            if content is None:
                archive.writestr(zipfile.ZipInfo(entry), b"")
            else:
                archive.writestr(entry, content)
    data = path.read_bytes()
    path.unlink()
    return data


# ----------------------------------------------------------------------------- joining


def test_sheet_row_joins_verifies_and_keeps_the_parts(tmp_path, logs_root):
    data = os.urandom(3 * 1024 * 1024 + 17)
    parts = make_parts(tmp_path / "restored", "scan 01 é.mrc", data, 1024 * 1024)
    result = join_sheet(tmp_path, logs_root, [[str(parts[0]), 0, 0]])
    assert result.returncode == 0, output_of(result)
    joined = tmp_path / "restored" / "scan 01 é.mrc"
    assert joined.read_bytes() == data
    assert joined.stat().st_mtime == 1_650_000_000.0
    assert all(p.exists() for p in parts)
    assert not list((tmp_path / "restored").glob(".~*"))
    logs = log_files(logs_root, "dataPrep")
    assert len(logs) == 1 and logs[0].name.endswith("_joinFiles.log")
    text = logs[0].read_text(encoding="utf-8")
    assert "verified against the manifest" in text and "1 joined" in text


def test_relative_path_in_the_sheet_is_read_from_the_workbooks_folder(tmp_path, logs_root):
    data = os.urandom(50_000)
    make_parts(tmp_path / "data", "a.bin", data, 20_000)
    result = join_sheet(tmp_path, logs_root, [["data/a.bin_split_0001", "", ""]])
    assert result.returncode == 0, output_of(result)
    assert (tmp_path / "data" / "a.bin").read_bytes() == data


def test_the_same_file_listed_twice_is_refused(tmp_path, logs_root):
    parts = make_parts(tmp_path / "d", "big.bin", os.urandom(3000), 1000)
    result = join_sheet(tmp_path, logs_root, [[str(parts[0]), 0, 0], [str(parts[2]), 1, 0]])
    assert result.returncode == 2 and "row 3" in output_of(result), output_of(result)
    assert "big.bin is already listed (row 2)" in output_of(result)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(
        [p.name for p in parts] + ["big.bin_split_manifest.json"])


def test_part_on_the_command_line_with_delete(tmp_path, logs_root):
    data = os.urandom(300_000)
    parts = make_parts(tmp_path / "d", "big.bin", data, 100_000)
    # Any part of the series will do, as when a user drops the wrong one on the script.
    result = join_args(logs_root, str(parts[1]), "--delete")
    assert result.returncode == 0, output_of(result)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["big.bin"]
    assert (tmp_path / "d" / "big.bin").read_bytes() == data


def test_rerun_of_a_finished_join_checks_it_and_leaves_it_alone(tmp_path, logs_root):
    data = os.urandom(200_000)
    parts = make_parts(tmp_path / "d", "big.bin", data, 64_000)
    assert join_args(logs_root, str(parts[0])).returncode == 0
    joined = tmp_path / "d" / "big.bin"
    before = joined.stat()
    result = join_args(logs_root, str(parts[0]))
    assert result.returncode == 0, output_of(result)
    assert "already joined; checked against the manifest" in output_of(result)
    after = joined.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_parts_without_manifest_join_by_number_with_a_warning(tmp_path, logs_root):
    data = os.urandom(250_000)
    make_parts(tmp_path / "old", "legacy.tif", data, 100_000, manifest=False)
    result = join_sheet(tmp_path, logs_root, [[str(tmp_path / "old" / "legacy.tif_split_0001"), 0, 0]])
    assert result.returncode == 0, output_of(result)
    assert "cannot be verified" in output_of(result)
    assert sha(data) in output_of(result)
    assert (tmp_path / "old" / "legacy.tif").read_bytes() == data


def test_parts_without_manifest_are_never_deleted(tmp_path, logs_root):
    """Issue 12, case 4: parts 1-2 of 3 and no manifest, --delete: the join cannot be proven
    complete, so the parts stay and the run says why and what to do."""
    data = os.urandom(300_000)
    parts = make_parts(tmp_path / "old", "legacy.tif", data, 100_000, manifest=False)
    parts[2].unlink()  # the last part never arrived; nothing can tell
    result = join_args(logs_root, str(parts[0]), "--delete")
    assert result.returncode == 1, output_of(result)
    assert "without a manifest" in output_of(result) and "delete the parts by hand" in output_of(result)
    assert all(p.exists() for p in parts[:2])
    assert (tmp_path / "old" / "legacy.tif").read_bytes() == data[:200_000]


# ----------------------------------------------------------------------------- damaged inputs


def test_missing_middle_part_is_named_and_nothing_changes(tmp_path, logs_root):
    data = os.urandom(500_000)
    parts = make_parts(tmp_path / "d", "big.bin", data, 100_000)
    parts[2].unlink()
    result = join_sheet(tmp_path, logs_root, [[str(parts[0]), 1, 0]])
    assert result.returncode == 2, output_of(result)
    assert "part big.bin_split_0003 is missing" in output_of(result)
    assert "row 2" in output_of(result)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(
        [p.name for p in parts if p != parts[2]] + ["big.bin_split_manifest.json"])


def test_missing_middle_part_without_manifest_is_named(tmp_path, logs_root):
    parts = make_parts(tmp_path / "d", "old.bin", os.urandom(50_000), 10_000, manifest=False)
    parts[1].unlink()
    result = join_args(logs_root, str(parts[0]), "--delete")
    assert result.returncode == 2, output_of(result)
    assert "part old.bin_split_0002 is missing" in output_of(result)
    assert all(p.exists() for p in parts if p != parts[1])


def test_truncated_part_is_named_and_nothing_changes(tmp_path, logs_root):
    parts = make_parts(tmp_path / "d", "big.bin", os.urandom(300_000), 100_000)
    parts[1].write_bytes(parts[1].read_bytes()[:-1])
    result = join_args(logs_root, str(parts[0]), "--delete")
    assert result.returncode == 2, output_of(result)
    assert "part big.bin_split_0002 has 99,999 bytes but should have 100,000" in output_of(result)
    assert all(p.exists() for p in parts) and not (tmp_path / "d" / "big.bin").exists()


def test_part_with_one_flipped_byte_is_named_and_nothing_is_deleted(tmp_path, logs_root):
    data = os.urandom(400_000)
    parts = make_parts(tmp_path / "d", "big.bin", data, 100_000)
    damaged = bytearray(parts[2].read_bytes())
    damaged[1234] ^= 0x01
    parts[2].write_bytes(bytes(damaged))
    good = os.urandom(1000)
    good_parts = make_parts(tmp_path / "e", "good.bin", good, 300)
    result = join_sheet(tmp_path, logs_root, [[str(parts[0]), 1, 1], [str(good_parts[0]), 1, 0]])
    assert result.returncode == 1, output_of(result)
    assert "part big.bin_split_0003 is damaged" in output_of(result)
    assert "row 2: big.bin: FAILED" in output_of(result)
    assert [p.name for p in (tmp_path / "e").iterdir()] == ["good.bin"]  # the other row still ran
    assert (tmp_path / "e" / "good.bin").read_bytes() == good
    assert all(p.exists() for p in parts) and (tmp_path / "d" / "big.bin_split_manifest.json").exists()
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(
        [p.name for p in parts] + ["big.bin_split_manifest.json"])


# Parts of 64 KiB are whole disk blocks, so the join writes them straight to the disk where the
# file system allows it; parts of 100,000 bytes go through the page cache and are read back.
ALIGNED, UNALIGNED = 64 * 1024, 100_000


def quiet_log():
    import logging

    log = logging.getLogger("test_join_files")
    log.propagate = False
    return log


@pytest.mark.parametrize("limit", [ALIGNED, UNALIGNED])
def test_part_altered_after_the_manifest_is_refused_by_name(tmp_path, limit):
    data = os.urandom(5 * limit + 17)
    parts = make_parts(tmp_path / "d", "big.bin", data, limit)
    altered = bytearray(parts[3].read_bytes())
    altered[-1] ^= 0x80  # same size: only the content tells
    parts[3].write_bytes(bytes(altered))
    with pytest.raises(joining.JoinProblem, match="part big.bin_split_0004 is damaged"):
        joining.join_split_file(parts[0], delete_parts=True, log=quiet_log())
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(
        [p.name for p in parts] + ["big.bin_split_manifest.json"])


@pytest.mark.parametrize("limit", [ALIGNED, UNALIGNED])
def test_parallel_join_puts_every_part_in_its_place(tmp_path, limit):
    data = os.urandom(11 * limit + 4096 + 3)  # more parts than threads, and a short last part
    parts = make_parts(tmp_path / "d", "big.bin", data, limit)
    outcome = joining.join_split_file(parts[0], delete_parts=True, log=quiet_log())
    assert outcome.verified and (tmp_path / "d" / "big.bin").read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["big.bin"]


def test_bytes_corrupted_on_their_way_into_the_joined_file_are_caught(tmp_path, monkeypatch):
    """The check covers what the joined file received, not a separate reading of the parts:
    a read that hands over wrong bytes (straight-to-disk path) is caught."""
    data = os.urandom(4 * ALIGNED)
    parts = make_parts(tmp_path / "d", "big.bin", data, ALIGNED)
    real_read_into = joining._read_into

    def flaky_read(handle, view):
        got = real_read_into(handle, view)
        if str(handle.name).endswith("_split_0002"):
            view[7] ^= 0x01
        return got

    monkeypatch.setattr(joining, "_read_into", flaky_read)
    with pytest.raises(joining.JoinProblem, match="every part matches the manifest but the joined copy does not"):
        joining.join_split_file(parts[0], delete_parts=True, log=quiet_log())
    assert not (tmp_path / "d" / "big.bin").exists() and not list((tmp_path / "d").glob(".~*"))
    assert all(p.exists() for p in parts)


def test_a_write_that_lands_wrong_bytes_is_caught_by_reading_back(tmp_path, monkeypatch):
    """Chunks written through the page cache are read back before hashing: a write that stores
    something else than it was given is caught."""
    data = os.urandom(4 * UNALIGNED)
    parts = make_parts(tmp_path / "d", "big.bin", data, UNALIGNED)
    real_write_at = joining._write_at

    def bad_write(handle, chunk, at):
        stored = bytearray(chunk)
        if at <= 2 * UNALIGNED + 5 < at + len(stored):
            stored[2 * UNALIGNED + 5 - at] ^= 0x01
        real_write_at(handle, memoryview(stored), at)

    monkeypatch.setattr(joining, "_write_at", bad_write)
    with pytest.raises(joining.JoinProblem, match="every part matches the manifest but the joined copy does not"):
        joining.join_split_file(parts[0], delete_parts=True, log=quiet_log())
    assert not (tmp_path / "d" / "big.bin").exists() and all(p.exists() for p in parts)


def test_extra_part_beyond_the_manifest_is_refused(tmp_path, logs_root):
    parts = make_parts(tmp_path / "d", "big.bin", os.urandom(30_000), 10_000)
    (tmp_path / "d" / "big.bin_split_0004").write_bytes(b"stray")
    result = join_args(logs_root, str(parts[0]))
    assert result.returncode == 2, output_of(result)
    assert "big.bin_split_0004 is not one of the 3 parts" in output_of(result)


def test_a_different_file_with_the_output_name_is_never_replaced(tmp_path, logs_root):
    data = os.urandom(30_000)
    parts = make_parts(tmp_path / "d", "big.bin", data, 10_000)
    squatter = tmp_path / "d" / "big.bin"
    squatter.write_bytes(b"my own notes")
    result = join_args(logs_root, str(parts[0]), "--delete")
    assert result.returncode == 2 and "already exists and is not the joined file" in output_of(result)
    squatter.write_bytes(os.urandom(len(data)))  # same size, other content: found by its hash
    kept = squatter.read_bytes()
    result = join_args(logs_root, str(parts[0]), "--delete")
    assert result.returncode == 1 and "different content" in output_of(result)
    assert squatter.read_bytes() == kept and all(p.exists() for p in parts)


def test_inputs_that_are_not_parts_are_all_listed_and_nothing_changes(tmp_path, logs_root):
    (tmp_path / "notes.bin").write_bytes(b"data")
    (tmp_path / "notes.bin_split_manifest.txt").write_bytes(b"data")
    rows = [[str(tmp_path / "notes.bin"), 1, 1],
            [str(tmp_path / "big.bin_split_0001"), 1, 1],
            ["nowhere/big.bin_split_0001", 1, 1]]
    result = join_sheet(tmp_path, logs_root, rows)
    assert result.returncode == 2, output_of(result)
    text = output_of(result)
    assert "3 problem(s) found before starting; nothing was changed" in text
    assert "row 2, column 'inputFile': notes.bin is not a part of a split file" in text
    assert "row 3, column 'inputFile': big.bin_split_0001 does not exist, and no other part" in text
    assert f"row 4, column 'inputFile': the folder {tmp_path / 'nowhere'} does not exist" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs.xlsx", "logs", "notes.bin",
                                                          "notes.bin_split_manifest.txt"]


@pytest.mark.parametrize("tabs, message", [
    (None, "the workbook does not exist"),
    ({"other": [HEADER]}, "there is no tab named 'joinFiles'"),
    ({"joinFiles": [["inputFile", "deleteFlag"], ["x_split_0001", 0]]}, "column 'unzipFlag' is missing"),
    ({"joinFiles": []}, "the tab is empty"),
])
def test_bad_workbooks_are_refused(tmp_path, logs_root, tabs, message):
    workbook = tmp_path / "inputs.xlsx"
    if tabs is not None:
        write_xlsx(workbook, tabs)
    result = run_script(SCRIPT, "--excelName", str(workbook), "--logs", str(logs_root))
    assert result.returncode == 2 and message in output_of(result), output_of(result)
    assert "Traceback" not in output_of(result)


# ----------------------------------------------------------------------------- unzipping


FOLDER_ZIP = {"001/": None, "001/frame_0001.tif": b"A" * 70_000, "001/sub/frame_0002.tif": os.urandom(40_000),
              "001/empty/": None, "001/notes é.txt": b"hello"}


def test_unzip_after_join_restores_the_folder_and_removes_the_zip(tmp_path, logs_root):
    data = zip_bytes(tmp_path, FOLDER_ZIP)
    parts = make_parts(tmp_path / "restore", "001.zip", data, 30_000)
    result = join_sheet(tmp_path, logs_root, [[str(parts[0]), 0, 1]])
    assert result.returncode == 0, output_of(result)
    root = tmp_path / "restore"
    for entry, content in FOLDER_ZIP.items():
        if content is None:
            assert (root / entry).is_dir()
        else:
            assert (root / entry).read_bytes() == content
    assert not (root / "001.zip").exists() and all(p.exists() for p in parts)
    assert not list(root.glob(".~*"))
    # Rerun: the zip is gone but the parts are kept, so it is joined again and found already in place.
    result = join_sheet(tmp_path, logs_root, [[str(parts[0]), 1, 1]])
    assert result.returncode == 0, output_of(result)
    assert sorted(p.name for p in root.iterdir()) == ["001"]
    # And once everything is cleaned up, a rerun has nothing to do.
    result = join_sheet(tmp_path, logs_root, [[str(parts[0]), 1, 1]])
    assert result.returncode == 0 and "nothing to do" in output_of(result), output_of(result)


@pytest.mark.parametrize("bad_entry, reason", [
    ("../evil.txt", "climbs out of the folder"),
    ("/tmp/evil.txt", "is an absolute path"),
    ("C:/evil.txt", "names a drive letter"),
    ("001/../../evil.txt", "climbs out of the folder"),
    ("link", "is a symbolic link"),
])
def test_unsafe_zip_entry_is_refused_before_extracting_anything(tmp_path, logs_root, bad_entry, reason):
    archive_path = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("001/ok.txt", b"fine")
        if bad_entry == "link":
            info = zipfile.ZipInfo("001/link")
            info.create_system = 3
            info.external_attr = (0o120777 << 16)
            archive.writestr(info, "/etc/passwd")
        else:
            archive.writestr(bad_entry, b"evil")
    parts = make_parts(tmp_path / "restore", "001.zip", archive_path.read_bytes(), 200)
    archive_path.unlink()
    result = join_args(logs_root, str(parts[0]), "--unzip")
    assert result.returncode == 1, output_of(result)
    assert reason in output_of(result) and "nothing was extracted" in output_of(result)
    assert not (tmp_path / "restore" / "001").exists()
    assert (tmp_path / "restore" / "001.zip").exists()
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


def test_unzip_continues_after_an_interrupted_extraction(tmp_path, logs_root):
    data = zip_bytes(tmp_path, FOLDER_ZIP)
    root = tmp_path / "restore"
    parts = make_parts(root, "001.zip", data, 30_000)
    # What a crash mid-extraction leaves: some files in place, a half-filled staging folder.
    (root / "001").mkdir()
    (root / "001" / "frame_0001.tif").write_bytes(FOLDER_ZIP["001/frame_0001.tif"])
    (root / ".~001.zip.extracting" / "001").mkdir(parents=True)
    (root / ".~001.zip.extracting" / "001" / "notes é.txt").write_bytes(b"hel")
    result = join_args(logs_root, str(parts[0]), "--unzip", "--delete")
    assert result.returncode == 0, output_of(result)
    assert sorted(p.name for p in root.iterdir()) == ["001"]
    assert (root / "001" / "notes é.txt").read_bytes() == b"hello"
    assert (root / "001" / "sub" / "frame_0002.tif").read_bytes() == FOLDER_ZIP["001/sub/frame_0002.tif"]


def test_unzip_still_happens_when_a_crash_came_after_the_parts_were_deleted(tmp_path, logs_root):
    root = tmp_path / "restore"
    root.mkdir()
    (root / "001.zip").write_bytes(zip_bytes(tmp_path, FOLDER_ZIP))  # joined, parts already deleted
    result = join_args(logs_root, str(root / "001.zip_split_0001"), "--unzip", "--delete")
    assert result.returncode == 0, output_of(result)
    assert "already joined by an earlier run" in output_of(result)
    assert sorted(p.name for p in root.iterdir()) == ["001"]
    assert (root / "001" / "notes é.txt").read_bytes() == b"hello"


def test_unzip_never_overwrites_a_different_file(tmp_path, logs_root):
    data = zip_bytes(tmp_path, FOLDER_ZIP)
    root = tmp_path / "restore"
    parts = make_parts(root, "001.zip", data, 30_000)
    (root / "001").mkdir()
    (root / "001" / "notes é.txt").write_bytes(b"HELLO")
    result = join_args(logs_root, str(parts[0]), "--unzip")
    assert result.returncode == 1, output_of(result)
    assert "differs from the copy in the archive" in output_of(result)
    assert (root / "001" / "notes é.txt").read_bytes() == b"HELLO"
    assert (root / "001.zip").exists() and not (root / "001" / "sub").exists()


def test_zip_that_python_cannot_read_is_unzipped_with_7zip(tmp_path, logs_root):
    seven_zip = next((t for t in ("7zz", "7z", "7za") if __import__("shutil").which(t)), None)
    if seven_zip is None:
        pytest.skip("7-Zip is not installed")
    source = tmp_path / "src"
    (source / "001").mkdir(parents=True)
    content = os.urandom(1000) * 300
    (source / "001" / "frame.tif").write_bytes(content)
    subprocess.run([seven_zip, "a", "-tzip", "-mm=Deflate64", "-bd", "001.zip", "001"], cwd=source,
                   check=True, capture_output=True)
    with zipfile.ZipFile(source / "001.zip") as archive:
        with pytest.raises(NotImplementedError):
            archive.read("001/frame.tif")
    parts = make_parts(tmp_path / "restore", "001.zip", (source / "001.zip").read_bytes(), 2_000)
    result = join_args(logs_root, str(parts[0]), "--unzip")
    assert result.returncode == 0, output_of(result)
    assert (tmp_path / "restore" / "001" / "frame.tif").read_bytes() == content
    assert not (tmp_path / "restore" / "001.zip").exists()


# ----------------------------------------------------------------------------- crash and rerun


def test_rerun_after_kill_mid_join_ends_correct(tmp_path, logs_root):
    block = os.urandom(1024 * 1024)
    data = b"".join(i.to_bytes(8, "little") + block[8:] for i in range(64))
    parts = make_parts(tmp_path / "d", "big.bin", data, 8 * 1024 * 1024)
    partial = temporary_sibling(tmp_path / "d" / "big.bin", "partial")
    process = subprocess.Popen([sys.executable, str(REPO / SCRIPT), str(parts[0]), "--delete",
                                "--logs", str(logs_root)], env=script_env(), cwd=str(REPO),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not partial.exists() and process.poll() is None:
            pass
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the join finished before it could be interrupted"
    assert partial.exists() and not (tmp_path / "d" / "big.bin").exists()
    assert all(p.exists() for p in parts)
    result = join_args(logs_root, str(parts[0]), "--delete")
    assert result.returncode == 0, output_of(result)
    assert "left by an interrupted run" in output_of(result)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["big.bin"]
    assert sha((tmp_path / "d" / "big.bin").read_bytes()) == sha(data)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file locks")
def test_a_join_in_progress_in_another_run_is_left_alone(tmp_path, logs_root):
    import fcntl

    parts = make_parts(tmp_path / "d", "big.bin", os.urandom(3000), 1000)
    partial = temporary_sibling(tmp_path / "d" / "big.bin", "partial")
    with open(partial, "wb") as busy:
        busy.write(b"being written by another run")
        busy.flush()
        fcntl.flock(busy.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = join_args(logs_root, str(parts[0]))
    assert result.returncode == 1, output_of(result)
    assert "another run is joining big.bin right now" in output_of(result)
    assert partial.read_bytes() == b"being written by another run"


def test_a_whole_zip_row_is_unzipped_and_a_rerun_has_nothing_to_do(tmp_path):
    import zipfile as _zipfile

    from conftest import run_script as _run, write_xlsx as _xlsx

    archive = tmp_path / "restored" / "Movie_0001.zip"
    archive.parent.mkdir()
    with _zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("Movie_0001/Hour_00/frame_0001.tif", b"frame")
        handle.writestr("Movie_0001/empty/", b"")
    book = _xlsx(tmp_path / "inputs.xlsx", {"joinFiles": [["inputFile", "deleteFlag", "unzipFlag"],
                                                          [str(archive), 0, 1]]})
    first = _run("joinFiles.py", "--excelName", str(book), "--logs", str(tmp_path / "logs"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert (tmp_path / "restored" / "Movie_0001" / "Hour_00" / "frame_0001.tif").read_bytes() == b"frame"
    assert (tmp_path / "restored" / "Movie_0001" / "empty").is_dir() and not archive.exists()
    again = _run("joinFiles.py", "--excelName", str(book), "--logs", str(tmp_path / "logs"))
    assert again.returncode == 0 and "already unzipped" in again.stdout
    no_flag = _xlsx(tmp_path / "no_flag.xlsx", {"joinFiles": [["inputFile", "deleteFlag", "unzipFlag"],
                                                              [str(tmp_path / "other.zip"), 0, 0]]})
    (tmp_path / "other.zip").write_bytes(b"PK")
    refused = _run("joinFiles.py", "--excelName", str(no_flag), "--logs", str(tmp_path / "logs"))
    assert refused.returncode == 2 and "set unzipFlag = 1" in refused.stdout + refused.stderr


def test_internal_link_comes_back_as_a_link_and_an_escaping_one_is_refused_after_a_counted_join(tmp_path, logs_root):
    """Issue 13, row 15: a folder zipped by 2_zipDir.py with `latest.tif -> frames/frame_0004.tif`,
    split, then joined with --unzip, gets its link back; a link leaving the folder is refused,
    while its verified join still counts as joined."""
    run1 = tmp_path / "data" / "run1"
    frames = {f"frame_000{i}.tif": os.urandom(3000) + bytes([i]) for i in range(1, 5)}
    (run1 / "frames").mkdir(parents=True)
    for name, content in frames.items():
        (run1 / "frames" / name).write_bytes(content)
    os.symlink("frames/frame_0004.tif", run1 / "latest.tif")
    book = write_xlsx(tmp_path / "zipDir.xlsx", {"zipDir": [["inputDir", "deleteFlag"], [str(run1), 0]]})
    zipped = run_script("preProcess/2_zipDir.py", "--excelName", str(book), "--logs", str(logs_root))
    assert zipped.returncode == 0, output_of(zipped)
    parts = make_parts(tmp_path / "restore", "run1.zip", (tmp_path / "data" / "run1.zip").read_bytes(), 4000)

    result = join_args(logs_root, str(parts[0]), "--unzip")
    assert result.returncode == 0, output_of(result)
    assert "Summary: 1 joined" in output_of(result)
    link = tmp_path / "restore" / "run1" / "latest.tif"
    assert link.is_symlink() and os.readlink(link) == "frames/frame_0004.tif"
    assert link.read_bytes() == frames["frame_0004.tif"]
    assert not (tmp_path / "restore" / "run1.zip").exists()

    archive_path = tmp_path / "escape.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("run2/ok.txt", b"fine")
        info = zipfile.ZipInfo("run2/up")
        info.create_system = 3
        info.external_attr = 0o120777 << 16
        archive.writestr(info, "../../outside")
    parts = make_parts(tmp_path / "restore2", "run2.zip", archive_path.read_bytes(), 200)
    result = join_args(logs_root, str(parts[0]), "--unzip")
    assert result.returncode == 1, output_of(result)
    assert "Summary: 1 joined" in output_of(result) and "1 joined but not unzipped" in output_of(result)
    assert "points outside the folder" in output_of(result)
    assert (tmp_path / "restore2" / "run2.zip").is_file() and not (tmp_path / "restore2" / "run2").exists()
