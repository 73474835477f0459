"""Versioned schema migrations. `dfsfs init` applies the missing ones; re-running is harmless."""

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from dfsfs.meta import schema
from dfsfs.meta.db import run_transaction
from dfsfs.meta.procedures import FUNCTIONS_SQL

# Serialises concurrent `dfsfs init` runs (any constant unique to dfsfs).
MIGRATION_LOCK_ID = 0x6466_7366_73


def _create_tables(conn: Connection) -> None:
    tables = [t for t in schema.metadata.sorted_tables if t is not schema.schema_version]
    schema.metadata.create_all(conn, tables=tables)


def _scope_rows(conn: Connection, table: str, user_column: str) -> None:
    """Row-level security: a connection sees the rows of its own user (or all, as admin)."""
    conn.exec_driver_sql(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
    conn.exec_driver_sql(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
    conn.exec_driver_sql(
        f"CREATE POLICY {table}_by_user ON {table} USING ("
        " current_setting('dfsfs.admin', true) = 'on'"
        f" OR {user_column} = nullif(current_setting('dfsfs.user_id', true), '')::bigint)"
    )


def _row_level_security(conn: Connection) -> None:
    """Defense in depth: a query missing its user filter sees only the scoped user's rows."""
    for table in schema.USER_OWNED_TABLES:
        _scope_rows(conn, table.name, "user_id")


def _row_level_security_on_accounts(conn: Connection) -> None:
    """A user's connection sees its own account row only (not others' password hashes)."""
    _scope_rows(conn, schema.users.name, "id")


def _namespace_functions(conn: Connection) -> None:
    """Server-side functions for the hottest metadata transactions (one round trip each),
    and an index fit for them: with one on inodes.user_id, PL/pgSQL's generic plans for
    `id = $1 AND user_id = $2` scanned all of a user's inodes instead of one row."""
    with conn.connection.dbapi_connection.cursor() as cursor:
        cursor.execute(FUNCTIONS_SQL)  # no parameters: '%' in the text is literal
        cursor.execute("DROP INDEX IF EXISTS inodes_user")
        cursor.execute("CREATE INDEX IF NOT EXISTS inodes_unlinked ON inodes (user_id)"
                       " WHERE nlink = 0")


MIGRATIONS: list[tuple[int, Callable[[Connection], None]]] = [
    (1, _create_tables),
    (2, _row_level_security),
    (3, _row_level_security_on_accounts),
    (4, _namespace_functions),
]
LATEST_VERSION = MIGRATIONS[-1][0]


def current_version(conn: Connection) -> int:
    if not sa.inspect(conn).has_table(schema.schema_version.name):
        return 0
    version = conn.execute(sa.select(sa.func.max(schema.schema_version.c.version))).scalar()
    return version or 0


def migrate(engine: Engine) -> list[int]:
    """Apply every migration newer than the database's version; return those applied."""

    def work(conn: Connection) -> list[int]:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK_ID)))
        schema.schema_version.create(conn, checkfirst=True)
        version = current_version(conn)
        applied = []
        for number, step in MIGRATIONS:
            if number > version:
                step(conn)
                conn.execute(schema.schema_version.insert().values(version=number))
                applied.append(number)
        return applied

    return run_transaction(engine, work)
