"""API v2 route handlers of the Dropbox test server (test infrastructure only).

One job: implement each supported route on top of `storage.Store`, using the SDK's own Stone
route objects for argument, result and error types, and enforcing the upload-session rules
(offsets, closing, concurrent sessions' 4 MiB multiples, 150 MiB per request, file size and
session lifetime limits, content-hash checks). The HTTP layer (server.py) decodes the argument,
passes a `Call`, and encodes whatever comes back or is raised.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from dropbox import auth, files, team_common, team_policies, users, users_common

from .http_io import FileSliceBody
from .storage import (BLOCK, BadRequest, CursorReset, LookupFailure, SessionFailure,
                      WriteFailure, file_content_hash, root_info)

MAX_REQUEST_BYTES = 150 * 1024 * 1024   # Dropbox's per-request upload limit (150 MiB)


class RouteError(Exception):
    """HTTP 409 with a Stone error of the route's error type."""

    def __init__(self, error):
        super().__init__(error)
        self.error = error


class RateLimited(Exception):
    """HTTP 429 (reason tag: too_many_requests / too_many_write_operations)."""

    def __init__(self, reason: str = "too_many_write_operations", retry_after: Optional[int] = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


class CommitRefused(Exception):
    """An injected fault (FailRule.at_commit) answered in place of a commit; the server turns
    its `decision` into the response a fault before the body would get."""

    def __init__(self, decision):
        super().__init__(decision.label)
        self.decision = decision


@dataclass
class DownloadResult:
    metadata: Any
    blob: Path
    start: int
    length: int
    total: int
    partial: bool


@dataclass
class RouteSpec:
    url: str                 # "files/upload_session/append_v2"
    route: Any               # the SDK's stone_base.Route
    handler: Callable
    style: str               # rpc / upload / download


ROUTES: dict[str, RouteSpec] = {}


def handles(namespace: str, route):
    """Register a handler under the URL the SDK builds for `route` (name + "_vN" for N > 1)."""
    url = "%s/%s" % (namespace, route.name)
    if route.version > 1:
        url += "_v%d" % route.version

    def register(fn):
        ROUTES[url] = RouteSpec(url, route, fn, route.attrs.get("style") or "rpc")
        return fn
    return register


# --------------------------------------------------------------------------------------------
# Uploads

def _is_concurrent(session_type) -> bool:
    return session_type is not None and session_type.is_concurrent()


def _check_payload(call, error_cls) -> None:
    if call.body.length is not None and call.body.length > MAX_REQUEST_BYTES:
        raise RouteError(error_cls.payload_too_large)


def _receive(call, path: Path, offset: int, error_cls, content_hash: Optional[str]):
    """Stream the request body into `path` at `offset`; verify size limit and content hash."""
    result = call.body.consume(path, offset, limit=MAX_REQUEST_BYTES)
    if result.too_long:
        raise RouteError(error_cls.payload_too_large)
    if content_hash is not None and content_hash != result.content_hash:
        raise RouteError(error_cls.content_hash_mismatch)
    return result


def _commit(call, path: str, commit_info, blob: Path, size: int, content_hash: str) -> dict:
    """Commit under the namespace commit slot (Dropbox's per-namespace write lock)."""
    store = call.store
    try:
        lower, _ = store.resolve(path, call.root, for_write=True)
    except LookupFailure:
        raise WriteFailure(files.WriteError.malformed_path(None))
    if call.commit_fault is not None:
        raise CommitRefused(call.commit_fault)
    if lower in call.app.faults.corrupt_stored_paths and size > 0:
        with open(blob, "r+b") as fh:
            fh.seek(size // 2)
            byte = fh.read(1)
            fh.seek(size // 2)
            fh.write(bytes([byte[0] ^ 0xFF]))
        content_hash = file_content_hash(blob)
        call.rec["fault"] = "corrupt_stored"
    with call.commit_slot(lower):
        return store.commit_file(
            call.root, path, mode=commit_info.mode, autorename=commit_info.autorename,
            strict=commit_info.strict_conflict, client_modified=commit_info.client_modified,
            blob_src=blob, size=size, content_hash=content_hash, quota=call.quota())


@handles("files", files.upload)
def upload(call):
    arg = call.arg
    call.rec["path"] = arg.path
    _check_payload(call, files.UploadError)
    tmp = call.tmp_path()
    try:
        result = _receive(call, tmp, 0, files.UploadError, arg.content_hash)
        try:
            entry = _commit(call, arg.path, arg, tmp, result.nbytes, result.content_hash)
        except WriteFailure as failure:
            # Dropbox keeps the bytes in an upload session so the commit can be retried with
            # upload_session/finish; do the same.
            session = call.store.create_session("sequential", closed=True)
            os.replace(tmp, call.store.session_file(session))
            session["offset"] = result.nbytes
            call.store.record_blocks(session, 0, result.digests, result.nbytes)
            call.store.save_session(session)
            raise RouteError(files.UploadError.path(
                files.UploadWriteFailed(failure.error, session["id"])))
    finally:
        tmp.unlink(missing_ok=True)
    return call.store.to_metadata(entry, call.root)


@handles("files", files.upload_session_start)
def upload_session_start(call):
    arg, err = call.arg, files.UploadSessionStartError
    _check_payload(call, err)
    if _is_concurrent(arg.session_type):
        if call.body.length:
            raise RouteError(err.concurrent_session_data_not_allowed)
        if arg.close:
            raise RouteError(err.concurrent_session_close_not_allowed)
        if call.body.length is None and call.body.consume(None, 0).nbytes:
            raise RouteError(err.concurrent_session_data_not_allowed)
        session = call.store.create_session("concurrent")
    else:
        session = call.store.create_session("sequential")
        try:
            result = _receive(call, call.store.session_file(session), 0, err, arg.content_hash)
        except RouteError:
            call.store.drop_session(session["id"])
            raise
        session["offset"] = result.nbytes
        session["closed"] = bool(arg.close)
        call.store.record_blocks(session, 0, result.digests, result.nbytes)
        call.store.save_session(session)
    call.rec["session_id"] = session["id"]
    return files.UploadSessionStartResult(session["id"])


@handles("files", files.upload_session_start_batch)
def upload_session_start_batch(call):
    kind = "concurrent" if _is_concurrent(call.arg.session_type) else "sequential"
    ids = [call.store.create_session(kind)["id"] for _ in range(call.arg.num_sessions)]
    call.rec["entries"] = len(ids)
    return files.UploadSessionStartBatchResult(ids)


def _append(call, cursor, close: bool, content_hash: Optional[str]):
    err = files.UploadSessionAppendError
    call.rec["session_id"] = cursor.session_id
    _check_payload(call, err)
    store = call.store
    try:
        session = store.get_session(cursor.session_id, call.settings.session_lifetime_s)
        if session["type"] == "concurrent":
            return _append_concurrent(call, session, cursor.offset, close, content_hash)
        with store.session_lock(session["id"]):
            # Re-read under the lock: another request may have advanced the session meanwhile.
            session = store.get_session(cursor.session_id, call.settings.session_lifetime_s)
            if cursor.offset != session["offset"]:
                raise SessionFailure("incorrect_offset", session["offset"])
            if session["closed"]:
                raise SessionFailure("closed")
            if cursor.offset + (call.body.length or 0) > call.settings.max_file_size:
                raise SessionFailure("too_large")
            result = _receive(call, store.session_file(session), cursor.offset, err, content_hash)
            if cursor.offset + result.nbytes > call.settings.max_file_size:
                raise SessionFailure("too_large")
            with store.lock:
                session["offset"] = cursor.offset + result.nbytes
                session["closed"] = bool(close)
                store.record_blocks(session, cursor.offset, result.digests, result.nbytes)
                store.save_session(session)
    except SessionFailure as failure:
        raise RouteError(failure.as_union(err))
    return None


def _overlaps(chunks, start: int, end: int):
    for c_start, c_len in chunks:
        if start < c_start + c_len and c_start < end and (c_start, c_start + c_len) != (start, end):
            return True
    return False


def _append_concurrent(call, session, offset: int, close: bool, content_hash):
    err, store, length = files.UploadSessionAppendError, call.store, call.body.length
    if offset % BLOCK:
        raise SessionFailure("concurrent_session_invalid_offset")
    if length is not None and not close and length % BLOCK:
        raise SessionFailure("concurrent_session_invalid_data_size")
    # Once the closing append has arrived, nothing may start at or past the end, except an
    # identical re-send of a piece already recorded (a retry whose first answer was lost).
    resend = length is not None and [offset, length] in session["chunks"]
    if session["end"] is not None and offset >= session["end"] and not resend:
        raise SessionFailure("closed")
    if length is not None:
        if offset + length > call.settings.max_file_size:
            raise SessionFailure("too_large")
        with store.lock:
            if _overlaps(session["chunks"], offset, offset + length):
                raise SessionFailure("concurrent_session_invalid_offset")
    result = _receive(call, store.session_file(session), offset, err, content_hash)
    n = result.nbytes
    if not close and n % BLOCK:
        raise SessionFailure("concurrent_session_invalid_data_size")
    if offset + n > call.settings.max_file_size:
        raise SessionFailure("too_large")
    with store.lock:
        session = store.get_session(session["id"], call.settings.session_lifetime_s)
        chunks = session["chunks"]
        if _overlaps(chunks, offset, offset + n):
            raise SessionFailure("concurrent_session_invalid_offset")
        if close:
            if session["end"] is not None and session["end"] != offset + n:
                raise SessionFailure("closed")
            if any(c_start + c_len > offset + n for c_start, c_len in chunks):
                # The closing append must be the last piece of the file.
                raise SessionFailure("concurrent_session_invalid_offset")
            session["end"] = offset + n
        if [offset, n] not in chunks:
            chunks.append([offset, n])
        store.record_blocks(session, offset, result.digests, n)
        store.save_session(session)
    return None


@handles("files", files.upload_session_append_v2)
def upload_session_append_v2(call):
    arg = call.arg
    return _append(call, arg.cursor, arg.close, arg.content_hash)


@handles("files", files.upload_session_append)
def upload_session_append_v1(call):
    # v1's argument is the cursor itself; it cannot close the session or carry a hash.
    return _append(call, call.arg, False, None)


@handles("files", files.upload_session_append_batch)
def upload_session_append_batch(call):
    """Several sessions' pieces in one body: the body is checked as a whole (size, lengths,
    content hash), then each entry is appended under the rules of a single append, with its
    own result."""
    err, entry_err = files.UploadSessionAppendBatchError, files.UploadSessionAppendBatchEntryError
    _check_payload(call, err)
    spool = call.tmp_path()
    spool.parent.mkdir(parents=True, exist_ok=True)
    try:
        received = call.body.consume(spool, 0, limit=MAX_REQUEST_BYTES)
        if received.too_long:
            raise RouteError(err.payload_too_large)
        if sum(entry.length for entry in call.arg.entries) != received.nbytes:
            raise RouteError(err.length_mismatch)
        if call.arg.content_hash is not None and call.arg.content_hash != received.content_hash:
            raise RouteError(err.content_hash_mismatch)
        results, start, whole_body = [], 0, call.body
        try:
            for entry in call.arg.entries:
                call.body = FileSliceBody(spool, start, entry.length)
                start += entry.length
                try:
                    _append(call, entry.cursor, entry.close, None)
                except RouteError as failure:
                    tag, value = failure.error._tag, failure.error._value
                    error = (entry_err.incorrect_offset(value) if tag == "incorrect_offset"
                             else getattr(entry_err, tag, entry_err.other))
                    results.append(files.UploadSessionAppendBatchResultEntry.failure(error))
                else:
                    results.append(files.UploadSessionAppendBatchResultEntry.success)
        finally:
            call.body = whole_body
        call.rec["entries"] = len(results)
        call.rec.pop("session_id", None)
        return files.UploadSessionAppendBatchResult(results)
    finally:
        spool.unlink(missing_ok=True)


def _concurrent_complete(session) -> Optional[str]:
    """None when a concurrent session has all its bytes, else the lookup error tag."""
    if session["end"] is None:
        return "concurrent_session_not_closed"
    covered = 0
    for start, length in sorted(session["chunks"]):
        if start != covered:
            return "concurrent_session_missing_data"
        covered = start + length
    return None if covered == session["end"] else "concurrent_session_missing_data"


def _finish_one(call, finish_arg, *, batch: bool):
    """Finish one session (upload_session/finish or one finish_batch entry); returns the entry
    or raises RouteError(UploadSessionFinishError)."""
    err, store, cursor = files.UploadSessionFinishError, call.store, finish_arg.cursor
    lookup = files.UploadSessionLookupError
    settings = call.settings
    try:
        session = store.get_session(cursor.session_id, settings.session_lifetime_s)
    except SessionFailure as failure:
        raise RouteError(err.lookup_failed(failure.as_union(lookup)))
    with store.session_lock(session["id"]):
        try:
            session = store.get_session(cursor.session_id, settings.session_lifetime_s)
        except SessionFailure as failure:
            raise RouteError(err.lookup_failed(failure.as_union(lookup)))
        data_file = store.session_file(session)
        if session["type"] == "concurrent":
            if not batch and call.body.length:
                raise RouteError(err.concurrent_session_data_not_allowed)
            problem = _concurrent_complete(session)
            if problem == "concurrent_session_not_closed":
                raise RouteError(err.concurrent_session_not_closed)
            if problem:
                raise RouteError(err.concurrent_session_missing_data)
            if cursor.offset != session["end"]:
                raise RouteError(err.lookup_failed(lookup.incorrect_offset(
                    files.UploadSessionOffsetError(session["end"]))))
            if not batch and call.body.length is None and call.body.consume(None, 0).nbytes:
                raise RouteError(err.concurrent_session_data_not_allowed)
            total, tentative = session["end"], session
        else:
            if not batch and session["closed"] and call.body.length:
                # A closed session takes no more data, whatever the offset: the re-send of a
                # refused finish's closing bytes gets `closed` (issue 13, seen on Dropbox).
                raise RouteError(err.lookup_failed(lookup.closed))
            if cursor.offset != session["offset"]:
                raise RouteError(err.lookup_failed(lookup.incorrect_offset(
                    files.UploadSessionOffsetError(session["offset"]))))
            if batch and not session["closed"]:
                raise RouteError(err.lookup_failed(lookup.not_closed))
            tentative = dict(session, blocks=dict(session["blocks"]))
            total = session["offset"]
            if not batch:
                if cursor.offset + (call.body.length or 0) > settings.max_file_size:
                    raise RouteError(err.lookup_failed(lookup.too_large))
                # The final piece is written past the confirmed offset; it joins the session
                # only once the commit is attempted (below), so a request refused before that
                # (bad hash, too large) can be retried unchanged.
                result = _receive(call, data_file, cursor.offset, err, finish_arg.content_hash)
                if result.nbytes and session["closed"]:
                    raise RouteError(err.lookup_failed(lookup.closed))
                total = cursor.offset + result.nbytes
                if total > settings.max_file_size:
                    raise RouteError(err.lookup_failed(lookup.too_large))
                store.record_blocks(tentative, cursor.offset, result.digests, result.nbytes)
        with open(data_file, "r+b") as fh:
            fh.truncate(total)
        content_hash = store.session_content_hash(tentative, total)
        commit = finish_arg.commit
        call.rec["path"] = commit.path
        try:
            entry = _commit(call, commit.path, commit, data_file, total, content_hash)
        except (WriteFailure, CommitRefused) as failure:
            if session["type"] != "concurrent" and total != session["offset"]:
                # Dropbox keeps the closing bytes of a finish whose commit failed: "Data has
                # already been appended to the upload session. Please retry with empty data
                # body and updated offset." (UploadSessionFinishError.path, files.stone in the
                # Dropbox API spec / the SDK's files.py). For a refusal without a documented
                # rule (too_many_write_operations, 409 or 429) the same is assumed: the harder
                # case for a client, which must then finish empty at the full offset.
                with store.lock:
                    session.update(offset=total, closed=True, blocks=tentative["blocks"])
                    store.save_session(session)
            if isinstance(failure, CommitRefused):
                raise
            raise RouteError(err.path(failure.error))
        store.drop_session(session["id"])
        return entry


@handles("files", files.upload_session_finish)
def upload_session_finish(call):
    call.rec["session_id"] = call.arg.cursor.session_id
    _check_payload(call, files.UploadSessionFinishError)
    entry = _finish_one(call, call.arg, batch=False)
    return call.store.to_metadata(entry, call.root)


def _finish_batch(call):
    results = []
    # One commit slot for the whole batch: that is what batching buys against the lock.
    with call.commit_slot(None):
        for finish_arg in call.arg.entries:
            try:
                entry = _finish_one(call, finish_arg, batch=True)
            except RouteError as failure:
                results.append(files.UploadSessionFinishBatchResultEntry.failure(failure.error))
            else:
                results.append(files.UploadSessionFinishBatchResultEntry.success(
                    call.store.to_metadata(entry, call.root)))
    call.rec["entries"] = len(results)
    return files.UploadSessionFinishBatchResult(results)


@handles("files", files.upload_session_finish_batch_v2)
def upload_session_finish_batch_v2(call):
    return _finish_batch(call)


@handles("files", files.upload_session_finish_batch)
def upload_session_finish_batch_v1(call):
    # v1 is asynchronous on Dropbox; finishing synchronously and answering "complete" is one
    # of the answers Dropbox itself may give.
    return files.UploadSessionFinishBatchLaunch.complete(_finish_batch(call))


# --------------------------------------------------------------------------------------------
# Metadata, listing, folders, deletion

@handles("files", files.get_metadata)
def get_metadata(call):
    arg = call.arg
    call.rec["path"] = arg.path
    if arg.path == "":
        raise BadRequest("Error in call to API function \"files/get_metadata\": request body: "
                         "path: The root folder is unsupported.")
    try:
        entry = call.store.lookup(arg.path, call.root, allow_rev=True)
    except LookupFailure as failure:
        if arg.include_deleted and failure.error.is_not_found():
            lower, _ = call.store.resolve(arg.path, call.root)
            tomb = call.store.tombstones.get(lower)
            if tomb is not None:
                return call.store.deleted_metadata(tomb, call.root)
        raise RouteError(files.GetMetadataError.path(failure.error))
    return call.store.to_metadata(entry, call.root)


@handles("files", files.list_folder)
def list_folder(call):
    arg = call.arg
    call.rec["path"] = arg.path
    limit = arg.limit or call.settings.list_page_size
    try:
        entries, cursor, has_more = call.store.list_folder(call.root, arg.path, arg.recursive, limit)
    except LookupFailure as failure:
        raise RouteError(files.ListFolderError.path(failure.error))
    return files.ListFolderResult(entries, cursor, has_more)


@handles("files", files.list_folder_continue)
def list_folder_continue(call):
    try:
        entries, cursor, has_more = call.store.list_folder_continue(call.root, call.arg.cursor)
    except CursorReset:
        raise RouteError(files.ListFolderContinueError.reset)
    except LookupFailure as failure:
        raise RouteError(files.ListFolderContinueError.path(failure.error))
    return files.ListFolderResult(entries, cursor, has_more)


@handles("files", files.create_folder_v2)
def create_folder_v2(call):
    arg = call.arg
    call.rec["path"] = arg.path
    try:
        lower, _ = call.store.resolve(arg.path, call.root, for_write=True)
        with call.commit_slot(lower):
            entry = call.store.create_folder(call.root, arg.path, arg.autorename)
    except (WriteFailure, LookupFailure) as failure:
        error = failure.error if isinstance(failure, WriteFailure) else \
            files.WriteError.malformed_path(None)
        raise RouteError(files.CreateFolderError.path(error))
    return files.CreateFolderResult(call.store.to_metadata(entry, call.root))


@handles("files", files.delete_v2)
def delete_v2(call):
    arg = call.arg
    call.rec["path"] = arg.path
    try:
        lower, _ = call.store.resolve(arg.path, call.root)
        with call.commit_slot(lower):
            entry = call.store.delete(call.root, arg.path)
    except LookupFailure as failure:
        raise RouteError(files.DeleteError.path_lookup(failure.error))
    except WriteFailure as failure:
        raise RouteError(files.DeleteError.path_write(failure.error))
    return files.DeleteResult(call.store.to_metadata(entry, call.root))


# --------------------------------------------------------------------------------------------
# Download

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class Unsatisfiable(Exception):
    """HTTP 416 for a byte range outside the file."""

    def __init__(self, total: int):
        super().__init__(total)
        self.total = total


@handles("files", files.download)
def download(call):
    arg = call.arg
    path = arg.path if not arg.rev else "rev:" + arg.rev
    call.rec["path"] = path
    try:
        entry = call.store.lookup(path, call.root, allow_rev=True)
    except LookupFailure as failure:
        raise RouteError(files.DownloadError.path(failure.error))
    if entry["kind"] != "file":
        raise RouteError(files.DownloadError.path(files.LookupError.not_file))
    total = entry["size"]
    start, length, partial = 0, total, False
    spec = (call.headers.get("Range") or "").strip()
    match = _RANGE.match(spec) if spec else None
    # Malformed or multi-range headers are ignored (RFC 9110 allows serving the whole file);
    # so is any range on an empty file, which has no satisfiable range at all.
    if match and total > 0 and (match.group(1) or match.group(2)):
        first, last = match.group(1), match.group(2)
        if first:
            start = int(first)
            end = min(int(last), total - 1) if last else total - 1
            if start >= total or (last and int(last) < start):
                raise Unsatisfiable(total)
        else:
            suffix = int(last)
            if suffix == 0:
                raise Unsatisfiable(total)
            start, end = max(0, total - suffix), total - 1
        length, partial = end - start + 1, True
    return DownloadResult(call.store.to_metadata(entry, call.root), call.store.blob_path(entry),
                          start, length, total, partial)


# --------------------------------------------------------------------------------------------
# Account

def _first_void_tag(union_cls):
    for tag, validator in union_cls._tagmap.items():
        if tag != "other" and type(validator).__name__ == "Void":
            return getattr(union_cls, tag)
    raise AssertionError(union_cls)


def _team_info(store):
    # Stone insists on every policy being present; pick each union's first plain value.
    policies = team_policies.TeamSharingPolicies(**{
        name: _first_void_tag(validator.definition)
        for name, validator in team_policies.TeamSharingPolicies._all_fields_})
    return users.FullTeam(
        id=store.kv.get("team_id"), name="Test Team (Dropbox test server)",
        sharing_policies=policies,
        office_addin_policy=_first_void_tag(team_policies.OfficeAddInPolicy),
        top_level_content_policy=_first_void_tag(team_policies.TopLevelContentPolicy))


@handles("users", users.get_current_account)
def get_current_account(call):
    store = call.store
    name = call.settings.display_name
    given, _, surname = name.partition(" ")
    return users.FullAccount(
        account_id=store.account_id,
        name=users.Name(given_name=given, surname=surname or given, familiar_name=given,
                        display_name=name, abbreviated_name="".join(w[0] for w in name.split())),
        email=call.settings.email, email_verified=True, disabled=False, locale="en",
        referral_link="https://example.invalid/referrals/test-server", is_paired=False,
        account_type=(users_common.AccountType.business if store.team
                      else users_common.AccountType.pro),
        root_info=root_info(store),
        team=_team_info(store) if store.team else None,
        team_member_id=store.kv.get("team_member_id") if store.team else None)


@handles("users", users.get_space_usage)
def get_space_usage(call):
    store, quota = call.store, call.quota()
    with store.lock:
        if not store.team:
            return users.SpaceUsage(used=store.total_used, allocation=users.SpaceAllocation.individual(
                users.IndividualSpaceAllocation(allocated=quota.allocated)))
        home_used = store.used_under(store.home_root())
        limit_type = (team_common.MemberSpaceLimitType.stop_sync if quota.member_allocated
                      else team_common.MemberSpaceLimitType.off)
        return users.SpaceUsage(used=home_used, allocation=users.SpaceAllocation.team(
            users.TeamSpaceAllocation(
                used=store.total_used, allocated=quota.allocated,
                user_within_team_space_allocated=quota.member_allocated or 0,
                user_within_team_space_limit_type=limit_type,
                user_within_team_space_used_cached=home_used)))


@handles("auth", auth.token_revoke)
def token_revoke(call):
    call.revoke_current_token()
    return None

