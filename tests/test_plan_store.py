"""Stage 1's plan on disk (archive_dropbox/plan_store.py, issue 18): files read back in plan
order and by position, two files Dropbox would take for one caught by the database's UNIQUE
index on the key's hash, and a collision of hashes never taken for a clash of names."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from archive_dropbox import plan_store, prepare
from archive_dropbox.errors import SheetError
from archive_dropbox.plan_store import PlanStore
from archive_dropbox.sheets import SheetRow

LOG = logging.getLogger("test_plan_store")


def row(number: int = 2, source: Path = Path("/data"), output: str = "/Archive") -> SheetRow:
    return SheetRow(Path("inputs.xlsx"), "dropboxUpload_API", number,
                    {"inputFile": source, "outputDir": output, "deleteAfterUpload": 0})


def test_files_come_back_in_order_by_position_and_counted():
    store = PlanStore(part_limit=100)
    first, second = row(2), row(3)
    for index, (owner, size) in enumerate([(first, 10), (first, 250), (second, 0)]):
        assert store.add(owner, f"/data/f{index}", size, 1_000 + index, f"/Archive/f{index}", index == 1,
                         f"1:{index}") is None
    assert len(store) == 3
    assert [s.size for s in store] == [10, 250, 0]
    assert [s.row for s in store] == [first, first, second]
    assert store.rows == [first, second]
    big = store[1]
    assert (big.source, big.destination, big.delete_after, big.file_id) == (Path("/data/f1"), "/Archive/f1", True,
                                                                            "1:1")
    assert [p.length for p in big.parts] == [100, 100, 50]
    assert store[-1].destination == "/Archive/f2" and store[0].parts is None
    assert [s.destination for s in store[0:2]] == ["/Archive/f0", "/Archive/f1"]
    with pytest.raises(IndexError):
        store[3]
    assert (store.total_bytes, store.split_count, store.part_count) == (260, 1, 3)


def test_a_second_file_dropbox_would_take_for_the_first_is_refused_and_not_added():
    store = PlanStore(part_limit=10**9)
    owner = row()
    assert store.add(owner, "/data/Run.tif", 1, 1, "/Archive/Run.tif", False, None) is None
    other = store.add(owner, "/data/run.TIF", 2, 2, "/Archive/run.TIF", False, None)
    assert other == ("/Archive/Run.tif", Path("/data/Run.tif"), owner)
    assert len(store) == 1 and store.total_bytes == 1
    assert store.file_at("/ARCHIVE/RUN.TIF") == other
    assert store.file_at("/Archive/other") is None


def test_a_collision_of_hashes_is_not_a_clash_of_names(monkeypatch):
    monkeypatch.setattr(plan_store, "key_hash", lambda key: 7)  # every name gets the same 64-bit key
    store = PlanStore(part_limit=10**9)
    owner = row()
    for name in ("a", "b", "c"):
        assert store.add(owner, f"/data/{name}", 1, 1, f"/Archive/{name}", False, None) is None
    assert [s.destination for s in store] == ["/Archive/a", "/Archive/b", "/Archive/c"]
    assert store.add(owner, "/data/B2", 1, 1, "/Archive/B", False, None)[0] == "/Archive/b"
    assert store.add(owner, "/data/A2", 1, 1, "/Archive/A", False, None)[0] == "/Archive/a"
    assert store.file_at("/archive/c")[0] == "/Archive/c"
    assert len(store) == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="aAbBéÉ_.", min_size=1, max_size=4), max_size=30))
def test_the_store_refuses_exactly_the_names_a_dict_of_case_keys_would(names):
    """The database's answer matches the in-memory namespace it replaced."""
    store = PlanStore(part_limit=10**9)
    owner = row()
    seen: dict[str, str] = {}
    for name in names:
        destination = f"/Archive/{name}"
        key = prepare.case_key(destination)
        other = store.add(owner, f"/data/{name}", 1, 1, destination, False, None)
        if key in seen:
            assert other is not None and other[0] == seen[key]
        else:
            assert other is None
            seen[key] = destination
    assert [s.destination for s in store] == list(seen.values())


def _plan(root: Path):
    return prepare.build_plan([row(source=root, output="/Archive/data")], input_column="inputFile",
                              output_column="outputDir", delete_column="deleteAfterUpload",
                              destination_of_row=lambda r: r["outputDir"], part_limit=10**12, log=LOG)


def test_build_plan_finds_a_file_and_a_folder_dropbox_would_take_for_one(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "a.tif").write_bytes(b"x")
    (tmp_path / "RUN").write_bytes(b"y")
    (tmp_path / "Notes.txt").write_bytes(b"1")
    (tmp_path / "notes.TXT").write_bytes(b"2")
    with pytest.raises(SheetError) as caught:
        _plan(tmp_path)
    text = caught.value.describe()
    assert "cannot share a name" in text and "ignores upper/lower case" in text


@pytest.mark.skipif(sys.platform != "linux", reason="reads the peak RSS of a child process (Linux ru_maxrss)")
def test_planning_memory_does_not_grow_with_the_number_of_files(tmp_path):
    """Twenty times the files, about the same peak memory: the plan is on disk (issue 18). Measured
    in a child process each, so the peaks are their own."""
    def tree(count: int) -> Path:
        root = tmp_path / f"t{count}"
        for index in range(count):
            folder = root / f"d{index // 500:03d}"
            if index % 500 == 0:
                folder.mkdir(parents=True)
            (folder / f"frame_{index:06d}_with_a_longer_name_as_instruments_write.tif").touch()
        return root

    def peak_kib(root: Path) -> int:
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
        code = ("import sys\n"
                f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                "from pathlib import Path\n"
                "from archive_dropbox import plan_store\n"
                "plan_store.CACHE_KIB = 1024\n"
                "from test_plan_store import _plan\n"
                f"plan = _plan(Path({str(root)!r}))\n"
                f"assert len(plan.sources) == {sum(1 for _ in root.rglob('*.tif'))}\n"
                "print(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1])\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    small, large = peak_kib(tree(1_000)), peak_kib(tree(20_000))
    # An object per file (the list and dict this replaced) costs about 1 KiB each: 19 MiB more
    # for the larger tree. On disk, the growth is SQLite's page cache at most (1 MiB here).
    assert large - small < 8 * 1024, (small, large)


def test_the_destination_check_keeps_only_the_dropbox_files_that_can_be_in_the_way(tmp_path, monkeypatch):
    """A rerun's destination already holds every file: the check keeps Dropbox's folders and
    the files where the plan needs a folder, not one entry per file Dropbox holds."""
    import datetime as dt

    from archive_dropbox import destinations
    from archive_dropbox.dropbox_client import RemoteFile, RemoteFolder

    for index in range(300):
        folder = tmp_path / "data" / f"well_{index // 100}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"frame_{index:03d}.tif").touch()
    (tmp_path / "data" / "well_9" / "run").mkdir(parents=True)
    (tmp_path / "data" / "well_9" / "run" / "x.tif").touch()
    plan = _plan(tmp_path / "data")

    def file(path: str) -> RemoteFile:
        return RemoteFile(path, path.lower(), 0, None, dt.datetime(2024, 1, 1), "rev")

    held = [RemoteFolder("/Archive/data", "/archive/data")]
    for source in plan.sources:
        if "well_9" not in source.destination:
            held.append(file(source.destination))
    held += [RemoteFolder(f"/Archive/data/well_{n}", f"/archive/data/well_{n}") for n in range(3)]
    held.append(RemoteFolder("/Archive/data/well_9", "/archive/data/well_9"))
    held.append(file("/Archive/data/well_9/RUN"))  # a file where the plan needs a folder

    class Client:
        def metadata(self, path):
            return held[0] if path.lower() == "/archive/data" else None

        def iter_entries_or_empty(self, top, recursive=True):
            return iter(held)

    kept = []
    real = destinations._Folder._list

    def noting_list(folder, client):
        real(folder, client)
        kept.append(len(folder.entries))

    monkeypatch.setattr(destinations._Folder, "_list", noting_list)
    [problem] = destinations.check_destinations(Client(), plan, destination_of_row=lambda r: r["outputDir"])
    assert kept == [6]  # 5 folders and the one file in the way, not the 300 files
    assert "/Archive/data/well_9/RUN is a file in Dropbox" in str(problem)


def test_a_full_temporary_disk_is_a_message_not_a_traceback(monkeypatch):
    import sqlite3

    from archive_dropbox.errors import EnvironmentProblem

    store = PlanStore(part_limit=10**9)

    class Full:
        def execute(self, *args):
            raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "_db", Full())
    with pytest.raises(EnvironmentProblem, match="temporary file in .* Free some space there .*TMPDIR.*Nothing was "
                                                 "sent"):
        store.add(row(), "/data/a", 1, 1, "/Archive/a", False, None)


@pytest.mark.parametrize("split_first", [True, False])
def test_a_file_named_like_a_split_files_manifest_or_part_is_refused(tmp_path, split_first):
    """A split file's parts and manifest are files in Dropbox too: a file of the same name would
    be sent to the same path (reported by a review, issue 18)."""
    manifest_name = prepare.split.manifest_name("big.mrc")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    big, plain = ("a", "b") if split_first else ("b", "a")
    (tmp_path / big / "big.mrc").write_bytes(b"x" * 250)  # sent in 3 parts and a manifest
    (tmp_path / plain / manifest_name).write_bytes(b"{}")
    rows = [row(2, tmp_path / big, "/Out"), row(3, tmp_path / plain, "/Out")]
    if not split_first:
        rows.reverse()
    with pytest.raises(SheetError) as caught:
        prepare.build_plan(rows, input_column="inputFile", output_column="outputDir",
                           delete_column="deleteAfterUpload", destination_of_row=lambda r: r["outputDir"],
                           part_limit=100, log=LOG)
    text = str(caught.value.describe())
    assert f"would both be /Out/{manifest_name} in Dropbox" in text, text


def test_a_row_with_many_folders_in_the_way_shows_fifty_and_counts_the_rest(tmp_path):
    from archive_dropbox import destinations
    from archive_dropbox.dropbox_client import RemoteFolder

    for index in range(60):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f"f{index:02d}.tif").touch()
    plan = _plan(tmp_path / "data")
    held = [RemoteFolder("/Archive/data", "/archive/data")]
    held += [RemoteFolder(f"/Archive/data/f{index:02d}.tif", f"/archive/data/f{index:02d}.tif") for index in range(60)]

    class Client:
        def metadata(self, path):
            return held[0]

        def iter_entries_or_empty(self, top, recursive=True):
            return iter(held)

    problems = destinations.check_destinations(Client(), plan, destination_of_row=lambda r: r["outputDir"])
    assert len(problems) == destinations.MAX_PROBLEMS_PER_ROW + 1
    assert all("is a folder in Dropbox" in str(problem) for problem in problems[:-1])
    assert "... and 10 more problems like these" in str(problems[-1])
