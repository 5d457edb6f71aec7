"""Write a standard .zip whose members are compressed by ISA-L's Deflate on every core.

The archive (PKWARE APPNOTE 6.3.10): each member's local header and data, then the central
directory and the end record, with ZIP64 fields and end records where a size, an offset or the
member count needs them. Names are UTF-8 (flag bit 11 set when not ASCII); times are the local
DOS date and time of each mtime (2-second steps, 1980-2107). No data descriptors: a member
written in several pieces gets its CRC-32 and sizes written back into its local header after
its last piece, so the output must be a seekable file.

How members are compressed:
- The input is cut into jobs of at most `piece_size` bytes: a run of small files, or one piece
  of a big file. A thread pool reads, checksums and compresses the jobs (ISA-L and zlib release
  the GIL, so every core works) and the results are written in order. At most 2 x threads jobs
  are in flight, each in one of 2 x threads input buffers used again and again, so memory stays
  near 2 x threads x 2 x piece_size plus each thread's encoders (`memory_bound`), whatever the
  size of the files (freed memory is given back to the system every TRIM_EVERY bytes: see
  `note_processed`).
- A big file's pieces make one Deflate stream: each piece is encoded on its own and ends with a
  full flush (its last block ends on a byte boundary, the next piece refers to nothing before
  it), and only the last piece is followed by a final block. Their CRC-32s are combined. The
  seams cost a few bytes per piece.
- Each piece is encoded the cheapest of three ways, judged on a sample of it: ISA-L's Deflate;
  Huffman coding alone (zlib's Z_HUFFMAN_ONLY), which beats LZ77 on sparse counting frames whose
  matches cost more bits than they save; or stored blocks when the sample does not compress
  (data compressed already). A one-piece member that Deflate does not shrink is stored
  (method 0), as 7-Zip does.
"""

from __future__ import annotations

import ctypes
import os
import queue
import stat
import struct
import sys
import threading
import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from isal import ISAL_VERSION, isal_zlib  # noqa: F401 - ISAL_VERSION: for the log

from .errors import FileProblem
from .localfs import read_into
from .units import MIB

# zipfile cannot take member data compressed elsewhere (in pieces, on several threads): hence
# this writer of its own.

STORED, DEFLATED = 0, 8  # compression methods (APPNOTE 4.4.5)
PIECE_SIZE = 4 * MIB  # bytes per job: the unit of parallel work and of memory
ZIP64_LIMIT = 0xFFFFFFFF  # a size or offset this large or larger is written in a ZIP64 field
ZIP64_COUNT_LIMIT = 0xFFFF  # this many members or more need the ZIP64 end record
ISAL_LEVELS = (1, 2, 3)  # ISA-L's levels (its level 0 is larger than 1 at the same speed)
BATCH_MEMBERS = 64  # small members per job: fewer, larger jobs for folders of tiny files
TRIM_EVERY = 256 * MIB  # input bytes between two returns of freed memory to the system
ENCODERS_BYTES = 1 << 20  # a thread's encoders (ISA-L's state is 0.4 MB, zlib's 0.3 MB) and samples

_STORED_BLOCK = 0xFFFF  # most bytes one stored Deflate block holds
_STEP = 256 * 1024  # input bytes per call to an encoder
_SAMPLE = 8 * 1024  # bytes taken from each of three places of a piece to choose its encoding
_INCOMPRESSIBLE = 0.98  # a sample Deflate does not shrink below this share is stored
_HUFFMAN_TRY_BELOW = 0.5  # Huffman alone is tried on samples Deflate shrinks below this share...
_HUFFMAN_MUST_SAVE = 0.93  # ...and chosen when it is this much smaller (it is half as fast)
# An empty final block with fixed Huffman codes (BFINAL 1, BTYPE 01, end-of-block code 256 as
# seven 0 bits; RFC 1951 3.2.3 and 3.2.6): it ends a stream whose pieces all end on a full flush.
_FINAL_BLOCK = b"\x03\x00"
_SYSTEM = 0 if os.name == "nt" else 3  # "version made by": MS-DOS/Windows or UNIX attributes

_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # local file header, APPNOTE 4.3.7
_CENTRAL = struct.Struct("<4sBBHHHHHIIIHHHHHII")  # central directory header, 4.3.12
_END = struct.Struct("<4sHHHHIIH")  # end of central directory record, 4.3.16
_END64 = struct.Struct("<4sQBBHIIQQQQ")  # ZIP64 end of central directory record, 4.3.14
_LOCATOR64 = struct.Struct("<4sIQI")  # ZIP64 end of central directory locator, 4.3.15
_ZIP64_EXTRA = 0x0001  # extra field id of the ZIP64 sizes and offset, 4.5.3


@dataclass(frozen=True)
class Member:
    """One entry of the archive. A file's bytes are read from `path` (`size` bytes: its size when
    it was scanned); a folder's name ends with '/'; other entries (a symlink's target text)
    carry their bytes in `data`. `mtime` is in seconds since the epoch; `mode` is the st_mode
    kept in the external attributes (None: read from the open file)."""

    name: str
    mtime: float
    path: Path | None = None
    size: int = 0
    data: bytes = b""
    mode: int | None = None

    @property
    def length(self) -> int:
        return self.size if self.path is not None else len(self.data)


@dataclass(frozen=True)
class _Part:
    """`length` bytes of a member from `offset` on."""

    member: Member
    offset: int
    length: int

    @property
    def whole(self) -> bool:
        return self.length == self.member.length


@dataclass
class _Encoded:
    """A part as it goes into the archive."""

    chunks: list  # bytes-like objects, in order
    length: int  # their total length
    crc: int  # CRC-32 of the part's own bytes
    method: int  # for a whole member: STORED or DEFLATED
    mode: int | None  # st_mode, read with the member's first part


def memory_bound(threads: int, piece_size: int = PIECE_SIZE) -> int:
    """Most bytes `write_zip` holds at once, whatever the size of the files: the input buffers
    and the encoded output of the jobs in flight, and each thread's encoders."""
    threads = max(1, threads)
    return 2 * threads * (piece_size + stored_length(piece_size)) + threads * ENCODERS_BYTES


def write_zip(sink: BinaryIO, members: Iterable[Member], *, level: int, threads: int,
              progress: Callable[[int], None] | None = None, piece_size: int = PIECE_SIZE) -> int:
    """Write the members, in order, as a whole .zip into `sink` (a new file, opened for binary
    writing, seekable), ending with an end record without a comment. `level` 0 stores every
    member; 1-3 are ISA-L's levels. `threads` compress at once; `progress` is called with the
    number of input bytes done so far. Returns the archive's size in bytes.

    Raises FileProblem when a file is shorter than its `size`, OSError when it cannot be read or
    the archive cannot be written; `sink` then holds an unfinished archive to discard."""
    if level != 0 and level not in ISAL_LEVELS:
        raise ValueError(f"level {level}: 0 (store) or one of ISA-L's levels {ISAL_LEVELS}")
    threads = max(1, threads)
    writer = _Writer(sink, level, piece_size)
    in_flight: deque[tuple[list[_Part], Future]] = deque()
    buffers = _Buffers(2 * threads, piece_size)
    encoders = _Encoders()
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="deflate")
    done = 0
    try:
        jobs = _jobs(members, piece_size)
        while True:
            while len(in_flight) < 2 * threads:
                job = next(jobs, None)
                if job is None:
                    break
                in_flight.append((job, pool.submit(_encode_job, job, level, buffers, encoders)))
            if not in_flight:
                break
            job, future = in_flight.popleft()
            results, buffer = future.result()
            for part, encoded in zip(job, results):
                writer.add(part, encoded)
                done += part.length
            del results  # views of the buffer: gone before it is handed out again
            buffers.put(buffer)
            note_processed(sum(part.length for part in job))
            if progress is not None:
                progress(done)
        writer.finish()
    finally:
        for _, future in in_flight:
            future.cancel()
        pool.shutdown(wait=True)  # the running jobs end within one piece each
    return writer.position


def _jobs(members: Iterable[Member], piece_size: int) -> Iterator[list[_Part]]:
    batch: list[_Part] = []
    batch_bytes = 0
    for member in members:
        length = member.length
        if batch and (length > piece_size or batch_bytes + length > piece_size
                      or len(batch) >= BATCH_MEMBERS):
            yield batch
            batch, batch_bytes = [], 0
        if length > piece_size:
            for offset in range(0, length, piece_size):
                yield [_Part(member, offset, min(piece_size, length - offset))]
            continue
        batch.append(_Part(member, 0, length))
        batch_bytes += length
    if batch:
        yield batch


# --------------------------------------------------------------------------- in the threads


def _load_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _load_malloc_trim()
_processed = [0]  # bytes counted by note_processed since freed memory was last given back
_processed_lock = threading.Lock()


def note_processed(count: int) -> None:
    """Count `count` bytes compressed or inflated (by any thread); every TRIM_EVERY bytes, give
    the memory freed meanwhile back to the system.

    Encoders and decoders return blocks of ever-different sizes up to a few MB, allocated in
    one thread and freed in another; glibc keeps much of that freed memory, and the share it
    kept grew with the size of the input (+60 MB zipping a 4.5 GB file on 2 cores, +100 MB
    testing its archive in a thread). malloc_trim gives the free pages back, so memory stays
    flat whatever the size of the files. Elsewhere than on glibc this does nothing."""
    with _processed_lock:
        _processed[0] += count
        if _processed[0] < TRIM_EVERY:
            return
        _processed[0] = 0
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class _Buffers:
    """Input buffers, one per job in flight, made when first needed and then used again and
    again (fresh ones for every piece would leave more of the C heap fragmented). `get` waits
    while all `count` are in use."""

    def __init__(self, count: int, size: int):
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._unmade = count
        self._size = size
        self._lock = threading.Lock()

    def get(self) -> bytearray:
        with self._lock:
            if self._unmade and self._free.empty():
                self._unmade -= 1
                return bytearray(self._size)
        return self._free.get()

    def put(self, buffer: bytearray) -> None:
        self._free.put(buffer)


class _Encoders(threading.local):
    """Each thread's encoders, used for every piece it encodes: made anew for every piece, their
    state (0.4 MB for ISA-L) would be allocated and freed hundreds of times per GB. A full flush
    after each piece resets an encoder's history, so no piece refers to the bytes of another."""

    def __init__(self):
        self.deflate: dict[int, object] = {}  # ISA-L level -> its encoder
        self.huffman = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS, 9, zlib.Z_HUFFMAN_ONLY)

    def isal(self, level: int):
        if level not in self.deflate:
            self.deflate[level] = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -isal_zlib.MAX_WBITS)
        return self.deflate[level]


def _encode_job(job: list[_Part], level: int, buffers: _Buffers, encoders: _Encoders
                ) -> tuple[list[_Encoded], bytearray]:
    """The job's parts encoded, and the buffer (taken from `buffers`) their views point into:
    the writer gives it back once they are written."""
    buffer = buffers.get()
    try:
        results = []
        start = 0
        for part in job:
            view = memoryview(buffer)[start:start + part.length]
            results.append(_encode_part(part, level, view, encoders))
            start += part.length
        return results, buffer
    except BaseException:
        buffers.put(buffer)
        raise


def _encode_part(part: _Part, level: int, data: memoryview, encoders: _Encoders) -> _Encoded:
    """`data` (as long as the part) receives the part's bytes."""
    member = part.member
    if member.path is None:
        return _Encoded([member.data], len(member.data), isal_zlib.crc32(member.data), STORED, member.mode)
    with open(member.path, "rb") as handle:
        mode = member.mode
        if mode is None and part.offset == 0:
            mode = os.fstat(handle.fileno()).st_mode
        if part.offset:
            handle.seek(part.offset)
        if read_into(handle, data) < len(data):
            raise FileProblem(f"{member.path} became shorter while it was being zipped",
                              paths=[member.path], title="File changed")
    crc = isal_zlib.crc32(data)
    if level == 0 or not part.length:
        return _Encoded([data], part.length, crc, STORED, mode)
    last = part.offset + part.length == member.size
    chunks = _deflate(data, level, last, encoders)
    length = sum(len(chunk) for chunk in chunks)
    if part.whole and length >= part.length:
        return _Encoded([data], part.length, crc, STORED, mode)
    return _Encoded(chunks, length, crc, DEFLATED, mode)


def _deflate(data: memoryview, level: int, last: bool, encoders: _Encoders) -> list:
    """Raw Deflate of `data`, on a byte boundary at both ends and referring to nothing before
    it: a stream's last piece (`last`: it ends with the final block) or one followed by more."""
    way = _cheapest_way(data, level, encoders)
    if way == "stored":
        return _stored_blocks(data, last)
    encoder = encoders.isal(level) if way == "deflate" else encoders.huffman
    chunks = _encoded(encoder, data)
    if last:
        chunks.append(_FINAL_BLOCK)
    if sum(len(chunk) for chunk in chunks) > stored_length(len(data)):
        return _stored_blocks(data, last)
    return chunks


def _encoded(encoder, data) -> list:
    # Fed in steps, the encoder returns blocks of a few hundred kB, not one of several MB; the
    # full flush ends the last block on a byte boundary and resets the history for the next piece.
    chunks = [encoder.compress(data[start:start + _STEP]) for start in range(0, len(data), _STEP)]
    chunks.append(encoder.flush(zlib.Z_FULL_FLUSH))
    return chunks


def _cheapest_way(data: memoryview, level: int, encoders: _Encoders) -> str:
    """'deflate', 'huffman' or 'stored', from trying each on the start, middle and end of `data`."""
    size = len(data)
    if size <= 3 * _SAMPLE:
        sample = data
    else:
        middle = (size - _SAMPLE) // 2
        sample = b"".join((data[:_SAMPLE], data[middle:middle + _SAMPLE], data[size - _SAMPLE:]))
    deflated = sum(len(chunk) for chunk in _encoded(encoders.isal(level), sample))
    if deflated >= _INCOMPRESSIBLE * len(sample):
        return "stored"
    if deflated < _HUFFMAN_TRY_BELOW * len(sample):
        huffman = sum(len(chunk) for chunk in _encoded(encoders.huffman, sample))
        if huffman < _HUFFMAN_MUST_SAVE * deflated:
            return "huffman"
    return "deflate"


def stored_length(size: int) -> int:
    """Bytes of `size` bytes in stored Deflate blocks: 5 bytes of header per 65,535 bytes."""
    return size + 5 * max(1, -(-size // _STORED_BLOCK))


def _stored_blocks(data: memoryview, last: bool) -> list:
    # A piece starts on a byte boundary, so each block header is one byte (BFINAL, BTYPE 00,
    # padding) and LEN, NLEN (APPNOTE refers to RFC 1951 3.2.4). The blocks are views of the
    # piece's buffer: no copy.
    chunks = []
    size = len(data)
    for start in range(0, max(size, 1), _STORED_BLOCK):
        block = data[start:start + _STORED_BLOCK]
        final = last and start + _STORED_BLOCK >= size
        chunks.append(struct.pack("<BHH", 1 if final else 0, len(block), len(block) ^ 0xFFFF))
        chunks.append(block)
    return chunks


# --------------------------------------------------------------------------- in order, in the file


def dos_date_time(seconds: float) -> tuple[int, int]:
    """(DOS time, DOS date) of a time in seconds since the epoch, in local time; a .zip holds no
    date before 1980 or after 2107, so earlier and later times are clamped."""
    try:
        stamp = time.localtime(seconds)[:6]
    except (OverflowError, OSError, ValueError):
        stamp = (1980, 1, 1, 0, 0, 0) if seconds < 0 else (2107, 12, 31, 23, 59, 58)
    if stamp[0] < 1980:
        stamp = (1980, 1, 1, 0, 0, 0)
    elif stamp[0] > 2107:
        stamp = (2107, 12, 31, 23, 59, 58)
    year, month, day, hour, minute, second = stamp
    return (hour << 11) | (minute << 5) | (second // 2), ((year - 1980) << 9) | (month << 5) | day


@dataclass
class _Open:
    """The member being written: what its central directory record needs."""

    name: bytes
    flags: int
    method: int
    time: int
    date: int
    offset: int
    zip64: bool
    mode: int
    system: int
    crc: int = 0
    compressed: int = 0
    size: int = 0


class _Writer:
    """Writes parts in order, then the central directory; keeps one record per member."""

    def __init__(self, sink: BinaryIO, level: int, piece_size: int):
        self.sink, self.level, self.piece_size = sink, level, piece_size
        self.position = 0
        self.records: list[bytes] = []
        self.current: _Open | None = None

    def _write(self, data) -> None:
        self.sink.write(data)
        self.position += len(data)

    def add(self, part: _Part, encoded: _Encoded) -> None:
        if part.offset == 0:
            self._begin(part, encoded)
        entry = self.current
        for chunk in encoded.chunks:
            self._write(chunk)
        entry.crc = isal_zlib.crc32_combine(entry.crc, encoded.crc, part.length) if part.offset else encoded.crc
        entry.compressed += encoded.length
        entry.size += part.length
        if part.offset + part.length == part.member.length:
            if not part.whole:
                self._write_back(entry)
            self.records.append(_central_record(entry))
            self.current = None

    def _begin(self, part: _Part, encoded: _Encoded) -> None:
        member = part.member
        name = member.name.encode("utf-8")
        mode = encoded.mode if encoded.mode is not None else stat.S_IFREG | 0o644
        if part.whole:
            method = encoded.method
            zip64 = max(encoded.length, part.length) >= ZIP64_LIMIT
        else:  # sizes known once the last piece is written; this bounds them
            method = DEFLATED if self.level else STORED
            pieces = -(-member.length // self.piece_size)
            bound = member.length if method == STORED else member.length + 5 * (
                -(-member.length // _STORED_BLOCK) + pieces)
            zip64 = bound >= ZIP64_LIMIT
        dos_time, dos_date = dos_date_time(member.mtime)
        self.current = _Open(name, 0 if name.isascii() else 0x800, method, dos_time, dos_date,
                             self.position, zip64, mode, 3 if stat.S_ISLNK(mode) else _SYSTEM)
        crc, size = (encoded.crc, part.length) if part.whole else (0, 0)
        compressed = encoded.length if part.whole else 0
        self._write(_local_header(self.current, crc, compressed, size))

    def _write_back(self, entry: _Open) -> None:
        self.sink.seek(entry.offset)
        self.sink.write(_local_header(entry, entry.crc, entry.compressed, entry.size))
        self.sink.seek(self.position)

    def finish(self) -> None:
        start = self.position
        for record in self.records:
            self._write(record)
        count, length = len(self.records), self.position - start
        if count >= ZIP64_COUNT_LIMIT or length >= ZIP64_LIMIT or start >= ZIP64_LIMIT:
            end64 = self.position
            self._write(_END64.pack(b"PK\x06\x06", _END64.size - 12, 45, _SYSTEM, 45, 0, 0,
                                    count, count, length, start))
            self._write(_LOCATOR64.pack(b"PK\x06\x07", 0, end64, 1))
        count16 = count if count < ZIP64_COUNT_LIMIT else 0xFFFF
        self._write(_END.pack(b"PK\x05\x06", 0, 0, count16, count16, _clip(length), _clip(start), 0))
        self.sink.flush()


def _clip(value: int) -> int:
    return value if value < ZIP64_LIMIT else 0xFFFFFFFF


def _local_header(entry: _Open, crc: int, compressed: int, size: int) -> bytes:
    extra = b""
    if entry.zip64:  # the local header's ZIP64 field holds both sizes (APPNOTE 4.5.3)
        extra = struct.pack("<HHQQ", _ZIP64_EXTRA, 16, size, compressed)
        compressed = size = 0xFFFFFFFF
    return _LOCAL.pack(b"PK\x03\x04", 45 if entry.zip64 else 20, entry.flags, entry.method,
                       entry.time, entry.date, crc, compressed, size, len(entry.name),
                       len(extra)) + entry.name + extra


def _central_record(entry: _Open) -> bytes:
    values = []
    if entry.zip64:
        values += [entry.size, entry.compressed]
    if entry.offset >= ZIP64_LIMIT:
        values.append(entry.offset)
    extra = struct.pack(f"<HH{len(values)}Q", _ZIP64_EXTRA, 8 * len(values), *values) if values else b""
    size, compressed = (0xFFFFFFFF, 0xFFFFFFFF) if entry.zip64 else (entry.size, entry.compressed)
    attributes = (entry.mode & 0xFFFF) << 16
    if stat.S_ISDIR(entry.mode):
        attributes |= 0x10  # the MS-DOS folder bit
    version = 45 if values else 20
    return _CENTRAL.pack(b"PK\x01\x02", version, entry.system, version, entry.flags, entry.method,
                         entry.time, entry.date, entry.crc, compressed, size, len(entry.name),
                         len(extra), 0, 0, 0, attributes, _clip(entry.offset)) + entry.name + extra
