"""The download engine in-process (download.Downloader) against the local Dropbox test server,
through the real DropboxClient and SDK: resuming a partial file through dropped connections,
starting over when the file changes in Dropbox, giving up after the network give-up time, and
pausing for local disk room. Faults come from the server's fault injection; waits are patched
or zero, so nothing depends on timing."""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections import namedtuple
from pathlib import Path

import pytest

from tests.dropbox_server import DropboxTestServer, FailRule

from archive_dropbox import dropbox_client, transfer
from archive_dropbox.download import Downloader, Options
from archive_dropbox.download_plan import Task, bind_items, client_modified_epoch
from archive_dropbox.dropbox_client import Credentials, DropboxClient, RemoteFile
from archive_dropbox.journal import Journal, State
from archive_dropbox.status import status_of
from tests.test_download import dropbox, server  # noqa: F401 - fixtures: one test server per module, faults off

WHEN = dt.datetime(2021, 3, 4, 5, 6, 7)
ROW = namedtuple("Row", "row")(2)
PLENTY = namedtuple("Usage", "free")(1 << 50)


@pytest.fixture
def client(dropbox, monkeypatch):
    """A DropboxClient whose SDK object talks to the test server (the server's Dropbox subclass
    points every host there; the SDK reads its hosts at import, too early to set them here)."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(dropbox_client.dropbox, "Dropbox", dropbox.client_class())
    return DropboxClient(Credentials(access_token=dropbox.access_token), ca_bundle=dropbox.ca_file, max_connections=4)


class Recording:
    """The real client, noting where each download starts (the server's log cannot say)."""

    def __init__(self, client: DropboxClient):
        self.client = client
        self.starts: list[int] = []

    def download_range(self, path, start=0, end=None, chunk_size=8 * 1024 * 1024):
        self.starts.append(start)
        return self.client.download_range(path, start, end, chunk_size=chunk_size)

    def metadata(self, path):
        return self.client.metadata(path)


@pytest.fixture
def log(request, caplog):
    """A fresh run logger (so a fresh shared status line); what it says is in caplog. A run left
    in an outage (the give-up test's) would keep its status timer thread saying "Dropbox
    unreachable" once a minute, into whatever test runs then: the outage ends with the test."""
    run_log = logging.getLogger(f"test_download_engine.{request.node.name}")
    caplog.set_level(logging.DEBUG, logger=run_log.name)
    yield run_log
    run_log.disabled = True  # the outage's end is no news of this test's
    status_of(run_log).network_ok()  # the timer sees no outage at its next tick and ends, silent


def said(caplog, text: str, level: int = logging.INFO) -> list[str]:
    """The messages at `level` or above (INFO: what the screen shows) that contain `text`."""
    return [r.getMessage() for r in caplog.records if text in r.getMessage() and r.levelno >= level]


def put(server: DropboxTestServer, client: DropboxClient, path: str, data: bytes) -> RemoteFile:
    server.put_file(path, data, client_modified=WHEN)
    remote = client.metadata(path)
    assert isinstance(remote, RemoteFile)
    return remote


def listed_task(server: DropboxTestServer, client: DropboxClient, folder: Path, name: str, data: bytes,
                kept: int = 0) -> Task:
    """A task for `data`, put in Dropbox as /Engine/<name>, with its first `kept` bytes on disk
    (what an earlier run wrote before it was stopped)."""
    task = Task(ROW, put(server, client, f"/Engine/{name}", data), folder / name)
    if kept:
        task.partial.write_bytes(data[:kept])
    return task


def downloader(client, log, *, usage=lambda _: PLENTY, sleep_seconds=0, journal=None, **options) -> Downloader:
    options = Options(sleep_seconds=sleep_seconds, first_retry_delay=0, **options)
    return Downloader(client, journal, options, log, transfer.Pauses(log, sleep_seconds, usage=usage))


def some_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def test_a_partial_file_is_resumed_through_dropped_connections(dropbox, client, log, caplog, tmp_path):
    data, kept = some_bytes(300_000, 1), 120_000
    task = listed_task(dropbox, client, tmp_path, "resume.bin", data, kept)
    dropbox.set_faults(fail_nth=[FailRule("files/download", 1, "drop_before_response", times=2)])
    asking = Recording(client)
    worker = downloader(asking, log)

    worker._run_task(task)

    assert worker.summary.failures == []
    assert task.target.read_bytes() == data and not task.partial.exists()
    assert int(task.target.stat().st_mtime) == client_modified_epoch(WHEN)
    assert [call["status"] for call in dropbox.calls("files/download")] == [0, 0, 206]
    # Every try continues from the bytes on disk; none of them is fetched again.
    assert asking.starts == [kept, kept, kept]
    assert worker.summary.bytes_received == len(data) - kept
    # The file says once where it continues; the second drop goes to the log file only.
    assert len(said(caplog, "resume.bin: download: ")) == 1
    assert len(said(caplog, "continuing from byte 120,000", logging.DEBUG)) == 2


def test_the_network_give_up_time_fails_the_file_and_keeps_its_bytes(dropbox, client, log, caplog, tmp_path):
    data, kept = some_bytes(200_000, 2), 50_000
    task = listed_task(dropbox, client, tmp_path, "gives_up.bin", data, kept)
    dropbox.set_faults(fail_nth=[FailRule("files/download", 1, "drop_before_response", times=5)])
    worker = downloader(client, log, network_give_up_seconds=0)

    worker._run_task(task)

    [(where, message)] = worker.summary.failures
    assert where == "/Engine/gives_up.bin"
    assert message.startswith("the network failed for more than 0 min (")
    assert message.endswith("); run again to continue from the bytes already downloaded")
    assert not task.target.exists() and task.partial.read_bytes() == data[:kept]
    # The first drop starts the spell of trouble; the next one outlasts a give-up time of 0 s.
    assert dropbox.count_calls("files/download") == 2
    assert said(caplog, "FAILED\t", logging.ERROR)


def test_a_file_changed_in_dropbox_is_downloaded_again_from_its_first_byte(dropbox, client, log, caplog, tmp_path):
    old, new = some_bytes(200_000, 3), some_bytes(150_000, 4)
    task = listed_task(dropbox, client, tmp_path, "changed.bin", old, 50_000)
    current = put(dropbox, client, "/Engine/changed.bin", new)  # changed after Stage 1 listed it
    assert current.rev != task.remote.rev
    asking = Recording(client)
    with Journal(tmp_path / "journal.sqlite3", "dropboxDownload_API") as journal:
        bind_items([task], journal)
        worker = downloader(asking, log, journal=journal)

        worker._run_task(task)

        assert worker.summary.failures == []
        [item] = journal.items_by_key().values()
    assert task.target.read_bytes() == new
    assert asking.starts == [50_000, 0]
    assert said(caplog, "/Engine/changed.bin changed in Dropbox since it was listed: downloading the new version.")
    assert (item.state, item.remote_rev, item.content_hash) == (State.DONE, current.rev, current.content_hash)
    assert worker.summary.bytes_received == len(new)


def test_a_file_now_shorter_than_the_partial_starts_over(dropbox, client, log, tmp_path):
    old, new = some_bytes(200_000, 5), some_bytes(40_000, 6)
    task = listed_task(dropbox, client, tmp_path, "shorter.bin", old, 120_000)
    put(dropbox, client, "/Engine/shorter.bin", new)
    asking = Recording(client)
    worker = downloader(asking, log)

    worker._run_task(task)

    assert worker.summary.failures == []
    assert task.target.read_bytes() == new and not task.partial.exists()
    # Byte 120,000 is past the end now (HTTP 416): the current version is asked for from byte 0.
    assert asking.starts == [120_000, 0]
    assert [call["status"] for call in dropbox.calls("files/download")] == [416, 200]


def test_a_full_local_disk_pauses_the_download_until_there_is_room(dropbox, client, log, caplog, tmp_path,
                                                                    monkeypatch):
    data = some_bytes(100_000, 7)
    task = listed_task(dropbox, client, tmp_path, "full_disk.bin", data)
    naps: list[float] = []
    # The disk has room once the pause has slept twice: the readings follow the naps, not the clock.
    monkeypatch.setattr(transfer, "nap", lambda seconds, stop=None: naps.append(seconds))
    usage = lambda _: namedtuple("Usage", "free")(1000 if len(naps) < 2 else 1 << 50)  # noqa: E731
    worker = downloader(client, log, usage=usage, sleep_seconds=1800)

    worker._run_task(task)

    assert worker.summary.failures == []
    assert task.target.read_bytes() == data
    assert naps == [1800, 1800]
    [paused] = said(caplog, "PAUSED: the local disk is nearly full")
    assert "checking again every 30 min" in paused and "Nothing is lost while paused" in paused
    assert len(said(caplog, "has room again")) == 1
    # The stream was closed before its first chunk was written: nothing is counted twice.
    assert worker.summary.bytes_received == len(data)
