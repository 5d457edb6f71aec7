"""CI smoke run of every benchmark at its quick size: each one runs and reports its figures.
Correctness only: timings on shared machines are not judged here (bench/RESULTS.md is).

The benchmarks run side by side, one process each, so the waits on the emulated network's
latency overlap: together they take about their CPU time shared out over the cores (~20 s on 2)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, script_env

BENCHMARKS = ("scan", "zip", "server", "upload", "join", "download", "stage1", "zip_index", "inventory",
              "plan_scale")


def test_every_benchmark_runs_at_quick_size(tmp_path):
    running = {}
    for name in BENCHMARKS:
        output = tmp_path / f"RESULTS-{name}.md"
        log = open(tmp_path / f"{name}.log", "w")
        running[name] = (output, log, subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "run_all.py"), "--quick", "--only", name, "--workdir",
             str(tmp_path / "work" / name), "--output", str(output)], env=script_env(), stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    for name, (output, log, process) in running.items():
        returncode = process.wait(timeout=900)
        log.close()
        assert returncode == 0, (tmp_path / f"{name}.log").read_text()[-4000:]
        table = output.read_text()
        assert "failed to run" not in table, table[-4000:]
        assert f"| {name} |" in table, f"benchmark {name} reported nothing"


def test_run_all_knows_every_benchmark():
    """A benchmark added to run_all.py is smoke-tested too."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import run_all
    finally:
        sys.path.remove(str(REPO / "bench"))
    assert {name for _, name in run_all.BENCHMARKS} == set(BENCHMARKS)
