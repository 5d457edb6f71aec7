"""Issue 14's long-run items: the screen always says what the run is waiting for (one shared
status, said once per change and then once a minute), Ctrl-C gets through every main-thread
wait on Windows (waits in slices of at most half a second), one unit system on screen (MB =
10^6), and honest per-run numbers after a resume."""

from __future__ import annotations

import ast
import concurrent.futures as futures
import datetime as dt
import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest
from tqdm import tqdm

from conftest import REPO, log_files, make_tree, script_env, write_xlsx, SYSTEM_CA
from tests.dropbox_server import DropboxTestServer, FailRule

from archive_dropbox import api_upload, desktop_arrivals, desktop_copy, download, status, transfer
from archive_dropbox.content_hash import bytes_content_hash
from archive_dropbox.dropbox_client import NetworkProblem, RemoteFile, SpaceUsage
from archive_dropbox.units import human_bytes

MIB = 1024 * 1024
BOUND = 10.0  # seconds: generous limit for anything that should take a moment


class Lines(logging.Handler):
    """Collects what a run logger would show on screen (INFO and above)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def containing(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


@pytest.fixture
def screen(request):
    """A fresh run logger (so a fresh shared status) and the lines it shows."""
    log = logging.getLogger(f"test_long_runs.{request.node.name}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    lines = Lines()
    log.addHandler(lines)
    yield log, lines
    log.removeHandler(lines)


class FakeClock:
    def __init__(self, wall: float):
        self.now, self.wall = 1000.0, wall

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += seconds


def at_today(hour: int, minute: int) -> float:
    return dt.datetime.now().replace(hour=hour, minute=minute, second=0, microsecond=0).timestamp()


# -- item 9: one shared status, said once per change and once a minute -------------------------

def test_an_outage_is_said_once_a_minute_however_many_threads_retry(screen):
    log, lines = screen
    clock = FakeClock(at_today(14, 2))
    shared = status.Status(log, clock=lambda: clock.now, wall=lambda: clock.wall)
    shared.remaining(lambda: "1.20 TB still to send")
    for attempt in range(1, 8):
        for _thread in range(4):
            shared.network_trouble("upload: ConnectionError: connection refused", 30, attempt)
        clock.advance(5)
    said = lines.containing("Dropbox unreachable")
    assert len(said) == 1, lines.lines
    assert said[0].startswith("Dropbox unreachable since 14:02, retrying every 30 s (attempt 2); nothing is lost; "
                              "1.20 TB still to send. Last error: upload: ConnectionError"), said[0]
    clock.advance(30)  # a minute since it was said: the timer repeats it, with the count now
    shared.tick()
    said = lines.containing("Dropbox unreachable")
    assert len(said) == 2 and "(attempt 7)" in said[1] and "since 14:02" in said[1], said
    shared.network_ok()
    assert len(lines.containing("Dropbox answers again")) == 1, lines.lines
    shared.network_ok()
    assert len(lines.containing("Dropbox answers again")) == 1


def test_a_single_dropped_connection_is_not_called_an_outage(screen):
    log, lines = screen
    clock = FakeClock(at_today(9, 0))
    shared = status.Status(log, clock=lambda: clock.now, wall=lambda: clock.wall)
    shared.network_trouble("download: connection reset", 1, 1)
    shared.network_ok()
    assert lines.lines == []


def test_a_pause_is_said_when_it_changes_with_what_is_left(screen):
    log, lines = screen
    clock = FakeClock(at_today(8, 0))
    shared = status.Status(log, clock=lambda: clock.now, wall=lambda: clock.wall)
    shared.remaining(lambda: "3 item(s), 12.00 GB, not yet verified in Dropbox")
    for free in (10, 11, 12):  # only the numbers change: the same pause
        shared.paused(f"PAUSED before batch 1: the disk has {free} MB free")
        clock.advance(1)
    shared.paused("PAUSED before batch 1: Dropbox has 5 MB free")
    shared.resumed("Space is available again: batch 1 continues.")
    assert lines.lines == [
        "PAUSED before batch 1: the disk has 10 MB free; 3 item(s), 12.00 GB, not yet verified in Dropbox",
        "PAUSED before batch 1: Dropbox has 5 MB free; 3 item(s), 12.00 GB, not yet verified in Dropbox",
        "Space is available again: batch 1 continues."]


def test_the_progress_bar_keeps_its_elapsed_time_moving_while_waiting(screen):
    log, _ = screen
    shared = status.Status(log)
    screen_file = io.StringIO()
    bar = tqdm(total=100, file=screen_file, disable=False, mininterval=0, unit="B", unit_scale=True,
               unit_divisor=1000)
    try:
        shared.show(bar)
        shared.network_trouble("connection refused", 30, 3)
        started = bar.start_t
        bar._time = lambda: started + 65  # nothing arrives for 65 s
        shared.tick()
        last_drawn = screen_file.getvalue().split("\r")[-1]
        assert "01:05" in last_drawn and "Dropbox unreachable since" in last_drawn, last_drawn
    finally:
        shared.network_ok()
        shared.hide(bar)
        bar.close()


def test_retrying_uploads_share_one_status_line(screen, monkeypatch):
    """Four workers riding out the same outage: one status line, then one 'answers again'."""
    log, lines = screen
    monkeypatch.setattr(transfer, "nap", lambda seconds, stop=None: None)  # no real waits between retries
    failures_each, workers = 3, 4
    all_failed = threading.Barrier(workers, timeout=BOUND)
    calls = threading.local()

    def flaky() -> str:
        calls.count = getattr(calls, "count", 0) + 1
        if calls.count <= failures_each:
            raise NetworkProblem("upload: ConnectionError: connection refused")
        all_failed.wait()  # every worker has reported all its failures before any succeeds
        return "ok"

    uploader = api_upload.ApiUploader(SimpleNamespace(), None, api_upload.UploadOptions(), log)
    try:
        with futures.ThreadPoolExecutor(workers) as pool:
            answers = list(pool.map(lambda _: uploader.shared.call("upload", flaky), range(workers)))
    finally:
        status.shutdown(uploader._appends)
        status.shutdown(uploader._readahead)
    assert answers == ["ok"] * workers
    assert len(lines.containing("Dropbox unreachable since")) == 1, lines.lines
    assert "nothing is lost" in lines.containing("Dropbox unreachable since")[0]
    assert len(lines.containing("Dropbox answers again")) == 1, lines.lines
    assert not lines.containing("retrying in"), "per-retry lines belong in the log file only"


def test_a_full_dropbox_pause_is_said_once_with_what_is_left(screen):
    log, lines = screen
    free = iter([1_000_000, 1_000_000, 1_000_000, 10**12])
    client = SimpleNamespace(space_usage=lambda: SpaceUsage(used=0, allocated=next(free)))
    status.status_of(log).remaining(lambda: "3.00 MB still to send")
    try:
        transfer.Pauses(log, 0, client=client).wait_for_dropbox_space(3_000_000, "Dropbox is full")
    finally:
        status.status_of(log).remaining(None)
    paused = lines.containing("PAUSED")
    assert paused == ["PAUSED: Dropbox is full: 1.00 MB free in Dropbox, 3.00 MB needed. Free some space or raise "
                      "the quota; checking again every 0 s. Nothing is lost while paused; 3.00 MB still to send"]
    assert lines.containing("room again")


def test_a_worker_paused_for_half_an_hour_lets_a_stopped_run_end(screen):
    log, lines = screen
    stopping = threading.Event()
    client = SimpleNamespace(space_usage=lambda: SpaceUsage(used=0, allocated=0))
    pauser = transfer.Pauses(log, 1800, client=client, stop=stopping.is_set)
    worker = threading.Thread(target=pauser.wait_for_dropbox_space, args=(1, "Dropbox is full"), daemon=True)
    worker.start()
    deadline = time.monotonic() + BOUND
    while not lines.containing("PAUSED") and time.monotonic() < deadline:  # the pause has begun
        time.sleep(0.01)
    assert lines.containing("PAUSED"), lines.lines
    stopping.set()  # Ctrl-C in the main thread
    worker.join(BOUND)
    assert not worker.is_alive()
    assert "checking again every 30 min" in lines.containing("PAUSED")[0]


def test_a_full_local_disk_pause_is_said_once_not_at_every_check(screen, tmp_path):
    log, lines = screen
    readings = iter([10] * 8 + [1 << 40] * 3)
    guard = transfer.Pauses(log, 0.001, usage=lambda _: namedtuple("Usage", "free")(next(readings)))
    guard.wait_for_disk(tmp_path, 5 * MIB, "the local disk is full")
    assert len(lines.containing("PAUSED: the local disk is full")) == 1, lines.lines
    assert len(lines.containing("has room again")) == 1


# -- item 12: main-thread waits in slices, so Ctrl-C gets through on Windows -------------------

def _called_from_thread_start() -> bool:
    """Thread.start waits for the new thread's first breath: immediate, not a wait on work."""
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return False
        if frame.f_code is threading.Thread.start.__code__:
            return True
        frame = frame.f_back
    return False


@pytest.fixture
def windows_waits(monkeypatch):
    """Waits as Ctrl-C sees them on Windows: a main-thread wait without a timeout, or longer
    than status.SLICE, could not be interrupted there, so it fails the test at once.
    `main_waited` is set whenever the main thread waits in slices."""
    main_waited = threading.Event()
    original_wait, original_join = threading.Condition.wait, threading.Thread.join

    def check(timeout) -> None:
        if threading.current_thread() is not threading.main_thread() or _called_from_thread_start():
            return
        if timeout is None or timeout > status.SLICE:
            raise AssertionError(f"the main thread waits with timeout={timeout}: Ctrl-C would not get through "
                                 "on Windows")
        main_waited.set()

    def wait(self, timeout=None):
        check(timeout)
        return original_wait(self, timeout)

    def join(self, timeout=None):
        check(timeout)
        return original_join(self, timeout)

    monkeypatch.setattr(threading.Condition, "wait", wait)
    monkeypatch.setattr(threading.Thread, "join", join)
    monkeypatch.setattr(tqdm, "monitor_interval", 0)
    return main_waited


def test_downloads_wait_in_slices_in_the_main_thread(windows_waits, screen, tmp_path):
    log, _ = screen
    data = os.urandom(100_000)
    remote = RemoteFile("/w/a.bin", "/w/a.bin", len(data), bytes_content_hash(data), dt.datetime(2024, 1, 2), "rev1")

    def download_range(path, start=0, end=None, chunk_size=0):
        assert windows_waits.wait(BOUND), "the main thread never waited"
        return remote, iter([data[start:]])

    client = SimpleNamespace(download_range=download_range)
    worker = download.Downloader(client, None, download.Options(workers=2), log,
                                 transfer.Pauses(log, 0, usage=lambda _: namedtuple("U", "free")(1 << 60)))
    task = download.Task(namedtuple("Row", "row")(2), remote, tmp_path / "a.bin")
    summary = worker.run([task], [], 1)
    assert summary.failures == [] and (tmp_path / "a.bin").read_bytes() == data


def test_api_uploads_wait_in_slices_in_the_main_thread(windows_waits, screen):
    log, _ = screen
    client = SimpleNamespace(list_files=lambda folder: {}, space_usage=lambda: SpaceUsage(0, None))
    uploader = api_upload.ApiUploader(client, None, api_upload.UploadOptions(workers=2, small_file_workers=2), log)
    sent: list[str] = []

    def run_source(items) -> None:
        assert windows_waits.wait(BOUND), "the main thread never waited"
        sent.extend(item.source for item in items)

    uploader._run_source = run_source
    items = [SimpleNamespace(source=f"/data/{name}", destination=f"/x/{name}", remote_key_path=f"/x/{name}",
                             kind="file", state="pending", session_id=None, length=10 * MIB)
             for name in ("a", "b", "c")]
    uploader.run(items, ["/x"])
    assert sorted(sent) == ["/data/a", "/data/b", "/data/c"]


def test_desktop_app_copies_and_lookups_wait_in_slices(windows_waits):
    seen: list[int] = []

    def slow_hasher(block: bytes) -> None:
        assert windows_waits.wait(BOUND), "the main thread never waited"
        seen.append(len(block))

    hashes = desktop_copy._SideBySideHashes([slow_hasher])
    for _ in range(5):  # more blocks than the lane holds: the copy waits for the hasher
        hashes.feed(b"x" * 10)
    hashes.close()
    assert seen == [10] * 5

    windows_waits.clear()

    def metadata(path: str):
        assert windows_waits.wait(BOUND), "the main thread never waited"
        return RemoteFile(path, path.lower(), 1, None, dt.datetime(2024, 1, 2), "rev")

    items = [SimpleNamespace(destination=f"/x/{i}.bin") for i in range(3)]
    found = desktop_arrivals.lookup(SimpleNamespace(metadata=metadata), items)
    assert sorted(found) == ["/x/0.bin", "/x/1.bin", "/x/2.bin"]


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="sends SIGINT to the main thread (POSIX)")
def test_ctrl_c_stops_a_wait_on_a_future_that_never_completes(monkeypatch):
    never = futures.Future()
    entered = threading.Event()
    original = futures.wait

    def noting_wait(*args, **kwargs):
        # Only the main thread's wait counts: a worker thread another test left behind may wait
        # too, and a Ctrl-C sent then would land before status.result is entered.
        if threading.current_thread() is threading.main_thread():
            entered.set()
        return original(*args, **kwargs)

    monkeypatch.setattr(futures, "wait", noting_wait)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises, whatever ran before

    def press_ctrl_c() -> None:
        if entered.wait(BOUND):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        time.sleep(BOUND)  # whatever happens, the wait below ends
        if not never.done():
            never.set_result("not interrupted")

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            status.result(never)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 2 + status.SLICE
    never.set_result(None)


def test_sliced_waits_give_up_at_their_timeout_and_return_what_they_waited_for():
    event = threading.Event()
    started = time.monotonic()
    assert status.wait_event(event, 0.05) is False
    assert time.monotonic() - started < BOUND
    event.set()
    assert status.wait_event(event) is True
    done = futures.Future()
    done.set_result(42)
    assert status.result(done) == 42


# -- item 3: one unit system on screen -----------------------------------------------------------

def test_every_progress_bar_counts_in_decimal_units_like_the_settings():
    """tqdm's unit_divisor=1024 shows '6.05M' for what the logs call '6.34 MB'."""
    binary = []
    for path in sorted((REPO / "archive_dropbox").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "tqdm":
                for keyword in node.keywords:
                    if keyword.arg == "unit_divisor" and getattr(keyword.value, "value", 1000) != 1000:
                        binary.append(f"{path.name}:{node.lineno}")
    assert binary == []
    assert human_bytes(6_340_000) == "6.34 MB"
    assert tqdm.format_sizeof(6_340_000, "B", 1000) == "6.34MB"


# -- item 4: honest numbers after a resume; a manifest's real size -------------------------------

def _upload(tmp_path: Path, server: DropboxTestServer, book: Path, *flags: str) -> subprocess.CompletedProcess:
    env = server.client_env(credentials=True)
    env.update(REQUESTS_CA_BUNDLE=SYSTEM_CA, CURL_CA_BUNDLE=SYSTEM_CA, SSL_CERT_FILE=SYSTEM_CA)
    command = [sys.executable, str(REPO / "app.py"), "--excelName", str(book), "--sheetName", "dropboxUpload_API",
               "--logs", str(tmp_path / "logs"), "--caBundle", server.ca_file, "--sleepTime_min", "0.01", *flags]
    return subprocess.run(command, env=script_env(env), capture_output=True, text=True, encoding="utf-8",
                          timeout=180, stdin=subprocess.DEVNULL)


def _book(tmp_path: Path, source: Path, folder: str) -> Path:
    return write_xlsx(tmp_path / "inputs.xlsx", {"dropboxUpload_API": [["inputFile", "outputDir", "deleteAfterUpload"],
                                                                         [str(source), folder, 0]]})


def _latest_log(tmp_path: Path) -> str:
    return log_files(tmp_path / "logs", "upload")[-1].read_text(encoding="utf-8")


def test_after_a_resume_the_summary_counts_only_what_this_run_sent(tmp_path, server):
    size = 14 * MIB + 5
    tree = make_tree(tmp_path / "data", {"big.raw": size})
    # The second append is refused for good: the file fails with its first two chunks confirmed.
    server.set_faults(fail_nth=[FailRule("files/upload_session/append_v2", 2, status=409,
                                         error={".tag": "too_large"})])
    book = _book(tmp_path, tree / "big.raw", "/R")
    first = _upload(tmp_path, server, book, "--chunkSize_MB", "4")
    assert first.returncode != 0 and "FAILED" in _latest_log(tmp_path), first.stdout + first.stderr
    server.set_faults()
    server.clear_log()
    second = _upload(tmp_path, server, book, "--chunkSize_MB", "4")
    log = _latest_log(tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Resuming /R/big.raw at 8.39 MB" in log, log
    assert server.read_file("/R/big.raw") == (tree / "big.raw").read_bytes()
    reported = re.search(r"Summary: .*; (\S+ \S+) sent in", log).group(1)
    assert reported == human_bytes(size - 8 * MIB), log


def test_a_manifest_is_logged_with_its_size(tmp_path, server):
    tree = make_tree(tmp_path / "data", {"huge.mrc": 9 * MIB})
    book = _book(tmp_path, tree / "huge.mrc", "/M")
    result = _upload(tmp_path, server, book, "--fileSizeLimit_GB", "0.005", "--chunkSize_MB", "4")
    log = _latest_log(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = [line for line in log.splitlines() if "UPLOADED" in line and line.endswith("manifest.json")]
    manifest = next(path for path in server.files() if path.startswith("/M/") and "manifest" in path)
    assert f"\t{human_bytes(len(server.read_file(manifest)))}\t" in line, line
    assert "\t0 B\t" not in line
