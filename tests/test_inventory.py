"""inventory: the CSV kept in Dropbox (round trip of awkward names, the BOM, strict reading with
file and line in every error), the SQLite cache (reloaded only when the rev changes, never
searched half-loaded) and the search (name glob, path glob, folder restriction, case)."""

from __future__ import annotations

import sqlite3
import tempfile
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from archive_dropbox import inventory
from archive_dropbox.errors import FileProblem
from archive_dropbox.inventory import (COLUMNS, FILE, MEMBER, PARTS, Cache, InventoryError, Record, read_csv,
                                       search, write_csv)
from archive_dropbox.names import case_key, name_problem

NS = 10**9
MARCH = 1_710_507_731 * NS + 123_456_789  # 2024-03-15T13:02:11Z


def member(original: str, archive: str = "s3.zip", name: str | None = None, size: int = 1000,
           crc: int = 0x1A2B3C4D, parts: int = 0) -> Record:
    return Record(original, size, MARCH, MEMBER, archive, name or original.replace("\\", "/").split("/", 3)[-1],
                  crc, size // 2, 4096, parts)


def plain(original: str, dropbox_path: str, size: int = 10) -> Record:
    return Record(original, size, MARCH, FILE, dropbox_path)


AWKWARD = [
    plain(r"D:\Microscope\2024\s3\frame_0412.tif", "s3/frame_0412.tif", 2_097_152),
    plain(r'\\nas01\lab\runs, final\a "quoted" name.txt', 'runs, final/a "quoted" name.txt'),
    plain("/data/line\nbreak.txt", "line break.txt"),
    plain("/data/carriage\rreturn and crlf\r\n.txt", "cr.txt"),
    plain("/data/Icon\r", "Icon.txt"),
    plain("/data/ leading and trailing spaces ", "spaces.txt"),
    plain("/data/back\\slash is a name on Linux", "backslash.txt"),
    plain("/données/café/日本語/Ωμέγα 🎞.tif", "données/café/日本語/Ωμέγα 🎞.tif"),
    plain(unicodedata.normalize("NFD", "/data/é décomposé.txt"), "e.txt"),
    plain("/data/=SUM(A1)", "=SUM(A1)"),
    Record("/data/old.bin", 0, -3 * NS - 1, FILE, "old.bin"),
    Record("/data/far future.bin", 1, 2**62, FILE, "future.bin"),
    Record("/data/bogus date.bin", 1, 300_000_000_000 * NS, FILE, "bogus.bin"),
    member(r"D:\Microscope\2024\s3\sub,dir\x.tif", name="s3/sub,dir/x.tif", crc=0, parts=3),
    member("/data/s3/new\nline.tif", name="s3/new\nline.tif", crc=0xFFFFFFFF),
    Record(r"D:\Microscope\movie.mrc", 180 * 10**9, MARCH, PARTS, "movie.mrc", parts=4),
]


# ============================================================================ CSV


def test_awkward_names_round_trip_and_the_file_starts_with_a_bom(tmp_path):
    path = tmp_path / "s3.zip.inventory.csv"
    assert write_csv(iter(AWKWARD), path) == len(AWKWARD)  # a generator: written in one pass
    data = path.read_bytes()
    assert data.startswith(b"\xef\xbb\xbf" + ",".join(COLUMNS).encode() + b"\r\n")
    assert data.endswith(b"\r\n")
    assert list(read_csv(path)) == AWKWARD
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_the_written_text_is_plain_rfc4180(tmp_path):
    path = tmp_path / "x.csv"
    write_csv([AWKWARD[0], AWKWARD[1], member(r"D:\m\s3\f.tif", name="s3/f.tif", crc=0xAB)], path)
    lines = path.read_bytes().decode("utf-8-sig").split("\r\n")
    assert lines[1] == (r"D:\Microscope\2024\s3\frame_0412.tif,2097152,2024-03-15T13:02:11Z,1710507731123456789,"
                        "file,s3/frame_0412.tif,,,,,0")
    assert lines[2].startswith('"\\\\nas01\\lab\\runs, final\\a ""quoted"" name.txt",10,')
    assert lines[3].endswith(",member,s3.zip,s3/f.tif,000000ab,500,4096,0")


def test_lines_given_as_text_are_read_with_or_without_the_bom(tmp_path):
    path = tmp_path / "x.csv"
    write_csv(AWKWARD, path)
    with open(path, encoding="utf-8", newline="") as handle:  # the BOM stays in the first line
        assert list(read_csv(handle, "/Lab/x.csv")) == AWKWARD
    text = path.read_bytes().decode("utf-8")  # the BOM too
    assert list(read_csv(text.splitlines(keepends=True))) == AWKWARD


def test_modified_text_is_utc_and_floored_to_the_second():
    assert inventory.modified_text(MARCH) == "2024-03-15T13:02:11Z"
    assert inventory.modified_text(-1) == "1969-12-31T23:59:59Z"
    assert inventory.modified_text(-62_135_596_800 * NS) == "0001-01-01T00:00:00Z"
    assert inventory.modified_text(2**62) == "2116-02-20T23:53:38Z"
    assert inventory.modified_text(-2**63) == "1677-09-21T00:12:43Z"
    assert inventory.modified_text(-62_135_596_801 * NS) == ""  # before the year 1
    assert inventory.modified_text(253_402_300_800 * NS) == ""  # the year 10000


@pytest.mark.parametrize("record, words", [
    (plain("/data/caf\udce9.txt", "cafe.txt"), "not valid text (UTF-8)"),
    (plain("/data/nul\x00.txt", "nul.txt"), "NUL"),
    (plain("/data/folder/", "x"), "does not end with a file name"),
    (plain("/data/x", "/Lab/x"), "must be relative"),
    (plain("/data/x", "a//x"), "empty, '.', '..'"),
    (plain("/data/x", "../x"), "empty, '.', '..'"),
    (plain("/data/x", "a\nb"), "control-character"),
    (Record("/data/x", -1, 0, FILE, "x"), "size -1"),
    (Record("/data/x", 1, 0, "folder", "x"), "kind 'folder'"),
    (Record("/data/x", 1, 0, FILE, "x", parts=2), "plain file has 0 parts"),
    (Record("/data/x", 1, 0, PARTS, "x"), "at least 1 part"),
    (Record("/data/x", 1, 0, MEMBER, "x.zip", "", 1, 1, 1), "member's name"),
    (Record("/data/x", 1, 0, MEMBER, "x.zip", "x", 2**32, 1, 1), "CRC-32"),
    (Record("/data/x", 1, 0, MEMBER, "x.zip", "x", 1, None, 1), "compressed size"),
    (Record("/data/x", 1, 0, FILE, "x", crc32=5), "has no member name, CRC-32"),
])
def test_a_record_that_cannot_be_written_is_refused_and_the_old_file_is_kept(tmp_path, record, words):
    path = tmp_path / "x.csv"
    path.write_text("previous version")
    with pytest.raises(InventoryError) as caught:
        write_csv([AWKWARD[0], record], path)
    assert words in str(caught.value) and f"inventory {path}, record 2" in str(caught.value)
    assert isinstance(caught.value, FileProblem)
    assert path.read_text() == "previous version"
    assert [p.name for p in tmp_path.iterdir()] == ["x.csv"]


FRAME, LINE_BREAK = AWKWARD[0], AWKWARD[2]
ARCHIVED = next(record for record in AWKWARD if record.kind == MEMBER)


def _good_lines(tmp_path) -> list[bytes]:
    path = tmp_path / "good.csv"
    write_csv([LINE_BREAK, FRAME, ARCHIVED], path)  # the first record takes lines 2-3
    lines = path.read_bytes().split(b"\r\n")[:-1]
    assert len(lines) == 4 and b"\n" in lines[1]  # header, lines 2-3, line 4, line 5
    return lines


@pytest.mark.parametrize("change, line, words", [
    (lambda lines: lines[:3] + [lines[3] + b",extra"], 5, "12 fields instead of 11"),
    (lambda lines: lines[:3] + [lines[3].replace(b",000000", b",0000zz")], 5, "crc32 '0000zz00'"),
    (lambda lines: lines[:3] + [lines[3].replace(b",1000,", b",1 000,", 1)], 5, "size_bytes '1 000'"),
    (lambda lines: lines[:3] + [lines[3].replace(b"T13:02:11Z", b"T14:02:11Z")], 5, "is not mtime_ns"),
    (lambda lines: lines[:3] + [lines[3].replace(b",member,", b",memb,")], 5, "kind 'memb'"),
    (lambda lines: lines[:3] + [b"", lines[3]], 5, "empty line"),
    (lambda lines: lines[:3] + [b'"/data/unterminated,1,'], 5, "unexpected end of data"),
    (lambda lines: lines[:3] + [lines[3].replace(b"Microscope", b"Micro\xe9scope")], 5, "not UTF-8 text"),
    (lambda lines: [lines[0].replace(b"size_bytes", b"size")] + lines[1:], 1, "not the inventory header"),
    (lambda lines: [lines[0] + b",sha256"] + lines[1:], 1, "newer version of this tool"),
    (lambda lines: [], 1, "empty"),
])
def test_a_damaged_file_is_reported_with_its_name_and_line(tmp_path, change, line, words):
    path = tmp_path / "damaged.csv"
    lines = change(_good_lines(tmp_path))
    path.write_bytes(b"\r\n".join(lines) + (b"\r\n" if lines else b""))
    with pytest.raises(InventoryError) as caught:
        list(read_csv(path, "/Lab/2024/damaged.csv"))
    message = str(caught.value)
    assert message.startswith(f"inventory /Lab/2024/damaged.csv, line {line}: "), message
    assert words in message
    assert caught.value.paths == ["/Lab/2024/damaged.csv"]


def test_records_before_the_damage_are_given_one_at_a_time(tmp_path):
    lines = _good_lines(tmp_path)
    text = b"".join(line + b"\r\n" for line in lines[:3]).decode("utf-8-sig") + "broken\r\n"
    records = read_csv(piece + "\n" for piece in text.split("\n")[:-1])  # lines as a file gives them
    assert next(records) == LINE_BREAK
    assert next(records) == FRAME
    with pytest.raises(InventoryError, match="line 5: 1 fields instead of 11"):
        next(records)


# ============================================================================ names


def test_inventory_names_are_recognisable_and_valid_in_dropbox():
    assert inventory.archive_inventory_name("s3.zip") == "s3.zip.inventory.csv"
    first = inventory.row_inventory_name(r"D:\Microscope\2024")
    other = inventory.row_inventory_name(r"E:\Copy\2024")
    assert first.startswith("_inventory_2024_") and first.endswith(".csv") and first != other
    assert inventory.row_inventory_name(r"D:\Microscope\2024") == first  # a rerun replaces its own
    assert inventory.row_inventory_name("D:\\").startswith("_inventory_D__")
    assert inventory.row_inventory_name("/").startswith("_inventory_root_")
    assert inventory.row_inventory_name("/data/a:b?\n\udce9 .").startswith("_inventory_a_b____")
    long_archive = inventory.archive_inventory_name("é" * 250 + ".zip")
    long_row = inventory.row_inventory_name("/data/" + "x" * 300)
    for name in (first, long_archive, long_row, inventory.row_inventory_name("/data/" + "x" * 230 + " .")):
        assert name_problem(name) is None, name
        assert inventory.is_inventory_name(name)
    assert long_archive != inventory.archive_inventory_name("é" * 251 + ".zip")
    assert not inventory.is_inventory_name("s3.zip") and not inventory.is_inventory_name("inventory.csv")


# ============================================================================ cache and search


@pytest.fixture
def cache(tmp_path):
    with Cache(tmp_path / "cache.sqlite") as opened:
        yield opened


LAB = [
    member(r"D:\Microscope\2024\s3\frame_0412.tif"),
    member(r"D:\Microscope\2024\s3\FRAME_0413.TIF"),
    member(r"D:\Microscope\2024\s3\metadata.xml", size=20),
    member(r"D:\Microscope\2024\s4\frame_0412.tif", archive="s4.zip", parts=2),
    member(r"D:\Microscope\2024\s4\metadata.xml", archive="s4.zip", parts=2),
]
ROW = [
    plain("/data/Élan/metadata.xml", "notes/metadata.xml"),
    plain("/data/Élan/frame[1].tif", "notes/frame[1].tif"),
    Record("/data/Élan/movie.mrc", 9 * 10**9, MARCH, PARTS, "big/movie.mrc", parts=3),
]


def _loaded(cache: Cache) -> Cache:
    cache.load("/Lab/Microscope/2024/s3.zip.inventory.csv", "rev1", LAB[:3])
    cache.load("/Lab/Microscope/2024/s4.zip.inventory.csv", "rev1", LAB[3:])
    cache.load("/Lab/_inventory_Élan_01234567.csv", "rev1", ROW)
    return cache


def found(cache: Cache, folder: str, pattern: str) -> list[str]:
    return sorted(match.original_path for match in search(cache, folder, pattern))


def test_a_name_glob_ignores_case_as_dropbox_does(cache):
    _loaded(cache)
    assert found(cache, "", "frame_0412.tif") == [LAB[0].original_path, LAB[3].original_path]
    assert found(cache, "", "FRAME_041?.tif") == [LAB[1].original_path, LAB[0].original_path,
                                                   LAB[3].original_path]
    assert found(cache, "/", "*.XML") == sorted([LAB[2].original_path, LAB[4].original_path, ROW[0].original_path])
    assert found(cache, "", "frame[1].tif") == [ROW[1].original_path]  # [ is a plain character
    assert found(cache, "", "frame[1]*") == [ROW[1].original_path]
    assert found(cache, "", "frame1.tif") == []
    assert found(cache, "", "frame_0412") == []  # a name is matched whole


def test_a_path_glob_matches_the_original_path_with_either_separator(cache):
    _loaded(cache)
    assert found(cache, "", r"*\s3\frame_*") == sorted([LAB[0].original_path, LAB[1].original_path])
    assert found(cache, "", "s3/frame_*") == sorted([LAB[0].original_path, LAB[1].original_path])
    assert found(cache, "", r"d:\microscope\*\metadata.xml") == sorted([LAB[2].original_path, LAB[4].original_path])
    assert found(cache, "", r"microscope\*\metadata.xml") == sorted([LAB[2].original_path, LAB[4].original_path])
    assert found(cache, "", r"\2024\s4\*") == []  # rooted: from the start of the path
    assert found(cache, "", r"/DATA/élan/*") == sorted(r.original_path for r in ROW)
    assert found(cache, "", unicodedata.normalize("NFD", "élan/movie.*")) == [ROW[2].original_path]
    assert found(cache, "", "2024/s") == []


def test_a_folder_keeps_what_lives_under_it(cache):
    _loaded(cache)
    every = sorted(r.original_path for r in LAB + ROW)
    assert found(cache, "", "*") == every and found(cache, "/", "*") == every
    assert found(cache, "/lab", "*") == every
    assert found(cache, "/LAB/microscope/2024/", "*") == sorted(r.original_path for r in LAB)
    assert found(cache, "/Lab/Microscope/2024/s4.zip", "*") == [LAB[3].original_path, LAB[4].original_path]
    assert found(cache, "/Lab/Notes", "*") == sorted([ROW[0].original_path, ROW[1].original_path])
    assert found(cache, "/Lab/not", "*") == []  # a prefix of a name is not its folder
    assert found(cache, "/Lab/Microscope/2025", "*") == []
    assert found(cache, "/Other", "*") == []


def test_a_match_says_where_the_file_is_and_what_fetching_it_costs(cache):
    _loaded(cache)
    (archived,) = search(cache, "/Lab/Microscope/2024/s4.zip", "frame_0412.tif")
    assert archived.dropbox_path == "/Lab/Microscope/2024/s4.zip"
    assert archived.inventory == "/Lab/Microscope/2024/s4.zip.inventory.csv"
    assert (archived.member, archived.crc32, archived.header_offset, archived.parts) == ("s4/frame_0412.tif",
                                                                                       0x1A2B3C4D, 4096, 2)
    assert archived.download_size == 500 and archived.size == 1000
    assert archived.where == "/Lab/Microscope/2024/s4.zip (2 parts): s4/frame_0412.tif"
    assert archived.modified.isoformat() == "2024-03-15T13:02:11.123456+00:00"
    (split,) = search(cache, "", "movie.mrc")
    assert (split.dropbox_path, split.download_size, split.where) == ("/Lab/big/movie.mrc", 9 * 10**9,
                                                                      "/Lab/big/movie.mrc (3 parts)")
    (note,) = search(cache, "", "frame[1].tif")
    assert (note.where, note.member, note.crc32) == ("/Lab/notes/frame[1].tif", "", None)


def test_bad_patterns_and_folders_are_refused(cache):
    for folder, pattern, words in [("", "", "empty"), ("", "  ", "empty"), ("", "a/", "ends with a separator"),
                                   ("Lab", "x", "must start with /"), ("", "x\udce9", "not valid text")]:
        with pytest.raises(ValueError, match=words):
            list(search(cache, folder, pattern))


def test_an_inventory_is_reloaded_only_when_its_rev_changes(tmp_path):
    path = "/Lab/Microscope/2024/s3.zip.inventory.csv"
    opened = []

    def open_records(dropbox_path):
        opened.append(dropbox_path)
        return iter(versions[dropbox_path])

    versions = {path: LAB[:3]}
    with Cache(tmp_path / "cache.sqlite") as cache:
        assert cache.refresh([(path, "rev1")], open_records)["loaded"] == [path]
        assert cache.refresh([(path.upper(), "rev1")], open_records)["unchanged"] == [path.upper()]
        assert opened == [path]
    with Cache(tmp_path / "cache.sqlite") as cache:  # kept on disk
        assert not cache.needs_load(path, "rev1") and cache.needs_load(path, "rev2")
        assert cache.refresh([(path, "rev1")], open_records)["unchanged"] == [path]
        versions[path] = [member(r"D:\Microscope\2024\s3\frame_9999.tif")]
        summary = cache.refresh([(path, "rev2")], open_records)
        assert summary["loaded"] == [path] and opened == [path, path]
        assert found(cache, "", "frame_0412.tif") == [] and len(found(cache, "", "frame_9999.tif")) == 1
        assert [(s.dropbox_path, s.rev, s.entries) for s in cache.sources()] == [(path, "rev2", 1)]


def test_refresh_drops_inventories_gone_from_the_folder_and_reports_damaged_ones(cache):
    _loaded(cache)

    def damaged(dropbox_path):
        yield LAB[0]
        raise InventoryError(f"inventory {dropbox_path}, line 3: 12 fields instead of 11", paths=[dropbox_path])

    s3 = "/Lab/Microscope/2024/s3.zip.inventory.csv"
    summary = cache.refresh([(s3, "rev2")], damaged, "/lab/microscope")
    assert summary["dropped"] == ["/Lab/Microscope/2024/s4.zip.inventory.csv"]
    assert [str(e) for e in summary["failed"]] == [f"inventory {s3}, line 3: 12 fields instead of 11"]
    assert summary["loaded"] == []
    # the damaged one is not searched half-loaded, and will be loaded again
    assert found(cache, "", "*") == sorted(r.original_path for r in ROW)
    assert cache.needs_load(s3, "rev2")
    assert [s.dropbox_path for s in cache.sources()] == ["/Lab/_inventory_Élan_01234567.csv"]


def test_an_interrupted_load_leaves_nothing_searchable(tmp_path):
    path = "/Lab/x.inventory.csv"

    def interrupted():
        yield from ROW
        raise KeyboardInterrupt

    with Cache(tmp_path / "cache.sqlite") as cache:
        cache.load(path, "rev1", ROW[:1])
        with pytest.raises(KeyboardInterrupt):
            cache.load(path, "rev2", interrupted())
        assert cache.needs_load(path, "rev1") and cache.needs_load(path, "rev2")
        assert found(cache, "", "*") == []


def test_an_inventory_being_loaded_is_not_searched(tmp_path, monkeypatch):
    monkeypatch.setattr(inventory, "BATCH_ROWS", 1)  # every record committed on its own
    seen = []
    with Cache(tmp_path / "cache.sqlite") as loader, Cache(tmp_path / "cache.sqlite") as reader:
        def records():
            for record in ROW:
                yield record
                seen.append(found(reader, "", "*"))  # another process searching meanwhile

        loader.load("/Lab/x.inventory.csv", "rev1", records())
        assert seen == [[], [], []]
        assert found(reader, "", "*") == sorted(r.original_path for r in ROW)


def test_many_records_are_loaded_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(inventory, "BATCH_ROWS", 7)
    monkeypatch.setattr(inventory, "_REMEMBERED", 3)  # folder and location numbers forgotten and met again
    records = [member(f"D:\\m\\s{n % 5}\\f{n:03d}.tif", archive=f"s{n % 4}.zip", name=f"s/f{n:03d}.tif")
               for n in range(100)]
    with Cache(tmp_path / "cache.sqlite") as cache:
        assert cache.load("/Lab/i.csv", "r", iter(records)) == 100
        matches = list(search(cache, "", "*"))
        assert sorted((m.original_path, m.dropbox_path, m.member) for m in matches) == sorted(
            (r.original_path, "/Lab/" + r.dropbox_path, r.member) for r in records)
        assert len(found(cache, "", r"*\s3\*")) == 20


def test_a_cache_of_another_version_or_damaged_is_rebuilt(tmp_path):
    path = tmp_path / "cache.sqlite"
    with Cache(path) as cache:
        _loaded(cache)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    db.close()
    with Cache(path) as cache:
        assert cache.sources() == [] and found(cache, "", "*") == []
        _loaded(cache)
    path.write_bytes(b"this is not a database" * 100)
    with Cache(path) as cache:
        assert cache.sources() == []
        _loaded(cache)
        assert len(found(cache, "", "*")) == len(LAB + ROW)


# ============================================================================ property


NAME = st.text(alphabet="aAbBéÉßẞ_.[]", min_size=1, max_size=4).filter(lambda n: n.strip(".") != "")


@settings(max_examples=60, deadline=None)
@given(names=st.lists(NAME, min_size=1, max_size=25), folders=st.lists(st.sampled_from(
    ["D:\\Data\\", "D:\\data\\", "/srv/x/", "\\\\nas\\share\\", ""]), min_size=25, max_size=25),
    pick=st.integers(0, 24), shout=st.booleans())
def test_an_exact_name_finds_exactly_the_records_of_that_name(names, folders, pick, shout):
    records = [Record(folders[i] + name, i, i * NS, FILE, f"f{i}") if i % 2 else
               member(folders[i] + name, name=f"m/{name}", size=i) for i, name in enumerate(names)]
    query = names[pick % len(names)]
    query = query.upper() if shout else query
    expected = sorted(r.original_path for r in records if case_key(r.name) == case_key(query))
    with tempfile.TemporaryDirectory() as folder:
        write_csv(records, Path(folder) / "i.csv")
        with Cache(Path(folder) / "cache.sqlite") as cache:
            cache.load("/Lab/i.csv", "r", read_csv(Path(folder) / "i.csv"))
            matches = list(search(cache, "", query))
    assert sorted(m.original_path for m in matches) == expected
    assert all(case_key(m.original_path.rsplit("\\", 1)[-1].rsplit("/", 1)[-1]) == case_key(query)
               for m in matches)
