"""The two workbooks users fill in (inputs.xlsx, preProcess/zipDir.xlsx): their tabs, columns,
harmless example rows and the plain-words README tab. `python -m archive_dropbox.workbooks`
writes fresh copies (used to create the committed templates and the demo's workbooks)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from . import tabs
from .sheets import write_workbook

Tab = tuple[Sequence[str], list[Sequence[Any]]]

ZIP_DIR_README = [
    ("What this workbook is for", "Pre-processing: find the folders full of small files and zip them "
     "before sending data to Dropbox (Dropbox slows down past about 300,000 files)."),
    ("Tab listDirToZip", "Column inputDir: one folder per row that you want to move to Dropbox. "
     "Save, then double-click 1_listDirToZip.py. It writes directoryZipList.txt and "
     "directoryZipList.xlsx next to it: the folders worth zipping."),
    ("Tab zipDir", "Column inputDir: one folder per row to zip into <folder>.zip next to it. "
     "Paste the rows of directoryZipList.xlsx here. Column deleteFlag: 1 deletes the original files "
     "after the archive has been tested and checked; 0 or empty keeps them. Then double-click 2_zipDir.py."),
    ("Paths", "Full paths such as D:\\Microscope\\2024 or /data/microscope/2024. A path that does not "
     "start at a drive or / is taken relative to the folder of this workbook."),
    ("Safe to rerun", "If a run is stopped (Ctrl-C, crash, power cut), double-click the script again: "
     "finished folders are skipped and nothing is deleted before its archive is verified."),
    ("Logs", "Every run writes a log named by date and time in logs/preProcess."),
]

INPUTS_README = [
    ("What this workbook is for", "Uploading data to Dropbox, getting it back, and joining files "
     "that were split because they were too large. Choose the tab to run with the line "
     "sheetName = '...' at the top of app.py."),
    ("Tab dropboxUpload_APP", "Upload through the Dropbox desktop app. inputFile: a file or folder to "
     "upload. outputDir: a folder inside your local Dropbox folder (dropboxDir in app.py). "
     "deleteAfterUpload: 1 deletes the local original only after Dropbox holds an identical copy."),
    ("Tab dropboxUpload_API", "Upload straight to Dropbox over the internet. inputFile: a file or "
     "folder. outputDir: a Dropbox path such as /Data/2024. deleteAfterUpload: as above."),
    ("Tab dropboxDownload_API", "Get data back. dropboxPath: a Dropbox file or folder such as "
     "/Data/2024 (a folder keeps its name: /Data/2024 into D:\\restore gives D:\\restore\\2024). "
     "localDir: the local folder to download into. joinFlag: 1 joins split files after downloading "
     "them, checks them against their manifest, then deletes the parts."),
    ("Column member (dropboxDownload_API)", "Leave it empty to download whole files. To take files out of a "
     ".zip archive in Dropbox without downloading the archive: dropboxPath is the archive, such as "
     "/Data/2024/s3.zip (also when Dropbox holds it as _split_ parts), and member is the file's path inside it "
     "or a pattern: s3/frame_0412.tif, frame_04*.tif, metadata.xml. Each file is checked against the "
     "archive's CRC-32, keeps its date, and lands in localDir inside its folders from the archive."),
    ("Tab findFiles", "Find where a file went, years later. dropboxFolder: the Dropbox folder to search, "
     "with everything under it, such as /Data/2024. pattern: a file name such as frame_0412.tif, a pattern "
     "such as frame_04*.tif (* any characters, ? one), or a path pattern with / such as s3/*.xml. Every "
     "match (where it is, how much fetching it downloads) goes to a workbook in logs/findFiles; paste its "
     "dropboxPath and member into the dropboxDownload_API tab to get the files back."),
    ("Tab joinFiles", "Join a file that was split into parts. inputFile: the first part, the file "
     "ending in _split_0001. deleteFlag: 1 deletes the parts after the joined file was checked. "
     "unzipFlag: 1 unzips the joined file when it is a .zip, then deletes the .zip."),
    ("Flags", "1 means yes; 0 or an empty cell means no."),
    ("Safe to rerun", "If a run is stopped, start it again: finished files are skipped and large files "
     "continue where they stopped."),
    ("Logs", "Every run writes logs named by date and time in logs/dataPrep and logs/upload."),
]

def _tab(tab: tabs.Tab, rows) -> Tab:
    # Rows written before a column was added (demo.py's, users' scripts) get it blank.
    width = len(tab.headers)
    rows = [list(row) + [""] * (width - len(row)) for row in rows] if rows is not None else [list(tab.example)]
    return (tab.headers, rows)


def zip_dir_tabs(list_rows=None, zip_rows=None) -> dict[str, Tab]:
    return {
        "listDirToZip": _tab(tabs.LIST_DIR_TO_ZIP, list_rows),
        "zipDir": _tab(tabs.ZIP_DIR, zip_rows),
        "README": (["topic", "explanation"], ZIP_DIR_README),
    }


def inputs_tabs(app_rows=None, api_rows=None, download_rows=None, join_rows=None, find_rows=None) -> dict[str, Tab]:
    return {
        "dropboxUpload_APP": _tab(tabs.UPLOAD_APP, app_rows),
        "dropboxUpload_API": _tab(tabs.UPLOAD_API, api_rows),
        "dropboxDownload_API": _tab(tabs.DOWNLOAD_API, download_rows),
        "findFiles": _tab(tabs.FIND_FILES, find_rows),
        "joinFiles": _tab(tabs.JOIN_FILES, join_rows),
        "README": (["topic", "explanation"], INPUTS_README),
    }


def write_templates(repo_root: Path) -> list[Path]:
    return [
        write_workbook(repo_root / "inputs.xlsx", inputs_tabs()),
        write_workbook(repo_root / "preProcess" / "zipDir.xlsx", zip_dir_tabs()),
    ]


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    for written in write_templates(root):
        print(written)
