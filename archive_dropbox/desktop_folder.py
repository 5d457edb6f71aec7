"""The local Dropbox folder of the desktop-app upload: the dropboxDir setting it comes from, how
its paths map to Dropbox paths, and the sheet rows it refuses before anything is copied."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import SettingsError, SheetProblem
from .sheets import SheetRow


def _comparable_parts(path: Path) -> tuple[str, ...]:
    """Path components for containment tests: links resolved; Windows and macOS ignore case."""
    parts = Path(os.path.realpath(path)).parts
    if os.name == "nt" or sys.platform == "darwin":
        parts = tuple(part.casefold() for part in parts)
    return parts


def is_inside(path: Path, folder: Path) -> bool:
    """True when `path` is `folder` or lies below it (whole path components)."""
    inner, outer = _comparable_parts(path), _comparable_parts(folder)
    return inner[:len(outer)] == outer


@dataclass(frozen=True)
class DropboxFolder:
    """The local Dropbox folder and how its paths map to Dropbox paths: its top level is the
    root the API client addresses (the team space when `teamSpace` is on and the account has
    one, else the member's own Dropbox)."""

    root: Path

    def contains(self, path: Path) -> bool:
        return is_inside(path, self.root)

    def dropbox_path(self, local_folder: Path) -> str:
        """'/' + the folder's path below the Dropbox folder (the folder must be inside it)."""
        real = Path(os.path.realpath(local_folder)).parts
        below = real[len(Path(os.path.realpath(self.root)).parts):]
        return "/" + "/".join(below) if below else "/"

    def local_path(self, dropbox_path: str) -> Path:
        return self.root.joinpath(*[part for part in dropbox_path.split("/") if part])


def check_dropbox_dir(value: Path | None, script: Path) -> DropboxFolder:
    """The dropboxDir setting, which desktop-app mode cannot do without."""
    fix = (f"Set dropboxDir at the top of {script.name} to your local Dropbox folder (the folder the "
           "Dropbox desktop app keeps in sync, for example C:\\Users\\you\\Dropbox or /home/you/Dropbox).")
    if value is None:
        raise SettingsError(f"setting 'dropboxDir' is empty, but uploading through the desktop app "
                            f"(sheetName = 'dropboxUpload_APP') needs it. {fix}", paths=[script])
    if not value.exists():
        raise SettingsError(f"setting 'dropboxDir' = {str(value)!r} does not exist. {fix} Is the drive "
                            "connected and the Dropbox app installed?", paths=[script, value])
    if not value.is_dir():
        raise SettingsError(f"setting 'dropboxDir' = {str(value)!r} is a file, not a folder. {fix}",
                            paths=[script, value])
    return DropboxFolder(Path(os.path.realpath(value)))


def row_checker(folder: DropboxFolder) -> Callable[[SheetRow], list[SheetProblem]]:
    """Sheet problems particular to desktop-app mode, found before anything is copied."""

    def check(row: SheetRow) -> list[SheetProblem]:
        problems = []
        output: Path = row["outputDir"]
        source: Path = row["inputFile"]
        if not folder.contains(output):
            problems.append(row.problem(
                f"outputDir {output} is not inside the Dropbox folder {folder.root} (the dropboxDir setting): "
                "the desktop app only uploads what is inside it. Give a folder inside the Dropbox folder",
                "outputDir"))
        if folder.contains(source):
            problems.append(row.problem(
                f"inputFile {source} is inside the Dropbox folder {folder.root}: it is already synced, and this "
                "tool never copies or deletes anything inside the Dropbox folder. Move it out of the Dropbox "
                "folder first, or remove the row", "inputFile"))
        elif is_inside(folder.root, source):
            problems.append(row.problem(
                f"inputFile {source} contains the Dropbox folder {folder.root}: it would copy the Dropbox folder "
                "into itself. Give a folder that does not contain the Dropbox folder", "inputFile"))
        return problems

    return check
