"""The deletion gate: the only module of this package that removes anything from a disk.

Every deletion of a user's data goes through one of the `delete_*` functions here, and each of
them deletes a file only against proof taken in this run, at the moment of deleting:

- after an upload (API or desktop app): Dropbox answers now, for the account and root namespace
  in use, with the content hash of the local bytes for every item of the original (a file, or
  every part and the manifest of a split file) - see `UploadProof`; and the local file is the
  same file, unchanged since those bytes were hashed (size, mtime_ns, file id);
- after zipping: the archive was tested member by member in this run and the file is unchanged
  since it was zipped (`delete_unchanged`);
- after a join: the joined file matched its manifest (size and SHA-256) in this run; without a
  manifest parts are never deleted (`delete_joined_parts`);
- after an unzip: every member is in place (`delete_extracted_archive`).

Our journal says what we did, never what is true now: it is only used to write ahead that a
deletion is under way ("deleting"), so that a rerun after a crash between the unlink and the
bookkeeping finishes the bookkeeping instead of failing on the missing file.

This tool's own temporary files (`.partial` copies, archive temps, staging folders) are removed
through `discard_temporary`, so that a test can check that no other module removes anything.
"""

from __future__ import annotations

import concurrent.futures as futures
import logging
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .content_hash import hash_range
from .errors import ArchiveError
from .names import case_key

# Up to this many Dropbox paths are checked with one get_metadata call each; beyond, one
# recursive list_folder of their topmost folders costs pages (2,000 entries each), not calls.
METADATA_LOOKUP_LIMIT = 200
LOOKUP_WORKERS = 8
# Originals deleted per journal transaction: the write-ahead marks cost two transactions per
# batch instead of two per file (measured: 10,000 originals in 1.0 s with one file per transaction).
WRITE_AHEAD_BATCH = 1000

WINDOWS = os.name == "nt"
DELETED = "deleted"
ALREADY_GONE = "already gone"
CHANGED = "changed"
FAILED = "failed"


# ============================================================================ local identity


@dataclass(frozen=True)
class LocalIdentity:
    """What makes a local file "the same, unchanged": size (bytes), modification time (ns) and
    the file id (st_dev, st_ino; on Windows os.stat gives the NTFS file index). A file id of 0
    is unknown (os.scandir on Windows does not fill it) and is then not compared."""

    size: int
    mtime_ns: int
    device: int = 0
    inode: int = 0

    @classmethod
    def from_stat(cls, info: os.stat_result) -> "LocalIdentity":
        return cls(info.st_size, info.st_mtime_ns, info.st_dev, info.st_ino)

    @classmethod
    def of(cls, path: Path | str) -> "LocalIdentity":
        """Raises OSError (FileNotFoundError when the path is gone)."""
        return cls.from_stat(os.stat(path, follow_symlinks=False))

    def file_id(self) -> str | None:
        return f"{self.device}:{self.inode}" if self.inode else None

    @classmethod
    def from_record(cls, size: int, mtime_ns: int, file_id: str | None) -> "LocalIdentity":
        device, _, inode = (file_id or "0:0").partition(":")
        return cls(size, mtime_ns, int(device or 0), int(inode or 0))

    def same_file(self, now: "LocalIdentity") -> bool:
        if (self.size, self.mtime_ns) != (now.size, now.mtime_ns):
            return False
        if self.inode and now.inode:
            return (self.device, self.inode) == (now.device, now.inode)
        return True


# ============================================================================ the unlink itself


def _unlink(path: Path | str) -> None:
    try:
        os.unlink(path)
    except PermissionError:
        # Windows refuses to delete a file with the read-only attribute (instrument data, NAS
        # copies): the user asked for it to go, so the attribute is cleared first.
        if not WINDOWS:
            raise
        os.chmod(path, stat.S_IWRITE)
        os.unlink(path)


def delete_unchanged(path: Path | str, expected: LocalIdentity) -> tuple[str, str | None]:
    """Delete `path` only if it is still a regular file identical in identity to `expected`.

    Returns (DELETED | ALREADY_GONE | CHANGED | FAILED, reason or None); never raises OSError."""
    try:
        info = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return ALREADY_GONE, None
    except OSError as exc:
        return FAILED, f"cannot be checked ({exc.strerror})"
    if not stat.S_ISREG(info.st_mode) or not expected.same_file(LocalIdentity.from_stat(info)):
        return CHANGED, "it changed since it was checked"
    try:
        _unlink(path)
    except FileNotFoundError:
        return ALREADY_GONE, None
    except OSError as exc:
        return FAILED, f"could not be deleted ({exc.strerror})"
    return DELETED, None


def delete_link_if_same(path: Path | str, target: str) -> tuple[str, str | None]:
    """Delete a symbolic link only while it still points where it pointed when archived."""
    try:
        if os.readlink(path) != target:
            return CHANGED, "the link points elsewhere now"
        os.unlink(path)
    except FileNotFoundError:
        return ALREADY_GONE, None
    except OSError as exc:
        return FAILED, f"could not be deleted ({exc.strerror})"
    return DELETED, None


def remove_empty_folders(folders: Iterable[Path], *, keep: Path | None = None) -> int:
    """Remove these folders, deepest first, where they are empty; `keep` itself stays. Only
    empty folders can go (rmdir refuses others), so files that were not deleted stay."""
    removed = 0
    keep_text = os.fspath(keep) if keep is not None else None
    for folder in sorted(set(os.fspath(f) for f in folders), key=lambda f: f.count(os.sep), reverse=True):
        if folder == keep_text:
            continue
        try:
            os.rmdir(folder)
            removed += 1
        except OSError:
            pass
    return removed


def parents_up_to(path: Path | str, root: Path | str) -> list[str]:
    """The folders between `path` and `root` (root excluded), for remove_empty_folders; plain
    strings, since this runs once per deleted file (pathlib costs 20 us a step here)."""
    result = []
    root = os.fspath(root).rstrip(os.sep) or os.sep
    parent = os.path.dirname(os.fspath(path))
    while parent != root and parent.startswith(root + os.sep if root != os.sep else os.sep):
        result.append(parent)
        parent = os.path.dirname(parent)
    return result


def discard_temporary(path: Path | str, *, missing_ok: bool = True) -> None:
    """Remove one of this tool's own temporary files or staging folders (never user data: the
    callers create these names themselves). Raises OSError when it cannot be removed."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def discard_temporary_quietly(path: Path | str) -> None:
    """discard_temporary for clean-up paths that must not hide the original error."""
    try:
        discard_temporary(path)
    except OSError:
        pass


# ============================================================================ proof from Dropbox


@dataclass(frozen=True)
class RemoteExpectation:
    """One Dropbox file that must hold given bytes: a whole file, a part or a manifest.
    `offset`/`length` locate a part's bytes in the local original (bytes)."""

    dropbox_path: str
    content_hash: str | None
    offset: int = 0
    length: int | None = None  # None: a manifest, built by this tool (its hash alone decides)
    kind: str = "file"  # journal.Kind text (this foundation module does not import the journal)


@dataclass
class UploadedOriginal:
    """A local original and what Dropbox must hold for it to be deleted.

    `identity` is the file as it was when its content hashes were computed; `hashes_local` is
    False when a hash came from Dropbox rather than from the local bytes (a quick size-and-date
    match), in which case the gate hashes the local bytes itself before trusting it."""

    path: Path
    identity: LocalIdentity
    expected: list[RemoteExpectation]
    hashes_local: bool = True
    row_root: Path | None = None


@dataclass
class Verdict:
    path: Path
    proven: bool
    reason: str | None = None  # why not, in words for the log
    missing: bool = False      # Dropbox does not hold it at all (as opposed to different bytes)


def uploaded_original(items: Sequence, row_root: Path | None = None) -> UploadedOriginal:
    """The proof obligation for one original from its journal items (journal.Item: a file, or
    parts and a manifest), all of one source."""
    first = items[0]
    expected = [RemoteExpectation(item.remote_key_path, item.content_hash, item.part_offset,
                                  None if item.kind == "manifest" else item.length, item.kind) for item in items]
    return UploadedOriginal(Path(first.source),
                            LocalIdentity.from_record(first.source_size, first.source_mtime_ns, first.source_id),
                            expected, all(item.hash_local or item.kind == "manifest" for item in items),
                            row_root)


def topmost_folders(folders: Iterable[str]) -> list[str]:
    """The fewest of these Dropbox folders whose recursive listings cover them all (whole path
    components compared as Dropbox does); each keeps its own spelling, since case folding can
    change a name (ß -> ss)."""
    by_key = {case_key(f): f for f in folders}
    kept: list[str] = []
    for key in sorted(by_key, key=lambda k: (k.count("/"), k)):
        if not any(top == "/" or key == top or key.startswith(top + "/") for top in kept):
            kept.append(key)
    return [by_key[key] for key in kept]


def parent_folder(dropbox_path: str) -> str:
    return dropbox_path.rsplit("/", 1)[0] or "/"


class RemoteSnapshot:
    """What Dropbox holds now at a set of paths, by case-insensitive path.

    Few paths: one files/get_metadata each (8 at a time). Many: one recursive files/list_folder
    of their topmost folders (Dropbox pages of up to 2,000 entries), so proving 100,000 files
    costs about 50 pages. Source: https://www.dropbox.com/developers/documentation/http/documentation
    (files/get_metadata, files/list_folder with recursive=true, limit <= 2000)."""

    def __init__(self, client, paths: Sequence[str], *, limit: int = METADATA_LOOKUP_LIMIT):
        self.calls = 0
        self._found: dict[str, object] = {}
        paths = list(dict.fromkeys(paths))
        if len(paths) <= limit:
            with futures.ThreadPoolExecutor(max_workers=LOOKUP_WORKERS, thread_name_prefix="proof") as pool:
                for path, remote in zip(paths, pool.map(client.metadata, paths)):
                    if remote is not None:
                        self._found[case_key(path)] = remote
            self.calls = len(paths)
            return
        self._list(client, topmost_folders(parent_folder(p) for p in paths))

    @classmethod
    def of_folders(cls, client, folders: Iterable[str]) -> "RemoteSnapshot":
        """Everything below these Dropbox folders (recursive listings)."""
        snapshot = cls(client, [])
        snapshot._list(client, topmost_folders(f.rstrip("/") or "/" for f in folders))
        return snapshot

    def _list(self, client, folders: Sequence[str]) -> None:
        for folder in folders:
            for remote in client.iter_entries_or_empty(folder):
                self._found[case_key(remote.path_display)] = remote
            self.calls += 1

    def entries(self) -> list:
        return list(self._found.values())

    def get(self, dropbox_path: str):
        return self._found.get(case_key(dropbox_path))


def judge(original: UploadedOriginal, snapshot: RemoteSnapshot, *, check_disk: bool = True) -> Verdict:
    """Is `original` proven to be in Dropbox now, identical, and unchanged on disk?

    `check_disk` False leaves the disk to the caller when the hashes came from the disk: the
    deletion itself checks the file's identity right before the unlink (delete_unchanged)."""
    if check_disk or not original.hashes_local:
        try:
            now = LocalIdentity.of(original.path)
        except FileNotFoundError:
            return Verdict(original.path, False, "it is no longer on the disk")
        except OSError as exc:
            return Verdict(original.path, False, f"it cannot be checked ({exc.strerror})")
        if not original.identity.same_file(now):
            return Verdict(original.path, False, "it changed since it was uploaded; it is sent again on the next run")
    for expected in original.expected:
        remote = snapshot.get(expected.dropbox_path)
        content_hash = getattr(remote, "content_hash", None)
        if remote is None:
            return Verdict(original.path, False, f"Dropbox no longer holds {expected.dropbox_path} (deleted or "
                                                 "moved by someone); it is sent again on the next run", missing=True)
        if content_hash is None or not hasattr(remote, "size"):
            return Verdict(original.path, False, f"Dropbox holds a folder at {expected.dropbox_path}")
        if expected.length is not None and remote.size != expected.length:
            return Verdict(original.path, False, f"Dropbox holds {remote.size:,} bytes at {expected.dropbox_path}, "
                                                 f"not {expected.length:,}")
        if content_hash != expected.content_hash:
            return Verdict(original.path, False, f"Dropbox holds different bytes at {expected.dropbox_path} "
                                                 "(content hash differs)")
        if not original.hashes_local and expected.length is not None:
            # The recorded hash came from Dropbox (size and date matched): hash the local bytes.
            local = hash_range(original.path, expected.offset, expected.length)
            if local.content_hash() != content_hash:
                return Verdict(original.path, False, f"the local bytes differ from {expected.dropbox_path} in "
                                                     "Dropbox (content hash)")
    if not original.hashes_local:  # the file was read just now: it must not have changed meanwhile
        try:
            if not original.identity.same_file(LocalIdentity.of(original.path)):
                return Verdict(original.path, False, "it changed while it was being checked")
        except OSError:
            return Verdict(original.path, False, "it vanished while it was being checked")
    return Verdict(original.path, True)


@dataclass
class DeletionReport:
    deleted: list[Path] = field(default_factory=list)
    kept: list[tuple[Path, str]] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)  # kept because Dropbox no longer holds them
    remote_calls: int = 0
    remote_seconds: float = 0.0  # asking Dropbox (the listing or the metadata calls)
    local_seconds: float = 0.0   # checking each file on disk and deleting it


def delete_uploaded_originals(client, originals: Sequence[UploadedOriginal], *, journal, log: logging.Logger,
                              protected: Callable[[Path], bool] | None = None,
                              snapshot: RemoteSnapshot | None = None) -> DeletionReport:
    """Delete each original that Dropbox holds identically now and that did not change.

    `client` is a dropbox_client.DropboxClient (or anything with metadata() and
    iter_entries_or_empty()); one snapshot of Dropbox is taken for all of `originals`, just
    before deleting. `protected(path)` True keeps a path whatever the proof (e.g. inside the
    local Dropbox folder). Raises the client's errors (network, auth) before anything is deleted;
    a failure of one unlink is reported and the others go on."""
    report = DeletionReport()
    if not originals:
        return report
    started = time.monotonic()
    if snapshot is None:
        snapshot = RemoteSnapshot(client, [e.dropbox_path for o in originals for e in o.expected])
    report.remote_calls = snapshot.calls
    report.remote_seconds = time.monotonic() - started
    started = time.monotonic()
    emptied: dict[Path, set[str]] = {}
    seen_folders: set[str] = set()
    proven: list[UploadedOriginal] = []
    for original in originals:
        if protected is not None and protected(original.path):
            report.kept.append((original.path, "it lies inside a folder this tool never deletes from"))
            continue
        verdict = judge(original, snapshot, check_disk=False)
        if verdict.proven:
            proven.append(original)
            continue
        report.kept.append((original.path, verdict.reason or "not proven"))
        if verdict.missing:
            report.missing.append(original.path)
    for first in range(0, len(proven), WRITE_AHEAD_BATCH):
        batch_deleted: list[str] = []
        for original, (outcome, reason) in _delete_batch(proven[first:first + WRITE_AHEAD_BATCH], journal):
            if outcome in (DELETED, ALREADY_GONE):
                report.deleted.append(original.path)
                batch_deleted.append(os.fspath(original.path))
                if original.row_root is not None and original.row_root != original.path:
                    folder = os.path.dirname(os.fspath(original.path))
                    if folder not in seen_folders:  # files of one folder come together: once per folder
                        seen_folders.add(folder)
                        emptied.setdefault(original.row_root, set()).update(parents_up_to(original.path,
                                                                                          original.row_root))
            else:
                report.kept.append((original.path, "it changed since it was uploaded; it is sent again on the "
                                    "next run" if outcome == CHANGED else reason or outcome))
        if batch_deleted:
            # Every path in the log, one record per batch (a record per file cost more than the
            # unlinks); none on screen, where 300,000 lines would drown everything else.
            log.debug("DELETED\t%s", "\nDELETED\t".join(batch_deleted))
    for root, folders in emptied.items():
        remove_empty_folders(folders, keep=root)
    if report.deleted:
        log.info("DELETED %d original(s): Dropbox holds identical bytes now (content hash), and each was unchanged "
                 "on disk (the log lists them).", len(report.deleted))
    report.local_seconds = time.monotonic() - started
    return report


def _delete_batch(originals: Sequence[UploadedOriginal], journal) -> list[tuple[UploadedOriginal, tuple]]:
    """Write ahead 'deleting' for the whole batch (one transaction), unlink each, then record
    'deleted' or take the mark back (one transaction). A crash in between leaves marks that the
    next run settles by looking at the disk (Journal.finish_interrupted_deletions)."""
    paths = [str(original.path) for original in originals]
    if journal is not None:
        journal.mark_sources_deleting(paths)
    results = [(original, delete_unchanged(original.path, original.identity)) for original in originals]
    if journal is not None:
        journal.settle_sources([str(o.path) for o, (outcome, _) in results if outcome in (DELETED, ALREADY_GONE)],
                               [str(o.path) for o, (outcome, _) in results if outcome not in (DELETED, ALREADY_GONE)])
    return results


# ============================================================================ joins and unzips


class NotProven(ArchiveError):
    """A deletion was asked for without the proof the gate needs; nothing was deleted."""

    title = "Nothing deleted"


def delete_joined_parts(parts: Sequence[tuple[Path, LocalIdentity]], manifest_path: Path | None, *,
                        joined: Path, joined_size: int, manifest_verified: bool,
                        log: logging.Logger) -> int:
    """Delete the parts (then the manifest) of a split file whose join was verified in this
    run against its manifest (size and SHA-256 of every part and of the whole file).

    `parts` are (path, identity when hashed during the join). Raises NotProven when there is no
    verified manifest, or when the joined file is not there with its size; returns the bytes
    freed. A part that changed since it was joined is kept (NotProven names it)."""
    if not manifest_verified or manifest_path is None:
        raise NotProven("the parts were kept: without a manifest (parts made by the original tool, or the "
                        "manifest is missing) the joined file cannot be proven complete - a missing last part "
                        "would go unnoticed. Check the joined file (size, opening it), then delete the parts by "
                        "hand.", paths=[joined])
    try:
        if os.stat(joined).st_size != joined_size:
            raise NotProven(f"the parts were kept: {joined} does not have the size its manifest gives "
                            f"({joined_size:,} bytes).", paths=[joined])
    except FileNotFoundError:
        raise NotProven(f"the parts were kept: the joined file {joined} is not there.", paths=[joined]) from None
    freed = 0
    kept: list[str] = []
    for path, identity in parts:
        outcome, reason = delete_unchanged(path, identity)
        if outcome == DELETED:
            freed += identity.size
        elif outcome != ALREADY_GONE:
            kept.append(f"{path.name} ({reason})")
    if kept:
        raise NotProven(f"{joined.name} was joined and verified, but these parts were kept: {', '.join(kept)}. "
                        "Delete them by hand once you have checked them.", paths=[joined])
    try:
        os.unlink(manifest_path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("The manifest %s could not be deleted (%s).", manifest_path, exc.strerror)
    return freed


def delete_extracted_archive(zip_path: Path, identity: LocalIdentity, *, all_in_place: bool) -> None:
    """Delete a .zip after a complete extraction (every member checked in place by the caller).
    Raises NotProven when the extraction is not complete or the zip changed meanwhile."""
    if not all_in_place:
        raise NotProven(f"{zip_path.name} was kept: not every member is in place.", paths=[zip_path])
    outcome, reason = delete_unchanged(zip_path, identity)
    if outcome not in (DELETED, ALREADY_GONE):
        raise NotProven(f"{zip_path.name} was unzipped but kept: {reason}.", paths=[zip_path])
