"""POSIX as pjdfstest checks it (docs/conformance.md), on a real mount with plain os calls:
the cases of the areas pjdfstest covers, kept here since CI cannot fetch pjdfstest. And
renames from many mounts at once, serialised on the server (migration 9): no interleaving
makes a directory cycle or cuts a directory off from the root."""

import ctypes
import errno
import os
import random
import stat
import threading
import time
import uuid

import pytest
import sqlalchemy as sa

from dfsfs.auth import hash_password
from dfsfs.errors import DfsfsError, InvalidArgumentError
from dfsfs.meta.accounts import AccountStore
from dfsfs.meta.db import create_engine
from dfsfs.meta.store import MetadataStore
from dfsfs.recovery import open_own_session
from mounting import deployment, mnt, work  # noqa: F401

CHUNK_SIZE = "64K"
pytestmark = pytest.mark.timeout(300)

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
    account = AccountStore(admin_engine).create_user("r" + uuid.uuid4().hex[:8],
                                                     hash_password("pw"))
    made = []
    for _ in range(4):
        engine = create_engine(database_url, user_id=account)
        made.append(MetadataStore(engine, account, open_own_session(engine, account, 300.0)))
    yield account, made
    for meta in made:
        meta.end_sessions([meta.session_id], "unmounted")
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
