"""Local file operations the stages share: durable renames, renames that never replace a file
that appeared meanwhile (both must survive a crash at any moment), and filling a buffer from a
file."""

from __future__ import annotations

import os
from pathlib import Path


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
