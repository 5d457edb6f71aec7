"""How every script starts: one wrapper around everything, including the checks that run before
any package can be imported, so that a user who double-clicked a script always reads what
happened before its window closes.

Standard library only: it must work on a machine where nothing is installed yet.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path

# script -> (module, settings spec, main, log folder, log name, extra flags)
SCRIPTS = {
    "app": ("app_runner", "SETTINGS", "run", "upload", "", "add_arguments"),
    "joinFiles": ("join_files_cmd", "SETTINGS", "run", "dataPrep", "joinFiles", "add_arguments"),
    "zipDir": ("zip_dir_cmd", "SETTINGS", "run", "preProcess", "zipDir", "add_arguments"),
    "listDirToZip": ("list_dir_cmd", "SETTINGS", "run", "preProcess", "listDirToZip", "add_arguments"),
}
EXIT_BUG = 70
EXIT_INTERRUPTED = 130
# A double-clicked .py runs under the py launcher (py.exe starts python.exe as its child) or
# python.exe alone: then these are the only processes attached to the new console window.
LAUNCHERS = {"py.exe", "pyw.exe", "python.exe", "pythonw.exe"}


def console_is_ours(own_pid: int, console_pids: list[int], image_name) -> bool:
    """True when no shell shares this console: it was opened for this script and closes with it.

    `console_pids` comes from GetConsoleProcessList; `image_name(pid)` gives a process's
    executable name (lower case) or None when it cannot be read (then it may be a shell)."""
    others = [pid for pid in console_pids if pid != own_pid]
    return all(image_name(pid) in LAUNCHERS for pid in others)


def _windows_console_pids() -> list[int]:
    import ctypes  # Windows only: loaded where the Windows API is called

    pids = (ctypes.c_uint * 16)()
    count = ctypes.windll.kernel32.GetConsoleProcessList(pids, 16)
    return list(pids[:min(count, 16)])


def _windows_image_name(pid: int) -> str | None:
    import ctypes  # Windows only: loaded where the Windows API is called
    from ctypes import wintypes  # the same

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return None
    try:
        size = wintypes.DWORD(32768)
        buffer = ctypes.create_unicode_buffer(size.value)
        if not kernel32.QueryFullProcessImageNameW(handle, 0, buffer, ctypes.byref(size)):
            return None
        return os.path.basename(buffer.value).lower()
    finally:
        kernel32.CloseHandle(handle)


def double_clicked() -> bool:
    """True when the script's console window closes as soon as it exits (Windows only)."""
    if os.environ.get("ARCHIVE_DROPBOX_NO_PAUSE") or sys.platform != "win32":
        return False
    try:
        return console_is_ours(os.getpid(), _windows_console_pids(), _windows_image_name)
    except Exception:  # noqa: BLE001 - no console API: nothing to keep open
        return False


def pause_if_double_clicked(is_double_clicked=double_clicked) -> None:
    if is_double_clicked():
        try:
            input("\nPress Enter to close this window.")
        except (EOFError, KeyboardInterrupt):
            pass


def launch(script_file: str, description: str, settings_text: str, which: str, *,
           is_double_clicked=double_clicked) -> int:
    """Run one of the scripts: check the packages, read its settings block, run it, and keep
    the window open when it was double-clicked - whatever happens, even an import error."""
    code = EXIT_BUG
    for stream in (sys.stdout, sys.stderr):  # see logs.make_console_safe (not importable before the check)
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        code = _run(Path(script_file), description, settings_text, which)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        print("Stopped by the user (Ctrl-C).", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except BaseException:  # noqa: BLE001 - the user must be able to read whatever went wrong
        print(f"{Path(script_file).name} could not start (a bug or a broken installation, not your input):\n"
              f"{traceback.format_exc()}\nReinstall the packages with "
              f"`{Path(sys.executable).name} -m pip install -r requirements.txt`; if that does not help, "
              "report this message.", file=sys.stderr)
        code = EXIT_BUG
    finally:
        pause_if_double_clicked(is_double_clicked)
    return code


def _run(script: Path, description: str, settings_text: str, which: str) -> int:
    # Imported here, inside launch's error handling: a broken installation is then reported
    # in words before the window closes, not as a bare traceback from the script's first line.
    from .requirements_check import ensure_requirements

    ensure_requirements()
    module_name, spec, main, log_subdir, log_name, add_arguments = SCRIPTS[which]
    module = importlib.import_module(f"archive_dropbox.{module_name}")
    from .cli import run_script  # needs the packages ensure_requirements has just checked

    return run_script(script=script, description=description, spec=getattr(module, spec),
                      script_values={}, settings_text=settings_text, main=getattr(module, main),
                      log_subdir=log_subdir, log_name=log_name, add_arguments=getattr(module, add_arguments))
