"""fsck against a real PostgreSQL and two real chunk directories.

`Account` (also used by test_stats) writes files through the file-system core itself
(tests/corehost.py: no kernel), so the metadata and the stores are as a mount leaves them.
"""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from corehost import CoreHost

from dfsfs.auth import make_verifier
from dfsfs.chunks import LocalChunkStore, MirroredChunkStore, digest_of
from dfsfs.cli import main
from dfsfs.config import ENVIRONMENT
from dfsfs.core.settings import CoreSettings
from dfsfs.fsck import check
from dfsfs.meta.accounts import AccountStore
from dfsfs.meta.db import create_engine
from dfsfs.meta.layout import record_chunk_size
from dfsfs.meta.migrations import migrate
from dfsfs.types import QueuedRemoval

CHUNK_SIZE = 4096
PASSWORD = "fsck-test-password"
DIR_MODE = stat.S_IFDIR | 0o755


class Account:
    """A new account whose files are written through the core, as a mount writes them."""

    def __init__(self, engine, stores: MirroredChunkStore, name: str | None = None):
        self.name = name or "u" + uuid.uuid4().hex[:10]
        self.user_id = AccountStore(engine).create_user(self.name, make_verifier(PASSWORD))
        record_chunk_size(engine, CHUNK_SIZE)
        self.stores = stores
        self.core = CoreHost(engine.url.render_as_string(hide_password=False), self.name,
                             Path(stores.primary.root).parent,
                             CoreSettings(chunk_size=CHUNK_SIZE, write_buffer_bytes=1 << 20),
                             password=PASSWORD).start()
        self.meta = self.core.meta
        self.fs = self.core.fs

    def close(self) -> None:
        self.core.stop()

    def mkdir(self, name: bytes, parent: int | None = None) -> int:
        return self._make(parent, name, DIR_MODE).ino

    def symlink(self, name: bytes, target: bytes, parent: int | None = None) -> int:
        return self._make(parent, name, stat.S_IFLNK | 0o777, target=target).ino

    def write(self, name: bytes, data: bytes, parent: int | None = None) -> int:
        ino = self.core.write_file(parent or self.fs.root_ino, name, data)
        self._settle()
        return ino

    def truncate(self, ino: int, chunks_kept: int) -> None:
        self.core.call(self.fs.setattr, ino, 0, size=chunks_kept * CHUNK_SIZE)
        self._settle()

    def overwrite(self, ino: int, data: bytes) -> None:
        fh, _ = self.core.call(self.fs.open, ino, os.O_WRONLY | os.O_TRUNC)
        self.core.call(self.fs.write, fh, 0, data)
        self.core.call(self.fs.release, fh)
        self._settle()

    def _settle(self) -> None:
        """Let the background work the core would do next finish: sync, reclaim."""
        for settle in (self.fs.sync, self.fs.releaser.settle, self.fs.reclaimer.settle):
            self.core.call(settle)

    def delete(self, name: bytes, parent: int | None = None) -> None:
        """unlink, then everything the mount does after it: the inode released and purged,
        its chunks reclaimed."""
        self.core.call(self.fs.unlink, parent or self.fs.root_ino, name)
        self._settle()

    def delete_but_crash_before_reclaim(self, name: bytes) -> None:
        """The name goes and the inode is purged, then the mount dies before it reclaims
        (the metadata calls the core would make, without the reclaim after them)."""
        [removed] = self.meta.unlink_each([QueuedRemoval(self.fs.root_ino, name, time.time_ns())])
        self.meta.release_inodes([removed.ino])

    def chunk_path(self, role: str, digest: bytes) -> Path:
        return getattr(self.stores, role).path_of(self.user_id, digest)

    def _make(self, parent: int | None, name: bytes, mode: int, target: bytes | None = None):
        return self.core.call(self.fs.make_node, parent or self.fs.root_ino, name, mode, 0, 0,
                              target=target)


@pytest.fixture
def stores(tmp_path):
    mirrored = MirroredChunkStore(LocalChunkStore(str(tmp_path / "primary"), "primary"),
                                  LocalChunkStore(str(tmp_path / "backup"), "backup"))
    yield mirrored
    mirrored.close()


@pytest.fixture
def account(admin_engine, stores):
    made = Account(admin_engine, stores)
    yield made
    made.close()


@pytest.fixture
def dfsfs(tmp_path):
    """Run `dfsfs ARGS…` with the stores of the `stores` fixture and no DFSFS_ environment."""

    def run(url: str, *args: str):
        options = ["--database-url", url, "--data-dir", str(tmp_path),
                   "--store", f"file://{tmp_path}/primary", "--backup", f"file://{tmp_path}/backup"]
        unset = {variable: None for variable in [*ENVIRONMENT.values(), "DFSFS_PASSWORD"]}
        return CliRunner().invoke(main, [*options, *args], env=unset)

    return run


def digests_of(account: Account, ino: int) -> list[bytes]:
    return [ref.digest for _, ref in sorted(account.meta.chunk_map(ino).items())]


def damage_rows(engine, user_id: int) -> list[tuple]:
    with engine.connect() as conn:
        return conn.execute(
            sa.text("SELECT store, kind, repaired_at IS NOT NULL FROM damage"
                    " WHERE user_id = :uid ORDER BY id"), {"uid": user_id}
        ).all()


def sql(engine, statement: str, **params) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(statement), params)


def populate(account: Account) -> dict[str, int]:
    """A small namespace with a directory, duplicate content, a hard link and a symlink."""
    shared = os.urandom(CHUNK_SIZE * 2 + 100)
    docs = account.mkdir(b"docs")
    inos = {
        "a": account.write(b"a.bin", shared),
        "b": account.write(b"b.bin", shared, parent=docs),
        "c": account.write(b"c.bin", os.urandom(700), parent=docs),
    }
    account.core.call(account.fs.link, inos["c"], account.fs.root_ino, b"c-link")
    account.symlink(b"to-a", b"a.bin")
    return inos


# ---- a consistent namespace -----------------------------------------------------------


def test_consistent_namespace_is_clean(admin_engine, database_url, account, dfsfs):
    populate(account)

    result = dfsfs(database_url, "fsck", "--user", account.name)

    assert result.exit_code == 0, result.output
    assert "no problems found" in result.output
    assert "verified 4 chunk(s)" in result.output
    with admin_engine.connect() as conn:
        checked_at = conn.execute(sa.text("SELECT last_fsck_at FROM users WHERE id = :id"),
                                  {"id": account.user_id}).scalar()
    assert checked_at is not None


def test_all_accounts_by_default(database_factory, tmp_path, stores, dfsfs):
    url = database_factory()
    engine = create_engine(url)
    try:
        migrate(engine)
        for _ in range(2):
            made = Account(engine, stores)
            populate(made)
            made.close()

        result = dfsfs(url, "fsck")

        assert result.exit_code == 0, result.output
        assert "checked 2 account(s), verified 8 chunk(s)" in result.output
        assert dfsfs(url, "fsck", "--all", "--user", "x").exit_code == 2
        assert dfsfs(url, "fsck", "--user", "nobody").exit_code == 2
    finally:
        engine.dispose()


def test_progress_counts_every_chunk(admin_engine, account, stores):
    populate(account)
    account.close()  # (its own session would count as live: nothing changes meanwhile)
    calls = []

    report = check(admin_engine, stores, [account.user_id], progress=lambda *call: calls.append(call))

    assert report.clean and report.chunks_verified == 4
    assert calls[-1] == (4, 4)


# ---- damaged copies -------------------------------------------------------------------


def test_chunk_missing_from_primary_is_restored(admin_engine, database_url, account, dfsfs):
    ino = account.write(b"f", os.urandom(CHUNK_SIZE + 10))
    digest = digests_of(account, ino)[1]
    path = account.chunk_path("primary", digest)
    path.unlink()

    found = dfsfs(database_url, "fsck", "--user", account.name)
    assert found.exit_code == 1
    assert f"chunk {digest.hex()}: primary copy missing" in found.output
    assert not path.exists()
    assert damage_rows(admin_engine, account.user_id) == [("primary", "missing", False)]

    repaired = dfsfs(database_url, "fsck", "--repair", "--user", account.name)
    assert repaired.exit_code == 1
    assert "primary copy missing (repaired)" in repaired.output
    assert digest_of(path.read_bytes()) == digest
    assert damage_rows(admin_engine, account.user_id) == [("primary", "missing", True)]

    assert dfsfs(database_url, "fsck", "--user", account.name).exit_code == 0


def test_flipped_byte_is_restored(admin_engine, account, stores):
    ino = account.write(b"f", os.urandom(3000))
    [digest] = digests_of(account, ino)
    path = account.chunk_path("backup", digest)
    damaged = bytearray(path.read_bytes())
    damaged[1234] ^= 0x01
    path.write_bytes(damaged)

    report = check(admin_engine, stores, [account.user_id], repair=True)

    assert report.problems == [
        f"user {account.name}: chunk {digest.hex()}: backup copy corrupt (repaired)"
    ]
    assert digest_of(path.read_bytes()) == digest
    assert damage_rows(admin_engine, account.user_id) == [("backup", "corrupt", True)]
    assert check(admin_engine, stores, [account.user_id]).clean


def test_chunk_lost_in_both_stores(admin_engine, database_url, account, dfsfs):
    docs = account.mkdir(b"docs")
    ino = account.write(b"report.txt", os.urandom(100), parent=docs)
    [digest] = digests_of(account, ino)
    for role in ("primary", "backup"):
        account.chunk_path(role, digest).unlink()

    result = dfsfs(database_url, "fsck", "--repair", "--user", account.name)

    assert result.exit_code == 1
    assert f"chunk {digest.hex()} has no good copy" in result.output
    assert f"inode {ino} (/docs/report.txt) has 1 chunk(s) pointing at lost chunk" in result.output
    assert "4 problem(s) found, 0 repaired, 4 left" in result.output
    assert damage_rows(admin_engine, account.user_id) == [
        ("primary", "missing", False), ("backup", "missing", False),
    ]
    # A second run neither repairs it nor records the same damage again.
    assert dfsfs(database_url, "fsck", "--user", account.name).exit_code == 1
    assert len(damage_rows(admin_engine, account.user_id)) == 2


def test_backup_copy_still_queued_is_not_damage(admin_engine, account, stores):
    ino = account.write(b"f", os.urandom(100))
    [digest] = digests_of(account, ino)
    account.chunk_path("backup", digest).unlink()
    sql(admin_engine, "INSERT INTO backup_queue (user_id, sha256) VALUES (:uid, :digest)",
        uid=account.user_id, digest=digest)

    assert check(admin_engine, stores, [account.user_id]).clean
    assert damage_rows(admin_engine, account.user_id) == []


# ---- garbage left by crashes ----------------------------------------------------------


def test_orphan_chunk_files_are_removed(admin_engine, account, stores):
    account.write(b"kept", os.urandom(500))
    orphan = os.urandom(800)
    stores.put(account.user_id, digest_of(orphan), orphan)

    found = check(admin_engine, stores, [account.user_id])
    assert found.found["orphan_chunks"] == 1 and not found.repaired["orphan_chunks"]
    assert stores.primary.has(account.user_id, digest_of(orphan))

    repaired = check(admin_engine, stores, [account.user_id], repair=True)
    assert repaired.repaired["orphan_chunks"] == 1
    for store in (stores.primary, stores.backup):
        assert not store.has(account.user_id, digest_of(orphan))
    assert check(admin_engine, stores, [account.user_id]).clean


CRASHING_WRITER = textwrap.dedent("""
    import os, sys, time
    from dfsfs.chunks import LocalChunkStore, MirroredChunkStore, digest_of
    from dfsfs.meta.db import create_engine
    from dfsfs.meta.store import MetadataStore
    from dfsfs.recovery import open_own_session

    url, primary, backup, user_id = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    engine = create_engine(url)  # the owner's, acting for the account in a session of its own
    meta = MetadataStore(engine, user_id, open_own_session(engine, user_id, "mount", 300))
    meta.make_node(meta.root_ino, b"interrupted", 0o100644, 0, 0, time.time_ns())
    stores = MirroredChunkStore(LocalChunkStore(primary, "primary"), LocalChunkStore(backup, "backup"))
    pieces = [os.urandom(2000) for _ in range(3)]
    meta.reserve_chunks([digest_of(p) for p in pieces], [len(p) for p in pieces])
    for piece in pieces:
        stores.put(user_id, digest_of(piece), piece)
    print("chunks written", flush=True)
    sys.stdin.read()  # the commit would come next: the test kills us first
""")


def test_crash_between_chunk_write_and_commit_leaves_a_session_to_settle(
    admin_engine, database_url, account, stores, tmp_path
):
    """A daemon killed after storing chunks and before committing them: its session holds
    the chunks; fsck finds the session dead (its process is gone) and releases them."""
    writer = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, database_url, stores.primary.root, stores.backup.root,
         str(account.user_id)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert writer.stdout.readline() == "chunks written\n"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert len(list(stores.primary.keys(account.user_id))) == 3

    found = check(admin_engine, stores, [account.user_id])
    assert found.found == {"sessions_over": 1}, found.problems
    assert "left 3 hold(s) and 3 unsettled chunk(s)" in found.problems[0]
    report = check(admin_engine, stores, [account.user_id], repair=True)

    assert report.found == {"sessions_over": 1} and report.repaired == {"sessions_over": 1}
    assert list(stores.primary.keys(account.user_id)) == list(stores.backup.keys(account.user_id)) == []
    assert account.meta.lookup(account.meta.root_ino, b"interrupted").size == 0
    assert check(admin_engine, stores, [account.user_id]).clean


def test_unreferenced_chunk_row_is_reclaimed(admin_engine, account, stores):
    ino = account.write(b"gone", os.urandom(100))
    [digest] = digests_of(account, ino)
    account.delete_but_crash_before_reclaim(b"gone")

    found = check(admin_engine, stores, [account.user_id])
    assert found.found == {"unreferenced_chunks": 1}

    check(admin_engine, stores, [account.user_id], repair=True)
    assert not stores.primary.has(account.user_id, digest)
    assert account.meta.usage().chunks == 0
    assert check(admin_engine, stores, [account.user_id]).clean


def test_unlinked_inode_of_a_dead_session_is_purged(admin_engine, account, stores):
    """A file removed while open, and then the mount died: its session still holds the
    inode. fsck finds the session over; repair purges the inode and reclaims its chunks."""
    ino = account.write(b"open-when-crashed", os.urandom(100))
    [digest] = digests_of(account, ino)
    account.meta.unlink_each([QueuedRemoval(account.fs.root_ino, b"open-when-crashed",
                                            time.time_ns())])
    assert check(admin_engine, stores, [account.user_id]).clean  # held by a live session
    account.meta.end_sessions([account.meta.session_id], "crashed")

    assert check(admin_engine, stores, [account.user_id]).found == {"sessions_over": 1}

    check(admin_engine, stores, [account.user_id], repair=True)
    assert not stores.backup.has(account.user_id, digest)
    with admin_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM inodes WHERE id = :ino"), {"ino": ino}).scalar() == 0
    assert check(admin_engine, stores, [account.user_id]).clean


def test_unlinked_inode_nobody_holds_is_purged(admin_engine, account, stores):
    ino = account.write(b"f", os.urandom(100))
    sql(admin_engine, "DELETE FROM dentries WHERE ino = :ino", ino=ino)
    sql(admin_engine, "UPDATE inodes SET nlink = 0 WHERE id = :ino", ino=ino)

    assert check(admin_engine, stores, [account.user_id]).found == {"unlinked_inodes": 1, "wrong_usage": 2}
    check(admin_engine, stores, [account.user_id], repair=True)
    assert check(admin_engine, stores, [account.user_id]).clean


def test_stale_temp_files_are_removed(admin_engine, account, stores):
    ino = account.write(b"f", os.urandom(100))
    chunk = account.chunk_path("primary", digests_of(account, ino)[0])
    stale = chunk.with_name(f".{chunk.name}.0123456789abcdef.tmp")
    fresh = chunk.with_name(f".{chunk.name}.fedcba9876543210.tmp")
    for temp in (stale, fresh):
        temp.write_bytes(b"half a chunk")
    os.utime(stale, (time.time() - 7200,) * 2)

    report = check(admin_engine, stores, [account.user_id], repair=True)

    assert report.clean and report.stale_temp_files_removed == 1
    assert not stale.exists() and fresh.exists()


# ---- counts and counters --------------------------------------------------------------


def test_wrong_refcount_and_usage_counters_are_corrected(admin_engine, account, stores):
    inos = populate(account)
    shared = digests_of(account, inos["a"])[0]
    sql(admin_engine, "UPDATE chunks SET refcount = 7 WHERE user_id = :uid AND sha256 = :digest",
        uid=account.user_id, digest=shared)
    sql(admin_engine, "UPDATE usage SET files = 40, logical_bytes = 1, stored_bytes = 2"
        " WHERE user_id = :uid", uid=account.user_id)

    found = check(admin_engine, stores, [account.user_id])
    assert found.found == {"wrong_refcount": 1, "wrong_usage": 3}
    assert f"chunk {shared.hex()} has refcount 7, 2 file chunks and holds point at it" in found.problems[0]

    repaired = check(admin_engine, stores, [account.user_id], repair=True)
    assert repaired.repaired == repaired.found
    usage = account.meta.usage()
    assert (usage.files, usage.directories, usage.symlinks) == (3, 2, 1)
    assert usage.logical_bytes == 2 * (CHUNK_SIZE * 2 + 100) + 700 + len(b"a.bin")
    assert usage.stored_bytes == CHUNK_SIZE * 2 + 100 + 700
    assert usage.chunks == 4
    assert check(admin_engine, stores, [account.user_id]).clean


def test_wrong_link_count_is_corrected(admin_engine, account, stores):
    inos = populate(account)
    sql(admin_engine, "UPDATE inodes SET nlink = 5 WHERE id = :ino", ino=inos["c"])

    found = check(admin_engine, stores, [account.user_id])
    assert found.problems == [
        f"user {account.name}: inode {inos['c']} (/c-link) has link count 5, its entries call for 2"
    ]

    check(admin_engine, stores, [account.user_id], repair=True)
    assert account.meta.get_attrs(inos["c"]).nlink == 2
    assert check(admin_engine, stores, [account.user_id]).clean
