"""Two stores holding every chunk: reads are verified and repaired from the other copy.

`get` never returns bytes whose SHA-256 differs from the digest they were asked for. A
primary copy that is missing, corrupt or unreadable is replaced from the backup, and each
damaged copy is reported through `on_damage` so that the metadata layer can record it.

The backup is written either with the primary (synchronous mode) or later, from a queue
that survives restarts (asynchronous mode, when a `backup_queue` is given).
"""

import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Literal, Protocol

from dfsfs.chunks.base import ChunkMissingError, ChunkStore, check_key, digest_of
from dfsfs.errors import ChunkLostError, NoSpaceError, StorageError, StoreUnavailableError

log = logging.getLogger(__name__)

Role = Literal["primary", "backup"]
# "unreadable": the store answered with an I/O error rather than bytes or "absent".
DamageKind = Literal["missing", "corrupt", "unreadable"]
# "unavailable": the store did not answer at all (an outage): nothing is known of the copy,
# and nothing is recorded or repaired.
CopyState = Literal["ok", "unavailable", DamageKind]

# Backup writes run in this many threads while the calling thread writes the primary;
# callers beyond that wait, which slows writers to the backup's pace.
BACKUP_WRITE_THREADS = 8


class BackupQueue(Protocol):
    """Chunks written to the primary whose backup copy is still to be made."""

    def enqueue(self, namespace: int, digest: bytes) -> None:
        """Remember that the chunk needs a backup copy."""

    def pending(self, limit: int | None) -> Iterable[tuple[int, bytes]]:
        """Up to `limit` (all if None) queued chunks, oldest first."""

    def done(self, namespace: int, digest: bytes) -> None:
        """Forget the chunk: its backup copy is durable, or it no longer exists."""


@dataclass(frozen=True)
class DamageEvent:
    """One copy of a chunk found missing, corrupt or unreadable."""

    namespace: int
    digest: bytes
    store: Role
    kind: DamageKind
    repaired: bool  # a good copy was written back in its place
    detail: str = ""


@dataclass(frozen=True)
class CheckResult:
    """What `verify` found in each store and which copies it rewrote."""

    namespace: int
    digest: bytes
    primary: CopyState
    backup: CopyState
    repaired: tuple[Role, ...] = ()

    @property
    def lost(self) -> bool:
        """No store holds a good copy, and both said so."""
        return "ok" not in (self.primary, self.backup) and not self.unknown

    @property
    def unknown(self) -> bool:
        """A store did not answer, and the other holds no good copy: nothing is settled."""
        return "ok" not in (self.primary, self.backup) and "unavailable" in (self.primary, self.backup)


@dataclass(frozen=True)
class _Copy:
    """The outcome of reading one copy: its bytes only if they match the digest."""

    role: Role
    store: ChunkStore
    state: CopyState
    data: bytes | None = None
    detail: str = ""


class MirroredChunkStore(ChunkStore):
    """A primary store and a backup store presented as one store with verified reads."""

    def __init__(
        self,
        primary: ChunkStore,
        backup: ChunkStore,
        on_damage: Callable[[DamageEvent], None] | None = None,
        backup_queue: BackupQueue | None = None,
    ) -> None:
        self.primary = primary
        self.backup = backup
        self.name = f"{primary.name}+{backup.name}"
        self.on_damage = on_damage  # called from the reading thread
        self.backup_queue = backup_queue
        self._backup_writers = futures.ThreadPoolExecutor(
            BACKUP_WRITE_THREADS, thread_name_prefix="backup-write"
        )

    def put(self, namespace: int, digest: bytes, data: bytes) -> None:
        if self.backup_queue is None:
            self._on_both(lambda store: store.put(namespace, digest, data))
        else:
            self.primary.put(namespace, digest, data)
            self.backup_queue.enqueue(namespace, digest)

    def get(self, namespace: int, digest: bytes) -> bytes:
        """The chunk's bytes, verified; from the backup if the primary copy is bad.

        Raises ChunkLostError when neither copy is good, StoreUnavailableError when a
        store did not answer and the other holds no good copy (an outage, not damage).
        """
        check_key(namespace, digest)
        primary = _read_verified("primary", self.primary, namespace, digest)
        if primary.data is not None:
            return primary.data
        backup = _read_verified("backup", self.backup, namespace, digest)
        self._mend(namespace, digest, [primary, backup], good_data=backup.data)
        if backup.data is not None:
            return backup.data
        states = f"primary {primary.state}, backup {backup.state}"
        if "unavailable" in (primary.state, backup.state):
            raise StoreUnavailableError(f"chunk {digest.hex()}: a chunk store does not answer ({states})")
        raise ChunkLostError(f"chunk {digest.hex()} of namespace {namespace} has no good copy ({states})")

    def has(self, namespace: int, digest: bytes) -> bool:
        """Whether every copy put() promises is there: both, unless the backup is queued."""
        if not self.primary.has(namespace, digest):
            return False
        return self.backup_queue is not None or self.backup.has(namespace, digest)

    def delete(self, namespace: int, digest: bytes) -> None:
        # The backup first: a reader meanwhile still finds the primary copy, and never
        # repairs a missing primary copy from a backup copy about to go.
        self.backup.delete(namespace, digest)
        self.primary.delete(namespace, digest)

    def keys(self, namespace: int | None = None) -> Iterator[tuple[int, bytes]]:
        return self.primary.keys(namespace)

    def sync(self) -> None:
        if self.backup_queue is None:
            self._on_both(lambda store: store.sync())
        else:
            self.primary.sync()

    def close(self) -> None:
        self._backup_writers.shutdown()
        self.primary.close()
        self.backup.close()

    def verify(self, namespace: int, digest: bytes, repair: bool) -> CheckResult:
        """Check both copies; with `repair`, rewrite a bad copy from the good one.

        In asynchronous mode a chunk still queued for backup shows as missing there:
        drain the queue first.
        """
        check_key(namespace, digest)
        copies = [
            _read_verified("primary", self.primary, namespace, digest),
            _read_verified("backup", self.backup, namespace, digest),
        ]
        good_data = next((copy.data for copy in copies if copy.data is not None), None)
        repaired = self._mend(namespace, digest, copies, good_data if repair else None)
        primary, backup = copies
        return CheckResult(namespace, digest, primary.state, backup.state, repaired)

    def drain_backup_queue(self, limit: int | None = None) -> int:
        """Copy queued chunks from the primary to the backup; return how many were copied.

        A chunk whose primary copy is bad stays queued (and is reported): fsck has to
        deal with it. One that no longer exists in the primary was deleted since it was
        queued and leaves the queue.
        """
        if self.backup_queue is None:
            raise RuntimeError("drain_backup_queue needs a store made with a backup_queue")
        settled: list[tuple[int, bytes]] = []
        copied = 0
        try:
            for namespace, digest in self.backup_queue.pending(limit):
                primary = _read_verified("primary", self.primary, namespace, digest)
                if primary.data is not None:
                    self.backup.put(namespace, digest, primary.data)
                    copied += 1
                elif primary.state == "missing":
                    log.info("chunk %s of namespace %s was deleted before its backup",
                             digest.hex(), namespace)
                else:
                    self._report(namespace, digest, primary, repaired=False)
                    continue
                settled.append((namespace, digest))
        finally:
            # What was copied before a failure still leaves the queue, once durable.
            if settled:
                self.backup.sync()
            for namespace, digest in settled:
                self.backup_queue.done(namespace, digest)
        return copied

    def _on_both(self, operation: Callable[[ChunkStore], None]) -> None:
        """Run `operation` on the backup in a pool thread and on the primary here."""
        backup_done = self._backup_writers.submit(operation, self.backup)
        try:
            operation(self.primary)
        finally:
            futures.wait([backup_done])  # never leave a backup write running unseen
        backup_done.result()

    def _mend(
        self, namespace: int, digest: bytes, copies: list[_Copy], good_data: bytes | None
    ) -> tuple[Role, ...]:
        """Report every bad copy, rewriting it from `good_data` if given; return the rewritten."""
        repaired: list[Role] = []
        for copy in copies:
            if copy.state in ("ok", "unavailable"):
                continue
            fixed = good_data is not None and _rewrite(copy.store, namespace, digest, good_data)
            if fixed:
                repaired.append(copy.role)
            self._report(namespace, digest, copy, fixed)
        return tuple(repaired)

    def _report(self, namespace: int, digest: bytes, copy: _Copy, repaired: bool) -> None:
        event = DamageEvent(namespace, digest, copy.role, copy.state, repaired, copy.detail)
        outcome = "repaired" if repaired else "not repaired"
        log.warning("chunk %s of namespace %s: %s copy %s, %s (%s)",
                    digest.hex(), namespace, copy.role, copy.state, outcome, copy.detail)
        if self.on_damage is None:
            return
        try:
            self.on_damage(event)
        except Exception:
            # Recording damage must not fail a read that found a good copy.
            log.exception("recording %s failed", event)


def _read_verified(role: Role, store: ChunkStore, namespace: int, digest: bytes) -> _Copy:
    try:
        data = store.get(namespace, digest)
    except ChunkMissingError:
        return _Copy(role, store, "missing", detail=f"{store.name} holds no copy")
    except StoreUnavailableError as exc:
        return _Copy(role, store, "unavailable", detail=str(exc))
    except StorageError as exc:
        return _Copy(role, store, "unreadable", detail=str(exc))
    actual = digest_of(data)
    if actual != digest:
        detail = f"{store.name} holds {len(data)} bytes with SHA-256 {actual.hex()}"
        return _Copy(role, store, "corrupt", detail=detail)
    return _Copy(role, store, "ok", data)


def _rewrite(store: ChunkStore, namespace: int, digest: bytes, data: bytes) -> bool:
    """Replace a bad copy durably; False (logged) if the store refuses."""
    try:
        store.delete(namespace, digest)  # a put would keep a corrupt file of the same name
        store.put(namespace, digest, data)
        store.sync()
    except (StorageError, NoSpaceError) as exc:
        log.warning("rewriting chunk %s of namespace %s in %s failed: %s",
                    digest.hex(), namespace, store.name, exc)
        return False
    return True
