"""The SDK error mapping (dropbox_client._convert), in this process: real `dropbox` exception
objects holding real route error unions go in, and the package's own error class and message
come out. One test per branch of _convert; the transfers that depend on each class (retry,
pause, resume, report) are tested against the local server elsewhere."""

from __future__ import annotations

import pytest
import requests
from dropbox import auth, files
from dropbox.exceptions import (ApiError, AuthError as SdkAuthError, BadInputError, HttpError, InternalServerError,
                                PathRootError, RateLimitError)

from archive_dropbox import dropbox_client as dc
from archive_dropbox.errors import AuthError

PATH = "/Team/data/big.mrc"


@pytest.fixture(autouse=True)
def no_remembered_403():
    # _convert reads the last HTTP status this thread saw (set by a response hook): start clean.
    dc._last_response.status = 200
    dc._last_response.summary = ""
    yield
    dc._last_response.status = 200
    dc._last_response.summary = ""


def convert(exc: Exception, what: str = "upload session finish", path: str | None = PATH):
    return dc._convert(exc, what, path)


def api_error(route_error) -> ApiError:
    return ApiError("request-id", route_error, None, None)


def exactly(error, cls):
    assert type(error) is cls, f"{type(error).__name__}: {error}"
    return error


# -- authentication ---------------------------------------------------------------------------

@pytest.mark.parametrize("reason, expected", [
    (auth.AuthError.expired_access_token, "the access token has expired"),
    (auth.AuthError.invalid_access_token, "the token is invalid or was revoked"),
    (auth.AuthError.missing_scope(auth.TokenScopeError(required_scope="files.content.write")),
     "the Dropbox app lacks a permission (scope) it needs; enable files.content.write, "
     "files.content.read and files.metadata.read in the app console"),
    (auth.AuthError.user_suspended, "Dropbox refused the credentials"),
])
def test_auth_errors_stop_the_run_with_the_reason_and_how_to_log_in_again(reason, expected):
    error = exactly(convert(SdkAuthError("request-id", reason)), AuthError)
    assert error.message == f"{expected}. {dc.LOGIN_HINT}"
    assert "python app.py --login" in error.message and "Nothing was deleted" in error.message
    assert error.paths == []  # about the account, not the file


# -- HTTP-level errors ------------------------------------------------------------------------

def test_a_changed_team_space_root_is_retried_as_a_network_problem():
    error = exactly(convert(PathRootError("request-id", None)), dc.NetworkProblem)
    assert error.message == "the team space root changed; it is read again"
    assert error.paths == [PATH]


@pytest.mark.parametrize("backoff, wait", [(17, 17.0), (1, 1.0), (None, 5.0)])
def test_rate_limits_carry_retry_after_or_five_seconds(backoff, wait):
    # backoff: the SDK's reading of the Retry-After header (None without one)
    reason = auth.RateLimitError(reason=auth.RateLimitReason.too_many_requests, retry_after=backoff or 1)
    error = exactly(convert(RateLimitError("request-id", reason, backoff), "upload session append"), dc.RateLimited)
    assert error.retry_after == wait
    assert error.message == "upload session append: rate limited"
    assert error.paths == [PATH]


@pytest.mark.parametrize("status", [500, 503, 504])
def test_dropbox_server_errors_are_network_problems_naming_the_status(status):
    error = exactly(convert(InternalServerError("request-id", status, "oops"), "download"), dc.NetworkProblem)
    assert error.message == f"download: Dropbox server error {status}"


def test_bad_input_is_a_refusal_of_this_file_quoting_dropbox():
    text = "Error in call to API function \"files/upload\": HTTP header \"Dropbox-API-Arg\": bad path"
    error = exactly(convert(BadInputError("request-id", text), "upload"), dc.DropboxProblem)
    assert error.message == f"upload: Dropbox rejected the request ({text})"
    assert error.paths == [PATH]


@pytest.mark.parametrize("status", [400, 413, 431])
def test_other_http_statuses_are_network_problems_naming_the_status(status):
    # 431: request headers too large (a huge Dropbox-API-Arg); 413: body too large for a proxy;
    # a plain 400 (without the SDK's BadInputError text) is what a broken proxy answers.
    error = exactly(convert(HttpError("request-id", status, "body"), "upload session append"), dc.NetworkProblem)
    assert error.message == f"upload session append: HTTP {status}"


# -- transport errors -------------------------------------------------------------------------

@pytest.mark.parametrize("exc", [
    requests.exceptions.ConnectionError("Connection aborted: RemoteDisconnected"),
    requests.exceptions.ReadTimeout("Read timed out. (read timeout=600)"),
    requests.exceptions.ConnectTimeout("timed out"),
    requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead"),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError("timed out"),
])
def test_dropped_connections_and_timeouts_are_network_problems_naming_the_exception(exc):
    error = exactly(convert(exc, "download"), dc.NetworkProblem)
    assert error.message == f"download: {type(exc).__name__}: {exc}"
    assert error.paths == [PATH]


def test_a_long_transport_message_is_cut_to_200_characters():
    error = convert(requests.exceptions.ConnectionError("x" * 5000), "download")
    assert error.message == "download: ConnectionError: " + "x" * 200


def test_anything_else_is_a_bug_and_is_raised_unchanged():
    bug = ValueError("not an SDK error")
    with pytest.raises(ValueError) as raised:
        convert(bug)
    assert raised.value is bug


def test_no_path_means_no_paths():
    assert convert(TimeoutError("t"), "listing", None).paths == []


# -- route errors: upload sessions ------------------------------------------------------------

def test_incorrect_offset_carries_the_offset_the_server_holds():
    for route_error in (files.UploadSessionAppendError.incorrect_offset(files.UploadSessionOffsetError(8388608)),
                        files.UploadSessionFinishError.lookup_failed(
                            files.UploadSessionLookupError.incorrect_offset(files.UploadSessionOffsetError(8388608)))):
        error = exactly(convert(api_error(route_error), "upload session append"), dc.IncorrectOffset)
        assert error.correct_offset == 8388608
        assert error.message == "upload session append: the server holds a different offset"
        assert error.paths == [PATH]


@pytest.mark.parametrize("route_error, cls, joined", [
    (files.UploadSessionFinishError.lookup_failed(files.UploadSessionLookupError.not_found),
     dc.SessionGone, "lookup_failed/not_found"),
    (files.UploadSessionFinishError.lookup_failed(files.UploadSessionLookupError.not_closed),
     dc.SessionGone, "lookup_failed/not_closed"),
    (files.UploadSessionFinishError.lookup_failed(files.UploadSessionLookupError.closed),
     dc.SessionClosed, "lookup_failed/closed"),
])
def test_a_lost_or_closed_session_at_commit(route_error, cls, joined):
    error = exactly(convert(api_error(route_error), "batch commit"), cls)
    assert error.message == f"batch commit: upload session {joined}"


@pytest.mark.parametrize("route_error, cls", [
    (files.UploadSessionAppendError.not_found, dc.SessionGone),
    (files.UploadSessionAppendError.closed, dc.SessionClosed),
    (files.UploadSessionLookupError.not_found, dc.SessionGone),
])
def test_a_lost_or_closed_session_while_appending(route_error, cls):
    error = exactly(convert(api_error(route_error), "upload session append"), cls)
    assert error.message == f"upload session append: upload session {route_error._tag}"


def test_a_bare_not_found_outside_upload_sessions_is_not_a_lost_session():
    error = exactly(convert(api_error(files.UploadSessionLookupError.not_found), "download"), dc.DropboxProblem)
    assert error.message == "download: Dropbox answered not_found"
    error = exactly(convert(api_error(files.ListFolderError.path(files.LookupError.not_found)),
                            "listing a Dropbox folder"), dc.DropboxProblem)
    assert error.message == "listing a Dropbox folder: Dropbox answered path/not_found"


@pytest.mark.parametrize("route_error", [
    files.UploadSessionAppendError.too_large,
    files.UploadSessionFinishError.lookup_failed(files.UploadSessionLookupError.too_large),
])
def test_a_session_over_dropbox_s_file_size_limit_says_to_lower_the_split_size(route_error):
    error = exactly(convert(api_error(route_error), "upload session append"), dc.DropboxProblem)
    assert error.message == ("upload session append: the file is larger than Dropbox accepts in one upload "
                             "session; lower fileSizeLimit_GB so it is split")


@pytest.mark.parametrize("route_error", [
    files.UploadSessionAppendError.payload_too_large,
    files.UploadSessionFinishError.payload_too_large,
    files.UploadError.payload_too_large,
])
def test_a_request_over_150_mib_says_to_lower_the_chunk_size(route_error):
    error = exactly(convert(api_error(route_error), "upload"), dc.DropboxProblem)
    assert error.message == "upload: one request was over 150 MiB; lower chunkSize_MB"


@pytest.mark.parametrize("route_error", [
    files.UploadSessionAppendError.content_hash_mismatch,
    files.UploadSessionFinishError.content_hash_mismatch,
    files.UploadSessionStartError.content_hash_mismatch,
    files.UploadError.content_hash_mismatch,
])
def test_a_content_hash_mismatch_is_a_corrupted_transfer_sent_again(route_error):
    error = exactly(convert(api_error(route_error), "upload session start"), dc.ContentHashMismatch)
    assert error.message == ("upload session start: the bytes Dropbox received differ from the bytes sent "
                             "(corrupted on the way); the chunk is sent again")
    assert error.title == "Corrupted transfer"


@pytest.mark.parametrize("route_error", [
    files.UploadSessionFinishError.too_many_write_operations,
    files.UploadSessionFinishError.path(files.WriteError.too_many_write_operations),
])
def test_too_many_writes_is_a_rate_limit_of_two_seconds(route_error):
    error = exactly(convert(api_error(route_error), "batch commit"), dc.RateLimited)
    assert error.retry_after == 2.0
    assert error.message == "batch commit: too many writes at once"


# -- route errors: the destination path -------------------------------------------------------

@pytest.mark.parametrize("route_error", [
    files.UploadSessionFinishError.path(files.WriteError.insufficient_space),
    # files/upload (split manifests) wraps the WriteError in a struct, UploadWriteFailed.
    files.UploadError.path(files.UploadWriteFailed(files.WriteError.insufficient_space, "session-id")),
])
def test_a_full_dropbox_pauses_the_run(route_error):
    error = exactly(convert(api_error(route_error), "upload"), dc.InsufficientSpace)
    assert error.message == "there is not enough space left in the Dropbox account"
    assert error.title == "Dropbox is full"
    assert not isinstance(error, dc.DropboxProblem)  # not a per-file failure: the run waits


@pytest.mark.parametrize("route_error", [
    files.UploadSessionFinishError.path(files.WriteError.conflict(files.WriteConflictError.file)),
    files.UploadSessionFinishError.path(files.WriteError.conflict(files.WriteConflictError.folder)),
    files.UploadError.path(files.UploadWriteFailed(files.WriteError.conflict(files.WriteConflictError.file),
                                                   "session-id")),
    files.CreateFolderError.path(files.WriteError.conflict(files.WriteConflictError.file)),
])
def test_a_different_item_at_the_path_is_a_conflict(route_error):
    error = exactly(convert(api_error(route_error), "upload"), dc.RemoteConflict)
    assert error.message == "upload: a different item already exists at this Dropbox path"
    assert error.title == "Already in Dropbox"


@pytest.mark.parametrize("route_error, joined", [
    (files.UploadSessionFinishError.path(files.WriteError.disallowed_name), "path/disallowed_name"),
    (files.UploadSessionFinishError.path(files.WriteError.malformed_path("bad")), "path/malformed_path"),
    (files.UploadError.path(files.UploadWriteFailed(files.WriteError.disallowed_name, "s")), "path/disallowed_name"),
])
def test_a_name_dropbox_refuses_says_to_rename_it(route_error, joined):
    error = exactly(convert(api_error(route_error), "batch commit"), dc.DropboxProblem)
    assert error.message == f"batch commit: Dropbox does not accept this name ({joined}); rename it"


@pytest.mark.parametrize("route_error, joined", [
    (files.UploadSessionFinishError.path(files.WriteError.no_write_permission), "path/no_write_permission"),
    (files.UploadSessionFinishError.path(files.WriteError.team_folder), "path/team_folder"),
    (files.DownloadError.unsupported_file, "unsupported_file"),
    (files.UploadSessionFinishError.concurrent_session_missing_data, "concurrent_session_missing_data"),
])
def test_any_other_route_error_is_a_refusal_of_this_file_naming_dropbox_s_tags(route_error, joined):
    error = exactly(convert(api_error(route_error), "batch commit"), dc.DropboxProblem)
    assert error.message == f"batch commit: Dropbox answered {joined}"
    assert error.paths == [PATH]


def test_an_error_without_tags_is_quoted_as_it_is():
    error = exactly(convert(api_error("something new"), "upload"), dc.DropboxProblem)
    assert error.message == "upload: Dropbox answered something new"


# -- HTTP 403: the SDK decodes it as a route error and loses the reason -----------------------

def remember_403(body: bytes) -> None:
    response = requests.Response()
    response.status_code = 403
    response._content = body
    dc._remember_response(response)


def test_the_data_transport_limit_is_recognised_from_the_remembered_403():
    remember_403(b'{"error_summary": "invalid_account_type/upload/..", "error": {".tag": "invalid_account_type"}}')
    route_error = files.UploadSessionFinishError.path(files.WriteError.no_write_permission)
    error = exactly(convert(api_error(route_error)), dc.TransportLimit)
    assert error.message == ("the Dropbox Business account has used its monthly data-transport calls "
                             "(HTTP 403 invalid_account_type). Uploads continue by themselves when it resets.")
    assert error.paths == [PATH]


def test_another_403_is_access_denied_quoting_dropbox_s_summary():
    remember_403(b'{"error_summary": "no_permission/..", "error": {".tag": "no_permission"}}')
    error = exactly(convert(api_error(files.UploadSessionFinishError.other), "upload"), dc.DropboxProblem)
    assert error.message == "upload: access denied by Dropbox (no_permission/..)"


def test_a_403_that_is_not_json_is_quoted_as_text():
    remember_403(b"<html>Forbidden by the proxy</html>")
    error = exactly(convert(api_error(files.UploadSessionFinishError.other), "upload"), dc.DropboxProblem)
    assert error.message == "upload: access denied by Dropbox (<html>Forbidden by the proxy</html>)"


def test_a_success_after_a_403_clears_it():
    remember_403(b'{"error_summary": "invalid_account_type/.."}')
    ok = requests.Response()
    ok.status_code = 200
    dc._remember_response(ok)
    error = exactly(convert(api_error(files.UploadSessionFinishError.other), "upload"), dc.DropboxProblem)
    assert error.message == "upload: Dropbox answered other"


# -- the login's token endpoint ---------------------------------------------------------------

def test_oauth_error_reads_the_error_field_of_a_400_only():
    def failure(status: int, body: bytes) -> requests.HTTPError:
        response = requests.Response()
        response.status_code = status
        response._content = body
        return requests.HTTPError("token endpoint", response=response)

    assert dc._oauth_error(failure(400, b'{"error": "invalid_grant"}')) == "invalid_grant"
    assert dc._oauth_error(failure(400, b"not json")) is None
    assert dc._oauth_error(failure(500, b'{"error": "invalid_grant"}')) is None
    assert dc._oauth_error(ValueError("no response")) is None
