"""Full disk: the primary chunk store lives on an 8 MiB tmpfs that a 20 MB file overfills.

* The writer gets ENOSPC (at write, close or fsync), never EIO or success.
* No chunk that failed to reach the store is referenced: fsck finds at most orphans.
* Files written before are intact, also after a remount.
* Deleting the partial file gives space back: a small new file can be written.

Run twice: with the default write buffer (the error surfaces when the file is closed) and
with a 1 MiB buffer on a 3 MiB store (batches commit while the writer goes on, so part of
the file may be committed when the store fills up, and the error may surface at write).

Also here, as it showed up with the small buffer: a writer that fills the write buffer must
not stall until the idle flush (5 s) for each buffer-full of data.
"""

import errno
import os
import subprocess
import time
import uuid

import pytest

from faults import bounded, content, drop_caches, fsck, mounted, teardown
from mounting import Deployment, is_mount

VARIANTS = {"default-buffer": (None, "8m"), "small-buffer": ("1M", "3m")}  # write buffer, store size
BIG = 20_000_000
EARLIER = {"a": content("a", 1_000_000), "b": content("b", 100), "c": content("c", 200_000)}


@pytest.fixture(params=list(VARIANTS))
def deployment(request, database_url, tmp_path_factory):
    write_buffer, store_size = VARIANTS[request.param]
    extra = {"DFSFS_WRITE_BUFFER": write_buffer} if write_buffer else {}
    dep = Deployment(database_url, tmp_path_factory.mktemp("disk"), chunk_size="64K", extra_env=extra)
    primary = dep.base / "primary"
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={store_size},mode=0700", "tmpfs", str(primary)],
                   check=True, capture_output=True)
    try:
        yield dep
    finally:
        # (the test's mounts are gone by now: `mounted` tears them down first)
        subprocess.run(["umount", str(primary)], capture_output=True, check=False)
        if is_mount(primary):
            subprocess.run(["umount", "-l", str(primary)], capture_output=True, check=False)


def write_big(path, size: int) -> tuple[str, int]:
    """Write `size` bytes in 1 MB pieces, fsync, close: (where it failed, errno) or ("", 0)."""
    stage = "open"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        stage = "write"
        written = 0
        while written < size:
            piece = os.urandom(min(1 << 20, size - written))  # unique: no deduplication
            written += os.write(fd, piece)
        stage = "fsync"
        os.fsync(fd)
    except OSError as error:
        try:
            os.close(fd)
        except OSError:
            pass
        return stage, error.errno
    stage = "close"
    try:
        os.close(fd)
    except OSError as error:
        return stage, error.errno
    return "", 0


def write_small(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_full_primary_store_gives_enospc(deployment):
    user = "d" + uuid.uuid4().hex[:8]
    with mounted(deployment, user) as mnt:
        root = mnt.path
        for name, data in EARLIER.items():
            write_small(root / name, data)
        free_before = os.statvfs(root)
        print("statfs before:", free_before.f_bavail * free_before.f_frsize, "bytes free")

        outcome, error, elapsed = bounded(write_big, root / "big", BIG, timeout=60)
        assert error is None, error
        stage, code = outcome
        print(f"20 MB write: failed at {stage or 'nothing'} with errno {code} after {elapsed:.1f} s")
        assert stage, "writing 20 MB to a store of a few MiB succeeded"
        assert code == errno.ENOSPC, (
            f"a full store gave errno {code} ({os.strerror(code)}) at {stage}, not ENOSPC")
        assert mnt.is_live(), "the daemon died when the store filled up"

        size = os.stat(root / "big").st_size
        assert size < BIG, f"the failed file claims {size} bytes"
        partial = read(root / "big")  # every byte of a partial file must be readable
        assert len(partial) == size
        for name, data in EARLIER.items():
            assert read(root / name) == data, f"{name} changed when the store filled up"

        # fsck while mounted (no repair): nothing but orphans of the chunks never committed
        status, found, output = fsck(deployment, "--user", user)
        assert set(found) <= {"orphan_chunks"}, f"fsck after ENOSPC:\n{output}"
        print(f"after ENOSPC: {size} bytes of the file committed; fsck: {found}")

        teardown(mnt)
        drop_caches()
        mnt.mount()
        for name, data in EARLIER.items():
            assert read(root / name) == data, f"{name} after a remount"
        assert os.stat(root / "big").st_size == size
        assert read(root / "big") == partial

        # deleting the partial file gives the space back (chunks are freed in the background)
        os.unlink(root / "big")
        small = content("small", 300_000)
        deadline = time.monotonic() + 10
        while True:
            result, error, _ = bounded(write_small, root / "small", small, timeout=60)
            if not (isinstance(error, OSError) and error.errno == errno.ENOSPC) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if isinstance(error, OSError):
            used = subprocess.run(["du", "-sh", str(deployment.base / "primary")], capture_output=True,
                                  text=True).stdout.strip()
            status, found, output = fsck(deployment, "--user", user)
            raise AssertionError(
                f"after deleting the partial file, writing 300 KB fails with errno {error.errno} "
                f"({os.strerror(error.errno)}); primary store use: {used}; fsck: {found}") from error
        assert error is None, error
        drop_caches()
        assert read(root / "small") == small
        for name, data in EARLIER.items():
            assert read(root / name) == data

    status, found, output = fsck(deployment, "--repair", "--user", user)
    assert set(found) <= {"orphan_chunks"}, output
    status, found, output = fsck(deployment, "--user", user)
    assert status == 0 and not found, output


def test_writer_filling_a_small_write_buffer_is_not_stalled(database_url, tmp_path_factory):
    """With DFSFS_WRITE_BUFFER=1M, 4 MB written in 1 MB pieces (plenty of room in the store)
    take a fraction of a second, not 5 s (the idle flush interval) per buffer-full."""
    dep = Deployment(database_url, tmp_path_factory.mktemp("budget"), chunk_size="64K",
                     extra_env={"DFSFS_WRITE_BUFFER": "1M"})
    with mounted(dep, "budget") as mnt:
        outcome, error, elapsed = bounded(write_big, mnt.path / "f", 4 << 20, timeout=30)
        assert error is None and outcome == ("", 0), (outcome, error)
        assert elapsed < 4, (
            f"writing 4 MiB through a 1 MiB write buffer took {elapsed:.1f} s: the writer waits "
            "for the idle flush instead of a commit under back-pressure")
        drop_caches()
        assert os.stat(mnt.path / "f").st_size == 4 << 20
