"""Account metadata: users, their root directory, quotas and login throttling state.

Used by administrator commands and login, through an admin engine
(`create_engine(url, admin=True)`): creating or removing an account touches rows that
row-level security would otherwise hide. Every call is one transaction.
"""

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from dfsfs.errors import ExistsError, NotFoundError
from dfsfs.meta.db import run_transaction, sqlstate
from dfsfs.meta.schema import chunks, inodes, usage, users

ROOT_MODE = stat.S_IFDIR | 0o755
UNIQUE_VIOLATION = "23505"


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = _Keep()  # set_quota: leave this quota as it is


@dataclass(frozen=True)
class User:
    id: int
    name: str
    password_hash: str = field(repr=False)
    is_admin: bool
    root_ino: int | None
    quota_bytes: int | None  # None = unlimited
    quota_inodes: int | None  # None = unlimited
    failed_logins: int  # consecutive failures since the last successful login
    throttled_until: datetime | None  # no login attempt is checked before this instant
    created_at: datetime


@dataclass(frozen=True)
class Footprint:
    """What removing an account deletes."""

    inodes: int
    chunks: int
    stored_bytes: int


_USER_COLUMNS = [users.c[f.name] for f in User.__dataclass_fields__.values()]


def _user(row) -> User | None:
    return None if row is None else User(**row._mapping)


class AccountStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    def _run(self, work: Callable[[Connection], object]):
        return run_transaction(self.engine, work)

    # --- creating and finding accounts ---------------------------------------------------

    def create_user(self, name: str, password_hash: str, is_admin: bool = False) -> int:
        """Insert the account, its usage counters and its root directory; return its id."""

        def work(conn: Connection) -> int:
            user_id = conn.execute(
                users.insert()
                .values(name=name, password_hash=password_hash, is_admin=is_admin)
                .returning(users.c.id)
            ).scalar_one()
            root_ino = _insert_root_directory(conn, user_id)
            conn.execute(users.update().where(users.c.id == user_id).values(root_ino=root_ino))
            conn.execute(usage.insert().values(user_id=user_id, directories=1))
            return user_id

        try:
            return self._run(work)
        except IntegrityError as error:
            if sqlstate(error) == UNIQUE_VIOLATION:
                raise ExistsError("a user with that name already exists") from None
            raise

    def get_user(self, name: str) -> User | None:
        return self._find_one(users.c.name == name)

    def get_user_by_id(self, user_id: int) -> User | None:
        return self._find_one(users.c.id == user_id)

    def _find_one(self, condition) -> User | None:
        query = sa.select(*_USER_COLUMNS).where(condition)
        return self._run(lambda conn: _user(conn.execute(query).first()))

    def require_user(self, name: str) -> User:
        user = self.get_user(name)
        if user is None:
            raise NotFoundError("no user with that name")
        return user

    def list_users(self) -> list[User]:
        return self._run(
            lambda conn: [
                _user(row)
                for row in conn.execute(sa.select(*_USER_COLUMNS).order_by(users.c.name))
            ]
        )

    # --- changing accounts ---------------------------------------------------------------

    def set_password_hash(self, user_id: int, password_hash: str) -> None:
        """Store a new hash; a new password also ends any login throttling."""
        self._update(
            user_id, password_hash=password_hash, failed_logins=0, throttled_until=None
        )

    def set_quota(self, name: str, quota_bytes=KEEP, quota_inodes=KEEP) -> User:
        """Set either quota (None = unlimited, KEEP = unchanged); return the updated user."""
        changes = {
            column: value
            for column, value in (("quota_bytes", quota_bytes), ("quota_inodes", quota_inodes))
            if value is not KEEP
        }
        if not changes:
            return self.require_user(name)

        def work(conn: Connection) -> User:
            row = conn.execute(
                sa.update(users)
                .where(users.c.name == name)
                .values(**changes)
                .returning(*_USER_COLUMNS)
            ).first()
            if row is None:
                raise NotFoundError("no user with that name")
            return _user(row)

        return self._run(work)

    def remove_user(self, name: str) -> int:
        """Delete the account; ON DELETE CASCADE removes its files, chunks rows and usage.

        The chunk files in the stores are the caller's to delete, after this commit
        (reference before delete)."""

        def work(conn: Connection) -> int:
            user_id = conn.execute(
                users.delete().where(users.c.name == name).returning(users.c.id)
            ).scalar()
            if user_id is None:
                raise NotFoundError("no user with that name")
            return user_id

        return self._run(work)

    def chunk_digests(self, user_id: int) -> list[bytes]:
        """SHA-256 digests of every chunk the account references (to delete their files)."""
        return self._run(
            lambda conn: [
                bytes(digest)
                for digest in conn.execute(
                    sa.select(chunks.c.sha256).where(chunks.c.user_id == user_id)
                ).scalars()
            ]
        )

    def footprint(self, user_id: int) -> Footprint:
        def work(conn: Connection) -> Footprint:
            inode_count = conn.execute(
                sa.select(sa.func.count()).select_from(inodes).where(inodes.c.user_id == user_id)
            ).scalar_one()
            chunk_count, stored = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(chunks.c.size), 0))
                .where(chunks.c.user_id == user_id)
            ).one()
            return Footprint(inodes=inode_count, chunks=chunk_count, stored_bytes=int(stored))

        return self._run(work)

    # --- login throttling state ----------------------------------------------------------

    def claim_login_attempt(
        self, user_id: int | None, now: datetime, delay_s: Callable[[int], float]
    ) -> float:
        """Count a login attempt as failed before its password is checked, atomically.

        Returns the seconds the account is still locked (the attempt is refused), else 0
        (the attempt is counted and may go on; a success resets the count). Claiming
        first means parallel guesses cannot all slip in before the lock is set. `user_id`
        None runs the same statements matching no row.
        """

        def work(conn: Connection) -> float:
            row = conn.execute(
                sa.select(users.c.failed_logins, users.c.throttled_until)
                .where(users.c.id == (-1 if user_id is None else user_id))
                .with_for_update()
            ).first()
            if row is None:
                return 0
            failures, throttled_until = row
            if throttled_until is not None and throttled_until > now:
                return (throttled_until - now).total_seconds()
            delay = delay_s(failures + 1)
            conn.execute(
                sa.update(users)
                .where(users.c.id == user_id)
                .values(
                    failed_logins=failures + 1,
                    throttled_until=now + timedelta(seconds=delay) if delay > 0 else None,
                )
            )
            return 0

        return self._run(work)

    def record_successful_login(self, user_id: int) -> None:
        self._update(user_id, failed_logins=0, throttled_until=None)

    def _update(self, user_id: int, **values) -> None:
        def work(conn: Connection) -> None:
            result = conn.execute(sa.update(users).where(users.c.id == user_id).values(**values))
            if result.rowcount == 0:
                raise NotFoundError(f"no user with id {user_id}")

        self._run(work)


def _insert_root_directory(conn: Connection, user_id: int) -> int:
    # Owned by whoever creates the account; the mount maps ownership as it sees fit.
    now_ns = time.time_ns()
    return conn.execute(
        inodes.insert()
        .values(
            user_id=user_id, mode=ROOT_MODE, uid=os.getuid(), gid=os.getgid(), nlink=2,
            atime_ns=now_ns, mtime_ns=now_ns, ctime_ns=now_ns,
        )
        .returning(inodes.c.id)
    ).scalar_one()
