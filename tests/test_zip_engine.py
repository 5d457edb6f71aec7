"""archive_dropbox/deflate_zip.py and the ISA-L engine of 2_zipDir.py (zipEngine 'isal'): standard
archives that zipfile and 7-Zip open and test clean, ZIP64 where needed, names, times, empty
files and folders, big files compressed in pieces, bounded memory, and no finished archive
after a failure, Ctrl-C or kill -9."""

from __future__ import annotations

import io
import logging
import os
import random
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import pytest

from conftest import REPO, log_files, make_tree, write_xlsx

from archive_dropbox import cli, deflate_zip, zip_dir_cmd, zipping
from archive_dropbox.deflate_zip import Member

SCRIPT = REPO / "preProcess" / "2_zipDir.py"
SEVEN_ZIP = zipping.find_seven_zip()
LOG = logging.getLogger("test")


# --------------------------------------------------------------------------- data and helpers


def kinds_of_data(size: int, seed: int = 1) -> bytes:
    """Every kind the encoder tells apart, in turn: incompressible, sparse counts (Huffman
    alone wins), text (Deflate wins), zeros, and a repeated block."""
    rng = random.Random(seed)
    parts = []
    while sum(map(len, parts)) < size:
        parts.append(rng.randbytes(50_000))
        parts.append(bytes(rng.choices(b"\0\0\0\0\0\0\1\1\2", k=70_000)))
        parts.append(b"".join(b"%d,frame_%05d.tif,%.4f,OK\n" % (i, i % 977, rng.random()) for i in range(2_000)))
        parts.append(bytes(30_000))
        parts.append(rng.randbytes(3_000) * 10)
    return b"".join(parts)[:size]


def write_archive(path: Path, members: list[Member], level: int = 2, threads: int = 2, **options) -> Path:
    with open(path, "xb") as sink:
        size = deflate_zip.write_zip(sink, members, level=level, threads=threads, **options)
    assert size == path.stat().st_size
    return path


def file_member(path: Path, name: str) -> Member:
    info = path.stat()
    return Member(name, info.st_mtime, path=path, size=info.st_size)


def seven_zip_test(archive: Path) -> None:
    if SEVEN_ZIP is None:
        return
    result = subprocess.run([str(SEVEN_ZIP), "t", "-tzip", str(archive)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Everything is Ok" in result.stdout


def assert_round_trip(archive: Path, expected: dict[str, bytes]) -> None:
    """zipfile reads exactly `expected`, its own test passes, 7-Zip's and this tool's too."""
    with zipfile.ZipFile(archive) as book:
        assert book.testzip() is None
        assert {info.filename: book.read(info) for info in book.infolist()} == expected
    zipping.verify_archive(archive, threads=2)
    seven_zip_test(archive)


def central_records(data: bytes) -> list[dict]:
    """The central directory read by hand: each record's raw fields and extra field ids."""
    with zipfile.ZipFile(io.BytesIO(data)) as book:
        position, count = book.start_dir, len(book.infolist())
    records = []
    for _ in range(count):
        assert data[position:position + 4] == b"PK\x01\x02"
        (flags, method, crc, compressed, size, name_length, extra_length, comment_length,
         offset) = (struct.unpack_from("<H", data, position + 8)[0], struct.unpack_from("<H", data, position + 10)[0],
                    *struct.unpack_from("<III", data, position + 16), *struct.unpack_from("<HHH", data, position + 28),
                    struct.unpack_from("<I", data, position + 42)[0])
        extra = data[position + 46 + name_length:position + 46 + name_length + extra_length]
        ids = []
        at = 0
        while at < len(extra):
            field_id, field_length = struct.unpack_from("<HH", extra, at)
            ids.append(field_id)
            at += 4 + field_length
        records.append({"name": data[position + 46:position + 46 + name_length], "flags": flags,
                        "method": method, "compressed": compressed, "size": size, "offset": offset,
                        "extra_ids": ids})
        position += 46 + name_length + extra_length + comment_length
    return records


# --------------------------------------------------------------------------- the writer


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_every_kind_of_data_round_trips_at_every_level(tmp_path, level):
    contents = {f"001/file_{i}.bin": kinds_of_data(size, seed=i)
                for i, size in enumerate([1, 100, 20_000, 300_000, 1_500_000])}
    contents["001/random.tif"] = os.urandom(200_000)
    contents["001/empty.dat"] = b""
    for name, data in contents.items():
        make_tree(tmp_path / "src", {name: data})
    members = [file_member(tmp_path / "src" / name, name) for name in contents]
    archive = write_archive(tmp_path / "out.zip", members, level=level)
    assert_round_trip(archive, contents)
    with zipfile.ZipFile(archive) as book:
        methods = {info.filename: info.compress_type for info in book.infolist()}
    assert methods["001/empty.dat"] == zipfile.ZIP_STORED
    assert methods["001/random.tif"] == zipfile.ZIP_STORED  # not shrunk: stored, as 7-Zip does
    expected = zipfile.ZIP_STORED if level == 0 else zipfile.ZIP_DEFLATED
    assert methods["001/file_3.bin"] == expected


def test_a_big_file_in_many_pieces_is_one_deflate_stream_byte_for_byte(tmp_path, monkeypatch):
    data = kinds_of_data(3_000_000)
    source = make_tree(tmp_path / "src", {"big.bin": data, "small.txt": b"after the big one"})
    ways = []
    real_way = deflate_zip._cheapest_way
    monkeypatch.setattr(deflate_zip, "_cheapest_way", lambda *a: ways.append(real_way(*a)) or ways[-1])
    members = [file_member(source / "big.bin", "001/big.bin"), file_member(source / "small.txt", "001/small.txt")]
    archive = write_archive(tmp_path / "out.zip", members, threads=3, piece_size=64 * 1024)
    assert len(ways) > 40 and set(ways) == {"stored", "huffman", "deflate"}  # every way, mixed in one stream
    assert_round_trip(archive, {"001/big.bin": data, "001/small.txt": b"after the big one"})
    raw = archive.read_bytes()
    with zipfile.ZipFile(archive) as book:
        info = book.getinfo("001/big.bin")
    assert info.compress_type == zipfile.ZIP_DEFLATED and info.CRC == zlib.crc32(data)
    start = info.header_offset + 30 + len(info.filename) + struct.unpack_from("<H", raw, info.header_offset + 28)[0]
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    assert inflater.decompress(raw[start:start + info.compress_size]) == data
    assert inflater.eof and not inflater.unused_data
    # The sizes and CRC written back into the local header match the central directory's.
    crc, compressed, size = struct.unpack_from("<III", raw, info.header_offset + 14)
    assert (crc, compressed, size) == (info.CRC, info.compress_size, info.file_size)


def test_pieces_never_refer_to_another_members_bytes(tmp_path):
    # Identical content in consecutive members and pieces: a match reaching into the previous
    # piece would decode wrongly on its own (zipfile decodes every member on its own).
    block = kinds_of_data(200_000, seed=5)
    source = make_tree(tmp_path / "src", {"a.bin": block * 3, "b.bin": block, "c.bin": block * 2})
    members = [file_member(source / name, f"001/{name}") for name in ("a.bin", "b.bin", "c.bin")]
    archive = write_archive(tmp_path / "out.zip", members, level=3, piece_size=100_000)
    assert_round_trip(archive, {"001/a.bin": block * 3, "001/b.bin": block, "001/c.bin": block * 2})


def test_names_times_folders_and_links(tmp_path):
    source = make_tree(tmp_path / "src", {"Ünïcödé/データ/séance 1.mrc": b"x" * 5000, "plain.txt": b"plain"})
    stamp = time.mktime((2021, 3, 4, 5, 6, 9, 0, 0, -1))  # local time; a .zip keeps 2-second steps
    os.utime(source / "plain.txt", (stamp, stamp))
    old = time.mktime((1975, 6, 1, 12, 0, 0, 0, 0, -1))  # before 1980: the earliest a .zip holds
    os.utime(source / "Ünïcödé" / "データ" / "séance 1.mrc", (old, old))
    members = [file_member(source / "Ünïcödé/データ/séance 1.mrc", "001/Ünïcödé/データ/séance 1.mrc"),
               file_member(source / "plain.txt", "001/plain.txt"),
               Member("001/empty folder/", stamp, mode=0o40755),
               Member("001/link", stamp, data=b"../plain.txt", mode=0o120777)]
    archive = write_archive(tmp_path / "out.zip", members)
    assert_round_trip(archive, {"001/Ünïcödé/データ/séance 1.mrc": b"x" * 5000, "001/plain.txt": b"plain",
                                "001/empty folder/": b"", "001/link": b"../plain.txt"})
    with zipfile.ZipFile(archive) as book:
        infos = {info.filename: info for info in book.infolist()}
    assert infos["001/plain.txt"].date_time == (2021, 3, 4, 5, 6, 8)
    assert infos["001/Ünïcödé/データ/séance 1.mrc"].date_time == (1980, 1, 1, 0, 0, 0)
    assert infos["001/empty folder/"].is_dir() and infos["001/empty folder/"].external_attr & 0x10
    assert (infos["001/link"].external_attr >> 16) == 0o120777
    assert (infos["001/plain.txt"].external_attr >> 16) == os.stat(source / "plain.txt").st_mode
    flags = {record["name"]: record["flags"] for record in central_records(archive.read_bytes())}
    assert flags["001/Ünïcödé/データ/séance 1.mrc".encode()] & 0x800  # UTF-8 name
    assert not flags[b"001/plain.txt"] & 0x800
    raw = archive.read_bytes()
    local_flags = struct.unpack_from("<H", raw, infos["001/Ünïcödé/データ/séance 1.mrc"].header_offset + 6)[0]
    assert local_flags & 0x800
    if SEVEN_ZIP is not None:
        listing = subprocess.run([str(SEVEN_ZIP), "l", "-slt", "-sccUTF-8", str(archive)],
                                 capture_output=True, encoding="utf-8").stdout
        assert "Path = 001/Ünïcödé/データ/séance 1.mrc" in listing.replace("\\", "/")


def test_zip64_sizes_offsets_and_end_record_below_a_lowered_limit(tmp_path, monkeypatch):
    # The same code paths as for members and archives over 4 GiB, with the limit at 100 kB.
    monkeypatch.setattr(deflate_zip, "ZIP64_LIMIT", 100_000)
    data = {"001/small.txt": b"small", "001/whole.bin": kinds_of_data(150_000, seed=2),
            "001/pieces.bin": kinds_of_data(400_000, seed=3), "001/last.txt": b"last"}
    source = make_tree(tmp_path / "src", {name.split("/")[1]: content for name, content in data.items()})
    members = [file_member(source / name.split("/")[1], name) for name in data]
    archive = write_archive(tmp_path / "out.zip", members, piece_size=64 * 1024)
    assert_round_trip(archive, data)
    raw = archive.read_bytes()
    records = {r["name"].decode(): r for r in central_records(raw)}
    assert records["001/small.txt"]["extra_ids"] == []
    for name in ("001/whole.bin", "001/pieces.bin"):  # sizes over the limit: in the ZIP64 field
        assert records[name]["extra_ids"] == [1] and records[name]["size"] == 0xFFFFFFFF
    assert records["001/last.txt"]["offset"] == 0xFFFFFFFF  # offset over the limit
    assert records["001/last.txt"]["extra_ids"] == [1]
    assert b"PK\x06\x06" in raw[-200:] and b"PK\x06\x07" in raw[-100:]  # ZIP64 end record and locator
    end = raw[-22:]
    assert end[:4] == b"PK\x05\x06" and struct.unpack_from("<I", end, 16)[0] == 0xFFFFFFFF
    # A member written in pieces carries both sizes in its local ZIP64 field, written back.
    with zipfile.ZipFile(archive) as book:
        info = book.getinfo("001/pieces.bin")
    name_length, extra_length = struct.unpack_from("<HH", raw, info.header_offset + 26)
    assert struct.unpack_from("<II", raw, info.header_offset + 18) == (0xFFFFFFFF, 0xFFFFFFFF)
    extra = raw[info.header_offset + 30 + name_length:info.header_offset + 30 + name_length + extra_length]
    assert struct.unpack("<HHQQ", extra) == (1, 16, info.file_size, info.compress_size)


def test_more_than_65535_members(tmp_path):
    count = 65_600
    members = [Member(f"001/{i // 1000:03d}/{i:06d}.txt", 1_700_000_000, data=b"%d" % i) for i in range(count)]
    archive = write_archive(tmp_path / "out.zip", members)
    raw = archive.read_bytes()
    end = raw[-22:]
    assert struct.unpack_from("<HH", end, 8) == (0xFFFF, 0xFFFF)
    assert b"PK\x06\x06" in raw[-200:]
    with zipfile.ZipFile(archive) as book:
        infos = book.infolist()
        assert len(infos) == count
        assert book.read(infos[-1]) == b"%d" % (count - 1)
    assert len(zipping.verify_archive(archive, threads=2)) == count
    seven_zip_test(archive)


def test_memory_stays_within_the_jobs_in_flight_whatever_the_file_size(tmp_path):
    piece = 256 * 1024
    threads = 2
    bound = deflate_zip.memory_bound(threads, piece)
    peaks = []
    for size in (4 << 20, 32 << 20):
        source = tmp_path / f"{size}.bin"
        with open(source, "wb") as sink:
            for start in range(0, size, 1 << 20):
                sink.write(kinds_of_data(1 << 20, seed=start))
        tracemalloc.start()
        try:
            write_archive(tmp_path / f"{size}.zip", [file_member(source, "001/big.bin")],
                          threads=threads, piece_size=piece)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert all(peak <= bound for peak in peaks), (peaks, bound)


def test_a_file_shorter_than_scanned_fails_and_the_caller_gets_the_error(tmp_path):
    source = make_tree(tmp_path / "src", {"a.bin": 1000})
    member = Member("001/a.bin", 0, path=source / "a.bin", size=2000)  # it shrank after the scan
    with pytest.raises(zipping.FileProblem, match="became shorter while it was being zipped"):
        write_archive(tmp_path / "out.zip", [member])


def test_bad_levels_are_refused(tmp_path):
    with pytest.raises(ValueError):
        write_archive(tmp_path / "out.zip", [], level=4)


def test_an_empty_archive_is_valid(tmp_path):
    assert_round_trip(write_archive(tmp_path / "out.zip", []), {})


# --------------------------------------------------------------------------- the engine in 2_zipDir.py


def workbook(path: Path, rows: list[list]) -> Path:
    return write_xlsx(path, {"zipDir": [["inputDir", "deleteFlag"], *rows]})


def run_in_process(*argv: str) -> int:
    return cli.run_script(script=SCRIPT, description="test", spec=zip_dir_cmd.SETTINGS, script_values={},
                          main=zip_dir_cmd.run, log_subdir="preProcess", log_name="zipDir",
                          add_arguments=zip_dir_cmd.add_arguments, argv=list(argv))


def last_log(logs: Path) -> str:
    return log_files(logs, "preProcess")[-1].read_text(encoding="utf-8")


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def varied_folder(root: Path) -> Path:
    folder = make_tree(root, {"frame 0001.tif": kinds_of_data(400_000), "Ünïcödé/データ.txt": b"text " * 500,
                              "sub/empty.dat": b"", ".hidden": b"h"})
    (folder / "empty folder").mkdir()
    (folder / "sub" / "link").symlink_to("../frame 0001.tif")
    return folder


def test_the_script_zips_with_isal_by_default_and_deletes_only_after_the_test(tmp_path, logs_root):
    folder = varied_folder(tmp_path / "data" / "001")
    before = folder_contents(folder)
    code = run_in_process("--excelName", str(workbook(tmp_path / "wb.xlsx", [[str(folder), 1]])),
                          "--logs", str(logs_root))
    assert code == 0
    log = last_log(logs_root)
    assert "Using ISA-L" in log and "ISA-L level 2" in log and "OK: zipped and verified" in log
    assert not folder.exists()
    archive = zipping.archive_path(folder)
    assert zipping.read_archive_mark(archive) is not None
    with zipfile.ZipFile(archive) as book:
        names = set(book.namelist())
        assert {f"001/{name}": book.read(f"001/{name}") for name in before} == {f"001/{n}": d for n, d in before.items()}
        assert book.read("001/sub/link") == b"../frame 0001.tif"
    assert {"001/empty folder/", "001/sub/empty.dat", "001/.hidden"} <= names
    seven_zip_test(archive)


@pytest.mark.parametrize("engine, logged", [("zipfile", "zipEngine is 'zipfile'"),
                                            ("7zip", "Using 7-Zip"), ("isal", "Using ISA-L")])
def test_zip_engine_setting_chooses_the_engine(tmp_path, logs_root, engine, logged):
    if engine == "7zip" and SEVEN_ZIP is None:
        pytest.skip("7-Zip is not installed")
    folder = varied_folder(tmp_path / "001")
    code = run_in_process("--excelName", str(workbook(tmp_path / "wb.xlsx", [[str(folder), 0]])),
                          "--logs", str(logs_root), "--zipEngine", engine)
    assert code == 0
    assert logged in last_log(logs_root)
    assert zipping.read_archive_mark(zipping.archive_path(folder)) is not None


def test_a_bad_zip_engine_is_refused_before_anything_happens(tmp_path, logs_root, capsys):
    folder = varied_folder(tmp_path / "001")
    code = run_in_process("--excelName", str(workbook(tmp_path / "wb.xlsx", [[str(folder), 1]])),
                          "--logs", str(logs_root), "--zipEngine", "7-Zip")
    assert code == 2
    err = capsys.readouterr().err
    assert "zipEngine" in err and "'isal', '7zip', 'zipfile'" in err
    assert not zipping.archive_path(folder).exists() and (folder / ".hidden").exists()


def test_compression_levels_map_to_isal_levels(tmp_path):
    assert [zipping.isal_level(level) for level in range(10)] == [0, 2, 2, 3, 3, 3, 3, 3, 3, 3]
    folder = make_tree(tmp_path / "001", {"a.txt": b"text " * 10_000})
    job = zipping.start_row(folder, engine=zipping.IsalZip(0, 2), delete_originals=False, log=LOG)
    job.start_test()
    assert job.wait().ok
    with zipfile.ZipFile(zipping.archive_path(folder)) as book:
        assert book.getinfo("001/a.txt").compress_type == zipfile.ZIP_STORED


def test_a_file_that_shrinks_while_zipped_fails_the_row_and_deletes_nothing(tmp_path):
    folder = make_tree(tmp_path / "001", {"a.tif": 300_000, "b.tif": 300_000})
    before = folder_contents(folder)

    def shrink(snapshot):  # after the scan, before the zip: the microscope rewrote a file
        (folder / "b.tif").write_bytes(before["b.tif"][:1000])

    job = zipping.start_row(folder, engine=zipping.IsalZip(1, 2), delete_originals=True, log=LOG,
                            before_build=shrink)
    job.start_test()
    outcome = job.wait()
    assert not outcome.ok and "became shorter while it was being zipped" in outcome.result
    assert (folder / "a.tif").read_bytes() == before["a.tif"]
    assert not zipping.partial_path(folder).exists() and not zipping.archive_path(folder).exists()


def test_ctrl_c_while_zipping_leaves_no_archive(tmp_path):
    folder = make_tree(tmp_path / "001", {f"f{i}.tif": kinds_of_data(500_000, seed=i) for i in range(12)})
    before = folder_contents(folder)

    class Bar:
        def update(self, count):
            raise KeyboardInterrupt

        def close(self):
            pass

    with pytest.raises(KeyboardInterrupt):
        zipping.start_row(folder, engine=zipping.IsalZip(1, 2), delete_originals=True, log=LOG,
                          progress_factory=lambda total, name: Bar())
    assert folder_contents(folder) == before
    assert not zipping.partial_path(folder).exists() and not zipping.archive_path(folder).exists()


STALLING_RUN = '''
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from archive_dropbox import cli, deflate_zip, zip_dir_cmd, zipping

real_write_zip = deflate_zip.write_zip

def write_zip_then_stall(sink, members, *, progress, **options):
    def stall(done):  # the first job is written: say so, and wait to be killed mid-archive
        progress(done)
        sink.flush()
        Path({signal!r}).write_text(str(done))
        while True:
            time.sleep(1)
    return real_write_zip(sink, members, progress=stall, **options)

deflate_zip.write_zip = write_zip_then_stall
sys.exit(cli.run_script(script=Path({script!r}), description="test", spec=zip_dir_cmd.SETTINGS, script_values={{}},
                        main=zip_dir_cmd.run, log_subdir="preProcess", log_name="zipDir",
                        add_arguments=zip_dir_cmd.add_arguments, argv=sys.argv[1:]))
'''


def test_kill_9_while_zipping_leaves_no_archive_and_a_rerun_finishes(tmp_path, logs_root):
    folder = make_tree(tmp_path / "data" / "001", {f"f{i:02d}.tif": kinds_of_data(1_000_000, seed=i)
                                                   for i in range(16)})
    before = folder_contents(folder)
    book = workbook(tmp_path / "wb.xlsx", [[str(folder), 1]])
    signal = tmp_path / "first job written"
    runner = tmp_path / "stalling_run.py"
    runner.write_text(STALLING_RUN.format(repo=str(REPO), signal=str(signal), script=str(SCRIPT)))
    process = subprocess.Popen([sys.executable, str(runner), "--excelName", str(book), "--logs", str(logs_root)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                               env={**os.environ, "ARCHIVE_DROPBOX_NO_PAUSE": "1"})
    try:
        deadline = time.monotonic() + 120
        while not signal.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert signal.exists(), "the run never wrote its first job"
        process.kill()  # SIGKILL: no clean-up of any kind
    finally:
        process.wait()
    partial = zipping.partial_path(folder)
    assert partial.exists() and partial.stat().st_size > 0  # half an archive under its temporary name
    assert not zipping.archive_path(folder).exists()
    assert folder_contents(folder) == before

    assert run_in_process("--excelName", str(book), "--logs", str(logs_root)) == 0
    assert "left by an interrupted run" in last_log(logs_root)
    assert not partial.exists() and not folder.exists()
    with zipfile.ZipFile(zipping.archive_path(folder)) as book_file:
        assert {name: book_file.read(f"001/{name}") for name in before} == before
