"""split.py: part names and plans, the manifest, one-pass hashing; tests/split_helpers.py:
streaming parts from the original, writing parts that survive a rerun; and split-then-join as
the identity."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archive_dropbox import joining, split
from tests import split_helpers
from archive_dropbox.split import MiB, PartPlan, SplitError

QUIET = logging.getLogger("test_split")
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- names


def test_part_names_are_the_original_tools_names():
    assert split.part_name("big.mrc", 1, 3) == "big.mrc_split_0001"
    assert split.part_name("big.mrc", 3, 3) == "big.mrc_split_0003"
    assert split.part_name("a b é.tif", 12, 9999) == "a b é.tif_split_0012"
    assert split.manifest_name("big.mrc") == "big.mrc_split_manifest.json"


def test_more_than_9999_parts_get_more_digits_and_still_sort():
    names = [split.part_name("x", i, 10000) for i in range(1, 10001)]
    assert names[0] == "x_split_00001" and names[-1] == "x_split_10000"
    assert sorted(names) == names


def test_part_index_outside_the_series_is_refused():
    with pytest.raises(ValueError):
        split.part_name("x", 0, 3)
    with pytest.raises(ValueError):
        split.part_name("x", 4, 3)


@pytest.mark.parametrize("name, expected", [
    ("big.mrc_split_0001", ("big.mrc", 1)),
    ("big.mrc_split_12345", ("big.mrc", 12345)),
    ("a_split_0002_split_0003", ("a_split_0002", 3)),
    ("big.mrc_split_001", None),        # fewer than 4 digits: not one of ours
    ("big.mrc_split_0001.txt", None),
    ("_split_0001", None),              # no original name
    ("big.mrc", None),
])
def test_parse_part_name(name, expected):
    assert split.parse_part_name(name) == expected


def test_parse_manifest_name():
    assert split.parse_manifest_name("big.mrc_split_manifest.json") == "big.mrc"
    assert split.parse_manifest_name("_split_manifest.json") is None
    assert split.parse_manifest_name("big.mrc_split_0001") is None


# ----------------------------------------------------------------------------- plans


@settings(max_examples=300, deadline=None)
@given(part_limit=st.integers(1, 2 * 1024 ** 4), data=st.data())
def test_plan_covers_the_file_exactly_within_the_limit(part_limit, data):
    part_size = split.split_part_size(part_limit)
    size = data.draw(st.integers(0, part_size * 3000), label="size")
    plan = split.plan_split(size, part_limit, "f.bin")
    assert plan[0].offset == 0 and plan[-1].end == size
    for before, after in zip(plan, plan[1:]):
        assert after.offset == before.end
    assert [p.index for p in plan] == list(range(1, len(plan) + 1))
    assert all(p.length <= part_limit for p in plan)
    if size <= part_limit:
        assert plan == [PartPlan(1, 0, size, "f.bin")]  # not split: sent under its own name
        return
    assert len(plan) >= 2 and all(p.length > 0 for p in plan)
    assert len({p.length for p in plan[:-1]}) == 1 and plan[-1].length <= plan[0].length
    if part_limit >= 4 * MiB:
        assert plan[0].length % (4 * MiB) == 0 and plan[0].length > part_limit - 4 * MiB
    names = [p.name for p in plan]
    assert sorted(names) == names and len(set(map(len, names))) == 1


def test_plan_examples():
    assert [p.length for p in split.plan_split(10, 4)] == [4, 4, 2]
    assert [p.length for p in split.plan_split(25 * MiB, 10 * MiB)] == [8 * MiB, 8 * MiB, 8 * MiB, MiB]
    assert split.plan_split(0, 5) == [PartPlan(1, 0, 0, None)]
    with pytest.raises(ValueError):
        split.plan_split(10, 0)


# ----------------------------------------------------------------------------- hashing and reading


def test_hash_parts_matches_hashlib(tmp_path):
    data = os.urandom(3 * split.CHUNK + 12345)
    source = tmp_path / "data.bin"
    source.write_bytes(data)
    plan = split.plan_split(len(data), 5 * MiB + 3)
    seen = []
    whole, parts = split_helpers.hash_parts(source, plan, progress=seen.append)
    assert whole == sha(data)
    assert parts == [sha(data[p.offset:p.end]) for p in plan]
    assert sum(seen) == len(data)


def test_part_reader_streams_one_part_and_seeks(tmp_path):
    data = os.urandom(100_000)
    source = tmp_path / "data.bin"
    source.write_bytes(data)
    part = PartPlan(2, 30_000, 40_000)
    with split_helpers.PartReader(source, part) as reader:
        assert reader.read(10) == data[30_000:30_010]
        reader.seek(39_990)
        assert reader.read() == data[69_990:70_000]
        assert reader.read(5) == b""
        reader.seek(0)
        assert reader.read() == data[30_000:70_000]
    chunks = list(split_helpers.iter_part_chunks(source, 30_000, 40_000, chunk_size=7_000))
    assert b"".join(chunks) == data[30_000:70_000] and max(map(len, chunks)) == 7_000


def test_part_reader_refuses_a_file_that_became_shorter(tmp_path):
    source = tmp_path / "data.bin"
    source.write_bytes(b"x" * 1000)
    with pytest.raises(SplitError, match="shorter than expected"):
        list(split_helpers.iter_part_chunks(source, 500, 1000))


# ----------------------------------------------------------------------------- manifest


def make_manifest(data: bytes, limit: int, name: str = "f.bin") -> split.Manifest:
    plan = split.plan_split(len(data), limit, name)
    return split.build_manifest(name, len(data), sha(data), 1700000000.25, plan,
                                [sha(data[p.offset:p.end]) for p in plan])


def test_manifest_round_trip(tmp_path):
    manifest = make_manifest(b"abcdefghij", 4)
    path = split_helpers.write_manifest(tmp_path / split.manifest_name("f.bin"), manifest)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw["format"] == split.MANIFEST_FORMAT and raw["version"] == 1
    assert [p["name"] for p in raw["parts"]] == ["f.bin_split_0001", "f.bin_split_0002", "f.bin_split_0003"]
    assert split.read_manifest(path) == manifest
    assert not list(tmp_path.glob(".~*"))


def _mutated(change) -> dict:
    raw = make_manifest(b"abcdefghij", 4).to_dict()
    change(raw)
    return raw


@pytest.mark.parametrize("content, reason", [
    (b"{not json", "not valid JSON"),
    (json.dumps(_mutated(lambda m: m.update(format="something else"))), "'format' field"),
    (json.dumps(_mutated(lambda m: m.update(version=2))), "newer version"),
    (json.dumps(_mutated(lambda m: m.update(size=11))), "add up"),
    (json.dumps(_mutated(lambda m: m.update(original_name="../f.bin"))), "not a plain file name"),
    (json.dumps(_mutated(lambda m: m["parts"][1].update(name="other_split_0002"))), "is called"),
    (json.dumps(_mutated(lambda m: m["parts"][1].update(offset=5))), "does not start"),
    (json.dumps(_mutated(lambda m: m["parts"][0].update(sha256="xyz"))), "no valid SHA-256"),
    (json.dumps(_mutated(lambda m: m.update(parts=[]))), "lists no parts"),
])
def test_malformed_manifest_is_refused_with_the_reason(tmp_path, content, reason):
    path = tmp_path / "f.bin_split_manifest.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SplitError) as caught:
        split.read_manifest(path)
    assert reason in caught.value.message and str(path) in caught.value.message


# ----------------------------------------------------------------------------- writing parts


def test_write_parts_writes_parts_and_manifest_without_temporaries(tmp_path):
    data = os.urandom(2 * split.CHUNK + 99)
    source = tmp_path / "src" / "big.bin"
    source.parent.mkdir()
    source.write_bytes(data)
    dest = tmp_path / "dropbox"
    dest.mkdir()
    plan = split.plan_split(len(data), 6 * MiB, "big.bin")
    manifest = split_helpers.write_parts(source, dest, plan)
    assert sorted(p.name for p in dest.iterdir()) == [p.name for p in plan] + ["big.bin_split_manifest.json"]
    for part in plan:
        assert (dest / part.name).read_bytes() == data[part.offset:part.end]
    assert manifest.sha256 == sha(data) and manifest.mtime == source.stat().st_mtime
    assert split.read_manifest(dest / "big.bin_split_manifest.json") == manifest
    assert source.read_bytes() == data  # the original is only read


def test_write_parts_rerun_keeps_complete_parts_and_rewrites_damaged_ones(tmp_path):
    data = os.urandom(5 * MiB + 7)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    dest = tmp_path / "out"
    dest.mkdir()
    plan = split.plan_split(len(data), MiB, "big.bin")
    split_helpers.write_parts(source, dest, plan)
    # A hard link to each part keeps its inode allocated, so a rewritten part cannot reuse the
    # inode number of a replaced or deleted one and pass for "kept".
    before = tmp_path / "before"
    before.mkdir()
    for part in plan:
        os.link(dest / part.name, before / part.name)
    damaged = dest / plan[2].name
    damaged.write_bytes(b"\0" + damaged.read_bytes()[1:])
    (dest / plan[4].name).unlink()
    split_helpers.write_parts(source, dest, plan, log=QUIET)
    for part in plan:
        assert (dest / part.name).read_bytes() == data[part.offset:part.end]
    kept = [p.name for p in plan if os.path.samefile(dest / p.name, before / p.name)]
    assert kept == [plan[i].name for i in (0, 1, 3, 5)]


def test_write_parts_continues_after_a_crash_before_the_manifest(tmp_path):
    data = os.urandom(3 * MiB + 5)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    dest = tmp_path / "out"
    dest.mkdir()
    plan = split.plan_split(len(data), MiB, "big.bin")
    split_helpers.write_parts(source, dest, plan)
    (dest / "big.bin_split_manifest.json").unlink()        # the crash came before the manifest
    last = dest / plan[-1].name
    last.write_bytes(last.read_bytes()[:3])                # and cut the last part short
    (dest / f".~{plan[-1].name}").write_bytes(b"junk")      # leaving a temporary behind
    first_inode = (dest / plan[0].name).stat().st_ino
    manifest = split_helpers.write_parts(source, dest, plan)
    assert (dest / plan[0].name).stat().st_ino == first_inode
    assert last.read_bytes() == data[plan[-1].offset:]
    assert manifest == split.read_manifest(dest / "big.bin_split_manifest.json")
    assert manifest.sha256 == sha(data)


def test_write_parts_refuses_a_source_that_changes_meanwhile(tmp_path):
    data = os.urandom(3 * split.CHUNK)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    dest = tmp_path / "out"
    dest.mkdir()
    plan = split.plan_split(len(data), split.CHUNK, "big.bin")

    def touch_source(_):
        os.utime(source, (1, 1))

    with pytest.raises(SplitError, match="changed while"):
        split_helpers.write_parts(source, dest, plan, progress=touch_source)
    assert not (dest / "big.bin_split_manifest.json").exists()


# ----------------------------------------------------------------------------- split then join


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(min_size=0, max_size=40_000) | st.integers(0, 300_000).map(os.urandom),
       part_limit=st.integers(1, 70_000), name=st.sampled_from(["f.bin", "a b é.zip", "x_split_0001"]))
def test_split_then_join_is_the_identity(data, part_limit, name):
    part_limit = max(part_limit, len(data) // 40 + 1)  # at most ~40 parts (each is fsynced) keeps it quick
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        source = folder / "src" / name
        source.parent.mkdir()
        source.write_bytes(data)
        os.utime(source, (1_600_000_000.5, 1_600_000_000.5))
        parts = folder / "parts"
        parts.mkdir()
        plan = split.plan_split(len(data), part_limit, name)
        manifest = split_helpers.write_parts(source, parts, plan)
        assert len(manifest.parts) == len(plan)
        outcome = joining.join_split_file(parts / split.part_name(name, 1, len(plan)), log=QUIET)
        joined = parts / name
        assert outcome.action == "joined" and outcome.verified
        assert joined.read_bytes() == data
        assert joined.stat().st_mtime == source.stat().st_mtime
        assert not [p for p in parts.iterdir() if p.name.startswith(".~")]
