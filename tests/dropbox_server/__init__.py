"""Local Dropbox API v2 test server — TEST INFRASTRUCTURE, never presented to users as Dropbox.

Speaks the Dropbox API v2 wire protocol over HTTPS on 127.0.0.1 so the official SDK can be
tested end to end without reaching Dropbox, with deterministic fault injection and a desktop
app simulator. See README.md in this folder.
"""

from .desktop_app import DesktopAppSimulator
from .faults import FailRule, FaultConfig
from .server import DropboxTestServer, error_summary

__all__ = ["DropboxTestServer", "FaultConfig", "FailRule", "DesktopAppSimulator", "error_summary"]
