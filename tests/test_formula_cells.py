"""Formula cells: a workbook written by a script (openpyxl) and never opened in Excel or
LibreOffice holds formulas without a calculated value. Every script stops on them, naming the
cell, instead of reading them as empty cells and silently skipping rows; formulas that Excel or
LibreOffice calculated are read as their values."""

from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from conftest import make_tree, run_script, write_xlsx

NO_LOGIN = {"DROPBOX_REFRESH_TOKEN": "", "DROPBOX_ACCESS_TOKEN": ""}


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def concat_formula(folder: Path, name: str) -> str:
    """A formula that builds a path, as a lab's generated workbook might."""
    return f'="{folder.as_posix()}/" & "{name}"'


def cache_values(book: Path, values: dict[str, tuple[str, str]]) -> Path:
    """Store calculated results for formula cells, as Excel or LibreOffice do when saving
    ({"A2": ("str", "/data/a")}); openpyxl itself cannot write them."""
    part = "xl/worksheets/sheet1.xml"
    with zipfile.ZipFile(book) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    xml = members[part].decode("utf-8")
    for cell, (kind, value) in values.items():
        xml, count = re.subn(rf'<c r="{cell}"([^>]*)>(<f>.*?</f>)<v\s*/>',
                             rf'<c r="{cell}"\1 t="{kind}">\2<v>{escape(value)}</v>', xml)
        assert count == 1, cell
    members[part] = xml.encode("utf-8")
    with zipfile.ZipFile(book, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return book


def problem_lines(output: str) -> dict[int, list[str]]:
    """The listed sheet problems by row number."""
    found: dict[int, list[str]] = {}
    for row, text in re.findall(r"^\s*- workbook .*?, row (\d+), (.*)$", output, re.M):
        found.setdefault(int(row), []).append(text)
    return found


# script, tab, header, a valid row 2 and row 3 (a formula goes into the first column of row 3),
# extra flags. `{d}` is the data folder, `{t}` the temporary folder.
TABS = [
    ("app.py", "dropboxUpload_API", ["inputFile", "outputDir", "deleteAfterUpload"],
     ["{d}/a", "/A", 1], [None, "/B", 1], ["--sheet", "dropboxUpload_API", "--dry-run"]),
    ("app.py", "dropboxUpload_APP", ["inputFile", "outputDir", "deleteAfterUpload"],
     ["{d}/a", "{t}/Dropbox/A", 1], [None, "{t}/Dropbox/B", 1],
     ["--sheet", "dropboxUpload_APP", "--dropboxDir", "{t}/Dropbox", "--dry-run"]),
    ("app.py", "dropboxDownload_API", ["dropboxPath", "localDir", "joinFlag"],
     ["/A", "{t}/restored", 0], [None, "{t}/restored", 0], ["--sheet", "dropboxDownload_API"]),
    ("joinFiles.py", "joinFiles", ["inputFile", "deleteFlag", "unzipFlag"],
     ["{d}/a/big.mrc_split_0001", 1, 0], [None, 1, 0], []),
    ("preProcess/1_listDirToZip.py", "listDirToZip", ["inputDir"], ["{d}/a"], [None],
     ["--output-dir", "{t}/lists"]),
    ("preProcess/2_zipDir.py", "zipDir", ["inputDir", "deleteFlag"], ["{d}/a", 1], [None, 1], []),
]


@pytest.mark.parametrize("script, tab, header, row2, row3, flags", TABS, ids=[t[1] for t in TABS])
def test_a_formula_never_calculated_stops_every_script_and_names_the_cell(tmp_path, script, tab, header,
                                                                          row2, row3, flags):
    data = make_tree(tmp_path / "data", {"a/frame.tif": 1000, "b/frame.tif": 1000, "a/big.mrc_split_0001": 1000})
    (tmp_path / "Dropbox").mkdir()
    fill = lambda value: value.format(d=data.as_posix(), t=tmp_path.as_posix()) if isinstance(value, str) else value  # noqa: E731
    row3 = [concat_formula(data, "b")] + [fill(v) for v in row3[1:]]
    # Row 4 is only formulas: read as blank, it used to vanish from the run without a word.
    row4 = [concat_formula(data, "a")] + [f"={v}" if isinstance(v, int) else f'="{v}"' for v in row3[1:]]
    book = write_xlsx(tmp_path / "book.xlsx", {tab: [header, [fill(v) for v in row2], row3, row4]})
    before = snapshot(data)

    login = ["--tokenFile", str(tmp_path / "no-login.json")] if script == "app.py" else []
    result = run_script(script, "--excelName", str(book), "--logs", str(tmp_path / "logs"), *login,
                        *[fill(f) for f in flags], env=NO_LOGIN)

    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    problems = problem_lines(output)
    assert f"tab '{tab}', row 3, column '{header[0]}': cell A3 holds a formula" in output
    assert f"tab '{tab}', row 4, column '{header[0]}': cell A4 holds a formula" in output
    assert "never calculated" in output and "open the workbook in Excel or LibreOffice and save it" in output
    assert 2 not in problems, problems[2]
    assert "Traceback" not in output
    assert snapshot(data) == before
    assert not list(tmp_path.rglob("*.zip")) and not (tmp_path / "Dropbox" / "A").exists()


def test_calculated_formulas_are_read_as_their_values_and_unused_ones_are_ignored(tmp_path):
    data = make_tree(tmp_path / "data", {"a/frame.tif": 1000, "b/frame.tif": 1000, "c/frame.tif": 1000})
    rows = [
        ["inputDir", "deleteFlag", "notes"],
        [concat_formula(data, "a"), "=2-1", "=1+1"],  # calculated path and flag; notes never calculated
        [str(data / "b"), '=IF(TRUE,"","x")', None],  # calculated as an empty text: a blank flag, 0
        [None, None, "=NOW()"],  # a row with a formula in an unused column only: still a blank row
        [concat_formula(data, "c"), 0, None],  # never calculated
    ]
    def dry_run():
        """The tab as Excel would have saved it: rows 2 and 3 calculated, the rest as written."""
        book = write_xlsx(tmp_path / "zipDir.xlsx", {"zipDir": rows})
        cache_values(book, {"A2": ("str", f"{data.as_posix()}/a"), "B2": ("n", "1"), "B3": ("str", "")})
        return run_script("preProcess/2_zipDir.py", "--excelName", str(book), "--logs", str(tmp_path / "logs"),
                          "--dry-run")

    result = dry_run()
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    problems = problem_lines(output)
    assert set(problems) == {5}, problems
    assert problems[5] == [f"column 'inputDir': cell A5 holds a formula (={rows[4][0][1:]}) that was never "
                           "calculated, so it has no value: open the workbook in Excel or LibreOffice and save "
                           "it, so its formulas are calculated"]

    rows[4] = [str(data / "c"), 0, None]  # as if Excel had calculated it
    result = dry_run()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"[row 2] would zip {data / 'a'} into {data / 'a.zip'} and then delete the originals" in output
    assert f"[row 3] would zip {data / 'b'} into {data / 'b.zip'}\n" in output.replace("\r", "")
    assert "[row 4]" not in output and "[row 5] would zip" in output
