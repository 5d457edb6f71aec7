"""Settings validation (every bad setting named at once) and the run logs (timestamped at
start, mirrored, scrubbed of secrets)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from archive_dropbox import logs
from archive_dropbox.errors import SettingsError
from archive_dropbox.settings import Setting, add_setting_flags, existing_directory, resolve

SPEC = [
    Setting("chunkSize_MB", 128, int, "chunk", minimum=4, maximum=150),
    Setting("fileSizeLimit_GB", 500, float, "limit", minimum=0.000001),
    Setting("dropboxDir", "", Path, "folder", optional=True, check=existing_directory),
    Setting("mode", "skip", str, "mode", choices=("skip", "overwrite")),
]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_setting_flags(parser, SPEC)
    return parser.parse_args(list(argv))


def test_values_from_script_lines_and_flags(tmp_path):
    script = tmp_path / "app.py"
    settings = resolve(SPEC, {"chunkSize_MB": 64, "dropboxDir": str(tmp_path)}, _args("--fileSizeLimit_GB", "0.5"),
                       script=script)
    assert settings.chunkSize_MB == 64 and settings.fileSizeLimit_GB == 0.5
    assert settings.dropboxDir == tmp_path and settings.mode == "skip"


def test_relative_paths_are_resolved_from_the_script_folder(tmp_path):
    (tmp_path / "box").mkdir()
    settings = resolve(SPEC, {"dropboxDir": "box"}, None, script=tmp_path / "app.py")
    assert settings.dropboxDir == tmp_path / "box"


def test_every_bad_setting_is_named_with_how_to_fix_it(tmp_path):
    with pytest.raises(SettingsError) as caught:
        resolve(SPEC, {"chunkSize_MB": 200, "fileSizeLimit_GB": -1, "dropboxDir": str(tmp_path / "nope"),
                       "mode": "maybe"}, None, script=tmp_path / "app.py")
    text = caught.value.describe()
    assert "4 setting(s) in app.py" in text
    assert "'chunkSize_MB' = 200 must be at most 150" in text
    assert "'fileSizeLimit_GB' = -1 must be at least" in text
    assert "'dropboxDir'" in text and "does not exist" in text
    assert "'mode' = 'maybe' must be one of" in text
    assert "the line 'chunkSize_MB = ...' at the top of app.py" in text
    with pytest.raises(SettingsError, match="Fix --chunkSize_MB"):
        resolve(SPEC, {}, _args("--chunkSize_MB", "lots"), script=tmp_path / "app.py")


def test_log_is_named_at_start_written_as_work_happens_and_never_holds_secrets(tmp_path):
    logger, path = logs.start_log(tmp_path / "upload", "", console=False)
    assert re.fullmatch(r"\d{8}_\d{6}\.log", path.name)
    assert "Log file" in path.read_text()  # written at once, not at the end
    logs.register_secret("my-very-secret-refresh-token")
    logger.info("refresh with my-very-secret-refresh-token and sl.ABCDEFGHIJKLMNOPQRSTUV then "
                "Authorization: Bearer abcdefghijklmnop")
    logs.close_log(logger)
    text = path.read_text()
    assert "my-very-secret" not in text and "sl.ABCDEFG" not in text and "abcdefghijklmnop" not in text
    assert text.count("[secret]") == 3
    second_logger, second = logs.start_log(tmp_path / "upload", "", console=False)
    logs.close_log(second_logger)
    assert second != path  # same second: a new name, never the same file
