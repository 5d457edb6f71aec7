"""What a lab user reads on the console of a run of many files: progress and summaries, a
number of lines that does not grow with the number of files, every failure; the per-file result
lines in the log file, one for every file. And Stage 1's estimate, which counts files as well as
bytes."""

from __future__ import annotations

import datetime as dt
import logging
import re
from pathlib import Path

from conftest import REPO, client_env, log_files, run_script, write_xlsx
from tests.dropbox_server import DropboxTestServer

from archive_dropbox import prepare, transfer
from archive_dropbox.logs import close_log, start_log
from archive_dropbox.prepare import Plan, PlannedSource
from archive_dropbox.sheets import SheetRow

MOST_CONSOLE_LINES = 60
UPLOAD_TAB, DOWNLOAD_TAB = "dropboxUpload_API", "dropboxDownload_API"
# A result line in the log file: "<time> INFO    UPLOADED\t<size>\t<s>s\t<source>\t->\t<destination>".
RESULT = re.compile(r" (UPLOADED|ALREADY IN DROPBOX|DOWNLOADED|ALREADY HERE|FAILED)\t.*\t->\t(.+?)(: .*)?$")


def console_lines(result) -> list[str]:
    return (result.stdout + result.stderr).splitlines()


def results(log_text: str) -> dict[str, str]:
    """Destination -> result, from the log file's result lines."""
    found = {}
    for line in log_text.splitlines():
        match = RESULT.search(line)
        if match:
            found[match.group(2)] = match.group(1)
    return found


def upload(tmp_path: Path, server: DropboxTestServer, count: int, *extra_files: str):
    """app.py uploading `count` tiny files in 20 folders (plus `extra_files`) to /Many: the run
    and its log file's text."""
    tree = tmp_path / "data"
    for i in range(count):
        path = tree / f"d{i % 20:02d}" / f"f{i:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"%d" % i)
    for name in extra_files:
        (tree / name).write_bytes(b"extra")
    book = write_xlsx(tmp_path / "inputs.xlsx", {UPLOAD_TAB: [["inputFile", "outputDir", "deleteAfterUpload"],
                                                              [str(tree), "/Many", 0]]})
    result = run_script(REPO / "app.py", "--excelName", str(book), "--sheetName", UPLOAD_TAB,
                        "--logs", str(tmp_path / "logs"), "--caBundle", server.ca_file, "--sleepTime_min", "0.02",
                        env=client_env(server), timeout=600)
    return result, log_files(tmp_path / "logs", "upload")[-1].read_text(encoding="utf-8")


def console_at_two_sizes(tmp_path: Path, run, counts: tuple[int, int], result_word: str, check) -> None:
    """Each count: `run(folder, server, count)` against its own test server; every file in the
    log with `result_word`, `check(count, result, said)` passing (said: the log's results by
    path), no per-file line on the console; the larger run's console no longer than the smaller's."""
    lines = {}
    for count in counts:
        server = DropboxTestServer(tmp_path / f"server{count}")
        try:
            result, log = run(tmp_path / f"run{count}", server, count)
        finally:
            server.stop()
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        said = results(log)
        assert len(said) == count and set(said.values()) == {result_word}, len(said)
        check(count, result, said)
        lines[count] = console_lines(result)
        assert not [line for line in lines[count] if "\t->\t" in line], "a per-file line reached the console"
    small, large = counts
    assert len(lines[large]) <= MOST_CONSOLE_LINES, "\n".join(lines[large])
    # Ten times the files, the same console (give or take a progress line on a slow machine).
    assert len(lines[large]) <= len(lines[small]) + 3, (lines[small], lines[large])


def test_upload_console_stays_short_and_the_log_has_every_file(tmp_path):
    def check(count, result, said):
        assert said[f"/Many/d07/f{count - 13:05d}.txt"] == "UPLOADED"
        assert "Summary:" in result.stdout

    console_at_two_sizes(tmp_path, upload, (200, 2000), "UPLOADED", check)


def test_a_failed_file_still_reaches_the_console(tmp_path):
    server = DropboxTestServer(tmp_path / "server", disallowed_names=("refused.txt",))
    try:
        result, log = upload(tmp_path, server, 5, "refused.txt")
    finally:
        server.stop()
    assert result.returncode == 1, result.stdout[-3000:]
    failed = [line for line in console_lines(result) if line.startswith("FAILED\t")]
    assert len(failed) == 1 and "refused.txt" in failed[0] and "does not accept this name" in failed[0], failed
    said = results(log)
    assert said["/Many/refused.txt"] == "FAILED" and list(said.values()).count("UPLOADED") == 5


def download(tmp_path: Path, server: DropboxTestServer, count: int):
    """app.py downloading `count` tiny files from /Down (put there first): the run and its log's text."""
    when = dt.datetime(2021, 3, 4, 5, 6, 7)
    for i in range(count):
        server.put_file(f"/Down/d{i % 10}/f{i:04d}.txt", b"%d\n" % i, client_modified=when)
    book = write_xlsx(tmp_path / "download.xlsx", {DOWNLOAD_TAB: [["dropboxPath", "localDir", "joinFlag"],
                                                                  ["/Down", str(tmp_path / "restore"), 0]]})
    result = run_script(REPO / "app.py", "--excelName", str(book), "--sheetName", DOWNLOAD_TAB,
                        "--logs", str(tmp_path / "logs"), "--caBundle", server.ca_file, "--sleepTime_min", "0.01",
                        env=client_env(server), timeout=600)
    return result, log_files(tmp_path / "logs", "upload")[-1].read_text(encoding="utf-8")


def test_download_console_stays_short_and_the_log_has_every_file(tmp_path):
    def check(count, result, said):
        assert (tmp_path / f"run{count}" / "restore" / "Down" / "d3" / "f0013.txt").read_bytes() == b"13\n"

    console_at_two_sizes(tmp_path, download, (50, 500), "DOWNLOADED", check)


# -- in this process -------------------------------------------------------------------------

def empty_files_plan(count: int) -> Plan:
    source = PlannedSource(None, Path("empty.dat"), 0, 0, "/Lab/empty.dat", False)
    return Plan(sources=[source] * count)


def test_the_estimate_counts_files_not_only_bytes(tmp_path):
    plan = empty_files_plan(100_000)
    assert prepare.estimated_seconds(plan, "API", 50e6) >= 60
    assert prepare.estimated_seconds(plan, "desktop app", 20e6) >= prepare.estimated_seconds(plan, "API", 50e6)
    # Bytes still count: 1 TB at 50 MB/s is 20,000 s, whatever the files.
    big = Plan(sources=[PlannedSource(None, Path("big.mrc"), 10**12, 0, "/Lab/big.mrc", False)])
    assert 20_000 <= prepare.estimated_seconds(big, "API", 50e6) < 20_001

    log, path = start_log(tmp_path, "estimate", console=False)
    try:
        prepare.log_plan(plan, log, mode="API", bytes_per_second=50e6)
    finally:
        close_log(log)
    [line] = [line for line in path.read_text().splitlines() if "Estimated time" in line]
    assert line.endswith("Estimated time at 50.00 MB/s and 600 files/s: 2 min 46 s."), line


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_stage_1_says_how_far_it_got_once_a_minute(tmp_path):
    tree = tmp_path / "tree"
    for i in range(300):
        (tree / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 3}" / f"f{i:03d}.txt").write_bytes(b"12345")
    row = SheetRow(Path("inputs.xlsx"), UPLOAD_TAB, 7, {"in": tree, "out": "/Lab", "del": 0})
    seconds = iter(range(0, 10**6, 3))  # every look at the clock: 3 s later
    log = logging.getLogger("test_console_output.stage1")
    log.setLevel(logging.INFO)
    log.propagate = False
    lines = Lines()
    log.addHandler(lines)
    try:
        progress = prepare.PlanProgress(log, clock=lambda: next(seconds))
        plan = prepare.build_plan([row], input_column="in", output_column="out", delete_column="del",
                                  destination_of_row=lambda r: "/Lab", part_limit=10**9, log=log, progress=progress)
        progress.close()
    finally:
        log.removeHandler(lines)
    assert len(plan.sources) == 300
    # 300 files, one clock reading each: 900 s, a line every 60 s.
    assert 12 <= len(lines.lines) <= 16, lines.lines
    assert re.fullmatch(r"Stage 1: \d+ files \([\d.]+ K?B\) in 4 folders so far, 0 files/s; sheet row 7 \(1 of 1\): .*tree",
                        lines.lines[-1]), lines.lines[-1]


def test_stage_2_says_files_bytes_and_time_left_and_a_progress_line_every_few_minutes(tmp_path):
    log, path = start_log(tmp_path, "progress", console=False)
    now = [1000.0]
    try:
        progress = transfer.ByteProgress(log, total=5_000_000, done=1_000_000, desc="Uploading", verb="send",
                                         files_total=1000, files_done=200, clock=lambda: now[0])
        assert progress.describe_left() == "800 files and 4.00 MB still to send"  # nothing moved yet: no time
        now[0] += 10
        progress.advance(2_000_000)  # half the bytes in 10 s...
        assert progress.describe_left() == "800 files and 2.00 MB still to send, about 10 s left"
        for _ in range(100):  # ...but an eighth of the files: the files decide
            transfer.log_result(log, "UPLOADED", "1 B", 0.0, "a", "/b")
        assert progress.describe_left() == "700 files and 2.00 MB still to send, about 1 min 10 s left"
        assert "Progress:" not in path.read_text()
        now[0] += transfer.PROGRESS_EVERY
        transfer.log_result(log, "UPLOADED", "1 B", 0.0, "a", "/c")
        progress.close()
        transfer.log_result(log, "UPLOADED", "1 B", 0.0, "a", "/d")  # after close: counted nowhere
        assert progress.files_done == 301
    finally:
        close_log(log)
    [line] = [line for line in path.read_text().splitlines() if "Progress:" in line]
    # 101 files and 2 MB in 310 s; 699 files left at 101 per 310 s.
    assert line.endswith("Progress: 301 of 1,000 files done (0.3 files/s, 6.45 KB/s); 699 files and 2.00 MB still to "
                         "send, about 35 min 45 s left."), line


def test_a_bytes_only_progress_says_bytes_and_time_left(tmp_path):
    log, path = start_log(tmp_path, "bytes", console=False)
    now = [0.0]
    try:
        progress = transfer.ByteProgress(log, total=4_000_000, desc="Fetching", verb="fetch", clock=lambda: now[0])
        transfer.log_result(log, "FETCHED", "1 B", 0.0, "a", "/b")  # a file counted, no file total: bytes decide
        assert progress.describe_left() == "4.00 MB still to fetch"
        now[0] += transfer.PROGRESS_EVERY
        progress.advance(1_000_000)
        progress.close()
    finally:
        close_log(log)
    [line] = [line for line in path.read_text().splitlines() if "Progress:" in line]
    assert line.endswith("Progress: 1.00 MB of 4.00 MB done (3.33 KB/s); 3.00 MB still to fetch, about 15 min 0 s "
                         "left."), line


def test_per_file_lines_stay_off_the_console_but_failures_do_not(tmp_path, capsys):
    log, path = start_log(tmp_path, "console")
    try:
        transfer.log_result(log, "UPLOADED", "1 B", 0.1, "/data/a.txt", "/Lab/a.txt")
        transfer.log_result(log, "FAILED", "1 B", 0.0, "/data/b.txt", "/Lab/b.txt", logging.ERROR)
        log.info("Summary: 2 files")
    finally:
        close_log(log)
    console = capsys.readouterr().out
    assert "a.txt" not in console and "FAILED\t1 B\t0.0s\t/data/b.txt\t->\t/Lab/b.txt" in console
    assert "Summary: 2 files" in console
    text = path.read_text()
    assert "INFO    UPLOADED\t1 B\t0.1s\t/data/a.txt\t->\t/Lab/a.txt" in text and "ERROR   FAILED\t" in text
