#!/usr/bin/env python3
"""Step 1 of pre-processing: find the folders that should be zipped before upload.

Fill in the 'listDirToZip' tab of zipDir.xlsx (next to this script), save, and double-click
this script (or run `python 1_listDirToZip.py`; `--help` lists the optional flags).
It writes, next to itself (or into --output-dir):
  directorySize.txt      every folder: subfolders, files and size (GB) including everything below
  directoryZipList.txt   the folders worth zipping, with the same columns
  directoryZipList.xlsx  the same folders as rows to paste into the 'zipDir' tab
and a log in logs/preProcess/ with the warnings (folders too large to zip that hold very many
files, and how many files will reach Dropbox with and without zipping).
Symbolic links are never followed nor counted. Exit status 0 means every folder was read
completely; 1 means some entries could not be read (the lists leave them out); 2 means the
workbook or a setting needs fixing (nothing was written).
"""

SETTINGS = r'''
# ============================ Settings: edit these lines ============================
excelName = 'zipDir.xlsx'      # workbook, next to this script (or a full path)
sheetName = 'listDirToZip'     # tab with the column inputDir
fileSizeLimit_GB = 500         # largest folder (GB, may be fractional) proposed for one archive
minFiles = 1000                # zip a folder only from this many files (fewer saves < 0.3 % of Dropbox's 300,000)
# ====================================================================================
'''  # read as text: Windows paths are taken exactly as typed

if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from archive_dropbox.start import launch

    sys.exit(launch(__file__, __doc__, SETTINGS, "listDirToZip"))
