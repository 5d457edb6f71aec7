"""preProcess/1_listDirToZip.py and archive_dropbox/scan.py: the walk, the totals, the zip
candidates (topmost folders, whole movies, whole path components), the three result files, the
warnings and the log, and every bad input ending in one clear message with nothing written."""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from archive_dropbox import list_dir_cmd, scan
from archive_dropbox.cli import run_script as run_in_process
from archive_dropbox.sheets import EXISTING_DIR, FLAG, Column, read_tab

from .conftest import REPO, log_files, make_tree, run_script, write_xlsx

SCRIPT = REPO / "preProcess" / "1_listDirToZip.py"
KB = 1024
# 0.0001 GB = 100,000 bytes: small enough for test trees, large enough for folders of a few KB.
LIMIT_GB = "0.0001"
LIMIT_BYTES = 0.0001 * scan.GB
OUTPUTS = (scan.SIZE_LIST, scan.ZIP_LIST, scan.ZIP_WORKBOOK)
LOG_NAME = re.compile(r"^\d{8}_\d{6}_listDirToZip(_\d+)?\.log$")


def read_list(path: Path) -> list[tuple[str, int, int, str]]:
    lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    assert lines[0] == "Directory\tNumber of subdirectories\tNumber of files\tSize (GB)"
    rows = []
    for line in lines[1:]:
        directory, subdirs, files, size = line.split("\t")
        rows.append((directory, int(subdirs), int(files), size))
    return rows


def expected_totals(root: Path) -> dict[str, tuple[int, int, str]]:
    """Independent totals with os.walk (links not followed, link entries not counted)."""
    totals = {}
    for current, dirs, files in os.walk(root):
        subdirs = count = size = 0
        for below, below_dirs, below_files in os.walk(current):
            subdirs += len([d for d in below_dirs if not os.path.islink(os.path.join(below, d))])
            for name in below_files:
                full = os.path.join(below, name)
                if not os.path.islink(full):
                    count += 1
                    size += os.lstat(full).st_size
        totals[current] = (subdirs, count, f"{size / scan.GB:.6f}")
    return totals


def run_list(workbook: Path, out: Path, logs_root: Path, *flags: str):
    return run_script(SCRIPT, "--excelName", str(workbook), "--logs", str(logs_root),
                      "--output-dir", str(out), *flags, timeout=120)


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    """A lab disk with every candidate rule in it (minFiles 3, limit 0.0001 GB = 100,000 bytes)."""
    data = tmp_path / "data"
    files: dict[str, int] = {
        "a1/f1.tif": KB, "a1/f2.tif": KB,  # too few files; must not swallow a10
        "a10/f1.tif": KB, "a10/f2.tif": KB, "a10/f3.tif": KB,
        "big/sub/f1.tif": KB, "big/sub/f2.tif": KB, "big/sub/f3.tif": KB,
        "few/only.txt": 10,
        "movie10/frames/f1.tif": KB, "movie10/frames/f2.tif": KB, "movie10/frames/f3.tif": KB,
        "movie1/gain/g1.dm4": KB, "movie1/gain/g2.dm4": KB, "movie1/gain/g3.dm4": KB,
    }
    files.update({f"big/frame_{i}.tif": 30 * KB for i in range(4)})  # 120 KB directly inside
    for second in ("Hour_00/Minute_00/Second_00", "Hour_00/Minute_01/Second_00",
                   "Hour_01/Minute_00/Second_00"):
        files.update({f"movie1/{second}/frame_{i}.tif": 20 * KB for i in range(3)})
    make_tree(data, files)
    return data


def test_candidates_outputs_and_log(tmp_path, lab, logs_root):
    # Second row: relative to the workbook's folder, with spaces and non-ASCII names.
    unicode_root = tmp_path / "Données été 2024"
    make_tree(unicode_root, {f"Ωmega frames/ファイル {i}.tif": KB for i in range(3)})
    workbook = write_xlsx(tmp_path / "zipDir.xlsx",
                          {"listDirToZip": [["inputDir"], [str(lab)], ["Données été 2024"]]})
    out = tmp_path / "out"
    out.mkdir()
    (out / scan.ZIP_LIST).write_text("stale list from an earlier run\n")

    result = run_list(workbook, out, logs_root, "--minFiles", "3", "--fileSizeLimit_GB", LIMIT_GB)
    assert result.returncode == 0, result.stdout + result.stderr

    zip_list = read_list(out / scan.ZIP_LIST)
    assert [row[0] for row in zip_list] == [
        str(lab / "a10"), str(lab / "big" / "sub"), str(lab / "movie1"), str(lab / "movie10"),
        str(unicode_root)]
    movie = dict((row[0], row[1:]) for row in zip_list)[str(lab / "movie1")]
    # The whole movie folder with merged totals, above the size limit: 9 frames + 3 gain files.
    assert movie == (9, 12, "0.000187")  # 187,392 bytes in GB of 10**9 bytes, as app.py counts

    sizes = read_list(out / scan.SIZE_LIST)
    expected = {**expected_totals(lab), **expected_totals(unicode_root)}
    assert {row[0]: row[1:] for row in sizes} == expected
    assert sizes[0][0] == str(lab) and sizes[1][0] == str(lab / "a1")  # parent before children
    assert dict((r[0], r[2]) for r in sizes)[str(lab / "a1")] == 2  # a10 not counted into a1

    rows = read_tab(out / scan.ZIP_WORKBOOK, "zipDir",
                    [Column("inputDir", EXISTING_DIR), Column("deleteFlag", FLAG)])
    assert [(str(r["inputDir"]), r["deleteFlag"]) for r in rows] == [(row[0], 0) for row in zip_list]
    assert not list(out.glob(".~*"))

    logs = log_files(logs_root, "preProcess")
    assert len(logs) == 1 and LOG_NAME.match(logs[0].name)
    text = logs[0].read_text(encoding="utf-8")
    for expected_text in ("Row 2: scanning", "Row 3: scanning", "Scanning took", "---- Warnings ----",
                          "Files that will reach Dropbox: 31 without zipping, about 14 after",
                          "Finished with exit status 0"):
        assert expected_text in text
    # The over-limit folder holding many files directly is warned about, on screen and in the log.
    crowded = f"{lab / 'big'}: 4 files directly inside"
    assert crowded in text and crowded in result.stdout
    assert f"Movie folder {lab / 'movie1'}" in result.stdout


def test_symlink_loops_and_links_are_neither_followed_nor_counted(tmp_path, logs_root):
    data = make_tree(tmp_path / "data", {f"real/f{i}.tif": 100 for i in range(3)})
    try:
        os.symlink("..", data / "real" / "loop", target_is_directory=True)
        os.symlink(data / "real" / "f0.tif", data / "link_to_file.tif")
        os.symlink(data / "nowhere", data / "dangling")
    except (OSError, NotImplementedError) as exc:
        pytest.skip(f"cannot create symbolic links here: {exc}")
    workbook = write_xlsx(tmp_path / "zipDir.xlsx", {"listDirToZip": [["inputDir"], [str(data)]]})
    out = tmp_path / "out"

    result = run_list(workbook, out, logs_root, "--minFiles", "3", "--threads", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "threads = 3." in result.stdout and "(3 threads)" in result.stdout
    assert read_list(out / scan.SIZE_LIST) == [
        (str(data), 1, 3, "0.000000"), (str(data / "real"), 0, 3, "0.000000")]
    assert [row[0] for row in read_list(out / scan.ZIP_LIST)] == [str(data)]
    assert "3 symbolic link(s) or junction(s) (never followed)" in result.stdout


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0,
                    reason="chmod 000 does not block reading as root or on Windows; "
                           "test_unreadable_entries_are_counted_not_fatal simulates it instead")
def test_unreadable_folder_on_disk(tmp_path, logs_root):
    data = make_tree(tmp_path / "data", {**{f"ok/f{i}": 10 for i in range(3)},
                                         **{f"locked/f{i}": 10 for i in range(3)}})
    (data / "locked").chmod(0)
    try:
        workbook = write_xlsx(tmp_path / "zipDir.xlsx", {"listDirToZip": [["inputDir"], [str(data)]]})
        result = run_list(workbook, tmp_path / "out", logs_root, "--minFiles", "3")
    finally:
        (data / "locked").chmod(0o755)
    assert result.returncode == 1
    assert f"{data / 'locked'}: folder cannot be read" in result.stdout
    assert [row[0] for row in read_list(tmp_path / "out" / scan.ZIP_LIST)] == [str(data / "ok")]


# --------------------------------------------------------------------------- bad input


def _bad_cases(tmp_path: Path) -> dict:
    data = make_tree(tmp_path / "data", {"sub/f.txt": 1, "plain.txt": 1})
    book = tmp_path / "zipDir.xlsx"
    return {
        "missing workbook": (tmp_path / "nope.xlsx", [], ["nope.xlsx", "does not exist"]),
        "missing tab": ({"other": [["inputDir"], [str(data)]]}, [], ["no tab named 'listDirToZip'"]),
        "wrong columns": ({"listDirToZip": [["folder"], [str(data)]]}, [],
                          ["column 'inputDir' is missing", "tab 'listDirToZip'"]),
        "blank sheet": ({"listDirToZip": []}, [], ["the tab is empty"]),
        "header only": ({"listDirToZip": [["inputDir"]]}, [], ["no rows to work on"]),
        "folder missing": ({"listDirToZip": [["inputDir"], [str(data), None], [str(data / "gone")]]}, [],
                           ["row 3", "does not exist"]),
        "file not folder": ({"listDirToZip": [["inputDir"], [str(data / "plain.txt")]]}, [],
                            ["row 2", "is a file, but a folder is expected"]),
        "rows overlap": ({"listDirToZip": [["inputDir"], [str(data)], [str(data / "sub")]]}, [],
                         ["row 3", "inside the folder of row 2"]),
        "bad settings": ({"listDirToZip": [["inputDir"], [str(data)]]},
                         ["--fileSizeLimit_GB", "0", "--minFiles", "0"],
                         ["'fileSizeLimit_GB' = '0' must be more than 0", "'minFiles' = '0' must be at least 1"]),
        "output dir is a file": ({"listDirToZip": [["inputDir"], [str(data)]]}, ["--output-dir", str(book)],
                                 ["is a file: give a folder"]),
    }


@pytest.mark.parametrize("case", ["missing workbook", "missing tab", "wrong columns", "blank sheet",
                                  "header only", "folder missing", "file not folder", "rows overlap",
                                  "bad settings", "output dir is a file"])
def test_bad_input_gives_one_clear_message_and_changes_nothing(tmp_path, logs_root, case):
    workbook_or_tabs, flags, fragments = _bad_cases(tmp_path)[case]
    workbook = tmp_path / "zipDir.xlsx"
    if isinstance(workbook_or_tabs, dict):
        write_xlsx(workbook, workbook_or_tabs)
    else:
        write_xlsx(workbook, {"listDirToZip": [["inputDir"]]})
        workbook = workbook_or_tabs
    out = tmp_path / "out"
    out.mkdir()
    for name in OUTPUTS:
        (out / name).write_bytes(b"results of the previous run")
    # A later --output-dir in `flags` wins over this one (argparse keeps the last).
    arguments = ["--excelName", str(workbook), "--logs", str(logs_root), "--output-dir", str(out), *flags]

    result = run_script(SCRIPT, *arguments, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in message
    if not flags:  # a workbook problem: the message says which workbook
        assert f"workbook {workbook}" in message
    assert "Traceback" not in message
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    assert all((out / name).read_bytes() == b"results of the previous run" for name in OUTPUTS)


# --------------------------------------------------------------------------- in process


class _Entry:
    """A DirEntry whose stat() fails, as an unreadable file on a network share does."""

    def __init__(self, entry):
        self._entry = entry
        self.name = entry.name

    def __getattr__(self, name):
        return getattr(self._entry, name)

    def stat(self, follow_symlinks=True):
        raise PermissionError(13, "Permission denied")


class _Listing:
    def __init__(self, entries):
        self._entries = entries

    def close(self):
        self._entries.close()

    def __iter__(self):
        for entry in self._entries:
            yield _Entry(entry) if entry.name == "secret.tif" else entry


def _unreadable():
    """Folders named 'locked' cannot be opened; files named 'secret.tif' cannot be stat'ed."""
    def open_listing(path, is_root):
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied", path)
        return _Listing(os.scandir(path)), None
    return open_listing


def test_unreadable_entries_are_counted_not_fatal(tmp_path, logs_root, monkeypatch, capsys):
    data = make_tree(tmp_path / "data", {
        **{f"project/ok/f{i}.tif": 10 for i in range(3)},
        **{f"project/locked/f{i}.tif": 10 for i in range(3)},
        **{f"other/f{i}.tif": 10 for i in range(3)}, "other/secret.tif": 10,
        **{f"fine/f{i}.tif": 10 for i in range(3)}})
    monkeypatch.setattr(scan, "_open_listing", _unreadable())
    tree = scan.scan_directory(data)
    ids = {tree.path(d): d for d in range(len(tree))}
    assert tree.problem_count == 2
    assert sorted(p for p, _ in tree.problems) == [str(data / "other" / "secret.tif"),
                                                  str(data / "project" / "locked")]
    assert [bool(tree.incomplete[ids[str(data / p)]]) for p in ("project", "project/ok", "other", "fine")] \
        == [True, False, True, False]
    assert [c.path for c in scan.select_candidates(tree, LIMIT_BYTES, 3)] == [
        str(data / "fine"), str(data / "project" / "ok")]

    # The whole script: results written, the problems named, exit status 1.
    workbook = write_xlsx(tmp_path / "zipDir.xlsx", {"listDirToZip": [["inputDir"], [str(data)]]})
    out = tmp_path / "out"
    code = run_in_process(script=SCRIPT, description="", spec=list_dir_cmd.SETTINGS, script_values={},
                          main=list_dir_cmd.run, log_subdir="preProcess", log_name="listDirToZip",
                          add_arguments=list_dir_cmd.add_arguments,
                          argv=["--excelName", str(workbook), "--logs", str(logs_root),
                                "--output-dir", str(out), "--minFiles", "3"])
    assert code == 1
    screen = capsys.readouterr().out
    assert f"{data / 'project' / 'locked'}: folder cannot be read (Permission denied)" in screen
    assert f"{data / 'other' / 'secret.tif'}: cannot be read (Permission denied)" in screen
    assert [row[0] for row in read_list(out / scan.ZIP_LIST)] == [str(data / "fine"), str(data / "project" / "ok")]


def _run_rows(tmp_path, logs_root, *folders: Path) -> int:
    workbook = write_xlsx(tmp_path / "zipDir.xlsx",
                          {"listDirToZip": [["inputDir"], *[[str(f)] for f in folders]]})
    return run_in_process(script=SCRIPT, description="", spec=list_dir_cmd.SETTINGS, script_values={},
                          main=list_dir_cmd.run, log_subdir="preProcess", log_name="listDirToZip",
                          add_arguments=list_dir_cmd.add_arguments,
                          argv=["--excelName", str(workbook), "--logs", str(logs_root),
                                "--output-dir", str(tmp_path / "out"), "--minFiles", "3"])


def test_an_unreadable_root_fails_its_row_only(tmp_path, logs_root, monkeypatch, capsys):
    locked = make_tree(tmp_path / "locked", {"f.txt": 1})
    fine = make_tree(tmp_path / "fine", {f"f{i}.txt": 1 for i in range(3)})
    monkeypatch.setattr(scan, "_open_listing", _unreadable())
    assert _run_rows(tmp_path, logs_root, locked, fine) == 1
    assert f"Row 2: {locked} folder cannot be read" in capsys.readouterr().out
    sizes = tmp_path / "out" / scan.SIZE_LIST
    assert [row[0] for row in read_list(sizes)] == [str(fine)]

    # When no folder at all can be read, the previous results are kept.
    before = sizes.read_bytes()
    assert _run_rows(tmp_path, logs_root, locked) == 1
    assert "result files of the previous run were left as they are" in capsys.readouterr().out
    assert sizes.read_bytes() == before


@pytest.mark.skipif(sys.platform != "linux", reason="only Linux file systems accept names that are not UTF-8")
def test_names_that_are_not_utf8_are_kept_byte_for_byte(tmp_path, logs_root, capsys):
    data = tmp_path / "data"
    data.mkdir()
    raw = os.fsencode(data) + b"/caf\xe9"
    try:
        os.mkdir(raw)
    except OSError as exc:
        pytest.skip(f"this file system refuses the name: {exc}")
    for i in range(3):
        with open(raw + b"/f%d" % i, "wb") as handle:
            handle.write(b"x")
    (data / "too big to zip.bin").write_bytes(bytes(200 * KB))
    workbook = write_xlsx(tmp_path / "zipDir.xlsx", {"listDirToZip": [["inputDir"], [str(data)]]})
    out = tmp_path / "out"
    code = run_in_process(script=SCRIPT, description="", spec=list_dir_cmd.SETTINGS, script_values={},
                          main=list_dir_cmd.run, log_subdir="preProcess", log_name="listDirToZip",
                          add_arguments=list_dir_cmd.add_arguments,
                          argv=["--excelName", str(workbook), "--logs", str(logs_root),
                                "--output-dir", str(out), "--minFiles", "3", "--fileSizeLimit_GB", LIMIT_GB])
    assert code == 0
    lines = (out / scan.ZIP_LIST).read_bytes().splitlines()
    assert lines[1].split(b"\t")[0] == raw
    assert "Left out of directoryZipList.xlsx" in capsys.readouterr().out
    assert log_files(logs_root, "preProcess")[0].read_text(encoding="utf-8").count("caf\\xe9") >= 2


def _slow_listing(delay: float, real=scan._open_listing):
    def open_listing(path, is_root):
        time.sleep(delay)  # a network share answering slowly
        return real(path, is_root)
    return open_listing


def _serialized_listing(delay: float, real=scan._open_listing):
    gate = threading.Lock()

    def open_listing(path, is_root):
        with gate:  # a device that answers one request at a time: threads cannot help
            time.sleep(delay)
        return real(path, is_root)
    return open_listing


def _summary(tree: scan.DirectoryTree) -> list[tuple]:
    return [(tree.path(d), tree.total_files[d], tree.total_bytes[d], tree.total_subdirs[d])
            for d, _ in tree.preorder()]


@pytest.mark.parametrize("storage, threads, decision", [(_slow_listing, 4, "kept"),
                                                        (_serialized_listing, 1, "back to 1")])
def test_threads_are_kept_only_when_they_read_faster(tmp_path, monkeypatch, storage, threads, decision):
    # 111 folders at 10 ms each: the walk outlasts the probe and the trial by a wide margin.
    data = make_tree(tmp_path / "data", {f"d{i}/e{j}/f.txt": i + j for i in range(10) for j in range(10)})
    reference = scan.scan_directory(data, threads=1)
    monkeypatch.setattr(scan, "_open_listing", storage(0.01))
    monkeypatch.setattr(scan, "PROBE_SECONDS", 0.05)
    monkeypatch.setattr(scan, "TRIAL_SECONDS", 0.1)
    monkeypatch.setattr(scan, "AUTO_THREADS", 4)
    seen = []
    tree = scan.scan_directory(data, progress=lambda *counts: seen.append(counts), progress_seconds=0)
    assert tree.threads_used == threads and reference.threads_used == 1
    assert tree.thread_note.endswith(decision)
    assert _summary(tree) == _summary(reference)
    assert len(tree) == 111 and tree.total_files[0] == 100
    assert seen and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))


def test_a_bug_in_a_worker_ends_the_walk_instead_of_hanging(tmp_path, monkeypatch):
    make_tree(tmp_path / "data", {"a/b/c.txt": 1})

    def broken(path, is_root):
        raise RuntimeError("boom")
    monkeypatch.setattr(scan, "_open_listing", broken)
    with pytest.raises(RuntimeError, match="boom"):
        scan.scan_directory(tmp_path / "data", threads=3)


# --------------------------------------------------------------------------- properties

NAMES = ["a1", "a10", "b c", "Hour_01", "hour_2", "Minute_00", "Second_05", "movie", "é"]


def _node():
    return st.recursive(
        st.fixed_dictionaries({"files": st.lists(st.integers(0, 40_000), max_size=5),
                               "unreadable": st.sampled_from([False, False, False, True]),
                               "children": st.just({})}),
        lambda children: st.fixed_dictionaries({
            "files": st.lists(st.integers(0, 40_000), max_size=5),
            "unreadable": st.sampled_from([False, False, False, True]),
            "children": st.dictionaries(st.sampled_from(NAMES), children, max_size=4)}),
        max_leaves=25)


def _build(root: dict) -> tuple[scan.DirectoryTree, dict[tuple[str, ...], dict]]:
    """The tree as the walker would record it, and the same data keyed by name tuples."""
    tree = scan.DirectoryTree(os.path.join(os.sep, "data"))
    flat: dict[tuple[str, ...], dict] = {}
    pending = [(0, ("data",), root)]
    while pending:
        dir_id, key, node = pending.pop()
        flat[key] = node
        tree.record(dir_id, len(node["files"]), sum(node["files"]), unreadable=node["unreadable"])
        names = sorted(node["children"])
        if names:
            first = tree.add_children(dir_id, names)
            pending += [(first + i, key + (name,), node["children"][name]) for i, name in enumerate(names)]
    return tree.finish(), flat


def _oracle(flat: dict[tuple[str, ...], dict], limit: float, min_files: int) -> tuple[set, set]:
    """The rules of SPEC section 3 restated on name tuples (whole components by construction)."""
    def below(key):
        return [k for k in flat if k[:len(key)] == key]

    def qualifies(key):
        inside = below(key)
        return (not any(flat[k]["unreadable"] for k in inside)
                and sum(sum(flat[k]["files"]) for k in inside) <= limit
                and sum(len(flat[k]["files"]) for k in inside) >= min_files)

    chosen = {k for k in flat if qualifies(k) and not any(qualifies(k[:n]) for n in range(1, len(k)))}
    grouped, movies = set(), set()
    for key in chosen:
        levels = [n for n in range(1, len(key)) if re.match(r"(?i)^(hour|minute|second)_\d+$", key[n])]
        if levels:
            grouped.add(key[:levels[0]])
            movies.add(key[:levels[0]])
        else:
            grouped.add(key)
    final = {k for k in grouped if not any(k[:n] in grouped for n in range(1, len(k)))}
    return final, movies & final


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(root=_node(), limit=st.integers(0, 150_000), min_files=st.integers(1, 8))
def test_candidates_follow_the_rules_on_any_tree(root, limit, min_files):
    tree, flat = _build(root)
    candidates = scan.select_candidates(tree, limit, min_files)
    key_of = {d: tuple(n for n in tree.path(d).split(os.sep) if n) for d in range(len(tree))}
    chosen = [key_of[c.dir_id] for c in candidates]

    final, movies = _oracle(flat, limit, min_files)
    assert set(chosen) == final and len(chosen) == len(final)
    assert {key_of[c.dir_id] for c in candidates if c.movie} == movies
    # Disjoint on whole components, listed parent-first in name order.
    for a in chosen:
        assert not any(b != a and a[:len(b)] == b for b in chosen)
    assert chosen == sorted(chosen)
    for candidate in candidates:
        key = key_of[candidate.dir_id]
        inside = [k for k in flat if k[:len(key)] == key]
        assert candidate.files == sum(len(flat[k]["files"]) for k in inside)
        assert candidate.bytes == sum(sum(flat[k]["files"]) for k in inside)
        assert candidate.subdirectories == len(inside) - 1
        if not candidate.movie:
            assert scan.qualifies(tree, candidate.dir_id, limit, min_files)
        else:
            assert candidate.files >= min_files
    # Nothing worth zipping is left out: every qualifying folder is inside exactly one candidate.
    for d in range(len(tree)):
        if scan.qualifies(tree, d, limit, min_files):
            key = key_of[d]
            assert sum(1 for c in chosen if key[:len(c)] == c) == 1


def test_movie_grouping_stays_inside_the_scanned_folder():
    tree = scan.DirectoryTree(os.path.join(os.sep, "data", "Hour_00"))
    first = tree.add_children(0, ["Minute_00", "Minute_01"])
    for offset in range(2):
        tree.record(first + offset, 5, 100)
    tree.finish()
    candidates = scan.select_candidates(tree, 150, 5)
    # Both minutes together are over the limit, so each qualifies alone and groups under the root.
    assert [(c.path, c.movie, c.files) for c in candidates] == [(tree.root, True, 10)]


def test_parts_needed_counts_split_parts_and_their_manifest():
    assert scan.parts_needed(10, 10) == 1
    assert scan.parts_needed(11, 10) == 3
    assert scan.parts_needed(30, 10) == 4
