"""Tests of the local Dropbox test server (tests/dropbox_server), driven only through the
official Dropbox SDK over real HTTPS, as the project's own code will drive it."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
import unicodedata

import pytest
import requests

from dropbox import common, files
from dropbox.content_hash import content_hash
from dropbox.exceptions import (ApiError, AuthError, BadInputError, HttpError, PathRootError,
                                RateLimitError)

from tests.dropbox_server import DesktopAppSimulator, DropboxTestServer, FailRule, FaultConfig

MiB = 1024 * 1024
BLOCK = 4 * MiB


@pytest.fixture
def server(tmp_path):
    srv = DropboxTestServer(tmp_path / "server")
    yield srv
    srv.stop()


@pytest.fixture
def dbx(server):
    client = server.sdk_client(max_retries_on_error=0, max_retries_on_rate_limit=0)
    yield client
    client.close()


def data_of(n: int, seed: int = 0) -> bytes:
    # Cheap, non-repeating-per-block bytes (os.urandom would do, but determinism helps debugging).
    block = bytes((i * 31 + seed) & 0xFF for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


def cursor(session_id, offset):
    return files.UploadSessionCursor(session_id=session_id, offset=offset)


# --------------------------------------------------------------------------------------------

def test_small_upload_metadata_and_download(server, dbx):
    when = dt.datetime(2021, 5, 6, 7, 8, 9)
    meta = dbx.files_upload(b"hello world", "/Docs/Hello.txt", client_modified=when)
    assert meta.size == 11 and meta.name == "Hello.txt"
    assert meta.path_display == "/Docs/Hello.txt" and meta.path_lower == "/docs/hello.txt"
    assert meta.content_hash == content_hash(b"hello world") == server.content_hash("/docs/hello.txt")
    assert meta.client_modified == when and meta.rev and meta.id.startswith("id:")
    assert isinstance(meta.server_modified, dt.datetime)
    assert server.read_file("/Docs/Hello.txt") == b"hello world"
    assert set(server.files()) == {"/Docs/Hello.txt"}
    _, resp = dbx.files_download("/docs/HELLO.txt")
    assert resp.content == b"hello world"
    # An empty file has the hash of no blocks: SHA-256 of the empty string.
    empty = dbx.files_upload(b"", "/empty")
    assert empty.content_hash == content_hash(b"") == \
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    rec = server.calls("files/upload")[-1]
    assert rec["status"] == 200 and rec["path"] == "/empty"
    assert server.count_calls("files/upload") == 2
    assert server.bytes_received("files/upload") == 11
    # Unicode and spaces survive the Dropbox-API-Arg / Dropbox-API-Result headers.
    name = "/Données/ünï cødé 文件.txt"
    assert dbx.files_upload(b"u", name).path_display == name
    meta, resp = dbx.files_download(name.upper())
    assert meta.path_display == name and resp.content == b"u"


def test_multi_chunk_sequential_session(server, dbx):
    data = data_of(2 * BLOCK + 123_457)
    start = dbx.files_upload_session_start(data[:BLOCK])
    dbx.files_upload_session_append_v2(data[BLOCK:2 * BLOCK], cursor(start.session_id, BLOCK))
    # Unaligned pieces too: the server must still hash the file correctly.
    dbx.files_upload_session_append_v2(data[2 * BLOCK:2 * BLOCK + 1000],
                                       cursor(start.session_id, 2 * BLOCK))
    meta = dbx.files_upload_session_finish(
        data[2 * BLOCK + 1000:], cursor(start.session_id, 2 * BLOCK + 1000),
        files.CommitInfo("/big/file.bin"))
    assert meta.size == len(data)
    assert meta.content_hash == content_hash(data) == server.content_hash("/big/file.bin")
    assert server.read_file("/big/file.bin") == data
    assert server.sessions() == {}
    # A finished session is gone.
    with pytest.raises(ApiError) as err:
        dbx.files_upload_session_append_v2(b"x", cursor(start.session_id, len(data)))
    assert err.value.error.is_not_found()


def test_closed_session_and_content_hash_mismatch(dbx):
    start = dbx.files_upload_session_start(b"abc", close=True)
    with pytest.raises(ApiError) as err:
        dbx.files_upload_session_append_v2(b"def", cursor(start.session_id, 3))
    assert err.value.error.is_closed()
    other = dbx.files_upload_session_start(b"")
    with pytest.raises(ApiError) as err:
        dbx.files_upload_session_append_v2(b"def", cursor(other.session_id, 0),
                                           content_hash=content_hash(b"xyz"))
    assert err.value.error.is_content_hash_mismatch()
    dbx.files_upload_session_append_v2(b"def", cursor(other.session_id, 0))
    with pytest.raises(ApiError) as err:
        dbx.files_upload(b"data", "/x", content_hash=content_hash(b"other"))
    assert err.value.error.is_content_hash_mismatch()


def test_concurrent_session_out_of_order_appends(server, dbx):
    data = data_of(3 * BLOCK + 777, seed=5)
    start = dbx.files_upload_session_start(b"", session_type=files.UploadSessionType.concurrent)
    sid = start.session_id
    errors = []

    def append(offset, length, close=False):
        try:
            dbx.files_upload_session_append_v2(data[offset:offset + length], cursor(sid, offset),
                                               close=close)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(off, BLOCK)) for off in (2 * BLOCK, 0, BLOCK)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # Not closed yet: finish refuses.
    with pytest.raises(ApiError) as err:
        dbx.files_upload_session_finish(b"", cursor(sid, len(data)), files.CommitInfo("/c.bin"))
    assert err.value.error.is_concurrent_session_not_closed()
    # A non-final append must be a multiple of 4 MiB.
    with pytest.raises(ApiError) as err:
        dbx.files_upload_session_append_v2(b"x" * 10, cursor(sid, 3 * BLOCK))
    assert err.value.error.is_concurrent_session_invalid_data_size()
    with pytest.raises(ApiError) as err:
        dbx.files_upload_session_append_v2(b"x" * 10, cursor(sid, 1000), close=True)
    assert err.value.error.is_concurrent_session_invalid_offset()
    append(3 * BLOCK, 777, close=True)
    assert not errors
    meta = dbx.files_upload_session_finish(b"", cursor(sid, len(data)), files.CommitInfo("/c.bin"))
    assert meta.content_hash == content_hash(data)
    assert server.read_file("/c.bin") == data
    # Concurrent sessions take no data on start.
    with pytest.raises(ApiError) as err:
        dbx.files_upload_session_start(b"x", session_type=files.UploadSessionType.concurrent)
    assert err.value.error.is_concurrent_session_data_not_allowed()


def test_concurrent_session_missing_data(dbx):
    sid = dbx.files_upload_session_start(
        b"", session_type=files.UploadSessionType.concurrent).session_id
    dbx.files_upload_session_append_v2(b"e" * 10, cursor(sid, BLOCK), close=True)
    with pytest.raises(ApiError) as err:
        dbx.files_upload_session_finish(b"", cursor(sid, BLOCK + 10), files.CommitInfo("/m"))
    assert err.value.error.is_concurrent_session_missing_data()


def test_finish_batch_v2_with_1000_entries(server, dbx):
    ids = dbx.files_upload_session_start_batch(1000).session_ids
    assert len(ids) == 1000
    entries = []
    for i, sid in enumerate(ids):
        payload = b"file %d" % i
        dbx.files_upload_session_append_v2(payload, cursor(sid, 0), close=True)
        # Entry 500 carries a wrong offset: only that entry fails.
        offset = len(payload) + (1 if i == 500 else 0)
        entries.append(files.UploadSessionFinishArg(
            cursor(sid, offset), files.CommitInfo("/batch/f%04d.txt" % i)))
    result = dbx.files_upload_session_finish_batch_v2(entries)
    assert len(result.entries) == 1000
    for i, entry in enumerate(result.entries):
        if i == 500:
            assert entry.is_failure()
            lookup = entry.get_failure().get_lookup_failed()
            assert lookup.get_incorrect_offset().correct_offset == len(b"file 500")
        else:
            assert entry.is_success()
            assert entry.get_success().path_display == "/batch/f%04d.txt" % i
    assert len(server.files()) == 999
    assert server.count_calls("files/upload_session/finish_batch_v2") == 1
    # More than 1000 entries is a malformed argument (HTTP 400). The SDK checks that itself,
    # so send the raw JSON through its transport to see the server refuse it too.
    raw = {"entries": [{"cursor": {"session_id": ids[0], "offset": 6},
                        "commit": {"path": "/x%d" % i}} for i in range(1001)]}
    with pytest.raises(BadInputError) as err:
        dbx.request_json_object("api", "files/upload_session/finish_batch_v2", "rpc", raw,
                                "user", None)
    assert "1000" in err.value.message
    # Sessions must be closed before a batch commit.
    open_sid = dbx.files_upload_session_start(b"abc").session_id
    result = dbx.files_upload_session_finish_batch_v2(
        [files.UploadSessionFinishArg(cursor(open_sid, 3), files.CommitInfo("/open"))])
    assert result.entries[0].get_failure().get_lookup_failed().is_not_closed()


def test_append_batch_feeds_many_sessions_in_one_request(server, dbx):
    ids = dbx.files_upload_session_start_batch(4).session_ids
    pieces = [b"alpha", b"", data_of(BLOCK + 7, seed=1), b"delta"]
    entries = [files.UploadSessionAppendBatchArgEntry(cursor(sid, 0), len(piece), close=True)
               for sid, piece in zip(ids, pieces)]
    # Entry 3 carries a wrong offset: only that entry fails, and says where the session is.
    entries[3] = files.UploadSessionAppendBatchArgEntry(cursor(ids[3], 2), len(pieces[3]), close=True)
    body = b"".join(pieces)
    result = dbx.files_upload_session_append_batch(body, entries, content_hash=content_hash(body))
    assert [entry.is_success() for entry in result.entries] == [True, True, True, False]
    assert result.entries[3].get_failure().get_incorrect_offset().correct_offset == 0
    assert server.count_calls("files/upload_session/append_batch") == 1
    commits = [files.UploadSessionFinishArg(cursor(sid, len(piece)), files.CommitInfo("/ab/%d" % i))
               for i, (sid, piece) in enumerate(zip(ids[:3], pieces[:3]))]
    finished = dbx.files_upload_session_finish_batch_v2(commits)
    for entry, piece in zip(finished.entries, pieces):
        assert entry.get_success().content_hash == content_hash(piece)
    assert server.read_file("/ab/2") == pieces[2]
    # Closed sessions take no more data; the whole request is refused when the lengths do not
    # add up to the body or the body's content hash is wrong, and then nothing is applied.
    again = dbx.files_upload_session_append_batch(b"x", [files.UploadSessionAppendBatchArgEntry(
        cursor(ids[3], 0), 1)])
    assert again.entries[0].is_success()
    with pytest.raises(ApiError) as err:
        dbx.files_upload_session_append_batch(b"xyz", [files.UploadSessionAppendBatchArgEntry(
            cursor(ids[3], 1), 2)])
    assert err.value.error.is_length_mismatch()
    with pytest.raises(ApiError) as err:
        dbx.files_upload_session_append_batch(b"yz", [files.UploadSessionAppendBatchArgEntry(
            cursor(ids[3], 1), 2)], content_hash=content_hash(b"zz"))
    assert err.value.error.is_content_hash_mismatch()
    closed_sid = dbx.files_upload_session_start(b"ab", close=True).session_id
    late = dbx.files_upload_session_append_batch(b"yzq", [
        files.UploadSessionAppendBatchArgEntry(cursor(closed_sid, 2), 2),
        files.UploadSessionAppendBatchArgEntry(cursor(ids[0], 5), 1)])
    assert late.entries[0].get_failure().is_closed()
    assert late.entries[1].get_failure().is_not_found()  # committed sessions are gone
    meta = dbx.files_upload_session_finish(b"yz", cursor(ids[3], 1), files.CommitInfo("/ab/3"))
    assert meta.content_hash == content_hash(b"xyz")


def test_incorrect_offset_recovery_after_lost_response(server, dbx):
    data = data_of(3 * MiB)
    sid = dbx.files_upload_session_start(data[:MiB]).session_id
    # The server applies the append but the connection drops before the answer.
    server.set_faults(fail_nth=[FailRule("files/upload_session/append_v2", 1,
                                         "drop_before_response")])
    with pytest.raises(requests.exceptions.ConnectionError):
        dbx.files_upload_session_append_v2(data[MiB:2 * MiB], cursor(sid, MiB))
    # The client re-sends; the server tells it where the session really is.
    with pytest.raises(ApiError) as err:
        dbx.files_upload_session_append_v2(data[MiB:2 * MiB], cursor(sid, MiB))
    correct = err.value.error.get_incorrect_offset().correct_offset
    assert correct == 2 * MiB
    meta = dbx.files_upload_session_finish(data[correct:], cursor(sid, correct),
                                           files.CommitInfo("/resumed.bin"))
    assert meta.content_hash == content_hash(data)
    # The bytes that crossed the wire twice are visible in the request log.
    assert server.bytes_received("files/upload_session/append_v2") == 2 * MiB
    assert server.calls("files/upload_session/append_v2")[0]["status"] == 0


def test_dropped_connection_mid_body_applies_nothing(server, dbx):
    server.set_faults(fail_nth=[FailRule("files/upload", 1, "drop_mid_body")])
    payload = data_of(2 * MiB)
    with pytest.raises(requests.exceptions.ConnectionError):
        dbx.files_upload(payload, "/dropped.bin")
    assert server.files() == {}
    first = server.calls("files/upload")[0]
    assert first["status"] == 0 and 0 < first["bytes_in"] < len(payload)
    meta = dbx.files_upload(payload, "/dropped.bin")
    assert meta.content_hash == content_hash(payload)


def test_token_expiry_and_sdk_refresh(tmp_path):
    with DropboxTestServer(tmp_path / "srv", token_lifetime_s=3600) as server:
        server.expire_access_tokens()
        far = dt.datetime.utcnow() + dt.timedelta(hours=1)
        # The SDK believes its token is fresh; the server says it expired; the SDK refreshes.
        client = server.sdk_client(server.access_token, oauth2_refresh_token=server.refresh_token,
                                   app_key=server.app_key, oauth2_access_token_expiration=far)
        assert client.users_get_current_account().account_id == server.account_id
        assert server.count_calls("users/get_current_account", status=401) == 1
        assert server.count_calls("oauth2/token", status=200) == 1
        # Refresh ahead of time when the SDK knows the expiry has passed.
        past = dt.datetime.utcnow() - dt.timedelta(minutes=1)
        client2 = server.sdk_client("sl.stale", oauth2_refresh_token=server.refresh_token,
                                    app_key=server.app_key, oauth2_access_token_expiration=past)
        client2.users_get_space_usage()
        assert server.count_calls("oauth2/token", status=200) == 2
        assert server.count_calls("users/get_space_usage", status=401) == 0
        # Advancing the server clock past the lifetime expires issued tokens too.
        token = server.issue_access_token()
        plain = server.sdk_client(token)
        plain.users_get_space_usage()
        server.advance_clock(3601)
        with pytest.raises(AuthError) as err:
            plain.users_get_space_usage()
        assert err.value.error.is_expired_access_token()
        # A revoked refresh token cannot be used any more.
        server.revoke_refresh_token()
        client3 = server.sdk_client(oauth2_refresh_token=server.refresh_token,
                                    app_key=server.app_key)
        with pytest.raises(AuthError) as err:
            client3.users_get_space_usage()
        assert err.value.error.is_invalid_access_token()


def test_pkce_login_flow(server):
    flow = server.oauth_flow()
    url = flow.start()
    assert "code_challenge=" in url
    code = server.authorize_url(url)          # the "browser" step
    result = flow.finish(code)
    assert result.refresh_token and result.account_id == server.account_id
    client = server.sdk_client(oauth2_refresh_token=result.refresh_token, app_key=server.app_key)
    assert client.users_get_current_account().account_id == server.account_id
    # A code is single-use, and a wrong verifier is refused.
    with pytest.raises(requests.exceptions.HTTPError):
        flow.finish(code)
    other = server.oauth_flow()
    other.start()
    with pytest.raises(requests.exceptions.HTTPError):
        other.finish(server.authorize(server.app_key, "not-the-challenge"))
    with pytest.raises(AuthError):
        server.sdk_client("sl.unknown").users_get_space_usage()


def test_quota_exceeded_and_space_usage(server, dbx):
    server.set_quota(1000)
    dbx.files_upload(b"a" * 600, "/a")
    usage = dbx.users_get_space_usage()
    assert usage.used == 600 and usage.allocation.get_individual().allocated == 1000
    with pytest.raises(ApiError) as err:
        dbx.files_upload(b"b" * 600, "/b")
    assert err.value.error.get_path().reason.is_insufficient_space()
    sid = dbx.files_upload_session_start(b"c" * 500).session_id
    with pytest.raises(ApiError) as err:
        dbx.files_upload_session_finish(b"", cursor(sid, 500), files.CommitInfo("/c"))
    assert err.value.error.get_path().is_insufficient_space()
    # Space comes back: the same session can still be committed.
    server.set_quota(10_000)
    assert dbx.files_upload_session_finish(b"", cursor(sid, 500), files.CommitInfo("/c")).size == 500
    server.set_faults(insufficient_space=True)
    with pytest.raises(ApiError) as err:
        dbx.files_upload(b"d", "/d")
    assert err.value.error.get_path().reason.is_insufficient_space()
    assert "path/insufficient_space" in server.calls("files/upload")[-1]["error"]


def test_rate_limit_honoured_by_sdk_retry(server):
    server.set_faults(fail_nth=[FailRule("files/upload", 1, 429, retry_after=1)])
    client = server.sdk_client(max_retries_on_rate_limit=3)
    started = time.monotonic()
    client.files_upload(b"x", "/rl")
    assert time.monotonic() - started >= 1.0
    assert [r["status"] for r in server.calls("files/upload")] == [429, 200]
    # Without retries the SDK surfaces the error with Dropbox's shape.
    server.set_faults(fail_nth=[FailRule("files/upload", 1, 429,
                                         error="too_many_write_operations", retry_after=0)])
    strict = server.sdk_client(max_retries_on_rate_limit=0)
    with pytest.raises(RateLimitError) as err:
        strict.files_upload(b"y", "/rl2")
    assert err.value.error.reason.is_too_many_write_operations() and err.value.backoff == 0


def test_namespace_commit_contention(server):
    server.set_faults(max_concurrent_commits_per_namespace=1, commit_hold_s=0.5)
    client = server.sdk_client(max_retries_on_rate_limit=0)
    outcomes = []

    def commit(i):
        try:
            client.files_upload(b"%d" % i, "/w%d" % i)
            outcomes.append("ok")
        except RateLimitError as exc:
            outcomes.append(exc.error.reason._tag)

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok", "too_many_write_operations"]


def test_random_faults_are_deterministic(server):
    client = server.sdk_client(max_retries_on_error=0)

    def pattern():
        out = []
        for _ in range(30):
            try:
                client.users_get_space_usage()
                out.append(200)
            except HttpError as exc:
                out.append(exc.status_code)
        return out

    server.set_faults(seed=7, p_500=0.3, p_503=0.2)
    first = pattern()
    server.faults = FaultConfig(seed=7, p_500=0.3, p_503=0.2)   # same seed, same story
    assert pattern() == first
    assert {500, 503, 200} <= set(first)


def test_5xx_retried_by_sdk(server):
    server.set_faults(fail_nth=[FailRule("users/get_space_usage", 1, 503)])
    client = server.sdk_client(max_retries_on_error=2)
    client.users_get_space_usage()
    assert [r["status"] for r in server.calls("users/get_space_usage")] == [503, 200]


def test_latency_and_bandwidth_cap(server):
    client = server.sdk_client()
    client.users_get_space_usage()                   # warm the connection
    server.set_faults(latency_s=0.3)
    started = time.monotonic()
    client.users_get_space_usage()
    assert time.monotonic() - started >= 0.3
    server.set_faults(bandwidth_bps=1_000_000)
    payload = data_of(500_000)
    started = time.monotonic()
    client.files_upload(payload, "/slow.bin")
    up = time.monotonic() - started
    started = time.monotonic()
    _, resp = client.files_download("/slow.bin")
    assert resp.content == payload
    down = time.monotonic() - started
    assert 0.4 <= up < 3 and 0.4 <= down < 3


def test_ranged_download(server, dbx):
    payload = data_of(100_000, seed=3)
    dbx.files_upload(payload, "/r.bin")
    meta, resp = dbx.files_download("/r.bin", extra_headers={"Range": "bytes=10-19"})
    assert resp.status_code == 206 and resp.content == payload[10:20]
    assert resp.headers["Content-Range"] == "bytes 10-19/100000" and meta.size == 100_000
    _, resp = dbx.files_download("/r.bin", extra_headers={"Range": "bytes=99990-"})
    assert resp.content == payload[99990:]
    _, resp = dbx.files_download("/r.bin", extra_headers={"Range": "bytes=-7"})
    assert resp.content == payload[-7:]
    with pytest.raises(HttpError) as err:
        dbx.files_download("/r.bin", extra_headers={"Range": "bytes=100000-"})
    assert err.value.status_code == 416
    with pytest.raises(ApiError) as err:
        dbx.files_download("/nope.bin")
    assert err.value.error.get_path().is_not_found()
    dbx.files_create_folder_v2("/folder")
    with pytest.raises(ApiError) as err:
        dbx.files_download("/folder")
    assert err.value.error.get_path().is_not_file()


def test_list_folder_paging_and_changes(server, dbx):
    names = ["/tree/a%02d.txt" % i for i in range(12)] + ["/tree/sub/b%02d.txt" % i for i in range(8)]
    for name in names:
        server.put_file(name, name.encode())
    seen, result = [], dbx.files_list_folder("/tree", recursive=True, limit=7)
    pages = 1
    seen += result.entries
    while result.has_more:
        assert len(result.entries) == 7
        result = dbx.files_list_folder_continue(result.cursor)
        seen += result.entries
        pages += 1
    paths = [e.path_display for e in seen]
    assert pages == 4 and len(paths) == len(set(paths)) == 22   # 20 files + /tree + /tree/sub
    assert set(names) <= set(paths)
    top = dbx.files_list_folder("/TREE")
    assert sorted(e.name for e in top.entries if isinstance(e, files.FolderMetadata)) == ["sub"]
    assert len(top.entries) == 13
    # After the listing, the cursor reports changes, including deletions.
    dbx.files_upload(b"new", "/tree/sub/new.txt")
    dbx.files_delete_v2("/tree/a00.txt")
    changes = dbx.files_list_folder_continue(result.cursor)
    kinds = {e.path_display: type(e).__name__ for e in changes.entries}
    assert kinds == {"/tree/sub/new.txt": "FileMetadata", "/tree/a00.txt": "DeletedMetadata"}
    with pytest.raises(ApiError) as err:
        dbx.files_list_folder("/missing")
    assert err.value.error.get_path().is_not_found()
    with pytest.raises(ApiError) as err:
        dbx.files_list_folder("/tree/a01.txt")
    assert err.value.error.get_path().is_not_folder()


def test_case_insensitive_paths_and_conflicts(server, dbx):
    first = dbx.files_upload(b"one", "/Data/File.TXT")
    with pytest.raises(ApiError) as err:
        dbx.files_upload(b"two", "/data/file.txt")
    assert err.value.error.get_path().reason.get_conflict().is_file()
    assert server.calls("files/upload")[-1]["error"] == "path/conflict/file/.."
    # Identical content is not a conflict (unless strict_conflict).
    same = dbx.files_upload(b"one", "/DATA/file.txt")
    assert same.rev == first.rev and same.path_display == "/Data/File.TXT"
    with pytest.raises(ApiError):
        dbx.files_upload(b"one", "/data/file.txt", strict_conflict=True)
    renamed = dbx.files_upload(b"two", "/data/file.txt", autorename=True)
    assert renamed.path_display == "/Data/file (1).txt"
    over = dbx.files_upload(b"three", "/data/FILE.txt", mode=files.WriteMode.overwrite)
    assert over.path_display == "/Data/File.TXT" and over.rev != first.rev and over.id == first.id
    with pytest.raises(ApiError) as err:
        dbx.files_upload(b"four", "/data/file.txt", mode=files.WriteMode.update(first.rev))
    assert err.value.error.get_path().reason.get_conflict().is_file()
    updated = dbx.files_upload(b"four", "/data/file.txt", mode=files.WriteMode.update(over.rev))
    assert server.read_file("/data/file.txt") == b"four" and updated.rev != over.rev
    with pytest.raises(ApiError) as err:
        dbx.files_upload(b"x", "/data")
    assert err.value.error.get_path().reason.get_conflict().is_folder()
    with pytest.raises(ApiError) as err:
        dbx.files_upload(b"x", "/data/file.txt/child")
    assert err.value.error.get_path().reason.get_conflict().is_file_ancestor()
    with pytest.raises(ApiError) as err:
        dbx.files_create_folder_v2("/DATA")
    assert err.value.error.get_path().get_conflict().is_folder()
    with pytest.raises(ApiError) as err:
        dbx.files_upload(b"x", "/data/desktop.ini")
    assert err.value.error.get_path().reason.is_disallowed_name()
    deleted = dbx.files_delete_v2("/data")
    assert deleted.metadata.path_display == "/Data" and server.files() == {}


def test_unicode_forms_stored_as_given_found_only_in_nfc(server, dbx):
    nfd = unicodedata.normalize("NFD", "/Übung/résumé.txt")
    nfc = unicodedata.normalize("NFC", nfd)
    stored = dbx.files_upload(b"cv", nfd)
    # The name keeps the form it was written in; path_lower is lower case NFC.
    assert stored.path_display == nfd and stored.path_lower == nfc.lower()
    assert dbx.files_get_metadata(nfc).path_display == nfd
    assert dbx.files_get_metadata(nfc.upper()).size == 2
    for lookup in (lambda: dbx.files_get_metadata(nfd), lambda: dbx.files_download(nfd),
                   lambda: dbx.files_list_folder(unicodedata.normalize("NFD", "/Übung"))):
        with pytest.raises(ApiError) as err:
            lookup()
        assert "not_found" in str(err.value.error)
    assert [e.name for e in dbx.files_list_folder(unicodedata.normalize("NFC", "/Übung")).entries] == [
        unicodedata.normalize("NFD", "résumé.txt")]
    # Writes compare NFC: the other form is the same item (identical: no conflict; else conflict).
    assert dbx.files_upload(b"cv", nfc).id == stored.id
    with pytest.raises(ApiError) as err:
        dbx.files_upload(b"other", nfc)
    assert err.value.error.get_path().reason.get_conflict().is_file()
    assert server.read_file(nfc) == b"cv" and len(server.files()) == 1


def test_refused_finish_keeps_its_closing_bytes(server, dbx):
    """A finish whose commit is refused leaves the closing bytes in the session, closed: the
    re-sent bytes get `closed`, an empty finish at the full offset commits."""
    server.set_quota(10)
    sid = dbx.files_upload_session_start(b"abcd").session_id
    with pytest.raises(ApiError) as err:
        dbx.files_upload_session_finish(b"efghijklmn", cursor(sid, 4), files.CommitInfo("/full"))
    assert err.value.error.get_path().is_insufficient_space()
    server.set_quota(10_000)
    with pytest.raises(ApiError) as err:
        dbx.files_upload_session_finish(b"efghijklmn", cursor(sid, 4), files.CommitInfo("/full"))
    assert err.value.error.get_lookup_failed().is_closed()
    with pytest.raises(ApiError) as err:
        dbx.files_upload_session_finish(b"", cursor(sid, 4), files.CommitInfo("/full"))
    assert err.value.error.get_lookup_failed().get_incorrect_offset().correct_offset == 14
    assert dbx.files_upload_session_finish(b"", cursor(sid, 14), files.CommitInfo("/full")).size == 14
    assert server.read_file("/full") == b"abcdefghijklmn"
    # The same through fault injection, refused with too_many_write_operations (409).
    server.set_faults(fail_nth=[FailRule("files/upload_session/finish", 1, 409,
                                         {".tag": "too_many_write_operations"}, at_commit=True)])
    sid = dbx.files_upload_session_start(b"12").session_id
    with pytest.raises(ApiError) as err:
        dbx.files_upload_session_finish(b"34", cursor(sid, 2), files.CommitInfo("/busy"))
    assert err.value.error.is_too_many_write_operations()
    assert server.calls("files/upload_session/finish")[-1]["fault"].startswith("fail_nth")
    assert dbx.files_upload_session_finish(b"", cursor(sid, 4), files.CommitInfo("/busy")).size == 4


def test_payload_and_file_size_limits(tmp_path):
    with DropboxTestServer(tmp_path / "srv", max_file_size=6 * MiB) as server:
        dbx = server.sdk_client(max_retries_on_error=0)
        sid = dbx.files_upload_session_start(data_of(4 * MiB)).session_id
        with pytest.raises(ApiError) as err:
            dbx.files_upload_session_append_v2(data_of(3 * MiB), cursor(sid, 4 * MiB))
        assert err.value.error.is_too_large()
        with pytest.raises(ApiError) as err:
            dbx.files_upload(b"\0" * (150 * MiB + 1), "/huge")
        assert err.value.error.is_payload_too_large()
        assert server.files() == {}


def test_session_lifetime(server, dbx):
    sid = dbx.files_upload_session_start(b"abc").session_id
    server.age_sessions(7 * 24 * 3600 + 1)
    with pytest.raises(ApiError) as err:
        dbx.files_upload_session_append_v2(b"def", cursor(sid, 3))
    assert err.value.error.is_not_found()


def test_transport_limit_returns_403(server, dbx):
    server.set_faults(transport_limit=True)
    with pytest.raises(ApiError) as err:
        dbx.files_upload(b"x", "/t")
    assert err.value.error.is_other()     # how the SDK decodes invalid_account_type here
    rec = server.calls("files/upload")[-1]
    assert rec["status"] == 403
    dbx.users_get_space_usage()           # non-upload routes still work
    server.set_faults()
    dbx.files_upload(b"x", "/t")


def test_team_space_and_path_root(tmp_path):
    with DropboxTestServer(tmp_path / "srv", team=True) as server:
        home = server.sdk_client()
        account = home.users_get_current_account()
        assert isinstance(account.root_info, common.TeamRootInfo)
        assert account.root_info.root_namespace_id == server.root_namespace_id
        assert account.root_info.home_path == "/Test User"
        home.files_upload(b"mine", "/notes.txt")
        team = home.with_path_root(common.PathRoot.root(account.root_info.root_namespace_id))
        team.files_upload(b"shared", "/Team Folder/data.bin")
        assert team.files_get_metadata("/test user/NOTES.txt").path_display == "/Test User/notes.txt"
        assert set(server.files()) == {"/Test User/notes.txt", "/Team Folder/data.bin"}
        assert [e.name for e in home.files_list_folder("").entries] == ["notes.txt"]
        wrong = home.with_path_root(common.PathRoot.root("12345"))
        with pytest.raises(PathRootError) as err:
            wrong.files_list_folder("")
        assert err.value.error.get_invalid_root().root_namespace_id == server.root_namespace_id
        usage = home.users_get_space_usage()
        assert usage.used == 4 and usage.allocation.get_team().used == 10


def test_restart_keeps_files_sessions_and_tokens(tmp_path):
    root = tmp_path / "srv"
    server = DropboxTestServer(root)
    port, token = server.port, server.access_token
    dbx = server.sdk_client(max_retries_on_error=0)
    dbx.files_upload(b"persist me", "/Keep/Me.txt")
    sid = dbx.files_upload_session_start(b"part one ").session_id
    server.stop()
    again = DropboxTestServer(root, port=port)
    try:
        assert again.access_token == token
        client = again.sdk_client(token, max_retries_on_error=0)
        assert client.files_get_metadata("/keep/me.txt").path_display == "/Keep/Me.txt"
        meta = client.files_upload_session_finish(b"part two", cursor(sid, 9),
                                                  files.CommitInfo("/joined.txt"))
        assert again.read_file("/joined.txt") == b"part one part two"
        assert meta.content_hash == content_hash(b"part one part two")
    finally:
        again.stop()
    # The request log is also on disk, one JSON object per request, across both runs.
    records = [json.loads(line) for line in (root / "requests.jsonl").read_text().splitlines()]
    assert [r["route"] for r in records] == [
        "files/upload", "files/upload_session/start", "files/get_metadata",
        "files/upload_session/finish"]
    assert records[-1]["session_id"] == sid and records[-1]["bytes_in"] == 8


def test_desktop_app_simulator(server, tmp_path):
    local = tmp_path / "Dropbox"
    (local / "batch1" / "sub").mkdir(parents=True)
    (local / "batch1" / "a.bin").write_bytes(data_of(300_000))
    (local / "batch1" / "sub" / "b.txt").write_bytes(b"bee")
    for ignored in ("desktop.ini", "Thumbs.db", ".DS_Store", "._.DS_Store", ".~partial.bin", "~$report.docx"):
        (local / "batch1" / ignored).write_bytes(b"ignore me")
    dbx = server.sdk_client()
    app = DesktopAppSimulator(server, local, "/", delay_s=0.2, throughput_bps=2_000_000)
    app.start()
    try:
        assert app.wait_idle(20)
        assert set(server.files()) == {"/batch1/a.bin", "/batch1/sub/b.txt"}
        meta = dbx.files_get_metadata("/batch1/a.bin")
        assert meta.content_hash == content_hash(data_of(300_000))
        # A temporary name renamed into place is uploaded complete.
        os.replace(local / "batch1" / ".~partial.bin", local / "batch1" / "partial.bin")
        # Stalled: nothing moves.
        app.stall()
        (local / "batch1" / "late.txt").write_bytes(b"late")
        assert not app.wait_idle(0.5)
        assert "/batch1/late.txt" not in server.files()
        app.resume()
        assert app.wait_idle(20)
        assert {"/batch1/late.txt", "/batch1/partial.bin"} <= set(server.files())
        # A corrupted upload: same size, different content hash.
        app.corrupt_next("batch1/c.bin")
        (local / "batch1" / "c.bin").write_bytes(b"corrupt-me please")
        assert app.wait_idle(20)
        meta = dbx.files_get_metadata("/batch1/c.bin")
        assert meta.size == len(b"corrupt-me please")
        assert meta.content_hash != content_hash(b"corrupt-me please")
        assert server.count_calls("files/upload") == 0   # the app is not API traffic
    finally:
        app.stop()
