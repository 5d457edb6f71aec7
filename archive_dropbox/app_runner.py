"""What app.py runs: its settings, `--login`, and the job chosen by `sheetName` (upload through
the API, upload through the desktop app, or download), each as data preparation then transfer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import prepare, sheets, units
from .cli import RunContext
from .credentials import default_token_file, load_credentials, save_credentials
from .errors import EXIT_OK, EXIT_SOME_FAILED, ArchiveError, AuthError, EnvironmentProblem, SettingsError, SheetError
from .logs import close_log, start_log
from .settings import Setting, existing_file

SHEETS = ("dropboxUpload_APP", "dropboxUpload_API", "dropboxDownload_API")
MIB = 1024 * 1024

SETTINGS = [
    Setting("excelName", "inputs.xlsx", Path, "the workbook"),
    Setting("sheetName", "dropboxUpload_APP", str, "the tab to run", choices=SHEETS),
    Setting("dropboxDir", "", Path, "the local Dropbox folder (desktop-app mode)", optional=True),
    Setting("fileSizeLimit_GB", 500, float, "files above this size are split", minimum=0.000001),
    Setting("chunkSizeSplit_MB", 1024, int, "read/write block for split parts", minimum=1, maximum=16384),
    Setting("batchSize_GB", 1000, float, "desktop-app batch size", minimum=0.000001),
    Setting("sleepTime_min", 30, float, "minutes between re-checks", minimum=0.0001),
    Setting("batchTimeLimit_hour", 24, float, "hours before a slow batch is reported", minimum=0.0001),
    Setting("chunkSize_MB", 128, int, "bytes per upload request, in MiB", minimum=1, maximum=150),
    Setting("workers", 4, int, "files sent at the same time", minimum=1, maximum=64),
    Setting("connectionsPerFile", 8, int, "connections for one large file", minimum=1, maximum=32),
    Setting("memoryLimit_MB", 1024, int, "file data held in memory at once", minimum=16),
    Setting("ifExists", "report", str, "when a different file is already in Dropbox",
            choices=("report", "overwrite", "rename")),
    Setting("checksum", False, bool, "compare content hashes to skip files already in Dropbox"),
    Setting("appKey", "", str, "the Dropbox app key for --login", optional=True),
    Setting("accessToken", "", str, "an access token (discouraged)", optional=True, secret=True),
    Setting("tokenFile", "", Path, "where --login keeps the login", optional=True),
    Setting("teamSpace", True, bool, "use the team space root on Dropbox Business"),
    Setting("caBundle", "", Path, "CA certificate bundle for TLS", optional=True, check=existing_file),
    Setting("proxy", "", str, "HTTPS proxy URL", optional=True),
]

UPLOAD_COLUMNS = {
    "dropboxUpload_API": [sheets.Column("inputFile", sheets.LOCAL_PATH),
                          sheets.Column("outputDir", sheets.DROPBOX_PATH),
                          sheets.Column("deleteAfterUpload", sheets.FLAG)],
    "dropboxUpload_APP": [sheets.Column("inputFile", sheets.LOCAL_PATH),
                          sheets.Column("outputDir", sheets.LOCAL_DIR),
                          sheets.Column("deleteAfterUpload", sheets.FLAG)],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--login", action="store_true",
                        help="connect this tool to your Dropbox account once (opens a Dropbox page, asks for "
                             "the code it shows) and keep the login in a private per-user file")
    parser.add_argument("--sheet", metavar="TAB", choices=SHEETS, default=None,
                        help="run this tab instead of the sheetName setting")
    parser.add_argument("--dry-run", action="store_true",
                        help="only prepare: list, check and plan everything, send nothing")
    parser.add_argument("--verify", action="store_true",
                        help="API upload tab: compare every original with Dropbox now, by content hash (split "
                             "files through their parts and manifest); report identical / missing / different / "
                             "only in Dropbox on screen, in the log and in a CSV beside the log. Sends and deletes "
                             "nothing; exit status 0 only when every original is in Dropbox, identical")


def token_file(context: RunContext) -> Path:
    return context.settings.tokenFile or default_token_file()


def open_client(context: RunContext, *, workers: int = 4):
    """Credentials from the environment, the login file or the accessToken setting; checked now."""
    from .dropbox_client import DropboxClient

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


def login(context: RunContext) -> int:
    from .dropbox_client import finish_login, start_login

    app_key = context.settings.appKey or ""
    if not app_key:
        raise SettingsError("to log in, set appKey at the top of app.py to your Dropbox app's key (Dropbox "
                            "App Console: create an app with 'Full Dropbox' or 'App folder' access and the "
                            "files.content.write, files.content.read and files.metadata.read permissions).",
                            paths=[context.script])
    url, flow = start_login(app_key)
    context.log.info("1. Open this address in a browser and allow access:\n   %s", url)
    context.log.info("2. Paste the code Dropbox shows, then press Enter:")
    try:
        code = input().strip()
    except EOFError:
        code = ""
    if not code:
        raise AuthError("no code was entered; run `python app.py --login` again.")
    settings = context.settings
    credentials = finish_login(flow, code, ca_bundle=str(settings.caBundle) if settings.caBundle else None,
                               proxy=settings.proxy or None)
    path, private = save_credentials(credentials, token_file(context))
    if private:
        context.log.info("Logged in. The login is kept in %s (readable only by you). You can now run app.py.", path)
    else:
        context.log.warning("Logged in. The login is kept in %s, but it could not be made private: anyone who can "
                            "read that folder can use your Dropbox. Keep tokenFile empty (a private per-user "
                            "file) or point it to a folder only you can read. You can now run app.py.", path)
    return EXIT_OK


def run(context: RunContext) -> int:
    if context.args.login:
        return login(context)
    sheet = context.args.sheet or context.settings.sheetName
    if getattr(context.args, "verify", False):
        if sheet != "dropboxUpload_API":
            raise SettingsError(f"--verify compares an API upload tab with Dropbox; sheetName is '{sheet}'. Run "
                                "`python app.py --verify --sheet dropboxUpload_API`.", paths=[context.script])
        from .audit import run_verify

        return run_verify(context, sheet, prepare_rows=prepare_rows, open_client=open_client)
    if sheet == "dropboxUpload_API":
        return run_api_upload(context, sheet)
    if sheet == "dropboxUpload_APP":
        try:
            from . import app_upload
        except ImportError:
            raise EnvironmentProblem("uploading through the desktop app (sheetName = 'dropboxUpload_APP') is "
                                     "not available in this version yet. Use sheetName = 'dropboxUpload_API'.") from None
        return app_upload.run(context, sheet)
    try:
        from . import download
    except ImportError:
        raise EnvironmentProblem("downloading (sheetName = 'dropboxDownload_API') is not available in this "
                                 "version yet.") from None
    return download.run(context, sheet)


def prepare_rows(context: RunContext, sheet: str, *, destination_of_row, part_limit: int,
                 already_done: set[str], mode: str, bytes_per_second: float,
                 row_check: sheets.RowCheck | None = None, describe_plan=None) -> prepare.Plan:
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
            try:
                plan = prepare.build_plan(plannable, input_column="inputFile", output_column="outputDir",
                                          delete_column="deleteAfterUpload", destination_of_row=destination_of_row,
                                          part_limit=part_limit, log=prep_log, already_done_sources=already_done)
            except SheetError as exc:
                problems, plan = problems + exc.problems, exc.plan
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


def run_api_upload(context: RunContext, sheet: str) -> int:
    from . import destinations
    from .api_upload import ApiUploader, UploadOptions, delete_verified_sources
    from .journal import Journal

    settings = context.settings
    chunk = max(4, settings.chunkSize_MB // 4 * 4) * MIB  # 4 MiB multiples match Dropbox's hash blocks
    if settings.chunkSize_MB % 4:
        context.log.info("chunkSize_MB %d is used as %d (a multiple of 4 MiB).", settings.chunkSize_MB, chunk // MIB)
    part_limit = int(min(settings.fileSizeLimit_GB * units.GB, prepare.DROPBOX_API_MAX_FILE))
    with Journal(context.logs_root / "journal.sqlite3", sheet) as journal:
        settle_interrupted_deletions(journal, context.log)
        workers = settings.workers * (settings.connectionsPerFile + 1)
        try:
            plan = prepare_rows(context, sheet, destination_of_row=lambda row: row["outputDir"],
                                part_limit=part_limit, already_done=journal.deleted_sources(), mode="API",
                                bytes_per_second=50e6)
        except SheetError as exc:
            # All of Stage 1's problems in one pass: the Dropbox side of what could be planned too.
            raise _with_dropbox_side(exc, context, lambda: open_client(context, workers=workers)) from None
        if context.args.dry_run:
            client = destinations.client_for_dry_run(lambda: open_client(context, workers=workers), context.log)
            if client is not None:
                destinations.refuse_blocked(client, plan, destination_of_row=lambda row: row["outputDir"],
                                            log=context.log)
            context.log.info("Dry run: nothing was sent.")
            return EXIT_OK
        client = open_client(context, workers=workers)
        # Before the first byte: Dropbox would refuse a blocked destination only at commit time.
        destinations.refuse_blocked(client, plan, destination_of_row=lambda row: row["outputDir"], log=context.log)
        bind_account(journal, client, context.log)
        items = journal.sync_plan(prepare.iter_items(plan, sheet))
        options = UploadOptions(chunk_size=chunk, workers=settings.workers, if_exists=settings.ifExists,
                                checksum=settings.checksum, sleep_seconds=settings.sleepTime_min * 60,
                                appends_per_file=settings.connectionsPerFile,
                                concurrent_above=4 * chunk,
                                memory_budget=max(settings.memoryLimit_MB * MIB, 2 * chunk))
        uploader = ApiUploader(client, journal, options, context.log)
        uploader.sources_to_delete = {str(s.source) for s in plan.sources if s.delete_after}
        context.log.info("Stage 2, upload through the Dropbox API with %d workers, %d MiB chunks.",
                         settings.workers, chunk // MIB)
        summary = uploader.run(items, {row["outputDir"] for row in plan_rows(plan)})
        summary.failures.extend(uploader.create_empty_folders(plan.empty_folders))
        deleted, delete_failures = delete_verified_sources(client, plan, journal, context.log)
        summary.deleted_sources = deleted
        for path, message in delete_failures:
            summary.failures.append((path, message))
            context.log.error("NOT DELETED\t%s: %s", path, message)
        _log_summary(context, summary)
        return EXIT_OK if summary.ok else EXIT_SOME_FAILED


def _with_dropbox_side(error: SheetError, context: RunContext, connect) -> SheetError:
    """`error` with the destination problems of the rows Stage 1 could plan added (when a login
    works; without one the local problems come first and these follow once they are fixed)."""
    from . import destinations

    if error.plan is None or not error.plan.sources:
        return error
    client = destinations.client_for_dry_run(connect, context.log)
    if client is None:
        return error
    more = destinations.check_destinations(client, error.plan, destination_of_row=lambda row: row["outputDir"],
                                           log=context.log)
    return SheetError([*error.problems, *more], plan=error.plan) if more else error


def settle_interrupted_deletions(journal, log) -> None:
    """A run stopped between deleting an original and recording it: finish the bookkeeping."""
    for source, gone in journal.finish_interrupted_deletions():
        log.info("%s\t%s (its deletion was interrupted in an earlier run)", "DELETED" if gone else "KEPT", source)


def bind_account(journal, client, log) -> None:
    """The journal's "done" is true of one Dropbox account and root namespace only."""
    account = client.account
    previous = journal.bind_account(account.account_id, account.root_namespace)
    if previous is not None:
        log.warning("This journal was written for another Dropbox account or root (account %s, namespace %s); "
                    "now %s (%s). Nothing it records counts as uploaded here: every file is looked up in this "
                    "Dropbox and sent when missing, and originals are deleted only once this Dropbox holds them.",
                    previous[0], previous[1], account.account_id, account.email)


def plan_rows(plan: prepare.Plan):
    seen = {}
    for source in plan.sources:
        seen[id(source.row)] = source.row
    return list(seen.values())


def _log_summary(context: RunContext, summary) -> None:
    log = context.log
    summary.failures.extend(context.stage1_failures)
    speed = summary.bytes_sent / summary.seconds if summary.seconds else 0
    log.info("Summary: %d files in the sheet; %d items sent now, %d already in Dropbox, %d done in earlier runs; "
             "%s sent in %.0f s (%s/s); %d originals deleted after verification; %d failed.",
             summary.files_total, summary.items_uploaded, summary.items_already_there, summary.items_done_before,
             units.human_bytes(summary.bytes_sent), summary.seconds, units.human_bytes(speed),
             summary.deleted_sources, len(summary.failures))
    for destination, message in summary.failures[:50]:
        log.error("  failed: %s: %s", destination, message)
    if summary.failures:
        log.error("Some files did not reach Dropbox. Fix what the messages say and run app.py again: finished "
                  "files are not sent twice.")
    else:
        log.info("Everything is in Dropbox and verified by content hash.")
    log.info("Log: %s", context.log_path)
    sys.stdout.flush()
