#!/usr/bin/env python3
"""Run every benchmark and write bench/RESULTS.md: one table (figure, value, reference, ratio,
target, pass/fail) from one run, plus the machine it ran on.

    python3 bench/run_all.py            # full sizes (minutes; needs several GB of free disk)
    python3 bench/run_all.py --quick    # small sizes, a smoke test of every benchmark
    python3 bench/run_all.py --only scan,zip

Every figure is a ratio against a reference measured in the same run (`find`, `cat`, raw
7-Zip, the original one-file-at-a-time upload, the link's ceiling), because shared machines
are noisy. Work files go to bench/work/ (ignored by git) unless --workdir says otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# Module name and short name; each module's run(quick[, workdir]) returns table rows.
BENCHMARKS = [
    ("bench_scan", "scan"),
    ("bench_zip", "zip"),
    ("bench_server", "server"),
    ("bench_upload", "upload"),
    ("bench_join", "join"),
    ("bench_download", "download"),
    ("bench_stage1", "stage1"),
    ("bench_zip_index", "zip_index"),
    ("bench_inventory", "inventory"),
    ("bench_plan_scale", "plan_scale"),
]


def machine_details() -> list[str]:
    import psutil

    lines = [
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- machine: {platform.platform()}, Python {platform.python_version()}",
        f"- CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()}); "
        f"memory {psutil.virtual_memory().total / 2**30:.1f} GiB",
    ]
    if hasattr(os, "getloadavg"):
        lines.append("- load average at start: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    seven = shutil.which("7zz") or shutil.which("7z") or shutil.which("7za")
    lines.append(f"- 7-Zip: {seven or 'not installed'}")
    return lines


def format_value(value, unit: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def table(rows: list[dict]) -> list[str]:
    lines = ["| benchmark | figure | value | reference | ratio | target | result |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = row.get("ratio")
        reference = row.get("reference", "")
        if row.get("reference_value") is not None:
            reference = f"{reference} ({format_value(row['reference_value'], row.get('unit', ''))})"
        passed = row.get("passed")
        verdict = "pass" if passed else ("FAIL" if passed is not None else "—")
        lines.append("| {} | {} | {} | {} | {} | {} | {} |".format(
            row.get("benchmark", ""), row.get("figure", ""), format_value(row.get("value"), row.get("unit", "")),
            reference, "—" if ratio is None else f"{ratio:.2f}", row.get("target", ""), verdict))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    parser.add_argument("--only", default="", help="comma-separated short names: " +
                        ", ".join(name for _, name in BENCHMARKS))
    parser.add_argument("--workdir", type=Path, default=HERE / "work")
    parser.add_argument("--output", type=Path, default=None, help="default: bench/RESULTS.md (full) or "
                        "bench/work/RESULTS-quick.md (quick)")
    args = parser.parse_args(argv)
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    args.workdir.mkdir(parents=True, exist_ok=True)
    output = args.output or (args.workdir / "RESULTS-quick.md" if args.quick else HERE / "RESULTS.md")

    header = machine_details()
    rows: list[dict] = []
    errors: list[str] = []
    for module_name, name in BENCHMARKS:
        if wanted and name not in wanted:
            continue
        print(f"== {name} ({'quick' if args.quick else 'full'}) ==", flush=True)
        started = time.monotonic()
        try:
            module = importlib.import_module(module_name)
            workdir = args.workdir / name
            workdir.mkdir(parents=True, exist_ok=True)
            takes_workdir = "workdir" in inspect.signature(module.run).parameters
            result = module.run(args.quick, workdir) if takes_workdir else module.run(args.quick)
        except Exception:  # one broken benchmark must not hide the others' figures
            errors.append(f"{name}: {traceback.format_exc()}")
            print(errors[-1], file=sys.stderr)
            continue
        for row in result:
            row.setdefault("benchmark", name)
        rows.extend(result)
        print("\n".join(table(result)), f"\n({time.monotonic() - started:.0f} s)\n", flush=True)

    text = ["# Benchmark results", "", f"Size: {'quick (smoke run)' if args.quick else 'full'}", "",
            *header, "", *table(rows), ""]
    if errors:
        text += ["## Benchmarks that failed to run", "", "```", *errors, "```", ""]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(text), encoding="utf-8")
    print(f"Wrote {output}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
