"""Putting one item into the local Dropbox folder for the desktop app to upload.

- Each file is written under a `.~` name (the app never syncs those), flushed to disk, and
  renamed when complete, so the app never uploads half a file; a file already at the final
  name is never replaced.
- The content hash (and a part's SHA-256, and its split file's whole SHA-256) is computed
  from the same bytes while they are copied, so every byte is read once.
- An item already in the Dropbox folder, or already in Dropbox (online-only, selective sync),
  is recognised by its bytes instead of copied again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

from . import deletion, split
from .content_hash import ContentHasher, bytes_content_hash, file_content_hash, hash_range
from .desktop_arrivals import same_content
from .desktop_folder import DropboxFolder
from .dropbox_client import RemoteFile, RemoteFolder
from .errors import FileProblem
from .journal import Item, Kind, State
from .localfs import legacy_temporary, temporary_sibling
from .source_check import WholeFileSha256, check_unchanged
from .status import join, put

# What `DesktopCopier.place` did, as its result line says it.
COPIED = "COPIED"
ALREADY_IN_FOLDER = "ALREADY IN DROPBOX FOLDER"
ALREADY_IN_DROPBOX = "ALREADY IN DROPBOX"


class SourceChanged(FileProblem):
    title = "File changed"


class LocalConflict(FileProblem):
    title = "Already in the Dropbox folder"


class RemoteConflict(FileProblem):
    title = "Already in Dropbox"


class _SideBySideHashes:
    """Feeds each copied block to several hashers, each in its own thread (hashlib releases the
    GIL on large blocks), so the content hash, a part's SHA-256 and the whole file's SHA-256 are
    computed side by side while the disk copies, from bytes read once."""

    _END = object()

    def __init__(self, updates: Sequence[Callable[[bytes], object]]):
        self._errors: list[BaseException] = []
        self._lanes: list[tuple[queue.Queue, threading.Thread]] = []
        for update in updates:
            lane: queue.Queue = queue.Queue(maxsize=2)  # bounded: memory stays a few blocks
            thread = threading.Thread(target=self._work, args=(lane, update), name="app-copy-hash", daemon=True)
            thread.start()
            self._lanes.append((lane, thread))

    def _work(self, lane: queue.Queue, update: Callable[[bytes], object]) -> None:
        while True:
            block = lane.get()
            if block is self._END:
                return
            if not self._errors:
                try:
                    update(block)
                except BaseException as exc:  # noqa: BLE001 - re-raised by close()
                    self._errors.append(exc)

    # The copy runs in the main thread: its waits on the hashers are sliced for Ctrl-C.
    def feed(self, block: bytes) -> None:
        for lane, _ in self._lanes:
            put(lane, block)

    def close(self) -> None:
        for lane, _ in self._lanes:
            put(lane, self._END)
        for _, thread in self._lanes:
            join(thread)
        self._lanes = []
        if self._errors:
            raise self._errors[0]


def _manifest_hashes(manifest: bytes) -> tuple[str, str]:
    """(content hash, SHA-256) of a manifest's bytes."""
    return bytes_content_hash(manifest), hashlib.sha256(manifest).hexdigest()


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as target:
        target.write(data)
        target.flush()
        os.fsync(target.fileno())


class DesktopCopier:
    """Places items into the Dropbox folder (`place`), recording their hashes on the item; the
    caller records the outcome in the journal."""

    def __init__(self, folder: DropboxFolder, copy_block: int, items_of: dict[str, list[Item]],
                 log: logging.Logger):
        """`copy_block`: bytes per read and write; `items_of`: source -> its items (a split
        file's parts, which its manifest lists)."""
        self.folder = folder
        self.copy_block = copy_block
        self.items_of = items_of
        self.log = log
        self.whole = WholeFileSha256()

    # -- the original ------------------------------------------------------------------------

    def unchanged(self, item: Item) -> None:
        """SourceChanged unless the original is as it was listed."""
        check_unchanged(item, problem=SourceChanged,
                        vanished="the original vanished or cannot be read ({reason}); it is tried again on the "
                                 "next run",
                        changed="the original changed since it was listed; it is copied on the next run, once "
                                "nothing writes to it any more")

    def _whole_sha(self, item: Item):
        """The split file's running SHA-256 to feed this part to, or None."""
        return self.whole.begin(item.source, item.part_offset) if item.kind == Kind.PART else None

    def _hash_source(self, item: Item) -> ContentHasher:
        """Hash the item's bytes of the original (to compare with a copy already in place)."""
        whole = self._whole_sha(item)
        hasher = hash_range(Path(item.source), item.part_offset, item.length, with_sha256=item.kind == Kind.PART,
                            tee=whole)
        if hasher.size != item.length:
            raise SourceChanged("the original became shorter; it is tried again on the next run", paths=[item.source])
        if whole is not None:
            self.whole.finish(item.source, item.part_offset + item.length, whole)
        return hasher

    def manifest_bytes(self, item: Item) -> bytes:
        """The manifest of a split file whose parts are all copied (FileProblem if not)."""
        parts = [i for i in self.items_of[item.source] if i.kind == Kind.PART]
        missing = [p.destination for p in parts if p.state not in (State.COPIED, State.DONE) or not p.sha256]
        if missing:
            raise FileProblem(f"its parts are not all copied yet ({', '.join(missing[:3])}); the manifest is "
                              "written on the next run", paths=[item.source])
        digest = self.whole.digest(item.source, item.source_size)
        if digest is None:
            self.log.info("Reading %s once more for the SHA-256 its manifest records (its parts were copied "
                          "in an earlier run).", item.source)
            digest = split.sha256_file(item.source)
        self.unchanged(item)
        name = split.parse_manifest_name(item.destination.rsplit("/", 1)[1]) or ""
        plan = [split.PartPlan(index, p.part_offset, p.length) for index, p in enumerate(parts, start=1)]
        manifest = split.build_manifest(name, item.source_size, digest, item.source_mtime_ns / 1e9, plan,
                                        [p.sha256 for p in parts], part_size=parts[0].length)
        return manifest.to_bytes()

    # -- copying -----------------------------------------------------------------------------

    def _copy_bytes(self, item: Item, temporary: Path, progress: tqdm) -> None:
        """Copy the item's bytes to `temporary`, flushed to disk, and record their hashes on it."""
        hasher = ContentHasher(with_sha256=False)
        part_sha = hashlib.sha256() if item.kind == Kind.PART else None
        whole = self._whole_sha(item)
        hashes = _SideBySideHashes([sha.update for sha in (hasher, part_sha, whole) if sha is not None])
        try:
            with open(item.source, "rb", buffering=0) as source, open(temporary, "wb") as target:
                source.seek(item.part_offset)
                remaining = item.length
                while remaining > 0:
                    block = source.read(min(self.copy_block, remaining))
                    if not block:
                        raise SourceChanged("the original became shorter while it was copied; it is copied "
                                            "again on the next run", paths=[item.source])
                    hashes.feed(block)
                    target.write(block)
                    remaining -= len(block)
                    progress.update(len(block))
                target.flush()
                os.fsync(target.fileno())
            hashes.close()
        except BaseException:
            try:
                hashes.close()
            except BaseException:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        if whole is not None:
            self.whole.finish(item.source, item.part_offset + item.length, whole)
        item.content_hash = hasher.content_hash()
        item.sha256 = part_sha.hexdigest() if part_sha is not None else None

    def publish(self, temporary: Path, destination: Path, mtime_ns: int) -> None:
        """Give the finished copy its real name (the moment the app may start uploading it);
        LocalConflict, and the copy left under its temporary name, if a file is there."""
        os.utime(temporary, ns=(time.time_ns(), mtime_ns))  # Dropbox shows the original's date
        # On POSIX a rename replaces silently, so look first (Windows refuses by itself).
        if destination.exists():
            raise LocalConflict(f"a file appeared at {destination} while this one was being copied; it was not "
                                "overwritten", paths=[destination])
        os.rename(temporary, destination)

    def _existing_copy_matches(self, item: Item, destination: Path, manifest: bytes | None) -> bool:
        """A file is already at the destination in the Dropbox folder: is it this item?"""
        if destination.is_dir():
            raise LocalConflict(f"a folder is in the way at {destination}; rename or move it", paths=[destination])
        if destination.stat().st_size != (len(manifest) if manifest is not None else item.length):
            return False
        if manifest is not None:
            same = destination.read_bytes() == manifest
            if same:
                item.content_hash, item.sha256 = _manifest_hashes(manifest)
            return same
        mine = self._hash_source(item)
        if file_content_hash(destination) != mine.content_hash():
            return False
        item.content_hash = mine.content_hash()
        item.sha256 = mine.sha256() if item.kind == Kind.PART else None
        return True

    def _remove_leftovers(self, destination: Path, temporary: Path) -> None:
        for leftover in (temporary, legacy_temporary(destination)):
            if leftover is not None and leftover.exists():
                self.log.info("Removing %s, left half-written by an interrupted run.", leftover)
                deletion.discard_temporary(leftover)

    def place(self, item: Item, remote: RemoteFile | RemoteFolder | None, progress: tqdm) -> str:
        """Put one item into the Dropbox folder, or recognise it is already there or already in
        Dropbox (`remote`: what Dropbox holds at its path). Returns COPIED, ALREADY_IN_FOLDER
        or ALREADY_IN_DROPBOX (then its remote_rev and remote_path are set); `progress` moves
        by the bytes copied. Raises FileProblem (SourceChanged, LocalConflict,
        RemoteConflict) for this item, OSError when the copy fails (ENOSPC: the disk is full)."""
        destination = self.folder.local_path(item.destination)
        # A `.~` name: the desktop app does not sync the copy before it is complete.
        temporary = temporary_sibling(destination, "partial")
        manifest = self.manifest_bytes(item) if item.kind == Kind.MANIFEST else None
        if manifest is None:
            self.unchanged(item)
        self._remove_leftovers(destination, temporary)
        if destination.exists() or destination.is_symlink():
            if not self._existing_copy_matches(item, destination, manifest):
                item.content_hash = item.sha256 = None
                raise LocalConflict(f"a different file already exists at {destination} in the Dropbox folder; it "
                                    "was not overwritten. Move it away (or remove the row) and run again. (If it "
                                    "is this tool's copy of an earlier version of the original, which changed "
                                    "since, delete it from the Dropbox folder.)", paths=[destination])
            return ALREADY_IN_FOLDER
        if remote is not None:
            self._check_already_in_dropbox(item, remote, manifest)
            return ALREADY_IN_DROPBOX
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            if manifest is not None:
                _fsync_write(temporary, manifest)
                item.content_hash, item.sha256 = _manifest_hashes(manifest)
            else:
                self._copy_bytes(item, temporary, progress)
                self.unchanged(item)
            self.publish(temporary, destination, item.source_mtime_ns)
        except BaseException:
            deletion.discard_temporary_quietly(temporary)
            raise
        return COPIED

    def _check_already_in_dropbox(self, item: Item, remote: RemoteFile | RemoteFolder, manifest: bytes | None) -> None:
        """Dropbox has something at this path although the Dropbox folder does not (online-only
        or selective sync). Copying would make the app create a 'conflicted copy': RemoteConflict
        unless it is this item's bytes."""
        length = len(manifest) if manifest is not None else item.length
        if isinstance(remote, RemoteFile) and remote.size == length:
            if manifest is not None:
                local_hash, sha = _manifest_hashes(manifest)
            else:
                hasher = self._hash_source(item)
                local_hash, sha = hasher.content_hash(), hasher.sha256() if item.kind == Kind.PART else None
            if same_content(remote, local_hash, length):
                item.content_hash, item.sha256, item.remote_rev = local_hash, sha, remote.rev
                item.remote_path, item.hash_local = remote.path_display, 1
                return
        raise RemoteConflict(f"a different {'folder' if isinstance(remote, RemoteFolder) else 'file'} already "
                             f"exists at {item.destination} in Dropbox (not in the local Dropbox folder, e.g. "
                             "online-only); copying would make the Dropbox app create a 'conflicted copy'. Nothing "
                             "was copied: move or rename one of them and run again", paths=[item.source])
