"""Every tab of the two workbooks users fill in, in one place: its columns (name and kind) and
its harmless example row. The readers (scan, zipping, job_setup, download, joining) and the
template writer (workbooks) all take their columns from here, so a column is renamed or added
once.

No pandas here (sheets.py loads it, half a second): joinFiles.py reads a dropped part without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Column kinds understood by sheets.read_tab.
EXISTING_PATH = "existing_path"  # a file or a folder that exists
EXISTING_DIR = "existing_dir"
EXISTING_FILE = "existing_file"
LOCAL_DIR = "local_dir"  # a folder that may not exist yet
LOCAL_PATH = "local_path"  # a file or folder that may be gone (checked by the caller)
DROPBOX_PATH = "dropbox_path"  # /Data/2024
FLAG = "flag"  # 0 / 1, blank = 0
TEXT = "text"
PATH_KINDS = (EXISTING_PATH, EXISTING_DIR, EXISTING_FILE, LOCAL_DIR, LOCAL_PATH, DROPBOX_PATH)


@dataclass(frozen=True)
class Column:
    name: str
    kind: str
    required: bool = True  # the cell must not be blank (flags never are: blank means 0)
    # The header may lack it: a column added later, so workbooks made before it still work
    # (its cells then read as blank).
    added_later: bool = False


# Example rows point at folders under an 'example' folder that does not exist, so running a
# template by mistake stops at the preflight with a clear message and touches nothing.
EXAMPLE_DIR = "C:\\example\\replace-me"


@dataclass(frozen=True)
class Tab:
    """One tab: `workbook` is 'inputs.xlsx' or 'zipDir.xlsx' (the template it belongs to)."""

    name: str
    workbook: str
    columns: tuple[Column, ...]
    example: tuple[Any, ...]

    @property
    def headers(self) -> list[str]:
        return [column.name for column in self.columns]


LIST_DIR_TO_ZIP = Tab("listDirToZip", "zipDir.xlsx", (Column("inputDir", EXISTING_DIR),), (EXAMPLE_DIR,))
ZIP_DIR = Tab("zipDir", "zipDir.xlsx", (Column("inputDir", LOCAL_DIR), Column("deleteFlag", FLAG)),
              (EXAMPLE_DIR + "\\001", 0))
UPLOAD_APP = Tab("dropboxUpload_APP", "inputs.xlsx",
                 (Column("inputFile", LOCAL_PATH), Column("outputDir", LOCAL_DIR), Column("deleteAfterUpload", FLAG)),
                 (EXAMPLE_DIR, "C:\\Users\\me\\Dropbox (Lab)\\Archive", 0))
UPLOAD_API = Tab("dropboxUpload_API", "inputs.xlsx",
                 (Column("inputFile", LOCAL_PATH), Column("outputDir", DROPBOX_PATH),
                  Column("deleteAfterUpload", FLAG)),
                 (EXAMPLE_DIR, "/Archive/example", 0))
# member: blank = the whole file; else dropboxPath is a .zip archive (whole or split) and member
# names the member(s) to take out of it (a path or a glob), fetched without the rest.
DOWNLOAD_API = Tab("dropboxDownload_API", "inputs.xlsx",
                   (Column("dropboxPath", DROPBOX_PATH), Column("localDir", LOCAL_DIR), Column("joinFlag", FLAG),
                    Column("member", TEXT, required=False, added_later=True)),
                   ("/Archive/example", EXAMPLE_DIR + "-restored", 1, ""))
# One search per row: pattern is a name glob (frame_0412*, metadata.xml) or, with / or \, a path glob.
FIND_FILES = Tab("findFiles", "inputs.xlsx", (Column("dropboxFolder", DROPBOX_PATH), Column("pattern", TEXT)),
                 ("/Archive/example", "frame_0412*"))
# LOCAL_PATH, as in every script: quotes from "Copy as path" go, Windows paths and numbers are caught.
JOIN_FILES = Tab("joinFiles", "inputs.xlsx",
                 (Column("inputFile", LOCAL_PATH), Column("deleteFlag", FLAG), Column("unzipFlag", FLAG)),
                 (EXAMPLE_DIR + "\\big.mrc_split_0001", 0, 0))

TABS = {tab.name: tab for tab in (LIST_DIR_TO_ZIP, ZIP_DIR, UPLOAD_APP, UPLOAD_API, DOWNLOAD_API, FIND_FILES,
                                  JOIN_FILES)}
