"""Isolation of accounts: users A and B of one deployment, each with their own mount.

* A's mount shows only A's files; B's names and inode numbers cannot be reached through it
  (lookups, forged file handles, links and renames across the mounts).
* Identical files of A and B share no chunk: one `chunks` row per user, chunk files in
  per-user namespace directories of both stores; destroying B's copies leaves A's intact.
* Row-level security: a metadata connection scoped to A that forgets its user filter sees,
  changes and inserts only A's rows, in every user-owned table.
* The metadata store scoped to A finds nothing of B's by inode number.
* A's password opens neither B's stats nor B's mount.
"""

import ctypes
import errno
import hashlib
import os
import struct
import subprocess
import time

import pytest
import sqlalchemy as sa

from conftest import client_url_of, scoped_engine
from dfsfs.meta.db import create_engine
from dfsfs.meta.schema import USER_OWNED_TABLES
from dfsfs.errors import NotFoundError
from dfsfs.meta.store import MetadataStore
from dfsfs.recovery import open_own_session
from faults import (chunk_file, content, drop_caches, errno_for, mounted, query, read_bytes,
                    teardown, user_id, write_bytes)
from mounting import Deployment, is_mount

PASSWORD_A = "pw-of-alice-A"
PASSWORD_B = "pw-of-bob-B"
SHARED = content("identical in both accounts", 200_000)  # 4 chunks of 64 KiB


@pytest.fixture(scope="module")
def deployments(database_url, tmp_path_factory):
    """One deployment (database, stores, data directory) seen with A's and with B's password."""
    base = tmp_path_factory.mktemp("isolation")
    a = Deployment(database_url, base, chunk_size="64K", extra_env={"DFSFS_PASSWORD": PASSWORD_A})
    b = Deployment(database_url, base, chunk_size="64K", extra_env={"DFSFS_PASSWORD": PASSWORD_B})
    return a, b





def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# ---- file handles --------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]


def open_by_forged_handle(mount_path, like_path, kernel_ino: int) -> tuple[int, bytes | None]:
    """open_by_handle_at(2) through `mount_path` with a FUSE file handle like that of
    `like_path` but naming `kernel_ino`: (errno, bytes read if it opened)."""
    handle = _FileHandle(handle_bytes=128)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(-100, os.fsencode(str(like_path)), ctypes.byref(handle),
                               ctypes.byref(mount_id), 0) != 0:
        return ctypes.get_errno(), None
    forged = struct.pack("=II", kernel_ino >> 32, kernel_ino & 0xFFFFFFFF)  # FUSE: nodeid, generation
    for index, byte in enumerate(forged):
        handle.f_handle[index] = byte
    mount_fd = os.open(mount_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(handle), os.O_RDONLY)
        if fd < 0:
            return ctypes.get_errno(), None
        try:
            return 0, os.read_bytes(fd, 1 << 20)
        finally:
            os.close(fd)
    finally:
        os.close(mount_fd)


# ---- the test ------------------------------------------------------------------------------------


def test_accounts_are_isolated(deployments):
    dep_a, dep_b = deployments
    url = dep_a.env["DFSFS_DATABASE_URL"]
    with mounted(dep_a, "alice") as mnt_a, mounted(dep_b, "bob") as mnt_b:
        a, b = mnt_a.path, mnt_b.path
        uid_a, uid_b = user_id(url, "alice"), user_id(url, "bob")
        assert uid_a != uid_b

        # ---- each account's own files, some of them identical, some with the same names
        write_bytes(a / "same", SHARED)
        write_bytes(b / "same", SHARED)
        write_bytes(a / "only-a", b"A's data")
        os.mkdir(b / "bdir")
        write_bytes(b / "bdir" / "secret", b"B's secret")
        write_bytes(b / "only-b", b"B's data")
        os.setxattr(a / "only-a", "user.owner", b"alice")
        os.setxattr(b / "bdir" / "secret", "user.owner", b"bob")
        assert sorted(os.listdir(a)) == ["only-a", "same"]
        assert sorted(os.listdir(b)) == ["bdir", "only-b", "same"]

        # ---- B's names do not exist in A's mount; A's changes never reach B
        for name in ("bdir", "only-b", "bdir/secret"):
            assert errno_for(os.stat, a / name) == errno.ENOENT, name
        write_bytes(a / "only-b", b"A's own file of that name")
        assert read_bytes(b / "only-b") == b"B's data"
        assert errno_for(os.link, a / "only-a", b / "linked") == errno.EXDEV
        assert errno_for(os.link, b / "only-b", a / "linked") == errno.EXDEV
        assert errno_for(os.rename, a / "only-a", b / "moved") == errno.EXDEV
        assert errno_for(os.rename, b / "bdir", a / "moved") == errno.EXDEV
        os.link(a / "only-a", a / "hardlink")  # within A: fine
        os.rename(a / "hardlink", a / "renamed")
        assert os.stat(a / "only-a").st_nlink == 2
        os.unlink(a / "renamed")

        # ---- B's inode numbers are not reachable through A's mount
        b_inos = {name: os.stat(b / name).st_ino for name in ("same", "only-b", "bdir", "bdir/secret")}
        a_inos = {os.stat(a / name).st_ino for name in os.listdir(a)}
        assert not set(b_inos.values()) & a_inos, "an inode number is shared between the accounts"
        for name, kernel_ino in b_inos.items():
            code, data = open_by_forged_handle(a, a / "only-a", kernel_ino)
            assert data is None and code != 0, f"B's {name} opened through A's mount: {data!r}"

        # ---- A's metadata store, scoped by A (and by row-level security), finds none of B's
        engine_a = scoped_engine(url, "alice", PASSWORD_A)
        try:
            session_a = open_own_session(engine_a, uid_a, "mount", 60)
            meta_a = MetadataStore(engine_a, uid_a, session_a)
            b_root = query(url, "SELECT root_ino FROM users WHERE id = :u", u=uid_b)[0][0]
            for name, kernel_ino in {**b_inos, "root": b_root + 1}.items():
                ino = kernel_ino - 1
                assert meta_a.chunk_map(ino) == {}, name
                for call in (lambda: meta_a.get_attrs(ino), lambda: meta_a.readdir(ino, 0, 10),
                             lambda: meta_a.list_xattrs(ino),
                             lambda: meta_a.open_file(ino, 1 << 30),
                             lambda: meta_a.link(ino, meta_a.root_ino, b"stolen", time.time_ns()),
                             lambda: meta_a.set_xattr(ino, b"user.x", b"y", 0, time.time_ns())):
                    with pytest.raises(NotFoundError):
                        call()
            with pytest.raises(NotFoundError):
                meta_a.lookup(b_root, b"bdir")
            with pytest.raises(NotFoundError):
                meta_a.rename(b_root, b"only-b", meta_a.root_ino, b"stolen", 0, time.time_ns())
            # even a store told B's id cannot see B's account row over A's connection
            with pytest.raises(NotFoundError):
                MetadataStore(engine_a, uid_b, session_a)
        finally:
            engine_a.dispose()
        assert read_bytes(b / "only-b") == b"B's data" and errno_for(os.stat, a / "stolen") == errno.ENOENT

        # ---- identical files share no chunk
        digests = [sha(SHARED[i:i + 65536]) for i in range(0, len(SHARED), 65536)]
        rows = query(url, "SELECT user_id, sha256, refcount FROM chunks WHERE sha256 = ANY(:d)",
                     d=digests)
        assert sorted((u, bytes(d)) for u, d, _ in rows) == sorted(
            [(uid_a, d) for d in digests] + [(uid_b, d) for d in digests]), rows
        for role in ("primary", "backup"):
            for digest in digests:
                paths = [chunk_file(dep_a.base / role, uid, digest.hex()) for uid in (uid_a, uid_b)]
                assert all(p.is_file() for p in paths), paths
                assert paths[0].parent.parent.parent.name == str(uid_a)
                assert paths[1].parent.parent.parent.name == str(uid_b)
                assert os.stat(paths[0]).st_ino != os.stat(paths[1]).st_ino

        # ---- statfs of A's mount counts A's use only
        dep_a.run("user", "quota", "alice", "--bytes", "100M")
        time.sleep(2.1)  # statfs answers are cached for 2 s
        st = os.statvfs(a)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        a_bytes = len(SHARED) + len(b"A's data") + len(b"A's own file of that name")
        assert st.f_blocks * st.f_frsize == 100 << 20
        assert abs(used - a_bytes) < 8192, f"statfs of A's mount: {used} bytes used, A has {a_bytes}"

        # ---- destroying B's copies of the shared content leaves A's file intact
        for role in ("primary", "backup"):
            chunk_file(dep_a.base / role, uid_b, digests[1].hex()).unlink()
        teardown(mnt_a)
        teardown(mnt_b)
        drop_caches()
        mnt_a.mount()
        mnt_b.mount()
        assert read_bytes(a / "same") == SHARED
        assert errno_for(read_bytes, b / "same") == errno.EIO
        assert read_bytes(b / "bdir" / "secret") == b"B's secret"

    # ---- row-level security: every user-owned table, a query without a user filter
    row_level_security(url, uid_a, uid_b)

    # ---- A's password opens nothing of B's
    result = dep_a.run("stats", "--user", "bob", "--json", check=False)
    assert result.returncode == 1 and "wrong user name or password" in result.stderr, result
    assert '"user"' not in result.stdout
    result = dep_b.run("stats", "--user", "bob", "--json", check=False)
    assert result.returncode == 0, result.stderr
    target = dep_a.base / "bob-by-alice"
    target.mkdir()
    result = dep_a.run("mount", target, "--user", "bob", check=False)
    try:
        assert result.returncode == 1 and "wrong user name or password" in result.stderr, result.stderr
        assert not is_mount(target)
    finally:
        if is_mount(target):
            subprocess.run(["fusermount3", "-uz", str(target)], capture_output=True, check=False)


def row_level_security(url: str, uid_a: int, uid_b: int) -> None:
    """Give both users rows in every user-owned table, then query each table over a
    connection scoped to A without any user filter."""
    with create_engine(url, pool_size=1).begin() as conn:
        for uid in (uid_a, uid_b):
            conn.execute(sa.text("INSERT INTO backup_queue (user_id, sha256) VALUES (:u, :d)"),
                         {"u": uid, "d": sha(b"queued %d" % uid)})
            conn.execute(sa.text("INSERT INTO damage (user_id, sha256, store, kind, detail)"
                                 " VALUES (:u, :d, 'primary', 'missing', 'isolation test')"),
                         {"u": uid, "d": sha(b"damaged %d" % uid)})
    owners = {}
    for table in USER_OWNED_TABLES:
        owners[table.name] = {u for (u,) in query(url, f"SELECT DISTINCT user_id FROM {table.name}")}
        assert {uid_a, uid_b} <= owners[table.name], f"{table.name}: the test needs rows of both users"

    engine = scoped_engine(url, "alice", PASSWORD_A)
    unscoped = create_engine(client_url_of(url), pool_size=1)  # no login: must see nothing
    try:
        with engine.connect() as conn:
            for table in USER_OWNED_TABLES:
                seen = {u for (u,) in conn.execute(sa.text(f"SELECT DISTINCT user_id FROM {table.name}"))}
                assert seen == {uid_a}, f"{table.name}: a query scoped to A sees rows of users {seen}"
                count = conn.execute(sa.text(f"SELECT count(*) FROM {table.name} WHERE user_id = :b"),
                                     {"b": uid_b}).scalar()
                assert count == 0, f"{table.name}: A's connection counts {count} rows of B"
        for table in USER_OWNED_TABLES:
            with engine.connect() as conn:
                with conn.begin() as transaction:
                    changed = conn.execute(sa.text(f"UPDATE {table.name} SET user_id = user_id")).rowcount
                    total_a = conn.execute(sa.text(f"SELECT count(*) FROM {table.name}")).scalar()
                    assert changed == total_a, f"{table.name}: an unfiltered UPDATE touched {changed} rows"
                    deleted = conn.execute(sa.text(f"DELETE FROM {table.name} WHERE user_id = :b"),
                                           {"b": uid_b}).rowcount
                    assert deleted == 0, f"{table.name}: A's connection deleted {deleted} rows of B"
                    transaction.rollback()
        # writing rows that belong to B, or handing A's rows to B, is refused
        for statement in (
            "INSERT INTO backup_queue (user_id, sha256) VALUES (:b, :d)",
            "INSERT INTO damage (user_id, sha256, store, kind) VALUES (:b, :d, 'backup', 'corrupt')",
            "UPDATE xattrs SET user_id = :b",
            "UPDATE usage SET user_id = :b",
        ):
            with engine.connect() as conn:
                with pytest.raises(sa.exc.DBAPIError) as raised:
                    with conn.begin():
                        conn.execute(sa.text(statement), {"b": uid_b, "d": sha(b"forged")})
                assert "row-level security" in str(raised.value), f"{statement}: {raised.value}"
        with unscoped.connect() as conn:
            for table in USER_OWNED_TABLES:
                count = conn.execute(sa.text(f"SELECT count(*) FROM {table.name}")).scalar()
                assert count == 0, f"{table.name}: an unscoped, non-admin connection sees {count} rows"
    finally:
        engine.dispose()
        unscoped.dispose()
    for table in USER_OWNED_TABLES:  # nothing changed
        assert {u for (u,) in query(url, f"SELECT DISTINCT user_id FROM {table.name}")} == owners[table.name]
