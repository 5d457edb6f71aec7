"""Issue 13's two transfer faults, with app.py run as users run it against the local Dropbox
test server: a refused final commit must not send a file again, and the quota pause must ask
for what is left to send, not for the whole job."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, log_files, make_tree, script_env, write_xlsx, SYSTEM_CA
from tests.dropbox_server import DropboxTestServer, FailRule

MIB = 1024 * 1024
UPLOAD_ROUTES = ("files/upload", "files/upload_session/start", "files/upload_session/append_v2",
                 "files/upload_session/finish", "files/upload_session/append_batch")


def command(book: Path, logs: Path, server: DropboxTestServer, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "app.py"), "--excelName", str(book), "--sheetName", "dropboxUpload_API",
            "--logs", str(logs), "--caBundle", server.ca_file, "--sleepTime_min", "0.01", *extra]


def environment(server: DropboxTestServer) -> dict[str, str]:
    env = server.client_env(credentials=True)
    env.update(REQUESTS_CA_BUNDLE=SYSTEM_CA, CURL_CA_BUNDLE=SYSTEM_CA, SSL_CERT_FILE=SYSTEM_CA)
    return script_env(env)


def sheet(tmp_path: Path, rows: list[list]) -> Path:
    return write_xlsx(tmp_path / "inputs.xlsx", {"dropboxUpload_API": [["inputFile", "outputDir", "deleteAfterUpload"],
                                                                         *rows]})


def upload_log(logs: Path) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in log_files(logs, "upload"))


@pytest.mark.parametrize("refusal", [
    {"status": 409, "error": {".tag": "too_many_write_operations"}},
    {"status": 409, "error": {".tag": "path", "path": {".tag": "insufficient_space"}}},
    {"status": 429, "error": "too_many_write_operations"},
], ids=["too_many_write_operations-409", "insufficient_space", "too_many_write_operations-429"])
def test_refused_final_commit_is_finished_without_sending_the_file_again(tmp_path, server, refusal):
    """The refused finish had appended its closing bytes (Dropbox documents it for a failed
    commit); its retry gets lookup_failed/closed, and an empty finish at the full offset must
    follow — not a new session for the whole file."""
    size = 6 * MIB + 123
    tree = make_tree(tmp_path / "data", {"big.raw": size})
    server.set_faults(fail_nth=[FailRule("files/upload_session/finish", 1, at_commit=True, retry_after=0, **refusal)])
    book = sheet(tmp_path, [[str(tree / "big.raw"), "/T", 0]])
    result = subprocess.run(command(book, tmp_path / "logs", server, "--chunkSize_MB", "4"), env=environment(server),
                            capture_output=True, text=True, encoding="utf-8", timeout=180, stdin=subprocess.DEVNULL)
    log = upload_log(tmp_path / "logs")
    assert result.returncode == 0, result.stdout + result.stderr
    assert server.read_file("/T/big.raw") == (tree / "big.raw").read_bytes()
    assert "expired" not in log and "starting that file again" not in log, log
    assert server.count_calls("files/upload_session/start") == 1
    finishes = server.calls("files/upload_session/finish")
    assert finishes[-1]["status"] == 200 and finishes[-1]["bytes_in"] == 0
    # At most the closing chunk crosses twice (its re-send is what reveals `closed`).
    sent = sum(server.bytes_received(route) for route in UPLOAD_ROUTES)
    assert sent <= size + 4 * MIB, sent


def test_quota_pause_asks_for_what_is_left_to_send(tmp_path, server):
    """Two of three files are in Dropbox already (not in this journal): the start-up check asks
    for the third file's bytes only; with too little even for that, the pause names that
    amount, then the run goes on once space is freed."""
    files = {"job/a.bin": 1_000_000, "job/b.bin": 1_000_000, "job/c.bin": 1_000_000}
    tree = make_tree(tmp_path / "data", files)
    for name in ("a.bin", "b.bin"):
        local = tree / "job" / name
        modified = dt.datetime.fromtimestamp(int(local.stat().st_mtime), dt.timezone.utc).replace(tzinfo=None)
        server.put_file(f"/J/{name}", local.read_bytes(), client_modified=modified)
    server.set_quota(server.used_bytes + 1_500_000)  # room for c.bin, not for the whole job
    book = sheet(tmp_path, [[str(tree / "job"), "/J", 0]])
    result = subprocess.run(command(book, tmp_path / "logs", server), env=environment(server), capture_output=True,
                            text=True, encoding="utf-8", timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PAUSED" not in upload_log(tmp_path / "logs")
    assert server.read_file("/J/c.bin") == (tree / "job" / "c.bin").read_bytes()

    (tree / "job" / "d.bin").write_bytes(os.urandom(1_000_000))
    server.set_quota(server.used_bytes + 400_000)
    # Re-checked every 0.3 s while paused, so the run goes on soon after the space is freed.
    process = subprocess.Popen(command(book, tmp_path / "logs", server, "--sleepTime_min", "0.005"),
                               env=environment(server), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               encoding="utf-8", stdin=subprocess.DEVNULL)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(process.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while not any("PAUSED" in line for line in output) and time.monotonic() < deadline:
            time.sleep(0.1)
        paused = next((line for line in output if "PAUSED" in line), "")
        assert "400.00 KB free in Dropbox, 1.00 MB needed" in paused, "".join(output)
        server.set_quota(10 * 1024 ** 3)
        assert process.wait(timeout=120) == 0, "".join(output)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert server.read_file("/J/d.bin") == (tree / "job" / "d.bin").read_bytes()
