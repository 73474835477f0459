"""Database engine and the one transaction runner every metadata call goes through."""

import logging
import re
import threading
import time
import weakref
from collections.abc import Callable
from typing import TypeVar

import psycopg2
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from dfsfs.errors import DfsfsError, MetadataUnavailableError, PermissionDeniedError

log = logging.getLogger(__name__)

T = TypeVar("T")

# SQLSTATEs after which the whole transaction may simply run again.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock
MAX_ATTEMPTS = 8
CONNECT_TIMEOUT_S = 3
# The session of a connection has ended (revoked, logged out, unknown token) or expired
# without a heartbeat (migration 7): no statement can succeed under it any more.
SESSION_ENDED_SQLSTATES = frozenset({"DF128", "DF127"})
NOT_ADMIN_SQLSTATE = "DF001"
_TOKEN = re.compile(r"[0-9a-f]{16,128}")
# Settings every dfsfs connection pins in its startup packet, where they win over role
# defaults: every role may `ALTER ROLE itself SET …`, and the daemons of all accounts
# share the client role, so one account could otherwise make every other account's
# commits non-durable, its connections read-only or its names unresolvable.
PINNED_SETTINGS = (
    ("search_path", "public"),
    ("default_transaction_read_only", "off"),
    ("default_transaction_isolation", "read committed"),
    ("default_transaction_deferrable", "off"),
    ("statement_timeout", "0"),
    ("lock_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
    ("idle_session_timeout", "0"),
    ("row_security", "on"),
    ("bytea_output", "hex"),
    ("standard_conforming_strings", "on"),
    ("DateStyle", "ISO"),
    ("TimeZone", "UTC"),
    ("enable_indexscan", "on"),
    ("enable_indexonlyscan", "on"),
    ("enable_bitmapscan", "on"),
    ("enable_nestloop", "on"),
)
_session_ended: "weakref.WeakKeyDictionary[Engine, threading.Event]" = weakref.WeakKeyDictionary()


class SessionEndedError(DfsfsError):
    """The login session this engine acts under was ended or has expired; a daemon unmounts."""


class NotAdministratorError(PermissionDeniedError):
    """The server refused: this needs an administrator's login or the owner's credentials."""


def create_engine(
    url: str,
    *,
    session_token: str | None = None,
    password: str | None = None,
    pool_size: int = 8,
    relaxed_commits: bool = False,
) -> Engine:
    """An engine that fails fast when PostgreSQL is down instead of hanging.

    The role is the URL's: the owner's for `dfsfs init` and administration, the client
    role for daemons and account commands. `session_token` (from a login) is handed to
    PostgreSQL in every connection's startup packet as the setting `dfsfs.session`, never
    in query text: row-level security derives the account from it on the server, and a
    statement under an ended or expired session fails (SessionEndedError). `password`
    goes to libpq apart from the URL (which may be shown in messages). With
    `relaxed_commits`, transactions commit without waiting for the WAL flush unless they
    ask for it (MetadataStore makes fsync, close and every data commit durable).
    """
    if session_token is not None and not _TOKEN.fullmatch(session_token):
        raise ValueError("a session token is hexadecimal")
    pinned = {**dict(PINNED_SETTINGS), "synchronous_commit": "off" if relaxed_commits else "on",
              "dfsfs.session": session_token or ""}
    options = ["-c " + name + "=" + value.replace(" ", "\\ ") for name, value in pinned.items()]
    connect_args = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        # A dead server must not hang a file-system call: keepalives notice it.
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 2,
        "application_name": "dfsfs",
        "options": " ".join(options),
    }
    if password is not None:
        connect_args["password"] = password
    engine = sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=10,
        pool_recycle=3600,
        connect_args=connect_args,
    )
    if session_token is not None:
        _session_ended[engine] = threading.Event()
    return engine


def session_ended_event(engine: Engine) -> threading.Event | None:
    """Set once a statement of `engine` found its session ended or expired (None for an
    engine without a session): the daemon waits on it to unmount at once."""
    return _session_ended.get(engine)


def sqlstate(error: DBAPIError) -> str | None:
    return getattr(error.orig, "pgcode", None)


def run_transaction(engine: Engine, work: Callable[[Connection], T]) -> T:
    """Run `work(conn)` in one transaction, retrying serialization failures and deadlocks."""

    def attempt() -> T:
        with engine.begin() as conn:
            return work(conn)

    return _with_retries(engine, attempt)


class Statements:
    """Statements on one pooled DBAPI connection in autocommit mode, for the hot paths.

    In a `transaction`, BEGIN travels with the first statement and COMMIT follows the
    work, so n statements cost n + 1 round trips instead of n + 2 (plus SQLAlchemy's own
    overhead). Without, each statement commits alone: a read is one round trip. PostgreSQL
    gives every statement its own snapshot under READ COMMITTED anyway, so reads lose
    nothing by running outside a transaction.
    """

    def __init__(self, dbapi_connection, transaction: bool, durable: bool):
        self.dbapi_connection = dbapi_connection
        self._transaction = transaction
        # Sent with the first statement; without a transaction, durable covers that one.
        self._prefix = ("BEGIN; " if transaction else "") + (
            "SET LOCAL synchronous_commit = on; " if durable else "")
        self.begun = False
        self.executed = 0

    def execute(self, sql: str, params: dict):
        """The cursor with the statement's result; errors as SQLAlchemy's DBAPIError, which
        says whether the connection is gone."""
        cursor = self.dbapi_connection.cursor()
        if not self.executed:
            sql = self._prefix + sql
            self.begun = self._transaction  # before executing: a failed BEGIN+statement needs the rollback too
        try:
            cursor.execute(sql, params)
        except psycopg2.Error as error:
            raise DBAPIError.instance(sql, params, error, psycopg2.Error,
                                      connection_invalidated=_is_disconnect(error)) from error
        self.executed += 1
        return cursor


def run_statements(engine: Engine, work: Callable[[Statements], T], *,
                   transaction: bool = True, durable: bool = False) -> T:
    """Run `work(statements)` (see Statements), retrying like run_transaction."""

    def attempt() -> T:
        pooled = _checkout(engine)
        dbapi_connection = pooled.driver_connection
        dbapi_connection.autocommit = True
        statements = Statements(dbapi_connection, transaction, durable)
        try:
            result = work(statements)
            if statements.begun:
                statements.execute("COMMIT", {})
            return result
        except BaseException as error:
            if statements.begun and not dbapi_connection.closed:
                _roll_back(statements)
            if isinstance(error, DBAPIError) and error.connection_invalidated:
                pooled.invalidate()
                engine.dispose()  # the server went away: every pooled connection is stale
                if statements.executed:  # a later statement: the outcome is not known, no retry
                    error.connection_invalidated = False
            raise
        finally:
            if not dbapi_connection.closed:
                dbapi_connection.autocommit = False
            pooled.close()

    return _with_retries(engine, attempt)


def _checkout(engine: Engine):
    """A pooled DBAPI connection; failing to connect is an error like any other."""
    try:
        return engine.raw_connection()
    except psycopg2.Error as error:
        raise DBAPIError.instance("connect", {}, error, psycopg2.Error) from error


def _roll_back(statements: Statements) -> None:
    try:
        statements.dbapi_connection.cursor().execute("ROLLBACK")
    except psycopg2.Error:
        pass  # the connection is gone, and the transaction with it


def _is_disconnect(error: psycopg2.Error) -> bool:
    """The connection is gone (no SQLSTATE): the server died or restarted, or the network broke."""
    return error.pgcode is None and isinstance(
        error, (psycopg2.OperationalError, psycopg2.InterfaceError))


def _with_retries(engine: Engine, attempt: Callable[[], T]) -> T:
    for number in range(1, MAX_ATTEMPTS + 1):
        try:
            return attempt()
        except DBAPIError as error:
            code = sqlstate(error)
            if code in RETRYABLE_SQLSTATES and number < MAX_ATTEMPTS:
                time.sleep(0.002 * 2**number)
                continue
            if error.connection_invalidated and number == 1:
                continue  # a pooled connection went stale (server restart): use a fresh one
            if code is None and isinstance(error, OperationalError):
                raise MetadataUnavailableError(
                    f"metadata database unavailable: {_first_line(error.orig)}"
                ) from error
            raise refusal(engine, error) or error
    raise AssertionError("unreachable")


def refusal(engine: Engine | None, error: DBAPIError) -> DfsfsError | None:
    """The domain error of a trust refusal of the server (see migration 7), or None."""
    code = sqlstate(error)
    if code in SESSION_ENDED_SQLSTATES:
        event = _session_ended.get(engine) if engine is not None else None
        if event is not None:
            event.set()
        return SessionEndedError(_first_line(error.orig))
    if code == NOT_ADMIN_SQLSTATE:
        return NotAdministratorError(_first_line(error.orig))
    return None


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
