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
    import ctypes  # Windows only: loaded where the Windows API is called

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
    import ctypes  # Windows only: loaded where the Windows API is called

    handle = kernel32.GetStdHandle(STD_INPUT_HANDLE)
    mode = ctypes.c_uint32()
    if not kernel32.GetConsoleMode(handle, ctypes.byref(mode)):
        return None  # no console (redirected input, a service): nothing can block
    if not mode.value & ENABLE_QUICK_EDIT_MODE:
        return None
    if not kernel32.SetConsoleMode(handle, (mode.value & ~ENABLE_QUICK_EDIT_MODE) | ENABLE_EXTENDED_FLAGS):
        return None
    return mode.value


# -- child processes (7-Zip) die with the script ---------------------------------------------------
# A job object whose last handle closes kills its processes: this script holds that handle until
# it ends, however it ends (a closed window, kill, a crash), so 7-Zip never goes on writing an
# archive that the next run removes. Linux does the same with PR_SET_PDEATHSIG (zipping.py).
# Source: https://learn.microsoft.com/windows/win32/procthread/job-objects
# (JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x2000, JobObjectExtendedLimitInformation = 9).
JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x2000
JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS = 9
_job = None


def _job_limit_structure():
    import ctypes  # Windows only: loaded where the Windows API is called

    class BasicLimits(ctypes.Structure):
        _fields_ = [("PerProcessUserTimeLimit", ctypes.c_int64), ("PerJobUserTimeLimit", ctypes.c_int64),
                    ("LimitFlags", ctypes.c_uint32), ("MinimumWorkingSetSize", ctypes.c_size_t),
                    ("MaximumWorkingSetSize", ctypes.c_size_t), ("ActiveProcessLimit", ctypes.c_uint32),
                    ("Affinity", ctypes.c_size_t), ("PriorityClass", ctypes.c_uint32),
                    ("SchedulingClass", ctypes.c_uint32)]

    class IoCounters(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint64) for name in ("ReadOperationCount", "WriteOperationCount",
                                                           "OtherOperationCount", "ReadTransferCount",
                                                           "WriteTransferCount", "OtherTransferCount")]

    class ExtendedLimits(ctypes.Structure):
        _fields_ = [("BasicLimitInformation", BasicLimits), ("IoInfo", IoCounters),
                    ("ProcessMemoryLimit", ctypes.c_size_t), ("JobMemoryLimit", ctypes.c_size_t),
                    ("PeakProcessMemoryUsed", ctypes.c_size_t), ("PeakJobMemoryUsed", ctypes.c_size_t)]

    return ExtendedLimits


def kill_with_this_script(process) -> bool:
    """Put a child process (subprocess.Popen) in this script's kill-on-close job (Windows);
    False where that is not possible or not needed."""
    global _job
    if sys.platform != "win32":
        return False
    import ctypes  # Windows only: loaded where the Windows API is called

    kernel32 = _kernel32()
    if _job is None:
        job = kernel32.CreateJobObjectW(None, None)
        if not job:
            return False
        limits = _job_limit_structure()()
        limits.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
        if not kernel32.SetInformationJobObject(job, JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS,
                                                ctypes.byref(limits), ctypes.sizeof(limits)):
            kernel32.CloseHandle(job)
            return False
        _job = job
    return bool(kernel32.AssignProcessToJobObject(_job, int(process._handle)))
