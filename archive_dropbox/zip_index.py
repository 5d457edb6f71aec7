"""A zip archive's table of contents, and one member's bytes, read through a few byte ranges.

Works on any `RangeReader` (a byte string of known size read by (offset, length) requests):
a local file, or an archive in Dropbox, possibly split into `_split_NNNN` parts, read with HTTP
Range requests. Reading the table of contents costs one request for the archive's last 65,633
bytes, plus one for the central directory when it does not fit in them; one member then costs
its local header and its data, fetched together in as few requests as the chunk size allows.

The format, as PKWARE's APPNOTE.TXT (version 6.3.10) defines it:
- 4.3.6 the layout: local header + data for each member, then the central directory, then
  (ZIP64 only) the ZIP64 end record and its locator, then the end record and the comment;
- 4.3.7 local file header; 4.3.12 central directory header; 4.3.13 digital signature;
- 4.3.14 ZIP64 end of central directory record; 4.3.15 its locator; 4.3.16 end of central
  directory record (at most 22 + 65,535 bytes of comment from the end);
- 4.4.2 version made by (its upper byte: the creator's system); 4.4.4 general purpose flags:
  bit 0 encrypted, bit 11 names in UTF-8 (Appendix D; otherwise IBM code page 437); 4.4.5
  compression methods; 4.4.6 MS-DOS date and time (local time); 4.4.15 external attributes;
- 4.5.1-4.5.2 extra fields; 4.5.3 ZIP64 extended information (0x0001): 8-byte values for
  exactly those of uncompressed size, compressed size, local header offset (and 4-byte disk
  number) whose 32-bit fields are 0xFFFFFFFF, in that order; 4.5.5 NTFS times (0x000a);
- 4.6.1 third-party fields: 0x5455 extended timestamp (layout in Info-ZIP's extrafld.txt);
  4.6.9 Info-ZIP Unicode Path (0x7075).

Member names are returned exactly as recorded (decoded): callers check them before using them
as paths. Errors: DamagedArchive when the bytes are not a consistent zip (the message names the
archive and the member), UnsupportedArchive for spanned archives and for members encrypted or
compressed other than stored/Deflate. Knows nothing of Dropbox.
"""

from __future__ import annotations

import os
import stat
import struct
import time
import zlib
from bisect import bisect_right
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

try:
    from isal import isal_zlib as _zlib  # ISA-L inflates and computes CRC-32 about twice as fast
except ImportError:  # python-isal is optional here: zlib gives the same results
    _zlib = zlib

from .errors import FileProblem
from .units import MIB

# zipfile needs a seekable file object, reads the whole directory through it and cannot stream a
# member from a few byte ranges: this parser works on any range reader, e.g. one over HTTP.

STORED, DEFLATED = 0, 8  # the compression methods this module extracts (APPNOTE 4.4.5)
CHUNK = 8 * MIB  # bytes per ranged request when fetching a member

_LOCAL = struct.Struct("<I5H3I2H")  # local file header, 4.3.7 (30 bytes)
_CENTRAL = struct.Struct("<I6H3I5H2I")  # central directory header, 4.3.12 (46 bytes)
_END = struct.Struct("<I4H2IH")  # end of central directory record, 4.3.16 (22 bytes)
_END64 = struct.Struct("<IQ2H2I4Q")  # ZIP64 end of central directory record, 4.3.14 (56 bytes)
_LOCATOR64 = struct.Struct("<IIQI")  # ZIP64 end of central directory locator, 4.3.15 (20 bytes)
_LOCAL_SIG, _CENTRAL_SIG, _END_SIG = 0x04034B50, 0x02014B50, 0x06054B50
_END64_SIG, _LOCATOR64_SIG = 0x06064B50, 0x07064B50
_END_SIG_BYTES = b"PK\x05\x06"
_SIGNATURE_SIG_BYTES = b"PK\x05\x05"  # digital signature, 4.3.13: may close the central directory
_MAX_COMMENT = 0xFFFF
# The end record with the longest comment, the ZIP64 locator and the ZIP64 end record: one
# request for this many bytes from the end finds every end record.
TAIL = _END.size + _MAX_COMMENT + _LOCATOR64.size + _END64.size

_ZIP64_EXTRA, _NTFS_EXTRA, _TIMESTAMP_EXTRA, _UNICODE_PATH_EXTRA = 0x0001, 0x000A, 0x5455, 0x7075
_FLAG_ENCRYPTED, _FLAG_UTF8 = 0x0001, 0x0800
_UNIX = 3  # "version made by" upper byte of archives made on UNIX (4.4.2): st_mode in attributes
_NTFS_EPOCH_OFFSET = 11_644_473_600  # seconds from 1601-01-01 to 1970-01-01 (NTFS times count from 1601)
# Extra-field bytes read together with a local header: writers put a few dozen at most, so a
# second request for the rest of a longer extra field is rare.
_LOCAL_SLACK = 1024
_INFLATE_OUT = 4 * MIB  # at most this many bytes come out of one inflate call (memory bound)
_INFLATE_ERRORS = (zlib.error, getattr(_zlib, "error", zlib.error))
_METHOD_NAMES = {1: "Shrink", 6: "Implode", 9: "Deflate64", 12: "bzip2", 14: "LZMA", 93: "Zstandard",
                 95: "XZ", 96: "JPEG", 97: "WavPack", 98: "PPMd", 99: "AES encryption"}


class DamagedArchive(FileProblem):
    """The archive's bytes are not a consistent zip, or a member's bytes do not match its table
    of contents: the archive is damaged, truncated, or was changed (a part replaced)."""

    title = "Damaged archive"


class UnsupportedArchive(FileProblem):
    """A spanned (multi-disk) archive, or a member encrypted or compressed other than by
    stored/Deflate: the whole archive has to be downloaded and opened with 7-Zip."""

    title = "Cannot read from the archive"


# ----------------------------------------------------------------------------- readers


class RangeReader(Protocol):
    """A byte string of `size` bytes read by ranges; `name` names it in messages."""

    name: str
    size: int

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes from `offset` (0 <= offset, offset + length <= size)."""
        ...


ReadFunction = Callable[[int, int], bytes]  # (offset, length) -> exactly `length` bytes


def _check_range(reader: Any, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > reader.size:
        raise ValueError(f"range {offset:,}+{length:,} is outside the {reader.size:,} bytes of {reader.name}")


class PartedReader:
    """The archive as the concatenation of its parts, in order (the split tool's parts are
    plain byte slices of the original): a range crossing part boundaries becomes one call per
    part it touches. `parts` is [(part size in bytes, read function of that part)].

    Counters: `reads` (calls of `read`), `requests` (calls of the parts' read functions: the
    HTTP requests when the parts are in Dropbox), `bytes_read`. A part returning another number
    of bytes than asked raises DamagedArchive (it is not the part the sizes describe)."""

    def __init__(self, parts: Sequence[tuple[int, ReadFunction]], name: str = "archive",
                 labels: Sequence[str] | None = None):
        self.name = name
        self._sizes = [int(size) for size, _ in parts]
        if any(size < 0 for size in self._sizes):
            raise ValueError("a part cannot have a negative size")
        self._functions = [function for _, function in parts]
        self._labels = list(labels) if labels is not None else [f"part {i}" for i in range(1, len(parts) + 1)]
        self._starts = []
        offset = 0
        for size in self._sizes:
            self._starts.append(offset)
            offset += size
        self.size = offset
        self.reads = self.requests = self.bytes_read = 0

    @classmethod
    def from_sizes(cls, sizes: Sequence[int], read_part: Callable[[int, int, int], bytes],
                   name: str = "archive") -> "PartedReader":
        """Parts of the given sizes; `read_part(index, offset, length)` reads part `index`
        (0-based) from `offset` within that part."""
        return cls([(size, _bound(read_part, index)) for index, size in enumerate(sizes)], name)

    @classmethod
    def from_manifest(cls, manifest: Any, read_part: Callable[[Any, int, int], bytes],
                      name: str | None = None) -> "PartedReader":
        """The parts a split manifest lists (anything with `.parts`, each with `.name` and
        `.size`, like split.Manifest); `read_part(part, offset, length)` reads from one of
        them. `name` defaults to the manifest's `original_name`."""
        parts = list(manifest.parts)
        return cls([(part.size, _bound(read_part, part)) for part in parts],
                   name if name is not None else getattr(manifest, "original_name", "archive"),
                   labels=[part.name for part in parts])

    def read(self, offset: int, length: int) -> bytes:
        _check_range(self, offset, length)
        if length == 0:
            return b""
        self.reads += 1
        index = bisect_right(self._starts, offset) - 1  # the last part starting at or before offset
        pieces = []
        while length > 0:
            inside = offset - self._starts[index]
            count = min(length, self._sizes[index] - inside)
            if count > 0:
                data = self._functions[index](inside, count)
                self.requests += 1
                self.bytes_read += len(data)
                if len(data) != count:
                    raise DamagedArchive(
                        f"{self._labels[index]} of archive {self.name} gave {len(data):,} bytes from its byte "
                        f"{inside:,} where {count:,} were asked: it is not the size its manifest says "
                        "(it was changed or replaced).", paths=[self.name])
                pieces.append(data)
                offset += count
                length -= count
            index += 1
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _bound(read_part: Callable[[Any, int, int], bytes], key: Any) -> ReadFunction:
    return lambda offset, length: read_part(key, offset, length)


class FileReader:
    """A local file as a RangeReader (one seek and read per request); counters as PartedReader.
    Raises DamagedArchive when the file turns out shorter than when it was opened."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.name = str(path)
        self._handle = open(self.path, "rb", buffering=0)
        self.size = os.fstat(self._handle.fileno()).st_size
        self.reads = self.requests = self.bytes_read = 0

    def read(self, offset: int, length: int) -> bytes:
        _check_range(self, offset, length)
        if length == 0:
            return b""
        self.reads += 1
        self.requests += 1
        self._handle.seek(offset)
        data = self._handle.read(length)
        while len(data) < length:
            more = self._handle.read(length - len(data))
            if not more:
                raise DamagedArchive(f"{self.path} ended at byte {offset + len(data):,} although it had "
                                     f"{self.size:,} bytes when it was opened: it changed meanwhile.",
                                     paths=[self.path])
            data += more
        self.bytes_read += length
        return data

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "FileReader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- table of contents


@dataclass(frozen=True)
class Member:
    """One entry of the central directory. Sizes in bytes; `header_offset` is where its local
    header starts in the reader's byte string and `toc_offset` where the central directory does
    (its data must end before). `date_time` is the MS-DOS time (local, naive, 2-second steps; None
    when invalid); `exact_mtime_ns` the UTC time in ns from an NTFS or extended-timestamp field.
    `unsupported` says why it cannot be extracted, None when it can."""

    archive: str
    name: str
    raw_name: bytes
    method: int
    flags: int
    crc32: int
    compressed_size: int
    size: int
    header_offset: int
    toc_offset: int
    date_time: datetime | None
    exact_mtime_ns: int | None
    external_attr: int
    creator_system: int
    unsupported: str | None

    @property
    def is_dir(self) -> bool:
        return self.name.endswith("/")

    @property
    def mtime(self) -> float | None:
        """Modification time in seconds since the epoch: the exact UTC time when recorded, else
        the MS-DOS time read as local time; None when neither is usable."""
        if self.exact_mtime_ns is not None:
            return self.exact_mtime_ns / 1e9
        if self.date_time is None:
            return None
        try:
            return time.mktime(self.date_time.timetuple())
        except (OverflowError, ValueError):
            return None

    @property
    def mode(self) -> int | None:
        """The UNIX st_mode kept in the external attributes (archives made on UNIX), else None."""
        if self.creator_system != _UNIX or not self.external_attr >> 16:
            return None
        return self.external_attr >> 16

    @property
    def is_symlink(self) -> bool:
        mode = self.mode
        return mode is not None and stat.S_ISLNK(mode)


@dataclass(frozen=True)
class Directory:
    """An archive's table of contents. `toc_offset` and `toc_size`: where the central directory
    starts and how many bytes it and the end records take (to the end of the archive)."""

    archive: str
    size: int
    members: tuple[Member, ...]
    comment: bytes
    toc_offset: int
    toc_size: int
    zip64: bool
    _by_name: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for member in self.members:  # the last of two equal names wins, as when unzipping
            self._by_name[member.name] = member

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[Member]:
        return iter(self.members)

    def find(self, name: str) -> Member | None:
        return self._by_name.get(name)


def _damaged(archive: str, reason: str) -> DamagedArchive:
    return DamagedArchive(f"archive {archive}: {reason}: the archive is damaged, truncated or was changed.",
                          paths=[archive])


def read_directory(reader: RangeReader) -> Directory:
    """Read and check the table of contents: one request for the last `TAIL` bytes, one more
    for the central directory only when it starts before them (and one for a ZIP64 end record
    placed unusually far from the end). Bytes before the archive proper (a self-extractor's stub)
    are allowed, as zipfile and 7-Zip allow them.

    Raises DamagedArchive when the end records are missing (truncated, a tail appended, not a
    zip) or when an entry's sizes or offsets fall outside the archive; UnsupportedArchive for a
    spanned archive."""
    archive, size = reader.name, reader.size
    if size < _END.size:
        raise _damaged(archive, f"it has only {size} bytes, fewer than any zip")
    tail_start = size - min(size, TAIL)
    tail = reader.read(tail_start, size - tail_start)
    end_at = _find_end(tail, archive)
    _, disk, toc_disk, _, count, toc_size, toc_offset, comment_length = _END.unpack_from(tail, end_at)
    comment = tail[end_at + _END.size:end_at + _END.size + comment_length]
    records_start = tail_start + end_at  # the central directory ends where the end records start
    locator_at = end_at - _LOCATOR64.size
    zip64_values = None
    if locator_at >= 0 and _u32(tail, locator_at) == _LOCATOR64_SIG:
        zip64_values = _zip64_end(reader, tail, tail_start, locator_at)
        if zip64_values is None and (count == 0xFFFF or 0xFFFFFFFF in (toc_size, toc_offset)):
            raise _damaged(archive, "its ZIP64 end record is not where its locator points")
    zip64 = zip64_values is not None
    if zip64:
        records_start, count, toc_size, toc_offset = zip64_values
    elif disk or toc_disk:
        raise UnsupportedArchive(f"archive {archive} is one volume of a spanned (multi-disk) zip, which "
                                 "cannot be read by ranges; join its volumes first.", paths=[archive])
    prefix = records_start - (toc_offset + toc_size)  # bytes before the archive proper
    if prefix < 0:
        raise _damaged(archive, f"its central directory ({toc_size:,} bytes from byte {toc_offset:,}) "
                                f"would run past its end record at byte {records_start:,}")
    toc_start = toc_offset + prefix
    if toc_start >= tail_start:
        toc = tail[toc_start - tail_start:records_start - tail_start]
    else:
        toc = reader.read(toc_start, min(records_start, tail_start) - toc_start)
        toc += tail[:max(0, records_start - tail_start)]
    members = _parse_central_directory(toc, archive, prefix, toc_start)
    if (len(members) != count) if zip64 else (len(members) % 0x10000 != count):
        raise _damaged(archive, f"its central directory holds {len(members):,} entries where its end "
                                f"record says {count:,}")
    return Directory(archive, size, tuple(members), comment, toc_start, size - toc_start, zip64)


def _u32(data: bytes, at: int) -> int:
    return int.from_bytes(data[at:at + 4], "little")


def _find_end(tail: bytes, archive: str) -> int:
    """Where the end record starts in `tail` (the archive's last bytes): the last signature
    whose comment ends exactly at the archive's end."""
    search_end = len(tail) - _END.size + 4
    loose = None
    while True:
        at = tail.rfind(_END_SIG_BYTES, 0, search_end)
        if at < 0:
            break
        if at + _END.size <= len(tail):
            comment_length = _END.unpack_from(tail, at)[-1]
            overhang = len(tail) - (at + _END.size + comment_length)
            if overhang == 0:
                return at
            if overhang > 0 and loose is None:
                loose = overhang
        search_end = at + 3
    if loose is not None:
        raise _damaged(archive, f"{loose:,} bytes follow its end record (something was appended to it)")
    raise _damaged(archive, f"no zip end record in its last {len(tail):,} bytes (it is not a zip archive, "
                            "or it is cut short)")


def _zip64_end(reader: RangeReader, tail: bytes, tail_start: int, locator_at: int
               ) -> tuple[int, int, int, int] | None:
    """(where the ZIP64 end record starts, entries, central directory size, its offset) from the
    locator at `locator_at` in `tail`. The record is looked for where the locator says, then
    right before the locator (where it is when bytes precede the archive). None when it is in
    neither place: the "locator" may be the end of a name that happens to look like one."""
    archive = reader.name
    _, locator_disk, recorded, disks = _LOCATOR64.unpack_from(tail, locator_at)
    locator = tail_start + locator_at
    for at in dict.fromkeys((recorded, locator - _END64.size)):
        if not 0 <= at <= locator - _END64.size:
            continue
        if at >= tail_start:
            record = tail[at - tail_start:at - tail_start + _END64.size]
        else:
            record = reader.read(at, _END64.size)
        if _u32(record, 0) != _END64_SIG:
            continue
        _, _, _, _, disk, toc_disk, _, count, toc_size, toc_offset = _END64.unpack(record)
        if disk or toc_disk or locator_disk or disks > 1:
            raise UnsupportedArchive(f"archive {archive} is one volume of a spanned (multi-disk) zip, "
                                     "which cannot be read by ranges; join its volumes first.", paths=[archive])
        return at, count, toc_size, toc_offset
    return None


def _parse_central_directory(toc: bytes, archive: str, prefix: int, toc_start: int) -> list[Member]:
    members = []
    at = 0
    while at < len(toc) and _u32(toc, at) == _CENTRAL_SIG:
        member, at = _parse_entry(toc, at, archive, prefix, toc_start)
        members.append(member)
    rest = toc[at:]
    if rest and not rest.startswith(_SIGNATURE_SIG_BYTES):
        raise _damaged(archive, f"its central directory has {len(rest):,} bytes that are not entries after "
                                f"its entry {len(members):,}")
    return members


def _parse_entry(toc: bytes, at: int, archive: str, prefix: int, toc_start: int) -> tuple[Member, int]:
    """The entry at `at` in the central directory, and where the next one starts."""
    if at + _CENTRAL.size > len(toc):
        raise _damaged(archive, f"its central directory is cut short in entry at byte {toc_start + at:,}")
    (_, made_by, _, flags, method, dos_time, dos_date, crc, compressed, size, name_length, extra_length,
     comment_length, _, _, external, offset) = _CENTRAL.unpack_from(toc, at)
    name_at = at + _CENTRAL.size
    end = name_at + name_length + extra_length + comment_length
    if end > len(toc):
        raise _damaged(archive, f"its central directory is cut short in entry at byte {toc_start + at:,}")
    raw_name = toc[name_at:name_at + name_length]
    extras = _extra_fields(toc[name_at + name_length:name_at + name_length + extra_length])
    name = _decode_name(raw_name, flags, extras.get(_UNICODE_PATH_EXTRA), made_by >> 8)
    wide = _zip64_values(extras.get(_ZIP64_EXTRA, b""), size, compressed, offset)
    if wide is None:
        raise _damaged(archive, f"member {name}: its ZIP64 sizes are missing from its central directory entry")
    size, compressed, offset = wide
    header = offset + prefix
    if header + _LOCAL.size + name_length + compressed > toc_start:
        raise _damaged(archive, f"member {name} ({compressed:,} bytes from byte {header:,}) would run into "
                                f"the central directory at byte {toc_start:,}")
    unsupported = None
    if flags & _FLAG_ENCRYPTED:
        unsupported = "it is encrypted"
    elif method not in (STORED, DEFLATED):
        unsupported = f"it is compressed with method {method} ({_METHOD_NAMES.get(method, 'unknown')})"
    elif method == STORED and compressed != size:
        raise _damaged(archive, f"member {name} is stored (not compressed) but its sizes differ "
                                f"({compressed:,} and {size:,} bytes)")
    member = Member(archive, name, raw_name, method, flags, crc, compressed, size, header, toc_start,
                    _dos_datetime(dos_date, dos_time), _exact_mtime_ns(extras), external, made_by >> 8,
                    unsupported)
    return member, end


def _extra_fields(data: bytes) -> dict[int, bytes]:
    """Header ID -> data of each extra field (4.5.1; the first of a repeated ID). Stops at a
    malformed field: some tools pad the extra area, and only ZIP64 values are essential (their
    absence is reported where they are needed)."""
    fields: dict[int, bytes] = {}
    at = 0
    while at + 4 <= len(data):
        kind, length = struct.unpack_from("<HH", data, at)
        if at + 4 + length > len(data):
            break
        fields.setdefault(kind, data[at + 4:at + 4 + length])
        at += 4 + length
    return fields


def _decode_name(raw: bytes, flags: int, unicode_path: bytes | None, creator_system: int) -> str:
    """UTF-8 with flag bit 11; else the UTF-8 copy of a Unicode Path field (4.6.9) while its
    CRC-32 matches the name; else code page 437, except that names of archives made on UNIX
    that are valid UTF-8 are read as UTF-8: Info-ZIP's zip stores the file system's bytes there
    without setting the flag, and Info-ZIP's unzip reads them back unchanged."""
    if flags & _FLAG_UTF8:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("cp437")  # a wrongly set flag: cp437 decodes any bytes
    if unicode_path and len(unicode_path) > 5 and unicode_path[0] == 1 \
            and _u32(unicode_path, 1) == zlib.crc32(raw):
        try:
            return unicode_path[5:].decode("utf-8")
        except UnicodeDecodeError:
            pass
    if creator_system == _UNIX:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass  # a legacy encoding
    return raw.decode("cp437")


def _zip64_values(extra: bytes, size: int, compressed: int, offset: int) -> tuple[int, int, int] | None:
    """(uncompressed size, compressed size, local header offset) with 0xFFFFFFFF fields taken,
    in order, from the ZIP64 extra field (4.5.3); None when a needed value is missing."""
    values = [size, compressed, offset]
    at = 0
    for index, value in enumerate(values):
        if value == 0xFFFFFFFF:
            if at + 8 > len(extra):
                return None
            values[index] = int.from_bytes(extra[at:at + 8], "little")
            at += 8
    return values[0], values[1], values[2]


def _dos_datetime(dos_date: int, dos_time: int) -> datetime | None:
    try:
        return datetime(1980 + (dos_date >> 9), (dos_date >> 5) & 0xF, dos_date & 0x1F,
                        dos_time >> 11, (dos_time >> 5) & 0x3F, min(59, (dos_time & 0x1F) * 2))
    except ValueError:
        return None


def _exact_mtime_ns(extras: dict[int, bytes]) -> int | None:
    """UTC modification time in ns: NTFS (100 ns steps, 4.5.5) first, else the extended
    timestamp (whole seconds, only mtime in central directory entries)."""
    ntfs = extras.get(_NTFS_EXTRA)
    at = 4  # after 4 reserved bytes: attributes as (tag, size, data); tag 1 holds mtime, atime, ctime
    while ntfs is not None and at + 4 <= len(ntfs):
        tag, length = struct.unpack_from("<HH", ntfs, at)
        if tag == 1 and length >= 24 and at + 4 + 8 <= len(ntfs):
            ticks = int.from_bytes(ntfs[at + 4:at + 12], "little")
            return ticks * 100 - _NTFS_EPOCH_OFFSET * 1_000_000_000 if ticks else None
        at += 4 + length
    stamp = extras.get(_TIMESTAMP_EXTRA)
    if stamp is not None and len(stamp) >= 5 and stamp[0] & 1:
        return struct.unpack_from("<i", stamp, 1)[0] * 1_000_000_000
    return None


# ----------------------------------------------------------------------------- one member


def _member_damaged(member: Member, reason: str) -> DamagedArchive:
    return DamagedArchive(f"member {member.name} of archive {member.archive}: {reason}: the archive is "
                          "damaged or was changed.", paths=[member.archive])


def member_range(reader: RangeReader, member: Member) -> tuple[int, int]:
    """(offset of the member's data in the reader's byte string, its compressed size in bytes),
    from its local header: one request of 30 + name + 1,024 bytes (the extra field's content
    is not needed, only its length). Raises DamagedArchive when no local header is there, or
    it names another member, or the data would run into the central directory."""
    data_offset, _ = _open_member(reader, member, 0)
    return data_offset, member.compressed_size


def _open_member(reader: RangeReader, member: Member, prefetch: int) -> tuple[int, bytes]:
    """Check the local header and return (data offset, the data's first bytes): one request
    that also reads `prefetch` bytes of data (plus what _LOCAL_SLACK leaves beyond the extra
    field; fewer only when that field is longer), so a small member costs a single request."""
    want = _LOCAL.size + len(member.raw_name) + _LOCAL_SLACK + min(prefetch, member.compressed_size)
    block = reader.read(member.header_offset, min(want, member.toc_offset - member.header_offset))
    if len(block) < _LOCAL.size or _u32(block, 0) != _LOCAL_SIG:
        raise _member_damaged(member, f"there is no local header at byte {member.header_offset:,}, "
                                      "where its table of contents says it starts")
    name_length, extra_length = _LOCAL.unpack_from(block)[-2:]
    local_name = block[_LOCAL.size:_LOCAL.size + name_length]
    if local_name != member.raw_name:
        raise _member_damaged(member, f"its local header names {local_name.decode('cp437')!r}")
    start = _LOCAL.size + name_length + extra_length
    data_offset = member.header_offset + start
    if data_offset + member.compressed_size > member.toc_offset:
        raise _member_damaged(member, f"its data ({member.compressed_size:,} bytes from byte {data_offset:,}) "
                                      "would run into the central directory")
    return data_offset, block[start:start + member.compressed_size] if prefetch else b""


def iter_compressed(reader: RangeReader, member: Member, chunk: int = CHUNK) -> Iterator[bytes]:
    """The member's compressed bytes, in order, in pieces of at most `chunk` bytes (the first
    one up to 1 KiB more: it comes with the local header, in the same request)."""
    if chunk < 1:
        raise ValueError("chunk must be at least 1 byte")
    data_offset, first = _open_member(reader, member, chunk)
    done = len(first)
    if first:
        yield first
    while done < member.compressed_size:
        count = min(chunk, member.compressed_size - done)
        yield reader.read(data_offset + done, count)
        done += count


def extract(member: Member, chunks: Iterable[bytes], write: Callable[[bytes], Any]) -> None:
    """Decompress the member's compressed bytes (`chunks`, in order, exactly its compressed
    size) and pass its content to `write` in pieces of at most 4 MiB (stored: as they come),
    checking its size and CRC-32 against the table of contents. Memory stays bounded whatever
    the member's size. On any mismatch raises DamagedArchive after some content may have been
    written: callers write to a temporary name and give the final name only after success.
    Raises UnsupportedArchive for a member that cannot be extracted."""
    _refuse_unsupported(member)
    if member.method == STORED:
        produced, crc = _copy(member, chunks, write)
    else:
        produced, crc = _inflate(member, chunks, write)
    if produced != member.size:
        raise _member_damaged(member, f"{produced:,} bytes came out where its table of contents says "
                                      f"{member.size:,}")
    if crc != member.crc32:
        raise _member_damaged(member, "CRC-32 differs")


def _refuse_unsupported(member: Member) -> None:
    if member.unsupported:
        raise UnsupportedArchive(f"member {member.name} of archive {member.archive} cannot be extracted here: "
                                 f"{member.unsupported}. Download the whole archive and open it with 7-Zip.",
                                 paths=[member.archive])


def _copy(member: Member, chunks: Iterable[bytes], write: Callable[[bytes], Any]) -> tuple[int, int]:
    produced = crc = 0
    for data in chunks:
        produced += len(data)
        if produced > member.size:
            break  # reported as a size mismatch, without writing more than the member holds
        crc = _zlib.crc32(data, crc)
        write(data)
    return produced, crc


def _inflate(member: Member, chunks: Iterable[bytes], write: Callable[[bytes], Any]) -> tuple[int, int]:
    inflater = _zlib.decompressobj(wbits=-15)  # raw Deflate: a zip member has no zlib header
    produced = crc = received = 0
    try:
        for data in chunks:
            received += len(data)
            if inflater.eof:
                if data:
                    raise _member_damaged(member, "its data goes on after the end of its Deflate stream")
                continue
            while True:
                out = inflater.decompress(data, _INFLATE_OUT)
                data = inflater.unconsumed_tail
                produced += len(out)
                if produced > member.size:
                    return produced, crc  # reported as a size mismatch; inflating further could be endless
                if out:
                    crc = _zlib.crc32(out, crc)
                    write(out)
                if inflater.eof:
                    if data or inflater.unused_data:
                        raise _member_damaged(member, "its data goes on after the end of its Deflate stream")
                    break
                if not data and len(out) < _INFLATE_OUT:
                    break
    except _INFLATE_ERRORS as exc:
        raise _member_damaged(member, f"its compressed data is invalid ({exc})") from None
    if not inflater.eof and (received or member.compressed_size):
        raise _member_damaged(member, "its compressed data ends before its Deflate stream does")
    return produced, crc


def fetch_member(reader: RangeReader, member: Member, write: Callable[[bytes], Any], chunk: int = CHUNK) -> None:
    """Fetch one member through `reader` and pass its checked content to `write`: its local
    header and compressed bytes in ranged reads of at most `chunk` bytes (about
    compressed size / chunk requests, the first one also reading the header), decompressed
    as they arrive. Raises DamagedArchive / UnsupportedArchive as `extract` does (an
    unsupported member is refused before any request)."""
    _refuse_unsupported(member)
    extract(member, iter_compressed(reader, member, chunk), write)
