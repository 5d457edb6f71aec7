"""Local file operations the stages share: durable renames, renames that never replace a file
that appeared meanwhile (both must survive a crash at any moment), filling a buffer from a
file, and the names of this tool's temporary files."""

from __future__ import annotations

import hashlib
import os
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
