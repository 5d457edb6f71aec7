"""Persistent state of the Dropbox test server (test infrastructure only).

One job: own everything the fake Dropbox account holds — the file tree (case-insensitive, with
`path_display` keeping the first casing), file bytes on disk, upload sessions, tokens, the
account's namespaces — and apply Dropbox's rules to it (write modes, conflicts, autorename,
quota, cursors). Nothing here speaks HTTP; the route handlers translate the exceptions raised
here into each route's Stone error type.

Layout under the root folder:
    state.sqlite3         metadata, sessions, tokens (SQLite, write-through from memory)
    blobs/<id>            one file per stored file version
    sessions/<id>.bin     pending upload-session data, written at its offset
    tmp/                  request bodies being received
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from dropbox import common, files

BLOCK = 4 * 1024 * 1024
EMPTY_HASH = hashlib.sha256(b"").hexdigest()
DEFAULT_DISALLOWED_NAMES = frozenset(
    {"desktop.ini", "thumbs.db", ".ds_store", "icon\r", ".dropbox", ".dropbox.attr"})


# --------------------------------------------------------------------------------------------
# Failures raised by the store; routes wrap them in their own Stone error unions.

class StoreFailure(Exception):
    pass


class LookupFailure(StoreFailure):
    """Carries a `files.LookupError`."""

    def __init__(self, error):
        super().__init__(error)
        self.error = error


class WriteFailure(StoreFailure):
    """Carries a `files.WriteError`."""

    def __init__(self, error):
        super().__init__(error)
        self.error = error


class SessionFailure(StoreFailure):
    """An upload-session problem named by its tag, shared by UploadSessionLookupError and
    UploadSessionAppendError (not_found, incorrect_offset, closed, not_closed, too_large,
    concurrent_session_invalid_offset, concurrent_session_invalid_data_size)."""

    def __init__(self, tag: str, correct_offset: Optional[int] = None):
        super().__init__(tag, correct_offset)
        self.tag = tag
        self.correct_offset = correct_offset

    def as_union(self, union_cls):
        if self.tag == "incorrect_offset":
            return union_cls.incorrect_offset(files.UploadSessionOffsetError(self.correct_offset))
        return getattr(union_cls, self.tag)


class BadRequest(StoreFailure):
    """Something Dropbox answers with HTTP 400 and a plain-text message."""


class CursorReset(StoreFailure):
    """A list_folder cursor that no longer applies (ListFolderContinueError.reset)."""


# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Root:
    """The folder a request's paths are relative to (Dropbox-API-Path-Root)."""

    lower: str          # "" for the top of the tree, else "/member folder"
    display: str
    namespace_id: str

    @property
    def depth(self) -> int:
        return 0 if not self.lower else self.lower.count("/")


def block_digests_hash(digests: Iterable[bytes]) -> str:
    return hashlib.sha256(b"".join(digests)).hexdigest()


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(int(ts), _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: str) -> _dt.datetime:
    return _dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")


def stored_key(path: str) -> str:
    """The key an entry is stored under: lower case, then Unicode NFC. Dropbox keeps names as
    given (path_display) but its path_lower is lower-cased and NFC-normalised (maestral PR #409,
    samschott/maestral, which mirrors Dropbox's index), so an NFC and an NFD spelling of one name
    are the same item when written."""
    return unicodedata.normalize("NFC", path.lower())


def lookup_key(path: str) -> str:
    """The key a path given to a lookup route finds: lower case only, NOT normalised. Dropbox
    answers not_found for an existing item asked for in another Unicode form (maestral PR #678:
    "Dropbox APIs will raise 'not found' errors when querying for a path with the wrong unicode
    normalisation"; issue 13 of this project saw the same with NFD names from macOS)."""
    return path.lower()


def _parent(lower: str) -> str:
    return lower.rsplit("/", 1)[0]


def _autorename_candidates(display_name: str):
    dot = display_name.rfind(".")
    stem, ext = (display_name[:dot], display_name[dot:]) if dot > 0 else (display_name, "")
    n = 1
    while True:
        yield "%s (%d)%s" % (stem, n, ext)
        n += 1


class _Table:
    """A dict mirrored into one SQLite key/value table (JSON values)."""

    def __init__(self, db: sqlite3.Connection, name: str):
        self._db, self._name = db, name
        db.execute("CREATE TABLE IF NOT EXISTS %s (k TEXT PRIMARY KEY, v TEXT NOT NULL)" % name)
        self.data = {k: json.loads(v) for k, v in db.execute("SELECT k, v FROM %s" % name)}

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self._db.execute("INSERT OR REPLACE INTO %s (k, v) VALUES (?, ?)" % self._name,
                         (key, json.dumps(value)))

    def delete(self, key: str) -> None:
        if self.data.pop(key, None) is not None:
            self._db.execute("DELETE FROM %s WHERE k = ?" % self._name, (key,))

    def get(self, key, default=None):
        return self.data.get(key, default)


class Store:
    def __init__(self, root_dir: Path, *, clock: Callable[[], float], team: bool,
                 member_folder: str, team_folders: Iterable[str] = (),
                 disallowed_names: Iterable[str] = DEFAULT_DISALLOWED_NAMES):
        self.root_dir = Path(root_dir)
        self.clock = clock
        self.team = team
        self.disallowed = frozenset(n.lower() for n in disallowed_names)
        for sub in ("blobs", "sessions", "tmp"):
            (self.root_dir / sub).mkdir(parents=True, exist_ok=True)
        # Leftovers of requests that were being received when the server stopped.
        for leftover in (self.root_dir / "tmp").iterdir():
            leftover.unlink(missing_ok=True)

        self.lock = threading.RLock()
        self._tx_depth = 0
        self._db = sqlite3.connect(str(self.root_dir / "state.sqlite3"),
                                   check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self.tx():
            self.kv = _Table(self._db, "kv")
            self.entries = _Table(self._db, "entries")          # full lower path -> entry
            self.tombstones = _Table(self._db, "tombstones")    # full lower path -> deleted entry
            self.sessions = _Table(self._db, "sessions")
            self.tokens = _Table(self._db, "tokens")            # access/refresh tokens, auth codes
        self._session_locks: dict[str, threading.Lock] = {}
        self._rebuild_indexes()
        with self.tx():
            self._init_identity(member_folder, team_folders)

    # -- plumbing ------------------------------------------------------------------------------

    @contextmanager
    def tx(self):
        """One SQLite transaction (re-entrant) under the store lock: a crash at any point leaves
        the state file consistent."""
        with self.lock:
            outer = self._tx_depth == 0
            if outer:
                self._db.execute("BEGIN")
            self._tx_depth += 1
            try:
                yield
            except BaseException:
                self._tx_depth -= 1
                if outer:
                    self._db.execute("ROLLBACK")
                    self._reload_after_rollback()
                raise
            else:
                self._tx_depth -= 1
                if outer:
                    self._db.execute("COMMIT")

    def _reload_after_rollback(self):
        # Memory was mutated along with SQLite; reload it so both agree again. Failures raised
        # on purpose happen before any mutation, so this is only a safety net for bugs.
        for table in (self.kv, self.entries, self.tombstones, self.sessions, self.tokens):
            table.data = {k: json.loads(v) for k, v in
                          self._db.execute("SELECT k, v FROM %s" % table._name)}
        self._rebuild_indexes()

    def _rebuild_indexes(self):
        self._children: dict[str, set] = {}
        self._by_id: dict[str, str] = {}
        self._by_rev: dict[str, str] = {}
        for lower, entry in self.entries.data.items():
            self._index(lower, entry)
        self.total_used = sum(e["size"] for e in self.entries.data.values() if e["kind"] == "file")

    def close(self):
        with self.lock:
            self._db.close()

    def _counter(self, name: str, start: int) -> int:
        value = int(self.kv.get(name, start)) + 1
        self.kv.put(name, value)
        return value

    def _init_identity(self, member_folder: str, team_folders: Iterable[str]):
        if self.kv.get("account_id") is None:
            alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
            self.kv.put("account_id", "dbid:" + "".join(secrets.choice(alphabet)
                                                        for _ in range(35)))
            self.kv.put("team_member_id", "dbmid:" + secrets.token_hex(16))
            self.kv.put("team_id", "dbtid:" + secrets.token_hex(16))
            base = 1000 + secrets.randbelow(10 ** 6) * 10
            self.kv.put("root_namespace_id", str(base))
            self.kv.put("home_namespace_id", str(base + 1))
            self.kv.put("team_namespace_id", str(base + 2))
        if self.team:
            # The member's home folder (and any team folders) live at the top of the team space.
            for name in [member_folder, *team_folders]:
                lower = "/" + name.lower()
                if lower not in self.entries.data:
                    self._put_folder(lower, "/" + name)
            self.kv.put("member_folder", member_folder)

    def seq(self) -> int:
        return int(self.kv.get("seq", 0))

    def _next_seq(self) -> int:
        return self._counter("seq", 0)

    def _new_rev(self) -> str:
        # Dropbox revs are lowercase hex, at least 9 digits (download accepts "rev:[0-9a-f]{9,}").
        return "%012x" % self._counter("rev", 0x15F000000)

    # -- roots and paths -------------------------------------------------------------------------

    @property
    def account_id(self) -> str:
        return self.kv.get("account_id")

    @property
    def root_namespace_id(self) -> str:
        return self.kv.get("root_namespace_id")

    @property
    def home_namespace_id(self) -> str:
        # A personal account has one namespace: its home is its root.
        return self.kv.get("home_namespace_id") if self.team else self.root_namespace_id

    def home_root(self) -> Root:
        if not self.team:
            return Root("", "", self.root_namespace_id)
        name = self.kv.get("member_folder")
        return Root("/" + name.lower(), "/" + name, self.home_namespace_id)

    def top_root(self) -> Root:
        return Root("", "", self.root_namespace_id)

    def root_for_namespace(self, ns_id: str) -> Optional[Root]:
        if ns_id == self.root_namespace_id:
            return self.top_root()
        if ns_id == self.home_namespace_id:
            return self.home_root()
        return None

    def namespace_of(self, lower_full: str) -> str:
        """Which namespace a path commits into (what Dropbox's namespace lock is about)."""
        home = self.home_root()
        if home.lower and (lower_full == home.lower or lower_full.startswith(home.lower + "/")):
            return home.namespace_id
        return self.root_namespace_id if not self.team else self.kv.get("team_namespace_id")

    def resolve(self, path: str, root: Root, *, for_write: bool = False,
                allow_root: bool = False, allow_rev: bool = False) -> tuple[str, str]:
        """Map a request path to (full lower path, full display path as the client spelled it).
        `for_write`: the key is NFC-normalised (stored_key); otherwise only lower-cased
        (lookup_key), so a path in another Unicode form than NFC finds nothing.

        Accepts "/a/b", "" (the root, where allowed), "id:...", "ns:<id>/a/b" and, where
        allowed, "rev:<rev>". Raises LookupFailure / WriteFailure(malformed_path) for paths
        Dropbox rejects.
        """
        def malformed():
            if for_write:
                return WriteFailure(files.WriteError.malformed_path(None))
            return LookupFailure(files.LookupError.malformed_path(None))

        base_lower, base_display, rest = root.lower, root.display, path
        if path.startswith("id:"):
            ident, _, tail = path.partition("/")
            lower = self._by_id.get(ident)
            if lower is None:
                raise LookupFailure(files.LookupError.not_found)
            base_lower, base_display = lower, self.entries.data[lower]["path_display"]
            rest = "/" + tail if tail else ""
        elif path.startswith("ns:"):
            ns, _, tail = path[3:].partition("/")
            ns_root = self.root_for_namespace(ns)
            if ns_root is None:
                raise LookupFailure(files.LookupError.not_found)
            base_lower, base_display, rest = ns_root.lower, ns_root.display, "/" + tail if tail else ""
        elif path.startswith("rev:"):
            lower = self._by_rev.get(path[4:]) if allow_rev else None
            if lower is None:
                raise LookupFailure(files.LookupError.not_found)
            return lower, self.entries.data[lower]["path_display"]
        if rest == "":
            if not allow_root and base_lower == root.lower and not path.startswith("id:"):
                raise malformed()
            return base_lower, base_display
        if not rest.startswith("/") or rest.endswith("/"):
            raise malformed()
        parts = rest[1:].split("/")
        if any(p in ("", ".", "..") or "\x00" in p for p in parts) or len(rest) > 4096:
            raise malformed()
        # Writes are normalised (an NFD upload replaces or conflicts with the NFC name);
        # lookups are not (an NFD lookup of an existing name is not_found).
        key = stored_key(rest) if for_write else lookup_key(rest)
        return base_lower + key, base_display + rest

    def canonical_display(self, lower: str, display: str) -> str:
        """Existing ancestors keep the casing they were created with (an existing entry at the
        path itself keeps its casing too: callers reuse its path_display)."""
        parts_l, parts_d = lower.split("/"), display.split("/")
        if len(parts_l) != len(parts_d):     # exotic case-folding changed a length
            return display
        out = []
        for i in range(1, len(parts_l) - 1):
            key = "/".join(parts_l[: i + 1])
            entry = self.entries.data.get(key)
            out.append(entry["path_display"].rsplit("/", 1)[1] if entry else parts_d[i])
        out.append(parts_d[-1])     # the new name itself is spelled as the client asked
        return "/" + "/".join(out)

    def relative(self, full: str, root: Root) -> str:
        """Path as seen from `root` (component-wise, so case folding never shifts it)."""
        if not root.lower:
            return full
        parts = full.split("/")
        return "/" + "/".join(parts[root.depth + 1:]) if len(parts) > root.depth + 1 else ""

    def within(self, lower: str, root: Root) -> bool:
        return not root.lower or lower == root.lower or lower.startswith(root.lower + "/")

    # -- indexes --------------------------------------------------------------------------------

    def _index(self, lower: str, entry: dict) -> None:
        self._children.setdefault(_parent(lower), set()).add(lower)
        self._by_id[entry["id"]] = lower
        if entry["kind"] == "file":
            self._by_rev[entry["rev"]] = lower

    def _unindex(self, lower: str, entry: dict) -> None:
        siblings = self._children.get(_parent(lower))
        if siblings:
            siblings.discard(lower)
        self._by_id.pop(entry["id"], None)
        if entry["kind"] == "file":
            self._by_rev.pop(entry["rev"], None)

    def descendants(self, lower: str) -> list[str]:
        out, stack = [], [lower]
        while stack:
            for child in self._children.get(stack.pop(), ()):
                out.append(child)
                stack.append(child)
        return out

    # -- metadata --------------------------------------------------------------------------------

    def to_metadata(self, entry: dict, root: Root):
        lower = entry["path_display"].lower() if "path_lower" not in entry else entry["path_lower"]
        path_display = self.relative(entry["path_display"], root)
        path_lower = self.relative(lower, root)
        name = entry["path_display"].rsplit("/", 1)[1]
        if entry["kind"] == "folder":
            return files.FolderMetadata(name=name, id=entry["id"], path_lower=path_lower,
                                        path_display=path_display)
        return files.FileMetadata(
            name=name, id=entry["id"], client_modified=_parse_iso(entry["client_modified"]),
            server_modified=_parse_iso(entry["server_modified"]), rev=entry["rev"],
            size=entry["size"], path_lower=path_lower, path_display=path_display,
            content_hash=entry["content_hash"], is_downloadable=True)

    def deleted_metadata(self, tomb: dict, root: Root):
        return files.DeletedMetadata(
            name=tomb["path_display"].rsplit("/", 1)[1],
            path_lower=self.relative(tomb["path_lower"], root),
            path_display=self.relative(tomb["path_display"], root))

    def lookup(self, path: str, root: Root, *, allow_rev: bool = False) -> dict:
        lower, _ = self.resolve(path, root, allow_rev=allow_rev)
        entry = self.entries.data.get(lower)
        if entry is None:
            raise LookupFailure(files.LookupError.not_found)
        return entry

    def blob_path(self, entry: dict) -> Path:
        return self.root_dir / "blobs" / entry["blob"]

    # -- writes ---------------------------------------------------------------------------------

    def _put_folder(self, lower: str, display: str) -> dict:
        entry = {"kind": "folder", "path_display": display, "path_lower": lower,
                 "id": "id:" + secrets.token_urlsafe(16), "seq": self._next_seq()}
        self.entries.put(lower, entry)
        self._index(lower, entry)
        self.tombstones.delete(lower)
        return entry

    def _check_name(self, display: str) -> None:
        if display.rsplit("/", 1)[1].lower() in self.disallowed:
            raise WriteFailure(files.WriteError.disallowed_name)

    def _check_ancestors(self, lower: str) -> None:
        cursor = _parent(lower)
        while cursor:
            entry = self.entries.data.get(cursor)
            if entry is not None and entry["kind"] == "file":
                raise WriteFailure(files.WriteError.conflict(files.WriteConflictError.file_ancestor))
            cursor = _parent(cursor)

    def _make_parents(self, lower: str, display: str) -> None:
        parts_l, parts_d = lower.split("/"), display.split("/")
        for i in range(1, len(parts_l) - 1):
            key = "/".join(parts_l[: i + 1])
            if key not in self.entries.data:
                self._put_folder(key, "/".join(parts_d[: i + 1]))

    def _free_name(self, lower: str, display: str) -> tuple[str, str]:
        parent_l, parent_d = _parent(lower), display.rsplit("/", 1)[0]
        for candidate in _autorename_candidates(display.rsplit("/", 1)[1]):
            cand_lower = parent_l + "/" + stored_key(candidate)
            if cand_lower not in self.entries.data:
                return cand_lower, parent_d + "/" + candidate
        raise AssertionError("unreachable")

    def check_quota(self, lower: str, delta: int, quota: "Quota") -> None:
        if delta <= 0:
            return
        if quota.force_insufficient or self.total_used + delta > quota.allocated:
            raise WriteFailure(files.WriteError.insufficient_space)
        home = self.home_root()
        if (self.team and quota.member_allocated and self.within(lower, home)
                and self.used_under(home) + delta > quota.member_allocated):
            raise WriteFailure(files.WriteError.insufficient_space)

    def used_under(self, root: Root) -> int:
        if not root.lower:
            return self.total_used
        return sum(self.entries.data[k]["size"] for k in self.descendants(root.lower)
                   if self.entries.data[k]["kind"] == "file")

    def commit_file(self, root: Root, path: str, *, mode, autorename: bool, strict: bool,
                    client_modified: Optional[_dt.datetime], blob_src: Path, size: int,
                    content_hash: str, quota: "Quota") -> dict:
        """Commit bytes already on disk at `blob_src` to `path` following Dropbox's write-mode
        rules. Returns the resulting entry; `blob_src` is moved into the store (or left alone
        when the upload turned out identical to what is already there)."""
        lower, display = self.resolve(path, root, for_write=True)
        if lower == root.lower:
            raise WriteFailure(files.WriteError.malformed_path(None))
        self._check_name(display)
        with self.tx():
            display = self.canonical_display(lower, display)
            self._check_ancestors(lower)
            existing = self.entries.data.get(lower)
            replace = None
            if existing is not None and existing["kind"] == "folder":
                if not autorename:
                    raise WriteFailure(files.WriteError.conflict(files.WriteConflictError.folder))
                lower, display = self._free_name(lower, display)
            elif existing is not None:
                identical = existing["content_hash"] == content_hash and existing["size"] == size
                if mode.is_overwrite():
                    if identical:
                        return existing
                    replace = existing
                else:
                    rev_matches = mode.is_update() and existing["rev"] == mode.get_update()
                    if rev_matches and not identical:
                        replace = existing
                    elif identical and (rev_matches or not strict):
                        # Dropbox does not treat an identical upload as a conflict.
                        return existing
                    elif autorename:
                        lower, display = self._free_name(lower, display)
                    else:
                        raise WriteFailure(files.WriteError.conflict(files.WriteConflictError.file))
            elif mode.is_update() and strict:
                # strict_conflict: a rev that no longer exists is a conflict.
                if not autorename:
                    raise WriteFailure(files.WriteError.conflict(files.WriteConflictError.file))
            self.check_quota(lower, size - (replace["size"] if replace else 0), quota)

            if replace is not None:
                display = replace["path_display"]     # the first casing stays
            self._make_parents(lower, display)
            now = self.clock()
            blob = secrets.token_hex(16)
            os.replace(blob_src, self.root_dir / "blobs" / blob)
            if replace is not None:
                self._unindex(lower, replace)
                self.total_used -= replace["size"]
                (self.root_dir / "blobs" / replace["blob"]).unlink(missing_ok=True)
            client_ts = (client_modified.replace(tzinfo=_dt.timezone.utc).timestamp()
                         if client_modified is not None else now)
            entry = {
                "kind": "file", "path_display": display, "path_lower": lower,
                "id": replace["id"] if replace else "id:" + secrets.token_urlsafe(16),
                "rev": self._new_rev(), "size": size, "content_hash": content_hash,
                "client_modified": _iso(client_ts), "server_modified": _iso(now),
                "blob": blob, "seq": self._next_seq(),
            }
            self.entries.put(lower, entry)
            self._index(lower, entry)
            self.tombstones.delete(lower)
            self.total_used += size
            return entry

    def create_folder(self, root: Root, path: str, autorename: bool) -> dict:
        lower, display = self.resolve(path, root, for_write=True)
        self._check_name(display)
        with self.tx():
            display = self.canonical_display(lower, display)
            self._check_ancestors(lower)
            existing = self.entries.data.get(lower)
            if existing is not None:
                if not autorename:
                    tag = (files.WriteConflictError.folder if existing["kind"] == "folder"
                           else files.WriteConflictError.file)
                    raise WriteFailure(files.WriteError.conflict(tag))
                lower, display = self._free_name(lower, display)
            self._make_parents(lower, display)
            return self._put_folder(lower, display)

    def delete(self, root: Root, path: str) -> dict:
        lower, _ = self.resolve(path, root)
        with self.tx():
            entry = self.entries.data.get(lower)
            if entry is None:
                raise LookupFailure(files.LookupError.not_found)
            home = self.home_root()
            if self.team and lower == home.lower:
                raise WriteFailure(files.WriteError.no_write_permission)
            seq = self._next_seq()
            for key in [lower, *self.descendants(lower)]:
                victim = self.entries.data[key]
                self._unindex(key, victim)
                self.entries.delete(key)
                if victim["kind"] == "file":
                    self.total_used -= victim["size"]
                    (self.root_dir / "blobs" / victim["blob"]).unlink(missing_ok=True)
                self.tombstones.put(key, {"path_lower": key, "path_display": victim["path_display"],
                                          "seq": seq})
            self._children.pop(lower, None)
            return entry

    # -- list_folder ----------------------------------------------------------------------------

    def list_folder(self, root: Root, path: str, recursive: bool, limit: int):
        lower, _ = self.resolve(path, root, allow_root=True)
        with self.lock:
            if lower != root.lower or path.startswith(("id:", "ns:")):
                entry = self.entries.data.get(lower) if lower else None
                if lower and entry is None:
                    raise LookupFailure(files.LookupError.not_found)
                if entry is not None and entry["kind"] == "file":
                    raise LookupFailure(files.LookupError.not_folder)
            cursor = {"v": 1, "root": root.lower, "path": lower, "rec": recursive,
                      "lim": limit, "mode": "list", "base": self.seq(), "upto": None,
                      "after": None}
            return self._page(root, cursor)

    def list_folder_continue(self, root: Root, cursor_text: str):
        try:
            raw = base64.urlsafe_b64decode(cursor_text.encode("ascii") + b"==")
            cursor = json.loads(raw.decode("utf-8"))
            assert cursor.get("v") == 1
        except (ValueError, UnicodeError, binascii.Error, AssertionError, AttributeError):
            raise BadRequest("Invalid \"cursor\" parameter")
        if cursor["root"] != root.lower:
            raise CursorReset()
        with self.lock:
            if cursor["mode"] == "delta" and cursor["upto"] is None:
                # A new round of changes starts: fix its upper bound so pages are stable.
                cursor["upto"] = self.seq()
            return self._page(root, cursor)

    def _page(self, root: Root, cursor: dict):
        target, mode = cursor["path"], cursor["mode"]
        if cursor["rec"]:
            keys = self.descendants(target)
            if target and target != root.lower:
                keys.append(target)   # a recursive listing includes the folder itself
            tomb_keys = [k for k in self.tombstones.data if k.startswith(target + "/")]
        else:
            keys = list(self._children.get(target, ()))
            tomb_keys = [k for k in self.tombstones.data if _parent(k) == target]
        items = []
        if mode == "list":
            items = [(k, self.entries.data[k]) for k in keys
                     if self.entries.data[k]["seq"] <= cursor["base"]]
        else:
            lo, hi = cursor["base"], cursor["upto"]
            items = [(k, self.entries.data[k]) for k in keys
                     if lo < self.entries.data[k]["seq"] <= hi]
            items += [(k, dict(self.tombstones.data[k], kind="deleted")) for k in tomb_keys
                      if lo < self.tombstones.data[k]["seq"] <= hi and k not in self.entries.data]
        items.sort(key=lambda kv: kv[0])
        if cursor["after"] is not None:
            items = [kv for kv in items if kv[0] > cursor["after"]]
        page, has_more = items[: cursor["lim"]], len(items) > cursor["lim"]
        out = []
        for key, entry in page:
            if entry["kind"] == "deleted":
                out.append(self.deleted_metadata(entry, root))
            else:
                out.append(self.to_metadata(entry, root))
        nxt = dict(cursor)
        if has_more:
            nxt["after"] = page[-1][0]
        else:
            # Listing done: the next continue reports changes after this listing's snapshot.
            nxt.update(mode="delta", base=cursor["base"] if mode == "list" else cursor["upto"],
                       upto=None, after=None)
        text = base64.urlsafe_b64encode(json.dumps(nxt).encode("utf-8")).decode("ascii")
        return out, text.rstrip("="), has_more

    # -- upload sessions ------------------------------------------------------------------------

    def session_lock(self, session_id: str) -> threading.Lock:
        with self.lock:
            return self._session_locks.setdefault(session_id, threading.Lock())

    def session_file(self, session: dict) -> Path:
        return self.root_dir / "sessions" / (session["file"])

    def create_session(self, session_type: str, closed: bool = False) -> dict:
        # As long as Dropbox's (67 characters measured): append_batch carries them in a header.
        token = secrets.token_urlsafe(36)
        session = {"id": "pid_upload_session:" + token, "file": token + ".bin",
                   "type": session_type, "created": self.clock(), "offset": 0,
                   "closed": closed, "chunks": [], "end": None, "blocks": {}}
        with self.tx():
            self.sessions.put(session["id"], session)
        self.session_file(session).touch()
        return session

    def get_session(self, session_id: str, lifetime_s: float) -> dict:
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None:
                raise SessionFailure("not_found")
            if self.clock() - session["created"] > lifetime_s:
                self.drop_session(session_id)
                raise SessionFailure("not_found")
            return session

    def save_session(self, session: dict) -> None:
        with self.tx():
            if session["id"] in self.sessions.data:
                self.sessions.put(session["id"], session)

    def drop_session(self, session_id: str, keep_file: bool = False) -> None:
        with self.tx():
            session = self.sessions.get(session_id)
            if session is None:
                return
            self.sessions.delete(session_id)
            self._session_locks.pop(session_id, None)
        if not keep_file:
            self.session_file(session).unlink(missing_ok=True)

    def record_blocks(self, session: dict, offset: int, digests: list, body_len: int) -> None:
        """Remember the 4 MiB block digests a request delivered when it started on a block
        boundary, so finishing a big session does not re-read the whole file."""
        if offset % BLOCK:
            return
        first = offset // BLOCK
        for i, digest in enumerate(digests):
            length = min(BLOCK, body_len - i * BLOCK)
            session["blocks"][str(first + i)] = [digest.hex(), length]

    def session_content_hash(self, session: dict, total: int) -> str:
        if total == 0:
            return EMPTY_HASH
        digests = []
        with open(self.session_file(session), "rb") as fh:
            for i in range((total + BLOCK - 1) // BLOCK):
                want = min(BLOCK, total - i * BLOCK)
                known = session["blocks"].get(str(i))
                if known and known[1] == want:
                    digests.append(bytes.fromhex(known[0]))
                else:
                    fh.seek(i * BLOCK)
                    digests.append(hashlib.sha256(fh.read(want)).digest())
        return block_digests_hash(digests)


@dataclass
class Quota:
    allocated: int
    member_allocated: Optional[int] = None
    force_insufficient: bool = False


def file_content_hash(path: Path) -> str:
    """Dropbox content hash of a file on disk, with the SDK's own hasher."""
    from dropbox.content_hash import DropboxContentHasher
    hasher = DropboxContentHasher()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(BLOCK), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def root_info(store: Store):
    """The account's RootInfo: a team space, or a user's own root."""
    if store.team:
        return common.TeamRootInfo(root_namespace_id=store.root_namespace_id,
                                   home_namespace_id=store.home_namespace_id,
                                   home_path=store.home_root().display)
    return common.UserRootInfo(root_namespace_id=store.root_namespace_id,
                               home_namespace_id=store.home_namespace_id)


def path_root_error(store: Store):
    """The PathRootError Dropbox returns (HTTP 422) when a path root names the wrong root."""
    info = root_info(store)
    return common.PathRootError.invalid_root(info), info
