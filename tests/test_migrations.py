"""Migrations: applied once, and a database made at every earlier version upgrades in place
with its accounts and files kept and working."""

import hashlib
import time

import pytest
import sqlalchemy as sa

from dfsfs.meta.db import create_engine
from dfsfs.meta.layout import recorded_chunk_size
from dfsfs.meta.migrations import LATEST_VERSION, MIGRATIONS, current_version, migrate
from dfsfs.meta.store import MetadataStore
from dfsfs.recovery import open_own_session

OLD_CHUNK_SIZE = 65536
# An account with a directory and a two-chunk file, written with the statements of the
# first release's tables (valid at every version since; version 7 moved the password out
# of `users`).
_OLD_USER = {
    True: "INSERT INTO users (id, name, password_hash)"
          " VALUES (1000, 'old', '$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA')",
    False: "INSERT INTO users (id, name) VALUES (1000, 'old')",
}
_OLD_ACCOUNT = """
INSERT INTO inodes (id, user_id, mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns)
     VALUES (5000, 1000, 16877, 0, 0, 3, :now, :now, :now),
            (5001, 1000, 16877, 0, 0, 2, :now, :now, :now);
INSERT INTO inodes (id, user_id, mode, uid, gid, size, nlink, atime_ns, mtime_ns, ctime_ns)
     VALUES (5002, 1000, 33188, 0, 0, :size, 1, :now, :now, :now);
UPDATE users SET root_ino = 5000 WHERE id = 1000;
INSERT INTO usage (user_id, files, directories, logical_bytes, chunks, stored_bytes)
     VALUES (1000, 1, 2, :size, 2, :size);
INSERT INTO dentries (user_id, parent_ino, name, ino) VALUES (1000, 5000, 'docs', 5001),
                                                            (1000, 5001, 'f', 5002);
INSERT INTO chunks (id, user_id, sha256, size, refcount) VALUES (7000, 1000, :first, :whole, 1),
                                                                 (7001, 1000, :second, 100, 1);
INSERT INTO file_chunks (user_id, ino, index, chunk_id) VALUES (1000, 5002, 0, 7000),
                                                               (1000, 5002, 1, 7001);
INSERT INTO xattrs (user_id, ino, name, value) VALUES (1000, 5002, 'user.k', 'v');
"""


def test_migrations_apply_once_then_are_harmless(database_factory):
    engine = create_engine(database_factory())
    try:
        assert migrate(engine) == list(range(1, LATEST_VERSION + 1))
        assert migrate(engine) == []
        with engine.connect() as conn:
            assert current_version(conn) == LATEST_VERSION
            tables = set(sa.inspect(conn).get_table_names())
        assert {"users", "inodes", "dentries", "chunks", "file_chunks", "xattrs", "layout",
                "sessions"} <= tables
    finally:
        engine.dispose()


def test_migration_files_are_numbered_in_order():
    assert [number for number, _ in MIGRATIONS] == list(range(1, LATEST_VERSION + 1))


@pytest.mark.parametrize("version", range(1, LATEST_VERSION))
def test_a_database_of_every_earlier_version_upgrades_with_its_files(database_factory, version):
    engine = create_engine(database_factory())
    try:
        assert migrate(engine, target=version) == list(range(1, version + 1))
        first, second = hashlib.sha256(b"1").digest(), hashlib.sha256(b"2").digest()
        with engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL dfsfs.admin = on")  # how versions 2-6 scoped rows
            statements = [_OLD_USER[version < 7], *filter(str.strip, _OLD_ACCOUNT.split(";"))]
            for statement in statements:
                conn.execute(sa.text(statement), {
                    "now": time.time_ns(), "size": OLD_CHUNK_SIZE + 100, "whole": OLD_CHUNK_SIZE,
                    "first": first, "second": second})
        assert migrate(engine) == list(range(version + 1, LATEST_VERSION + 1))
        if version < 6:  # the chunk size the stored chunks show is recorded
            assert recorded_chunk_size(engine) == OLD_CHUNK_SIZE
        url = engine.url.render_as_string(hide_password=False)
        account_engine = create_engine(url)  # the owner's, in a session of the account
        meta = MetadataStore(account_engine, 1000, open_own_session(account_engine, 1000, "mount", 60))
        try:
            docs = meta.lookup(meta.root_ino, b"docs")
            found = meta.lookup(docs.ino, b"f")
            assert (found.ino, found.size) == (5002, OLD_CHUNK_SIZE + 100)
            assert [ref.digest for _, ref in sorted(meta.chunk_map(5002).items())] == [first, second]
            assert meta.get_xattr(5002, b"user.k") == b"v"
            made = meta.make_node(docs.ino, b"new", 0o100644, 0, 0, time.time_ns())
            assert meta.lookup(docs.ino, b"new") == made
            if version < 8:  # migration 8 counts st_blocks of files from before (these rows,
                # written with the first release's columns, do not set it at version 8 on)
                assert found.stored_bytes == OLD_CHUNK_SIZE + 100
        finally:
            meta.engine.dispose()
    finally:
        engine.dispose()
