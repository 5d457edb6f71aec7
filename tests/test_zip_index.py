"""zip_index: tables of contents and single members read through byte ranges, from archives
written by zipfile, 7-Zip, Info-ZIP, the package's own writer and by hand (ZIP64 in every
field), read through parts cut at arbitrary points; damage is reported, never passed on."""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
import shutil
import struct
import subprocess
import zipfile
import zlib
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from archive_dropbox import split, zip_index
from archive_dropbox.errors import ArchiveError, FileProblem
from archive_dropbox.zip_index import (DamagedArchive, FileReader, PartedReader, UnsupportedArchive,
                                       extract, fetch_member, member_range, read_directory)

SEVEN_ZIP = Path("/usr/bin/7zz")
INFO_ZIP = shutil.which("zip")


# ----------------------------------------------------------------------------- helpers


def parts_of(data: bytes, cuts: list[int], name: str = "test.zip") -> PartedReader:
    """`data` as parts ending at the sorted `cuts` (parts may be empty)."""
    bounds = [0, *sorted(min(max(c, 0), len(data)) for c in cuts), len(data)]
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    return PartedReader([(len(p), _reader_of(p)) for p in pieces], name)


def _reader_of(piece: bytes):
    return lambda offset, length: piece[offset:offset + length]


def three_parts(data: bytes, seed: int = 1) -> PartedReader:
    rng = random.Random(seed)
    return parts_of(data, [rng.randrange(len(data) + 1) for _ in range(2)])


def fetch(reader, member, chunk: int = zip_index.CHUNK) -> bytes:
    out = bytearray()
    fetch_member(reader, member, out.extend, chunk)
    return bytes(out)


def zip_bytes(members: list[tuple], comment: bytes = b"", **options) -> bytes:
    """members: (name, data, compress_type[, date_time]); a name ending in '/' is a folder."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", **options) as archive:
        for name, data, method, *when in members:
            info = zipfile.ZipInfo(name, date_time=when[0] if when else (2024, 3, 15, 10, 20, 30))
            info.compress_type = method
            archive.writestr(info, data)
        archive.comment = comment
    return buffer.getvalue()


def assert_round_trip(reader, originals: dict[str, bytes], chunk: int = zip_index.CHUNK):
    directory = read_directory(reader)
    assert sorted(m.name for m in directory) == sorted(originals)
    for member in directory:
        assert fetch(reader, member, chunk) == originals[member.name], member.name
        assert member.size == len(originals[member.name])
    return directory


def pseudo_random(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


SAMPLE = [
    ("plain.txt", b"hello world\n" * 500, zipfile.ZIP_DEFLATED),
    ("stored.bin", pseudo_random(70_000, 1), zipfile.ZIP_STORED),
    ("deflated-noise.bin", pseudo_random(50_000, 2), zipfile.ZIP_DEFLATED),
    ("données/été 日本語.txt", "Unicode ✓".encode() * 100, zipfile.ZIP_DEFLATED),
    ("empty-stored", b"", zipfile.ZIP_STORED),
    ("empty-deflated", b"", zipfile.ZIP_DEFLATED),
    ("folder/", b"", zipfile.ZIP_STORED),
    ("folder/inner/deep.dat", bytes(range(256)) * 40, zipfile.ZIP_DEFLATED),
]


# ----------------------------------------------------------------------------- archives of several writers


def test_zipfile_archive_read_through_three_parts():
    data = zip_bytes(SAMPLE, comment=b"lab archive \xff comment")
    originals = {name: content for name, content, _ in SAMPLE}
    for seed in range(8):
        reader = three_parts(data, seed)
        directory = assert_round_trip(reader, originals)
    assert directory.comment == b"lab archive \xff comment"
    assert not directory.zip64 and directory.size == len(data)
    reference = {info.filename: info for info in zipfile.ZipFile(io.BytesIO(data)).infolist()}
    for member in directory:
        info = reference[member.name]
        assert (member.crc32, member.compressed_size, member.method) == (info.CRC, info.compress_size,
                                                                         info.compress_type)
        assert member.header_offset == info.header_offset
        assert member.date_time == datetime(2024, 3, 15, 10, 20, 30)
        assert member.exact_mtime_ns is None and member.unsupported is None
        assert member.is_dir == member.name.endswith("/")
    assert directory.find("folder/").is_dir and directory.find("nothing") is None
    assert directory.find("données/été 日本語.txt").flags & 0x800


def test_cp437_names_and_info_zip_unicode_path_field():
    data = zip_bytes([("caf_.txt", b"one", zipfile.ZIP_STORED), ("r_sum_.txt", b"two", zipfile.ZIP_STORED)])
    # Names without the UTF-8 flag are IBM code page 437 (0x82 is é there).
    data = data.replace(b"caf_.txt", b"caf\x82.txt")
    # Info-ZIP's Unicode Path field (0x7075) gives a UTF-8 name valid while its CRC matches.
    raw = b"r\x82sum\x82.txt"
    utf8 = "résumé.txt".encode()
    field = struct.pack("<HHBI", 0x7075, 5 + len(utf8), 1, zlib.crc32(raw)) + utf8
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("caf_.txt", b"one")
        info = zipfile.ZipInfo("r_sum_.txt", (2024, 1, 2, 3, 4, 6))
        info.extra = field
        archive.writestr(info, b"two")
    data = buffer.getvalue().replace(b"caf_.txt", b"caf\x82.txt").replace(b"r_sum_.txt", raw)
    directory = assert_round_trip(three_parts(data), {"café.txt": b"one", "résumé.txt": b"two"})
    assert directory.find("résumé.txt").raw_name == raw


def test_exact_times_from_ntfs_and_extended_timestamp_fields_are_preferred():
    when = 1_700_000_000  # 2023-11-14 22:13:20 UTC
    ntfs_ticks = (when + 11_644_473_600) * 10_000_000 + 1234567  # 100 ns steps since 1601
    ntfs = struct.pack("<HHIHHQQQ", 0x000A, 32, 0, 1, 24, ntfs_ticks, 0, 0)
    stamp = struct.pack("<HHBi", 0x5455, 5, 1, when)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, extra in (("ntfs", ntfs), ("stamp", stamp), ("both", stamp + ntfs), ("dos", b"")):
            info = zipfile.ZipInfo(name, (2020, 6, 7, 8, 9, 10))
            info.extra = extra
            archive.writestr(info, name.encode())
    directory = assert_round_trip(three_parts(buffer.getvalue()),
                                  {"ntfs": b"ntfs", "stamp": b"stamp", "both": b"both", "dos": b"dos"})
    assert directory.find("ntfs").exact_mtime_ns == when * 10**9 + 123456700
    assert directory.find("both").exact_mtime_ns == when * 10**9 + 123456700  # NTFS is finer
    assert directory.find("stamp").exact_mtime_ns == when * 10**9
    assert directory.find("stamp").mtime == when
    dos = directory.find("dos")
    assert dos.exact_mtime_ns is None and dos.date_time == datetime(2020, 6, 7, 8, 9, 10)
    assert dos.mtime == datetime(2020, 6, 7, 8, 9, 10).timestamp()  # DOS times are local times


def _folder_of_samples(root: Path) -> dict[str, bytes]:
    originals = {"a.txt": b"abc" * 20_000, "noise.bin": pseudo_random(300_000, 3), "empty": b"",
                 "sub/été 日本.txt": "ünïcode".encode() * 50, "sub/deeper/x.dat": bytes(1000)}
    for name, content in originals.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    (root / "hollow").mkdir()
    os.utime(root / "a.txt", ns=(1_600_000_000_123_456_700, 1_600_000_000_123_456_700))
    return originals


@pytest.mark.skipif(not SEVEN_ZIP.exists(), reason="7-Zip (/usr/bin/7zz) is not installed")
def test_seven_zip_archive(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    originals = _folder_of_samples(source)
    archive = tmp_path / "seven.zip"
    subprocess.run([str(SEVEN_ZIP), "a", "-tzip", "-mx=1", str(archive), "./src/*"], cwd=tmp_path,
                   check=True, capture_output=True)
    data = archive.read_bytes()
    expected = dict(originals, **{"sub/": b"", "sub/deeper/": b"", "hollow/": b""})
    directory = assert_round_trip(three_parts(data, 5), expected)
    assert {m.method for m in directory} == {0, 8}
    assert directory.find("a.txt").exact_mtime_ns == 1_600_000_000_123_456_700
    assert directory.find("hollow/").is_dir
    with FileReader(archive) as reader:
        assert_round_trip(reader, expected)


@pytest.mark.skipif(INFO_ZIP is None, reason="Info-ZIP zip is not installed")
def test_info_zip_archive_with_extended_timestamps(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    originals = _folder_of_samples(source)
    archive = tmp_path / "infozip.zip"
    subprocess.run([INFO_ZIP, "-q", "-r", "-1", str(archive), "."], cwd=source, check=True, capture_output=True)
    directory = assert_round_trip(three_parts(archive.read_bytes(), 7),
                                  dict(originals, **{"sub/": b"", "sub/deeper/": b"", "hollow/": b""}))
    assert directory.find("a.txt").exact_mtime_ns == 1_600_000_000 * 10**9  # whole seconds in 0x5455


def test_package_writer_archives_parse(tmp_path):
    deflate_zip = pytest.importorskip("archive_dropbox.deflate_zip")
    source = tmp_path / "src"
    source.mkdir()
    originals = _folder_of_samples(source)
    originals["big.bin"] = (pseudo_random(4096, 9) + bytes(3000)) * 300  # several pieces
    (source / "big.bin").write_bytes(originals["big.bin"])
    members = [deflate_zip.Member(name, (source / name).stat().st_mtime, path=source / name,
                                  size=len(content)) for name, content in sorted(originals.items())]
    members.append(deflate_zip.Member("hollow/", 1_600_000_000.0))
    for level in (0, 1, 3):
        archive = tmp_path / f"writer-{level}.zip"
        with open(archive, "wb") as sink:
            deflate_zip.write_zip(sink, members, level=level, threads=2, piece_size=256 * 1024)
        directory = assert_round_trip(three_parts(archive.read_bytes(), level),
                                      dict(originals, **{"hollow/": b""}), chunk=100_000)
        local = datetime.fromtimestamp((source / "a.txt").stat().st_mtime)
        assert abs((directory.find("a.txt").date_time - local).total_seconds()) <= 2  # 2-second steps


# ----------------------------------------------------------------------------- ZIP64


def test_zipfile_force_zip64_member():
    buffer = io.BytesIO()
    content = pseudo_random(3000, 4) * 5
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("forced", "w", force_zip64=True) as handle:
            handle.write(content)
        archive.writestr("after", b"next")
    reader = three_parts(buffer.getvalue())
    directory = assert_round_trip(reader, {"forced": content, "after": b"next"})
    # The local header carries a 20-byte ZIP64 extra field that the data starts after.
    assert member_range(reader, directory.find("forced"))[0] == 30 + len("forced") + 20


def zip64_by_hand(members: list[tuple[str, bytes]]) -> bytes:
    """Stored members with 0xFFFFFFFF in 32-bit fields and their values in ZIP64 extra fields:
    all three for member 0, 3, ...; the offset only for 1, 4, ...; the sizes only for 2, 5, ...
    (APPNOTE 4.5.3's order), then the ZIP64 end record, its locator and an end record full of
    0xFFFF. zipfile reads it too (checked), so the test archive itself is right."""
    out, central = bytearray(), bytearray()
    for index, (name, data) in enumerate(members):
        raw, crc, offset = name.encode(), zlib.crc32(data), len(out)
        wide_sizes, wide_offset = index % 3 in (0, 2), index % 3 in (0, 1)
        size32 = 0xFFFFFFFF if wide_sizes else len(data)
        local_extra = struct.pack("<HHQQ", 1, 16, len(data), len(data)) if wide_sizes else b""
        out += struct.pack("<I5H3I2H", 0x04034B50, 45, 0x800, 0, 0, 0x21, crc, size32, size32, len(raw),
                           len(local_extra)) + raw + local_extra + data
        values = ([len(data), len(data)] if wide_sizes else []) + ([offset] if wide_offset else [])
        extra = struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""
        central += struct.pack("<I6H3I5H2I", 0x02014B50, 45, 45, 0x800, 0, 0, 0x21, crc, size32, size32,
                               len(raw), len(extra), 0, 0, 0, 0, 0xFFFFFFFF if wide_offset else offset)
        central += raw + extra
    toc_offset, count = len(out), len(members)
    out += central
    record = len(out)
    out += struct.pack("<IQ2H2I4Q", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(central), toc_offset)
    out += struct.pack("<IIQI", 0x07064B50, 0, record, 1)
    out += struct.pack("<I4H2IH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return bytes(out)


def test_zip64_fields_in_every_position():
    originals = {f"m{i}/{'x' * i}": pseudo_random(i * 997, i) for i in range(7)}
    data = zip64_by_hand(list(originals.items()))
    with zipfile.ZipFile(io.BytesIO(data)) as reference:
        assert reference.testzip() is None
        assert {n: reference.read(n) for n in reference.namelist()} == originals
    for seed in range(5):
        directory = assert_round_trip(three_parts(data, seed), originals)
    assert directory.zip64


def test_zip64_with_more_than_65535_members():
    count = 65_540
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(count):
            archive.writestr(f"f{i}", b"%d" % i)
    data = buffer.getvalue()
    reader = three_parts(data)
    directory = read_directory(reader)
    assert directory.zip64 and len(directory) == count
    assert reader.reads == 2  # the tail, then the rest of the directory in one read
    for name in ("f0", "f12345", "f65535", f"f{count - 1}"):
        assert fetch(reader, directory.find(name)) == name[1:].encode()


def test_a_name_ending_like_a_zip64_locator_is_not_one():
    # The 20 bytes before the end record are the last entry's name here, shaped like a locator
    # of a spanned archive pointing nowhere: the archive is still an ordinary zip.
    name = "x" + "PK\x06\x07" + "0123456789abcdef"
    data = zip_bytes([("first", b"1", zipfile.ZIP_STORED), (name, b"2", zipfile.ZIP_STORED)])
    end = data.rindex(b"PK\x05\x06")
    assert data[end - 20:end - 16] == b"PK\x06\x07"
    directory = assert_round_trip(three_parts(data), {"first": b"1", name: b"2"})
    assert not directory.zip64


def test_missing_zip64_value_is_damage():
    data = bytearray(zip64_by_hand([("a", b"1"), ("b", b"2")]))
    toc = data.index(b"PK\x01\x02")
    # Member 0's ZIP64 extra field says 24 bytes but is cut to 16: its offset is gone.
    extra_length_at = toc + 30
    assert struct.unpack_from("<H", data, extra_length_at)[0] == 28
    struct.pack_into("<H", data, toc + 46 + 1 + 2, 16)
    with pytest.raises(DamagedArchive, match="ZIP64 sizes are missing"):
        read_directory(parts_of(bytes(data), []))


# ----------------------------------------------------------------------------- requests and bytes


def test_directory_and_member_request_counts(tmp_path):
    data = zip_bytes(SAMPLE)
    path = tmp_path / "small.zip"
    path.write_bytes(data)
    with FileReader(path) as reader:
        directory = read_directory(reader)
        assert reader.requests == 1 and reader.bytes_read == zip_index.TAIL  # the directory is in the tail
        member = directory.find("stored.bin")
        before = reader.requests, reader.bytes_read
        assert fetch(reader, member) == SAMPLE[1][1]
        assert reader.requests - before[0] == 1  # local header and data in one request
        assert reader.bytes_read - before[1] <= member.compressed_size + 30 + len(member.raw_name) + 1024
    for seed in range(10):
        parted = three_parts(data, seed)
        read_directory(parted)
        assert parted.reads == 1 and parted.requests <= 3


def test_big_archive_costs_two_requests_for_the_directory_and_chunked_requests_for_a_member():
    names = [f"session-{i:04d}/frame-{i:06d}-{'n' * 60}.tif" for i in range(1500)]  # directory > 64 KiB
    members = [(name, b"frame %d" % i, zipfile.ZIP_STORED) for i, name in enumerate(names)]
    members.append(("big.bin", pseudo_random(1_000_000, 6), zipfile.ZIP_STORED))
    members.append(("big-deflated.bin", b"pattern!" * 300_000, zipfile.ZIP_DEFLATED))
    data = zip_bytes(members)
    reader = parts_of(data, [len(data) // 3, 2 * len(data) // 3])
    directory = read_directory(reader)
    assert directory.toc_size > zip_index.TAIL
    assert reader.reads == 2 and reader.bytes_read == directory.toc_size
    chunk = 64 * 1024
    for name, content, _ in members[-2:]:
        member = directory.find(name)
        before = reader.reads, reader.bytes_read
        assert fetch(reader, member, chunk) == content
        data_requests = math.ceil(member.compressed_size / chunk)
        assert reader.reads - before[0] <= data_requests  # the first one also reads the local header
        assert reader.bytes_read - before[1] <= member.compressed_size + 30 + len(member.raw_name) + 1024


def test_member_range_reads_one_small_request():
    data = zip_bytes(SAMPLE)
    reader = parts_of(data, [])
    directory = read_directory(reader)
    reference = zipfile.ZipFile(io.BytesIO(data))
    for member in directory:
        before = reader.reads
        offset, length = member_range(reader, member)
        assert reader.reads - before == 1
        info = reference.getinfo(member.name)
        assert length == info.compress_size
        assert data[offset:offset + length] == data[info.header_offset:][
            30 + len(info.filename.encode()) + len(info.extra):][:length]


def test_parted_reader_from_a_split_manifest(tmp_path):
    data = zip_bytes(SAMPLE)
    source = tmp_path / "archive.zip"
    source.write_bytes(data)
    folder = tmp_path / "parts"
    folder.mkdir()
    plan = split.plan_split(len(data), 50_000, "archive.zip")
    for part in plan:  # the split tool's parts are plain slices of the original
        (folder / part.name).write_bytes(data[part.offset:part.end])
    manifest = split.build_manifest("archive.zip", len(data), hashlib.sha256(data).hexdigest(), 0.0, plan,
                                    [hashlib.sha256(data[p.offset:p.end]).hexdigest() for p in plan])
    assert len(manifest.parts) >= 3

    def read_part(part, offset, length):
        with open(folder / part.name, "rb") as handle:
            handle.seek(offset)
            return handle.read(length)

    reader = PartedReader.from_manifest(manifest, read_part)
    assert reader.size == len(data) and reader.name == "archive.zip"
    assert_round_trip(reader, {name: content for name, content, _ in SAMPLE})
    sizes_reader = PartedReader.from_sizes([p.size for p in manifest.parts],
                                           lambda i, offset, length: read_part(manifest.parts[i], offset, length))
    assert sizes_reader.read(0, len(data)) == data and sizes_reader.requests == len(manifest.parts)


def test_reads_crossing_parts_and_empty_parts():
    data = bytes(range(256)) * 10
    reader = parts_of(data, [0, 100, 100, 101, 2000, len(data)])
    for offset, length in [(0, len(data)), (99, 3), (100, 1), (0, 0), (2000, 560), (1999, 2)]:
        assert reader.read(offset, length) == data[offset:offset + length]
    with pytest.raises(ValueError):
        reader.read(len(data) - 1, 2)


# ----------------------------------------------------------------------------- damage


def test_flipped_byte_in_a_member_is_reported_on_crc():
    data = bytearray(zip_bytes(SAMPLE))
    reader = parts_of(bytes(data), [])
    member = read_directory(reader).find("stored.bin")
    data_offset, _ = member_range(reader, member)
    data[data_offset + 12_345] ^= 0x01
    damaged = three_parts(bytes(data))
    member = read_directory(damaged).find("stored.bin")
    written = []
    with pytest.raises(DamagedArchive, match="CRC-32 differs") as caught:
        fetch_member(damaged, member, written.append)
    assert str(caught.value) == ("member stored.bin of archive test.zip: CRC-32 differs: the archive is "
                                 "damaged or was changed.")
    assert isinstance(caught.value, ArchiveError) and isinstance(caught.value, FileProblem)
    assert caught.value.paths == ["test.zip"]


def test_flipped_bits_in_deflated_data_never_give_wrong_content():
    data = zip_bytes(SAMPLE)
    member = read_directory(parts_of(data, [])).find("folder/inner/deep.dat")
    data_offset, length = member_range(parts_of(data, []), member)
    caught = 0
    for position in range(data_offset, data_offset + length):
        for bit in (0x01, 0x10, 0x80):
            damaged = bytearray(data)
            damaged[position] ^= bit
            try:
                content = fetch(parts_of(bytes(damaged), []), member)
            except DamagedArchive as exc:
                assert "deep.dat of archive test.zip" in str(exc)
                caught += 1
            else:  # a flip in the padding after the last block changes nothing that is read
                assert content == SAMPLE[-1][1]
    assert caught >= 0.9 * 3 * length


@pytest.mark.parametrize("cut", [1, 21, 22, 100, 5000])
def test_truncated_archive(cut):
    data = zip_bytes(SAMPLE, comment=b"c" * 30)
    with pytest.raises(DamagedArchive, match="archive test.zip"):
        read_directory(parts_of(data[:-cut], [100]))


@pytest.mark.parametrize("tail", [b"x", b"\0" * 1000, b"PK\x05\x06" + bytes(30), os.urandom(70_000)])
def test_garbage_appended(tail):
    data = zip_bytes(SAMPLE)
    with pytest.raises(DamagedArchive, match="archive test.zip"):
        read_directory(parts_of(data + tail, [10]))


@pytest.mark.parametrize("content", [b"", b"short", b"not a zip at all" * 10_000])
def test_not_a_zip(content):
    with pytest.raises(DamagedArchive):
        read_directory(parts_of(content, []))


def test_bytes_before_the_archive_are_allowed_as_zipfile_allows_them():
    originals = {name: content for name, content, _ in SAMPLE}
    stub = b"#!self-extractor stub\n" * 100
    assert_round_trip(three_parts(stub + zip_bytes(SAMPLE)), originals)
    assert_round_trip(three_parts(stub + zip64_by_hand(list(originals.items()))), originals)


def test_directory_pointing_outside_the_archive():
    data = bytearray(zip_bytes(SAMPLE))
    toc = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, toc + 42, len(data))  # first entry's local header offset
    with pytest.raises(DamagedArchive, match="would run into the central directory"):
        read_directory(parts_of(bytes(data), []))
    data = bytearray(zip_bytes(SAMPLE))
    end = data.rindex(b"PK\x05\x06")
    struct.pack_into("<I", data, end + 12, struct.unpack_from("<I", data, end + 12)[0] + 100)  # size
    with pytest.raises(DamagedArchive, match="would run past its end record"):
        read_directory(parts_of(bytes(data), []))


def test_local_header_must_match_the_directory():
    data = zip_bytes(SAMPLE)
    reader = parts_of(data, [])
    member = read_directory(reader).find("plain.txt")
    renamed = data[:member.header_offset + 30] + b"PLAIN" + data[member.header_offset + 35:]
    with pytest.raises(DamagedArchive, match="its local header names 'PLAIN.txt'"):
        fetch(parts_of(renamed, []), member)
    shifted = parts_of(b"\0" * 7 + data, [])  # offsets of the old directory now miss the headers
    with pytest.raises(DamagedArchive, match="no local header at byte"):
        fetch(shifted, member)


def test_a_replaced_part_of_another_size_is_reported():
    data = zip_bytes(SAMPLE)
    cut = len(data) // 4  # the directory, in the tail, is read from the second part only
    first, second = data[:cut], data[cut:]
    reader = PartedReader([(len(first), _reader_of(first[:-10])), (len(second), _reader_of(second))],
                          "test.zip", labels=["test.zip_split_0001", "test.zip_split_0002"])
    directory = read_directory(reader)
    with pytest.raises(DamagedArchive, match="test.zip_split_0001 of archive test.zip gave"):
        for member in directory:
            fetch(reader, member)


def test_inflated_size_is_checked_and_bounded():
    data = bytearray(zip_bytes([("bomb", bytes(50_000_000), zipfile.ZIP_DEFLATED)]))
    toc = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, toc + 24, 1000)  # claims 1000 bytes uncompressed
    reader = parts_of(bytes(data), [])
    member = read_directory(reader).find("bomb")
    written = []
    with pytest.raises(DamagedArchive, match="came out where its table of contents says 1,000"):
        fetch_member(reader, member, written.append)
    assert sum(map(len, written)) <= 1000  # it stopped at the first piece that went over


def test_output_comes_in_bounded_pieces():
    content = bytes(30_000_000)
    reader = parts_of(zip_bytes([("zeros", content, zipfile.ZIP_DEFLATED)]), [])
    member = read_directory(reader).find("zeros")
    pieces = []
    fetch_member(reader, member, lambda piece: pieces.append(len(piece)))
    assert sum(pieces) == len(content) and max(pieces) <= 4 * 1024 * 1024


def test_data_after_the_deflate_stream_is_damage():
    member = _deflated_member(b"abc")
    stream = zlib.compressobj(6, zlib.DEFLATED, -15)
    compressed = stream.compress(b"abc") + stream.flush()
    with pytest.raises(DamagedArchive, match="goes on after the end of its Deflate stream"):
        extract(member, [compressed + b"\0"], lambda piece: None)
    with pytest.raises(DamagedArchive, match="goes on after the end"):
        extract(member, [compressed, b"more"], lambda piece: None)
    with pytest.raises(DamagedArchive, match="ends before its Deflate stream does"):
        extract(member, [compressed[:-1]], lambda piece: None)
    out = bytearray()
    extract(member, [compressed[:1], compressed[1:]], out.extend)
    assert out == b"abc"


def _deflated_member(content: bytes) -> zip_index.Member:
    return zip_index.Member("a.zip", "m", b"m", 8, 0, zlib.crc32(content), 0, len(content), 0, 0, None, None,
                            0, 0, None)


def test_unsupported_members_are_refused_before_any_request():
    data = bytearray(zip_bytes([("packed", b"x" * 100, zipfile.ZIP_DEFLATED), ("secret", b"y", zipfile.ZIP_STORED)]))
    toc = data.index(b"PK\x01\x02")
    struct.pack_into("<H", data, toc + 10, 12)  # bzip2
    second = data.index(b"PK\x01\x02", toc + 4)
    struct.pack_into("<H", data, second + 8, 1)  # encrypted
    reader = parts_of(bytes(data), [])
    directory = read_directory(reader)
    assert "method 12 (bzip2)" in directory.find("packed").unsupported
    assert directory.find("secret").unsupported == "it is encrypted"
    for member in directory:
        before = reader.reads
        with pytest.raises(UnsupportedArchive, match=f"member {member.name} of archive test.zip"):
            fetch(reader, member)
        assert reader.reads == before


def test_spanned_archive_is_refused():
    data = bytearray(zip_bytes(SAMPLE))
    end = data.rindex(b"PK\x05\x06")
    struct.pack_into("<H", data, end + 4, 2)
    with pytest.raises(UnsupportedArchive, match="spanned"):
        read_directory(parts_of(bytes(data), []))


def test_file_reader_reports_a_file_that_shrank(tmp_path):
    path = tmp_path / "a.zip"
    path.write_bytes(zip_bytes(SAMPLE))
    with FileReader(path) as reader:
        directory = read_directory(reader)
        with open(path, "r+b") as handle:
            handle.truncate(100)
        with pytest.raises(DamagedArchive, match="changed meanwhile"):
            fetch(reader, directory.find("folder/inner/deep.dat"))


# ----------------------------------------------------------------------------- property


_NAME = st.text(alphabet="abcXYZ_-. éü日本", min_size=1, max_size=12)
_MEMBER = st.tuples(_NAME, st.integers(0, 6000), st.sampled_from(["noise", "text", "zeros"]),
                    st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]), st.booleans())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(members=st.lists(_MEMBER, min_size=1, max_size=12), cuts=st.lists(st.floats(0, 1), max_size=4),
       comment=st.binary(max_size=40), chunk=st.integers(1, 9000), force64=st.booleans())
def test_round_trip_property(members, cuts, comment, chunk, force64):
    originals = {}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index, (name, size, kind, method, in_folder) in enumerate(members):
            name = f"{'dir %d/' % index if in_folder else ''}{index}-{name}"
            content = {"noise": pseudo_random(size, index), "text": (b"line %d\n" % index * size)[:size],
                       "zeros": bytes(size)}[kind]
            info = zipfile.ZipInfo(name, (2021, 2, 3, 4, 5, 6))
            info.compress_type = method
            with archive.open(info, "w", force_zip64=force64) as handle:
                handle.write(content)
            originals[name] = content
        archive.comment = comment
    data = buffer.getvalue()
    reader = parts_of(data, [int(c * len(data)) for c in cuts])
    directory = assert_round_trip(reader, originals, chunk)
    assert directory.comment == comment
