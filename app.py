#!/usr/bin/env python3
"""Upload data to Dropbox (through the desktop app or the API), or download it again.

1. Fill in the tab of inputs.xlsx named by sheetName below, and save it.
2. Set sheetName (and, for the desktop app, dropboxDir) in the settings block below.
3. Double-click this script, or run `python app.py`. `python app.py --help` lists the flags;
   `python app.py --login` connects it to your Dropbox account once (API modes).

Stage 1 (data preparation) lists every file, plans the parts of files too large for Dropbox and
checks names; its log is in logs/dataPrep. Stage 2 sends the files and verifies every one by
its Dropbox content hash; its log is in logs/upload. Stopped? Run it again: it continues.
"""

SETTINGS = r'''
# ============================ Settings: edit these lines ============================
excelName = 'inputs.xlsx'             # workbook next to this script (or a full path)
sheetName = 'dropboxUpload_APP'       # dropboxUpload_APP, dropboxUpload_API, dropboxDownload_API or findFiles
dropboxDir = ''                       # desktop-app mode: your local Dropbox folder
fileSizeLimit_GB = 500                # files larger than this are sent as _split_0001, _split_0002, ...
chunkSizeSplit_MB = 1024              # read/write block when writing split parts (desktop-app mode)
batchSize_GB = 1000                   # desktop-app mode: data copied into Dropbox per batch
sleepTime_min = 30                    # how often to re-check a batch, a full disk or a full Dropbox
batchTimeLimit_hour = 24              # desktop-app mode: warn when a batch takes longer than this
chunkSize_MB = 128                    # API mode: bytes per upload request (4 to 148, a multiple of 4)
workers = 4                           # API mode: files sent at the same time
connectionsPerFile = 8                # API mode: connections used for one large file (concurrent session)
memoryLimit_MB = 256                  # API mode: most file data held in memory at once
ifExists = 'report'                   # a different file already in Dropbox: report, overwrite or rename
checksum = False                      # True: compare content hashes, not size and date, to skip files
appKey = ''                           # your Dropbox app's key, for `python app.py --login`
accessToken = ''                      # old style, discouraged: expires after 4 hours; use --login
tokenFile = ''                        # where --login keeps the login (empty: a private per-user file)
teamSpace = True                      # Dropbox Business: paths start at the team space (/Team Folder/...)
caBundle = ''                         # a CA certificate file, when the network inspects TLS
proxy = ''                            # e.g. http://proxy.example.org:3128 (HTTPS_PROXY also works)
# ====================================================================================
'''  # read as text: Windows paths are taken exactly as typed

if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from archive_dropbox.start import launch

    sys.exit(launch(__file__, __doc__, SETTINGS, "app"))
