"""Benchmark of Stage 1 at scale (issue 18): what planning costs as the number of files grows.

`app.py --dry-run` on the dropboxUpload_API tab, one row holding a tree of empty files (100 a
folder), against the local Dropbox test server (a first upload: the destination does not exist),
at two sizes measured in one run:
  - peak RSS of app.py (Linux VmHWM, polled), at 1,000,000 files against the 300 MiB target, and
    the large tree's peak against the small one's (target: less than 1.5x for 10x the files);
  - CPU seconds of app.py per file, against `find -type f -printf` listing the same tree (the
    cheapest walk there is);
  - the journal's bytes per planned file, for the plan written in as pending and then as done
    (the fields an upload records), in-process with journal.sync_plan and mark_done (a dry run
    writes no journal);
  - a rerun of the dry run once the journal holds the whole plan as done and its folders
    settled (what an upload records at its end): CPU against the first dry run's (target: a
    quarter), and the files of the tree it opens (strace, where installed; target: none);
  - a real upload of the small tree (empty files, so requests and bookkeeping are all there is):
    app.py's peak RSS against its dry run's; then, with 10 files touched, a rerun: files sent
    (target: 10) and requests beyond their own (target: a few, here at most 10);
  - full size only: a real upload of the large tree, its peak RSS against the small tree's
    (target: less than 1.5x for 10x the files; about 15 minutes).

    python bench/bench_plan_scale.py --quick     # 1,000 and 5,000 files, a smoke test (CI)
    python bench/bench_plan_scale.py             # 100,000 and 1,000,000 files (~1 GB of inodes)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "tests", REPO / "bench"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from bench_upload import _app_env, _high_water_mark  # noqa: E402
from conftest import write_xlsx  # noqa: E402
from tests.dropbox_server import DropboxTestServer  # noqa: E402

from archive_dropbox import api_upload, journal as journal_module, plan_items, prepare  # noqa: E402
from archive_dropbox.sheets import SheetRow  # noqa: E402

MIB = 2**20
TARGET_PEAK_MIB = 300          # issue 18: 1,000,000 files planned in at most 300 MiB
TARGET_GROWTH = 1.5            # peak at 10x the files: less than 1.5x
TARGET_JOURNAL_BYTES = 400     # per planned file
TARGET_RERUN_CPU = 0.25        # a rerun with nothing changed: a quarter of the first run's CPU
PER_FOLDER = 100
SHEET = "dropboxUpload_API"


def _row(figure, value, unit, reference, reference_value, target, passed) -> dict:
    ratio = value / reference_value if reference_value else float("nan")
    return {"figure": figure, "value": round(value, 3), "unit": unit, "reference": reference,
            "reference_value": round(reference_value, 3), "ratio": round(ratio, 3), "target": target,
            "passed": bool(passed)}


def make_tree(root: Path, count: int) -> Path:
    """`count` empty files, PER_FOLDER a folder, names as an instrument writes them."""
    if root.exists() and sum(1 for _ in root.rglob("*.tif")) == count:
        return root
    shutil.rmtree(root, ignore_errors=True)
    for index in range(count):
        if index % PER_FOLDER == 0:
            folder = root / f"plate_{index // 10_000:03d}" / f"well_{index // PER_FOLDER:05d}"
            folder.mkdir(parents=True)
        open(folder / f"frame_{index:07d}_ch1_z001.tif", "wb").close()
    return root


def _measure(command: list[str], env: dict) -> tuple[int, float, str]:
    """(peak RSS in bytes by VmHWM, CPU seconds, output) of a command run to its end."""
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, cwd=str(REPO))
    watched = psutil.Process(child.pid)
    peak, cpu = 0, float("nan")
    output = bytearray()
    os.set_blocking(child.stdout.fileno(), False)
    while True:
        chunk = child.stdout.read()
        if chunk:
            output += chunk
        try:
            if watched.status() == psutil.STATUS_ZOMBIE:
                times = watched.cpu_times()
                cpu = times.user + times.system
                break
            peak = max(peak, _high_water_mark(child.pid))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    child.wait()
    output += child.stdout.read() or b""
    text = output.decode("utf-8", "replace")
    if child.returncode != 0:
        raise RuntimeError(f"{command[1]} failed ({child.returncode}):\n{text[-3000:]}")
    return peak, cpu, text


def _dry_run(server: DropboxTestServer, book: Path, logs: Path, *, strace_to: Path | None = None,
             real: bool = False) -> tuple[int, float]:
    command = [sys.executable, str(REPO / "app.py"), "--excelName", str(book), "--sheetName", SHEET,
               "--logs", str(logs), "--caBundle", server.ca_file, *(() if real else ("--dry-run",))]
    if strace_to is not None:
        command = ["strace", "-f", "--seccomp-bpf", "-e", "trace=open,openat", "-o", str(strace_to), *command]
    peak, cpu, _ = _measure(command, _app_env(server))
    return peak, cpu


def _find_cpu(root: Path) -> float:
    before = psutil.Process().cpu_times()
    children_before = before.children_user + before.children_system
    subprocess.run(["find", str(root), "-type", "f", "-printf", "%s %T@ %p\n"], check=True,
                   stdout=subprocess.DEVNULL)
    after = psutil.Process().cpu_times()
    return after.children_user + after.children_system - children_before


def _journal_bytes(root: Path, journal_path: Path) -> tuple[float, float]:
    """Bytes per planned file of the journal holding root's plan, pending and then done; the
    journal is left holding it done (for the rerun)."""
    row = SheetRow(Path("inputs.xlsx"), SHEET, 2, {"inputFile": root, "outputDir": "/Bench/plan",
                                                   "deleteAfterUpload": 0})
    plan = prepare.build_plan([row], input_column="inputFile", output_column="outputDir",
                              delete_column="deleteAfterUpload", destination_of_row=lambda r: r["outputDir"],
                              part_limit=50 * 10**9, log=logging.getLogger("bench_plan_scale"))
    count = len(plan.sources)
    with journal_module.Journal(journal_path, SHEET) as journal:
        items = journal.sync_plan(prepare.iter_items(plan, SHEET))
        journal._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pending = journal_path.stat().st_size / count
        for item in items:  # what an upload records for a finished file
            item.content_hash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            item.remote_rev, item.remote_path, item.hash_local = "015f2a6c9e8b0000000275d4b6e0", item.destination, 1
        journal.mark_done(items)
        # What the upload records at its end: every folder settled (the rerun leaves them out).
        api_upload.record_settled_folders(journal, plan_items.pairs(plan, journal), failed_rows=())
        journal._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        done = journal_path.stat().st_size / count
    return pending, done


TOUCHED = 10
FEW_REQUESTS = 10  # issue 18: "at most a few requests beyond" the touched files' own
LIST_PAGE = 2000  # entries per files/list_folder page (Dropbox's largest)
SEND_ROUTES = {"files/upload", "files/upload_session/start", "files/upload_session/start_batch",
               "files/upload_session/append_v2", "files/upload_session/append_batch", "files/upload_session/finish",
               "files/upload_session/finish_batch_v2", "files/upload_session/finish_batch/check"}


def _upload_command(server: DropboxTestServer, book: Path, logs: Path) -> list[str]:
    # ifExists = 'overwrite': a touched file replaces its earlier copy ('report' would keep both)
    return [sys.executable, str(REPO / "app.py"), "--excelName", str(book), "--sheetName", SHEET,
            "--logs", str(logs), "--caBundle", server.ca_file, "--ifExists", "overwrite"]


def _upload_peak(server: DropboxTestServer, book: Path, logs: Path) -> int:
    """Peak RSS in bytes of a real upload of the tree `book` names, into fresh `logs`."""
    shutil.rmtree(logs, ignore_errors=True)
    peak, _, _ = _measure(_upload_command(server, book, logs), _app_env(server))
    return peak


def _real_upload(server: DropboxTestServer, small: tuple, workdir: Path) -> tuple[int, int, int]:
    """Upload the small tree for real, touch TOUCHED files, upload again: (peak RSS of the first
    upload in bytes, items the rerun sent by its summary line, the rerun's requests other than
    those that send or commit bytes)."""
    tree, book, _, _, _, _ = small
    logs = workdir / "logs_upload"
    command = _upload_command(server, book, logs)
    peak = _upload_peak(server, book, logs)
    touched = sorted(tree.rglob("*.tif"))[:TOUCHED]
    for index, path in enumerate(touched):
        path.write_bytes(b"touched %d" % index)
    server.clear_log()
    try:
        _, _, output = _measure(command, _app_env(server))
    finally:
        for path in touched:  # as they were, for the next run of the benchmark
            path.write_bytes(b"")
    found = re.search(r"(\d+) items sent now", output)
    if found is None:
        raise RuntimeError(f"no summary line in the rerun's output:\n{output[-3000:]}")
    calls = server.calls()
    return peak, int(found.group(1)), sum(1 for call in calls if call["route"] not in SEND_ROUTES)


def _opened_in(trace: Path, root: Path) -> int:
    prefix = str(root)
    with open(trace, encoding="utf-8", errors="replace") as lines:
        return sum(1 for line in lines if prefix in line and "O_DIRECTORY" not in line)


def run(quick: bool, workdir: Path) -> list[dict]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    small_count, large_count = (1_000, 5_000) if quick else (100_000, 1_000_000)
    results = {}
    shutil.rmtree(workdir / "server", ignore_errors=True)  # a first upload: Dropbox holds nothing yet
    with DropboxTestServer(workdir / "server") as server:
        for count in (small_count, large_count):
            tree = make_tree(workdir / f"tree_{count}", count)
            book = write_xlsx(workdir / f"inputs_{count}.xlsx", {SHEET: [
                ["inputFile", "outputDir", "deleteAfterUpload"], [str(tree), "/Bench/plan", 0]]})
            logs = workdir / f"logs_{count}"
            shutil.rmtree(logs, ignore_errors=True)
            peak, cpu = _dry_run(server, book, logs)
            results[count] = (tree, book, logs, peak, cpu, _find_cpu(tree))
        tree, book, logs, peak, cpu, find_cpu = results[large_count]
        pending, done = _journal_bytes(tree, logs / "journal.sqlite3")
        trace = workdir / "rerun.strace" if shutil.which("strace") and not quick else None
        _, rerun_cpu = _dry_run(server, book, logs, strace_to=trace)
        if trace is not None:  # strace's own cost falls on the run it watches: measured again without it
            opened = _opened_in(trace, tree)
            _, rerun_cpu = _dry_run(server, book, logs)
        # The uploads come after the dry runs, whose CPU times are compared: their load (both
        # cores, minutes) would otherwise weigh on the rerun only.
        upload = _real_upload(server, results[small_count], workdir)
        # The large tree uploaded too (full size only: about 15 minutes), to a folder of its own:
        # memory against the small one's.
        large_upload_peak = None
        if not quick:
            large_book = write_xlsx(workdir / "inputs_upload_large.xlsx", {SHEET: [
                ["inputFile", "outputDir", "deleteAfterUpload"], [str(tree), "/Bench/large", 0]]})
            large_upload_peak = _upload_peak(server, large_book, workdir / "logs_upload_large")
    small_peak = results[small_count][3]
    rows = [
        _row(f"app.py --dry-run, {large_count:,} files: peak RSS (VmHWM)", peak / MIB, "MiB",
             "target", TARGET_PEAK_MIB, f"<= {TARGET_PEAK_MIB} MiB", peak <= TARGET_PEAK_MIB * MIB),
        _row(f"peak RSS at {large_count:,} files vs {small_count:,}", peak / MIB, "MiB",
             f"peak at {small_count:,} files", small_peak / MIB, f"ratio < {TARGET_GROWTH}",
             peak < TARGET_GROWTH * small_peak),
        _row(f"app.py --dry-run, {large_count:,} files: CPU per file (start-up included)", cpu / large_count * 1e6,
             "us/file", "find -type f -printf size, mtime, path", find_cpu / large_count * 1e6, "informational",
             True),
        _row(f"journal bytes per planned file, pending ({large_count:,} files)", pending, "B/file", "target",
             TARGET_JOURNAL_BYTES, f"<= {TARGET_JOURNAL_BYTES}", pending <= TARGET_JOURNAL_BYTES),
        _row(f"journal bytes per planned file, done ({large_count:,} files)", done, "B/file", "target",
             TARGET_JOURNAL_BYTES, f"<= {TARGET_JOURNAL_BYTES}", done <= TARGET_JOURNAL_BYTES),
        _row(f"rerun --dry-run, journal holding all {large_count:,} done: CPU", rerun_cpu, "s",
             "first dry run's CPU", cpu, f"ratio <= {TARGET_RERUN_CPU}", rerun_cpu <= TARGET_RERUN_CPU * cpu),
    ]
    small_tree, _, _, small_dry_peak, _, _ = results[small_count]
    upload_peak, sent, beyond = upload
    rows += [
        _row(f"app.py real upload of {small_count:,} empty files: peak RSS", upload_peak / MIB, "MiB",
             "its dry run's peak", small_dry_peak / MIB, "informational", True),
        *([] if large_upload_peak is None else [
            _row(f"app.py real upload of {large_count:,} empty files: peak RSS", large_upload_peak / MIB, "MiB",
                 f"the same at {small_count:,} files", upload_peak / MIB, f"ratio < {TARGET_GROWTH}",
                 large_upload_peak < TARGET_GROWTH * upload_peak)]),
        _row(f"rerun of that upload with {TOUCHED} files touched: files sent", sent, "files", "files touched",
             TOUCHED, f"<= {TOUCHED}", sent <= TOUCHED),
        _row("that rerun: requests beyond the sent files' own (login, account, listing the touched files' folder, "
             "space, the row inventory's lookup and download)", beyond, "requests",
             f"one listing page per {LIST_PAGE:,} files (before issue 18's settled folders)",
             -(-small_count // LIST_PAGE), f"<= {FEW_REQUESTS} (a few)", beyond <= FEW_REQUESTS),
    ]
    if trace is not None:
        rows.append(_row("rerun --dry-run: files of the tree opened (strace)", opened, "files",
                         "files in the tree", large_count, "0", opened == 0))
    return rows


if __name__ == "__main__":
    from bench_table import bench_parser, markdown

    options = bench_parser(__doc__, REPO / "bench" / "work" / "plan_scale",
                           "1,000 and 5,000 files, correctness only").parse_args()
    print(markdown(run(options.quick, options.workdir)))
