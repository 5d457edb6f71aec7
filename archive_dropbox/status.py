"""What a long run is doing now, and waits that Ctrl-C can stop.

A run of weeks spends hours waiting: for the network to come back, for space in Dropbox or on a
local disk, for the team's monthly data-transport limit. Every such wait reports to the one
`Status` of its run log (`status_of(log)`), shared by all threads, which says it on screen and
in the log when it begins or changes and then once a minute, however many threads are retrying
("Dropbox unreachable since 14:02, retrying every 30 s (attempt 7); nothing is lost; 1.20 TB
still to send. Last error: ..."). A timer keeps the progress bars' elapsed time moving
meanwhile, so that waiting never looks like hanging.

On Windows, a wait without a timeout (lock, event, future, thread join, queue) cannot be
interrupted by Ctrl-C: only POSIX lets signals interrupt lock acquisition (Python documentation,
threading.Lock.acquire, "Changed in version 3.2"), and Python runs the Ctrl-C handler only once
the wait returns. `sliced` and its wrappers wait in steps of SLICE seconds, so Ctrl-C stops the
main thread within a second.
"""

from __future__ import annotations

import concurrent.futures as futures
import logging
import queue
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

SLICE = 0.5  # seconds: the longest a wait goes without letting Ctrl-C in
REPEAT = 60.0  # seconds between repeats of a status that has not changed
TICK = 1.0  # seconds between refreshes of the progress bars
GRACE = 10.0  # seconds: a network failure shorter than this (one retry) is a blip, not an outage

T = TypeVar("T")
# A number with its unit ("10 B", "1.10 TB", "30 min"): a pause whose amounts alone change is
# the same pause.
_AMOUNT = re.compile(r"\d[\d.,:]*(?:\s*(?:[kKMGTP]?B|s|min|h)\b)?")


# -- waits that Ctrl-C can stop ------------------------------------------------------------------

def sliced(wait: Callable[[float], T], timeout: float | None = None, done: Callable[[T], bool] = bool) -> T:
    """Call `wait(seconds)` with at most SLICE seconds at a time until `done(result)`, or until
    `timeout` seconds have passed (None: no limit); returns the last result. Between slices
    Python runs its signal handlers, so Ctrl-C raises KeyboardInterrupt here on Windows too."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = SLICE if deadline is None else max(0.0, min(SLICE, deadline - time.monotonic()))
        result = wait(step)
        if done(result) or (deadline is not None and time.monotonic() >= deadline):
            return result


def nap(seconds: float, stop: Callable[[], bool] = lambda: False) -> None:
    """Sleep `seconds`, but return within SLICE once `stop()` is true: a worker pausing for
    half an hour must not hold up a run stopped by Ctrl-C."""
    deadline = time.monotonic() + seconds
    while not stop():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, SLICE))


def wait_futures(pending: Iterable[futures.Future], return_when: str = futures.ALL_COMPLETED
                 ) -> tuple[set[futures.Future], set[futures.Future]]:
    """concurrent.futures.wait without a timeout (ALL_COMPLETED or FIRST_COMPLETED), sliced."""
    pending = set(pending)
    first = return_when == futures.FIRST_COMPLETED
    return sliced(lambda step: futures.wait(pending, step, return_when),
                  done=lambda result: not result.not_done or (first and bool(result.done)))


def result(future: futures.Future) -> Any:
    """future.result(), waiting in slices."""
    wait_futures([future])
    return future.result()


def wait_event(event: threading.Event, timeout: float | None = None) -> bool:
    """event.wait(timeout), sliced; True when the event was set."""
    return sliced(event.wait, timeout)


def join(thread: threading.Thread) -> None:
    sliced(lambda step: (thread.join(step), not thread.is_alive())[1])


def put(lane: queue.Queue, entry: object) -> None:
    """lane.put(entry) on a bounded queue, sliced."""
    def attempt(step: float) -> bool:
        try:
            lane.put(entry, timeout=step)
            return True
        except queue.Full:
            return False
    sliced(attempt)


@contextmanager
def locked(lock: threading.Lock) -> Iterator[None]:
    """`with lock:`, acquired in slices."""
    sliced(lambda step: lock.acquire(timeout=step))
    try:
        yield
    finally:
        lock.release()


def shutdown(executor: futures.ThreadPoolExecutor) -> None:
    """executor.shutdown(wait=True, cancel_futures=True) with its thread joins sliced."""
    executor.shutdown(wait=False, cancel_futures=True)
    # ThreadPoolExecutor keeps its threads in `_threads` (CPython 3.2 to 3.13); shutdown(wait=True)
    # joins exactly these, without a timeout.
    for thread in list(getattr(executor, "_threads", ())):
        join(thread)


# -- the status line -----------------------------------------------------------------------------

def clock_time(moment: float, now: float) -> str:
    """14:02, or Fri 14:02 when not today (wall-clock seconds)."""
    same_day = time.localtime(moment)[:3] == time.localtime(now)[:3]
    return time.strftime("%H:%M" if same_day else "%a %H:%M", time.localtime(moment))


def every(seconds: float) -> str:
    """'0.6 s', '30 s', '30 min': a sleepTime_min below 1 must not read as '0 min'."""
    if seconds < 90:
        return f"{seconds:.3g} s"
    return f"{seconds / 60:.3g} min" if seconds < 90 * 60 else f"{seconds / 3600:.3g} h"


@dataclass
class _Outage:
    since_wall: float
    since: float  # monotonic seconds
    attempt: int = 0
    retry_in: float = 0.0
    error: str = ""


@dataclass
class _Said:
    key: str = ""
    at: float = float("-inf")  # monotonic seconds


class Status:
    """The shared account of what the run waits for. Threads report (`network_trouble`,
    `network_ok`, `paused`, `resumed`); the status decides what is worth saying, and when."""

    def __init__(self, log: logging.Logger, *, repeat: float = REPEAT, tick: float = TICK,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self._log = log
        self._repeat, self._tick = repeat, tick
        self._clock, self._wall = clock, wall
        self._lock = threading.Lock()
        self._outage: _Outage | None = None
        self._pause: str | None = None
        self._said = {"network": _Said(), "pause": _Said()}
        self._left: Callable[[], str] | None = None
        self._bars: list = []
        self._ticker: threading.Thread | None = None

    # -- what is left ------------------------------------------------------------------------

    def remaining(self, describe: Callable[[], str] | None) -> None:
        """What the run still has to do, added to every status ("1.20 TB still to send")."""
        self._left = describe

    def _with_left(self, text: str) -> str:
        left = self._left() if self._left is not None else ""
        return f"{text}; {left}" if left else text

    # -- the network -------------------------------------------------------------------------

    def network_trouble(self, error: str, retry_in: float, attempt: int) -> None:
        """A request failed (`attempt` times in a row for the thread asking) and is tried again
        in `retry_in` seconds."""
        with self._lock:
            if self._outage is None:
                self._outage = _Outage(self._wall(), self._clock())
            outage = self._outage
            outage.attempt, outage.retry_in, outage.error = max(outage.attempt, attempt), retry_in, error
        self._keep_ticking()
        self._set_postfix()
        self._say_due()

    def network_ok(self) -> None:
        """A request went through: an outage that was reported is over."""
        if self._outage is None:  # the common case costs no lock
            return
        with self._lock:
            outage, self._outage = self._outage, None
            said = self._said["network"].key != ""
            self._said["network"] = _Said()
        if outage is not None and said:
            self._log.info("Dropbox answers again (unreachable for %s since %s); continuing.",
                           _duration(self._clock() - outage.since), clock_time(outage.since_wall, self._wall()))
        self._set_postfix()

    def _network_text(self, outage: _Outage) -> str:
        text = self._with_left(f"Dropbox unreachable since {clock_time(outage.since_wall, self._wall())}, "
                               f"retrying every {every(outage.retry_in)} (attempt {outage.attempt}); nothing is lost")
        return f"{text}. Last error: {outage.error[:160]}"

    # -- pauses ------------------------------------------------------------------------------

    def paused(self, text: str) -> None:
        """The run holds until something changes outside it ("PAUSED: Dropbox is full: ...");
        what is left is added."""
        with self._lock:
            self._pause = text
        self._keep_ticking()
        self._set_postfix()
        self._say_due()

    def resumed(self, text: str | None = None) -> None:
        with self._lock:
            self._pause = None
            self._said["pause"] = _Said()
        if text:
            self._log.info("%s", text)
        self._set_postfix()

    # -- saying it ---------------------------------------------------------------------------

    def _due(self) -> list[str]:
        """The sentences to say now: each wait once when it begins or changes (numbers aside),
        then once per `repeat` seconds."""
        now = self._clock()
        with self._lock:
            outage, pause = self._outage, self._pause
        candidates: list[tuple[str, str, str]] = []  # kind, what makes it new, text
        if outage is not None and (outage.attempt >= 2 or now - outage.since >= GRACE):
            candidates.append(("network", "unreachable", self._network_text(outage)))
        if pause is not None:
            candidates.append(("pause", _AMOUNT.sub("#", pause), self._with_left(pause)))
        spoken = []
        with self._lock:
            for kind, key, text in candidates:
                said = self._said[kind]
                if key != said.key or now - said.at >= self._repeat:
                    said.key, said.at = key, now
                    spoken.append(text)
        return spoken

    def _say_due(self) -> None:
        for text in self._due():
            self._log.warning("%s", text)

    # -- progress bars -----------------------------------------------------------------------

    def show(self, bar) -> Any:
        """Keep a tqdm bar's elapsed time moving and its postfix on the current wait, until
        `hide(bar)`. Returns the bar."""
        with self._lock:
            self._bars.append(bar)
        self._keep_ticking()
        self._set_postfix()
        return bar

    @contextmanager
    def showing(self, bar) -> Iterator[Any]:
        """`show(bar)` for the time of a `with` block."""
        try:
            yield self.show(bar)
        finally:
            self.hide(bar)

    def hide(self, bar) -> None:
        with self._lock:  # by identity: tqdm bars compare equal by screen position
            self._bars = [shown for shown in self._bars if shown is not bar]

    def _set_postfix(self) -> None:
        with self._lock:
            bars, outage, pause = list(self._bars), self._outage, self._pause
        short = ("PAUSED (see above)" if pause else
                 f"Dropbox unreachable since {clock_time(outage.since_wall, self._wall())}, attempt {outage.attempt}"
                 if outage is not None and outage.attempt >= 2 else "")
        for bar in bars:
            if getattr(bar, "postfix", None) != short:
                bar.set_postfix_str(short, refresh=False)

    def tick(self) -> None:
        """Redraw the bars (elapsed time moves) and repeat a status that is due."""
        with self._lock:
            bars = list(self._bars)
        for bar in bars:
            try:
                bar.refresh()  # in the timer thread: the wait for tqdm's lock is never the main thread's
            except (ValueError, OSError):
                pass  # closed meanwhile
        self._say_due()

    def _keep_ticking(self) -> None:
        """A timer thread runs while there is a bar to redraw or a wait to repeat."""
        with self._lock:
            if self._ticker is None:
                self._ticker = threading.Thread(target=self._run_ticker, name="status", daemon=True)
                self._ticker.start()

    def _run_ticker(self) -> None:
        while True:
            time.sleep(self._tick)
            with self._lock:
                if not self._bars and self._outage is None and self._pause is None:
                    self._ticker = None
                    return
            self.tick()


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


_STATUSES: dict[logging.Logger, Status] = {}
_STATUSES_LOCK = threading.Lock()


def status_of(log: logging.Logger) -> Status:
    """The one status of the run that writes to `log`."""
    with _STATUSES_LOCK:
        status = _STATUSES.get(log)
        if status is None:
            status = _STATUSES[log] = Status(log)
        return status
