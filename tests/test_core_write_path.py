"""The write path of the core, driven without a kernel (tests/corehost.py) on the real
PostgreSQL and real local stores: what is stored, when it becomes durable, and what is
left behind (nothing)."""

import errno
import hashlib
import logging
import os
import threading
import time

import pytest
import sqlalchemy as sa
import trio
from corehost import ACCOUNT_PASSWORD, CoreHost

from dfsfs.auth import make_verifier
from dfsfs.chunks.local import LocalChunkStore
from dfsfs.core.offload import supervised
from dfsfs.core.settings import MAX_FILE_SIZE, CoreSettings
from dfsfs.errors import FileTooLargeError
from dfsfs.meta.accounts import AccountStore

CHUNK = 64 * 1024
SETTINGS = CoreSettings(chunk_size=CHUNK, write_buffer_bytes=8 << 20, commit_interval_s=3600.0)


@pytest.fixture
def account_name(admin_engine) -> str:
    name = f"w{os.urandom(4).hex()}"
    AccountStore(admin_engine).create_user(name, make_verifier(ACCOUNT_PASSWORD))
    return name


@pytest.fixture
def account(admin_engine, account_name) -> int:
    return AccountStore(admin_engine).require_user(account_name).id


@pytest.fixture
def url(database_url) -> str:
    return database_url


@pytest.fixture
def core(url, account_name, tmp_path):
    with CoreHost(url, account_name, tmp_path, SETTINGS) as host:
        yield host


def counting_puts(monkeypatch) -> list[bytes]:
    """Digests written into any local store from now on (puts of chunks already there
    write nothing and are not counted)."""
    written = []
    original = LocalChunkStore._write_new

    def write_new(self, directory, path, data):
        written.append(bytes.fromhex(os.path.basename(path)))
        return original(self, directory, path, data)

    monkeypatch.setattr(LocalChunkStore, "_write_new", write_new)
    return written


def store_digests(tmp_path, account: int, role: str) -> set[bytes]:
    return {digest for _, digest in LocalChunkStore(str(tmp_path / role), role).keys(account)}


def named_digests(admin_engine, account: int) -> set[bytes]:
    with admin_engine.connect() as conn:
        return {bytes(d) for (d,) in conn.execute(
            sa.text("SELECT sha256 FROM chunks WHERE user_id = :a"), {"a": account})}


def assert_stores_hold_exactly_what_is_named(admin_engine, tmp_path, account: int) -> None:
    named = named_digests(admin_engine, account)
    for role in ("primary", "backup"):
        assert store_digests(tmp_path, account, role) == named, role


def settle(core: CoreHost) -> None:
    for step in (core.fs.sync, core.fs.releaser.settle, core.fs.reclaimer.settle):
        core.call(step)


def test_partial_overwrites_store_each_touched_chunk_once_per_commit(
        core, admin_engine, tmp_path, account, monkeypatch):
    """Twenty 4 KiB pwrites into a stored chunk, then close: one new chunk, not twenty
    (each used to store a whole chunk and leave it behind)."""
    ino = core.write_file(core.fs.root_ino, b"f", os.urandom(CHUNK))
    written = counting_puts(monkeypatch)
    fh, _ = core.call(core.fs.open, ino, os.O_RDWR)
    for i in range(20):
        core.call(core.fs.write, fh, i * 3000, os.urandom(4096))
    core.call(core.fs.flush, fh)
    core.call(core.fs.release, fh)
    settle(core)
    assert len(written) == 2  # the new chunk, in the primary and in the backup
    assert_stores_hold_exactly_what_is_named(admin_engine, tmp_path, account)


def test_a_chunk_stored_and_overwritten_before_its_commit_is_released(
        core, admin_engine, tmp_path, account, monkeypatch):
    """A streaming writer stores each whole chunk at once; rewriting one before the commit
    drops the hold of the stored version, which is reclaimed."""
    fh, attrs = core.call(core.fs.create, core.fs.root_ino, b"g", 0o644, 0, 0, os.O_RDWR)
    first = os.urandom(3 * CHUNK)
    core.call(core.fs.write, fh, 0, first)  # three whole chunks: stored at once
    core.call(core.fs.write, fh, CHUNK + 10, b"changed")  # chunk 1 again, before any commit
    core.call(core.fs.flush, fh)
    core.call(core.fs.release, fh)
    settle(core)
    expected = bytearray(first)
    expected[CHUNK + 10:CHUNK + 17] = b"changed"
    assert core.read_file(attrs.ino) == expected
    assert len(named_digests(admin_engine, account)) == 3
    assert_stores_hold_exactly_what_is_named(admin_engine, tmp_path, account)


def test_sequential_rewrite_stores_each_chunk_once(core, monkeypatch):
    ino = core.write_file(core.fs.root_ino, b"h", os.urandom(4 * CHUNK))
    written = counting_puts(monkeypatch)
    fh, _ = core.call(core.fs.open, ino, os.O_RDWR)
    data = os.urandom(4 * CHUNK)
    for offset in range(0, len(data), 16 * 1024):  # in pieces smaller than a chunk
        core.call(core.fs.write, fh, offset, data[offset:offset + 16 * 1024])
    core.call(core.fs.release, fh)
    settle(core)
    assert len(written) == 2 * 4
    assert core.read_file(ino) == data


def unsettled(admin_engine, account: int) -> int:
    with admin_engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM chunks WHERE user_id = :a AND NOT settled"),
                            {"a": account}).scalar()


def test_close_is_visible_at_once_and_durable_at_the_next_sync_point(core, admin_engine, account):
    ino = core.write_file(core.fs.root_ino, b"c", os.urandom(2 * CHUNK + 5))
    assert unsettled(admin_engine, account) == 3  # committed, not yet durable
    assert core.fs.committer.behind
    core.call(core.fs.committer.sync)
    assert unsettled(admin_engine, account) == 0 and not core.fs.committer.behind
    assert core.read_file(ino)


def test_the_commit_interval_makes_closed_files_durable(url, account, account_name, tmp_path, admin_engine):
    settings = CoreSettings(chunk_size=CHUNK, commit_interval_s=0.2)
    with CoreHost(url, account_name, tmp_path, settings) as core:
        core.write_file(core.fs.root_ino, b"soon", os.urandom(CHUNK))
        core.call(trio.sleep, 0.6)
        assert unsettled(admin_engine, account) == 0 and not core.fs.committer.behind


def test_fsync_is_durable_when_it_returns(core, admin_engine, account):
    fh, _ = core.call(core.fs.create, core.fs.root_ino, b"s", 0o644, 0, 0, os.O_WRONLY)
    core.call(core.fs.write, fh, 0, os.urandom(CHUNK + 1))
    core.call(core.fs.fsync, fh)
    assert unsettled(admin_engine, account) == 0 and not core.fs.committer.behind
    core.call(core.fs.release, fh)


def test_a_rename_over_a_name_waits_for_the_renamed_file_to_be_durable(core, admin_engine, account):
    """The safe-save pattern: write a temporary file, rename it over the document."""
    core.write_file(core.fs.root_ino, b"doc", b"old")
    core.call(core.fs.committer.sync)
    core.write_file(core.fs.root_ino, b"doc.tmp", os.urandom(CHUNK))
    assert unsettled(admin_engine, account) == 1
    core.call(core.fs.rename, core.fs.root_ino, b"doc.tmp", core.fs.root_ino, b"doc", 0)
    assert unsettled(admin_engine, account) == 0


def test_writes_past_the_largest_file_get_efbig_and_the_core_goes_on(core):
    fh, attrs = core.call(core.fs.create, core.fs.root_ino, b"big", 0o644, 0, 0, os.O_WRONLY)
    for offset in (2**63 - 2, MAX_FILE_SIZE - 1):
        with pytest.raises(FileTooLargeError) as raised:
            core.call(core.fs.write, fh, offset, b"xyz")
        assert raised.value.errno == errno.EFBIG
    with pytest.raises(FileTooLargeError):
        core.call(core.fs.setattr, attrs.ino, 0, size=MAX_FILE_SIZE + 1)
    core.call(core.fs.write, fh, MAX_FILE_SIZE - 3, b"end")  # up to the limit is fine
    core.call(core.fs.release, fh)
    assert core.call(core.fs.getattr, attrs.ino).size == MAX_FILE_SIZE


async def test_a_failing_background_step_is_logged_and_retried(caplog):
    calls = []

    async def step():
        calls.append(1)
        if len(calls) < 3:
            raise ValueError("a bug in a background task")
        await trio.sleep_forever()

    with caplog.at_level(logging.ERROR):
        with trio.move_on_after(1):
            await supervised("flaky", step, retry_s=0.01)
    assert len(calls) == 3
    assert caplog.text.count("background task flaky failed") == 2


def test_a_file_open_in_another_session_stays_readable_after_its_removal(
        url, account, account_name, tmp_path, admin_engine, core):
    data = os.urandom(3 * CHUNK)
    ino = core.write_file(core.fs.root_ino, b"shared", data)
    uncached = CoreSettings(chunk_size=CHUNK, read_cache_bytes=0)  # reads go to the stores
    with CoreHost(url, account_name, tmp_path, uncached) as other:
        fh, _ = other.call(other.fs.open, ino, os.O_RDONLY)
        core.call(core.fs.unlink, core.fs.root_ino, b"shared")
        settle(core)  # released here: the other session still holds it
        assert other.call(other.fs.read, fh, 0, len(data)) == data
        other.call(other.fs.release, fh)
        settle(other)
    settle(core)
    assert named_digests(admin_engine, account) == set()
    assert_stores_hold_exactly_what_is_named(admin_engine, tmp_path, account)


def test_a_release_racing_the_removal_of_its_inode_purges_it(core, admin_engine, account):
    """A release (the kernel forgot the inode) and the removal of its last name (queued
    earlier) may run at once: whichever commits first, the inode is never left with no
    name and no hold; here the release waits for the removal and purges the inode."""
    meta = core.meta
    root = core.fs.root_ino
    ino = meta.make_node(root, b"f", 0o100644, 0, 0, 1, hold=True).ino
    remover = core.engine.raw_connection()
    try:
        cursor = remover.driver_connection.cursor()  # the removal, under way
        cursor.execute("SELECT refusal FROM dfsfs_unlink_each(%s, %s, ARRAY[%s]::bigint[],"
                       " ARRAY[%s]::bytea[], ARRAY[2]::bigint[], ARRAY[false])",
                       (account, meta.session_id, root, b"f"))
        assert cursor.fetchall() == [(None,)]
        released = []
        releaser = threading.Thread(target=lambda: released.append(meta.release_inodes([ino])))
        releaser.start()
        deadline = time.monotonic() + 10
        while releaser.is_alive() and not waiting_on_a_lock(admin_engine):
            assert time.monotonic() < deadline, "the release neither ended nor waited"
            time.sleep(0.01)
        remover.commit()
        releaser.join(10)
    finally:
        remover.close()
    assert released and released[0][0] == [ino]
    with admin_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM inodes WHERE id = :i"), {"i": ino}).scalar() == 0


def waiting_on_a_lock(admin_engine) -> bool:
    with admin_engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM pg_locks WHERE NOT granted")).scalar() > 0


def test_a_chunk_released_by_another_session_is_no_damage(url, account, account_name, tmp_path, admin_engine, core):
    """A reader that knew a chunk another mount then replaced and reclaimed reads the
    file's new content, and nothing is recorded as damage."""
    ino = core.write_file(core.fs.root_ino, b"doc", os.urandom(CHUNK))
    with CoreHost(url, account_name, tmp_path, SETTINGS) as other:
        fh, _ = other.call(other.fs.open, ino, os.O_RDONLY)  # knows the chunk map now
        new = os.urandom(CHUNK)
        wfh, _ = core.call(core.fs.open, ino, os.O_WRONLY)
        core.call(core.fs.write, wfh, 0, new)
        core.call(core.fs.release, wfh)
        settle(core)  # the old chunk is gone from both stores
        assert other.call(other.fs.read, fh, 0, CHUNK) == new
        other.call(other.fs.release, fh)
        other.call(other.fs.damage.settle)
    with admin_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM damage WHERE user_id = :a"),
                            {"a": account}).scalar() == 0


def test_unmount_leaves_exactly_what_the_metadata_names(url, account, account_name, tmp_path, admin_engine):
    with CoreHost(url, account_name, tmp_path, SETTINGS) as core:
        root = core.fs.root_ino
        for i in range(5):
            core.write_file(root, f"f{i}".encode(), os.urandom(CHUNK * i + 7))
        core.call(core.fs.unlink, root, b"f3")
        fh, _ = core.call(core.fs.open, core.call(core.fs.lookup, root, b"f4").ino, os.O_RDWR)
        core.call(core.fs.write, fh, 5, b"still buffered at unmount")
        core.call(core.fs.release, fh)
    assert unsettled(admin_engine, account) == 0
    with admin_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM inodes WHERE user_id = :a AND nlink = 0"),
                            {"a": account}).scalar() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM chunk_holds WHERE user_id = :a"),
                            {"a": account}).scalar() == 0
    assert_stores_hold_exactly_what_is_named(admin_engine, tmp_path, account)
    digests = named_digests(admin_engine, account)
    assert hashlib.sha256(b"").digest() not in digests


def test_transactions_store_each_touched_chunk_once_per_commit(core, monkeypatch):
    """A database's pattern: each transaction writes a few pages in two or three chunks of
    a file, then fsyncs. Bytes stored per commit: only the chunks it touched."""
    ino = core.write_file(core.fs.root_ino, b"db", os.urandom(8 * CHUNK))
    written = counting_puts(monkeypatch)
    fh, _ = core.call(core.fs.open, ino, os.O_RDWR)
    touched = 0
    for transaction in range(30):
        chunks = {transaction % 8, (transaction * 3 + 1) % 8}
        for index in chunks:
            for page in range(3):
                core.call(core.fs.write, fh, index * CHUNK + page * 4096 + transaction, os.urandom(512))
        core.call(core.fs.fsync, fh)
        touched += len(chunks)
    core.call(core.fs.release, fh)
    assert len(written) <= 2 * touched  # one copy in each store per touched chunk per commit


def test_a_chunk_deleted_lately_is_stored_again_before_a_commit_names_it(
        core, admin_engine, tmp_path, account, monkeypatch):
    """A commit does not take on trust a chunk whose deletion was claimed in the last hour
    (the deletion may have removed the bytes after the mount's put): it holds the chunk,
    puts it again, and commits."""
    content = os.urandom(CHUNK)
    core.write_file(core.fs.root_ino, b"first", content)
    core.call(core.fs.unlink, core.fs.root_ino, b"first")
    settle(core)  # its chunk is reclaimed: a tombstone remembers it
    assert named_digests(admin_engine, account) == set()
    written = counting_puts(monkeypatch)
    ino = core.write_file(core.fs.root_ino, b"second", content)
    settle(core)
    assert core.read_file(ino) == content
    assert len(written) == 2  # put once by the write (refused at commit), then secured
    assert_stores_hold_exactly_what_is_named(admin_engine, tmp_path, account)


def test_names_absent_from_a_directory_made_here_need_no_round_trip(core, monkeypatch):
    """Every new file's creation starts with a lookup of a name that is not there: in a
    directory this mount made (and whose changes elsewhere the change feed reports), the
    answer needs no metadata call."""
    from dfsfs.errors import NotFoundError
    from dfsfs.meta.feed import EntryChanged

    core.fs.listings.enabled = True  # as when the change feed runs
    made = core.call(core.fs.make_node, core.fs.root_ino, b"new-dir", 0o40755, 0, 0)
    asked = []
    original = core.fs.meta.lookup
    monkeypatch.setattr(core.fs.meta, "lookup", lambda *args: asked.append(args) or original(*args))
    with pytest.raises(NotFoundError):
        core.call(core.fs.lookup, made.ino, b"absent")
    assert asked == []
    core.write_file(made.ino, b"here", b"x")
    assert core.call(core.fs.lookup, made.ino, b"here").size == 1  # asked: it is there
    # another mount's new name, as the change feed reports it, is looked up again
    core.fs.changed_elsewhere([EntryChanged(made.ino, 999, b"theirs", gone=False)])
    with pytest.raises(NotFoundError):
        core.call(core.fs.lookup, made.ino, b"theirs")
    assert [args[1] for args in asked] == [b"here", b"theirs"]


def test_a_sync_point_between_a_put_and_its_commit_still_settles_the_chunk(core, admin_engine, account):
    fh, _ = core.call(core.fs.create, core.fs.root_ino, b"streamed", 0o644, 0, 0, os.O_WRONLY)
    core.call(core.fs.write, fh, 0, os.urandom(CHUNK))  # a whole chunk: put at once
    core.call(trio.sleep, 0.2)  # (the put runs in the background)
    core.call(core.fs.committer.sync)  # before the commit names it
    core.call(core.fs.release, fh)  # committed now
    core.call(core.fs.committer.sync)
    assert unsettled(admin_engine, account) == 0
