"""A real mount (64 KiB chunks) across its lifecycle: unmount and remount keep everything,
two live mounts of one account (close-to-open consistency, namespace changes after the entry
timeout), quotas, the errors of `dfsfs mount`/`umount`, a busy mount point, SIGTERM, and the
mount.dfsfs helper of fstab and systemd."""

import concurrent.futures
import errno
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import mounting
from faults import drop_caches
from mounting import Mount, deployment, mnt, sh, sha256_file, tree_snapshot, work  # noqa: F401

CHUNK_SIZE = "64K"
CHUNK = 64 * 1024
VISIBLE_WITHIN_S = 3.0  # entry/attr timeouts are ~1 s
pytestmark = pytest.mark.timeout(150)


def data(size: int, seed: int = 0) -> bytes:
    return random.Random(f"consistency-{seed}-{size}").randbytes(size)


def stat_snapshot(root) -> dict:
    """Every lstat field that must survive a remount, per relative path (root included)."""
    root = os.fsencode(str(root))
    result = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [b"."] + sorted(dirnames + filenames):
            path = os.path.normpath(os.path.join(dirpath, name))
            st = os.lstat(path)
            result[os.path.relpath(path, root)] = (
                st.st_ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size,
                st.st_blocks, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)
    return result


def build_tree(root: Path) -> None:
    (root / "d" / "e" / "f").mkdir(parents=True)
    (root / "empty").mkdir()
    for i, size in enumerate([0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 17]):
        (root / f"file{i}").write_bytes(data(size, seed=i))
    (root / "d" / "e" / "f" / "deep").write_bytes(data(1000, seed=10))
    with open(root / "sparse", "wb") as f:
        f.seek(20 * CHUNK + 5)
        f.write(b"end")
    os.link(root / "file4", root / "d" / "hard")
    os.link(root / "file4", root / "d" / "e" / "hard2")
    os.symlink("file1", root / "link")
    os.symlink("../missing", root / "d" / "dangling")
    os.setxattr(root / "file1", "user.a", b"1")
    os.setxattr(root / "file1", "user.bin", bytes(range(256)) * 4)
    os.setxattr(root / "d", "user.dir", b"on dir")
    os.chmod(root / "file2", 0o640)
    os.chmod(root / "file3", 0o4711)
    os.chmod(root / "d" / "e", 0o1750)
    os.utime(root / "file0", ns=(1_234_567_891_000_000_001, 1_000_000_000_999_999_999))
    os.utime(root / "link", ns=(5, 1_500_000_000_000_000_123), follow_symlinks=False)
    os.utime(root / "empty", ns=(7, 1_100_000_000_000_000_000))
    # written last and unmounted right away: the commit on close must be complete
    with open(root / "last", "wb") as f:
        f.write(data(3 * CHUNK + 5, seed=11))


def test_unmount_and_remount_keep_everything(work, mnt):
    build_tree(work)
    before = tree_snapshot(work)
    stats_before = stat_snapshot(work)
    listing_before = sh(f"ls -laR --time-style=full-iso '{work}'").stdout
    mnt.remount()
    assert tree_snapshot(work) == before
    assert stat_snapshot(work) == stats_before
    assert sh(f"ls -laR --time-style=full-iso '{work}'").stdout == listing_before
    # and once more, after changes made on the remounted file system
    with open(work / "file5", "r+b") as f:
        f.seek(CHUNK - 3)
        f.write(b"XXXXXX")
    os.truncate(work / "file2", 10)
    os.rename(work / "file0", work / "d" / "moved")
    os.removexattr(work / "file1", "user.a")
    before = tree_snapshot(work)
    stats_before = stat_snapshot(work)
    mnt.remount()
    assert tree_snapshot(work) == before
    assert stat_snapshot(work) == stats_before


# ---- two mounts of one account -------------------------------------------------------------


@pytest.fixture
def second(deployment, mnt):
    """A second live mount of the module mount's account (like a second machine)."""
    with deployment.mount(mnt.user) as other:
        yield other
        other.check_healthy()


def wait_until(condition, timeout=VISIBLE_WITHIN_S) -> bool:
    """Poll `condition`; within the entry timeout a stale entry may fail (ENOENT, ESTALE)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_two_mounts_close_to_open(work, mnt, second):
    there = second.path / work.relative_to(mnt.path)
    assert wait_until(there.is_dir), "a directory made in one mount is not visible in the other"
    # a new file, written and closed in one mount, read in the other at once
    content = data(3 * CHUNK + 100, seed=20)
    (work / "new").write_bytes(content)
    assert read(there / "new") == content
    # and the other way round
    content_b = data(2 * CHUNK - 1, seed=21)
    (there / "from-b").write_bytes(content_b)
    assert read(work / "from-b") == content_b
    # a file the other mount has just read (and stat'ed): an overwrite of the same size
    assert os.stat(there / "new").st_size == len(content)
    changed = bytearray(content)
    changed[CHUNK - 10:CHUNK + 10] = b"Z" * 20
    with open(work / "new", "r+b") as f:
        f.seek(CHUNK - 10)
        f.write(b"Z" * 20)
    assert read(there / "new") == bytes(changed), "a stale copy after close-to-open"
    # rewritten from scratch with the same size
    replaced = data(len(content), seed=22)
    (work / "new").write_bytes(replaced)
    assert read(there / "new") == replaced
    # the other mount has fresh attributes (it read the file), then the file grows and shrinks
    os.stat(there / "new")
    grown = replaced + data(CHUNK + 7, seed=23)
    with open(work / "new", "ab") as f:
        f.write(grown[len(replaced):])
    assert read(there / "new") == grown, "growth made in one mount not seen at the next open"
    os.stat(there / "new")
    os.truncate(work / "new", 1000)
    assert read(there / "new") == grown[:1000], "a truncation not seen at the next open"
    # fstat at the next open agrees too
    os.stat(there / "new")
    (work / "new").write_bytes(b"small")
    with open(there / "new", "rb") as f:
        assert os.fstat(f.fileno()).st_size == 5
        assert f.read() == b"small"


def test_two_mounts_see_renames_and_unlinks(work, mnt, second):
    there = second.path / work.relative_to(mnt.path)
    (work / "a").write_bytes(b"alpha")
    (work / "sub").mkdir()
    assert read(there / "a") == b"alpha"
    assert (there / "sub").is_dir()
    os.rename(work / "a", work / "sub" / "b")
    assert wait_until(lambda: not (there / "a").exists()), "a rename is not seen in the other mount"
    assert read(there / "sub" / "b") == b"alpha"
    # a rename that replaces a file the other mount knows
    (work / "c").write_bytes(b"charlie")
    assert read(there / "c") == b"charlie"
    os.rename(work / "sub" / "b", work / "c")
    assert wait_until(lambda: read(there / "c") == b"alpha"), "a replacing rename is not seen"
    assert wait_until(lambda: os.listdir(there / "sub") == [])
    # unlink
    os.unlink(work / "c")
    assert wait_until(lambda: not (there / "c").exists()), "an unlink is not seen in the other mount"
    assert sorted(os.listdir(there)) == ["sub"]
    # rmdir in the other mount, seen here
    os.rmdir(there / "sub")
    assert wait_until(lambda: not (work / "sub").exists())
    assert os.listdir(work) == []
    # chmod and xattrs travel too (attribute timeout)
    (work / "m").write_bytes(b"")
    os.stat(there / "m")
    os.chmod(work / "m", 0o600)
    os.setxattr(work / "m", "user.k", b"v")
    assert wait_until(lambda: stat.S_IMODE(os.stat(there / "m").st_mode) == 0o600)
    assert os.getxattr(there / "m", "user.k") == b"v"


def test_file_unlinked_in_one_mount_while_open_in_the_other(work, mnt, second):
    there = second.path / work.relative_to(mnt.path)
    content = data(2 * CHUNK + 3, seed=30)
    (work / "f").write_bytes(content)
    with open(there / "f", "rb") as held:
        assert held.read(10) == content[:10]
        os.unlink(work / "f")
        assert wait_until(lambda: not (there / "f").exists())
        # the other mount's session holds the file: its data stays until it is closed
        drop_caches()
        assert held.read() == content[10:]


SAVES = 150


def save_by_rename_in_a_loop(directory: Path, stop: threading.Event) -> int:
    """What editors do to save: write a temporary file, rename it over the document."""
    saves = 0
    while not stop.is_set() and saves < SAVES:
        temporary = directory / f".doc.{saves}.tmp"
        temporary.write_bytes(b"version %d\n" % saves * 100)
        os.rename(temporary, directory / "doc")
        saves += 1
    return saves


def open_in_a_loop(path: Path, stop: threading.Event, failures: list) -> int:
    opened = 0
    while not stop.is_set():
        try:
            with open(path, "rb") as f:
                content = f.read()
        except OSError as error:
            failures.append(os.strerror(error.errno))
            continue
        assert content.startswith(b"version ") and len(content) % 100 == 0 or not content, content[:40]
        opened += 1
    return opened


@pytest.mark.parametrize("where", ["same mount", "other mount"])
def test_saving_by_rename_never_makes_the_name_vanish(work, mnt, second, where):
    """An opener never meets ENOENT while another process replaces the file by rename, on
    the same mount (the kernel's lookup references keep the old inode) or on another
    (an open of an inode replaced there is answered ESTALE, and the kernel looks again)."""
    (work / "doc").write_bytes(b"version -1\n" * 100)
    reader_dir = work if where == "same mount" else second.path / work.relative_to(mnt.path)
    assert wait_until((reader_dir / "doc").exists)
    stop, failures = threading.Event(), []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        opens = pool.submit(open_in_a_loop, reader_dir / "doc", stop, failures)
        saves = pool.submit(save_by_rename_in_a_loop, work, stop)
        try:
            assert saves.result(timeout=120) == SAVES
        finally:
            stop.set()
        assert opens.result(timeout=30) > 0
    assert not failures, f"{len(failures)} opens failed: {sorted(set(failures))}"


# ---- quota -------------------------------------------------------------------------------------


def test_byte_quota(deployment):
    user = "q" + uuid.uuid4().hex[:6]
    deployment.add_user(user)
    deployment.run("user", "quota", user, "--bytes", "1M")
    with deployment.mount(user) as quota_mnt:
        root = quota_mnt.path
        early = data(300_000, seed=40)
        (root / "early").write_bytes(early)
        (root / "d").mkdir()
        (root / "d" / "small").write_bytes(b"small")
        # df: the quota is the size of the file system
        time.sleep(2.2)  # statfs answers are cached for a couple of seconds
        out = sh(f"df -B1 --output=size,used,avail '{root}'").stdout.decode().splitlines()
        size, used, avail = (int(x) for x in out[1].split())
        assert 1_000_000 - 8192 <= size <= (1 << 20) + 8192, out
        assert used >= 300_000 and avail <= size - 300_000, out
        # 2 MB more: fails with EDQUOT or ENOSPC at write, fsync or close
        failure = None
        f = open(root / "big", "wb", buffering=0)
        try:
            for i in range(2_000_000 // CHUNK + 1):
                f.write(data(CHUNK, seed=100 + i))
            os.fsync(f.fileno())
        except OSError as error:
            failure = error
        finally:
            try:
                f.close()
            except OSError as error:
                failure = failure or error
        assert failure is not None, "2 MB written into a 1 MB quota without an error"
        assert failure.errno in (errno.EDQUOT, errno.ENOSPC), failure
        # the earlier files are intact, and what was committed fits in the quota
        assert (root / "early").read_bytes() == early
        assert (root / "d" / "small").read_bytes() == b"small"
        if (root / "big").exists():
            assert os.stat(root / "big").st_size <= (1 << 20)
            os.unlink(root / "big")
        # after freeing space, writing works again
        (root / "after").write_bytes(data(100_000, seed=41))
        assert (root / "after").read_bytes() == data(100_000, seed=41)
        # a single huge write through the shell fails the same way, leaves the mount usable
        result = sh(f"head -c 3000000 /dev/zero | tr '\\0' 'x' > '{root}/shell'; echo rc=$?",
                    check=False)
        assert b"rc=0" not in result.stdout, "3 MB written by the shell into a 1 MB quota"
        assert b"Disk quota exceeded" in result.stderr or b"No space left" in result.stderr, result
        quota_mnt.remount()
        assert (root / "early").read_bytes() == early
        assert (root / "after").read_bytes() == data(100_000, seed=41)


def test_writes_refused_by_the_quota_do_not_wedge_the_mount(deployment):
    """A refused write must give back its buffer memory: a few failed copies into a full
    account must not exhaust the write budget (64 MiB) and block every later writer."""
    user = "q" + uuid.uuid4().hex[:6]
    deployment.add_user(user)
    deployment.run("user", "quota", user, "--bytes", "1M")
    with deployment.mount(user) as quota_mnt:
        root = quota_mnt.path
        for attempt in range(7):  # a user retrying a copy that does not fit
            result = sh(f"dd if=/dev/urandom of='{root}/big{attempt}' bs=1M count=12 status=none",
                        check=False, timeout=15)
            assert result.returncode != 0, "12 MB written into a 1 MB quota"
            assert b"Disk quota exceeded" in result.stderr or b"No space left" in result.stderr
            assert os.stat(root / f"big{attempt}").st_size <= (1 << 20)
        for name in os.listdir(root):
            os.unlink(root / name)
        result = sh(f"echo still-writable > '{root}/small'", timeout=15, check=False)
        assert result.returncode == 0, (
            f"a small write after the refused ones failed: {result.stderr!r}\n"
            f"{deployment.run('stats', '--all').stdout}\n{quota_mnt.new_log()[-3000:]}")
        assert (root / "small").read_bytes() == b"still-writable\n"
        time.sleep(6)  # past the idle-flush interval: nothing is retried in the background
        assert "background commit" not in quota_mnt.new_log(), quota_mnt.new_log()[-3000:]


# ---- errors of mount and umount ----------------------------------------------------------------


def cli_fails(deployment, *args, env=None) -> str:
    result = deployment.run(*args, env=env, check=False)
    assert result.returncode == 1, (
        f"dfsfs {' '.join(map(str, args))} exited {result.returncode}\n{result.stderr}")
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_mount_point_errors(deployment, mnt, tmp_path):
    message = cli_fails(deployment, "mount", tmp_path / "missing", "--user", mnt.user)
    assert "does not exist" in message, message
    (tmp_path / "file").write_bytes(b"")
    message = cli_fails(deployment, "mount", tmp_path / "file", "--user", mnt.user)
    assert "not a directory" in message, message
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_bytes(b"")
    message = cli_fails(deployment, "mount", tmp_path / "full", "--user", mnt.user)
    assert "not empty" in message, message
    message = cli_fails(deployment, "mount", mnt.path, "--user", mnt.user)
    assert "already" in message and "mount" in message, message
    assert mnt.is_live()
    # nothing was mounted anywhere by the failed attempts
    for name in ("missing", "file", "full"):
        assert not mounting.is_mount(tmp_path / name)
    assert os.listdir(tmp_path / "full") == ["something"]


def test_wrong_password_and_unknown_user(deployment, tmp_path):
    user = "w" + uuid.uuid4().hex[:6]
    deployment.add_user(user)
    target = tmp_path / "m"
    target.mkdir()
    env = dict(deployment.env, DFSFS_PASSWORD="not-the-password")
    message = cli_fails(deployment, "mount", target, "--user", user, env=env)
    assert any(word in message.lower() for word in ("password", "login", "authentic")), message
    assert not mounting.is_mount(target)
    message = cli_fails(deployment, "mount", target, "--user", "nobody-" + user)
    assert any(word in message.lower() for word in ("password", "login", "authentic", "user")), message
    assert not mounting.is_mount(target)


def test_umount_errors(deployment, tmp_path):
    message = cli_fails(deployment, "umount", tmp_path)
    assert "not mounted" in message or "not a dfsfs mount" in message, message
    message = cli_fails(deployment, "umount", tmp_path / "missing")
    assert message.strip(), "no message"
    # a mount of another kind
    message = cli_fails(deployment, "umount", "/proc")
    assert "not a dfsfs mount" in message, message


def wait_for_exit(pid: int, timeout: float = 30) -> bool:
    return wait_until(lambda: not mounting._alive(pid), timeout)


def test_umount_refuses_while_busy(deployment, mnt):
    with deployment.mount(mnt.user) as busy:
        (busy.path / "held").write_bytes(b"held open")
        holders = [
            subprocess.Popen(["sleep", "120"], cwd=busy.path),
            subprocess.Popen(["bash", "-c", f"exec 3<'{busy.path}/held'; exec sleep 120"],
                             cwd="/"),
        ]
        time.sleep(0.3)
        try:
            for holder in holders:
                message = cli_fails(deployment, "umount", busy.path)
                assert "busy" in message.lower(), message
                assert busy.is_live()
                assert (busy.path / "held").read_bytes() == b"held open"
                holder.kill()
                holder.wait()
        finally:
            for holder in holders:
                holder.kill()
                holder.wait()
        pid = busy.pid
        busy.umount()  # succeeds now, and the daemon exits
        assert not mounting._alive(pid)


def test_sigterm_unmounts_cleanly(deployment, mnt):
    with deployment.mount(mnt.user) as victim:
        content = data(4 * CHUNK + 9, seed=50)
        (victim.path / "written").write_bytes(content)
        with open(victim.path / "fsynced", "wb") as f:
            f.write(b"fsynced")
            os.fsync(f.fileno())
        pid = victim.pid
        os.kill(pid, signal.SIGTERM)
        assert wait_for_exit(pid), "the daemon did not exit after SIGTERM"
        assert not mounting.is_mount(victim.path), "SIGTERM left the mount point mounted"
        log = victim.new_log()
        assert "SIGTERM" in log
        alarms = [line for line in log.splitlines() if any(a in line for a in mounting.LOG_ALARMS)]
        assert not alarms, log[-4000:]
        assert not victim.pid_file.exists()
        victim.mount()
        assert (victim.path / "written").read_bytes() == content
        assert (victim.path / "fsynced").read_bytes() == b"fsynced"


def test_mount_helper_for_fstab(deployment, mnt, tmp_path):
    helper = Path(sys.executable).with_name("mount.dfsfs")
    assert helper.exists()
    password_file = tmp_path / "pw"
    password_file.write_text(mounting.PASSWORD + "\n")
    password_file.chmod(0o600)
    target = deployment.base / ("helper-" + uuid.uuid4().hex[:6])
    target.mkdir()
    env = {k: v for k, v in deployment.env.items() if k != "DFSFS_PASSWORD"}
    helped = Mount(deployment, mnt.user, target)
    helped._log_offset = {p: p.stat().st_size for p in helped.log_files()}
    mounting._live_mounts.add(helped)
    try:
        result = subprocess.run(
            [str(helper), mnt.user, str(target), "-o", f"rw,noauto,_netdev,password_file={password_file}"],
            env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        assert mounting.is_mount(target)
        helped.pid = int(helped.pid_file.read_text())
        # it is the same account: files of the module's mount are there
        (mnt.path / "via-helper").write_bytes(b"seen")
        assert (target / "via-helper").read_bytes() == b"seen"
        os.unlink(target / "via-helper")
        # a wrong password file fails clearly
        (tmp_path / "bad").write_text("wrong\n")
        other = deployment.base / ("helper-" + uuid.uuid4().hex[:6])
        other.mkdir()
        result = subprocess.run([str(helper), mnt.user, str(other), "-o", f"password_file={tmp_path}/bad"],
                                env=env, capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 1, result.stderr
        assert not mounting.is_mount(other)
        helped.umount()
    finally:
        helped.cleanup()


def test_a_mount_configured_with_another_chunk_size_reads_the_recorded_layout(deployment):
    """The chunk size is the database's, not the mount's configuration: a second machine
    configured with 4M reads what 64K chunks hold (it read zeros after the first MiB when
    the size was not recorded)."""
    content = data(5 * CHUNK + 17, seed=44)
    with deployment.mount("layout") as first:
        (first.path / "f").write_bytes(content)
    other = mounting.Deployment(deployment.env["DFSFS_DATABASE_URL"], deployment.base,
                                chunk_size="4M")
    other.users = deployment.users
    assert "stores files in 64 KiB chunks" in other.run("init").stderr
    with other.mount("layout") as second:
        assert (second.path / "f").read_bytes() == content
        (second.path / "g").write_bytes(content)  # written in the recorded layout too
    with deployment.mount("layout") as third:
        assert (third.path / "g").read_bytes() == content


FEED_S = 0.5  # well inside the 1 s entry and attribute timeouts


def test_changes_of_another_mount_reach_this_one_at_once(work, mnt, second):
    """Names and attributes the kernel cached here are dropped as soon as the other mount
    commits a change (the change feed), not after the entry or attribute timeout."""
    there = second.path / work.relative_to(mnt.path)
    for name in ("gone", "doc", "grows"):
        (work / name).write_bytes(b"first")
    assert wait_until(lambda: (there / "grows").exists())
    for name in ("gone", "doc", "grows"):
        os.stat(work / name)  # cached here now, for a second
    os.unlink(there / "gone")
    (there / "doc.tmp").write_bytes(b"second version")
    os.rename(there / "doc.tmp", there / "doc")
    (there / "grows").write_bytes(b"first and more")
    time.sleep(FEED_S)
    assert not (work / "gone").exists()
    assert (work / "doc").read_bytes() == b"second version"
    assert os.stat(work / "grows").st_size == len(b"first and more")
