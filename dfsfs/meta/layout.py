"""How file bytes are laid out in the chunk stores, recorded once in the database.

Every mount of a database must cut files into chunks of the same size, whatever its own
configuration says: a different size would read a file's chunks at the wrong offsets.
"""

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from dfsfs.meta.db import run_transaction

_RECORDED = sa.text("SELECT chunk_size FROM layout")
_RECORD = sa.text("INSERT INTO layout (chunk_size) VALUES (:size) ON CONFLICT DO NOTHING")


def recorded_chunk_size(engine: Engine) -> int | None:
    """The database's chunk size; None if none is recorded yet (run `dfsfs init`)."""
    return run_transaction(engine, lambda conn: conn.execute(_RECORDED).scalar())


def record_chunk_size(engine: Engine, chunk_size: int) -> int:
    """Record `chunk_size` unless a size is recorded already; return the recorded size."""

    def work(conn) -> int:
        conn.execute(_RECORD, {"size": chunk_size})
        return conn.execute(_RECORDED).scalar_one()

    return run_transaction(engine, work)
