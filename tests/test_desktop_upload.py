"""APP mode (sheetName = 'dropboxUpload_APP'): app.py copies batches into a local "Dropbox
folder", a desktop-app simulator syncs that folder into the local Dropbox test server, and
app.py verifies every file through the API before it deletes anything or starts the next batch.

Every scenario runs app.py as a subprocess, as a user does. The environment's CA-bundle
variables point at the system bundle, and `--caBundle` at the test server's certificate, so the
setting is proven to win. Slow disks, full disks and crashes are simulated from outside the
product: a `sitecustomize.py` on the subprocess's PYTHONPATH, the simulator's controls, kill -9.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from conftest import REPO, log_files, make_tree, script_env, write_xlsx, SYSTEM_CA
from tests.dropbox_server import DesktopAppSimulator, DropboxTestServer

from archive_dropbox.desktop_batches import assign_batches, count_batches
from archive_dropbox.desktop_folder import DropboxFolder, is_inside
from archive_dropbox.content_hash import file_content_hash
from archive_dropbox.inventory import is_inventory_name
from archive_dropbox.journal import Item

APP = REPO / "app.py"
TAB = "dropboxUpload_APP"
HEADER = ["inputFile", "outputDir", "deleteAfterUpload"]
KB = 1000

# Loaded by every Python started with this folder on PYTHONPATH; each patch is switched on by
# its own environment variable, so the product carries no test hooks.
SITECUSTOMIZE = '''
import os
import time

_low_disk_flag = os.environ.get("TEST_LOW_DISK_FLAG")
if _low_disk_flag:
    import psutil
    _real_disk_usage = psutil.disk_usage

    def _disk_usage(path):
        real = _real_disk_usage(path)
        if os.path.exists(_low_disk_flag):
            with open(_low_disk_flag + ".readings", "a") as readings:  # one "x" per full-disk reading
                readings.write("x")
            return type(real)(real.total, real.total - 1000, 1000, 100.0)
        return real

    psutil.disk_usage = _disk_usage

_slow_fsync = os.environ.get("TEST_SLOW_FSYNC")
if _slow_fsync:
    _real_fsync = os.fsync

    def _fsync(fd):
        time.sleep(float(_slow_fsync))
        return _real_fsync(fd)

    os.fsync = _fsync
'''


@dataclass
class World:
    """A temp tree with a test Dropbox server, a local Dropbox folder and the desktop app."""

    root: Path
    server: DropboxTestServer
    dropbox: Path
    app: DesktopAppSimulator
    logs: Path
    data: Path
    hooks: Path
    started: list = field(default_factory=list)

    def book(self, rows, tab: str = TAB, header=HEADER) -> Path:
        return write_xlsx(self.root / "inputs.xlsx", {tab: [header, *rows]})

    def command(self, book: Path, *flags: str) -> list[str]:
        defaults = {"--excelName": str(book), "--sheetName": TAB, "--dropboxDir": str(self.dropbox),
                    "--logs": str(self.logs), "--caBundle": self.server.ca_file, "--sleepTime_min": "0.002",
                    "--batchTimeLimit_hour": "1", "--chunkSizeSplit_MB": "1"}
        given_flags = set(flags[::2])
        args = [a for k, v in defaults.items() if k not in given_flags for a in (k, v)]
        return [sys.executable, str(APP), *args, *flags]

    def env(self, **extra: str) -> dict:
        env = self.server.client_env(credentials=True)
        # Build machines set these; the caBundle setting must win over them.
        env.update(REQUESTS_CA_BUNDLE=SYSTEM_CA, CURL_CA_BUNDLE=SYSTEM_CA, SSL_CERT_FILE=SYSTEM_CA)
        if extra:
            env["PYTHONPATH"] = str(self.hooks)
            env.update(extra)
        return script_env(env)

    def run(self, book: Path, *flags: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(book, *flags), env=self.env(**env), capture_output=True, text=True,
                              encoding="utf-8", timeout=timeout, stdin=subprocess.DEVNULL, cwd=str(self.root))

    def start(self, book: Path, *flags: str, **env: str) -> subprocess.Popen:
        before = set(log_files(self.logs, "upload"))
        process = subprocess.Popen(self.command(book, *flags), env=self.env(**env), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(self.root))
        self.started.append(process)
        process.log_before = before
        return process

    def log_of(self, process: subprocess.Popen, timeout: float = 30) -> Path:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = set(log_files(self.logs, "upload")) - process.log_before
            if new:
                return max(new)
            time.sleep(0.05)
        raise AssertionError("app.py wrote no upload log")

    def wait_for_line(self, process: subprocess.Popen, pattern: str, timeout: float = 40) -> str:
        log = self.log_of(process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_text(encoding="utf-8")
            if re.search(pattern, text):
                return text
            if process.poll() is not None:
                text = log.read_text(encoding="utf-8")
                raise AssertionError(f"app.py ended ({process.returncode}) before logging {pattern!r}:\n{text}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the log within {timeout} s:\n{log.read_text(encoding='utf-8')}")

    def wait_until(self, process: subprocess.Popen, condition, what: str, timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert process.poll() is None, f"app.py ended ({process.returncode}) before {what}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            time.sleep(0.02)

    def lookups(self) -> int:
        """Requests that look files up in Dropbox, so far."""
        return sum(self.server.count_calls(route) for route in ("files/get_metadata", "files/list_folder",
                                                                "files/list_folder/continue"))

    def last_log(self) -> str:
        return log_files(self.logs, "upload")[-1].read_text(encoding="utf-8")

    def local_files(self) -> dict[str, Path]:
        return {p.relative_to(self.dropbox).as_posix(): p for p in self.dropbox.rglob("*") if p.is_file()}


@pytest.fixture
def world(tmp_path: Path):
    yield from _world(tmp_path, team=False)


@pytest.fixture
def team_world(tmp_path: Path):
    yield from _world(tmp_path, team=True)


def _world(tmp_path: Path, team: bool):
    server = DropboxTestServer(tmp_path / "server", team=team)
    dropbox = tmp_path / "Dropbox"
    dropbox.mkdir()
    app = DesktopAppSimulator(server, dropbox, "/", delay_s=0.05, poll_interval_s=0.05, team_space=team)
    app.start()
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    logs = tmp_path / "logs"
    logs.mkdir()
    w = World(tmp_path, server, dropbox, app, logs, tmp_path / "data", hooks)
    try:
        yield w
    finally:
        for process in w.started:
            if process.poll() is None:
                process.kill()
                process.wait()
        app.stop()
        server.stop()


def results(log_text: str) -> list[tuple[str, str]]:
    """(result, Dropbox path) of every per-file line, in order."""
    found = []
    for line in log_text.splitlines():
        match = re.search(r"\s(COPIED|VERIFIED|ALREADY IN DROPBOX FOLDER|ALREADY IN DROPBOX|FAILED)\t.*\t->\t(.+)$",
                          line)
        if match:
            found.append((match.group(1), match.group(2)))
    return found


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_files(w: World) -> set[str]:
    """The Dropbox paths the server holds, without the inventories written beside the data."""
    return {path for path in w.server.files() if not is_inventory_name(path.rsplit("/", 1)[1])}


def assert_in_dropbox(w: World, sources: dict[str, Path]) -> None:
    """Each Dropbox path holds exactly the source's bytes (hash recomputed from the store)."""
    for dropbox_path, source in sources.items():
        assert w.server.content_hash(dropbox_path) == file_content_hash(source), dropbox_path


# ============================================================================ pure logic


def _item(number: int, length: int, kind: str = "file") -> Item:
    return Item(id=number, job=TAB, source=f"/s/{number}", destination=f"/d/{number}", kind=kind,
                part_offset=0, length=length, source_size=length, source_mtime_ns=0)


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(min_value=0, max_value=50), max_size=40),
       limit=st.integers(min_value=1, max_value=60),
       recorded_count=st.integers(min_value=0, max_value=40),
       recorded_batches=st.lists(st.integers(min_value=1, max_value=5), max_size=40))
def test_batches_hold_at_most_the_limit_keep_plan_order_and_recorded_numbers(lengths, limit, recorded_count,
                                                                              recorded_batches):
    items = [_item(i + 1, length) for i, length in enumerate(lengths)]
    recorded = {i + 1: b for i, b in zip(range(min(recorded_count, len(items))), recorded_batches)}
    batches, new = assign_batches(items, limit, recorded)

    numbers = [b.number for b in batches]
    assert numbers == sorted(set(numbers))
    placed = {item.id: b.number for b in batches for item in b.items}
    assert sorted(placed) == [item.id for item in items]  # every item exactly once
    for item_id, number in recorded.items():
        assert placed[item_id] == number  # earlier runs' batches are kept
    assert set(new) == {item.id for item in items} - set(recorded)
    first_new = max(recorded.values(), default=0) + 1
    new_batches = [b for b in batches if b.number >= first_new and all(i.id in new for i in b.items)]
    for batch in new_batches:
        positive = [i.length for i in batch.items if i.length > 0]
        # At most the limit, unless one item alone is larger (then it is alone, bar empty items).
        assert batch.size <= limit or len(positive) == 1
        assert [i.id for i in batch.items] == sorted(i.id for i in batch.items)
    new_in_order = [placed[i] for i in sorted(new)]
    assert new_in_order == sorted(new_in_order)  # new items fill batches in plan order
    assert all(placed[i] >= first_new for i in new)
    # An empty item (a manifest) never opens a batch: it joins the item before it.
    for before, after in zip(items, items[1:]):
        if after.id in new and before.id in new and after.length == 0:
            assert placed[after.id] == placed[before.id]
    if not recorded:
        assert len(batches) == count_batches(lengths, limit)


def test_batches_a_manifest_follows_its_last_part_and_a_big_file_stands_alone():
    items = [_item(1, 40), _item(2, 50, "part"), _item(3, 50, "part"), _item(4, 0, "manifest"), _item(5, 15)]
    batches, _ = assign_batches(items, 60, {})
    assert [[i.id for i in b.items] for b in batches] == [[1], [2], [3, 4], [5]]
    batches, _ = assign_batches(items, 200, {})
    assert [[i.id for i in b.items] for b in batches] == [[1, 2, 3, 4, 5]]


def test_dropbox_folder_maps_paths_on_whole_components(tmp_path: Path):
    (tmp_path / "Dropbox" / "a1").mkdir(parents=True)
    folder = DropboxFolder(tmp_path / "Dropbox")
    assert folder.dropbox_path(tmp_path / "Dropbox") == "/"
    assert folder.dropbox_path(tmp_path / "Dropbox" / "a1" / "new folder") == "/a1/new folder"
    assert folder.local_path("/a1/x y/z.bin") == tmp_path / "Dropbox" / "a1" / "x y" / "z.bin"
    assert folder.contains(tmp_path / "Dropbox" / "a1")
    assert not folder.contains(tmp_path / "Dropbox10")
    assert not is_inside(tmp_path / "data" / "a10", tmp_path / "data" / "a1")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "Dropbox", target_is_directory=True)
    assert folder.contains(link / "a1") and folder.dropbox_path(link / "a1") == "/a1"


# ============================================================================ batches through the app


def test_three_batches_each_verified_before_the_next_is_copied(world: World):
    names = [f"f{i}.bin" for i in range(6)]
    data = make_tree(world.data, {f"run/{name}": 300 * KB for name in names} | {"run/Thumbs.db": b"x"})
    out = world.dropbox / "Archive" / "run 1"
    book = world.book([[str(data / "run"), str(out), 0]])

    result = world.run(book, "--batchSize_GB", "0.0007")

    assert result.returncode == 0, result.stdout + result.stderr
    log = world.last_log()
    events = results(log)
    # Two files per batch; each batch's files are all verified before the next one is copied.
    assert [kind for kind, _ in events] == ["COPIED", "COPIED", "VERIFIED", "VERIFIED"] * 3, events
    copied = [path for kind, path in events if kind == "COPIED"]
    assert sorted(copied) == [f"/Archive/run 1/{name}" for name in names]
    for number in (1, 2, 3):
        assert f"Batch {number} verified" in log
    assert log.index("Batch 1 verified") < log.index("Batch 2 of 3") < log.index("Batch 2 verified")
    # The simulated app uploaded each file once, in batch order, and nothing else.
    uploaded = [path for _, path in world.app.uploaded]
    assert uploaded == copied
    assert_in_dropbox(world, {f"/Archive/run 1/{n}": data / "run" / n for n in names})
    assert "/Archive/run 1/Thumbs.db" not in {p for p in world.server.files()}
    assert all((data / "run" / n).exists() for n in names)  # deleteAfterUpload = 0
    assert "Everything is in Dropbox and verified by content hash" in log


def test_a_batch_of_many_small_files_is_checked_by_listing_folders_not_file_by_file(world: World):
    files = {f"frames/{i // 100:02d}/frame_{i:04d}.tif": 64 for i in range(240)}
    data = make_tree(world.data, files)
    book = world.book([[str(data / "frames"), str(world.dropbox / "Movie"), 1]])

    # The app uploads the whole batch in one go once app.py waits for it, so how many lookups
    # app.py makes does not depend on how fast the app happens to be.
    world.app.stall()
    process = world.start(book)
    world.wait_for_line(process, "waiting for the Dropbox app")
    world.app.atomic = True
    world.app.resume()
    assert process.wait(timeout=120) == 0, world.last_log()
    assert [kind for kind, _ in results(world.last_log())].count("VERIFIED") == 240
    assert len(data_files(world)) == 240
    # Listed before copying and while many are expected; one call per file only for the last few.
    assert world.server.count_calls("files/list_folder") >= 2
    assert world.server.count_calls("files/get_metadata") < 200
    assert not (data / "frames" / "00").exists()  # originals deleted, emptied folders removed
    assert (data / "frames").is_dir()  # the row's own folder stays


def test_stalled_app_logs_the_time_limit_deletes_nothing_and_finishes_when_it_resumes(world: World):
    data = make_tree(world.data, {"a.bin": 200 * KB, "b.bin": 100 * KB})
    book = world.book([[str(data / "a.bin"), str(world.dropbox / "in"), 1],
                       [str(data / "b.bin"), str(world.dropbox / "in"), 1]])
    world.app.stall()
    process = world.start(book, "--batchTimeLimit_hour", "0.0001")  # 0.36 s: the setting's minimum

    text = world.wait_for_line(process, r"batchTimeLimit_hour")
    looked = world.lookups()  # a few more checks while stalled (each looks up both files)
    world.wait_until(process, lambda: world.lookups() >= looked + 6, "three more checks")
    assert process.poll() is None
    assert (data / "a.bin").exists() and (data / "b.bin").exists()
    assert "please check the Dropbox app" in text
    assert world.server.files() == {}

    world.app.resume()
    assert process.wait(timeout=60) == 0
    log = world.log_of(process).read_text(encoding="utf-8")
    assert log.count("batchTimeLimit_hour") == 1  # logged once, not at every check
    assert not (data / "a.bin").exists() and not (data / "b.bin").exists()
    assert "DELETED" in log and log.index("Batch 1 verified") < log.index("DELETED")
    assert set(world.local_files()) == {"in/a.bin", "in/b.bin"}  # the Dropbox folder keeps its copies
    assert data_files(world) == {"/in/a.bin", "/in/b.bin"}


def test_corrupted_upload_fails_the_batch_names_the_file_and_deletes_nothing(world: World):
    data = make_tree(world.data, {"set/a.bin": 300 * KB, "set/b.bin": 300 * KB, "set/c.bin": 300 * KB})
    book = world.book([[str(data / "set"), str(world.dropbox / "out"), 1]])
    world.app.corrupt_next("out/b.bin")

    result = world.run(book, "--batchSize_GB", "0.0007")

    assert result.returncode == 1, result.stdout + result.stderr
    log = world.last_log()
    assert re.search(r"FAILED\t.*set/b\.bin\t->\t/out/b\.bin", log)
    assert "batch 1 is not verified" in log and "/out/b.bin" in log.split("STOPPED:")[1]
    assert "DELETED" not in log
    # Nothing deleted (a.bin arrived fine but its batch is not verified); batch 2 never started.
    assert all((data / "set" / n).exists() for n in ("a.bin", "b.bin", "c.bin"))
    assert set(world.local_files()) == {"out/a.bin", "out/b.bin"}
    assert "Batch 2" not in log

    # The user re-saves the file in the Dropbox folder; the app uploads it again; a rerun finishes.
    copy = world.dropbox / "out" / "b.bin"
    os.utime(copy, ns=(time.time_ns(), copy.stat().st_mtime_ns + 10**9))
    result = world.run(book, "--batchSize_GB", "0.0007")
    assert result.returncode == 0, result.stdout + result.stderr
    rerun = world.last_log()
    assert [kind for kind, _ in results(rerun)] == ["VERIFIED", "COPIED", "VERIFIED"]  # b again, then c
    assert not any((data / "set" / n).exists() for n in ("a.bin", "b.bin", "c.bin"))
    assert_in_dropbox(world, {"/out/a.bin": world.dropbox / "out" / "a.bin",
                              "/out/b.bin": world.dropbox / "out" / "b.bin"})


def test_full_disk_and_full_dropbox_pause_the_run_until_space_returns(world: World):
    data = make_tree(world.data, {"x.bin": 400 * KB, "y.bin": 400 * KB})
    book = world.book([[str(data / "x.bin"), str(world.dropbox / "space"), 0],
                       [str(data / "y.bin"), str(world.dropbox / "space"), 0]])
    flag = world.root / "disk-is-full"
    flag.write_text("1")

    process = world.start(book, TEST_LOW_DISK_FLAG=str(flag))
    world.wait_for_line(process, r"PAUSED before batch 1: the disk holding the Dropbox folder")
    readings = Path(f"{flag}.readings")
    seen = readings.stat().st_size
    world.wait_until(process, lambda: readings.stat().st_size >= seen + 3, "three more checks of the disk")
    assert process.poll() is None and world.local_files() == {}  # nothing copied while paused

    world.server.set_quota(100 * KB)  # now Dropbox is too full for the batch
    flag.unlink()
    world.wait_for_line(process, r"PAUSED before batch 1: Dropbox has")
    assert world.local_files() == {}
    world.server.set_quota(10**12)

    assert process.wait(timeout=60) == 0
    log = world.log_of(process).read_text(encoding="utf-8")
    assert "Space is available again" in log
    assert data_files(world) == {"/space/x.bin", "/space/y.bin"}
    assert log.index("Space is available again") < log.index("COPIED")


@pytest.mark.skipif(os.name == "nt", reason="kill -9 is POSIX")
def test_kill_during_copy_and_during_wait_then_rerun_copies_nothing_twice(world: World):
    files = {f"k/{i}.bin": 150 * KB for i in range(8)}
    data = make_tree(world.data, files)
    book = world.book([[str(data / "k"), str(world.dropbox / "kill"), 1]])
    flags = ("--batchSize_GB", "0.0006")  # two batches of four files

    # 1. kill -9 while a file of batch 1 is being copied (its temporary file complete but not renamed).
    process = world.start(book, *flags, TEST_SLOW_FSYNC="0.4")
    world.wait_for_line(process, r"COPIED\t(.|\n)*COPIED\t")
    deadline = time.monotonic() + 20
    while not any(p.name.startswith(".~") for p in (world.dropbox / "kill").iterdir()):
        assert time.monotonic() < deadline, "no copy in progress was seen"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    first = {rel: (p.stat().st_ino, p.stat().st_ctime_ns) for rel, p in world.local_files().items()
             if not p.name.startswith(".~")}
    assert 2 <= len(first) < 4

    # 2. Rerun with the app stalled: it finishes batch 1's copies, waits, and is killed while waiting.
    world.app.wait_idle(10)
    world.app.stall()
    process = world.start(book, *flags)
    world.wait_for_line(process, r"Batch 1: waiting for the Dropbox app")
    looked = world.lookups()  # a check while waiting (each looks up the batch's four files)
    world.wait_until(process, lambda: world.lookups() >= looked + 4, "a check while waiting")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    second = {rel: (p.stat().st_ino, p.stat().st_ctime_ns) for rel, p in world.local_files().items()}
    assert all(not rel.split("/")[-1].startswith(".~") for rel in second)  # the leftover was removed
    assert len(second) == 4  # batch 1 only: batch 2 waits for batch 1's verification
    assert {rel: second[rel] for rel in first} == first  # files copied before the kill were not rewritten
    assert all((data / rel).exists() for rel in files)  # nothing deleted before verification

    # 3. The app resumes; a rerun verifies batch 1, copies and verifies batch 2.
    world.app.resume()
    result = world.run(book, *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    third = {rel: (p.stat().st_ino, p.stat().st_ctime_ns) for rel, p in world.local_files().items()}
    assert {rel: third[rel] for rel in second} == second
    assert len(third) == 8
    uploaded = [path for _, path in world.app.uploaded]
    assert sorted(uploaded) == sorted(f"/kill/{i}.bin" for i in range(8))  # each exactly once
    assert not any(".~" in path for path in world.server.files())
    assert_in_dropbox(world, {f"/kill/{i}.bin": world.dropbox / "kill" / f"{i}.bin" for i in range(8)})
    for i in range(8):
        assert file_content_hash(world.dropbox / "kill" / f"{i}.bin") == world.server.content_hash(f"/kill/{i}.bin")
    assert not any((data / rel).exists() for rel in files)
    assert [kind for kind, _ in results(world.last_log())].count("COPIED") == 4


def test_split_parts_and_manifest_land_in_the_dropbox_folder_and_join_back(world: World, tmp_path: Path):
    data = make_tree(world.data, {"movie.mrc": 11 * 1024 * 1024, "small.txt": b"notes"})
    original = sha(data / "movie.mrc")
    book = world.book([[str(data), str(world.dropbox / "big"), 0]])
    flags = ("--fileSizeLimit_GB", "0.005", "--batchSize_GB", "0.009")

    result = world.run(book, *flags)

    assert result.returncode == 0, result.stdout + result.stderr
    names = ["movie.mrc_split_0001", "movie.mrc_split_0002", "movie.mrc_split_0003",
             "movie.mrc_split_manifest.json"]
    assert set(world.local_files()) == {f"big/{n}" for n in names} | {"big/small.txt"}
    assert data_files(world) == {f"/big/{n}" for n in names} | {"/big/small.txt"}
    log = world.last_log()
    # The parts spread over two batches; the manifest travels with the last part.
    batch_two = log.split("Batch 2 of")[1].split("Batch 2 verified")[0]
    assert "movie.mrc_split_0003" in batch_two and "movie.mrc_split_manifest.json" in batch_two
    assert "movie.mrc_split_0001" not in batch_two

    # Join what Dropbox holds (as a download would give it back) and compare with the original.
    from archive_dropbox.joining import join_split_file

    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    for name in names:
        (downloaded / name).write_bytes(world.server.read_file(f"/big/{name}"))
    join_split_file(downloaded / "movie.mrc_split_0001", log=logging.getLogger("test"))
    assert sha(downloaded / "movie.mrc") == original

    # A rerun of the finished job copies nothing.
    result = world.run(book, *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [kind for kind, _ in results(world.last_log()) if kind == "COPIED"]


def test_team_space_folders_map_to_team_paths(team_world: World):
    w = team_world
    data = make_tree(w.data, {"scan.dat": 50 * KB})
    book = w.book([[str(data / "scan.dat"), str(w.dropbox / "Team Folder" / "Lab"), 0]])

    result = w.run(book, "--teamSpace", "True")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "team space" in w.last_log()
    assert_in_dropbox(w, {"/Team Folder/Lab/scan.dat": data / "scan.dat"})


# ============================================================================ bad input (SPEC section 11)


def test_dropbox_dir_not_set_or_missing_stops_before_anything(world: World):
    data = make_tree(world.data, {"a.bin": 10})
    book = world.book([[str(data / "a.bin"), str(world.dropbox), 1]])

    result = world.run(book, "--dropboxDir", "")
    assert result.returncode == 2
    assert "setting 'dropboxDir' is empty" in result.stdout and "app.py" in result.stdout

    result = world.run(book, "--dropboxDir", str(world.root / "No Dropbox"))
    assert result.returncode == 2
    assert "'dropboxDir'" in result.stdout and "does not exist" in result.stdout
    assert (data / "a.bin").exists() and world.local_files() == {}


def test_rows_outside_or_inside_the_dropbox_folder_are_refused_together(world: World):
    data = make_tree(world.data, {"a.bin": 10, "b.bin": 10})
    make_tree(world.dropbox, {"synced/c.bin": b"already in Dropbox"})
    book = world.book([
        [str(data / "a.bin"), str(world.root / "elsewhere"), 1],        # outputDir outside
        [str(world.dropbox / "synced" / "c.bin"), str(world.dropbox / "x"), 1],  # input inside
        [str(world.root), str(world.dropbox / "y"), 1],                 # input contains the folder
        [str(data / "b.bin"), str(world.dropbox / "ok"), 1],
    ])

    result = world.run(book)

    assert result.returncode == 2, result.stdout + result.stderr
    out = result.stdout
    assert f"tab '{TAB}', row 2, column 'outputDir'" in out and "is not inside the Dropbox folder" in out
    assert "row 3, column 'inputFile'" in out and "never copies or deletes anything inside the Dropbox" in out
    assert "row 4, column 'inputFile'" in out and "contains the Dropbox folder" in out
    assert "row 5" not in out
    assert "nothing was changed" in out and "Traceback" not in out + result.stderr
    assert (world.dropbox / "synced" / "c.bin").exists() and (data / "a.bin").exists()
    assert set(world.local_files()) == {"synced/c.bin"}


@pytest.mark.parametrize("case", ["missing tab", "wrong columns"])
def test_sheet_problems_are_named_and_stop_the_run(world: World, case: str):
    if case == "missing tab":
        book = world.book([["x", "y", 0]], tab="Sheet1")
        expected = f"there is no tab named '{TAB}'"
    else:
        book = world.book([["x", "y", 0]], header=["inputFile", "outputFolder", "deleteAfterUpload"])
        expected = "column 'outputDir' is missing"
    result = world.run(book)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert world.local_files() == {}
