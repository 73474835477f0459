"""Storage faults: chunk files deleted, truncated or bit-flipped behind a live mount.

* A bad primary copy: reads still return the right bytes (from the backup), the primary
  file is rewritten with the right bytes, and the damage is recorded as repaired (damage
  table and `dfsfs stats --json`).
* A bad backup copy: reads are not affected; `dfsfs fsck --repair` rewrites it from the
  primary and records it; a second fsck is clean.
* Both copies bad: reading the affected chunk's range fails with EIO (never wrong bytes),
  every other range of the file, other files and new writes keep working; the damage is
  shown as unrepaired and fsck exits 1.

The daemon keeps verified chunks in memory, and the kernel keeps pages: each check first
remounts (a fresh daemon) and drops the kernel's caches, so reads really reach the store.
"""

import errno
import hashlib
import json
import os
import stat
import uuid

import pytest

from faults import (
    bounded,
    chunk_file,
    content,
    drop_caches,
    errno_of,
    fsck,
    fsck_report,
    mounted,
    query,
    teardown,
    user_id,
)
from mounting import Deployment

CHUNK = 64 * 1024
CHUNKS = 6
SIZE = CHUNK * (CHUNKS - 1) + 1000  # the last chunk is partial


@pytest.fixture(scope="module")
def deployment(database_url, tmp_path_factory):
    return Deployment(database_url, tmp_path_factory.mktemp("storage"), chunk_size="64K")


# ---- helpers ---------------------------------------------------------------------------------


def new_user() -> str:
    return "s" + uuid.uuid4().hex[:10]


def pieces(data: bytes) -> list[bytes]:
    return [data[offset:offset + CHUNK] for offset in range(0, len(data), CHUNK)]


def digest(piece: bytes) -> str:
    return hashlib.sha256(piece).hexdigest()


def store_root(deployment, role: str):
    return deployment.base / role


def copy_path(deployment, role: str, uid: int, piece: bytes):
    return chunk_file(store_root(deployment, role), uid, digest(piece))


def damage(path, how: str) -> None:
    """Damage one chunk file in place the way a failing disk or an operator might."""
    assert path.is_file(), f"no chunk file {path}"
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "empty":
        os.truncate(path, 0)
    elif how == "bitflip":
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 3)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x10]))
            f.flush()
            os.fsync(f.fileno())
    else:
        raise ValueError(how)


def expected_kind(how: str) -> str:
    return "missing" if how == "delete" else "corrupt"


def read_range(path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        out = bytearray()
        while len(out) < length:
            piece = os.pread(fd, length - len(out), offset + len(out))
            if not piece:
                break
            out += piece
        return bytes(out)
    finally:
        os.close(fd)


def read_all(path) -> bytes:
    result, error, _ = bounded(lambda: open(path, "rb").read(), timeout=30)
    if error is not None:
        raise error
    return result


def write_file(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def stats(deployment, user: str) -> dict:
    result = deployment.run("stats", "--user", user, "--json", "--top", "0")
    return json.loads(result.stdout)


def damage_rows(deployment, uid: int) -> list[tuple[str, str, str, bool]]:
    """(digest hex, store, kind, repaired) of the user's damage records."""
    rows = query(deployment.env["DFSFS_DATABASE_URL"],
                 "SELECT sha256, store, kind, repaired_at IS NOT NULL FROM damage"
                 " WHERE user_id = :uid ORDER BY id", uid=uid)
    return [(bytes(d).hex(), store, kind, repaired) for d, store, kind, repaired in rows]


def fresh_daemon(mnt) -> None:
    """A new daemon (empty read cache) and no kernel caches."""
    teardown(mnt)
    drop_caches()
    mnt.mount()


def assert_good_copy(path, piece: bytes) -> None:
    assert path.is_file(), f"{path} was not restored"
    data = path.read_bytes()
    assert data == piece, f"{path}: {len(data)} bytes, expected the chunk's {len(piece)}"
    assert hashlib.sha256(data).hexdigest() == path.name
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)


# ---- a bad primary copy ------------------------------------------------------------------------

PRIMARY_DAMAGE = {1: "delete", 2: "truncate", 3: "bitflip", 4: "empty", CHUNKS - 1: "bitflip"}


def test_bad_primary_copies_are_read_from_the_backup_and_repaired(deployment):
    user = new_user()
    data = content("primary", SIZE)
    other = content("primary-other", 3 * CHUNK)
    with mounted(deployment, user) as mnt:
        uid = user_id(deployment.env["DFSFS_DATABASE_URL"], user)
        write_file(mnt.path / "f", data)
        write_file(mnt.path / "other", other)
        fresh_daemon(mnt)

        chunks = pieces(data)
        assert len(chunks) == CHUNKS
        for index, how in PRIMARY_DAMAGE.items():
            damage(copy_path(deployment, "primary", uid, chunks[index]), how)
        drop_caches()

        result, error, _ = bounded(read_all, mnt.path / "f", timeout=30)
        if error is not None:
            print("daemon log:\n" + mnt.new_log()[-8000:])
            raise AssertionError(f"reading a file with damaged primary copies failed: {error!r}")
        assert result == data, "wrong bytes from a file with damaged primary copies"
        assert read_all(mnt.path / "other") == other
        # the same again from a fresh daemon: now straight from the repaired primary
        for index in PRIMARY_DAMAGE:
            assert_good_copy(copy_path(deployment, "primary", uid, chunks[index]), chunks[index])
            assert_good_copy(copy_path(deployment, "backup", uid, chunks[index]), chunks[index])
        mnt.check_healthy()  # the daemon logged no error: repairs are warnings

    records = damage_rows(deployment, uid)
    expected = sorted((digest(chunks[i]), "primary", expected_kind(how), True)
                      for i, how in PRIMARY_DAMAGE.items())
    assert sorted(records) == expected, f"damage records {records}"
    integrity = stats(deployment, user)["integrity"]
    assert integrity == {"damage_repaired": len(PRIMARY_DAMAGE), "damage_unrepaired": 0}, integrity
    status, found, output = fsck(deployment, "--user", user)
    assert status == 0 and not found, f"fsck after the repairs by reads:\n{output}"


def test_partial_overwrite_of_a_chunk_with_a_bad_primary_copy(deployment):
    """A write into the middle of a chunk merges with its old content: that old content must
    be the verified one from the backup, not the damaged bytes of the primary."""
    user = new_user()
    data = bytearray(content("overwrite", 3 * CHUNK))
    with mounted(deployment, user) as mnt:
        uid = user_id(deployment.env["DFSFS_DATABASE_URL"], user)
        write_file(mnt.path / "f", data)
        fresh_daemon(mnt)
        old = pieces(bytes(data))
        damage(copy_path(deployment, "primary", uid, old[1]), "bitflip")
        damage(copy_path(deployment, "primary", uid, old[2]), "delete")
        drop_caches()
        fd = os.open(mnt.path / "f", os.O_WRONLY)
        try:
            os.pwrite(fd, b"X" * 100, CHUNK + 500)
            os.pwrite(fd, b"Y" * 100, 2 * CHUNK + 7)
        finally:
            os.close(fd)
        data[CHUNK + 500:CHUNK + 600] = b"X" * 100
        data[2 * CHUNK + 7:2 * CHUNK + 107] = b"Y" * 100
        drop_caches()
        assert read_all(mnt.path / "f") == bytes(data)  # committed chunks, read from the store
    status, found, output = fsck(deployment, "--user", user)
    assert set(found) <= {"orphan_chunks"}, output  # the old chunk may linger until gc


# ---- a bad backup copy -------------------------------------------------------------------------

BACKUP_DAMAGE = {0: "delete", 2: "truncate", 3: "bitflip", CHUNKS - 1: "empty"}


def test_bad_backup_copies_are_repaired_by_fsck(deployment):
    user = new_user()
    data = content("backup", SIZE)
    chunks = pieces(data)
    with mounted(deployment, user) as mnt:
        uid = user_id(deployment.env["DFSFS_DATABASE_URL"], user)
        write_file(mnt.path / "f", data)
        fresh_daemon(mnt)
        for index, how in BACKUP_DAMAGE.items():
            damage(copy_path(deployment, "backup", uid, chunks[index]), how)
        drop_caches()
        assert read_all(mnt.path / "f") == data, "a bad backup copy changed what reads return"
        for index in BACKUP_DAMAGE:
            assert_good_copy(copy_path(deployment, "primary", uid, chunks[index]), chunks[index])
        mnt.umount()  # fsck --repair runs while the account is not mounted

    status, found, output = fsck(deployment, "--user", user)
    assert status == 1, f"fsck did not notice the bad backup copies:\n{output}"
    assert found == {"damaged_copies": len(BACKUP_DAMAGE)}, output
    for index, how in BACKUP_DAMAGE.items():
        path = copy_path(deployment, "backup", uid, chunks[index])
        assert path.exists() == (how != "delete"), "fsck without --repair changed the store"

    status, report, output = fsck_report(deployment, "--repair", "--user", user)
    assert status == 1 and report["found"] == {"damaged_copies": len(BACKUP_DAMAGE)}, output
    assert report["repaired"] == {"damaged_copies": len(BACKUP_DAMAGE)}, output
    for index in BACKUP_DAMAGE:
        assert_good_copy(copy_path(deployment, "backup", uid, chunks[index]), chunks[index])
    status, found, output = fsck(deployment, "--user", user)
    assert status == 0 and not found, f"second fsck is not clean:\n{output}"

    records = damage_rows(deployment, uid)
    assert all(store == "backup" and repaired for _, store, _, repaired in records), records
    assert sorted({(d, kind) for d, _, kind, _ in records}) == sorted(
        (digest(chunks[i]), expected_kind(how)) for i, how in BACKUP_DAMAGE.items()), records
    integrity = stats(deployment, user)["integrity"]
    assert integrity["damage_unrepaired"] == 0 and integrity["damage_repaired"] >= len(BACKUP_DAMAGE), integrity


# ---- both copies bad -----------------------------------------------------------------------------


LOST = {"f": (2, "delete", "delete"), "g": (4, "bitflip", "truncate")}  # index, primary, backup


def test_chunk_with_no_good_copy_fails_with_eio_for_its_range_only(deployment):
    user = new_user()
    files = {name: content(f"lost-{name}", SIZE) for name in LOST}
    other = content("lost-other", 2 * CHUNK + 10)
    with mounted(deployment, user) as mnt:
        uid = user_id(deployment.env["DFSFS_DATABASE_URL"], user)
        for name, data in files.items():
            write_file(mnt.path / name, data)
        write_file(mnt.path / "other", other)
        fresh_daemon(mnt)
        for name, (lost, primary_how, backup_how) in LOST.items():
            chunks = pieces(files[name])
            damage(copy_path(deployment, "primary", uid, chunks[lost]), primary_how)
            damage(copy_path(deployment, "backup", uid, chunks[lost]), backup_how)
        drop_caches()

        for name, (lost, _, _) in LOST.items():
            path, data = mnt.path / name, files[name]
            start, end = lost * CHUNK, (lost + 1) * CHUNK
            # the ranges before and after the lost chunk read fine, in any order
            good = [(SIZE - 1000, 1000), (0, start), (start - 10, 10), (end, SIZE - end), (end, 10)]
            for offset, length in good:
                got, error, _ = bounded(read_range, path, offset, length, timeout=30)
                assert error is None, f"{name}: reading [{offset}, {offset + length}) failed: {error!r}"
                assert got == data[offset:offset + length], (
                    f"{name}: wrong bytes in [{offset}, {offset + length})")
            # every read touching the lost chunk fails with EIO, again and again
            for offset, length in ((start, CHUNK), (start + 100, 10), (start - 10, 20), (end - 1, 2)):
                for _ in range(2):
                    code, _ = errno_of(read_range, path, offset, length, timeout=30)
                    assert code == errno.EIO, (
                        f"{name}: reading [{offset}, {offset + length}) across a lost chunk "
                        f"gave errno {code}")
            code, _ = errno_of(read_all, path, timeout=30)
            assert code == errno.EIO, f"{name}: reading the whole file gave errno {code}"
            assert os.stat(path).st_size == SIZE

        # a partial write into the lost chunk cannot merge with its old content: EIO, not zeros
        fd = os.open(mnt.path / "f", os.O_WRONLY)
        try:
            code, _ = errno_of(os.pwrite, fd, b"patch", LOST["f"][0] * CHUNK + 100, timeout=30)
            assert code == errno.EIO, f"a partial write into a lost chunk gave errno {code}"
        finally:
            os.close(fd)
        # overwriting the whole lost chunk needs no old content: that works, and heals the file
        fd = os.open(mnt.path / "g", os.O_WRONLY)
        fresh = content("fresh chunk", CHUNK)
        try:
            assert os.pwrite(fd, fresh, LOST["g"][0] * CHUNK) == CHUNK
            os.fsync(fd)
        finally:
            os.close(fd)
        healed = files["g"][:LOST["g"][0] * CHUNK] + fresh + files["g"][(LOST["g"][0] + 1) * CHUNK:]
        drop_caches()
        assert read_all(mnt.path / "g") == healed
        code, _ = errno_of(read_range, mnt.path / "f", LOST["f"][0] * CHUNK, 10, timeout=30)
        assert code == errno.EIO, f"the lost chunk of f after the failed write: errno {code}"

        # the rest of the file system keeps working
        assert read_all(mnt.path / "other") == other
        write_file(mnt.path / "new", b"new data" * 10_000)
        drop_caches()
        assert read_all(mnt.path / "new") == b"new data" * 10_000
        assert mnt.is_live(), "the daemon died"

    records = damage_rows(deployment, uid)
    assert records, "the lost chunks left no damage record"
    expected = set()
    for name, (lost, primary_how, backup_how) in LOST.items():
        lost_hex = digest(pieces(files[name])[lost])
        expected |= {(lost_hex, "primary", expected_kind(primary_how)),
                     (lost_hex, "backup", expected_kind(backup_how))}
    assert {(d, store, kind) for d, store, kind, _ in records} == expected, records
    assert not any(repaired for *_, repaired in records), records
    integrity = stats(deployment, user)["integrity"]
    assert integrity["damage_unrepaired"] >= 4 and integrity["damage_repaired"] == 0, integrity

    status, found, output = fsck(deployment, "--user", user)
    assert status == 1, output
    assert found.get("lost_chunks") == 1 and found.get("dangling_references") == 1, output  # g healed
    assert "(/f)" in output and "(/g)" not in output, f"fsck names the wrong files:\n{output}"
    status, found, output = fsck(deployment, "--repair", "--user", user)
    assert status == 1 and found.get("lost_chunks") == 1, f"a lost chunk cannot be repaired:\n{output}"
