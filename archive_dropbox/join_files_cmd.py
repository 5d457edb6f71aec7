"""What joinFiles.py runs: its settings, the parts given on the command line (`--delete`,
`--unzip`) or else the rows of the `joinFiles` tab, checked all together before anything changes,
then joined by joining.py. The exit status is 1 when any split file failed or was not unzipped."""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli import RunContext
from .errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_SOME_FAILED, ArchiveError, SheetError
from .joining import JoinJob, Ready, human_size, preflight, process_jobs
from .settings import Setting
from .tabs import JOIN_FILES

SETTINGS = [
    Setting("excelName", "inputs.xlsx", Path,
            "workbook holding the joinFiles tab (next to joinFiles.py, or a full path)"),
    Setting("sheetName", "joinFiles", str, "tab with the columns inputFile, deleteFlag, unzipFlag"),
]


class JoinInputError(ArchiveError):
    """Files given on the command line cannot be joined as they are; nothing was changed."""

    title = "Cannot start"
    exit_code = EXIT_BAD_INPUT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help="first part of a split file (…_split_0001) to join; several may be given. "
                             "Dropping a part on joinFiles.py does the same. When given, the workbook "
                             "is not read.")
    parser.add_argument("--delete", action="store_true",
                        help="with PART: delete the parts once the joined file is verified (deleteFlag=1)")
    parser.add_argument("--unzip", action="store_true",
                        help="with PART: unzip a joined .zip next to it, then delete the .zip (unzipFlag=1)")


def _ready_from_command_line(jobs: list[JoinJob]) -> Ready:
    """The jobs preflight found ready; JoinInputError lists every problem when there is one."""
    ready, problems = preflight(jobs)
    if problems:
        listed = "\n".join(f"  - {jobs[index].where}: {message}" for index, message in problems)
        raise JoinInputError(f"{len(problems)} problem(s) found before starting; nothing was changed.\n{listed}")
    return ready


def _ready_from_sheet(workbook: Path, tab: str) -> Ready:
    """The tab's rows as jobs preflight found ready; SheetError lists, in one pass, the problems of
    the cells and those preflight finds in the rows whose inputFile could be read."""
    # Imported here: pandas takes half a second to load, and a part dropped on the script needs no sheet.
    from .sheets import read_tab_with_problems

    rows, problems = read_tab_with_problems(workbook, tab, list(JOIN_FILES.columns))
    rows = [row for row in rows if row["inputFile"] is not None]
    jobs = [JoinJob(row["inputFile"], bool(row["deleteFlag"]), bool(row["unzipFlag"]), f"row {row.row}")
            for row in rows]
    ready, refused = preflight(jobs)
    found = [rows[index].problem(message, "inputFile") for index, message in refused]
    if problems and found:
        raise SheetError(sorted([*problems, *found], key=lambda problem: problem.row or 0))
    if problems or found:
        raise SheetError(problems or found)
    return ready


def run(context: RunContext) -> int:
    """joinFiles.py: join every row of the joinFiles tab, or the parts named on the command line."""
    log, args, settings = context.log, context.args, context.settings
    if args.parts:
        jobs = [JoinJob(Path(p).expanduser().absolute(), args.delete, args.unzip, p) for p in args.parts]
        log.info("Joining %d split file(s) given on the command line", len(jobs))
        ready = _ready_from_command_line(jobs)
    else:
        if args.delete or args.unzip:
            log.info("--delete and --unzip apply to parts given on the command line; the workbook's "
                     "deleteFlag and unzipFlag columns are used instead")
        workbook = Path(settings.excelName)
        log.info("Reading tab '%s' of %s", settings.sheetName, workbook)
        ready = _ready_from_sheet(workbook, settings.sheetName)
    log.info("%d split file(s) to process", len(ready))

    tally = process_jobs(ready, log)
    counts = tally.counts
    log.info("Summary: %d joined, %d already joined, %d with nothing to do, %d failed%s; %s joined in %.1f s",
             counts["joined"], counts["verified"] + counts["resumed"], counts["skipped"], counts["failed"],
             f" ({counts['not unzipped']} joined but not unzipped)" if counts["not unzipped"] else "",
             human_size(tally.joined_bytes), tally.seconds)
    if counts["failed"] or counts["not unzipped"]:
        log.error("%d split file(s) failed, %d joined file(s) were not unzipped: see the messages above; fix "
                  "what they say and run joinFiles.py again.", counts["failed"], counts["not unzipped"])
        return EXIT_SOME_FAILED
    return EXIT_OK
