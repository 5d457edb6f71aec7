"""What app.py runs: its settings, `--login`, and the job chosen by `sheetName` (upload through
the API, upload through the desktop app, download, or find files in Dropbox), each as data
preparation then transfer."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import api_upload, audit, desktop_upload, download, find_files
from .cli import RunContext
from .credentials import save_credentials
from .dropbox_client import finish_login, start_login
from .errors import EXIT_OK, AuthError, SettingsError
from .job_setup import open_client, prepare_rows, token_file
from .settings import Setting, existing_file

SHEETS = ("dropboxUpload_APP", "dropboxUpload_API", "dropboxDownload_API", "findFiles")

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
    Setting("memoryLimit_MB", 256, int, "file data held in memory at once", minimum=16),
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


def login(context: RunContext) -> int:
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
        return audit.run_verify(context, sheet, prepare_rows=prepare_rows, open_client=open_client)
    if sheet == "dropboxUpload_API":
        return api_upload.run(context, sheet)
    if sheet == "dropboxUpload_APP":
        return desktop_upload.run(context, sheet)
    if sheet == "findFiles":
        return find_files.run(context, sheet)
    return download.run(context, sheet)
