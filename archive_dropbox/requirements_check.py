"""Say plainly which Python packages are missing, before anything imports them.

Uses only the standard library so that it works on a machine where nothing is installed yet.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

REQUIRED = ["pandas", "openpyxl", "xlrd", "odf", "numpy", "tqdm", "psutil", "dropbox", "isal"]
# Where the name pip installs differs from the name imported: the message names what to install.
PIP_NAMES = {"odf": "odfpy"}


def ensure_requirements(*, install: bool = False, also: tuple[str, ...] = ()) -> None:
    """Exit with a plain message when Python is too old or packages are missing. With
    `install` (the demo, run by hand on a fresh machine) they are installed first, with pip,
    from requirements.txt, saying so. `also`: more packages to require (the demo's test server)."""
    if sys.version_info < (3, 9):
        print("This tool needs Python 3.9 or newer; this is Python "
              f"{sys.version.split()[0]}.", file=sys.stderr)
        raise SystemExit(4)
    requirements = Path(__file__).resolve().parent.parent / "requirements.txt"
    command = [sys.executable, "-m", "pip", "install", "-r", str(requirements)]
    missing = _missing(also)
    if missing and install:
        print(f"Installing the packages this tool needs ({', '.join(missing)}), once:\n    "
              + " ".join(f'"{part}"' if " " in part else part for part in command), flush=True)
        subprocess.run(command, check=False)
        importlib.invalidate_caches()
        missing = _missing(also)
    if missing:
        print("Missing Python packages: " + ", ".join(missing) + ".\nInstall them once with:\n"
              f"    {Path(sys.executable).name} -m pip install -r \"{requirements}\"", file=sys.stderr)
        raise SystemExit(4)


def _missing(also: tuple[str, ...]) -> list[str]:
    return [PIP_NAMES.get(name, name) for name in (*REQUIRED, *also) if importlib.util.find_spec(name) is None]
