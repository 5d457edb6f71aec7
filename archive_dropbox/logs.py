"""Timestamped run logs: created under their final name at start, written as work happens,
mirrored on the console, and scrubbed of secrets.

A run of millions of files writes one result line per file: those lines (logged with
`extra=PER_FILE`) go to the log file only, which is the record of the run; the console shows
progress, summaries, warnings and failures. A per-file line at WARNING or above (a failure)
still reaches the console."""

from __future__ import annotations

import logging
import re
import sys
import threading
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()
# Dropbox tokens start with "sl." (short-lived) or are long opaque strings after "Bearer".
_TOKEN_PATTERNS = [
    re.compile(r"\bsl\.[A-Za-z0-9_\-]{10,}"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9_\-\.]{10,}"),
    re.compile(r"(?i)((?:refresh_token|access_token|code_verifier|client_secret)[\"']?\s*[:=]\s*[\"']?)[A-Za-z0-9_\-\.]{6,}"),
]


def register_secret(value: str | None) -> None:
    """Never let this exact value reach a log file or the screen."""
    if value and len(value) >= 6:
        with _SECRETS_LOCK:
            _SECRETS.add(value)


def redact(text: str) -> str:
    with _SECRETS_LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, "[secret]")
    for pattern in _TOKEN_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "[secret]", text)
    return text


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def make_console_safe() -> None:
    """A name outside the console's code page (cp1252 when output goes to a file from Task
    Scheduler or a .bat) is written with escapes instead of raising: an encoding error must
    never drop a line or stop a run."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass


PER_FILE = {"per_file": True}  # `extra=` of a line about one file: the log file keeps it, the console does not


def _not_per_file(record: logging.LogRecord) -> bool:
    """The console's filter: a per-file line below WARNING stays in the log file."""
    return record.levelno >= logging.WARNING or not getattr(record, "per_file", False)


class _ConsoleHandler(logging.Handler):
    """Writes through tqdm so log lines do not tear progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # a closed console must never stop a week-long run
            self.handleError(record)


def timestamp() -> str:
    return datetime.now().strftime("%Y%m%d_%H%M%S")


def new_log_path(log_dir: Path, name: str, suffix: str = ".log") -> Path:
    """`<log_dir>/<YYYYmmdd_HHMMSS>_<name><suffix>`, never reusing an existing file."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{timestamp()}_{name}" if name else timestamp()
    path = log_dir / f"{stem}{suffix}"
    counter = 2
    while path.exists():
        path = log_dir / f"{stem}_{counter}{suffix}"
        counter += 1
    return path


def start_log(log_dir: Path, name: str, *, console: bool = True) -> tuple[logging.Logger, Path]:
    """Create the run's log file now and return a logger that writes to it and the console
    (the console: INFO and above, except per-file lines below WARNING; see PER_FILE)."""
    path = new_log_path(Path(log_dir), name)
    logger = logging.getLogger(f"archive_dropbox.run.{path.parent.name}.{path.stem}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    file_handler = logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(_RedactingFormatter("%(asctime)s %(levelname)-7s %(message)s"))
    logger.addHandler(file_handler)
    if console:
        console_handler = _ConsoleHandler()
        console_handler.setLevel(logging.INFO)
        console_handler.setFormatter(_RedactingFormatter("%(message)s"))
        console_handler.addFilter(_not_per_file)
        logger.addHandler(console_handler)
    logger.info("Log file: %s", path)
    return logger, path


def close_log(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.flush()
        handler.close()
        logger.removeHandler(handler)
