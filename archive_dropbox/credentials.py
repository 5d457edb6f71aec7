"""Where Dropbox credentials come from and where a login keeps them.

Order: environment variables (DROPBOX_REFRESH_TOKEN + DROPBOX_APP_KEY, or
DROPBOX_ACCESS_TOKEN), then the per-user token file written by `python app.py --login`, then
the old `accessToken` setting (still accepted, with a warning: it expires after ~4 hours).
Tokens are never written to logs, the screen, sheets or command lines.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from .dropbox_client import Credentials
from .errors import AuthError

WINDOWS = os.name == "nt"


def default_token_file() -> Path:
    """A per-user file, outside the project folder that labs share."""
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "archive-big-data-dropbox" / "dropbox_token.json"


def save_credentials(credentials: Credentials, token_file: Path) -> tuple[Path, bool]:
    """Write the refresh token readable by its owner only; returns (path, whether that could be
    made sure). POSIX: created 0600. Windows ignores those bits, so the file's access list is
    cut down to the current user with icacls before the token is written (a tokenFile in a
    shared folder would otherwise inherit the folder's readers)."""
    token_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = token_file.with_name(token_file.name + ".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    descriptor = os.open(temporary, flags, 0o600)
    os.close(descriptor)
    private = _owner_only_windows(temporary) if WINDOWS else True
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump({"refresh_token": credentials.refresh_token, "app_key": credentials.app_key}, handle)
    if not WINDOWS:
        os.chmod(temporary, 0o600)
    os.replace(temporary, token_file)  # a rename keeps the file's own access list
    return token_file, private


def _owner_only_windows(path: Path) -> bool:
    """Remove inherited permissions and grant the current user alone full control.
    Source: https://learn.microsoft.com/windows-server/administration/windows-commands/icacls"""
    user = os.environ.get("USERNAME")
    if not user:
        return False
    domain = os.environ.get("USERDOMAIN")
    account = f"{domain}\\{user}" if domain else user
    try:
        result = subprocess.run(["icacls", str(path), "/inheritance:r", "/grant:r", f"{account}:F"],
                                capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def load_credentials(*, token_file: Path, access_token_setting: str | None, app_key_setting: str | None,
                     log: logging.Logger) -> Credentials:
    env = os.environ
    if env.get("DROPBOX_REFRESH_TOKEN"):
        app_key = env.get("DROPBOX_APP_KEY") or app_key_setting
        if not app_key:
            raise AuthError("DROPBOX_REFRESH_TOKEN is set but DROPBOX_APP_KEY is not: set the app key "
                            "too (or the appKey setting in app.py).")
        return Credentials(refresh_token=env["DROPBOX_REFRESH_TOKEN"], app_key=app_key,
                           app_secret=env.get("DROPBOX_APP_SECRET") or None,
                           where="the environment variable DROPBOX_REFRESH_TOKEN")
    if env.get("DROPBOX_ACCESS_TOKEN"):
        log.warning("Using DROPBOX_ACCESS_TOKEN: short-lived tokens expire after about 4 hours. For "
                    "long runs log in once with `python app.py --login`.")
        return Credentials(access_token=env["DROPBOX_ACCESS_TOKEN"], where="DROPBOX_ACCESS_TOKEN")
    if token_file.exists():
        try:
            stored = json.loads(token_file.read_text(encoding="utf-8"))
            return Credentials(refresh_token=stored["refresh_token"], app_key=stored["app_key"],
                               where=f"the login saved in {token_file}")
        except (OSError, ValueError, KeyError, TypeError):
            raise AuthError(f"the saved login {token_file} cannot be read. Run `python app.py --login` "
                            "again.", paths=[token_file]) from None
    if access_token_setting:
        log.warning("Using the accessToken setting in app.py. It expires after about 4 hours and "
                    "anyone who can read app.py can use it: log in once with `python app.py --login` "
                    "and empty the accessToken line.")
        return Credentials(access_token=access_token_setting, where="the accessToken setting")
    raise AuthError("no Dropbox login found. Run `python app.py --login` once (it asks you to open a "
                    "Dropbox page and paste a code), or set DROPBOX_REFRESH_TOKEN and DROPBOX_APP_KEY.")
