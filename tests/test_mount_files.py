"""A real mount (64 KiB chunks) driven with ordinary tools and the os module: file contents
across chunk boundaries, sparse files, truncate, overwrite, append, rename variants, links,
permissions and times, directories, xattrs, odd names, unlinked-while-open files, mmap."""

import ctypes
import errno
import hashlib
import mmap
import os
import time
import random
import shutil
import stat
import subprocess

import pytest

from mounting import deployment, mnt, sh, sha256_file, work  # noqa: F401 - fixtures

CHUNK_SIZE = "64K"
CHUNK = 64 * 1024
pytestmark = pytest.mark.timeout(120)


def data(size: int, seed: int = 0) -> bytes:
    return random.Random(f"{seed}-{size}").randbytes(size)


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def chunk_paths(deployment, content: bytes) -> list:
    """Where the primary store keeps each chunk of `content` (any namespace)."""
    root = deployment.base / "primary"
    found = []
    for start in range(0, len(content), CHUNK):
        digest = sha(content[start:start + CHUNK])
        found.append([p for p in root.glob(f"*/{digest[:2]}/{digest[2:4]}/{digest}")])
    return found


# ---- contents --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 123])
def test_cp_and_cat_are_byte_exact(work, tmp_path, size):
    source = tmp_path / "source"
    source.write_bytes(data(size))
    sh(f"cp {source} {work}/copy")
    assert os.stat(work / "copy").st_size == size
    assert sha256_file(work / "copy") == sha(data(size))
    out = sh(f"cat {work}/copy").stdout
    assert sha(out) == sha(data(size))
    # and back out of the mount with cp
    sh(f"cp {work}/copy {tmp_path}/back")
    assert sha256_file(tmp_path / "back") == sha(data(size))


def test_large_sequential_write_in_odd_pieces(work):
    """Writes that straddle chunk boundaries in every way."""
    content = data(7 * CHUNK + 5, seed=1)
    rng = random.Random(2)
    with open(work / "f", "wb") as f:
        position = 0
        while position < len(content):
            step = rng.choice([1, 7, 4095, 4096, CHUNK - 1, CHUNK, CHUNK + 3, 100_000])
            f.write(content[position:position + step])
            position += step
    assert (work / "f").read_bytes() == content
    with open(work / "f", "rb") as f:  # reads in odd pieces and at odd offsets
        for offset in [0, 1, CHUNK - 2, CHUNK, 3 * CHUNK - 1, len(content) - 3, len(content)]:
            f.seek(offset)
            assert f.read(CHUNK + 5) == content[offset:offset + CHUNK + 5]


def test_dd_with_seek_makes_a_sparse_file(work, deployment, tmp_path):
    piece = data(4096, seed=3)
    (tmp_path / "piece").write_bytes(piece)
    store_files_before = sum(1 for p in (deployment.base / "primary").rglob("*") if p.is_file())
    # 2 blocks at 40 chunks in: the first 40 chunks are a hole
    sh(f"dd if={tmp_path}/piece of={work}/sparse bs=4096 seek={40 * 16} count=1 status=none")
    size = 40 * CHUNK + 4096
    assert int(sh(f"stat -c %s {work}/sparse").stdout) == size
    assert os.stat(work / "sparse").st_size == size
    content = (work / "sparse").read_bytes()
    assert len(content) == size
    assert content[: 40 * CHUNK] == bytes(40 * CHUNK)
    assert content[40 * CHUNK:] == piece
    # a read in the middle of the hole
    with open(work / "sparse", "rb") as f:
        f.seek(17 * CHUNK + 11)
        assert f.read(3 * CHUNK) == bytes(3 * CHUNK)
    # holes cost no storage: one new chunk (and nothing like 40)
    store_files_after = sum(1 for p in (deployment.base / "primary").rglob("*") if p.is_file())
    assert store_files_after - store_files_before <= 1
    # dd seek past the end of an existing file without writing: extends with zeros
    sh(f"dd if=/dev/null of={work}/sparse bs=1 seek={size + 3 * CHUNK} status=none")
    assert os.stat(work / "sparse").st_size == size + 3 * CHUNK
    assert (work / "sparse").read_bytes() == content + bytes(3 * CHUNK)


def test_truncate_shrink_then_grow_reads_zeros(work):
    content = data(3 * CHUNK + 123, seed=4)
    (work / "f").write_bytes(content)
    sh(f"truncate -s {CHUNK + 1000} {work}/f")
    assert os.stat(work / "f").st_size == CHUNK + 1000
    assert (work / "f").read_bytes() == content[: CHUNK + 1000]
    sh(f"truncate -s {4 * CHUNK} {work}/f")
    assert os.stat(work / "f").st_size == 4 * CHUNK
    grown = (work / "f").read_bytes()
    assert grown == content[: CHUNK + 1000] + bytes(3 * CHUNK - 1000)
    # shrink inside the first chunk, to 0, and grow a new empty file
    sh(f"truncate -s 10 {work}/f")
    assert (work / "f").read_bytes() == content[:10]
    sh(f"truncate -s 0 {work}/f")
    assert (work / "f").read_bytes() == b""
    sh(f"truncate -s {2 * CHUNK + 1} {work}/new")
    assert (work / "new").read_bytes() == bytes(2 * CHUNK + 1)


def test_ftruncate_while_writing_through_the_same_fd(work):
    fd = os.open(work / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data(2 * CHUNK + 50, seed=5))  # buffered, not yet committed
        os.ftruncate(fd, CHUNK + 7)
        os.lseek(fd, 0, os.SEEK_END)
        os.write(fd, b"tail")
        os.ftruncate(fd, CHUNK + 7 + 4 + 100)
        assert os.fstat(fd).st_size == CHUNK + 111
    finally:
        os.close(fd)
    expected = data(2 * CHUNK + 50, seed=5)[: CHUNK + 7] + b"tail" + bytes(100)
    assert (work / "f").read_bytes() == expected


@pytest.mark.parametrize("offset,length", [
    (CHUNK // 2, 100),             # inside one chunk
    (CHUNK - 50, 100),             # across a chunk boundary
    (CHUNK + 10, 2 * CHUNK),       # spanning whole chunks
    (3 * CHUNK + 100, 23),         # inside the last, partial chunk
    (3 * CHUNK + 100, 1000),       # past the end: extends the file
])
def test_overwrite_in_the_middle_with_dd_notrunc(work, tmp_path, offset, length):
    content = bytearray(data(3 * CHUNK + 123, seed=6))
    (work / "f").write_bytes(content)
    patch = data(length, seed=7)
    (tmp_path / "patch").write_bytes(patch)
    sh(f"dd if={tmp_path}/patch of={work}/f bs=1 seek={offset} conv=notrunc status=none"
       if length <= 1000 else
       f"dd if={tmp_path}/patch of={work}/f oflag=seek_bytes seek={offset} conv=notrunc status=none")
    content[offset:offset + length] = patch
    assert os.stat(work / "f").st_size == len(content)
    assert sha256_file(work / "f") == sha(bytes(content))


def test_append_with_shell_redirection(work, tmp_path):
    pieces = [data(n, seed=8) for n in (10, CHUNK - 5, 3, CHUNK, 1, 2 * CHUNK + 7)]
    for i, piece in enumerate(pieces):
        (tmp_path / f"p{i}").write_bytes(piece)
        sh(f"cat {tmp_path}/p{i} >> {work}/log")
        assert os.stat(work / "log").st_size == sum(map(len, pieces[: i + 1]))
    assert (work / "log").read_bytes() == b"".join(pieces)
    # O_APPEND writes go to the end even after seeking
    with open(work / "log", "ab") as f:
        f.seek(0)
        f.write(b"END")
    assert (work / "log").read_bytes() == b"".join(pieces) + b"END"


def test_read_and_write_same_file_through_two_fds(work):
    with open(work / "f", "wb") as writer, open(work / "f", "rb") as reader:
        writer.write(data(CHUNK + 10, seed=9))
        writer.flush()
        assert reader.read() == data(CHUNK + 10, seed=9)


# ---- rename -------------------------------------------------------------------------------------

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(old, new, flags: int) -> None:
    function = getattr(libc, "renameat2", None)
    if function is not None:
        result = function(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    else:  # glibc < 2.28: the raw system call (x86_64 number)
        result = libc.syscall(ctypes.c_long(316), ctypes.c_long(AT_FDCWD), os.fsencode(old),
                              ctypes.c_long(AT_FDCWD), os.fsencode(new), ctypes.c_long(flags))
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(old))


def test_mv_in_same_directory_and_across_directories(work):
    (work / "a").write_bytes(b"alpha")
    sh(f"mv {work}/a {work}/b")
    assert not (work / "a").exists()
    assert (work / "b").read_bytes() == b"alpha"
    (work / "sub" / "deeper").mkdir(parents=True)
    sh(f"mv {work}/b {work}/sub/deeper/c")
    assert sorted(os.listdir(work)) == ["sub"]
    assert os.listdir(work / "sub" / "deeper") == ["c"]
    assert (work / "sub" / "deeper" / "c").read_bytes() == b"alpha"


def test_rename_replaces_an_existing_file_atomically(work):
    (work / "new").write_bytes(b"new contents")
    (work / "old").write_bytes(data(2 * CHUNK, seed=10))
    ino_new = os.stat(work / "new").st_ino
    with open(work / "old", "rb") as still_open:
        os.rename(work / "new", work / "old")
        assert sorted(os.listdir(work)) == ["old"]
        assert (work / "old").read_bytes() == b"new contents"
        assert os.stat(work / "old").st_ino == ino_new
        # the replaced file lives on for the open descriptor
        assert still_open.read() == data(2 * CHUNK, seed=10)
    assert (work / "old").read_bytes() == b"new contents"


def test_rename_directory_with_contents(work):
    (work / "d" / "e").mkdir(parents=True)
    (work / "d" / "e" / "f").write_bytes(b"x" * (CHUNK + 1))
    sh(f"mv {work}/d {work}/renamed")
    assert os.listdir(work) == ["renamed"]
    assert (work / "renamed" / "e" / "f").read_bytes() == b"x" * (CHUNK + 1)
    # onto an empty directory: replaces it
    (work / "empty").mkdir()
    os.rename(work / "renamed", work / "empty")
    assert os.listdir(work) == ["empty"]
    assert (work / "empty" / "e" / "f").stat().st_size == CHUNK + 1


def test_rename_onto_non_empty_directory_fails(work):
    (work / "a").mkdir()
    (work / "b").mkdir()
    (work / "b" / "x").write_bytes(b"")
    with pytest.raises(OSError) as failure:
        os.rename(work / "a", work / "b")
    assert failure.value.errno == errno.ENOTEMPTY
    assert sorted(os.listdir(work)) == ["a", "b"]
    assert os.listdir(work / "b") == ["x"]


def test_rename_file_onto_directory_and_back_fails(work):
    (work / "file").write_bytes(b"f")
    (work / "dir").mkdir()
    with pytest.raises(IsADirectoryError):
        os.rename(work / "file", work / "dir")
    with pytest.raises(NotADirectoryError):
        os.rename(work / "dir", work / "file")


def test_rename_noreplace(work):
    (work / "a").write_bytes(b"a")
    (work / "b").write_bytes(b"b")
    with pytest.raises(FileExistsError):
        renameat2(work / "a", work / "b", RENAME_NOREPLACE)
    assert (work / "a").read_bytes() == b"a"
    assert (work / "b").read_bytes() == b"b"
    renameat2(work / "a", work / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(work)) == ["b", "c"]
    # mv --no-clobber leaves an existing target alone
    sh(f"mv -n {work}/b {work}/c", check=False)
    assert (work / "c").read_bytes() == b"a"


def test_rename_exchange(work):
    (work / "a").write_bytes(b"aaa")
    (work / "d").mkdir()
    (work / "d" / "b").write_bytes(b"bbbb")
    (work / "e").mkdir()
    (work / "e" / "inside").write_bytes(b"")
    ino_a = os.stat(work / "a").st_ino
    renameat2(work / "a", work / "d" / "b", RENAME_EXCHANGE)
    assert (work / "a").read_bytes() == b"bbbb"
    assert (work / "d" / "b").read_bytes() == b"aaa"
    assert os.stat(work / "d" / "b").st_ino == ino_a
    # a file with a directory (across parents): link counts of the parents follow
    nlink_work = os.stat(work).st_nlink
    nlink_d = os.stat(work / "d").st_nlink
    renameat2(work / "e", work / "d" / "b", RENAME_EXCHANGE)
    assert (work / "e").read_bytes() == b"aaa"
    assert os.listdir(work / "d" / "b") == ["inside"]
    assert os.stat(work).st_nlink == nlink_work - 1
    assert os.stat(work / "d").st_nlink == nlink_d + 1
    with pytest.raises(FileNotFoundError):
        renameat2(work / "a", work / "missing", RENAME_EXCHANGE)


def test_moving_a_directory_into_itself_fails(work):
    (work / "d" / "sub").mkdir(parents=True)
    with pytest.raises(OSError) as failure:
        os.rename(work / "d", work / "d" / "sub" / "x")
    assert failure.value.errno == errno.EINVAL
    with pytest.raises(OSError) as failure:
        os.rename(work / "d", work / "d" / "x")
    assert failure.value.errno == errno.EINVAL
    result = sh(f"mv {work}/d {work}/d/sub/", check=False)
    assert result.returncode != 0
    assert os.listdir(work) == ["d"]
    assert os.listdir(work / "d") == ["sub"]
    assert os.listdir(work / "d" / "sub") == []


# ---- links ---------------------------------------------------------------------------------------


def test_hard_links(work):
    content = data(CHUNK + 3, seed=11)
    (work / "a").write_bytes(content)
    (work / "d").mkdir()
    sh(f"ln {work}/a {work}/d/b")
    for name in ("a", "d/b"):
        assert os.stat(work / name).st_nlink == 2
    assert os.stat(work / "a").st_ino == os.stat(work / "d" / "b").st_ino
    assert int(sh(f"stat -c %h {work}/a").stdout) == 2
    # a change through one name shows through the other
    with open(work / "d" / "b", "r+b") as f:
        f.seek(CHUNK)
        f.write(b"XYZ")
    changed = content[:CHUNK] + b"XYZ"
    assert (work / "a").read_bytes() == changed
    sh(f"ln {work}/a {work}/c")
    assert os.stat(work / "d" / "b").st_nlink == 3
    os.unlink(work / "a")
    assert os.stat(work / "c").st_nlink == 2
    sh(f"rm {work}/c")
    assert os.stat(work / "d" / "b").st_nlink == 1
    assert (work / "d" / "b").read_bytes() == changed
    with pytest.raises(FileExistsError):
        os.link(work / "d" / "b", work / "d" / "b")
    with pytest.raises(PermissionError):  # hard links to directories: EPERM from the kernel
        os.link(work / "d", work / "d2")


def test_symlinks(work):
    (work / "target").write_bytes(b"pointed at")
    sh(f"ln -s target {work}/rel && ln -s {work}/target {work}/abs && ln -s nowhere {work}/dangling")
    assert sh(f"readlink {work}/rel").stdout == b"target\n"
    assert os.readlink(work / "abs") == str(work / "target")
    assert (work / "rel").read_bytes() == b"pointed at"
    assert (work / "abs").read_bytes() == b"pointed at"
    assert stat.S_ISLNK(os.lstat(work / "rel").st_mode)
    assert os.lstat(work / "rel").st_size == len("target")
    assert not (work / "dangling").exists()
    assert os.path.lexists(work / "dangling")
    with pytest.raises(FileNotFoundError):
        (work / "dangling").read_bytes()
    # a long target, and writing through a symlink
    long_target = "x/" * 1000 + "end"
    os.symlink(long_target, work / "long")
    assert os.readlink(work / "long") == long_target
    with open(work / "rel", "ab") as f:
        f.write(b"!")
    assert (work / "target").read_bytes() == b"pointed at!"
    os.unlink(work / "rel")
    assert (work / "target").exists()


# ---- metadata --------------------------------------------------------------------------------------


def test_chmod_and_stat(work):
    (work / "f").write_bytes(b"f")
    for mode in ("640", "0", "755", "4711", "600"):
        sh(f"chmod {mode} {work}/f")
        assert stat.S_IMODE(os.stat(work / "f").st_mode) == int(mode, 8)
        assert sh(f"stat -c %a {work}/f").stdout.strip() == mode.encode()
    (work / "d").mkdir()
    sh(f"chmod 1777 {work}/d")
    assert stat.S_IMODE(os.stat(work / "d").st_mode) == 0o1777
    assert stat.S_ISDIR(os.stat(work / "d").st_mode)
    ctime_before = os.stat(work / "f").st_ctime_ns
    sh(f"sleep 0.01; chmod u+x {work}/f")
    st = os.stat(work / "f")
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_ctime_ns > ctime_before
    assert st.st_uid == os.getuid() and st.st_gid == os.getgid()
    os.chown(work / "f", os.getuid(), os.getgid())  # to the same owner: allowed


def epoch_ns(date: str) -> int:
    return int(sh(f"date -d '{date}' +%s%N").stdout)


def test_touch_sets_times(work):
    (work / "f").write_bytes(b"f")
    sh(f"touch -d '2001-02-03 04:05:06.123456789' {work}/f")
    st = os.stat(work / "f")
    assert st.st_mtime_ns == epoch_ns("2001-02-03 04:05:06.123456789")
    assert st.st_atime_ns == epoch_ns("2001-02-03 04:05:06.123456789")
    assert sh(f"stat -c %y {work}/f").stdout.startswith(b"2001-02-03 04:05:06.123456789")
    sh(f"touch -m -d '2010-10-10 10:10:10' {work}/f")
    st = os.stat(work / "f")
    assert st.st_mtime_ns == epoch_ns("2010-10-10 10:10:10")
    assert st.st_atime_ns == epoch_ns("2001-02-03 04:05:06.123456789")  # left alone
    sh(f"touch -a -d '1999-12-31 23:59:59.5' {work}/f")
    st = os.stat(work / "f")
    assert st.st_atime_ns == epoch_ns("1999-12-31 23:59:59.5")
    assert st.st_mtime_ns == epoch_ns("2010-10-10 10:10:10")
    # touch with no date: now (UTIME_NOW)
    sh(f"touch {work}/f")
    assert abs(os.stat(work / "f").st_mtime_ns - epoch_ns("now")) < 5 * 10**9
    # touch creates a missing file; a directory's times too
    sh(f"touch {work}/new")
    assert (work / "new").read_bytes() == b""
    (work / "d").mkdir()
    sh(f"touch -d '2005-05-05 05:05:05' {work}/d")
    assert os.stat(work / "d").st_mtime_ns == epoch_ns("2005-05-05 05:05:05")


def test_mtime_after_buffered_write_then_utime(work):
    """An explicit mtime set while writes are buffered must win over the writes' time."""
    with open(work / "f", "wb") as f:
        f.write(b"x" * 100)
        f.flush()
        os.utime(f.fileno(), ns=(10**18, 10**18))
    assert os.stat(work / "f").st_mtime_ns == 10**18
    assert (work / "f").read_bytes() == b"x" * 100


def test_attributes_set_before_close_are_kept_with_the_data(work, mnt):
    """tar's order: write, futimens, fchown, fchmod, close. The changes ride along with the
    buffered data's commit; after a remount (from the database) every one is there, the
    ctime is the time of the change, and a write after futimens moves mtime on again."""
    before_ns = time.time_ns()
    fd = os.open(work / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"tar member")
    os.utime(fd, ns=(10**18, 2 * 10**9))
    os.fchown(fd, 1234, 5678)
    os.fchmod(fd, 0o640)
    st = os.fstat(fd)
    assert (st.st_mtime_ns, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (2 * 10**9, 1234, 5678, 0o640)
    os.close(fd)
    fd = os.open(work / "g", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"first")
    os.utime(fd, ns=(10**9, 10**9))
    os.write(fd, b" and then more")
    os.close(fd)
    mnt.remount()
    st = os.stat(work / "f")
    assert (work / "f").read_bytes() == b"tar member"
    assert (st.st_atime_ns, st.st_mtime_ns) == (10**18, 2 * 10**9)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o640)
    assert st.st_ctime_ns >= before_ns
    assert (work / "g").read_bytes() == b"first and then more"
    assert os.stat(work / "g").st_mtime_ns >= before_ns


def test_removals_are_seen_at_once_and_survive_a_remount(work, mnt):
    """unlink answers before its batch reaches the database; this mount must behave as if
    the name were gone already, and the removal must land."""
    (work / "d").mkdir()
    for index in range(300):
        (work / "d" / f"f{index}").write_bytes(b"x" * index)
    os.unlink(work / "d" / "f1")
    assert not (work / "d" / "f1").exists()
    assert "f1" not in os.listdir(work / "d")
    (work / "d" / "f2").unlink()
    (work / "d" / "f2").write_bytes(b"again")  # the same name at once: a new file
    assert (work / "d" / "f2").read_bytes() == b"again"
    os.link(work / "d" / "f3", work / "d" / "g3")
    os.unlink(work / "d" / "f3")
    assert (work / "d" / "g3").read_bytes() == b"x" * 3
    sh(f"rm -rf {work}/d")  # unlinks, then rmdir of the directory they emptied
    assert not (work / "d").exists()
    (work / "e").mkdir()
    (work / "e" / "only").write_bytes(b"1")
    os.unlink(work / "e" / "only")
    os.rmdir(work / "e")
    mnt.remount()
    assert not (work / "d").exists() and not (work / "e").exists()


def test_write_updates_mtime_and_size(work):
    (work / "f").write_bytes(b"")
    os.utime(work / "f", ns=(10**9, 10**9))
    with open(work / "f", "ab") as f:
        f.write(b"more")
    st = os.stat(work / "f")
    assert st.st_size == 4
    assert st.st_mtime_ns > 10**18 // 1000  # moved to about now


def test_directories(work):
    deep = work.joinpath(*[f"level{i}" for i in range(40)])
    sh(f"mkdir -p {deep}")
    assert deep.is_dir()
    (deep / "leaf").write_bytes(b"leaf")
    assert sh(f"find {work} -name leaf").stdout.strip() == str(deep / "leaf").encode()
    with pytest.raises(OSError) as failure:
        os.rmdir(work / "level0")
    assert failure.value.errno == errno.ENOTEMPTY
    result = sh(f"rmdir {work}/level0", check=False)
    assert result.returncode != 0 and b"not empty" in result.stderr.lower()
    with pytest.raises(FileExistsError):
        os.mkdir(work / "level0")
    with pytest.raises(NotADirectoryError):
        os.rmdir(deep / "leaf")
    with pytest.raises(IsADirectoryError):
        os.unlink(deep)
    with pytest.raises(NotADirectoryError):
        os.mkdir(deep / "leaf" / "below")
    with pytest.raises(IsADirectoryError):
        open(deep, "wb")
    # link counts: 2 + subdirectories
    (work / "n").mkdir()
    for name in ("a", "b", "c"):
        (work / "n" / name).mkdir()
    (work / "n" / "file").write_bytes(b"")
    assert os.stat(work / "n").st_nlink == 5
    os.rmdir(work / "n" / "a")
    assert os.stat(work / "n").st_nlink == 4
    sh(f"rm -r {work}/level0")
    assert sorted(os.listdir(work)) == ["n"]


def test_many_entries_in_one_directory(work):
    names = {f"file-{i:04d}" for i in range(600)}  # more than one readdir batch
    for name in names:
        (work / name).write_bytes(name.encode())
    assert set(os.listdir(work)) == names
    assert sh(f"ls {work} | wc -l").stdout.strip() == b"600"
    assert (work / "file-0599").read_bytes() == b"file-0599"
    sh(f"rm {work}/file-*")
    assert os.listdir(work) == []


def test_fifo(work):
    os.mkfifo(work / "fifo")
    assert stat.S_ISFIFO(os.stat(work / "fifo").st_mode)
    os.unlink(work / "fifo")


# ---- extended attributes ------------------------------------------------------------------------


def test_xattrs_with_setfattr_and_getfattr(work):
    (work / "f").write_bytes(b"f")
    sh(f"setfattr -n user.colour -v blue {work}/f")
    sh(f"setfattr -n user.binary -v 0x00ff10 {work}/f")
    sh(f"setfattr -n user.empty {work}/f")
    assert sh(f"getfattr --only-values -n user.colour {work}/f").stdout == b"blue"
    assert os.getxattr(work / "f", "user.binary") == b"\x00\xff\x10"
    assert os.getxattr(work / "f", "user.empty") == b""
    dumped = sh(f"getfattr -d -m - {work}/f").stdout.decode()
    assert 'user.colour="blue"' in dumped
    assert sorted(os.listxattr(work / "f")) == ["user.binary", "user.colour", "user.empty"]
    sh(f"setfattr -n user.colour -v red {work}/f")  # replace
    assert os.getxattr(work / "f", "user.colour") == b"red"
    sh(f"setfattr -x user.colour {work}/f")
    assert sorted(os.listxattr(work / "f")) == ["user.binary", "user.empty"]
    with pytest.raises(OSError) as failure:
        os.getxattr(work / "f", "user.colour")
    assert failure.value.errno == errno.ENODATA
    with pytest.raises(OSError) as failure:
        os.removexattr(work / "f", "user.colour")
    assert failure.value.errno == errno.ENODATA
    assert sh(f"getfattr -n user.colour {work}/f", check=False).returncode != 0
    # flags
    with pytest.raises(FileExistsError):
        os.setxattr(work / "f", "user.binary", b"v", os.XATTR_CREATE)
    with pytest.raises(OSError) as failure:
        os.setxattr(work / "f", "user.none", b"v", os.XATTR_REPLACE)
    assert failure.value.errno == errno.ENODATA
    os.setxattr(work / "f", "user.new", b"v", os.XATTR_CREATE)
    # large values, and directories and hard links carry xattrs too
    big = data(60_000, seed=12)
    os.setxattr(work / "f", "user.big", big)
    assert os.getxattr(work / "f", "user.big") == big
    os.link(work / "f", work / "g")
    assert os.getxattr(work / "g", "user.new") == b"v"
    (work / "d").mkdir()
    os.setxattr(work / "d", "user.dir", b"yes")
    assert os.listxattr(work / "d") == ["user.dir"]


def test_acl_xattr_names_are_not_supported(work):
    (work / "f").write_bytes(b"f")
    # a minimal valid ACL (version 2, user::rw-, group::r--, other::r--)
    acl = bytes.fromhex("02000000" "0100" "0600" "ffffffff" "0400" "0400" "ffffffff"
                        "2000" "0400" "ffffffff")
    (work / "d").mkdir()
    # (a default ACL on a non-directory is refused by the kernel itself with EACCES)
    for path, name in ((work / "f", "system.posix_acl_access"), (work / "d", "system.posix_acl_access"),
                       (work / "d", "system.posix_acl_default")):
        with pytest.raises(OSError) as failure:
            os.setxattr(path, name, acl)
        assert failure.value.errno == errno.EOPNOTSUPP, (path, name)
    if shutil.which("setfacl"):
        result = sh(f"setfacl -m u:nobody:r {work}/f", check=False)
        assert result.returncode != 0 and b"not supported" in result.stderr
    with pytest.raises(OSError) as failure:
        os.getxattr(work / "f", "system.posix_acl_access")
    assert failure.value.errno in (errno.EOPNOTSUPP, errno.ENODATA)
    assert os.listxattr(work / "f") == []


# ---- names ----------------------------------------------------------------------------------


def test_name_length_limit(work):
    longest = "n" * 255
    (work / longest).write_bytes(b"ok")
    assert os.listdir(work) == [longest]
    assert (work / longest).read_bytes() == b"ok"
    (work / ("d" * 255)).mkdir()
    os.rename(work / longest, work / ("d" * 255) / ("m" * 255))
    for operation in (
        lambda: open(work / ("n" * 256), "wb"),
        lambda: os.mkdir(work / ("n" * 256)),
        lambda: os.stat(work / ("n" * 256)),
        lambda: os.symlink("x", work / ("n" * 256)),
        lambda: os.rename(work / ("d" * 255), work / ("n" * 256)),
    ):
        with pytest.raises(OSError) as failure:
            operation()
        assert failure.value.errno == errno.ENAMETOOLONG
    # 255 bytes of multi-byte UTF-8 (85 three-byte characters) fit; 86 don't
    (work / ("€" * 85)).write_bytes(b"")
    with pytest.raises(OSError) as failure:
        (work / ("€" * 86)).write_bytes(b"")
    assert failure.value.errno == errno.ENAMETOOLONG


def test_odd_names_round_trip_as_bytes(work):
    base = os.fsencode(str(work))
    names = [b"new\nline", b"\xff\xfe invalid utf-8 \x80", b" leading space", b"tab\there",
             b"-dash", b"quote\"'`$(x)", b"\xe2\x82\xac\xf0\x9f\x98\x80", b"..dots..", b"\x01\x1f"]
    for i, name in enumerate(names):
        path = os.path.join(base, name)
        with open(path, "wb") as f:
            f.write(name * 3)
        os.mkdir(path + b".d")
        os.setxattr(path, b"user.\xffname", name)
    listed = os.listdir(base)
    assert sorted(listed) == sorted(names + [n + b".d" for n in names])
    for name in names:
        path = os.path.join(base, name)
        with open(path, "rb") as f:
            assert f.read() == name * 3
        assert os.getxattr(path, b"user.\xffname") == name
        os.rename(path, path + b"\xc0renamed")
    assert sorted(n for n in os.listdir(base) if not n.endswith(b".d")) == sorted(
        n + b"\xc0renamed" for n in names)
    # what find prints (escaped) matches: one entry per name
    assert int(sh(f"find {work} -mindepth 1 -maxdepth 1 -printf x | wc -c").stdout) == 2 * len(names)


# ---- unlinked while open -----------------------------------------------------------------------


def test_unlinked_file_stays_usable_through_its_fd(work, deployment):
    content = data(2 * CHUNK + 17, seed=13)
    fd = os.open(work / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, content)
        os.fsync(fd)
        assert all(chunk_paths(deployment, content)), "chunks were stored"
        os.unlink(work / "f")
        assert not (work / "f").exists()
        assert os.listdir(work) == []
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, len(content) + 10, 0) == content
        os.pwrite(fd, b"more", len(content))
        os.pwrite(fd, b"patch", CHUNK - 2)
        os.fsync(fd)
        expected = bytearray(content + b"more")
        expected[CHUNK - 2:CHUNK + 3] = b"patch"
        assert os.fstat(fd).st_size == len(expected)
        assert os.pread(fd, 10 * CHUNK, 0) == bytes(expected)
        os.ftruncate(fd, 5)
        assert os.pread(fd, 100, 0) == content[:5]
        # a new file of the same name is a different file
        (work / "f").write_bytes(b"other")
        assert os.pread(fd, 100, 0) == content[:5]
    finally:
        os.close(fd)
    assert (work / "f").read_bytes() == b"other"
    # the unlinked file's chunks are freed after the last close (in the background, soon)
    deadline = time.monotonic() + 5
    while any(chunk_paths(deployment, bytes(expected))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(chunk_paths(deployment, bytes(expected))), "unlinked chunks were not reclaimed"


def test_unlink_while_open_for_reading_by_another_process(work):
    content = data(3 * CHUNK, seed=14)
    (work / "f").write_bytes(content)
    reader = subprocess.Popen(["bash", "-c", f"exec 3<{work}/f; read -r _; cat <&3 | sha256sum"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        import time

        time.sleep(0.3)  # let it open the file
        os.unlink(work / "f")
        out, _ = reader.communicate(b"go\n", timeout=30)
    finally:
        if reader.poll() is None:
            reader.kill()
    assert out.split()[0].decode() == sha(content)


# ---- mmap ---------------------------------------------------------------------------------------


def test_mmap_write_and_msync(work):
    size = 3 * CHUNK + 123
    content = bytearray(data(size, seed=15))
    (work / "f").write_bytes(content)
    with open(work / "f", "r+b") as f:
        mapped = mmap.mmap(f.fileno(), 0)
        try:
            assert mapped[:100] == content[:100]
            for offset, patch in ((10, b"hello"), (CHUNK - 2, b"across"), (size - 3, b"end")):
                mapped[offset:offset + len(patch)] = patch
                content[offset:offset + len(patch)] = patch
            mapped.flush()  # msync
        finally:
            mapped.close()
    assert sha256_file(work / "f") == sha(bytes(content))
    # a new file grown with ftruncate and filled through a mapping
    with open(work / "g", "w+b") as f:
        f.truncate(2 * CHUNK)
        mapped = mmap.mmap(f.fileno(), 2 * CHUNK)
        mapped[:] = bytes(data(2 * CHUNK, seed=16))
        mapped.flush()
        mapped.close()
    assert (work / "g").read_bytes() == data(2 * CHUNK, seed=16)
