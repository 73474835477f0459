"""Accounts: create, find, change and remove them, through the server's functions.

Every change goes through a SECURITY DEFINER function of migration 7, which checks on the
server that the caller may make it: the owner's credentials, or an admin session of an
administrator (some calls also accept the account's own session). So an AccountStore is
only as powerful as the engine it is given. Every call is one transaction.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from dfsfs.errors import ExistsError, InvalidArgumentError, NotFoundError
from dfsfs.meta.db import run_transaction, sqlstate

# The server functions' refusals (SQLSTATE 'DF' + errno).
_REFUSALS = {"DF017": ExistsError, "DF002": NotFoundError, "DF022": InvalidArgumentError}
_MESSAGES = {"DF017": "a user with that name already exists", "DF002": "no user with that name",
             "DF022": "invalid user name or value"}


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = _Keep()  # set_quota: leave this quota as it is


@dataclass(frozen=True)
class User:
    id: int
    name: str
    is_admin: bool
    root_ino: int | None
    quota_bytes: int | None  # None = unlimited
    quota_inodes: int | None  # None = unlimited
    failed_logins: int  # consecutive failures since the last successful login
    throttled_until: datetime | None  # no login attempt is checked before this instant
    created_at: datetime
    last_fsck_at: datetime | None = None
    unix_user: str | None = None  # Linux owner of its local chunk directories


@dataclass(frozen=True)
class Footprint:
    """What removing an account deletes."""

    inodes: int
    chunks: int
    stored_bytes: int


@dataclass(frozen=True)
class SessionInfo:
    """One session of an account, as `dfsfs user sessions` shows it."""

    id: int
    purpose: str
    admin: bool
    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    expires_at: datetime
    ended_at: datetime | None
    end_reason: str | None

    @property
    def live(self) -> bool:
        return self.ended_at is None


def _user(row) -> User | None:
    return None if row is None else User(**row._mapping)


class AccountStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    def _run(self, work: Callable[[Connection], object]):
        try:
            return run_transaction(self.engine, work)
        except DBAPIError as error:
            code = sqlstate(error)
            if code in _REFUSALS:
                raise _REFUSALS[code](_MESSAGES[code]) from None
            raise

    def _call(self, sql: str, **params):
        return self._run(lambda conn: conn.execute(sa.text(sql), params))

    def _rows(self, sql: str, **params) -> list:
        return self._run(lambda conn: conn.execute(sa.text(sql), params).all())

    # --- creating and finding accounts ---------------------------------------------------

    def create_user(self, name: str, verifier, is_admin: bool = False, *,
                    uid: int | None = None, gid: int | None = None,
                    unix_user: str | None = None) -> int:
        """Insert the account with its verifier (auth.make_verifier), usage counters and
        an empty root directory owned by uid:gid (default: this process's); return its id."""
        uid = os.getuid() if uid is None else uid
        gid = os.getgid() if gid is None else gid
        return self._run(lambda conn: conn.execute(
            sa.text("SELECT account FROM dfsfs_create_account(:name, :admin, :uid, :gid, :unix_user,"
                    " :kdf, :salt, :time_cost, :memory_cost, :parallelism, :key_length,"
                    " :stored_key)"),
            {"name": name, "admin": is_admin, "uid": uid, "gid": gid, "unix_user": unix_user,
             **verifier.sql_parameters()}).scalar_one())

    def get_user(self, name: str) -> User | None:
        return _user(next(iter(self._rows("SELECT * FROM dfsfs_accounts(:name)", name=name)), None))

    def require_user(self, name: str) -> User:
        user = self.get_user(name)
        if user is None:
            raise NotFoundError("no user with that name")
        return user

    def list_users(self) -> list[User]:
        return [_user(row) for row in self._rows("SELECT * FROM dfsfs_accounts()")]

    # --- changing accounts ---------------------------------------------------------------

    def set_verifier(self, name: str, verifier) -> int:
        """A new password (its verifier); also ends login throttling. Returns the id."""
        return self._run(lambda conn: conn.execute(
            sa.text("SELECT dfsfs_set_verifier(:name, :kdf, :salt, :time_cost, :memory_cost,"
                    " :parallelism, :key_length, :stored_key)"),
            {"name": name, **verifier.sql_parameters()}).scalar_one())

    def set_quota(self, name: str, quota_bytes=KEEP, quota_inodes=KEEP) -> User:
        """Set either quota (None = unlimited, KEEP = unchanged); return the updated user."""
        if quota_bytes is not KEEP or quota_inodes is not KEEP:
            self._call("SELECT dfsfs_set_quota(:name, :set_bytes, :bytes, :set_inodes, :inodes)",
                       name=name, set_bytes=quota_bytes is not KEEP,
                       bytes=None if quota_bytes is KEEP else quota_bytes,
                       set_inodes=quota_inodes is not KEEP,
                       inodes=None if quota_inodes is KEEP else quota_inodes)
        return self.require_user(name)

    def set_stores(self, name: str, primary_url: str | None, backup_url: str | None) -> int:
        """The account's own chunk stores, handed to its daemons at login (None: the
        configured ones)."""
        return self._run(lambda conn: conn.execute(
            sa.text("SELECT dfsfs_set_account_stores(:name, :primary, :backup)"),
            {"name": name, "primary": primary_url, "backup": backup_url}).scalar_one())

    def stores(self, name: str) -> tuple[str | None, str | None]:
        row = self._rows("SELECT * FROM dfsfs_account_stores(:name)", name=name)[0]
        return row.primary_store, row.backup_store

    def remove_user(self, name: str) -> int:
        """Delete the account; ON DELETE CASCADE removes its files, chunks rows and usage.

        The chunk files in the stores are the caller's to delete, after this commit
        (reference before delete)."""
        return self._run(lambda conn: conn.execute(
            sa.text("SELECT dfsfs_remove_account(:name)"), {"name": name}).scalar_one())

    # --- sessions ------------------------------------------------------------------------

    def sessions(self, name: str) -> list[SessionInfo]:
        return [SessionInfo(**row._mapping)
                for row in self._rows("SELECT * FROM dfsfs_list_sessions(:name)", name=name)]

    def revoke_sessions(self, name: str, session_id: int | None = None) -> int:
        """End one live session of the account, or all (None); return how many ended."""
        return self._run(lambda conn: conn.execute(
            sa.text("SELECT dfsfs_revoke_sessions(:name, :session)"),
            {"name": name, "session": session_id}).scalar_one())

    # --- what an account holds (rows visible to the engine: the owner's or an admin's) ---

    def chunk_digests(self, user_id: int) -> list[bytes]:
        """SHA-256 digests of every chunk the account references (to delete their files)."""
        return [bytes(digest) for (digest,) in self._rows(
            "SELECT sha256 FROM chunks WHERE user_id = :account", account=user_id)]

    def footprint(self, user_id: int) -> Footprint:
        row = self._rows(
            "SELECT (SELECT count(*) FROM inodes WHERE user_id = :account) AS inodes,"
            " count(*) AS chunks, coalesce(sum(size), 0) AS stored"
            " FROM chunks WHERE user_id = :account", account=user_id)[0]
        return Footprint(inodes=row.inodes, chunks=row.chunks, stored_bytes=int(row.stored))
