"""Our content hasher against the SDK's reference implementation, for any sizes and any way
of cutting the bytes into updates; per-request hashes of 4 MiB-aligned chunks."""

from __future__ import annotations

import os

from dropbox.content_hash import DropboxContentHasher
from hypothesis import given, settings, strategies as st

from archive_dropbox.content_hash import BLOCK_SIZE, ContentHasher, bytes_content_hash, hash_range

BLOCK = BLOCK_SIZE


def reference(data: bytes) -> str:
    hasher = DropboxContentHasher()
    hasher.update(data)
    return hasher.hexdigest()


@settings(max_examples=25, deadline=None)
@given(size=st.sampled_from([0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 17, 3 * BLOCK]) | st.integers(0, 3 * BLOCK),
       cuts=st.lists(st.integers(1, 2 * BLOCK), max_size=6))
def test_same_hash_as_the_sdk_however_the_bytes_arrive(size, cuts):
    data = os.urandom(size)
    hasher = ContentHasher(with_sha256=True)
    position = 0
    for cut in cuts:
        hasher.update(data[position:position + cut])
        position = min(size, position + cut)
    hasher.update(memoryview(data)[position:])
    assert hasher.content_hash() == reference(data) == bytes_content_hash(data)
    assert hasher.size == size


@settings(max_examples=10, deadline=None)
@given(chunks=st.lists(st.integers(1, 3).map(lambda n: n * BLOCK), min_size=1, max_size=3),
       tail=st.integers(0, BLOCK))
def test_per_request_hash_of_aligned_chunks_and_peek(chunks, tail):
    sizes = chunks + ([tail] if tail else [])
    pieces = [os.urandom(n) for n in sizes]
    hasher = ContentHasher()
    for piece in pieces:
        hasher.mark()
        hasher.update(piece)
        assert hasher.since_mark() == reference(piece)
    whole = b"".join(pieces)
    assert hasher.content_hash() == reference(whole)


def test_a_mark_off_a_block_boundary_gives_no_request_hash(tmp_path):
    hasher = ContentHasher()
    hasher.update(b"abc")
    hasher.mark()
    hasher.update(b"def")
    assert hasher.since_mark() is None
    path = tmp_path / "f.bin"
    data = os.urandom(BLOCK + 5)
    path.write_bytes(data)
    assert hash_range(path, 3, BLOCK).content_hash() == reference(data[3:3 + BLOCK])
