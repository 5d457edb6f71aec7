"""The only module that talks to the Dropbox SDK.

It opens an authenticated client (refresh token, access token, team space, CA bundle, proxy),
makes the calls the stages need, and turns every SDK result into small dataclasses and every
SDK exception into one of the package's own errors, so the rest of the package never sees
`dropbox` types. The SDK's own retries stay on (429 with Retry-After, 5xx with backoff, token
refresh); what it does not retry (dropped connections, timeouts) surfaces as
`NetworkProblem`, which callers retry from the server's offset.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import dropbox
import requests
from dropbox import common, files, stone_serializers
from dropbox.exceptions import ApiError, AuthError as SdkAuthError, BadInputError, HttpError
from dropbox.exceptions import InternalServerError, PathRootError, RateLimitError

from .errors import ArchiveError, AuthError, FileProblem
from .logs import register_secret

USER_AGENT = "archive-big-data-dropbox/0.1"
# Upload requests carry up to 150 MiB; give slow links time to move one.
REQUEST_TIMEOUT_S = 600


# -- results ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteFile:
    path_display: str
    path_lower: str
    size: int
    content_hash: str | None
    client_modified: dt.datetime
    rev: str


@dataclass(frozen=True)
class RemoteFolder:
    path_display: str
    path_lower: str


@dataclass(frozen=True)
class SpaceUsage:
    used: int
    allocated: int | None  # None: no fixed allocation reported

    @property
    def free(self) -> int | None:
        return None if self.allocated is None else max(0, self.allocated - self.used)


@dataclass(frozen=True)
class Account:
    name: str
    email: str
    team_root: str | None  # root namespace id when the account has a team space
    home_namespace: str | None
    account_id: str = ""
    root_namespace: str = ""  # the namespace paths are relative to in this client (team space or home)


@dataclass(frozen=True)
class CommitRequest:
    """What finish/finish_batch needs to turn an upload session into a file."""

    session_id: str
    offset: int
    path: str
    client_modified: dt.datetime
    overwrite: bool = False
    autorename: bool = False


# -- errors ----------------------------------------------------------------------------------

class DropboxProblem(FileProblem):
    """Dropbox refused one file; the reason is in the message."""

    title = "Dropbox refused a file"


class RemoteConflict(DropboxProblem):
    title = "Already in Dropbox"


class IncorrectOffset(DropboxProblem):
    def __init__(self, message: str, correct_offset: int, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.correct_offset = correct_offset


class SessionGone(DropboxProblem):
    """The upload session expired, was closed or is unknown: start a new one."""


class SessionClosed(SessionGone):
    """The session is closed (`lookup_failed/closed`, or `closed` for an append): it takes no
    more data but may still be finished with an empty body at its full offset. A finish whose
    commit was refused leaves its closing bytes in the session this way (Dropbox API spec,
    UploadSessionFinishError.path: "Data has already been appended to the upload session.
    Please retry with empty data body and updated offset.")."""


class RangeNotSatisfiable(DropboxProblem):
    """A ranged download asked for bytes past the end of the file (it changed in Dropbox)."""


class ContentHashMismatch(DropboxProblem):
    title = "Corrupted transfer"


class InsufficientSpace(ArchiveError):
    title = "Dropbox is full"


class TransportLimit(ArchiveError):
    title = "Dropbox data-transport limit reached"


class NetworkProblem(ArchiveError):
    """A request did not complete (connection dropped, timeout, repeated 5xx): retry later."""

    title = "Network problem"


class RequestRefused(ArchiveError):
    """Dropbox, or a front end on the way to it, refused a request as it was made (HTTP 4xx
    without a Dropbox error body: 400 bad request, 413 too large, 431 header fields too large):
    the same request sent again gets the same answer, so it is not retried. Raised by the
    grouped small-file calls (session_start_batch, append_batch), whose callers then send
    smaller requests or one file at a time. `status`: the HTTP status."""

    title = "Dropbox refused the request"

    def __init__(self, message: str, status: int, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.status = status


class RateLimited(ArchiveError):
    title = "Dropbox asks to slow down"

    def __init__(self, message: str, retry_after: float, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


LOGIN_HINT = ("Log in again: run `python app.py --login` (or set DROPBOX_REFRESH_TOKEN and "
              "DROPBOX_APP_KEY). Nothing was deleted.")


def _tags(union: Any) -> tuple[list[str], Any]:
    """Walk a Stone union down to its innermost tag: (['path', 'conflict', 'file'], value)."""
    tags: list[str] = []
    value = union
    for _ in range(6):
        tag = getattr(value, "_tag", None)
        if tag is None:
            # files/upload's `path` error is a struct (UploadWriteFailed) whose `reason` is the
            # WriteError union: without this a conflict or a full Dropbox read as plain "path".
            reason = getattr(value, "reason", None)
            if getattr(reason, "_tag", None) is None:
                break
            value = reason
            continue
        tags.append(tag)
        value = getattr(value, "_value", None)
    return tags, value


_last_response = threading.local()


def _remember_response(response: requests.Response, *args: Any, **kwargs: Any) -> None:
    # The SDK decodes 403 bodies with the route's error type and loses Dropbox's reason;
    # keep the status and summary so the data-transport limit can be recognised.
    _last_response.status = response.status_code
    _last_response.summary = ""
    if response.status_code == 403:
        try:
            _last_response.summary = str(response.json().get("error_summary", ""))
        except ValueError:
            _last_response.summary = response.text[:200]


def _convert(exc: Exception, what: str, path: str | None) -> ArchiveError:
    paths = [path] if path else []
    if isinstance(exc, SdkAuthError):
        tags, _ = _tags(exc.error)
        reason = {"expired_access_token": "the access token has expired",
                  "invalid_access_token": "the token is invalid or was revoked",
                  "missing_scope": "the Dropbox app lacks a permission (scope) it needs; enable "
                                   "files.content.write, files.content.read and "
                                   "files.metadata.read in the app console"}.get(tags[0] if tags else "",
                                                                                "Dropbox refused the credentials")
        return AuthError(f"{reason}. {LOGIN_HINT}")
    if isinstance(exc, PathRootError):
        return NetworkProblem("the team space root changed; it is read again", paths=paths)
    if isinstance(exc, RateLimitError):
        return RateLimited(f"{what}: rate limited", retry_after=float(exc.backoff or 5), paths=paths)
    if isinstance(exc, InternalServerError):
        return NetworkProblem(f"{what}: Dropbox server error {exc.status_code}", paths=paths)
    if isinstance(exc, BadInputError):
        return DropboxProblem(f"{what}: Dropbox rejected the request ({exc.message})", paths=paths)
    if isinstance(exc, HttpError):
        return NetworkProblem(f"{what}: HTTP {exc.status_code}", paths=paths)
    if isinstance(exc, ApiError):
        if getattr(_last_response, "status", None) == 403:
            summary = getattr(_last_response, "summary", "")
            if "invalid_account_type" in summary or "transport" in summary:
                return TransportLimit("the Dropbox Business account has used its monthly "
                                      "data-transport calls (HTTP 403 invalid_account_type). "
                                      "Uploads continue by themselves when it resets.", paths=paths)
            return DropboxProblem(f"{what}: access denied by Dropbox ({summary})", paths=paths)
        tags, value = _tags(exc.error)
        joined = "/".join(tags)
        if "incorrect_offset" in tags:
            return IncorrectOffset(f"{what}: the server holds a different offset", paths=paths,
                                   correct_offset=int(value.correct_offset))
        if "insufficient_space" in tags:
            return InsufficientSpace("there is not enough space left in the Dropbox account", paths=paths)
        if any(t in tags for t in ("not_found", "closed", "not_closed")) and "lookup_failed" in tags or tags[:1] in (
                ["not_found"], ["closed"]) and what.startswith("upload session"):
            if "closed" in tags:
                return SessionClosed(f"{what}: upload session {joined}", paths=paths)
            return SessionGone(f"{what}: upload session {joined}", paths=paths)
        if "conflict" in tags:
            return RemoteConflict(f"{what}: a different item already exists at this Dropbox path",
                                  paths=paths)
        if "too_large" in tags:
            return DropboxProblem(f"{what}: the file is larger than Dropbox accepts in one upload "
                                  "session; lower fileSizeLimit_GB so it is split", paths=paths)
        if "payload_too_large" in tags:
            return DropboxProblem(f"{what}: one request was over 150 MiB; lower chunkSize_MB", paths=paths)
        if "content_hash_mismatch" in tags:
            return ContentHashMismatch(f"{what}: the bytes Dropbox received differ from the bytes sent "
                                       "(corrupted on the way); the chunk is sent again", paths=paths)
        if "too_many_write_operations" in tags:
            return RateLimited(f"{what}: too many writes at once", retry_after=2.0, paths=paths)
        if "disallowed_name" in tags or "malformed_path" in tags:
            return DropboxProblem(f"{what}: Dropbox does not accept this name ({joined}); rename it",
                                  paths=paths)
        return DropboxProblem(f"{what}: Dropbox answered {joined or exc.error}", paths=paths)
    if isinstance(exc, (requests.exceptions.RequestException, ConnectionError, TimeoutError)):
        return NetworkProblem(f"{what}: {type(exc).__name__}: {str(exc)[:200]}", paths=paths)
    raise exc


def _refusal(exc: Exception, what: str) -> ArchiveError:
    """`_convert`, except that a 4xx the SDK could not read as a Dropbox error (BadInputError for
    400, HttpError for 413, 431 and the like) is RequestRefused: a request refused for its shape
    (a Dropbox-API-Arg header over a front end's limit) is refused again when repeated, so
    retrying it as a network problem only stalls the run."""
    if type(exc) in (HttpError, BadInputError) and 400 <= exc.status_code < 500:
        body = exc.message if isinstance(exc, BadInputError) else exc.body
        detail = " ".join(str(body or "").split())[:200]
        return RequestRefused(f"{what}: HTTP {exc.status_code}" + (f" ({detail})" if detail else ""),
                              status=exc.status_code)
    return _convert(exc, what, None)


def append_batch_arg_bytes(session_ids: Sequence[str], lengths: Sequence[int], content_hash: str | None) -> int:
    """Bytes of the Dropbox-API-Arg header value of an append_batch closing these sessions (one
    entry per session, holding `lengths` bytes each, in order), as the SDK writes it: by its own
    serializer, so the count is exact (JSON with ASCII escapes, hence bytes = characters)."""
    entries = [files.UploadSessionAppendBatchArgEntry(cursor=files.UploadSessionCursor(session_id, 0),
                                                      length=length, close=True)
               for session_id, length in zip(session_ids, lengths)]
    arg = files.UploadSessionAppendBatchArg(entries=entries, content_hash=content_hash)
    return len(stone_serializers.json_encode(files.upload_session_append_batch.arg_type, arg))


def lookup_path(path: str) -> str:
    """The spelling to look an existing Dropbox path up with: Unicode NFC.

    Dropbox keeps a name in the form it was written (macOS and its desktop app write NFD), but
    indexes it lower-cased and NFC-normalised, and answers `not_found` to a lookup in another
    form (maestral PR #678, samschott/maestral: "Dropbox APIs will raise 'not found' errors when
    querying for a path with the wrong unicode normalisation"; seen in this project's issue 13).
    NFC finds the item whatever form it was stored in. Writes need no such care: Dropbox
    normalises the path it stores under."""
    return unicodedata.normalize("NFC", path)


def _to_remote(metadata: Any) -> RemoteFile | RemoteFolder | None:
    if isinstance(metadata, files.FileMetadata):
        return RemoteFile(metadata.path_display, metadata.path_lower, metadata.size,
                          metadata.content_hash, metadata.client_modified, metadata.rev)
    if isinstance(metadata, files.FolderMetadata):
        return RemoteFolder(metadata.path_display, metadata.path_lower)
    return None


def whole_seconds(moment: dt.datetime) -> dt.datetime:
    """Dropbox keeps client_modified to the second (UTC, naive)."""
    return moment.replace(microsecond=0, tzinfo=None)


def mtime_to_client_modified(mtime: float) -> dt.datetime:
    return whole_seconds(dt.datetime.fromtimestamp(int(mtime), dt.timezone.utc))


# -- credentials -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    """How to authenticate; `where` says where they came from, never the token itself."""

    refresh_token: str | None = None
    app_key: str | None = None
    app_secret: str | None = None
    access_token: str | None = None
    where: str = ""

    def __post_init__(self) -> None:
        for secret in (self.refresh_token, self.app_secret, self.access_token):
            register_secret(secret)


# -- streamed request bodies ---------------------------------------------------------------

class StreamedBody(bytes):
    """An upload request's body of `length` bytes that is read while it is sent, piece by piece,
    instead of being held in memory whole. Subclasses implement `pieces()`.

    The SDK takes only `bytes` as a body: it refuses streams because one consumed by a failed
    attempt cannot be sent again. So this is a `bytes` (empty: its own bytes are never sent) that
    the client's session replaces, at every send, with a fresh pass of `pieces()`: each attempt
    - the SDK's own retries of 5xx and expired tokens, and ours after a dropped connection -
    sends the body again from its first byte. Requests carrying one must give its content hash
    (the SDK would otherwise hash the empty placeholder); Dropbox refuses the request
    (`content_hash_mismatch`) when the bytes sent are not those hashed."""

    length: int

    def __new__(cls, length: int):
        body = super().__new__(cls)
        body.length = length
        return body

    def __len__(self) -> int:
        return self.length

    def pieces(self) -> Iterator[bytes | memoryview]:
        """The body's bytes in order, exactly `length` of them, each piece only valid until the
        next is asked for. Must raise, never end early: a body shorter than its Content-Length
        would leave the server waiting for the rest. What it raises reaches the caller of the
        request unchanged, so it must not be an OSError (urllib3 would take that for a broken
        connection)."""
        raise NotImplementedError


class _SentPieces:
    """One sending of a StreamedBody, as `requests` streams an iterable of known length (its
    Content-Length): at most `length` bytes, and an error rather than fewer."""

    def __init__(self, body: StreamedBody):
        self._body = body

    def __len__(self) -> int:
        return self._body.length

    def __iter__(self) -> Iterator[bytes | memoryview]:
        sent = 0
        for piece in self._body.pieces():
            sent += len(piece)
            if sent > self._body.length:
                raise ValueError(f"a streamed body yielded more than its {self._body.length} bytes")
            yield piece
        if sent != self._body.length:
            raise ValueError(f"a streamed body yielded {sent} of its {self._body.length} bytes")


def _needs_hash(data: bytes, content_hash: str | None) -> None:
    if isinstance(data, StreamedBody) and data.length and content_hash is None:
        raise ValueError("a streamed request body needs its content hash")


class _CaBundleSession(requests.Session):
    """`requests` lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE replace an explicit CA bundle;
    a lab that sets `caBundle` must win over whatever the machine's environment says.
    Also sends a StreamedBody as its pieces, afresh on every attempt."""

    forced_ca_bundle: str | None = None

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[override]
        merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if self.forced_ca_bundle:
            merged["verify"] = self.forced_ca_bundle
        return merged

    def request(self, method, url, *args: Any, **kwargs: Any):  # type: ignore[override]
        if isinstance(kwargs.get("data"), StreamedBody):
            body = kwargs["data"]
            kwargs["data"] = _SentPieces(body) if body.length else b""
        return super().request(method, url, *args, **kwargs)


def _make_session(max_connections: int, ca_bundle: str | None, proxy: str | None) -> requests.Session:
    pinned = dropbox.create_session(max_connections=max_connections, ca_certs=ca_bundle)
    session = _CaBundleSession()
    session.forced_ca_bundle = ca_bundle
    session.verify = ca_bundle or True
    for prefix, adapter in pinned.adapters.items():
        session.mount(prefix, adapter)
    if proxy:
        session.proxies = {"https": proxy, "http": proxy}
    session.hooks["response"].append(_remember_response)
    return session


# -- the client ------------------------------------------------------------------------------

class DropboxClient:
    """A thread-safe handle on one Dropbox account."""

    def __init__(self, credentials: Credentials, *, ca_bundle: str | None = None, proxy: str | None = None,
                 max_connections: int = 16, use_team_space: bool = True, timeout: float = REQUEST_TIMEOUT_S):
        self.credentials = credentials
        session = _make_session(max_connections, ca_bundle, proxy)
        try:
            self._dbx = dropbox.Dropbox(
                oauth2_access_token=credentials.access_token,
                oauth2_refresh_token=credentials.refresh_token,
                app_key=credentials.app_key,
                app_secret=credentials.app_secret,
                session=session,
                timeout=timeout,
                user_agent=USER_AGENT,
                max_retries_on_error=4,
                max_retries_on_rate_limit=None,
            )
        except dropbox.exceptions.BadInputException as exc:
            raise AuthError(f"the Dropbox credentials are incomplete ({exc}). {LOGIN_HINT}") from None
        self._use_team_space = use_team_space
        self.account: Account | None = None

    def _call(self, what: str, path: str | None, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - converted or re-raised by _convert
            raise _convert(exc, what, path) from None

    # account --------------------------------------------------------------------------------

    def connect(self) -> Account:
        """Check the credentials now and switch to the team space when there is one."""
        info = self._call("checking the Dropbox account", None, self._dbx.users_get_current_account)
        team_root = None
        root_info = info.root_info
        if isinstance(root_info, common.TeamRootInfo) or (
                getattr(root_info, "root_namespace_id", None) != getattr(root_info, "home_namespace_id", None)):
            team_root = root_info.root_namespace_id
        home = getattr(root_info, "home_namespace_id", None)
        use_team = bool(team_root and self._use_team_space)
        self.account = Account(info.name.display_name, info.email, team_root, home, account_id=info.account_id,
                               root_namespace=str(team_root if use_team else home or ""))
        if use_team:
            self._dbx = self._dbx.with_path_root(common.PathRoot.root(team_root))
        return self.account

    def space_usage(self) -> SpaceUsage:
        usage = self._call("reading the Dropbox space usage", None, self._dbx.users_get_space_usage)
        allocation = usage.allocation
        allocated: int | None = None
        if allocation.is_individual():
            allocated = allocation.get_individual().allocated
        elif allocation.is_team():
            team = allocation.get_team()
            allocated = team.allocated
            used = team.used
            member_limit = getattr(team, "user_within_team_space_allocated", 0) or 0
            if member_limit:
                return SpaceUsage(usage.used, min(allocated - used + usage.used, member_limit))
            return SpaceUsage(used, allocated)
        return SpaceUsage(usage.used, allocated)

    # metadata -------------------------------------------------------------------------------

    def metadata(self, path: str) -> RemoteFile | RemoteFolder | None:
        try:
            result = self._dbx.files_get_metadata(lookup_path(path))
        except ApiError as exc:
            tags, _ = _tags(exc.error)
            if tags[:2] == ["path", "not_found"]:
                return None
            raise _convert(exc, "reading Dropbox metadata", path) from None
        except Exception as exc:  # noqa: BLE001
            raise _convert(exc, "reading Dropbox metadata", path) from None
        return _to_remote(result)

    def list_files(self, folder: str) -> dict[str, RemoteFile]:
        """Every file below `folder` (recursive), by lower-case path; empty when it is missing."""
        return {remote.path_lower: remote for remote in self.iter_entries_or_empty(folder)
                if isinstance(remote, RemoteFile)}

    def iter_entries_or_empty(self, folder: str, *, recursive: bool = True) -> Iterator[RemoteFile | RemoteFolder]:
        """iter_entries, but a folder that is missing (or is a file) lists as empty; `recursive`
        False lists only what is directly inside it (files/list_folder, recursive=false)."""
        try:
            page = self._dbx.files_list_folder("" if folder == "/" else lookup_path(folder), recursive=recursive,
                                               limit=2000)
        except ApiError as exc:
            tags, _ = _tags(exc.error)
            if "not_found" in tags or "not_folder" in tags:
                return
            raise _convert(exc, "listing a Dropbox folder", folder) from None
        except Exception as exc:  # noqa: BLE001
            raise _convert(exc, "listing a Dropbox folder", folder) from None
        while True:
            for entry in page.entries:
                remote = _to_remote(entry)
                if remote is not None:
                    yield remote
            if not page.has_more:
                return
            page = self._call("listing a Dropbox folder", folder, self._dbx.files_list_folder_continue,
                              page.cursor)

    def iter_entries(self, folder: str) -> Iterator[RemoteFile | RemoteFolder]:
        """Every file and folder below `folder`, recursive, as Dropbox lists them."""
        page = self._call("listing a Dropbox folder", folder, self._dbx.files_list_folder,
                          "" if folder == "/" else lookup_path(folder), recursive=True, limit=2000)
        while True:
            for entry in page.entries:
                remote = _to_remote(entry)
                if remote is not None:
                    yield remote
            if not page.has_more:
                return
            page = self._call("listing a Dropbox folder", folder, self._dbx.files_list_folder_continue,
                              page.cursor)

    # uploads --------------------------------------------------------------------------------

    @staticmethod
    def _commit_info(request: CommitRequest) -> files.CommitInfo:
        mode = files.WriteMode.overwrite if request.overwrite else files.WriteMode.add
        return files.CommitInfo(path=request.path, mode=mode, autorename=request.autorename,
                                client_modified=whole_seconds(request.client_modified), mute=True,
                                strict_conflict=False)

    def session_start(self, data: bytes, *, close: bool = False, concurrent: bool = False,
                      path: str | None = None, content_hash: str | None = None) -> str:
        """`content_hash` of `data`, when the caller has it, spares the SDK hashing it again;
        `data` may be a StreamedBody, which needs it. The same holds for session_append and
        session_finish."""
        _needs_hash(data, content_hash)
        session_type = files.UploadSessionType.concurrent if concurrent else None
        result = self._call("upload session start", path, self._dbx.files_upload_session_start, data,
                            close=close, session_type=session_type, content_hash=content_hash)
        return result.session_id

    def _call_refusable(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - converted or re-raised by _refusal
            raise _refusal(exc, what) from None

    def session_start_batch(self, count: int) -> list[str]:
        """Open `count` (at most 1000) sequential sessions in one request. RequestRefused when
        Dropbox or a front end refuses the request itself."""
        result = self._call_refusable("upload session start", self._dbx.files_upload_session_start_batch, count)
        return list(result.session_ids)

    def append_batch(self, pieces: Sequence[tuple[str, int, str]], body: bytes,
                     content_hash: str) -> list[ArchiveError | None]:
        """Send several sessions' whole contents in one request and close them: `pieces` are
        (session id, length, Dropbox path) in the order of `body`; one outcome per piece, None
        when it arrived. RequestRefused when Dropbox or a front end refuses the request itself
        (its header is append_batch_arg_bytes of the pieces); nothing was appended then."""
        entries = [files.UploadSessionAppendBatchArgEntry(cursor=files.UploadSessionCursor(session_id, 0),
                                                          length=length, close=True)
                   for session_id, length, _ in pieces]
        result = self._call_refusable("upload session append", self._dbx.files_upload_session_append_batch,
                                      body, entries, content_hash=content_hash)
        outcomes: list[ArchiveError | None] = []
        for (_, _, path), entry in zip(pieces, result.entries):
            if entry.is_success():
                outcomes.append(None)
            else:
                error = ApiError(None, entry.get_failure(), None, None)
                _last_response.status = 200
                outcomes.append(_convert(error, "upload session append", path))
        return outcomes

    def session_append(self, session_id: str, offset: int, data: bytes, *, close: bool = False,
                       path: str | None = None, content_hash: str | None = None) -> None:
        _needs_hash(data, content_hash)
        cursor = files.UploadSessionCursor(session_id=session_id, offset=offset)
        self._call("upload session append", path, self._dbx.files_upload_session_append_v2, data, cursor,
                   close=close, content_hash=content_hash)

    def session_finish(self, request: CommitRequest, data: bytes = b"", content_hash: str | None = None) -> RemoteFile:
        _needs_hash(data, content_hash)
        cursor = files.UploadSessionCursor(session_id=request.session_id, offset=request.offset)
        result = self._call("upload session finish", request.path, self._dbx.files_upload_session_finish,
                            data, cursor, self._commit_info(request), content_hash=content_hash)
        return _to_remote(result)  # type: ignore[return-value]

    def finish_batch(self, requests_: Sequence[CommitRequest]) -> list[RemoteFile | ArchiveError]:
        """Commit up to 1000 closed sessions in one call; one result per entry, in order."""
        entries = [files.UploadSessionFinishArg(
            cursor=files.UploadSessionCursor(session_id=r.session_id, offset=r.offset),
            commit=self._commit_info(r)) for r in requests_]
        result = self._call("batch commit", None, self._dbx.files_upload_session_finish_batch_v2, entries)
        outcomes: list[RemoteFile | ArchiveError] = []
        for request, entry in zip(requests_, result.entries):
            if entry.is_success():
                outcomes.append(_to_remote(entry.get_success()))  # type: ignore[arg-type]
            else:
                error = ApiError(None, entry.get_failure(), None, None)
                _last_response.status = 200
                outcomes.append(_convert(error, "batch commit", request.path))
        return outcomes

    def upload(self, data: bytes, request: CommitRequest) -> RemoteFile:
        """One small file in one request."""
        mode = files.WriteMode.overwrite if request.overwrite else files.WriteMode.add
        result = self._call("upload", request.path, self._dbx.files_upload, data, request.path, mode=mode,
                            autorename=request.autorename,
                            client_modified=whole_seconds(request.client_modified), mute=True)
        return _to_remote(result)  # type: ignore[return-value]

    def create_folder(self, path: str) -> None:
        try:
            self._dbx.files_create_folder_v2(path)
        except ApiError as exc:
            tags, _ = _tags(exc.error)
            if "conflict" in tags:
                return
            raise _convert(exc, "creating a Dropbox folder", path) from None
        except Exception as exc:  # noqa: BLE001
            raise _convert(exc, "creating a Dropbox folder", path) from None

    def delete(self, path: str) -> None:
        self._call("deleting from Dropbox", path, self._dbx.files_delete_v2, lookup_path(path))

    # downloads ------------------------------------------------------------------------------

    def download_to(self, path: str, local: os.PathLike | str) -> RemoteFile:
        """The whole file at `path` written to `local` (created or replaced) in download_range's
        pieces, so memory stays at one piece; its metadata. Raises as download_range does; a
        partly written `local` is the caller's to discard."""
        remote, chunks = self.download_range(path, 0, None)
        with open(local, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
        return remote

    def download_range(self, path: str, start: int = 0, end: int | None = None,
                       chunk_size: int = 8 * 1024 * 1024) -> tuple[RemoteFile, Iterator[bytes]]:
        """Metadata and the bytes [start, end) of a file (end None: to the end of the file).

        The iterator yields exactly those bytes or raises: `NetworkProblem` when the connection
        ends early (the caller continues from the bytes it already has), `RangeNotSatisfiable`
        when the file is now shorter than `start`. A server may ignore the Range header and send
        the whole file (RFC 9110 allows it); the bytes before `start` are then read and dropped
        so the caller never writes them twice.
        """
        headers = {}
        ranged = bool(start) or end is not None
        if ranged:
            headers["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
        try:
            metadata, response = self._dbx.request(files.download, "files", files.DownloadArg(path=lookup_path(path)), None,
                                                   extra_headers=headers or None)
        except HttpError as exc:
            if exc.status_code == 416:
                raise RangeNotSatisfiable(f"download: {path} is now shorter than {start:,} bytes "
                                          "(it changed in Dropbox)", paths=[path]) from None
            raise _convert(exc, "download", path) from None
        except Exception as exc:  # noqa: BLE001 - converted or re-raised by _convert
            raise _convert(exc, "download", path) from None
        remote = _to_remote(metadata)
        if not isinstance(remote, RemoteFile):
            response.close()
            raise DropboxProblem(f"download: {path} is not a file", paths=[path])
        skip = 0
        if ranged and response.status_code == 206:
            served = (response.headers.get("Content-Range") or "").split()[-1:]
            first = served[0].split("-", 1)[0] if served else ""
            if first.isdigit() and int(first) != start:
                response.close()
                raise NetworkProblem(f"download: asked for bytes from {start:,}, the server sent them from "
                                     f"{int(first):,}", paths=[path])
        elif ranged:
            skip = start  # the whole file came back
        wanted = max(0, (remote.size if end is None else min(end, remote.size)) - start)

        def chunks() -> Iterator[bytes]:
            to_skip, delivered = skip, 0
            try:
                with response:
                    for chunk in response.iter_content(chunk_size):
                        if to_skip:
                            if len(chunk) <= to_skip:
                                to_skip -= len(chunk)
                                continue
                            chunk, to_skip = chunk[to_skip:], 0
                        if delivered + len(chunk) > wanted:
                            chunk = chunk[:wanted - delivered]
                        if chunk:
                            delivered += len(chunk)
                            yield chunk
                        if delivered >= wanted:
                            break
            except ArchiveError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise _convert(exc, "download", path) from None
            if delivered < wanted:
                raise NetworkProblem(f"download: the connection ended after {delivered:,} of {wanted:,} bytes",
                                     paths=[path])

        return remote, chunks()


# -- logging in ------------------------------------------------------------------------------

def start_login(app_key: str) -> tuple[str, Any]:
    """Begin the PKCE flow: the URL for the user to open, and the flow to finish with the code."""
    flow = dropbox.DropboxOAuth2FlowNoRedirect(app_key, use_pkce=True, token_access_type="offline")
    return flow.start(), flow


def finish_login(flow: Any, code: str, *, ca_bundle: str | None = None, proxy: str | None = None) -> Credentials:
    """Exchange the code the user pasted for a refresh token. The token endpoint answers a
    refused code with HTTP 400 and `{"error": "invalid_grant"}` (RFC 6749 section 5.2; Dropbox's
    codes are single-use and expire after 10 minutes, per its OAuth guide): that is the user's
    code, not the network."""
    flow.requests_session = _make_session(2, ca_bundle, proxy)
    try:
        result = flow.finish(code.strip())
    except Exception as exc:  # noqa: BLE001
        if _oauth_error(exc) == "invalid_grant":
            raise AuthError("the code was not accepted (wrong, already used, or older than 10 minutes): run "
                            "`python app.py --login` again and paste the new code.") from None
        if _oauth_error(exc) == "invalid_client":
            raise AuthError("Dropbox does not know that app key: check appKey (the App key in the Dropbox App "
                            "Console), then run `python app.py --login` again.") from None
        if isinstance(exc, requests.exceptions.RequestException):
            raise _convert(exc, "logging in", None) from None
        raise AuthError(f"Dropbox did not accept that code ({type(exc).__name__}). Run "
                        "`python app.py --login` again and paste the new code.") from None
    return Credentials(refresh_token=result.refresh_token, app_key=flow.consumer_key,
                       where="login")


def _oauth_error(exc: Exception) -> str | None:
    """The `error` field of an OAuth token endpoint's 400 answer, or None."""
    response = getattr(exc, "response", None)
    if getattr(response, "status_code", None) != 400:
        return None
    try:
        return response.json().get("error")
    except (ValueError, AttributeError):
        return None

