"""Workbooks as Excel and LibreOffice leave them (issue 14, items 5-7): .ods read wherever .xlsx
is, a newer .ods beside the named .xlsx stops the run, every run names the workbook and tab it
read; path cells a spreadsheet turned into numbers or dates, merged cells and quoted paths; every
problem of every row of a tab in one pass, in every script. Scripts run as users run them
(subprocesses); the reading itself is also tested in-process."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Sequence

import openpyxl
import pandas as pd
import pytest

from archive_dropbox import download, download_plan, requirements_check, sheets
from archive_dropbox.errors import SheetError
from conftest import make_tree, run_script, write_xlsx

NO_LOGIN = {"DROPBOX_REFRESH_TOKEN": "", "DROPBOX_ACCESS_TOKEN": ""}
ZIP_COLUMNS = [sheets.Column("inputDir", sheets.LOCAL_DIR), sheets.Column("deleteFlag", sheets.FLAG)]
UPLOAD = ["inputFile", "outputDir", "deleteAfterUpload"]


# -- helpers -----------------------------------------------------------------------------------

def write_ods(path: Path, tabs: dict[str, Sequence[Sequence[Any]]]) -> Path:
    """An .ods as pandas with odfpy writes it: each tab is a list of rows, the first the header."""
    with pd.ExcelWriter(path, engine="odf") as writer:
        for tab, rows in tabs.items():
            pd.DataFrame([list(r) for r in rows]).to_excel(writer, sheet_name=tab, header=False, index=False)
    return path


def write_book(path: Path, tabs: dict[str, Sequence[Sequence[Any]]]) -> Path:
    return write_ods(path, tabs) if path.suffix == ".ods" else write_xlsx(path, tabs)


def formatted_xlsx(path: Path, tab: str, rows: Sequence[Sequence[Any]], formats: dict[str, str],
                   merged: Sequence[str] = ()) -> Path:
    """An .xlsx whose cells carry number formats ({"A2": "000"}) and merged ranges, as a user sets them."""
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = tab
    for row in rows:
        sheet.append(list(row))
    for cell, number_format in formats.items():
        sheet[cell].number_format = number_format
    for span in merged:
        sheet.merge_cells(span)
    book.save(path)
    return path


def merged_ods(path: Path, tab: str, header: Sequence[str], rows: Sequence[Sequence[str | None]],
               spans: dict[tuple[int, int], int]) -> Path:
    """An .ods with merged cells as LibreOffice stores them: {(row index, column): rows spanned};
    the cells below are covered cells."""
    from odf.opendocument import OpenDocumentSpreadsheet
    from odf.table import CoveredTableCell, Table, TableCell, TableRow
    from odf.text import P

    document = OpenDocumentSpreadsheet()
    table = Table(name=tab)
    covered: set[tuple[int, int]] = set()
    for index, values in enumerate([header, *rows]):
        line = TableRow()
        for column, value in enumerate(values):
            if (index, column) in covered:
                line.addElement(CoveredTableCell())
                continue
            cell = TableCell(valuetype="string", **({"numberrowsspanned": spans[(index, column)]}
                                                     if (index, column) in spans else {}))
            covered.update((index + k, column) for k in range(1, spans.get((index, column), 1)))
            if value is not None:
                cell.addElement(P(text=str(value)))
            line.addElement(cell)
        table.addElement(line)
    document.spreadsheet.addElement(table)
    document.save(str(path))
    return path


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def problem_lines(text: str) -> dict[int, list[str]]:
    """The listed sheet problems by row number."""
    found: dict[int, list[str]] = {}
    for row, message in re.findall(r"^\s*- workbook .*?, row (\d+), (.*)$", text, re.M):
        found.setdefault(int(row), []).append(message)
    return found


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def problems_of(book: Path, tab: str, columns: Sequence[sheets.Column]) -> str:
    with pytest.raises(SheetError) as caught:
        sheets.read_tab(book, tab, columns)
    return str(caught.value)


# -- item 5: .ods workbooks, a stale .xlsx, the workbook named on every run ----------------------

# script, tab, header, row 2, flags, exit status, text expected besides the workbook line.
# `{d}` is the data folder, `{t}` the temporary folder.
SCRIPTS = [
    ("app.py", "dropboxUpload_API", UPLOAD, ["{d}/a", "/A", 0],
     ["--sheet", "dropboxUpload_API", "--dry-run"], 0, "Dry run: nothing was sent"),
    ("app.py", "dropboxUpload_APP", UPLOAD, ["{d}/a", "{t}/Dropbox/A", 0],
     ["--sheet", "dropboxUpload_APP", "--dropboxDir", "{t}/Dropbox", "--dry-run"], 0, "Dry run"),
    ("app.py", "dropboxDownload_API", ["dropboxPath", "localDir", "joinFlag"], ["Archive/a", "{t}/restored", 0],
     ["--sheet", "dropboxDownload_API"], 2, "row 2, column 'dropboxPath'"),
    ("joinFiles.py", "joinFiles", ["inputFile", "deleteFlag", "unzipFlag"], ["{d}/a/big.mrc_split_0001", 0, 0],
     [], 2, "row 2, column 'inputFile': big.mrc_split_0001 does not exist"),
    ("preProcess/1_listDirToZip.py", "listDirToZip", ["inputDir"], ["{d}/a"], ["--output-dir", "{t}/lists"], 0,
     "Next: paste the rows"),
    ("preProcess/2_zipDir.py", "zipDir", ["inputDir", "deleteFlag"], ["{d}/a", 1], ["--dry-run"], 0,
     "Dry run: nothing was changed"),
]


@pytest.mark.parametrize("suffix", [".ods", ".xlsx"])
@pytest.mark.parametrize("script, tab, header, row, flags, status, expected", SCRIPTS, ids=[s[1] for s in SCRIPTS])
def test_every_script_reads_ods_and_xlsx_and_names_the_workbook_and_tab(tmp_path, suffix, script, tab, header, row,
                                                                       flags, status, expected):
    data = make_tree(tmp_path / "data", {"a/frame.tif": 1000})
    (tmp_path / "Dropbox").mkdir()
    fill = lambda value: value.format(d=data.as_posix(), t=tmp_path.as_posix()) if isinstance(value, str) else value  # noqa: E731
    book = write_book(tmp_path / f"book{suffix}", {tab: [header, [fill(v) for v in row]]})
    saved = dt.datetime.fromtimestamp(book.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    before = snapshot(data)

    login = ["--tokenFile", str(tmp_path / "no-login.json")] if script == "app.py" else []
    result = run_script(script, "--excelName", str(book), "--logs", str(tmp_path / "logs"), *login,
                        *[fill(f) for f in flags], env=NO_LOGIN)

    line = f"Workbook: {book.resolve()}, tab '{tab}' (saved {saved})"
    assert result.returncode == status, output(result)
    assert line in result.stdout and expected in output(result)
    assert any(line in log.read_text(encoding="utf-8") for log in (tmp_path / "logs").rglob("*.log"))
    assert "Traceback" not in output(result)
    assert snapshot(data) == before


def test_an_ods_sheet_reads_like_the_same_xlsx(tmp_path):
    for name in ("alpha", "beta gamma", "ünïcode"):
        (tmp_path / name).mkdir()
    rows = [["inputDir", "deleteFlag", "notes"], ["alpha", 1, "x"], [None, None, None], ["beta gamma", 0, None],
            ["ünïcode", None, 2]]
    read = {suffix: [(r.row, r["inputDir"], r["deleteFlag"]) for r in
                     sheets.read_tab(write_book(tmp_path / f"zipDir{suffix}", {"zipDir": rows}), "zipDir", ZIP_COLUMNS)]
            for suffix in (".xlsx", ".ods")}
    assert read[".ods"] == read[".xlsx"] == [(2, tmp_path / "alpha", 1), (4, tmp_path / "beta gamma", 0),
                                             (5, tmp_path / "ünïcode", 0)]


def test_a_newer_ods_beside_the_named_xlsx_stops_the_run_and_changes_nothing(tmp_path):
    data = make_tree(tmp_path / "data", {"old/f.tif": 100, "new/f.tif": 100})
    book = write_xlsx(tmp_path / "zipDir.xlsx", {"zipDir": [["inputDir", "deleteFlag"], [str(data / "old"), 1]]})
    ods = write_ods(tmp_path / "zipDir.ods", {"zipDir": [["inputDir", "deleteFlag"], [str(data / "new"), 1]]})
    os.utime(book, (book.stat().st_mtime - 3600,) * 2)
    before = snapshot(data)

    result = run_script("preProcess/2_zipDir.py", "--excelName", str(book), "--logs", str(tmp_path / "logs"))

    assert result.returncode == 2, output(result)
    assert ("zipDir.ods is newer than zipDir.xlsx (saved by LibreOffice in its own format?): set excelName = "
            "'zipDir.ods', or save it as .xlsx") in result.stdout
    assert "nothing was changed" in result.stdout
    assert snapshot(data) == before and not list(tmp_path.rglob("*.zip"))

    os.utime(ods, (book.stat().st_mtime - 60,) * 2)  # an older .ods is a leftover: the .xlsx is used
    again = run_script("preProcess/2_zipDir.py", "--excelName", str(book), "--logs", str(tmp_path / "logs"),
                       "--dry-run")
    assert again.returncode == 0, output(again)
    assert str(data / "old") in again.stdout and str(data / "new") not in again.stdout


def test_a_missing_xlsx_beside_an_ods_of_the_same_name_says_which_to_set(tmp_path):
    write_ods(tmp_path / "inputs.ods", {"joinFiles": [["inputFile"], ["x"]]})
    text = problems_of(tmp_path / "inputs.xlsx", "joinFiles", [sheets.Column("inputFile", sheets.LOCAL_PATH)])
    assert "the workbook does not exist, but inputs.ods does: set excelName = 'inputs.ods'" in text


def test_a_missing_odfpy_is_named_as_pip_installs_it(monkeypatch):
    real = requirements_check.importlib.util.find_spec
    monkeypatch.setattr(requirements_check.importlib.util, "find_spec",
                        lambda name: None if name == "odf" else real(name))
    assert requirements_check._missing(()) == ["odfpy"]


# -- item 6: numbers and dates in path cells, merged cells, quoted paths ------------------------

PATHS = [sheets.Column("inputFile", sheets.LOCAL_PATH), sheets.Column("outputDir", sheets.DROPBOX_PATH)]


@pytest.mark.parametrize("suffix", [".xlsx", ".ods"])
def test_path_cells_a_spreadsheet_turned_into_numbers_or_dates_are_refused_naming_the_cell(tmp_path, suffix):
    rows = [["inputFile", "outputDir"],
            [1, "/A"],  # 001 typed
            [1.1, "/B"],  # 1.10 typed
            [dt.datetime(2024, 3, 15), "/C"],  # 2024-03-15 typed
            [45366, "/D"],  # the same date, its format lost
            ["run 1", dt.datetime(2024, 3, 16)]]  # a Dropbox folder typed without its leading slash
    text = problems_of(write_book(tmp_path / f"inputs{suffix}", {"t": rows}), "t", PATHS)
    assert "row 2, column 'inputFile': inputFile in cell A2 is the number 1, not text" in text
    assert "row 3, column 'inputFile': inputFile in cell A3 is the number 1.1, not text" in text
    assert "row 4, column 'inputFile': inputFile in cell A4 is the date 2024-03-15, not text" in text
    assert "Type it as '2024-03-15, with a leading apostrophe, so the spreadsheet keeps it as text" in text
    assert "row 5, column 'inputFile': inputFile in cell A5 is the number 45366" in text
    assert "row 6, column 'outputDir': outputDir in cell B6 is the date 2024-03-16" in text
    assert text.count("Type it as '001, with a leading apostrophe, so the spreadsheet keeps it as text") == 3
    assert "does not exist" not in text and "00:00:00" not in text


def test_path_cells_whose_number_format_shows_the_typed_text_are_read_as_typed(tmp_path):
    rows = [["inputFile", "outputDir"], [1, "/A"], [1.1, "/B"], [dt.datetime(2024, 3, 15), "/C"],
            [dt.datetime(2024, 3, 16), "/D"], [7, "/E"], ["x", 2024]]
    formats = {"A2": "000", "A3": "0.00", "A4": "yyyy-mm-dd", "A5": "yyyy\\-mm\\-dd", "A6": "General",
               "B7": "0000"}
    book = formatted_xlsx(tmp_path / "inputs.xlsx", "t", rows, formats)
    text = problems_of(book, "t", PATHS)
    # A6 shows 7 with no format that keeps what was typed; B7 shows 2024, still no leading '/'.
    assert "cell A6 is the number 7" in text and "outputDir is '2024': a Dropbox path starts with '/'" in text
    for cell in ("A2", "A3", "A4", "A5"):
        assert f"cell {cell}" not in text

    book = formatted_xlsx(tmp_path / "inputs.xlsx", "t", rows[:5], formats)
    read = [(r["inputFile"].name, r["outputDir"]) for r in sheets.read_tab(book, "t", PATHS)]
    assert read == [("001", "/A"), ("1.10", "/B"), ("2024-03-15", "/C"), ("2024-03-16", "/D")]


def test_a_number_format_showing_fewer_digits_than_the_cell_holds_is_not_taken_as_typed(tmp_path):
    book = formatted_xlsx(tmp_path / "inputs.xlsx", "t", [["inputFile", "outputDir"], [1.125, "/A"],
                                                          [dt.datetime(2024, 3, 15, 9, 30), "/B"]],
                          {"A2": "0.00", "A3": "yyyy-mm-dd"})
    text = problems_of(book, "t", PATHS)
    assert "cell A2 is the number 1.125" in text and "cell A3 is the date 2024-03-15 09:30:00" in text


def test_a_zip_dir_row_typed_as_001_is_refused_by_the_script_with_how_to_type_it(tmp_path):
    (tmp_path / "001").mkdir()
    make_tree(tmp_path / "001", {"f.tif": 100})
    book = write_xlsx(tmp_path / "zipDir.xlsx", {"zipDir": [["inputDir", "deleteFlag"], [1, 1]]})

    result = run_script("preProcess/2_zipDir.py", "--excelName", str(book), "--logs", str(tmp_path / "logs"))

    assert result.returncode == 2, output(result)
    assert "row 2, column 'inputDir': inputDir in cell A2 is the number 1, not text" in result.stdout
    assert "Type it as '001, with a leading apostrophe" in result.stdout
    assert (tmp_path / "001" / "f.tif").exists() and not list(tmp_path.rglob("*.zip"))


@pytest.mark.parametrize("suffix", [".xlsx", ".ods"])
def test_merged_cells_name_their_range_instead_of_reading_as_empty(tmp_path, suffix):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    header, rows = ["inputDir", "deleteFlag"], [["a", "1"], ["b", "0"], [None, "1"], [None, "1"], ["c", "0"]]
    if suffix == ".xlsx":
        book = formatted_xlsx(tmp_path / "zipDir.xlsx", "zipDir", [header, *rows], {}, merged=["A3:A5", "B6:C6"])
    else:
        book = merged_ods(tmp_path / "zipDir.ods", "zipDir", header, rows, {(2, 0): 3})

    text = problems_of(book, "zipDir", ZIP_COLUMNS)

    assert ("row 3, column 'inputDir': cells A3:A5 are merged, so all but the first read as empty: unmerge "
            "them and fill every row") in text
    assert "1 problem(s)" in text  # B6:C6 reaches no other used cell; rows 4 and 5 are not "empty"


def test_a_merged_range_whose_rows_are_otherwise_blank_does_not_vanish(tmp_path):
    (tmp_path / "a").mkdir()
    book = formatted_xlsx(tmp_path / "zipDir.xlsx", "zipDir", [["inputDir", "deleteFlag"], ["a", 1], [None, None]],
                          {}, merged=["A2:A3"])
    assert "cells A2:A3 are merged" in problems_of(book, "zipDir", ZIP_COLUMNS)


@pytest.mark.parametrize("quoted", ['"{}"', "“{}”", "'{}'", "‘{}’", ' "{}" '])
def test_surrounding_quotes_from_copy_as_path_are_removed(tmp_path, quoted):
    (tmp_path / "run 1").mkdir()
    columns = [sheets.Column("inputDir", sheets.EXISTING_DIR), sheets.Column("outputDir", sheets.DROPBOX_PATH)]
    book = write_xlsx(tmp_path / "b.xlsx", {"t": [["inputDir", "outputDir"],
                                                   [quoted.format(tmp_path / "run 1"), quoted.format("/Data/x")]]})
    (row,) = sheets.read_tab(book, "t", columns)
    assert row["inputDir"] == tmp_path / "run 1" and row["outputDir"] == "/Data/x"


def test_a_quoted_windows_path_keeps_no_quotes_on_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(sheets, "running_on_windows", lambda: True)
    book = write_xlsx(tmp_path / "b.xlsx", {"t": [["inputFile"], ['"C:\\data\\run1"']]})
    (row,) = sheets.read_tab(book, "t", [sheets.Column("inputFile", sheets.LOCAL_PATH)])
    assert str(row["inputFile"]).endswith("C:\\data\\run1") and '"' not in str(row["inputFile"])


# -- item 7: every problem of every row in one pass ----------------------------------------------

def run_upload_dry(tmp_path: Path, tab: str, rows: list[list]) -> subprocess.CompletedProcess:
    book = write_xlsx(tmp_path / "inputs.xlsx", {tab: [UPLOAD, *rows]})
    return run_script("app.py", "--excelName", str(book), "--sheet", tab, "--logs", str(tmp_path / "logs"),
                      "--tokenFile", str(tmp_path / "no-login.json"), "--dropboxDir", str(tmp_path / "Dropbox"),
                      "--dry-run", env=NO_LOGIN)


def test_an_api_upload_tab_lists_its_cell_and_input_file_problems_in_one_pass(tmp_path):
    data = make_tree(tmp_path / "data", {"a/f.tif": 100})
    (tmp_path / "Dropbox").mkdir()
    result = run_upload_dry(tmp_path, "dropboxUpload_API", [
        [str(data / "a"), "Data/2024", 0],  # a Dropbox path without its leading '/'
        [str(data / "missing"), "/A", 0],
        [str(data / "gone"), "/B", "yes"],
        [str(data / "nowhere"), "B", 1],
    ])
    assert result.returncode == 2, output(result)
    found = problem_lines(result.stdout)
    assert any("a Dropbox path starts with '/'" in p for p in found[2]) and len(found[2]) == 1
    assert any(f"inputFile {data / 'missing'} does not exist" in p for p in found[3])
    assert any("deleteAfterUpload is 'yes'" in p for p in found[4])
    assert any(f"inputFile {data / 'gone'} does not exist" in p for p in found[4])
    assert any("a Dropbox path starts with '/'" in p for p in found[5])
    assert any(f"inputFile {data / 'nowhere'} does not exist" in p for p in found[5])
    assert sorted(found) == [2, 3, 4, 5] and "Traceback" not in output(result)


def test_an_app_upload_tab_runs_its_own_checks_on_rows_with_other_problems(tmp_path):
    data = make_tree(tmp_path / "data", {"a/f.tif": 100})
    inside = make_tree(tmp_path / "Dropbox", {"synced/f.tif": 100}) / "synced"
    result = run_upload_dry(tmp_path, "dropboxUpload_APP", [
        [str(data / "a"), str(tmp_path / "elsewhere"), 0],
        [str(data / "missing"), str(tmp_path / "Dropbox" / "A"), 0],
        [str(inside), str(tmp_path / "Dropbox" / "B"), "x"],
    ])
    assert result.returncode == 2, output(result)
    found = problem_lines(result.stdout)
    assert any("is not inside the Dropbox folder" in p for p in found[2])
    assert any(f"inputFile {data / 'missing'} does not exist" in p for p in found[3])
    assert any("deleteAfterUpload is 'x'" in p for p in found[4])
    assert any("is inside the Dropbox folder" in p for p in found[4])


def test_a_zip_dir_tab_lists_a_bad_flag_and_the_folder_problems_together(tmp_path):
    data = make_tree(tmp_path / "data", {"a/f.tif": 100})
    book = write_xlsx(tmp_path / "zipDir.xlsx", {"zipDir": [["inputDir", "deleteFlag"], [str(data / "missing"), "yes"],
                                                            [str(data / "a"), 1], [str(data / "a"), "no"]]})
    result = run_script("preProcess/2_zipDir.py", "--excelName", str(book), "--logs", str(tmp_path / "logs"))
    assert result.returncode == 2, output(result)
    found = problem_lines(result.stdout)
    assert any("deleteFlag is 'yes'" in p for p in found[2]) and any("does not exist" in p for p in found[2])
    assert any("deleteFlag is 'no'" in p for p in found[4]) and any("already listed in row 3" in p for p in found[4])
    assert (data / "a" / "f.tif").exists() and not list(tmp_path.rglob("*.zip"))


@pytest.mark.skipif(os.name == "nt", reason="a drive path is an ordinary path on Windows")
def test_join_files_lists_every_row_problem_at_once_with_the_windows_path_hint(tmp_path):
    data = make_tree(tmp_path / "data", {"a/other.txt": 10})
    book = write_xlsx(tmp_path / "inputs.xlsx", {"joinFiles": [
        ["inputFile", "deleteFlag", "unzipFlag"],
        [str(data / "a" / "big.mrc_split_0001"), "maybe", 0],
        ["D:\\restore\\big.mrc_split_0001", 0, 0],
    ]})
    result = run_script("joinFiles.py", "--excelName", str(book), "--logs", str(tmp_path / "logs"))
    assert result.returncode == 2, output(result)
    found = problem_lines(result.stdout)
    assert any("deleteFlag is 'maybe'" in p for p in found[2])
    assert any("big.mrc_split_0001 does not exist" in p for p in found[2])
    assert found[3] == ["column 'inputFile': inputFile is 'D:\\restore\\big.mrc_split_0001', which looks like a "
                        "Windows drive path, but this computer does not run Windows: give the path of that folder "
                        "on this computer (for example /mnt/d/restore)"]
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith("D:")]


class NothingInDropbox:
    """A client for which no path exists in Dropbox."""

    def metadata(self, path: str):
        return None


def test_download_check_rows_lists_the_tab_problems_with_the_dropbox_ones_once_each(tmp_path):
    a_file = make_tree(tmp_path, {"occupied": b"x"}) / "occupied"
    book = write_xlsx(tmp_path / "inputs.xlsx", {"dropboxDownload_API": [
        ["dropboxPath", "localDir", "joinFlag"],
        ["/Missing", str(a_file), 0],  # localDir is a file (the tab) and nothing in Dropbox (check_rows)
        ["Archive", str(tmp_path / "restore"), "2"],  # no leading '/': not looked up
    ]})
    rows, earlier = sheets.read_tab_with_problems(book, "dropboxDownload_API", download.COLUMNS)
    with pytest.raises(SheetError) as caught:
        download_plan.check_rows(NothingInDropbox(), rows, logging.getLogger("test"), earlier)
    found = problem_lines(str(caught.value))
    assert [p.split(":")[0] for p in found[2]] == ["column 'localDir'", "column 'dropboxPath'"]
    assert "is a file" in found[2][0] and "/Missing does not exist in Dropbox" in found[2][1]
    assert len(found[3]) == 2 and "joinFlag is '2'" in found[3][1]
