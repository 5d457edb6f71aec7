"""Stage 1's look at Dropbox itself: can each row's files land where the plan puts them?

Dropbox refuses a file where it holds a folder (`WriteConflictError.folder`) and anything below
one of its files (`WriteConflictError.file_ancestor`), but only when the file is committed, after
every byte was sent — days for a 300 GB file. Both are found here instead, before anything is
sent, and returned as sheet problems naming workbook, tab and row.

Cost, per distinct destination folder of the sheet (a row's `outputDir`): one
`files/get_metadata`; when the folder exists, one recursive `files/list_folder` of it (pages of
up to 2,000 entries, so 10,000 files already there cost 5 pages); when it does not, one
`files/get_metadata` per missing parent up to the first that exists. Nothing is asked per file.
A rerun whose plan leaves settled folders out (prepare.Plan.settled_files) asks only about the
Dropbox folders its planned files go to, when they are few (NARROW_UP_TO per row): one
non-recursive `files/list_folder` each, plus the get_metadata chain above when it lists nothing.
Source: https://www.dropbox.com/developers/documentation/http/documentation (files/get_metadata,
files/list_folder with recursive=true and limit <= 2000, WriteConflictError).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from .dropbox_client import NetworkProblem, RateLimited, RemoteFile, RemoteFolder
from .errors import AuthError, SheetError, SheetProblem
from .names import case_key
from .prepare import Plan, PlannedSource
from .sheets import SheetRow

# Past this many problems in one row, the rest are counted, as Stage 1 does for local ones.
MAX_PROBLEMS_PER_ROW = 50
# A rerun's row with up to this many Dropbox folders to fill has them listed one by one (about a
# request each); with more, one recursive listing of its outputDir costs fewer requests.
NARROW_UP_TO = 50


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _ancestors_below(path: str, top: str) -> list[str]:
    """The folders strictly between `top` and `path` (outermost first)."""
    out = []
    cursor = _parent(path)
    top_key = case_key(top)
    while cursor != "/" and case_key(cursor) != top_key:
        out.append(cursor)
        cursor = _parent(cursor)
    return out[::-1]


def _destinations(source: PlannedSource) -> list[str]:
    """The Dropbox paths a planned file becomes: itself, or its parts and manifest."""
    if not source.parts:
        return [source.destination]
    return [source.part_destination(part) for part in source.parts] + [source.manifest_destination()]


class _Folder:
    """What Dropbox holds at and below one destination folder, read once."""

    def __init__(self, client, top: str, folder_keys: set[str] | None = None, files: dict | None = None, *,
                 recursive: bool = True):
        """`folder_keys`: case_keys of the folders the plan needs; of Dropbox's files only those
        at such a key are kept (only they can be in the way), so memory follows the plan's
        folders, not the files Dropbox holds there. None keeps every entry. `files`, when given,
        gets every Dropbox file listed, by case_key of its path_lower (the upload's listing).
        `recursive` False: only what is directly in `top` (listed first: when that finds
        something, `top` is a folder and needs no get_metadata)."""
        self.top = top
        self._folder_keys = folder_keys
        self._files = files
        self._recursive = recursive
        self.blocked_by: str | None = None     # a file at `top` or at one of its parents
        self.entries: dict[str, RemoteFile | RemoteFolder] = {}
        if top == "/":
            self._list(client)
            return
        if not recursive and self._list(client):
            return
        remote = client.metadata(top)
        if isinstance(remote, RemoteFile):
            self.blocked_by = remote.path_display or top
        elif isinstance(remote, RemoteFolder):
            if recursive:
                self._list(client)
        else:
            cursor = _parent(top)
            while cursor != "/":
                above = client.metadata(cursor)
                if isinstance(above, RemoteFile):
                    self.blocked_by = above.path_display or cursor
                if above is not None:
                    break
                cursor = _parent(cursor)

    def _list(self, client) -> bool:
        """List `top` into entries (and `files`); whether anything was there."""
        keep, files = self._folder_keys, self._files
        found = False
        for remote in client.iter_entries_or_empty(self.top, recursive=self._recursive):
            found = True
            if files is not None and isinstance(remote, RemoteFile):
                files[case_key(remote.path_lower)] = remote
            key = case_key(remote.path_display)
            if keep is None or isinstance(remote, RemoteFolder) or key in keep:
                self.entries[key] = remote
        return found


def check_destinations(client, plan: Plan, *, destination_of_row: Callable[[SheetRow], str],
                       column: str = "outputDir", log: logging.Logger | None = None,
                       files: dict | None = None) -> list[SheetProblem]:
    """Problems with the Dropbox side of every row of `plan`: its destination folder, or a parent
    of it, is a file in Dropbox; a file's destination (or a part's) is a folder in Dropbox; a
    folder on the way to a file is a file in Dropbox. An empty folder to create counts as well.

    `destination_of_row(row)` is the Dropbox folder a row's files land in (Stage 1's mapping);
    `client` is a dropbox_client.DropboxClient (metadata, iter_entries_or_empty). Returns [] when
    everything can land. Raises what the client raises (NetworkProblem, AuthError, ...). The plan
    is read once, file by file (twice when settled folders narrow the check): what is held is per
    row and per problem, not per file. `files`, when given, gets every file Dropbox holds where it
    was listed - below the rows' destinations, or in the folders the planned files go to when
    the check is narrowed (see _Folder) - so that the upload need not list them again."""
    narrowed = _narrowed_rows(plan) if plan.settled_files else set()
    folders: dict[tuple[str, bool], _Folder] = {}
    checks: dict[tuple[int, str], _RowCheck] = {}  # (id(row), its folder's key) -> its check, in plan order
    for source in plan.sources:
        narrow = id(source.row) in narrowed
        top = _parent(source.destination) if narrow else destination_of_row(source.row)
        check = checks.get((id(source.row), case_key(top)))
        if check is None:
            folder = folders.get((case_key(top), narrow))
            if folder is None:
                folder = folders[case_key(top), narrow] = _Folder(client, top, plan.folder_keys, files,
                                                                  recursive=not narrow)
            check = checks[id(source.row), case_key(top)] = _RowCheck(source.row, folder,
                                                                      destination_of_row(source.row))
        check.add(source)
    problems: list[SheetProblem] = []
    for check in checks.values():
        shown, total = check.texts(plan.empty_folders)
        problems.extend(check.row.problem(text, column) for text in shown)
        if total > len(shown):
            problems.append(check.row.problem(f"... and {total - len(shown)} more problems like these", column))
    if log is not None:
        log.info("Destinations in Dropbox checked: %d folder(s), %d problem(s).", len(folders), len(problems))
    return problems


def _narrowed_rows(plan: Plan) -> set[int]:
    """id() of the rows whose planned files go to at most NARROW_UP_TO Dropbox folders (one
    read of the plan; a set of folders per row, dropped once it passes the limit)."""
    seen: dict[int, set[str] | None] = {}
    for source in plan.sources:
        folders = seen.setdefault(id(source.row), set())
        if folders is not None:
            folders.add(case_key(_parent(source.destination)))
            if len(folders) > NARROW_UP_TO:
                seen[id(source.row)] = None
    return {row for row, folders in seen.items() if folders is not None}


def refuse_blocked(client, plan: Plan, *, destination_of_row: Callable[[SheetRow], str],
                   log: logging.Logger, files: dict | None = None) -> None:
    """check_destinations, raising SheetError (exit status 2, nothing sent) when a row is blocked.
    A plan with no file to send (every folder settled) has nothing to check."""
    if not len(plan.sources):
        return
    log.info("Checking each row's destination in Dropbox (a folder where a file should go, or a file on "
             "the way, is refused by Dropbox only after every byte is sent).")
    problems = check_destinations(client, plan, destination_of_row=destination_of_row, log=log, files=files)
    if problems:
        raise SheetError(problems)


def client_for_dry_run(open_client: Callable[[], object], log: logging.Logger, *, dry_run: bool = True):
    """A client for Stage 1's look at Dropbox when it is optional, or None (logged) when there is
    no usable login: a --dry-run (`dry_run`), which must work before `python app.py --login`, or
    a run already stopped by problems in the workbook (not `dry_run`: the look at Dropbox adds its
    problems to theirs when it can), so it only says the check was skipped."""
    try:
        return open_client()
    except (AuthError, NetworkProblem, RateLimited) as exc:
        hint = ("log in once with `python app.py --login`" if isinstance(exc, AuthError) else
                "check the network, and the proxy and caBundle settings")
        why = exc.message.rstrip(". ")
        if dry_run:
            log.warning("Dry run: the Dropbox-side check of the destinations was skipped: %s. It runs before "
                        "anything is sent in the real run; to have it here, %s.", why, hint)
        else:
            log.warning("The Dropbox-side check of the destinations was skipped too: %s. It runs once the "
                        "problems below are fixed, before anything is sent; to have it now, %s.", why, hint)
        return None


class _RowCheck:
    """One row's files held against what Dropbox holds at its destination, file by file."""

    def __init__(self, row: SheetRow, folder: _Folder, output_dir: str | None = None):
        """`output_dir`: the row's outputDir, when `folder` may be a folder below it (a rerun's
        narrowed check) and messages must not call that folder the outputDir."""
        self.row, self.folder = row, folder
        self._is_output_dir = output_dir is None or case_key(output_dir) == case_key(folder.top)
        self._texts: list[str] = []  # the first MAX_PROBLEMS_PER_ROW folders in the way
        self._unshown = 0            # and how many more
        # blocking Dropbox file -> (how many paths of this row go inside it, the first of them)
        self._under_file: dict[str, list] = {}

    def add(self, source: PlannedSource) -> None:
        folder = self.folder
        if folder.blocked_by is not None or not folder.entries:
            return
        for destination in _destinations(source):
            found = folder.entries.get(case_key(destination))
            if isinstance(found, RemoteFolder):
                if len(self._texts) < MAX_PROBLEMS_PER_ROW:
                    self._texts.append(f"{found.path_display} is a folder in Dropbox, so {source.source} cannot be "
                                       "uploaded there. Move or rename that folder in Dropbox, or give another "
                                       "outputDir")
                else:
                    self._unshown += 1
            else:
                self._file_above(destination, including_itself=False)

    def _file_above(self, path: str, including_itself: bool) -> None:
        for ancestor in [*_ancestors_below(path, self.folder.top), *([path] if including_itself else [])]:
            above = self.folder.entries.get(case_key(ancestor))
            if isinstance(above, RemoteFile):
                counted = self._under_file.setdefault(above.path_display, [0, path])
                counted[0] += 1
                return

    def texts(self, empty_folders: Iterable[str]) -> tuple[list[str], int]:
        """(the row's problems to show, at most MAX_PROBLEMS_PER_ROW; how many there are in all)."""
        folder, top = self.folder, self.folder.top
        if folder.blocked_by is not None:
            named = f"outputDir {top}" if self._is_output_dir else f"the folder {top} (for files of this row)"
            if case_key(folder.blocked_by) == case_key(top):
                return [f"{named} is a file in Dropbox, so nothing can be put inside it. Give another "
                        "outputDir, or move or rename that file in Dropbox"], 1
            return [f"{folder.blocked_by} is a file in Dropbox, so {named} cannot be created inside it. "
                    "Give another outputDir, or move or rename that file in Dropbox"], 1
        if not folder.entries:
            return [], 0
        top_key = case_key(top)
        for path in empty_folders:
            if top_key == "/" or case_key(path).startswith(top_key + "/"):
                self._file_above(path, including_itself=True)
        texts = list(self._texts)
        for blocking, (count, first) in self._under_file.items():
            texts.append(f"{blocking} is a file in Dropbox, so {count} path(s) of this row that go inside it "
                         f"(e.g. {first}) cannot be created. Move or rename that file in Dropbox, or give another "
                         "outputDir")
        return texts[:MAX_PROBLEMS_PER_ROW], len(texts) + self._unshown
