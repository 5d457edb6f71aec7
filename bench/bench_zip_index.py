"""Benchmark (issue 16): fetch one 10 MB member from a 2 GB zip split into 4 parts in Dropbox,
against downloading the whole archive, both through app.py over HTTPS in the same run.

The archive (210 members of 10 MB: pseudo-random ones stored, every tenth repetitive and
deflated at level 1, as zipfile writes them) is cut into 4 parts as the split tool cuts it
(`<name>_split_000N`, 4 MiB multiples, and `<name>_split_manifest.json`), and the parts and the
manifest are put straight into the local Dropbox test server's store (put_file: no HTTP). Then
the server emulates a WAN link, 50 ms per request and 8 MB/s per connection, and app.py
(sheetName dropboxDownload_API, 4 workers, run as a user runs it, start-up included) fetches:
  - one deflated member (a row with `member`);
  - the stored member whose data crosses a boundary between two parts;
  - the whole archive: its 4 parts, joined and checked against the manifest (joinFlag = 1).
Each fetched file is compared with the original's SHA-256. What a run cost is what the server
saw: its files/download requests and the body bytes it sent (request log). Each member must
cost at most 3 files/download requests beyond its own transfer (ceil(compressed size / 8 MiB)
requests; the manifest's and the table of contents' count as overhead, as does a read split
across two parts) and at most its compressed size + 1 MiB + the table of contents in bytes.
The metadata look-ups app.py makes (finding the parts, the login) are shown, not judged.

Full size: 210 x 10 MB (2.02 GB: the deflated tenth shrinks), each member fetched 3 times
(median), the whole archive once: about 100 s on 2 cores, and 6 GB of scratch disk at the peak
(the server's copy, the downloaded parts, the joined archive). --quick: 30 x 1 MB, each fetched
once, about 6 s (a correctness smoke test; its timings mean nothing).
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "tests", REPO / "bench"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from bench_upload import _app_env  # noqa: E402 - app.py's environment, as the upload benchmark runs it
from conftest import write_xlsx  # noqa: E402
from tests.dropbox_server import DropboxTestServer  # noqa: E402

from archive_dropbox import split, zip_index  # noqa: E402

MB = 1_000_000
MiB = 1024 * 1024
PARTS = 4
DEFLATED_EVERY = 10
WORKERS = 4
LATENCY_S = 0.05
CAP_BPS = 8 * MB  # per connection, as bench_download's full size
FOLDER = "/Lab/2024"
NAME = "session_07.zip"
SHEET = "dropboxDownload_API"


def _content(index: int, member_size: int, noise: bytes) -> bytes:
    """Stored members: the shared random block, made unique by the member's number. Deflated
    ones: half noise, half counting text (compresses to about half, like mixed lab data)."""
    if index % DEFLATED_EVERY == DEFLATED_EVERY // 2:
        text = b"".join(b"frame %08d value %012d\n" % (i, i * 7919 % 1_000_003) for i in range(member_size // 60 + 1))
        return (noise[: member_size // 2] + text)[:member_size]
    return (index.to_bytes(8, "little") + noise[8:])[:member_size]


def _build(path: Path, count: int, member_size: int) -> dict[str, str]:
    """Write the archive; return member name -> SHA-256 of its content."""
    noise = os.urandom(member_size)
    digests = {}
    with zipfile.ZipFile(path, "w", allowZip64=True) as archive:
        for index in range(count):
            content = _content(index, member_size, noise)
            deflated = index % DEFLATED_EVERY == DEFLATED_EVERY // 2
            name = f"session-{index // 10:02d}/frame-{index:04d}.{'txt' if deflated else 'bin'}"
            info = zipfile.ZipInfo(name, (2024, 3, 15, 12, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED if deflated else zipfile.ZIP_STORED
            archive.writestr(info, content, compresslevel=1)
            digests[name] = hashlib.sha256(content).hexdigest()
    return digests


def _plan(size: int) -> list[split.PartPlan]:
    """The split tool's plan for PARTS parts: the part limit a quarter of the archive, rounded up
    to a 4 MiB multiple (the tool rounds larger limits down to one)."""
    limit = math.ceil(size / PARTS)
    if limit >= split.DROPBOX_BLOCK:
        limit = math.ceil(limit / split.DROPBOX_BLOCK) * split.DROPBOX_BLOCK
    plan = split.plan_split(size, limit, NAME)
    assert len(plan) == PARTS, f"{len(plan)} parts"
    return plan


def _seed(server: DropboxTestServer, archive: Path, plan: list[split.PartPlan]) -> str:
    """Put the parts and their manifest into the server's store (no HTTP, nothing logged), as an
    upload with the split tool leaves them; return the archive's SHA-256. One part in memory at
    a time (a quarter of the archive)."""
    when = dt.datetime(2024, 3, 15, 12, 0, 0)
    whole = hashlib.sha256()
    part_hashes = []
    with open(archive, "rb") as handle:
        for part in plan:
            handle.seek(part.offset)
            data = handle.read(part.length)
            assert len(data) == part.length
            whole.update(data)
            part_hashes.append(hashlib.sha256(data).hexdigest())
            server.put_file(f"{FOLDER}/{part.name}", data, client_modified=when)
            del data
    stat = archive.stat()
    manifest = split.build_manifest(NAME, stat.st_size, whole.hexdigest(), stat.st_mtime, plan, part_hashes)
    server.put_file(f"{FOLDER}/{split.manifest_name(NAME)}", manifest.to_bytes(), client_modified=when)
    return whole.hexdigest()


def _straddling(directory: zip_index.Directory, plan: list[split.PartPlan]) -> str:
    """A member whose data crosses a boundary between parts."""
    for member in directory:
        end = member.header_offset + 30 + len(member.raw_name) + member.compressed_size
        if any(member.header_offset < part.offset < end for part in plan[1:]):
            return member.name
    raise RuntimeError("no member crosses a part boundary")


def _app(server: DropboxTestServer, run_dir: Path, row: list) -> dict:
    """app.py with one dropboxDownload_API row, in a fresh logs folder (no journal from an earlier
    run); returns the wall time and what the server saw of it."""
    book = write_xlsx(run_dir / "download.xlsx", {SHEET: [["dropboxPath", "localDir", "joinFlag", "member"], row]})
    command = [sys.executable, str(REPO / "app.py"), "--excelName", str(book), "--sheetName", SHEET, "--logs",
               str(run_dir / "logs"), "--caBundle", server.ca_file, "--workers", str(WORKERS)]
    server.clear_log()
    started = time.perf_counter()
    result = subprocess.run(command, env=_app_env(server), capture_output=True, text=True, encoding="utf-8",
                            stdin=subprocess.DEVNULL, cwd=str(run_dir))
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"app.py failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    calls = server.calls()
    downloads = [c for c in calls if c["route"] == "files/download"]
    # get_metadata answers 409 not_found for the archive's own name (Dropbox holds its parts).
    refused = [c for c in calls if c["status"] not in (200, 206)
               and not (c["route"] == "files/get_metadata" and c["status"] == 409)]
    if refused:
        raise RuntimeError(f"requests that failed or were retried: {refused[:5]}")
    return {"seconds": seconds, "downloads": len(downloads),
            "manifest": sum(1 for c in downloads if (c["path"] or "").endswith(split.MANIFEST_SUFFIX)),
            "bytes": sum(c["bytes_out"] for c in downloads), "routes": collections.Counter(c["route"] for c in calls)}


def _fetch_member(server: DropboxTestServer, run_dir: Path, name: str, expected: str) -> dict:
    restore = run_dir / "restore"
    result = _app(server, run_dir, [f"{FOLDER}/{NAME}", str(restore), 0, name])
    if split.sha256_file(restore / name) != expected:
        raise RuntimeError(f"{name}: the fetched content differs from the original")
    shutil.rmtree(restore)
    return result


def _fetch_whole(server: DropboxTestServer, run_dir: Path, size: int, expected: str) -> dict:
    restore = run_dir / "restore"
    result = _app(server, run_dir, [f"{FOLDER}/{NAME}", str(restore), 1, None])
    joined = restore / NAME
    if joined.stat().st_size != size or split.sha256_file(joined) != expected:
        raise RuntimeError(f"{joined}: the joined archive differs from the original")
    leftover = sorted(p.name for p in restore.iterdir() if p.name != NAME)
    shutil.rmtree(restore)
    if leftover:
        raise RuntimeError(f"left beside the joined archive: {leftover}")
    return result


def _routes(counter: collections.Counter) -> str:
    return ", ".join(f"{route} {count}" for route, count in sorted(counter.items()))


def _row(figure, value, unit, reference, reference_value, ratio, target, passed) -> dict:
    return {"figure": figure, "value": value, "unit": unit, "reference": reference,
            "reference_value": reference_value, "ratio": ratio, "target": target, "passed": bool(passed)}


def _member_rows(label: str, result: dict, member: zip_index.Member, toc_size: int, whole: dict,
                 archive_size: int) -> list[dict]:
    transfer = math.ceil(member.compressed_size / zip_index.CHUNK)
    overhead = result["downloads"] - transfer
    allowed = member.compressed_size + MiB + toc_size
    calls = sum(result["routes"].values())
    return [
        _row(f"{label}: files/download requests beyond the member's own {transfer} (manifest {result['manifest']}, "
             f"table of contents and local header; all requests of the run: {calls} = {_routes(result['routes'])})",
             overhead, "requests", "issue 16", 3, round(overhead / 3, 3), "<= 3", overhead <= 3),
        _row(f"{label}: bytes the server sent (compressed {member.compressed_size:,} B of {member.size:,} B; "
             f"table of contents {toc_size:,} B)", result["bytes"], "B",
             "compressed size + 1 MiB + table of contents", allowed, round(result["bytes"] / allowed, 4), "<= 1",
             result["bytes"] <= allowed),
        _row(f"{label}: bytes the server sent against downloading the whole archive", result["bytes"], "B",
             "whole archive through app.py (4 parts + manifest)", whole["bytes"],
             round(result["bytes"] / whole["bytes"], 5), "informative", whole["bytes"] >= archive_size),
        _row(f"{label}: time, app.py start to finish (start-up, finding the parts, table of contents, fetch, "
             "CRC check, write) [s]", round(result["seconds"], 2), "s",
             "whole archive through app.py, joined and checked (joinFlag = 1)", round(whole["seconds"], 1),
             round(result["seconds"] / whole["seconds"], 4), "informative", True),
    ]


def run(quick: bool, workdir: Path) -> list[dict]:
    count, member_size = (30, 1 * MB) if quick else (210, 10 * MB)
    rounds = 1 if quick else 3
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    folder = Path(workdir) / "zip_index"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        archive = folder / NAME
        started = time.perf_counter()
        digests = _build(archive, count, member_size)
        build_seconds = time.perf_counter() - started
        size = archive.stat().st_size
        plan = _plan(size)
        # The members are chosen from the local archive's table of contents, read as the product
        # reads the parts (a PartedReader over slices of the one file).
        with zip_index.FileReader(archive) as file:
            reader = zip_index.PartedReader.from_sizes(
                [p.length for p in plan], lambda i, offset, length: file.read(plan[i].offset + offset, length), NAME)
            directory = zip_index.read_directory(reader)
        targets = {"deflated member": next(m.name for m in directory if m.method == zip_index.DEFLATED),
                   "stored member across two parts": _straddling(directory, plan)}
        with DropboxTestServer(folder / "server") as server:
            started = time.perf_counter()
            whole_digest = _seed(server, archive, plan)
            seed_seconds = time.perf_counter() - started
            archive.unlink()  # the server holds the parts: 2 GB less on disk
            server.set_faults(latency_s=LATENCY_S, bandwidth_bps=CAP_BPS)
            results: dict[str, list[dict]] = {label: [] for label in targets}
            for index in range(rounds):  # alternated, because shared machines are noisy
                for number, (label, name) in enumerate(targets.items()):
                    results[label].append(_fetch_member(server, folder / f"member-{number}-{index}", name,
                                                        digests[name]))
            whole = _fetch_whole(server, folder / "whole", size, whole_digest)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3

    link = f"{LATENCY_S * 1000:.0f} ms per request, {CAP_BPS / MB:.0f} MB/s per connection"
    label_size = f"{member_size // MB} MB member of a {size / 1e9:.2f} GB zip in {PARTS} parts in Dropbox ({link})"
    rows = []
    for label, runs in results.items():
        median = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        rows += _member_rows(f"{label_size}, {label}", median, directory.find(targets[label]), directory.toc_size,
                             whole, size)
    megabytes = whole["bytes"] / MB
    rows.append(_row(f"reference: the whole archive through app.py, {whole['downloads']} files/download requests, "
                     f"{megabytes:,.0f} MB, joined and checked, {WORKERS} workers ({link}; incl. start-up and join) "
                     "[MB/s]", round(megabytes / whole["seconds"], 1), "MB/s", f"the link's ceiling, {WORKERS} "
                     f"connections x {CAP_BPS / MB:.0f} MB/s", WORKERS * CAP_BPS / MB,
                     round(megabytes / whole["seconds"] / (WORKERS * CAP_BPS / MB), 3), "informative", True))
    rows.append(_row(f"building the {size / 1e9:.2f} GB test archive with zipfile, and putting its parts into the "
                     f"test server ({seed_seconds:.1f} s; not judged) [s]", round(build_seconds, 1), "s", "", None,
                     None, "informative", True))
    rows.append(_row(f"machine load: 1-min load average at the end (at the start {load_start[0]:.2f}; 5-min at the "
                     f"end {load_end[1]:.2f}); other jobs share these cores", round(load_end[0], 2), "load",
                     "CPU cores", os.cpu_count() or 1, None, "info", True))
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_table import bench_parser, markdown

    arguments = bench_parser(__doc__, Path(__file__).resolve().parent / "work", "30 x 1 MB instead of 210 x 10 MB",
                             "scratch folder (needs about 6 GB free)").parse_args()
    print(markdown(run(arguments.quick, arguments.workdir)))
