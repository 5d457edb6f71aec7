"""Dropbox desktop-app simulator for the Dropbox test server (test infrastructure only).

One job: play the Dropbox desktop app for APP-mode tests — watch a local folder and sync new or
changed files into the test server after a delay, at a limited throughput, skipping the names
the real app ignores and temporary `.~` and `~$` names; it can stall (the app hung), resume, and upload a
corrupted copy once (to prove the caller verifies content hashes, not mere existence).

It writes straight into the server's store (no HTTP), so its traffic never shows in the API
request log, just as the real app's traffic is not API traffic. Local deletions are not synced.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Optional

IGNORED_NAMES = frozenset({"desktop.ini", "thumbs.db", ".ds_store", "._.ds_store", ".dropbox",
                           ".dropbox.attr", "icon\r"})
IGNORED_DIRS = frozenset({".dropbox.cache"})
COPY_SLICE = 256 * 1024


def ignored(name: str) -> bool:
    """Names the real desktop app never uploads: the system files above, `.~` temporary names,
    and `~$` Office owner/lock files (Dropbox help, "Files that won't sync": Microsoft Office
    temporary files starting with `~$` or `.~` stay on the computer; issue 13 of this project saw
    a `~$report.docx` wait forever)."""
    lower = name.lower()
    return lower in IGNORED_NAMES or name.startswith((".~", "~$"))


class DesktopAppSimulator(threading.Thread):
    """Sync `local_folder` into `server` under `dropbox_root` (relative to the account's home,
    or to the team space with team_space=True).

    delay_s: how long a new/changed file waits before its upload starts.
    throughput_bps: upload speed (bytes/s); None = as fast as the disk allows.
    """

    def __init__(self, server, local_folder, dropbox_root: str = "/", delay_s: float = 0.0,
                 throughput_bps: Optional[float] = None, *, poll_interval_s: float = 0.1,
                 team_space: bool = False):
        super().__init__(name="desktop-app-simulator", daemon=True)
        self.server = server
        self.local_folder = Path(local_folder)
        self.dropbox_root = "/" + dropbox_root.strip("/") if dropbox_root.strip("/") else ""
        self.delay_s = delay_s
        self.throughput_bps = throughput_bps
        self.poll_interval_s = poll_interval_s
        self.team_space = team_space
        # True: each pass's uploads appear in Dropbox at once (tests that count lookups need that).
        self.atomic = False
        self.uploaded: list[tuple[str, str]] = []     # (relative path, dropbox path), in order
        self.errors: list[tuple[str, str]] = []       # (relative path, message)
        self._synced: dict[str, tuple] = {}           # relative path -> signature uploaded
        self._pending: dict[str, tuple] = {}          # relative path -> (signature, first seen)
        self._corrupt: set[str] = set()
        self._halt = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._cond = threading.Condition()
        self._scan_gen = 0
        self._idle_gen = -1

    # -- control ----------------------------------------------------------------------------------

    def stall(self) -> None:
        """Stop syncing (an upload in progress pauses where it is)."""
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    @property
    def stalled(self) -> bool:
        return not self._go.is_set()

    def corrupt_next(self, relative_path: str) -> None:
        """The next upload of this file (path relative to local_folder) gets one byte flipped."""
        self._corrupt.add(Path(relative_path).as_posix())

    def stop(self, timeout: float = 10) -> None:
        self._halt.set()
        self._go.set()
        if self.is_alive():
            self.join(timeout)

    def wait_idle(self, timeout: float = 30) -> bool:
        """Block until a scan that started after this call found nothing left to upload.
        False on timeout (for example while stalled)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            start_gen = self._scan_gen
            while self._idle_gen <= start_gen:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.1))
            return True

    # -- the app loop -----------------------------------------------------------------------------

    def run(self) -> None:
        while not self._halt.is_set():
            self._go.wait()
            if self._halt.is_set():
                break
            with self._cond:
                self._scan_gen += 1
                gen = self._scan_gen
            busy = self._sync_once()
            if not busy and not self.stalled:
                with self._cond:
                    self._idle_gen = gen
                    self._cond.notify_all()
            self._halt.wait(self.poll_interval_s)

    def _scan(self) -> dict:
        found = {}
        for dirpath, dirnames, filenames in os.walk(self.local_folder):
            dirnames[:] = [d for d in dirnames if not ignored(d) and d.lower() not in IGNORED_DIRS]
            for name in filenames:
                if ignored(name):
                    continue
                full = Path(dirpath) / name
                try:
                    st = full.stat()
                except OSError:
                    continue
                rel = full.relative_to(self.local_folder).as_posix()
                found[rel] = (st.st_size, st.st_mtime_ns)
        return found

    def _sync_once(self) -> bool:
        """One pass; True while work remains (pending files or a failed attempt)."""
        now = time.monotonic()
        scanned = self._scan()
        # A file that left the folder and comes back is new to the app, even with its old date.
        for rel in [rel for rel in self._synced if rel not in scanned]:
            del self._synced[rel]
        for rel, sig in scanned.items():
            if self._synced.get(rel) == sig:
                self._pending.pop(rel, None)
                continue
            seen = self._pending.get(rel)
            if seen is None or seen[0] != sig:
                self._pending[rel] = (sig, now)
        # atomic: the whole pass under the store's lock, so an API client sees all of it or none.
        with self.server.store.lock if self.atomic else contextlib.nullcontext():
            for rel, (sig, first_seen) in sorted(self._pending.items()):
                if self._halt.is_set() or self.stalled:
                    return True
                if time.monotonic() - first_seen < self.delay_s:
                    continue
                if self._upload(rel, sig):
                    self._pending.pop(rel, None)
        return bool(self._pending)

    def _upload(self, rel: str, sig: tuple) -> bool:
        source = self.local_folder / rel
        tmp = self.server.root_dir / "tmp" / ("desktop-" + secrets.token_hex(8))
        try:
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                while True:
                    self._go.wait()
                    if self._halt.is_set():
                        return False
                    chunk = src.read(COPY_SLICE)
                    if not chunk:
                        break
                    dst.write(chunk)
                    if self.throughput_bps:
                        time.sleep(len(chunk) / self.throughput_bps)
            st = source.stat()
            if (st.st_size, st.st_mtime_ns) != sig:
                return False          # changed while being read: try again on a later pass
            if rel in self._corrupt and st.st_size > 0:
                self._corrupt.discard(rel)
                with open(tmp, "r+b") as fh:
                    fh.seek(st.st_size // 2)
                    byte = fh.read(1)
                    fh.seek(st.st_size // 2)
                    fh.write(bytes([byte[0] ^ 0xFF]))
            target = self.dropbox_root + "/" + rel
            modified = _dt.datetime.fromtimestamp(st.st_mtime_ns // 10 ** 9, _dt.timezone.utc)
            try:
                self.server.put_file(target, tmp, client_modified=modified.replace(tzinfo=None),
                                     team_space=self.team_space)
            except Exception as exc:      # the real app shows a sync error and moves on
                self.errors.append((rel, repr(exc)))
            else:
                self.uploaded.append((rel, target))
            self._synced[rel] = sig
            return True
        except FileNotFoundError:
            return True               # vanished (renamed/deleted) before upload: nothing to do
        finally:
            tmp.unlink(missing_ok=True)
