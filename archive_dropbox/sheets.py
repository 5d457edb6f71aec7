"""Reading and writing the workbooks users edit (read: .xlsx, .xlsm, .xls, .ods; written: .xlsx):
one tab at a time, header in the first row, blank rows ignored, every problem of every row
reported together (workbook, tab, row, what to fix)."""

from __future__ import annotations

import logging
import math
import os
import posixpath
import re
import sys
import warnings
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from datetime import datetime, time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
from openpyxl import load_workbook
from openpyxl.utils.cell import coordinate_to_tuple, get_column_letter, range_boundaries

from .errors import SheetError, SheetProblem
from .localfs import temporary_sibling, windows_path_kind
# Column kinds and Column live with the tab definitions; readers keep importing them from here.
from .tabs import (DROPBOX_PATH, EXISTING_DIR, EXISTING_FILE, EXISTING_PATH, FLAG, LOCAL_DIR,  # noqa: F401
                   LOCAL_PATH, PATH_KINDS, TEXT, Column)

WORKBOOK_SUFFIXES = (".xlsx", ".xlsm", ".xls", ".ods")


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
    return {".xls": "xlrd", ".ods": "odf"}.get(workbook.suffix.lower(), "openpyxl")


def _blank(value: Any) -> bool:
    if value is None or value is pd.NaT:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def _newer_ods(workbook: Path, ods: Path) -> str | None:
    """LibreOffice saves in its own format unless told otherwise, leaving the .xlsx the setting
    names with the old rows: a run would work on those without a word."""
    if workbook == ods:
        return None
    try:
        newer = ods.stat().st_mtime > workbook.stat().st_mtime
    except OSError:
        return None
    if not newer:
        return None
    return (f"{ods.name} is newer than {workbook.name} (saved by LibreOffice in its own format?): "
            f"set excelName = '{ods.name}', or save it as {workbook.suffix.lower()}")


def _run_logs() -> list[logging.Logger]:
    """The open logs of the running script (logs.start_log). They do not propagate, so a line
    meant for them is written to each: the screen and every log of the run, in every script."""
    loggers = list(logging.Logger.manager.loggerDict.items())
    return [logger for name, logger in loggers
            if name.startswith("archive_dropbox.run.") and isinstance(logger, logging.Logger) and logger.handlers]


def _announce(workbook: Path, tab: str) -> None:
    """Which file and tab a run works on, and when it was saved: a stale copy shows at a glance."""
    saved = datetime.fromtimestamp(workbook.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    for log in _run_logs():
        log.info("Workbook: %s, tab '%s' (saved %s)", workbook, tab, saved)


def _load(workbook: Path, tab: str) -> tuple[pd.DataFrame, str]:
    """The tab's cells, and the tab's name as the workbook spells it."""
    problem = lambda message, tab_name=None: SheetError([SheetProblem(workbook, tab_name, None, None, message)])  # noqa: E731
    ods = workbook.with_suffix(".ods")
    if not workbook.exists():
        if workbook != ods and ods.is_file():
            raise problem(f"the workbook does not exist, but {ods.name} does: set excelName = '{ods.name}'")
        raise problem("the workbook does not exist: check the excelName setting or the path")
    if workbook.is_dir():
        raise problem("this is a folder, not a workbook: give the path of the .xlsx or .ods file")
    if workbook.suffix.lower() not in WORKBOOK_SUFFIXES:
        raise problem("not a workbook: save it as .xlsx or .ods (Excel or LibreOffice 'Save As')")
    stale = _newer_ods(workbook, ods)
    if stale:
        raise problem(stale, tab)
    try:
        with warnings.catch_warnings():
            # The user's design card asks for xlrd for legacy .xls; pandas now prefers calamine.
            warnings.simplefilter("ignore")
            book = pd.ExcelFile(workbook, engine=_engine(workbook))
    except PermissionError:
        raise problem("cannot be opened (permission denied): close it in Excel and try again") from None
    except ImportError:
        raise problem("reading .ods workbooks needs the odfpy package: install the packages again with "
                      "pip install -r requirements.txt, or save the workbook as .xlsx") from None
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
    # .xls files always hold the results, and so do .ods files: LibreOffice stores every formula's
    # value with it (office:value), and what pandas reads from an .ods is that value.
    if _engine(workbook) != "openpyxl":
        return {}
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


# A merged range keeps its value in its first cell only: pandas reads the other rows as empty, so a
# row of the range would drop out of the run or be reported as empty. The ranges are read from the
# file, as (first row, first column from 0, last row, last column from 0), rows as the user counts.
Merge = tuple[int, int, int, int]
_MERGE_CELL = re.compile(rb'<(?:\w+:)?mergeCell\b[^>]*?\bref="([A-Za-z]+[0-9]+:[A-Za-z]+[0-9]+)"')
_ODS_TABLE = "{urn:oasis:names:tc:opendocument:xmlns:table:1.0}"


def _xlsx_merges(workbook: Path, tab: str) -> list[Merge]:
    with zipfile.ZipFile(workbook) as archive:
        part = _sheet_part(archive, tab)
        data = archive.read(part) if part is not None else b""
    merges = []
    for reference in _MERGE_CELL.findall(data):
        first_column, first_row, last_column, last_row = range_boundaries(reference.decode())
        merges.append((first_row, first_column - 1, last_row, last_column - 1))
    return merges


def _ods_merges(workbook: Path, tab: str) -> list[Merge]:
    with zipfile.ZipFile(workbook) as archive:
        data = archive.read("content.xml")
    if b"-spanned=" not in data:
        return []
    table = next((t for t in ET.fromstring(data).iter(_ODS_TABLE + "table") if t.get(_ODS_TABLE + "name") == tab),
                 None)
    merges: list[Merge] = []
    row = 1
    for line in table.iter(_ODS_TABLE + "table-row") if table is not None else ():
        column = 0
        for cell in line:
            rows = int(cell.get(_ODS_TABLE + "number-rows-spanned", 1))
            columns = int(cell.get(_ODS_TABLE + "number-columns-spanned", 1))
            if rows > 1 or columns > 1:
                merges.append((row, column, row + rows - 1, column + columns - 1))
            column += int(cell.get(_ODS_TABLE + "number-columns-repeated", 1))
        row += int(line.get(_ODS_TABLE + "number-rows-repeated", 1))
    return merges


def _xls_merges(workbook: Path, tab: str) -> list[Merge]:
    import xlrd  # only old .xls workbooks need it: not loaded at every start

    book = xlrd.open_workbook(str(workbook), formatting_info=True, on_demand=True)
    try:
        return [(low + 1, left, high, right - 1) for low, high, left, right in book.sheet_by_name(tab).merged_cells]
    finally:
        book.release_resources()


def _merged_ranges(workbook: Path, tab: str) -> list[Merge]:
    readers = {"openpyxl": _xlsx_merges, "odf": _ods_merges, "xlrd": _xls_merges}
    try:
        return readers[_engine(workbook)](workbook, tab)
    except Exception:  # noqa: BLE001 - pandas read the tab: this extra look must not make it unusable
        return []


def _merge_problems(workbook: Path, tab: str, merges: list[Merge], positions: dict[str, int],
                    first_data_row: int, last_row: int) -> tuple[list[SheetProblem], set[tuple[int, int]]]:
    """A problem per merged range that leaves a cell of a used column empty, and those cells."""
    names = {position: name for name, position in positions.items()}
    problems: list[SheetProblem] = []
    covered: set[tuple[int, int]] = set()
    for top, left, bottom, right in merges:
        first, used = max(top, first_data_row), [column for column in range(left, right + 1) if column in names]
        # Rows past the last one read still count (a range may reach below the data), but are not listed.
        holding_value = int(top == first and left in names)
        if first > bottom or (bottom - first + 1) * len(used) - holding_value == 0:
            continue
        covered.update((row, column) for row in range(first, min(bottom, last_row) + 1) for column in used
                       if (row, column) != (top, left))
        span = f"{get_column_letter(left + 1)}{top}:{get_column_letter(right + 1)}{bottom}"
        problems.append(SheetProblem(workbook, tab, first, names[used[0]],
                                     f"cells {span} are merged, so all but the first read as empty: unmerge "
                                     "them and fill every row"))
    return problems, covered


def running_on_windows() -> bool:
    """The platform test of the path checks (tests replace it to check both sides)."""
    return os.name == "nt"


def foreign_path_problem(name: str, text: str) -> str | None:
    """Why a Windows path typed in a cell cannot be used on this Linux or macOS computer, or None.
    Elsewhere it would be taken as a relative name: a folder literally called 'D:\\restore' would
    appear beside the workbook."""
    if running_on_windows():
        return None
    kind = windows_path_kind(text)
    if kind == "unc":
        return (f"{name} is '{text}', a Windows network path (UNC), which this computer cannot open: mount "
                "the share and give its local path (for example /mnt/nas01/lab/data)")
    if kind == "drive":
        return (f"{name} is '{text}', which looks like a Windows drive path, but this computer does not run "
                "Windows: give the path of that folder on this computer (for example /mnt/d/restore)")
    return None


def _path_value(text: str, workbook: Path) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else (workbook.parent / path)


_QUOTE_PAIRS = ('"', '"'), ("“", "”"), ("”", "”"), ("„", "“"), ("'", "'"), ("‘", "’"), ("’", "’")


def _unquoted(text: str) -> str:
    """Explorer's "Copy as path" wraps the path in double quotes, and word processors curl them."""
    for opening, closing in _QUOTE_PAIRS:
        if len(text) >= 2 and text.startswith(opening) and text.endswith(closing):
            return text[1:-1].strip()
    return text


# A spreadsheet turns some typed paths into numbers or dates (001 -> 1, 1.10 -> 1.1,
# 2024-03-15 -> a date): the typed text is then lost, unless the cell's number format shows it
# exactly (zeros only, such as 000 or 0.00, or an ISO date). Formats are looked up in .xlsx files
# only (openpyxl, just for such cells); in .ods and .xls such a cell is refused with how to type
# it as text.
_ZEROS_FORMAT = re.compile(r"^(0+)(?:\.(0+))?$")
_ISO_DATE_FORMAT = re.compile(r"^yyyy([-._/]?)mm\1dd$")


def _is_typed(value: Any) -> bool:
    """A non-blank cell a spreadsheet holds as something other than text."""
    return not _blank(value) and not isinstance(value, str)


def _as_shown(value: Any, number_format: str | None) -> str | None:
    """The text a number or date cell shows when its format makes what was typed certain, or None."""
    if not number_format:
        return None
    shape = re.sub(r"^\[\$[^\]]*\]", "", number_format).replace("\\", "").replace('"', "").lower()
    if isinstance(value, datetime):
        date = _ISO_DATE_FORMAT.match(shape)
        if not date or value.time() != time():
            return None
        return value.strftime(f"%Y{date[1]}%m{date[1]}%d")
    zeros = _ZEROS_FORMAT.match(shape)
    if not zeros or isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return None
    decimals = len(zeros[2] or "")
    text = f"{value:0{len(zeros[1]) + (decimals + 1 if decimals else 0)}.{decimals}f}"
    return text if float(text) == value else None  # more digits than shown: not what was typed


def _number_formats(workbook: Path, tab: str, cells: Iterable[tuple[int, int]]) -> dict[tuple[int, int], str]:
    """{(row, column from 0): number format} of these cells of an .xlsx tab."""
    wanted = set(cells)
    rows = [row for row, _ in wanted]
    found: dict[tuple[int, int], str] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            book = load_workbook(workbook, read_only=True)
        try:
            for line in book[tab].iter_rows(min_row=min(rows), max_row=max(rows)):
                for cell in line:
                    key = (getattr(cell, "row", None), getattr(cell, "column", 0) - 1)
                    if key in wanted:
                        found[key] = cell.number_format
        finally:
            book.close()
    except Exception:  # noqa: BLE001 - without formats these cells are refused, not the workbook
        return {}
    return found


def _typed_problem(row: SheetRow, name: str, reference: str, value: Any) -> SheetProblem:
    if isinstance(value, datetime):
        date = value.strftime("%Y-%m-%d") if value.time() == time() else str(value)
        return row.problem(f"{name} in cell {reference} is the date {date}, not text: a spreadsheet turns a typed "
                           f"2024-03-15 into a date. Type it as '{date}, with a leading apostrophe, so the "
                           "spreadsheet keeps it as text", name)
    shown = int(value) if isinstance(value, float) and value.is_integer() else value
    return row.problem(f"{name} in cell {reference} is the number {shown}, not text: a spreadsheet turns a typed "
                       "001 into 1, 1.10 into 1.1 and a date into a number such as 45366, so the path typed "
                       "there is lost. Type it as '001, with a leading apostrophe, so the spreadsheet keeps it "
                       "as text", name)


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
    text = "" if _blank(raw) else str(raw).strip()
    if column.kind in PATH_KINDS:
        text = _unquoted(text)
    if not text:
        if column.required:
            problems.append(row.problem(f"{name} is empty: fill it in or delete the row", name))
        return None
    if column.kind == TEXT:
        return text
    if column.kind == DROPBOX_PATH:
        text = text.replace("\\", "/")
        if not text.startswith("/"):
            problems.append(row.problem(
                f"{name} is {text!r}: a Dropbox path starts with '/', for example /Data/2024", name))
            return None
        return "/" + "/".join(part for part in text.split("/") if part) if text != "/" else "/"
    foreign = foreign_path_problem(name, text)
    if foreign:
        problems.append(row.problem(foreign, name))
        return None
    path = _path_value(text, row.workbook)
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


def _header(workbook: Path, tab: str, columns: Sequence[Column], cells: list[list[Any]],
            uncalculated: dict[tuple[int, int], str]) -> tuple[int, dict[str, int]]:
    """The header row's index and each column's position in it; SheetError when they are not there."""
    header_index = next((i for i, line in enumerate(cells) if not all(_blank(v) for v in line)), None)
    if header_index is None:
        raise SheetError([SheetProblem(workbook, tab, None, None,
                                       "the tab is empty: the first row must hold the column names "
                                       + ", ".join(c.name for c in columns) + ", then one row per item"),
                          *_formulas_anywhere(workbook, tab, uncalculated)])
    header = ["" if _blank(v) else str(v).strip() for v in cells[header_index]]
    problems: list[SheetProblem] = []
    positions: dict[str, int] = {}
    for column in columns:
        found = [i for i, title in enumerate(header) if title.lower() == column.name.lower()]
        if not found and column.added_later:
            continue  # a workbook made before the column existed: its cells read as blank
        if not found:
            problems.append(SheetProblem(workbook, tab, header_index + 1, None,
                                         f"column '{column.name}' is missing from the header row "
                                         f"(expected columns: {', '.join(c.name for c in columns)}; "
                                         f"found: {', '.join(h for h in header if h) or 'none'})"))
        else:
            positions[column.name] = found[0]
    if problems:
        raise SheetError(problems + _formulas_anywhere(workbook, tab, uncalculated))
    return header_index, positions


def _typed_paths(workbook: Path, tab: str, cells: list[list[Any]], first_index: int, positions: dict[str, int],
                 columns: Sequence[Column]) -> dict[tuple[int, int], tuple[Any, str | None]]:
    """{(row, column from 0): (value, its text when certain)} of the path cells a spreadsheet holds
    as numbers or dates."""
    wanted = [positions[c.name] for c in columns if c.kind in PATH_KINDS and c.name in positions]
    typed = {(index + 1, pos): line[pos] for index, line in enumerate(cells) if index >= first_index
             for pos in wanted if pos < len(line) and _is_typed(line[pos])}
    formats = _number_formats(workbook, tab, typed) if typed and _engine(workbook) == "openpyxl" else {}
    return {cell: (value, _as_shown(value, formats.get(cell))) for cell, value in typed.items()}


def _read_row(row: SheetRow, columns: Sequence[Column], positions: dict[str, int], raw: dict[str, Any],
              formulas: dict[str, str], covered: set[tuple[int, int]],
              typed: dict[tuple[int, int], tuple[Any, str | None]], problems: list[SheetProblem]) -> None:
    for column in columns:
        row.values[column.name] = None
        if column.name not in positions:
            continue  # an added_later column missing from the header
        cell = (row.row, positions[column.name])
        if column.name in formulas:
            problems.append(_never_calculated(row.workbook, row.tab, row.row, cell[1], formulas[column.name],
                                              column.name))
        elif cell in covered:
            continue  # its merged range is the problem
        elif cell in typed and typed[cell][1] is None:
            reference = f"{get_column_letter(cell[1] + 1)}{row.row}"
            problems.append(_typed_problem(row, column.name, reference, raw[column.name]))
        else:
            value = typed[cell][1] if cell in typed else raw[column.name]
            row.values[column.name] = _convert(row, column, value, problems)


def read_tab_with_problems(workbook: Path | str, tab: str, columns: Sequence[Column],
                           row_check: RowCheck | None = None) -> tuple[list[SheetRow], list[SheetProblem]]:
    """Every row of one tab and every problem of every row, in one pass, in row order: a cell that
    cannot be used is None in its row, and `row_check` sees every row, so it must accept None.
    Raises SheetError only when the tab itself cannot be read (no workbook, tab or header)."""
    workbook = Path(workbook).resolve()
    frame, sheet_name = _load(workbook, tab)
    _announce(workbook, sheet_name)
    uncalculated = _uncalculated_formulas(workbook, sheet_name)
    cells = frame.values.tolist()
    header_index, positions = _header(workbook, tab, columns, cells, uncalculated)
    # Rows holding only formulas without values are missing from `cells`: go on to the last of them.
    end = max([len(cells), *(number for number, _ in uncalculated)])
    problems, covered = _merge_problems(workbook, tab, _merged_ranges(workbook, sheet_name), positions,
                                        header_index + 2, end)
    typed = _typed_paths(workbook, sheet_name, cells, header_index + 1, positions, columns)
    rows: list[SheetRow] = []
    for index in range(header_index + 1, end):
        line = cells[index] if index < len(cells) else []
        raw = {name: (line[pos] if pos < len(line) else None) for name, pos in positions.items()}
        formulas = {name: uncalculated[(index + 1, pos)] for name, pos in positions.items()
                    if (index + 1, pos) in uncalculated}
        if not formulas and all(_blank(v) for v in raw.values()):
            continue
        row = SheetRow(workbook, tab, index + 1, {})
        _read_row(row, columns, positions, raw, formulas, covered, typed, problems)
        rows.append(row)
    if not rows and not problems:
        problems.append(SheetProblem(workbook, tab, None, None,
                                     "the tab has no rows to work on: add one row per item under the header"))
    for row in rows if row_check is not None else ():
        problems.extend(row_check(row))
    return rows, sorted(problems, key=lambda problem: problem.row or 0)


def read_tab(workbook: Path | str, tab: str, columns: Sequence[Column],
             row_check: RowCheck | None = None) -> list[SheetRow]:
    """Read and validate every row of one tab. Raises SheetError listing every problem."""
    rows, problems = read_tab_with_problems(workbook, tab, columns, row_check)
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
