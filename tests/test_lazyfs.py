"""scripts/lazyfs.py, the power-cut test's file system: what survives a cut is exactly what
was synced, as after a power cut on ext4 (see the script's docstring for the model)."""

import errno
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from powercut.lazy import LazyMount

pytestmark = [pytest.mark.mount, pytest.mark.timeout(60)]


@pytest.fixture
def base():
    """A directory other users can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="dfsfs-lazyfs-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def lazy(base):
    backing = base / "backing"
    backing.mkdir()
    (backing / "old").write_bytes(b"old content")
    (backing / "dir").mkdir()
    mount = LazyMount(backing, base / "mnt", f"/dev/shm/lazyfs-test-{uuid.uuid4().hex[:8]}")
    mount.start()
    try:
        yield mount
    finally:
        mount.cleanup()


def write(path, data: bytes, sync: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def listing(path) -> list[str]:
    return sorted(os.listdir(path))


def test_a_cut_forgets_what_was_not_synced(lazy):
    mnt, backing = lazy.mountpoint, lazy.backing
    write(mnt / "new", b"never synced")
    (mnt / "old").write_bytes(b"rewritten, not synced")
    os.rename(mnt / "dir", mnt / "moved")
    assert (mnt / "new").read_bytes() == b"never synced"  # reads see unsynced data
    assert listing(backing) == ["dir", "old"]  # nothing reached the backing directory
    lazy.cut()
    with pytest.raises(OSError) as raised:  # after the cut nothing is synced any more
        write(mnt / "late", b"too late", sync=True)
    assert raised.value.errno == errno.EIO
    lazy.cleanup()
    assert listing(backing) == ["dir", "old"]
    assert (backing / "old").read_bytes() == b"old content"


def test_fsync_keeps_the_file_and_every_earlier_name_change(lazy):
    mnt, backing = lazy.mountpoint, lazy.backing
    write(mnt / "unsynced", b"data of a file never synced")
    os.rename(mnt / "old", mnt / "renamed")
    fd = os.open(mnt / "synced", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"first part;")
    os.fsync(fd)
    os.write(fd, b" second part, not synced")
    os.close(fd)
    lazy.cut()
    lazy.cleanup()
    # ext4's fsync commits the journal: every earlier name change, not others' data
    assert listing(backing) == ["dir", "renamed", "synced", "unsynced"]
    assert (backing / "synced").read_bytes() == b"first part;"
    assert (backing / "unsynced").read_bytes() == b""
    assert (backing / "renamed").read_bytes() == b"old content"
    assert os.stat(backing / "synced").st_mode & 0o777 == 0o600


def test_fsyncdir_keeps_names_but_no_data(lazy):
    mnt, backing = lazy.mountpoint, lazy.backing
    write(mnt / "dir" / "inner", b"inner data")
    os.unlink(mnt / "old")
    os.mkdir(mnt / "dir" / "sub")
    sync_dir(mnt / "dir")
    os.rmdir(mnt / "dir" / "sub")  # after the sync: undone by the cut
    lazy.cut()
    lazy.cleanup()
    assert listing(backing) == ["dir"]
    assert listing(backing / "dir") == ["inner", "sub"]
    assert (backing / "dir" / "inner").read_bytes() == b""


def test_a_rename_over_a_file_without_fsync_may_leave_it_empty(base):
    """With --cut-keeps 1 the cut commits every name change first (ext4's timed journal
    commit): the renamed file is there, with no data — the reason editors fsync."""
    backing = base / "backing"
    backing.mkdir()
    (backing / "target").write_bytes(b"the saved document")
    lazy = LazyMount(backing, base / "mnt", f"/dev/shm/lazyfs-test-{uuid.uuid4().hex[:8]}",
                     cut_keeps=1.0)
    lazy.start()
    try:
        write(lazy.mountpoint / "target.tmp", b"the new version")
        os.rename(lazy.mountpoint / "target.tmp", lazy.mountpoint / "target")
        lazy.cut()
    finally:
        lazy.cleanup()
    assert listing(backing) == ["target"]
    assert (backing / "target").read_bytes() == b""


def test_truncate_and_sync_and_removed_files(lazy):
    mnt, backing = lazy.mountpoint, lazy.backing
    os.truncate(mnt / "old", 3)
    write(mnt / "gone", b"x" * 100_000, sync=True)
    fd = os.open(mnt / "gone", os.O_RDWR)
    os.unlink(mnt / "gone")
    os.pwrite(fd, b"y" * 10, 0)
    os.fsync(fd)  # the file has no name any more: nothing to carry
    os.close(fd)
    os.link(mnt / "old", mnt / "hard")
    sync_dir(mnt)
    lazy.cut()
    lazy.cleanup()
    assert listing(backing) == ["dir", "hard", "old"]
    assert (backing / "old").read_bytes() == b"old"  # the truncate is metadata: committed
    assert os.stat(backing / "old").st_ino == os.stat(backing / "hard").st_ino


def test_a_clean_unmount_syncs_everything(lazy):
    mnt, backing = lazy.mountpoint, lazy.backing
    write(mnt / "new", b"written, never synced")
    os.rename(mnt / "old", mnt / "dir" / "moved")
    lazy.unmount()
    assert listing(backing) == ["dir", "new"]
    assert (backing / "new").read_bytes() == b"written, never synced"
    assert (backing / "dir" / "moved").read_bytes() == b"old content"


def test_another_user_owns_what_it_creates(lazy):
    """PostgreSQL runs as `postgres` on the lazy file system: owners survive the replay."""
    mnt, backing = lazy.mountpoint, lazy.backing
    os.chmod(mnt, 0o777)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgid(65534)
            os.setuid(65534)
            write(mnt / "theirs", b"nobody's", sync=True)
            os._exit(0)
        except BaseException:
            os._exit(1)
    assert os.waitpid(pid, 0)[1] == 0
    lazy.cut()
    lazy.cleanup()
    st = os.stat(backing / "theirs")
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert (backing / "theirs").read_bytes() == b"nobody's"
