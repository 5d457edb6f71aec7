"""app.py through the Dropbox API, run as users run it (a subprocess), against the local
Dropbox test server over real HTTPS: content verified, resumable after kill -9, robust to
faults, pausing on a full account, careful with tokens and deletions."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from archive_dropbox import inventory
from archive_dropbox.content_hash import file_content_hash
from conftest import REPO, make_tree, script_env, write_xlsx, SYSTEM_CA
from tests.dropbox_server import DropboxTestServer, FailRule, FaultConfig

READ_ONLY_ROUTES = ("files/get_metadata", "files/list_folder", "files/list_folder/continue")
MIB = 1024 * 1024
UPLOAD_ROUTES = ("files/upload", "files/upload_session/start", "files/upload_session/append_v2",
                 "files/upload_session/finish", "files/upload_session/append_batch")


def app_env(server: DropboxTestServer, credentials: bool = True, **extra: str) -> dict[str, str]:
    env = server.client_env(credentials=credentials)
    # The machine's CA variables stay as they are: the caBundle setting must win over them.
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        env[name] = SYSTEM_CA
    env.update(extra)
    return env


def app_args(book: Path, logs: Path, server: DropboxTestServer, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "app.py"), "--excelName", str(book), "--sheetName", "dropboxUpload_API",
            "--logs", str(logs), "--caBundle", server.ca_file, "--sleepTime_min", "0.02", *extra]


def run_app(book, logs, server, *extra, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(app_args(book, logs, server, *extra), env=script_env(env or app_env(server)),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def sheet(tmp_path: Path, rows: list[list]) -> Path:
    return write_xlsx(tmp_path / "inputs.xlsx", {"dropboxUpload_API": [["inputFile", "outputDir", "deleteAfterUpload"],
                                                                         *rows]})


def sample_tree(root: Path) -> Path:
    return make_tree(root, {
        "run1/frames/001/frame_0001.tif": 3000,
        "run1/frames/001/frame 0002 ü.tif": 2000,
        "run1/notes/read me.txt": b"hello lab",
        "run1/empty.dat": b"",
        "run1/deep/a/b/c/d.bin": 70_000,
        "run1/big.mrc": 21 * MIB + 12345,
        "run1/Thumbs.db": b"ignored",
        "run1/.DS_Store": b"ignored",
    })


def expected_files(tree: Path, folder: str) -> dict[str, Path]:
    return {f"{folder}/{p.relative_to(tree).as_posix()}": p for p in tree.rglob("*")
            if p.is_file() and p.name not in ("Thumbs.db", ".DS_Store")}


def assert_landed(server: DropboxTestServer, tree: Path, folder: str, split_names=("big.mrc",), part_limit=None):
    stored = server.files()
    for dropbox_path, local in expected_files(tree, folder).items():
        if local.name in split_names:
            manifest_path = dropbox_path + "_split_manifest.json"
            manifest = json.loads(server.read_file(manifest_path))
            data = local.read_bytes()
            assert manifest["size"] == len(data) and manifest["sha256"] == hashlib.sha256(data).hexdigest()
            joined = b"".join(server.read_file(f"{folder}/{part['name']}" if "/" not in dropbox_path[len(folder) + 1:]
                                               else dropbox_path.rsplit("/", 1)[0] + "/" + part["name"])
                              for part in manifest["parts"])
            assert joined == data
            for part in manifest["parts"]:
                assert hashlib.sha256(data[part["offset"]:part["offset"] + part["size"]]).hexdigest() == part["sha256"]
                if part_limit:
                    assert part["size"] <= part_limit
            assert dropbox_path not in stored
            continue
        assert dropbox_path in stored, f"{dropbox_path} missing in Dropbox"
        assert server.content_hash(dropbox_path) == file_content_hash(local)
        modified = server.metadata(dropbox_path)["client_modified"]
        assert modified.replace(tzinfo=None) == datetime.datetime.fromtimestamp(
            int(local.stat().st_mtime), datetime.timezone.utc).replace(tzinfo=None)


def uploaded_bytes(server: DropboxTestServer) -> int:
    return sum(server.bytes_received(route) for route in UPLOAD_ROUTES)


def tree_bytes(tree: Path) -> int:
    return sum(p.stat().st_size for p in expected_files(tree, "").values())


def test_tree_lands_verified_with_parts_manifest_and_logs(tmp_path, server):
    tree = sample_tree(tmp_path / "data")
    (tree / "run1" / "empty folder" / "inner").mkdir(parents=True)
    book = sheet(tmp_path, [[str(tree / "run1"), "/Archive/run1", 0], [str(tree / "run1" / "notes" / "read me.txt"),
                                                                      "/Archive/single", 0]])
    result = run_app(book, tmp_path / "logs", server, "--fileSizeLimit_GB", "0.01", "--chunkSize_MB", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_landed(server, tree / "run1", "/Archive/run1", part_limit=10_000_000)
    assert server.read_file("/Archive/single/read me.txt") == b"hello lab"
    assert "/Archive/run1/empty folder/inner" in {f.rstrip("/") for f in server.folders()}
    assert sorted(p for p in server.files() if "big.mrc" in p) == [
        "/Archive/run1/big.mrc_split_0001", "/Archive/run1/big.mrc_split_0002", "/Archive/run1/big.mrc_split_0003",
        "/Archive/run1/big.mrc_split_manifest.json"]
    upload_log = (tmp_path / "logs" / "upload").glob("*.log")
    text = next(upload_log).read_text()
    assert "UPLOADED" in text and "read me.txt" in text and "Summary:" in text and "0 failed" in text
    assert list((tmp_path / "logs" / "dataPrep").glob("*.log"))
    assert server.refresh_token not in text and server.refresh_token not in result.stdout
    # Small files are committed together, not one commit per file.
    assert server.count_calls("files/upload_session/finish_batch_v2") <= 2

    # A rerun sends nothing and reads the journal only.
    before = len(server.calls())
    again = run_app(book, tmp_path / "logs", server, "--fileSizeLimit_GB", "0.01", "--chunkSize_MB", "4")
    # The folders' files were all verified: left out, and said so (the single file is looked up).
    assert again.returncode == 0 and "Nothing to send: 1 file(s) checked against Dropbox now" in again.stdout
    assert "more are in folders unchanged since every file in them was sent and verified" in again.stdout
    assert not [c for c in server.calls()[before:] if c["route"] in UPLOAD_ROUTES]


def test_existing_identical_files_are_skipped_and_different_ones_reported(tmp_path, server):
    tree = make_tree(tmp_path / "data", {"a/same.txt": b"same", "a/other.txt": b"mine"})
    server.put_file("/Archive/a/same.txt", b"same")
    server.put_file("/Archive/a/other.txt", b"theirs")
    book = sheet(tmp_path, [[str(tree / "a"), "/Archive/a", 1]])
    result = run_app(book, tmp_path / "logs", server)
    assert result.returncode == 1
    log = next((tmp_path / "logs" / "upload").glob("*.log")).read_text()
    assert "ALREADY IN DROPBOX" in log and "same.txt" in log
    assert "a different file already exists at /Archive/a/other.txt" in result.stdout
    assert server.read_file("/Archive/a/other.txt") == b"theirs"  # never overwritten by default
    assert not (tree / "a" / "same.txt").exists()  # identical in Dropbox (hash checked): deleted as asked
    assert (tree / "a" / "other.txt").exists()
    overwrite = run_app(book, tmp_path / "logs", server, "--ifExists", "overwrite")
    assert overwrite.returncode == 0, overwrite.stdout
    assert server.read_file("/Archive/a/other.txt") == b"mine"


def test_delete_after_upload_only_after_verification_and_hash_mismatch_keeps_everything(tmp_path, server):
    tree = make_tree(tmp_path / "data", {"keep/a.bin": 5000, "keep/sub/b.bin": 6 * MIB, "gone/c.bin": 3000})
    book = sheet(tmp_path, [[str(tree / "keep"), "/K", 1]])
    # Dropbox stores the large file with one byte altered after accepting it.
    server.set_faults(FaultConfig(corrupt_stored_paths=frozenset({"/k/sub/b.bin"})))
    result = run_app(book, tmp_path / "logs", server, "--chunkSize_MB", "4")
    assert result.returncode == 1, result.stdout
    assert (tree / "keep" / "sub" / "b.bin").exists(), "an unverified file was deleted"
    assert not (tree / "keep" / "a.bin").exists(), "a verified file was not deleted"
    assert "FAILED" in result.stdout and "content hash of /K/sub/b.bin does not match" in result.stdout
    assert (tree / "gone" / "c.bin").exists()


def test_faults_429_5xx_and_dropped_connections_are_ridden_out(tmp_path, server):
    tree = make_tree(tmp_path / "data", {**{f"many/f{i:03d}.bin": 1000 + i for i in range(60)},
                                         "many/large.bin": 13 * MIB})
    server.set_faults(FaultConfig(seed=7, p_rate_limit=0.10, retry_after_s=0, p_500=0.03, p_503=0.02,
                                  p_drop_mid_body=0.01, p_drop_before_response=0.01))
    book = sheet(tmp_path, [[str(tree / "many"), "/F", 0]])
    result = run_app(book, tmp_path / "logs", server, "--chunkSize_MB", "4")
    assert result.returncode == 0, result.stdout[-3000:]
    assert_landed(server, tree / "many", "/F", split_names=())
    assert len([p for p in server.files() if p.startswith("/F/") and "/_inventory_" not in p]) == 61
    injected = [c for c in server.calls() if c.get("fault")]
    assert len(injected) >= 5


def _wait_held(process: subprocess.Popen, hold, n: int = 1, timeout: float = 120) -> None:
    """Until `n` requests of app.py wait in `hold` (server.hold: on arrival, before the server
    reads their bodies)."""
    deadline = time.monotonic() + timeout  # only reached when app.py is broken
    while not hold.wait_held(n, timeout=0.2):
        if process.poll() is not None:
            raise AssertionError("app.py ended before its requests were held:\n" + process.stdout.read())
        assert time.monotonic() < deadline, "app.py never sent the requests to hold"


def _kill_while_held(process: subprocess.Popen, hold, n: int = 1) -> None:
    """SIGKILL app.py while `n` of its requests wait in `hold`, so the kill point is certain
    whatever the machine's load; then let the server carry them out, answers lost with the process."""
    _wait_held(process, hold, n)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    hold.release()


def _wait_until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _kill_when(process: subprocess.Popen, condition, timeout: float = 60, delay: float = 0.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError("app.py ended before the kill point:\n" + process.stdout.read())
        if condition():
            time.sleep(delay)
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.02)
    process.kill()
    raise AssertionError("kill point never reached")


@pytest.mark.parametrize("kill_point, connections", [("mid_chunk", 1), ("between_chunks", 1), ("between_files", 1),
                                                     ("during_commit", 1), ("mid_chunk", 3), ("between_chunks", 3)])
def test_kill_9_then_rerun_lands_everything_once_resending_at_most_a_chunk_per_file(tmp_path, server, kill_point,
                                                                                    connections):
    """connections=1: sequential sessions; 3: the 17 MiB file goes through a concurrent session
    with 3 appends in flight, each of which counts as a stream in flight."""
    chunk = 4 * MIB
    tree = make_tree(tmp_path / "data", {"k/one.bin": 17 * MIB + 5, "k/two.bin": 9 * MIB,
                                         **{f"k/small/s{i}.txt": 100 + i for i in range(30)}})
    book = sheet(tmp_path, [[str(tree / "k"), "/Kill", 0]])
    workers = 2
    append = "files/upload_session/append_v2"
    hold = None
    if connections == 1:  # sequential sessions: a request held on arrival makes the kill point certain
        if kill_point in ("mid_chunk", "between_chunks"):
            hold = server.hold(append, count=2)  # each file's second chunk (the first opens its session)
        elif kill_point == "between_files":
            hold = server.hold("files/upload_session/finish")  # a file's last request: its commit
        elif kill_point == "during_commit":
            hold = server.hold("files/upload_session/finish_batch_v2")  # the small files' commit comes last
    # A concurrent session's kill points race the upload, slowed down to be caught at them.
    server.set_faults(FaultConfig(bandwidth_bps=None if hold else 6 * MIB))
    env = script_env(app_env(server))
    flags = ["--chunkSize_MB", "4", "--workers", str(workers), "--connectionsPerFile", str(connections)]
    process = subprocess.Popen(app_args(book, tmp_path / "logs", server, *flags),
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL)
    appends = lambda: server.count_calls("files/upload_session/append_v2")  # noqa: E731
    if hold is not None:
        if kill_point in ("mid_chunk", "between_chunks"):
            # Both files' second chunks go on together; then the kill point, each file 8 MiB in:
            # one.bin's third chunk on the wire, or either file's next request (a chunk, or
            # two.bin's finish) after an answered chunk.
            _wait_held(process, hold, 2)
            then = (append,) if kill_point == "mid_chunk" else (append, "files/upload_session/finish")
            hold, second_chunks = server.hold(*then), hold
            second_chunks.release()
        _kill_while_held(process, hold)
        if kill_point == "during_commit":
            # Released, the server carries the commit out (app.py had sent all of it and was
            # waiting for the answer): the files are in Dropbox, and the journal never heard.
            _wait_until(lambda: server.count_calls("files/upload_session/finish_batch_v2") >= 1,
                        "the held batch commit was never carried out")
    elif kill_point == "mid_chunk":  # the next chunks are on the wire at 6 MiB/s
        _kill_when(process, lambda: appends() >= 1, delay=0.3)
    else:  # between_chunks
        _kill_when(process, lambda: appends() >= 2)
    server.set_faults(FaultConfig())
    result = run_app(book, tmp_path / "logs", server, *flags)
    assert result.returncode == 0, result.stdout[-3000:]
    assert_landed(server, tree / "k", "/Kill", split_names=())
    if connections > 1:
        assert "Resuming /Kill/one.bin" in result.stdout or kill_point == "between_files"
    names = [p for p in server.files() if p.startswith("/Kill/") and "/_inventory_" not in p]
    assert len(names) == 32 and not [n for n in names if "(1)" in n]
    total = tree_bytes(tree / "k")
    resent = uploaded_bytes(server) - total
    # Bytes sent more than once: at most one chunk per file in flight when the process died,
    # plus the small files whose closed sessions had not been recorded yet.
    streams = workers - 1 + connections  # the concurrent file uses `connections` streams
    assert resent <= streams * chunk + 30 * 200, f"re-sent {resent} bytes"


def test_quota_full_pauses_and_continues_when_space_is_freed(tmp_path, server):
    tree = make_tree(tmp_path / "data", {"q/a.bin": 2 * MIB, "q/b.bin": 2 * MIB})
    server.set_quota(server.used_bytes + 3 * MIB)
    book = sheet(tmp_path, [[str(tree / "q"), "/Q", 0]])
    # Re-checked every 0.3 s while paused, so the run goes on soon after the space is freed.
    process = subprocess.Popen(app_args(book, tmp_path / "logs", server, "--sleepTime_min", "0.005"),
                               env=script_env(app_env(server)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, stdin=subprocess.DEVNULL)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while not any("PAUSED" in line for line in output) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any("PAUSED" in line for line in output), "".join(output)
    assert not [p for p in server.files() if p.startswith("/Q/")] or len(
        [p for p in server.files() if p.startswith("/Q/")]) < 2
    server.set_quota(10 * 1024 ** 3)
    assert process.wait(timeout=120) == 0, "".join(output)
    assert sorted(p for p in server.files() if p.startswith("/Q/") and "/_inventory_" not in p) == ["/Q/a.bin",
                                                                                                   "/Q/b.bin"]
    assert any("room again" in line for line in output)


def test_expired_token_is_refreshed_and_revoked_one_stops_cleanly(tmp_path, server):
    tree = make_tree(tmp_path / "data", {"t/a.bin": 9 * MIB, "t/b.bin": 1000})
    book = sheet(tmp_path, [[str(tree / "t"), "/T", 1]])
    # The token expires while the first append waits on arrival: mid-upload, whatever the load.
    hold = server.hold("files/upload_session/append_v2")
    process = subprocess.Popen(app_args(book, tmp_path / "logs", server, "--chunkSize_MB", "4"),
                               env=script_env(app_env(server)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, stdin=subprocess.DEVNULL)
    try:
        _wait_held(process, hold)
        server.expire_access_tokens()
    finally:
        hold.release()
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    assert "expired_access_token" in [call["error"] for call in server.calls("files/upload_session/append_v2")]
    assert server.count_calls("oauth2/token") >= 2

    # Revoked: stop at once, say how to log in, delete nothing.
    tree2 = make_tree(tmp_path / "data2", {"r/a.bin": 1000})
    book2 = write_xlsx(tmp_path / "inputs2.xlsx", {"dropboxUpload_API": [["inputFile", "outputDir", "deleteAfterUpload"],
                                                                        [str(tree2 / "r"), "/R", 1]]})
    server.revoke_refresh_token()
    result = run_app(book2, tmp_path / "logs", server)
    assert result.returncode == 3
    assert "python app.py --login" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert (tree2 / "r" / "a.bin").exists()


def test_login_stores_a_private_refresh_token(tmp_path, server):
    token_file = tmp_path / "home" / "token.json"
    process = subprocess.Popen(app_args(sheet(tmp_path, [["x", "/X", 0]]), tmp_path / "logs", server, "--login",
                                        "--appKey", server.app_key, "--tokenFile", str(token_file)),
                               env=script_env(app_env(server, credentials=False)), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = ""
    while "code_challenge" not in url:
        line = process.stdout.readline()
        assert line, "no authorize URL printed"
        url = line.strip() if "code_challenge" in line else url
    from urllib.parse import parse_qs, urlparse
    query = parse_qs(urlparse(url).query)
    code = server.authorize(query["client_id"][0], query["code_challenge"][0])
    output, _ = process.communicate(code + "\n", timeout=60)
    assert process.returncode == 0, output
    assert token_file.exists() and oct(token_file.stat().st_mode & 0o777) == "0o600"
    stored = json.loads(token_file.read_text())
    assert stored["app_key"] == server.app_key and stored["refresh_token"]
    assert stored["refresh_token"] not in output
    # The saved login is used by a normal run.
    tree = make_tree(tmp_path / "data", {"l/a.txt": b"x"})
    book = sheet(tmp_path, [[str(tree / "l"), "/L", 0]])
    result = run_app(book, tmp_path / "logs", server, "--tokenFile", str(token_file),
                     env=app_env(server, credentials=False))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the login saved in" in result.stdout


@pytest.mark.parametrize("case, rows, flags, expected", [
    ("missing path", [["{data}/nope", "/A", 0]], [], "does not exist"),
    ("relative dropbox path", [["{data}/a", "Archive", 0]], [], "starts with '/'"),
    ("bad flag", [["{data}/a", "/A", 2]], [], "write 1 for yes"),
    ("case collision", [["{data}/a", "/A", 0], ["{data}/b", "/A", 0]], [], "ignores upper/lower case"),
    ("chunk too big", [["{data}/a", "/A", 0]], ["--chunkSize_MB", "200"], "'chunkSize_MB' = '200' must be at most 150"),
    ("bad limit", [["{data}/a", "/A", 0]], ["--fileSizeLimit_GB", "-1"], "fileSizeLimit_GB"),
])
def test_bad_input_gets_one_clear_message_and_changes_nothing(tmp_path, server, case, rows, flags, expected):
    data = make_tree(tmp_path / "data", {"a/Data.txt": b"1", "b/DATA.txt": b"2"})
    book = sheet(tmp_path, [[cell.format(data=data) if isinstance(cell, str) else cell for cell in row]
                            for row in rows])
    result = run_app(book, tmp_path / "logs", server, *flags)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert expected in output and "Traceback" not in output
    # Stage 1 may look (get_metadata, list_folder), never change anything.
    assert not [c for c in server.calls() if c["route"].startswith("files/") and c["route"] not in READ_ONLY_ROUTES]


def test_missing_workbook_tab_and_login(tmp_path, server):
    result = run_app(tmp_path / "none.xlsx", tmp_path / "logs", server)
    assert result.returncode == 2 and "does not exist" in result.stdout + result.stderr
    book = write_xlsx(tmp_path / "other.xlsx", {"joinFiles": [["inputFile"]]})
    result = run_app(book, tmp_path / "logs", server)
    assert result.returncode == 2 and "there is no tab named 'dropboxUpload_API'" in result.stdout
    data = make_tree(tmp_path / "data", {"a/x.txt": b"1"})
    result = run_app(sheet(tmp_path, [[str(data / "a"), "/A", 0]]), tmp_path / "logs", server,
                     "--tokenFile", str(tmp_path / "no-token.json"), env=app_env(server, credentials=False))
    assert result.returncode == 3 and "python app.py --login" in result.stdout


def test_second_copy_on_the_same_sheet_is_refused(tmp_path, server):
    # The server holds the first copy's first upload request until released, so the first copy
    # is certainly mid-run, holding the sheet, when the second starts: no race with the machine's load.
    tree = make_tree(tmp_path / "data", {"s/a.bin": 5 * MIB})
    book = sheet(tmp_path, [[str(tree / "s"), "/S", 0]])
    hold = server.hold(*UPLOAD_ROUTES, count=1)  # the second copy's requests pass, should it get that far
    first = subprocess.Popen(app_args(book, tmp_path / "logs", server, "--chunkSize_MB", "4"),
                             env=script_env(app_env(server)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240  # only reached when the first copy is broken
        while not hold.wait_held(timeout=0.5):
            assert first.poll() is None and time.monotonic() < deadline, "the first copy never began uploading"
        second = run_app(book, tmp_path / "logs", server)
        assert second.returncode == 4, second.stdout + second.stderr
        assert "already working on this sheet" in second.stdout + second.stderr
    finally:
        hold.release()
        output = first.communicate(timeout=240)[0]
    assert first.returncode == 0, output
    assert server.content_hash("/S/a.bin") == file_content_hash(tree / "s" / "a.bin")


def test_file_that_vanishes_or_changes_during_upload_is_reported_and_retried(tmp_path, server):
    tree = make_tree(tmp_path / "data", {"v/big.bin": 12 * MIB, "v/ok.txt": b"fine"})
    book = sheet(tmp_path, [[str(tree / "v"), "/V", 1]])
    # The file changes while its first append waits on arrival: mid-upload, whatever the load.
    hold = server.hold("files/upload_session/append_v2")
    process = subprocess.Popen(app_args(book, tmp_path / "logs", server, "--chunkSize_MB", "4", "--workers", "1"),
                               env=script_env(app_env(server)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, stdin=subprocess.DEVNULL)
    try:
        _wait_held(process, hold)
        with open(tree / "v" / "big.bin", "r+b") as handle:
            handle.seek(5)
            handle.write(b"changed")
    finally:
        hold.release()
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 1, output
    assert "changed while it was being uploaded" in output
    assert (tree / "v" / "big.bin").exists()
    assert "/V/big.bin" not in server.files()
    result = run_app(book, tmp_path / "logs", server, "--chunkSize_MB", "4")
    assert result.returncode == 0, result.stdout
    assert not (tree / "v" / "big.bin").exists()


def test_large_file_travels_on_several_connections_at_once(tmp_path, server):
    tree = make_tree(tmp_path / "data", {"c/huge.bin": 40 * MIB + 77})
    server.set_faults(FaultConfig(bandwidth_bps=16 * MIB))  # each append takes at least 0.25 s
    book = sheet(tmp_path, [[str(tree / "c"), "/C", 0]])
    result = run_app(book, tmp_path / "logs", server, "--chunkSize_MB", "4", "--connectionsPerFile", "4")
    assert result.returncode == 0, result.stdout
    assert server.content_hash("/C/huge.bin") == file_content_hash(tree / "c" / "huge.bin")
    appends = server.calls("files/upload_session/append_v2")
    assert len(appends) == 11 and len({a["conn"] for a in appends}) >= 3
    spans = sorted((a["ts"] - a["duration_s"], a["ts"]) for a in appends)
    overlapping = sum(1 for (s1, e1), (s2, e2) in zip(spans, spans[1:]) if s2 < e1)
    assert overlapping >= 3, "appends were not in flight together"


def test_small_files_are_committed_a_thousand_at_a_time_and_failed_entries_reported(tmp_path):
    server = DropboxTestServer(tmp_path / "server", disallowed_names=("refused.txt",))
    try:
        files = {f"s/{i // 100:02d}/f{i:04d}.txt": b"%d" % i for i in range(1200)}
        files["s/refused.txt"] = b"Dropbox says no"
        tree = make_tree(tmp_path / "data", files)
        # Lock contention on the first two batch commits: they are retried, not lost.
        server.set_faults(FaultConfig(fail_nth=[FailRule("files/upload_session/finish_batch_v2", 1, 429,
                                                         error="too_many_write_operations", retry_after=0,
                                                         times=2)]))
        book = sheet(tmp_path, [[str(tree / "s"), "/S", 0]])
        result = run_app(book, tmp_path / "logs", server, env=app_env(server))
        assert result.returncode == 1, result.stdout[-2000:]
        assert "refused.txt" in result.stdout and "does not accept this name" in result.stdout
        stored = [p for p in server.files() if p.startswith("/S/") and "/_inventory_" not in p]
        assert len(stored) == 1200
        commits = server.calls("files/upload_session/finish_batch_v2")
        accepted = [c for c in commits if c["status"] == 200]
        assert len(accepted) == 2 and len(commits) > len(accepted)
        assert len(commits) - len(accepted) == len([c for c in commits if c["status"] == 429])
        assert server.count_calls("files/upload_session/finish") == 0
        assert [c["path"] for c in server.calls("files/upload")] == [  # the row's inventory only
            f"/S/{inventory.row_inventory_name(str(tree / 's'))}"]
    finally:
        server.stop()


def test_thousands_of_small_files_take_one_commit_per_thousand(tmp_path, server):
    # 2000 files: full commits of 1000 (Dropbox's limit) take 2 calls, any smaller ones 3 or more.
    tree = make_tree(tmp_path / "data", {f"many/{i // 500:02d}/f{i:05d}.bin": b"x" * (i % 97) for i in range(2000)})
    book = sheet(tmp_path, [[str(tree / "many"), "/M", 0]])
    result = run_app(book, tmp_path / "logs", server)
    assert result.returncode == 0, result.stdout[-2000:]
    assert len([p for p in server.files() if p.startswith("/M/") and "/_inventory_" not in p]) == 2000
    commits = sum(server.count_calls(route) for route in ("files/upload_session/finish_batch_v2",
                                                          "files/upload_session/finish", "files/upload"))
    assert commits <= 3, f"{commits} commit calls for 2000 small files"  # and the row's inventory


def test_small_files_share_requests_and_ride_out_a_lost_answer_and_a_refused_batch(tmp_path, server):
    files = {f"g/{i // 300:02d}/f{i:04d}.dat": bytes([i % 251]) * (i % 3000) for i in range(1200)}
    files["g/big.bin"] = 5 * MIB + 3  # larger than a group's files may be: its own session
    tree = make_tree(tmp_path / "data", files)
    book = sheet(tmp_path, [[str(tree / "g"), "/G", 0]])
    batch_route = "files/upload_session/append_batch"
    # The 2nd request is applied but its answer is lost (the retry finds every session full);
    # the 4th is refused as a whole (its files then go one by one).
    server.set_faults(FaultConfig(fail_nth=[FailRule(batch_route, 2, "drop_before_response"),
                                            FailRule(batch_route, 4, 409, error={".tag": "length_mismatch"})]))
    result = run_app(book, tmp_path / "logs", server, "--chunkSize_MB", "4")
    assert result.returncode == 0, result.stdout[-3000:]
    assert_landed(server, tree / "g", "/G", split_names=())
    assert not [name for name in server.files() if "(1)" in name]
    # 1200 files in groups sized by append_batch's header (tests/test_small_files.py): one
    # request retried, one refused as a whole, whose files went alone.
    requests = server.count_calls("files/upload_session/start_batch")
    assert server.count_calls(batch_route) == requests + 1 and 1200 / requests >= 25
    opened = sum(call["entries"] for call in server.calls("files/upload_session/start_batch"))
    arrived = sum(call.get("entries") or 0 for call in server.calls(batch_route) if call["status"] == 200)
    alone = server.count_calls("files/upload_session/start") - 1  # big.bin opens one session too
    # The refused group's files go alone. Once (CI, not reproduced in reruns) one more file went
    # alone than the refused group held, when the lost answer's retry raced it; every file still
    # landed once (checked above), so one extra single-file session is allowed, not more.
    assert opened == 1200 and 0 < opened - arrived <= alone <= opened - arrived + 1 <= 46, (alone, opened, arrived)
    assert "sent one by one" in result.stdout
    commits = sum(server.count_calls(route) for route in ("files/upload_session/finish_batch_v2",
                                                          "files/upload_session/finish", "files/upload"))
    assert commits <= 4, commits  # 2 batch commits + big.bin's own finish + the row's inventory
    before = uploaded_bytes(server)
    rerun = run_app(book, tmp_path / "logs", server, "--chunkSize_MB", "4")
    assert rerun.returncode == 0 and uploaded_bytes(server) == before, rerun.stdout[-2000:]


READ_COUNTING_RUNNER = """
import atexit, os, runpy, sys
import psutil
report = sys.argv.pop(1)
atexit.register(lambda: open(report, "w").write(str(psutil.Process().io_counters().read_chars)))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _bytes_read_by_app(tmp_path: Path, name: str, book: Path, server: DropboxTestServer, *flags: str) -> int:
    """Run app.py as users do, and count every byte it read (psutil's read_chars)."""
    report = tmp_path / f"{name}.read_chars"
    args = app_args(book, tmp_path / f"logs_{name}", server, *flags)
    result = subprocess.run([sys.executable, "-c", READ_COUNTING_RUNNER, str(report), *args[1:]],
                            env=script_env(app_env(server)), capture_output=True, text=True, timeout=240,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return int(report.read_text())


@pytest.mark.parametrize("part_limit_gb", ["0.012", "0.02"])  # parts of 3 chunks (sequential), 5 (concurrent)
def test_a_split_file_is_read_once_for_its_parts_and_its_manifest(tmp_path, server, part_limit_gb):
    size = 48 * MIB + 99
    tree = make_tree(tmp_path / "data", {"one/huge.bin": size, "tiny/a.txt": b"a"})
    flags = ("--fileSizeLimit_GB", part_limit_gb, "--chunkSize_MB", "4")
    baseline = _bytes_read_by_app(tmp_path, "tiny", sheet(tmp_path, [[str(tree / "tiny"), "/T", 0]]), server, *flags)
    book = write_xlsx(tmp_path / "huge.xlsx", {"dropboxUpload_API": [["inputFile", "outputDir", "deleteAfterUpload"],
                                                                     [str(tree / "one"), "/H", 0]]})
    read = _bytes_read_by_app(tmp_path, "huge", book, server, *flags) - baseline
    assert_landed(server, tree / "one", "/H", split_names=("huge.bin",), part_limit=int(float(part_limit_gb) * 1e9))
    # Every part's bytes are hashed (part and whole-file SHA-256) as they are sent: the manifest
    # needs no pass of its own over the original. Each request reads its range twice, a hash pass
    # just before sending and the streamed body (from the page cache), and nothing more.
    assert 2 * size <= read < 2.2 * size, f"read {read} bytes for a file of {size}"


def test_a_resumed_concurrent_session_keeps_its_pieces_when_the_settings_change(tmp_path, server):
    """The pieces of a concurrent session are journaled with their size: a rerun with another
    chunk size continues the same session instead of misreading which pieces arrived."""
    tree = make_tree(tmp_path / "data", {"r/huge.bin": 35 * MIB + 12345})  # 4 pieces of 8 MiB + the closing one
    book = sheet(tmp_path, [[str(tree / "r"), "/R", 0]])
    first = ["--chunkSize_MB", "8", "--connectionsPerFile", "2", "--workers", "1"]
    # The first two pieces arrive; the next two are held on arrival and in flight at the kill.
    first_two = server.hold("files/upload_session/append_v2", count=2)
    process = subprocess.Popen(app_args(book, tmp_path / "logs", server, *first), env=script_env(app_env(server)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    _wait_held(process, first_two, 2)
    next_two = server.hold("files/upload_session/append_v2", count=2)
    first_two.release()
    _kill_while_held(process, next_two, 2)
    appends = [c for c in server.calls("files/upload_session/append_v2") if c["status"] == 200]
    assert len(appends) >= 2 and {c["bytes_in"] for c in appends} == {8 * MIB}
    result = run_app(book, tmp_path / "logs", server, "--chunkSize_MB", "4", "--connectionsPerFile", "2")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Resuming /R/huge.bin" in result.stdout
    assert server.content_hash("/R/huge.bin") == file_content_hash(tree / "r" / "huge.bin")
    assert uploaded_bytes(server) - tree_bytes(tree / "r") <= 2 * 8 * MIB  # at most the pieces in flight
