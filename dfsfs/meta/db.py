"""Database engine and the one transaction runner every metadata call goes through."""

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from dfsfs.errors import MetadataUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

# SQLSTATEs after which the whole transaction may simply run again.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock
MAX_ATTEMPTS = 8
CONNECT_TIMEOUT_S = 3


def create_engine(
    url: str,
    *,
    user_id: int | None = None,
    admin: bool = False,
    pool_size: int = 8,
    relaxed_commits: bool = False,
) -> Engine:
    """An engine that fails fast when PostgreSQL is down instead of hanging.

    `user_id` is handed to PostgreSQL as `dfsfs.user_id` on every connection: the
    row-level security policies scope every user-owned table by it, so a query that
    forgets its user filter still sees only that user's rows. `admin` lifts the scoping
    for administrator commands (fsck, user removal, stats --all). With `relaxed_commits`,
    transactions commit without waiting for the WAL flush unless they ask for it
    (MetadataStore makes fsync, close and every data commit durable).
    """
    engine = sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=10,
        pool_recycle=3600,
        connect_args={
            "connect_timeout": CONNECT_TIMEOUT_S,
            # A dead server must not hang a file-system call: keepalives notice it.
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 2,
            "application_name": "dfsfs",
        },
    )
    scope = {
        "uid": "" if user_id is None else str(user_id),
        "adm": "on" if admin else "off",
        "sync": "off" if relaxed_commits else "on",
    }

    @sa.event.listens_for(engine, "connect")
    def _set_scope(dbapi_conn, _record):
        with dbapi_conn.cursor() as cursor:
            cursor.execute(
                "SELECT set_config('dfsfs.user_id', %(uid)s, false),"
                " set_config('dfsfs.admin', %(adm)s, false),"
                " set_config('synchronous_commit', %(sync)s, false)",
                scope,
            )
        dbapi_conn.commit()

    return engine


def sqlstate(error: DBAPIError) -> str | None:
    return getattr(error.orig, "pgcode", None)


def run_transaction(engine: Engine, work: Callable[[Connection], T]) -> T:
    """Run `work(conn)` in one transaction, retrying serialization failures and deadlocks."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            with engine.begin() as conn:
                return work(conn)
        except DBAPIError as error:
            code = sqlstate(error)
            if code in RETRYABLE_SQLSTATES and attempt < MAX_ATTEMPTS:
                time.sleep(0.002 * 2**attempt)
                continue
            if error.connection_invalidated and attempt == 1:
                continue  # a pooled connection went stale (server restart): use a fresh one
            if code is None and isinstance(error, OperationalError):
                raise MetadataUnavailableError(
                    f"metadata database unavailable: {_first_line(error.orig)}"
                ) from error
            raise
    raise AssertionError("unreachable")


def _first_line(error: BaseException | None) -> str:
    return str(error).strip().splitlines()[0] if error else "unknown error"


def check_reachable(engine: Engine) -> None:
    """Raise MetadataUnavailableError with a readable cause if the database can't be reached."""
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except DBAPIError as error:
        raise MetadataUnavailableError(
            f"cannot reach the metadata database: {_first_line(error.orig)}"
        ) from error
