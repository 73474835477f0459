"""A real mount (default 1 MiB chunks) driven by everyday tools: rsync -aHAX in and out with a
no-difference check both ways, a tar round trip, git, SQLite (rollback journal and WAL),
df, find and du."""

import os
import random
import sqlite3
import stat

import pytest

from mounting import deployment, mnt, sh, tree_snapshot, work  # noqa: F401 - fixtures

CHUNK_SIZE = "1M"
MIB = 1 << 20
pytestmark = pytest.mark.timeout(180)


def data(size: int, seed: int = 0) -> bytes:
    return random.Random(f"tools-{seed}-{size}").randbytes(size)


def build_tree(root) -> None:
    """A small but real tree: every kind of thing rsync -aHAX and tar care about."""
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    j = lambda *parts: os.path.join(root, *parts)  # noqa: E731
    for sub in ("docs", "docs/deep/deeper", "bin", "empty", "empty2/nested-empty",
                "odd names", "media"):
        os.makedirs(j(sub), exist_ok=True)
    sizes = {"docs/zero": 0, "docs/one": 1, "docs/page": 4095, "docs/deep/deeper/small": 777,
             "media/just-under": MIB - 1, "media/exact": MIB, "media/just-over": MIB + 1,
             "media/big.bin": 3 * MIB + 12345, "bin/tool": 20000,
             "odd names/with space.txt": 100, "odd names/ünïcødé ✓": 200,
             "odd names/-leading-dash": 10, "odd names/tab\tname": 11}
    for i, (rel, size) in enumerate(sizes.items()):
        with open(j(rel), "wb") as f:
            f.write(data(size, seed=i))
    # a file of repeated chunks (deduplicated in the store)
    with open(j("media/repeated"), "wb") as f:
        f.write(data(MIB, seed=99) * 3)
    # a sparse file: 5 MiB with 4 KiB of data at 3 MiB + 100
    with open(j("media/sparse"), "wb") as f:
        f.truncate(5 * MIB)
        f.seek(3 * MIB + 100)
        f.write(data(4096, seed=98))
    # symlinks: relative, to a directory, dangling, absolute-looking
    os.symlink("../docs/page", j("bin/link-to-page"))
    os.symlink("docs/deep", j("link-to-dir"))
    os.symlink("nowhere/at/all", j("dangling"))
    os.symlink("/etc/hostname", j("absolute"))
    # hard links: in one directory and across directories
    os.link(j("docs/page"), j("docs/page-hardlink"))
    os.link(j("media/just-over"), j("docs/deep/just-over-hardlink"))
    os.link(j("media/just-over"), j("bin/third-name"))
    # xattrs, including binary and empty values and one on a directory
    os.setxattr(j("docs/one"), "user.comment", b"hello")
    os.setxattr(j("docs/one"), "user.binary", bytes(range(256)))
    os.setxattr(j("docs/one"), "user.empty", b"")
    os.setxattr(j("media/big.bin"), "user.mime_type", b"application/octet-stream")
    os.setxattr(j("docs"), "user.dir-attr", b"on a directory")
    # odd permissions
    os.chmod(j("bin/tool"), 0o755)
    os.chmod(j("docs/zero"), 0o000)
    os.chmod(j("docs/deep/deeper/small"), 0o444)
    os.chmod(j("odd names/with space.txt"), 0o4750)
    os.chmod(j("empty2"), 0o1777)
    os.chmod(j("bin"), 0o2750)
    os.chmod(j("docs/deep"), 0o700)
    # mtimes: the past, with nanoseconds, on files, symlinks and (last) directories
    when = 1_000_000_000_123_456_789
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for k, name in enumerate(sorted(filenames + dirnames)):
            path = os.path.join(dirpath, name)
            os.utime(path, ns=(when + k, when + k * 1_000_000_007), follow_symlinks=False)
        os.utime(dirpath, ns=(when, when - 86400 * 10**9))


def assert_no_rsync_differences(source, destination) -> None:
    result = sh(f"rsync -anciHAX --delete '{source}/' '{destination}/'", timeout=120)
    assert result.stdout == b"", (
        f"rsync sees differences from {source} to {destination}:\n{result.stdout.decode()}")


def test_rsync_in_and_out_shows_no_differences(work, tmp_path):
    source = tmp_path / "source"
    build_tree(source)
    inside = work / "copy"
    back = tmp_path / "back"
    sh(f"rsync -aHAX '{source}/' '{inside}/'", timeout=120)
    assert_no_rsync_differences(source, inside)
    assert_no_rsync_differences(inside, source)
    sh(f"rsync -aHAX '{inside}/' '{back}/'", timeout=120)
    assert_no_rsync_differences(inside, back)
    assert_no_rsync_differences(back, inside)
    assert_no_rsync_differences(source, back)
    expected = tree_snapshot(source)
    assert tree_snapshot(inside) == expected
    assert tree_snapshot(back) == expected
    # the sparse file reads as zeros around its data
    with open(inside / "media" / "sparse", "rb") as f:
        assert f.read(3 * MIB + 100) == bytes(3 * MIB + 100)
        assert f.read(4096) == data(4096, seed=98)
        assert f.read() == bytes(5 * MIB - 3 * MIB - 100 - 4096)
    # an incremental rsync after changes transfers just those changes, and the result matches
    (source / "docs" / "one").write_bytes(b"changed")
    os.unlink(source / "media" / "exact")
    (source / "new-dir").mkdir()
    (source / "new-dir" / "new-file").write_bytes(data(MIB + 7, seed=50))
    sh(f"rsync -aHAX --delete '{source}/' '{inside}/'", timeout=120)
    assert_no_rsync_differences(source, inside)
    assert tree_snapshot(inside) == tree_snapshot(source)


def without_owners(snapshot: dict) -> dict:
    return {path: ({k: v for k, v in entry.items() if k not in ("uid", "gid")}
                   if isinstance(entry, dict) else entry)
            for path, entry in snapshot.items()}


def test_tar_round_trip(work, tmp_path):
    source = tmp_path / "source"
    build_tree(source)
    inside = work / "extracted"
    inside.mkdir()
    back = tmp_path / "back"
    back.mkdir()
    flags = "--xattrs --xattrs-include='user.*'"
    sh(f"tar c {flags} -C '{source}' . | tar x {flags} -p -C '{inside}'", timeout=120)
    sh(f"tar c {flags} -C '{inside}' . | tar x {flags} -p -C '{back}'", timeout=120)
    sh(f"diff -r --no-dereference '{source}' '{inside}'")
    sh(f"diff -r --no-dereference '{source}' '{back}'")
    expected = tree_snapshot(source)
    snapshot_inside, snapshot_back = tree_snapshot(inside), tree_snapshot(back)
    assert without_owners(snapshot_inside) == without_owners(expected)
    assert without_owners(snapshot_back) == without_owners(expected)
    # the same archive bytes from the mount as from the source (sorted, fixed owner and times)
    stable = "--sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --format=gnu"
    from_source = sh(f"tar c {stable} -C '{source}' . | sha256sum").stdout
    from_mount = sh(f"tar c {stable} -C '{inside}' . | sha256sum").stdout
    assert from_source == from_mount
    # a compressed archive written into the mount and listed/extracted from there
    sh(f"tar czf '{work}/archive.tgz' {flags} -C '{source}' .", timeout=120)
    listing = sh(f"tar tzf '{work}/archive.tgz'").stdout.decode().splitlines()
    assert "./media/big.bin" in listing
    (work / "from-tgz").mkdir()
    sh(f"tar xzf '{work}/archive.tgz' {flags} -C '{work}/from-tgz'", timeout=120)
    assert without_owners(tree_snapshot(work / "from-tgz")) == without_owners(expected)
    # tar x as root restores owners with chown(0, 0): the files must stay owned by root
    owners = {(e["uid"], e["gid"]) for e in snapshot_inside.values() if isinstance(e, dict)}
    assert owners == {(os.getuid(), os.getgid())}, "tar's chown changed the owners"
    assert snapshot_inside == expected
    assert snapshot_back == expected


def git_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_NOSYSTEM="1", HOME=os.environ.get("HOME", "/root"),
               GIT_CONFIG_GLOBAL="/dev/null")
    return env


def test_git_inside_the_mount(work):
    repo = work / "repo"
    env = git_env()
    git = "git -c user.name=Tester -c user.email=tester@example.com -c init.defaultBranch=main"

    def run(command, **kwargs):
        return sh(f"cd '{repo}' && {git} {command}", env=env, timeout=90, **kwargs)

    sh(f"{git} init -q '{repo}'", env=env)
    (repo / "README").write_text("hello\n")
    (repo / "src").mkdir()
    (repo / "src" / "main.py").write_text("print('hi')\n" * 100)
    (repo / "blob.bin").write_bytes(data(2 * MIB + 3, seed=7))
    os.symlink("src/main.py", repo / "link")
    os.chmod(repo / "src" / "main.py", 0o755)
    run("add -A")
    run("commit -q -m first")
    assert run("status --porcelain").stdout == b""
    # a second commit on a branch, then back to main
    run("checkout -q -b feature")
    (repo / "README").write_text("hello from feature\n")
    (repo / "new.txt").write_text("new\n")
    run("add -A")
    run("commit -q -m second")
    run("checkout -q main")
    assert (repo / "README").read_text() == "hello\n"
    assert not (repo / "new.txt").exists()
    run("checkout -q feature")
    assert (repo / "README").read_text() == "hello from feature\n"
    run("checkout -q main")
    log = run("log --all --format=%s").stdout.decode().split()
    assert sorted(log) == ["first", "second"]
    assert run("branch --format='%(refname:short)'").stdout.decode().split() == ["feature", "main"]
    run("merge -q --ff-only feature")
    assert run("status --porcelain").stdout == b""
    run("gc -q --aggressive --prune=now")
    run("fsck --full --strict")
    assert run("status --porcelain").stdout == b""
    assert run("rev-list --count HEAD").stdout.strip() == b"2"
    assert (repo / "blob.bin").read_bytes() == data(2 * MIB + 3, seed=7)
    assert stat.S_IMODE(os.stat(repo / "src" / "main.py").st_mode) == 0o755
    # a clone from the mount into the mount
    sh(f"{git} clone -q '{repo}' '{work}/clone'", env=env, timeout=90)
    assert (work / "clone" / "README").read_text() == "hello from feature\n"
    assert sh(f"cd '{work}/clone' && {git} status --porcelain", env=env).stdout == b""


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_sqlite_inside_the_mount(work, journal_mode):
    path = work / "db.sqlite"
    conn = sqlite3.connect(path)
    try:
        mode = conn.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0]
        assert mode == journal_mode
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, value INTEGER, blob BLOB)")
        rng = random.Random(5)
        with conn:
            conn.executemany("INSERT INTO items (name, value, blob) VALUES (?, ?, ?)",
                             ((f"item-{i}", rng.randrange(1000), rng.randbytes(rng.randrange(200)))
                              for i in range(5000)))
        with conn:
            conn.execute("CREATE INDEX items_value ON items (value)")
        with conn:
            conn.execute("UPDATE items SET value = value + 1000 WHERE id % 3 = 0")
        with conn:
            conn.execute("DELETE FROM items WHERE id % 10 = 0")
        assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == 4500
        assert conn.execute("SELECT count(*) FROM items WHERE value >= 1000").fetchone()[0] == \
            len([i for i in range(1, 5001) if i % 3 == 0 and i % 10 != 0])
        # a rolled-back transaction leaves nothing behind
        try:
            with conn:
                conn.execute("DELETE FROM items")
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == 4500
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        total = conn.execute("SELECT sum(value) FROM items").fetchone()[0]
        # a second connection sees committed data while the first is open
        other = sqlite3.connect(path)
        assert other.execute("SELECT count(*) FROM items").fetchone()[0] == 4500
        other.close()
    finally:
        conn.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == 4500
        assert conn.execute("SELECT sum(value) FROM items").fetchone()[0] == total
        assert conn.execute("SELECT count(*) FROM items WHERE value BETWEEN 1000 AND 1100"
                            ).fetchone()[0] > 0
        with conn:
            conn.execute("VACUUM") if journal_mode == "delete" else conn.execute(
                "PRAGMA wal_checkpoint(TRUNCATE)")
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    # and the sqlite3 command-line tool agrees
    out = sh(f"sqlite3 '{path}' 'SELECT count(*) FROM items; PRAGMA integrity_check;'").stdout
    assert out.split() == [b"4500", b"ok"]


def test_df_reports_the_mount(work, mnt):
    out = sh(f"df -P '{mnt.path}'").stdout.decode().splitlines()
    assert len(out) == 2, out
    fields = out[1].split()
    assert fields[0] == f"dfsfs:{mnt.user}"
    assert fields[-1] == str(mnt.path)
    total, used, available = (int(x) for x in fields[1:4])
    assert total > 0 and available > 0 and used >= 0
    out = sh(f"df -T '{work}'").stdout.decode().splitlines()
    assert "fuse.dfsfs" in out[1]
    out = sh(f"df -i '{mnt.path}'").stdout.decode().splitlines()
    assert len(out) == 2, out
    inodes, iused, ifree = (int(x) for x in out[1].split()[1:4])
    assert inodes > 0 and iused > 0 and ifree > 0
    st = os.statvfs(work)
    assert st.f_bsize == st.f_frsize and st.f_bsize > 0
    # df's size is statfs's: the account's use plus the room left where the store is (which
    # other programs on this machine change between the two calls)
    assert abs(st.f_blocks * st.f_frsize - total * 1024) <= 64 << 20
    assert st.f_namemax == 255


def test_find_and_du_over_a_tree(work, tmp_path):
    source = tmp_path / "source"
    build_tree(source)
    inside = work / "tree"
    sh(f"cp -a '{source}' '{inside}'", timeout=120)
    listing = "find . -printf '%y %m %s %n %P -> %l\\n' | LC_ALL=C sort"
    local = sh(f"cd '{source}' && {listing}").stdout
    mounted = sh(f"cd '{inside}' && {listing}").stdout
    # directory sizes differ between file systems; compare everything else
    strip = lambda out: [  # noqa: E731
        line if not line.startswith(b"d ") else b" ".join(line.split(b" ")[:2] + line.split(b" ")[3:])
        for line in out.splitlines()]
    assert strip(mounted) == strip(local)
    assert sh(f"find '{inside}' -type f -size +1M | wc -l").stdout.strip() == b"6"
    assert sh(f"find '{inside}' -type l | wc -l").stdout.strip() == b"4"
    assert sh(f"find '{inside}' -type d -empty | wc -l").stdout.strip() == b"2"
    assert sh(f"find '{inside}' -name '*.bin' -newermt 2000-01-01 | wc -l").stdout.strip() == b"1"
    assert sh(f"find -L '{inside}/link-to-dir' -type f | wc -l").stdout.strip() == b"2"
    # du: apparent sizes of the files agree with the source; allocated sizes are sane
    apparent = "du -ab --apparent-size -l . | grep -v '^[0-9]*\t\\.$' | awk '{print $1}' | paste -sd+"
    files_local = sh(f"cd '{source}' && find . -type f -printf '%s\\n' | paste -sd+ | bc").stdout
    files_mount = sh(f"cd '{inside}' && find . -type f -printf '%s\\n' | paste -sd+ | bc").stdout
    assert files_local == files_mount
    sh(f"cd '{inside}' && {apparent} >/dev/null")
    used_kib = int(sh(f"du -sk '{inside}'").stdout.split()[0])
    assert used_kib > 0
    sparse_kib = int(sh(f"du -k '{inside}/media/sparse'").stdout.split()[0])
    assert sparse_kib <= 5 * 1024
    assert int(sh(f"du -k --apparent-size '{inside}/media/sparse'").stdout.split()[0]) == 5 * 1024


def test_small_rewrites_leave_exactly_the_committed_chunks(work, deployment, mnt):
    """Partial overwrites of a stored chunk, and SQLite's small transactions, store what
    they commit and leave nothing else in the stores (each write() once stored a whole
    chunk nobody referenced)."""
    path = work / "rewritten"
    path.write_bytes(data(MIB, seed=7))
    fd = os.open(path, os.O_RDWR)
    try:
        for i in range(20):
            os.pwrite(fd, data(4096, seed=100 + i), i * 40_000)
    finally:
        os.close(fd)
    conn = sqlite3.connect(work / "small.sqlite", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=delete")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        for i in range(300):
            conn.execute("INSERT INTO t (v) VALUES (?)", (f"row {i}",))
    finally:
        conn.close()
    deployment.assert_consistent(mnt.user, settle_s=10)
