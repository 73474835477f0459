"""The mount daemon: build the file system for one account, mount it, serve until unmounted.

Lifecycle (as pyfuse3's examples and S3QL's mount): open a session; pyfuse3.init mounts;
trio runs the request loop beside the core's background work; recovery settles what
ended sessions of the account left; SIGTERM/SIGINT/SIGHUP end the loop; on every way out
the core commits everything and makes it durable; pyfuse3.close unmounts; the session ends.
"""

import ctypes
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
import trio

from dfsfs import recovery
from dfsfs.chunks.mirrored import MirroredChunkStore
from dfsfs.chunks.url import open_store
from dfsfs.config import Settings, file_url_path
from dfsfs.core.filesystem import FileSystem
from dfsfs.core.offload import supervised
from dfsfs.core.settings import CoreSettings
from dfsfs.errors import DfsfsError
from dfsfs.fuse_ops import Operations, ShownOwnership
from dfsfs.meta.backup_queue import DatabaseBackupQueue
from dfsfs.meta.db import create_engine
from dfsfs.meta.feed import ChangeFeed
from dfsfs.meta.store import MetadataStore
from dfsfs.session import LoginResult, SessionEndedError, keep_alive, logout

log = logging.getLogger(__name__)

FUSE_WORKERS = 64
BACKUP_DRAIN_INTERVAL_S = 1.0
BACKUP_DRAIN_BATCH = 256
# glibc's mallopt(3) parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
LARGE_BUFFER_BYTES = 128 * 1024  # glibc's initial threshold, kept fixed


@dataclass
class MountRequest:
    database_url: str
    settings: Settings
    account_id: int
    mountpoint: str
    fuse_options: tuple[str, ...] = ()  # kernel options for libfuse (validated by cli_mount)
    account_name: str = ""  # shown as the mount source, dfsfs:ACCOUNT
    # Mount options the core honours (parsed and validated by cli_mount.parse_mount_options):
    owner_uid: int | None = None  # uid=: every file shows this owner (None: as stored)
    owner_gid: int | None = None  # gid=: every file shows this group (None: as stored)
    umask: int | None = None  # umask=: permission bits cleared in every mode shown
    read_only: bool = False  # ro: refuse every change with EROFS
    atime: str = "noatime"  # noatime | relatime | strictatime (atime updates, as on ext4)
    commit_interval_s: float | None = None  # commit=: seconds until a close is durable (None: 1)
    sync: bool = False  # sync: close() returns once the file is durable
    session: LoginResult | None = None  # the login every statement is scoped by


def core_settings(request: MountRequest) -> CoreSettings:
    settings = request.settings
    return CoreSettings(
        chunk_size=settings.chunk_size,
        write_buffer_bytes=settings.write_buffer_bytes,
        read_cache_bytes=settings.read_cache_bytes,
        readahead_chunks=settings.readahead_chunks,
        attr_cache_s=settings.attr_timeout_s,
        commit_interval_s=request.commit_interval_s or CoreSettings.commit_interval_s,
        sync_close=request.sync,
        atime=request.atime,
        commit_batch_bytes=max(settings.chunk_size, min(32 << 20, settings.write_buffer_bytes // 4)),
    )


def build_file_system(request: MountRequest) -> FileSystem:
    settings = request.settings
    core = core_settings(request)
    engine = create_engine(request.database_url, session_token=request.session.token,
                           pool_size=FUSE_WORKERS // 4, relaxed_commits=True)
    recovery.describe_own_session(engine)
    meta = MetadataStore(engine, request.account_id, request.session.session_id)
    store = MirroredChunkStore(
        open_store(settings.store_url, "primary", keys_in_url=settings.account_stores),
        open_store(settings.backup_url, "backup", keys_in_url=settings.account_stores),
        backup_queue=DatabaseBackupQueue(engine) if settings.backup_mode == "async" else None,
    )
    fs = FileSystem(meta, store, core, capacity_probe=_capacity_probe(settings.store_url))
    store.on_damage = fs.damage.report
    return fs


def _capacity_probe(store_url: str) -> Callable[[], tuple[int, int]] | None:
    """(total, free) bytes where a local primary store lives; None for object stores."""
    path = file_url_path(store_url)
    if path is None:
        return None

    def probe() -> tuple[int, int]:
        stats = os.statvfs(path)
        return stats.f_blocks * stats.f_frsize, stats.f_bavail * stats.f_frsize

    return probe


def return_freed_buffers_to_the_system() -> None:
    """Chunk buffers (up to the chunk size, 1 MiB by default) are allocated and freed by
    many threads. With glibc's defaults a freed large buffer raises the threshold below
    which later ones come from per-thread heaps, which keep what they once held: over the
    bench's mixed session (i) the daemon peaked at 286-332 MB, past its write buffer and
    read cache. A fixed threshold maps every large buffer and unmaps it when freed, and two
    heaps hold the rest: 225 MB, for 5-10% of sequential write speed (scripts/bench)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES)
        libc.mallopt(M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass  # another C library: its own policy applies


def fuse_options(request: MountRequest) -> set[str]:
    options = set(pyfuse3.default_options)
    # A source that is no path (mount would make a relative one absolute).
    options |= {f"fsname=dfsfs:{request.account_name}", "subtype=dfsfs"}
    # The kernel's atime flag is for findmnt only (FUSE inodes are S_NOATIME): relatime else.
    options |= {"noatime"} if request.atime == "noatime" else set()
    options |= set(request.fuse_options)
    return options


def serve(request: MountRequest, on_mounted: Callable[[], None] = lambda: None) -> None:
    """Mount and serve until unmounted or signalled. Raises if mounting fails."""
    return_freed_buffers_to_the_system()
    fs = build_file_system(request)
    operations = Operations(fs, request.settings.attr_timeout_s, request.settings.entry_timeout_s,
                            ShownOwnership(request.owner_uid, request.owner_gid, request.umask or 0))
    clean = False
    try:
        pyfuse3.init(operations, request.mountpoint, fuse_options(request))
        log.info("mounted account %d at %s (session %d)", request.account_id,
                 request.mountpoint, fs.meta.session_id)
        try:
            on_mounted()
            trio.run(_serve_requests, fs, operations, request.settings.session_heartbeat_s)
            clean = True
        finally:
            pyfuse3.close(unmount=True)
    finally:
        fs.store.close()
        logout(fs.meta.engine, "unmounted")
        fs.meta.engine.dispose()
        log.info("unmounted %s%s", request.mountpoint, "" if clean else " after an error")


async def _serve_requests(fs: FileSystem, operations: Operations, heartbeat_s: float) -> None:
    async with fs.running():
        await fs.recover(await trio.to_thread.run_sync(recovery.sessions_ended_here, fs.meta))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_terminate_on_signals)
            nursery.start_soon(keep_alive, fs.meta.engine, heartbeat_s, _unmount_session_ended)
            nursery.start_soon(supervised, "change feed", _follow_changes(fs, operations))
            if fs.store.backup_queue is not None:
                nursery.start_soon(supervised, "backup copies", _drain_backups(fs.store))
            await pyfuse3.main(min_tasks=4, max_tasks=FUSE_WORKERS)
            nursery.cancel_scope.cancel()


def _follow_changes(fs: FileSystem, operations: Operations):
    """Other mounts' changes, as they commit, become kernel invalidations here: a name
    replaced there resolves to the new file here at once, and open views follow."""
    feed: list[ChangeFeed] = []  # (re)opened by the step: a broken feed is opened again

    async def step() -> None:
        if not feed:
            feed.append(await trio.to_thread.run_sync(
                ChangeFeed, fs.meta.engine, fs.meta.account_id, fs.meta.session_id))
            fs.listings.enabled = True
        try:
            await trio.lowlevel.wait_readable(feed[0].fileno())
            changes = feed[0].fetch()
        except BaseException:
            fs.listings.disable()
            feed.pop().close()
            raise
        invalidations = fs.changed_elsewhere(changes)
        if invalidations:
            await trio.to_thread.run_sync(operations.invalidate, invalidations)

    return step


def _unmount_session_ended(reason: str) -> None:
    log.warning("the login session has ended (%s): unmounting", reason)
    pyfuse3.terminate()


def _drain_backups(store: MirroredChunkStore):
    """Asynchronous backup mode: copy queued chunks to the backup in the background."""

    async def step() -> None:
        try:
            while await trio.to_thread.run_sync(store.drain_backup_queue, BACKUP_DRAIN_BATCH):
                pass
        except DfsfsError as error:
            log.warning("backup copies are behind (retrying): %s", error)
        await trio.sleep(BACKUP_DRAIN_INTERVAL_S)

    return step


async def _terminate_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: committing buffered writes and unmounting",
                     signal.Signals(signum).name)
            pyfuse3.terminate()
            return
