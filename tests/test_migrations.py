import time

import sqlalchemy as sa

from dfsfs.meta.accounts import AccountStore
from dfsfs.meta.db import create_engine
from dfsfs.meta.migrations import LATEST_VERSION, MIGRATIONS, current_version, migrate
from dfsfs.meta.store import MetadataStore


def test_migrations_apply_once_then_are_harmless(database_factory):
    engine = create_engine(database_factory(), admin=True)
    try:
        assert migrate(engine) == list(range(1, LATEST_VERSION + 1))
        assert migrate(engine) == []
        with engine.connect() as conn:
            assert current_version(conn) == LATEST_VERSION
            tables = set(sa.inspect(conn).get_table_names())
        assert {"users", "inodes", "dentries", "chunks", "file_chunks", "xattrs"} <= tables
    finally:
        engine.dispose()


def test_upgrade_from_version_3_keeps_accounts_and_installs_the_functions(database_factory,
                                                                          monkeypatch):
    """A database made before migration 4 (no server-side functions, an index on
    inodes.user_id) upgrades in place, and its namespace works through the functions."""
    engine = create_engine(database_factory(), admin=True)
    try:
        monkeypatch.setattr("dfsfs.meta.migrations.MIGRATIONS", MIGRATIONS[:3])
        assert migrate(engine) == [1, 2, 3]
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE INDEX inodes_user ON inodes (user_id)")  # as v3 had it
        user_id = AccountStore(engine).create_user("old", "hash-of-before")
        monkeypatch.setattr("dfsfs.meta.migrations.MIGRATIONS", MIGRATIONS)
        assert migrate(engine) == [4]
        with engine.connect() as conn:
            indexes = {index["name"] for index in sa.inspect(conn).get_indexes("inodes")}
        assert "inodes_user" not in indexes and "inodes_unlinked" in indexes
        meta = MetadataStore(create_engine(engine.url.render_as_string(hide_password=False),
                                           user_id=user_id), user_id)
        now = time.time_ns()
        made = meta.make_node(meta.root_ino, b"f", 0o100644, 0, 0, now)
        assert meta.lookup(meta.root_ino, b"f") == made
        assert meta.unlink(meta.root_ino, b"f", now, directory=False).purged
        meta.engine.dispose()
    finally:
        engine.dispose()
