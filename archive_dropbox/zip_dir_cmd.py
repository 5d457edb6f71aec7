"""What preProcess/2_zipDir.py runs: its settings, `--dry-run`, the `zipDir` tab checked row by
row before anything changes, the choice of zip engine, then zipping.py's work on every folder.
The exit status is 1 when any row failed."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Iterator

from . import deflate_zip, errors, zipping
from .cli import RunContext
from .errors import SheetProblem
from .settings import Setting
from .sheets import FLAG, LOCAL_DIR, Column, RowCheck, SheetRow, read_tab, tool_files_check
from .zipping import DEFAULT_COMPRESSION_LEVEL, ENGINES, FolderJob, IsalZip, PythonZip, SevenZip


def _program_check(value: str) -> str | None:
    if zipping.resolve_program(value) is None:
        return ("cannot be found or is not a program: give the full path of 7z.exe / 7zz, "
                "or leave it empty to look for 7-Zip automatically")
    return None


SETTINGS = [
    Setting("excelName", "zipDir.xlsx", Path,
            "workbook with the zipDir tab (relative to the script's folder, or a full path)"),
    Setting("sheetName", "zipDir", str, "tab listing the folders: columns inputDir, deleteFlag"),
    Setting("compressionLevel", DEFAULT_COMPRESSION_LEVEL, int,
            "0 = store only, 1 = fastest ... 9 = smallest and slowest", minimum=0, maximum=9),
    Setting("zipEngine", "isal", str,
            "what writes the archives: 'isal' (ISA-L on every core, fastest), '7zip' (7-Zip, "
            "when installed) or 'zipfile' (Python's own zip, one core)", choices=ENGINES),
    Setting("threads", 0, int, "CPU threads for zipping (ISA-L or 7-Zip); 0 = every core of this computer",
            minimum=0, maximum=4096),
    Setting("sevenZipPath", "", str,
            "7-Zip program (7z.exe, 7zz, 7z or 7za) for zipEngine '7zip'; empty = look for it automatically",
            optional=True, check=_program_check),
    Setting("useSevenZip", True, bool,
            "older setting: False always uses Python's own zip, whatever zipEngine says"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="check the workbook and say what each row would do; change nothing")


def _comparable(path: Path) -> str:
    return os.path.normcase(str(path.resolve()))


def _inside(inner: str, outer: str) -> bool:
    return inner != outer and inner.startswith(outer.rstrip(os.sep) + os.sep)


def read_zip_rows(workbook: Path, tab: str, *, protect: RowCheck | None = None) -> list[SheetRow]:
    """Preflight: read the tab and check every row, listing every problem at once. `protect`
    refuses rows holding the tool itself (see `tool_files_check`)."""
    seen: list[tuple[SheetRow, str]] = []

    def check(row: SheetRow) -> Iterator[SheetProblem]:
        folder: Path = row["inputDir"]
        if folder is None:
            return
        if folder.name == "" or folder.parent == folder:
            yield row.problem(f"inputDir {folder} is the top of a drive; give a folder inside it",
                              "inputDir")
            return
        if folder.is_symlink():
            # Followed, a link would zip, and with deleteFlag = 1 delete, the files of another folder.
            yield row.problem(f"inputDir {folder} is a symbolic link (to {os.readlink(folder)}); links are "
                              "never followed: give the folder it points to instead", "inputDir")
            return
        archive = zipping.archive_path(folder)
        if not folder.exists():
            if archive.is_file() and zipping.read_archive_mark(archive) is not None:
                pass  # finished earlier and its originals deleted: nothing to do
            else:
                yield row.problem(f"inputDir {folder} does not exist: check the spelling, and that "
                                  "the drive is connected", "inputDir")
                return
        if archive.is_dir():
            yield row.problem(f"a folder named {archive.name} is in the way of the archive; "
                              "rename it", "inputDir")
        elif folder.exists() and not os.access(folder.parent, os.W_OK):
            yield row.problem(f"the archive cannot be written beside {folder} (no permission "
                              f"to write in {folder.parent})", "inputDir")
        key = _comparable(folder)
        for earlier, earlier_key in seen:
            if key == earlier_key:
                yield row.problem(f"inputDir {folder} is already listed in row {earlier.row}; "
                                  "delete one of the two rows", "inputDir")
            elif _inside(key, earlier_key) or _inside(earlier_key, key):
                inner, outer = (row, earlier) if _inside(key, earlier_key) else (earlier, row)
                yield row.problem(f"the folder of row {inner.row} is inside the folder of row "
                                  f"{outer.row} ({outer['inputDir']}), so it would be zipped twice; "
                                  "keep only one of the two rows", "inputDir")
        if protect is not None:
            yield from protect(row)
        seen.append((row, key))

    return read_tab(workbook, tab, [Column("inputDir", LOCAL_DIR), Column("deleteFlag", FLAG)],
                    row_check=lambda row: list(check(row)))


def choose_engine(settings, log) -> IsalZip | SevenZip | PythonZip:
    """The zip engine the settings ask for (zipEngine, useSevenZip, compressionLevel, threads,
    sevenZipPath), named in the log; Python's zipfile when 7-Zip is asked for but not found."""
    level = settings.compressionLevel
    if not settings.useSevenZip:
        log.info("useSevenZip is False: zipping with Python's zipfile (one core).")
        return PythonZip(level)
    if settings.zipEngine == "zipfile":
        log.info("zipEngine is 'zipfile': zipping with Python's zipfile (one core).")
        return PythonZip(level)
    threads = settings.threads or zipping.every_core()
    if settings.zipEngine == "isal":
        engine = IsalZip(level, threads)
        log.info("Using ISA-L %s: compressionLevel %d is ISA-L level %d (0 = store), %d threads.",
                 deflate_zip.ISAL_VERSION, level, zipping.isal_level(level), threads)
        return engine
    configured = settings.sevenZipPath
    executable = zipping.find_seven_zip(configured)
    if executable is None:
        log.info("7-Zip was not found (looked for 7zz, 7z and 7za on PATH%s): zipping with Python's "
                 "zipfile instead, which works but uses one core and is slower. Installing 7-Zip "
                 "(https://www.7-zip.org) makes this faster.",
                 ", and in Program Files" if os.name == "nt" else "")
        return PythonZip(level)
    engine = SevenZip(executable, level, threads)
    log.info("Using 7-Zip: %s (%s)", executable, engine.version())
    return engine


def run(context: RunContext) -> int:
    """Entry point of preProcess/2_zipDir.py (called by cli.run_script); returns the exit status."""
    settings, log = context.settings, context.log
    # 2_zipDir.py sits in preProcess/: the whole tool (app.py, the package) is the folder above.
    protect = tool_files_check("inputDir", tool_folder=context.script.parent.parent, script=context.script,
                               logs_folder=context.logs_root)
    rows = read_zip_rows(settings.excelName, settings.sheetName, protect=protect)
    log.info("Workbook %s, tab '%s': %d folder(s) to zip.", settings.excelName, settings.sheetName,
             len(rows))
    if getattr(context.args, "dry_run", False):
        for row in rows:
            log.info("[row %d] %s", row.row, zipping.planned_action(row["inputDir"], bool(row["deleteFlag"])))
        log.info("Dry run: nothing was changed.")
        return errors.EXIT_OK
    engine = choose_engine(settings, log)
    outcomes = zipping.zip_folders([FolderJob(row.row, row["inputDir"], bool(row["deleteFlag"])) for row in rows],
                                   engine=engine, log=log)
    failed = [o for o in outcomes if not o.ok]
    log.info("Summary: %d row(s): %d done, %d failed.", len(outcomes), len(outcomes) - len(failed),
             len(failed))
    for outcome in failed:
        log.error("  row %s, %s: %s", outcome.row, outcome.folder, outcome.result)
    return errors.EXIT_OK if not failed else errors.EXIT_SOME_FAILED
