"""Finding one original file in Dropbox and fetching just it out of its archive (issue 16):
findFiles (app.py, sheetName = 'findFiles') and dropboxDownload_API rows with a `member`, run
as subprocesses against the local Dropbox test server; the reader of archives split into parts
in Dropbox, driven in-process with a stand-in client whose every request is recorded."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import os
import random
import struct
import subprocess
import zipfile
from collections import namedtuple
from pathlib import Path

import openpyxl
import pytest

from conftest import client_env, run_script, write_xlsx
from tests.dropbox_server import DropboxTestServer
from tests.test_download import dropbox, server  # noqa: F401 - one test server per module, faults off per test

from archive_dropbox import find_files, member_fetch, split, transfer, zip_index
from archive_dropbox.dropbox_client import NetworkProblem, RemoteFile
from archive_dropbox.member_fetch import ArchiveChanged, RemoteArchive
from archive_dropbox.transfer import Retrier, RetryPolicy

DOWNLOAD = "dropboxDownload_API"
DOWNLOAD_HEADER = ["dropboxPath", "localDir", "joinFlag", "member"]
FIND = "findFiles"
FILES = 2000
ARCHIVE = "/Lab/2024/session_03.zip"
LOG = logging.getLogger("test_find_and_fetch")


# -- the data ----------------------------------------------------------------------------------


def frame_name(index: int) -> str:
    return f"session_03/hour_{index // 100:02d}/frame_{index:04d}.tif"


def make_session(root: Path) -> dict[str, Path]:
    """2,000 small files in 20 folders, half noise and half text (so Deflate has work), with
    even modification times (a zip keeps 2-second MS-DOS times)."""
    made = {}
    for index in range(FILES):
        path = root / frame_name(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        noise = random.Random(index).randbytes(1200)
        path.write_bytes(noise + b"".join(b"frame %d line %d\n" % (index, n) for n in range(80)))
        moment = 1_700_000_000 + 2 * index
        os.utime(path, (moment, moment))
        made[frame_name(index)] = path
    return made


def zip_session(root: Path, files: dict[str, Path], archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as writer:
        for name in sorted(files):
            writer.write(files[name], name)
    return archive


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The original folder and its archive, made once for the module."""
    root = tmp_path_factory.mktemp("original")
    files = make_session(root)
    archive = zip_session(root, files, root / "session_03.zip")
    return root, files, archive


def app(server: DropboxTestServer, book: Path, logs: Path, sheet: str, *extra: str) -> subprocess.CompletedProcess:
    return run_script("app.py", "--excelName", str(book), "--sheetName", sheet, "--logs", str(logs), "--caBundle",
                      server.ca_file, "--sleepTime_min", "0.01", "--workers", "3", *extra, env=client_env(server))


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def find(server: DropboxTestServer, tmp_path: Path, logs: Path, rows: list[list]) -> subprocess.CompletedProcess:
    book = write_xlsx(tmp_path / "find.xlsx", {FIND: [["dropboxFolder", "pattern"], *rows]})
    return app(server, book, logs, FIND)


def fetch(server: DropboxTestServer, tmp_path: Path, logs: Path, rows: list[list]) -> subprocess.CompletedProcess:
    book = write_xlsx(tmp_path / "fetch.xlsx", {DOWNLOAD: [DOWNLOAD_HEADER, *rows]})
    return app(server, book, logs, DOWNLOAD)


def matches_of(logs: Path) -> list[dict]:
    """The rows of the newest findFiles workbook, as dicts by column name. Two runs in one second
    give `<stamp>_matches.xlsx` then `<stamp>_matches_2.xlsx` (logs.new_log_path)."""
    def order(path: Path) -> tuple[str, int]:
        stamp, _, counter = path.stem.partition("_matches")
        return stamp, int(counter.lstrip("_") or 1)
    workbook = max((logs / "findFiles").glob("*_matches*.xlsx"), key=order)
    sheet = openpyxl.load_workbook(workbook)["matches"]
    rows = list(sheet.iter_rows(values_only=True))
    return [dict(zip(rows[0], row)) for row in rows[1:]]


def downloads(server: DropboxTestServer) -> list[dict]:
    return server.calls("files/download")


def seed_split(server: DropboxTestServer, archive: Path, folder: str, parts: int = 3, *,
               with_manifest: bool = True) -> split.Manifest:
    """The archive stored in the server as the split tool cuts it: `parts` parts and a manifest
    (written straight into the server's store, as if an earlier version had uploaded them;
    without the manifest, as the original tool left them)."""
    data = archive.read_bytes()
    plan = split.plan_split(len(data), len(data) // parts + 1000, archive.name)
    assert len(plan) == parts
    manifest = split.build_manifest(archive.name, len(data), hashlib.sha256(data).hexdigest(), 1_700_000_000.0, plan,
                                    [hashlib.sha256(data[p.offset:p.end]).hexdigest() for p in plan])
    when = dt.datetime(2024, 3, 15, 12, 0, 0)
    for part in plan:
        server.put_file(f"{folder}/{part.name}", data[part.offset:part.end], client_modified=when)
    if with_manifest:
        server.put_file(f"{folder}/{split.manifest_name(archive.name)}", manifest.to_bytes(), client_modified=when)
    return manifest


def member_inside(archive: Path, start: int, end: int) -> tuple[str, int]:
    """A member whose compressed data lies within bytes [start, end) of the archive, and where
    its data starts."""
    data = archive.read_bytes()
    with zipfile.ZipFile(archive) as reader:
        for info in reader.infolist():
            name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
            data_start = info.header_offset + 30 + name_length + extra_length
            if start + 100 < data_start and data_start + info.compress_size < end - 100:
                return info.filename, data_start
    raise AssertionError("no member inside the range")


def same_file(restored: Path, original: Path) -> bool:
    """Same bytes, and the same modification time at the zip's resolution (2 seconds)."""
    return (restored.read_bytes() == original.read_bytes()
            and abs(restored.stat().st_mtime - original.stat().st_mtime) < 2)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".~*"))


# -- the round trip ----------------------------------------------------------------------------


def test_find_one_file_then_fetch_it_and_ten_more_without_downloading_the_archive(dropbox, session, tmp_path):
    root, files, archive = session
    size = archive.stat().st_size
    # Uploaded as a lab does: app.py through the API, split into 3 parts (a limit of a third).
    limit_gb = f"{(size // 3 + 1000) / 1e9:.9f}"
    upload = write_xlsx(tmp_path / "upload.xlsx", {"dropboxUpload_API": [
        ["inputFile", "outputDir", "deleteAfterUpload"], [str(archive), "/Lab/2024", 0]]})
    up = app(dropbox, upload, tmp_path / "upload-logs", "dropboxUpload_API", "--fileSizeLimit_GB", limit_gb,
             "--chunkSize_MB", "4")
    assert up.returncode == 0, output(up)
    stored = dropbox.files()
    assert [p for p in stored if p.startswith(ARCHIVE + "_split_0")] == [ARCHIVE + f"_split_000{i}" for i in (1, 2, 3)]

    # Another computer, years later: no journal, no cache, no local file.
    logs, restore = tmp_path / "fresh-logs", tmp_path / "restore"
    dropbox.clear_log()
    found = find(dropbox, tmp_path, logs, [["/Lab", "FRAME_0412.tif"]])
    assert found.returncode == 0, output(found)
    [match] = matches_of(logs)
    assert match["dropboxPath"] == ARCHIVE and match["member"] == frame_name(412)
    assert match["original path"].replace("\\", "/").endswith(frame_name(412))
    assert match["size (bytes)"] == files[frame_name(412)].stat().st_size
    assert 0 < match["download size (bytes)"] < match["size (bytes)"]
    assert "1 match(es)" in output(found) and str(logs / "findFiles") in output(found)
    searched = downloads(dropbox)
    # The upload wrote the archive's inventory: the search reads inventories only, never the archive.
    assert searched and all(".inventory.csv" in c["path"] or "/_inventory_" in c["path"] for c in searched), searched

    dropbox.clear_log()
    got = fetch(dropbox, tmp_path, logs, [[match["dropboxPath"], str(restore), 0, match["member"]],
                                          [ARCHIVE, str(restore), 0, "frame_000?.tif"]])
    assert got.returncode == 0, output(got)
    wanted = [frame_name(412)] + [frame_name(i) for i in range(10)]
    restored = sorted(p.relative_to(restore).as_posix() for p in restore.rglob("*") if p.is_file())
    assert restored == sorted(wanted)
    assert all(same_file(restore / name, files[name]) for name in wanted)
    assert leftovers(restore) == []
    # Only byte ranges: the table of contents and the members' own bytes (the ten neighbours in
    # one request), never a whole part.
    calls = downloads(dropbox)
    assert len(calls) <= 8, calls
    assert sum(call["bytes_out"] for call in calls) < size / 10
    assert "Archive members: 11 fetched now" in output(got)

    # A rerun finds them done: the table of contents is read again, no member's bytes.
    dropbox.clear_log()
    again = fetch(dropbox, tmp_path, logs, [[ARCHIVE, str(restore), 0, frame_name(412)],
                                            [ARCHIVE, str(restore), 0, "frame_000?.tif"]])
    assert again.returncode == 0, output(again)
    assert "11 done in earlier runs" in output(again)
    assert sum(call["bytes_out"] for call in downloads(dropbox)) <= sum(call["bytes_out"] for call in searched)


def test_an_archive_without_inventory_is_read_by_ranges_once_and_gets_its_inventory(dropbox, session, tmp_path):
    root, files, archive = session
    seed_split(dropbox, archive, "/Old/2019")
    dropbox.put_file("/Old/2019/notes/inventory.txt", b"not an inventory")
    logs = tmp_path / "logs"
    first = find(dropbox, tmp_path, logs, [["/Old", "hour_07/frame_07*"], ["/Old/2019", "nothing-like-this*"]])
    assert first.returncode == 0, output(first)
    found = matches_of(logs)
    assert sorted(m["member"] for m in found) == [frame_name(i) for i in range(700, 800)]
    # Without an inventory the original path is the member's under the archive's folder.
    assert found[0]["original path"] == "/Old/2019/" + frame_name(700)
    assert found[0]["where it is"] == f"/Old/2019/session_03.zip (3 parts): {frame_name(700)}"
    assert "0 match(es)" in output(first) and "check the pattern" in output(first)
    toc_calls = [c for c in downloads(dropbox) if "_split_0" in c["path"]]
    assert 1 <= len(toc_calls) <= 4 and sum(c["bytes_out"] for c in toc_calls) < archive.stat().st_size / 10
    # The inventory it would have was written beside the archive (never over another file).
    inventory_path = "/Old/2019/session_03.zip.inventory.csv"
    assert inventory_path in dropbox.files()
    assert dropbox.read_file(inventory_path).startswith(b"\xef\xbb\xbforiginal_path,size_bytes")

    # The next search reads that inventory (one small file), not the archive; the one after, nothing.
    dropbox.clear_log()
    second = find(dropbox, tmp_path, logs, [["/Old", "frame_0123.tif"]])
    assert second.returncode == 0, output(second)
    assert [c["path"] for c in downloads(dropbox)] == [inventory_path.lower()]
    assert [m["member"] for m in matches_of(logs)] == [frame_name(123)]
    dropbox.clear_log()
    third = find(dropbox, tmp_path, logs, [["/Old", "frame_0123.tif"]])
    assert third.returncode == 0 and downloads(dropbox) == [], output(third)


def test_parts_without_a_manifest_are_found_and_read_in_order(dropbox, session, tmp_path):
    root, files, archive = session
    seed_split(dropbox, archive, "/Bare", 4, with_manifest=False)
    logs, restore = tmp_path / "logs", tmp_path / "restore"
    found = find(dropbox, tmp_path, logs, [["/Bare", "frame_1999.tif"]])
    assert found.returncode == 0, output(found)
    [match] = matches_of(logs)
    assert match["where it is"] == f"/Bare/session_03.zip (4 parts): {frame_name(1999)}"
    got = fetch(dropbox, tmp_path, logs, [[match["dropboxPath"], str(restore), 0, match["member"]]])
    assert got.returncode == 0, output(got)
    assert same_file(restore / frame_name(1999), files[frame_name(1999)])


def test_a_folder_that_does_not_exist_or_a_bad_pattern_stops_before_any_search(dropbox, tmp_path):
    result = find(dropbox, tmp_path, tmp_path / "logs", [["/No/Such/Folder", "x.tif"], ["/", "a/b/"]])
    assert result.returncode == 2, output(result)
    text = output(result)
    assert "/No/Such/Folder does not exist in Dropbox" in text and "ends with a separator" in text


# -- damage ------------------------------------------------------------------------------------


def test_a_flipped_byte_in_part_two_fails_that_member_only_and_leaves_no_file(dropbox, session, tmp_path):
    root, files, archive = session
    manifest = seed_split(dropbox, archive, "/Damaged")
    second = manifest.parts[1]
    name, data_start = member_inside(archive, second.offset, second.offset + second.size)
    blob = dropbox.file_path_on_disk(f"/Damaged/{second.name}")
    damaged = bytearray(blob.read_bytes())
    damaged[data_start - second.offset + 7] ^= 0x20
    blob.write_bytes(bytes(damaged))  # the stored bytes rot; Dropbox's metadata does not change

    restore = tmp_path / "restore"
    result = fetch(dropbox, tmp_path, tmp_path / "logs", [["/Damaged/session_03.zip", str(restore), 0, name],
                                                          ["/Damaged/session_03.zip", str(restore), 0, frame_name(3)]])
    assert result.returncode == 1, output(result)
    text = output(result)
    assert f"member {name} of archive /Damaged/session_03.zip" in text and "Fetched twice" in text
    assert not (restore / name).exists() and leftovers(restore) == []
    assert same_file(restore / frame_name(3), files[frame_name(3)])


def test_a_part_replaced_by_one_of_another_size_is_reported(dropbox, session, tmp_path):
    root, files, archive = session
    manifest = seed_split(dropbox, archive, "/Replaced")
    dropbox.put_file(f"/Replaced/{manifest.parts[1].name}", os.urandom(manifest.parts[1].size - 10))
    restore = tmp_path / "restore"
    result = fetch(dropbox, tmp_path, tmp_path / "logs", [["/Replaced/session_03.zip", str(restore), 0, "*.tif"]])
    assert result.returncode == 1, output(result)
    assert "session_03.zip_split_0002 has" in output(result) and "was replaced" in output(result)
    assert not restore.exists() or not any(restore.rglob("*.tif"))
    # findFiles reports it too, and still answers for what it can read.
    found = find(dropbox, tmp_path, tmp_path / "logs", [["/Replaced", "*.tif"]])
    assert found.returncode == 1 and "was replaced" in output(found), output(found)


def test_an_old_workbook_without_the_member_column_still_downloads_whole_files(dropbox, tmp_path):
    dropbox.put_file("/Plain/a.txt", b"whole file\n", client_modified=dt.datetime(2022, 1, 2, 3, 4, 6))
    book = write_xlsx(tmp_path / "old.xlsx", {DOWNLOAD: [["dropboxPath", "localDir", "joinFlag"],
                                                         ["/Plain/a.txt", str(tmp_path / "r"), 0]]})
    result = app(dropbox, book, tmp_path / "logs", DOWNLOAD)
    assert result.returncode == 0, output(result)
    assert (tmp_path / "r" / "a.txt").read_bytes() == b"whole file\n"


# -- the reader over parts, in-process ---------------------------------------------------------


class PartsClient:
    """A stand-in DropboxClient serving files from memory; records every ranged request.
    `drop_next` makes the next answer end early (NetworkProblem, as a cut connection does)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = {path.lower(): data for path, data in files.items()}
        self.revs = {path: "0123456789a" for path in self.files}
        self.calls: list[tuple[str, int, int | None]] = []
        self.drop_next = 0

    def remote(self, path: str) -> RemoteFile:
        key = path.lower()
        return RemoteFile(path, key, len(self.files[key]), None, dt.datetime(2024, 3, 15, 12), self.revs[key])

    def download_range(self, path: str, start: int = 0, end: int | None = None, chunk_size: int = 0):
        data = self.files[path]
        self.calls.append((path, start, end))
        stop = len(data) if end is None else min(end, len(data))
        dropping = self.drop_next > 0
        self.drop_next -= dropping

        def chunks():
            if dropping:
                yield data[start:start + 1]
                raise NetworkProblem("download: the connection ended early")
            yield data[start:stop]

        return self.remote(path), chunks()


def split_client(data: bytes, cuts: list[int], folder: str = "/A") -> tuple[PartsClient, RemoteArchive]:
    bounds = [0, *cuts, len(data)]
    names = [split.part_name("x.zip", i, len(bounds) - 1) for i in range(1, len(bounds))]
    client = PartsClient({f"{folder}/{n}": data[a:b] for n, a, b in zip(names, bounds, bounds[1:])})
    archive = member_fetch.split_archive(f"{folder}/x.zip", [client.remote(f"{folder}/{n}") for n in reversed(names)],
                                         None)
    return client, archive


def retrier() -> Retrier:
    return Retrier(LOG, RetryPolicy(give_up_seconds=30, first_delay=0.01, max_delay=0.01))


def sample_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as writer:
        for index in range(40):
            writer.writestr(f"d{index % 4}/file_{index:02d}.txt", (f"line {index}\n" * (50 + 300 * index)).encode())
        writer.writestr("z/noise.bin", random.Random(7).randbytes(600_000))  # more than SPAN_GAP apart:
        writer.writestr("z/after.txt", b"after the noise\n")                # not fetched together
    return buffer.getvalue()


def test_the_reader_asks_each_part_for_exactly_the_bytes_it_holds():
    data = sample_zip()
    cuts = [len(data) // 3, 2 * len(data) // 3]
    client, archive = split_client(data, cuts)
    assert [p.path_lower for p in archive.parts] == ["/a/x.zip_split_0001", "/a/x.zip_split_0002", "/a/x.zip_split_0003"]
    assert archive.size == len(data) and archive.part_count == 3
    reader = member_fetch.open_reader(archive, client, retrier())
    assert reader.read(cuts[0] - 5, 10) == data[cuts[0] - 5:cuts[0] + 5]
    assert client.calls == [("/a/x.zip_split_0001", cuts[0] - 5, cuts[0]), ("/a/x.zip_split_0002", 0, 5)]
    directory, toc_reader = member_fetch.read_toc(archive, client, retrier())
    reference = zipfile.ZipFile(io.BytesIO(data))
    assert [m.name for m in directory] == reference.namelist()
    for member in directory:
        out = bytearray()
        zip_index.fetch_member(member_fetch.open_reader(archive, client, retrier()), member, out.extend)
        assert bytes(out) == reference.read(member.name)


def test_a_cut_connection_is_asked_again_and_a_part_changed_since_the_toc_is_reported():
    data = sample_zip()
    client, archive = split_client(data, [len(data) // 2])
    directory, _ = member_fetch.read_toc(archive, client, retrier())
    member = directory.find("z/after.txt")  # in the second part
    client.drop_next = 1
    out = bytearray()
    zip_index.fetch_member(member_fetch.open_reader(archive, client, retrier()), member, out.extend)
    assert bytes(out) == zipfile.ZipFile(io.BytesIO(data)).read(member.name)
    client.revs["/a/x.zip_split_0002"] = "fedcba98765"  # rewritten in Dropbox after the listing
    with pytest.raises(ArchiveChanged, match="changed in Dropbox after its table of contents was read"):
        zip_index.fetch_member(member_fetch.open_reader(archive, client, retrier()), member, bytearray().extend)


def test_parts_that_do_not_match_their_manifest_or_their_numbers_are_reported():
    data = sample_zip()
    client, archive = split_client(data, [1000, 2000])
    plan = [split.PartPlan(i + 1, a, b - a, split.part_name("x.zip", i + 1, 3))
            for i, (a, b) in enumerate(zip([0, 1000, 2000], [1000, 2000, len(data)]))]
    manifest = split.build_manifest("x.zip", len(data), "0" * 64, 0.0, plan, ["0" * 64] * 3)
    parts = list(archive.parts)
    assert member_fetch.split_archive("/A/x.zip", parts, manifest).sizes == (1000, 1000, len(data) - 2000)
    shorter = RemoteFile("/A/x.zip_split_0002", "/a/x.zip_split_0002", 999, None, parts[1].client_modified, "1")
    with pytest.raises(ArchiveChanged, match="has 999 bytes in Dropbox where its manifest says 1,000"):
        member_fetch.split_archive("/A/x.zip", [parts[0], shorter, parts[2]], manifest).check_sizes()
    with pytest.raises(ArchiveChanged, match="x.zip_split_0002 is missing"):
        member_fetch.split_archive("/A/x.zip", [parts[0], parts[2]], manifest)
    with pytest.raises(ArchiveChanged, match="part number 2 is missing"):
        member_fetch.split_archive("/A/x.zip", [parts[0], parts[2]], None)


def test_neighbouring_members_come_in_one_request():
    data = sample_zip()
    client, archive = split_client(data, [len(data) // 2])
    directory, _ = member_fetch.read_toc(archive, client, retrier())
    chosen = member_fetch.select_members(directory, "file_0?.txt")
    assert [m.name for m in chosen] == [f"d{i % 4}/file_{i:02d}.txt" for i in range(10)]
    row = None
    tasks = [member_fetch.MemberTask(row, archive, m, Path("/x") / m.name, 0) for m in chosen]
    [group] = member_fetch.spans(tasks)
    reader = member_fetch.SpanReader(member_fetch.open_reader(archive, client, retrier()),
                                     *(member_fetch.member_span(chosen[0])[0], member_fetch.member_span(chosen[-1])[1]))
    before = len(client.calls)
    for member in chosen:
        out = bytearray()
        zip_index.fetch_member(reader, member, out.extend)
        assert len(out) == member.size
    assert len(client.calls) - before == 1
    far = [member_fetch.MemberTask(row, archive, directory.find(n), Path("/x"), 0)
           for n in ("d0/file_00.txt", "z/after.txt")]
    assert len(member_fetch.spans(far)) == 2


@pytest.mark.parametrize("pattern, name, matches", [
    ("frame_0412.tif", "s3/h/FRAME_0412.TIF", True),
    ("frame_04*.tif", "s3/h/frame_0412.tif", True),
    ("frame_04*.tif", "s3/frame_04/other.tif", False),
    ("s3/*.xml", "top/s3/h/metadata.xml", True),
    ("/s3/h/frame_0412.tif", "s3/h/frame_0412.tif", True),
    ("h/frame_0412.tif", "s3/xh/frame_0412.tif", False),
    ("[ab].txt", "[ab].txt", True),
    ("[ab].txt", "a.txt", False),
])
def test_member_patterns(pattern, name, matches):
    assert member_fetch.member_matcher(pattern)(name) is matches


def test_member_names_that_would_leave_local_dir_are_refused():
    def member(name: str, attributes: int = 0, system: int = 0) -> zip_index.Member:
        return zip_index.Member("a.zip", name, name.encode(), 0, 0, 0, 0, 0, 0, 100, None, None, attributes, system,
                                None)

    base = Path("/restore")
    assert member_fetch.member_target(base, member("s3/./x/a.tif")) == (base / "s3" / "x" / "a.tif", None)
    assert member_fetch.member_target(base, member("s3\\x\\a.tif"))[0] == base / "s3" / "x" / "a.tif"
    for name in ("../a.tif", "/etc/a.tif", "C:/a.tif", "s3/../../a.tif"):
        assert member_fetch.member_target(base, member(name))[0] is None, name
    link = member("s3/link", attributes=0o120777 << 16, system=3)
    assert "symbolic link" in member_fetch.member_target(base, link)[1]


def test_the_survey_finds_archives_without_an_inventory():
    def remote(path: str) -> RemoteFile:
        return RemoteFile(path, path.lower(), 10, None, dt.datetime(2024, 1, 1), "0123456789a")

    listing = [remote(p) for p in ("/L/a.zip", "/L/a.zip.inventory.csv", "/L/b.zip", "/L/c.zip_split_0002",
                                   "/L/c.zip_split_0001", "/L/c.zip_split_manifest.json", "/L/_inventory_x_01234567.csv",
                                   "/L/d.mrc_split_0001", "/L/e.txt")]
    relevant = [entry for entry in listing if find_files._is_relevant(entry)]
    assert relevant == listing[:7]
    found = find_files.survey(relevant)
    assert [e.path_display for e in found.inventories] == ["/L/a.zip.inventory.csv", "/L/_inventory_x_01234567.csv"]
    assert [(c.path, c.split, len(c.files), c.manifest is not None) for c in found.candidates] == [
        ("/L/b.zip", False, 1, False), ("/L/c.zip", True, 2, True)]
    assert found.candidates[1].inventory_path == "/L/c.zip.inventory.csv"
    assert found.candidates[1].rev.startswith(find_files.TOC_REV_PREFIX)
    assert find_files.folders_to_list(["/L/x", "/l", "/M", "/L/x/y"]) == ["/M", "/l"]
    assert find_files.folders_to_list(["/A", "/"]) == ["/"]


# -- Stage 2 of member rows, in-process ----------------------------------------------------------


def fetcher_for(client: PartsClient, usage=lambda _: PLENTY, sleep_seconds: float = 0) -> member_fetch.MemberFetcher:
    return member_fetch.MemberFetcher(client, None, LOG, pauses=transfer.Pauses(LOG, sleep_seconds, usage=usage),
                                      workers=2, first_retry_delay=0.01)


def tasks_for(archive: RemoteArchive, directory, names: list[str], folder: Path) -> list[member_fetch.MemberTask]:
    return [member_fetch.MemberTask(None, archive, directory.find(name), folder / name, 1_700_000_000_000_000_000)
            for name in names]


PLENTY = namedtuple("Usage", "free")(1 << 50)


def test_files_already_there_are_kept_a_different_one_is_reported_a_leftover_partial_starts_over(tmp_path):
    data = sample_zip()
    reference = zipfile.ZipFile(io.BytesIO(data))
    client, archive = split_client(data, [len(data) // 3, 2 * len(data) // 3])
    directory, _ = member_fetch.read_toc(archive, client, retrier())
    names = ["d0/file_00.txt", "d1/file_01.txt", "d2/file_02.txt", "z/after.txt"]
    tasks = tasks_for(archive, directory, names, tmp_path)
    (tmp_path / "d0").mkdir()
    (tmp_path / "d0" / "file_00.txt").write_bytes(reference.read("d0/file_00.txt"))  # identical
    (tmp_path / "d1").mkdir()
    different = b"x" * directory.find("d1/file_01.txt").size
    (tmp_path / "d1" / "file_01.txt").write_bytes(different)  # same size, other content
    (tmp_path / "d2").mkdir()
    tasks[2].partial.write_bytes(b"left by a run that was stopped" * 1000)

    counts = fetcher_for(client).run(tasks)

    assert (counts.fetched, counts.already_here) == (2, 1)
    [(source, why)] = counts.failures
    assert source == "/A/x.zip: d1/file_01.txt" and "a different file already exists" in why
    assert (tmp_path / "d1" / "file_01.txt").read_bytes() == different
    for name in ("d0/file_00.txt", "d2/file_02.txt", "z/after.txt"):
        assert (tmp_path / name).read_bytes() == reference.read(name)
        assert (tmp_path / name).stat().st_mtime_ns == 1_700_000_000_000_000_000
    assert leftovers(tmp_path) == []


def test_a_damaged_member_is_fetched_twice_then_reported_and_never_gets_its_name(tmp_path):
    data = bytearray(sample_zip())
    reference = zipfile.ZipFile(io.BytesIO(bytes(data)))
    info = reference.getinfo("d3/file_39.txt")
    name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + name_length + extra_length + 20] ^= 0x01
    client, archive = split_client(bytes(data), [len(data) // 2])
    directory, _ = member_fetch.read_toc(archive, client, retrier())
    tasks = tasks_for(archive, directory, ["d3/file_39.txt", "d3/file_35.txt"], tmp_path)

    counts = fetcher_for(client).run(tasks)

    assert counts.fetched == 1 and (tmp_path / "d3" / "file_35.txt").read_bytes() == reference.read("d3/file_35.txt")
    [(source, why)] = counts.failures
    assert source.endswith("d3/file_39.txt") and "Fetched twice" in why
    assert not (tmp_path / "d3" / "file_39.txt").exists() and leftovers(tmp_path) == []


def test_a_full_local_disk_pauses_the_member_until_there_is_room(tmp_path, monkeypatch):
    data = sample_zip()
    client, archive = split_client(data, [len(data) // 2])
    directory, _ = member_fetch.read_toc(archive, client, retrier())
    [task] = tasks_for(archive, directory, ["d2/file_38.txt"], tmp_path)
    naps: list[float] = []
    monkeypatch.setattr(transfer, "nap", lambda seconds, stop=None: naps.append(seconds))
    usage = lambda _: namedtuple("Usage", "free")(1000 if len(naps) < 2 else 1 << 50)  # noqa: E731

    counts = fetcher_for(client, usage, sleep_seconds=1800).run([task])

    assert counts.failures == [] and counts.fetched == 1
    assert task.target.read_bytes() == zipfile.ZipFile(io.BytesIO(data)).read("d2/file_38.txt")
    assert naps == [1800, 1800] and leftovers(tmp_path) == []
