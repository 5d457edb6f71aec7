"""How the scripts start (issue 14, items 3 and 4): settings lines that take Windows paths as
typed, and one wrapper that keeps a double-clicked window open whatever stops the script -
a missing package, an import error, a settings error, an unwritable logs folder."""

from __future__ import annotations

import builtins
import subprocess
import sys
from pathlib import Path

import pytest

from archive_dropbox import start
from archive_dropbox.errors import SettingsError
from archive_dropbox.settings import Setting, read_settings_block, resolve
from conftest import REPO, script_env

WINDOWS_LINES = r"""
# ============================ Settings: edit these lines ============================
dropboxDir = 'C:\Users\me\Dropbox'              # the README's own example
sevenZipPath = "C:\Program Files\7-Zip\7z.exe"  # \7 would be a bell character in Python
excelName = 'D:\new\inputs.xlsx'                # \n would be a line break
workers = 4
fileSizeLimit_GB = 0.5   # a number
checksum = True
"""


def test_windows_paths_in_the_settings_block_are_taken_exactly_as_typed():
    values = read_settings_block(WINDOWS_LINES, Path("app.py"))
    assert values == {"dropboxDir": "C:\\Users\\me\\Dropbox", "sevenZipPath": "C:\\Program Files\\7-Zip\\7z.exe",
                      "excelName": "D:\\new\\inputs.xlsx", "workers": 4, "fileSizeLimit_GB": 0.5, "checksum": True}


def test_unreadable_settings_lines_are_all_named_at_once():
    with pytest.raises(SettingsError) as caught:
        read_settings_block("workers = four\ndropboxDir = 'C:\\x\nsheet name = 'a'\n", Path("app.py"))
    text = caught.value.describe()
    assert "3 line(s)" in text and "'four' is not a number" in text and "no closing '" in text
    assert "not of the form name = value" in text


def test_a_path_mangled_by_python_escapes_is_caught_and_explained(tmp_path):
    spec = [Setting("excelName", "inputs.xlsx", Path, "the workbook")]
    with pytest.raises(SettingsError, match="control character"):
        resolve(spec, {"excelName": "D:\new\\inputs.xlsx"}, None, script=tmp_path / "app.py")


def _tool_copy(tmp_path: Path, script: str, edit: dict[str, str]) -> Path:
    """A copy of one of the scripts with some settings lines replaced, next to the package."""
    folder = tmp_path / "tool"
    folder.mkdir()
    (folder / "archive_dropbox").symlink_to(REPO / "archive_dropbox", target_is_directory=True)
    text = (REPO / script).read_text(encoding="utf-8")
    lines = []
    for line in text.splitlines():
        name = line.split("=", 1)[0].strip()
        lines.append(f"{name} = {edit[name]}" if name in edit and "=" in line else line)
    copy = folder / Path(script).name
    copy.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return copy


def test_app_py_runs_with_windows_paths_in_its_settings_lines(tmp_path):
    copy = _tool_copy(tmp_path, "app.py", {"dropboxDir": r"'C:\Users\me\Dropbox'",
                                           "sheetName": "'dropboxUpload_APP'"})
    result = subprocess.run([sys.executable, str(copy), "--dry-run", "--logs", str(tmp_path / "logs")],
                            env=script_env(), capture_output=True, text=True, encoding="utf-8", timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "C:\\Users\\me\\Dropbox" in output and "Traceback" not in output and "SyntaxError" not in output


def test_a_bad_settings_line_is_a_message_not_a_traceback(tmp_path):
    copy = _tool_copy(tmp_path, "joinFiles.py", {"excelName": "inputs.xlsx"})  # quotes forgotten
    result = subprocess.run([sys.executable, str(copy), "--logs", str(tmp_path / "logs")], env=script_env(),
                            capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert result.returncode == 2 and "put text in quotes" in result.stderr and "Traceback" not in result.stderr


def test_an_unwritable_logs_folder_is_a_message(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    result = subprocess.run([sys.executable, str(REPO / "joinFiles.py"), "--logs", str(blocker)],
                            env=script_env(), capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert result.returncode == 4 and "cannot be written" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("failure", ["missing package", "import error", "settings error"])
def test_the_window_stays_open_whatever_stops_the_script(tmp_path, monkeypatch, capsys, failure):
    prompts = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": prompts.append(prompt) or "")
    monkeypatch.setattr(sys, "argv", ["app.py"])
    if failure == "missing package":
        def missing():
            print("Missing Python packages: pandas.", file=sys.stderr)
            raise SystemExit(4)
        monkeypatch.setattr("archive_dropbox.requirements_check.ensure_requirements", missing)
    elif failure == "import error":
        real = start.importlib.import_module
        monkeypatch.setattr(start.importlib, "import_module",
                            lambda name: (_ for _ in ()).throw(ImportError("DLL load failed")) if "runner" in name
                            else real(name))
    settings = "workers = many\n" if failure == "settings error" else "sheetName = 'dropboxUpload_API'\n"
    code = start.launch(str(tmp_path / "app.py"), "doc", settings, "app", is_double_clicked=lambda: True)
    err = capsys.readouterr().err
    assert prompts == ["\nPress Enter to close this window."]
    assert code == {"missing package": 4, "import error": 70, "settings error": 2}[failure]
    assert {"missing package": "pandas", "import error": "DLL load failed",
            "settings error": "'many' is not a number"}[failure] in err


def test_a_console_shared_with_a_shell_is_left_alone_one_of_its_own_is_kept_open():
    names = {1: "py.exe", 2: "cmd.exe", 3: "powershell.exe", 4: None}.get
    assert start.console_is_ours(10, [10], names)  # python.exe double-clicked
    assert start.console_is_ours(10, [10, 1], names)  # py.exe ran python.exe as its child
    assert not start.console_is_ours(10, [10, 2], names)  # typed in cmd
    assert not start.console_is_ours(10, [10, 1, 3], names)  # `py app.py` in PowerShell
    assert not start.console_is_ours(10, [10, 4], names)  # unknown: it may be a shell


def test_every_script_starts_through_the_wrapper():
    for script in ("app.py", "joinFiles.py", "preProcess/1_listDirToZip.py", "preProcess/2_zipDir.py"):
        text = (REPO / script).read_text(encoding="utf-8")
        assert "SETTINGS = r'''" in text and "launch(__file__, __doc__, SETTINGS" in text, script
        compile(text, script, "exec")


def test_names_outside_the_console_code_page_never_drop_a_line(tmp_path):
    """Issue 14, item 13: output redirected to a file in cp1252 (Task Scheduler, a .bat)."""
    missing = tmp_path / "日本 données" / "x.bin_split_0001"
    result = subprocess.run([sys.executable, str(REPO / "joinFiles.py"), str(missing), "--logs", str(tmp_path / "l")],
                            env=script_env({"PYTHONIOENCODING": "cp1252"}), capture_output=True, timeout=120)
    output = (result.stdout + result.stderr).decode("cp1252")
    assert result.returncode == 2
    assert "Logging error" not in output and "UnicodeEncodeError" not in output
    assert "\\u65e5\\u672c donn\u00e9es" in output  # escaped, and the line is there


def test_a_windows_path_or_a_missing_ca_bundle_in_the_settings_is_a_message(tmp_path):
    """Found by a newcomer: a Windows path in a settings line on Linux was joined to the script's
    folder ('/…/C:\\Users\\me\\Dropbox does not exist'), a missing caBundle gave a traceback."""
    result = subprocess.run([sys.executable, str(REPO / "app.py"), "--dry-run", "--logs", str(tmp_path / "logs"),
                             "--sheet", "dropboxUpload_APP", "--dropboxDir", r"C:\Users\me\Dropbox",
                             "--caBundle", str(tmp_path / "missing.pem")],
                            env=script_env(), capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert r"'dropboxDir' = 'C:\Users\me\Dropbox' looks like a Windows drive path" in result.stderr
    assert "'caBundle'" in result.stderr and "does not exist" in result.stderr and "Traceback" not in result.stderr
