"""The deletion gate: originals are deleted only against proof taken at the moment of deleting
(Dropbox holds identical bytes now, for this account; the local file is unchanged), never on
the word of the journal; `app.py --verify` reports the same truth. Issue 12, cases 1, 2, 3, 7
(case 4 is in test_join_files.py), plus the rule that no other module removes anything."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from archive_dropbox import deletion
from archive_dropbox.content_hash import bytes_content_hash, file_content_hash
from archive_dropbox.journal import Item, Journal
from conftest import REPO, make_tree, script_env, write_xlsx, SYSTEM_CA
from tests.dropbox_server import DropboxTestServer

TAB = "dropboxUpload_API"


def run_app(book: Path, logs: Path, server: DropboxTestServer, *extra: str, env: dict | None = None,
            timeout: float = 240) -> subprocess.CompletedProcess:
    environment = server.client_env(credentials=True)
    environment.update(REQUESTS_CA_BUNDLE=SYSTEM_CA, CURL_CA_BUNDLE=SYSTEM_CA, SSL_CERT_FILE=SYSTEM_CA)
    environment.update(env or {})
    command = [sys.executable, str(REPO / "app.py"), "--excelName", str(book), "--sheetName", TAB,
               "--logs", str(logs), "--caBundle", server.ca_file, "--sleepTime_min", "0.02", *extra]
    return subprocess.run(command, env=script_env(environment), capture_output=True, text=True, encoding="utf-8",
                          timeout=timeout, stdin=subprocess.DEVNULL)


def book(tmp_path: Path, rows: list[list]) -> Path:
    return write_xlsx(tmp_path / "inputs.xlsx", {TAB: [["inputFile", "outputDir", "deleteAfterUpload"], *rows]})


def originals(tree: Path) -> dict[str, bytes]:
    return {p.relative_to(tree).as_posix(): p.read_bytes() for p in tree.rglob("*") if p.is_file()}


def assert_nothing_lost(tree: Path, kept: dict[str, bytes], server: DropboxTestServer, folder: str) -> None:
    """Every original is still on the disk, or Dropbox holds its very bytes now."""
    for relative, data in kept.items():
        local = tree / relative
        if local.exists():
            assert local.read_bytes() == data
            continue
        path = f"{folder}/{relative}"
        assert path in server.files(), f"{relative} is gone from the disk and from Dropbox"
        assert server.content_hash(path) == bytes_content_hash(data), f"{relative}: Dropbox holds other bytes"


def verify_report(logs: Path) -> dict[str, list[str]]:
    """status -> Dropbox paths, from the CSV --verify wrote beside its log."""
    import csv

    report = max((logs / "upload").glob("*.csv"))
    found: dict[str, list[str]] = {}
    with open(report, encoding="utf-8-sig") as handle:
        for row in csv.DictReader(handle):
            found.setdefault(row["status"], []).append(row["Dropbox path"])
    return found


# ============================================================================ case 1


def test_a_rerun_asked_to_delete_checks_dropbox_now_not_the_journal(tmp_path, server):
    tree = make_tree(tmp_path / "data", {"gone.txt": b"deleted by a colleague", "replaced.txt": b"original bytes",
                                         "moved.txt": b"moved away", "kept.txt": b"untouched"})
    before = originals(tree)
    logs = tmp_path / "logs"
    first = run_app(book(tmp_path, [[str(tree), "/Lab", 0]]), logs, server)
    assert first.returncode == 0, first.stdout + first.stderr
    # Meanwhile, in Dropbox:
    dbx = server.sdk_client()
    dbx.files_delete_v2("/Lab/gone.txt")
    server.put_file("/Lab/replaced.txt", b"someone else's bytes")
    dbx.files_delete_v2("/Lab/moved.txt")
    server.put_file("/Elsewhere/moved.txt", b"moved away")

    audit = run_app(book(tmp_path, [[str(tree), "/Lab", 0]]), logs, server, "--verify")
    assert audit.returncode == 1, audit.stdout + audit.stderr
    report = verify_report(logs)
    assert sorted(report["missing"]) == ["/Lab/gone.txt", "/Lab/moved.txt"]
    assert report["different"] == ["/Lab/replaced.txt"] and report["identical"] == ["/Lab/kept.txt"]
    assert "Verify: 1 identical; 2 missing; 1 different" in audit.stdout

    calls = len(server.calls())
    rerun = run_app(book(tmp_path, [[str(tree), "/Lab", 1]]), logs, server)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 1, output  # the replaced file is a conflict (ifExists = 'report')
    assert "already in Dropbox (journal)" not in output
    assert "NOT IN DROPBOX" in output and "replaced by someone" in output
    assert (tree / "replaced.txt").read_bytes() == b"original bytes"  # both kept, and said so
    assert server.read_file("/Lab/replaced.txt") == b"someone else's bytes"
    assert not (tree / "gone.txt").exists() and not (tree / "moved.txt").exists()  # sent again, then deleted
    assert not (tree / "kept.txt").exists()
    assert any(c["route"].startswith("files/upload") for c in server.calls()[calls:])
    assert_nothing_lost(tree, before, server, "/Lab")

    # Overwriting was the user's call to make: then everything is in Dropbox, identical.
    last = run_app(book(tmp_path, [[str(tree), "/Lab", 1]]), logs, server, "--ifExists", "overwrite")
    assert last.returncode == 0, last.stdout + last.stderr
    assert not (tree / "replaced.txt").exists()
    assert_nothing_lost(tree, before, server, "/Lab")
    audit = run_app(book(tmp_path, [[str(tree), "/Lab", 1]]), logs, server, "--verify")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert sorted(verify_report(logs)["deleted, identical"]) == [f"/Lab/{n}" for n in sorted(before)]


# ============================================================================ case 2


def test_another_account_gets_the_files_before_any_original_is_deleted(tmp_path, server):
    tree = make_tree(tmp_path / "data", {"a.bin": 5000, "sub/b.bin": 7000, "big.bin": 300_000})
    before = originals(tree)
    logs = tmp_path / "logs"
    first = run_app(book(tmp_path, [[str(tree), "/Lab", 0]]), logs, server, "--fileSizeLimit_GB", "0.0001")
    assert first.returncode == 0, first.stdout + first.stderr
    other = DropboxTestServer(tmp_path / "other-account")
    try:
        assert other.account_id != server.account_id
        audit = run_app(book(tmp_path, [[str(tree), "/Lab", 0]]), logs, other, "--verify",
                        "--fileSizeLimit_GB", "0.0001")
        assert audit.returncode == 1 and len(verify_report(logs)["missing"]) == 3, audit.stdout

        rerun = run_app(book(tmp_path, [[str(tree), "/Lab", 1]]), logs, other, "--fileSizeLimit_GB", "0.0001")
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert "another Dropbox account" in rerun.stdout
        assert other.count_calls("files/upload_session/finish_batch_v2") + other.count_calls("files/upload") > 0
        assert not any(p.is_file() for p in tree.rglob("*"))
        assert_nothing_lost(tree, {k: v for k, v in before.items() if k != "big.bin"}, other, "/Lab")
        parts = [p for p in other.files() if p.startswith("/Lab/big.bin_split_0")]
        assert len(parts) == 3 and "/Lab/big.bin_split_manifest.json" in other.files()
        assert b"".join(other.read_file(f"/Lab/big.bin_split_000{i}") for i in (1, 2, 3)) == before["big.bin"]
    finally:
        other.stop()


# ============================================================================ case 3


@pytest.fixture
def world(tmp_path: Path):
    from tests.test_desktop_upload import _world

    yield from _world(tmp_path, team=False)


def test_desktop_app_rerun_looks_in_dropbox_before_deleting(world):
    """A file deleted on dropbox.com (the desktop app then removes its local copy too) is not
    "verified" by a rerun: it is copied again, verified, and only then is its original deleted."""
    data = make_tree(world.data, {"run/a.bin": 3000, "run/b.bin": 4000})
    before = originals(data / "run")
    out = world.dropbox / "Archive"
    first = world.run(world.book([[str(data / "run"), str(out), 0]]))
    assert first.returncode == 0, first.stdout + first.stderr
    world.app.stall()
    world.server.sdk_client().files_delete_v2("/Archive/a.bin")
    (out / "a.bin").unlink()
    world.app.resume()

    rerun = world.run(world.book([[str(data / "run"), str(out), 1]]))
    log = world.last_log()
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "NOT IN DROPBOX\t/Archive/a.bin" in log
    assert log.index("NOT IN DROPBOX") < log.index("COPIED") < log.index("DELETED")
    assert not (data / "run" / "a.bin").exists() and not (data / "run" / "b.bin").exists()
    assert_nothing_lost(data / "run", before, world.server, "/Archive")


# ============================================================================ case 7


DIE_AFTER_UNLINK = '''
import os, signal
_target = os.environ.get("TEST_DIE_AFTER_UNLINK")
if _target:
    _real_unlink = os.unlink
    def _unlink(path, *args, **kwargs):
        _real_unlink(path, *args, **kwargs)
        if os.fspath(path) == _target:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 before the journal hears of it
    os.unlink = _unlink
'''


def test_kill_between_deleting_and_recording_does_not_block_the_rerun(tmp_path, server):
    data = tmp_path / "data"
    make_tree(data, {"single.raw": 40_000, "other/x.txt": b"x"})
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(DIE_AFTER_UNLINK)
    logs = tmp_path / "logs"
    sheet = book(tmp_path, [[str(data / "single.raw"), "/Lab", 1], [str(data / "other"), "/Lab/other", 0]])
    killed = run_app(sheet, logs, server, env={"PYTHONPATH": str(hooks),
                                              "TEST_DIE_AFTER_UNLINK": str(data / "single.raw")})
    assert killed.returncode == -signal.SIGKILL
    assert not (data / "single.raw").exists()
    with Journal(logs / "journal.sqlite3", TAB) as journal:
        assert str(data / "single.raw") in journal.deleted_sources()  # written ahead: "deleting"
    rerun = run_app(sheet, logs, server)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "deletion was interrupted" in rerun.stdout
    assert (data / "other" / "x.txt").exists()


# ============================================================================ the gate itself


class FakeDropbox:
    def __init__(self, files: dict[str, tuple[int, str]]):
        self.files = files
        self.calls = 0

    def metadata(self, path):
        self.calls += 1
        if path.lower() not in self.files:
            return None
        size, content_hash = self.files[path.lower()]
        return type("Remote", (), dict(path_display=path, size=size, content_hash=content_hash))()

    def iter_entries_or_empty(self, folder, recursive=True):
        self.calls += 1
        for path, (size, content_hash) in self.files.items():
            if path.startswith(folder.lower().rstrip("/") + "/"):
                yield type("Remote", (), dict(path_display=path, size=size, content_hash=content_hash))()


def _original(path: Path, *, hashes_local: bool = True, dropbox_path: str = "/d/f.bin"):
    return deletion.UploadedOriginal(path, deletion.LocalIdentity.of(path), [
        deletion.RemoteExpectation(dropbox_path, file_content_hash(path), 0, path.stat().st_size)],
        hashes_local=hashes_local)


def test_gate_deletes_only_identical_unchanged_files(tmp_path, caplog):
    import logging

    log = logging.getLogger("gate")
    good, changed, replaced = (tmp_path / n for n in ("good.bin", "changed.bin", "replaced.bin"))
    for path in (good, changed, replaced):
        path.write_bytes(os.urandom(1000))
    expected = [_original(good, dropbox_path="/d/good.bin"), _original(changed, dropbox_path="/d/changed.bin"),
                _original(replaced, dropbox_path="/d/replaced.bin")]
    client = FakeDropbox({f"/d/{p.name}": (1000, file_content_hash(p)) for p in (good, changed, replaced)})
    changed.write_bytes(os.urandom(1000))  # same size, new bytes, a new modification time
    os.utime(changed, ns=(expected[1].identity.mtime_ns + 10**9, expected[1].identity.mtime_ns + 10**9))
    newcomer = tmp_path / "newcomer"
    newcomer.write_bytes(replaced.read_bytes())
    os.utime(newcomer, ns=(expected[2].identity.mtime_ns, expected[2].identity.mtime_ns))
    os.replace(newcomer, replaced)  # same bytes, size and date, but another file (another inode)
    report = deletion.delete_uploaded_originals(client, expected, journal=None, log=log)
    assert report.deleted == [good] and not good.exists()
    assert changed.exists() and replaced.exists()
    assert {p for p, _ in report.kept} == {changed, replaced}


def test_gate_hashes_the_local_file_when_the_recorded_hash_came_from_dropbox(tmp_path):
    import logging

    path = tmp_path / "f.bin"
    path.write_bytes(b"local bytes")
    claimed = deletion.UploadedOriginal(path, deletion.LocalIdentity.of(path), [
        deletion.RemoteExpectation("/d/f.bin", "dropbox-hash", 0, 11)], hashes_local=False)
    client = FakeDropbox({"/d/f.bin": (11, "dropbox-hash")})
    report = deletion.delete_uploaded_originals(client, [claimed], journal=None, log=logging.getLogger("gate"))
    assert path.exists() and "local bytes differ" in report.kept[0][1]


def test_many_originals_cost_a_listing_not_a_call_each(tmp_path):
    import logging

    files = {}
    batch = []
    for index in range(deletion.METADATA_LOOKUP_LIMIT + 50):
        path = tmp_path / f"f{index}.bin"
        path.write_bytes(index.to_bytes(4, "big"))
        files[f"/d/f{index}.bin"] = (4, file_content_hash(path))
        batch.append(_original(path, dropbox_path=f"/d/f{index}.bin"))
    client = FakeDropbox(files)
    report = deletion.delete_uploaded_originals(client, batch, journal=None, log=logging.getLogger("gate"))
    assert len(report.deleted) == len(batch) and client.calls == 1


def test_write_ahead_mark_is_settled_by_the_next_run(tmp_path):
    source = tmp_path / "x.bin"
    source.write_bytes(b"x")
    with Journal(tmp_path / "journal.sqlite3", TAB) as journal:
        journal.sync_plan([Item(None, TAB, str(source), "/d/x.bin", "file", 0, 1, 1, source.stat().st_mtime_ns)])
        journal.mark_source_deleting(str(source))
        source.unlink()
        assert str(source) in journal.deleted_sources()
        assert journal.finish_interrupted_deletions() == [(str(source), True)]
        assert journal.finish_interrupted_deletions() == []


def test_only_the_gate_removes_anything_from_a_disk():
    """os.remove, unlink, rmtree and rmdir appear in deletion.py only (and in the rename helper
    of localfs, which removes the temporary name it just hard-linked)."""
    pattern = re.compile(r"\b(os\.remove|os\.unlink|\.unlink\(|rmtree|os\.rmdir|\.rmdir\()")
    offenders = []
    files = list((REPO / "archive_dropbox").glob("*.py")) + list((REPO / "preProcess").glob("*.py"))
    files += [REPO / "app.py", REPO / "joinFiles.py"]
    for path in files:
        if path.name == "deletion.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            if pattern.search(code) and not (path.name == "localfs.py" and "os.unlink(source)" in code):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "removal outside the deletion gate:\n" + "\n".join(offenders)


def test_a_read_only_original_is_deleted_when_asked_as_on_windows(tmp_path, monkeypatch):
    """Issue 14, item 2: Windows refuses to delete a file with the read-only attribute (data
    copied from instruments); the gate clears the attribute, then deletes."""
    import stat as stat_module

    path = tmp_path / "instrument.raw"
    path.write_bytes(b"frames")
    identity = deletion.LocalIdentity.of(path)
    os.chmod(path, stat_module.S_IREAD)
    real_unlink = os.unlink

    def windows_unlink(target, *args, **kwargs):
        if not os.stat(target).st_mode & stat_module.S_IWRITE:
            raise PermissionError(13, "Access is denied", str(target))
        real_unlink(target, *args, **kwargs)

    monkeypatch.setattr(deletion, "WINDOWS", True)
    monkeypatch.setattr(deletion.os, "unlink", windows_unlink)
    assert deletion.delete_unchanged(path, identity) == (deletion.DELETED, None)
    assert not path.exists()
