"""What preProcess/1_listDirToZip.py runs: its settings, `--output-dir` and `--threads`, and the
run: read the `listDirToZip` tab, refuse rows that overlap, then let scan.py walk the folders and
write the lists. The exit status is 1 whenever a folder could not be read completely."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from . import errors, tabs
from .cli import RunContext
from .scan import (AUTO_THREADS, DEFAULT_MIN_FILES, MAX_THREADS, ZIP_WORKBOOK, scan_folders,
                   write_zip_lists)
from .settings import Setting
from .sheets import SheetRow, read_tab


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be more than 0"


SETTINGS = [
    Setting("excelName", "zipDir.xlsx", Path,
            "workbook holding the tab to read (relative paths start at the script's folder)"),
    Setting("sheetName", "listDirToZip", str, "tab with the column inputDir"),
    Setting("fileSizeLimit_GB", 500, float,
            "largest folder, in GB, proposed for one archive", check=_positive),
    Setting("minFiles", DEFAULT_MIN_FILES, int,
            "a folder is proposed for zipping only when it holds at least this many files",
            minimum=1),
]


def _thread_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be between 0 (automatic) and {MAX_THREADS}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", metavar="DIR", default=None,
                        help="where directorySize.txt, directoryZipList.txt and "
                             "directoryZipList.xlsx are written (default: the script's folder)")
    parser.add_argument("--threads", metavar="N", type=_thread_count, default=0,
                        help="folders read at the same time; 0 (default) starts with one and uses "
                             f"{AUTO_THREADS} when the storage is slow to answer (network shares)")


def _output_dir(context: RunContext) -> Path:
    chosen = getattr(context.args, "output_dir", None)
    folder = Path(chosen).expanduser().resolve() if chosen else context.script.parent
    if folder.exists() and not folder.is_dir():
        raise errors.SettingsError(
            f"--output-dir {folder} is a file: give a folder for the result lists.", paths=[folder])
    return folder


def _same_or_inside(inner: Path, outer: Path) -> bool:
    # Whole path components: /data/a10 is not inside /data/a1.
    return inner == outer or outer in inner.parents


def _overlap_problems(rows: Sequence[SheetRow]) -> list[errors.SheetProblem]:
    """Rows naming the same folder, or a folder inside another row's, would be counted twice."""
    resolved = []
    for row in rows:
        try:
            resolved.append(Path(row["inputDir"]).resolve())
        except OSError:
            resolved.append(Path(row["inputDir"]).absolute())
    problems = []
    for i, row in enumerate(rows):
        for j, other in enumerate(rows):
            if i == j:
                continue
            if resolved[i] == resolved[j] and j < i:
                problems.append(row.problem(
                    f"inputDir {row['inputDir']} is the same folder as row {other.row}: delete one "
                    "of the two rows", "inputDir"))
                break
            if resolved[i] != resolved[j] and _same_or_inside(resolved[i], resolved[j]):
                problems.append(row.problem(
                    f"inputDir {row['inputDir']} is inside the folder of row {other.row} "
                    f"({other['inputDir']}), which is already scanned whole: delete this row",
                    "inputDir"))
                break
    return problems


def run(context: RunContext) -> int:
    """1_listDirToZip.py (called by cli.run_script); returns the exit status."""
    log = context.log
    settings = context.settings
    limit_gb = settings.fileSizeLimit_GB
    min_files = settings.minFiles
    threads = getattr(context.args, "threads", 0) or 0
    output_dir = _output_dir(context)
    rows = read_tab(settings.excelName, settings.sheetName, list(tabs.LIST_DIR_TO_ZIP.columns))
    overlaps = _overlap_problems(rows)
    if overlaps:
        raise errors.SheetError(overlaps)

    log.info("Workbook %s, tab '%s': %d folder(s) to scan. fileSizeLimit_GB = %g, minFiles = %d, "
             "threads = %s.", Path(settings.excelName), settings.sheetName, len(rows), limit_gb,
             min_files, threads or "automatic")
    scanned = scan_folders([(f"Row {row.row}", row["inputDir"]) for row in rows], threads=threads, log=log)
    if not scanned.trees:
        log.error("No folder could be read, so the result files of the previous run were left as "
                  "they are. Fix the permissions or connect the drive and run the script again.")
        return errors.EXIT_SOME_FAILED
    write_zip_lists(output_dir, scanned.trees, limit_gb=limit_gb, min_files=min_files, log=log)
    log.info("Next: paste the rows of %s into the 'zipDir' tab of zipDir.xlsx and run 2_zipDir.py.",
             ZIP_WORKBOOK)
    if not scanned.complete:
        log.error("Some folders could not be read completely (see the warnings): the lists are "
                  "incomplete. Fix the permissions and run the script again.")
        return errors.EXIT_SOME_FAILED
    return errors.EXIT_OK
