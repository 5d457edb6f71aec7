"""Benchmark of preProcess/1_listDirToZip.py against `find DIR -printf '%s\\n'`.

Builds (once, cached under the work folder) a tree of small files shaped like microscope data
(sessions / grids / frame folders), then times, in the same run and with a warm cache:
- find printing every size (the reference: one lstat per entry, no interpreter);
- the script itself, as users run it (a subprocess), and the walk phase it reports in its log;
- the script on an empty folder: Python + pandas + openpyxl start-up, the fixed cost that does
  not grow with the tree.
Peak memory is the script's largest resident set size (psutil polling, cross-checked with
getrusage where available).

Targets: walk <= 1.5x find; script minus its fixed start-up <= 1.5x find; peak RSS <= 300 MB.
`python bench/bench_scan.py [--quick]` prints a Markdown table.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import openpyxl
import psutil

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "preProcess" / "1_listDirToZip.py"
FULL = (200_000, 20_000)
QUICK = (4_000, 400)  # frame folders: a multiple of SESSIONS * FOLDERS_PER_GRID
SESSIONS = 20
FOLDERS_PER_GRID = 10
WALK_TARGET = 1.5
MEMORY_TARGET_MB = 300


def build_tree(workdir: Path, files: int, folders: int) -> Path:
    """`folders` frame folders holding `files` files of 0-64 bytes, reused when already built."""
    root = workdir / f"scan_tree_{files}_{folders}"
    marker = workdir / f"scan_tree_{files}_{folders}.complete"  # outside the tree: not counted
    if marker.exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    rng = random.Random(20240101)
    grids = max(1, folders // (SESSIONS * FOLDERS_PER_GRID))
    per_folder = max(1, files // folders)
    payload = bytes(64)
    made = 0
    for session in range(SESSIONS):
        for grid in range(grids):
            for folder in range(FOLDERS_PER_GRID):
                leaf = root / f"session_{session:02d}" / f"grid {grid:03d}" / f"movie_{folder:02d}"
                leaf.mkdir(parents=True)
                for frame in range(per_folder):
                    with open(leaf / f"frame_{frame:05d}.tif", "wb") as handle:
                        handle.write(payload[:rng.randrange(65)])
                made += 1
    marker.write_text(f"{made * per_folder} files in {made} frame folders\n")
    return root


def _workbook(path: Path, folder: Path) -> Path:
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "listDirToZip"
    sheet.append(["inputDir"])
    sheet.append([str(folder)])
    book.save(path)
    return path


def _time_find(root: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["find", str(root), "-printf", "%s\n"], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def _run_script(workbook: Path, workdir: Path, tag: str) -> tuple[float, float, float, Path]:
    """Wall seconds, walk seconds (from the log), peak RSS in MB, output folder."""
    logs = workdir / "logs" / tag
    if logs.exists():
        shutil.rmtree(logs)
    out = workdir / "out" / tag
    env = dict(os.environ, ARCHIVE_DROPBOX_NO_PAUSE="1", PYTHONIOENCODING="utf-8")
    command = [sys.executable, str(SCRIPT), "--excelName", str(workbook), "--logs", str(logs),
               "--output-dir", str(out), "--minFiles", "5"]
    started = time.perf_counter()
    child = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = 0
    while child.poll() is None:
        try:
            peak = max(peak, child.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.005)
    wall = time.perf_counter() - started
    stderr = child.stderr.read().decode("utf-8", "replace")
    child.stderr.close()
    if child.returncode != 0:
        raise RuntimeError(f"the script failed with status {child.returncode}: {stderr}")
    log_text = next((logs / "preProcess").glob("*.log")).read_text(encoding="utf-8")
    walk = float(re.search(r"Scanning took ([0-9.]+) s", log_text).group(1))
    return wall, walk, peak / 1e6, out


def _children_max_rss_mb() -> float:
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    value = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return value / 1e6 if sys.platform == "darwin" else value / 1e3


def _row(figure, value, unit, reference, reference_value, target, passed) -> dict:
    ratio = value / reference_value if reference_value else float("nan")
    return {"figure": figure, "value": round(value, 3), "unit": unit, "reference": reference,
            "reference_value": round(reference_value, 3), "ratio": round(ratio, 2),
            "target": target, "passed": bool(passed)}


def run(quick: bool, workdir: Path) -> list[dict]:
    files, folders = QUICK if quick else FULL
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tree = build_tree(workdir, files, folders)
    empty = workdir / "empty_folder"
    empty.mkdir(exist_ok=True)
    tree_book = _workbook(workdir / "zipDir_tree.xlsx", tree)
    empty_book = _workbook(workdir / "zipDir_empty.xlsx", empty)

    # Warm the cache (and the interpreter's files) once, then measure, alternating. (A quick
    # run's timings are not judged: its warm-up run would only cost the smoke test time.)
    _time_find(tree)
    if not quick:
        _run_script(tree_book, workdir, "warm")
    repeats = 1 if quick else 3
    finds, walls, walks, peaks, fixed = [], [], [], [], []
    out = None
    for attempt in range(repeats):
        finds.append(_time_find(tree))
        wall, walk, peak, out = _run_script(tree_book, workdir, f"tree{attempt}")
        walls.append(wall)
        walks.append(walk)
        peaks.append(peak)
        empty_run = _run_script(empty_book, workdir, f"empty{attempt}")
        fixed.append(empty_run[0])
    find_s = statistics.median(finds)
    wall_s = statistics.median(walls)
    walk_s = statistics.median(walks)
    fixed_s = statistics.median(fixed)
    peak_mb = max(max(peaks), _children_max_rss_mb())
    # Quick: the one timed empty run's peak serves (a run of its own only for the full table).
    empty_peak = empty_run[2] if quick else _run_script(empty_book, workdir, "empty_rss")[2]

    lines = (out / "directorySize.txt").read_text(encoding="utf-8").splitlines()
    counted = int(lines[1].split("\t")[2])  # the root's recursive file count
    expected_files = (files // folders) * folders
    expected_dirs = 1 + SESSIONS + SESSIONS * max(1, folders // (SESSIONS * FOLDERS_PER_GRID)) + folders
    label = f"{counted:,} files, {len(lines) - 1:,} folders"
    # Timings of the small --quick tree are too short to judge on a shared machine: there the
    # run checks correctness only, and the speed targets are judged by the full run.
    speed_target = f"<= {WALK_TARGET}x find" + (" (judged in the full run)" if quick else "")
    return [
        _row(f"scan walk ({label})", walk_s, "s", "find -printf '%s\\n'", find_s,
             speed_target, quick or walk_s <= WALK_TARGET * find_s),
        _row(f"whole script minus fixed start-up ({fixed_s:.2f} s)", max(wall_s - fixed_s, 0.0), "s",
             "find -printf '%s\\n'", find_s, speed_target,
             quick or wall_s - fixed_s <= WALK_TARGET * find_s),
        _row("whole script, wall (for information)", wall_s, "s", "find -printf '%s\\n'", find_s,
             "info: fixed start-up dominates small trees", True),
        _row("peak memory of the script", peak_mb, "MB", "same script on an empty folder", empty_peak,
             f"<= {MEMORY_TARGET_MB} MB", peak_mb <= MEMORY_TARGET_MB),
        _row("files counted (correctness)", counted, "files", "files created", expected_files,
             "equal, and every folder listed", counted == expected_files and len(lines) - 1 == expected_dirs),
    ]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_table import bench_parser, markdown

    options = bench_parser(__doc__, REPO / "bench" / "work", "4,000 files in 400 folders (smoke test)",
                           "cache for the test tree").parse_args()
    results = run(options.quick, options.workdir)
    print(markdown(results))
    sys.exit(0 if all(row["passed"] for row in results) else 1)
