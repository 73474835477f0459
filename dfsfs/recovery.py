"""Settling what ended sessions left behind, and deleting the bytes of freed chunks.

Blocking code over a MetadataStore and the mirrored chunk stores, shared by the mount
(which runs it in a worker thread) and fsck. No transaction is open while chunk bytes
move: each step is its own metadata call (see meta/migrations/0008_write_path.sql).
"""

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from dfsfs.chunks.mirrored import MirroredChunkStore
from dfsfs.errors import StoreUnavailableError
from sqlalchemy.engine import Engine

from dfsfs.meta.store import MetadataStore, describe_session, open_session
from dfsfs.types import ReclaimableChunk

log = logging.getLogger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass
class RecoveryReport:
    ended_sessions: int = 0
    purged_inodes: int = 0
    settled_chunks: int = 0
    cut_files: list[tuple[int, int, int]] = field(default_factory=list)  # (ino, old, new size)
    reclaimed_chunks: int = 0


def boot_id() -> str | None:
    """This boot of the machine: a session of another boot here is over."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid and the boot, it
    names one process, whatever pids are reused later. None once it is gone, including
    a killed process its parent has not reaped yet (a zombie serves nothing)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def open_own_session(engine: Engine, account_id: int, purpose: str, expiry_s: int) -> int:
    """A session of the account run by this process on this machine (fsck's)."""
    pid = os.getpid()
    return open_session(engine, account_id, purpose, socket.gethostname(), pid, boot_id(),
                        process_start(pid), expiry_s)


def describe_own_session(engine: Engine) -> None:
    """This process serves the login session of `engine` (a daemon's): a later mount on
    this machine tells from it when the process is gone."""
    pid = os.getpid()
    describe_session(engine, pid, boot_id(), process_start(pid))


def sessions_ended_here(meta: MetadataStore) -> list[int]:
    """Sessions of the account on this machine whose process is gone: started in an
    earlier boot, or whose process no longer runs. (Sessions elsewhere end when they
    expire.)"""
    ours = boot_id()
    return [session_id for session_id, pid, session_boot, started
            in meta.sessions_on_host(socket.gethostname())
            if session_boot != ours or process_start(pid) != started]


def recover(meta: MetadataStore, store: MirroredChunkStore, chunk_size: int,
            ended_sessions: list[int] = ()) -> RecoveryReport:
    """Settle the sessions of `meta`'s account that are over (`ended_sessions` are known
    dead; expired ones are found): drop their holds, purge inodes nobody holds, check the
    chunks they put but never made durable (settle what the stores hold; cut back files
    whose bytes did not survive, recorded as damage), finish their deletions, and reclaim
    what all this freed."""
    report = RecoveryReport()
    if ended_sessions:
        meta.end_sessions(list(ended_sessions), "crashed")
    found = meta.recover()
    report.ended_sessions = found.ended_sessions + len(ended_sessions)
    report.purged_inodes = len(found.purged_inodes)
    if found.unsettled:
        _check_unsettled(meta, store, chunk_size, found.unsettled, report)
    if found.deleting:
        report.reclaimed_chunks += delete_claimed(
            meta, store, meta.take_over_deletion([chunk.id for chunk in found.deleting]))
    report.reclaimed_chunks += reclaim(meta, store, found.reclaimable)
    for ino, old_size, new_size in report.cut_files:
        log.warning("recovery: inode %d lost data that was not durable at a crash; its size"
                    " went from %d to %d bytes", ino, old_size, new_size)
    return report


def _check_unsettled(meta: MetadataStore, store: MirroredChunkStore, chunk_size: int,
                     chunks: list[ReclaimableChunk], report: RecoveryReport) -> None:
    results = [store.verify(meta.account_id, chunk.digest, repair=True) for chunk in chunks]
    if any(result.unknown for result in results):
        # A store is down: cutting files back now could throw away what survived there.
        raise StoreUnavailableError("a chunk store does not answer: the chunks a crashed"
                                    " mount left unsettled are checked at the next mount")
    kept = [chunk.digest for chunk, result in zip(chunks, results) if not result.lost]
    lost = [chunk.id for chunk, result in zip(chunks, results) if result.lost]
    if kept:
        store.sync()
        report.settled_chunks = meta.settle(kept)
    if lost:
        report.cut_files = meta.cut_lost(chunk_size, lost)


def reclaim(meta: MetadataStore, store: MirroredChunkStore, chunks: list[ReclaimableChunk]) -> int:
    """Delete the bytes of chunks left with no reference and no hold: claim them durably,
    delete their bytes, drop their rows. Returns how many went."""
    if not chunks:
        return 0
    return delete_claimed(meta, store, meta.claim_reclaim([chunk.id for chunk in chunks]))


def delete_claimed(meta: MetadataStore, store: MirroredChunkStore,
                   claimed: list[ReclaimableChunk]) -> int:
    """Delete the bytes of chunks this session has claimed, then their rows."""
    if not claimed:
        return 0
    for chunk in claimed:
        store.delete(meta.account_id, chunk.digest)
    return meta.finish_reclaim([chunk.id for chunk in claimed])
