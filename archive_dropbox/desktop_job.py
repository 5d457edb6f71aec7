"""What the parts of one desktop-app upload share (copying, waiting for the app, deleting): its
options and summary, the waits between checks, which someone at the console can cut short with
Enter, one retry policy, and the log and journal lines of a verified or failed item."""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from dataclasses import dataclass

from .desktop_folder import DropboxFolder
from .errors import ArchiveError
from .journal import Item, Journal
from .status import status_of, wait_event
from .transfer import Retrier, RetryPolicy, RunSummary, log_result
from .units import human_bytes, human_duration


@dataclass
class DesktopOptions:
    batch_bytes: int             # at most this many bytes per batch (an item larger gets its own)
    copy_block: int              # bytes read and written at a time while copying
    sleep_seconds: float         # between checks of Dropbox and of free space (sleepTime_min)
    time_limit_seconds: float    # a batch not in Dropbox by then is reported (batchTimeLimit_hour)


@dataclass
class DesktopSummary(RunSummary):
    items_total: int = 0
    items_copied: int = 0
    items_already_there: int = 0
    items_verified: int = 0
    items_done_before: int = 0
    bytes_copied: int = 0
    batches_total: int = 0
    batches_verified: int = 0
    deleted_sources: int = 0
    stopped: str | None = None  # why the run stopped before the last batch
    unfinished: int = 0  # items not verified in Dropbox at the end

    @property
    def ok(self) -> bool:
        return not self.failures and self.stopped is None and self.unfinished == 0


def every(seconds: float) -> str:
    """How often a wait is re-checked, for "checking every ...": units.human_duration, whose
    sub-minute form ("36 s", "0.6 s") keeps a sleepTime_min below 1 from reading as 0 min.
    (status.every says the same below a minute, but "5 min" where this says "5 min 0 s".)"""
    return human_duration(seconds)


class Waiter:
    """Sleeps between checks; someone at the keyboard can press Enter to check at once."""

    def __init__(self, log: logging.Logger):
        self._log = log
        self._wake = threading.Event()
        self._listening = False
        self._interactive = bool(getattr(sys.stdin, "isatty", lambda: False)())

    @property
    def interactive(self) -> bool:
        return self._interactive

    def _listen(self) -> None:
        def read_lines() -> None:
            while True:
                try:
                    line = sys.stdin.readline()
                except (OSError, ValueError):
                    return
                if not line:
                    return
                self._wake.set()

        if self._interactive and not self._listening:
            self._listening = True
            threading.Thread(target=read_lines, name="enter-rechecks", daemon=True).start()

    def sleep(self, seconds: float) -> bool:
        """Wait `seconds`; True when Enter cut the wait short."""
        if not self._interactive:
            time.sleep(seconds)
            return False
        self._listen()
        woken = wait_event(self._wake, seconds)
        self._wake.clear()
        return woken


class DesktopJob:
    """One desktop-app upload's shared state: client, journal, folder, options, log, the run's
    status line, the summary, and when each item was copied (for its VERIFIED line).

    `retrier` rides out network trouble for as long as it lasts, trying again every
    sleepTime_min: the desktop app is waited for, never given up on, and Enter cuts a wait
    short. Full Dropbox and transport-limit errors go back to the caller."""

    def __init__(self, client, journal: Journal, folder: DropboxFolder, options: DesktopOptions,
                 log: logging.Logger):
        """`client`: a DropboxClient."""
        self.client = client
        self.journal = journal
        self.folder = folder
        self.options = options
        self.log = log
        self.status = status_of(log)
        self.summary = DesktopSummary()
        self.waiter = Waiter(log)
        self.policy = RetryPolicy(give_up_seconds=math.inf, first_delay=options.sleep_seconds,
                                  max_delay=options.sleep_seconds)
        self.retrier = Retrier(log, self.policy, sleep=self.waiter.sleep)
        self.copied_at: dict[int, float] = {}  # item id -> time.monotonic() when it was copied

    def line(self, result: str, item: Item, seconds: float, level: int = logging.INFO) -> None:
        log_result(self.log, result, human_bytes(item.length), seconds, item.source, item.destination, level)

    def fail(self, item: Item, problem: ArchiveError) -> None:
        """The item failed in this run: journal, summary and log say why."""
        self.journal.mark_failed(item, problem.message)
        self.summary.failures.append((item.destination, problem.message))
        self.line("FAILED", item, 0, logging.ERROR)
        self.log.error("  %s: %s", item.destination, problem.message)
