"""The small-file path of the API upload (archive_dropbox/small_files.py) cannot stall (issue 18).

append_batch carries every entry in its Dropbox-API-Arg header; a group of 500 made a 72 KB
header, a front end answered 431 and the client retried that for an hour per group. Here:
requests are sized by that header within a conservative cap (checked against the SDK's own
encoding over random session ids and lengths), sessions are opened only for the next request,
and a refusal (400, 413, 431) costs one request per run, after which the files travel in
smaller groups or one by one. End to end against the local test server, whose front-end header
limit (max_header_bytes) and append_batch switch (FaultConfig.refuse_append_batch) play the
servers that refuse; every request of the run is counted from its request log."""

from __future__ import annotations

import logging
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from dropbox.exceptions import BadInputError, HttpError, InternalServerError, RateLimitError
from hypothesis import given, settings, strategies as st

from archive_dropbox import dropbox_client as dc
from archive_dropbox.api_upload import ApiUploader, UploadOptions
from archive_dropbox.content_hash import file_content_hash
from archive_dropbox.dropbox_client import Credentials, DropboxClient, RequestRefused, append_batch_arg_bytes
from archive_dropbox.journal import Item, Journal, Kind, State
from archive_dropbox.small_files import (APPEND_BATCH_LIMIT, HEADER_CAP, HEADER_LIMIT, SESSION_ID_BOUND,
                                         AppendBatchLimit, Slot, SmallFileGroups, arg_bytes, encoded_length)
from conftest import REPO, make_tree, script_env, write_xlsx
from tests.dropbox_server import DropboxTestServer, FaultConfig

MIB = 1024 * 1024
START_BATCH = "files/upload_session/start_batch"
APPEND_BATCH = "files/upload_session/append_batch"
START = "files/upload_session/start"
HASH = "f" * 64  # what every request carries: the 64 hex digits of its body's content hash
SAID_SMALLER = "small files travel in smaller groups"
SAID_ONE_BY_ONE = "small files are sent one by one"


def quiet_log(name: str) -> logging.Logger:
    return logging.getLogger(f"test_small_files.{name}")


# -- the header, reckoned and exact --------------------------------------------------------------

session_id_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=200)
file_lengths = st.lists(st.integers(0, 4 * MIB), min_size=1, max_size=APPEND_BATCH_LIMIT + 20)


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(session_id_text, min_size=1, max_size=60), lengths=file_lengths, cap=st.integers(150, 10_000))
def test_a_request_sized_by_the_limit_never_exceeds_its_header_cap(ids, lengths, cap):
    limit = AppendBatchLimit(quiet_log("hypothesis"), cap=cap)
    limit.saw_session_ids(ids)
    count, reckoned = limit.fitting(lengths, cap)
    sessions = (ids * (count // len(ids) + 1))[:count]  # the ids start_batch would give, none longer than seen
    exact = append_batch_arg_bytes(sessions, lengths[:count], HASH)
    assert exact <= reckoned <= cap
    if count < min(len(lengths), APPEND_BATCH_LIMIT):  # it stopped for the header, not for want of files
        digits = sum(len(str(length)) for length in lengths[:count + 1])
        assert arg_bytes(count + 1, digits, limit.id_bytes) > cap
    if {encoded_length(i) for i in sessions} == {limit.id_bytes}:  # every id as long as reckoned: exact
        assert exact == reckoned


@settings(max_examples=150, deadline=None)
@given(id_length=st.integers(1, SESSION_ID_BOUND), lengths=file_lengths,
       paths=st.lists(st.text(min_size=1, max_size=300), min_size=1, max_size=5))
def test_groups_formed_before_any_session_id_is_seen_fit_the_cap_with_ids_up_to_the_bound(id_length, lengths, paths):
    # The paths go in the commit (finish_batch's body), never in append_batch's header.
    groups = SmallFileGroups(group_bytes=16 * MIB)
    items = [Item(None, "job", f"/data/{i}", "/D/" + paths[i % len(paths)], Kind.FILE, 0, length, length, 0)
             for i, length in enumerate(lengths)]
    formed = [full for full in map(groups.add, items) if full] + [groups.rest()]
    assert sum(map(len, formed)) == len(items)
    for group in formed:
        assert 0 < len(group) <= APPEND_BATCH_LIMIT and sum(i.length for i in group) <= 16 * MIB or len(group) == 1
        header = append_batch_arg_bytes(["s" * id_length] * len(group), [i.length for i in group], HASH)
        assert header <= HEADER_CAP


def test_the_cap_leaves_room_for_the_other_headers_within_the_common_front_end_limit():
    assert HEADER_LIMIT == 8 * 1024 and HEADER_CAP <= HEADER_LIMIT - 2048
    # Dropbox's ids are 67 characters (measured): a full request holds about 40 files.
    limit = AppendBatchLimit(quiet_log("cap"))
    limit.saw_session_ids(["x" * 67])
    count, _ = limit.fitting([5000] * 500, HEADER_CAP)
    assert 35 <= count <= 45, count


# -- what a refusal teaches the run ----------------------------------------------------------------

def refusal(status: int = 431) -> RequestRefused:
    return RequestRefused(f"upload session append: HTTP {status}", status=status)


def never() -> bool:
    return False


def always() -> bool:
    return True


def test_one_request_larger_than_any_accepted_is_in_flight_at_a_time(caplog):
    limit = AppendBatchLimit(quiet_log("probe"), cap=6000)
    first = limit.reserve(5000, never)
    assert first is not None and first.probe and first.header_bytes == 6000
    assert limit.reserve(100, always) is None  # would wait: nothing is accepted yet, a probe is out
    limit.accepted(first, 5000)
    assert limit.reserve(4000, never) == Slot(5000, False)  # within what was accepted: no wait
    second = limit.reserve(5500, never)
    assert second.probe
    assert limit.reserve(5600, always) is None  # a second probe waits for the first
    limit.release(second)
    limit.release(second)  # idempotent
    assert limit.reserve(5600, never).probe


def test_a_refused_probe_shrinks_the_cap_to_what_was_accepted_and_a_refused_accepted_size_stops_batching(caplog):
    caplog.set_level(logging.INFO)
    limit = AppendBatchLimit(quiet_log("shrink"), cap=6000)
    limit.accepted(limit.reserve(3000, never), 3000)
    probe = limit.reserve(6000, never)
    limit.refused(probe, 5900, refusal(431), files=40)
    assert (limit.cap, limit.off, limit.refusals) == (3000, False, 1)
    after = limit.reserve(5900, never)
    assert after == Slot(3000, False)  # cut to the size accepted, never a probe again
    limit.refused(after, 2900, refusal(400), files=20)
    assert limit.off and limit.refusals == 2
    assert limit.reserve(100, never) is None
    messages = [r.getMessage() for r in caplog.records if r.name == "test_small_files.shrink"]
    assert len(messages) == 2
    assert SAID_SMALLER in messages[0] and "HTTP 431" in messages[0] and "5900 bytes" in messages[0]
    assert SAID_ONE_BY_ONE in messages[1] and "HTTP 400" in messages[1]


def test_a_refused_first_request_stops_batching_for_the_run(caplog):
    caplog.set_level(logging.INFO)
    limit = AppendBatchLimit(quiet_log("first"))
    limit.refused(limit.reserve(4000, never), 4000, refusal(413), files=29)
    assert limit.off and limit.reserve(100, never) is None
    [message] = [r for r in caplog.records if r.name == "test_small_files.first"]
    assert message.levelno == logging.WARNING and SAID_ONE_BY_ONE in message.getMessage()


@pytest.mark.parametrize("exc, status", [
    (HttpError("request-id", 431, "Request Header Fields Too Large"), 431),
    (HttpError("request-id", 413, "Payload Too Large"), 413),
    (BadInputError("request-id", "400 Bad Request: Request Header Or Cookie Too Large"), 400),
])
def test_a_4xx_to_the_grouped_calls_is_a_refusal_not_a_network_problem(exc, status):
    error = dc._refusal(exc, "upload session append")
    assert type(error) is RequestRefused and error.status == status
    assert error.message.startswith(f"upload session append: HTTP {status} (")


@pytest.mark.parametrize("exc, cls", [(InternalServerError("request-id", 503, "busy"), dc.NetworkProblem),
                                      (HttpError("request-id", 502, "bad gateway"), dc.NetworkProblem),
                                      (RateLimitError("request-id", None, 3), dc.RateLimited)])
def test_server_trouble_and_rate_limits_to_the_grouped_calls_stay_what_they_were(exc, cls):
    assert type(dc._refusal(exc, "upload session append")) is cls


# -- end to end, as users run it (app.py) ----------------------------------------------------------

def run_app(tmp_path: Path, server: DropboxTestServer, tree: Path) -> subprocess.CompletedProcess:
    book = write_xlsx(tmp_path / "inputs.xlsx", {"dropboxUpload_API": [
        ["inputFile", "outputDir", "deleteAfterUpload"], [str(tree), "/Small", 0]]})
    return subprocess.run([sys.executable, str(REPO / "app.py"), "--excelName", str(book), "--sheetName",
                           "dropboxUpload_API", "--logs", str(tmp_path / "logs"), "--caBundle", server.ca_file],
                          env=script_env(server.client_env(credentials=True)), capture_output=True, text=True,
                          timeout=240, stdin=subprocess.DEVNULL)


def small_tree(root: Path, count: int) -> Path:
    return make_tree(root, {f"run/{i // 400:02d}/frame_{i:05d}.dat": bytes([i % 251]) * (i * 7 % 6000)
                            for i in range(count)})


def assert_all_landed(server: DropboxTestServer, tree: Path) -> None:
    local = {"/Small/" + p.relative_to(tree).as_posix(): p for p in tree.rglob("*") if p.is_file()}
    stored = {path: meta for path, meta in server.files().items() if path.startswith("/Small/")
              and "/_inventory_" not in path}
    assert set(stored) == set(local)
    assert all(stored[path]["content_hash"] == file_content_hash(p) for path, p in local.items())


def entries(server: DropboxTestServer, route: str, status: int = 200) -> int:
    return sum(call.get("entries") or 0 for call in server.calls(route) if call["status"] == status)


def test_2000_small_files_travel_in_requests_under_the_header_limit(tmp_path):
    server = DropboxTestServer(tmp_path / "server", max_header_bytes=HEADER_LIMIT)
    try:
        tree = small_tree(tmp_path / "data", 2000)
        result = run_app(tmp_path, server, tree)
        assert result.returncode == 0, result.stdout[-3000:]
        assert_all_landed(server, tree)
        calls = server.calls()
        assert not [call for call in calls if call["status"] != 200 and call["route"].startswith("files/upload")]
        assert max(call["header_bytes"] for call in calls) <= HEADER_LIMIT
        assert len(calls) / 2000 <= 1.02, f"{len(calls)} requests for 2000 files"
        appends = server.count_calls(APPEND_BATCH)
        assert entries(server, APPEND_BATCH) == 2000 and 2000 / appends >= 25, f"{appends} append_batch requests"
        # Sessions are opened for the next request only: none is left over.
        assert entries(server, START_BATCH) == 2000 and server.count_calls(START_BATCH) == appends
        assert server.count_calls(START) == 0
        assert SAID_SMALLER not in result.stdout and SAID_ONE_BY_ONE not in result.stdout
    finally:
        server.stop()


@pytest.mark.parametrize("refuse, header_limit", [(400, HEADER_LIMIT), (431, HEADER_LIMIT), (None, 4096)],
                         ids=["append_batch-400", "append_batch-431", "front-end-431"])
def test_a_server_that_refuses_append_batch_costs_one_refused_request_per_run(tmp_path, refuse, header_limit):
    """`front-end-431`: a front end whose limit is below the run's first request (4 KiB)."""
    server = DropboxTestServer(tmp_path / "server", max_header_bytes=header_limit,
                               faults=FaultConfig(refuse_append_batch=refuse))
    try:
        # 600 files: one request each, and the run's few others (login, checks, the refused
        # group, the commit, the inventory) within the 2 % allowed.
        tree = small_tree(tmp_path / "data", 600)
        result = run_app(tmp_path, server, tree)
        assert result.returncode == 0, result.stdout[-3000:]
        assert_all_landed(server, tree)
        [refused] = server.calls(APPEND_BATCH)
        assert refused["status"] == (refuse or 431)
        calls = server.calls()
        assert [call for call in calls if call["status"] != 200 and call is not refused
                and call["route"].startswith("files/upload")] == []
        assert server.count_calls(START) == 600  # one by one, each in one request
        assert len(calls) / 600 <= 1.02, f"{len(calls)} requests for 600 files"
        # Sessions were opened for the refused request only.
        assert server.count_calls(START_BATCH) == 1 and entries(server, START_BATCH) <= 45
        assert result.stdout.count(SAID_ONE_BY_ONE) == 1 and f"HTTP {refuse or 431}" in result.stdout
    finally:
        server.stop()


# -- in this process: a front end whose limit lies between two request sizes --------------------------

@pytest.fixture
def server(tmp_path) -> Iterator[DropboxTestServer]:
    instance = DropboxTestServer(tmp_path / "server")
    yield instance
    instance.stop()


@pytest.fixture
def client(server) -> DropboxClient:
    made = DropboxClient(Credentials(access_token=server.access_token), ca_bundle=server.ca_file)
    sdk = made._dbx
    sdk._host_map = {key: server.address for key in sdk._host_map}  # the SDK read its hosts at import
    sdk._session.trust_env = False
    return made


@contextmanager
def journal_at(path: Path) -> Iterator[Journal]:
    with Journal(path, "dropboxUpload_API") as opened:
        yield opened


def planned(journal: Journal, tree: Path, folder: str) -> list[Item]:
    return journal.sync_plan([Item(None, journal.job, str(p), f"{folder}/{p.name}", Kind.FILE, 0, p.stat().st_size,
                                   p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(tree.iterdir())])


def test_a_front_end_limit_between_two_request_sizes_costs_one_refusal_then_smaller_groups(tmp_path, server, client,
                                                                                           caplog):
    caplog.set_level(logging.INFO)
    # One small-file worker sends the groups in the scheduler's order, largest files first:
    # ten files of 100 kB fill the first group by bytes (a header of about 1.6 KB), then groups
    # of tiny files fill to the header cap (over 4 KB), which this front end refuses.
    tree = make_tree(tmp_path / "data", {**{f"big_{i}.bin": 100_000 for i in range(10)},
                                         **{f"tiny_{i:03d}.txt": b"%d" % i for i in range(300)}})
    server.max_header_bytes = 4096
    headers: list[int] = []
    client._dbx._session.hooks["response"].append(
        lambda response, *args, **kwargs: headers.append(len(response.request.headers["Dropbox-API-Arg"]))
        if response.request.url.endswith(APPEND_BATCH) else None)
    options = UploadOptions(chunk_size=4 * MIB, workers=1, small_file_workers=1, memory_budget=64 * MIB,
                            small_group_bytes=1_000_000)
    with journal_at(tmp_path / "journal.sqlite3") as journal:
        uploader = ApiUploader(client, journal, options, quiet_log("between"))
        summary = uploader.run(planned(journal, tree, "/Between"), ["/Between"])
        assert summary.ok and summary.items_uploaded == 310
        assert {item.state for item in journal.items()} == {State.DONE}
    assert {name.rsplit("/", 1)[1]: server.read_file(name) for name in server.files()} == {
        p.name: p.read_bytes() for p in tree.iterdir()}
    appends = server.calls(APPEND_BATCH)
    assert [call["status"] for call in appends].count(431) == 1 and appends[1]["status"] == 431
    first = appends[0]["header_bytes"]
    assert all(call["header_bytes"] <= first for call in appends[2:]) and len(appends) >= 25
    assert entries(server, APPEND_BATCH) == 310 and server.count_calls(START) == 0
    # The refused request's sessions served the next requests: one session per file.
    assert entries(server, START_BATCH) == 310
    assert max(headers) <= HEADER_CAP and len(headers) == len(appends)
    said = [r.getMessage() for r in caplog.records if r.name == "test_small_files.between"]
    assert len([m for m in said if SAID_SMALLER in m]) == 1 and not [m for m in said if SAID_ONE_BY_ONE in m]
