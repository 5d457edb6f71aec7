"""The sheet reader: header row, blank rows, flags, relative paths, legacy .xls, LibreOffice
files, and one precise message per problem."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from archive_dropbox import sheets
from archive_dropbox.errors import SheetError
from conftest import write_xlsx

FIXTURES = Path(__file__).parent / "fixtures"
ZIP_COLUMNS = [sheets.Column("inputDir", sheets.EXISTING_DIR), sheets.Column("deleteFlag", sheets.FLAG)]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    for name in ("a", "b c", "ünïcode"):
        (tmp_path / "data" / name).mkdir(parents=True)
    (tmp_path / "data" / "file.bin").write_bytes(b"x")
    return tmp_path / "data"


def test_reads_rows_skips_blank_rows_and_keeps_user_row_numbers(tmp_path, data):
    book = write_xlsx(tmp_path / "w.xlsx", {"zipDir": [
        ["inputDir", "deleteFlag"], [str(data / "a"), 1], [None, None], [str(data / "b c"), None],
        ["", ""], [str(data / "ünïcode"), 0],
    ]})
    rows = sheets.read_tab(book, "zipDir", ZIP_COLUMNS)
    assert [(r.row, r["inputDir"].name, r["deleteFlag"]) for r in rows] == [
        (2, "a", 1), (4, "b c", 0), (6, "ünïcode", 0)]


def test_relative_paths_are_taken_from_the_workbook_folder(tmp_path, data):
    book = write_xlsx(data / "w.xlsx", {"zipDir": [["inputDir", "deleteFlag"], ["a", 0]]})
    (row,) = sheets.read_tab(book, "zipDir", ZIP_COLUMNS)
    assert row["inputDir"] == data / "a"


def test_header_is_matched_without_case_or_spaces_and_extra_columns_are_ignored(tmp_path, data):
    book = write_xlsx(tmp_path / "w.xlsx", {"zipDir": [
        [" InputDir ", "notes", "DELETEFLAG"], [str(data / "a"), "hello", "1"]]})
    (row,) = sheets.read_tab(book, "zipDir", ZIP_COLUMNS)
    assert row["deleteFlag"] == 1


def test_every_problem_is_listed_with_tab_row_and_column(tmp_path, data):
    book = write_xlsx(tmp_path / "w.xlsx", {"zipDir": [
        ["inputDir", "deleteFlag"], [str(data / "missing"), 0], [str(data / "file.bin"), 2],
        [None, 1]]})
    with pytest.raises(SheetError) as caught:
        sheets.read_tab(book, "zipDir", ZIP_COLUMNS)
    text = caught.value.describe()
    assert len(caught.value.problems) == 4
    assert "row 2" in text and "does not exist" in text
    assert "row 3" in text and "is a file" in text
    assert "row 3, column 'deleteFlag'" in text and "write 1 for yes" in text
    assert "row 4, column 'inputDir'" in text and "is empty" in text
    assert "tab 'zipDir'" in text and str(book) in text


@pytest.mark.parametrize("tabs, expected", [
    ({"other": [["inputDir"]]}, "there is no tab named 'zipDir'"),
    ({"zipDir": []}, "the tab is empty"),
    ({"zipDir": [["inputDir", "deleteFlag"]]}, "has no rows"),
    ({"zipDir": [["folder", "deleteFlag"], ["/x", 0]]}, "column 'inputDir' is missing"),
])
def test_workbook_shape_problems(tmp_path, tabs, expected):
    book = write_xlsx(tmp_path / "w.xlsx", tabs)
    with pytest.raises(SheetError, match=expected):
        sheets.read_tab(book, "zipDir", ZIP_COLUMNS)


def test_missing_and_unreadable_workbooks(tmp_path):
    with pytest.raises(SheetError, match="does not exist"):
        sheets.read_tab(tmp_path / "nope.xlsx", "zipDir", ZIP_COLUMNS)
    broken = tmp_path / "broken.xlsx"
    broken.write_text("not a workbook")
    with pytest.raises(SheetError, match="cannot be read as a workbook"):
        sheets.read_tab(broken, "zipDir", ZIP_COLUMNS)
    with pytest.raises(SheetError, match="save it as .xlsx"):
        sheets.read_tab(tmp_path / "notes.csv", "zipDir", ZIP_COLUMNS) if (tmp_path / "notes.csv").write_text("x") else None


def test_dropbox_paths_are_normalised_and_must_start_with_slash(tmp_path, data):
    columns = [sheets.Column("inputFile", sheets.EXISTING_PATH), sheets.Column("outputDir", sheets.DROPBOX_PATH)]
    book = write_xlsx(tmp_path / "w.xlsx", {"api": [
        ["inputFile", "outputDir"], [str(data / "a"), "/Data//2024/"], [str(data / "a"), "Data"]]})
    with pytest.raises(SheetError) as caught:
        sheets.read_tab(book, "api", columns)
    assert "row 3" in str(caught.value) and "starts with '/'" in str(caught.value)
    book = write_xlsx(tmp_path / "w2.xlsx", {"api": [["inputFile", "outputDir"], [str(data / "a"), "\\Data\\2024"]]})
    (row,) = sheets.read_tab(book, "api", columns)
    assert row["outputDir"] == "/Data/2024"


def test_write_workbook_round_trips(tmp_path, data):
    book = sheets.write_workbook(tmp_path / "out.xlsx", {"zipDir": (["inputDir", "deleteFlag"], [[str(data / "a"), 0]])})
    (row,) = sheets.read_tab(book, "zipDir", ZIP_COLUMNS)
    assert row["inputDir"] == data / "a" and row["deleteFlag"] == 0
    assert not list(tmp_path.glob(".~*"))


def _fixture_rows(name: str, tmp_path: Path) -> list[tuple]:
    """Fixtures list folders relative to the workbook: copy next to a matching tree."""
    for folder in ("alpha", "beta gamma", "ünïcode"):
        (tmp_path / folder).mkdir(exist_ok=True)
    book = tmp_path / name
    shutil.copy(FIXTURES / name, book)
    return [(r.row, r["inputDir"].name, r["deleteFlag"]) for r in sheets.read_tab(book, "zipDir", ZIP_COLUMNS)]


def test_libreoffice_and_legacy_xls_read_like_openpyxl(tmp_path):
    made_by_openpyxl = _fixture_rows("zipDir_openpyxl.xlsx", tmp_path)
    assert made_by_openpyxl == [(2, "alpha", 1), (4, "beta gamma", 0), (5, "ünïcode", 0)]
    assert _fixture_rows("zipDir_libreoffice.xlsx", tmp_path) == made_by_openpyxl
    assert _fixture_rows("zipDir_libreoffice.xls", tmp_path) == made_by_openpyxl
