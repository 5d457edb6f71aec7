"""What every script shares: flags, settings, the run log, and turning errors into one clear
message and an exit code. Scripts call `run_script` and nothing else."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from . import errors
from .logs import close_log, make_console_safe, start_log
from .settings import Setting, Settings, add_setting_flags, read_settings_block, resolve
from .winconsole import long_run_console


@dataclass
class RunContext:
    """Handed to a script's `main`: everything it needs and nothing global."""

    script: Path
    settings: Settings
    args: argparse.Namespace
    log: logging.Logger
    log_path: Path
    logs_root: Path
    # (path, why) of files Stage 1 skipped (unreadable): failures of the run, listed in its summary.
    stage1_failures: list = field(default_factory=list)


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
    settings_text: str | None = None,
) -> int:
    """Parse flags, check settings, open the log, run `main`, and map errors to exit codes.

    `settings_text` is the script's settings block (read by settings.read_settings_block);
    without it `script_values` holds the values. Keeping the window open after a double-click
    is start.launch's job, which wraps this."""
    script = Path(script).resolve()
    make_console_safe()
    spec = list(spec)
    # Read before the parser is built, so that --help shows the script's own values; a bad line
    # is reported after the flags are parsed, as before (so --help still works with one).
    block_problem: errors.ArchiveError | None = None
    if settings_text is not None:
        try:
            script_values = read_settings_block(settings_text, script)
        except errors.ArchiveError as exc:
            block_problem, script_values = exc, {}
    args = _parser(script, description, spec, script_values, add_arguments).parse_args(argv)

    repo_root = script.parent.parent if script.parent.name == "preProcess" else script.parent
    logs_root = Path(args.logs).resolve() if args.logs else repo_root / "logs"
    code = errors.EXIT_BUG
    log: logging.Logger | None = None
    try:
        try:
            if block_problem is not None:
                raise block_problem
            settings = resolve(spec, script_values, args, script=script)
        except errors.ArchiveError as exc:
            print(exc.describe(), file=sys.stderr)
            code = exc.exit_code
            return code
        try:
            log, log_path = start_log(logs_root / log_subdir, log_name)
        except OSError as exc:
            print(f"The log folder {logs_root / log_subdir} cannot be written ({exc.strerror or exc}). Make it "
                  "writable, or give another folder with --logs DIR; nothing was changed.", file=sys.stderr)
            code = errors.EXIT_ENVIRONMENT
            return code
        context = RunContext(script=script, settings=settings, args=args, log=log,
                             log_path=log_path, logs_root=logs_root)
        try:
            with long_run_console(log):
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


def _parser(script: Path, description: str, spec: list[Setting], script_values: Mapping[str, Any],
            add_arguments: Callable[[argparse.ArgumentParser], None] | None) -> argparse.ArgumentParser:
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
    add_setting_flags(parser, spec, script_values)
    return parser

