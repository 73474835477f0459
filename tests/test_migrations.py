import sqlalchemy as sa

from dfsfs.meta.db import create_engine
from dfsfs.meta.migrations import LATEST_VERSION, current_version, migrate


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
