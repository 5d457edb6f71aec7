"""The API upload engine in this process, against the local Dropbox test server over real HTTPS:
the commit queue, sequential and concurrent resume from the journal, and the retry policy under
the server's injected faults. ApiUploader and the session classes are built directly, with a
temporary journal; the subprocess tests (test_api_upload.py) cover the same paths end to end.

No test depends on timing: retry waits are recorded (transfer.nap patched), a give-up time runs
on a fake clock, and "one batch at a time" is shown by holding the first commit until a second
batch is ready and waiting for the commit lock."""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

from tests.dropbox_server import FailRule

from archive_dropbox import commit_queue, transfer
from archive_dropbox.api_upload import ApiUploader, UploadOptions
from archive_dropbox.content_hash import bytes_content_hash
from archive_dropbox.dropbox_client import Credentials, DropboxClient
from archive_dropbox.errors import FileProblem
from archive_dropbox.journal import Item, Journal, Kind, State
from archive_dropbox.status import status_of
from archive_dropbox.units import human_bytes
from archive_dropbox.upload_sessions import ConcurrentSession, Phase, SequentialSession

MIB = 1024 * 1024
CHUNK = 4 * MIB
BOUND = 20.0  # seconds: generous limit for a wait that should end at once

APPEND = "files/upload_session/append_v2"
START = "files/upload_session/start"
FINISH = "files/upload_session/finish"
BATCH_COMMIT = "files/upload_session/finish_batch_v2"


@pytest.fixture
def log(request, caplog) -> Iterator[logging.Logger]:
    """A fresh run logger (so a fresh shared status); what it writes is in caplog. A run left in
    an outage (the give-up test's) would keep its status timer thread saying "Dropbox
    unreachable" once a minute into whatever test runs then: the outage ends with the test."""
    caplog.set_level(logging.DEBUG)
    run_log = logging.getLogger(f"test_upload_engine.{request.node.name}")
    yield run_log
    run_log.disabled = True  # the outage's end is no news of this test's
    status_of(run_log).network_ok()


def said(caplog, text: str) -> list[str]:
    return [message for message in caplog.messages if text in message]


@pytest.fixture
def client(server) -> DropboxClient:
    """The package's DropboxClient, in this process, bound to the test server."""
    made = DropboxClient(Credentials(access_token=server.access_token), ca_bundle=server.ca_file)
    sdk = made._dbx
    sdk._host_map = {key: server.address for key in sdk._host_map}  # the SDK read its hosts at import
    sdk._session.trust_env = False  # no proxy from the environment for loopback
    # The engine's retry policy is what these tests look at: the SDK's own retries are off.
    sdk._max_retries_on_error = 0
    sdk._max_retries_on_rate_limit = 0
    return made


@pytest.fixture
def journal(tmp_path) -> Iterator[Journal]:
    with Journal(tmp_path / "journal.sqlite3", "dropboxUpload_API") as opened:
        yield opened


@pytest.fixture
def naps(monkeypatch) -> list[float]:
    """The waits the retry policy asked for, in seconds; none is really waited."""
    asked: list[float] = []
    monkeypatch.setattr(transfer, "nap", lambda seconds, stop=None: asked.append(seconds))
    return asked


def planned(journal: Journal, path: Path, destination: str) -> Item:
    """A whole-file item as Stage 1 plans it, recorded in the journal."""
    info = path.stat()
    [item] = journal.sync_plan([Item(None, journal.job, str(path), destination, Kind.FILE, 0, info.st_size,
                                     info.st_size, info.st_mtime_ns)])
    return item


def recorded(journal: Journal, destination: str) -> Item:
    """The item as the journal holds it now (not the object a session changed in memory)."""
    [item] = [i for i in journal.items() if i.destination == destination]
    return item


def data_file(tmp_path: Path, name: str, size: int) -> tuple[Path, bytes]:
    path = tmp_path / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    path.write_bytes(data)
    return path, data


def options(**changes) -> UploadOptions:
    return UploadOptions(**{"chunk_size": CHUNK, "workers": 2, "small_file_workers": 2, "appends_per_file": 2,
                            "memory_budget": 64 * MIB, **changes})


@contextmanager
def engine(client: DropboxClient, journal: Journal, log: logging.Logger, **changes) -> Iterator[ApiUploader]:
    """An ApiUploader whose parts a test drives directly; its pools end with the block."""
    uploader = ApiUploader(client, journal, options(**changes), log)
    with uploader.jobs:
        yield uploader


def sent_bytes(server) -> int:
    return sum(server.bytes_received(route) for route in (START, APPEND, FINISH))


# -- the commit queue -----------------------------------------------------------------------------

class WatchedLock:
    """A re-entrant lock that says when a thread found it held by another."""

    def __init__(self):
        self._lock = threading.RLock()
        self.contended = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        self.contended.set()
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()


class CommitWatch:
    """The client, with finish_batch counted: entries per call and calls in flight at once. The
    first call waits until another thread has a batch ready and finds the commit lock taken."""

    def __init__(self, client: DropboxClient, contended: threading.Event):
        self._client = client
        self._contended = contended
        self._lock = threading.Lock()
        self.batches: list[int] = []
        self.in_flight = self.most_in_flight = 0
        self.first_saw_contention: bool | None = None

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def finish_batch(self, requests):
        with self._lock:
            self.batches.append(len(requests))
            first = len(self.batches) == 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if first:
                self.first_saw_contention = self._contended.wait(BOUND)
            return self._client.finish_batch(requests)
        finally:
            with self._lock:
                self.in_flight -= 1


def test_the_commit_queue_commits_in_batches_and_one_batch_at_a_time(tmp_path, server, client, journal, log, caplog,
                                                                      monkeypatch):
    monkeypatch.setattr(commit_queue, "BATCH_LIMIT", 3)
    contents = {f"/Q/f{i}.txt": b"file %d" % i for i in range(7)}
    items = []
    for destination, data in contents.items():
        path = tmp_path / "data" / destination.rsplit("/", 1)[1]
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        item = planned(journal, path, destination)
        session_id = client.session_start(data, close=True, path=destination)
        item.content_hash = bytes_content_hash(data)
        journal.start_session(item, session_id, time.time(), len(data))
        items.append(item)
    with engine(client, journal, log) as uploader:
        queue = uploader.commits
        queue.committing = lock = WatchedLock()
        uploader.shared.client = watch = CommitWatch(client, lock.contended)
        adders = [threading.Thread(target=queue.add, args=(item, uploader.shared.commit_request(
            item, item.session_id, item.length), time.monotonic())) for item in items]
        for adder in adders:
            adder.start()
        for adder in adders:
            adder.join(3 * BOUND)  # the first commit alone may wait BOUND for a contender
        assert not any(adder.is_alive() for adder in adders)
        assert queue.waiting == 1  # only whole batches are committed while files keep coming
        queue.flush()
    assert watch.first_saw_contention, "no second batch waited while the first one was being committed"
    assert watch.batches == [3, 3, 1]
    assert watch.most_in_flight == 1
    assert server.count_calls(BATCH_COMMIT) == 3 and server.count_calls(FINISH) == 0
    assert {destination: server.read_file(destination) for destination in contents} == contents
    assert {i.destination: i.state for i in journal.items()} == {d: State.DONE for d in contents}
    assert len(said(caplog, "UPLOADED")) == 7 and uploader.summary.items_uploaded == 7


# -- sequential resume ----------------------------------------------------------------------------

def _interrupted_sequential(tmp_path, server, client, journal, log, size: int) -> tuple[Item, bytes]:
    """An item whose upload session holds its first two chunks: the third is refused for good."""
    path, data = data_file(tmp_path, "big.bin", size)
    item = planned(journal, path, "/S/big.bin")
    server.set_faults(fail_nth=[FailRule(APPEND, 2, status=409, error={".tag": "too_large"})])
    with engine(client, journal, log) as uploader:
        with pytest.raises(FileProblem, match="larger than Dropbox accepts"):
            SequentialSession(uploader.shared, uploader.commits, uploader._readahead, item).send()
    server.set_faults()
    server.clear_log()
    return item, data


@pytest.mark.parametrize("journal_lags", [False, True])
def test_a_sequential_session_resumes_at_the_confirmed_offset_and_sends_only_the_rest(
        tmp_path, server, client, journal, log, caplog, journal_lags):
    """journal_lags: the process died after Dropbox took a chunk and before the journal said so;
    an empty append asks Dropbox for the real offset instead of sending that chunk again."""
    size = 3 * CHUNK + 12345
    _, data = _interrupted_sequential(tmp_path, server, client, journal, log, size)
    item = recorded(journal, "/S/big.bin")
    assert item.session_id and item.confirmed_offset == 2 * CHUNK
    if journal_lags:
        journal.confirm_offset(item, CHUNK)
    with engine(client, journal, log) as uploader:
        phase = SequentialSession(uploader.shared, uploader.commits, uploader._readahead,
                                  recorded(journal, "/S/big.bin")).send()
    assert phase is Phase.COMMITTED
    assert server.read_file("/S/big.bin") == data
    assert server.count_calls(START) == 0
    assert sent_bytes(server) == size - 2 * CHUNK
    assert recorded(journal, "/S/big.bin").state == State.DONE
    resumed_at = CHUNK if journal_lags else 2 * CHUNK
    assert said(caplog, f"Resuming /S/big.bin at {human_bytes(resumed_at)} of {human_bytes(size)}")
    assert uploader.summary.bytes_sent == size - 2 * CHUNK  # this run's bytes only


def test_a_sequential_session_dropbox_no_longer_knows_starts_again(tmp_path, server, client, journal, log, caplog):
    size = 3 * CHUNK + 12345
    _, data = _interrupted_sequential(tmp_path, server, client, journal, log, size)
    server.age_sessions(8 * 24 * 3600)  # older than Dropbox keeps an upload session
    with engine(client, journal, log) as uploader:
        phase = SequentialSession(uploader.shared, uploader.commits, uploader._readahead,
                                  recorded(journal, "/S/big.bin")).send()
    assert phase is Phase.COMMITTED and server.read_file("/S/big.bin") == data
    assert said(caplog, "The upload session of /S/big.bin has expired; starting that file again.")
    assert server.count_calls(START) == 1 and sent_bytes(server) == size


# -- concurrent resume ----------------------------------------------------------------------------

def test_a_concurrent_session_resumes_with_its_confirmed_pieces_and_sends_only_the_others(
        tmp_path, server, client, journal, log, caplog):
    """Pieces 0 and 2 of five (four of 4 MiB and a closing 1000 bytes) reached Dropbox in an
    earlier run, out of order as concurrent appends do. The rerun cuts the file as the journal
    says, although its own piece size is now 8 MiB, and sends pieces 1, 3 and 4 only."""
    size = 4 * CHUNK + 1000
    path, data = data_file(tmp_path, "huge.bin", size)
    item = planned(journal, path, "/C/huge.bin")
    session_id = client.session_start(b"", concurrent=True, path=item.destination)
    journal.start_session(item, session_id, time.time(), 0)
    for index in (0, 2):
        client.session_append(session_id, index * CHUNK, data[index * CHUNK:(index + 1) * CHUNK],
                              path=item.destination)
    journal.confirm_chunks(item, {0, 2}, CHUNK)
    server.clear_log()
    with engine(client, journal, log, appends_per_file=2) as uploader:
        session = ConcurrentSession(uploader.shared, uploader._appends, recorded(journal, "/C/huge.bin"),
                                    piece_size=2 * CHUNK)
        assert session.send() is Phase.COMMITTED
    assert server.read_file("/C/huge.bin") == data
    assert server.count_calls(START) == 0
    assert sorted(call["bytes_in"] for call in server.calls(APPEND)) == [1000, CHUNK, CHUNK]
    assert server.bytes_received(FINISH) == 0  # a concurrent session is finished without data
    assert said(caplog, "Resuming /C/huge.bin: 2 of 5 chunks are already in Dropbox.")
    assert recorded(journal, "/C/huge.bin").state == State.DONE


# -- the retry policy against the server's faults ------------------------------------------------

@pytest.mark.parametrize("rule, waits", [
    (FailRule(APPEND, 1, 503, times=3), [1.0, 2.0, 4.0]),  # server errors: doubling back-off
    (FailRule(START, 1, 429, error="too_many_requests", retry_after=7), [7.0]),  # Retry-After, as said
    (FailRule(APPEND, 1, "drop_mid_body"), [1.0]),  # connection cut, nothing applied: sent again
    (FailRule(APPEND, 1, "drop_before_response"), [1.0]),  # applied, answer lost: the offset says so
], ids=["503x3", "429-retry-after", "reset-mid-body", "answer-lost"])
def test_requests_ride_out_the_servers_faults_by_the_retry_policy(tmp_path, server, client, journal, log, caplog, naps,
                                                                  rule, waits):
    size = 2 * CHUNK + 5000  # start, one append, finish
    path, data = data_file(tmp_path, "r.bin", size)
    items = [planned(journal, path, "/R/r.bin")]
    server.set_faults(fail_nth=[rule])
    summary = ApiUploader(client, journal, options(), log).run(items, ["/R"])
    assert summary.failures == [] and summary.items_uploaded == 1
    assert naps == waits
    assert server.read_file("/R/r.bin") == data
    assert [call for call in server.calls(rule.route) if call["fault"]]  # the fault did happen
    assert recorded(journal, "/R/r.bin").state == State.DONE
    if len(waits) > 1:
        assert said(caplog, "Dropbox unreachable since") and said(caplog, "Dropbox answers again")


def test_network_trouble_longer_than_the_give_up_time_fails_the_file_resumably(
        tmp_path, server, client, journal, log, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(transfer, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    waits: list[float] = []

    def nap(seconds, stop=None):
        waits.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(transfer, "nap", nap)
    path, _ = data_file(tmp_path, "g.bin", 2 * CHUNK + 5000)
    items = [planned(journal, path, "/G/g.bin")]
    server.set_faults(fail_nth=[FailRule(APPEND, 1, 503, times=100)])
    summary = ApiUploader(client, journal, options(network_give_up_seconds=100), log).run(items, ["/G"])
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0]  # 123 s of trouble > 100 s: given up
    assert server.count_calls(APPEND, status=503) == 8
    [(where, message)] = summary.failures
    assert where == "/G/g.bin"
    assert message == ("upload: the network failed for more than 2 min (upload session append: Dropbox server "
                       "error 503)")
    item = recorded(journal, "/G/g.bin")
    assert item.state == State.FAILED and item.session_id and item.confirmed_offset == CHUNK  # a rerun resumes
