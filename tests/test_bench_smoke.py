"""CI smoke run of every benchmark at its quick size: each one runs and reports its figures.
Correctness only: timings on shared machines are not judged here (bench/RESULTS.md is)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, script_env


def test_every_benchmark_runs_at_quick_size(tmp_path):
    output = tmp_path / "RESULTS-quick.md"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "run_all.py"), "--quick", "--workdir",
                             str(tmp_path / "work"), "--output", str(output)], env=script_env(),
                            capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    table = output.read_text()
    assert "failed to run" not in table
    for name in ("scan", "zip", "server", "upload", "join", "download", "zip_index", "inventory"):
        assert f"| {name} |" in table, f"benchmark {name} reported nothing"
