"""What every transfer job of app.py does before its first byte: connect to Dropbox, read and
check its tab (Stage 1, with its own log in logs/dataPrep), settle deletions a killed run left
half-recorded, and bind the journal to the account it describes.

Shared by the three engines (api_upload, desktop_upload, download) and `--verify` (audit); it
sits below them so that no engine imports the command module app_runner.
"""

from __future__ import annotations

from pathlib import Path

from . import destinations, prepare, sheets, tabs
from .cli import RunContext
from .credentials import default_token_file, load_credentials
from .dropbox_client import DropboxClient
from .errors import ArchiveError, SheetError
from .logs import PER_FILE, close_log, start_log

UPLOAD_COLUMNS = {tab.name: list(tab.columns) for tab in (tabs.UPLOAD_API, tabs.UPLOAD_APP)}


def token_file(context: RunContext) -> Path:
    return context.settings.tokenFile or default_token_file()


def open_client(context: RunContext, *, workers: int = 4):
    """Credentials from the environment, the login file or the accessToken setting; checked now."""
    settings = context.settings
    credentials = load_credentials(token_file=token_file(context), access_token_setting=settings.accessToken,
                                   app_key_setting=settings.appKey, log=context.log)
    client = DropboxClient(credentials, ca_bundle=str(settings.caBundle) if settings.caBundle else None,
                           proxy=settings.proxy or None, max_connections=workers * 2 + 4,
                           use_team_space=settings.teamSpace)
    account = client.connect()
    context.log.info("Dropbox account: %s <%s>%s (credentials from %s).", account.name, account.email,
                     ", team space" if account.team_root and settings.teamSpace else "", credentials.where)
    return client


def prepare_rows(context: RunContext, sheet: str, *, destination_of_row, part_limit: int,
                 already_done: set[str], mode: str, bytes_per_second: float,
                 row_check: sheets.RowCheck | None = None, describe_plan=None,
                 sent_unchanged=None, settled_folder=None) -> prepare.Plan:
    """Stage 1 with its own log in logs/dataPrep: read the tab, expand, check and plan.

    Rows holding the tool itself (app.py's folder, the logs, the workbook) are refused in every
    mode; `row_check(row)` adds mode-specific sheet problems; `describe_plan(plan, logger)` adds
    mode-specific lines (e.g. the desktop-app batches) to both logs."""
    prep_log, prep_path = start_log(context.logs_root / "dataPrep", "", console=False)
    try:
        prep_log.info("Data preparation for tab '%s' of %s", sheet, context.settings.excelName)
        context.log.info("Stage 1, data preparation (log: %s)", prep_path)
        protect = sheets.tool_files_check("inputFile", tool_folder=context.script.parent, script=context.script,
                                          logs_folder=context.logs_root)

        def check(row: sheets.SheetRow) -> list:
            # The mode's own check compares both paths; a row missing one has its problem already.
            both = row["inputFile"] is not None and row["outputDir"] is not None
            return [*protect(row), *(row_check(row) if row_check is not None and both else ())]

        def missing_input(row: sheets.SheetRow) -> list:
            source = row["inputFile"]
            if source is None or source.exists() or source.is_symlink() or str(source) in already_done:
                return []
            return [row.problem(f"inputFile {source} does not exist: check the spelling, and that the drive "
                                "is connected", "inputFile")]

        try:
            rows, problems = sheets.read_tab_with_problems(context.settings.excelName, sheet, UPLOAD_COLUMNS[sheet],
                                                           row_check=check)
            # Every problem in one pass: rows whose two paths are fine are planned (their files listed
            # and checked) whatever the other rows hold; the others get their inputFile looked at.
            troubled = {(problem.row, problem.column) for problem in problems}
            plannable = [row for row in rows
                         if not troubled & {(row.row, "inputFile"), (row.row, "outputDir")}]
            planned = {id(row) for row in plannable}
            for row in rows:
                if id(row) not in planned and (row.row, "inputFile") not in troubled:
                    problems.extend(missing_input(row))
            progress = prepare.PlanProgress(context.log)
            try:
                plan = prepare.build_plan(plannable, input_column="inputFile", output_column="outputDir",
                                          delete_column="deleteAfterUpload", destination_of_row=destination_of_row,
                                          part_limit=part_limit, log=prep_log, already_done_sources=already_done,
                                          progress=progress, sent_unchanged=sent_unchanged,
                                          settled_folder=settled_folder)
            except SheetError as exc:
                problems, plan = problems + exc.problems, exc.plan
            finally:
                progress.close()
            if problems:
                raise SheetError(sorted(problems, key=lambda problem: problem.row or 0), plan=plan)
        except ArchiveError as exc:
            prep_log.error("%s", exc.describe())
            raise
        for logger in (prep_log, context.log):
            prepare.log_plan(plan, logger, mode=mode, bytes_per_second=bytes_per_second)
            if describe_plan is not None:
                describe_plan(plan, logger)
        prepare.log_skipped(plan, prep_log)
        # The run's summary gets no plan; what could not be read is one of its failures (exit 1).
        context.stage1_failures = [(path, f"cannot be read ({reason}): skipped, not sent")
                                   for path, reason in plan.unreadable]
        return plan
    finally:
        close_log(prep_log)


def with_dropbox_side(error: SheetError, context: RunContext, connect) -> SheetError:
    """`error` with the destination problems of the rows Stage 1 could plan added (when a login
    works; without one the local problems come first and these follow once they are fixed)."""
    if error.plan is None or not error.plan.sources:
        return error
    client = destinations.client_for_dry_run(connect, context.log, dry_run=False)
    if client is None:
        return error
    more = destinations.check_destinations(client, error.plan, destination_of_row=lambda row: row["outputDir"],
                                           log=context.log)
    return SheetError([*error.problems, *more], plan=error.plan) if more else error


def settle_interrupted_deletions(journal, log) -> None:
    """A run stopped between deleting an original and recording it: finish the bookkeeping
    (one line per original in the log file, their count on the console)."""
    settled = journal.finish_interrupted_deletions()
    for source, gone in settled:
        log.info("%s\t%s (its deletion was interrupted in an earlier run)", "DELETED" if gone else "KEPT", source,
                 extra=PER_FILE)
    if settled:
        deleted = sum(1 for _, gone in settled if gone)
        log.info("%d original(s) whose deletion was interrupted in an earlier run: %d deleted, %d kept (each is "
                 "listed in the log).", len(settled), deleted, len(settled) - deleted)


def bind_account(journal, client, log) -> bool:
    """The journal's "done" is true of one Dropbox account and root namespace only. Whether it
    described another one until now (its done items and settled folders are then forgotten)."""
    account = client.account
    previous = journal.bind_account(account.account_id, account.root_namespace)
    if previous is not None:
        log.warning("This journal was written for another Dropbox account or root (account %s, namespace %s); "
                    "now %s (%s). Nothing it records counts as uploaded here: every file is looked up in this "
                    "Dropbox and sent when missing, and originals are deleted only once this Dropbox holds them.",
                    previous[0], previous[1], account.account_id, account.email)
    return previous is not None


def plan_rows(plan: prepare.Plan) -> list:
    """The rows that have files in `plan`, each once, in plan order."""
    known = getattr(plan.sources, "rows", None)  # a PlanStore keeps them
    if known is not None:
        return list(known)
    seen = {}
    for source in plan.sources:
        seen[id(source.row)] = source.row
    return list(seen.values())
