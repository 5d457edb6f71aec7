"""Reading and writing the workbooks users edit: one tab at a time, header in the first row,
blank rows ignored, every problem reported together (workbook, tab, row, what to fix)."""

from __future__ import annotations

import math
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd

from .errors import SheetError, SheetProblem

# Column kinds understood by `read_tab`.
EXISTING_PATH = "existing_path"  # a file or a folder that exists
EXISTING_DIR = "existing_dir"
EXISTING_FILE = "existing_file"
LOCAL_DIR = "local_dir"  # a folder that may not exist yet
LOCAL_PATH = "local_path"  # a file or folder that may be gone (checked by the caller)
DROPBOX_PATH = "dropbox_path"  # /Data/2024
FLAG = "flag"  # 0 / 1, blank = 0
TEXT = "text"


@dataclass(frozen=True)
class Column:
    name: str
    kind: str
    required: bool = True  # the cell must not be blank (flags never are: blank means 0)


@dataclass(frozen=True)
class SheetRow:
    """One data row; `row` is the number the user sees in Excel or LibreOffice."""

    workbook: Path
    tab: str
    row: int
    values: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def problem(self, message: str, column: str | None = None) -> SheetProblem:
        return SheetProblem(self.workbook, self.tab, self.row, column, message)


RowCheck = Callable[[SheetRow], Iterable[SheetProblem]]


def _engine(workbook: Path) -> str:
    return "xlrd" if workbook.suffix.lower() == ".xls" else "openpyxl"


def _blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def _load(workbook: Path, tab: str) -> pd.DataFrame:
    problem = lambda message, tab_name=None: SheetError([SheetProblem(workbook, tab_name, None, None, message)])  # noqa: E731
    if not workbook.exists():
        raise problem("the workbook does not exist: check the excelName setting or the path")
    if workbook.is_dir():
        raise problem("this is a folder, not a workbook: give the path of the .xlsx file")
    if workbook.suffix.lower() not in (".xlsx", ".xlsm", ".xls"):
        raise problem("not an Excel workbook: save it as .xlsx (Excel or LibreOffice 'Save As')")
    try:
        with warnings.catch_warnings():
            # The user's design card asks for xlrd for legacy .xls; pandas now prefers calamine.
            warnings.simplefilter("ignore")
            book = pd.ExcelFile(workbook, engine=_engine(workbook))
    except PermissionError:
        raise problem("cannot be opened (permission denied): close it in Excel and try again") from None
    except (zipfile.BadZipFile, ValueError, OSError, KeyError) as exc:
        raise problem(f"cannot be read as a workbook ({type(exc).__name__}): open it in Excel or "
                      "LibreOffice and save it again as .xlsx") from None
    with book:
        if tab not in book.sheet_names:
            matches = [name for name in book.sheet_names if name.strip().lower() == tab.lower()]
            if len(matches) != 1:
                raise problem(f"there is no tab named '{tab}' (tabs found: "
                              f"{', '.join(map(str, book.sheet_names))}): add or rename the tab", tab)
            tab = matches[0]
        return pd.read_excel(book, sheet_name=tab, header=None, dtype=object)


def _path_value(value: Any, workbook: Path) -> Path:
    # A folder typed as 001 arrives as the number 1; keep whole numbers readable.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    path = Path(str(value).strip()).expanduser()
    return path if path.is_absolute() else (workbook.parent / path)


def _flag_value(value: Any) -> int | None:
    if _blank(value):
        return 0
    if isinstance(value, bool):
        return int(value)
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return int(number) if number in (0.0, 1.0) else None


def _convert(row: SheetRow, column: Column, raw: Any, problems: list[SheetProblem]) -> Any:
    name = column.name
    if column.kind == FLAG:
        flag = _flag_value(raw)
        if flag is None:
            problems.append(row.problem(f"{name} is {raw!r}: write 1 for yes, 0 or nothing for no", name))
        return flag
    if _blank(raw):
        if column.required:
            problems.append(row.problem(f"{name} is empty: fill it in or delete the row", name))
        return None
    if column.kind == TEXT:
        return str(raw).strip()
    if column.kind == DROPBOX_PATH:
        text = str(raw).strip().replace("\\", "/")
        if not text.startswith("/"):
            problems.append(row.problem(
                f"{name} is {text!r}: a Dropbox path starts with '/', for example /Data/2024", name))
            return None
        return "/" + "/".join(part for part in text.split("/") if part) if text != "/" else "/"
    path = _path_value(raw, row.workbook)
    if column.kind == LOCAL_PATH:
        return path
    if column.kind == LOCAL_DIR:
        if path.exists() and not path.is_dir():
            problems.append(row.problem(f"{name} {path} is a file: give a folder", name))
        return path
    try:
        exists = path.exists()
        is_dir = path.is_dir()
    except OSError as exc:
        problems.append(row.problem(f"{name} {path} cannot be checked ({exc.strerror})", name))
        return None
    if not exists:
        hint = ""
        if os.name != "nt" and re.match(r"^[A-Za-z]:[\\/]", str(raw).strip()):
            hint = " (this looks like a Windows path, but this computer is not running Windows)"
        problems.append(row.problem(f"{name} {path} does not exist{hint}: check the spelling, "
                                    "and that the drive is connected", name))
        return None
    if column.kind == EXISTING_DIR and not is_dir:
        problems.append(row.problem(f"{name} {path} is a file, but a folder is expected here", name))
        return None
    if column.kind == EXISTING_FILE and is_dir:
        problems.append(row.problem(f"{name} {path} is a folder, but a file is expected here", name))
        return None
    return path


def read_tab(workbook: Path | str, tab: str, columns: Sequence[Column],
             row_check: RowCheck | None = None) -> list[SheetRow]:
    """Read and validate every row of one tab. Raises SheetError listing every problem."""
    workbook = Path(workbook).resolve()
    frame = _load(workbook, tab)
    problems: list[SheetProblem] = []
    cells = frame.values.tolist()
    header_index = next((i for i, line in enumerate(cells) if not all(_blank(v) for v in line)), None)
    if header_index is None:
        raise SheetError([SheetProblem(workbook, tab, None, None,
                                       "the tab is empty: the first row must hold the column names "
                                       + ", ".join(c.name for c in columns) + ", then one row per item")])
    header = ["" if _blank(v) else str(v).strip() for v in cells[header_index]]
    positions: dict[str, int] = {}
    for column in columns:
        found = [i for i, title in enumerate(header) if title.lower() == column.name.lower()]
        if not found:
            problems.append(SheetProblem(workbook, tab, header_index + 1, None,
                                         f"column '{column.name}' is missing from the header row "
                                         f"(expected columns: {', '.join(c.name for c in columns)}; "
                                         f"found: {', '.join(h for h in header if h) or 'none'})"))
        else:
            positions[column.name] = found[0]
    if problems:
        raise SheetError(problems)

    rows: list[SheetRow] = []
    clean: list[SheetRow] = []  # rows whose every cell converted: safe to check further
    for index in range(header_index + 1, len(cells)):
        line = cells[index]
        raw = {name: (line[pos] if pos < len(line) else None) for name, pos in positions.items()}
        if all(_blank(v) for v in raw.values()):
            continue
        row = SheetRow(workbook, tab, index + 1, {})
        before = len(problems)
        for column in columns:
            row.values[column.name] = _convert(row, column, raw[column.name], problems)
        rows.append(row)
        if len(problems) == before:
            clean.append(row)
    if not rows and not problems:
        problems.append(SheetProblem(workbook, tab, None, None,
                                     "the tab has no rows to work on: add one row per item under the header"))
    if row_check is not None:
        for row in clean:
            problems.extend(row_check(row))
    if problems:
        raise SheetError(problems)
    return rows


def write_workbook(path: Path | str, tabs: dict[str, tuple[Sequence[str], Iterable[Sequence[Any]]]]) -> Path:
    """Write a fresh .xlsx with the given tabs (header + rows), atomically."""
    path = Path(path)
    temporary = path.with_name(f".~{path.name}")
    with pd.ExcelWriter(temporary, engine="openpyxl") as writer:
        for tab, (header, rows) in tabs.items():
            frame = pd.DataFrame([list(r) for r in rows], columns=list(header))
            frame.to_excel(writer, sheet_name=tab, index=False)
            sheet = writer.sheets[tab]
            for i, title in enumerate(header):
                width = max([len(str(title))] + [len(str(r[i])) for r in frame.values.tolist()][:200])
                sheet.column_dimensions[chr(ord("A") + i)].width = min(max(width + 2, 12), 100)
    temporary.replace(path)
    return path
