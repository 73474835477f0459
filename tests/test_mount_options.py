"""Mount options the core applies: uid=, gid=, umask= (what every file shows), the atime
modes (when a read updates the access time), commit= and sync (when a close is durable)."""

import os
import time

import pytest

from mounting import Deployment

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def deployment(database_url, tmp_path_factory):
    return Deployment(database_url, tmp_path_factory.mktemp("options"), chunk_size="64K")


def test_uid_gid_and_umask_change_what_every_file_shows(deployment):
    with deployment.mount("shown") as plain:
        (plain.path / "f").write_bytes(b"x")
        os.chmod(plain.path / "f", 0o664)
        os.mkdir(plain.path / "d", 0o775)
    with deployment.mount("shown", options="uid=1234,gid=5678,umask=027") as mapped:
        for name, stored_mode in (("f", 0o664), ("d", 0o775)):
            st = os.stat(mapped.path / name)
            assert (st.st_uid, st.st_gid) == (1234, 5678)
            assert st.st_mode & 0o7777 == stored_mode & ~0o027
    with deployment.mount("shown") as again:  # nothing stored changed
        st = os.stat(again.path / "f")
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o664)


def read_twice_atimes(path) -> tuple[int, int, int]:
    before = os.stat(path).st_atime_ns
    path.read_bytes()
    first = _after_close(path)
    time.sleep(0.01)
    path.read_bytes()
    return before, first, _after_close(path)


def _after_close(path) -> int:
    os.sync()
    fd = os.open(path, os.O_RDONLY)  # a fresh open: attributes as committed
    try:
        return os.fstat(fd).st_atime_ns
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", ["noatime", "relatime", "strictatime"])
def test_atime_modes_update_the_access_time_as_ext4_does(deployment, mode):
    with deployment.mount(f"atime{mode}") as setup:
        path = setup.path / "f"
        path.write_bytes(b"data" * 1000)
        os.utime(path, ns=(1_000_000_000, 2_000_000_000))  # atime before mtime
    with deployment.mount(f"atime{mode}", options=mode) as mnt:
        before, first, second = read_twice_atimes(mnt.path / "f")
    assert before == 1_000_000_000
    if mode == "noatime":
        assert first == second == before
    elif mode == "relatime":  # once (atime was before mtime), then not until a day passes
        assert first > before and second == first
    else:
        assert before < first < second
