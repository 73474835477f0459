"""A version-6 database with accounts made as dfsfs made them before migration 7 (argon2
encoded hashes in users.password_hash) upgrades, and the accounts keep their passwords,
their files and their mounts; no password-equivalent stays in the database."""

import hashlib
import time

import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher, Type

from conftest import client_url_of
from dfsfs import auth
from dfsfs.chunks.local import LocalChunkStore
from dfsfs.meta.accounts import AccountStore
from dfsfs.meta.db import create_engine
from dfsfs.meta.migrations import LATEST_VERSION, migrate
from dfsfs.meta.store import MetadataStore
from dfsfs.session import session_engine
from mounting import Deployment

# How the released auth.py hashed: PasswordHasher(type=ID) with the library defaults, or
# the cheap test profile.
HASHERS = {
    "defaults": PasswordHasher(type=Type.ID),
    "test": PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=Type.ID),
    "argon2i": PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=Type.I),
}
CONTENT = b"written before the upgrade\n" * 3000


def make_old_account(engine, name: str, password_hash: str) -> int:
    """An account as version 6's AccountStore.create_user made it, with one file."""
    now = time.time_ns()
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL dfsfs.admin = on")  # version 6's scoping
        account = conn.execute(sa.text("INSERT INTO users (name, password_hash) VALUES (:n, :h)"
                                       " RETURNING id"), {"n": name, "h": password_hash}).scalar()
        root = conn.execute(sa.text(
            "INSERT INTO inodes (user_id, mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns)"
            " VALUES (:a, 16877, 0, 0, 2, :t, :t, :t) RETURNING id"), {"a": account, "t": now}).scalar()
        conn.execute(sa.text("UPDATE users SET root_ino = :r WHERE id = :a"), {"r": root, "a": account})
        conn.execute(sa.text("INSERT INTO usage (user_id, directories) VALUES (:a, 1)"), {"a": account})
    return account


@pytest.fixture
def version_6(database_factory):
    url = database_factory()
    engine = create_engine(url)
    migrate(engine, target=6)
    yield url, engine
    engine.dispose()


def test_old_accounts_log_in_with_their_passwords_after_the_upgrade(version_6):
    url, engine = version_6
    for kind, hasher in HASHERS.items():
        make_old_account(engine, f"old_{kind}", hasher.hash(f"password of {kind}"))
    make_old_account(engine, "odd", "$2b$12$an.old.bcrypt.hash.dfsfs.never.wrote.one.........")
    assert migrate(engine) == list(range(7, LATEST_VERSION + 1))
    client = create_engine(client_url_of(url), pool_size=1)
    try:
        for kind in HASHERS:
            result = auth.login(client, f"old_{kind}", f"password of {kind}")
            assert result.name == f"old_{kind}"
            with pytest.raises(auth.AuthError):
                auth.login(client, f"old_{kind}", "not the password")
        with pytest.raises(auth.AuthError):  # no verifier could be made: no login ...
            auth.login(client, "odd", "anything")
        AccountStore(engine).set_verifier("odd", auth.make_verifier("a new one"))
        assert auth.login(client, "odd", "a new one").name == "odd"  # ... until a new password
    finally:
        client.dispose()
    with engine.connect() as conn:
        columns = conn.execute(sa.text("SELECT column_name FROM information_schema.columns"
                                       " WHERE table_name = 'users'")).scalars().all()
        verifier = conn.execute(sa.text("SELECT v.* FROM verifiers v JOIN users a ON a.id = v.user_id"
                                        " WHERE a.name = 'old_defaults'")).mappings().one()
    assert "password_hash" not in columns
    assert (verifier["time_cost"], verifier["memory_cost"], verifier["parallelism"]) == (3, 65536, 4)


def test_files_and_mounts_survive_the_upgrade(version_6, tmp_path):
    url, engine = version_6
    account = make_old_account(engine, "keeper", HASHERS["test"].hash("keeper's password"))
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL dfsfs.admin = on")
        conn.execute(sa.text("INSERT INTO layout (chunk_size) VALUES (65536)"))
    # A file as a daemon of version 6 left it (its rows as that version's tables take them).
    pieces = [CONTENT[i:i + 65536] for i in range(0, len(CONTENT), 65536)]
    for role in ("primary", "backup"):
        store = LocalChunkStore(str(tmp_path / role), role)
        for piece in pieces:
            store.put(account, hashlib.sha256(piece).digest(), piece)
        store.sync()
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL dfsfs.admin = on")
        now = time.time_ns()
        root = conn.execute(sa.text("SELECT root_ino FROM users WHERE id = :a"), {"a": account}).scalar()
        ino = conn.execute(sa.text(
            "INSERT INTO inodes (user_id, mode, uid, gid, size, nlink, atime_ns, mtime_ns, ctime_ns)"
            " VALUES (:a, 33188, 0, 0, :size, 1, :t, :t, :t) RETURNING id"),
            {"a": account, "size": len(CONTENT), "t": now}).scalar()
        conn.execute(sa.text("INSERT INTO dentries (user_id, parent_ino, name, ino)"
                             " VALUES (:a, :root, 'old.txt', :ino)"), {"a": account, "root": root, "ino": ino})
        for index, piece in enumerate(pieces):
            chunk = conn.execute(sa.text(
                "INSERT INTO chunks (user_id, sha256, size, refcount) VALUES (:a, :d, :n, 1)"
                " RETURNING id"), {"a": account, "d": hashlib.sha256(piece).digest(), "n": len(piece)}).scalar()
            conn.execute(sa.text("INSERT INTO file_chunks (user_id, ino, index, chunk_id)"
                                 " VALUES (:a, :ino, :i, :c)"), {"a": account, "ino": ino, "i": index, "c": chunk})
        conn.execute(sa.text("UPDATE usage SET files = 1, logical_bytes = :n, chunks = :c, stored_bytes = :n"
                             " WHERE user_id = :a"), {"a": account, "n": len(CONTENT), "c": len(pieces)})
    # `dfsfs init` upgrades (Deployment runs it), then the account mounts as it always did.
    deployment = Deployment(url, tmp_path, chunk_size=None,
                            extra_env={"DFSFS_PASSWORD": "keeper's password"})
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT max(version) FROM schema_version")).scalar() == LATEST_VERSION
    deployment.users.add("keeper")
    with deployment.mount("keeper") as mnt:
        assert (mnt.path / "old.txt").read_bytes() == CONTENT
        (mnt.path / "new.txt").write_bytes(b"after")
    client_url = client_url_of(url)
    login = auth.login(create_engine(client_url, pool_size=1), "keeper", "keeper's password")
    scoped = session_engine(client_url, login, pool_size=1)
    try:
        meta = MetadataStore(scoped, login.account, login.session_id)
        assert meta.lookup(meta.root_ino, b"new.txt").size == 5
    finally:
        scoped.dispose()
