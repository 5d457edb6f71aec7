"""The inventories a desktop-app upload leaves in Dropbox (issue 16): app.py in desktop-app mode
(sheetName = 'dropboxUpload_APP') with the desktop-app simulator, as tests/test_desktop_upload.py
runs it. The inventories go through the API after each batch is verified and before any of its
originals is deleted; the row inventory then lists every batch's files."""

from __future__ import annotations

import re
import shutil
import zipfile

from conftest import make_tree
from tests.test_desktop_upload import KB, World, data_files, results, world  # noqa: F401 - `world`: a fixture
from tests.test_inventory_upload import (SPLIT_LIMIT_GB, archives, expected_members,  # noqa: F401 - a fixture
                                         records_at, row_inventory)

from archive_dropbox import inventory


def inventories(w: World) -> set[str]:
    return {path for path in w.server.files() if inventory.is_inventory_name(path.rsplit("/", 1)[1])}


def positions(text: str, pattern: str) -> list[int]:
    return [match.start() for match in re.finditer(pattern, text)]


def test_a_row_of_a_file_a_split_file_and_archives_leaves_its_inventories_and_a_rerun_ignores_their_copies(
        world: World, archives):
    row = make_tree(world.data / "row", {"notes.txt": b"lab notes\n", "big.bin": 130_000})
    for name in ("s3", "tiny"):  # archives of 2_zipDir.py; s3.zip is split on the way
        shutil.copy2(archives[name], row / f"{name}.zip")
    book = world.book([[str(row), str(world.dropbox / "Archive" / "row"), 0]])

    first = world.run(book, "--fileSizeLimit_GB", SPLIT_LIMIT_GB)

    assert first.returncode == 0, world.last_log()
    row_path = row_inventory("/Archive/row", row)
    assert inventories(world) == {row_path, "/Archive/row/s3.zip.inventory.csv", "/Archive/row/tiny.zip.inventory.csv"}
    assert records_at(world.server, "/Archive/row/s3.zip.inventory.csv") == expected_members(row / "s3.zip", row, 2)
    assert records_at(world.server, "/Archive/row/tiny.zip.inventory.csv") == expected_members(row / "tiny.zip",
                                                                                             row, 0)
    assert {"/Archive/row/s3.zip_split_0002", "/Archive/row/big.bin_split_0003"} <= data_files(world)
    # The archives are listed by member only; the other originals where they are, with their own size and date.
    listed = {record.original_path: record for record in records_at(world.server, row_path)}
    assert sorted(listed) == [str(row / "big.bin"), str(row / "notes.txt")]
    for name, kind, where, parts in (("notes.txt", inventory.FILE, "notes.txt", 0),
                                     ("big.bin", inventory.PARTS, "big.bin", 3)):
        record, info = listed[str(row / name)], (row / name).stat()
        assert (record.kind, record.dropbox_path, record.parts) == (kind, where, parts)
        assert (record.size, record.mtime_ns) == (info.st_size, info.st_mtime_ns)

    # The desktop app syncs the inventories down into the Dropbox folder. A rerun with a new file
    # copies the new file only, never the CSVs, and rewrites only the row inventory.
    for path in inventories(world):
        local = world.dropbox / path.lstrip("/")
        local.write_bytes(world.server.read_file(path))
    assert world.app.wait_idle(30)
    (row / "late.txt").write_bytes(b"added later")
    world.server.clear_log()

    second = world.run(book, "--fileSizeLimit_GB", SPLIT_LIMIT_GB)

    assert second.returncode == 0, world.last_log()
    assert results(world.last_log()) == [("COPIED", "/Archive/row/late.txt"), ("VERIFIED", "/Archive/row/late.txt")]
    assert [call["path"] for call in world.server.calls("files/upload")] == [row_path]
    assert sorted(r.original_path for r in records_at(world.server, row_path)) == [
        str(row / "big.bin"), str(row / "late.txt"), str(row / "notes.txt")]
    assert all((world.dropbox / path.lstrip("/")).is_file() for path in inventories(world))


def test_each_batch_has_its_inventory_in_dropbox_before_its_originals_go(world: World):
    names = [f"f{i}.bin" for i in range(4)]
    data = make_tree(world.data / "run", {name: 300 * KB for name in names})
    before = {name: (data / name).stat() for name in names}
    book = world.book([[str(data), str(world.dropbox / "out"), 1]])
    row_path = row_inventory("/out", data)
    first_batch, second_batch = [data / n for n in names[:2]], [data / n for n in names[2:]]

    # Plain files only: every files/upload of the run is the row inventory, once per batch.
    hold = world.server.hold("files/upload")
    process = world.start(book, "--batchSize_GB", "0.0007")  # two files per batch
    assert hold.wait_held(1, timeout=120), "no inventory was uploaded"
    assert all(p.exists() for p in first_batch + second_batch)
    assert not (world.dropbox / "out" / names[2]).exists()  # batch 2 waits for batch 1
    second_hold = world.server.hold("files/upload")
    hold.release()
    assert second_hold.wait_held(1, timeout=120), "batch 2's inventory was not uploaded"
    assert not any(p.exists() for p in first_batch)  # batch 1's inventory arrived: its originals went
    assert all(p.exists() for p in second_batch)
    second_hold.release()
    assert process.wait(timeout=120) == 0, world.last_log()

    assert not any(p.exists() for p in second_batch)
    uploads = [i for i, call in enumerate(world.server.calls()) if call["route"] == "files/upload"]
    calls = world.server.calls()
    assert [calls[i]["path"] for i in uploads] == [row_path, row_path]
    assert all(calls[i]["status"] == 200 for i in uploads)
    # The deletion gate asks Dropbox about each batch's files after that batch's inventory is in.
    for upload, batch in zip(uploads, (names[:2], names[2:])):
        looks = [i for i, call in enumerate(calls) if call["route"] == "files/get_metadata"
                 and call["path"].lower() in {f"/out/{n}" for n in batch}]
        assert looks and max(looks) > upload
    log = world.last_log()
    written, deleted = positions(log, r"INVENTORY\t/out/_inventory_"), positions(log, r"DELETED 2 original")
    assert len(written) == len(deleted) == 2
    assert written[0] < deleted[0] < written[1] < deleted[1]

    listed = {record.original_path: record for record in records_at(world.server, row_path)}
    assert sorted(listed) == [str(data / n) for n in names]
    for name in names:
        record = listed[str(data / name)]
        assert (record.kind, record.dropbox_path, record.size, record.mtime_ns) == (
            inventory.FILE, name, before[name].st_size, before[name].st_mtime_ns)


def test_a_row_whose_inventory_cannot_be_written_keeps_the_batch_originals_and_the_run_fails(world: World):
    kept = make_tree(world.data / "A", {"a1.txt": b"a1", "deep/a2.txt": b"a2"})
    gone = make_tree(world.data / "B", {"b1.txt": b"b1"})
    with zipfile.ZipFile(kept / "c.zip", "w") as other:  # another tool's zip: an archive inventory of its own
        other.writestr("inner/data.txt", b"from another tool")
    book = world.book([[str(kept), str(world.dropbox / "A"), 1], [str(gone), str(world.dropbox / "B"), 1]])
    broken = row_inventory("/A", kept)
    world.server.set_faults(corrupt_stored_paths=frozenset({broken}))  # Dropbox stores other bytes than were sent

    first = world.run(book)

    assert first.returncode == 1, world.last_log()
    log = world.last_log()
    assert all((kept / name).exists() for name in ("a1.txt", "deep/a2.txt", "c.zip"))
    assert not (gone / "b1.txt").exists()  # row B's inventory is in Dropbox: its originals went
    assert f"INVENTORY NOT WRITTEN\t{broken}: Dropbox's content hash" in log
    assert "Row 2: its inventory is not complete in Dropbox, so none of its originals is deleted" in log
    assert "Batch 1 verified" in log and log.index("Batch 1 verified") < log.index("INVENTORY NOT WRITTEN")
    assert [r.original_path for r in records_at(world.server, row_inventory("/B", gone))] == [str(gone / "b1.txt")]

    # The user moves the damaged file away: the rerun writes the inventory, then deletes the originals.
    world.server.set_faults()
    world.server.sdk_client().files_delete_v2(broken)
    second = world.run(book)
    assert second.returncode == 0, world.last_log()
    assert not any((kept / name).exists() for name in ("a1.txt", "deep/a2.txt", "c.zip"))
    assert sorted(r.original_path for r in records_at(world.server, broken)) == [
        str(kept / "a1.txt"), str(kept / "c.zip"), str(kept / "deep" / "a2.txt")]
    assert [r.member for r in records_at(world.server, "/A/c.zip.inventory.csv")] == ["inner/data.txt"]
    assert results(world.last_log()) == []  # nothing copied or waited for again
