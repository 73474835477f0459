"""Database outage: PostgreSQL stops while a mount is live, then comes back.

The tests run their own durable PostgreSQL server (the session's shared one must keep
running for the other tests). While it is down, every operation that needs the metadata
fails with EIO within seconds (never hangs) and the daemon stays up; once it is back the
mount works again without a remount, acknowledged data is intact, and umount works.

* a short outage (the brief's scenario);
* an outage longer than the daemon's idle flush interval, with a close and an fsync that
  failed during it: the buffered writes of the still open file get committed once
  PostgreSQL is back, and nothing keeps failing afterwards;
* PostgreSQL frozen (SIGSTOP) rather than stopped: connections stay open but nothing
  answers; that must not hang the file system either.
"""

import contextlib
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dfsfs.embedded import PostgresServer
from faults import Hung, bounded, content, drop_caches, errno_of, fsck, mounted, read_bytes, teardown, write_bytes
from mounting import Deployment, _alive, is_mount

FAST_FAILURE_S = 10  # an operation during the outage must fail within this
RECOVERY_S = 20  # after PostgreSQL is back, operations must work again within this
OUTAGE_BEYOND_FLUSH_S = 7  # longer than the core's idle flush interval (5 s)


@pytest.fixture(scope="module")
def server():
    """A PostgreSQL server of this module only (stopped and started by the test)."""
    base = Path(tempfile.mkdtemp(prefix="dfdb", dir="/tmp"))
    os.chmod(base, 0o755)
    # Unix socket only (in base/pg): any port number that no other test module uses.
    pg = PostgresServer(base / "pg", port=random.randrange(20000, 30000), durable=True)
    pg.start()
    try:
        pg.ensure_database("outage")
        yield pg
    finally:
        pg.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def deployment(server, request):
    """A deployment on the module's server: its own stores and data directory per test."""
    base = server.data_dir.parent / request.node.name[:40]
    dep = Deployment(server.url("outage"), base, chunk_size="64K")
    dep.run("init")
    return dep




def create_file(path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


def expect_eio(what: str, function, *args) -> float:
    code, elapsed = errno_of(function, *args, timeout=FAST_FAILURE_S + 20)
    assert code == errno.EIO, f"{what} during the outage: errno {code} ({os.strerror(code) if code else 'ok'})"
    assert elapsed < FAST_FAILURE_S, f"{what} took {elapsed:.1f} s to fail"
    return elapsed


def until_it_works(what: str, function, *args):
    """Retry `function` until it succeeds (PostgreSQL just came back); return its result."""
    deadline = time.monotonic() + RECOVERY_S
    attempts = 0
    while True:
        attempts += 1
        result, error, _ = bounded(function, *args, timeout=FAST_FAILURE_S + 20)
        if error is None:
            return result, attempts
        assert isinstance(error, OSError), error
        assert time.monotonic() < deadline, (
            f"{what} still fails {RECOVERY_S} s after PostgreSQL returned ({attempts} attempts): {error!r}")
        time.sleep(0.5)


def works(what: str, function, *args):
    """`function(*args)` must succeed now (bounded); return its result."""
    result, error, _ = bounded(function, *args, timeout=FAST_FAILURE_S + 20)
    assert error is None, f"{what} after PostgreSQL returned: {error!r}"
    return result


def umount_cleanly(deployment, mnt) -> None:
    """`dfsfs umount` succeeds, the daemon exits, and it logged no traceback on the way."""
    result = deployment.run("umount", mnt.path, check=False, timeout=60)
    assert result.returncode == 0, f"umount after the outage: {result.stderr}"
    assert not is_mount(mnt.path)
    deadline = time.monotonic() + 10
    while _alive(mnt.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(mnt.pid), "the daemon did not exit after umount"
    log = mnt.new_log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-6000:]
    assert "after an error" not in log, f"the daemon did not unmount cleanly:\n{log[-6000:]}"


def test_database_outage_fails_fast_and_recovers(server, deployment):
    mnt = deployment.mount("dbuser")
    root = mnt.path
    before = content("before", 300_000)
    try:
        write_bytes(root / "before", before)
        os.mkdir(root / "dir")
        write_bytes(root / "dir" / "inside", b"inside")
        held = os.open(root / "held", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(held, b"acknowledged")
        os.fsync(held)

        server.stop(mode="fast")
        assert not server.is_running()
        timings = {
            "stat of a name never looked up": expect_eio("stat", os.stat, root / "never-looked-up"),
            "listdir": expect_eio("listdir", os.listdir, root / "dir"),
            "create": expect_eio("create", create_file, root / "created-during-outage"),
            "mkdir": expect_eio("mkdir", os.mkdir, root / "dir-during-outage"),
            "write+close of a new file": expect_eio("write+close", write_bytes, root / "w", b"data"),
            "unlink": expect_eio("unlink", os.unlink, root / "before"),
        }
        # A file opened before the outage: the write is buffered, its commit at close fails.
        os.write(held, b" and more")
        timings["close with buffered writes"] = expect_eio("close", os.close, held)
        assert mnt.is_live(), "the daemon died when PostgreSQL stopped"
        print("failure times during the outage:", {k: round(v, 2) for k, v in timings.items()})

        server.start()
        _, attempts = until_it_works("stat", os.stat, root / "dir" / "inside")
        print("attempts until the mount worked again:", attempts)
        assert attempts <= 3, f"{attempts} attempts before the mount worked again"
        code, _ = errno_of(os.stat, root / "never-looked-up-2")
        assert code == errno.ENOENT, f"stat of a missing name after recovery: errno {code}"
        works("write+close", write_bytes, root / "after", b"after the outage")
        assert works("read", read_bytes, root / "after") == b"after the outage"
        works("mkdir", os.mkdir, root / "dir-after")
        assert sorted(works("listdir", os.listdir, root / "dir")) == ["inside"]
        drop_caches()
        assert works("read", read_bytes, root / "before") == before, "a file from before the outage changed"
        assert works("read", read_bytes, root / "dir" / "inside") == b"inside"
        held_now = works("read of the file whose close failed", read_bytes, root / "held")
        assert held_now in (b"acknowledged", b"acknowledged and more"), held_now
        works("rewriting the file whose close failed", write_bytes, root / "held", b"rewritten")
        assert works("read", read_bytes, root / "held") == b"rewritten"
        umount_cleanly(deployment, mnt)
    finally:
        print("daemon log:\n" + mnt.new_log()[-6000:])  # shown when the test fails
        teardown(mnt)
        server.start()

    mnt = deployment.mount("dbuser", root)
    try:
        drop_caches()
        assert read_bytes(root / "before") == before
        assert read_bytes(root / "held") == b"rewritten"
        assert read_bytes(root / "after") == b"after the outage"
        assert sorted(os.listdir(root)) == ["after", "before", "dir", "dir-after", "held"]
    finally:
        teardown(mnt)
    status, found, output = fsck(deployment, "--user", "dbuser")
    assert set(found) <= {"orphan_chunks"}, f"fsck after the outage:\n{output}"


HOLDER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
print("ready", flush=True)
for line in sys.stdin:
    command, _, argument = line.strip().partition(" ")
    try:
        if command == "write":
            os.write(fd, argument.encode() * 1)
        elif command == "fill":
            os.write(fd, b"y" * int(argument))
        elif command == "fsync":
            os.fsync(fd)
        elif command == "close":
            os.close(fd)
        print("ok", flush=True)
    except OSError as error:
        print("errno", error.errno, flush=True)
"""


class Holder:
    """A process that holds a file of the mount open and writes/fsyncs it on command.

    The file descriptor must not live in the test process: every subprocess the test
    starts (pg_ctl, dfsfs) would inherit it and close it at exec, and each such close is
    a FUSE flush, which commits the file behind the test's back.
    """

    def __init__(self, path):
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.ask(None) == "ready"

    def ask(self, command: str | None, timeout: float = FAST_FAILURE_S + 20) -> str:
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        answer, error, elapsed = bounded(self.process.stdout.readline, timeout=timeout)
        assert error is None, error
        return answer.strip()

    def errno(self, command: str) -> int:
        answer = self.ask(command)
        return 0 if answer == "ok" else int(answer.split()[1])

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)


def committed_content(deployment, user: str, name: str) -> bytes:
    """The file's content as another mount (a fresh daemon) sees it: what was committed."""
    with mounted(deployment, user) as other:
        return read_bytes(other.path / name)


def test_outage_longer_than_the_flush_interval(server, deployment):
    """Commits that failed while PostgreSQL was down, and the background commits the daemon
    retries while it stays down (idle flush every 5 s), must not leave errors behind: once
    PostgreSQL is back the buffered writes get committed, the files work as usual, and
    umount commits and exits cleanly."""
    mnt = deployment.mount("longuser")
    root = mnt.path
    synced = closed = None
    try:
        write_bytes(root / "kept", b"kept")
        closed = Holder(root / "closed")
        synced = Holder(root / "synced")
        for holder in (closed, synced):
            assert holder.errno("write acknowledged") == 0
            assert holder.errno("fsync") == 0

        server.stop(mode="fast")
        assert closed.errno("write more") == 0  # buffered
        assert closed.errno("close") == errno.EIO, "close during the outage"
        assert synced.errno("fill 70000") == 0  # a whole chunk and a partial one, buffered
        assert synced.errno("fsync") == errno.EIO, "fsync during the outage"
        time.sleep(OUTAGE_BEYOND_FLUSH_S)  # the idle flusher tries, and fails, to commit
        expect_eio("stat after a long outage", os.stat, root / "never-looked-up")
        assert mnt.is_live(), "the daemon died during the outage"

        server.start()
        until_it_works("stat", os.stat, root / "kept")
        # The daemon retries the commit of the buffered writes of the still open file.
        deadline = time.monotonic() + 8
        while (got := committed_content(deployment, "longuser", "synced")) == b"acknowledged":
            assert time.monotonic() < deadline, (
                "8 s after PostgreSQL returned, the writes buffered during the outage (in a "
                "file still open) are not committed")
            time.sleep(1)
        assert got == b"acknowledged" + b"y" * 70_000, f"{len(got)} bytes committed"

        drop_caches()
        got = works("read of a file whose close failed during the outage", read_bytes, root / "closed")
        assert got in (b"acknowledged", b"acknowledgedmore"), got
        works("rewriting a file whose close failed during the outage", write_bytes, root / "closed", b"new")
        assert works("read", read_bytes, root / "closed") == b"new"
        assert synced.errno("write again") == 0, "write to the open file after recovery"
        assert synced.errno("fsync") == 0, "fsync of the open file after recovery"
        assert synced.errno("close") == 0, "close of the open file after recovery"
        got = works("read", read_bytes, root / "synced")
        assert got == b"acknowledged" + b"y" * 70_000 + b"again", f"{len(got)} bytes"
        assert works("read", read_bytes, root / "kept") == b"kept"
        umount_cleanly(deployment, mnt)
    finally:
        print("daemon log:\n" + mnt.new_log()[-6000:])  # shown when the test fails
        for holder in (closed, synced):
            if holder is not None:
                holder.kill()
        teardown(mnt)
        server.start()
    status, found, output = fsck(deployment, "--user", "longuser")
    assert set(found) <= {"orphan_chunks"}, f"fsck after the outage:\n{output}"


def postgres_pids(server) -> list[int]:
    """The postmaster and its children (backends, checkpointer, walwriter, …)."""
    postmaster = int((server.cluster_dir / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout
    return [postmaster, *map(int, children.split())]


def test_unresponsive_database_fails_fast_too(server, deployment):
    """PostgreSQL that stops answering without closing its connections (frozen: SIGSTOP;
    in real life a stalled disk, a hung host whose kernel still acknowledges TCP) must not
    hang the file system either: EIO within seconds, and back to normal when it answers."""
    mnt = deployment.mount("frozen")
    root = mnt.path
    frozen = []
    try:
        write_bytes(root / "f", b"before")
        os.stat(root / "f")
        frozen = postgres_pids(server)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            code, elapsed = errno_of(os.stat, root / "never-looked-up", timeout=FAST_FAILURE_S + 5)
        except Hung:
            raise AssertionError(
                f"stat on the mount hung for more than {FAST_FAILURE_S + 5} s while PostgreSQL "
                "did not answer (no client-side timeout on metadata calls)") from None
        assert code == errno.EIO, f"stat while PostgreSQL is frozen: errno {code}"
        assert elapsed < FAST_FAILURE_S, f"stat took {elapsed:.1f} s to fail"
        assert mnt.is_live()
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        frozen = []
        until_it_works("stat", os.stat, root / "f")
        assert works("read", read_bytes, root / "f") == b"before"
        works("write+close", write_bytes, root / "g", b"after")
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        print("daemon log:\n" + mnt.new_log()[-6000:])  # shown when the test fails
        teardown(mnt)
