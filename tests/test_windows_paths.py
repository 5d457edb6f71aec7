"""Windows behaviour that can be checked on Linux (issue 14): directory junctions never followed,
names Windows cannot hold refused before anything is written, 7-Zip's messages read as UTF-8,
--help showing the script's own settings, and short waits not shown as "0 min".

Windows is simulated at the `os` level: a junction is an entry whose is_symlink() is False and
whose lstat says "folder" with the reparse tag IO_REPARSE_TAG_MOUNT_POINT, as CPython reports
one there; the name rules follow names.LOCAL_SYSTEM."""

from __future__ import annotations

import logging
import os
import stat
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import make_tree, run_script
from archive_dropbox import desktop_job, cli, download_plan, joining, localfs, names, prepare, scan, zipping
from archive_dropbox.dropbox_client import RemoteFile, RemoteFolder
from archive_dropbox.errors import FileProblem, SheetError
from archive_dropbox.settings import Setting
from archive_dropbox.sheets import SheetRow
from archive_dropbox.units import human_duration

# ------------------------------------------------------------------------------ junctions


class _JunctionEntry:
    """What os.scandir gives on Windows for `mklink /J linked <elsewhere>`."""

    def __init__(self, name: str, path: str):
        self.name, self.path = name, path

    def is_symlink(self) -> bool:
        return False  # Windows: True only for IO_REPARSE_TAG_SYMLINK

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return True

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return False

    def stat(self, *, follow_symlinks: bool = True):
        return SimpleNamespace(st_mode=stat.S_IFDIR | 0o777, st_size=0, st_mtime_ns=0, st_ino=0, st_dev=0,
                               st_file_attributes=stat.FILE_ATTRIBUTE_DIRECTORY | stat.FILE_ATTRIBUTE_REPARSE_POINT,
                               st_reparse_tag=localfs.IO_REPARSE_TAG_MOUNT_POINT)

    def inode(self) -> int:
        return 0


class _Listing:
    """An os.scandir iterator in which the entries at `junctions` look like Windows junctions."""

    def __init__(self, real, junctions: set[str]):
        self.real, self.junctions = real, junctions

    def __iter__(self):
        for entry in self.real:
            yield _JunctionEntry(entry.name, entry.path) if entry.path in self.junctions else entry

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.real.close()


@pytest.fixture
def junction(tmp_path, monkeypatch):
    """data/ holding kept.txt and `linked`, a junction to outside/ (secret.txt): as Windows
    shows it. A walker that goes through it finds outside/secret.txt."""
    make_tree(tmp_path / "data", {"kept.txt": b"kept"})
    make_tree(tmp_path / "outside", {"secret.txt": b"not in the row's folder"})
    linked = tmp_path / "data" / "linked"
    linked.symlink_to(tmp_path / "outside", target_is_directory=True)  # followed by scandir(linked)
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": _Listing(real_scandir(path), {str(linked)}))
    monkeypatch.setattr(localfs, "REPARSE_TAGS", True)
    return tmp_path / "data", linked


def test_the_upload_walker_never_goes_through_a_junction(junction):
    data, linked = junction
    row = SheetRow(Path("inputs.xlsx"), "dropboxUpload_API", 2,
                   {"inputDir": data, "outputDir": "/Backup", "deleteAfterUpload": 1})
    plan = prepare.build_plan([row], input_column="inputDir", output_column="outputDir",
                              delete_column="deleteAfterUpload", destination_of_row=lambda r: "/Backup/data",
                              part_limit=1 << 40, log=logging.getLogger("test"))
    # deleteAfterUpload deletes exactly the planned sources: none may lie behind the junction.
    assert [s.source.name for s in plan.sources] == ["kept.txt"]
    assert plan.skipped_links == 1
    assert plan.skipped == [(str(linked), "a link or junction (links are never followed)")]


def test_list_dir_to_zip_counts_a_junction_as_a_link(junction, monkeypatch):
    data, _ = junction
    monkeypatch.setattr(scan, "_open_listing", lambda path, is_root: (os.scandir(path), None))
    subdirs: list[str] = []
    counts = scan._list_directory(str(data), subdirs, [], is_root=True)
    files, _, links, *_ = counts
    assert (files, links, subdirs) == (1, 1, [])


def test_zip_dir_snapshot_skips_a_junction(junction):
    data, _ = junction
    snapshot = zipping.scan_folder(data)
    assert list(snapshot.files) == ["kept.txt"]
    assert snapshot.skipped == ["linked"] and snapshot.directories == []


def test_other_reparse_points_are_walked(tmp_path, monkeypatch):
    # OneDrive / Dropbox placeholders are reparse points too, but hold the data themselves.
    placeholder = _JunctionEntry("cloud", str(tmp_path / "cloud"))
    info = placeholder.stat()
    info.st_reparse_tag = 0x9000001A  # IO_REPARSE_TAG_CLOUD_6
    monkeypatch.setattr(placeholder, "stat", lambda *, follow_symlinks=True: info)
    monkeypatch.setattr(localfs, "REPARSE_TAGS", True)
    assert not localfs.is_link_entry(placeholder)
    assert localfs.is_link_entry(_JunctionEntry("j", str(tmp_path / "j")))


# ------------------------------------------------------------------------------ names Windows refuses


@pytest.mark.parametrize("name", ["CON", "con", "aux.txt", "NUL", "nul.tar.gz", "COM1", "LPT9.log", "COM¹",
                                  "PRN .txt", "notes.", "notes ", "a:b", "what?", "tab\there"])
def test_windows_refuses_these_names(name):
    assert names.windows_name_problem(name)


@pytest.mark.parametrize("name", ["CONSOLE.txt", "con_data", "COM10", "auxiliary", "a.txt", ".hidden", "LPT"])
def test_windows_takes_these_names(name):
    assert names.windows_name_problem(name) is None


def test_case_clashes_depend_on_the_file_system(monkeypatch):
    paths = [("d", "A.txt"), ("d", "a.txt"), ("e", "a.txt"), ("caf\u00e9",), ("cafe\u0301",)]
    monkeypatch.setattr(names, "LOCAL_SYSTEM", "windows")
    assert names.local_case_clashes(paths) == [("d/A.txt", "d/a.txt")]  # NTFS does not normalize
    monkeypatch.setattr(names, "LOCAL_SYSTEM", "macos")
    assert names.local_case_clashes(paths) == [("d/A.txt", "d/a.txt"), ("caf\u00e9", "cafe\u0301")]
    monkeypatch.setattr(names, "LOCAL_SYSTEM", "posix")
    assert names.local_case_clashes(paths) == [] and names.local_name_problem("CON") is None


class _Listed:
    """A Dropbox client that lists one folder."""

    def __init__(self, entries):
        self.entries = entries

    def iter_entries(self, path_lower):
        return iter(self.entries)


def _remote_file(path: str) -> RemoteFile:
    import datetime as dt

    return RemoteFile(path, path.lower(), 3, None, dt.datetime(2024, 1, 1), "rev")


def _download_plan(tmp_path: Path):
    entries = [RemoteFolder("/Archive/run1/aux", "/archive/run1/aux"), _remote_file("/Archive/run1/aux/x.txt"),
               _remote_file("/Archive/run1/aux/y.txt"), _remote_file("/Archive/run1/CON"),
               _remote_file("/Archive/run1/notes."), _remote_file("/Archive/run1/ok.txt")]
    row = SheetRow(Path("inputs.xlsx"), "dropboxDownload_API", 2,
                   {"dropboxPath": "/Archive/run1", "localDir": tmp_path / "restore", "joinFlag": 0})
    roots = {2: RemoteFolder("/Archive/run1", "/archive/run1")}
    return download_plan.expand(_Listed(entries), [row], roots, logging.getLogger("test"))


def test_a_download_with_names_windows_refuses_stops_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(names, "LOCAL_SYSTEM", "windows")
    with pytest.raises(SheetError) as refused:
        _download_plan(tmp_path)
    messages = [p.message for p in refused.value.problems]
    assert [m.split(":", 1)[0] for m in messages] == ["/Archive/run1/aux", "/Archive/run1/CON", "/Archive/run1/notes."]
    assert "device name" in messages[1] and "space or a period" in messages[2]
    assert all("Rename it in Dropbox" in m for m in messages)
    assert not (tmp_path / "restore").exists()


def test_the_same_download_goes_ahead_on_linux(tmp_path, monkeypatch):
    monkeypatch.setattr(names, "LOCAL_SYSTEM", "posix")
    plan = _download_plan(tmp_path)
    assert sorted(t.target.name for t in plan.tasks) == ["CON", "notes.", "ok.txt", "x.txt", "y.txt"]


def _zip(path: Path, members: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name in members:
            archive.writestr(name, name.encode())
    return path


@pytest.mark.parametrize("system, refused", [
    ("windows", ["'CON'", "'data/aux.txt'", "'data/A.txt' and 'data/a.txt'", "'end.'"]),
    ("macos", ["'data/A.txt' and 'data/a.txt'"]),
    ("posix", []),
])
def test_an_unzip_with_names_this_computer_refuses_writes_nothing(tmp_path, monkeypatch, system, refused):
    monkeypatch.setattr(names, "LOCAL_SYSTEM", system)
    folder = tmp_path / "restore"
    folder.mkdir()
    archive = _zip(folder / "run.zip", ["CON", "data/aux.txt", "data/A.txt", "data/a.txt", "end.", "ok.txt"])
    if not refused:
        joining.extract_zip(archive, logging.getLogger("test"))
        assert (folder / "data" / "A.txt").read_bytes() == b"data/A.txt"
        return
    with pytest.raises(joining.JoinProblem) as stopped:
        joining.extract_zip(archive, logging.getLogger("test"))
    message = str(stopped.value)
    assert f"{len(refused)} entr" in message and all(r in message for r in refused)
    assert "Extract it on Linux" in message
    assert sorted(p.name for p in folder.iterdir()) == ["run.zip"]


# ------------------------------------------------------------------------------ 7-Zip's code page

FAKE_SEVEN_ZIP = """\
import sys
# 7-Zip on Windows answers in the console's OEM code page unless given -sccUTF-8.
message = "ERROR: D:\\\\Daten\\\\Mikroskopie_\\u00dcberpr\\u00fcfung_\\u00b5m : Zugriff verweigert\\n"
sys.stderr.buffer.write(message.encode("utf-8" if "-sccUTF-8" in sys.argv else "cp850"))
sys.exit(2)
"""
READABLE = "Mikroskopie_\u00dcberpr\u00fcfung_\u00b5m"


@pytest.fixture
def fake_seven_zip(tmp_path, monkeypatch):
    """A 7-Zip that fails with a non-ASCII folder name in its message; the commands it got."""
    fake = tmp_path / "fake7z.py"
    fake.write_text(FAKE_SEVEN_ZIP, encoding="utf-8")
    commands: list[list[str]] = []

    def through_python(real):
        def start(command, *args, **kwargs):
            if command[0] == str(fake):
                commands.append(list(command))
                command = [sys.executable, str(fake), *command[1:]]
            return real(command, *args, **kwargs)
        return start

    monkeypatch.setattr(zipping.subprocess, "Popen", through_python(zipping.subprocess.Popen))
    monkeypatch.setattr(joining.subprocess, "run", through_python(joining.subprocess.run))
    return fake, commands


def test_seven_zip_messages_are_read_as_utf8_when_zipping(tmp_path, fake_seven_zip):
    fake, commands = fake_seven_zip
    folder = make_tree(tmp_path / READABLE, {"frame.tif": b"x"})
    with pytest.raises(FileProblem) as failed:
        zipping.SevenZip(fake, 1, 1).build(zipping.scan_folder(folder), tmp_path / "out.zip", lambda done: None)
    assert "-sccUTF-8" in commands[0]
    assert READABLE in str(failed.value)


def test_seven_zip_messages_are_read_as_utf8_when_unzipping(tmp_path, fake_seven_zip, monkeypatch):
    fake, commands = fake_seven_zip
    monkeypatch.setattr(zipping, "find_seven_zip", lambda configured=None: fake)
    with pytest.raises(joining.JoinProblem) as failed:
        joining._extract_with_seven_zip(tmp_path / "run.zip", tmp_path / "staging")
    assert "-sccUTF-8" in commands[0]
    assert READABLE in str(failed.value)


# ------------------------------------------------------------------------------ --help


SPEC = [Setting("sheetName", "dropboxUpload_APP", str, "tab to read"),
        Setting("dropboxDir", "", str, "your Dropbox folder", optional=True),
        Setting("workers", 4, int, "files at once")]


def _run(tmp_path: Path, settings_text: str, *argv: str) -> int:
    return cli.run_script(script=tmp_path / "app.py", description="test", spec=SPEC, script_values={},
                          main=lambda context: 0, log_subdir="upload", log_name="", argv=list(argv),
                          settings_text=settings_text)


def test_help_shows_the_values_written_in_the_settings_lines(tmp_path, capsys):
    text = "sheetName = 'dropboxUpload_API'\ndropboxDir = 'C:\\Users\\me\\100% Dropbox'\n"
    with pytest.raises(SystemExit) as exited:
        _run(tmp_path, text, "--help")
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert exited.value.code == 0
    assert "(now: 'dropboxUpload_API', from the settings lines)" in shown
    assert "(now: 'C:\\Users\\me\\100% Dropbox', from the settings lines)" in shown
    assert "files at once (default: 4)" in shown


def test_a_bad_settings_line_is_still_reported_without_a_traceback(tmp_path, capsys):
    assert _run(tmp_path, "sheetName = 'dropboxUpload_API\n", "--logs", str(tmp_path / "logs")) == 2
    error = capsys.readouterr().err
    assert "has no closing '" in error and "Traceback" not in error


def test_app_help_shows_its_own_settings_block():
    result = run_script("app.py", "--help")
    shown = " ".join(result.stdout.split())
    assert result.returncode == 0, result.stderr
    assert "(now: 'dropboxUpload_APP', from the settings lines)" in shown


# ------------------------------------------------------------------------------ durations


@pytest.mark.parametrize("seconds, text", [(0.6, "0.6 s"), (30, "30 s"), (59.5, "59.5 s"), (90, "1 min 30 s"),
                                           (7260, "2 h 1 min"), (183600, "2 d 3 h")])
def test_durations_read_as_people_say_them(seconds, text):
    assert human_duration(seconds) == text


def test_a_sleep_time_below_one_minute_is_not_every_0_min():
    assert desktop_job.every(0.5 * 60) == "30 s"
    assert desktop_job.every(0.01 * 60) == "0.6 s"
