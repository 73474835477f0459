import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dfsfs.chunks import ChunkMissingError, LocalChunkStore, digest_of
from dfsfs.errors import InvalidKeyError, NoSpaceError, StorageError


@pytest.fixture
def store(tmp_path):
    return LocalChunkStore(str(tmp_path / "chunks"))


def all_files(root):
    return sorted(os.path.relpath(os.path.join(directory, name), root)
                  for directory, _, names in os.walk(root) for name in names)


def check_roundtrip(store, data, namespace=7):
    """What every ChunkStore does with one chunk: put, has, get, keys, delete."""
    digest = digest_of(data)
    assert not store.has(namespace, digest)
    store.put(namespace, digest, data)
    store.sync()
    assert store.has(namespace, digest)
    assert store.get(namespace, digest) == data
    assert list(store.keys()) == [(namespace, digest)]
    assert list(store.keys(namespace)) == [(namespace, digest)]
    assert list(store.keys(namespace + 1)) == []
    store.delete(namespace, digest)
    assert not store.has(namespace, digest)
    assert list(store.keys()) == []
    store.delete(namespace, digest)  # absent: not an error


def test_put_get_has_delete_keys_roundtrip(store):
    check_roundtrip(store, b"hello chunk")


def test_layout_fans_out_by_digest_prefix(store):
    digest = digest_of(b"x")
    store.put(3, digest, b"x")
    hex_digest = digest.hex()
    assert all_files(store.root) == [os.path.join("3", hex_digest[:2], hex_digest[2:4], hex_digest)]


def test_missing_chunk_raises_chunk_missing(store):
    with pytest.raises(ChunkMissingError):
        store.get(1, digest_of(b"never stored"))


def test_namespaces_are_separate(store):
    digest = digest_of(b"same bytes")
    store.put(1, digest, b"same bytes")
    assert not store.has(2, digest)
    assert sorted(store.keys()) == [(1, digest)]


def test_putting_an_existing_chunk_keeps_it(store):
    digest = digest_of(b"abc")
    store.put(1, digest, b"abc")
    store.put(1, digest, b"abc")
    assert store.get(1, digest) == b"abc"
    assert all_files(store.root) == [os.path.relpath(store._path(1, digest), store.root)]


def test_concurrent_puts_of_one_chunk_from_16_threads(store):
    data = os.urandom(256 * 1024)
    digest = digest_of(data)
    start = threading.Barrier(16)

    def put():
        start.wait()
        store.put(5, digest, data)
        store.sync()

    with ThreadPoolExecutor(16) as pool:
        for future in [pool.submit(put) for _ in range(16)]:
            future.result()
    assert store.get(5, digest) == data
    assert list(store.keys()) == [(5, digest)]
    assert len(all_files(store.root)) == 1  # no temp file left behind


def test_concurrent_puts_of_many_chunks(store):
    chunks = [os.urandom(1000) for _ in range(200)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda data: store.put(1, digest_of(data), data), chunks))
    store.sync()
    assert sorted(store.keys()) == sorted((1, digest_of(data)) for data in chunks)


@pytest.mark.parametrize(
    ("namespace", "digest"),
    [
        ("../../etc", digest_of(b"x")),
        (-1, digest_of(b"x")),
        (1.0, digest_of(b"x")),
        (True, digest_of(b"x")),
        (1, b"../../etc/passwd"),
        (1, "a" * 64),
        (1, b"/" * 32 + b"x"),
        (1, b"/" * 31),
        (1, bytearray(32)),
    ],
)
def test_invalid_keys_are_refused(store, namespace, digest):
    for operation in (store.get, store.has, store.delete):
        with pytest.raises(InvalidKeyError):
            operation(namespace, digest)
    with pytest.raises(InvalidKeyError):
        store.put(namespace, digest, b"data")
    assert all_files(store.root) == []


@pytest.mark.parametrize("namespace", ["../../etc", -3, "1", 2.0])
def test_keys_refuses_an_invalid_namespace(store, namespace):
    with pytest.raises(InvalidKeyError):
        list(store.keys(namespace))


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2**63), st.binary(min_size=32, max_size=32))
def test_every_chunk_path_stays_under_root(tmp_path_factory, namespace, digest):
    root = str(tmp_path_factory.getbasetemp() / "paths")
    path = LocalChunkStore(root)._path(namespace, digest)
    assert os.path.commonpath([root, os.path.realpath(path)]) == root
    assert os.path.relpath(path, root).split(os.sep) == [
        str(namespace), digest.hex()[:2], digest.hex()[2:4], digest.hex()
    ]


def test_keys_ignore_temp_files_and_foreign_names(store):
    digest = digest_of(b"real")
    store.put(4, digest, b"real")
    chunk_dir = os.path.dirname(store._path(4, digest))
    hex_digest = digest.hex()
    strays = (f".{hex_digest}.abcd.tmp", "README", hex_digest.upper(), "0" * 64, hex_digest[:63])
    for name in strays:
        with open(os.path.join(chunk_dir, name), "wb") as stray:
            stray.write(b"junk")
    for stray_dir in ("lost+found", "007", "x", os.path.join("4", "zz")):
        os.makedirs(os.path.join(store.root, stray_dir), exist_ok=True)
    assert list(store.keys()) == [(4, digest)]


def test_remove_stale_temp_files_only_removes_old_temp_files(store):
    digest = digest_of(b"kept")
    store.put(1, digest, b"kept")
    chunk_dir = os.path.dirname(store._path(1, digest))
    old_temp = os.path.join(chunk_dir, f".{digest.hex()}.0001.tmp")
    new_temp = os.path.join(chunk_dir, f".{digest.hex()}.0002.tmp")
    for path in (old_temp, new_temp):
        with open(path, "wb") as temp_file:
            temp_file.write(b"partial")
    an_hour_ago = time.time() - 3600
    os.utime(old_temp, (an_hour_ago, an_hour_ago))

    assert store.remove_stale_temp_files(older_than_s=600) == 1
    assert not os.path.exists(old_temp)
    assert os.path.exists(new_temp)
    assert store.get(1, digest) == b"kept"


def test_put_waits_for_no_disk_and_sync_makes_every_put_durable(store, monkeypatch):
    dirs, files = [], []
    monkeypatch.setattr("dfsfs.chunks.local._fsync_directory", dirs.append)
    monkeypatch.setattr("dfsfs.chunks.local._fdatasync_file", files.append)
    digest, other = digest_of(b"new"), digest_of(b"other")
    store.put(9, digest, b"new")
    store.put(9, other, b"other")
    store.put(9, other, b"other")  # there already: still the next sync's to make durable
    assert dirs == files == []  # a put does not wait for the disk
    store.sync()
    assert sorted(files) == sorted([store._path(9, digest), store._path(9, other)])
    chunk_dirs = {os.path.dirname(store._path(9, d)) for d in (digest, other)}
    namespace_dir = os.path.join(store.root, "9")
    assert set(dirs[:len(chunk_dirs)]) == chunk_dirs  # deepest first, up to the root
    assert dirs[-2:] == [namespace_dir, store.root]
    dirs.clear()
    files.clear()
    store.sync()
    assert dirs == files == []


def test_failed_sync_is_retried_by_the_next_sync(store, monkeypatch):
    def failing(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("dfsfs.chunks.local._fdatasync_file", failing)
    digest = digest_of(b"a")
    store.put(1, digest, b"a")
    with pytest.raises(StorageError, match="Input/output error"):
        store.sync()
    dirs, files = [], []
    monkeypatch.setattr("dfsfs.chunks.local._fsync_directory", dirs.append)
    monkeypatch.setattr("dfsfs.chunks.local._fdatasync_file", files.append)
    store.sync()
    chunk_dir = os.path.dirname(store._path(1, digest))
    assert files == [store._path(1, digest)]
    assert sorted(dirs) == sorted([chunk_dir, os.path.dirname(chunk_dir),
                                   os.path.join(store.root, "1"), store.root])


def test_unreadable_chunk_is_a_storage_error_not_missing(store):
    digest = digest_of(b"x")
    os.makedirs(store._path(1, digest))  # a directory where the chunk file should be
    with pytest.raises(StorageError):
        store.get(1, digest)


@pytest.fixture
def tiny_filesystem(tmp_path):
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_full_disk_raises_no_space_and_leaves_no_temp_file(tiny_filesystem):
    store = LocalChunkStore(str(tiny_filesystem / "chunks"))
    small = b"fits"
    store.put(1, digest_of(small), small)
    too_big = os.urandom(2 * 1024 * 1024)
    with pytest.raises(NoSpaceError):
        store.put(1, digest_of(too_big), too_big)
    assert all_files(store.root) == [os.path.relpath(store._path(1, digest_of(small)), store.root)]
    assert list(store.keys()) == [(1, digest_of(small))]
    assert store.get(1, digest_of(small)) == small
