"""Real mounts for tests: run the `dfsfs` CLI in subprocesses and always unmount afterwards.

    deployment = Deployment(database_url, base_dir, chunk_size="64K")
    with deployment.mount("alice") as mnt:    # creates the account, mounts, waits until live
        (mnt.path / "f").write_bytes(b"hi")
        mnt.remount()                         # dfsfs umount + dfsfs mount at the same place
    # unmounted here, even when the test failed: `dfsfs umount`, else `fusermount3 -uz`
    # and killing the daemon (its pid is in DATA_DIR/run/mount-*.pid)

A Deployment is one metadata database (from the conftest fixtures, so no extra PostgreSQL
is started), one pair of local chunk stores and one data directory (pid files, logs);
every mount of it shares them, like several machines of one site. Every mount that is
still live when the interpreter exits is torn down by an atexit hook as a last resort.
"""

import atexit
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

DFSFS = str(Path(sys.executable).with_name("dfsfs"))
PASSWORD = "pw-for-tests"
MOUNT_TIMEOUT_S = 60
UMOUNT_TIMEOUT_S = 60
KILL_WAIT_S = 30
# Lines of the daemon log that mean a bug: an unexpected exception became EIO, or worse.
LOG_ALARMS = ("Traceback", " ERROR ", " CRITICAL ", "unexpected error")

_live_mounts: set["Mount"] = set()


def run_cli(args, env, *, check=True, input=None, timeout=MOUNT_TIMEOUT_S):
    """Run `dfsfs ARGS` with `env`; fail the test with its output when `check` and it fails."""
    result = subprocess.run([DFSFS, *map(str, args)], env=env, input=input, capture_output=True,
                            text=True, timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
    if check and result.returncode != 0:
        pytest.fail(f"dfsfs {' '.join(map(str, args))} exited {result.returncode}\n"
                    f"stdout: {result.stdout}\nstderr: {result.stderr}")
    return result


def is_mount(path) -> bool:
    """Whether `path` is a mount point, without hanging on or tripping over a dead FUSE mount."""
    wanted = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            field = line.split()[4]
            unescaped = field.decode("unicode_escape").encode("latin-1")
            if unescaped == wanted:
                return True
    return False


class Deployment:
    """A metadata database, local primary and backup chunk stores, and a data directory."""

    def __init__(self, database_url: str, base: Path, chunk_size: str | None = "64K",
                 extra_env: dict[str, str] | None = None):
        self.base = Path(base)
        self.data_dir = self.base / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.base / "primary").mkdir(exist_ok=True)
        (self.base / "backup").mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DFSFS_")}
        env.update(
            DFSFS_DATABASE_URL=database_url,
            DFSFS_DATA_DIR=str(self.data_dir),
            DFSFS_STORE=(self.base / "primary").as_uri(),
            DFSFS_BACKUP=(self.base / "backup").as_uri(),
            DFSFS_PASSWORD=PASSWORD,
            DFSFS_ARGON2_PROFILE="test",
        )
        if chunk_size is not None:
            env["DFSFS_CHUNK_SIZE"] = chunk_size
        env.update(extra_env or {})
        self.env = env
        self.users: set[str] = set()
        self.run("init")  # records the chunk size of a new database (the first one given)

    def run(self, *args, env=None, check=True, input=None, timeout=MOUNT_TIMEOUT_S):
        return run_cli(args, env or self.env, check=check, input=input, timeout=timeout)

    def add_user(self, name: str) -> None:
        if name not in self.users:
            self.run("user", "add", name)
            self.users.add(name)

    def fsck(self, user: str, *args: str) -> dict:
        """`dfsfs fsck --json --user USER ARGS`: its report."""
        result = self.run("fsck", "--json", "--user", user, *args, check=False)
        return json.loads(result.stdout)

    def assert_consistent(self, user: str, settle_s: float = 0.0) -> None:
        """fsck finds nothing: the stores hold exactly the chunks the metadata names, no
        unlinked inode or hold is left over, and every count is right. With a live mount,
        background reclaim may still be under way: fsck is asked again for `settle_s`."""
        deadline = time.monotonic() + settle_s
        while not (report := self.fsck(user))["clean"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert report["clean"], f"fsck of {user}: {report['problems'][:20]}"

    def mount(self, user: str | None = None, path: Path | None = None,
              options: str | None = None) -> "Mount":
        """Create the account if needed, mount it at `path` (default: a fresh directory),
        with `-o options` if given."""
        user = user or "u" + uuid.uuid4().hex[:8]
        self.add_user(user)
        if path is None:
            path = self.base / ("mnt-" + uuid.uuid4().hex[:8])
        Path(path).mkdir(parents=True, exist_ok=True)
        mnt = Mount(self, user, Path(path), options)
        mnt.mount()
        return mnt


class Mount:
    """One live mount. Use it as a context manager, or call `cleanup()` (idempotent)."""

    def __init__(self, deployment: Deployment, user: str, path: Path, options: str | None = None):
        self.deployment = deployment
        self.options = options
        self.user = user
        self.path = Path(os.path.realpath(path))
        self.env = deployment.env
        self.pid: int | None = None
        self._log_offset = 0

    # ---- paths of the daemon's files ---------------------------------------------------

    @property
    def pid_file(self) -> Path:
        key = hashlib.sha256(os.fsencode(str(self.path))).hexdigest()[:16]
        return self.deployment.data_dir / "run" / f"mount-{key}.pid"

    def log_files(self) -> list[Path]:
        return sorted((self.deployment.data_dir / "logs").glob("*.log"))

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.log_files())

    # ---- lifecycle -------------------------------------------------------------------------

    def mount(self) -> None:
        assert not is_mount(self.path), f"{self.path} is already mounted"
        self._log_offset = {p: p.stat().st_size for p in self.log_files()}
        _live_mounts.add(self)
        options = ["-o", self.options] if self.options else []
        result = run_cli(["mount", self.path, "--user", self.user, *options], self.env, check=False)
        if result.returncode != 0:
            self.cleanup()
            pytest.fail(f"dfsfs mount {self.path} exited {result.returncode}: {result.stderr}\n"
                        f"daemon log:\n{self.log_text()[-4000:]}")
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while not os.path.ismount(self.path):
            if time.monotonic() > deadline:
                self.cleanup()
                pytest.fail(f"{self.path} is not a mount point after `dfsfs mount` returned")
            time.sleep(0.05)
        self.pid = int(self.pid_file.read_text())
        assert _alive(self.pid), f"the daemon {self.pid} of {self.path} is not running"

    def new_log(self) -> str:
        """The daemon log written since this mount started (all log files of the data dir)."""
        parts = []
        for path in self.log_files():
            with open(path, "rb") as log_file:
                log_file.seek(self._log_offset.get(path, 0))
                parts.append(log_file.read().decode(errors="replace"))
        return "".join(parts)

    def check_healthy(self) -> None:
        """Fail when the daemon died or logged an unexpected error since it was mounted."""
        assert self.pid is not None and _alive(self.pid), (
            f"the dfsfs daemon of {self.path} died; log:\n{self.new_log()[-4000:]}")
        assert is_mount(self.path), f"{self.path} is no longer mounted"
        alarms = [line for line in self.new_log().splitlines() if any(a in line for a in LOG_ALARMS)]
        assert not alarms, "the daemon logged errors:\n" + self.new_log()[-6000:]

    def umount(self) -> None:
        """`dfsfs umount`, which must succeed cleanly (the daemon exits, nothing logged)."""
        self.check_healthy()
        result = run_cli(["umount", self.path], self.env, check=False, timeout=UMOUNT_TIMEOUT_S)
        assert result.returncode == 0, f"dfsfs umount failed: {result.stderr}"
        assert not is_mount(self.path), f"{self.path} still mounted after dfsfs umount"
        assert self.pid is None or not _alive(self.pid), "the daemon still runs after umount"
        alarms = [line for line in self.new_log().splitlines() if any(a in line for a in LOG_ALARMS)]
        assert not alarms, "the daemon logged errors:\n" + self.new_log()[-6000:]
        _live_mounts.discard(self)
        self.pid = None

    def is_live(self) -> bool:
        return self.pid is not None and _alive(self.pid) and is_mount(self.path)

    def abort(self) -> None:
        """Kill the daemon at once (SIGKILL): the kernel aborts the FUSE connection, so every
        process blocked on a request of this mount gets ENOTCONN instead of hanging forever."""
        if self.pid is not None and _alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
            _wait_gone(self.pid, KILL_WAIT_S)
        subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True, check=False)

    def revive(self) -> None:
        """After a test killed or wedged the daemon: tear down and mount afresh."""
        self.cleanup()
        self.mount()

    def remount(self) -> None:
        self.umount()
        self.mount()

    def cleanup(self) -> None:
        """Tear the mount down whatever state it is in; never raises, never leaves it hung."""
        if self not in _live_mounts:
            return
        try:
            if is_mount(self.path):
                subprocess.run([DFSFS, "umount", str(self.path)], env=self.env, capture_output=True,
                               timeout=UMOUNT_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            pass
        if is_mount(self.path):
            subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True, check=False)
        pid = self.pid
        if pid is None:
            try:
                pid = int(self.pid_file.read_text())
            except (OSError, ValueError):
                pid = None
        if pid is not None:
            _kill(pid)
        if is_mount(self.path):  # a stacked or stubborn mount: detach it lazily as a last resort
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)
        _live_mounts.discard(self)
        self.pid = None

    def __enter__(self) -> "Mount":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self in _live_mounts:
            try:
                self.umount()
            finally:
                self.cleanup()
        else:
            self.cleanup()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (our own forked child never reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill(pid: int) -> None:
    """SIGTERM, then SIGKILL after a grace period."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if not _alive(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        _wait_gone(pid, grace)


def _wait_gone(pid: int, timeout_s: float) -> None:
    """Until `pid` has died (a session of it counts as over only then) or the timeout."""
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


@atexit.register
def _cleanup_everything() -> None:
    for mnt in list(_live_mounts):
        mnt.cleanup()


# ---- helpers for the tests -----------------------------------------------------------------


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_snapshot(root, *, times=True, inodes=True) -> dict:
    """Everything observable of a tree: per relative bytes path, type, mode, size, nlink,
    mtime, content hash or link target, and xattrs; hard links as groups of paths."""
    root = os.fsencode(str(root))
    snapshot = {}
    by_inode: dict[int, list[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            entry = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid}
            if os.path.islink(path):
                entry["target"] = os.readlink(path)
            elif os.path.isdir(path):
                entry["nlink"] = st.st_nlink
            else:
                entry["size"] = st.st_size
                entry["nlink"] = st.st_nlink
                entry["sha256"] = sha256_file(path)
                by_inode.setdefault(st.st_ino, []).append(rel)
            if times and not os.path.isdir(path):
                entry["mtime_ns"] = st.st_mtime_ns
            if not os.path.islink(path):
                entry["xattrs"] = {n: os.getxattr(path, n) for n in sorted(os.listxattr(path))}
            snapshot[rel] = entry
    if inodes:
        snapshot[b"<hard links>"] = sorted(sorted(g) for g in by_inode.values() if len(g) > 1)
    return snapshot


def sh(command: str, cwd=None, check=True, env=None, timeout=60) -> subprocess.CompletedProcess:
    """Run a shell command; fail the test with its output when `check` and it fails.

    A command that hangs (a file-system request that never completes) fails the test after
    `timeout` seconds without waiting for the stuck process; the mount's cleanup kills the
    daemon, which releases it.
    """
    process = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        try:
            stdout, stderr = process.communicate(timeout=2)
        except subprocess.TimeoutExpired:
            stdout = stderr = b"(the process is stuck)"
        pytest.fail(f"`{command}` hung for more than {timeout} s\nstderr: {stderr[-2000:]!r}")
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        pytest.fail(f"`{command}` exited {result.returncode}\nstdout: {result.stdout[-2000:]!r}\n"
                    f"stderr: {result.stderr[-2000:]!r}")
    return result


# ---- fixtures: `from mounting import deployment, mnt, work` in a test module ----------------
# A module may set CHUNK_SIZE = "1M" (default "64K") before importing them.


@pytest.fixture(scope="module")
def deployment(request, database_url, tmp_path_factory):
    chunk_size = getattr(request.module, "CHUNK_SIZE", "64K")
    return Deployment(database_url, tmp_path_factory.mktemp("dep"), chunk_size=chunk_size)


@pytest.fixture(scope="module")
def mnt(deployment):
    """One mount per test module (of the account 'alice'), unmounted cleanly at the end;
    then nothing may be left over (fsck is clean: no leaked chunk, hold or inode)."""
    with deployment.mount("alice") as live:
        yield live
    deployment.assert_consistent("alice")


@pytest.fixture
def work(mnt, request):
    """A fresh directory inside the module's mount; afterwards the daemon must be healthy.

    A watchdog kills the daemon when the test runs longer than the module's WATCHDOG_S
    (default 60 s): a request that never completes then fails with ENOTCONN instead of
    hanging the whole run; the next test gets a fresh mount.
    """
    if not mnt.is_live():
        mnt.revive()
    directory = mnt.path / f"t-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    fired = []

    def bite():
        fired.append(True)
        mnt.abort()

    watchdog = threading.Timer(getattr(request.module, "WATCHDOG_S", 60), bite)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield directory
    finally:
        watchdog.cancel()
    assert not fired, "the test hung; the watchdog killed the daemon"
    mnt.check_healthy()
