"""The desktop-app upload's pieces, in-process (tests/test_desktop_upload.py runs app.py itself):
batch numbers that survive reruns, a copy that never replaces a file in the Dropbox folder, and
the waits for the app that ride out network trouble. Every wait goes through Waiter.sleep,
patched here to return at once and record what it was asked, so nothing depends on timing."""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from archive_dropbox import desktop_copy, split
from archive_dropbox.content_hash import file_content_hash
from archive_dropbox.desktop_arrivals import DesktopArrivals
from archive_dropbox.desktop_batches import Batch, assign_batches
from archive_dropbox.desktop_copy import (ALREADY_IN_DROPBOX, ALREADY_IN_FOLDER, COPIED, DesktopCopier, LocalConflict,
                                          RemoteConflict, SourceChanged)
from archive_dropbox.desktop_folder import DropboxFolder
from archive_dropbox.desktop_job import DesktopJob, DesktopOptions, Waiter
from archive_dropbox.desktop_upload import DesktopUploader
from archive_dropbox.dropbox_client import NetworkProblem, RateLimited, RemoteFile, SpaceUsage
from archive_dropbox.journal import Item, Journal, State
from archive_dropbox.localfs import temporary_sibling
from tests.test_long_runs import screen  # noqa: F401 - a fixture: a fresh run logger and what it shows

TAB = "dropboxUpload_APP"
SLEEP = 30.0  # seconds: sleepTime_min = 0.5, never slept here


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Every wait of the desktop-app upload, recorded instead of slept."""
    asked: list[float] = []

    def sleep(self, seconds: float) -> bool:
        asked.append(seconds)
        return False

    monkeypatch.setattr(Waiter, "sleep", sleep)
    return asked


@pytest.fixture
def journal(tmp_path: Path):
    with Journal(tmp_path / "journal.sqlite3", TAB) as opened:
        yield opened


class Progress:
    """Stands in for the batch's tqdm bar."""

    def __init__(self):
        self.n = 0

    def update(self, count: int) -> None:
        self.n += count


def planned(source: Path | str, destination: str, length: int | None = None, *, kind: str = "file",
            offset: int = 0) -> Item:
    """An item as Stage 1 plans it; the source's size and time are read when it exists."""
    info = os.stat(source) if os.path.exists(source) else None
    size = info.st_size if info else (length or 0)
    return Item(id=None, job=TAB, source=str(source), destination=destination, kind=kind, part_offset=offset,
                length=size if length is None else length, source_size=size,
                source_mtime_ns=info.st_mtime_ns if info else 0)


def remote_of(path: Path, dropbox_path: str) -> RemoteFile:
    return RemoteFile(dropbox_path, dropbox_path.lower(), path.stat().st_size, file_content_hash(path),
                      dt.datetime(2024, 1, 2), "rev1")


def no_temporaries(folder: Path) -> bool:
    return not any(path.name.startswith(".~") for path in folder.rglob("*"))


# ============================================================================ batches across reruns


def _plan_batches(path: Path, items: list[Item], limit: int) -> dict[str, int]:
    """One run's batch assignment through the journal: Dropbox path -> batch number."""
    with Journal(path, TAB) as journal:
        synced = journal.sync_plan(items)
        batches, new = assign_batches(synced, limit, journal.item_batches())
        journal.record_item_batches(new)
    return {item.destination: batch.number for batch in batches for item in batch.items}


def test_batches_keep_their_numbers_across_reruns_and_new_files_never_join_an_old_batch(tmp_path):
    path = tmp_path / "journal.sqlite3"
    first = [planned(f"/s/{i}", f"/d/{i}", 40) for i in range(1, 6)]
    assert _plan_batches(path, first, 100) == {"/d/1": 1, "/d/2": 1, "/d/3": 2, "/d/4": 2, "/d/5": 3}

    # Batch 1 was verified and its originals deleted: the plan no longer lists them. Two new
    # files appear; batch 3 has room for them, but may be verified already: they get batch 4.
    second = [planned(f"/s/{i}", f"/d/{i}", 40) for i in (3, 4, 5)] + [planned("/s/6", "/d/6", 10),
                                                                       planned("/s/7", "/d/7", 40)]
    expected = {"/d/3": 2, "/d/4": 2, "/d/5": 3, "/d/6": 4, "/d/7": 4}
    assert _plan_batches(path, second, 100) == expected

    # The same plan again, even with another batchSize_GB: nothing moves.
    assert _plan_batches(path, second, 30) == expected
    assert _plan_batches(path, second, 1000) == expected


def test_a_batch_counts_only_what_is_not_in_the_dropbox_folder_yet():
    items = [planned(f"/s/{i}", f"/d/{i}", 10 * i) for i in (1, 2, 3)]
    items[0].state, items[1].state = State.COPIED, State.DONE
    batch = Batch(1, items)
    assert (batch.size, batch.bytes_to_copy(), batch.done) == (60, 30, False)
    items[2].state = State.DONE
    assert not Batch(1, items).done  # the copied one is not verified yet
    items[0].state = State.DONE
    assert Batch(1, items).done


# ============================================================================ copy and publish


@pytest.fixture
def folder(tmp_path: Path) -> DropboxFolder:
    root = tmp_path / "Dropbox"
    root.mkdir()
    return DropboxFolder(root)


def copier_for(folder: DropboxFolder, log: logging.Logger, *items: Item) -> DesktopCopier:
    items_of: dict[str, list[Item]] = {}
    for item in items:
        items_of.setdefault(item.source, []).append(item)
    return DesktopCopier(folder, 1000, items_of, log)  # small blocks: a file of a few KB takes many


def source_file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return path


def test_a_copy_lands_complete_with_its_hash_and_date_and_no_temporary_left(tmp_path, folder, screen):
    log, _ = screen
    data = os.urandom(5500)
    item = planned(source_file(tmp_path, "a.bin", data), "/in/a.bin")
    progress = Progress()

    assert copier_for(folder, log, item).place(item, None, progress) == COPIED

    copy = folder.root / "in" / "a.bin"
    assert copy.read_bytes() == data and progress.n == len(data)
    assert item.content_hash == file_content_hash(copy) and item.sha256 is None
    assert copy.stat().st_mtime_ns // 10**9 == item.source_mtime_ns // 10**9  # Dropbox shows the original's date
    assert no_temporaries(folder.root)


def test_publish_never_replaces_a_file_already_at_the_name(tmp_path, folder, screen):
    log, _ = screen
    destination = folder.root / "taken.bin"
    destination.write_bytes(b"the user's own file")
    temporary = temporary_sibling(destination, "partial")
    temporary.write_bytes(b"this tool's copy")

    with pytest.raises(LocalConflict, match="it was not overwritten"):
        copier_for(folder, log).publish(temporary, destination, 0)
    assert destination.read_bytes() == b"the user's own file"


def test_a_different_file_in_the_dropbox_folder_is_kept_and_the_item_fails(tmp_path, folder, screen):
    log, _ = screen
    item = planned(source_file(tmp_path, "a.bin", b"new bytes"), "/a.bin")
    existing = folder.root / "a.bin"
    existing.write_bytes(b"old bytes")  # same size, other content
    before = existing.stat()

    with pytest.raises(LocalConflict, match="a different file already exists"):
        copier_for(folder, log, item).place(item, None, Progress())
    assert existing.read_bytes() == b"old bytes" and existing.stat().st_ino == before.st_ino
    assert item.content_hash is None and no_temporaries(folder.root)


def test_the_same_file_already_in_the_dropbox_folder_is_recognised_not_rewritten(tmp_path, folder, screen):
    log, _ = screen
    data = os.urandom(3000)
    item = planned(source_file(tmp_path, "a.bin", data), "/a.bin")
    existing = folder.root / "a.bin"
    existing.write_bytes(data)
    before = existing.stat()

    assert copier_for(folder, log, item).place(item, None, Progress()) == ALREADY_IN_FOLDER
    assert (existing.stat().st_ino, existing.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert item.content_hash == file_content_hash(existing)


def test_a_file_that_appears_during_the_copy_is_kept_and_the_copy_discarded(tmp_path, folder, screen, monkeypatch):
    log, _ = screen
    item = planned(source_file(tmp_path, "a.bin", os.urandom(4000)), "/a.bin")
    copier = copier_for(folder, log, item)
    copy_bytes = copier._copy_bytes

    def copy_while_someone_saves(item, temporary, progress):
        copy_bytes(item, temporary, progress)
        (folder.root / "a.bin").write_bytes(b"saved by someone else meanwhile")

    monkeypatch.setattr(copier, "_copy_bytes", copy_while_someone_saves)
    with pytest.raises(LocalConflict, match="appeared .* while this one was being copied"):
        copier.place(item, None, Progress())
    assert (folder.root / "a.bin").read_bytes() == b"saved by someone else meanwhile"
    assert no_temporaries(folder.root)


def test_an_original_written_to_during_the_copy_is_not_published(tmp_path, folder, screen, monkeypatch):
    log, _ = screen
    source = source_file(tmp_path, "a.bin", os.urandom(4000))
    item = planned(source, "/a.bin")
    copier = copier_for(folder, log, item)
    copy_bytes = copier._copy_bytes

    def copy_while_the_original_grows(item, temporary, progress):
        copy_bytes(item, temporary, progress)
        with open(source, "ab") as handle:
            handle.write(b"more")

    monkeypatch.setattr(copier, "_copy_bytes", copy_while_the_original_grows)
    with pytest.raises(SourceChanged, match="changed since it was listed"):
        copier.place(item, None, Progress())
    assert list(folder.root.rglob("*")) == []


def test_a_half_written_copy_left_by_a_killed_run_is_removed_first(tmp_path, folder, screen):
    log, lines = screen
    data = os.urandom(2000)
    item = planned(source_file(tmp_path, "a.bin", data), "/a.bin")
    leftover = temporary_sibling(folder.root / "a.bin", "partial")
    leftover.write_bytes(data[:700])

    assert copier_for(folder, log, item).place(item, None, Progress()) == COPIED
    assert (folder.root / "a.bin").read_bytes() == data and no_temporaries(folder.root)
    assert lines.containing("left half-written by an interrupted run")


def test_an_item_dropbox_already_holds_is_recognised_and_a_different_one_refused(tmp_path, folder, screen):
    log, _ = screen
    source = source_file(tmp_path, "a.bin", os.urandom(2500))
    item = planned(source, "/a.bin")
    held = RemoteFile("/A.bin", "/a.bin", 2500, file_content_hash(source), dt.datetime(2024, 1, 2), "rev9")

    assert copier_for(folder, log, item).place(item, held, Progress()) == ALREADY_IN_DROPBOX
    assert (item.remote_rev, item.remote_path, item.content_hash) == ("rev9", "/A.bin", held.content_hash)

    other = planned(source, "/b.bin")
    wrong = RemoteFile("/b.bin", "/b.bin", 2500, "0" * 64, dt.datetime(2024, 1, 2), "rev1")
    with pytest.raises(RemoteConflict, match="conflicted copy"):
        copier_for(folder, log, other).place(other, wrong, Progress())
    assert list(folder.root.rglob("*")) == []  # nothing copied for the app to turn into a conflict


def _split_items(source: Path, part: int) -> list[Item]:
    size = source.stat().st_size
    offsets = list(range(0, size, part))
    parts = [planned(source, f"/big/{split.part_name(source.name, n, len(offsets))}", min(part, size - offset),
                     kind="part", offset=offset) for n, offset in enumerate(offsets, start=1)]
    return [*parts, planned(source, f"/big/{split.manifest_name(source.name)}", 0, kind="manifest")]


def no_second_read(path, progress=None):
    raise AssertionError("the original was read a second time for its manifest")


def _place_all(copier: DesktopCopier, items: list[Item]) -> None:
    for item in items:
        copier.place(item, None, Progress())
        item.state = State.COPIED  # as the journal records it


def test_a_split_file_manifest_records_the_whole_sha256_carried_across_its_parts(tmp_path, folder, screen,
                                                                                 monkeypatch):
    log, lines = screen
    data = os.urandom(7300)
    source = source_file(tmp_path, "movie.mrc", data)
    items = _split_items(source, 3000)
    real_sha256_file = split.sha256_file

    monkeypatch.setattr(split, "sha256_file", no_second_read)
    _place_all(copier_for(folder, log, *items), items)

    manifest = split.read_manifest(folder.root / "big" / "movie.mrc_split_manifest.json")
    assert manifest.sha256 == hashlib.sha256(data).hexdigest() and manifest.size == len(data)
    assert [p.sha256 for p in manifest.parts] == [hashlib.sha256(data[o:o + 3000]).hexdigest()
                                                  for o in (0, 3000, 6000)]
    assert [i.sha256 for i in items[:3]] == [p.sha256 for p in manifest.parts]

    # A rerun whose parts were copied before: the manifest needs the file read once more, and
    # then comes out the same.
    monkeypatch.setattr(split, "sha256_file", real_sha256_file)
    rerun = copier_for(folder, log, *items)
    written = (folder.root / "big" / "movie.mrc_split_manifest.json").read_bytes()
    assert rerun.manifest_bytes(items[3]) == written
    assert lines.containing("once more for the SHA-256 its manifest records")


def test_a_part_whose_copy_broke_off_leaves_the_carried_sha256_intact(tmp_path, folder, screen, monkeypatch):
    log, _ = screen
    data = os.urandom(6000)
    source = source_file(tmp_path, "movie.mrc", data)
    items = _split_items(source, 3000)
    copier = copier_for(folder, log, *items)
    _place_all(copier, items[:1])
    calls = {"n": 0}
    write = desktop_copy._SideBySideHashes.feed

    def disk_fills_once(self, block):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, block)

    monkeypatch.setattr(desktop_copy._SideBySideHashes, "feed", disk_fills_once)
    monkeypatch.setattr(split, "sha256_file", no_second_read)
    with pytest.raises(OSError):
        copier.place(items[1], None, Progress())  # part 2 fed one block, then the disk was full
    assert no_temporaries(folder.root)
    _place_all(copier, items[1:])  # tried again, as copy_batch does after the pause
    manifest = split.read_manifest(folder.root / "big" / "movie.mrc_split_manifest.json")
    assert manifest.sha256 == hashlib.sha256(data).hexdigest()


# ============================================================================ waiting for the app


class FakeDropbox:
    """metadata() answers from `answers` in turn (an exception is raised), then from the last."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = 0

    def metadata(self, path: str):
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def desktop_job(client, journal: Journal, folder: DropboxFolder, log: logging.Logger, *,
                time_limit: float = 3600.0) -> DesktopJob:
    options = DesktopOptions(batch_bytes=10**6, copy_block=1000, sleep_seconds=SLEEP, time_limit_seconds=time_limit)
    return DesktopJob(client, journal, folder, options, log)


def copied_item(tmp_path: Path, journal: Journal, folder: DropboxFolder) -> tuple[Item, RemoteFile]:
    """One item copied into the Dropbox folder, and what Dropbox holds once the app uploaded it."""
    source = source_file(tmp_path, "a.bin", os.urandom(1500))
    (folder.root / "a.bin").write_bytes(source.read_bytes())
    item = journal.sync_plan([planned(source, "/a.bin")])[0]
    item.content_hash = file_content_hash(source)
    journal.mark_copied(item)
    return item, remote_of(source, "/a.bin")


def test_the_wait_for_a_batch_rides_out_network_trouble(tmp_path, folder, journal, screen, sleeps):
    log, lines = screen
    item, uploaded = copied_item(tmp_path, journal, folder)
    trouble = NetworkProblem("connection reset")
    client = FakeDropbox(trouble, trouble, trouble, None, uploaded)  # three failures, not there yet, arrived
    job = desktop_job(client, journal, folder, log)

    assert DesktopArrivals(job).await_batch(Batch(1, [item])) == []

    assert sleeps == [SLEEP] * 4 and client.calls == 5
    assert [i.state for i in journal.items()] == [State.DONE]
    assert job.summary.items_verified == 1 and job.summary.failures == []
    assert lines.containing("Dropbox unreachable since")[0].endswith("Last error: connection reset")
    assert lines.containing("Dropbox answers again")
    assert len(lines.containing("VERIFIED")) == 1


def test_a_wrong_arrival_seen_twice_fails_the_batch_but_once_is_the_app_still_at_work(tmp_path, folder, journal,
                                                                                      screen, sleeps):
    log, lines = screen
    item, uploaded = copied_item(tmp_path, journal, folder)
    wrong = RemoteFile("/a.bin", "/a.bin", uploaded.size, "f" * 64, dt.datetime(2024, 1, 2), "rev0")

    job = desktop_job(FakeDropbox(wrong, uploaded), journal, folder, log)
    assert DesktopArrivals(job).await_batch(Batch(1, [item])) == []
    assert item.state == State.DONE and sleeps == [SLEEP]

    journal.mark_copied(item)
    job = desktop_job(FakeDropbox(wrong), journal, folder, log)
    assert DesktopArrivals(job).await_batch(Batch(1, [item])) == [item]
    assert sleeps == [SLEEP] * 2  # one more check, then the verdict
    assert [i.state for i in journal.items()] == [State.FAILED]
    assert "(checked twice)" in job.summary.failures[0][1] and lines.containing("FAILED")


def test_a_late_batch_is_reported_once_however_long_the_wait(tmp_path, folder, journal, screen, sleeps):
    log, lines = screen
    item, uploaded = copied_item(tmp_path, journal, folder)
    job = desktop_job(FakeDropbox(None, None, None, None, uploaded), journal, folder, log, time_limit=-1)

    assert DesktopArrivals(job).await_batch(Batch(1, [item])) == []
    assert len(sleeps) == 4 and len(lines.containing("batchTimeLimit_hour")) == 1


def test_lookups_retry_network_trouble_every_sleep_time_and_a_rate_limit_as_dropbox_asks(tmp_path, folder, journal,
                                                                                         screen, sleeps):
    log, _ = screen
    item, uploaded = copied_item(tmp_path, journal, folder)
    client = FakeDropbox(NetworkProblem("timed out"), RateLimited("too many requests", retry_after=7),
                         NetworkProblem("timed out"), uploaded)
    found = DesktopArrivals(desktop_job(client, journal, folder, log)).lookup_patiently([item])
    assert found == {"/a.bin": uploaded}
    assert sleeps == [SLEEP, 7, SLEEP]


def test_done_items_missing_from_dropbox_are_copied_again(tmp_path, folder, journal, screen, sleeps):
    log, lines = screen
    item, uploaded = copied_item(tmp_path, journal, folder)
    item.remote_rev = uploaded.rev
    journal.mark_done([item])
    job = desktop_job(FakeDropbox(NetworkProblem("offline"), None), journal, folder, log)

    DesktopArrivals(job).reconcile_done([item])

    assert [i.state for i in journal.items()] == [State.PENDING] and sleeps == [SLEEP]
    assert lines.containing("NOT IN DROPBOX")


# ============================================================================ the batch runner


class FakeApp:
    """Dropbox as the desktop app leaves it: whatever is in the local folder has arrived."""

    def __init__(self, folder: DropboxFolder, free: list):
        self.folder = folder
        self.free = free  # space_usage answers in turn (an exception is raised), then the last again

    def metadata(self, path: str):
        local = self.folder.local_path(path)
        return remote_of(local, path) if local.is_file() else None

    def space_usage(self):
        answer = self.free.pop(0) if len(self.free) > 1 else self.free[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def uploader_for(client, journal: Journal, folder: DropboxFolder, log: logging.Logger) -> DesktopUploader:
    options = DesktopOptions(batch_bytes=10**6, copy_block=1000, sleep_seconds=SLEEP, time_limit_seconds=3600)
    return DesktopUploader(client, journal, folder, SimpleNamespace(sources=[]), options, log)


def test_a_full_dropbox_pauses_the_batch_through_network_trouble_until_there_is_room(tmp_path, folder, journal,
                                                                                    screen, sleeps):
    log, lines = screen
    trouble = NetworkProblem("no route to host")
    client = FakeApp(folder, [trouble, trouble, SpaceUsage(990, 1000), SpaceUsage(0, 10**12)])
    uploader = uploader_for(client, journal, folder, log)

    uploader.wait_for_space(Batch(3), 100)

    assert sleeps == [SLEEP] * 3  # two network retries, one pause
    assert lines.containing("Dropbox unreachable since")[0].endswith(
        "Last error: reading Dropbox's free space: no route to host")
    assert lines.containing("PAUSED before batch 3") == [
        "PAUSED before batch 3: Dropbox has 10 B free; this batch needs 100 B. Free some space in Dropbox or raise "
        "the quota. Checking again every 30 s; nothing is lost while paused"]
    assert lines.containing("Space is available again: batch 3 continues.")


def test_a_batch_is_copied_waited_for_and_verified_and_a_full_disk_only_pauses_it(tmp_path, folder, journal, screen,
                                                                                  sleeps, monkeypatch):
    log, lines = screen
    sources = [source_file(tmp_path, f"{n}.bin", os.urandom(1200)) for n in "ab"]
    items = journal.sync_plan([planned(s, f"/in/{s.name}") for s in sources])
    uploader = uploader_for(FakeApp(folder, [SpaceUsage(0, None)]), journal, folder, log)
    place = uploader.copier.place
    full = [OSError(errno.ENOSPC, "No space left on device")]

    def disk_full_once(item, remote, progress):
        if full:
            raise full.pop()
        return place(item, remote, progress)

    monkeypatch.setattr(uploader.copier, "place", disk_full_once)
    uploader.prepare_batches(items)
    summary = uploader.run(assign_batches(items, 10**6, {})[0])

    assert summary.ok and (summary.items_copied, summary.items_verified, summary.bytes_copied) == (2, 2, 2400)
    assert [i.state for i in journal.items()] == [State.DONE, State.DONE]
    assert journal.batch_state(1) == "deleted"
    assert lines.containing("The disk holding the Dropbox folder is full.")
    assert {p.name for p in (folder.root / "in").iterdir()} == {"a.bin", "b.bin"}
    assert sleeps == []  # the app had both files by the first check
