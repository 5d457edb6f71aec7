"""HTTPS front end and public face of the Dropbox test server (TEST INFRASTRUCTURE, not Dropbox).

One job: serve the Dropbox API v2 wire protocol on 127.0.0.1 over TLS — route the request,
authenticate it, apply injected faults, decode the argument with the SDK's Stone serializers,
call the route handler, encode the answer (or Dropbox-shaped error), log it — and offer the
helpers tests use (`DropboxTestServer`).
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import itertools
import json
import secrets
import socket
import ssl
import sys
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable, Optional, Union
from urllib.parse import parse_qs, urlencode, urlsplit

from stone.backends.python_rsrc import stone_serializers, stone_validators

from . import faults as F
from .faults import FaultConfig, FaultInjector, Hold, SharedUplink, Throttle, UplinkThrottle
from .http_io import BadFraming, ClientGone, DropConnection, RequestBody
from .routes import (ROUTES, CommitRefused, DownloadResult, RateLimited, RouteError,
                     Unsatisfiable)
from .storage import (DEFAULT_DISALLOWED_NAMES, BadRequest, Quota, Root, Store,
                      file_content_hash, path_root_error, stored_key)
from .tls import ensure_certificate, server_context

SCOPES = ("account_info.read files.content.read files.content.write files.metadata.read "
          "files.metadata.write")
RPC_BODY_LIMIT = 16 * 1024 * 1024
# Bytes of a request's header section (request line and header lines, as sent) above which the
# server answers 431, as a front end does: Dropbox documents no limit; common front ends refuse
# 8-16 KiB (nginx's default large_client_header_buffers is 4 x 8 KiB). Python's http.server on
# its own refuses only a line over 65,536 bytes (or more than 100 headers), with 431 and no log.
HEADER_LIMIT = 16 * 1024
SEND_SLICE = 1 << 20
AUTH_CODE_LIFETIME_S = 600
_SERVER_DEFAULT = object()    # "use the server's configured value" (None has a meaning)


@dataclass
class Settings:
    token_lifetime_s: Optional[float] = 14_400
    session_lifetime_s: float = 7 * 24 * 3600
    max_file_size: int = 350 * 10 ** 9
    list_page_size: int = 500
    display_name: str = "Test User"
    email: str = "test.user@example.invalid"


@dataclass
class _Response:
    status: int
    headers: list = field(default_factory=list)
    body: bytes = b""
    file: Optional[tuple] = None     # (path, start, length) streamed after the headers

    @classmethod
    def json(cls, status: int, obj, headers=()):
        return cls(status, [("Content-Type", "application/json"), *headers],
                   json.dumps(obj).encode("utf-8"))

    @classmethod
    def text(cls, status: int, message: str, headers=()):
        return cls(status, [("Content-Type", "text/plain; charset=utf-8"), *headers],
                   message.encode("utf-8"))


def error_summary(error_json) -> str:
    """Dropbox-style summary of a Stone-encoded error: the chain of tags, e.g.
    "path/conflict/file/..", "lookup_failed/incorrect_offset/..". """
    parts, node = [], error_json
    while True:
        if isinstance(node, str):
            parts.append(node)
            break
        if not isinstance(node, dict) or ".tag" not in node:
            break
        tag = node[".tag"]
        parts.append(tag)
        if tag in node:
            node = node[tag]
            continue
        # Struct payloads are inlined next to ".tag"; follow the first nested union.
        nested = [v for k, v in node.items() if k != ".tag" and isinstance(v, dict) and ".tag" in v]
        if not nested:
            break
        node = nested[0]
    return "/".join(parts) + "/.."


class _Dropped(Exception):
    pass


class _TLSHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, handler, app, context: ssl.SSLContext):
        self.app, self.ssl_context = app, context
        super().__init__(address, handler)

    def get_request(self):
        sock, addr = super().get_request()
        # The handshake runs in the connection's own thread (see _Handler.setup), so one slow
        # or broken client cannot stall accept().
        return self.ssl_context.wrap_socket(sock, server_side=True,
                                            do_handshake_on_connect=False), addr

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ssl.SSLError, ConnectionError, TimeoutError, OSError)):
            return      # clients going away is normal here
        traceback.print_exc()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "dropbox-test-server"
    sys_version = ""
    timeout = 300                 # idle keep-alive connections are closed after this
    disable_nagle_algorithm = True

    def setup(self):
        self.request.settimeout(30)
        self.request.do_handshake()
        super().setup()
        app = self.server.app
        self.throttle = Throttle(lambda: app.faults.bandwidth_bps)
        self.body_throttle = UplinkThrottle(self.throttle, app.uplink)  # request bodies only
        self.conn_id = next(app._conn_counter)
        with app._lock:
            app._connections.add(self.request)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.server.app._lock:
                self.server.app._connections.discard(self.request)

    def do_POST(self):
        self.server.app._handle(self)

    do_GET = do_POST

    def log_message(self, format, *args):   # the server keeps its own request log
        pass


class DropboxTestServer:
    """A local stand-in for the Dropbox API v2 — TEST INFRASTRUCTURE, never Dropbox itself.

    Constructor arguments (all keyword except root_dir):
      root_dir            folder for state, file bytes, sessions, certificate, requests.jsonl
      port=0, host="127.0.0.1"
      team=False          False: personal account (root_info user). True: team member whose
                          home folder "/<member_folder>" sits inside the team space.
      token_lifetime_s=14400 (None = never expire), session_lifetime_s=7 days,
      max_file_size=350e9, quota_bytes=2 TiB, member_quota_bytes=None (team only),
      list_page_size=500, app_key="test-app-key", app_secret=None, faults=FaultConfig(),
      member_folder="Test User", team_folders=("Team Folder",), disallowed_names=...,
      display_name, email, request_log_limit=None, max_header_bytes=16 KiB, start=True

    `max_header_bytes` (also an attribute, changeable while the server runs): a request whose
    header section (request line and header lines) is larger is answered 431 in plain text
    before anything else looks at it, as a front end would (None: no limit of the server's own).
    """

    def __init__(self, root_dir: Union[str, Path], *, port: int = 0, host: str = "127.0.0.1",
                 team: bool = False, token_lifetime_s: Optional[float] = 14_400,
                 session_lifetime_s: float = 7 * 24 * 3600, max_file_size: int = 350 * 10 ** 9,
                 quota_bytes: int = 2 * 1024 ** 4, member_quota_bytes: Optional[int] = None,
                 list_page_size: int = 500, app_key: str = "test-app-key",
                 app_secret: Optional[str] = None, faults: Optional[FaultConfig] = None,
                 member_folder: str = "Test User", team_folders: Iterable[str] = ("Team Folder",),
                 disallowed_names: Iterable[str] = DEFAULT_DISALLOWED_NAMES,
                 display_name: str = "Test User", email: str = "test.user@example.invalid",
                 request_log_limit: Optional[int] = None, max_header_bytes: Optional[int] = HEADER_LIMIT,
                 start: bool = True):
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError("the Dropbox test server only listens on loopback")
        self.root_dir = Path(root_dir).resolve()
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self.host, self.port = "127.0.0.1", port
        self.team = team
        self.settings = Settings(token_lifetime_s, session_lifetime_s, max_file_size,
                                 list_page_size, display_name, email)
        self.quota_bytes, self.member_quota_bytes = quota_bytes, member_quota_bytes
        self.app_key, self.app_secret = app_key, app_secret
        self._member_folder, self._team_folders = member_folder, tuple(team_folders)
        self._disallowed = tuple(disallowed_names)
        self._injector = FaultInjector(faults)
        # The uplink all connections share (FaultConfig.uplink_bps), with its accounting.
        self.uplink = SharedUplink(lambda: self._injector.config.uplink_bps)
        self._holds: list[Hold] = []
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._connections: set = set()
        self._conn_counter = itertools.count(1)
        self._clock_offset = 0.0
        self.request_log: list[dict] = []
        self.request_log_limit = request_log_limit   # None: keep every record in memory
        self.max_header_bytes = max_header_bytes
        self._in_flight: set = set()      # request ids already in request_log, not yet on disk
        self._httpd = None
        self._thread = None
        self.store: Optional[Store] = None
        cert, key = ensure_certificate(self.root_dir / "tls")
        self.ca_file = str(cert)
        self._ssl_context = server_context(cert, key)
        if start:
            self.start()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "DropboxTestServer":
        if self._httpd is not None:
            return self
        self.store = Store(self.root_dir, clock=self.now, team=self.team,
                           member_folder=self._member_folder, team_folders=self._team_folders,
                           disallowed_names=self._disallowed)
        self._log_file = open(self.root_dir / "requests.jsonl", "a", encoding="utf-8")
        self._ensure_credentials()
        self._httpd = _TLSHTTPServer((self.host, self.port), _Handler, self, self._ssl_context)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="dropbox-test-server:%d" % self.port, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        with self._lock:
            holds, self._holds = self._holds, []
        for hold in holds:          # a held request must not keep its thread (and stop) waiting
            hold.release()
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:          # end keep-alive connections so their threads exit
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=10)
        self._httpd = self._thread = None
        # Let requests already being answered finish their log lines (bounded wait).
        deadline = time.monotonic() + 5
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        # In-flight handlers may still hold the store briefly; take its lock before closing.
        with self.store.lock:
            self.store.close()
        with self._log_lock:
            self._log_file.close()

    close = stop

    def restart(self) -> "DropboxTestServer":
        """Stop and start again on the same port, reloading all state from disk."""
        self.stop()
        return self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- addresses and client configuration ---------------------------------------------------

    @property
    def address(self) -> str:
        """"127.0.0.1:PORT" — the value for DROPBOX_API_HOST / DROPBOX_API_CONTENT_HOST."""
        return "%s:%d" % (self.host, self.port)

    @property
    def url(self) -> str:
        return "https://" + self.address

    def client_env(self, credentials: bool = False) -> dict:
        """Environment for a subprocess whose SDK should reach this server. The SDK reads the
        host variables at import; `requests` lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override
        the SDK's ca_certs, so they are pointed at this server's certificate too."""
        env = {
            "DROPBOX_API_HOST": self.address,
            "DROPBOX_API_CONTENT_HOST": self.address,
            "DROPBOX_API_NOTIFY_HOST": self.address,
            "DROPBOX_WEB_HOST": self.address,
            "REQUESTS_CA_BUNDLE": self.ca_file,
            "CURL_CA_BUNDLE": self.ca_file,
            "SSL_CERT_FILE": self.ca_file,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        if credentials:
            env["DROPBOX_APP_KEY"] = self.app_key
            env["DROPBOX_REFRESH_TOKEN"] = self.refresh_token
        return env

    def requests_session(self, max_connections: int = 8):
        """A requests session that trusts only this server's certificate, whatever the
        environment says (trust_env=False also keeps proxies away from loopback)."""
        import dropbox
        session = dropbox.create_session(max_connections=max_connections, ca_certs=self.ca_file)
        session.verify = self.ca_file
        session.trust_env = False
        return session

    def client_class(self):
        """A `dropbox.Dropbox` subclass bound to this server: every host of its host map and
        the token-refresh endpoint point here (the SDK binds the refresh host as a default
        argument at import time, so overriding `_host_map` alone is not enough)."""
        import dropbox
        address = self.address

        class LocalTestServerDropbox(dropbox.Dropbox):
            _test_server_address = address

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._host_map = {key: self._test_server_address for key in self._host_map}

            def refresh_access_token(self, host=None, scope=None):
                return super().refresh_access_token(host=self._test_server_address, scope=scope)

        return LocalTestServerDropbox

    def sdk_client(self, oauth2_access_token: Optional[str] = None, *, team_space: bool = False,
                   **kwargs):
        """An official-SDK client talking to this server. Without credentials it uses the
        server's current access token. `team_space=True` sets the path root to the team
        space root (Dropbox-API-Path-Root), as a client does after reading root_info."""
        from dropbox import common
        kwargs.setdefault("session", self.requests_session())
        has_credentials = (oauth2_access_token or kwargs.get("oauth2_refresh_token")
                           or (kwargs.get("app_key") and kwargs.get("app_secret")))
        if not has_credentials:
            oauth2_access_token = self.access_token
        client = self.client_class()(oauth2_access_token=oauth2_access_token, **kwargs)
        if team_space:
            client = client.with_path_root(common.PathRoot.root(self.root_namespace_id))
        return client

    def oauth_flow(self, app_key: Optional[str] = None, **kwargs):
        """`dropbox.DropboxOAuth2FlowNoRedirect` (PKCE by default) bound to this server."""
        from dropbox.oauth import DropboxOAuth2FlowNoRedirect
        address = self.address

        class LocalFlow(DropboxOAuth2FlowNoRedirect):
            def build_url(self, target, params=None, host=None):
                return super().build_url(target, params, address)

        kwargs.setdefault("use_pkce", True)
        kwargs.setdefault("token_access_type", "offline")
        flow = LocalFlow(app_key or self.app_key, **kwargs)
        flow.requests_session = self.requests_session()
        return flow

    # -- faults -----------------------------------------------------------------------------------

    @property
    def faults(self) -> FaultConfig:
        return self._injector.config

    @faults.setter
    def faults(self, config: FaultConfig) -> None:
        self._injector.set(config)

    def hold(self, *routes: str, count: int = 1) -> Hold:
        """Hold the first `count` requests to `routes` on arrival until the returned Hold's
        `release()` (also released by stop()); `wait_held()` waits until they arrived."""
        hold = Hold(routes, count)
        with self._lock:
            self._holds.append(hold)
        return hold

    def set_faults(self, config: Optional[FaultConfig] = None, **fields) -> FaultConfig:
        """Replace the fault configuration (counters and RNG restart). With keyword arguments,
        builds a FaultConfig from them; with nothing, turns every fault off."""
        config = config if config is not None else FaultConfig(**fields)
        self._injector.set(config)
        return config

    # -- clock, quota, sessions -----------------------------------------------------------------

    def now(self) -> float:
        return time.time() + self._clock_offset

    def advance_clock(self, seconds: float) -> None:
        """Move the server's clock forward (token expiry, session lifetime)."""
        self._clock_offset += seconds

    def age_sessions(self, seconds: float, session_id: Optional[str] = None) -> None:
        """Make upload sessions `seconds` older (all, or one)."""
        with self.store.tx():
            for sid, session in list(self.store.sessions.data.items()):
                if session_id is None or sid == session_id:
                    session["created"] -= seconds
                    self.store.sessions.put(sid, session)

    def sessions(self) -> dict:
        """Upload sessions alive on the server: id -> {type, offset, closed, chunks, end, ...}."""
        with self.store.lock:
            return {sid: json.loads(json.dumps(s)) for sid, s in self.store.sessions.data.items()}

    def set_quota(self, allocated: int, member_allocated: Optional[int] = None) -> None:
        self.quota_bytes, self.member_quota_bytes = allocated, member_allocated

    def quota(self) -> Quota:
        return Quota(self.quota_bytes, self.member_quota_bytes, self.faults.insufficient_space)

    @property
    def used_bytes(self) -> int:
        return self.store.total_used

    # -- files ----------------------------------------------------------------------------------

    def files(self) -> dict:
        """Every file: full path_display (from the top of the tree; for a team account that is
        the team space, so home files appear under "/<member_folder>") -> metadata dict."""
        with self.store.lock:
            return {e["path_display"]: self._public_entry(e)
                    for e in self.store.entries.data.values() if e["kind"] == "file"}

    def folders(self) -> list:
        with self.store.lock:
            return sorted(e["path_display"] for e in self.store.entries.data.values()
                          if e["kind"] == "folder")

    def metadata(self, path: str) -> Optional[dict]:
        """Metadata of a file or folder by full path (case-insensitive, any Unicode form: a
        test helper, more forgiving than the API's lookups), or None."""
        entry = self.store.entries.get(stored_key(path))
        return self._public_entry(entry) if entry else None

    def read_file(self, path: str) -> bytes:
        return self._blob(path).read_bytes()

    def file_path_on_disk(self, path: str) -> Path:
        return self._blob(path)

    def content_hash(self, path: str) -> str:
        """Dropbox content hash recomputed from the stored bytes (not the recorded value)."""
        return file_content_hash(self._blob(path))

    def put_file(self, path: str, data: Union[bytes, str, Path], *,
                 client_modified: Optional[_dt.datetime] = None, team_space: bool = False,
                 overwrite: bool = True) -> dict:
        """Store a file directly (no HTTP, not logged): seeds test data and is how the desktop
        app simulator syncs. `path` is relative to the home folder (or the team space)."""
        from dropbox import files as dbx_files
        tmp = self.root_dir / "tmp" / ("put-" + secrets.token_hex(8))
        if isinstance(data, (str, Path)):
            with open(data, "rb") as src, open(tmp, "wb") as dst:
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    dst.write(chunk)
        else:
            tmp.write_bytes(data)
        root = self.store.top_root() if team_space else self.store.home_root()
        try:
            entry = self.store.commit_file(
                root, path, mode=dbx_files.WriteMode.overwrite if overwrite else
                dbx_files.WriteMode.add, autorename=False, strict=False,
                client_modified=client_modified, blob_src=tmp, size=tmp.stat().st_size,
                content_hash=file_content_hash(tmp), quota=self.quota())
        finally:
            tmp.unlink(missing_ok=True)
        return self._public_entry(entry)

    def _blob(self, path: str) -> Path:
        entry = self.store.entries.get(stored_key(path))
        if entry is None or entry["kind"] != "file":
            raise FileNotFoundError(path)
        return self.store.blob_path(entry)

    def _public_entry(self, entry: dict) -> dict:
        out = {k: v for k, v in entry.items() if k not in ("blob", "seq")}
        if entry["kind"] == "file":
            out["client_modified"] = _dt.datetime.strptime(entry["client_modified"],
                                                           "%Y-%m-%dT%H:%M:%SZ")
            out["server_modified"] = _dt.datetime.strptime(entry["server_modified"],
                                                           "%Y-%m-%dT%H:%M:%SZ")
        return out

    # -- identity -------------------------------------------------------------------------------

    @property
    def account_id(self) -> str:
        return self.store.account_id

    @property
    def root_namespace_id(self) -> str:
        return self.store.root_namespace_id

    @property
    def home_namespace_id(self) -> str:
        return self.store.home_namespace_id

    @property
    def home_path(self) -> str:
        """"" for a personal account, "/<member_folder>" for a team member."""
        return self.store.home_root().display

    # -- request log ----------------------------------------------------------------------------

    def calls(self, route: Optional[str] = None) -> list:
        key = _route_key(route) if route else None
        with self._log_lock:
            return [r for r in self.request_log if key is None or r["route"] == key]

    def count_calls(self, route: str, status: Optional[int] = None) -> int:
        return sum(1 for r in self.calls(route) if status is None or r["status"] == status)

    def bytes_received(self, route: Optional[str] = None) -> int:
        return sum(r["bytes_in"] for r in self.calls(route))

    def bytes_sent(self, route: Optional[str] = None) -> int:
        return sum(r["bytes_out"] for r in self.calls(route))

    def clear_log(self) -> None:
        with self._log_lock:
            self.request_log.clear()

    def _publish(self, rec: dict, body, started: float) -> None:
        if body is not None:
            rec["bytes_in"] = body.received
        rec["duration_s"] = round(time.monotonic() - started, 6)
        with self._log_lock:
            if rec["request_id"] not in self._in_flight:
                self._in_flight.add(rec["request_id"])
                self.request_log.append(rec)
                limit = self.request_log_limit
                if limit is not None and len(self.request_log) > limit:
                    # Long manual runs: forget the oldest half (requests.jsonl keeps them all).
                    del self.request_log[: len(self.request_log) - limit // 2]

    def _log_to_file(self, rec: dict) -> None:
        line = json.dumps(rec, default=str)
        with self._log_lock:
            self._in_flight.discard(rec["request_id"])
            if not self._log_file.closed:
                self._log_file.write(line + "\n")
                self._log_file.flush()

    # -- tokens -----------------------------------------------------------------------------------

    def _apps(self) -> dict:
        return dict(self.store.kv.get("apps", {}))

    def register_app(self, app_key: str, app_secret: Optional[str] = None) -> None:
        with self.store.tx():
            apps = self._apps()
            apps[app_key] = app_secret
            self.store.kv.put("apps", apps)

    def issue_refresh_token(self, app_key: Optional[str] = None) -> str:
        app_key = app_key or self.app_key
        if app_key not in self._apps():
            self.register_app(app_key)
        token = secrets.token_urlsafe(32)
        with self.store.tx():
            self.store.tokens.put(token, {"kind": "refresh", "app_key": app_key,
                                          "revoked": False, "scope": SCOPES})
        return token

    def issue_access_token(self, lifetime_s=_SERVER_DEFAULT,
                           refresh_token: Optional[str] = None) -> str:
        """A new access token (lifetime: default = token_lifetime_s, None = never expires)."""
        if lifetime_s is _SERVER_DEFAULT:
            lifetime_s = self.settings.token_lifetime_s
        token = "sl." + secrets.token_urlsafe(40)
        with self.store.tx():
            self.store.tokens.put(token, {
                "kind": "access", "refresh": refresh_token, "revoked": False,
                "expires_at": None if lifetime_s is None else self.now() + lifetime_s})
        return token

    def expire_access_tokens(self) -> None:
        """Every access token expires now (the SDK then sees 401 expired_access_token)."""
        with self.store.tx():
            for token, rec in list(self.store.tokens.data.items()):
                if rec["kind"] == "access":
                    rec["expires_at"] = self.now() - 1
                    self.store.tokens.put(token, rec)

    def revoke_access_tokens(self, refresh_token: Optional[str] = None) -> None:
        """Revoke all access tokens, or those minted from one refresh token."""
        with self.store.tx():
            for token, rec in list(self.store.tokens.data.items()):
                if rec["kind"] == "access" and (refresh_token is None
                                                or rec.get("refresh") == refresh_token):
                    rec["revoked"] = True
                    self.store.tokens.put(token, rec)

    def revoke_refresh_token(self, refresh_token: Optional[str] = None) -> None:
        """Revoke a refresh token (default: the server's own) and its access tokens."""
        refresh_token = refresh_token or self.refresh_token
        with self.store.tx():
            rec = self.store.tokens.get(refresh_token)
            if rec is not None:
                rec["revoked"] = True
                self.store.tokens.put(refresh_token, rec)
        self.revoke_access_tokens(refresh_token)

    @property
    def access_token(self) -> str:
        return self.store.kv.get("default_access_token")

    @property
    def refresh_token(self) -> str:
        return self.store.kv.get("default_refresh_token")

    def _ensure_credentials(self) -> None:
        self.register_app(self.app_key, self.app_secret)
        rt = self.store.kv.get("default_refresh_token")
        rt_rec = self.store.tokens.get(rt) if rt else None
        if rt_rec is None or rt_rec["revoked"] or rt_rec["app_key"] != self.app_key:
            rt = self.issue_refresh_token(self.app_key)
            with self.store.tx():
                self.store.kv.put("default_refresh_token", rt)
        at = self.store.kv.get("default_access_token")
        if self._token_problem(at) is not None:
            at = self.issue_access_token(refresh_token=rt)
            with self.store.tx():
                self.store.kv.put("default_access_token", at)

    def _token_problem(self, token: Optional[str]) -> Optional[str]:
        rec = self.store.tokens.get(token) if token else None
        if rec is None or rec["kind"] != "access" or rec["revoked"]:
            return "invalid_access_token"
        if rec["expires_at"] is not None and rec["expires_at"] <= self.now():
            return "expired_access_token"
        return None

    def authorize(self, app_key: Optional[str] = None, code_challenge: Optional[str] = None, *,
                  code_challenge_method: str = "S256", token_access_type: Optional[str] = "offline",
                  redirect_uri: Optional[str] = None) -> str:
        """Play the browser step of OAuth: the user approves `app_key`; returns the code the
        app then exchanges at /oauth2/token (with the PKCE code_verifier)."""
        app_key = app_key or self.app_key
        if app_key not in self._apps():
            self.register_app(app_key)
        code = secrets.token_urlsafe(24)
        with self.store.tx():
            self.store.tokens.put(code, {
                "kind": "code", "app_key": app_key, "challenge": code_challenge,
                "method": code_challenge_method, "access_type": token_access_type or "online",
                "redirect_uri": redirect_uri, "expires_at": self.now() + AUTH_CODE_LIFETIME_S,
                "used": False})
        return code

    def authorize_url(self, url: str) -> str:
        """`authorize` driven by an /oauth2/authorize URL as the SDK's flow builds it."""
        q = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        return self.authorize(q.get("client_id"), q.get("code_challenge"),
                              code_challenge_method=q.get("code_challenge_method", "S256"),
                              token_access_type=q.get("token_access_type"),
                              redirect_uri=q.get("redirect_uri"))

    # -- request handling -------------------------------------------------------------------------

    def _handle(self, h: _Handler) -> None:
        started = time.monotonic()
        url = urlsplit(h.path)
        path = url.path
        api = path.startswith("/2/")
        route = path[3:] if api else path.lstrip("/")
        rec = {"ts": round(time.time(), 6), "route": route, "method": h.command, "status": None,
               "bytes_in": 0, "bytes_out": 0, "duration_s": 0.0, "session_id": None,
               "path": None, "error": None, "fault": None, "conn": h.conn_id,
               "request_id": uuid.uuid4().hex[:16], "header_bytes": _header_bytes(h)}
        body = None
        try:
            body = self._body_for(h)
            if body is None:
                self._write(h, _Response.text(400, "Bad Content-Length / Transfer-Encoding"), rec,
                            body, started)
                h.close_connection = True
                return
            limit = self.max_header_bytes
            if limit is not None and rec["header_bytes"] > limit:
                # The front end's answer: the API (faults, holds, routes) never sees the request.
                # The body is read first, so the client, still sending it, gets the answer.
                rec["error"] = "request header fields too large"
                body.drain()
                self._write(h, _Response.text(431, "Request Header Fields Too Large (%d bytes; this server "
                                                   "takes at most %d)" % (rec["header_bytes"], limit)),
                            rec, body, started)
                return
            decision = self._injector.decide(route, api)
            rec["fault"] = decision.label or None
            if decision.latency_s:
                time.sleep(decision.latency_s)
            with self._lock:
                holds = list(self._holds)
            for hold in holds:
                if hold.enter(route):
                    rec["fault"] = rec["fault"] or "held"
            if decision.action == F.DROP_MID_BODY:
                if body.finished:
                    raise DropConnection()
                body.drop_at = max(1, int((body.length or 1 << 20) * decision.drop_fraction))
            if api:
                response = self._api(h, route, url, body, decision, rec)
            else:
                response = self._non_api(h, route, url, body, decision, rec)
            body.drain()
            if decision.action == F.DROP_BEFORE_RESPONSE:
                raise DropConnection()
            self._write(h, response, rec, body, started)
        except (DropConnection, ClientGone, BadFraming, ConnectionError, TimeoutError,
                ssl.SSLError) as exc:
            rec["status"] = 0
            rec["error"] = rec["error"] or type(exc).__name__
            self._publish(rec, body, started)
            self._abort(h)
        except Exception:
            # A bug in the server: say so loudly, answer 500 if possible, drop the connection.
            traceback.print_exc()
            rec["error"] = "server bug: " + traceback.format_exc(limit=3).splitlines()[-1]
            try:
                self._write(h, _Response.text(500, "test server bug (see stderr)"), rec,
                            body, started)
            except Exception:
                pass
            self._publish(rec, body, started)
            self._abort(h)
        finally:
            # The in-memory record was published before the client could see the outcome;
            # now complete it (actual bytes, duration) and append it to requests.jsonl.
            if body is not None:
                rec["bytes_in"] = body.received
            rec["duration_s"] = round(time.monotonic() - started, 6)
            self._publish(rec, body, started)
            self._log_to_file(rec)

    def _body_for(self, h) -> Optional[RequestBody]:
        chunked = "chunked" in (h.headers.get("Transfer-Encoding") or "").lower()
        length = h.headers.get("Content-Length")
        try:
            n = int(length) if length is not None else 0
        except ValueError:
            return None
        if n < 0:
            return None
        return RequestBody(h.rfile, n, chunked, h.body_throttle, h.connection)

    def _abort(self, h) -> None:
        h.close_connection = True
        try:
            h.request.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _write(self, h, response: _Response, rec: dict, body, started: float) -> None:
        rec["status"] = response.status
        # Publish before the first byte goes out, so a test that reads the log right after
        # its call returns always finds the record.
        self._publish(rec, body, started)
        h.send_response(response.status)
        h.send_header("X-Dropbox-Request-Id", rec["request_id"])
        for name, value in response.headers:
            h.send_header(name, value)
        length = response.file[2] if response.file else len(response.body)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        if response.file:
            path, start, count = response.file
            with open(path, "rb") as fh:
                fh.seek(start)
                while count > 0:
                    chunk = fh.read(min(count, h.throttle.chunk_size(SEND_SLICE)))
                    if not chunk:
                        raise ConnectionError("blob shorter than its metadata")
                    h.wfile.write(chunk)
                    h.throttle.spend(len(chunk))
                    rec["bytes_out"] += len(chunk)
                    count -= len(chunk)
        else:
            view = memoryview(response.body)
            while view:
                step = h.throttle.chunk_size(SEND_SLICE)
                h.wfile.write(view[:step])
                h.throttle.spend(len(view[:step]))
                rec["bytes_out"] += len(view[:step])
                view = view[step:]

    # -- API routes ------------------------------------------------------------------------------

    def _fault_response(self, decision, route: str) -> _Response:
        action = decision.action
        if action in (F.RATE_LIMIT, F.WRITE_LIMIT):
            reason = "too_many_requests" if action == F.RATE_LIMIT else "too_many_write_operations"
            return self._rate_limited(reason, decision.retry_after)
        if action == F.ERROR_500:
            return _Response.text(500, "Internal Server Error (injected by the Dropbox test server)")
        if action == F.ERROR_503:
            return _Response.text(503, "Service Unavailable (injected by the Dropbox test server)",
                                  [("Retry-After", str(decision.retry_after))])
        status, error = decision.status, decision.error
        if status == 401:
            error = error or {".tag": "invalid_access_token"}
            return _Response.json(401, {"error_summary": error_summary(error), "error": error})
        if status == 403:
            return self._transport_limited() if error is None else _Response.json(
                403, {"error_summary": error_summary(error), "error": error})
        if status == 409:
            error = error or {".tag": "other"}
            return _Response.json(409, {"error_summary": error_summary(error), "error": error})
        if status == 422:
            err, _ = path_root_error(self.store)
            from dropbox import common
            encoded = stone_serializers.json_compat_obj_encode(common.PathRootError_validator, err)
            return _Response.json(422, {"error_summary": error_summary(encoded), "error": encoded})
        if status == 400 and route == "oauth2/token":
            return _Response.json(400, {"error": error or "invalid_grant",
                                        "error_description": "injected by the test server"})
        return _Response.text(status, error if isinstance(error, str) else
                              "HTTP %d (injected by the Dropbox test server)" % status)

    def _rate_limited(self, reason: str, retry_after: Optional[int]) -> _Response:
        retry_after = self.faults.retry_after_s if retry_after is None else retry_after
        return _Response.json(429, {"error_summary": reason + "/..",
                                    "error": {"reason": {".tag": reason},
                                              "retry_after": int(retry_after)}},
                              [("Retry-After", str(int(retry_after)))])

    def _transport_limited(self) -> _Response:
        error = {".tag": "invalid_account_type", "invalid_account_type": {".tag": "feature"}}
        return _Response.json(403, {"error_summary": error_summary(error), "error": error})

    def _api(self, h, route: str, url, body: RequestBody, decision, rec) -> _Response:
        spec = ROUTES.get(route)
        if spec is None:
            return _Response.text(400, "Unknown API function: \"%s\" (the Dropbox test server "
                                       "does not implement it)" % route)
        if h.command != "POST" and not (spec.style == "download" and h.command == "GET"):
            return _Response.text(405, "Method not allowed")
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        token = self._bearer(h, query)
        if token is None:
            return _Response.text(400, "Error in call to API function \"%s\": Must provide HTTP "
                                       "header \"Authorization\" or URL parameter "
                                       "\"authorization\"." % route)
        problem = self._token_problem(token)
        if problem:
            error = {".tag": problem}
            rec["error"] = problem
            return _Response.json(401, {"error_summary": problem + "/..", "error": error})
        if decision.before_body:
            return self._fault_response(decision, route)
        if decision.transport_limit:
            return self._transport_limited()
        root = self._path_root(h, route)
        if isinstance(root, _Response):
            return root
        arg = self._decode_arg(h, spec, query, body)
        if isinstance(arg, _Response):
            return arg
        call = Call(self, spec, arg, body, root, h.headers, rec, token)
        call.commit_fault = decision if decision.at_commit else None
        try:
            result = spec.handler(call)
        except RouteError as exc:
            encoded = stone_serializers.json_compat_obj_encode(spec.route.error_type, exc.error)
            rec["error"] = error_summary(encoded)
            return _Response.json(409, {"error_summary": rec["error"], "error": encoded})
        except RateLimited as exc:
            rec["error"] = exc.reason
            return self._rate_limited(exc.reason, exc.retry_after)
        except CommitRefused as exc:
            response = self._fault_response(exc.decision, route)
            rec["error"] = "refused at commit (injected)"
            return response
        except BadRequest as exc:
            rec["error"] = str(exc)
            return _Response.text(400, str(exc))
        except Unsatisfiable as exc:
            return _Response.text(416, "Requested range not satisfiable",
                                  [("Content-Range", "bytes */%d" % exc.total)])
        if isinstance(result, DownloadResult):
            meta = stone_serializers.json_encode(spec.route.result_type, result.metadata)
            headers = [("Content-Type", "application/octet-stream"), ("Accept-Ranges", "bytes"),
                       ("Dropbox-API-Result", meta)]
            if result.partial:
                headers.append(("Content-Range", "bytes %d-%d/%d" % (
                    result.start, result.start + result.length - 1, result.total)))
            return _Response(206 if result.partial else 200, headers,
                             file=(result.blob, result.start, result.length))
        payload = stone_serializers.json_encode(spec.route.result_type, result)
        return _Response(200, [("Content-Type", "application/json")], payload.encode("utf-8"))

    def _bearer(self, h, query) -> Optional[str]:
        value = h.headers.get("Authorization") or query.get("authorization")
        if not value or not value.startswith("Bearer "):
            return None
        return value[len("Bearer "):].strip()

    def _path_root(self, h, route: str):
        raw = h.headers.get("Dropbox-API-Path-Root")
        if not raw:
            return self.store.home_root()
        from dropbox import common
        try:
            path_root = stone_serializers.json_compat_obj_decode(
                common.PathRoot_validator, json.loads(raw))
        except (ValueError, stone_validators.ValidationError) as exc:
            return _Response.text(400, "Error in call to API function \"%s\": Invalid value for "
                                       "HTTP header \"Dropbox-API-Path-Root\": %s" % (route, exc))
        if path_root.is_home():
            return self.store.home_root()
        if path_root.is_root() and path_root.get_root() == self.store.root_namespace_id:
            return self.store.top_root()
        if path_root.is_namespace_id():
            root = self.store.root_for_namespace(path_root.get_namespace_id())
            if root is not None:
                return root
            err = common.PathRootError.no_permission
        else:
            err, _ = path_root_error(self.store)
        encoded = stone_serializers.json_compat_obj_encode(common.PathRootError_validator, err)
        return _Response.json(422, {"error_summary": error_summary(encoded), "error": encoded})

    def _decode_arg(self, h, spec, query, body: RequestBody):
        route = spec.url
        if spec.style == "rpc":
            ctype = (h.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            raw = body.read_bytes(RPC_BODY_LIMIT)
            if raw is None:
                return _Response.text(400, "Error in call to API function \"%s\": request body "
                                           "too large" % route)
            if ctype != "application/json" and raw:
                return _Response.text(400, "Error in call to API function \"%s\": Bad HTTP "
                                           "\"Content-Type\" header: \"%s\". Expecting "
                                           "\"application/json\"." % (route, ctype))
            source, text = "request body", raw.decode("utf-8", "replace") or "null"
        else:
            header = h.headers.get("Dropbox-API-Arg")
            if header is not None and "arg" in query:
                return _Response.text(400, "Error in call to API function \"%s\": both the "
                                           "\"Dropbox-API-Arg\" header and the \"arg\" URL "
                                           "parameter were given" % route)
            if spec.style == "upload":
                ctype = (h.headers.get("Content-Type") or "").split(";")[0].strip().lower()
                if ctype not in ("application/octet-stream", "text/plain"):
                    return _Response.text(400, "Error in call to API function \"%s\": Bad HTTP "
                                               "\"Content-Type\" header: \"%s\". Expecting "
                                               "\"application/octet-stream\"." % (route, ctype))
            if header is not None:
                # Header values arrive as latin-1; recover UTF-8 if a client sent it raw.
                try:
                    header = header.encode("latin-1").decode("utf-8")
                except UnicodeError:
                    pass
            source = "HTTP header \"Dropbox-API-Arg\"" if header is not None else "URL parameter \"arg\""
            text = header if header is not None else query.get("arg")
            if text is None:
                return _Response.text(400, "Error in call to API function \"%s\": Must provide "
                                           "HTTP header \"Dropbox-API-Arg\" or URL parameter "
                                           "\"arg\"." % route)
        try:
            # strict=True: unknown fields are an error, as on Dropbox.
            return stone_serializers.json_compat_obj_decode(spec.route.arg_type, json.loads(text),
                                                            strict=True)
        except ValueError as exc:
            return _Response.text(400, "Error in call to API function \"%s\": %s: could not "
                                       "decode input as JSON (%s)" % (route, source, exc))
        except stone_validators.ValidationError as exc:
            return _Response.text(400, "Error in call to API function \"%s\": %s: %s"
                                  % (route, source, exc))

    # -- OAuth endpoints -------------------------------------------------------------------------

    def _non_api(self, h, route: str, url, body: RequestBody, decision, rec) -> _Response:
        if decision.before_body:
            return self._fault_response(decision, route)
        if route == "oauth2/token" and h.command == "POST":
            raw = body.read_bytes(64 * 1024) or b""
            form = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}
            response = self._oauth_token(h, form)
            if response.status != 200:
                rec["error"] = json.loads(response.body).get("error")
            return response
        if route == "oauth2/authorize" and h.command == "GET":
            code = self.authorize_url(h.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            if q.get("redirect_uri"):
                target = q["redirect_uri"] + ("&" if "?" in q["redirect_uri"] else "?") + \
                    urlencode({"code": code, **({"state": q["state"]} if "state" in q else {})})
                return _Response(302, [("Location", target)])
            return _Response.text(200, code)
        return _Response.text(404, "Not found (Dropbox test server)")

    def _oauth_token(self, h, form: dict) -> _Response:
        def fail(error: str, description: str) -> _Response:
            return _Response.json(400, {"error": error, "error_description": description})

        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        basic = h.headers.get("Authorization") or ""
        if basic.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(basic[6:]).decode("utf-8").partition(":")
                client_id, client_secret = client_id or user, client_secret or password
            except (ValueError, UnicodeError):
                return fail("invalid_client", "bad Basic authorization")
        apps = self._apps()
        if client_id not in apps:
            return fail("invalid_client", "Invalid client_id or client_secret")
        secret = apps[client_id]
        if client_secret is not None and secret is not None and client_secret != secret:
            return fail("invalid_client", "Invalid client_id or client_secret")
        grant = form.get("grant_type")
        if grant == "refresh_token":
            rt = form.get("refresh_token") or ""
            rec = self.store.tokens.get(rt)
            if rec is None or rec["kind"] != "refresh" or rec["revoked"]:
                return fail("invalid_grant", "refresh token is invalid or revoked")
            if rec["app_key"] != client_id:
                return fail("invalid_grant", "refresh token was issued to another app")
            token = self.issue_access_token(refresh_token=rt)
            return _Response.json(200, {"access_token": token, "token_type": "bearer",
                                        "expires_in": self._expires_in()})
        if grant == "authorization_code":
            code = form.get("code") or ""
            with self.store.tx():
                rec = self.store.tokens.get(code)
                if (rec is None or rec["kind"] != "code" or rec["used"]
                        or rec["expires_at"] < self.now() or rec["app_key"] != client_id):
                    return fail("invalid_grant", "code doesn't exist or has expired")
                rec["used"] = True
                self.store.tokens.put(code, rec)
            if rec["redirect_uri"] and form.get("redirect_uri") != rec["redirect_uri"]:
                return fail("invalid_grant", "redirect_uri mismatch")
            if rec["challenge"]:
                verifier = form.get("code_verifier") or ""
                if rec["method"] == "S256":
                    computed = base64.urlsafe_b64encode(
                        hashlib.sha256(verifier.encode("utf-8")).digest()).decode().rstrip("=")
                else:
                    computed = verifier
                if not verifier or computed != rec["challenge"]:
                    return fail("invalid_grant", "invalid code verifier")
            elif secret is None or client_secret != secret:
                return fail("invalid_client", "client_secret required without PKCE")
            refresh = (self.issue_refresh_token(client_id)
                       if rec["access_type"] == "offline" else None)
            token = self.issue_access_token(refresh_token=refresh)
            out = {"access_token": token, "token_type": "bearer",
                   "expires_in": self._expires_in(), "scope": SCOPES,
                   "account_id": self.account_id, "uid": str(self.store.kv.get("uid") or
                                                             self._uid())}
            if refresh:
                out["refresh_token"] = refresh
            return _Response.json(200, out)
        return fail("unsupported_grant_type", "grant_type must be refresh_token or "
                                              "authorization_code")

    def _uid(self) -> str:
        uid = str(10 ** 8 + secrets.randbelow(9 * 10 ** 8))
        with self.store.tx():
            self.store.kv.put("uid", uid)
        return uid

    def _expires_in(self) -> int:
        lifetime = self.settings.token_lifetime_s
        return int(lifetime) if lifetime is not None else 10 * 365 * 86400


def _route_key(route: str) -> str:
    route = route.strip("/")
    return route[2:] if route.startswith("2/") else route


def _header_bytes(h) -> int:
    """Bytes of the request's header section as sent: the request line and each "Name: value"
    line with their CRLFs, and the empty line that ends them."""
    return (len(h.requestline) + 2 + sum(len(name) + 2 + len(value) + 2 for name, value in h.headers.items())
            + 2)


class Call:
    """What a route handler gets: the decoded argument, the request body, the path root, and
    access to the store, settings, quota and the namespace commit slots."""

    def __init__(self, app: DropboxTestServer, spec, arg, body, root: Root, headers, rec, token):
        self.app, self.spec, self.arg, self.body, self.root = app, spec, arg, body, root
        self.headers, self.rec, self.token = headers, rec, token
        self.store, self.settings = app.store, app.settings
        self._holding = False
        self.commit_fault = None    # a FailRule.at_commit decision: its commit is refused

    def quota(self) -> Quota:
        return self.app.quota()

    def tmp_path(self) -> Path:
        return self.app.root_dir / "tmp" / ("upload-" + secrets.token_hex(8))

    @contextmanager
    def commit_slot(self, lower: Optional[str]):
        """Hold the destination namespace's commit slot (Dropbox's namespace lock). Past the
        configured concurrency the request gets 429 too_many_write_operations."""
        if self._holding:       # a batch already holds the slot for all its entries
            yield
            return
        injector = self.app._injector
        namespace = self.store.namespace_of(lower) if lower is not None else self.root.namespace_id
        if not injector.acquire_commit(namespace):
            raise RateLimited("too_many_write_operations")
        self._holding = True
        try:
            hold = injector.config.commit_hold_s
            if hold:
                time.sleep(hold)
            yield
        finally:
            self._holding = False
            injector.release_commit(namespace)

    def revoke_current_token(self) -> None:
        with self.store.tx():
            rec = self.store.tokens.get(self.token)
            if rec is not None:
                rec["revoked"] = True
                self.store.tokens.put(self.token, rec)
