"""Benchmark of the download stage (app.py with sheetName = 'dropboxDownload_API') over an
emulated WAN link: the local Dropbox test server caps every connection's bandwidth and adds
latency to every request, as a university link to Dropbox does.

Figures, each against a reference measured in the same run:
  - our download (several files at once, verified, resumable) vs the same files fetched one at a
    time with the SDK's own `files_download_to_file` (no verification, no resume);
  - the same against the link's ceiling (workers x the per-connection cap);
  - a rerun of the finished job vs the first run (the journal makes it quick).
Times of app.py include its Python start-up (about 1.5 s), as a user sees them.

    python bench/bench_download.py --quick     # ~17 MB, correctness smoke test (CI)
    python bench/bench_download.py             # ~400 MB
"""

from __future__ import annotations

import datetime as dt
import hashlib
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

MiB = 1024 * 1024
WORKERS = 4
LATENCY_S = 0.05
TARGET_VS_ONE_AT_A_TIME = 2.5   # 4 connections against 1 on a per-connection-capped link
TARGET_VS_CEILING = 0.7
TARGET_RERUN = 0.3
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def _row(figure, value, unit, reference, reference_value, target, passed) -> dict:
    ratio = value / reference_value if reference_value else float("nan")
    return {"figure": figure, "value": round(value, 3), "unit": unit, "reference": reference,
            "reference_value": round(reference_value, 3), "ratio": round(ratio, 3),
            "target": target, "passed": bool(passed)}


def _dataset(quick: bool) -> dict[str, int]:
    if quick:
        sizes = {f"/Bench/run1/frames_{i:02d}.tif": 1 * MiB for i in range(8)}
        sizes["/Bench/run1/movie.mrc"] = 8 * MiB
    else:
        sizes = {f"/Bench/run1/frames_{i:02d}.tif": 8 * MiB for i in range(32)}
        sizes.update({"/Bench/run1/movie_a.mrc": 64 * MiB, "/Bench/run1/movie_b.mrc": 64 * MiB})
    return sizes


def _env(server: DropboxTestServer) -> dict[str, str]:
    env = dict(os.environ)
    env.update(server.client_env(credentials=True))
    bundle = SYSTEM_BUNDLE
    if not Path(bundle).exists():
        import certifi

        bundle = certifi.where()
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        env[name] = bundle
    env["ARCHIVE_DROPBOX_NO_PAUSE"] = "1"
    return env


def _ours(server: DropboxTestServer, book: Path, logs: Path) -> float:
    command = [sys.executable, str(REPO / "app.py"), "--excelName", str(book), "--sheetName",
               "dropboxDownload_API", "--logs", str(logs), "--caBundle", server.ca_file, "--workers", str(WORKERS)]
    started = time.perf_counter()
    result = subprocess.run(command, env=_env(server), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"app.py failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return seconds


def _one_at_a_time(server: DropboxTestServer, paths: list[str], folder: Path) -> float:
    client = server.sdk_client()
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for path in paths:
        client.files_download_to_file(str(folder / path.rsplit("/", 1)[1]), path)
    return time.perf_counter() - started


def _same_files(expected: dict[str, str], folder: Path) -> bool:
    for path, digest in expected.items():
        local = folder / path.rsplit("/", 1)[1]
        if not local.is_file() or hashlib.sha256(local.read_bytes()).hexdigest() != digest:
            return False
    return True


def run(quick: bool, workdir: Path) -> list[dict]:
    workdir = Path(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    sizes = _dataset(quick)
    total = sum(sizes.values())
    cap = 12_000_000 if quick else 8_000_000  # quick: at 4 MB/s the one-at-a-time reference alone took 6 s
    rows: list[dict] = []
    with DropboxTestServer(workdir / "server") as server:
        expected = {}
        for index, (path, size) in enumerate(sorted(sizes.items())):
            data = os.urandom(size)
            expected[path] = hashlib.sha256(data).hexdigest()
            server.put_file(path, data, client_modified=dt.datetime(2023, 1, 1, 0, 0, index))
        server.set_faults(bandwidth_bps=cap, latency_s=LATENCY_S)

        reference = _one_at_a_time(server, sorted(sizes), workdir / "reference")
        reference_correct = _same_files(expected, workdir / "reference")
        restore = workdir / "restore"
        book = write_xlsx(workdir / "download.xlsx", {"dropboxDownload_API": [
            ["dropboxPath", "localDir", "joinFlag"], ["/Bench/run1", str(restore), 0]]})
        first = _ours(server, book, workdir / "logs")
        correct = reference_correct and _same_files(expected, restore / "run1")
        server.clear_log()
        rerun = _ours(server, book, workdir / "logs")
        rerun_quiet = server.count_calls("files/download") == 0

    megabytes = total / 1e6
    ours_speed, reference_speed = megabytes / first, megabytes / reference
    ceiling = WORKERS * cap / 1e6
    link = f"{cap / 1e6:.0f} MB/s per connection, {LATENCY_S * 1000:.0f} ms latency"
    # Quick runs only check correctness: start-up dominates so little data.
    scope = " (checked at full size)" if quick else ""
    rows.append(_row(f"download {len(sizes)} files, {megabytes:.0f} MB, {WORKERS} workers ({link}; incl. start-up)",
                     ours_speed, "MB/s", "same files one at a time with the SDK's files_download_to_file",
                     reference_speed, f">= {TARGET_VS_ONE_AT_A_TIME}x{scope}",
                     correct and (quick or ours_speed / reference_speed >= TARGET_VS_ONE_AT_A_TIME)))
    rows.append(_row("same download against the link's ceiling", ours_speed, "MB/s",
                     f"{WORKERS} connections x {cap / 1e6:.0f} MB/s", ceiling, f">= {TARGET_VS_CEILING}x{scope}",
                     correct and (quick or ours_speed / ceiling >= TARGET_VS_CEILING)))
    rows.append(_row("rerun of the finished job (journal; nothing downloaded)", rerun, "s", "first run", first,
                     f"<= {TARGET_RERUN}x{scope}", rerun_quiet and (quick or rerun / first <= TARGET_RERUN)))
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_table import bench_parser, markdown

    options = bench_parser(__doc__, REPO / "bench" / "work" / "download", "small data, correctness only").parse_args()
    print(markdown(run(options.quick, options.workdir)))
