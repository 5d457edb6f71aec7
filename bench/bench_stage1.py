"""Benchmark of Stage 1's look at Dropbox (archive_dropbox/destinations.py): what checking each
row's destination costs, for a sheet of 10,000 files, with `app.py --dry-run` against the local
Dropbox test server.

Figures, each against a reference from the same run:
  - list_folder pages (first page + continues) the check costs when the destination already
    holds the 10,000 files (a rerun), against one page per 2,000 entries (Dropbox's largest page);
  - requests of any kind when the destination does not exist yet (a first upload);
  - wall time of the dry run with the check, against the same dry run without a login (check
    skipped), to show the seconds it adds.

    python bench/bench_stage1.py --quick     # 1,000 files, correctness smoke test (CI)
    python bench/bench_stage1.py             # 10,000 files
"""

from __future__ import annotations

import datetime as dt
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "tests"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from conftest import write_xlsx  # noqa: E402
from tests.dropbox_server import DropboxTestServer  # noqa: E402

PAGE = 2000                      # Dropbox's largest list_folder page (files/list_folder, limit)
TARGET_EXTRA_PAGES = 2           # beyond one page per 2,000 entries: "a few listing pages more"
TARGET_FIRST_RUN_REQUESTS = 5    # a destination that does not exist: its metadata and a parent's
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
LISTING_ROUTES = ("files/list_folder", "files/list_folder/continue")
CHECK_ROUTES = (*LISTING_ROUTES, "files/get_metadata")


def _row(figure, value, unit, reference, reference_value, target, passed) -> dict:
    ratio = value / reference_value if reference_value else float("nan")
    return {"figure": figure, "value": round(value, 3), "unit": unit, "reference": reference,
            "reference_value": round(reference_value, 3), "ratio": round(ratio, 3), "target": target,
            "passed": bool(passed)}


def _env(server: DropboxTestServer, credentials: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.update(server.client_env(credentials=credentials))
    if not credentials:
        for name in ("DROPBOX_REFRESH_TOKEN", "DROPBOX_ACCESS_TOKEN", "DROPBOX_APP_KEY"):
            env.pop(name, None)
    bundle = SYSTEM_BUNDLE if Path(SYSTEM_BUNDLE).exists() else __import__("certifi").where()
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        env[name] = bundle
    env["ARCHIVE_DROPBOX_NO_PAUSE"] = "1"
    return env


def _dry_run(server: DropboxTestServer, book: Path, workdir: Path, credentials: bool = True) -> float:
    command = [sys.executable, str(REPO / "app.py"), "--excelName", str(book), "--sheetName", "dropboxUpload_API",
               "--logs", str(workdir / "logs"), "--caBundle", server.ca_file, "--dry-run",
               "--tokenFile", str(workdir / "no-login.json")]
    server.clear_log()
    started = time.perf_counter()
    result = subprocess.run(command, env=_env(server, credentials), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"app.py --dry-run failed ({result.returncode}):\n{result.stdout[-3000:]}"
                           f"{result.stderr[-3000:]}")
    return seconds


def _calls(server: DropboxTestServer, routes) -> int:
    return sum(server.count_calls(route) for route in routes)


def run(quick: bool, workdir: Path) -> list[dict]:
    workdir = Path(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    count = 1000 if quick else 10_000
    data = workdir / "data" / "run1"
    for index in range(count):
        folder = data / f"{index // 500:03d}"  # 500 files a folder, as a microscope writes them
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"frame_{index:05d}.tif").write_bytes(index.to_bytes(4, "big"))
    book = write_xlsx(workdir / "inputs.xlsx", {"dropboxUpload_API": [
        ["inputFile", "outputDir", "deleteAfterUpload"], [str(data), "/Bench/run1", 0]]})
    rows: list[dict] = []
    with DropboxTestServer(workdir / "server") as server:
        without_check = _dry_run(server, book, workdir, credentials=False)
        _dry_run(server, book, workdir)
        first_run_requests = _calls(server, CHECK_ROUTES)
        for path in sorted(data.rglob("*.tif")):
            server.put_file("/Bench/run1/" + path.relative_to(data).as_posix(), path.read_bytes(),
                            client_modified=dt.datetime(2024, 1, 1))
        with_check = _dry_run(server, book, workdir)
        pages = _calls(server, LISTING_ROUTES)
        metadata = server.count_calls("files/get_metadata")
    entries = count + count // 500 + 1          # files, their folders and the row's folder
    least_pages = math.ceil(entries / PAGE)
    label = f"{count:,}-file sheet, destination already holding them"
    rows.append(_row(f"destination check: list_folder pages ({label}; plus {metadata} get_metadata)", pages,
                     "pages", f"one page per {PAGE:,} entries ({entries:,} entries)", least_pages,
                     f"<= {least_pages + TARGET_EXTRA_PAGES} pages", pages <= least_pages + TARGET_EXTRA_PAGES))
    rows.append(_row(f"destination check: requests when the destination does not exist yet ({count:,} files)",
                     first_run_requests, "requests", "budget for a first upload", TARGET_FIRST_RUN_REQUESTS,
                     f"<= {TARGET_FIRST_RUN_REQUESTS}", first_run_requests <= TARGET_FIRST_RUN_REQUESTS))
    rows.append(_row(f"app.py --dry-run with the check ({label}; incl. start-up and login)", with_check, "s",
                     "same dry run without a login (check skipped)", without_check, "informational", True))
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_table import bench_parser, markdown

    options = bench_parser(__doc__, REPO / "bench" / "work" / "stage1", "1,000 files, correctness only").parse_args()
    print(markdown(run(options.quick, options.workdir)))
