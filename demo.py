#!/usr/bin/env python3
"""The whole job on built-in sample data, in one command: `python3 demo.py` (Windows: `py demo.py`).
Packages missing on a fresh machine are installed first (pip, requirements.txt).

It generates a small data set (a microscope movie of many small frames, a few ordinary files,
one file above a small size limit), then runs the real scripts on real workbooks written for
the demo: 1_listDirToZip.py finds the movie, 2_zipDir.py zips it, app.py uploads everything
through the Dropbox API and downloads it again (joining split files), joinFiles.py unzips the
movie, and every restored file is compared with the original, byte for byte.

THE UPLOAD GOES TO A LOCAL DROPBOX-COMPATIBLE TEST SERVER started for the occasion (the
project's test infrastructure, tests/dropbox_server), NOT to Dropbox: no account or token is
needed and nothing leaves this computer. For the real thing, see README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
from archive_dropbox.requirements_check import ensure_requirements  # noqa: E402

ensure_requirements(install=True, also=("cryptography",))  # the local test server's TLS

import pandas as pd  # noqa: E402

from archive_dropbox import workbooks  # noqa: E402
from archive_dropbox.sheets import write_workbook  # noqa: E402

SIZE_LIMIT_GB = 0.005  # 5 MB: small, so that the demo shows files being split
FRAMES_PER_SECOND_FOLDER = 150
FRAME_BYTES = 12 * 1024


def say(text: str = "") -> None:
    print(text, flush=True)


def generate(source: Path) -> dict[Path, str]:
    """A lab-like tree; returns SHA-256 of every file, by path relative to `source`."""
    rng = __import__("random").Random(20261124)
    files: dict[Path, bytes] = {}
    movie = Path("session_01") / "Movie_0001"
    for second in range(3):
        for frame in range(FRAMES_PER_SECOND_FOLDER):
            name = movie / "Hour_00" / "Minute_00" / f"Second_{second:02d}" / f"frame_{frame:04d}.tif"
            files[name] = rng.randbytes(FRAME_BYTES)
    files[movie / "movie_settings.xml"] = b"<settings fps='150' camera='OneView'/>\n"
    files[Path("session_01") / "notes" / "experiment log.txt"] = "Sample 7, grid 3, 300 kV — ünïcode ok\n".encode()
    files[Path("session_01") / "notes" / "empty.dat"] = b""
    files[Path("session_01") / "tomogram_big.mrc"] = rng.randbytes(12 * 1024 * 1024 + 4321)
    hashes = {}
    for relative, data in files.items():
        path = source / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        hashes[relative] = hashlib.sha256(data).hexdigest()
    return hashes


def run(step: str, script: str, *args: str, env: dict | None = None) -> None:
    say(f"\n=== {step}: python {script} {' '.join(args)}")
    environment = dict(os.environ, ARCHIVE_DROPBOX_NO_PAUSE="1", PYTHONIOENCODING="utf-8")
    environment.update(env or {})
    result = subprocess.run([sys.executable, str(REPO / script), *args], env=environment,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        say(f"\nThe step '{step}' failed (exit status {result.returncode}); see the messages above.")
        raise SystemExit(result.returncode)


def tree_hashes(root: Path) -> dict[Path, str]:
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "sample_data",
                        help="where the sample data, workbooks and test server live (default: sample_data/)")
    parser.add_argument("--logs", type=Path, default=None, help="logs folder (default: logs/demo/, apart from real jobs)")
    args = parser.parse_args(argv)
    work = args.workdir.resolve()
    # Its own logs and journal: a demo must never touch the journal of a real job (nor be refused
    # while one runs).
    logs_root = args.logs.resolve() if args.logs else REPO / "logs" / "demo"
    log_flags = ["--logs", str(logs_root)]

    say(__doc__.split("\n\n")[2])
    if work.exists():
        shutil.rmtree(work)
    if args.logs is None:
        # Its test server (in sample_data, just removed) starts over with a new account, so the
        # journal of the last demo describes an account that is gone: the demo starts its own over
        # too (never a journal given with --logs).
        for name in ("journal.sqlite3", "journal.sqlite3-wal", "journal.sqlite3-shm"):
            (logs_root / name).unlink(missing_ok=True)
    demo_started = time.time()
    source = work / "microscope"
    originals = generate(source)
    say(f"\nSample data: {len(originals)} files in {source}")

    # 1. Which folders should be zipped?
    zip_book = write_workbook(work / "zipDir.xlsx", workbooks.zip_dir_tabs(list_rows=[[str(source)]], zip_rows=[]))
    run("Step 1, find folders to zip", "preProcess/1_listDirToZip.py", "--excelName", str(zip_book),
        "--output-dir", str(work), "--minFiles", "100", "--fileSizeLimit_GB", "0.01", *log_flags)
    candidates = pd.read_excel(work / "directoryZipList.xlsx", dtype=object)

    # 2. Zip them (deleteFlag=1: the frames go once the archive is verified).
    zip_rows = [[row["inputDir"], 1] for _, row in candidates.iterrows()]
    write_workbook(zip_book, workbooks.zip_dir_tabs(list_rows=[[str(source)]], zip_rows=zip_rows))
    run("Step 2, zip them", "preProcess/2_zipDir.py", "--excelName", str(zip_book), *log_flags)

    # 3. Upload through the API to the local test server, then download again.
    from tests.dropbox_server import DropboxTestServer

    restored = work / "restored"
    inputs = write_workbook(work / "inputs.xlsx", workbooks.inputs_tabs(
        api_rows=[[str(source), "/Lab/microscope", 0]],
        download_rows=[["/Lab/microscope", str(restored), 1]],
        join_rows=[[str(restored / "microscope" / "session_01" / "Movie_0001.zip"), 0, 1]]))
    with DropboxTestServer(work / "local_test_server") as server:
        say(f"\nLocal Dropbox-compatible TEST server (not Dropbox) listening on {server.url}")
        env = server.client_env(credentials=True)
        common = ["--excelName", str(inputs), "--caBundle", server.ca_file, "--fileSizeLimit_GB",
                  str(SIZE_LIMIT_GB), "--chunkSize_MB", "4", "--sleepTime_min", "0.05", *log_flags]
        run("Step 3, upload through the Dropbox API", "app.py", "--sheet", "dropboxUpload_API", *common, env=env)
        say(f"\nIn the test server now: {len(server.files())} files, "
            f"{sum(1 for p in server.files() if '_split_' in p)} of them parts or manifests of split files.")
        run("Step 4, download it again", "app.py", "--sheet", "dropboxDownload_API", *common, env=env)

    # 5. Unzip the movie (joinFiles.py with unzipFlag=1) and compare everything.
    run("Step 5, join and unzip", "joinFiles.py", "--excelName", str(inputs), *log_flags)
    restored_root = restored / "microscope"
    back = tree_hashes(restored_root)
    missing = sorted(str(p) for p in originals if p not in back)
    different = sorted(str(p) for p, digest in originals.items() if p in back and back[p] != digest)
    say("\n=== Result")
    if missing or different:
        say(f"NOT identical: {len(missing)} missing, {len(different)} different: {(missing + different)[:10]}")
        return 1
    say(f"All {len(originals)} original files came back identical (SHA-256), in {restored_root}.")
    say("Logs of every stage (named by date and time):")
    for folder in ("preProcess", "dataPrep", "upload"):
        this_run = sorted(p for p in (logs_root / folder).glob("*.log") if p.stat().st_mtime >= demo_started)
        say(f"  {logs_root / folder}: " + ", ".join(p.name for p in this_run))
    say("Reminder: this ran against a local test server, not Dropbox. See README.md to use your account.")
    return 0


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    say(f"(demo took {time.monotonic() - started:.0f} s)")
    sys.exit(code)
