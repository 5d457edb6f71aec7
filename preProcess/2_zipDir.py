#!/usr/bin/env python3
"""Step 2 of pre-processing: zip each folder listed in the 'zipDir' tab of zipDir.xlsx into
<folder>.zip beside it, test the archive, and (deleteFlag = 1) only then delete the originals.

Fill in the 'zipDir' tab of zipDir.xlsx (next to this script), save, and double-click this script
(or run `python 2_zipDir.py`; `--help` lists the optional flags, `--dry-run` shows what would be
done). Uses 7-Zip when it is installed, Python's own zip otherwise. Safe to stop and run again:
finished folders are skipped, and nothing is deleted before its archive is verified.
A log is written in logs/preProcess/.
"""

SETTINGS = r'''
# ============================ Settings: edit these lines ============================
excelName = 'zipDir.xlsx'      # workbook, next to this script (or a full path)
sheetName = 'zipDir'           # tab with the columns inputDir and deleteFlag
compressionLevel = 1           # 0 = store only, 1 = fastest (measured best for microscope data) ... 9 = smallest
threads = 0                    # CPU threads for 7-Zip; 0 = every core of this computer
sevenZipPath = ''              # 7-Zip program; empty = find 7z / 7zz / 7za or C:\Program Files\7-Zip\7z.exe
useSevenZip = True             # False = always use Python's own zip (slower, one core)
# ====================================================================================
'''  # read as text: Windows paths are taken exactly as typed

if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from archive_dropbox.start import launch

    sys.exit(launch(__file__, __doc__, SETTINGS, "zipDir"))
