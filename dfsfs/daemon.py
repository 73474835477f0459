"""The mount daemon: build the file system for one user, mount it, serve until unmounted.

Lifecycle (as pyfuse3's examples and S3QL's mount): pyfuse3.init mounts; trio runs the
request loop beside the core's background tasks; SIGTERM/SIGINT/SIGHUP end the loop;
every buffered write is committed; pyfuse3.close unmounts.
"""

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
import trio

from dfsfs.chunks.mirrored import DamageEvent, MirroredChunkStore
from dfsfs.chunks.url import open_store
from dfsfs.config import Settings, file_url_path
from dfsfs.core.filesystem import CoreSettings, FileSystem
from dfsfs.errors import DfsfsError
from dfsfs.fuse_ops import Operations
from dfsfs.meta.backup_queue import DatabaseBackupQueue
from dfsfs.meta.db import create_engine
from dfsfs.meta.store import MetadataStore
from dfsfs.session import LoginResult, SessionEndedError, keep_alive, logout

log = logging.getLogger(__name__)

FUSE_WORKERS = 64
BACKUP_DRAIN_INTERVAL_S = 1.0
BACKUP_DRAIN_BATCH = 256


@dataclass
class MountRequest:
    database_url: str
    settings: Settings
    user_id: int
    mountpoint: str
    fuse_options: tuple[str, ...] = ()
    session: LoginResult | None = None  # the login every statement is scoped by


def build_file_system(request: MountRequest) -> FileSystem:
    settings = request.settings
    engine = create_engine(request.database_url, session_token=request.session.token,
                           pool_size=FUSE_WORKERS // 4, relaxed_commits=True)
    meta = MetadataStore(engine, request.user_id)
    store = MirroredChunkStore(
        open_store(settings.store_url, "primary"),
        open_store(settings.backup_url, "backup"),
        on_damage=_damage_recorder(meta),
        backup_queue=DatabaseBackupQueue(engine) if settings.backup_mode == "async" else None,
    )
    core = CoreSettings(
        chunk_size=settings.chunk_size,
        write_buffer_bytes=settings.write_buffer_bytes,
        read_cache_bytes=settings.read_cache_bytes,
        readahead_chunks=settings.readahead_chunks,
        attr_cache_s=settings.attr_timeout_s,
        commit_batch_bytes=max(settings.chunk_size, min(32 << 20, settings.write_buffer_bytes // 4)),
    )
    return FileSystem(meta, store, core, capacity_probe=_capacity_probe(settings.store_url))


def _damage_recorder(meta: MetadataStore) -> Callable[[DamageEvent], None]:
    def record(event: DamageEvent) -> None:
        log.warning("chunk %s: %s copy %s%s", event.digest.hex(), event.store, event.kind,
                    " (repaired)" if event.repaired else " (NOT repaired)")
        meta.record_damage(event.digest, event.store, event.kind, event.repaired, event.detail)

    return record


def _capacity_probe(store_url: str) -> Callable[[], tuple[int, int]] | None:
    """(total, free) bytes where a local primary store lives; None for object stores."""
    path = file_url_path(store_url)
    if path is None:
        return None

    def probe() -> tuple[int, int]:
        stats = os.statvfs(path)
        return stats.f_blocks * stats.f_frsize, stats.f_bavail * stats.f_frsize

    return probe


def fuse_options(request: MountRequest) -> set[str]:
    options = set(pyfuse3.default_options)
    # A source that is no path (mount would make a relative one absolute).
    options |= {f"fsname=dfsfs:user{request.user_id}", "subtype=dfsfs", "noatime"}
    options |= set(request.fuse_options)
    return options


def serve(request: MountRequest, on_mounted: Callable[[], None] = lambda: None) -> None:
    """Mount and serve until unmounted or signalled. Raises if mounting fails."""
    fs = build_file_system(request)
    operations = Operations(fs, request.settings.attr_timeout_s, request.settings.entry_timeout_s)
    pyfuse3.init(operations, request.mountpoint, fuse_options(request))
    log.info("mounted user %d at %s", request.user_id, request.mountpoint)
    clean = False
    try:
        on_mounted()
        trio.run(_serve_requests, fs, request.settings.session_heartbeat_s)
        clean = True
    finally:
        pyfuse3.close(unmount=True)
        fs.store.close()
        logout(fs.meta.engine, "unmounted")
        fs.meta.engine.dispose()
        log.info("unmounted %s%s", request.mountpoint, "" if clean else " after an error")


async def _serve_requests(fs: FileSystem, heartbeat_s: float) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        nursery.start_soon(_terminate_on_signals)
        nursery.start_soon(keep_alive, fs.meta.engine, heartbeat_s, _unmount_session_ended)
        if fs.store.backup_queue is not None:
            nursery.start_soon(_drain_backups, fs.store)
        await pyfuse3.main(min_tasks=4, max_tasks=FUSE_WORKERS)
        try:
            await fs.flush_all()
        except SessionEndedError:
            log.warning("buffered writes could not be committed: the login session has ended")
        nursery.cancel_scope.cancel()


def _unmount_session_ended(reason: str) -> None:
    log.warning("the login session has ended (%s): unmounting", reason)
    pyfuse3.terminate()


async def _drain_backups(store: MirroredChunkStore) -> None:
    """Asynchronous backup mode: copy queued chunks to the backup in the background."""
    while True:
        try:
            while await trio.to_thread.run_sync(store.drain_backup_queue, BACKUP_DRAIN_BATCH):
                pass
        except DfsfsError as error:
            log.warning("backup copies are behind (retrying): %s", error)
        await trio.sleep(BACKUP_DRAIN_INTERVAL_S)


async def _terminate_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: committing buffered writes and unmounting",
                     signal.Signals(signum).name)
            pyfuse3.terminate()
            return
