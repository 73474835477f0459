"""Helpers of the fault-injection tests (tests/test_faults_*.py).

They build on tests/mounting.py (Deployment, Mount) but never assert that the daemon log is
free of errors: these tests cause errors on purpose. Everything that can hang (a call into
a mount whose daemon is dead or whose database is down) runs with a timeout.

Run as a script (`python faults.py worker SPEC`) this module is the crash-test worker: a
process that changes files in a mount and journals, outside the mount, each step that the
file system acknowledged (see `worker_main`).
"""

import contextlib
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def content(seed, size: int) -> bytes:
    """Deterministic pseudo-random bytes (the test and the worker make the same ones)."""
    return random.Random(f"{seed}/{size}").randbytes(size)


# ---- the crash-test worker ---------------------------------------------------------------------
# It runs in its own process so that it can be killed, and so that its system calls into a
# mount whose daemon was killed fail (ENOTCONN) without taking the test process along.


class Journal:
    """Lines appended to a file outside the mount, each after the step it records returned."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __call__(self, *fields) -> None:
        os.write(self.fd, (" ".join(map(str, fields)) + "\n").encode())


def _write_file(path: str, data: bytes, rng: random.Random, journal: Journal | None, tag: str,
                sync_probability: float, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
    """Write `data` in random pieces, fsync now and then (journalled as `sync TAG LENGTH`)."""
    fd = os.open(path, flags, 0o644)
    try:
        position = 0
        while position < len(data):
            piece = rng.choice((1, 100, 4096, 10_000, 65_536, 65_537, 200_000))
            position += os.write(fd, data[position:position + piece])
            if journal is not None and rng.random() < sync_probability:
                os.fsync(fd)
                journal("sync", tag, position)
    finally:
        os.close(fd)


def worker_main(spec: dict) -> None:
    """Run one crash-test role until done (or killed). Journal lines (all after the fact):

    large:  `sync big LENGTH` after an fsync returned; `closed big` after close returned.
    small:  `begin NAME SEQ` before opening; `sync NAME/SEQ LEN`; `closed NAME SEQ`.
    rename: `tmpdone SEQ` after the temporary file was written, fsync'd and closed;
            `renamed SEQ` after rename(tmp, target) returned; `dir NAME` after a directory
            rename returned (NAME is the directory's new name).
    delete: `unlinked NAME` after unlink returned.
    """
    root = spec["root"]
    journal = Journal(spec["journal"])
    rng = random.Random(spec["seed"])
    role = spec["role"]
    journal("start")
    if role == "large":
        data = content(spec["content_seed"], spec["size"])
        _write_file(os.path.join(root, spec["name"]), data, rng, journal, "big", 0.05)
        journal("closed", "big")
    elif role == "small":
        for seq in range(spec["count"]):
            name = spec["names"][seq]
            data = content(f"{spec['content_seed']}/{seq}", spec["sizes"][seq])
            journal("begin", name, seq)
            _write_file(os.path.join(root, name), data, rng, journal, f"{name}/{seq}", 0.3)
            journal("closed", name, seq)
    elif role == "rename":
        for seq in range(spec["count"]):
            if seq % 4 == 3:  # now and then move a directory with a file inside
                old, new = ("dA", "dB") if os.path.exists(os.path.join(root, "dA")) else ("dB", "dA")
                os.rename(os.path.join(root, old), os.path.join(root, new))
                journal("dir", new)
                continue
            data = content(f"{spec['content_seed']}/{seq}", spec["sizes"][seq])
            tmp = os.path.join(root, f"tmp{seq}")
            _write_file(tmp, data, rng, None, "", 0)
            fd = os.open(tmp, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            journal("tmpdone", seq)
            os.rename(tmp, os.path.join(root, spec["targets"][seq]))
            journal("renamed", seq)
    elif role == "delete":
        for name in spec["names"]:
            os.unlink(os.path.join(root, name))
            journal("unlinked", name)
    else:
        raise ValueError(role)
    journal("done")


def start_worker(spec: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "worker", json.dumps(spec)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def read_journal(path) -> list[list[str]]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [line.split() for line in text.splitlines() if line.strip()]


# ---- mounts --------------------------------------------------------------------------------------
# (imported lazily: the worker process needs none of this)


def _mounting():
    import mounting  # tests/ is on sys.path under pytest (rootdir conftest)

    return mounting


@contextlib.contextmanager
def mounted(deployment, user: str, path: Path | None = None):
    """A live mount that is always torn down, whatever state the test left it in.

    Unlike `Mount.__exit__` this does not fail on errors in the daemon log.
    """
    mnt = deployment.mount(user, path)
    try:
        yield mnt
    finally:
        teardown(mnt)


def teardown(mnt) -> None:
    """`dfsfs umount` (bounded), then `Mount.cleanup` (fusermount3 -uz, SIGTERM, SIGKILL)."""
    m = _mounting()
    if mnt in m._live_mounts:
        try:
            subprocess.run([m.DFSFS, "umount", str(mnt.path)], env=mnt.env, capture_output=True,
                           timeout=30, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            pass
    m._live_mounts.add(mnt)
    mnt.cleanup()


def adopt(deployment, user: str, path: Path):
    """A Mount object for a mount made by running `dfsfs mount` directly."""
    m = _mounting()
    mnt = m.Mount(deployment, user, Path(path))
    mnt.pid = int(mnt.pid_file.read_text())
    m._live_mounts.add(mnt)
    return mnt


def kill_daemon(mnt, timeout: float = 10.0) -> None:
    """SIGKILL the mount's daemon and wait until it is gone; the mount is left stale."""
    m = _mounting()
    os.kill(mnt.pid, signal.SIGKILL)
    m._wait_gone(mnt.pid, timeout)
    if m._alive(mnt.pid):
        raise AssertionError(f"daemon {mnt.pid} survived SIGKILL")


def is_stale(path) -> bool:
    try:
        os.stat(path)
    except OSError as error:
        return error.errno == errno.ENOTCONN
    return False


def drop_caches() -> None:
    """Drop the kernel's page cache, dentries and inodes (root only; best effort)."""
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3")


# ---- calls that may hang ------------------------------------------------------------------------


class Hung(AssertionError):
    pass


def bounded(function, *args, timeout: float = 15.0):
    """Run `function(*args)` in a thread; return (result, exception, seconds).

    Raises Hung when it has not returned within `timeout` seconds (the thread is left
    behind, blocked in the kernel until the mount is torn down).
    """
    outcome = {}

    def run():
        try:
            outcome["result"] = function(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            outcome["error"] = error

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    elapsed = time.monotonic() - started
    if thread.is_alive():
        raise Hung(f"{getattr(function, '__name__', function)}{args!r} hung for {timeout} s")
    return outcome.get("result"), outcome.get("error"), elapsed


def errno_of(function, *args, timeout: float = 15.0) -> tuple[int, float]:
    """The errno `function(*args)` fails with (0 if it succeeds) and how long it took."""
    _, error, elapsed = bounded(function, *args, timeout=timeout)
    if error is None:
        return 0, elapsed
    if not isinstance(error, OSError):
        raise error
    return error.errno, elapsed


# ---- fsck, stats, the database ----------------------------------------------------------------

def fsck_report(deployment, *args, timeout: float = 120.0) -> tuple[int, dict, str]:
    """Run `dfsfs fsck --json ARGS`: (exit status, the report, output)."""
    result = deployment.run("fsck", "--json", *args, check=False, timeout=timeout)
    return result.returncode, json.loads(result.stdout), result.stdout + result.stderr


def fsck(deployment, *args, timeout: float = 120.0) -> tuple[int, dict[str, int], str]:
    """Run `dfsfs fsck --json ARGS`: (exit status, {category: found}, output)."""
    status, report, output = fsck_report(deployment, *args, timeout=timeout)
    return status, report["found"], output


def query(url: str, sql: str, **params) -> list[tuple]:
    """Rows of `sql` over an admin (unscoped) connection."""
    import sqlalchemy as sa

    from dfsfs.meta.db import create_engine

    engine = create_engine(url, pool_size=1)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(sql), params)]
    finally:
        engine.dispose()


def user_id(url: str, name: str) -> int:
    return query(url, "SELECT id FROM users WHERE name = :name", name=name)[0][0]


def chunk_file(store_root, uid: int, digest_hex: str) -> Path:
    return Path(store_root) / str(uid) / digest_hex[:2] / digest_hex[2:4] / digest_hex


def chunk_files(store_root, uid: int | None = None) -> list[Path]:
    root = Path(store_root) if uid is None else Path(store_root) / str(uid)
    return sorted(p for p in root.rglob("*") if p.is_file() and re.fullmatch(r"[0-9a-f]{64}", p.name))


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker_main(json.loads(sys.argv[2]))


def write_bytes(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def errno_for(function, *args) -> int:
    """The errno a call fails with (0 on success), never waiting more than 30 s."""
    return errno_of(function, *args, timeout=30)[0]
