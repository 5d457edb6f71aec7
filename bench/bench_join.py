"""Benchmark: joining a split file (find parts, copy, check every part's SHA-256 against the
manifest, fsync, rename) against `cat part* > out` measured in the same run on the same parts;
and, for information, splitting (write_parts) against coreutils `split`.

Full size: a 4 GiB file in 8 parts; --quick: 64 MiB in 8 parts (a correctness smoke test).
Two references are reported: plain `cat` (which leaves the data in the page cache, unflushed)
and `cat` followed by `sync out` (the same durability as the join, which flushes to disk before
renaming). Rounds alternate the contenders and the median is kept, because shared build
machines are noisy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from archive_dropbox import joining, split  # noqa: E402
from tests import split_helpers  # noqa: E402 - test-only helpers (write_parts)

MiB = 1024 * 1024
TARGET = 1.1


def _quiet_log() -> logging.Logger:
    log = logging.getLogger("bench_join")
    log.handlers[:] = [logging.NullHandler()]
    log.propagate = False
    return log


def _make_parts(folder: Path, size: int, count: int) -> tuple[list[Path], str, float, float]:
    """Write a file of pseudo-random bytes (a random block, varied by a counter so no two blocks
    are equal), split it the way the upload stages do (timed, against `split -b` + sync), and
    delete the original. Returns the parts, the file's SHA-256 and the two split times."""
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "original.bin"
    block = os.urandom(8 * MiB)
    digest = hashlib.sha256()
    with open(source, "wb") as handle:
        written = 0
        while written < size:
            chunk = (written // len(block)).to_bytes(8, "little") + block[8:]
            chunk = chunk[: size - written]
            handle.write(chunk)
            digest.update(chunk)
            written += len(chunk)
    plan = split.plan_split(size, -(-size // count), "data.bin")
    reference_folder = folder / "coreutils-split"
    reference_folder.mkdir()
    _flush_caches_of_earlier_rounds()
    started = time.perf_counter()
    subprocess.run(["sh", "-c", 'split -b "$1" -a 4 -d "$2" "$3" && sync "$3"*', "sh", str(plan[0].length),
                    str(source), str(reference_folder / "part_")], check=True)
    reference_seconds = time.perf_counter() - started
    shutil.rmtree(reference_folder)
    _flush_caches_of_earlier_rounds()
    started = time.perf_counter()
    manifest = split_helpers.write_parts(source, folder, plan, name="data.bin")
    split_seconds = time.perf_counter() - started
    source.unlink()
    if manifest.sha256 != digest.hexdigest():
        raise RuntimeError("the split manifest does not describe the file that was split")
    return [folder / p.name for p in plan], manifest.sha256, split_seconds, reference_seconds


def _flush_caches_of_earlier_rounds() -> None:
    # Dirty pages left by the previous contender would otherwise be written during the next one.
    if hasattr(os, "sync"):
        os.sync()


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _time_cat(parts: list[Path], out: Path, with_sync: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of cat [+ sync]."""
    command = 'cat "$@" > "$OUT"' + (' && sync "$OUT"' if with_sync else "")
    _flush_caches_of_earlier_rounds()
    cpu = _cpu_seconds(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(["sh", "-c", command, "sh", *map(str, parts)], env={**os.environ, "OUT": str(out)},
                   check=True)
    elapsed = time.perf_counter() - started
    cpu = _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu
    out.unlink()
    return elapsed, cpu


def _time_join(parts: list[Path], expected_sha256: str, log: logging.Logger) -> tuple[float, float]:
    """(wall seconds, CPU seconds of every thread) of a verified join."""
    joined = parts[0].parent / "data.bin"
    _flush_caches_of_earlier_rounds()
    cpu = _cpu_seconds(resource.RUSAGE_SELF)
    started = time.perf_counter()
    outcome = joining.join_split_file(parts[0], log=log)
    elapsed = time.perf_counter() - started
    cpu = _cpu_seconds(resource.RUSAGE_SELF) - cpu
    if outcome.action != "joined" or not outcome.verified or joined.stat().st_size != outcome.size:
        raise RuntimeError(f"the join did not complete as expected: {outcome}")
    if split.sha256_file(joined) != expected_sha256:
        raise RuntimeError("the joined file differs from the original")
    joined.unlink()
    return elapsed, cpu


def _time_hash_only(parts: list[Path]) -> float:
    """SHA-256 of the same bytes on one core, from the page cache: what checking one whole-file
    SHA-256 costs at the least (the join checks the parts' SHA-256s on all cores instead)."""
    started = time.perf_counter()
    for part in parts:
        split.sha256_file(part)
    return time.perf_counter() - started


def run(quick: bool, workdir: Path) -> list[dict]:
    size = 64 * MiB if quick else 4 * 1024 * MiB
    count = 8
    rounds = 1 if quick else 5  # the page cache makes plain `cat` vary from run to run
    folder = Path(workdir) / "join"
    if folder.exists():
        shutil.rmtree(folder)
    if not all(shutil.which(tool) for tool in ("cat", "sh", "split", "sync")):
        raise RuntimeError("this benchmark needs cat, sh, split and sync (Linux or macOS)")
    log = _quiet_log()
    try:
        parts, digest, split_seconds, split_reference = _make_parts(folder, size, count)
        times: dict[str, list[float]] = {"join": [], "cat": [], "cat+sync": [], "sha256": []}
        cpu: dict[str, list[float]] = {"join": [], "cat+sync": []}
        for _ in range(rounds):
            times["cat"].append(_time_cat(parts, folder / "cat.out", with_sync=False)[0])
            for name, (wall, used) in (("join", _time_join(parts, digest, log)),
                                       ("cat+sync", _time_cat(parts, folder / "cat.out", with_sync=True))):
                times[name].append(wall)
                cpu[name].append(used)
            times["sha256"].append(_time_hash_only(parts))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    ours = statistics.median(times["join"])
    label = f"{size // MiB:,} MiB" if size < 1024 * MiB else f"{size // (1024 * MiB)} GiB"
    rows = []
    for reference, name in (("cat+sync", "cat part* > out; sync out"), ("cat", "cat part* > out")):
        theirs = statistics.median(times[reference])
        ratio = ours / theirs
        rows.append({
            "figure": f"join {label} in {count} parts (per-part SHA-256 verified, fsync) [s, median of {rounds}]",
            "value": round(ours, 3), "unit": "s", "reference": name,
            "reference_value": round(theirs, 3), "ratio": round(ratio, 3),
            "target": f"<= {TARGET}", "passed": ratio <= TARGET,
        })
    floor = statistics.median(times["sha256"])
    rows.append({
        "figure": f"join {label} against one whole-file SHA-256 of the same bytes on one core [s]",
        "value": round(ours, 3), "unit": "s", "reference": "sha256 of the parts (page cache)",
        "reference_value": round(floor, 3), "ratio": round(ours / floor, 3),
        "target": "informative", "passed": True,
    })
    ours_cpu, theirs_cpu = statistics.median(cpu["join"]), statistics.median(cpu["cat+sync"])
    rows.append({
        "figure": f"join {label}: CPU time, all threads (what a busy machine makes you wait for) [s]",
        "value": round(ours_cpu, 3), "unit": "s CPU", "reference": "cat part* > out; sync out",
        "reference_value": round(theirs_cpu, 3), "ratio": round(ours_cpu / max(theirs_cpu, 1e-9), 3),
        "target": "informative", "passed": True,
    })
    rows.append({
        "figure": f"split {label} into {count} parts + manifest (whole and per-part SHA-256, fsync) [s, 1 run]",
        "value": round(split_seconds, 3), "unit": "s", "reference": "split -b N; sync parts",
        "reference_value": round(split_reference, 3), "ratio": round(split_seconds / split_reference, 3),
        "target": "informative", "passed": True,
    })
    rows.append({
        "figure": f"join {label} throughput", "value": round(size / ours / 1e6, 1), "unit": "MB/s",
        "reference": "cat part* > out; sync out",
        "reference_value": round(size / statistics.median(times["cat+sync"]) / 1e6, 1),
        "ratio": round(statistics.median(times["cat+sync"]) / ours, 3),
        "target": "informative", "passed": True,
    })
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_table import bench_parser, markdown

    arguments = bench_parser(__doc__, Path(__file__).resolve().parent / "work", "64 MiB instead of 4 GiB (smoke test)",
                             "scratch folder (needs about 3x the file size free)").parse_args()
    print(markdown(run(arguments.quick, arguments.workdir)))
