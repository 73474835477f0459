"""The machine whose power is cut: one lazy file system ("the disk") holding PostgreSQL's
cluster and both chunk stores, and a dfsfs Deployment over them.

Layout under `base` (a directory the postgres user can reach):
    disk/       the lazy FS mount point: disk/pg/cluster, disk/primary, disk/backup
    run/        PostgreSQL's socket and log (not on the disk: they do not survive anyway)
    dep/        the Deployment's data directory (pid files, daemon logs)
    mnt/        where dfsfs is mounted
and on tmpfs (copied at every boot, so copies must be fast; the host never loses them):
    /dev/shm/dfsfs-powercut-NAME/golden    the initial state, copied to backing before each cycle
    /dev/shm/dfsfs-powercut-NAME/backing   what the disk holds durably (lazyfs's backing directory)
    /dev/shm/dfsfs-powercut-NAME/live      the lazy FS's live copy, thrown away at a cut
The golden state is built once on a plain directory at disk/'s path (fast, and all of it
durable), so every path in it is the one the cycles use.
"""

import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

from dfsfs.embedded import SUPERUSER, PostgresServer
from dfsfs.meta.db import create_engine
from dfsfs.meta.migrations import migrate
from faults import mounted
from mounting import Deployment, _alive, is_mount

from powercut.lazy import LazyMount

PORT = 5439
DATABASE = "powercut"
USER = "pc"
# Small and durable: fsync stays on; small buffers and WAL make PostgreSQL write its data
# files and checkpoint through the lazy FS during the workloads, not only its WAL. The WAL
# writer flushes asynchronous commits every 10 s rather than 200 ms (both are legal): a
# commit that asked not to wait for the disk is then not on it unless something flushed.
# Dynamic shared memory comes from the main segment, which a kill leaves only as the
# System V segment that Postgres.kill removes (not as files in /dev/shm nobody maps).
POSTGRES_SETTINGS = """
shared_buffers = 16MB
max_connections = 60
max_wal_size = 32MB
min_wal_size = 4MB
checkpoint_timeout = 30s
fsync = on
synchronous_commit = on
full_page_writes = on
recovery_init_sync_method = syncfs
wal_writer_delay = 10s
min_dynamic_shared_memory = 8MB
log_min_messages = warning
"""
KILL_TIMEOUT_S = 10
START_TIMEOUT_S = 60


class Postgres(PostgresServer):
    """PostgreSQL with its cluster at `cluster` and its socket and log in `run_dir`.

    The postmaster runs as a child of this process rather than through pg_ctl: killed, it
    is reaped at once. (An orphan waits for init, and while it is a zombie its pid still
    looks alive to the next postmaster's lock-file check, which then refuses to start.)
    """

    def __init__(self, cluster: Path, run_dir: Path, port: int = PORT):
        super().__init__(run_dir, port, durable=True)
        self._cluster = Path(cluster)
        self.process: subprocess.Popen | None = None
        self.shmid: int | None = None

    @property
    def cluster_dir(self) -> Path:
        return self._cluster

    def initdb(self) -> None:
        """A new cluster with 1 MiB WAL segments (a new segment is written whole, through
        the lazy FS) and the settings above; not synced: the golden copy is made from it."""
        account = pwd.getpwnam(SUPERUSER)
        for directory in (self.data_dir, self.cluster_dir.parent):
            directory.mkdir(parents=True, exist_ok=True)
            os.chown(directory, account.pw_uid, account.pw_gid)
            directory.chmod(0o700 if directory == self.cluster_dir.parent else 0o755)
        self._run_checked("initdb", "initdb", "-D", str(self.cluster_dir), "-U", SUPERUSER,
                          "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8",
                          "--wal-segsize=1", "--no-sync")
        with open(self.cluster_dir / "postgresql.conf", "a") as conf:
            conf.write(POSTGRES_SETTINGS)

    def start(self) -> None:
        """Start, recovering from the WAL if needed; return once it accepts connections."""
        account = pwd.getpwnam(SUPERUSER)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [str(self.bin_dir / "postgres"), "-D", str(self.cluster_dir), "-k", str(self.socket_dir),
                 "-c", "listen_addresses=", "-p", str(self.port)],
                user=account.pw_uid, group=account.pw_gid, extra_groups=[], cwd="/",
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while self._run("pg_isready", "-q", "-h", str(self.socket_dir), "-p", str(self.port)).returncode:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"PostgreSQL did not start:\n{self.log_tail()}")
            time.sleep(0.05)
        lines = (self.cluster_dir / "postmaster.pid").read_text().splitlines()
        self.shmid = int(lines[6].split()[1])  # its System V segment (LOCK_FILE_LINE_SHMEM_KEY)

    def log_tail(self) -> str:
        return self.log_file.read_text(errors="replace")[-3000:]

    def stop(self, mode: str = "fast") -> None:
        """A clean shutdown (SIGINT: PostgreSQL's fast mode)."""
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=START_TIMEOUT_S)
        self.process = None

    def kill(self) -> None:
        """SIGKILL the postmaster and every child of it, and wait until they are gone."""
        if self.process is None:
            return
        victims = [self.process.pid, *_children(self.process.pid)]
        segments = {path for pid in victims for path in _shared_memory_files(pid)}
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=KILL_TIMEOUT_S)
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while any(_alive(pid) for pid in victims):  # (a zombie child is gone: init reaps it)
            if time.monotonic() > deadline:
                raise AssertionError(f"PostgreSQL processes survived SIGKILL: {victims}")
            time.sleep(0.01)
        # A restart would remove them, but finds them by the cluster directory's inode,
        # which a new live copy changes: remove them here.
        for path in segments:
            path.unlink(missing_ok=True)
        if self.shmid is not None:
            subprocess.run(["ipcrm", "-m", str(self.shmid)], capture_output=True, check=False)
        self.process = self.shmid = None


def _shared_memory_files(pid: int) -> set[Path]:
    """The POSIX shared memory files (dynamic shared memory) process `pid` has mapped."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return {Path(line.split(None, 5)[5]) for line in maps.splitlines()
            if len(line.split(None, 5)) == 6 and line.split(None, 5)[5].startswith("/dev/shm/PostgreSQL.")}


def _children(parent: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                children.append(int(entry.name))
    return children


class Rig:
    def __init__(self, base: Path):
        self.base = Path(base)
        self.disk = self.base / "disk"
        self.mnt = self.base / "mnt"
        self.memory = Path("/dev/shm") / self.base.name
        self.golden = self.memory / "golden"
        self.backing = self.memory / "backing"
        self.live = self.memory / "live"
        self.pg = Postgres(self.disk / "pg" / "cluster", self.base / "run")
        self.lazy: LazyMount | None = None
        self.deployment: Deployment | None = None
        self.database_url = self.pg.url(DATABASE)

    @property
    def stores(self) -> tuple[Path, Path]:
        return self.disk / "primary", self.disk / "backup"

    @property
    def stores_seen_directly(self) -> tuple[Path, Path]:
        """The stores as the lazy FS shows them, read beside it: its live copy (for checks
        that only read, many times faster than through a Python FUSE file system)."""
        return self.live / "primary", self.live / "backup"

    def build_golden(self, files: dict[str, bytes]) -> None:
        """The initial state: a migrated database with the account USER owning `files`."""
        self.disk.mkdir(parents=True)
        self.pg.initdb()
        self.pg.start()
        try:
            self.pg.ensure_database(DATABASE)
            engine = create_engine(self.database_url)
            migrate(engine)
            engine.dispose()
            primary, backup = self.stores
            self.deployment = Deployment(self.database_url, self.base / "dep", chunk_size="64K",
                                         extra_env={"DFSFS_STORE": primary.as_uri(),
                                                    "DFSFS_BACKUP": backup.as_uri()})
            with mounted(self.deployment, USER, self.mnt) as mnt:
                for name, data in files.items():
                    (mnt.path / name).parent.mkdir(exist_ok=True)
                    (mnt.path / name).write_bytes(data)
        finally:
            self.pg.stop()
        self.memory.mkdir(mode=0o755)
        subprocess.run(["cp", "-a", "--", str(self.disk), str(self.golden)], check=True)
        for entry in self.disk.iterdir():
            shutil.rmtree(entry)

    def restore_golden(self) -> None:
        shutil.rmtree(self.backing, ignore_errors=True)
        subprocess.run(["cp", "-a", "--", str(self.golden), str(self.backing)], check=True)

    def boot(self, cut_keeps: float = 0.0, lies: tuple[str, ...] = ()) -> None:
        """Power on: the lazy FS over the backing directory, then PostgreSQL, which
        recovers from its WAL if it was not shut down cleanly."""
        self.lazy = LazyMount(self.backing, self.disk, self.live, self.base / "lazyfs.log",
                              cut_keeps=cut_keeps, lies=lies)
        self.lazy.start()
        self.pg.start()

    def power_cut(self, frozen: list[int] = ()) -> None:
        """The disk forgets what was not synced, at once; then every process using it dies.

        `frozen`: processes already stopped (SIGSTOP) so that they acknowledge nothing more.
        """
        self.lazy.cut()
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pg.kill()
        self.lazy.cleanup()

    def power_off(self) -> None:
        """The end of a cycle: nothing is synced (the next cycle starts from the golden copy)."""
        self.lazy.cut()
        self.pg.kill()
        self.lazy.cleanup()

    def cleanup(self) -> None:
        """Whatever state the machine is in: nothing left running or mounted."""
        try:
            self.pg.kill()
        finally:
            if self.lazy is not None:
                self.lazy.cleanup()
            shutil.rmtree(self.live, ignore_errors=True)

    def remove(self) -> None:
        """After `cleanup`: the copies in memory and, unless something is still mounted
        there, the base directory."""
        shutil.rmtree(self.memory, ignore_errors=True)
        if not any(is_mount(path) for path in (self.disk, self.mnt)):
            shutil.rmtree(self.base, ignore_errors=True)
