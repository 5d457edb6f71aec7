"""Windows console and power settings for long runs (issue 14, items 10 and 11), simulated at
the kernel32 level: QuickEdit off during the run and restored, sleep prevented and allowed again."""

from __future__ import annotations

import ctypes

import pytest

from archive_dropbox import winconsole


class FakeKernel32:
    def __init__(self, mode: int, console: bool = True):
        self.mode = mode
        self.console = console
        self.states: list[int] = []

    def GetStdHandle(self, which):
        assert which == winconsole.STD_INPUT_HANDLE
        return 7

    def GetConsoleMode(self, handle, pointer):
        if not self.console:
            return 0
        ctypes.cast(pointer, ctypes.POINTER(ctypes.c_uint32)).contents.value = self.mode
        return 1

    def SetConsoleMode(self, handle, mode):
        self.mode = mode
        return 1

    def SetThreadExecutionState(self, flags):
        self.states.append(flags)
        return 0x80000000


@pytest.fixture
def windows(monkeypatch):
    def install(kernel32):
        monkeypatch.setattr(winconsole.sys, "platform", "win32")
        monkeypatch.setattr(winconsole, "_kernel32", lambda: kernel32)
        return kernel32
    return install


def test_quick_edit_is_off_during_the_run_and_restored_after(windows):
    kernel32 = windows(FakeKernel32(mode=0x01F7))  # a classic console: QuickEdit on
    with winconsole.long_run_console():
        assert not kernel32.mode & winconsole.ENABLE_QUICK_EDIT_MODE
        assert kernel32.mode & winconsole.ENABLE_EXTENDED_FLAGS
        assert kernel32.states == [winconsole.ES_CONTINUOUS | winconsole.ES_SYSTEM_REQUIRED]
    assert kernel32.mode == 0x01F7
    assert kernel32.states[-1] == winconsole.ES_CONTINUOUS  # sleep allowed again


def test_restored_even_when_the_run_fails(windows):
    kernel32 = windows(FakeKernel32(mode=0x01F7))
    with pytest.raises(KeyboardInterrupt):
        with winconsole.long_run_console():
            raise KeyboardInterrupt
    assert kernel32.mode == 0x01F7 and kernel32.states[-1] == winconsole.ES_CONTINUOUS


def test_no_console_or_no_quick_edit_leaves_the_mode_alone(windows):
    kernel32 = windows(FakeKernel32(mode=0x01B7, console=False))
    with winconsole.long_run_console():
        pass
    assert kernel32.mode == 0x01B7
    kernel32 = windows(FakeKernel32(mode=0x01B7))  # QuickEdit already off
    with winconsole.long_run_console():
        assert kernel32.mode == 0x01B7


def test_elsewhere_nothing_is_called(monkeypatch):
    monkeypatch.setattr(winconsole, "_kernel32", lambda: (_ for _ in ()).throw(AssertionError("called")))
    with winconsole.long_run_console():
        pass


def test_a_saved_login_is_made_private_on_windows_or_the_user_is_told(tmp_path, monkeypatch):
    """Issue 14, item 17: chmod 600 does nothing on Windows; the access list is cut with icacls."""
    from archive_dropbox import credentials
    from archive_dropbox.dropbox_client import Credentials

    calls = []

    def icacls(command, **kwargs):
        calls.append(command)
        return type("Done", (), {"returncode": 0 if command[-1].endswith("me:F") else 5})()

    monkeypatch.setattr(credentials, "WINDOWS", True)
    monkeypatch.setattr(credentials.subprocess, "run", icacls)
    monkeypatch.setenv("USERNAME", "me")
    monkeypatch.delenv("USERDOMAIN", raising=False)
    login = Credentials(refresh_token="r" * 20, app_key="key")
    path, private = credentials.save_credentials(login, tmp_path / "shared" / "token.json")
    assert private and calls[0][0] == "icacls" and "/inheritance:r" in calls[0]
    assert calls[0][1].endswith("token.json.tmp")  # restricted before the token was written into it
    monkeypatch.setenv("USERNAME", "someone")
    assert credentials.save_credentials(login, tmp_path / "shared" / "token.json") == (path, False)


def test_positioned_reads_without_pread_do_not_serialise_different_files(monkeypatch, tmp_path):
    """Issue 14, item 14: Windows has no os.pread; two workers reading two files must not wait
    for each other (a process-wide lock serialised every read from a NAS)."""
    import threading

    from archive_dropbox import upload_memory

    monkeypatch.delattr(upload_memory.os, "preadv", raising=False)
    both_reading = threading.Barrier(2, timeout=10)

    class SlowFile:
        def __init__(self, data: bytes):
            self.data, self.position = data, 0

        def seek(self, position):
            self.position = position

        def readinto(self, view):
            both_reading.wait()  # only returns once the other file is being read at the same time
            data = self.data[self.position:self.position + len(view)]
            view[:len(data)] = data
            self.position += len(data)
            return len(data)

    def read_at(handle, position: int, size: int) -> bytes:
        view = memoryview(bytearray(size))
        return bytes(view[:upload_memory.readinto_at(handle, view, position)])

    results = {}
    files = {"a": SlowFile(b"0123456789"), "b": SlowFile(b"abcdefghij")}
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, read_at(files[k], 3, 2)))
               for k in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert results == {"a": b"34", "b": b"de"}


def test_seven_zip_is_put_in_a_job_that_dies_with_the_script(windows, monkeypatch):
    """Issue 14: 7-Zip killed with the script on Windows (a kill-on-close job object)."""
    recorded = {}

    class JobKernel32(FakeKernel32):
        def CreateJobObjectW(self, attributes, name):
            return 99

        def SetInformationJobObject(self, job, kind, pointer, size):
            limits = ctypes.cast(pointer, ctypes.POINTER(winconsole._job_limit_structure())).contents
            recorded["flags"] = limits.BasicLimitInformation.LimitFlags
            recorded["kind"] = kind
            return 1

        def AssignProcessToJobObject(self, job, handle):
            recorded.setdefault("assigned", []).append((job, handle))
            return 1

    windows(JobKernel32(mode=0))
    monkeypatch.setattr(winconsole, "_job", None)
    first, second = type("P", (), {"_handle": 1234})(), type("P", (), {"_handle": 5678})()
    assert winconsole.kill_with_this_script(first) and winconsole.kill_with_this_script(second)
    assert recorded["flags"] == winconsole.JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE and recorded["kind"] == 9
    assert recorded["assigned"] == [(99, 1234), (99, 5678)]  # one job for the whole run


def test_the_size_of_the_job_limits_matches_windows_x64():
    # JOBOBJECT_EXTENDED_LIMIT_INFORMATION is 144 bytes on 64-bit Windows.
    if ctypes.sizeof(ctypes.c_void_p) == 8:
        assert ctypes.sizeof(winconsole._job_limit_structure()) == 144
