"""The asynchronous backup mode's queue: chunks whose backup copy is still to be made.

It lives in PostgreSQL so that it survives restarts: a chunk is queued before any file
references it, and leaves the queue only once its backup copy is durable.
"""

from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from dfsfs.meta import schema
from dfsfs.meta.db import run_transaction

queue = schema.backup_queue


class DatabaseBackupQueue:
    """The BackupQueue of dfsfs.chunks.mirrored, kept in the `backup_queue` table."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def enqueue(self, namespace: int, digest: bytes) -> None:
        statement = (
            sa.dialects.postgresql.insert(queue)
            .values(user_id=namespace, sha256=digest)
            .on_conflict_do_nothing()
        )
        run_transaction(self.engine, lambda conn: conn.execute(statement))

    def pending(self, limit: int | None) -> Iterable[tuple[int, bytes]]:
        query = sa.select(queue.c.user_id, queue.c.sha256).order_by(queue.c.enqueued_at).limit(limit)
        rows = run_transaction(self.engine, lambda conn: conn.execute(query).all())
        return [(namespace, bytes(digest)) for namespace, digest in rows]

    def done(self, namespace: int, digest: bytes) -> None:
        statement = queue.delete().where(queue.c.user_id == namespace, queue.c.sha256 == digest)
        run_transaction(self.engine, lambda conn: conn.execute(statement))
