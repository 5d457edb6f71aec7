"""Stage 1 of a download (app.py with sheetName = 'dropboxDownload_API'): check the rows, list
what each brings, find the split files to join, and weigh the plan against the local disk and
the journal, all before the first byte is written. The transfer itself is download.py.

What each row brings and where it lands is described in download.py's docstring.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from . import names, sheets, split, tabs
from .inventory import is_inventory_name
from .dropbox_client import DropboxClient, DropboxProblem, RemoteFile, RemoteFolder
from .errors import FileProblem, SheetError, SheetProblem
from .journal import Item, Journal, Kind, State
from .localfs import temporary_sibling
from .transfer import Pauses, Retrier, RetryPolicy, existing_ancestor
from .units import human_bytes

COLUMNS = list(tabs.DOWNLOAD_API.columns)

PARTIAL_TAG = "partial"

# A metadata or listing call rides out network trouble for 10 min, then its NetworkProblem
# goes up as it is: Stage 1 has no file to give up, only the run.
METADATA_POLICY = RetryPolicy(give_up_seconds=600)

T = TypeVar("T")


def ask(retrier: Retrier, what: str, request: Callable[[], T]) -> T:
    """`request()` (a metadata or listing call) through `retrier`, `what` named on the status
    line too; after the policy's give-up time raises the NetworkProblem itself."""
    return retrier.call(what, request, give_up=lambda problem: problem, what_in_status=True)


# -- what to download --------------------------------------------------------------------------

@dataclass
class SplitOriginal:
    """A row naming a file that Dropbox holds only as split parts and their manifest."""

    path: str
    manifest: RemoteFile
    parts: list[RemoteFile]


@dataclass
class Task:
    """One Dropbox file (`remote`) to one local path (`target`)."""

    row: sheets.SheetRow
    remote: RemoteFile
    target: Path
    item: Item | None = None
    problem: str | None = None  # known before starting (a name this system refuses)

    @property
    def partial(self) -> Path:
        return temporary_sibling(self.target, PARTIAL_TAG)

    @property
    def dropbox_path(self) -> str:
        """Where the file is in Dropbox, as Dropbox spells it (for messages)."""
        return self.remote.path_display or self.remote.path_lower


@dataclass
class Series:
    """The parts (and manifest) of one split file found among a joinFlag row's downloads."""

    folder: Path
    base: str
    tasks: list[Task] = field(default_factory=list)
    state: str = "join"  # join | verify (joined earlier, clean-up may be unfinished) | done

    @property
    def output(self) -> Path:
        return self.folder / self.base

    @property
    def manifest_task(self) -> Task | None:
        return next((t for t in self.tasks if split.parse_manifest_name(t.target.name)), None)

    @property
    def dropbox_key(self) -> str:
        """The Dropbox path (lower case) that stands for the whole series in the journal."""
        anchor = self.manifest_task or min(self.tasks, key=lambda t: t.target.name)
        return anchor.remote.path_lower

    @property
    def signature(self) -> str:
        """Changes when any part or the manifest changes in Dropbox."""
        digest = hashlib.sha256()
        for task in sorted(self.tasks, key=lambda t: t.remote.path_lower):
            digest.update(f"{task.remote.path_lower}\0{task.remote.content_hash}\0{task.remote.size}\n".encode())
        return digest.hexdigest()

    @property
    def size(self) -> int:
        return sum(t.remote.size for t in self.tasks if split.parse_part_name(t.target.name))


@dataclass
class DownloadPlan:
    tasks: list[Task] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    duplicates: int = 0
    todo: list[Task] = field(default_factory=list)  # tasks not covered by a split file joined earlier

    @property
    def total_bytes(self) -> int:
        return sum(t.remote.size for t in self.tasks)


# -- small helpers -----------------------------------------------------------------------------

def client_modified_epoch(moment: dt.datetime) -> int:
    """Dropbox's client_modified (naive UTC, whole seconds) as a Unix time."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return int(moment.timestamp())


def write_all(handle, data: bytes) -> None:
    """Write every byte of `data` to an unbuffered file (whose write may take fewer)."""
    view = memoryview(data)
    while view:
        written = handle.write(view)
        view = view[written:]


def existing_file(target: Path) -> os.stat_result | None:
    """What a download finds at `target`: None when nothing is there, its lstat when it is a
    file; FileProblem when a folder or a link is in the way (never written through or over)."""
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode):
        raise FileProblem(f"{target} already exists and is a folder or a link, so the file was not saved. "
                          "Rename it and run again.", paths=[target])
    return info


def different_file(target: Path, local_size: int, wanted_size: int, what: str = "the Dropbox file") -> FileProblem:
    """The problem of another file at `target` (sizes in bytes): it is never overwritten."""
    other = " and other content" if local_size == wanted_size else ""
    return FileProblem(f"a different file already exists at {target} ({human_bytes(local_size)}; {what} has "
                       f"{human_bytes(wanted_size)}{other}). It was not overwritten: move or rename it and run again.",
                       paths=[target])


def journal_item(job: str, dropbox_key: str, local_path: Path, kind: Kind, size: int, mtime_ns: int) -> Item:
    """The journal's record of one downloaded file (Kind.FILE; `mtime_ns` from Dropbox's
    client_modified) or of one joined split file (Kind.JOINED; its size and mtime on disk).

    The journal names its columns by the direction of travel: `source` is where the bytes come
    from and `destination` where they go. For a download that is the Dropbox path (lower case)
    and the local path: the reverse of an upload's items, whose source is local."""
    return Item(id=None, job=job, source=dropbox_key, destination=str(local_path), kind=kind, part_offset=0,
                length=size, source_size=size, source_mtime_ns=mtime_ns)


def _case_key(path: Path | str) -> str:
    return unicodedata.normalize("NFC", str(path)).casefold()


def _unwritable_name(row: sheets.SheetRow, dropbox_path: str, target: Path, seen: set[str]) -> SheetProblem | None:
    """The first name on the way from the row's localDir to `target` that this computer cannot
    hold (names.local_name_problem), as the Dropbox path holding it; each such path once."""
    relative = target.relative_to(row["localDir"]).parts
    remote = [p for p in dropbox_path.split("/") if p]
    for depth, name in enumerate(relative, 1):
        why = names.local_name_problem(name)
        if why is None:
            continue
        place = "/" + "/".join(remote[:len(remote) - len(relative) + depth])
        if place in seen:
            return None
        seen.add(place)
        return row.problem(f"{place}: {why}. Rename it in Dropbox (on dropbox.com) and run again, or "
                           "restore this row on macOS or Linux", "dropboxPath")
    return None


def _dropbox_parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _last_name(remote: RemoteFile | RemoteFolder) -> str:
    return (remote.path_display or remote.path_lower).rsplit("/", 1)[1]


# -- check the rows ----------------------------------------------------------------------------

def _find_split_original(client: DropboxClient, path: str, retrier: Retrier
                         ) -> tuple[SplitOriginal | None, str | None]:
    """`path` is missing: is it the original of a split file? (result, problem)"""
    name = path.rsplit("/", 1)[1]
    parent = _dropbox_parent(path)
    manifest_path = parent.rstrip("/") + "/" + split.manifest_name(name)
    manifest = ask(retrier, "checking Dropbox", lambda: client.metadata(manifest_path))
    if not isinstance(manifest, RemoteFile):
        return None, None

    def read() -> bytes:
        _, chunks = client.download_range(manifest.path_lower, 0, None)
        return b"".join(chunks)

    try:
        parsed = split.parse_manifest(ask(retrier, "reading a split manifest", read), manifest.path_display)
    except split.SplitError as exc:
        return None, f"{path} is split in Dropbox, but its manifest cannot be used: {exc.message}"
    parts: list[RemoteFile] = []
    for part in parsed.parts:
        part_path = parent.rstrip("/") + "/" + part.name
        remote = ask(retrier, "checking Dropbox", lambda: client.metadata(part_path))
        if not isinstance(remote, RemoteFile):
            return None, (f"{path} is split in Dropbox, but its part {part.name} is missing there "
                          f"({len(parsed.parts)} parts are listed in {manifest.path_display})")
        parts.append(remote)
    return SplitOriginal(path, manifest, parts), None


def _local_dir_problem(row: sheets.SheetRow) -> SheetProblem | None:
    local: Path = row["localDir"]
    ancestor = existing_ancestor(local)
    if not ancestor.is_dir():
        return row.problem(f"localDir {local} cannot be created: {ancestor} is a file. Give a folder", "localDir")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return row.problem(f"localDir {local} cannot be written to (no permission on {ancestor}). Choose another "
                           "folder or ask for write access", "localDir")
    return None


def _remote_root(client: DropboxClient, row: sheets.SheetRow, path: str, retrier: Retrier
                 ) -> tuple[RemoteFile | RemoteFolder | SplitOriginal | None, SheetProblem | None]:
    """What the row's dropboxPath (`path`) names in Dropbox, or the problem with it."""
    if path == "/":
        return RemoteFolder("/", "/"), None
    try:
        remote = ask(retrier, "checking Dropbox", lambda: client.metadata(path))
    except DropboxProblem as exc:
        return None, row.problem(f"dropboxPath {path}: {exc.message}", "dropboxPath")
    if remote is not None:
        return remote, None
    original, problem = _find_split_original(client, path, retrier)
    if original is not None:
        return original, None
    return None, row.problem(problem or (
        f"dropboxPath {path} does not exist in Dropbox: check the spelling (a Dropbox path starts "
        "with '/', e.g. /Archive/2024/run1; team folders start with the team folder's name)"), "dropboxPath")


def check_rows(client: DropboxClient, rows: list[sheets.SheetRow], log: logging.Logger,
               earlier: Iterable[SheetProblem] = ()) -> dict[int, RemoteFile | RemoteFolder | SplitOriginal]:
    """Every row's Dropbox path must exist and its localDir must be creatable; every problem is
    listed together (SheetError) before anything is downloaded, after `earlier` (the tab's own
    problems, from sheets.read_tab_with_problems): a cell that could not be read is None, and the
    rest of its row is still checked. Raises NetworkProblem after 10 min without Dropbox."""
    retrier = Retrier(log, METADATA_POLICY)
    problems: list[SheetProblem] = list(earlier)
    troubled = {(problem.row, problem.column) for problem in problems}
    roots: dict[int, RemoteFile | RemoteFolder | SplitOriginal] = {}
    for row in rows:
        local: Path | None = row["localDir"]
        if local is not None and (row.row, "localDir") not in troubled:
            problem = _local_dir_problem(row)
            if problem is not None:
                problems.append(problem)
        if row["dropboxPath"] is None or row.values.get("member"):
            continue  # a row with a member names an archive: member_fetch looks it up
        # A path pasted from a Mac (Finder, a macOS file name) may be decomposed (NFD); Dropbox
        # finds an existing name only by its NFC form (see dropbox_client.lookup_path).
        path: str = unicodedata.normalize("NFC", row["dropboxPath"])
        remote, problem = _remote_root(client, row, path, retrier)
        if problem is not None:
            problems.append(problem)
            continue
        roots[row.row] = remote
        if isinstance(remote, RemoteFile) and local is not None:
            name = (remote.path_display or path).rsplit("/", 1)[1]
            in_the_way = local / name
            if in_the_way.is_dir():
                problems.append(row.problem(f"{in_the_way} is a folder, so the file {name} cannot be saved "
                                            "there. Rename the folder or choose another localDir", "localDir"))
    if problems:
        raise SheetError(sorted(problems, key=lambda problem: problem.row or 0))
    return roots


# -- list what each row brings -----------------------------------------------------------------

def _relative_parts(root_lower: str, entry: RemoteFile | RemoteFolder) -> list[str] | None:
    """The entry's path below the root folder, in Dropbox's display spelling. (Only the last
    component of path_display is guaranteed to be spelled right, so the count of components
    comes from path_lower.)"""
    root = [p for p in root_lower.split("/") if p]
    lower = [p for p in entry.path_lower.split("/") if p]
    display = [p for p in (entry.path_display or entry.path_lower).split("/") if p]
    if len(display) != len(lower):
        display = lower
    if lower[:len(root)] != root:
        return None
    return display[len(root):]


class _Expansion:
    """The plan being built by `expand`, with the problems found on the way."""

    def __init__(self) -> None:
        self.plan = DownloadPlan()
        self.problems: list[SheetProblem] = []
        self.folders: dict[str, Path] = {}
        self._claimed: dict[str, Task] = {}
        self._unwritable: set[str] = set()

    def check_name(self, row: sheets.SheetRow, dropbox_path: str, target: Path) -> None:
        # Found here, a name Windows refuses stops the run before anything is written; found by
        # open() it failed late, as "file not found" or by writing to a device (CON, NUL).
        problem = _unwritable_name(row, dropbox_path, target, self._unwritable)
        if problem is not None:
            self.problems.append(problem)

    def add_folder(self, row: sheets.SheetRow, remote: RemoteFolder | None, target: Path) -> None:
        if remote is not None:
            self.check_name(row, remote.path_display or remote.path_lower, target)
        self.folders.setdefault(_case_key(target), target)

    def add_file(self, row: sheets.SheetRow, remote: RemoteFile, target: Path) -> None:
        self.check_name(row, remote.path_display or remote.path_lower, target)
        key = _case_key(target)
        other = self._claimed.get(key)
        if other is None:
            task = Task(row, remote, target)
            self._claimed[key] = task
            self.plan.tasks.append(task)
        elif other.remote.path_lower == remote.path_lower:
            self.plan.duplicates += 1
        elif other.row is row:
            self.problems.append(row.problem(
                f"{remote.path_display} and {other.remote.path_display} differ only in case (or Unicode "
                f"form): both would be saved as {target}, and Windows and macOS keep such names as one "
                "file. Rename one of them in Dropbox and run again", "dropboxPath"))
        else:
            self.problems.append(row.problem(f"{remote.path_display} would be saved as {target}, where row "
                                             f"{other.row.row} already puts {other.remote.path_display}. Give one "
                                             "of the rows another localDir", "localDir"))

    def add_listing(self, row: sheets.SheetRow, root: RemoteFolder, base: Path,
                    entries: Iterable[RemoteFile | RemoteFolder]) -> None:
        """Everything below a folder row's root, which lands at `base`."""
        for entry in entries:
            parts = _relative_parts(root.path_lower, entry)
            if parts is None:
                continue
            target = base.joinpath(*parts) if parts else base
            if isinstance(entry, RemoteFolder):
                self.add_folder(row, entry, target)
            elif parts and not is_inventory_name(parts[-1]):
                # The inventories describe the data; a restore brings back what was uploaded (a row
                # naming an inventory itself still downloads it).
                self.add_file(row, entry, target)


def expand(client: DropboxClient, rows: list[sheets.SheetRow],
           roots: dict[int, RemoteFile | RemoteFolder | SplitOriginal], log: logging.Logger) -> DownloadPlan:
    """Every file (and folder) each row brings, mapped to its local path; raises SheetError when
    two files would land at the same local path, or a name cannot be held here (names.py:
    Windows refuses CON, aux.txt, a trailing dot...), before anything is written."""
    retrier = Retrier(log, METADATA_POLICY)
    found = _Expansion()
    for row in rows:
        if row.values.get("member"):
            continue  # planned by member_fetch
        root = roots[row.row]
        local: Path = row["localDir"]
        found.add_folder(row, None, local)
        if isinstance(root, RemoteFile):
            found.add_file(row, root, local / _last_name(root))
        elif isinstance(root, SplitOriginal):
            for remote in [*root.parts, root.manifest]:
                found.add_file(row, remote, local / _last_name(remote))
        else:
            base = local if root.path_lower == "/" else local / _last_name(root)
            found.add_folder(row, root, base)
            entries = ask(retrier, f"listing {root.path_display}", lambda: list(client.iter_entries(root.path_lower)))
            found.add_listing(row, root, base, entries)
    if found.problems:
        raise SheetError(found.problems)
    found.plan.folders = sorted(found.folders.values(), key=lambda p: len(p.parts))
    return found.plan


def find_series(plan: DownloadPlan) -> list[Series]:
    """The split files among the downloads of joinFlag rows, grouped by folder and name."""
    found: dict[tuple[str, str], Series] = {}
    for task in plan.tasks:
        if not task.row["joinFlag"]:
            continue
        name = task.target.name
        parsed = split.parse_part_name(name)
        base = parsed[0] if parsed else split.parse_manifest_name(name)
        if base is None:
            continue
        key = (_case_key(task.target.parent), base)
        found.setdefault(key, Series(task.target.parent, base)).tasks.append(task)
    return [s for s in found.values() if any(split.parse_part_name(t.target.name) for t in s.tasks)]


# -- weigh the plan against the local disk and the journal -------------------------------------

def _series_state(series: Series, recorded: dict[tuple[str, str], Item]) -> str:
    output = series.output
    try:
        info = os.lstat(output)
    except FileNotFoundError:
        return "join"
    item = recorded.get((series.dropbox_key, str(output)))
    if (item is not None and item.state == State.DONE and item.kind == Kind.JOINED
            and item.content_hash == series.signature
            and info.st_size == item.length and info.st_mtime_ns == item.source_mtime_ns):
        return "done"
    manifest = series.manifest_task
    if manifest is not None and manifest.target.is_file():
        # Joined by an earlier run that stopped while deleting the parts: the join step checks
        # the file against the manifest and finishes the clean-up; nothing is downloaded again.
        return "verify"
    return "join"


def plan_download(client: DropboxClient, rows: list[sheets.SheetRow], problems: Iterable[SheetProblem],
                  journal: Journal, log: logging.Logger) -> DownloadPlan:
    """Stage 1 in one pass: the tab's `problems` and the Dropbox side (paths that do not exist)
    together (SheetError), then every file listed, the split files found and what earlier runs
    joined set aside (plan.todo is what is left to download). Logs the plan. Raises SheetError,
    or NetworkProblem after 10 min without Dropbox."""
    roots = check_rows(client, rows, log, problems)
    plan = expand(client, rows, roots, log)
    recorded = journal.items_by_key()
    plan.series = find_series(plan)
    skipped: set[int] = set()
    for series in plan.series:
        series.state = _series_state(series, recorded)
        if series.state in ("done", "verify"):
            skipped.update(id(t) for t in series.tasks)
    plan.todo = [t for t in plan.tasks if id(t) not in skipped]
    if plan.tasks or not any(row.values.get("member") for row in rows):
        _log_plan(plan, log)  # a tab of member rows only has no whole files to speak of
    return plan


def bind_items(tasks: list[Task], journal: Journal) -> None:
    """Give every task its journal item (created or found again)."""
    items = journal.sync_plan(
        journal_item(journal.job, t.remote.path_lower, t.target, Kind.FILE, t.remote.size,
                     client_modified_epoch(t.remote.client_modified) * 1_000_000_000)
        for t in tasks)
    for task, item in zip(tasks, items):
        task.item = item


def bytes_needed(tasks: Iterable[Task]) -> int:
    """Bytes still to write for these tasks (partial files already on disk count as written)."""
    needed = 0
    for task in tasks:
        if task.target.exists():
            continue
        try:
            have = task.partial.stat().st_size
        except OSError:
            have = 0
        needed += max(0, task.remote.size - have)
    return needed


def space_needed(tasks: list[Task], series_list: list[Series],
                 extra: Iterable[tuple[Path, int]] = ()) -> dict[Path, int]:
    """Bytes to write per local disk (named by the first row folder found on it): the downloads
    still missing, plus a joined copy of every split file to join (its parts are deleted only
    after the join is verified, so both exist for a while), plus `extra` ((folder, bytes): the
    archive members to write)."""
    by_device: dict[int, Path] = {}
    needed: dict[Path, int] = {}

    def add(folder: Path, count: int) -> None:
        anchor = existing_ancestor(folder)
        name = by_device.setdefault(anchor.stat().st_dev, anchor)
        needed[name] = needed.get(name, 0) + count

    for task in tasks:
        add(task.row["localDir"], bytes_needed([task]))
    for series in series_list:
        if series.state == "join":
            add(series.tasks[0].row["localDir"], series.size)
    for folder, count in extra:
        add(folder, count)
    return needed


def wait_for_room(plan: DownloadPlan, pauses: Pauses, log: logging.Logger,
                  extra: Iterable[tuple[Path, int]] = ()) -> None:
    """Say what each local disk must hold, and wait until it has the room (Pauses.wait_for_disk);
    `extra` as space_needed's."""
    for folder, needed in space_needed(plan.todo, plan.series, extra).items():
        if not needed:
            continue
        log.info("Local disk holding %s: %s free, %s to write.", folder, human_bytes(pauses.disk_free(folder)),
                 human_bytes(needed))
        pauses.wait_for_disk(folder, needed, "not enough free space for this download")


def create_folders(folders: list[Path]) -> list[tuple[str, str]]:
    """Create the plan's folders (empty ones too); the (folder, problem) of those that cannot be."""
    problems = []
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problems.append((str(folder), f"the folder cannot be created ({exc.strerror})"))
    return problems


def _log_plan(plan: DownloadPlan, log: logging.Logger) -> None:
    log.info("Plan: %d files (%s) in %d folders; %d split file(s) to join%s.", len(plan.tasks),
             human_bytes(plan.total_bytes), len(plan.folders),
             sum(1 for s in plan.series if s.state != "done"),
             f"; {plan.duplicates} listed twice (downloaded once)" if plan.duplicates else "")
    done = len(plan.tasks) - len(plan.todo)
    if done:
        log.info("%d file(s) belong to split files joined by an earlier run: not downloaded again.", done)
