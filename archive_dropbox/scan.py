"""Find the folders worth zipping before upload: the engine of preProcess/1_listDirToZip.py,
whose settings, flags and tab are read by list_dir_cmd.py.

One job: walk each folder it is given (the rows of the `listDirToZip` tab) once, total every
directory bottom-up, pick the zip candidates, write directorySize.txt / directoryZipList.txt /
directoryZipList.xlsx, and warn about what zipping cannot fix.

Walking rules, chosen so that a 50 TB tree on a network share is read once and safely:
- `os.scandir`, iterative (a work queue, no recursion), one `stat` per regular file and none per
  folder on file systems that report entry types (ext4, xfs, NTFS, APFS, NFS, SMB...).
- Symbolic links (and Windows junctions) are never followed and never counted as files: a link
  is not data of its own, following one can loop forever or leave the tree, and the zip and
  upload stages do not follow them either. They are counted and reported.
- Sockets, pipes and device nodes are counted as "other entries" and ignored likewise.
- An entry that cannot be read is logged and counted; the walk goes on. Its folder and every
  folder above it are marked incomplete and are never proposed for zipping (7-Zip would fail on
  them); the run ends with exit status 1 so nobody mistakes the lists for complete ones.
- A folder whose listing takes long (network file systems) makes the walk use several threads:
  `scandir` and `stat` release the GIL, so threads overlap the waiting. On a fast local disk one
  thread is quicker (no GIL hand-offs), so the walker measures first, tries more threads, and
  keeps them only when they really read faster.

Memory stays small: one compact record per directory (name, parent, counts in typed arrays),
nothing per file. 200,000 files in 20,000 folders cost a few MB.

Sizes are in GB of 1,000,000,000 bytes, the unit the rest of the package (prepare.GB) and
Dropbox use, so that fileSizeLimit_GB means the same number of bytes here as in app.py.
(The original script divided by 1024**3; its lists showed about 7 % smaller numbers.)
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

from . import errors
from .deletion import discard_temporary_quietly
from .localfs import is_link_entry, temporary_sibling
from .names import is_valid_text
from .sheets import write_workbook
from .units import GB

# Dropbox's desktop app slows down past about this many files (help.dropbox.com, "file storage
# limit"); the projection in the warnings is measured against it.
DROPBOX_COMFORT_FILES = 300_000

# minFiles default: a folder is only worth an archive when it removes many files from Dropbox's
# ~300,000-file budget. Below 1,000 files a folder costs at most 0.3 % of that budget, while its
# archive costs a 7-Zip run and a test, and hides the files from Dropbox's web preview and search.
# Microscope frame folders (the case this exists for) hold thousands to hundreds of thousands.
DEFAULT_MIN_FILES = 1000

# Movies recorded as .../<movie>/Hour_NN/Minute_NN/Second_NN/... are zipped whole.
TIME_LEVEL = re.compile(r"(?i)^(hour|minute|second)_\d+$")

HEADER = ("Directory", "Number of subdirectories", "Number of files", "Size (GB)")
SIZE_LIST = "directorySize.txt"
ZIP_LIST = "directoryZipList.txt"
ZIP_WORKBOOK = "directoryZipList.xlsx"
ZIP_TAB = "zipDir"

MAX_THREADS = 64
# Automatic thread count: one thread reads for PROBE_SECONDS; if it spent most of that time
# waiting (CPU time below IO_BOUND_SHARE of wall time), AUTO_THREADS read for TRIAL_SECONDS, and
# stay only if they read at least THREADS_MUST_SPEED_UP times as fast. The trial matters: a
# thread also waits when other programs keep the CPUs busy, and then more threads only add
# GIL hand-offs.
AUTO_THREADS = 16
PROBE_SECONDS = 0.5
IO_BOUND_SHARE = 0.5
TRIAL_SECONDS = 1.0
THREADS_MUST_SPEED_UP = 1.5
PROGRESS_SECONDS = 30.0
MAX_PROBLEMS_KEPT = 10_000  # problem entries remembered for the log (all are counted)
PROBLEMS_ON_SCREEN = 20

# POSIX: list a folder through a descriptor, so each file's stat is looked up relative to its
# folder (fstatat) instead of walking the whole path again: about 10 % faster, as find does.
_LIST_BY_FD = os.scandir in os.supports_fd
_DIR_FLAGS = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
# Below the root, a folder swapped for a link between listing and opening is not followed.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _open_listing(path: str, is_root: bool):
    """An os.scandir iterator over `path`, and the descriptor to close after it (or None).

    Tests replace this function to simulate unreadable folders (chmod has no effect as root).
    """
    if not _LIST_BY_FD:
        return os.scandir(path), None
    descriptor = os.open(path, _DIR_FLAGS if is_root else _DIR_FLAGS | _NOFOLLOW)
    try:
        return os.scandir(descriptor), descriptor
    except BaseException:
        os.close(descriptor)
        raise


# --------------------------------------------------------------------------- the tree


class DirectoryTree:
    """Every directory below one root, as parallel typed arrays indexed by directory id.

    Id 0 is the root. The children of a directory get consecutive ids, allocated in name order
    when it is listed, so a child's id is always larger than its parent's (totals can be summed
    in one backward pass) and a pre-order walk needs no extra index.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)
        self.names: list[str] = [self.root]
        self.parents = array("q", [-1])
        self.first_child = array("q", [0])
        self.child_count = array("q", [0])
        self.own_files = array("q", [0])
        self.own_bytes = array("q", [0])
        self.unreadable = bytearray(1)  # the listing failed or broke off
        self.symlinks = 0  # links (and junctions) not followed
        self.other_entries = 0  # sockets, pipes, devices
        self.vanished = 0  # deleted between listing and stat: not a problem
        self.problem_count = 0
        self.problems: list[tuple[str, str]] = []  # (path, reason), first MAX_PROBLEMS_KEPT
        # Names that are not valid text (UTF-8), which Dropbox cannot store: warned about, counted.
        self.not_text_count = 0
        self.not_text: list[str] = []  # their paths, first MAX_PROBLEMS_KEPT
        self.seconds = 0.0
        self.threads_used = 1
        self.thread_note = ""  # how the automatic thread count was decided, when it was tried
        # Filled in by finish().
        self.total_files = array("q")
        self.total_bytes = array("q")
        self.total_subdirs = array("q")
        self.incomplete = bytearray()

    def __len__(self) -> int:
        return len(self.names)

    @property
    def root_failed(self) -> bool:
        """True when the root itself could not be listed: nothing was scanned."""
        return bool(self.unreadable[0]) and self.child_count[0] == 0 and self.own_files[0] == 0

    def add_children(self, parent: int, names: Sequence[str]) -> int:
        """Register the subdirectories of `parent` (already sorted); returns the first new id."""
        first = len(self.names)
        count = len(names)
        self.names.extend(names)
        self.parents.extend([parent] * count)
        zeros = [0] * count
        self.first_child.extend(zeros)
        self.child_count.extend(zeros)
        self.own_files.extend(zeros)
        self.own_bytes.extend(zeros)
        self.unreadable.extend(bytes(count))
        self.first_child[parent] = first
        self.child_count[parent] = count
        return first

    def record(self, dir_id: int, files: int, size: int, *, unreadable: bool = False) -> None:
        self.own_files[dir_id] = files
        self.own_bytes[dir_id] = size
        if unreadable:
            self.unreadable[dir_id] = 1

    def add_problem(self, path: str, reason: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS_KEPT:
            self.problems.append((path, reason))

    def finish(self) -> "DirectoryTree":
        """Sum files, bytes and descendants bottom-up (children always have larger ids)."""
        files = array("q", self.own_files)
        size = array("q", self.own_bytes)
        subdirs = array("q", bytes(8 * len(self.names)))
        incomplete = bytearray(self.unreadable)
        parents = self.parents
        for child in range(len(self.names) - 1, 0, -1):
            parent = parents[child]
            files[parent] += files[child]
            size[parent] += size[child]
            subdirs[parent] += subdirs[child] + 1
            if incomplete[child]:
                incomplete[parent] = 1
        self.total_files, self.total_bytes, self.total_subdirs = files, size, subdirs
        self.incomplete = incomplete
        return self

    def children(self, dir_id: int) -> range:
        start = self.first_child[dir_id]
        return range(start, start + self.child_count[dir_id])

    def ancestors(self, dir_id: int) -> Iterator[int]:
        """Parent, grandparent, ... up to and including the root."""
        parent = self.parents[dir_id]
        while parent >= 0:
            yield parent
            parent = self.parents[parent]

    def path(self, dir_id: int) -> str:
        """The folder's path, spelled exactly as preorder() spells it."""
        path = self.root
        for step in self.order_key(dir_id)[1:]:
            path = (path if path.endswith(os.sep) else path + os.sep) + self.names[step]
        return path

    def preorder(self) -> Iterator[tuple[int, str]]:
        """(id, path) of every directory, each folder followed by its subfolders in name order."""
        stack = [(0, self.root)]
        names, first_child, child_count = self.names, self.first_child, self.child_count
        separator = os.sep
        while stack:
            dir_id, path = stack.pop()
            yield dir_id, path
            count = child_count[dir_id]
            if count:
                # Plain concatenation (os.path.join costs more than the rest of a line): only a
                # root such as / or D:\\ already ends with the separator.
                prefix = path if path.endswith(separator) else path + separator
                start = first_child[dir_id]
                for child in range(start + count - 1, start - 1, -1):
                    stack.append((child, prefix + names[child]))

    def order_key(self, dir_id: int) -> list[int]:
        """Sort key giving pre-order (ids grow in name order among siblings)."""
        chain = [dir_id, *self.ancestors(dir_id)]
        chain.reverse()
        return chain


# --------------------------------------------------------------------------- the walk


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


# What one folder held: files, bytes, links not followed, other entries, entries gone before
# their stat, and whether the folder (or part of its listing) could not be read.
_Counts = tuple[int, int, int, int, int, bool]  # files, size, links, other, vanished, failed
_GONE = None  # the folder itself disappeared before it could be listed


def _list_directory(path: str, subdirs: list[str], problems: list[tuple[str, str]],
                    is_root: bool = False, not_text: list[str] | None = None) -> _Counts | None:
    """Read one folder: count its regular files and bytes, collect its real subfolders, and the
    paths of entries whose names are not valid text (UTF-8) in `not_text`."""
    try:
        entries, descriptor = _open_listing(path, is_root)
    except FileNotFoundError:
        return _GONE
    except OSError as exc:
        problems.append((path, f"folder cannot be read ({_reason(exc)})"))
        return 0, 0, 0, 0, 0, True
    files = size = links = other = vanished = 0
    failed = False
    try:
        # The hot loop, most frequent case first: the is_* calls need no system call where the
        # listing reports entry types; one stat per regular file (free on Windows, where the
        # listing carries it). stat() of a non-link entry is its lstat: links are never followed.
        for entry in entries:
            name = entry.name
            # isascii() first: the UTF-8 test runs only for the rare names that are not plain ASCII.
            if not name.isascii() and not_text is not None and not is_valid_text(name):
                not_text.append(os.path.join(path, name))
            try:
                if entry.is_file(follow_symlinks=False):
                    files += 1
                    size += entry.stat().st_size
                elif entry.is_dir(follow_symlinks=False):
                    # Junctions look like folders but point elsewhere (Windows profiles hold
                    # junction loops).
                    if is_link_entry(entry):
                        links += 1
                    else:
                        subdirs.append(entry.name)
                elif entry.is_symlink():
                    links += 1
                else:
                    other += 1
            except FileNotFoundError:
                vanished += 1
            except OSError as exc:
                problems.append((os.path.join(path, entry.name), f"cannot be read ({_reason(exc)})"))
    except OSError as exc:
        problems.append((path, f"the folder listing broke off ({_reason(exc)})"))
        failed = True
    finally:
        entries.close()
        if descriptor is not None:
            os.close(descriptor)
    return files, size, links, other, vanished, failed


Progress = Callable[[int, int, int], None]  # folders, files, bytes so far


class _Walk:
    """Folders to read, shared by one or more threads; totals are summed afterwards.

    Each thread works depth-first from its own stack (no locking per folder beyond one short
    critical section) and hands the oldest half of it to the shared queue only when another
    thread is idle: the oldest entries are the shallowest folders, the largest pieces of work.
    """

    def __init__(self, tree: DirectoryTree):
        self.tree = tree
        self.shared: "queue.SimpleQueue[tuple[int, str] | None]" = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.pending = 1  # folders found but not yet read
        self.idle = 0  # threads waiting for work
        self.done = threading.Event()
        self.stopping = False
        self.failure: BaseException | None = None
        self.cpu_share: float | None = None
        self.threads: list[threading.Thread] = []
        self.active_limit = MAX_THREADS  # workers numbered from this one on stop working
        self.files = 0
        self.bytes = 0
        self.folders = 0

    @property
    def entries(self) -> int:
        return self.folders + self.files

    @property
    def active_threads(self) -> int:
        return min(len(self.threads), self.active_limit)

    def start_workers(self, count: int, probe: bool = False) -> None:
        for _ in range(count):
            index = len(self.threads)
            worker = threading.Thread(target=self._work, args=(index, probe), daemon=True,
                                      name=f"scan-{index + 1}")
            self.threads.append(worker)
            worker.start()

    def retire_workers(self, keep: int) -> None:
        """Let only the first `keep` workers go on; the others hand back their folders."""
        self.active_limit = keep

    def _take_shared(self) -> tuple[int, str] | None:
        with self.lock:
            self.idle += 1
        try:
            return self.shared.get()
        finally:
            with self.lock:
                self.idle -= 1

    def _work(self, index: int, probe: bool) -> None:
        tree = self.tree
        lock = self.lock
        join = os.path.join
        wall_start = time.perf_counter()
        cpu_start = time.thread_time()
        mine: list[tuple[int, str]] = []
        try:
            while not self.stopping:
                item = mine.pop() if mine else self._take_shared()
                if item is None:
                    return
                if index >= self.active_limit:  # retired: another worker reads these
                    for unread in (*mine, item):
                        self.shared.put(unread)
                    return
                dir_id, path = item
                subdirs: list[str] = []
                problems: list[tuple[str, str]] = []
                not_text: list[str] = []
                counts = _list_directory(path, subdirs, problems, dir_id == 0, not_text)
                if counts is _GONE:
                    if dir_id == 0:
                        problems.append((path, "no longer exists"))
                        counts = (0, 0, 0, 0, 0, True)
                    else:  # deleted while the walk was running: nothing left to zip there
                        counts = (0, 0, 0, 0, 1, False)
                files, size, links, other, vanished, failed = counts
                subdirs.sort()
                with lock:
                    tree.record(dir_id, files, size, unreadable=failed or bool(problems))
                    first = tree.add_children(dir_id, subdirs) if subdirs else 0
                    if links or other or vanished:
                        tree.symlinks += links
                        tree.other_entries += other
                        tree.vanished += vanished
                    for problem_path, reason in problems:
                        tree.add_problem(problem_path, reason)
                    if not_text:
                        tree.not_text_count += len(not_text)
                        tree.not_text.extend(not_text[:MAX_PROBLEMS_KEPT - len(tree.not_text)])
                    self.files += files
                    self.bytes += size
                    self.folders += 1
                    self.pending += len(subdirs) - 1
                    if self.pending == 0:
                        self.done.set()
                for offset in range(len(subdirs) - 1, -1, -1):
                    mine.append((first + offset, join(path, subdirs[offset])))
                if self.idle and len(mine) > 1:
                    half = len(mine) // 2
                    for shared in mine[:half]:
                        self.shared.put(shared)
                    del mine[:half]
                if probe and self.cpu_share is None:
                    wall = time.perf_counter() - wall_start
                    if wall >= PROBE_SECONDS:
                        self.cpu_share = (time.thread_time() - cpu_start) / wall
        except BaseException as exc:  # a bug in a worker must end the walk, not hang it
            self.failure = exc
            self.done.set()

    def stop(self) -> None:
        self.stopping = True
        for _ in self.threads:
            self.shared.put(None)


def scan_directory(root: str | os.PathLike, *, threads: int = 0, progress: Progress | None = None,
                   progress_seconds: float = PROGRESS_SECONDS) -> DirectoryTree:
    """Walk `root` once and return its finished DirectoryTree.

    threads=0 measures first and uses more threads only when the storage is slow to answer.
    `progress(folders, files, bytes)` is called every `progress_seconds` on long walks.
    """
    started = time.perf_counter()
    tree = DirectoryTree(root)
    walk = _Walk(tree)
    walk.shared.put((0, tree.root))
    automatic = threads == 0
    walk.start_workers(1 if automatic else threads, probe=automatic)
    phase = "probe" if automatic else "fixed"
    single_rate = 0.0
    trial_start = (started, 0)
    last_report = started
    try:
        while not walk.done.wait(0.1):
            now = time.perf_counter()
            if phase == "probe" and walk.cpu_share is not None:
                phase = "fixed"
                if walk.cpu_share < IO_BOUND_SHARE:
                    trial_start = (now, walk.entries)
                    single_rate = trial_start[1] / (now - started)
                    walk.start_workers(AUTO_THREADS - 1)
                    phase = "trial"
            elif phase == "trial" and now - trial_start[0] >= TRIAL_SECONDS:
                phase = "fixed"
                trial_rate = (walk.entries - trial_start[1]) / (now - trial_start[0])
                speed_up = trial_rate / single_rate if single_rate else 0.0
                if speed_up < THREADS_MUST_SPEED_UP:
                    walk.retire_workers(keep=1)
                    tree.thread_note = f"{len(walk.threads)} threads read only {speed_up:.1f}x as fast: back to 1"
                else:
                    tree.thread_note = f"{len(walk.threads)} threads read {speed_up:.1f}x as fast: kept"
            if progress is not None and now - last_report >= progress_seconds:
                last_report = now
                with walk.lock:
                    counts = (walk.folders, walk.files, walk.bytes)
                progress(*counts)
    finally:
        walk.stop()
    if walk.failure is not None:
        raise walk.failure
    if phase == "trial":
        tree.thread_note = f"the walk ended while {len(walk.threads)} threads were being tried"
    tree.threads_used = walk.active_threads
    tree.seconds = time.perf_counter() - started
    return tree.finish()


# --------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Candidate:
    """A folder proposed for zipping, with its recursive totals."""

    tree: DirectoryTree
    dir_id: int
    movie: bool  # a movie folder zipped whole, whatever its size

    @property
    def path(self) -> str:
        return self.tree.path(self.dir_id)

    @property
    def files(self) -> int:
        return self.tree.total_files[self.dir_id]

    @property
    def bytes(self) -> int:
        return self.tree.total_bytes[self.dir_id]

    @property
    def subdirectories(self) -> int:
        return self.tree.total_subdirs[self.dir_id]

    @property
    def incomplete(self) -> bool:
        return bool(self.tree.incomplete[self.dir_id])


def qualifies(tree: DirectoryTree, dir_id: int, size_limit_bytes: float, min_files: int) -> bool:
    """Small enough for one archive, enough files to be worth one, and fully readable."""
    return (not tree.incomplete[dir_id] and tree.total_bytes[dir_id] <= size_limit_bytes
            and tree.total_files[dir_id] >= min_files)


def movie_root(tree: DirectoryTree, dir_id: int) -> int | None:
    """The folder holding the topmost Hour_/Minute_/Second_ level at or above `dir_id`, or None.

    Only levels below the scanned root count: a root that is itself an Hour_NN folder is not
    climbed out of.
    """
    topmost = None
    current = dir_id
    while current > 0:  # id 0 is the root
        if TIME_LEVEL.match(tree.names[current]):
            topmost = current
        current = tree.parents[current]
    return None if topmost is None else tree.parents[topmost]


def select_candidates(tree: DirectoryTree, size_limit_bytes: float, min_files: int) -> list[Candidate]:
    """The topmost qualifying folders, movie parts replaced by their whole movie folder."""
    chosen: list[int] = []
    stack = [0]
    while stack:
        dir_id = stack.pop()
        if qualifies(tree, dir_id, size_limit_bytes, min_files):
            chosen.append(dir_id)
        else:
            stack.extend(tree.children(dir_id))
    picked: set[int] = set()
    movies: set[int] = set()
    for dir_id in chosen:
        group = movie_root(tree, dir_id)
        if group is None:
            picked.add(dir_id)
        else:
            picked.add(group)
            movies.add(group)
    # A movie folder may hold other candidates (a gain-reference folder beside the Hour_NN
    # folders): they go into its archive, so only the outermost folder stays.
    kept = [d for d in picked if not any(a in picked for a in tree.ancestors(d))]
    kept.sort(key=tree.order_key)
    return [Candidate(tree, d, d in movies) for d in kept]


def parts_needed(size: int, size_limit_bytes: float) -> int:
    """Files an archive becomes in Dropbox: one, or its parts plus their manifest when split."""
    if size <= size_limit_bytes:
        return 1
    return math.ceil(size / size_limit_bytes) + 1


# --------------------------------------------------------------------------- outputs


_TSV_ESCAPES = str.maketrans({"\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _tsv_path(path: str) -> str:
    # A tab or newline inside a folder name would break the columns; such names are rare and
    # written with visible escapes. isprintable() is the fast test that lets almost all through.
    return path if path.isprintable() else path.translate(_TSV_ESCAPES)


def shown(path: str | os.PathLike) -> str:
    """A path as text that any log or console accepts: bytes that are not valid UTF-8 in a
    name (possible on Linux) appear as \\xNN instead of breaking the log line."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def format_gb(size: int) -> str:
    return f"{size / GB:.6f}"


def _line(path: str, subdirs: int, files: int, size: int) -> str:
    return f"{_tsv_path(path)}\t{subdirs}\t{files}\t{size / GB:.6f}\n"


def _size_lines(tree: DirectoryTree) -> Iterator[str]:
    subdirs, files, size = tree.total_subdirs, tree.total_files, tree.total_bytes
    for dir_id, path in tree.preorder():
        yield _line(path, subdirs[dir_id], files[dir_id], size[dir_id])


def _write_text(path: Path, lines: Iterable[str]) -> None:
    # surrogateescape writes undecodable (non-UTF-8) names back as the bytes the OS holds.
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as out:
        out.write("\t".join(HEADER) + "\n")
        out.writelines(lines)


def _xlsx_safe(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return ILLEGAL_CHARACTERS_RE.search(path) is None


def write_outputs(output_dir: Path, trees: Sequence[DirectoryTree], candidates: Sequence[Candidate]
                  ) -> tuple[list[Path], list[str]]:
    """Write the three result files, each replaced only once complete.

    Returns the files written and the candidate paths left out of the workbook (names Excel
    cannot store); those are still in directoryZipList.txt.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    targets = [output_dir / SIZE_LIST, output_dir / ZIP_LIST]
    temporaries = [temporary_sibling(t, "partial") for t in targets]
    left_out: list[str] = []
    try:
        _write_text(temporaries[0], (line for tree in trees for line in _size_lines(tree)))
        candidate_paths = [c.path for c in candidates]
        _write_text(temporaries[1], (
            _line(path, c.subdirectories, c.files, c.bytes) for c, path in zip(candidates, candidate_paths)))
        rows = []
        for path in candidate_paths:
            if _xlsx_safe(path):
                rows.append((path, 0))
            else:
                left_out.append(path)
        write_workbook(output_dir / ZIP_WORKBOOK, {ZIP_TAB: (("inputDir", "deleteFlag"), rows)})
        for temporary, target in zip(temporaries, targets):
            os.replace(temporary, target)
    except OSError as exc:
        raise errors.EnvironmentProblem(
            f"the results could not be written into {output_dir} ({_reason(exc)}). Check that the "
            "folder is writable, has free space, and that directoryZipList.xlsx is not open in "
            "Excel, then run the script again.", paths=[output_dir], title="Cannot write the results"
        ) from None
    finally:
        for temporary in temporaries:
            discard_temporary_quietly(temporary)
    return [*targets, output_dir / ZIP_WORKBOOK], left_out


# --------------------------------------------------------------------------- a whole run


def _log_problems(log, tree: DirectoryTree) -> None:
    if not tree.problem_count:
        return
    log.warning("  %d entr%s in %s could not be read and %s left out (its folders are not "
                "proposed for zipping):", tree.problem_count, "y" if tree.problem_count == 1 else "ies",
                shown(tree.root), "is" if tree.problem_count == 1 else "are")
    for index, (path, reason) in enumerate(tree.problems):
        level = log.warning if index < PROBLEMS_ON_SCREEN else log.debug
        level("    %s: %s", shown(path), reason)
    hidden = tree.problem_count - min(len(tree.problems), PROBLEMS_ON_SCREEN)
    if hidden > 0:
        log.warning("    ... and %d more (listed in the log file%s)", hidden,
                    "" if tree.problem_count <= MAX_PROBLEMS_KEPT else
                    f", the first {MAX_PROBLEMS_KEPT}")


def _warn_not_text(log, trees: Sequence[DirectoryTree]) -> int:
    """Names whose bytes are not UTF-8 (written by an old system): 2_zipDir.py and app.py refuse
    them, so they are named now, before anyone waits for those stages. Returns the warning count."""
    total = sum(t.not_text_count for t in trees)
    if not total:
        return 0
    log.warning("%d name(s) are not valid text (UTF-8); Dropbox cannot store them, and 2_zipDir.py and app.py "
                "will refuse them: rename them (the bad bytes are shown as \\xNN):", total)
    paths = [path for tree in trees for path in tree.not_text]
    for index, path in enumerate(paths):
        (log.warning if index < PROBLEMS_ON_SCREEN else log.debug)("  %s", shown(path))
    if total > min(len(paths), PROBLEMS_ON_SCREEN):
        log.warning("  ... and %d more (listed in the log file%s)", total - min(len(paths), PROBLEMS_ON_SCREEN),
                    "" if total <= len(paths) else f", the first {len(paths)}")
    return 1


def _log_warnings(log, trees: Sequence[DirectoryTree], candidates: Sequence[Candidate],
                  size_limit_bytes: float, limit_gb: float, min_files: int) -> int:
    """The warnings section; returns how many warnings were given."""
    count = 0
    log.info("---- Warnings ----")
    covered = {(id(c.tree), c.dir_id) for c in candidates}

    def is_covered(tree: DirectoryTree, dir_id: int) -> bool:
        key = id(tree)
        return (key, dir_id) in covered or any((key, a) in covered for a in tree.ancestors(dir_id))

    crowded = [(tree, d) for tree in trees for d in range(len(tree))
               if tree.own_files[d] >= min_files and tree.total_bytes[d] > size_limit_bytes
               and not is_covered(tree, d)]
    if crowded:
        count += len(crowded)
        log.warning("%d folder(s) directly hold at least %d files but are larger than "
                    "fileSizeLimit_GB = %g, so they cannot be zipped whole; their files will go to "
                    "Dropbox one by one. Consider moving the files into subfolders, or raising "
                    "fileSizeLimit_GB:", len(crowded), min_files, limit_gb)
        for tree, d in crowded:
            log.warning("  %s: %d files directly inside, %s GB in total", shown(tree.path(d)),
                        tree.own_files[d], format_gb(tree.total_bytes[d]))

    for candidate in candidates:
        if candidate.movie and candidate.bytes > size_limit_bytes:
            count += 1
            log.warning("Movie folder %s (%s GB) is larger than fileSizeLimit_GB = %g; it is still "
                        "listed whole so the movie stays in one archive, which app.py will send "
                        "in parts.", shown(candidate.path), format_gb(candidate.bytes), limit_gb)
        if candidate.incomplete:
            count += 1
            log.warning("Movie folder %s contains entries that could not be read: 2_zipDir.py "
                        "will fail on it until they can be read.", shown(candidate.path))

    without_zipping = sum(tree.total_files[0] for tree in trees)
    zipped_files = sum(c.files for c in candidates)
    archives = sum(parts_needed(c.bytes, size_limit_bytes) for c in candidates)
    with_zipping = without_zipping - zipped_files + archives
    level = log.warning if with_zipping > DROPBOX_COMFORT_FILES else log.info
    if with_zipping > DROPBOX_COMFORT_FILES:
        count += 1
    level("Files that will reach Dropbox: %s without zipping, about %s after zipping the %d "
          "listed folder(s) (Dropbox's desktop app slows down past about %s files).",
          f"{without_zipping:,}", f"{with_zipping:,}", len(candidates), f"{DROPBOX_COMFORT_FILES:,}")
    if with_zipping > DROPBOX_COMFORT_FILES:
        log.warning("Even after zipping, more than %s files will reach Dropbox: lower minFiles, "
                    "raise fileSizeLimit_GB, or upload in several Dropbox accounts or folders "
                    "kept online-only.", f"{DROPBOX_COMFORT_FILES:,}")
    links = sum(t.symlinks for t in trees)
    other = sum(t.other_entries for t in trees)
    if links or other:
        log.info("Not counted: %d symbolic link(s) or junction(s) (never followed) and %d "
                 "special entr%s (pipes, sockets, devices).", links, other, "y" if other == 1 else "ies")
    problems = sum(t.problem_count for t in trees)
    if problems:
        count += 1
        log.warning("%d entr%s could not be read (see above): the lists leave them out.", problems,
                    "y" if problems == 1 else "ies")
    count += _warn_not_text(log, trees)
    if not count:
        log.info("No warnings.")
    return count


@dataclass
class ScanResult:
    """What scan_folders read: one finished tree per folder that could be listed, in the order
    given, and how many folders could not be listed at all."""

    trees: list[DirectoryTree]
    unreadable_roots: int

    @property
    def complete(self) -> bool:
        """True when every entry below every folder was read: the lists leave nothing out."""
        return not self.unreadable_roots and not any(tree.problem_count for tree in self.trees)


def scan_folders(roots: Sequence[tuple[str, str | os.PathLike]], *, threads: int,
                 log: logging.Logger) -> ScanResult:
    """Scan each (label, folder) of `roots` in turn, logging progress, totals and unreadable entries;
    `label` names the folder in messages ("Row 3"). `threads` as scan_directory (0: automatic).
    A folder that cannot be listed is logged and counted, never raised."""
    started = time.perf_counter()
    trees: list[DirectoryTree] = []
    unreadable_roots = 0
    for label, root in roots:
        log.info("%s: scanning %s", label, shown(root))

        def progress(folders: int, files: int, size: int, root=root) -> None:
            log.info("  ... still scanning %s: %s folders, %s files, %s GB so far", shown(root),
                     f"{folders:,}", f"{files:,}", format_gb(size))

        tree = scan_directory(root, threads=threads, progress=progress)
        if tree.root_failed:
            unreadable_roots += 1
            reason = tree.problems[0][1] if tree.problems else "cannot be read"
            log.error("%s: %s %s; nothing below it was scanned. Check the permissions or that "
                      "the drive is connected.", label, shown(root), reason)
            continue
        trees.append(tree)
        log.info("  %s folders, %s files, %s GB in %.2f s (%d thread%s)", f"{len(tree):,}",
                 f"{tree.total_files[0]:,}", format_gb(tree.total_bytes[0]), tree.seconds,
                 tree.threads_used, "" if tree.threads_used == 1 else "s")
        if tree.thread_note:
            log.debug("  storage was slow to answer; %s", tree.thread_note)
        _log_problems(log, tree)
    log.info("Scanning took %.3f s in total.", time.perf_counter() - started)
    return ScanResult(trees, unreadable_roots)


def write_zip_lists(output_dir: Path, trees: Sequence[DirectoryTree], *, limit_gb: float, min_files: int,
                    log: logging.Logger) -> list[Candidate]:
    """Pick the folders to zip in every tree (at most `limit_gb` GB of 10^9 bytes each, at least
    `min_files` files), write the three result files into `output_dir`, and log the candidates,
    the files written and the warnings. Returns the candidates in list order. Raises
    errors.EnvironmentProblem when the results cannot be written."""
    size_limit_bytes = limit_gb * GB
    candidates = [c for tree in trees for c in select_candidates(tree, size_limit_bytes, min_files)]
    written, left_out = write_outputs(output_dir, trees, candidates)
    log.info("%d folder(s) to zip, holding %s files and %s GB:", len(candidates),
             f"{sum(c.files for c in candidates):,}", format_gb(sum(c.bytes for c in candidates)))
    for index, candidate in enumerate(candidates):
        level = log.info if index < PROBLEMS_ON_SCREEN else log.debug
        level("  %s (%s files, %s GB%s)", shown(candidate.path), f"{candidate.files:,}",
              format_gb(candidate.bytes), ", whole movie" if candidate.movie else "")
    if len(candidates) > PROBLEMS_ON_SCREEN:
        log.info("  ... and %d more (all listed in %s)", len(candidates) - PROBLEMS_ON_SCREEN, ZIP_LIST)
    for path in left_out:
        log.warning("Left out of %s because Excel cannot store its name (it is in %s): %s",
                    ZIP_WORKBOOK, ZIP_LIST, shown(path))
    for path in written:
        log.info("Written: %s", path)
    _log_warnings(log, trees, candidates, size_limit_bytes, limit_gb, min_files)
    return candidates
