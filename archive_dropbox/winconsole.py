"""Windows console and power settings for a run that lasts weeks (no-ops elsewhere).

- QuickEdit: in a classic console window one click starts a selection, and while it lasts
  every write to the console blocks - and with it every thread that logs, so nothing is sent
  all weekend. It is switched off for the run and restored at exit.
  Source: https://learn.microsoft.com/windows/console/setconsolemode (ENABLE_QUICK_EDIT_MODE
  0x0040 takes effect only with ENABLE_EXTENDED_FLAGS 0x0080).
- Sleep: Windows' default power plan puts an idle desktop to sleep; disk and network activity
  do not count as activity. SetThreadExecutionState(ES_CONTINUOUS | ES_SYSTEM_REQUIRED) keeps
  the machine awake while a stage runs (the display may still turn off), and ES_CONTINUOUS
  alone gives the decision back at exit.
  Source: https://learn.microsoft.com/windows/win32/api/winbase/nf-winbase-setthreadexecutionstate
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

STD_INPUT_HANDLE = -10
ENABLE_QUICK_EDIT_MODE = 0x0040
ENABLE_EXTENDED_FLAGS = 0x0080
ES_CONTINUOUS = 0x80000000
ES_SYSTEM_REQUIRED = 0x00000001


def _kernel32():
    import ctypes

    return ctypes.windll.kernel32


@contextlib.contextmanager
def long_run_console(log=None) -> Iterator[None]:
    """For the duration of a stage: QuickEdit off and the computer kept awake (Windows)."""
    if sys.platform != "win32":
        yield
        return
    kernel32 = _kernel32()
    restore_mode = _quick_edit_off(kernel32)
    awake = bool(kernel32.SetThreadExecutionState(ES_CONTINUOUS | ES_SYSTEM_REQUIRED))
    if log is not None:
        log.debug("Windows: QuickEdit %s; sleep %s while this runs.",
                  "switched off" if restore_mode is not None else "not in use",
                  "prevented" if awake else "could not be prevented")
    try:
        yield
    finally:
        if awake:
            kernel32.SetThreadExecutionState(ES_CONTINUOUS)
        if restore_mode is not None:
            kernel32.SetConsoleMode(kernel32.GetStdHandle(STD_INPUT_HANDLE), restore_mode)


def _quick_edit_off(kernel32) -> int | None:
    """Switch QuickEdit off; returns the mode to restore, or None when there was nothing to do."""
    import ctypes

    handle = kernel32.GetStdHandle(STD_INPUT_HANDLE)
    mode = ctypes.c_uint32()
    if not kernel32.GetConsoleMode(handle, ctypes.byref(mode)):
        return None  # no console (redirected input, a service): nothing can block
    if not mode.value & ENABLE_QUICK_EDIT_MODE:
        return None
    if not kernel32.SetConsoleMode(handle, (mode.value & ~ENABLE_QUICK_EDIT_MODE) | ENABLE_EXTENDED_FLAGS):
        return None
    return mode.value
