"""Dropbox's name rules, in one place: which names Dropbox refuses, which names the Dropbox
desktop app never syncs, and how Dropbox decides that two names are the same.

Where each rule comes from (a rule marked *conservative* is stricter than what is known of
Dropbox, because a name refused in Stage 1 costs the user one rename, while a name Dropbox
refuses after the upload has started costs the bytes already sent):

Names refused (`name_problem`; Stage 1 stops, exit 2, nothing sent)
- `/` and `\\`: "always disallowed" (Dropbox help center, "Naming Dropbox files and folders",
  help.dropbox.com/organize/file-names). `/` also separates the components of an API path.
- A name ending in a space: "don't add a space at the end of a file or folder name" (same
  article); the API refuses such a path at commit (issue 13, row 7).
- A name ending in a period: the same article allows periods "except at the end"; whether the
  API refuses one is not documented. *Conservative*: refused.
- Control characters (U+0000-U+001F, U+007F): the API's path pattern would take some of them,
  but no Windows or macOS Dropbox folder can hold them. *Conservative*: refused.
- `.` and `..`, and an empty name: malformed paths for the API (Dropbox API v2, files/upload,
  `WriteError.malformed_path`).
- Text that is not valid Unicode: a name whose bytes are not UTF-8 (possible on Linux, where
  Python carries the bad bytes as lone surrogates) or a Windows name with a lone UTF-16
  surrogate. The API takes paths as UTF-8 JSON, so such a name cannot even be sent.
- More than `MAX_NAME_CHARS` characters in one name: the limit of every common file system
  (255), kept so that whatever Dropbox stores can be downloaded again. *Conservative*.

Names skipped (`ignored_reason`; listed in the dataPrep log, never sent, never fatal)
- `desktop.ini`, `thumbs.db`, `ehthumbs.db`, `.ds_store`, `icon\\r`, `.dropbox`, `.dropbox.attr`,
  compared ignoring case: the names the desktop app never syncs (Dropbox help center, "files
  that won't sync", section "Ignored files"; the open-source Dropbox client Maestral keeps the
  same list, maestral/constants.py EXCLUDED_FILE_NAMES). `._.ds_store` (the AppleDouble
  companion of `.DS_Store` written on non-Mac disks) is Finder metadata of the same kind.
- Names starting with `~$` (Office lock files: `~$report.docx` exists while report.docx is
  open) and names starting with `~` and ending in `.tmp`: temporary files the desktop app
  never syncs (same article, section "Temporary files"). Copied into the Dropbox folder they
  would never arrive, and a batch would wait for them forever (issue 13, row 4).
- Names starting with `.~`: this tool's own files being written (`localfs.TEMP_PREFIX`), which
  the desktop app ignores as temporary files too.
The API would store all of these. API mode skips them as well, so that both upload modes put
the same files into Dropbox and a folder uploaded either way looks the same.

How Dropbox compares names (`case_key`)
- Case: Dropbox lower-cases paths the way Python 2.5's `unicode.lower()` did, which it was
  first written in: each character through the "simple lowercase mapping" of Unicode 4.1, one
  character to one, without context (docs.rs/dbxcase, "Dropbox-compatible case-folding"; the
  Maestral pull request 409 reports the same). So `ß` stays `ß` (`straße.txt` and
  `STRASSE.txt` are two files), Greek `ΣΑΣ` becomes `σασ` (Python 3's `str.lower()` gives
  `σας` by its final-sigma rule: not used here), and `İ` (U+0130) becomes `i`. Characters
  that gained a lowercase form after Unicode 4.1 (such as `ẞ`, U+1E9E) are folded here too,
  which may refuse two names that Dropbox would keep apart. *Conservative*.
- Unicode form: Dropbox stores names in NFC (composed: `é` as one character), so a name
  written decomposed (NFD, as macOS writes them) is the same name (Maestral pull request 409,
  maestral#678). NFC also maps compatibility ideographs to their unified form (U+FA16 `猪`
  is U+732A `猪`), so those collide too.

Names this computer cannot hold (`local_name_problem`, `local_case_clashes`; checked before a
download or an unzip writes anything) are the last section: Windows refuses more than Dropbox.
"""

from __future__ import annotations

import os
import sys
import unicodedata
from typing import Iterable, Sequence

from .localfs import TEMP_PREFIX

MAX_NAME_CHARS = 255

# Compared after lower-casing; "icon\r" is the macOS custom-folder-icon file.
IGNORED_NAMES = frozenset({"desktop.ini", "thumbs.db", "ehthumbs.db", ".ds_store", "._.ds_store", ".dropbox",
                           ".dropbox.attr", "icon\r"})
OFFICE_LOCK_PREFIX = "~$"
TEMPORARY_PREFIX = TEMP_PREFIX


# First characters of every prefix rule below (Office locks, this tool's temporaries, ~*.tmp).
_PREFIXES_START = "~."


def ignored_reason(name: str) -> str | None:
    """Why the desktop app never syncs this name (so neither mode sends it), or None."""
    if name.lower() in IGNORED_NAMES:
        return "a system file the Dropbox desktop app never syncs"
    if name[:1] not in _PREFIXES_START:  # the common case, once per file of a walk: one test
        return None
    if name.startswith(OFFICE_LOCK_PREFIX):
        return "an Office lock file (~$), which the Dropbox desktop app never syncs"
    if name.startswith(TEMPORARY_PREFIX):
        return "a temporary file of this tool (.~)"
    if name.startswith("~") and name.lower().endswith(".tmp"):
        return "a temporary file (~...tmp), which the Dropbox desktop app never syncs"
    return None


def is_ignored(name: str) -> bool:
    return ignored_reason(name) is not None


def is_valid_text(name: str) -> bool:
    """False for names holding bytes that are not UTF-8 (Linux) or lone surrogates (Windows)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_CONTROL_SHOWN = {code: f"\\x{code:02x}" for code in [*range(32), 127]} | {9: "\\t", 10: "\\n", 13: "\\r"}


def shown(path: str | os.PathLike) -> str:
    """A path as one line of text any log, console or sheet accepts: bytes that are not UTF-8
    appear as `\\xNN` (caf\\xe9.txt), a lone UTF-16 surrogate as `\\udNNN`, a control character
    as `\\r`, `\\x01`..."""
    text = os.fspath(path)
    if not is_valid_text(text):
        try:
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if text.isprintable() else text.translate(_CONTROL_SHOWN)


def name_problem(name: str) -> str | None:
    """Why Dropbox would refuse this one name (file or folder), with what to do; or None."""
    if not is_valid_text(name):
        return f"the name '{shown(name)}' is not valid text (UTF-8); Dropbox cannot store it: rename it"
    if name in ("", ".", ".."):
        return f"the name {name!r} cannot be used in Dropbox: rename it"
    if "\\" in name or "/" in name:
        return f"the name {name!r} contains a slash or backslash, which Dropbox does not allow: rename it"
    if not name.isprintable() and any(ord(c) < 32 or ord(c) == 127 for c in name):  # isprintable: C speed
        return f"the name {name!r} contains a control character, which Dropbox does not allow: rename it"
    if name.endswith(" "):
        return f"the name {name!r} ends with a space, which Dropbox does not allow: remove the space"
    if name.endswith("."):
        return f"the name {name!r} ends with a period, which Dropbox may refuse: rename it"
    if len(name) > MAX_NAME_CHARS:
        return f"the name is {len(name)} characters long; Dropbox allows {MAX_NAME_CHARS}: shorten it"
    return None


def dropbox_path_problem(path: str) -> str | None:
    """The first refused component of a Dropbox path such as /Data/2024, or None."""
    for component in path.split("/"):
        if component:
            problem = name_problem(component)
            if problem:
                return problem
    return None


class _SimpleLowercase(dict):
    """str.translate table: each character to its simple lowercase mapping, filled as met."""

    def __missing__(self, code: int) -> str:
        lowered = chr(code).lower()
        # U+0130 is the one character whose full lowercase (i + combining dot) differs from its
        # simple one (i); tests/test_names.py checks that no other exists.
        value = lowered if len(lowered) == 1 else "i"
        self[code] = value
        return value


_LOWER = _SimpleLowercase()


def case_key(dropbox_path: str) -> str:
    """The form in which Dropbox compares paths: NFC, then lower-cased character by character
    (see the module docstring). Two paths with the same key are one item in Dropbox."""
    if dropbox_path.isascii():
        return dropbox_path.lower()
    folded = unicodedata.normalize("NFC", dropbox_path).translate(_LOWER)
    return unicodedata.normalize("NFC", folded)  # lower-casing may leave a composable pair


def differ_only_in_form(first: str, second: str) -> bool:
    """True when two different spellings are the same text once composed (NFC vs NFD)."""
    return first != second and unicodedata.normalize("NFC", first) == unicodedata.normalize("NFC", second)


# ============================================================================ names on this computer
#
# Windows, from Microsoft's "Naming Files, Paths, and Namespaces"
# (learn.microsoft.com/windows/win32/fileio/naming-a-file, section "Naming conventions"):
# - reserved characters `< > : " / \ | ? *` and the characters 1-31 (and NUL);
# - the device names CON, PRN, AUX, NUL, COM0-COM9, COM¹ COM² COM³, LPT0-LPT9, LPT¹ LPT² LPT³,
#   in any case, "also avoid these names followed immediately by an extension; for example,
#   NUL.txt and NUL.tar.gz are both equivalent to NUL";
# - "Do not end a file or directory name with a space or a period" (Windows drops them, so the
#   file would be written under another name, or not at all);
# - "Do not assume case sensitivity ... consider the names OSCAR, Oscar, and oscar to be the
#   same". NTFS compares names by upper-casing each character through its upcase table (one
#   character to one: the simple uppercase mapping), without Unicode normalization.
# macOS: APFS and HFS+ are case-insensitive by default and ignore the Unicode form (NFC/NFD)
# (Apple, "Apple File System Guide", FAQ); they refuse none of the names above. Linux file
# systems are case-sensitive.

# Which rules apply here; tests set it to act as another system (patching os.name breaks pathlib).
LOCAL_SYSTEM = {"win32": "windows", "cygwin": "windows", "darwin": "macos"}.get(sys.platform, "posix")

WINDOWS_RESERVED_CHARACTERS = frozenset('<>:"/\\|?*')
WINDOWS_DEVICE_NAMES = frozenset({"CON", "PRN", "AUX", "NUL"}
                                 | {f"{port}{n}" for port in ("COM", "LPT") for n in "0123456789¹²³"})


def windows_name_problem(name: str) -> str | None:
    """Why Windows cannot hold a file or folder called `name` (a sentence naming it), or None."""
    bad = sorted(set(name) & WINDOWS_RESERVED_CHARACTERS)
    if bad:
        return f"the name {name!r} contains {' '.join(bad)}, which Windows does not allow in names"
    if any(ord(c) < 32 for c in name):
        return f"the name {name!r} contains a control character, which Windows does not allow in names"
    if name.endswith((" ", ".")):
        return f"the name {name!r} ends with a space or a period, which Windows removes from names"
    device = name.split(".", 1)[0].rstrip(" ").upper()
    if device in WINDOWS_DEVICE_NAMES:
        return (f"the name {name!r} is {device}, a device name Windows reserves (CON, PRN, AUX, NUL, "
                "COM0-9, LPT0-9), with any extension too")
    return None


def local_name_problem(name: str) -> str | None:
    """Why this computer cannot hold a file or folder called `name`, or None (Windows only)."""
    return windows_name_problem(name) if LOCAL_SYSTEM == "windows" else None


def _local_case_key(name: str) -> str:
    if LOCAL_SYSTEM == "macos":
        name = unicodedata.normalize("NFC", name)
    return "".join(upper if len(upper := c.upper()) == 1 else c for c in name)


def local_case_clashes(paths: Iterable[Sequence[str]]) -> list[tuple[str, str]]:
    """Pairs of relative paths (components joined by "/") that this computer's file system
    would take for one, because they differ only in case in the same folder (`A.txt` beside
    `a.txt`; on macOS also in Unicode form). Each pair once, in the order met; none on Linux."""
    if LOCAL_SYSTEM not in ("windows", "macos"):
        return []
    spelled: dict[tuple[str, ...], str] = {}
    clashes: list[tuple[str, str]] = []
    reported: set[tuple[str, ...]] = set()
    for parts in paths:
        keys: tuple[str, ...] = ()
        for depth, name in enumerate(parts, 1):
            keys += (_local_case_key(name),)
            path = "/".join(parts[:depth])
            first = spelled.setdefault(keys, path)
            if first != path and keys not in reported:
                reported.add(keys)
                clashes.append((first, path))
                break
    return clashes
