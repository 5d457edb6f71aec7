"""Issue 13, the Dropbox side of Stage 1, with app.py run as users run it against the local
Dropbox test server (which keeps names as written but finds them only by their NFC form, and
whose desktop-app simulator skips the names the real app skips):

- row 2: desktop-app mode with names written in NFD (as macOS writes them) is verified;
- row 3: a dropboxDownload_API row whose dropboxPath was pasted in NFD downloads;
- row 4: an Office lock file `~$…` is not copied for the desktop app to ignore forever;
- row 9: a destination blocked in Dropbox (a folder where a file goes, a file as outputDir) is
  refused before anything is sent, with --dry-run too.
"""

from __future__ import annotations

import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from conftest import REPO, log_files, make_tree, script_env, write_xlsx, SYSTEM_CA
from tests.dropbox_server import DesktopAppSimulator, DropboxTestServer

HEADER = ["inputFile", "outputDir", "deleteAfterUpload"]
UPLOAD_ROUTES = ("files/upload", "files/upload_session/start", "files/upload_session/start_batch",
                 "files/upload_session/append_v2", "files/upload_session/append_batch",
                 "files/upload_session/finish", "files/upload_session/finish_batch_v2",
                 "files/create_folder_v2")


def nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


@pytest.fixture
def desktop_app(tmp_path, server):
    folder = tmp_path / "Dropbox"
    folder.mkdir()
    app = DesktopAppSimulator(server, folder, "/", delay_s=0.1, poll_interval_s=0.05)
    app.start()
    yield app
    app.stop()


def environment(server: DropboxTestServer, credentials: bool = True) -> dict[str, str]:
    env = server.client_env(credentials=credentials)
    env.update(REQUESTS_CA_BUNDLE=SYSTEM_CA, CURL_CA_BUNDLE=SYSTEM_CA, SSL_CERT_FILE=SYSTEM_CA)
    env = script_env(env)
    if not credentials:
        for name in ("DROPBOX_REFRESH_TOKEN", "DROPBOX_ACCESS_TOKEN", "DROPBOX_APP_KEY"):
            env.pop(name, None)
    return env


def run_app(tmp_path: Path, server: DropboxTestServer, tab: str, rows: list[list], *extra: str,
            credentials: bool = True, timeout: float = 90) -> subprocess.CompletedProcess:
    header = ["dropboxPath", "localDir", "joinFlag"] if tab == "dropboxDownload_API" else HEADER
    book = write_xlsx(tmp_path / "inputs.xlsx", {tab: [header, *rows]})
    args = [sys.executable, str(REPO / "app.py"), "--excelName", str(book), "--sheetName", tab, "--logs",
            str(tmp_path / "logs"), "--caBundle", server.ca_file, "--sleepTime_min", "0.005",
            "--batchTimeLimit_hour", "1", "--tokenFile", str(tmp_path / "no-login.json"), *extra]
    return subprocess.run(args, env=environment(server, credentials), capture_output=True, text=True,
                          encoding="utf-8", timeout=timeout, stdin=subprocess.DEVNULL)


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def sent_requests(server: DropboxTestServer) -> int:
    return sum(server.count_calls(route) for route in UPLOAD_ROUTES)


# ---------------------------------------------------------------------------- row 2


def test_desktop_app_names_written_in_nfd_are_found_and_verified(tmp_path, server, desktop_app):
    data = make_tree(tmp_path / "data", {nfd("Übung/résumé.txt"): b"curriculum vitae", "plain.txt": b"plain"})
    result = run_app(tmp_path, server, "dropboxUpload_APP", [[str(data), str(desktop_app.local_folder / "T2"), 0]],
                     "--dropboxDir", str(desktop_app.local_folder), timeout=60)
    assert result.returncode == 0, output(result)
    stored = server.metadata(nfc("/T2/Übung/résumé.txt"))
    assert stored is not None and stored["path_display"] == nfd("/T2/Übung/résumé.txt")
    text = log_files(tmp_path / "logs", "upload")[-1].read_text(encoding="utf-8")
    assert text.count("VERIFIED") == 2, text
    # Every lookup went out in NFC: an NFD one is not_found in Dropbox.
    asked = [call["path"] for call in server.calls("files/get_metadata") + server.calls("files/list_folder")]
    assert asked and all(path == nfc(path) for path in asked), asked


# ---------------------------------------------------------------------------- row 3


def test_download_row_pasted_in_nfd_downloads(tmp_path, server):
    server.put_file(nfc("/Übung/résumé.txt"), b"curriculum vitae")
    server.put_file(nfc("/Übung/sub/notes.txt"), b"notes")
    result = run_app(tmp_path, server, "dropboxDownload_API",
                     [[nfd("/Übung/résumé.txt"), str(tmp_path / "one"), 0],
                      [nfd("/Übung"), str(tmp_path / "all"), 0]])
    assert result.returncode == 0, output(result)
    assert (tmp_path / "one" / nfc("résumé.txt")).read_bytes() == b"curriculum vitae"
    assert (tmp_path / "all" / nfc("Übung") / "sub" / "notes.txt").read_bytes() == b"notes"


# ---------------------------------------------------------------------------- row 4


def test_office_lock_file_is_skipped_not_waited_for(tmp_path, server, desktop_app):
    data = make_tree(tmp_path / "data", {"report.docx": b"the report", "~$report.docx": b"owner lock"})
    result = run_app(tmp_path, server, "dropboxUpload_APP", [[str(data), str(desktop_app.local_folder / "T4"), 0]],
                     "--dropboxDir", str(desktop_app.local_folder), timeout=60)
    assert result.returncode == 0, output(result)
    assert server.read_file("/T4/report.docx") == b"the report"
    assert not (desktop_app.local_folder / "T4" / "~$report.docx").exists()
    assert server.metadata("/T4/~$report.docx") is None
    prepared = "\n".join(p.read_text(encoding="utf-8") for p in log_files(tmp_path / "logs", "dataPrep"))
    assert "~$report.docx" in prepared, prepared


# ---------------------------------------------------------------------------- row 9


def blocked_api_sheet(tmp_path: Path, server: DropboxTestServer) -> list[list]:
    data = make_tree(tmp_path / "data", {"big.raw": 5000, "run/a.txt": b"a", "run/sub/b.txt": b"b",
                                         "good/c.txt": b"c"})
    server.put_file("/T26/big.raw/inside.txt", b"a folder is in the way")
    server.put_file("/T26/notadir", b"a file is in the way")
    server.put_file("/T26/run2/sub", b"a file where a folder must go")
    return [[str(data / "big.raw"), "/T26", 0],
            [str(data / "run"), "/T26/notadir", 0],
            [str(data / "run"), "/T26/run2", 0],
            [str(data / "good"), "/T26/good", 0]]


def test_destination_blocked_in_dropbox_is_refused_before_anything_is_sent(tmp_path, server):
    rows = blocked_api_sheet(tmp_path, server)
    server.clear_log()
    for flags in ((), ("--dry-run",)):
        result = run_app(tmp_path, server, "dropboxUpload_API", rows, *flags)
        text = output(result)
        assert result.returncode == 2, text
        assert ("tab 'dropboxUpload_API', row 2, column 'outputDir': /T26/big.raw is a folder in Dropbox" in text), text
        assert "row 3, column 'outputDir': outputDir /T26/notadir is a file in Dropbox" in text, text
        assert "row 4, column 'outputDir': /T26/run2/sub is a file in Dropbox" in text, text
        assert "row 5" not in text, text
        assert sent_requests(server) == 0
    # Cheap: one get_metadata per destination folder, one listing of each that exists.
    assert server.count_calls("files/list_folder") <= 2 * 3
    assert server.count_calls("files/get_metadata") <= 2 * 4 + 2


def test_dry_run_without_login_says_the_dropbox_check_was_skipped(tmp_path, server):
    rows = blocked_api_sheet(tmp_path, server)
    result = run_app(tmp_path, server, "dropboxUpload_API", rows, "--dry-run", credentials=False)
    assert result.returncode == 0, output(result)
    assert "Dropbox-side check of the destinations was skipped" in output(result)


def test_desktop_app_mode_refuses_a_folder_in_dropbox_where_a_file_goes(tmp_path, server, desktop_app):
    data = make_tree(tmp_path / "data", {"big.raw": 3000})
    # Online-only in the Dropbox folder: Dropbox has the folder, the local Dropbox folder does not.
    server.put_file("/T27/big.raw/inside.txt", b"a folder is in the way")
    result = run_app(tmp_path, server, "dropboxUpload_APP", [[str(data / "big.raw"), str(desktop_app.local_folder / "T27"), 0]],
                     "--dropboxDir", str(desktop_app.local_folder), timeout=60)
    assert result.returncode == 2, output(result)
    assert "/T27/big.raw is a folder in Dropbox" in output(result)
    assert not (desktop_app.local_folder / "T27" / "big.raw").exists()
