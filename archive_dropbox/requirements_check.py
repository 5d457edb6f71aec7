"""Say plainly which Python packages are missing, before anything imports them.

Uses only the standard library so that it works on a machine where nothing is installed yet.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REQUIRED = ["pandas", "openpyxl", "xlrd", "numpy", "tqdm", "psutil", "dropbox"]


def ensure_requirements() -> None:
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if sys.version_info < (3, 9):
        print("This tool needs Python 3.9 or newer; this is Python "
              f"{sys.version.split()[0]}.", file=sys.stderr)
        raise SystemExit(4)
    if missing:
        requirements = Path(__file__).resolve().parent.parent / "requirements.txt"
        print("Missing Python packages: " + ", ".join(missing) + ".\nInstall them once with:\n"
              f"    {Path(sys.executable).name} -m pip install -r \"{requirements}\"", file=sys.stderr)
        raise SystemExit(4)
