"""The package's own errors: one root class with a title, a message, the paths involved and
an exit code.

Fatal errors (settings, sheets, credentials, journal) stop a run; per-file problems are
recorded as `FileProblem` and the batch goes on. Scripts turn any `ArchiveError` into a short
message and an exit code; anything else is a bug and gets a logged traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

# Exit codes shared by every script (documented in the README).
EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_AUTH = 3
EXIT_ENVIRONMENT = 4
EXIT_BUG = 70
EXIT_INTERRUPTED = 130


class ArchiveError(Exception):
    """Root of every error this package raises on purpose."""

    title = "Error"
    exit_code = EXIT_SOME_FAILED

    def __init__(self, message: str, *, paths: Iterable[object] = (), title: str | None = None):
        super().__init__(message)
        self.message = message
        self.paths = [str(p) for p in paths]
        if title:
            self.title = title

    def __str__(self) -> str:
        return self.message

    def describe(self) -> str:
        """The text shown to the user: title, message and the paths involved."""
        lines = [f"{self.title}: {self.message}"]
        lines += [f"  path: {p}" for p in self.paths]
        return "\n".join(lines)


class SettingsError(ArchiveError):
    """One or more settings at the top of a script are invalid."""

    title = "Invalid setting"
    exit_code = EXIT_BAD_INPUT


@dataclass(frozen=True)
class SheetProblem:
    """One thing wrong in a workbook, located precisely enough for a lab user to fix it."""

    workbook: Path
    tab: str | None
    row: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = [f"workbook {self.workbook}"]
        if self.tab is not None:
            where.append(f"tab '{self.tab}'")
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column '{self.column}'")
        return ", ".join(where) + f": {self.message}"


class SheetError(ArchiveError):
    """The workbook cannot be used as it is; every problem found is listed."""

    title = "Please fix the workbook"
    exit_code = EXIT_BAD_INPUT

    def __init__(self, problems: Sequence[SheetProblem], *, plan=None):
        self.problems = list(problems)
        self.plan = plan  # what could be planned despite the problems (Stage 1 checks it further)
        text = "\n".join(f"  - {p}" for p in self.problems)
        message = (
            f"{len(self.problems)} problem(s) found before starting; nothing was changed.\n"
            f"{text}"
        )
        super().__init__(message, paths=sorted({str(p.workbook) for p in self.problems}))

    def describe(self) -> str:
        return f"{self.title}: {self.message}"


class EnvironmentProblem(ArchiveError):
    """Something outside the inputs stops the run (a tool is missing, the journal is locked)."""

    title = "Cannot start"
    exit_code = EXIT_ENVIRONMENT


class JournalLocked(EnvironmentProblem):
    title = "Already running"


class JournalError(EnvironmentProblem):
    title = "Journal problem"


class AuthError(ArchiveError):
    """Dropbox refused the credentials: the run stops at once."""

    title = "Dropbox login needed"
    exit_code = EXIT_AUTH


class FileProblem(ArchiveError):
    """A problem with one file or one row: recorded, and the batch goes on."""

    title = "Problem"
