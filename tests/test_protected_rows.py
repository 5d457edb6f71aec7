"""Rows that hold the tool itself are refused before anything happens: the tool's folder (or a
folder around it), the running script, its logs and journal (also when moved with --logs) and the
workbook being read. Otherwise deleteAfterUpload / deleteFlag would delete app.py, the workbook
and the journal in the middle of the run, and the live journal would be uploaded.

Each test runs a copy of the tool in a temporary folder, so that nothing can ever touch this
repository whatever the code under test does."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO, SYSTEM_CA, make_tree, script_env, write_xlsx

from archive_dropbox.sheets import contains_path

HEADER = ["inputFile", "outputDir", "deleteAfterUpload"]
READ_ONLY_ROUTES = ("files/get_metadata", "files/list_folder", "files/list_folder/continue")
NO_LOGIN = {"DROPBOX_REFRESH_TOKEN": "", "DROPBOX_ACCESS_TOKEN": ""}


def copy_tool(folder: Path) -> Path:
    shutil.copytree(REPO / "archive_dropbox", folder / "archive_dropbox",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "preProcess").mkdir()
    for name in ("app.py", "requirements.txt", "preProcess/2_zipDir.py"):
        shutil.copy2(REPO / name, folder / name)
    return folder


def files_outside(root: Path, skip: Path) -> set[str]:
    """Every file below root except those in `skip` (the logs, which the run itself writes)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and not contains_path(skip, p) and "__pycache__" not in p.parts}


def problem_lines(output: str) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for row, text in re.findall(r"^\s*- workbook .*?, row (\d+), (.*)$", output, re.M):
        found.setdefault(int(row), []).append(text)
    return found


def run(script: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=str(script.parent.parent),
                          env=script_env(env), capture_output=True, text=True, encoding="utf-8",
                          timeout=240, stdin=subprocess.DEVNULL)


def test_api_rows_holding_the_tool_its_logs_or_the_workbook_are_refused(tmp_path, server):
    lab = tmp_path / "lab"
    tool = copy_tool(lab / "tool")
    make_tree(tool / "data", {"a/inside.bin": 1000})  # data kept inside the tool's folder: fine
    outside = make_tree(tmp_path / "elsewhere", {"b/x.bin": 1000})
    make_tree(tool / "logs", {"upload/earlier.log": b"an earlier run"})
    (tmp_path / "link").symlink_to(tool, target_is_directory=True)
    write_xlsx(tool / "inputs.xlsx", {"dropboxUpload_API": [
        HEADER,
        [".", "/T", 1],  # row 2: the tool's folder (relative to the workbook)
        ["..", "/L", 1],  # row 3: a folder around it
        [str(tool / "logs"), "/G", 1],  # row 4: the logs and the journal
        [str(tool / "logs" / "upload"), "/U", 1],  # row 5: inside the logs
        [str(tool / "inputs.xlsx"), "/W", 1],  # row 6: the workbook being read
        [str(tmp_path / "link"), "/S", 1],  # row 7: a link to the tool's folder
        [str(tool / "app.py"), "/P", 1],  # row 8: the running script
        [str(tool / "data" / "a"), "/D", 1],  # row 9: fine
        [str(outside / "b"), "/E", 1],  # row 10: fine
    ]})
    before = files_outside(tmp_path / "lab", tool / "logs") | files_outside(outside, tool / "logs")
    env = server.client_env(credentials=True)
    env.update(REQUESTS_CA_BUNDLE=SYSTEM_CA, CURL_CA_BUNDLE=SYSTEM_CA, SSL_CERT_FILE=SYSTEM_CA)

    result = run(tool / "app.py", "--sheetName", "dropboxUpload_API", "--caBundle", server.ca_file,
                 "--sleepTime_min", "0.02", env=env)

    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    problems = problem_lines(output)
    assert set(problems) == {2, 3, 4, 5, 6, 7, 8}, problems
    assert all(len(texts) == 1 and texts[0].startswith("column 'inputFile': inputFile ")
               for texts in problems.values())
    for row in (2, 3, 7):
        assert f"is or contains this tool's own folder {tool}" in problems[row][0]
    assert f"is or contains this tool's logs and journal folder {tool / 'logs'}" in problems[4][0]
    assert "is inside this tool's logs and journal folder" in problems[5][0]
    assert f"is or contains the workbook being read {tool / 'inputs.xlsx'}" in problems[6][0]
    assert "is or contains the running script" in problems[8][0]
    assert "does not hold this tool, or remove the row" in problems[2][0]
    assert "nothing was changed" in output and "Traceback" not in output
    # Stage 1 may look (get_metadata, list_folder), never change anything.
    assert not [c for c in server.calls() if c["route"].startswith("files/") and c["route"] not in READ_ONLY_ROUTES]
    assert files_outside(tmp_path / "lab", tool / "logs") | files_outside(outside, tool / "logs") == before


def test_app_rows_holding_the_tool_or_its_moved_logs_are_refused_with_the_dropbox_folder_check(tmp_path):
    tool = copy_tool(tmp_path / "tool")
    dropbox = tmp_path / "Dropbox"
    dropbox.mkdir()
    logs = tmp_path / "moved logs"
    make_tree(logs, {"upload/earlier.log": b"an earlier run"})
    data = make_tree(tmp_path / "data", {"a/x.bin": 1000})
    book = write_xlsx(tmp_path / "books" / "inputs.xlsx", {"dropboxUpload_APP": [
        HEADER,
        [str(tool), str(dropbox / "T"), 1],  # row 2: the tool's folder
        [str(logs), str(dropbox / "G"), 0],  # row 3: the logs moved with --logs, even without deleting
        [str(tmp_path), str(dropbox / "X"), 1],  # row 4: holds the tool and the Dropbox folder
        [str(tmp_path / "books"), str(dropbox / "B"), 0],  # row 5: holds the workbook
        [str(data / "a"), str(dropbox / "D"), 1],  # row 6: fine
    ]})
    before = files_outside(tmp_path, logs)

    result = run(tool / "app.py", "--excelName", str(book), "--sheetName", "dropboxUpload_APP",
                 "--dropboxDir", str(dropbox), "--logs", str(logs), "--tokenFile", str(tmp_path / "none.json"),
                 env=NO_LOGIN)

    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    problems = problem_lines(output)
    assert set(problems) == {2, 3, 4, 5}, problems
    assert "is or contains this tool's own folder" in problems[2][0]
    assert f"is or contains this tool's logs and journal folder {logs}" in problems[3][0]
    assert len(problems[4]) == 2
    assert "is or contains this tool's own folder" in problems[4][0]
    assert "contains the Dropbox folder" in problems[4][1]
    assert f"is or contains the workbook being read {book}" in problems[5][0]
    assert "Traceback" not in output
    assert files_outside(tmp_path, logs) == before and not any(dropbox.iterdir())


def test_zip_rows_holding_the_tool_its_script_or_its_logs_are_refused(tmp_path):
    tool = copy_tool(tmp_path / "tool")
    make_tree(tool / "data", {"a/frame.tif": 1000})
    make_tree(tool / "logs", {"old/earlier.log": b"an earlier run"})
    book = write_xlsx(tmp_path / "books" / "zipDir.xlsx", {"zipDir": [
        ["inputDir", "deleteFlag"],
        [str(tool), 1],  # row 2: the whole tool
        [str(tool / "preProcess"), 1],  # row 3: the running script
        [str(tool / "logs"), 1],  # row 4: the logs
        [str(tool / "logs" / "old"), 1],  # row 5: inside the logs
        [str(tool / "data" / "a"), 1],  # row 6: data inside the tool's folder is fine
    ]})
    before = files_outside(tmp_path, tool / "logs")

    result = run(tool / "preProcess" / "2_zipDir.py", "--excelName", str(book), env={})

    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    problems = problem_lines(output)
    assert any(f"is or contains this tool's own folder {tool}" in text for text in problems[2])
    assert any("is or contains the running script" in text for text in problems[3])
    assert any("is or contains this tool's logs and journal folder" in text for text in problems[4])
    assert any("is inside this tool's logs and journal folder" in text for text in problems[5])
    assert not any("this tool" in text for text in problems.get(6, []))
    assert "Traceback" not in output
    assert files_outside(tmp_path, tool / "logs") == before
    assert not list(tmp_path.rglob("*.zip")) and not list(tmp_path.rglob(".~*"))


def test_contains_path_compares_whole_resolved_components(tmp_path):
    tool = (tmp_path / "tool").resolve()
    (tmp_path / "tool2").mkdir()
    (tmp_path / "link").symlink_to(tmp_path, target_is_directory=True)
    assert contains_path(tmp_path, tool) and contains_path(tool, tool)
    assert contains_path(tmp_path / "link", tool / "logs" / "journal.sqlite3")
    assert contains_path(tool / "data" / "..", tool)
    assert not contains_path(tool, tmp_path)
    assert not contains_path(tmp_path / "tool2", tool) and not contains_path(tool, tmp_path / "tool2")
