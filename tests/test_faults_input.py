"""Hostile and odd input: strange names, a 1 TiB sparse offset, empty files, many concurrent
writers, a deep tree, a password guesser (in sequence and in parallel), and secrets that
must never leak.

File-system tests run in a fresh directory of one module-wide mount (`work`, with a
watchdog that turns a hang into a failure); the others make their own mounts.
"""

import errno
import hashlib
import os
import random
import shutil
import stat
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from faults import (adopt, bounded, chunk_files, content, drop_caches, errno_for, fsck, query,
                    read_bytes, teardown, user_id, write_bytes)
from mounting import DFSFS, PASSWORD, deployment, is_mount, mnt, work  # noqa: F401

CHUNK_SIZE = "64K"
CHUNK = 64 * 1024
WATCHDOG_S = 90
TIB = 1 << 40





# ---- names ---------------------------------------------------------------------------------------

ODD_NAMES = [
    b"new\nline", b"\nstarts", b"ends\n", b"tab\there", b"caf\xe9", b"\xff\xfe\xfd", b"\xc3\x28",
    b"\xed\xa0\x80", b" ", b"...", b"-n", b"*?[]", b"back\\slash", b"\x01\x1b[31mred", b"\xe2\x80\xae",
    "ünïcødé-名前".encode(), b"x" * 255, "é".encode() * 127 + b"x",
]


def test_odd_names_round_trip(mnt, work):
    root = os.fsencode(str(work))
    for index, name in enumerate(ODD_NAMES):
        write_bytes(os.path.join(root, name), name + b"!" + str(index).encode())
        os.mkdir(os.path.join(root, b"d" + name[:254]))
    listed = set(os.listdir(root))
    expected = set(ODD_NAMES) | {b"d" + n[:254] for n in ODD_NAMES}
    assert listed == expected, f"missing {expected - listed}, unexpected {listed - expected}"
    for index, name in enumerate(ODD_NAMES):
        assert read_bytes(os.path.join(root, name)) == name + b"!" + str(index).encode()
        os.rename(os.path.join(root, name), os.path.join(root, b"d" + name[:254], name))
    for name in ODD_NAMES:
        inner = os.path.join(root, b"d" + name[:254], name)
        assert os.stat(inner).st_size == len(name) + 1 + len(str(ODD_NAMES.index(name)))
    # `dfsfs stats` walks the tree and prints every name (escaped where not UTF-8)
    result = mnt.deployment.run("stats", "--user", mnt.user, "--json", "--top", "100")
    assert "caf\\\\xe9" in result.stdout, result.stdout[-2000:]
    drop_caches()
    assert set(os.listdir(root)) == {b"d" + n[:254] for n in ODD_NAMES}
    for name in ODD_NAMES:
        inner = os.path.join(root, b"d" + name[:254], name)
        assert os.listdir(os.path.dirname(inner)) == [name]
        assert read_bytes(inner).startswith(name + b"!")
    shutil.rmtree(root)
    assert not os.path.exists(root)


def test_name_length_limits(mnt, work):
    root = os.fsencode(str(work))
    longest = b"n" * 255
    too_long = b"n" * 256
    multibyte_too_long = "é".encode() * 128  # 128 characters, 256 bytes
    write_bytes(os.path.join(root, longest), b"255")
    assert read_bytes(os.path.join(root, longest)) == b"255"
    write_bytes(os.path.join(root, b"short"), b"s")
    for name in (too_long, multibyte_too_long, b"m" * 1000):
        path = os.path.join(root, name)
        assert errno_for(write_bytes, path, b"x") == errno.ENAMETOOLONG, f"create {len(name)} bytes"
        assert errno_for(os.mkdir, path) == errno.ENAMETOOLONG, "mkdir"
        assert errno_for(os.symlink, b"target", path) == errno.ENAMETOOLONG, "symlink"
        assert errno_for(os.link, os.path.join(root, b"short"), path) == errno.ENAMETOOLONG, "link"
        assert errno_for(os.rename, os.path.join(root, b"short"), path) == errno.ENAMETOOLONG, "rename"
        assert errno_for(os.stat, path) == errno.ENAMETOOLONG, "stat"
    # a symlink target may be long, up to PATH_MAX
    os.symlink(b"t" * 4000, os.path.join(root, b"longlink"))
    assert os.readlink(os.path.join(root, b"longlink")) == b"t" * 4000
    assert set(os.listdir(root)) == {longest, b"short", b"longlink"}


def test_dot_and_dotdot_tricks(mnt, work):
    def at(*parts: str) -> str:
        return os.path.join(str(work), *parts)  # (pathlib would drop the "." components)

    os.mkdir(at("a"))
    os.mkdir(at("a", "..", "b"))  # resolves to work/b
    assert sorted(os.listdir(work)) == ["a", "b"]
    assert os.listdir(at("a")) == []
    write_bytes(at("a", "..", "b", ".", "f"), b"via dots")
    assert read_bytes(at("b", "f")) == b"via dots"
    refused = (errno.EBUSY, errno.EISDIR, errno.EEXIST, errno.EINVAL, errno.ENOTEMPTY)
    for target in (at("a", "."), at("a", ".."), at(".")):
        code = errno_for(os.rename, at("b", "f"), target)
        assert code in refused, f"rename onto {target}: errno {code}"
    for source in (at("a", "."), at("a", "..")):
        code = errno_for(os.rename, source, at("c"))
        assert code in refused, f"rename of {source}: errno {code}"
    assert errno_for(os.rename, at("a"), at("a", "inside")) == errno.EINVAL
    assert errno_for(os.rmdir, at("a", ".")) == errno.EINVAL
    assert errno_for(os.rmdir, at("a", "..")) == errno.ENOTEMPTY
    assert errno_for(os.unlink, at("a", "..")) in (errno.EISDIR, errno.EPERM)
    assert errno_for(os.mkdir, at("a", "..")) == errno.EEXIST
    assert errno_for(os.mkdir, at("a", ".")) == errno.EEXIST
    directory = os.open(at("a"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        def create_in_a(name, flags):
            os.close(os.open(name, os.O_WRONLY | flags, 0o644, dir_fd=directory))

        assert errno_for(create_in_a, "..", os.O_CREAT) == errno.EISDIR
        assert errno_for(create_in_a, "..", os.O_CREAT | os.O_EXCL) == errno.EEXIST
        assert errno_for(create_in_a, ".", os.O_CREAT | os.O_EXCL) == errno.EEXIST
        assert errno_for(lambda: os.symlink("x", "..", dir_fd=directory)) == errno.EEXIST
        assert errno_for(lambda: os.link(at("b", "f"), "..", dst_dir_fd=directory)) == errno.EEXIST
        assert errno_for(lambda: os.mknod("..", 0o644 | stat.S_IFIFO, dir_fd=directory)) == errno.EEXIST
    finally:
        os.close(directory)
    # names that only look like dots are ordinary names
    for name in ("...", ". ", " ..", ".hidden", "..\n"):
        write_bytes(at("a", name), name.encode())
    assert sorted(os.listdir(at("a"))) == sorted(["...", ". ", " ..", ".hidden", "..\n"])
    assert read_bytes(at("a", " ..")) == b" .." and read_bytes(at("a", "..\n")) == b"..\n"
    # the tree is intact: link counts, parents
    assert sorted(os.listdir(work)) == ["a", "b"]
    assert os.stat(work).st_nlink == 4  # its entry, its ".", and the ".." of a and b
    assert os.stat(at("a")).st_nlink == 2
    assert os.stat(at("a", "..")).st_ino == os.stat(work).st_ino
    os.rename(at("b"), at("a", "b"))
    assert os.stat(at("a")).st_nlink == 3 and os.stat(work).st_nlink == 3
    assert os.stat(at("a", "b", "..")).st_ino == os.stat(at("a")).st_ino
    assert read_bytes(at("a", "b", "f")) == b"via dots"


# ---- sizes ---------------------------------------------------------------------------------------


def test_write_at_one_tebibyte_is_sparse(deployment, mnt, work):
    path = work / "sparse"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert os.pwrite(fd, b"Z", TIB) == 1
        assert os.fstat(fd).st_size == TIB + 1
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.stat(path).st_size == TIB + 1
    drop_caches()
    assert os.stat(path).st_size == TIB + 1
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 1, TIB) == b"Z"
        assert os.pread(fd, 10, TIB) == b"Z"
        assert os.pread(fd, 200_000, TIB - 200_000) == bytes(200_000)
        assert os.pread(fd, 4096, TIB // 2 + 12345) == bytes(4096)
        assert os.pread(fd, 100, 0) == bytes(100)
        assert os.pread(fd, 10, TIB + 1) == b""
        before_and_after = os.pread(fd, 3, TIB - 2)
        assert before_and_after == b"\0\0Z", before_and_after
    finally:
        os.close(fd)
    uid = user_id(deployment.env["DFSFS_DATABASE_URL"], mnt.user)
    ino = os.stat(path).st_ino - 1  # kernel inode numbers are metadata ids + 1
    rows = query(deployment.env["DFSFS_DATABASE_URL"],
                 "SELECT fc.index, c.size FROM file_chunks fc JOIN chunks c ON c.id = fc.chunk_id"
                 " WHERE fc.ino = :ino", ino=ino)
    assert rows == [(TIB // CHUNK, 1)], f"the sparse file's chunks: {rows}"
    digest = hashlib.sha256(b"Z").hexdigest()
    assert any(p.name == digest for p in chunk_files(deployment.base / "primary", uid))
    # overwrite in the middle and truncate: still sparse, still right
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"mid", TIB // 2)
        os.ftruncate(fd, TIB // 2 + 2)
    finally:
        os.close(fd)
    assert os.stat(path).st_size == TIB // 2 + 2
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 10, TIB // 2 - 3) == b"\0\0\0mi"
    finally:
        os.close(fd)
    os.unlink(path)


def test_rows_no_mount_could_write_give_eio_and_the_mount_goes_on(database_url, admin_engine,
                                                                   mnt, work):
    """Rows from before the server refused them (the checks of migrations 9 and 10 are NOT
    VALID): an unknown file type and a name with '/' are refused as EIO, never served, and
    the rest of the mount goes on."""
    (work / "odd").write_bytes(b"odd")
    (work / "slashed").write_bytes(b"slashed")
    where = f"user_id = {user_id(database_url, mnt.user)}"

    def run(*statements):
        with admin_engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))

    # (this module's database only)
    run("ALTER TABLE inodes DROP CONSTRAINT inodes_mode_known",
        "ALTER TABLE dentries DROP CONSTRAINT dentries_name_valid",
        f"UPDATE inodes SET mode = 28676 WHERE id = (SELECT ino FROM dentries WHERE name = 'odd'"
        f" AND {where})",  # 0o070004: no file type
        f"UPDATE dentries SET name = 'a/b' WHERE name = 'slashed' AND {where}")
    try:
        mnt.remount()  # nothing cached of them
        assert errno_for(os.stat, work / "odd") == errno.EIO
        assert errno_for(os.listdir, work) == errno.EIO  # the listing holds a name with '/'
        (work / "after").write_bytes(b"still here")
        assert (work / "after").read_bytes() == b"still here"
    finally:
        run(f"UPDATE inodes SET mode = 33188 WHERE mode = 28676 AND {where}",
            f"UPDATE dentries SET name = 'slashed' WHERE name = 'a/b' AND {where}")
        mnt.remount()
    assert sorted(os.listdir(work)) == ["after", "odd", "slashed"]


def test_zero_length_files_survive_remount(mnt, work):
    names = []
    for index in range(5):
        write_bytes(work / f"empty{index}", b"")
        names.append(f"empty{index}")
    Path(work / "touched").touch()
    os.close(os.open(work / "opened", os.O_WRONLY | os.O_CREAT, 0o600))
    write_bytes(work / "truncated", b"something")
    os.truncate(work / "truncated", 0)
    write_bytes(work / "otrunc", b"something else")
    os.close(os.open(work / "otrunc", os.O_WRONLY | os.O_TRUNC))
    names += ["touched", "opened", "truncated", "otrunc"]
    os.mkdir(work / "emptydir")
    mnt.remount()
    drop_caches()
    assert sorted(os.listdir(work)) == sorted(names + ["emptydir"])
    for name in names:
        st = os.stat(work / name)
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0, (name, st)
        assert read_bytes(work / name) == b"", name
    assert stat.S_IMODE(os.stat(work / "opened").st_mode) == 0o600
    assert os.listdir(work / "emptydir") == []


# ---- concurrency ---------------------------------------------------------------------------------


def test_thousand_concurrent_writers_on_different_files(mnt, work):
    count = 1000

    def data_of(index: int) -> bytes:
        return content(f"many/{index}", random.Random(index).choice([0, 1, 100, 5000, 70_000]))

    def write_one(index: int) -> None:
        write_bytes(work / f"f{index:04d}", data_of(index))

    started = time.monotonic()
    with ThreadPoolExecutor(64) as pool:
        errors = [e for e in pool.map(lambda i: bounded(write_one, i, timeout=60)[1], range(count)) if e]
    elapsed = time.monotonic() - started
    print(f"{count} files by 64 threads in {elapsed:.1f} s")
    assert not errors, f"{len(errors)} writers failed, first: {errors[0]!r}"
    assert len(os.listdir(work)) == count
    drop_caches()
    for index in range(count):
        assert read_bytes(work / f"f{index:04d}") == data_of(index), index


def test_eight_threads_write_disjoint_ranges_of_one_file(mnt, work):
    """Once through one shared file descriptor, once with a descriptor per thread."""
    threads = 8
    span = 3 * CHUNK + 12_345  # not chunk-aligned: neighbours share chunks at the boundaries
    expected = {}
    for shared_fd in (True, False):
        path = work / ("shared-fd" if shared_fd else "fd-per-thread")
        wanted = expected[path] = bytearray(threads * span)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        failures = []

        def writer(number: int) -> None:
            rng = random.Random(number)
            own = fd if shared_fd else os.open(path, os.O_RDWR)
            try:
                start = number * span
                pieces = []
                position = 0
                while position < span:
                    size = min(rng.choice([1, 511, 4096, 10_000, 65_536, 70_001]), span - position)
                    pieces.append((start + position, content(f"{number}/{position}", size)))
                    position += size
                rng.shuffle(pieces)
                for offset, data in pieces:
                    assert os.pwrite(own, data, offset) == len(data)
                    wanted[offset:offset + len(data)] = data
                if not shared_fd:
                    os.fsync(own)
            except BaseException as error:  # noqa: BLE001 - reported below
                failures.append(error)
            finally:
                if not shared_fd:
                    os.close(own)

        workers = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert not any(w.is_alive() for w in workers), "a writer hung"
        assert not failures, failures
        os.fsync(fd)
        assert os.pread(fd, len(wanted) + 10, 0) == bytes(wanted), f"{path.name}: through the open fd"
        os.close(fd)
        drop_caches()
        assert read_bytes(path) == bytes(wanted), path.name
    mnt.remount()
    drop_caches()
    for path, wanted in expected.items():
        actual = read_bytes(path)
        assert len(actual) == len(wanted), path.name
        if actual != bytes(wanted):
            bad = next(i for i in range(len(actual)) if actual[i] != wanted[i])
            raise AssertionError(f"{path.name}: content differs from offset {bad} (thread {bad // span}, "
                                 f"chunk {bad // CHUNK}); zeros there: {not any(actual[bad:bad + 64])}")


# ---- a deep tree ---------------------------------------------------------------------------------


def test_directory_tree_of_depth_200(deployment, mnt, work):
    depth = 200
    path = work
    for level in range(depth):
        path = path / f"level{level:03d}"
        os.mkdir(path)
        if level % 50 == 49:
            write_bytes(path / "file", f"at {level}".encode())
    assert len(str(path)) > 1800
    drop_caches()
    seen_dirs = seen_files = 0
    deepest = 0
    for dirpath, dirnames, filenames in os.walk(work):
        seen_dirs += len(dirnames)
        seen_files += len(filenames)
        deepest = max(deepest, Path(dirpath).relative_to(work).parts.__len__())
        for name in filenames:
            level = int(Path(dirpath).name[5:])
            assert read_bytes(Path(dirpath) / name) == f"at {level}".encode()
    assert (seen_dirs, seen_files, deepest) == (depth, depth // 50, depth)
    # a rename near the top moves the whole chain; the bottom is still reachable
    os.rename(work / "level000", work / "top")
    bottom = work / "top" / Path(*[f"level{level:03d}" for level in range(1, depth)])
    assert read_bytes(bottom / "file") == f"at {depth - 1}".encode()
    assert errno_for(os.rename, work / "top", bottom / "into-itself") == errno.EINVAL
    shutil.rmtree(work / "top")
    assert os.listdir(work) == []
    status, found, output = fsck(deployment, "--user", mnt.user)
    assert set(found) <= {"orphan_chunks", "unreferenced_chunks"}, output  # reclaim is in the background


# ---- passwords -----------------------------------------------------------------------------------


def test_wrong_password_twenty_times_is_throttled(deployment, tmp_path):
    """20 `dfsfs mount` attempts with a wrong password, one every 0.2 s (run in-process with
    click's runner: the interpreter start-up of a subprocess would dominate): the first
    ones are checked and refused, the later ones are throttled at once; then the right
    password (a real `dfsfs mount` process) is refused too while the account is locked."""
    import logging

    from click.testing import CliRunner

    from dfsfs.cli import main

    user = "guessed"
    deployment.add_user(user)
    mount_path = tmp_path / "mnt"
    mount_path.mkdir()
    wrong = {**deployment.env, "DFSFS_PASSWORD": "not-the-password"}
    logger = logging.getLogger("dfsfs")
    saved = (logger.level, list(logger.handlers))
    attempts = []
    try:
        for _ in range(20):
            started = time.monotonic()
            result = CliRunner().invoke(main, ["mount", str(mount_path), "--user", user], env=wrong)
            attempts.append((result.exit_code, result.output.strip(), time.monotonic() - started))
            assert not is_mount(mount_path), "mounted with a wrong password"
            time.sleep(0.2)
    finally:
        logger.setLevel(saved[0])
        logger.handlers[:] = saved[1]
    assert all(code == 1 for code, _, _ in attempts), attempts
    throttled = [message for _, message, _ in attempts if "too many failed attempts" in message]
    assert [m for _, m, _ in attempts[:3]] == ["dfsfs: error: wrong user name or password"] * 3, attempts[:3]
    assert "dfsfs: error: too many failed attempts, try again in" in attempts[-1][1], attempts[-1]
    assert len(throttled) >= 12, attempts
    slow = [(message, round(seconds, 2)) for _, message, seconds in attempts if seconds > 1]
    assert not slow, f"slow refusals: {slow}"
    # during the throttle window the right password is refused as well, and quickly
    started = time.monotonic()
    result = deployment.run("mount", mount_path, "--user", user, check=False, timeout=60)
    elapsed = time.monotonic() - started
    try:
        assert result.returncode == 1 and "too many failed attempts" in result.stderr, result.stderr
        assert not is_mount(mount_path)
        assert elapsed < 5, f"the refusal took {elapsed:.1f} s"
        # the failures are counted in the database, not per process: stats is throttled too
        result = deployment.run("stats", "--user", user, check=False)
        assert result.returncode == 1 and "too many failed attempts" in result.stderr, result.stderr
        # an administrator's new password ends the throttling
        deployment.run("user", "passwd", user)
        result = deployment.run("mount", mount_path, "--user", user, check=False)
        assert result.returncode == 0, result.stderr
    finally:
        if is_mount(mount_path):
            subprocess.run([DFSFS, "umount", str(mount_path)], env=deployment.env, capture_output=True,
                           timeout=60, check=False)
        if is_mount(mount_path):
            subprocess.run(["fusermount3", "-uz", str(mount_path)], capture_output=True, check=False)


def test_parallel_wrong_passwords_are_throttled_too(deployment):
    """A guesser that tries passwords in parallel must not get more verified guesses than one
    trying them in sequence: after FREE_FAILURES failures the account is locked, also for
    the attempts that were already under way."""
    from dfsfs.auth import FREE_FAILURES, ThrottledError, login
    from dfsfs.errors import AuthError
    from dfsfs.meta.accounts import AccountStore
    from dfsfs.meta.db import create_engine

    user = "parallel"
    deployment.add_user(user)
    engine = create_engine(deployment.env["DFSFS_DATABASE_URL"], pool_size=20)
    accounts = AccountStore(engine)
    guesses = 20
    start = threading.Barrier(guesses)
    outcomes = []

    def guess(number: int) -> None:
        start.wait()
        try:
            login(accounts, user, f"guess-{number}")
            outcomes.append("logged in")
        except ThrottledError:
            outcomes.append("throttled")
        except AuthError:
            outcomes.append("verified")

    try:
        threads = [threading.Thread(target=guess, args=(n,), daemon=True) for n in range(guesses)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        verified = outcomes.count("verified")
        assert len(outcomes) == guesses and "logged in" not in outcomes, outcomes
        assert verified <= FREE_FAILURES + 1, (
            f"{verified} of {guesses} parallel guesses had their password checked; throttling "
            f"allows {FREE_FAILURES} before it locks the account")
        with pytest.raises(ThrottledError):
            login(accounts, user, PASSWORD)  # the right one, inside the window
    finally:
        engine.dispose()
        deployment.run("user", "passwd", user)  # ends the throttling


# ---- secrets -------------------------------------------------------------------------------------

ACCOUNT_SECRET = "Acc0unt-S3cret-pw"
DATABASE_SECRET = "Db-S3cret-pw"


def with_password(url: str, password: str) -> str:
    """The URL with `password` for its role (trust authentication ignores it; it only has to
    be in the URL, as it would be for a real server)."""
    scheme, rest = url.split("://", 1)
    role, at, rest = rest.partition("@")
    assert at and role, url
    return f"{scheme}://{role}:{password}@{rest}"


def test_secrets_never_leak(deployment, tmp_path):
    """The account password (from --password-file) and the database password (in the URL of
    a config file) appear in no output, log, command line or environment."""
    url = with_password(deployment.env["DFSFS_DATABASE_URL"], DATABASE_SECRET)
    config = tmp_path / "config.toml"
    config.write_text(f'database_url = "{url}"\nlog_level = "DEBUG"\n')
    password_file = tmp_path / "password"
    password_file.write_text(ACCOUNT_SECRET + "\n")
    wrong_file = tmp_path / "wrong"
    wrong_file.write_text("Wr0ng-S3cret-guess\n")
    for secret_file in (config, password_file, wrong_file):
        secret_file.chmod(0o600)  # files holding secrets that others may read are refused
    env = {k: v for k, v in deployment.env.items() if k not in ("DFSFS_PASSWORD", "DFSFS_DATABASE_URL")}
    env["DFSFS_CONFIG"] = str(config)
    secrets = (ACCOUNT_SECRET, DATABASE_SECRET, "Wr0ng-S3cret-guess")
    user = "secretive"
    outputs = []

    def run(*args, check=True):
        result = subprocess.run([DFSFS, "-vv", *map(str, args)], env=env, capture_output=True, text=True,
                                timeout=60, stdin=subprocess.DEVNULL)
        outputs.append((args, result.stdout + result.stderr))
        if check:
            assert result.returncode == 0, f"dfsfs {args}: {result.stderr}"
        return result

    run("user", "add", user, "--password-file", password_file)
    mount_path = tmp_path / "mnt"
    mount_path.mkdir()
    assert run("mount", mount_path, "--user", user, "--password-file", wrong_file, check=False).returncode == 1
    run("mount", mount_path, "--user", user, "--password-file", password_file)
    live = adopt(deployment, user, mount_path)
    try:
        write_bytes(mount_path / "f", b"data")
        assert read_bytes(mount_path / "f") == b"data"
        errno_for(os.stat, mount_path / "missing")
        run("stats", "--user", user, "--password-file", password_file, "--json")
        run("stats", "--all")
        run("fsck", "--user", user, check=False)
        run("user", "list")
        run(f"--database-url=postgresql://nobody:{DATABASE_SECRET}@/nonexistent?host=/nonexistent",
            "user", "list", check=False)  # a connection failure names the URL: redacted?
        process = {
            "cmdline": Path(f"/proc/{live.pid}/cmdline").read_bytes().replace(b"\0", b" "),
            "environ": Path(f"/proc/{live.pid}/environ").read_bytes().replace(b"\0", b"\n"),
        }
        run("umount", mount_path)
        log = live.log_text()
    finally:
        teardown(live)
    leaks = []
    for secret in secrets:
        for args, text in outputs:
            if secret in text:
                leaks.append(f"`dfsfs {' '.join(map(str, args))}` printed {secret!r}: "
                             f"{text[max(0, text.index(secret) - 200):text.index(secret) + 50]!r}")
        if secret in log:
            leaks.append(f"the daemon log holds {secret!r}")
        for name, value in process.items():
            if secret.encode() in value:
                leaks.append(f"/proc/<daemon>/{name} holds {secret!r}")
    assert not leaks, "\n".join(leaks)
    assert b"DFSFS_CONFIG" in process["environ"]  # (the check did look at the right process)
