"""POSIX as pjdfstest checks it (docs/conformance.md), on a real mount with plain os calls:
the cases of the areas pjdfstest covers, kept here since CI cannot fetch pjdfstest. And
renames from many mounts at once, serialised on the server (migration 9): no interleaving
makes a directory cycle or cuts a directory off from the root."""

import ctypes
import errno
import os
import random
import shutil
import stat
import tempfile
import threading
import time
import uuid
from pathlib import Path

import mounting
import pytest
import sqlalchemy as sa
from conftest import client_url_of, login_as
from mounting import work  # noqa: F401

from dfsfs.auth import make_verifier
from dfsfs.errors import DfsfsError, InvalidArgumentError
from dfsfs.meta.accounts import AccountStore
from dfsfs.meta.store import MetadataStore
from dfsfs.session import logout, session_engine

CHUNK_SIZE = "64K"
SESSION_PASSWORD = "posix-session-password"
pytestmark = [pytest.mark.mount, pytest.mark.timeout(300)]

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
DIR_MODE = stat.S_IFDIR | 0o755


def renameat2(old, new, flags: int) -> None:
    result = libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(old))


def errno_of(call) -> int:
    try:
        call()
    except OSError as error:
        return error.errno
    return 0


# ---- renames from many sessions at once -----------------------------------------------------

def directory_tree(engine, account: int) -> tuple[set[int], set[int]]:
    """(every directory with a name, those reachable from the account's root)."""
    with engine.connect() as conn:
        named = {row[0] for row in conn.execute(sa.text(
            "SELECT i.id FROM inodes i WHERE i.user_id = :a AND i.mode & 61440 = 16384"
            " AND i.nlink > 0 AND i.id <> (SELECT root_ino FROM users WHERE id = :a)"),
            {"a": account})}
        reachable = {row[0] for row in conn.execute(sa.text(
            "WITH RECURSIVE down(ino) AS (SELECT root_ino FROM users WHERE id = :a"
            " UNION SELECT d.ino FROM dentries d JOIN down ON d.parent_ino = down.ino)"
            " SELECT ino FROM down"), {"a": account})}
    return named, reachable


@pytest.fixture
def sessions(database_url, admin_engine):
    """Four sessions (as four mounts) of a new account, each its own engine and pool."""
    name = "r" + uuid.uuid4().hex[:8]
    account = AccountStore(admin_engine).create_user(name, make_verifier(SESSION_PASSWORD))
    made = []
    for _ in range(4):
        login = login_as(database_url, name, SESSION_PASSWORD)
        made.append(MetadataStore(session_engine(client_url_of(database_url), login),
                                  account, login.session_id))
    yield account, made
    for meta in made:
        logout(meta.engine, "unmounted")
        meta.engine.dispose()


def test_renames_of_many_sessions_never_make_a_cycle(sessions, admin_engine):
    """Four sessions move eight directories into each other at random, 300 times each:
    every move that would put a directory below itself is refused (EINVAL) under the
    server's rename lock, so every directory still reaches the root."""
    account, metas = sessions
    root = metas[0].root_ino
    dirs = [metas[0].make_node(root, f"d{i}".encode(), DIR_MODE, 0, 0, time.time_ns()).ino
            for i in range(8)]
    name_of = {ino: f"d{i}".encode() for i, ino in enumerate(dirs)}
    refused = []
    failures = []

    def parent_of(meta, ino):
        with meta.engine.connect() as conn:
            return conn.execute(sa.text("SELECT parent_ino FROM dentries WHERE ino = :i"),
                                {"i": ino}).scalar()

    def mover(meta, seed):
        rng = random.Random(seed)
        for _ in range(300):
            moved, into = rng.sample(dirs, 2)
            into = rng.choice([into, into, root])
            parent = parent_of(meta, moved)
            try:
                meta.rename(parent, name_of[moved], into, name_of[moved], 0, time.time_ns())
            except InvalidArgumentError:
                refused.append(1)
            except DfsfsError:
                pass  # moved meanwhile (ENOENT), or already there
            except Exception as error:  # noqa: BLE001 - reported by the test thread
                failures.append(error)

    threads = [threading.Thread(target=mover, args=(meta, n)) for n, meta in enumerate(metas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert refused, "no move was refused: the test did not try to make a cycle"
    named, reachable = directory_tree(admin_engine, account)
    assert named == set(dirs)
    assert named <= reachable, f"cut off from the root: {sorted(named - reachable)}"


# ---- a mount other users can reach (allow_other), as pjdfstest runs it ------------------------

OTHER_UID, OTHER_GID = 65534, 65534  # nobody, nogroup
SECOND_UID = 65533


@pytest.fixture(scope="module")
def deployment(database_url):
    """Under a directory every user may traverse: tests switch to other users."""
    base = Path(tempfile.mkdtemp(prefix="dfsfs-posix-", dir="/tmp"))
    os.chmod(base, 0o755)
    yield mounting.Deployment(database_url, base, chunk_size=CHUNK_SIZE)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def mnt(deployment):
    with deployment.mount("alice", options="allow_other") as live:
        os.chmod(live.path, 0o755)
        yield live
    deployment.assert_consistent("alice")


def as_user(uid: int, gid: int, call, groups=()) -> int:
    """Run `call()` in a child process with these ids; its errno (0: it succeeded)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 255
        try:
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            call()
            code = 0
        except OSError as error:
            code = error.errno
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def tick() -> None:
    """Let the clock move past the last change (times are compared for change)."""
    time.sleep(0.02)


def times(path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


# ---- two mounts at once ---------------------------------------------------------------------------

@pytest.fixture
def second(deployment, mnt):
    """A second live mount of the account (as a second machine)."""
    with deployment.mount(mnt.user) as other:
        yield other
        other.check_healthy()


def at_once(*calls) -> list[int]:
    """Run the calls in threads released together; the errno of each (0: success)."""
    barrier = threading.Barrier(len(calls))
    results = [None] * len(calls)

    def run(number, call):
        barrier.wait()
        results[number] = errno_of(call)

    threads = [threading.Thread(target=run, args=item) for item in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_two_mounts_moving_directories_into_each_other(work, mnt, second, admin_engine):
    """The issue's case: mount A moves a into b while mount B moves b into a. Both cannot
    succeed (a cycle cut off from the root); the later one is refused, every round."""
    there = second.path / work.relative_to(mnt.path)
    outcomes = []
    for number in range(60):
        a, b = f"a{number}", f"b{number}"
        (work / a).mkdir()
        (work / b).mkdir()
        outcomes.append(tuple(at_once(lambda a=a, b=b: os.rename(work / a, work / b / a),
                                      lambda a=a, b=b: os.rename(there / b, there / a / b))))
    assert all(0 in outcome and outcome.count(0) == 1 for outcome in outcomes), outcomes
    assert {code for outcome in outcomes for code in outcome} <= {0, errno.EINVAL, errno.ENOENT}
    found = [d for _, dirs, _ in os.walk(work) for d in dirs]
    assert len(found) == 120
    account = mounting_account(admin_engine, mnt.user)
    named, reachable = directory_tree(admin_engine, account)
    assert named <= reachable, f"cut off from the root: {sorted(named - reachable)}"


def test_rmdir_on_one_mount_and_mkdir_inside_on_the_other(work, mnt, second, admin_engine):
    """Ordered by the directory's lock on the server: either the directory goes and the
    mkdir inside finds it gone, or the mkdir lands and the rmdir finds it not empty."""
    there = second.path / work.relative_to(mnt.path)
    outcomes = []
    for number in range(40):
        d = f"d{number}"
        (work / d).mkdir()
        os.stat(there / d)  # the second mount knows the directory
        outcomes.append(tuple(at_once(lambda d=d: os.rmdir(work / d),
                                      lambda d=d: os.mkdir(there / d / "x"))))
    assert set(outcomes) <= {(0, errno.ENOENT), (errno.ENOTEMPTY, 0)}, outcomes
    account = mounting_account(admin_engine, mnt.user)
    named, reachable = directory_tree(admin_engine, account)
    assert named <= reachable, f"cut off from the root: {sorted(named - reachable)}"


def mounting_account(engine, name: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT id FROM users WHERE name = :n"), {"n": name}).scalar()


# ---- rename --------------------------------------------------------------------------------------

def test_rename_changes_the_ctime_of_the_renamed_inode_and_the_parents(work):
    (work / "a").mkdir()
    (work / "b").mkdir()
    (work / "a" / "f").write_bytes(b"x")
    (work / "a" / "d").mkdir()
    for name in ("f", "d"):
        before = {p: times(p) for p in (work / "a", work / "b", work / "a" / name)}
        tick()
        os.rename(work / "a" / name, work / "b" / name)
        moved = times(work / "b" / name)
        assert moved[2] > before[work / "a" / name][2]  # ctime
        assert moved[1] == before[work / "a" / name][1]  # mtime kept
        for parent in (work / "a", work / "b"):
            assert times(parent)[1] > before[parent][1] and times(parent)[2] > before[parent][2]


def test_rename_exchange_changes_both_ctimes_and_keeps_link_counts(work):
    (work / "f").write_bytes(b"f")
    (work / "sub").mkdir()
    (work / "sub" / "d").mkdir()
    before_f, before_d = times(work / "f"), times(work / "sub" / "d")
    nlink_work, nlink_sub = os.stat(work).st_nlink, os.stat(work / "sub").st_nlink
    tick()
    renameat2(work / "f", work / "sub" / "d", RENAME_EXCHANGE)
    assert stat.S_ISDIR(os.lstat(work / "f").st_mode)
    assert times(work / "f")[2] > before_d[2]
    assert times(work / "sub" / "d")[2] > before_f[2]
    assert os.stat(work).st_nlink == nlink_work + 1  # the directory moved up
    assert os.stat(work / "sub").st_nlink == nlink_sub - 1
    # the moved directory's '..' is its new parent
    assert os.stat(work / "f" / "..").st_ino == os.stat(work).st_ino


def test_rename_exchange_refuses_a_directory_below_itself(work):
    (work / "d" / "e").mkdir(parents=True)
    assert errno_of(lambda: renameat2(work / "d", work / "d" / "e", RENAME_EXCHANGE)) in (
        errno.EINVAL, errno.ENOTEMPTY)
    assert errno_of(lambda: renameat2(work / "d" / "e", work / "d", RENAME_EXCHANGE)) in (
        errno.EINVAL, errno.ENOTEMPTY)
    assert os.listdir(work / "d") == ["e"]


def test_rename_flags_that_make_no_sense_are_refused(work):
    (work / "a").write_bytes(b"a")
    (work / "b").write_bytes(b"b")
    assert errno_of(lambda: renameat2(work / "a", work / "b",
                                      RENAME_NOREPLACE | RENAME_EXCHANGE)) == errno.EINVAL
    assert errno_of(lambda: renameat2(work / "a", work / "c", RENAME_WHITEOUT)) in (
        errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP)
    assert sorted(os.listdir(work)) == ["a", "b"]


def test_rename_of_a_directory_over_an_empty_one(work):
    (work / "src" / "inner").mkdir(parents=True)
    (work / "dst").mkdir()
    (work / "other").mkdir()
    nlink = os.stat(work).st_nlink
    os.rename(work / "src", work / "dst")
    assert os.listdir(work / "dst") == ["inner"]
    assert os.stat(work).st_nlink == nlink - 1  # one subdirectory fewer
    # across directories, over an empty one
    (work / "other" / "empty").mkdir()
    os.rename(work / "dst", work / "other" / "empty")
    assert os.stat(work).st_nlink == nlink - 2
    assert os.stat(work / "other").st_nlink == 3
    assert os.listdir(work / "other" / "empty") == ["inner"]


def test_rename_onto_another_name_of_the_same_file_does_nothing(work):
    (work / "a").write_bytes(b"same")
    os.link(work / "a", work / "b")
    os.rename(work / "a", work / "b")
    assert sorted(os.listdir(work)) == ["a", "b"]
    assert os.stat(work / "a").st_nlink == 2


def test_sticky_directory_rules(work):
    """In a sticky directory only a file's owner, the directory's owner or root may
    remove or rename it (the kernel checks, with the owners dfsfs keeps)."""
    os.chmod(work, 0o1777)
    theirs = work / "theirs"
    assert as_user(OTHER_UID, OTHER_GID, lambda: theirs.write_bytes(b"t")) == 0
    assert as_user(SECOND_UID, OTHER_GID, lambda: os.unlink(theirs)) == errno.EPERM
    assert as_user(SECOND_UID, OTHER_GID,
                   lambda: os.rename(theirs, work / "stolen")) == errno.EPERM
    mine = work / "mine"
    assert as_user(SECOND_UID, OTHER_GID, lambda: mine.write_bytes(b"m")) == 0
    # replacing someone else's file by rename is removing it
    assert as_user(SECOND_UID, OTHER_GID, lambda: os.rename(mine, theirs)) == errno.EPERM
    assert as_user(OTHER_UID, OTHER_GID, lambda: os.rename(theirs, work / "renamed")) == 0
    os.unlink(work / "renamed")  # root may
    assert os.listdir(work) == ["mine"]


# ---- ownership and modes ---------------------------------------------------------------------

def test_write_by_another_user_clears_setuid_and_setgid(work):
    f = work / "f"
    f.write_bytes(b"x")
    os.chown(f, OTHER_UID, OTHER_GID)
    os.chmod(f, 0o6777)
    assert as_user(SECOND_UID, OTHER_GID, lambda: f.open("ab").write(b"more")) == 0
    assert stat.S_IMODE(os.stat(f).st_mode) & 0o6000 == 0
    assert f.read_bytes() == b"xmore"


def test_chown_clears_setuid_and_setgid_of_a_file(work):
    f = work / "f"
    f.write_bytes(b"x")
    os.chmod(f, 0o6755)
    os.chown(f, OTHER_UID, -1)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o755
    # a directory keeps them
    (work / "d").mkdir()
    os.chmod(work / "d", 0o2755)
    os.chown(work / "d", OTHER_UID, -1)
    assert stat.S_IMODE(os.stat(work / "d").st_mode) == 0o2755


def test_new_entries_of_a_setgid_directory_take_its_group(work):
    shared = work / "shared"
    shared.mkdir()
    os.chown(shared, 0, OTHER_GID)
    os.chmod(shared, 0o2777)
    (shared / "file").write_bytes(b"")
    (shared / "sub").mkdir()
    os.mkfifo(shared / "fifo")
    os.symlink("file", shared / "link")
    for name in ("file", "sub", "fifo", "link"):
        assert os.lstat(shared / name).st_gid == OTHER_GID, name
    assert os.stat(shared / "sub").st_mode & stat.S_ISGID  # directories pass it on
    assert not os.stat(shared / "file").st_mode & stat.S_ISGID
    # a user not in the group: the group still comes from the directory
    assert as_user(SECOND_UID, SECOND_UID, lambda: (shared / "by-other").write_bytes(b"")) == 0
    assert os.stat(shared / "by-other").st_gid == OTHER_GID
    # not in a directory without the bit
    (work / "plain").write_bytes(b"")
    assert os.stat(work / "plain").st_gid == os.getegid()


def test_only_the_owner_changes_modes_and_only_root_changes_owners(work):
    f = work / "f"
    f.write_bytes(b"")
    os.chown(f, OTHER_UID, OTHER_GID)
    assert as_user(SECOND_UID, OTHER_GID, lambda: os.chmod(f, 0o777)) == errno.EPERM
    assert as_user(OTHER_UID, OTHER_GID, lambda: os.chmod(f, 0o640)) == 0
    assert as_user(OTHER_UID, OTHER_GID, lambda: os.chown(f, SECOND_UID, -1)) == errno.EPERM
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640
    assert os.stat(f).st_uid == OTHER_UID


# ---- links and removals ------------------------------------------------------------------------

def test_link_and_unlink_need_write_and_search_permission(work):
    (work / "ro").mkdir()
    (work / "ro" / "f").write_bytes(b"f")
    os.chmod(work / "ro" / "f", 0o666)  # fs.protected_hardlinks: others may link it
    os.chmod(work / "ro", 0o555)
    assert as_user(OTHER_UID, OTHER_GID, lambda: os.unlink(work / "ro" / "f")) == errno.EACCES
    assert as_user(OTHER_UID, OTHER_GID,
                   lambda: os.link(work / "ro" / "f", work / "ro" / "g")) == errno.EACCES
    os.chmod(work / "ro", 0o733)  # write without read still links (search is enough)
    assert as_user(OTHER_UID, OTHER_GID,
                   lambda: os.link(work / "ro" / "f", work / "ro" / "g")) == 0
    assert os.stat(work / "ro" / "f").st_nlink == 2


def test_link_and_unlink_times(work):
    f = work / "f"
    f.write_bytes(b"x")
    before_f, before_dir = times(f), times(work)
    tick()
    os.link(f, work / "g")
    assert times(f)[2] > before_f[2] and times(f)[1] == before_f[1]
    assert times(work)[1] > before_dir[1] and times(work)[2] > before_dir[2]
    before_f, before_dir = times(f), times(work)
    tick()
    os.unlink(work / "g")
    assert times(f)[2] > before_f[2] and times(f)[1] == before_f[1]
    assert times(work)[1] > before_dir[1]
    assert os.stat(f).st_nlink == 1


# ---- special files -------------------------------------------------------------------------------

def test_fifo_passes_data(work):
    os.mkfifo(work / "fifo", 0o600)
    assert stat.S_ISFIFO(os.lstat(work / "fifo").st_mode)
    received = []
    reader = threading.Thread(target=lambda: received.append((work / "fifo").read_bytes()))
    reader.start()
    (work / "fifo").write_bytes(b"through the pipe")
    reader.join(10)
    assert received == [b"through the pipe"]
    assert os.lstat(work / "fifo").st_size == 0


def test_device_nodes_keep_their_numbers(work, mnt):
    os.mknod(work / "char", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(work / "block", stat.S_IFBLK | 0o600, os.makedev(8, 1))
    os.mknod(work / "sock", stat.S_IFSOCK | 0o600)
    assert stat.S_ISCHR(os.lstat(work / "char").st_mode)
    assert os.lstat(work / "char").st_rdev == os.makedev(1, 3)
    assert os.lstat(work / "block").st_rdev == os.makedev(8, 1)
    assert stat.S_ISSOCK(os.lstat(work / "sock").st_mode)


def test_symlink_edge_cases(work):
    long_target = "x" * 4095
    os.symlink(long_target, work / "long")
    assert os.readlink(work / "long") == long_target
    assert os.lstat(work / "long").st_size == 4095
    assert errno_of(lambda: os.symlink("y" * 4096, work / "too-long")) == errno.ENAMETOOLONG
    os.symlink("loop", work / "loop")
    assert errno_of(lambda: os.stat(work / "loop")) == errno.ELOOP
    os.symlink("missing", work / "dangling")
    assert errno_of(lambda: os.stat(work / "dangling")) == errno.ENOENT
    assert errno_of(lambda: os.symlink("x", work / "long")) == errno.EEXIST
    # lchown and utimensat on the link itself
    os.chown(work / "dangling", OTHER_UID, OTHER_GID, follow_symlinks=False)
    assert os.lstat(work / "dangling").st_uid == OTHER_UID
    os.utime(work / "dangling", ns=(1, 2_000_000_000), follow_symlinks=False)
    assert os.lstat(work / "dangling").st_mtime_ns == 2_000_000_000
    assert errno_of(lambda: os.readlink(work)) == errno.EINVAL


# ---- sizes, truncate, times -----------------------------------------------------------------------

def test_directories_show_dot_entries_and_a_size(work):
    (work / "d").mkdir()
    names = sorted(os.listdir(work))
    assert names == ["d"]
    with os.scandir(work) as entries:
        assert [e.name for e in entries] == ["d"]  # Python hides them; the kernel has them
    assert os.stat(work / "d").st_size == 4096
    assert os.stat(work / "d" / "..").st_ino == os.stat(work).st_ino
    listing = os.popen(f"ls -a1 '{work / 'd'}'").read().split()
    assert listing == [".", ".."]


def test_sparse_files_take_blocks_only_where_written(work):
    f = work / "sparse"
    with open(f, "wb") as out:
        out.seek(1 << 30)
        out.write(b"end")
    st = os.stat(f)
    assert st.st_size == (1 << 30) + 3
    assert st.st_blocks * 512 < 1 << 20


def test_truncate_rules(work):
    f = work / "f"
    f.write_bytes(b"0123456789")
    before = times(f)
    tick()
    os.truncate(f, 4)
    assert f.read_bytes() == b"0123"
    assert times(f)[1] > before[1] and times(f)[2] > before[2]
    os.truncate(f, 8)
    assert f.read_bytes() == b"0123\0\0\0\0"
    assert errno_of(lambda: os.truncate(f, -1)) == errno.EINVAL
    assert errno_of(lambda: os.truncate(work, 0)) == errno.EISDIR
    os.chmod(f, 0o644)
    os.chown(f, OTHER_UID, OTHER_GID)
    assert as_user(SECOND_UID, OTHER_GID, lambda: os.truncate(f, 0)) == errno.EACCES
    fd = os.open(f, os.O_RDONLY)
    try:
        assert errno_of(lambda: os.ftruncate(fd, 0)) == errno.EINVAL
    finally:
        os.close(fd)


def test_utimensat_rules(work):
    f = work / "f"
    f.write_bytes(b"")
    os.chown(f, OTHER_UID, OTHER_GID)
    os.chmod(f, 0o666)
    # UTIME_OMIT keeps a time, UTIME_NOW sets it now; either way ctime changes
    before = times(f)
    tick()
    os.utime(f, ns=(5_000_000_000, before[1]))
    assert times(f)[0] == 5_000_000_000 and times(f)[1] == before[1]
    assert times(f)[2] > before[2]
    # anyone who may write may set both to now, only the owner to a given time
    assert as_user(SECOND_UID, SECOND_UID, lambda: os.utime(f)) == 0
    assert as_user(SECOND_UID, SECOND_UID, lambda: os.utime(f, ns=(1, 1))) == errno.EPERM
    assert as_user(OTHER_UID, OTHER_GID, lambda: os.utime(f, ns=(1, 1))) == 0
    assert times(f)[:2] == (1, 1)
    # times before 1970 and past 2038
    os.utime(f, ns=(-1_000_000_000, 4_000_000_000_000_000_000))
    assert times(f)[:2] == (-1_000_000_000, 4_000_000_000_000_000_000)


def test_rename_of_a_directory_another_mount_moved(work, mnt, second):
    """Mount B knows directory x/sub under that name; mount A moves it to `moved`. Found by
    tests/test_model.py (seed 59): were B's kernel to keep the stale name, the lookup of
    `moved` inside a rename on B would meet the inode under it, which the kernel cannot
    move while it holds the rename lock (d_splice_alias): ESTALE, again at the retry. The
    change feed invalidates the old name on B as A's rename commits."""
    there = second.path / work.relative_to(mnt.path)
    (work / "x" / "sub").mkdir(parents=True)
    (work / "y").mkdir()
    os.stat(there / "x" / "sub")  # B's kernel has it as x/sub
    os.rename(work / "x" / "sub", work / "moved")
    time.sleep(1.2)  # past the entry timeout
    os.rename(there / "moved", there / "y" / "moved")
    assert os.listdir(work / "y") == ["moved"]
