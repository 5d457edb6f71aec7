#!/usr/bin/env python3
"""Step 2 of pre-processing: zip each folder listed in the 'zipDir' tab of zipDir.xlsx into
<folder>.zip beside it, test the archive, and (deleteFlag = 1) only then delete the originals.

Fill in the 'zipDir' tab of zipDir.xlsx (next to this script), save, and double-click this script
(or run `python 2_zipDir.py`; `--help` lists the optional flags, `--dry-run` shows what would be
done). Zips with ISA-L on every core (or with 7-Zip, or Python's own zip: see zipEngine below).
Safe to stop and run again: finished folders are skipped, and nothing is deleted before its
archive is verified. A log is written in logs/preProcess/.
"""

SETTINGS = r'''
# ============================ Settings: edit these lines ============================
excelName = 'zipDir.xlsx'      # workbook, next to this script (or a full path)
sheetName = 'zipDir'           # tab with the columns inputDir and deleteFlag
compressionLevel = 1           # 0 = store only, 1 = fastest (measured best for microscope data) ... 9 = smallest
zipEngine = 'isal'             # 'isal' = ISA-L on every core (fastest); '7zip' = 7-Zip; 'zipfile' = Python's own zip (one core)
threads = 0                    # CPU threads for zipping; 0 = every core of this computer
sevenZipPath = ''              # 7-Zip program for zipEngine '7zip'; empty = find 7z / 7zz / 7za or C:\Program Files\7-Zip\7z.exe
# ====================================================================================
'''  # read as text: Windows paths are taken exactly as typed

if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from archive_dropbox.start import launch

    sys.exit(launch(__file__, __doc__, SETTINGS, "zipDir"))
