import os
import threading

import pytest

from dfsfs.chunks import ChunkStore, LocalChunkStore, MirroredChunkStore, digest_of
from dfsfs.chunks.mirrored import DamageEvent
from dfsfs.errors import ChunkLostError, StorageError, StoreUnavailableError

pytest_plugins = ["seaweed"]

NAMESPACE = 1
DATA = b"the quick brown fox" * 1000
DIGEST = digest_of(DATA)


class MemoryBackupQueue:
    """The BackupQueue protocol in memory; the metadata layer keeps it in a table."""

    def __init__(self):
        self._lock = threading.Lock()
        self.queued: dict[tuple[int, bytes], None] = {}  # insertion-ordered: oldest first

    def enqueue(self, namespace, digest):
        with self._lock:
            self.queued[(namespace, digest)] = None

    def pending(self, limit):
        with self._lock:
            return list(self.queued)[:limit]

    def done(self, namespace, digest):
        with self._lock:
            del self.queued[(namespace, digest)]


class Damage(list):
    """An on_damage callback that remembers the events."""

    def __call__(self, event):
        self.append(event)

    def summary(self):
        return [(event.store, event.kind, event.repaired) for event in self]


@pytest.fixture
def damage():
    return Damage()


@pytest.fixture
def primary(tmp_path):
    return LocalChunkStore(str(tmp_path / "primary"), name="primary")


@pytest.fixture
def local_backup(tmp_path):
    return LocalChunkStore(str(tmp_path / "backup"), name="backup")


@pytest.fixture
def s3_backup(seaweed_s3):
    store = seaweed_s3.chunk_store()
    yield store
    store.close()


@pytest.fixture(params=["local", "s3"])
def backup(request):
    return request.getfixturevalue(f"{request.param}_backup")


@pytest.fixture
def mirror(primary, backup, damage):
    mirror = MirroredChunkStore(primary, backup, on_damage=damage)
    yield mirror
    mirror.close()


@pytest.fixture
def stored(mirror):
    mirror.put(NAMESPACE, DIGEST, DATA)
    mirror.sync()
    return mirror


def flip_one_byte(store, digest):
    path = store._path(NAMESPACE, digest)
    with open(path, "r+b") as chunk_file:
        first = chunk_file.read(1)
        chunk_file.seek(0)
        chunk_file.write(bytes([first[0] ^ 0x01]))


def corrupt(store, digest):
    """Replace the stored bytes, whatever kind of store holds them."""
    store.delete(NAMESPACE, digest)
    store.put(NAMESPACE, digest, b"not the original bytes")


def test_put_writes_both_copies(stored):
    assert stored.primary.get(NAMESPACE, DIGEST) == DATA
    assert stored.backup.get(NAMESPACE, DIGEST) == DATA
    assert stored.get(NAMESPACE, DIGEST) == DATA
    assert stored.has(NAMESPACE, DIGEST)
    assert list(stored.keys()) == [(NAMESPACE, DIGEST)]


def test_delete_removes_both_copies(stored):
    stored.delete(NAMESPACE, DIGEST)
    assert not stored.primary.has(NAMESPACE, DIGEST)
    assert not stored.backup.has(NAMESPACE, DIGEST)


def test_missing_primary_is_served_from_backup_and_restored(stored, damage):
    stored.primary.delete(NAMESPACE, DIGEST)

    assert stored.get(NAMESPACE, DIGEST) == DATA

    assert stored.primary.get(NAMESPACE, DIGEST) == DATA
    assert damage == [DamageEvent(NAMESPACE, DIGEST, "primary", "missing", True, damage[0].detail)]


def test_flipped_byte_in_primary_is_served_from_backup_and_restored(stored, damage):
    flip_one_byte(stored.primary, DIGEST)

    assert stored.get(NAMESPACE, DIGEST) == DATA

    assert stored.primary.get(NAMESPACE, DIGEST) == DATA
    [event] = damage
    assert (event.store, event.kind, event.repaired) == ("primary", "corrupt", True)
    assert "SHA-256" in event.detail


def test_no_good_copy_raises_chunk_lost_and_reports_both(stored, damage):
    stored.primary.delete(NAMESPACE, DIGEST)
    corrupt(stored.backup, DIGEST)

    with pytest.raises(ChunkLostError, match=DIGEST.hex()):
        stored.get(NAMESPACE, DIGEST)

    assert damage.summary() == [("primary", "missing", False), ("backup", "corrupt", False)]
    assert not stored.primary.has(NAMESPACE, DIGEST)  # nothing wrong was written back


def test_both_copies_corrupt_never_returns_bytes(stored, damage):
    flip_one_byte(stored.primary, DIGEST)
    corrupt(stored.backup, DIGEST)
    with pytest.raises(ChunkLostError):
        stored.get(NAMESPACE, DIGEST)
    assert {event.kind for event in damage} == {"corrupt"}


def test_failing_damage_callback_does_not_break_a_good_read(primary, local_backup, caplog):
    def broken_recorder(event):
        raise RuntimeError("database down")

    mirror = MirroredChunkStore(primary, local_backup, on_damage=broken_recorder)
    mirror.put(NAMESPACE, DIGEST, DATA)
    primary.delete(NAMESPACE, DIGEST)
    assert mirror.get(NAMESPACE, DIGEST) == DATA
    assert "database down" in caplog.text
    mirror.close()


class FailingStore(ChunkStore):
    """A store whose every operation fails as a broken disk or unreachable server would."""

    name = "broken"

    def _fail(self, *args):
        raise StorageError("broken: Input/output error")

    put = get = has = delete = keys = sync = _fail


def test_unreadable_primary_falls_back_to_backup(local_backup, damage):
    local_backup.put(NAMESPACE, DIGEST, DATA)
    mirror = MirroredChunkStore(FailingStore(), local_backup, on_damage=damage)
    assert mirror.get(NAMESPACE, DIGEST) == DATA
    [event] = damage
    assert (event.store, event.kind, event.repaired) == ("primary", "unreadable", False)
    assert "Input/output error" in event.detail


class DownStore(ChunkStore):
    """A store whose server does not answer (an outage)."""

    name = "down"

    def _fail(self, *args):
        raise StoreUnavailableError("down: the server does not answer")

    put = get = has = delete = keys = sync = _fail


def test_a_store_that_does_not_answer_is_an_outage_not_damage(local_backup, primary, damage):
    local_backup.put(NAMESPACE, DIGEST, DATA)
    mirror = MirroredChunkStore(DownStore(), local_backup, on_damage=damage)
    assert mirror.get(NAMESPACE, DIGEST) == DATA  # served by the other copy
    assert damage == []
    both_down = MirroredChunkStore(DownStore(), DownStore(), on_damage=damage)
    with pytest.raises(StoreUnavailableError):
        both_down.get(NAMESPACE, DIGEST)
    missing_and_down = MirroredChunkStore(primary, DownStore(), on_damage=damage)
    with pytest.raises(StoreUnavailableError):  # not ChunkLostError: the backup may hold it
        missing_and_down.get(NAMESPACE, DIGEST)
    result = missing_and_down.verify(NAMESPACE, DIGEST, repair=True)
    assert (result.primary, result.backup, result.lost, result.unknown) == (
        "missing", "unavailable", False, True)
    assert [(event.store, event.kind) for event in damage] == [("primary", "missing")] * 2


def test_failed_backup_write_fails_the_put(primary, damage):
    mirror = MirroredChunkStore(primary, FailingStore(), on_damage=damage)
    with pytest.raises(StorageError, match="Input/output error"):
        mirror.put(NAMESPACE, DIGEST, DATA)


def test_verify_reports_healthy_chunk(stored, damage):
    result = stored.verify(NAMESPACE, DIGEST, repair=True)
    assert (result.primary, result.backup, result.repaired, result.lost) == ("ok", "ok", (), False)
    assert damage == []


def test_verify_repairs_corrupt_backup_from_primary(stored, damage):
    corrupt(stored.backup, DIGEST)

    result = stored.verify(NAMESPACE, DIGEST, repair=True)

    assert (result.primary, result.backup, result.repaired) == ("ok", "corrupt", ("backup",))
    assert stored.backup.get(NAMESPACE, DIGEST) == DATA
    assert damage.summary() == [("backup", "corrupt", True)]


def test_verify_without_repair_only_reports(stored, damage):
    stored.primary.delete(NAMESPACE, DIGEST)

    result = stored.verify(NAMESPACE, DIGEST, repair=False)

    assert (result.primary, result.backup, result.repaired) == ("missing", "ok", ())
    assert not stored.primary.has(NAMESPACE, DIGEST)
    assert damage.summary() == [("primary", "missing", False)]


def test_verify_of_a_lost_chunk(stored, damage):
    stored.delete(NAMESPACE, DIGEST)
    result = stored.verify(NAMESPACE, DIGEST, repair=True)
    assert (result.primary, result.backup, result.repaired) == ("missing", "missing", ())
    assert result.lost
    assert len(damage) == 2


# asynchronous backup


@pytest.fixture
def queue():
    return MemoryBackupQueue()


@pytest.fixture
def async_mirror(primary, backup, damage, queue):
    mirror = MirroredChunkStore(primary, backup, on_damage=damage, backup_queue=queue)
    yield mirror
    mirror.close()


def test_async_put_queues_the_backup_and_drain_copies_it(async_mirror, queue):
    async_mirror.put(NAMESPACE, DIGEST, DATA)
    async_mirror.sync()
    assert async_mirror.primary.get(NAMESPACE, DIGEST) == DATA
    assert not async_mirror.backup.has(NAMESPACE, DIGEST)
    assert queue.pending(None) == [(NAMESPACE, DIGEST)]

    assert async_mirror.drain_backup_queue() == 1

    assert async_mirror.backup.get(NAMESPACE, DIGEST) == DATA
    assert queue.pending(None) == []


def test_drain_respects_the_limit(async_mirror, queue):
    chunks = [os.urandom(100) for _ in range(5)]
    for data in chunks:
        async_mirror.put(NAMESPACE, digest_of(data), data)
    assert async_mirror.drain_backup_queue(limit=2) == 2
    assert len(queue.pending(None)) == 3
    assert async_mirror.drain_backup_queue() == 3
    expected = sorted((NAMESPACE, digest_of(data)) for data in chunks)
    assert sorted(async_mirror.backup.keys()) == expected


def test_drain_drops_chunks_deleted_meanwhile(async_mirror, queue, damage):
    async_mirror.put(NAMESPACE, DIGEST, DATA)
    async_mirror.delete(NAMESPACE, DIGEST)
    assert async_mirror.drain_backup_queue() == 0
    assert queue.pending(None) == []
    assert not async_mirror.backup.has(NAMESPACE, DIGEST)
    assert damage == []


def test_drain_keeps_a_corrupt_primary_chunk_queued_and_reports_it(async_mirror, queue, damage):
    async_mirror.put(NAMESPACE, DIGEST, DATA)
    flip_one_byte(async_mirror.primary, DIGEST)
    other = b"another chunk"
    async_mirror.put(NAMESPACE, digest_of(other), other)

    assert async_mirror.drain_backup_queue() == 1

    assert queue.pending(None) == [(NAMESPACE, DIGEST)]
    assert not async_mirror.backup.has(NAMESPACE, DIGEST)  # a bad copy is never spread
    assert damage.summary() == [("primary", "corrupt", False)]


def test_drain_failure_keeps_the_unwritten_chunks_queued(primary, queue):
    mirror = MirroredChunkStore(primary, FailingStore(), backup_queue=queue)
    mirror.put(NAMESPACE, DIGEST, DATA)
    with pytest.raises(StorageError):
        mirror.drain_backup_queue()
    assert queue.pending(None) == [(NAMESPACE, DIGEST)]


def test_drain_needs_a_queue(mirror):
    with pytest.raises(RuntimeError, match="backup_queue"):
        mirror.drain_backup_queue()


def test_missing_primary_chunk_read_before_drain_is_lost(async_mirror, damage):
    """Until the queue is drained only one copy exists: its loss is reported, not hidden."""
    async_mirror.put(NAMESPACE, DIGEST, DATA)
    async_mirror.primary.delete(NAMESPACE, DIGEST)
    with pytest.raises(ChunkLostError):
        async_mirror.get(NAMESPACE, DIGEST)
    assert {event.kind for event in damage} == {"missing"}
