"""The write side of the inventory (format and names: inventory.py): once a run has put a row's
files into Dropbox, the files that say where each original went are written beside them, before
any original of that row may be deleted.

For each upload row, from Stage 1's plan and the journal items of this run (only files whose
every item is done are listed: the others are not in Dropbox):
- every uploaded `.zip` (whole or split) that is a readable zip gets `<archive>.zip.inventory.csv`
  beside it, one record per member, read from the LOCAL archive's table of contents (zip_index:
  CRC-32, compressed size, header offset; offsets in the whole archive are those in its joined
  parts). A member's original path is `<the archive's local folder>/<member name>` with this
  system's separator: 2_zipDir.py stores `<folder>/...` members beside the folder, so for its
  archives (the `archive-big-data-dropbox: verified` stamp in the comment) this is where the file
  was. For another tool's zip the same path is only where it would be if unzipped there (said in
  the log), and the zip, an original of the user, is listed in the row inventory too. Dates come
  from the members (NTFS or extended timestamp, else the MS-DOS time read as this computer's local
  time). A `.zip` that is not a readable zip is listed as a plain file.
- the row inventory `_inventory_<row>_<8 hex>.csv` in the row's Dropbox folder lists every other
  file of the row (kind `file`, or `parts` with the part count), with the original's local path,
  size and date. A rerun replaces it: the records of this run's files come first, then those of
  the inventory already there for originals this run did not send (files uploaded and deleted in
  an earlier run stay listed). A row with nothing to list gets none.

Uploading: a CSV Dropbox already holds byte for byte is not sent again. An existing file of the
same name is replaced only when it is an inventory (its first line is the inventory header),
never a user's file. Every upload is checked by content hash. CSVs up to SINGLE_UPLOAD bytes go
in one request, larger ones through an upload session in SESSION_CHUNK pieces (memory stays at
one piece). They are written first in a temporary folder of logs/ (`.~<hex>.inventories`),
removed at the end.

An inventory that cannot be written is a failure of the run (exit 1), and NONE of its row's
originals is deleted in this run: without it they would be hard to find. Memory: one row's
table of contents at a time and a set of the row's original paths while an earlier inventory
is merged; records are streamed to the CSV.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Collection, Iterator, Mapping, TypeVar

from . import inventory
from .content_hash import file_content_hash
from .deletion import discard_temporary, discard_temporary_quietly
from .dropbox_client import CommitRequest, DropboxClient, DropboxProblem, IncorrectOffset, RemoteFile, RemoteFolder
from .errors import ArchiveError, AuthError, EnvironmentProblem, FileProblem
from .inventory import FILE, MEMBER, PARTS, InventoryError, Record
from .journal import Item, State
from .logs import PER_FILE
from .localfs import temporary_sibling
from .member_fetch import member_mtime_ns
from .names import case_key, shown
from .plan_items import Pair, item_count, pair_up, sources_between
from .prepare import Plan, PlannedSource
from .sheets import SheetRow
from .transfer import Retrier, RetryPolicy
from .units import MIB
from .zip_index import DamagedArchive, Directory, FileReader, UnsupportedArchive, read_directory
from .zipping import MARK_PREFIX

T = TypeVar("T")

SINGLE_UPLOAD = 8 * MIB  # bytes: larger CSVs go through an upload session (files/upload takes 150 MB at most)
SESSION_CHUNK = 8 * MIB
HEADER = ",".join(inventory.COLUMNS)
_STAMP = MARK_PREFIX.encode("utf-8")
_POLICY = RetryPolicy(give_up_seconds=600)
SHOWN_SKIPPED = 5  # names given in the log when records are left out

Call = Callable[[str, Callable[[], T]], T]


@dataclass
class InventoryResult:
    """What writing the inventories of a run did. `failures`: (path, message) for the run's
    summary; `failed_rows`: ids (id()) of the rows whose originals must not be deleted now."""

    written: int = 0
    unchanged: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    failed_rows: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class _RowSpan:
    """One row's sources: plan.sources[start:stop] (a row's sources are consecutive in the plan)."""

    row: SheetRow
    start: int
    stop: int


# pairs_between(start, stop) -> (position, source, its items) for plan.sources[start:stop], in
# order (plan_items.pairs, or list_pairs for items in a list).
PairsBetween = Callable[[int, int], Iterator[Pair]]


def row_spans(plan: Plan) -> list[_RowSpan]:
    """The plan's rows in order, read once (a row's sources are consecutive in the plan)."""
    spans: list[_RowSpan] = []
    start, row, index = 0, None, -1
    for index, source in enumerate(plan.sources):
        if row is None:
            row = source.row
        elif source.row is not row:
            spans.append(_RowSpan(row, start, index))
            start, row = index, source.row
    if row is not None:
        spans.append(_RowSpan(row, start, index + 1))
    return spans


def list_pairs(plan: Plan, items: list[Item]) -> PairsBetween:
    """pairs_between for a plan whose items are all in `items` (journal.sync_plan's answer, in
    the plan's order). RuntimeError when they are not the plan's (a bug: nothing is written)."""
    firsts: list[int] = []
    at = 0
    for source in plan.sources:
        firsts.append(at)
        at += item_count(source)
    if at != len(items):
        raise RuntimeError(f"the plan has {at} items but the journal gave {len(items)}")

    def between(start: int, stop: int) -> Iterator[Pair]:
        if start < len(firsts):
            yield from pair_up(sources_between(plan, start, stop), items[firsts[start]:], start)

    return between


def _done(chunk: list[Item]) -> bool:
    return all(item.state == State.DONE for item in chunk)


def _relative(folder: str, path: str) -> str | None:
    """`path` relative to the Dropbox `folder` ("" or "/" = the top), compared as Dropbox does; None outside."""
    base = folder.rstrip("/")
    if case_key(path[:len(base)]) == case_key(base) and path[len(base):len(base) + 1] == "/":
        return path[len(base) + 1:]
    return None


def _is_zip(source: PlannedSource) -> bool:
    return source.name.lower().endswith(".zip")


def _member_original(folder: Path, name: str) -> str:
    # A member name always separates with /; names that climb out ("..", a leading /) stay below the folder.
    return os.path.join(str(folder), *[part for part in name.split("/") if part not in ("", ".", "..")])


def member_records(source: PlannedSource, archive_name: str, directory: Directory,
                   skipped: list[str]) -> Iterator[Record]:
    """The archive inventory's records of a local archive (see the module docstring); folder
    entries, a name's earlier duplicates, and members an inventory cannot hold are left out
    (the last go to `skipped`)."""
    folder = source.source.parent
    parts = len(source.parts) if source.parts else 0
    for member in directory:
        if member.is_dir or directory.find(member.name) is not member:
            continue
        record = Record(_member_original(folder, member.name), member.size, member_mtime_ns(member, source.mtime_ns),
                        MEMBER, archive_name, member.name, member.crc32, member.compressed_size,
                        member.header_offset, parts)
        if inventory.record_problem(record) is None:
            yield record
        else:
            skipped.append(member.name)


def _unchanged(source: PlannedSource) -> str | None:
    """Why the local file is not the one uploaded (it changed since), or None."""
    info = os.stat(source.source)
    if (info.st_size, info.st_mtime_ns) != (source.size, source.mtime_ns):
        return "it changed on disk since it was uploaded; it is not deleted, and is sent again next run"
    return None


@dataclass
class _Row:
    """One row being written: its sources and items (read again for each pass), its Dropbox
    folder, and the plan indices of the archives listed by their own inventory only (not in the
    row inventory)."""

    pairs: PairsBetween
    span: _RowSpan
    folder: str
    whole_archives: set[int] = field(default_factory=set)

    @property
    def inventory_path(self) -> str:
        return f"{self.folder.rstrip('/')}/{inventory.row_inventory_name(str(self.span.row['inputFile']))}"

    def sources(self) -> Iterator[Pair]:
        return self.pairs(self.span.start, self.span.stop)

    def records(self, listed: set[str] | None, skipped: list[str]) -> Iterator[Record]:
        """The row inventory's records of this run's files in Dropbox (their original paths go
        to `listed`; those an inventory cannot hold, to `skipped`)."""
        for index, source, chunk in self.sources():
            if index in self.whole_archives and listed is not None:
                listed.add(str(source.source))  # an archive listed by member: no longer a file of its own
            if index in self.whole_archives or not _done(chunk):
                continue
            where = source.destination if source.parts else chunk[0].remote_key_path
            relative = _relative(self.folder, where) or _relative(self.folder, source.destination)
            original = str(source.source)
            record = Record(original, source.size, source.mtime_ns, PARTS if source.parts else FILE, relative or "",
                            parts=len(source.parts) if source.parts else 0)
            if relative is None or inventory.record_problem(record) is not None:
                skipped.append(original)
                continue
            if listed is not None:
                listed.add(original)
            yield record


class InventoryWriter:
    """Writes and uploads the inventories of rows, one row at a time (module docstring).

    `call(what, request)` runs a Dropbox request under the run's retry and pause policy;
    `listing` (names.case_key of a Dropbox path -> RemoteFile), when given, is what the rows'
    folders held at the start of the run: a path it does not hold is taken to be free (a file
    found there after all is looked at before anything is replaced)."""

    def __init__(self, client: DropboxClient, log: logging.Logger, work: Path, *, call: Call | None = None,
                 listing: Mapping[str, RemoteFile | RemoteFolder] | None = None):
        self.client, self.log, self.work = client, log, work
        self.call: Call = call or Retrier(log, _POLICY).call
        self.listing = listing
        self.result = InventoryResult()

    # -- one row ---------------------------------------------------------------------------

    def write_row(self, pairs: PairsBetween, span: _RowSpan, folder: str) -> None:
        """The row's archive inventories, then its row inventory; a failure is recorded in
        `result` (the row's originals are then kept) and the row's other inventories still go."""
        row = _Row(pairs, span, folder)
        failed = False
        for index, source, chunk in row.sources():
            if _done(chunk) and _is_zip(source):
                try:
                    if self._write_archive(source, chunk):
                        row.whole_archives.add(index)
                except (AuthError, EnvironmentProblem):
                    raise
                except (ArchiveError, OSError) as exc:
                    failed = True
                    self._fail(span.row, source.destination, exc)
        try:
            self._write_row_inventory(row)
        except (AuthError, EnvironmentProblem):
            raise
        except (ArchiveError, OSError) as exc:
            failed = True
            self._fail(span.row, row.inventory_path, exc)
        if failed:
            self.log.warning("Row %d: its inventory is not complete in Dropbox, so none of its originals is deleted "
                             "in this run (they would be hard to find); run app.py again.", span.row.row)

    def _fail(self, row: SheetRow, what: str, exc: BaseException) -> None:
        message = exc.message if isinstance(exc, ArchiveError) else f"{exc.strerror or exc}"
        text = f"the inventory for {what} could not be written: {message}"
        self.result.failures.append((what, text))
        self.result.failed_rows.add(id(row))
        self.log.warning("INVENTORY NOT WRITTEN\t%s: %s", what, message)

    # -- an archive ------------------------------------------------------------------------

    def _write_archive(self, source: PlannedSource, chunk: list[Item]) -> bool:
        """Write and upload the inventory of one uploaded `.zip`. True when it lists the
        archive's originals (made by 2_zipDir.py): the archive itself is then in no other
        inventory. False when it is not a readable zip, or is another tool's (an original too)."""
        problem = _unchanged(source)
        if problem:
            raise FileProblem(f"{shown(source.source)}: {problem}", paths=[source.source])
        try:
            with FileReader(source.source) as reader:
                directory = read_directory(reader)
        except (DamagedArchive, UnsupportedArchive) as exc:
            self.log.info("%s is not listed by member (%s): it is listed as one file.", shown(source.source),
                          exc.message)
            return False
        stamped = directory.comment.startswith(_STAMP)
        remote = source.destination if source.parts else chunk[0].remote_key_path
        folder, archive_name = remote.rsplit("/", 1)
        if not stamped:
            self.log.info("%s was not made by 2_zipDir.py: its members are listed as if under %s (where they would "
                          "be if unzipped there), and the archive itself as one of the row's files.",
                          shown(source.source), shown(source.source.parent))
        skipped: list[str] = []
        local = self._local("archive.csv")
        count = inventory.write_csv(member_records(source, archive_name, directory, skipped), local)
        if skipped:
            self.log.warning("%s: %d member(s) not listed in its inventory (names that are not text): %s",
                             shown(source.source), len(skipped), ", ".join(shown(n) for n in skipped[:SHOWN_SKIPPED]))
        path = f"{folder}/{inventory.archive_inventory_name(archive_name)}"
        self._put(local, path, self._before(path), count, ours=self._is_inventory)
        return stamped

    # -- the row ---------------------------------------------------------------------------

    def _row_csv(self, row: _Row, local: Path, earlier: Path | None) -> tuple[int, int]:
        """Write the row inventory at `local`: this run's files, then the records of `earlier`
        (the inventory Dropbox held) for originals this run does not list. (records, carried)."""
        listed: set[str] | None = set() if earlier is not None else None
        skipped: list[str] = []
        carried = 0

        def records() -> Iterator[Record]:
            nonlocal carried
            yield from row.records(listed, skipped)
            if earlier is not None:
                for record in inventory.read_csv(earlier, row.inventory_path):
                    if record.original_path not in listed:
                        carried += 1
                        yield record

        try:
            count = inventory.write_csv(records(), local)
        except InventoryError as exc:
            raise FileProblem(f"{exc.message}; the inventory there cannot be merged, so it is not replaced: move it "
                              "away if it is not an inventory of this tool (Dropbox keeps its earlier versions)",
                              paths=[row.inventory_path]) from None
        if skipped:
            self.log.warning("Row %d: %d file(s) not listed in its inventory (names that are not text): %s",
                             row.span.row.row, len(skipped), ", ".join(shown(n) for n in skipped[:SHOWN_SKIPPED]))
        return count, carried

    def _write_row_inventory(self, row: _Row) -> None:
        """This run's files first; only when Dropbox holds another inventory there is it
        downloaded and merged (a rerun that changes nothing downloads nothing)."""
        path = row.inventory_path
        before = self._before(path)
        if isinstance(before, RemoteFolder):
            raise FileProblem(f"{path} is a folder in Dropbox", paths=[path])
        local = self._local("row.csv")
        count, carried = self._row_csv(row, local, None)
        if isinstance(before, RemoteFile) and before.content_hash != file_content_hash(local):
            earlier = self._download(before)
            try:
                count, carried = self._row_csv(row, local, earlier)
            finally:
                discard_temporary_quietly(earlier)
        if count == 0:
            discard_temporary(local)
            return
        self._put(local, path, before, count, carried)

    # -- Dropbox ---------------------------------------------------------------------------

    def _local(self, name: str) -> Path:
        self.work.mkdir(parents=True, exist_ok=True)
        return self.work / name

    def _before(self, path: str) -> RemoteFile | RemoteFolder | None:
        """What Dropbox holds at `path` (from the listing when there is one)."""
        if self.listing is not None:
            return self.listing.get(case_key(path))
        return self.call("reading Dropbox metadata", lambda: self.client.metadata(path))

    def _is_inventory(self, remote: RemoteFile) -> bool:
        """Whether the Dropbox file starts with the inventory header (then it is ours to replace)."""
        expected = ("\ufeff" + HEADER).encode("utf-8")

        def head() -> bytes:
            _, chunks = self.client.download_range(remote.path_lower, 0, min(remote.size, len(expected)))
            return b"".join(chunks)

        return remote.size >= len(expected) and self.call("reading an inventory", head) == expected

    def _download(self, remote: RemoteFile) -> Path:
        """The inventory at `remote`, downloaded into the work folder."""
        local = self._local("earlier.csv")
        try:
            self.call(f"reading {remote.path_display}", lambda: self.client.download_to(remote.path_lower, local))
        except BaseException:
            discard_temporary_quietly(local)
            raise
        return local

    def _put(self, local: Path, path: str, before: RemoteFile | RemoteFolder | None, count: int,
             carried: int = 0, ours: Callable[[RemoteFile], bool] | None = None) -> None:
        """Upload `local` to `path` unless Dropbox holds it already. `before`, what is there, is
        replaced: when `ours` is given, only if ours(before) says it is an inventory (else
        FileProblem). Discards `local`."""
        try:
            content_hash = file_content_hash(local)
            if isinstance(before, RemoteFile) and before.content_hash == content_hash:
                self.result.unchanged += 1
                self.log.debug("INVENTORY UNCHANGED\t%s", path)
                return
            if isinstance(before, RemoteFolder) or (isinstance(before, RemoteFile) and ours and not ours(before)):
                raise FileProblem(f"{path} exists in Dropbox and is not an inventory of this tool: it is left as it "
                                  "is. Rename or move it, then run app.py again", paths=[path])
            request = CommitRequest("", 0, path, datetime.now(timezone.utc).replace(tzinfo=None),
                                    overwrite=before is not None)
            remote = self._commit(local, request, content_hash)
            if remote.content_hash != content_hash:
                raise FileProblem(f"Dropbox's content hash of {path} does not match what was sent (Dropbox "
                                  f"{remote.content_hash}, local {content_hash})", paths=[path])
        finally:
            discard_temporary(local)
        self.result.written += 1
        note = f", {carried} of them from the inventory already there" if carried else ""
        self.log.info("INVENTORY\t%s\t%d file(s)%s", remote.path_display, count, note, extra=PER_FILE)

    def _commit(self, local: Path, request: CommitRequest, content_hash: str) -> RemoteFile:
        """Send the file. A refusal after a request whose answer was lost (the file is there
        already, or the session is gone) is checked against what Dropbox holds."""
        try:
            if local.stat().st_size <= SINGLE_UPLOAD:
                data = local.read_bytes()
                return self.call("uploading an inventory", lambda: self.client.upload(data, request))
            return self._session(local, request)
        except DropboxProblem:
            remote = self.call("reading Dropbox metadata", lambda: self.client.metadata(request.path))
            if isinstance(remote, RemoteFile) and remote.content_hash == content_hash:
                return remote
            raise

    def _session(self, local: Path, request: CommitRequest) -> RemoteFile:
        path = request.path
        with open(local, "rb") as handle:
            data = handle.read(SESSION_CHUNK)
            session = self.call("uploading an inventory", lambda: self.client.session_start(data, path=path))
            offset = len(data)
            while data := handle.read(SESSION_CHUNK):
                try:
                    self.call("uploading an inventory",
                              lambda: self.client.session_append(session, offset, data, path=path))
                except IncorrectOffset as exc:
                    if exc.correct_offset != offset + len(data):  # else: it arrived, its answer was lost
                        raise
                offset += len(data)
        commit = dataclasses.replace(request, session_id=session, offset=offset)
        return self.call("uploading an inventory", lambda: self.client.session_finish(commit))


def done_part(plan: Plan, items_of: Mapping[str, list[Item]], sources: Collection[str]) -> tuple[Plan, list[Item]]:
    """(plan, items) for `write_upload_inventories` when only some files reached Dropbox since
    the inventories were last written (desktop-app mode, batch by batch): the sources of `plan`
    named in `sources` (str of the local path) whose every item is done, in the plan's order,
    and their items. `items_of`: str(source) -> all its items, in order. A row inventory written
    from such a part keeps the records Dropbox already holds for the row's other originals."""
    part: list[PlannedSource] = []
    items: list[Item] = []
    for source in plan.sources:
        chunk = items_of.get(str(source.source)) if str(source.source) in sources else None
        if chunk and _done(chunk):
            part.append(source)
            items.extend(chunk)
    return Plan(sources=part), items


def work_folder(logs_root: Path, job: str) -> Path:
    """The temporary folder of one job's inventories under logs/ (`.~<hex>.inventories`)."""
    return temporary_sibling(logs_root / f"inventories {job}", "inventories")


def write_upload_inventories(client: DropboxClient, plan: Plan, items: list[Item] | None = None, *,
                             destination_of_row: Callable[[SheetRow], str], logs_root: Path, job: str,
                             log: logging.Logger, call: Call | None = None,
                             listing: Mapping[str, RemoteFile | RemoteFolder] | None = None,
                             pairs: PairsBetween | None = None) -> InventoryResult:
    """Write and upload the inventories of every row of `plan` (module docstring). The plan's
    journal items, with this run's states: `items`, all of them in the plan's order
    (journal.sync_plan's answer), or `pairs` to read them a row at a time (plan_items.pairs).
    `destination_of_row(row)`: the row's Dropbox folder. Returns what was done; a failure is in
    the result (never raised), except AuthError and EnvironmentProblem, which stop the run."""
    pairs = pairs if pairs is not None else list_pairs(plan, items or [])
    work = work_folder(logs_root, job)
    discard_temporary(work)  # a leftover of a run that stopped
    writer = InventoryWriter(client, log, work, call=call, listing=listing)
    try:
        for span in row_spans(plan):
            writer.write_row(pairs, span, destination_of_row(span.row))
    finally:
        discard_temporary_quietly(work)
    result = writer.result
    if result.written or result.failures:
        log.info("Inventories: %d written to Dropbox, %d unchanged, %d could not be written.", result.written,
                 result.unchanged, len(result.failures))
    return result
