"""Reading and writing the workbooks users edit: one tab at a time, header in the first row,
blank rows ignored, every problem reported together (workbook, tab, row, what to fix)."""

from __future__ import annotations

import math
import os
import posixpath
import re
import sys
import warnings
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
from openpyxl.utils.cell import coordinate_to_tuple, get_column_letter

from .errors import SheetError, SheetProblem
from .localfs import temporary_sibling

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


def contains_path(outer: Path, inner: Path) -> bool:
    """True when `inner` is `outer` or lies inside it, comparing whole components with links
    resolved, and ignoring case where the file system usually does (Windows, macOS)."""
    def parts(path: Path) -> tuple[str, ...]:
        text = os.path.normcase(os.path.realpath(path))
        return Path(text.casefold() if sys.platform == "darwin" else text).parts

    inside, around = parts(inner), parts(outer)
    return inside[:len(around)] == around


def tool_files_check(column: str, *, tool_folder: Path, script: Path, logs_folder: Path) -> RowCheck:
    """Refuse rows that would send, zip or delete this tool while it runs: its folder, the running
    script, its logs and journal (uploading a live journal is wrong too), or the workbook being
    read. A data folder inside the tool's folder (such as the demo's sample data) is fine."""

    def check(row: SheetRow) -> list[SheetProblem]:
        path: Path | None = row[column]
        if path is None:
            return []
        fix = "give a data file or folder that does not hold this tool, or remove the row"
        for what, protected in (("this tool's own folder", tool_folder),
                                ("the running script", script),
                                ("this tool's logs and journal folder", logs_folder),
                                ("the workbook being read", row.workbook)):
            if contains_path(path, protected):
                return [row.problem(f"{column} {path} is or contains {what} {protected}, which must stay "
                                    f"untouched while the tool runs: {fix}", column)]
        if contains_path(logs_folder, path):
            return [row.problem(f"{column} {path} is inside this tool's logs and journal folder {logs_folder}, "
                                f"which changes while the tool runs: {fix}", column)]
        return []

    return check


def _engine(workbook: Path) -> str:
    return "xlrd" if workbook.suffix.lower() == ".xls" else "openpyxl"


def _blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def _load(workbook: Path, tab: str) -> tuple[pd.DataFrame, str]:
    """The tab's cells, and the tab's name as the workbook spells it."""
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
        return pd.read_excel(book, sheet_name=tab, header=None, dtype=object), tab


# A formula's result is stored in the file only by programs that calculate (Excel, LibreOffice).
# One written by a script (openpyxl and the like) has none, and pandas reads it as an empty cell:
# a row of such formulas would silently drop out of the run. They are found in the tab's XML:
# first a quick byte search for a formula followed by an empty value or by the end of its cell
# (calculated empty texts match it too), then, only if found, a parse.
_NO_VALUE = re.compile(rb"(?:</(?:\w+:)?f>|<(?:\w+:)?f\b[^>]*/>)\s*"
                       rb"(?:<(?:\w+:)?v\s*/>|<(?:\w+:)?v>\s*</(?:\w+:)?v>|</(?:\w+:)?c>)")


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _relationships(archive: zipfile.ZipFile, part: str) -> dict[str, tuple[str, str]]:
    """Id -> (type, part name) of the relationships of one part ("" for the package)."""
    folder, name = posixpath.split(part)
    found = {}
    for element in ET.fromstring(archive.read(posixpath.join(folder, "_rels", name + ".rels"))).iter():
        if _local_name(element.tag) == "Relationship":
            target = element.get("Target", "")
            target = target[1:] if target.startswith("/") else posixpath.normpath(posixpath.join(folder, target))
            found[element.get("Id", "")] = (element.get("Type", ""), target)
    return found


def _sheet_part(archive: zipfile.ZipFile, tab: str) -> str | None:
    book = next((target for kind, target in _relationships(archive, "").values()
                 if kind.endswith("/officeDocument")), None)
    if book is None:
        return None
    for element in ET.fromstring(archive.read(book)).iter():
        if _local_name(element.tag) == "sheet" and element.get("name") == tab:
            rel_id = next((value for key, value in element.attrib.items() if _local_name(key) == "id"), "")
            return _relationships(archive, book).get(rel_id, ("", None))[1]
    return None


def _may_have_uncalculated(archive: zipfile.ZipFile, part: str) -> bool:
    """A byte search, so that the usual tab (no formulas, or calculated ones) is not parsed twice."""
    tail = b""
    with archive.open(part) as stream:
        while chunk := stream.read(1 << 20):
            if _NO_VALUE.search(tail + chunk):
                return True
            tail = chunk[-1024:]
    return False


def _scan_uncalculated(stream) -> dict[tuple[int, int], str]:
    found: dict[tuple[int, int], str] = {}
    number = 0
    for _, element in ET.iterparse(stream):
        if _local_name(element.tag) != "row":
            continue
        # A row or cell without its number "r" follows the previous one.
        number, reference, offset = int(element.get("r") or number + 1), None, -1
        for cell in element:
            reference, offset = (cell.get("r"), 0) if cell.get("r") else (reference, offset + 1)
            parts = {_local_name(child.tag): child for child in cell}
            # t="str" with no text is a formula calculated as "", as Excel and LibreOffice store it.
            if "f" in parts and not (parts["v"].text if "v" in parts else None) and cell.get("t") != "str":
                column = (coordinate_to_tuple(reference)[1] - 1 if reference else 0) + offset
                found[(number, column)] = parts["f"].text or ""
        element.clear()  # keeps memory small on big tabs
    return found


def _uncalculated_formulas(workbook: Path, tab: str) -> dict[tuple[int, int], str]:
    """{(row number, column index from 0): formula} of the tab's formulas without a stored result."""
    if _engine(workbook) != "openpyxl":
        return {}  # .xls files always hold the results
    try:
        with zipfile.ZipFile(workbook) as archive:
            part = _sheet_part(archive, tab)
            if part is None or not _may_have_uncalculated(archive, part):
                return {}
            with archive.open(part) as stream:
                return _scan_uncalculated(stream)
    except (zipfile.BadZipFile, KeyError, OSError, ValueError, ET.ParseError):
        return {}  # pandas read the tab: this extra look must not make a readable workbook unusable


def _never_calculated(workbook: Path, tab: str, row: int, column: int, formula: str,
                      name: str | None) -> SheetProblem:
    shown = formula if len(formula) <= 80 else formula[:77] + "..."
    what = f"a formula (={shown})" if shown else "a formula"
    return SheetProblem(workbook, tab, row, name, (
        f"cell {get_column_letter(column + 1)}{row} holds {what} that was never calculated, so it has no "
        "value: open the workbook in Excel or LibreOffice and save it, so its formulas are calculated"))


def running_on_windows() -> bool:
    """The platform test of the path checks (tests replace it to check both sides)."""
    return os.name == "nt"


_DRIVE_PATH = re.compile(r"^[A-Za-z]:([\\/]|$)")  # D:\data, D:/data, D:
_UNC_PATH = re.compile(r"^\\\\[^\\/]+")  # \\nas01\lab\data


def foreign_path_problem(name: str, text: str) -> str | None:
    """Why a Windows path typed in a cell cannot be used on this Linux or macOS computer, or None.
    Elsewhere it would be taken as a relative name: a folder literally called 'D:\\restore' would
    appear beside the workbook."""
    if running_on_windows():
        return None
    if _UNC_PATH.match(text):
        return (f"{name} is '{text}', a Windows network path (UNC), which this computer cannot open: mount "
                "the share and give its local path (for example /mnt/nas01/lab/data)")
    if _DRIVE_PATH.match(text):
        return (f"{name} is '{text}', which looks like a Windows drive path, but this computer does not run "
                "Windows: give the path of that folder on this computer (for example /mnt/d/restore)")
    return None


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
    foreign = foreign_path_problem(name, str(raw).strip())
    if foreign:
        problems.append(row.problem(foreign, name))
        return None
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
        problems.append(row.problem(f"{name} {path} does not exist: check the spelling, "
                                    "and that the drive is connected", name))
        return None
    if column.kind == EXISTING_DIR and not is_dir:
        problems.append(row.problem(f"{name} {path} is a file, but a folder is expected here", name))
        return None
    if column.kind == EXISTING_FILE and is_dir:
        problems.append(row.problem(f"{name} {path} is a folder, but a file is expected here", name))
        return None
    return path


def _formulas_anywhere(workbook: Path, tab: str, uncalculated: dict[tuple[int, int], str],
                       limit: int = 10) -> list[SheetProblem]:
    """When the header row is not found, formulas without values anywhere may be the reason."""
    cells = sorted(uncalculated.items())
    problems = [_never_calculated(workbook, tab, row, column, formula, None)
                for (row, column), formula in cells[:limit]]
    if len(cells) > limit:
        problems.append(SheetProblem(workbook, tab, None, None, f"... and {len(cells) - limit} more cells "
                                     "with formulas that were never calculated"))
    return problems


def read_tab(workbook: Path | str, tab: str, columns: Sequence[Column],
             row_check: RowCheck | None = None) -> list[SheetRow]:
    """Read and validate every row of one tab. Raises SheetError listing every problem."""
    workbook = Path(workbook).resolve()
    frame, sheet_name = _load(workbook, tab)
    uncalculated = _uncalculated_formulas(workbook, sheet_name)
    problems: list[SheetProblem] = []
    cells = frame.values.tolist()
    header_index = next((i for i, line in enumerate(cells) if not all(_blank(v) for v in line)), None)
    if header_index is None:
        raise SheetError([SheetProblem(workbook, tab, None, None,
                                       "the tab is empty: the first row must hold the column names "
                                       + ", ".join(c.name for c in columns) + ", then one row per item"),
                          *_formulas_anywhere(workbook, tab, uncalculated)])
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
        raise SheetError(problems + _formulas_anywhere(workbook, tab, uncalculated))

    rows: list[SheetRow] = []
    clean: list[SheetRow] = []  # rows whose every cell converted: safe to check further
    # Rows holding only formulas without values are missing from `cells`: go on to the last of them.
    for index in range(header_index + 1, max([len(cells), *(number for number, _ in uncalculated)])):
        line = cells[index] if index < len(cells) else []
        raw = {name: (line[pos] if pos < len(line) else None) for name, pos in positions.items()}
        formulas = {name: uncalculated[(index + 1, pos)] for name, pos in positions.items()
                    if (index + 1, pos) in uncalculated}
        if not formulas and all(_blank(v) for v in raw.values()):
            continue
        row = SheetRow(workbook, tab, index + 1, {})
        before = len(problems)
        for column in columns:
            if column.name in formulas:
                problems.append(_never_calculated(workbook, tab, row.row, positions[column.name],
                                                  formulas[column.name], column.name))
                row.values[column.name] = None
            else:
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
    temporary = temporary_sibling(path, "partial")
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
