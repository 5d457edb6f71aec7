"""What every script shares: flags, settings, the run log, and turning errors into one clear
message and an exit code. Scripts call `run_script` and nothing else."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from . import errors
from .logs import close_log, redact, start_log
from .settings import Setting, Settings, add_setting_flags, resolve


@dataclass
class RunContext:
    """Handed to a script's `main`: everything it needs and nothing global."""

    script: Path
    settings: Settings
    args: argparse.Namespace
    log: logging.Logger
    log_path: Path
    logs_root: Path


def started_without_console() -> bool:
    """True when a double-click opened a console window that closes when we exit (Windows)."""
    if os.environ.get("ARCHIVE_DROPBOX_NO_PAUSE"):
        return False
    if sys.platform != "win32":
        return False
    try:
        import ctypes

        process_ids = (ctypes.c_uint * 4)()
        return ctypes.windll.kernel32.GetConsoleProcessList(process_ids, 4) <= 1
    except Exception:
        return False


def _pause_if_double_clicked() -> None:
    if started_without_console():
        try:
            input("\nPress Enter to close this window.")
        except (EOFError, KeyboardInterrupt):
            pass


def run_script(
    *,
    script: str | Path,
    description: str,
    spec: Iterable[Setting],
    script_values: Mapping[str, Any],
    main: Callable[[RunContext], int],
    log_subdir: str,
    log_name: str,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
) -> int:
    """Parse flags, check settings, open the log, run `main`, and map errors to exit codes."""
    script = Path(script).resolve()
    spec = list(spec)
    parser = argparse.ArgumentParser(
        prog=script.name,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Without flags the script uses the settings written at its top and the workbook "
        "next to it: double-clicking it is enough.",
    )
    parser.add_argument("--logs", metavar="DIR", default=None,
                        help="folder for logs and the journal (default: logs/ next to app.py)")
    if add_arguments is not None:
        add_arguments(parser)
    add_setting_flags(parser, spec)
    args = parser.parse_args(argv)

    repo_root = script.parent.parent if script.parent.name == "preProcess" else script.parent
    logs_root = Path(args.logs).resolve() if args.logs else repo_root / "logs"
    code = errors.EXIT_BUG
    log: logging.Logger | None = None
    try:
        try:
            settings = resolve(spec, script_values, args, script=script)
        except errors.ArchiveError as exc:
            print(exc.describe(), file=sys.stderr)
            code = exc.exit_code
            return code
        log, log_path = start_log(logs_root / log_subdir, log_name)
        context = RunContext(script=script, settings=settings, args=args, log=log,
                             log_path=log_path, logs_root=logs_root)
        try:
            code = int(main(context))
        except errors.ArchiveError as exc:
            log.error("%s", exc.describe())
            code = exc.exit_code
        except KeyboardInterrupt:
            log.warning("Stopped by the user (Ctrl-C). Nothing is lost: run the script again; "
                        "finished work is not redone.")
            code = errors.EXIT_INTERRUPTED
        except Exception:
            log.error("Unexpected internal error (a bug, not your input). Please report it with "
                      "this log file: %s\n%s", log_path, traceback.format_exc())
            code = errors.EXIT_BUG
        log.info("Finished with exit status %d. Log: %s", code, log_path)
        return code
    finally:
        if log is not None:
            close_log(log)
        _pause_if_double_clicked()


def fail_message(text: str) -> None:
    print(redact(text), file=sys.stderr)
