"""`dfsfs stats` and dfsfs.stats against a real PostgreSQL, after writing known files."""

import json
import os
import time

import pytest
import sqlalchemy as sa
from test_fsck import CHUNK_SIZE, PASSWORD, Account

from dfsfs.chunks import digest_of
from dfsfs.fsck import check
from dfsfs.meta.accounts import AccountStore
from dfsfs.stats import all_stats, user_stats

pytest_plugins = ["test_fsck"]  # its fixtures: stores, account, dfsfs

STATS_KEYS = {
    "user", "user_id", "files", "directories", "symlinks", "logical_bytes", "stored_bytes",
    "dedup_ratio", "chunk_count", "chunk_size", "quota_bytes", "quota_inodes",
    "quota_bytes_used_pct", "quota_inodes_used_pct", "backup", "integrity", "last_fsck_at",
    "largest_directories",
}


def stats_of(engine, account: Account, top_n: int = 10) -> dict:
    return user_stats(engine, account.user_id, CHUNK_SIZE, top_n)


def assert_consistent(engine, account: Account) -> None:
    """The incremental counters agree with fsck's full recount."""
    assert check(engine, account.stores, [account.user_id]).clean


@pytest.fixture
def password_file(tmp_path):
    path = tmp_path / "password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)  # a password file others may read is refused
    return str(path)


def test_counts_and_bytes_of_known_files(admin_engine, account):
    docs = account.mkdir(b"docs")
    account.write(b"a.bin", os.urandom(3 * CHUNK_SIZE))
    account.write(b"b.bin", os.urandom(1000), parent=docs)
    account.symlink(b"link", b"docs/b.bin")

    stats = stats_of(admin_engine, account)

    assert (stats["files"], stats["directories"], stats["symlinks"]) == (2, 2, 1)
    assert stats["logical_bytes"] == 3 * CHUNK_SIZE + 1000 + len(b"docs/b.bin")
    assert stats["stored_bytes"] == 3 * CHUNK_SIZE + 1000
    assert stats["chunk_count"] == 4
    assert stats["chunk_size"] == CHUNK_SIZE
    assert stats["user"] == account.name and stats["last_fsck_at"] is None
    assert stats["quota_bytes"] is None and stats["quota_bytes_used_pct"] is None


def test_identical_files_are_stored_once(admin_engine, account):
    content = os.urandom(2 * CHUNK_SIZE + 10)
    account.write(b"one", content)
    account.write(b"two", content)

    stats = stats_of(admin_engine, account)

    assert stats["logical_bytes"] == 2 * len(content)
    assert stats["stored_bytes"] == len(content)
    assert stats["chunk_count"] == 3
    assert stats["dedup_ratio"] == 2.0


def test_largest_directories(admin_engine, account):
    photos = account.mkdir(b"photos")
    year = account.mkdir(b"2024", parent=photos)
    odd = account.mkdir(b"caf\xe9")
    account.mkdir(b"empty")
    account.write(b"top.bin", os.urandom(5000))
    account.write(b"p.jpg", os.urandom(300), parent=photos)
    big = account.write(b"q.jpg", os.urandom(2000), parent=year)
    account.meta.link(big, photos, b"q-again.jpg", time.time_ns())  # one inode, counted once
    account.write(b"x", os.urandom(100), parent=odd)

    stats = stats_of(admin_engine, account)

    assert stats["largest_directories"] == [
        {"path": "/photos", "bytes": 2300},
        {"path": "/photos/2024", "bytes": 2000},
        {"path": "/caf\\xe9", "bytes": 100},
    ]
    top = stats_of(admin_engine, account, top_n=1)["largest_directories"]
    assert [entry["path"] for entry in top] == ["/photos"]


def test_quota_backup_and_damage(admin_engine, account):
    ino = account.write(b"f", os.urandom(2 * CHUNK_SIZE))
    AccountStore(admin_engine).set_quota(account.name, quota_bytes=8 * CHUNK_SIZE, quota_inodes=8)
    queued = account.meta.chunk_map(ino)[1].digest
    with admin_engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO backup_queue (user_id, sha256) VALUES (:uid, :digest)"),
                     {"uid": account.user_id, "digest": queued})
    account.meta.record_damage(digest_of(b"x"), "primary", "missing", True, "test")
    account.meta.record_damage(digest_of(b"y"), "backup", "corrupt", False, "test")

    stats = stats_of(admin_engine, account)

    assert stats["quota_bytes_used_pct"] == 25.0
    assert stats["quota_inodes_used_pct"] == 25.0  # the root directory and the file
    assert stats["backup"] == {"chunks_backed_up": 1, "chunks_pending_backup": 1}
    assert stats["integrity"] == {"damage_repaired": 1, "damage_unrepaired": 1}


def test_stats_follow_delete_truncate_and_overwrite(admin_engine, account):
    def usage() -> tuple[int, int, int, int]:
        stats = stats_of(admin_engine, account, top_n=0)
        return stats["files"], stats["logical_bytes"], stats["stored_bytes"], stats["chunk_count"]

    kept = account.write(b"kept", os.urandom(3 * CHUNK_SIZE))
    account.write(b"doomed", os.urandom(CHUNK_SIZE))

    account.delete(b"doomed")
    assert usage() == (1, 3 * CHUNK_SIZE, 3 * CHUNK_SIZE, 3)
    assert_consistent(admin_engine, account)

    account.truncate(kept, chunks_kept=1)
    assert usage() == (1, CHUNK_SIZE, CHUNK_SIZE, 1)
    assert_consistent(admin_engine, account)

    account.overwrite(kept, os.urandom(CHUNK_SIZE + 500))
    assert usage() == (1, CHUNK_SIZE + 500, CHUNK_SIZE + 500, 2)
    assert_consistent(admin_engine, account)
    assert stats_of(admin_engine, account)["last_fsck_at"] is not None


def test_all_stats_lists_every_account(admin_engine, stores):
    made = [Account(admin_engine, stores) for _ in range(2)]
    for account in made:
        account.close()
    names = sorted(account.name for account in made)

    listed = [entry["user"] for entry in all_stats(admin_engine, CHUNK_SIZE)]

    assert set(names) <= set(listed) and listed == sorted(listed)


# ---- the command ------------------------------------------------------------------------


def test_json_output_has_the_documented_keys(admin_engine, database_url, account, dfsfs, password_file):
    content = os.urandom(CHUNK_SIZE)
    account.write(b"one", content)
    account.write(b"two", content)

    result = dfsfs(database_url, "stats", "--json", "--user", account.name, "--password-file", password_file)

    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert set(stats) == STATS_KEYS
    assert stats == user_stats(admin_engine, account.user_id, stats["chunk_size"])
    assert stats["dedup_ratio"] == 2.0 and stats["logical_bytes"] == 2 * CHUNK_SIZE


def test_table_output(database_url, account, dfsfs, password_file):
    account.write(b"f", os.urandom(1536))

    result = dfsfs(database_url, "stats", "--user", account.name, "--password-file", password_file)

    assert result.exit_code == 0, result.output
    lines = {" ".join(line.split()) for line in result.output.splitlines()}
    assert {"logical size 1.5 KiB (1536 bytes)", "byte quota unlimited", "last fsck never"} <= lines


def test_wrong_password_is_refused(database_url, account, dfsfs, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password")
    wrong.chmod(0o600)

    result = dfsfs(database_url, "stats", "--user", account.name, "--password-file", str(wrong))

    assert result.exit_code == 1
    assert "wrong user name or password" in result.output


def test_all_accounts_without_password(database_url, account, dfsfs):
    as_json = dfsfs(database_url, "stats", "--all", "--json")
    as_table = dfsfs(database_url, "stats", "--all")

    assert as_json.exit_code == 0 and as_table.exit_code == 0, as_json.output + as_table.output
    assert account.name in [entry["user"] for entry in json.loads(as_json.stdout)]
    assert as_table.output.startswith("USER")
    assert dfsfs(database_url, "stats", "--all", "--user", account.name).exit_code == 2
