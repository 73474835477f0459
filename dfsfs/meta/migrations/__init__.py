"""Versioned schema migrations: `NNNN_name.sql` files applied in order by `dfsfs init`.

A released migration never changes (a fix is the next migration); each runs in the
transaction that records it, under an advisory lock, so concurrent inits apply it once.
"""

import re
from importlib import resources

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from dfsfs.meta import schema
from dfsfs.meta.db import run_transaction

# Serialises concurrent `dfsfs init` runs (any constant unique to dfsfs).
MIGRATION_LOCK_ID = 0x6466_7366_73
_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def _migration_files() -> list[tuple[int, str]]:
    found = []
    for entry in resources.files(__name__).iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name))
    found.sort()
    if [number for number, _ in found] != list(range(1, len(found) + 1)):
        raise AssertionError(f"migration files are not numbered 1..n: {found}")
    return found


MIGRATIONS: list[tuple[int, str]] = _migration_files()
LATEST_VERSION = MIGRATIONS[-1][0]


def migration_sql(file_name: str) -> str:
    return resources.files(__name__).joinpath(file_name).read_text(encoding="utf-8")


def current_version(conn: Connection) -> int:
    if not sa.inspect(conn).has_table(schema.schema_version.name):
        return 0
    version = conn.execute(sa.select(sa.func.max(schema.schema_version.c.version))).scalar()
    return version or 0


def migrate(engine: Engine, target: int = LATEST_VERSION) -> list[int]:
    """Apply every migration newer than the database's version, up to `target`; return
    the numbers applied."""

    def work(conn: Connection) -> list[int]:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK_ID)))
        # Migrations 2 to 6 scope the owner's rows by this client-set flag too; they read
        # every account's rows (migration 7 replaces the flag by the login session).
        conn.execute(sa.text("SELECT set_config('dfsfs.admin', 'on', true)"))
        schema.schema_version.create(conn, checkfirst=True)
        version = current_version(conn)
        applied = []
        for number, file_name in MIGRATIONS:
            if version < number <= target:
                with conn.connection.dbapi_connection.cursor() as cursor:
                    cursor.execute(migration_sql(file_name))  # no parameters: '%' is literal
                conn.execute(schema.schema_version.insert().values(version=number))
                applied.append(number)
        return applied

    return run_transaction(engine, work)
