"""Streamed request bodies (issue 17): an upload request reads its bytes from the file while it
is sent instead of holding its chunk, and the test server's shared uplink that the upload
benchmarks measure against. In this process, against the local Dropbox test server over real
HTTPS.

No test depends on timing: a file is changed while its request is held on arrival at the server
(the client cannot have read past what the socket buffers take), retry waits are recorded
instead of slept, and the uplink test bounds time from below only (a loaded machine can only
make it longer)."""

from __future__ import annotations

import logging
import os
import threading
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.dropbox_server import DropboxTestServer, FailRule, FaultConfig

from archive_dropbox.api_upload import ApiUploader, UploadOptions
from archive_dropbox.content_hash import bytes_content_hash
from archive_dropbox.dropbox_client import (CommitRequest, ContentHashMismatch, Credentials, DropboxClient,
                                            mtime_to_client_modified)
from archive_dropbox.errors import FileProblem
from archive_dropbox.journal import Item, Journal, Kind, State
from archive_dropbox.upload_memory import STREAM_PIECE, FileRangeBody
from archive_dropbox.upload_run import became_shorter
from archive_dropbox.upload_sessions import CHANGED, Phase, SequentialSession
from tests.test_upload_engine import data_file, journal, naps  # noqa: F401 - fixtures: a fresh journal; the retry waits asked for

MIB = 1024 * 1024
START = "files/upload_session/start"
APPEND = "files/upload_session/append_v2"
FINISH = "files/upload_session/finish"
BOUND = 60.0  # seconds: generous limit for a wait that should end at once


def connect(server: DropboxTestServer, sdk_retries: int = 0) -> DropboxClient:
    """The package's DropboxClient bound to the test server; the SDK's own retries of 5xx
    `sdk_retries` times (0: only the engine's retry policy)."""
    made = DropboxClient(Credentials(access_token=server.access_token), ca_bundle=server.ca_file)
    sdk = made._dbx
    sdk._host_map = {key: server.address for key in sdk._host_map}  # the SDK read its hosts at import
    sdk._session.trust_env = False  # no proxy from the environment for loopback
    sdk._max_retries_on_error = sdk_retries
    sdk._max_retries_on_rate_limit = 0
    return made


@pytest.fixture
def client(server) -> DropboxClient:
    return connect(server)


@pytest.fixture
def log(request, caplog) -> logging.Logger:
    caplog.set_level(logging.DEBUG)
    return logging.getLogger(f"test_streamed_upload.{request.node.name}")


def planned(journal: Journal, path: Path, destination: str) -> Item:
    info = path.stat()
    [item] = journal.sync_plan([Item(None, journal.job, str(path), destination, Kind.FILE, 0, info.st_size,
                                     info.st_size, info.st_mtime_ns)])
    return item


def options(chunk: int, **changes) -> UploadOptions:
    return UploadOptions(**{"chunk_size": chunk, "workers": 1, "small_file_workers": 1, "appends_per_file": 2,
                            "memory_budget": 64 * MIB, **changes})


def never(error):
    raise AssertionError(f"the file could not be read: {error}")


def settled(condition, timeout: float = BOUND) -> bool:
    """Wait until `condition()` holds (something certain to happen, with no time of its own)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def commit(path: str) -> CommitRequest:
    return CommitRequest(session_id="", offset=0, path=path, client_modified=mtime_to_client_modified(0))


# -- the body -------------------------------------------------------------------------------------

def test_a_streamed_append_sends_exactly_its_range_with_its_content_hash(tmp_path, server, client):
    path, data = data_file(tmp_path, "range.bin", 10 * MIB + 123)
    start, length = 3 * MIB + 7, 5 * MIB + 11  # several pieces, none on a piece boundary
    wanted = data[start:start + length]
    session_id = client.session_start(b"", path="/S/range.bin")
    body = FileRangeBody(path, start, length, never)
    assert len(body) == length and len(list(body.pieces())) == -(-length // STREAM_PIECE)
    # Dropbox checks the hash against the bytes that arrive: a wrong one is refused, nothing appended.
    with pytest.raises(ContentHashMismatch):
        client.session_append(session_id, 0, body, path="/S/range.bin", content_hash=bytes_content_hash(b"other"))
    client.session_append(session_id, 0, body, path="/S/range.bin", content_hash=bytes_content_hash(wanted))
    request = commit("/S/range.bin")
    remote = client.session_finish(CommitRequest(session_id, length, request.path, request.client_modified))
    assert server.read_file("/S/range.bin") == wanted
    assert remote.content_hash == bytes_content_hash(wanted)
    assert [(call["status"], call["bytes_in"]) for call in server.calls(APPEND)] == [(409, length), (200, length)]
    with pytest.raises(ValueError, match="needs its content hash"):
        client.session_append(session_id, 0, body, path="/S/range.bin")


def test_a_request_the_sdk_sends_again_streams_its_body_again_from_the_first_byte(tmp_path, server, monkeypatch):
    """The SDK re-sends a request after a 5xx by itself: a stream consumed by the first attempt
    would send nothing the second time (the SDK refuses file objects for that reason)."""
    monkeypatch.setattr("dropbox.dropbox_client.random", SimpleNamespace(random=lambda: 0.0))  # no backoff
    client = connect(server, sdk_retries=2)
    path, data = data_file(tmp_path, "again.bin", 3 * MIB + 5)
    server.set_faults(fail_nth=[FailRule(START, 1, 503)])
    session_id = client.session_start(FileRangeBody(path, 0, len(data), never), close=True, path="/A/again.bin",
                                      content_hash=bytes_content_hash(data))
    request = commit("/A/again.bin")
    client.session_finish(CommitRequest(session_id, len(data), request.path, request.client_modified))
    assert server.read_file("/A/again.bin") == data
    assert [(call["status"], call["bytes_in"]) for call in server.calls(START)] == [(503, len(data)),
                                                                                    (200, len(data))]


# -- the engine -----------------------------------------------------------------------------------

@pytest.mark.parametrize("change", ["rewritten", "truncated"])
def test_a_file_changed_during_a_streamed_append_fails_and_nothing_is_committed(
        tmp_path, server, client, journal, log, naps, change):
    """The second chunk is hashed, then held at the server while the end of its range changes on
    disk. Rewritten (size and modification time put back, so only the bytes tell): Dropbox
    refuses the bytes that arrive, and the session finds its range no longer hashes as it did.
    Truncated: the body cannot be read to its end, so the request is abandoned mid-body (a body
    shorter than its Content-Length would keep the server waiting)."""
    chunk = 32 * MIB
    path, _ = data_file(tmp_path, "changing.bin", 3 * chunk + 1000)
    item = planned(journal, path, "/C/changing.bin")
    info = path.stat()
    hold = server.hold(APPEND)
    failure: list[BaseException] = []

    def upload() -> None:
        uploader = ApiUploader(client, journal, options(chunk), log)
        with uploader.jobs:
            try:
                SequentialSession(uploader.shared, uploader.commits, uploader._readahead, item).send()
            except BaseException as exc:  # noqa: BLE001 - looked at below
                failure.append(exc)

    sender = threading.Thread(target=upload)
    sender.start()
    try:
        assert hold.wait_held(1, timeout=BOUND)
        # Socket buffers take a few MiB of a held request at most: the last 8 MiB of the range
        # are certainly still on disk only.
        with open(path, "r+b") as handle:
            if change == "rewritten":
                handle.seek(2 * chunk - 8 * MIB)
                handle.write(os.urandom(8 * MIB))
            else:
                handle.truncate(2 * chunk - 8 * MIB)
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    finally:
        hold.release()
        sender.join(BOUND)
    assert not sender.is_alive()
    [error] = failure
    assert isinstance(error, FileProblem)
    # A request the client abandoned is logged once the server sees the connection closed.
    assert settled(lambda: server.calls(APPEND) and server.calls(APPEND)[0]["status"] is not None)
    [call] = server.calls(APPEND)  # not retried
    if change == "rewritten":
        assert error.message == CHANGED
        assert call["status"] == 409 and call["error"].startswith("content_hash_mismatch")
    else:
        assert error.message == became_shorter(item).message
        assert call["status"] == 0 and call["bytes_in"] < chunk  # the connection closed mid-body
    assert "/c/changing.bin" not in {p.lower() for p in server.files()}
    assert server.count_calls(FINISH) == 0 and naps == []


def test_bytes_refused_as_corrupted_on_the_way_are_sent_again_when_the_file_did_not_change(
        tmp_path, server, client, journal, log, naps):
    chunk = 4 * MIB
    path, data = data_file(tmp_path, "wire.bin", 2 * chunk + 5000)
    server.set_faults(fail_nth=[FailRule(APPEND, 1, 409, error={".tag": "content_hash_mismatch"})])
    summary = ApiUploader(client, journal, options(chunk), log).run([planned(journal, path, "/W/wire.bin")], ["/W"])
    assert summary.failures == [] and server.read_file("/W/wire.bin") == data
    assert [call["status"] for call in server.calls(APPEND)] == [409, 200]
    assert naps == [1.0]


def test_a_connection_cut_mid_body_is_sent_again_from_the_confirmed_offset_with_the_same_bytes(
        tmp_path, server, client, journal, log, naps):
    chunk = 8 * MIB  # eight streamed pieces: the cut falls inside the stream
    path, data = data_file(tmp_path, "cut.bin", 3 * chunk + 5000)
    item = planned(journal, path, "/X/cut.bin")
    attempts: list[tuple[int, int, str]] = []
    append = client.session_append

    def watched(session_id, offset, body, **kwargs):
        attempts.append((offset, len(body), kwargs["content_hash"]))
        return append(session_id, offset, body, **kwargs)

    client.session_append = watched
    server.set_faults(fail_nth=[FailRule(APPEND, 1, "drop_mid_body")])
    summary = ApiUploader(client, journal, options(chunk), log).run([item], ["/X"])
    assert summary.failures == [] and naps == [1.0]
    assert server.read_file("/X/cut.bin") == data
    dropped, again, following = server.calls(APPEND)
    assert dropped["status"] == 0 and 0 < dropped["bytes_in"] < chunk
    assert (again["status"], again["bytes_in"]) == (200, chunk)  # the server took its content hash
    assert attempts[0] == attempts[1] == (chunk, chunk, bytes_content_hash(data[chunk:2 * chunk]))
    assert following["status"] == 200 and attempts[2][0] == 2 * chunk
    assert [i.state for i in journal.items()] == [State.DONE]


def test_a_64_mib_chunk_is_sent_holding_a_small_buffer_not_the_chunk(tmp_path, server, client, journal, log):
    """Python-allocated memory (tracemalloc: this process, so the in-process test server's own
    buffers count too) while a file of two 64 MiB chunks is sent: far below one chunk."""
    chunk = 64 * MIB
    path, data = data_file(tmp_path, "big.bin", 2 * chunk + 5000)
    item = planned(journal, path, "/M/big.bin")
    del data
    uploader = ApiUploader(client, journal, options(chunk), log)
    with uploader.jobs:
        tracemalloc.start()
        try:
            phase = SequentialSession(uploader.shared, uploader.commits, uploader._readahead, item).send()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert phase is Phase.COMMITTED
    assert [call["bytes_in"] for call in server.calls(START) + server.calls(APPEND)] == [chunk, chunk]
    assert peak < chunk / 8, f"peak {peak / MIB:.1f} MiB of Python allocations for {chunk // MIB} MiB chunks"
    assert uploader.shared.budget.peak <= 3 * STREAM_PIECE  # a hash pass ahead, one body in flight


# -- the shared uplink --------------------------------------------------------------------------

def test_the_shared_uplink_caps_the_total_rate_of_all_connections(tmp_path):
    """Four connections send 2 MiB each at once, with no cap of their own, through a 4 MiB/s
    uplink: every byte goes through the one bucket (its accounting says bytes / rate of link
    time), and the requests take at least that long less the burst (a bound from below: load
    can only add to it; four uncapped connections would take a fraction of it)."""
    rate, each, connections = 4 * MIB, 2 * MIB, 4
    with DropboxTestServer(tmp_path / "server", faults=FaultConfig(uplink_bps=rate)) as server:
        client = connect(server)
        payloads = [os.urandom(each) for _ in range(connections)]
        before, reserved = server.uplink.bytes, server.uplink.reserved_seconds
        barrier = threading.Barrier(connections, timeout=BOUND)
        errors: list[BaseException] = []

        def send(data: bytes) -> None:
            try:
                barrier.wait()
                client.session_start(data, close=True, content_hash=bytes_content_hash(data))
            except BaseException as exc:  # noqa: BLE001 - asserted empty below
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(data,)) for data in payloads]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(BOUND)
        assert errors == [] and not any(thread.is_alive() for thread in threads)
        calls = server.calls(START)
        total = connections * each
        assert [call["bytes_in"] for call in calls] == [each] * connections
        assert len({call["conn"] for call in calls}) == connections
        assert server.uplink.bytes - before == total
        assert server.uplink.reserved_seconds - reserved == pytest.approx(total / rate)
        first = min(call["ts"] for call in calls)
        last = max(call["ts"] + call["duration_s"] for call in calls)
        assert last - first >= (total - rate * server.uplink.BURST_S) / rate
