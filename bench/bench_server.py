"""Benchmark: raw loopback throughput of the Dropbox test server (tests/dropbox_server).

One job: measure how fast the official SDK can push one file into the local test server through
a concurrent upload session (8 threads, 64 MiB appends; 1 GiB in total, 64 MiB with --quick),
against a reference measured in the same run: plain TLS over loopback with the same
certificate (one stream, no HTTP, no hashing, no disk). The figure tells whether the test
server could ever be the bottleneck of the project's own upload benchmarks.

    python bench/bench_server.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import ssl
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.dropbox_server import DropboxTestServer  # noqa: E402
from tests.dropbox_server.tls import ensure_certificate, server_context  # noqa: E402

MiB = 1024 * 1024
BLOCK = 4 * MiB
THREADS = 8
# Target for ratio = server upload MiB/s / raw TLS loopback MiB/s. Per byte, raw TLS costs one
# encryption, one decryption and two kernel copies; the server path adds the SDK's content hash,
# the server's block hashes and the page-cache write, all on the same cores (2 on the build
# machines): about 2.5x the work, so ~0.4 is the ideal and 0.2 means "something regressed".
# At 0.2 the server still runs far above any emulated WAN link used in bench/.
TARGET_RATIO = 0.2


def _chunk(size: int) -> bytes:
    # Incompressible bytes without paying os.urandom for every chunk.
    seed = os.urandom(MiB)
    return (seed * (size // MiB + 1))[:size]


def _expected_hash(chunk: bytes, count: int) -> str:
    digests = [hashlib.sha256(chunk[i:i + BLOCK]).digest() for i in range(0, len(chunk), BLOCK)]
    return hashlib.sha256(b"".join(digests * count)).hexdigest()


def raw_tls_loopback(total: int, cert: Path, key: Path) -> float:
    """MiB/s of one TLS stream over 127.0.0.1, sender and receiver in this process."""
    ctx_server = server_context(cert, key)
    ctx_client = ssl.create_default_context(cafile=str(cert))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received = [0]

    def sink():
        conn, _ = listener.accept()
        with ctx_server.wrap_socket(conn, server_side=True) as tls:
            buf = bytearray(MiB)
            while received[0] < total:
                n = tls.recv_into(buf)
                if not n:
                    break
                received[0] += n

    thread = threading.Thread(target=sink)
    thread.start()
    payload = memoryview(_chunk(MiB))
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with ctx_client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            started = time.perf_counter()
            sent = 0
            while sent < total:
                tls.sendall(payload)
                sent += len(payload)
            thread.join()
            elapsed = time.perf_counter() - started
    listener.close()
    return total / MiB / elapsed


def server_upload(server: DropboxTestServer, chunk: bytes, count: int) -> tuple[float, bool]:
    """MiB/s of one concurrent-session upload: `count` appends of `chunk`, THREADS at a time."""
    from dropbox import files
    client = server.sdk_client(session=server.requests_session(max_connections=THREADS),
                               max_retries_on_error=0)
    size = len(chunk)
    started = time.perf_counter()
    sid = client.files_upload_session_start(
        b"", session_type=files.UploadSessionType.concurrent).session_id

    def append(i: int) -> None:
        # The last append closes the session; send it after the others, as Dropbox asks.
        client.files_upload_session_append_v2(
            chunk, files.UploadSessionCursor(sid, i * size), close=(i == count - 1))

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(append, range(count - 1)))
    append(count - 1)
    meta = client.files_upload_session_finish(
        b"", files.UploadSessionCursor(sid, count * size),
        files.CommitInfo("/bench/upload.bin", mode=files.WriteMode.overwrite))
    elapsed = time.perf_counter() - started
    ok = meta.size == count * size and meta.content_hash == _expected_hash(chunk, count)
    client.close()
    return count * size / MiB / elapsed, ok


def run(quick: bool) -> list[dict]:
    chunk_size = 8 * MiB if quick else 64 * MiB
    count = 8 if quick else 16           # 64 MiB or 1 GiB in total
    total = chunk_size * count
    with tempfile.TemporaryDirectory(prefix="bench-dropbox-server-") as tmp:
        server = DropboxTestServer(Path(tmp) / "server")
        try:
            chunk = _chunk(chunk_size)
            cert, key = ensure_certificate(Path(tmp) / "server" / "tls")
            # These machines are noisy (other jobs share the 2 cores): interleave reference and
            # measurement, and keep the best of each. The full run uploads its 1 GiB once.
            ref_bytes = max(total // 8, 64 * MiB)
            refs, values, ok = [], [], True
            for _ in range(3 if quick else 1):
                refs.append(raw_tls_loopback(ref_bytes, cert, key))
                speed, round_ok = server_upload(server, chunk, count)
                values.append(speed)
                ok = ok and round_ok
            refs.append(raw_tls_loopback(ref_bytes, cert, key))
            value, reference = max(values), max(refs)
        finally:
            server.stop()
    ratio = value / reference
    return [{
        "figure": "test server upload: concurrent session, %d threads x %d MiB appends, %s total%s"
                  % (THREADS, chunk_size // MiB, "%d MiB" % (total // MiB) if quick else "1 GiB",
                     " (best of 3)" if quick else ""),
        "value": round(value, 1), "unit": "MiB/s",
        "reference": round(reference, 1), "reference_figure": "raw TLS loopback, one stream",
        "ratio": round(ratio, 3), "target": TARGET_RATIO,
        "passed": bool(ok and ratio >= TARGET_RATIO),
        "content_hash_ok": ok,
    }]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB instead of 1 GiB (CI smoke)")
    args = parser.parse_args(argv)
    rows = run(args.quick)
    print("%-92s %12s %10s %7s %7s %s" % ("figure", "value", "reference", "ratio", "target",
                                          "passed"))
    for row in rows:
        print("%-92s %6.1f %s %10.1f %7.3f %7.2f %s" % (
            row["figure"], row["value"], row["unit"], row["reference"], row["ratio"],
            row["target"], row["passed"]))
    return 0 if all(row["passed"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
