"""Stage 1 foresees the refusals of issue 13 (rows 1, 4-8, 10-14): the scripts run as users run
them (subprocesses, `--dry-run` and real runs against the local Dropbox test server), on small
trees made here. Every problem is listed before anything is sent; what cannot be sent is skipped
and listed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from archive_dropbox import sheets
from archive_dropbox.errors import SheetError
from conftest import REPO, log_files, make_tree, run_script, script_env, write_xlsx, SYSTEM_CA
from tests.dropbox_server import DropboxTestServer

API = "dropboxUpload_API"
APP = "dropboxUpload_APP"
HEADER = ["inputFile", "outputDir", "deleteAfterUpload"]
UPLOAD_ROUTES = ("files/upload", "files/upload_session/start", "files/upload_session/append_v2",
                 "files/upload_session/start_batch", "files/upload_session/append_batch")


def run_app(tmp_path: Path, rows: list[list], *extra: str, tab: str = API, server: DropboxTestServer | None = None,
            prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """app.py on a fresh inputs.xlsx; without a server only `--dry-run` makes sense."""
    book = write_xlsx(tmp_path / "inputs.xlsx", {tab: [HEADER, *rows]})
    command = [*prefix, sys.executable, str(REPO / "app.py"), "--excelName", str(book), "--sheetName", tab,
               "--logs", str(tmp_path / "logs"), "--sleepTime_min", "0.02", *extra]
    env = {}
    if server is not None:
        env = server.client_env(credentials=True)
        env.update(REQUESTS_CA_BUNDLE=SYSTEM_CA, CURL_CA_BUNDLE=SYSTEM_CA, SSL_CERT_FILE=SYSTEM_CA)
        command += ["--caBundle", server.ca_file]
    if tab == APP:
        command += ["--dropboxDir", str(dropbox_folder(tmp_path))]
    return subprocess.run(command, env=script_env(env), capture_output=True, text=True, encoding="utf-8",
                          timeout=240, stdin=subprocess.DEVNULL)


def dropbox_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "Dropbox"
    folder.mkdir(exist_ok=True)
    return folder


def output_dir(tmp_path: Path, tab: str, dropbox_path: str) -> str:
    return str(dropbox_folder(tmp_path) / dropbox_path.strip("/")) if tab == APP else dropbox_path


def prep_log(tmp_path: Path) -> str:
    return log_files(tmp_path / "logs", "dataPrep")[-1].read_text(encoding="utf-8")


def uploads(server: DropboxTestServer) -> list:
    return [call for call in server.calls() if call["route"] in UPLOAD_ROUTES]


def non_utf8_file(folder: Path, raw_name: bytes) -> str:
    """A file named by raw bytes (as an old system wrote it); its name as Python lists it."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with open(os.fsencode(folder) + b"/" + raw_name, "wb") as handle:
            handle.write(b"old data")
    except OSError as exc:
        pytest.skip(f"this file system refuses names that are not UTF-8: {exc}")
    return os.fsdecode(raw_name)


needs_linux = pytest.mark.skipif(sys.platform != "linux", reason="only Linux file systems take names that are "
                                                                 "not UTF-8")


# ============================================================================ row 1


@needs_linux
def test_row1_a_name_that_is_not_utf8_is_refused_in_stage1_and_nothing_is_sent(tmp_path, server):
    data = make_tree(tmp_path / "data", {f"f{i}.txt": b"fine" for i in range(4)})
    non_utf8_file(data, b"caf\xe9.txt")
    expected = f"{data}/caf\\xe9.txt: the name 'caf\\xe9.txt' is not valid text (UTF-8); Dropbox cannot " \
               "store it: rename it"
    dry = run_app(tmp_path, [[str(data), "/Old", 0]], "--dry-run")
    assert dry.returncode == 2, dry.stdout + dry.stderr
    assert expected in dry.stdout and "Traceback" not in dry.stdout + dry.stderr
    real = run_app(tmp_path, [[str(data), "/Old", 0]], server=server)
    assert real.returncode == 2, real.stdout + real.stderr
    assert expected in real.stdout and "nothing was changed" in real.stdout
    assert not uploads(server) and not server.files()


@needs_linux
def test_row1_list_dir_to_zip_warns_about_names_that_are_not_utf8(tmp_path):
    data = make_tree(tmp_path / "data", {"sub/a.txt": b"x"})
    non_utf8_file(data / "sub", b"r\xe9sum\xe9.doc")
    book = write_xlsx(tmp_path / "zipDir.xlsx", {"listDirToZip": [["inputDir"], [str(data)]]})
    result = run_script(REPO / "preProcess" / "1_listDirToZip.py", "--excelName", str(book), "--logs",
                        str(tmp_path / "logs"), "--output-dir", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = result.stdout.split("---- Warnings ----")[1]
    assert "1 name(s) are not valid text (UTF-8)" in warnings and f"{data}/sub/r\\xe9sum\\xe9.doc" in warnings


# ============================================================================ rows 4 and 12


@pytest.mark.parametrize("tab", [API, APP])
def test_rows4_12_skipped_names_are_listed_in_the_data_prep_log(tmp_path, tab):
    data = make_tree(tmp_path / "data", {"report.docx": b"the report", "~$report.docx": b"lock",
                                         "desktop.ini": b"x", "Thumbs.db": b"x", ".DS_Store": b"x",
                                         "Icon\r": b"", "sub/.dropbox.attr": b"x", "sub/kept.txt": b"kept"})
    os.mkfifo(data / "a pipe")
    (data / "a link").symlink_to("report.docx")
    result = run_app(tmp_path, [[str(data), output_dir(tmp_path, tab, "/Lab"), 0]], "--dry-run", tab=tab)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": 2 files," in result.stdout
    assert ("skipped 6 names the Dropbox desktop app ignores, 1 links, 1 special files (pipes, sockets, devices) "
            "and 0 entries that cannot be read (every skipped path is listed in the dataPrep log)") in result.stdout
    log = prep_log(tmp_path)
    for name in ("~$report.docx", "desktop.ini", "Thumbs.db", ".DS_Store", "Icon\\r", "sub/.dropbox.attr",
                 "a pipe", "a link"):
        assert f"SKIPPED\t{data}/{name}\t" in log, name
    assert "Office lock file" in log and "a pipe, socket or device" in log and "links are never followed" in log


# ============================================================================ rows 5 and 6


def test_row5_strasse_and_STRASSE_both_reach_dropbox(tmp_path, server):
    data = make_tree(tmp_path / "data", {"straße.txt": b"lower", "STRASSE.txt": b"upper"})
    result = run_app(tmp_path, [[str(data), "/Lab", 0]], server=server)
    assert result.returncode == 0, result.stdout + result.stderr
    assert server.read_file("/Lab/straße.txt") == b"lower" and server.read_file("/Lab/STRASSE.txt") == b"upper"


@pytest.mark.parametrize("first, second", [("ΣΑΣ.txt", "σασ.txt"), ("\ufa16.txt", "\u732a.txt")])
def test_row5_names_dropbox_takes_for_one_stay_caught(tmp_path, first, second):
    data = make_tree(tmp_path / "data", {first: b"1", second: b"2"})
    result = run_app(tmp_path, [[str(data), "/Lab", 0]], "--dry-run")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{data / first}" in result.stdout and f"{data / second}" in result.stdout


def test_row6_names_differing_only_in_unicode_form_are_named_as_such(tmp_path):
    nfd = unicodedata.normalize("NFD", "café.txt")
    data = make_tree(tmp_path / "data", {"café.txt": b"composed", nfd: b"decomposed"})
    if len(os.listdir(data)) != 2:
        pytest.skip("this file system stores both forms as one name")
    result = run_app(tmp_path, [[str(data), "/Lab", 0]], "--dry-run")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "differ only in Unicode form" in result.stdout and "upper/lower" not in result.stdout


# ============================================================================ rows 7 and 8


@pytest.mark.parametrize("tab", [API, APP])
def test_row7_a_trailing_space_anywhere_in_the_tree_is_listed_in_stage1(tmp_path, tab):
    data = make_tree(tmp_path / "data", {"fine.txt": b"x", "sub /a.txt": b"x", "sub /deeper/b.txt": b"x",
                                         "notes.txt ": b"x"})
    result = run_app(tmp_path, [[str(data), output_dir(tmp_path, tab, "/Lab"), 0]], "--dry-run", tab=tab)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{data}/sub : the name 'sub ' ends with a space" in result.stdout
    assert f"{data}/notes.txt : the name 'notes.txt ' ends with a space" in result.stdout
    assert "2 problem(s) found" in result.stdout  # the folder once, not once per file inside it


def test_row8_a_file_beside_a_folder_of_the_same_name_is_caught_naming_both(tmp_path):
    data = make_tree(tmp_path / "data", {"run": b"a file", "RUN/frame.tif": b"a frame"})
    result = run_app(tmp_path, [[str(data), "/Lab", 0]], "--dry-run")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"the file {data / 'run'} (row 2) and the folder {data / 'RUN'} (row 2)" in result.stdout


def test_row8_a_file_row_where_another_row_needs_a_folder_is_caught(tmp_path):
    data = make_tree(tmp_path / "data", {"one/T26": b"a file", "two/x.bin": b"x"})
    result = run_app(tmp_path, [[str(data / "one" / "T26"), "/Lab", 0], [str(data / "two"), "/lab/t26", 0]],
                     "--dry-run")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"the file {data / 'one' / 'T26'} (row 2) and the folder /lab/t26 (outputDir of row 3" in result.stdout


# ============================================================================ row 10


def test_row10_a_dropbox_folder_name_ending_in_a_space_names_tab_row_and_column(tmp_path, server):
    data = make_tree(tmp_path / "data", {"good/a.txt": b"a", "bad/b.txt": b"b"})
    result = run_app(tmp_path, [[str(data / "good"), "/T28c/good", 0], [str(data / "bad"), "/T28c /sub", 0]],
                     server=server)
    assert result.returncode == 2, result.stdout + result.stderr
    assert ("tab 'dropboxUpload_API', row 3, column 'outputDir': outputDir /T28c /sub: the name 'T28c ' ends "
            "with a space") in result.stdout
    assert not uploads(server) and not server.files()


# ============================================================================ row 11


def _without_root_privileges() -> tuple[str, ...]:
    """A command prefix under which chmod 000 stops this process's children from reading."""
    if os.name == "nt" or os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("root reads chmod 000 files, and setpriv is missing to drop that privilege")
    return ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")


@pytest.mark.skipif(os.name == "nt", reason="chmod 000 does not block reading on Windows")
def test_row11_unreadable_entries_are_skipped_listed_and_fail_the_run_at_the_end(tmp_path, server):
    data = make_tree(tmp_path / "data", {"a.txt": b"a", "sub/b.txt": b"b", "locked.bin": b"secret",
                                         "closed/c.txt": b"c"})
    prefix = _without_root_privileges()
    (data / "locked.bin").chmod(0)
    (data / "closed").chmod(0)
    try:
        result = run_app(tmp_path, [[str(data), "/Lab", 0]], server=server, prefix=prefix)
    finally:
        (data / "locked.bin").chmod(0o644)
        (data / "closed").chmod(0o755)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert sorted(p for p in server.files() if "/_inventory_" not in p) == ["/Lab/a.txt", "/Lab/sub/b.txt"]
    assert f"{data / 'locked.bin'} cannot be read (Permission denied): skipped" in output
    assert (f"{data / 'closed'} cannot be read (Permission denied; a folder, so nothing inside it is sent): "
            "skipped") in output
    assert f"failed: {data / 'locked.bin'}: cannot be read (Permission denied): skipped, not sent" in output
    assert "2 failed" in output
    log = prep_log(tmp_path)
    assert f"SKIPPED\t{data / 'locked.bin'}\tcannot be read" in log and f"SKIPPED\t{data / 'closed'}\t" in log


# ============================================================================ row 13


WINDOWS_PATHS = {"localDir": "D:\\restore", "inputFile": "D:\\data\\x", "outputDir": "\\\\nas01\\lab\\data"}


def _windows_path_book(tmp_path: Path) -> Path:
    return write_xlsx(tmp_path / "paths.xlsx", {"t": [list(WINDOWS_PATHS), list(WINDOWS_PATHS.values())]})


COLUMNS = [sheets.Column("localDir", sheets.LOCAL_DIR), sheets.Column("inputFile", sheets.LOCAL_PATH),
           sheets.Column("outputDir", sheets.LOCAL_DIR)]


def test_row13_windows_paths_are_refused_elsewhere_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(sheets, "running_on_windows", lambda: False)
    with pytest.raises(SheetError) as caught:
        sheets.read_tab(_windows_path_book(tmp_path), "t", COLUMNS)
    text = str(caught.value)
    assert "column 'localDir': localDir is 'D:\\restore', which looks like a Windows drive path" in text
    assert "column 'inputFile': inputFile is 'D:\\data\\x', which looks like a Windows drive path" in text
    assert "a Windows network path (UNC)" in text and "mount the share and give its local path" in text


def test_row13_windows_paths_are_ordinary_paths_on_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(sheets, "running_on_windows", lambda: True)
    rows = sheets.read_tab(_windows_path_book(tmp_path), "t", COLUMNS)
    assert len(rows) == 1


@pytest.mark.skipif(os.name == "nt", reason="a drive path is an ordinary path on Windows")
def test_row13_a_download_into_a_drive_path_creates_no_folder_of_that_name(tmp_path, server):
    server.put_file("/Archive/a.txt", b"archived")
    book = write_xlsx(tmp_path / "inputs.xlsx", {"dropboxDownload_API": [["dropboxPath", "localDir", "joinFlag"],
                                                                          ["/Archive", "D:\\restore", 0]]})
    env = server.client_env(credentials=True)
    env.update(REQUESTS_CA_BUNDLE=SYSTEM_CA, CURL_CA_BUNDLE=SYSTEM_CA, SSL_CERT_FILE=SYSTEM_CA)
    result = run_script("app.py", "--excelName", str(book), "--sheetName", "dropboxDownload_API", "--logs",
                        str(tmp_path / "logs"), "--caBundle", server.ca_file, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "looks like a Windows drive path" in result.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("D:")]
    assert not (REPO / "D:\\restore").exists()


# ============================================================================ row 14


def test_row14_a_zip_dir_row_that_is_a_link_is_refused_and_its_target_kept(tmp_path):
    real = make_tree(tmp_path / "data" / "real", {"a.tif": b"a", "b.tif": b"b"})
    link = tmp_path / "data" / "link"
    link.symlink_to(real, target_is_directory=True)
    book = write_xlsx(tmp_path / "zipDir.xlsx", {"zipDir": [["inputDir", "deleteFlag"], [str(link), 1]]})
    result = run_script(REPO / "preProcess" / "2_zipDir.py", "--excelName", str(book), "--logs",
                        str(tmp_path / "logs"), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"inputDir {link} is a symbolic link (to {real}); links are never followed" in result.stdout
    assert sorted(p.name for p in real.iterdir()) == ["a.tif", "b.tif"]
    assert not list(tmp_path.rglob("*.zip"))


def test_a_file_given_twice_is_named_as_such_not_as_a_name_clash(tmp_path):
    """Found by a newcomer: a file row inside a folder row was called two files with one name."""
    data = make_tree(tmp_path / "data", {"run/a.txt": b"a", "run/b.txt": b"b"})
    result = run_app(tmp_path, [[str(data / "run"), "/Lab/run", 0], [str(data / "run" / "a.txt"), "/Lab/run", 0]],
                     "--dry-run")
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "is given twice" in output and "rename one" not in output, output
