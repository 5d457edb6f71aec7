"""preProcess/2_zipDir.py and archive_dropbox/zipping.py: archives that any unzip tool opens,
identical from 7-Zip and from Python's zipfile, and originals deleted only after verification —
also across kill -9, a full disk, a failing or missing 7-Zip, and reruns."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from conftest import REPO, log_files, make_tree, run_script, write_xlsx

from archive_dropbox import cli, errors, zip_dir_cmd, zipping

SCRIPT = REPO / "preProcess" / "2_zipDir.py"
SEVEN_ZIP = zipping.find_seven_zip()
needs_seven_zip = pytest.mark.skipif(SEVEN_ZIP is None, reason="7-Zip is not installed")

# Names a lab really has: spaces, accents, other scripts, hidden files, empty folders.
VARIED_TREE = {
    "frame_0001.tif": 3000,
    "frame 0002 (copy).tif": 2000,
    "Ünïcödé/データ/séance 1.mrc": 1500,
    ".hidden_settings": b"secret=no\n",
    "sub/.DS_Store": b"x",
    "sub/deeper/notes.txt": b"compressible " * 200,
    "sub/deeper/empty.dat": b"",
    "star*name?.txt": b"wildcards are names here",
}
EMPTY_FOLDERS = ["empty", "sub/also empty", "Ünïcödé/leer"]


# --------------------------------------------------------------------------- helpers


def build_tree(folder: Path) -> Path:
    make_tree(folder, VARIED_TREE)
    for name in EMPTY_FOLDERS:
        (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / "sub" / "link to frame").symlink_to("../frame_0001.tif")
    return folder


def contents(folder: Path) -> dict[str, str]:
    """Every file and symlink under folder -> a digest, and every folder -> 'dir'."""
    found = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink():
            found[relative] = "link:" + os.readlink(path)
        elif path.is_dir():
            found[relative] = "dir"
        else:
            found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def members(archive: Path) -> list[str]:
    with zipfile.ZipFile(archive) as book:
        return sorted(info.filename for info in book.infolist())


def extract(archive: Path, target: Path) -> Path:
    """Unzip with zipfile, restoring symlink members as symlinks."""
    with zipfile.ZipFile(archive) as book:
        for info in book.infolist():
            destination = target.joinpath(*info.filename.rstrip("/").split("/"))
            if info.is_dir():
                destination.mkdir(parents=True, exist_ok=True)
            elif (info.external_attr >> 16) & 0o170000 == 0o120000:
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.symlink_to(book.read(info).decode())
            else:
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(book.read(info))
    return target


def seven_zip_test(archive: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SEVEN_ZIP), "t", "-tzip", str(archive)], capture_output=True, text=True)


def workbook(path: Path, rows: list[list]) -> Path:
    return write_xlsx(path, {"zipDir": [["inputDir", "deleteFlag"], *rows]})


def zip_dir(book: Path, logs: Path, *extra: str, env: dict | None = None):
    return run_script(SCRIPT, "--excelName", str(book), "--logs", str(logs), *extra, env=env)


def last_log(logs: Path) -> str:
    return log_files(logs, "preProcess")[-1].read_text(encoding="utf-8")


def row_line(log_text: str, row: int) -> str:
    lines = [line for line in log_text.splitlines() if f"[row {row}]" in line]
    assert len(lines) == 1, log_text
    return lines[0]


def run_in_process(*argv: str) -> int:
    """The script's main path without a new interpreter (for monkeypatching and speed)."""
    return cli.run_script(script=SCRIPT, description="test", spec=zip_dir_cmd.SETTINGS, script_values={},
                          main=zip_dir_cmd.run, log_subdir="preProcess", log_name="zipDir",
                          add_arguments=zip_dir_cmd.add_arguments, argv=list(argv))


def assert_no_leftovers(folder: Path) -> None:
    assert not zipping.partial_path(folder).exists()
    assert not zipping.archive_path(folder).exists()


# --------------------------------------------------------------------------- both engines


@needs_seven_zip
def test_seven_zip_and_python_zip_make_the_same_standard_archive(tmp_path, logs_root):
    by_seven = build_tree(tmp_path / "a" / "001")
    by_python = build_tree(tmp_path / "b" / "001")
    originals = {by_seven: contents(by_seven), by_python: contents(by_python)}
    book7 = workbook(tmp_path / "seven.xlsx", [[str(by_seven), 0]])
    bookpy = workbook(tmp_path / "python.xlsx", [[str(by_python), 0]])

    seven = zip_dir(book7, logs_root / "7", "--zipEngine", "7zip", "--sevenZipPath", str(SEVEN_ZIP))
    python = zip_dir(bookpy, logs_root / "py", "--useSevenZip", "False")

    assert seven.returncode == 0, seven.stdout + seven.stderr
    assert python.returncode == 0, python.stdout + python.stderr
    assert "Using 7-Zip" in last_log(logs_root / "7")
    assert "Python's zipfile" in last_log(logs_root / "py")
    archive7, archivepy = zipping.archive_path(by_seven), zipping.archive_path(by_python)
    assert members(archive7) == members(archivepy)
    names = members(archive7)
    # Relative to the folder's parent; hidden files, unicode, empty folders and the link kept.
    assert "001/frame_0001.tif" in names and "001/.hidden_settings" in names
    assert "001/Ünïcödé/データ/séance 1.mrc" in names and "001/star*name?.txt" in names
    assert {"001/empty/", "001/sub/also empty/", "001/Ünïcödé/leer/"} <= set(names)
    assert "001/sub/link to frame" in names
    for folder, original in originals.items():
        archive = zipping.archive_path(folder)
        with zipfile.ZipFile(archive) as book:
            assert book.testzip() is None
            assert book.comment.startswith(zipping.MARK_PREFIX.encode())
        assert seven_zip_test(archive).returncode == 0
        assert contents(extract(archive, tmp_path / f"out_{folder.parent.name}") / "001") == original
        # deleteFlag = 0: originals untouched, no temporary file left.
        assert contents(folder) == original
    assert not zipping.partial_path(by_seven).exists()
    line = row_line(last_log(logs_root / "7"), 2)
    assert "OK: zipped and verified" in line and "7 subdirectories" in line and "9 files" in line


# --------------------------------------------------------------------------- delete and rerun


def test_delete_only_archived_files_rerun_skips_and_finishes_an_interrupted_deletion(tmp_path, logs_root):
    data = tmp_path / "data"
    keep = build_tree(data / "keep")           # deleteFlag 0 now and later: skipped on rerun
    grows = build_tree(data / "grows")         # a file is added after zipping, then deleteFlag 1
    crashed = build_tree(data / "crashed")     # deletion "interrupted" half way
    gone = build_tree(data / "gone")           # deleteFlag 1 at once: folder disappears
    gone_before = contents(gone)
    book = workbook(tmp_path / "wb.xlsx", [[str(keep), 0], [str(grows), 0], [str(crashed), 0],
                                           ["data/gone", 1]])
    first = zip_dir(book, logs_root, "--useSevenZip", "False")
    assert first.returncode == 0, first.stdout
    assert not gone.exists()
    assert contents(extract(zipping.archive_path(gone), tmp_path / "out") / "gone") == gone_before
    assert "original files deleted" in row_line(last_log(logs_root), 5)
    keep_mtime = zipping.archive_path(keep).stat().st_mtime_ns

    (grows / "sub" / "added later.txt").write_bytes(b"not in the archive")
    # What a crash while deleting leaves: some originals gone, the rest still there. One left
    # file is altered (same size): it no longer matches its member and must survive.
    (crashed / "frame_0001.tif").unlink()
    shutil.rmtree(crashed / "Ünïcödé")
    altered = crashed / "sub" / "deeper" / "notes.txt"
    altered.write_bytes(altered.read_bytes().replace(b"compressible", b"COMPRESSIBLE", 1))
    book = workbook(tmp_path / "wb.xlsx", [[str(keep), 0], [str(grows), 1], [str(crashed), 1],
                                           ["data/gone", 1]])
    second = zip_dir(book, logs_root, "--useSevenZip", "False")

    assert second.returncode == 0, second.stdout
    log = last_log(logs_root)
    assert "skipped: already zipped and verified" in row_line(log, 2)
    assert zipping.archive_path(keep).stat().st_mtime_ns == keep_mtime
    assert contents(keep)  # untouched
    assert [p.name for p in grows.rglob("*") if p.is_file()] == ["added later.txt"]
    assert "1 files that are not in the archive" in row_line(log, 3)
    assert "already deleted before" in row_line(log, 4)
    assert [p for p in crashed.rglob("*") if not p.is_dir()] == [altered]
    assert "differs from its copy in the archive" in log
    assert "already done" in row_line(log, 5)


def test_leftover_temporary_file_is_removed_and_the_row_redone(tmp_path, logs_root):
    folder = build_tree(tmp_path / "001")
    leftover = zipping.partial_path(folder)
    leftover.write_bytes(b"half an archive from a crash")
    result = zip_dir(workbook(tmp_path / "wb.xlsx", [[str(folder), 0]]), logs_root, "--useSevenZip", "False")
    assert result.returncode == 0, result.stdout
    assert not leftover.exists()
    assert "left by an interrupted run" in last_log(logs_root)
    assert zipping.read_archive_mark(zipping.archive_path(folder)) is not None


# --------------------------------------------------------------------------- kill -9


def _writer_alive(path: Path) -> bool:
    """Whether any process still has `path` open (Linux /proc)."""
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    if os.readlink(fd) == str(path):
                        return True
                except OSError:
                    continue
        except OSError:
            continue
    return False


def start_slow_zip(book: Path, logs_root: Path, engine_flags: list[str]) -> subprocess.Popen:
    """2_zipDir.py at the slowest level, in the background, to be killed part-way."""
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--excelName", str(book), "--logs", str(logs_root),
         "--compressionLevel", "9", *engine_flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "ARCHIVE_DROPBOX_NO_PAUSE": "1"})


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("engine", ["7-Zip", "python"])
def test_kill_9_while_zipping_then_rerun(tmp_path, logs_root, engine):
    if engine == "7-Zip" and SEVEN_ZIP is None:
        pytest.skip("7-Zip is not installed")
    folder = make_tree(tmp_path / "001", {f"frame_{i:04d}.tif": 500_000 for i in range(24)})
    before = contents(folder)
    book = workbook(tmp_path / "wb.xlsx", [[str(folder), 1]])
    engine_flags = (["--useSevenZip", "False"] if engine == "python"
                    else ["--zipEngine", "7zip", "--sevenZipPath", str(SEVEN_ZIP)])
    temporary = zipping.partial_path(folder)
    process = start_slow_zip(book, logs_root, engine_flags)
    try:
        seen = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            size = temporary.stat().st_size if temporary.exists() else 0
            if seen and size > seen:
                break  # it exists and is growing: we are in the middle of zipping
            seen = size or seen
            time.sleep(0.01)
        assert process.poll() is None, "the zip finished before it could be interrupted"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    for _ in range(500):  # the kernel ends 7-Zip with its parent
        if not _writer_alive(temporary):
            break
        time.sleep(0.01)
    assert not _writer_alive(temporary)
    assert temporary.exists() and not zipping.archive_path(folder).exists()
    assert contents(folder) == before  # nothing deleted

    rerun = zip_dir(book, logs_root, "--compressionLevel", "0", *engine_flags)
    assert rerun.returncode == 0, rerun.stdout
    assert "left by an interrupted run" in last_log(logs_root)
    assert not temporary.exists() and not folder.exists()
    assert contents(extract(zipping.archive_path(folder), tmp_path / "out") / "001") == before
    third = zip_dir(book, logs_root, *engine_flags)
    assert third.returncode == 0 and "already done" in last_log(logs_root)


# --------------------------------------------------------------------------- full disk


@pytest.fixture
def tiny_disk(tmp_path):
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True)


@pytest.mark.parametrize("engine", ["7-Zip", "python"])
def test_full_disk_leaves_originals_and_no_archive(tmp_path, logs_root, tiny_disk, engine):
    if engine == "7-Zip" and SEVEN_ZIP is None:
        pytest.skip("7-Zip is not installed")
    folder = make_tree(tiny_disk / "001", {"a.tif": 350_000, "b.tif": 350_000})
    before = contents(folder)
    flags = ["--useSevenZip", "False"] if engine == "python" else ["--zipEngine", "7zip", "--sevenZipPath", str(SEVEN_ZIP)]
    result = zip_dir(workbook(tmp_path / "wb.xlsx", [[str(folder), 1]]), logs_root, *flags)
    assert result.returncode == 1, result.stdout
    assert "is full" in row_line(last_log(logs_root), 2)
    assert contents(folder) == before
    assert_no_leftovers(folder)


class _DiskFillsUp:
    """A file object that accepts `room` bytes, then fails as a full disk does."""

    def __init__(self, real, room: int):
        self.real, self.room = real, room

    def write(self, data):
        if self.room < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


def test_disk_full_during_python_zip_in_process(tmp_path, logs_root, monkeypatch):
    folder = make_tree(tmp_path / "001", {"a.tif": 300_000, "b.tif": 300_000})
    other = make_tree(tmp_path / "002", {"c.tif": 1000})
    before = contents(folder)
    real_open = zipping._open_output
    monkeypatch.setattr(zipping, "_open_output",
                        lambda path: _DiskFillsUp(real_open(path), 400_000 if path == zipping.partial_path(folder) else 10**9))
    book = workbook(tmp_path / "wb.xlsx", [[str(folder), 1], [str(other), 0]])
    code = run_in_process("--excelName", str(book), "--logs", str(logs_root), "--useSevenZip", "False")
    assert code == 1
    assert "is full" in row_line(last_log(logs_root), 2)
    assert "OK: zipped and verified" in row_line(last_log(logs_root), 3)  # the next row went on
    assert contents(folder) == before
    assert_no_leftovers(folder)


def test_file_changed_while_zipping_deletes_nothing(tmp_path):
    folder = make_tree(tmp_path / "001", {"a.tif": 5000, "b.tif": 5000})

    class TouchingZip(zipping.PythonZip):
        def build(self, snapshot, temporary, progress):
            super().build(snapshot, temporary, progress)
            (folder / "b.tif").write_bytes(os.urandom(6000))  # the microscope wrote again

    outcome = zipping.zip_folder(folder, engine=TouchingZip(1), delete_originals=True,
                                 log=logging.getLogger("test"))
    assert not outcome.ok and "changed while they were being zipped" in outcome.result
    assert (folder / "a.tif").exists() and (folder / "b.tif").stat().st_size == 6000
    assert_no_leftovers(folder)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are a POSIX thing")
@pytest.mark.parametrize("engine", ["7-Zip", "python"])
def test_pipes_are_left_alone_instead_of_blocking_the_zip(tmp_path, engine, caplog):
    if engine == "7-Zip" and SEVEN_ZIP is None:
        pytest.skip("7-Zip is not installed")
    folder = make_tree(tmp_path / "001", {"a.tif": 1000, "sub/b.tif": 1000})
    os.mkfifo(folder / "sub" / "camera.pipe")  # reading it would wait forever
    chosen = zipping.PythonZip(1) if engine == "python" else zipping.SevenZip(SEVEN_ZIP, 1, 2)
    result = []
    worker = threading.Thread(target=lambda: result.append(zipping.zip_folder(
        folder, engine=chosen, delete_originals=True, log=logging.getLogger("test"))), daemon=True)
    worker.start()
    worker.join(120)
    assert result, "zipping blocked on a named pipe"
    assert result[0].ok, result[0].result
    assert members(zipping.archive_path(folder)) == ["001/a.tif", "001/sub/b.tif"]
    assert [p.name for p in folder.rglob("*") if not p.is_dir()] == ["camera.pipe"]
    assert "not archived and stay in place" in caplog.text


# --------------------------------------------------------------------------- 7-Zip missing or failing


def test_without_seven_zip_python_zip_is_used_and_a_foreign_zip_is_never_overwritten(tmp_path, logs_root):
    foreign_folder = build_tree(tmp_path / "data" / "001")
    foreign = zipping.archive_path(foreign_folder)
    with zipfile.ZipFile(foreign, "w") as book:
        book.writestr("somebody else's.txt", "keep me")
    foreign_bytes = foreign.read_bytes()
    folder = build_tree(tmp_path / "data" / "002")
    foreign_before = contents(foreign_folder)
    empty_path = tmp_path / "empty_path"
    empty_path.mkdir()
    book = workbook(tmp_path / "wb.xlsx", [[str(foreign_folder), 1], [str(folder), 0]])
    result = zip_dir(book, logs_root, "--zipEngine", "7zip", env={"PATH": str(empty_path)})
    assert result.returncode == 1, result.stdout
    log = last_log(logs_root)
    assert "7-Zip was not found" in log
    assert "was not made (or not finished) by this tool" in row_line(log, 2)
    assert foreign.read_bytes() == foreign_bytes
    assert contents(foreign_folder) == foreign_before  # deleteFlag 1, but nothing deleted
    assert "OK: zipped and verified" in row_line(log, 3)
    assert zipping.read_archive_mark(zipping.archive_path(folder)) is not None


def test_failing_seven_zip_fails_the_rows_with_its_message(tmp_path, logs_root):
    fake = tmp_path / "fake7z"
    fake.write_text("#!/bin/sh\necho 'fake 7-Zip: cannot open the volume' >&2\nexit 2\n")
    fake.chmod(0o755)
    first = build_tree(tmp_path / "data" / "001")
    second = build_tree(tmp_path / "data" / "002")
    before = {first: contents(first), second: contents(second)}
    book = workbook(tmp_path / "wb.xlsx", [[str(first), 1], [str(second), 1]])
    result = zip_dir(book, logs_root, "--zipEngine", "7zip", "--sevenZipPath", str(fake))
    assert result.returncode == 1
    log = last_log(logs_root)
    for row in (2, 3):  # the first failure did not stop the second row
        assert "7-Zip stopped with exit status 2" in row_line(log, row)
        assert "fake 7-Zip: cannot open the volume" in row_line(log, row)
    assert contents(first) == before[first] and contents(second) == before[second]
    assert_no_leftovers(first)
    assert_no_leftovers(second)


# --------------------------------------------------------------------------- bad input


def test_bad_rows_are_all_listed_and_nothing_changes(tmp_path, logs_root):
    outer = build_tree(tmp_path / "data" / "outer")
    (tmp_path / "a file.txt").write_text("x")
    book = workbook(tmp_path / "wb.xlsx", [
        [str(tmp_path / "missing"), 0],
        [str(outer), 1],
        [str(outer / "sub"), 0],  # nested inside row 3
        [str(outer), 0],  # listed twice
    ])
    before = contents(tmp_path / "data")
    result = zip_dir(book, logs_root)
    assert result.returncode == 2
    message = result.stdout + result.stderr
    assert "row 2" in message and "does not exist" in message
    assert "row 4" in message and "inside the folder of row 3" in message
    assert "row 5" in message and "already listed in row 3" in message
    assert "nothing was changed" in message
    assert contents(tmp_path / "data") == before
    assert not list(tmp_path.rglob("*.zip")) and not list(tmp_path.rglob(".~*"))


@pytest.mark.parametrize("case, expected", [
    ("missing workbook", "the workbook does not exist"),
    ("missing tab", "there is no tab named 'zipDir'"),
    ("wrong columns", "column 'deleteFlag' is missing"),
    ("blank sheet", "the tab is empty"),
    ("a file, not a folder", "is a file"),
    ("bad flag", "deleteFlag is 2"),
])
def test_bad_workbooks_stop_with_a_clear_message(tmp_path, logs_root, capsys, case, expected):
    folder = build_tree(tmp_path / "001")
    (tmp_path / "plain.txt").write_text("x")
    book = tmp_path / "wb.xlsx"
    if case == "missing tab":
        write_xlsx(book, {"listDirToZip": [["inputDir"], [str(folder)]]})
    elif case == "wrong columns":
        write_xlsx(book, {"zipDir": [["inputDir", "delete"], [str(folder), 1]]})
    elif case == "blank sheet":
        write_xlsx(book, {"zipDir": []})
    elif case == "a file, not a folder":
        workbook(book, [[str(tmp_path / "plain.txt"), 0]])
    elif case == "bad flag":
        workbook(book, [[str(folder), 2]])
    code = run_in_process("--excelName", str(book), "--logs", str(logs_root))
    assert code == 2
    assert expected in capsys.readouterr().out
    assert not zipping.archive_path(folder).exists()


def test_bad_setting_names_the_setting(tmp_path, logs_root, capsys):
    book = workbook(tmp_path / "wb.xlsx", [[str(build_tree(tmp_path / "001")), 0]])
    code = run_in_process("--excelName", str(book), "--logs", str(logs_root), "--compressionLevel", "12",
                          "--sevenZipPath", str(tmp_path / "no such 7z.exe"))
    assert code == 2
    err = capsys.readouterr().err
    assert "compressionLevel" in err and "at most 9" in err and "sevenZipPath" in err


def test_dry_run_changes_nothing(tmp_path, logs_root, capsys):
    folder = build_tree(tmp_path / "001")
    book = workbook(tmp_path / "wb.xlsx", [[str(folder), 1]])
    assert run_in_process("--excelName", str(book), "--logs", str(logs_root), "--dry-run") == 0
    assert "would zip" in capsys.readouterr().out
    assert_no_leftovers(folder)
    assert (folder / "frame_0001.tif").exists()


# --------------------------------------------------------------------------- names of every kind

_NAME = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"),
                min_size=1, max_size=24).filter(lambda n: n not in (".", "..") and len(n.encode()) < 200)


@hypothesis_settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.dictionaries(st.lists(_NAME, min_size=1, max_size=3).map(tuple),
                            st.binary(max_size=300), min_size=1, max_size=6))
def test_any_names_round_trip_identically_through_both_engines(tmp_path_factory, tree):
    base = tmp_path_factory.mktemp("names")
    engines = [zipping.PythonZip(1)] + ([zipping.SevenZip(SEVEN_ZIP, 1, 2)] if SEVEN_ZIP else [])
    listings = []
    for index, engine in enumerate(engines):
        folder = base / f"e{index}" / "001"
        folder.mkdir(parents=True)
        written = {}
        for parts, data in tree.items():
            path = folder.joinpath(*parts)
            if any(p.exists() and not p.is_dir() for p in path.parents) or path.is_dir():
                continue  # a name used both as a file and as a folder
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written["/".join(parts)] = data
        outcome = zipping.zip_folder(folder, engine=engine, delete_originals=True,
                                     log=logging.getLogger("test"))
        assert outcome.ok, outcome.result
        assert not folder.exists()
        archive = zipping.archive_path(folder)
        with zipfile.ZipFile(archive) as book:
            assert {i.filename[len("001/"):]: book.read(i) for i in book.infolist() if not i.is_dir()} == written
        listings.append(members(archive))
    assert all(listing == listings[0] for listing in listings)


# --------------------------------------------------------------------------- the archive test


LIBRARIES = [pytest.param(zlib, id="zlib")] + (
    [pytest.param(zipping._isal_zlib, id="isal")] if zipping._isal_zlib is not None else [])
COMPRESSIBLE = b"".join(b"%06d,frame_%05d.tif,OK\n" % (i, i % 977) for i in range(20_000))


def sample_archive(tmp_path: Path, made_by: str) -> Path:
    """An archive with deflated members (text) and, from zipfile, a stored one."""
    folder = make_tree(tmp_path / "001", {"a.csv": COMPRESSIBLE, "sub/b.csv": COMPRESSIBLE[::-1],
                                          "c.bin": 50_000})
    archive = tmp_path / "001.zip"
    if made_by == "7-Zip":
        zipping.SevenZip(SEVEN_ZIP, 1, 2).build(zipping.scan_folder(folder), archive, lambda done: None)
    else:
        with zipfile.ZipFile(archive, "w") as book:
            for name in ("a.csv", "sub/b.csv"):
                book.write(folder / name, f"001/{name}", compress_type=zipfile.ZIP_DEFLATED)
            book.write(folder / "c.bin", "001/c.bin", compress_type=zipfile.ZIP_STORED)
    return archive


def data_offset(data: bytes, info: zipfile.ZipInfo) -> int:
    name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
    return info.header_offset + 30 + name_length + extra_length


def central_record(data: bytes, name: str) -> int:
    """Where the central directory record of `name` starts."""
    with zipfile.ZipFile(io.BytesIO(data)) as book:
        position, names = book.start_dir, [i.filename for i in book.infolist()]
    for candidate in names:
        assert data[position:position + 4] == b"PK\x01\x02"
        if candidate == name:
            return position
        lengths = struct.unpack_from("<HHH", data, position + 28)
        position += 46 + sum(lengths)
    raise KeyError(name)


def damage(data: bytes, how: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as book:
        infos = {i.filename: i for i in book.infolist()}
    deflated = infos["001/a.csv"]
    assert deflated.compress_type == zipfile.ZIP_DEFLATED
    damaged = bytearray(data)
    if how == "byte flipped in deflated data":
        damaged[data_offset(data, deflated) + deflated.compress_size // 2] ^= 0xFF
    elif how == "byte flipped in stored data":
        stored = infos["001/c.bin"]
        assert stored.compress_type == zipfile.ZIP_STORED
        damaged[data_offset(data, stored) + stored.compress_size // 2] ^= 0xFF
    elif how == "archive truncated":
        del damaged[len(data) * 2 // 3:]
    elif how == "wrong CRC in the central directory":
        record = central_record(data, deflated.filename)
        struct.pack_into("<L", damaged, record + 16, deflated.CRC ^ 0x1)
    elif how == "wrong size in the central directory":
        record = central_record(data, deflated.filename)
        struct.pack_into("<L", damaged, record + 24, deflated.file_size - 1)
    elif how == "compressed size cut in the central directory":
        record = central_record(data, deflated.filename)
        struct.pack_into("<L", damaged, record + 20, deflated.compress_size - 100)
    elif how == "compressed size runs into the next member":
        record = central_record(data, deflated.filename)
        struct.pack_into("<L", damaged, record + 20, deflated.compress_size + 100)
    elif how == "local name differs":
        damaged[deflated.header_offset + 30 + 4] ^= 0x01  # '001/a.csv' -> '001/`.csv'
    else:
        raise ValueError(how)
    assert bytes(damaged) != data
    return bytes(damaged)


DAMAGES = ["byte flipped in deflated data", "archive truncated", "wrong CRC in the central directory",
           "wrong size in the central directory", "compressed size cut in the central directory",
           "compressed size runs into the next member", "local name differs"]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("how", DAMAGES + ["byte flipped in stored data"])
@pytest.mark.parametrize("library", LIBRARIES)
def test_the_archive_test_refuses_damaged_archives(tmp_path, library, how, threads):
    archive = sample_archive(tmp_path, "zipfile")
    members = zipping.verify_archive(archive, threads=threads, library=library)  # intact: passes
    assert sorted(m.filename for m in members) == ["001/a.csv", "001/c.bin", "001/sub/b.csv"]
    archive.write_bytes(damage(archive.read_bytes(), how))
    with pytest.raises(zipping.FileProblem, match="the archive failed its test"):
        zipping.verify_archive(archive, threads=threads, library=library)


@needs_seven_zip
@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("library", LIBRARIES)
def test_the_archive_test_reads_seven_zip_archives_and_refuses_them_damaged(tmp_path, library, how):
    archive = sample_archive(tmp_path, "7-Zip")
    zipping.verify_archive(archive, threads=2, library=library)
    archive.write_bytes(damage(archive.read_bytes(), how))
    with pytest.raises(zipping.FileProblem, match="the archive failed its test"):
        zipping.verify_archive(archive, threads=2, library=library)
    if how != "local name differs":  # `7z t` does not compare the two copies of a name
        assert seven_zip_test(archive).returncode != 0  # 7-Zip agrees: it is damaged


def test_a_flipped_byte_is_reported_as_a_bad_crc(tmp_path):
    folder = make_tree(tmp_path / "001", {f"f{i:02d}.bin": 20_000 for i in range(12)})
    archive = tmp_path / "001.zip"
    zipping.PythonZip(0).build(zipping.scan_folder(folder), archive, lambda done: None)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(zipping.FileProblem, match="CRC"):
        zipping.verify_archive(archive, threads=2)


def test_the_archive_test_stops_when_asked(tmp_path):
    archive = sample_archive(tmp_path, "zipfile")
    stop = threading.Event()
    stop.set()
    with pytest.raises(zipping.TestStopped):
        zipping.verify_archive(archive, stop=stop)


# --------------------------------------------------------------------------- test while zipping the next


def test_originals_wait_for_their_own_test_while_the_next_folder_is_zipped(tmp_path, monkeypatch):
    first = build_tree(tmp_path / "001")
    second = build_tree(tmp_path / "002")
    before = contents(first)
    release = threading.Event()
    real_verify = zipping.verify_archive

    def slow_verify(archive, **options):
        if archive == zipping.partial_path(first):
            assert release.wait(60)
        return real_verify(archive, **options)

    monkeypatch.setattr(zipping, "verify_archive", slow_verify)
    log = logging.getLogger("test")
    job = zipping.start_row(first, engine=zipping.PythonZip(1), delete_originals=True, log=log)
    job.start_test()
    # While row 001 is in its test, 002 is zipped; 001 is neither renamed nor deleted.
    other = zipping.zip_folder(second, engine=zipping.PythonZip(1), delete_originals=True, log=log)
    assert other.ok, other.result
    assert zipping.partial_path(first).exists() and not zipping.archive_path(first).exists()
    assert contents(first) == before
    release.set()
    outcome = job.wait()
    assert outcome.ok and "original files deleted" in outcome.result, outcome.result
    assert not first.exists()
    assert contents(extract(zipping.archive_path(first), tmp_path / "out") / "001") == before


def test_a_failed_test_deletes_nothing_and_the_next_rows_go_on(tmp_path, logs_root, monkeypatch):
    folders = [build_tree(tmp_path / name) for name in ("001", "002", "003")]
    before = [contents(folder) for folder in folders]
    real_build = zipping.PythonZip.build

    def build_damaged_002(self, snapshot, temporary, progress):
        real_build(self, snapshot, temporary, progress)
        if snapshot.root.name == "002":
            temporary.write_bytes(damage_first_member(temporary.read_bytes()))

    monkeypatch.setattr(zipping.PythonZip, "build", build_damaged_002)
    book = workbook(tmp_path / "wb.xlsx", [[str(f), 1] for f in folders])
    code = run_in_process("--excelName", str(book), "--logs", str(logs_root), "--useSevenZip", "False")
    assert code == 1
    log = last_log(logs_root)
    assert "failed its test" in row_line(log, 3) and "FAILED" in row_line(log, 3)
    assert contents(folders[1]) == before[1]
    assert_no_leftovers(folders[1])
    assert not folders[0].exists() and not folders[2].exists()
    rows = [line for line in log.splitlines() if "] " in line and " | " in line and "[row " in line]
    assert [line.split("[row ")[1][0] for line in rows] == ["2", "3", "4"]  # lines in row order


def damage_first_member(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as book:
        info = max(book.infolist(), key=lambda i: i.compress_size)
    damaged = bytearray(data)
    damaged[data_offset(data, info) + info.compress_size // 2] ^= 0xFF
    return bytes(damaged)


def test_little_free_space_finishes_the_previous_row_before_zipping_the_next(tmp_path, logs_root,
                                                                              monkeypatch):
    first = build_tree(tmp_path / "001")
    second = build_tree(tmp_path / "002")
    seen_when_zipping_002 = []
    real_build = zipping.PythonZip.build

    def build(self, snapshot, temporary, progress):
        if snapshot.root.name == "002":
            seen_when_zipping_002.append(first.exists())
        real_build(self, snapshot, temporary, progress)

    Usage = type(shutil.disk_usage(tmp_path))
    monkeypatch.setattr(zipping.PythonZip, "build", build)
    monkeypatch.setattr(zipping.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 10, 10))
    book = workbook(tmp_path / "wb.xlsx", [[str(first), 1], [str(second), 1]])
    code = run_in_process("--excelName", str(book), "--logs", str(logs_root), "--useSevenZip", "False")
    assert code == 0
    assert seen_when_zipping_002 == [False]  # 001 was tested and its originals deleted first
    assert "first finishing the previous row" in last_log(logs_root)


def assert_stopped_and_untouched(code: int, logs_root: Path, before: dict) -> None:
    """Ctrl-C while row 1 was in its test: row 2 says so, every folder is as it was, no leftovers."""
    assert code == errors.EXIT_INTERRUPTED
    assert "stopped before its archive was tested" in row_line(last_log(logs_root), 2)
    for folder, original in before.items():
        assert contents(folder) == original
        assert_no_leftovers(folder)


def test_ctrl_c_while_the_previous_row_is_in_its_test_loses_nothing(tmp_path, logs_root, monkeypatch):
    first = build_tree(tmp_path / "001")
    second = build_tree(tmp_path / "002")
    before = {first: contents(first), second: contents(second)}
    in_test = threading.Event()

    def test_until_stopped(archive, *, threads=1, library=None, stop=None):
        in_test.set()
        while not stop.wait(0.01):
            pass
        raise zipping.TestStopped()

    real_build = zipping.PythonZip.build

    def build(self, snapshot, temporary, progress):
        real_build(self, snapshot, temporary, progress)
        if snapshot.root.name == "002":
            assert in_test.wait(30)
            raise KeyboardInterrupt  # Ctrl-C while 002 is zipped and 001 is in its test

    with monkeypatch.context() as patch:
        patch.setattr(zipping, "verify_archive", test_until_stopped)
        patch.setattr(zipping.PythonZip, "build", build)
        book = workbook(tmp_path / "wb.xlsx", [[str(first), 1], [str(second), 1]])
        code = run_in_process("--excelName", str(book), "--logs", str(logs_root), "--useSevenZip", "False")
    assert_stopped_and_untouched(code, logs_root, before)
    rerun = run_in_process("--excelName", str(book), "--logs", str(logs_root), "--useSevenZip", "False")
    assert rerun == 0
    assert not first.exists() and not second.exists()
    for folder, original in before.items():
        assert contents(extract(zipping.archive_path(folder), tmp_path / f"out{folder.name}") / folder.name) == original


def test_ctrl_c_while_waiting_for_the_previous_test_leaves_no_archive_behind(tmp_path, logs_root,
                                                                             monkeypatch):
    first = build_tree(tmp_path / "001")
    second = build_tree(tmp_path / "002")
    before = {first: contents(first), second: contents(second)}
    real_wait = zipping.RowJob.wait
    interrupted = []

    def wait(self):
        if not interrupted and self.folder == first:  # 002 is zipped; 001 not yet settled
            interrupted.append(True)
            assert zipping.partial_path(second).exists()
            raise KeyboardInterrupt
        return real_wait(self)

    real_verify = zipping.verify_archive

    def test_until_stopped(archive, *, threads=1, library=None, stop=None):
        while not stop.wait(0.01):
            pass
        return real_verify(archive, threads=threads, library=library, stop=stop)

    with monkeypatch.context() as patch:
        patch.setattr(zipping.RowJob, "wait", wait)
        patch.setattr(zipping, "verify_archive", test_until_stopped)
        book = workbook(tmp_path / "wb.xlsx", [[str(first), 1], [str(second), 1]])
        code = run_in_process("--excelName", str(book), "--logs", str(logs_root), "--useSevenZip", "False")
    assert_stopped_and_untouched(code, logs_root, before)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")
def test_kill_9_while_the_next_folder_is_zipped_then_rerun(tmp_path, logs_root):
    folders = [make_tree(tmp_path / name, {f"frame_{i:04d}.tif": 400_000 for i in range(16)})
               for name in ("001", "002")]
    before = {folder: contents(folder) for folder in folders}
    book = workbook(tmp_path / "wb.xlsx", [[str(folder), 1] for folder in folders])
    engine_flags = (["--useSevenZip", "False"] if SEVEN_ZIP is None
                    else ["--zipEngine", "7zip", "--sevenZipPath", str(SEVEN_ZIP)])
    second_partial = zipping.partial_path(folders[1])
    process = start_slow_zip(book, logs_root, engine_flags)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if second_partial.exists() and second_partial.stat().st_size > 0:
                break  # 002 is being zipped; 001 is in its test, renamed, or deleting
            time.sleep(0.005)
        assert process.poll() is None, "the run finished before it could be interrupted"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    for _ in range(500):
        if not _writer_alive(second_partial):
            break
        time.sleep(0.01)
    assert not zipping.archive_path(folders[1]).exists()
    assert contents(folders[1]) == before[folders[1]]
    if not zipping.archive_path(folders[0]).exists():
        assert contents(folders[0]) == before[folders[0]]  # not yet verified: nothing deleted

    rerun = zip_dir(book, logs_root, "--compressionLevel", "0", *engine_flags)
    assert rerun.returncode == 0, rerun.stdout
    for folder, original in before.items():
        assert not folder.exists() and not zipping.partial_path(folder).exists()
        assert contents(extract(zipping.archive_path(folder), tmp_path / f"out{folder.name}") / folder.name) == original
