r"""Settings: the plain `name = value` lines at the top of each script, optionally overridden
by command-line flags, validated together before anything happens.

The lines sit inside a raw text block (SETTINGS = r''' ... ''') and are read here, not by
Python: a Windows path typed as a user types it ('C:\Users\me\Dropbox', 'D:\new\x.xlsx') is
then taken literally, where a Python string literal would make '\U' a syntax error and '\n' a
line break.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .errors import SettingsError
from .localfs import windows_path_kind

WINDOWS = os.name == "nt"


@dataclass(frozen=True)
class Setting:
    """One setting a script accepts. `kind` is int, float, str, bool or Path."""

    name: str
    default: Any
    kind: type
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None
    optional: bool = False  # None / '' allowed
    secret: bool = False  # never offered as a flag: command lines are visible to other users
    # Extra check returning an error text, or None when the value is fine.
    check: Callable[[Any], str | None] | None = None


@dataclass
class Settings:
    """Validated values, readable as attributes (settings.chunkSize_MB)."""

    values: dict[str, Any] = field(default_factory=dict)
    script: str = ""

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Any:
        return self.values[name]


def read_settings_block(text: str, script: Path) -> dict[str, Any]:
    """The `name = value  # comment` lines of a script's settings block, as written.

    A quoted value ('...' or "...") is taken literally up to its closing quote: no backslash
    escapes, so Windows paths stay as typed. Unquoted values are True/False/None or numbers.
    Raises SettingsError naming every line that cannot be read (all at once)."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, equals, rest = stripped.partition("=")
        name, rest = name.strip(), rest.strip()
        if not equals or not name.isidentifier():
            problems.append(f"  - the line {stripped!r} is not of the form name = value")
            continue
        try:
            values[name] = _literal(rest)
        except ValueError as exc:
            problems.append(f"  - the line {stripped!r}: {exc}")
    if problems:
        raise SettingsError(f"{len(problems)} line(s) of the settings block of {script.name} cannot be read; "
                            "nothing was changed.\n" + "\n".join(problems), paths=[script])
    return values


def _literal(text: str) -> Any:
    if text[:1] in ("'", '"'):
        end = text.find(text[0], 1)
        if end < 0:
            raise ValueError(f"the value has no closing {text[0]}: write it as {text[0]}...{text[0]}")
        after = text[end + 1:].strip()
        if after and not after.startswith("#"):
            raise ValueError(f"unexpected text after the closing quote ({after!r})")
        return text[1:end]
    value = text.split("#", 1)[0].strip()
    if value in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[value]
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    raise ValueError(f"{value!r} is not a number, True or False: put text in quotes, e.g. '{value}'")


def add_setting_flags(parser: argparse.ArgumentParser, spec: Iterable[Setting],
                      script_values: Mapping[str, Any] | None = None) -> None:
    """One --flag per setting (secrets excepted). Its help shows the value in force without the
    flag: the script's own settings line when `script_values` holds it, else the built-in
    default, so that --help tells what a double-click would do."""
    group = parser.add_argument_group(
        "settings (each overrides the line of the same name at the top of the script)"
    )
    for setting in spec:
        if setting.secret:
            continue
        if script_values is not None and setting.name in script_values:
            # A proxy URL may carry a user name and password (http://user:pass@host): never shown.
            shown = re.sub(r"//[^/@]*@", "//[secret]@", _as_written(script_values[setting.name]))
            now = f"now: {shown}, from the settings lines"
        else:
            now = f"default: {_as_written(setting.default)}"
        # argparse expands %-formats in help texts: a '%' in a path would break --help.
        group.add_argument(f"--{setting.name}", dest=f"setting__{setting.name}", default=None,
                           metavar="VALUE", help=f"{setting.help} ({now})".replace("%", "%%"))


def _as_written(value: Any) -> str:
    # Quoted as in the settings block, without repr's doubled backslashes (C:\Users stays so).
    return f"'{value}'" if isinstance(value, str) else repr(value)


def _convert(setting: Setting, value: Any, from_flag: bool, base_dir: Path) -> Any:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        if setting.optional:
            return None
        raise ValueError("is empty: it needs a value")
    kind = setting.kind
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError("must be True or False (or 1 / 0)")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError("must be a whole number")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise ValueError("must be a whole number") from None
    if kind is float:
        if isinstance(value, bool):
            raise ValueError("must be a number")
        try:
            return float(str(value).strip())
        except ValueError:
            raise ValueError("must be a number") from None
    if kind is Path:
        if any(ord(c) < 32 for c in str(value)):
            # A Windows path in a Python string literal: '\\new' became a line break, '\\7' a bell.
            raise ValueError("contains a control character (a line break or tab?): a backslash in the path "
                             "was read as an escape. Write the path exactly as Windows shows it, between quotes, "
                             "in the settings block")
        kind = windows_path_kind(str(value).strip()) if not WINDOWS else None
        if kind == "unc":
            raise ValueError("is a Windows network path (UNC), which this computer cannot open: mount the share "
                             "and give its local path (for example /mnt/nas01/lab)")
        if kind == "drive":
            raise ValueError("looks like a Windows drive path, but this computer does not run Windows: give the "
                             "path as this computer sees it (for example /mnt/d/data or /home/you/Dropbox)")
        path = Path(str(value).strip()).expanduser()
        return path if path.is_absolute() else (base_dir / path)
    return str(value) if from_flag else value


def resolve(spec: Iterable[Setting], script_values: Mapping[str, Any], args: argparse.Namespace | None,
            *, script: Path) -> Settings:
    """Merge the script's lines with flags, check every value, and raise one SettingsError
    that names every bad setting."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    base_dir = script.parent
    for setting in spec:
        flag_value = getattr(args, f"setting__{setting.name}", None) if args is not None else None
        raw = flag_value if flag_value is not None else script_values.get(setting.name, setting.default)
        where = f"--{setting.name}" if flag_value is not None else f"the line '{setting.name} = ...' at the top of {script.name}"
        try:
            value = _convert(setting, raw, flag_value is not None, base_dir)
            if value is not None and setting.kind in (int, float):
                if setting.minimum is not None and value < setting.minimum:
                    raise ValueError(f"must be at least {setting.minimum:g}")
                if setting.maximum is not None and value > setting.maximum:
                    raise ValueError(f"must be at most {setting.maximum:g}")
            if value is not None and setting.choices is not None and value not in setting.choices:
                raise ValueError("must be one of " + ", ".join(repr(c) for c in setting.choices))
            if value is not None and setting.check is not None:
                message = setting.check(value)
                if message:
                    raise ValueError(message)
        except ValueError as exc:
            problems.append(f"  - setting '{setting.name}' = {_as_typed(raw)} {exc}. Fix {where}.")
            continue
        values[setting.name] = value
    if problems:
        raise SettingsError(
            f"{len(problems)} setting(s) in {script.name} need fixing; nothing was changed.\n"
            + "\n".join(problems),
            paths=[script],
        )
    return Settings(values=values, script=script.name)


def _as_typed(value: Any) -> str:
    """A value in a message as the user typed it: quoted text without Python's doubled backslashes."""
    return f"'{value}'" if isinstance(value, str) else repr(value)


def existing_file(value: Path) -> str | None:
    if not Path(value).exists():
        return "does not exist: give a file that exists"
    if Path(value).is_dir():
        return "is a folder, not a file"
    return None


def existing_directory(value: Path) -> str | None:
    if not Path(value).exists():
        return "does not exist: give a folder that exists"
    if not Path(value).is_dir():
        return "is a file, not a folder"
    return None
