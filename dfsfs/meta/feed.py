"""The account's change feed: what other mounts of the account change, as it commits.

PostgreSQL announces every committed change of a name or an inode on the account's
channel (migration 8, "the change feed"); a mount listens on one connection of its own
and hands the changes to the core, which drops what the kernel cached. Blocking code with
a non-blocking poll: the caller waits for `fileno()` to be readable, then calls `fetch()`.
"""

from dataclasses import dataclass

import psycopg2
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from dfsfs.errors import MetadataUnavailableError


@dataclass(frozen=True)
class EntryChanged:
    """A name appeared in a directory, or went from it (created, removed, renamed)."""

    parent_ino: int
    ino: int
    name: bytes
    gone: bool  # the name no longer points at `ino`


@dataclass(frozen=True)
class InodeChanged:
    """An inode's attributes or contents changed."""

    ino: int


Change = EntryChanged | InodeChanged


class ChangeFeed:
    def __init__(self, engine: Engine, account_id: int, own_session_id: int):
        self.own_session = str(own_session_id)
        try:
            pooled = engine.raw_connection()
        except (DBAPIError, psycopg2.Error) as error:
            raise MetadataUnavailableError(f"cannot listen for changes: {_first_line(error)}") from error
        self._connection = pooled.driver_connection
        pooled.detach()  # this connection listens for the mount's life: not the pool's
        self._connection.autocommit = True
        try:
            with self._connection.cursor() as cursor:
                cursor.execute("SELECT dfsfs_feed_channel(%s)", (account_id,))
                channel = cursor.fetchone()[0]
                cursor.execute(f'LISTEN "{channel}"')
        except psycopg2.Error as error:
            self._connection.close()
            raise MetadataUnavailableError(f"cannot listen for changes: {_first_line(error)}") from error

    def fileno(self) -> int:
        return self._connection.fileno()

    def fetch(self) -> list[Change]:
        """The changes other sessions committed since the last call (none if none)."""
        try:
            self._connection.poll()
        except psycopg2.Error as error:
            raise MetadataUnavailableError(f"the change feed broke: {_first_line(error)}") from error
        changes = []
        while self._connection.notifies:
            change = _parse(self._connection.notifies.pop(0).payload, self.own_session)
            if change is not None:
                changes.append(change)
        return changes

    def close(self) -> None:
        self._connection.close()


def _first_line(error: BaseException) -> str:
    return str(getattr(error, "orig", None) or error).strip().splitlines()[0]


def _parse(payload: str, own_session: str) -> Change | None:
    fields = payload.split(" ")
    if fields[0] == own_session:
        return None  # this mount's own change: its kernel knows
    if fields[1] in ("e+", "e-"):
        return EntryChanged(int(fields[2]), int(fields[3]), bytes.fromhex(fields[4]),
                            gone=fields[1] == "e-")
    return InodeChanged(int(fields[2]))
