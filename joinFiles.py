#!/usr/bin/env python3
"""Join files that were split into parts (big.mrc_split_0001, big.mrc_split_0002, ...) back
into the original, checking it against the manifest (big.mrc_split_manifest.json) when there is one.

Two ways to use it:
  - fill in the 'joinFiles' tab of inputs.xlsx (next to this script): inputFile = the first part,
    deleteFlag = 1 to delete the parts after a verified join, unzipFlag = 1 to unzip a joined
    .zip next to it; save, and double-click this script (or run `python joinFiles.py`);
  - or drop the first part onto this script, or run `python joinFiles.py PART [PART ...]`
    (add --delete and/or --unzip to do what the flags do).
A log is written in logs/dataPrep/. `--help` lists the optional flags.
"""

SETTINGS = r'''
# ============================ Settings: edit these lines ============================
excelName = 'inputs.xlsx'      # workbook, next to this script (or a full path)
sheetName = 'joinFiles'        # tab with the columns inputFile, deleteFlag, unzipFlag
# ====================================================================================
'''  # read as text: Windows paths are taken exactly as typed

if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from archive_dropbox.start import launch

    sys.exit(launch(__file__, __doc__, SETTINGS, "joinFiles"))
