"""Local file operations the stages share: durable renames, renames that never replace a file
that appeared meanwhile (both must survive a crash at any moment), filling a buffer from a
file, and the names of this tool's temporary files."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

# The tool and the Dropbox desktop app skip names starting with ".~", so a half-written file is
# never uploaded or synced.
TEMP_PREFIX = ".~"


def temporary_sibling(final: Path | str, tag: str) -> Path:
    """The temporary name in `final`'s folder under which `final` is written before it is
    renamed into place: `.~` + 16 hex digits of the SHA-256 of `final`'s name + `.` + `tag`
    (e.g. "partial", "zip.partial", "extracting"); at most 19 + len(tag) characters.

    Prefixing and suffixing the final name, as earlier versions did, fails for names near the
    limit of the file system (255 bytes on Linux, 255 UTF-16 units on Windows); a digest fits
    whatever the name. The same name always gives the same temporary, so a rerun after a crash
    finds the leftover of the interrupted run."""
    final = Path(final)
    digest = hashlib.sha256(final.name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return final.with_name(f"{TEMP_PREFIX}{digest}.{tag}")


def legacy_temporary(final: Path | str, suffix: str = "") -> Path | None:
    """The leftover, if there is one, that an earlier version left for `final` under its old
    temporary name `.~<name><suffix>`, so that a rerun after an upgrade still finds it; None
    when there is none (or the old name is too long to exist here)."""
    final = Path(final)
    legacy = final.with_name(f"{TEMP_PREFIX}{final.name}{suffix}")
    try:
        os.lstat(legacy)
    except (OSError, ValueError):
        return None
    return legacy


# Windows reparse tags of the entries never followed, from Microsoft's "Reparse Point Tags"
# (learn.microsoft.com/windows/win32/fileio/reparse-point-tags; ntifs.h): a directory junction
# (`mklink /J`, a "mount point") and a symbolic link. Python's stat module defines them on Windows
# only, so they are spelled out here. Other reparse points (OneDrive and Dropbox placeholders,
# deduplicated files) hold the data themselves and are walked.
IO_REPARSE_TAG_MOUNT_POINT = 0xA0000003
IO_REPARSE_TAG_SYMLINK = 0xA000000C
_NEVER_FOLLOWED_TAGS = frozenset({IO_REPARSE_TAG_MOUNT_POINT, IO_REPARSE_TAG_SYMLINK})
# Only Windows reports reparse tags (os.stat_result.st_reparse_tag, Python 3.8+). Elsewhere the
# check would cost one lstat per folder for nothing; tests set this to True to act as Windows.
REPARSE_TAGS = hasattr(os.stat_result, "st_reparse_tag")


def is_link_entry(entry: os.DirEntry) -> bool:
    """True when a folder listing's `entry` is a symbolic link or a Windows directory junction:
    never to be followed. A junction reads as a plain folder on Windows (DirEntry.is_symlink()
    and S_ISLNK are False for it; DirEntry.is_junction() exists only from Python 3.12), so
    following it would walk, upload and delete files outside the folder the user named.
    On Windows the listing carries the entry's attributes: no extra system call. Raises OSError
    when the entry cannot be examined."""
    if entry.is_symlink():
        return True
    if not REPARSE_TAGS:
        return False
    info = entry.stat(follow_symlinks=False)
    return bool(getattr(info, "st_file_attributes", 0) & stat.FILE_ATTRIBUTE_REPARSE_POINT
                and getattr(info, "st_reparse_tag", 0) in _NEVER_FOLLOWED_TAGS)


def fsync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); Windows cannot open folders and does not need it."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rename_without_replacing(source: Path, target: Path) -> None:
    """Rename, but never over an existing file (a plain rename would replace it on POSIX).
    Raises FileExistsError when `target` exists."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:
        # No hard links on this file system (FAT, exFAT, some network shares): check, then rename.
        if target.exists() or target.is_symlink():
            raise FileExistsError(target) from None
        os.rename(source, target)
        return
    os.unlink(source)


def read_into(handle, view: memoryview) -> int:
    """Fill `view` from `handle`'s current position; the count is short only at the file's end."""
    filled = 0
    while filled < len(view):
        count = handle.readinto(view[filled:])
        if not count:
            break
        filled += count
    return filled


# File systems on which SQLite's WAL mode is unsafe (it needs shared memory between processes
# on one machine): https://www.sqlite.org/wal.html ("WAL does not work over a network filesystem").
NETWORK_FILE_SYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "sshfs", "9p", "afs", "ceph",
                        "glusterfs", "fuse.glusterfs", "davfs", "fuse.davfs2", "fuse.rclone", "lustre", "gpfs"}


def mount_type(path: Path, mounts_text: str) -> str | None:
    """The file-system type of the mount holding `path`, from /proc/mounts-style text."""
    target = os.path.realpath(path)
    best, kind = "", None
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def on_network_drive(path: Path) -> bool:
    """True when `path` lies on a network share (a mapped drive or UNC path on Windows; an NFS,
    SMB, sshfs... mount on Linux). Unknown (macOS, unreadable mount table): False."""
    if os.name == "nt":
        text = str(path)
        if text.startswith("\\\\"):
            return True
        import ctypes  # the Windows API is called on Windows only: loaded there, when needed

        root = os.path.splitdrive(os.path.abspath(text))[0] + "\\"
        return ctypes.windll.kernel32.GetDriveTypeW(root) == 4  # DRIVE_REMOTE
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as handle:
            kind = mount_type(path, handle.read())
    except OSError:
        return False
    return kind in NETWORK_FILE_SYSTEMS


_DRIVE_PATH = re.compile(r"^[A-Za-z]:([\\/]|$)")  # D:\data, D:/data, D:
_UNC_PATH = re.compile(r"^\\\\[^\\/]+")  # \\nas01\lab\data


def windows_path_kind(text: str) -> str | None:
    """'unc' for \\\\server\\share..., 'drive' for D:\\... or D:/..., else None. Elsewhere than on
    Windows such a text is a relative name: it would make a folder literally called 'D:\\x'."""
    if _UNC_PATH.match(text):
        return "unc"
    if _DRIVE_PATH.match(text):
        return "drive"
    return None
