"""Pure helpers of fixed-size chunking: where a byte range falls, and what a chunk is."""

import hashlib
from collections.abc import Iterator

from dfsfs.types import ChunkRef


def spans(offset: int, length: int, chunk_size: int) -> Iterator[tuple[int, int, int]]:
    """(chunk index, start, end within the chunk) of each chunk the range touches."""
    end = offset + length
    position = offset
    while position < end:
        index, start = divmod(position, chunk_size)
        stop = min(chunk_size, start + end - position)
        yield index, start, stop
        position += stop - start


def is_zeros(data: bytes | bytearray) -> bool:
    if not data:
        return True
    if data[0] or data[-1] or data[len(data) // 2]:
        return False
    return data.count(0) == len(data)


def chunk_ref(data: bytes | bytearray) -> ChunkRef | None:
    """The chunk's digest and size; None for an all-zero chunk, which is stored as a hole.
    (Runs in a worker thread: hashlib releases the GIL on large buffers.)"""
    if is_zeros(data):
        return None
    return ChunkRef(hashlib.sha256(data).digest(), len(data))
