"""The README's quick start: demo.py runs every stage's real script on sample data against the
local test server, restores every file identically, and leaves timestamped logs."""

from __future__ import annotations

import re

from conftest import run_script


def test_quick_start_demo_runs_the_whole_job(tmp_path):
    result = run_script("demo.py", "--workdir", str(tmp_path / "work"), "--logs", str(tmp_path / "logs"),
                        timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "NOT to Dropbox" in output and "local test server, not Dropbox" in output
    assert re.search(r"All \d+ original files came back identical", output)
    for folder in ("preProcess", "dataPrep", "upload"):
        names = [p.name for p in (tmp_path / "logs" / folder).glob("*.log")]
        assert names and all(re.match(r"\d{8}_\d{6}", n) for n in names), folder
    assert "Traceback" not in output
