"""The machinery the three transfer engines share (API upload, desktop-app upload, download).

- `RetryPolicy` / `Retrier`: one answer to "what now?" for every request: network trouble is
  retried with doubling back-off up to a give-up time, a rate limit waits what Dropbox's
  Retry-After says, a full Dropbox or the team's data-transport limit pauses every worker,
  anything else goes back to the caller. Shape learnt from rclone's lib/pacer (one policy, one
  classifier per backend); here the classifier is dropbox_client's error classes.
- `Pauses`: one pause policy (Dropbox full, transport limit, local disk full) that holds every
  worker behind one lock and says so on the one status line of the run (status.Status).
- `JobRunner`: a bounded number of jobs in flight, a worker's unexpected error re-raised in the
  main thread, and Ctrl-C stopping workers between chunks instead of after the whole job.
- `ByteProgress`: the bytes bar with files done and files per second, the "still to send"
  (files, bytes, time left) of the status line, and a progress line every few minutes.
- `log_result` / `log_failures`: the tab-separated result line every engine writes per file
  (log file only: logs.PER_FILE), and the end-of-run failure list.

Nothing here knows about items, batches or the journal: engines pass callables.
"""

from __future__ import annotations

import concurrent.futures as futures
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import psutil
from tqdm import tqdm

from .dropbox_client import ContentHashMismatch, InsufficientSpace, NetworkProblem, RateLimited, TransportLimit
from .errors import FileProblem
from .logs import PER_FILE
from .status import every, locked, nap, shutdown, status_of, wait_futures
from .units import human_bytes, human_duration

T = TypeVar("T")

SPACE_MARGIN = 64 * 1024 * 1024  # bytes kept free on a local disk: room for the journal, logs and the OS


# -- retries ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    """How one request rides out trouble. Seconds throughout."""

    give_up_seconds: float = 3600.0  # continuous network failure before the file is given up (FileProblem)
    first_delay: float = 1.0         # first wait after a network failure, doubled each time...
    max_delay: float = 60.0          # ...up to this
    min_rate_wait: float = 0.5       # shortest wait after a rate limit (Retry-After may say 0)


class Backoff:
    """The waits between retries of one request (or one resumable stream): doubling from
    `first_delay` to `max_delay`; `expired()` once trouble has lasted `give_up_seconds` since
    the first failure after the last success."""

    def __init__(self, policy: RetryPolicy):
        self.policy = policy
        self.failures = 0
        self._since: float | None = None
        self._delay = policy.first_delay

    def failed(self) -> float:
        """Record a failure; returns how long to wait before the next try."""
        now = time.monotonic()
        if self._since is None:
            self._since = now
        self.failures += 1
        delay = self._delay
        self._delay = min(self._delay * 2, self.policy.max_delay)
        return delay

    def expired(self) -> bool:
        return self._since is not None and time.monotonic() - self._since > self.policy.give_up_seconds

    def succeeded(self) -> None:
        self.failures, self._since, self._delay = 0, None, self.policy.first_delay

    @property
    def first(self) -> bool:
        """True right after the first failure of a spell of trouble."""
        return self.failures == 1


class Retrier:
    """Runs requests under one RetryPolicy, reporting network trouble to the run's status line and
    pausing through `pauses` when Dropbox is full or the transport limit is reached.

    `stop()`: true once the run is stopping (Ctrl-C, a fatal error): waits end at once and
    `call` raises `stopped()` (the run's fatal error). `sleep(seconds)`: how a wait between
    tries is slept, if not by status.nap (the desktop app's waits, which Enter at the console
    cuts short)."""

    def __init__(self, log: logging.Logger, policy: RetryPolicy, pauses: "Pauses | None" = None,
                 stop: Callable[[], BaseException | None] = lambda: None,
                 sleep: Callable[[float], object] | None = None):
        self.log = log
        self.policy = policy
        self.pauses = pauses
        self._stop = stop
        self._sleep = sleep if sleep is not None else lambda seconds: nap(seconds, self.stopping)
        self.status = status_of(log)

    def stopping(self) -> bool:
        return self._stop() is not None

    def call(self, what: str, request: Callable[[], T], *, needed: int = 0,
             give_up: Callable[[NetworkProblem], BaseException] | None = None, what_in_status: bool = False) -> T:
        """`request()`'s answer, retried through network trouble, rate limits and pauses.

        `what` names the request in messages (`what_in_status`: in the status line's last error
        too); `needed`: bytes the request stores (for a pause when Dropbox is full). After
        `give_up_seconds` of network failure raises `give_up(error)` (default: FileProblem
        "<what>: the network failed for more than N min").
        Every other error (per-file problems, offset errors, auth) goes back to the caller."""
        backoff = Backoff(self.policy)
        transport_paused = False
        while True:
            fatal = self._stop()
            if fatal is not None:
                raise fatal
            try:
                answer = request()
            except NetworkProblem as exc:
                if backoff.expired():
                    if give_up is not None:
                        raise give_up(exc) from None
                    raise FileProblem(f"{what}: the network failed for more than "
                                      f"{self.policy.give_up_seconds / 60:.0f} min ({exc.message})") from None
                delay = backoff.failed()
                self.log.debug("%s: %s; retrying in %.0f s", what, exc.message, delay)
                self.status.network_trouble(f"{what}: {exc.message}" if what_in_status else exc.message, delay,
                                            backoff.failures)
                self._sleep(delay)
            except RateLimited as exc:
                self._sleep(max(exc.retry_after, self.policy.min_rate_wait))
            except InsufficientSpace:
                if self.pauses is None:
                    raise
                self.pauses.wait_for_dropbox_space(max(needed, 1), "Dropbox is full")
            except TransportLimit:
                if self.pauses is None:
                    raise
                transport_paused = True
                self.pauses.wait_for_transport()
            except ContentHashMismatch as exc:
                # Bytes changed on the wire: the same request again, after a pause like a network failure.
                self.log.warning("%s", exc.message)
                self._sleep(backoff.failed())
            else:
                self.status.network_ok()
                if transport_paused:
                    self.log.info("Dropbox accepts transfers again (data-transport limit): continuing.")
                return answer


# -- pauses ----------------------------------------------------------------------------------------

def existing_ancestor(path: Path) -> Path:
    """The nearest folder of `path` that exists (what a disk-usage query can be asked about)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class Pauses:
    """Holds every worker while the run cannot go on (Dropbox full, the team's data-transport
    limit, a full local disk) and re-checks every `sleep_seconds`; one worker reports and waits,
    the others queue behind it and re-check after. `paused_seconds` adds up the waits."""

    def __init__(self, log: logging.Logger, sleep_seconds: float, *, client=None,
                 stop: Callable[[], bool] = lambda: False, usage: Callable = psutil.disk_usage,
                 sleep: Callable[[float], object] | None = None):
        """`client`: a DropboxClient (for its space_usage); `usage`: psutil.disk_usage or a stand-in;
        `sleep(seconds)`: how a wait is slept, if not by status.nap until `stop()`."""
        self._client = client
        self._status = status_of(log)
        self._sleep = sleep_seconds
        self._stop = stop
        self._usage = usage
        self._wait = sleep if sleep is not None else lambda seconds: nap(seconds, self._stop)
        self._lock = threading.Lock()
        self.paused_seconds = 0.0

    def _nap(self) -> None:
        started = time.monotonic()
        self._wait(self._sleep)
        self.paused_seconds += time.monotonic() - started

    def wait_for_dropbox_space(self, needed: int, reason: str) -> None:
        """Hold until Dropbox has `needed` bytes free; the status says the pause and what is left."""
        with locked(self._lock):
            while True:
                usage = self._client.space_usage()
                if usage.free is None or usage.free >= needed:
                    self._status.resumed("Dropbox has room again (%s free): continuing." % (
                        "unlimited" if usage.free is None else human_bytes(usage.free)))
                    return
                self._status.paused(f"PAUSED: {reason}: {human_bytes(usage.free)} free in Dropbox, "
                                    f"{human_bytes(needed)} needed. Free some space or raise the quota; checking "
                                    f"again every {every(self._sleep)}. Nothing is lost while paused")
                self._nap()
                if self._stop():
                    self._status.resumed()
                    return

    def wait_for_transport(self) -> None:
        with locked(self._lock):
            self._status.paused(f"PAUSED: Dropbox reports the team's monthly data-transport limit is reached. "
                                f"Trying again every {every(self._sleep)}; nothing is lost while paused")
            self._nap()
            self._status.resumed()  # the next request tells whether the limit still holds

    def hold(self, reason: Callable[[], str | None], paused: Callable[[str], str], resumed: str) -> None:
        """Hold while `reason()` says why the run cannot go on (None: it can), for a pause whose
        words are its engine's: the status says `paused(reason)`, and `resumed` once the hold
        ends after a pause. `reason()`'s exceptions go to the caller."""
        with locked(self._lock):
            held = False
            while True:
                why = reason()
                if why is None:
                    self._status.resumed(resumed if held else None)
                    return
                held = True
                self._status.paused(paused(why))
                self._nap()
                if self._stop():
                    self._status.resumed()
                    return

    def disk_free(self, folder: Path) -> int:
        return int(self._usage(str(existing_ancestor(folder))).free)

    def disk_has_room(self, folder: Path, needed: int) -> bool:
        return self.disk_free(folder) >= needed + SPACE_MARGIN

    def wait_for_disk(self, folder: Path, needed: int, reason: str) -> None:
        """Hold until the disk holding `folder` has `needed` bytes free plus SPACE_MARGIN."""
        if self.disk_has_room(folder, needed):
            return
        with locked(self._lock):
            paused = False
            while not self.disk_has_room(folder, needed):
                if self._stop():
                    self._status.resumed()
                    return
                paused = True
                self._status.paused(
                    f"PAUSED: {reason}: {human_bytes(self.disk_free(folder))} free on the disk holding "
                    f"{existing_ancestor(folder)}, {human_bytes(needed)} needed (plus {human_bytes(SPACE_MARGIN)} "
                    f"kept free). Free some space; checking again every {every(self._sleep)}. Nothing is lost "
                    "while paused")
                self._nap()
            if paused:
                self._status.resumed(f"The disk holding {existing_ancestor(folder)} has room again "
                                     f"({human_bytes(self.disk_free(folder))} free): continuing.")


# -- running many jobs -----------------------------------------------------------------------------

class JobRunner:
    """Thread pools for one run's jobs, with at most `in_flight` jobs submitted and not finished
    (memory depends on what is in flight, not on the number of files).

    Use as a context manager. A job's unexpected exception (a bug; per-file problems are the
    job's own business) is re-raised in the submitting thread. Any exception there, Ctrl-C
    included, becomes `fatal`, which workers poll (`stopping()`) to stop between chunks; on exit
    every pool is shut down without waiting for queued jobs."""

    def __init__(self, pools: dict[str, int], in_flight: int, extra: Sequence[futures.Executor] = ()):
        """`pools`: name -> worker threads; `extra`: other executors to shut down with these."""
        self.pools = {name: futures.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix=name)
                      for name, workers in pools.items()}
        self._extra = list(extra)
        self._in_flight = max(1, in_flight)
        self._pending: set[futures.Future] = set()
        self.fatal: BaseException | None = None

    def stopping(self) -> bool:
        return self.fatal is not None

    def fail(self, exc: BaseException) -> None:
        """Make `exc` the run's fatal error (the first one wins)."""
        if self.fatal is None:
            self.fatal = exc if isinstance(exc, Exception) else KeyboardInterrupt()

    def submit(self, pool: str, job: Callable, *args) -> None:
        self._pending.add(self.pools[pool].submit(job, *args))
        if len(self._pending) >= self._in_flight:
            finished, self._pending = wait_futures(self._pending, futures.FIRST_COMPLETED)
            raise_bugs(finished)

    def run_each(self, pool: str, job: Callable, work: Iterable) -> None:
        """`job(w)` for every `w` of `work` on `pool`, submitted as room frees up, until the run
        is stopping; returns once every submitted job has finished."""
        for argument in work:
            self.submit(pool, job, argument)
            if self.stopping():
                break
        self.wait_all()

    def wait_all(self) -> None:
        finished, _ = wait_futures(self._pending)
        self._pending = set()
        raise_bugs(finished)

    def __enter__(self) -> "JobRunner":
        return self

    def __exit__(self, kind, exc, trace) -> None:
        if exc is not None:
            self.fail(exc)
        for executor in [*self.pools.values(), *self._extra]:
            shutdown(executor)

    def raise_if_failed(self) -> None:
        if self.fatal is not None:
            raise self.fatal


def raise_bugs(finished: Iterable[futures.Future]) -> None:
    """Re-raise the exception of the first finished future that had one."""
    for future in finished:
        future.result()


# -- progress and results --------------------------------------------------------------------------

# Seconds between the progress lines of Stage 2 in the log and on the console: a week-long run
# says where it is about 2,000 times, and a console without a bar (output redirected to a file,
# Task Scheduler) still hears from it now that per-file lines stay in the log file.
PROGRESS_EVERY = 300.0

_COUNTING: dict[logging.Logger, "ByteProgress"] = {}  # the run log -> its progress (log_result counts files)
_COUNTING_LOCK = threading.Lock()


class ByteProgress:
    """The run's bytes bar, with files done of the total and files per second in its
    description, and the status line's "<files> and <amount> still to <verb>, about <time>
    left"; a progress line in the log (and on the console) every PROGRESS_EVERY seconds.
    Thread-safe.

    `advance(count)` moves the bytes (negative: taken back, e.g. a download restarted);
    `file_finished()` counts one file done or given up on (log_result and file_finished(log)
    call it for the run writing to `log`). Files are what Dropbox holds: a part or a manifest
    of a split file counts as one."""

    def __init__(self, log: logging.Logger, *, total: int, done: int = 0, desc: str, verb: str,
                 files_total: int = 0, files_done: int = 0, clock: Callable[[], float] = time.monotonic):
        """`total`, `done`: bytes; `files_total`, `files_done`: files (0 and 0: bytes only)."""
        self._log, self._clock = log, clock
        self._status = status_of(log)
        self._lock = threading.Lock()
        self._desc, self._verb = desc, verb
        self.total, self.left = total, total - done  # kept here: tqdm counts nothing when hidden
        self.files_total, self.files_done = files_total, files_done
        self._start_left, self._start_files = self.left, files_done
        self._started = self._said = clock()
        self._status.remaining(self.describe_left)
        self.bar = self._status.show(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000,
                                          desc=self._files_desc(), disable=None, initial=done, dynamic_ncols=True))
        with _COUNTING_LOCK:
            _COUNTING[log] = self

    def advance(self, count: int) -> None:
        with self._lock:
            self.left -= count
            self.bar.update(count)
        self._say_if_due()

    def file_finished(self) -> None:
        with self._lock:
            self.files_done += 1
            if self.files_total and not self.bar.disable:
                self.bar.set_description_str(self._files_desc(), refresh=False)
        self._say_if_due()

    def _files_desc(self) -> str:
        if not self.files_total:
            return self._desc
        return (f"{self._desc} {min(self.files_done, self.files_total):,}/{self.files_total:,} files, "
                f"{_rate(self._files_per_second())} files/s")

    def _files_per_second(self) -> float:
        elapsed = self._clock() - self._started
        return (self.files_done - self._start_files) / elapsed if elapsed > 0 else 0.0

    def seconds_left(self) -> float | None:
        """This run's pace so far applied to what is left: bytes and files each extrapolated, the
        slower of the two (many small files are bound by files per second, large ones by bytes
        per second). None before anything moved."""
        elapsed = self._clock() - self._started
        bytes_moved, files_moved = self._start_left - self.left, self.files_done - self._start_files
        paces = [(max(0, self.left), bytes_moved)]
        if self.files_total:
            paces.append((max(0, self.files_total - self.files_done), files_moved))
        ratios = [left / moved for left, moved in paces if moved > 0]
        return elapsed * max(ratios) if ratios else None

    def describe_left(self) -> str:
        """'1,234 files and 1.20 TB still to send, about 3 h 10 min left' (files and time when known)."""
        amount = human_bytes(max(0, self.left))
        if self.files_total:
            amount = f"{max(0, self.files_total - self.files_done):,} files and {amount}"
        seconds = self.seconds_left()
        return f"{amount} still to {self._verb}" + (f", about {human_duration(seconds)} left"
                                                    if seconds is not None else "")

    def _say_if_due(self) -> None:
        now = self._clock()
        with self._lock:
            if now - self._said < PROGRESS_EVERY:
                return
            self._said = now
            elapsed = max(now - self._started, 1e-9)
            rates = f"{human_bytes((self._start_left - self.left) / elapsed)}/s"
            if self.files_total:
                done = f"{min(self.files_done, self.files_total):,} of {self.files_total:,} files done"
                rates = f"{_rate(self._files_per_second())} files/s, {rates}"
            else:
                done = f"{human_bytes(self.total - max(0, self.left))} of {human_bytes(self.total)} done"
        self._log.info("Progress: %s (%s); %s.", done, rates, self.describe_left())

    def close(self) -> None:
        with _COUNTING_LOCK:
            if _COUNTING.get(self._log) is self:
                del _COUNTING[self._log]
        self._status.hide(self.bar)
        self._status.remaining(None)
        self.bar.close()


def _rate(per_second: float) -> str:
    """'1,047', '12', '0.3': a slow rate must not read as 0."""
    return f"{per_second:,.0f}" if per_second >= 10 else f"{per_second:.1f}"


def file_finished(log: logging.Logger) -> None:
    """One more file done or given up on in the run writing to `log`: its ByteProgress, if one
    is shown, counts it. For result lines not written by log_result (e.g. FAILED lines)."""
    progress = _COUNTING.get(log)
    if progress is not None:
        progress.file_finished()


def log_result(log: logging.Logger, result: str, size: str, seconds: float, source: object, destination: object,
               level: int = logging.INFO) -> None:
    """One tab-separated result line per file: RESULT, size, seconds, source -> destination.

    In the log file only below WARNING (logs.PER_FILE; a FAILED line at ERROR reaches the
    console too), and counted by the run's ByteProgress. The level stays the caller's (INFO
    for a result) so that the log reads as before; where a line goes is the mark's business."""
    log.log(level, "%s\t%s\t%.1fs\t%s\t->\t%s", result, size, seconds, source, destination, extra=PER_FILE)
    file_finished(log)


def log_failures(log: logging.Logger, failures: Sequence[tuple[object, str]], shown: int = 50) -> None:
    """The first `shown` failures of a run, one per line, at the end of its summary."""
    for where, message in failures[:shown]:
        log.error("  failed: %s: %s", where, message)


@dataclass
class RunSummary:
    """What every engine's summary holds; each engine adds its own counters."""

    files_total: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, what went wrong)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def log_summary_end(log: logging.Logger, summary: RunSummary, *, failed: str, succeeded: str, log_path) -> None:
    """The end every engine's summary shares: the failures, then `failed` or `succeeded`, then
    where the log is. (The desktop engine says why it stopped first, then calls this.)"""
    log_failures(log, summary.failures)
    if summary.failures:
        log.error("%s", failed)
    else:
        log.info("%s", succeeded)
    log.info("Log: %s", log_path)
