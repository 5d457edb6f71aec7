"""Shared test fixtures: run the scripts as users do (subprocesses), build workbooks and
data trees in temporary folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import openpyxl
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from conftest import ...` in test files


# ARCHIVE_DROPBOX_WITHOUT_POSIX=1: the suite runs as on Windows as far as `os` goes (no pread,
# pwrite, copy_file_range, ...), in this process and in every script it starts.
WITHOUT_POSIX = Path(__file__).resolve().parent / "without_posix"
if os.environ.get("ARCHIVE_DROPBOX_WITHOUT_POSIX"):
    sys.path.insert(0, str(WITHOUT_POSIX))
    import usercustomize  # noqa: E402,F401 - its import removes the functions


def script_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["ARCHIVE_DROPBOX_NO_PAUSE"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env.pop("PYTHONPATH", None)
    if extra:
        env.update(extra)
    if os.environ.get("ARCHIVE_DROPBOX_WITHOUT_POSIX"):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(WITHOUT_POSIX)) if p)
    return env


def run_script(script: str | Path, *args: str, env: dict[str, str] | None = None,
               cwd: Path | None = None, timeout: float = 300, input: str | None = None
               ) -> subprocess.CompletedProcess:
    """Run one of the project's scripts the way a user does, from an unrelated folder."""
    script = Path(script)
    if not script.is_absolute():
        script = REPO / script
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=str(cwd or script.parent), env=script_env(env), capture_output=True, text=True,
        timeout=timeout, input=input if input is not None else "", encoding="utf-8",
    )


def write_xlsx(path: Path, tabs: dict[str, Sequence[Sequence[Any]]]) -> Path:
    """A workbook as openpyxl writes it: each tab is a list of rows, the first the header."""
    book = openpyxl.Workbook()
    book.remove(book.active)
    for tab, rows in tabs.items():
        sheet = book.create_sheet(tab)
        for row in rows:
            sheet.append(list(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    book.save(path)
    return path


def make_tree(root: Path, files: dict[str, bytes | int]) -> Path:
    """Create files under root; an int value means that many pseudo-random bytes."""
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, int):
            content = os.urandom(content)
        path.write_bytes(content)
    return root


def _system_ca_bundle() -> str:
    """The machine's CA bundle (the build machines point REQUESTS_CA_BUNDLE and friends at it;
    tests check that the caBundle setting wins over them). Windows has no /etc/ssl: certifi's."""
    path = "/etc/ssl/certs/ca-certificates.crt"
    if os.path.exists(path):
        return path
    import certifi

    return certifi.where()


SYSTEM_CA = SYSTEM_BUNDLE = _system_ca_bundle()


def client_env(server) -> dict[str, str]:
    """What a script needs to reach `server` with credentials; the machine's CA variables point
    at the system bundle, as on the build machines, so the caBundle setting must win over them."""
    env = server.client_env(credentials=True)
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        env[name] = SYSTEM_CA
    return env


@pytest.fixture
def server(tmp_path):
    """A local Dropbox API test server (tests/dropbox_server) for one test."""
    from tests.dropbox_server import DropboxTestServer

    instance = DropboxTestServer(tmp_path / "server")
    yield instance
    instance.stop()


def log_files(logs_root: Path, subdir: str) -> list[Path]:
    return sorted((logs_root / subdir).glob("*.log"))


@pytest.fixture
def logs_root(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path
