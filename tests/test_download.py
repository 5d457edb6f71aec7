"""Downloading through the API (app.py with sheetName = 'dropboxDownload_API'): app.py runs as a
subprocess against the local Dropbox test server, as a lab runs it; the resume logic is also
driven in-process with a fake client whose connections drop at arbitrary bytes."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import namedtuple
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import REPO, log_files, make_tree, run_script, script_env, write_xlsx, client_env
from tests.dropbox_server import DropboxTestServer

from archive_dropbox import download, inventory, transfer
from archive_dropbox.content_hash import bytes_content_hash
from archive_dropbox.dropbox_client import NetworkProblem, RemoteFile

SHEET = "dropboxDownload_API"
HEADER = ["dropboxPath", "localDir", "joinFlag"]
MIB = 1024 * 1024
# requests lets these variables replace the SDK's CA bundle; the build machines set them, so the
# tests keep them at the system bundle and rely on --caBundle to reach the test server.


# -- fixtures and helpers ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with DropboxTestServer(tmp_path_factory.mktemp("dropbox_server")) as running:
        yield running


@pytest.fixture
def dropbox(server):
    """The shared server with every fault off and an empty request log."""
    server.set_faults()
    server.clear_log()
    yield server
    server.set_faults()


def app_args(server: DropboxTestServer, book: Path, logs: Path, sheet: str = SHEET, *extra: str) -> list[str]:
    return ["--excelName", str(book), "--sheetName", sheet, "--logs", str(logs), "--caBundle", server.ca_file,
            "--sleepTime_min", "0.01", "--workers", "3", *extra]


def run_download(server: DropboxTestServer, tmp_path: Path, rows: list[list], *extra: str,
                 name: str = "download.xlsx") -> subprocess.CompletedProcess:
    book = write_xlsx(tmp_path / name, {SHEET: [HEADER, *rows]})
    return run_script("app.py", *app_args(server, book, tmp_path / "logs", SHEET, *extra), env=client_env(server))


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def last_log(tmp_path: Path) -> str:
    return log_files(tmp_path / "logs", "upload")[-1].read_text(encoding="utf-8")


def download_bytes(server: DropboxTestServer) -> list[int]:
    return [call["bytes_out"] for call in server.calls("files/download")]


def put(server: DropboxTestServer, path: str, data: bytes, when: dt.datetime | None = None) -> None:
    server.put_file(path, data, client_modified=when or dt.datetime(2021, 3, 4, 5, 6, 7))


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file's SHA-256 and modification time (to the second), and every folder, by
    relative path. The inventories an upload leaves in Dropbox (and a download brings back) are left out."""
    found: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        if inventory.is_inventory_name(path.name):
            continue
        relative = path.relative_to(root).as_posix()
        if path.is_dir():
            found[relative + "/"] = ("folder",)
        else:
            found[relative] = (hashlib.sha256(path.read_bytes()).hexdigest(), int(path.stat().st_mtime))
    return found


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".~*"))


# -- round trip --------------------------------------------------------------------------------

def _make_original(src: Path) -> None:
    make_tree(src / "tree", {
        "top.txt": b"first line\n" * 50,
        "run 1/Hour_01/frame 0001.tif": 70_000,
        "run 1/Hour_01/frame 0002.tif": 70_000,
        "run 1/données/µscope ünïcode.mrc": 300_000,
        "run 1/deep/a/b/c/leaf.bin": 1234,
        "empty.dat": b"",
        "big.bin": 10 * MIB + 12345,  # above fileSizeLimit_GB below: sent as 3 parts
    })
    (src / "tree" / "empty folder").mkdir()
    # Fractional modification times; Dropbox keeps whole seconds.
    for index, path in enumerate(sorted(p for p in (src / "tree").rglob("*") if p.is_file())):
        moment = 1_600_000_000.75 + index * 3_600
        os.utime(path, (moment, moment))
    # Movie frames zipped into one archive (also split: it is above the limit too). A zip keeps
    # times in 2-second steps, so the frames get even times.
    make_tree(src / "frames", {f"00{i}/frame_{j:04d}.tif": 400_000 for i in range(1, 4) for j in range(5)})
    for index, path in enumerate(sorted(p for p in (src / "frames").rglob("*") if p.is_file())):
        os.utime(path, (1_650_000_000 + 2 * index, 1_650_000_000 + 2 * index))
    (src / "zips").mkdir()
    with zipfile.ZipFile(src / "zips" / "frames.zip", "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for path in sorted((src / "frames").rglob("*")):
            archive.write(path, path.relative_to(src).as_posix())


def test_round_trip_restores_the_tree_byte_for_byte(dropbox, tmp_path):
    src = tmp_path / "src"
    _make_original(src)
    env = client_env(dropbox)
    upload_book = write_xlsx(tmp_path / "upload.xlsx", {"dropboxUpload_API": [
        ["inputFile", "outputDir", "deleteAfterUpload"],
        [str(src / "tree"), "/RoundTrip/tree", 0],
        [str(src / "zips"), "/RoundTrip/zips", 0]]})
    up = run_script("app.py", *app_args(dropbox, upload_book, tmp_path / "logs", "dropboxUpload_API",
                                        "--fileSizeLimit_GB", "0.005", "--chunkSize_MB", "4"), env=env)
    assert up.returncode == 0, output(up)
    stored = dropbox.files()
    assert "/RoundTrip/tree/big.bin_split_0003" in stored and "/RoundTrip/zips/frames.zip_split_0002" in stored
    # Empty folders travel too: the upload creates them in Dropbox, the download locally.
    assert "/RoundTrip/tree/empty folder" in {f.rstrip("/") for f in dropbox.folders()}

    restore = tmp_path / "restore"
    rows = [["/RoundTrip/tree", str(restore), 1],
            ["/roundtrip/ZIPS", str(restore), 0],                  # Dropbox paths ignore case
            ["/RoundTrip/tree/big.bin", str(restore / "single"), 1]]  # the original of a split file
    first = run_download(dropbox, tmp_path, rows)
    assert first.returncode == 0, output(first)
    log = last_log(tmp_path)
    assert "DOWNLOADED\t" in log and "\t->\t" in log and "Summary:" in log
    assert "JOINED\t" in log and "verified against its manifest; parts deleted" in log

    # Folders keep their own name under localDir; the joined file replaced its parts.
    assert snapshot(restore / "tree") == snapshot(src / "tree")
    assert snapshot(restore / "single") == {"big.bin": snapshot(src / "tree")["big.bin"]}
    assert sorted(p.name for p in (restore / "zips").iterdir() if not inventory.is_inventory_name(p.name)) == [
        "frames.zip_split_0001", "frames.zip_split_0002", "frames.zip_split_manifest.json"]
    assert leftovers(restore) == []

    # A rerun of the finished job downloads nothing and re-hashes nothing big.
    dropbox.clear_log()
    again = run_download(dropbox, tmp_path, rows)
    assert again.returncode == 0, output(again)
    # (Only the small manifest is read, to find the parts of the split file named in row 4.)
    assert [c["path"] for c in dropbox.calls("files/download")] == ["/roundtrip/tree/big.bin_split_manifest.json"]
    assert "2 joined earlier" in output(again) and "0 downloaded now" in output(again)

    # joinFiles.py joins the zip's parts (verified by its manifest) and unzips it.
    join_book = write_xlsx(tmp_path / "join.xlsx", {"joinFiles": [
        ["inputFile", "deleteFlag", "unzipFlag"], [str(restore / "zips" / "frames.zip_split_0001"), 1, 1]]})
    joined = run_script("joinFiles.py", "--excelName", str(join_book), "--logs", str(tmp_path / "logs"))
    assert joined.returncode == 0, output(joined)
    assert sorted(p.name for p in (restore / "zips").iterdir() if not inventory.is_inventory_name(p.name)) == ["frames"]
    assert snapshot(restore / "zips" / "frames") == snapshot(src / "frames")


# -- interruptions -----------------------------------------------------------------------------

def _wait_for_partial(folder: Path, at_least: int, process: subprocess.Popen, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for partial in folder.rglob(".~*.partial"):
            if partial.stat().st_size >= at_least:
                return partial
        if process.poll() is not None:
            raise AssertionError(f"app.py ended before the download was under way:\n{process.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError("no partial download appeared")


def test_kill_9_mid_download_then_rerun_continues_from_the_bytes_on_disk(dropbox, tmp_path):
    # The partial file grows by 4 MiB (download.READ_CHUNK) at a time: the first 4 MiB arrive
    # in 0.7 s, then the kill has 1.4 s before the download could end.
    data = os.urandom(12 * MIB + 777)
    put(dropbox, "/Killed/movie.mrc", data)
    put(dropbox, "/Killed/notes.txt", b"notes\n")
    book = write_xlsx(tmp_path / "download.xlsx", {SHEET: [HEADER, ["/Killed", str(tmp_path / "restore"), 0]]})
    dropbox.set_faults(bandwidth_bps=6_000_000)
    process = subprocess.Popen([sys.executable, str(REPO / "app.py"), *app_args(dropbox, book, tmp_path / "logs")],
                               env=script_env(client_env(dropbox)), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, encoding="utf-8")
    try:
        partial = _wait_for_partial(tmp_path / "restore", 1 * MIB, process)
    finally:
        process.kill()  # SIGKILL: no clean-up at all
        process.communicate()
    kept = partial.stat().st_size
    assert 0 < kept < len(data)

    dropbox.set_faults()
    dropbox.clear_log()
    rerun = run_download(dropbox, tmp_path, [["/Killed", str(tmp_path / "restore"), 0]])
    assert rerun.returncode == 0, output(rerun)
    assert "Resuming /Killed/movie.mrc" in output(rerun)
    # Only the missing tail of the movie came over the network again (plus the small file,
    # unless it was finished before the kill).
    movie_calls = [c["bytes_out"] for c in dropbox.calls("files/download") if c["path"].lower().endswith("movie.mrc")]
    assert movie_calls == [len(data) - kept]
    assert (tmp_path / "restore" / "Killed" / "movie.mrc").read_bytes() == data
    assert leftovers(tmp_path / "restore") == []


def test_connection_dropped_mid_file_continues_without_starting_over(dropbox, tmp_path):
    # As above: the first 4 MiB on disk in 0.7 s, then 1.4 s to cut the connection mid-file.
    data = os.urandom(12 * MIB + 3)
    put(dropbox, "/Dropped/stack.tif", data)
    book = write_xlsx(tmp_path / "download.xlsx", {SHEET: [HEADER, ["/Dropped/stack.tif", str(tmp_path / "r"), 0]]})
    dropbox.set_faults(bandwidth_bps=6_000_000)
    process = subprocess.Popen([sys.executable, str(REPO / "app.py"), *app_args(dropbox, book, tmp_path / "logs")],
                               env=script_env(client_env(dropbox)), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, encoding="utf-8")
    try:
        _wait_for_partial(tmp_path / "r", 1 * MIB, process)
        dropbox.restart()  # every open connection is cut mid-transfer
        dropbox.set_faults()
        out, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, out
    assert "continuing from byte" in out
    assert (tmp_path / "r" / "stack.tif").read_bytes() == data
    sent = download_bytes(dropbox)
    assert len(sent) >= 2 and sent[-1] < len(data)
    # What was re-sent is at most what sat in socket buffers when the connection was cut.
    assert sum(sent) < len(data) + 2 * MIB


# -- verification and existing files -----------------------------------------------------------

def test_corrupted_download_is_caught_by_the_content_hash(dropbox, tmp_path):
    good, bad = os.urandom(300_000), os.urandom(5 * MIB)
    put(dropbox, "/Corrupt/good.bin", good)
    put(dropbox, "/Corrupt/bad.bin", bad)
    # The stored bytes rot after Dropbox recorded their content hash.
    blob = dropbox.file_path_on_disk("/Corrupt/bad.bin")
    damaged = bytearray(blob.read_bytes())
    damaged[4 * MIB + 5] ^= 0xFF
    blob.write_bytes(bytes(damaged))

    result = run_download(dropbox, tmp_path, [["/Corrupt", str(tmp_path / "restore"), 0]])
    assert result.returncode == 1, output(result)
    assert "corrupted twice" in output(result) and "bad.bin" in output(result)
    assert "do not match Dropbox's content hash" in output(result)
    bad_calls = [c for c in dropbox.calls("files/download") if c["path"].lower().endswith("bad.bin")]
    assert len(bad_calls) == 2  # downloaded again once, then reported
    assert not (tmp_path / "restore" / "Corrupt" / "bad.bin").exists()
    assert (tmp_path / "restore" / "Corrupt" / "good.bin").read_bytes() == good
    assert leftovers(tmp_path / "restore") == []


def test_existing_local_files_identical_kept_different_never_overwritten(dropbox, tmp_path):
    same, theirs = b"same bytes\n" * 1000, b"dropbox version\n" * 100
    when = dt.datetime(2020, 1, 2, 3, 4, 5)
    put(dropbox, "/Existing/same.txt", same, when)
    put(dropbox, "/Existing/other.txt", theirs, when)
    put(dropbox, "/Existing/new.txt", b"new\n", when)
    local = make_tree(tmp_path / "restore" / "Existing", {"same.txt": same, "other.txt": b"my own edits\n"})

    result = run_download(dropbox, tmp_path, [["/Existing", str(tmp_path / "restore"), 0]])
    assert result.returncode == 1, output(result)
    text = output(result)
    assert "ALREADY HERE" in last_log(tmp_path) and "a different file already exists at" in text
    assert (local / "other.txt").read_bytes() == b"my own edits\n"
    assert (local / "same.txt").read_bytes() == same
    assert int((local / "same.txt").stat().st_mtime) == int(when.replace(tzinfo=dt.timezone.utc).timestamp())
    assert (local / "new.txt").read_bytes() == b"new\n"
    assert [c["path"].lower() for c in dropbox.calls("files/download")] == ["/existing/new.txt"]


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing dropbox paths", "localDir is a file", "localDir inside a file",
                                  "missing tab", "missing column"])
def test_bad_input_is_reported_and_nothing_is_written(dropbox, tmp_path, case):
    put(dropbox, "/BadInput/real.bin", b"real")
    restore = tmp_path / "restore"
    a_file = make_tree(tmp_path, {"occupied": b"x"}) / "occupied"
    if case == "missing dropbox paths":
        tabs = {SHEET: [HEADER, ["/BadInput/real.bin", str(restore / "a"), 0],
                        ["/BadInput/nope", str(restore / "b"), 0], ["/BadInput/gone/x.bin", str(restore / "c"), 1]]}
        expected = [f"tab '{SHEET}', row 3", f"tab '{SHEET}', row 4", "/BadInput/nope does not exist in Dropbox",
                    "/BadInput/gone/x.bin does not exist"]
    elif case == "localDir is a file":
        tabs = {SHEET: [HEADER, ["/BadInput/real.bin", str(a_file), 0]]}
        expected = ["row 2", "localDir", "is a file"]
    elif case == "localDir inside a file":
        tabs = {SHEET: [HEADER, ["/BadInput/real.bin", str(a_file / "restore"), 0]]}
        expected = ["row 2", "cannot be created", f"{a_file} is a file"]
    elif case == "missing tab":
        tabs = {"joinFiles": [["inputFile", "deleteFlag", "unzipFlag"]]}
        expected = [f"no tab named '{SHEET}'"]
    else:
        tabs = {SHEET: [["dropboxPath", "joinFlag"], ["/BadInput/real.bin", 0]]}
        expected = ["column 'localDir' is missing"]
    book = write_xlsx(tmp_path / "bad.xlsx", tabs)
    result = run_script("app.py", *app_args(dropbox, book, tmp_path / "logs"), env=client_env(dropbox))
    assert result.returncode == 2, output(result)
    for text in expected:
        assert text in output(result)
    assert "Traceback" not in output(result)
    assert not restore.exists()
    assert a_file.read_bytes() == b"x"
    assert dropbox.count_calls("files/download") == 0


# -- in-process: resume logic and the disk guard -----------------------------------------------

class FlakyClient:
    """Serves one file from memory like DropboxClient.download_range; the connection drops
    once at each offset in `drops`, after the bytes before it were delivered."""

    def __init__(self, data: bytes, remote: RemoteFile, drops: set[int], chunk: int):
        self.data, self.remote, self.drops, self.chunk = data, remote, set(drops), chunk
        self.served = 0

    def download_range(self, path, start=0, end=None, chunk_size=0):
        def chunks():
            position = start
            while position < len(self.data):
                drop = min((d for d in self.drops if d >= position), default=None)
                stop = min(position + self.chunk, len(self.data))
                if drop is not None and drop < stop:
                    piece = self.data[position:drop]
                    self.served += len(piece)
                    if piece:
                        yield piece
                    self.drops.discard(drop)
                    raise NetworkProblem("connection reset (simulated)")
                self.served += stop - position
                yield self.data[position:stop]
                position = stop

        return self.remote, chunks()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(0, 3 * 65536 + 17), seed=st.integers(0, 2**32), prefix_share=st.floats(0, 1),
       drop_shares=st.lists(st.floats(0, 1), max_size=4), chunk=st.sampled_from([1000, 4096, 65536]),
       damaged_prefix=st.booleans())
def test_resume_after_any_drop_ends_with_the_exact_file(size, seed, prefix_share, drop_shares, chunk,
                                                         damaged_prefix):
    data = random.Random(seed).randbytes(size)
    prefix = int(size * prefix_share)
    remote = RemoteFile("/p/file.bin", "/p/file.bin", size, bytes_content_hash(data),
                        dt.datetime(2022, 2, 2, 2, 2, 2), "rev1")
    client = FlakyClient(data, remote, {int(size * share) for share in drop_shares}, chunk)
    log = logging.getLogger("test_download.resume")
    with tempfile.TemporaryDirectory() as folder:
        row = namedtuple("Row", "row")(2)
        task = download.Task(row, remote, Path(folder) / "file.bin")
        kept = bytearray(data[:prefix])
        if damaged_prefix and kept:
            kept[len(kept) // 2] ^= 0x01
        task.partial.write_bytes(bytes(kept))
        worker = download.Downloader(client, None, download.Options(first_retry_delay=0), log,
                                     transfer.Pauses(log, 0, usage=lambda _: namedtuple("U", "free")(1 << 60)))
        worker._run_task(task)
        assert worker.summary.failures == []
        assert task.target.read_bytes() == data
        assert int(task.target.stat().st_mtime) == download.client_modified_epoch(remote.client_modified)
        assert not task.partial.exists()
        corrupted = damaged_prefix and prefix > 0
        # The bytes already on disk are never fetched again, unless they were damaged.
        assert client.served == (size - prefix) + (size if corrupted else 0)


def test_disk_guard_pauses_until_there_is_room_and_says_so(caplog, tmp_path):
    readings = iter([10, 10, 10, 10, 1 << 40, 1 << 40, 1 << 40])
    usage = lambda _: namedtuple("Usage", "free")(next(readings))  # noqa: E731
    log = logging.getLogger("test_download.disk")
    guard = transfer.Pauses(log, 0.01, usage=usage)
    with caplog.at_level(logging.INFO, logger=log.name):
        guard.wait_for_disk(tmp_path / "not yet created", 5 * MIB, "not enough free space")
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("PAUSED: not enough free space") for m in messages)
    assert any("has room again" in m for m in messages)
    assert guard.paused_seconds > 0
