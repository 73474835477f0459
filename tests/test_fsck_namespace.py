"""fsck's checks of the namespace (dfsfs/fsck.py steps 1 and 2): rows no mount writes, and
what is cut off from the root. Each case is made by hand in the database, found, repaired
into the quarantine (`lost+found` in the account's root) without losing a byte or a chunk,
and then fsck is clean. The database is this module's own: some cases drop constraints
that keep such rows out today (a database from before them, or one tampered with)."""

import os
import stat

import pytest
import sqlalchemy as sa
from test_fsck import CHUNK_SIZE, account, populate, sql, stores  # noqa: F401

from dfsfs.core.settings import MAX_FILE_SIZE
from dfsfs.fsck import check
from dfsfs.meta.db import create_engine
from dfsfs.meta.migrations import migrate

LOST = b"lost+found"


@pytest.fixture(scope="module")
def admin_engine(database_factory):
    """This module's own database (test_fsck's fixtures build accounts in it)."""
    made = create_engine(database_factory())
    migrate(made)
    yield made
    made.dispose()


@pytest.fixture
def engine(admin_engine):
    return admin_engine


def tampered(engine, statement: str, **params) -> None:
    """A change no function of dfsfs would make, past the triggers that refuse it."""
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE dentries DISABLE TRIGGER USER"))
        conn.execute(sa.text(statement), params)
        conn.execute(sa.text("ALTER TABLE dentries ENABLE TRIGGER USER"))


def fsck(engine, stores, account, repair=False):
    return check(engine, stores, [account.user_id], repair=repair)


def chunk_state(engine, account) -> tuple[set, set]:
    """(chunk rows, chunk files in the primary store): repair never loses one."""
    with engine.connect() as conn:
        rows = {bytes(d) for (d,) in conn.execute(
            sa.text("SELECT sha256 FROM chunks WHERE user_id = :u"), {"u": account.user_id})}
    files = {digest for _, digest in account.stores.primary.keys(account.user_id)}
    return rows, files


def lookup(account, *names: bytes):
    ino = account.fs.root_ino
    for name in names:
        ino = account.meta.lookup(ino, name).ino
    return account.meta.get_attrs(ino)


def repaired_cleanly(engine, stores, account, category: str, found: int = 1):
    """Check finds `found` of `category`; repair fixes them all, keeps every chunk; then
    the check is clean."""
    before = chunk_state(engine, account)
    report = fsck(engine, stores, account)
    assert report.found[category] == found, report.problems
    report = fsck(engine, stores, account, repair=True)
    assert report.repaired[category] == found, report.problems
    assert chunk_state(engine, account) == before
    report = fsck(engine, stores, account)
    assert report.clean, report.problems


def test_a_normal_namespace_has_none_of_these(engine, stores, account):
    populate(account)
    account.core.call(account.fs.make_node, account.fs.root_ino, b"fifo", stat.S_IFIFO | 0o600,
                      0, 0)
    ino = account.write(b"sparse", b"")
    account.core.call(account.fs.setattr, ino, 0, size=5 * CHUNK_SIZE)
    report = fsck(engine, stores, account)
    assert report.clean, report.problems


def test_a_directory_cycle_is_broken_into_lost_and_found(engine, stores, account):
    a = account.mkdir(b"a")
    b = account.mkdir(b"b", parent=a)
    data = os.urandom(3 * CHUNK_SIZE)
    account.write(b"f", data, parent=b)
    sql(engine, "UPDATE dentries SET parent_ino = :b WHERE ino = :a", a=a, b=b)  # a in b in a
    report = fsck(engine, stores, account)
    assert report.found["cycles"] == 1
    assert f"inode {min(a, b)}" in " ".join(report.problems)
    repaired_cleanly(engine, stores, account, "cycles")
    top = min(a, b)
    moved = lookup(account, LOST, f"cycle-{top}".encode())
    assert moved.ino == top
    inner = b"b" if top == a else b"a"
    path = (LOST, f"cycle-{top}".encode()) + ((inner, b"f") if top == a else (b"f",))
    assert account.core.read_file(lookup(account, *path).ino) == data
    assert stat.S_IMODE(lookup(account, LOST).mode) == 0o700


def test_a_subtree_below_a_removed_directory_is_moved_to_lost_and_found(engine, stores, account):
    gone = account.mkdir(b"gone")
    kept = account.mkdir(b"kept")
    account.write(b"f", b"in kept", parent=kept)
    loose = account.write(b"loose", b"in gone itself")
    # the old race: the directory was removed while another mount put entries in it
    sql(engine, "UPDATE dentries SET parent_ino = :g WHERE ino IN (:k, :l)", g=gone, k=kept,
        l=loose)
    tampered(engine, "DELETE FROM dentries WHERE ino = :g", g=gone)
    sql(engine, "UPDATE inodes SET nlink = 0 WHERE id = :g", g=gone)
    report = fsck(engine, stores, account)
    assert report.found["detached"] == 2
    # Repair settles the removed directory first (purged: no session holds it), which
    # takes the entries in it along; the tree step then finds their inodes without names.
    report = fsck(engine, stores, account, repair=True)
    assert report.repaired["detached"] == 2, report.problems
    assert fsck(engine, stores, account).clean
    found = {entry_ino: name for _, name, entry_ino in quarantined(account)}
    assert set(found) == {kept, loose}
    assert account.core.read_file(lookup(account, LOST, found[kept], b"f").ino) == b"in kept"
    assert account.core.read_file(lookup(account, LOST, found[loose]).ino) == b"in gone itself"


def test_a_file_with_links_but_no_entry_gets_a_name(engine, stores, account):
    ino = account.write(b"f", b"keep me")
    sql(engine, "DELETE FROM dentries WHERE ino = :i", i=ino)
    repaired_cleanly(engine, stores, account, "detached")
    assert account.core.read_file(lookup(account, LOST, f"nameless-{ino}".encode()).ino
                                  ) == b"keep me"


def test_invalid_names_are_moved_to_lost_and_found(engine, stores, account):
    sql(engine, "ALTER TABLE dentries DROP CONSTRAINT IF EXISTS dentries_name_valid")
    bad = [b"", b"a/b", b"x\0y", b".", b"..", b"n" * 256]
    for number, name in enumerate(bad):
        ino = account.write(f"f{number}".encode(), name or b"empty")
        sql(engine, "UPDATE dentries SET name = :n WHERE ino = :i", n=name, i=ino)
    repaired_cleanly(engine, stores, account, "invalid_names", found=len(bad))
    names = [name for _, name, _ in quarantined(account)]
    assert len(names) == len(bad)
    assert all(name.startswith(b"invalid-name-") for name in names)


def test_entries_inside_a_file_are_moved_to_lost_and_found(engine, stores, account):
    host = account.write(b"host", b"a file")
    inside = account.write(b"inside", b"its entry is in a file")
    tampered(engine, "UPDATE dentries SET parent_ino = :h WHERE ino = :i", h=host, i=inside)
    report = fsck(engine, stores, account)
    assert report.found["entries_in_non_directories"] == 1
    report = fsck(engine, stores, account, repair=True)
    assert report.repaired["entries_in_non_directories"] == 1
    assert fsck(engine, stores, account).clean


def test_an_inode_of_unknown_type_becomes_a_regular_file(engine, stores, account):
    data = os.urandom(CHUNK_SIZE + 7)
    ino = account.write(b"odd", data)
    sql(engine, "ALTER TABLE inodes DROP CONSTRAINT inodes_mode_known")  # a row from before migration 10
    sql(engine, "UPDATE inodes SET mode = :m WHERE id = :i", m=0o070644, i=ino)
    repaired_cleanly(engine, stores, account, "unknown_types")
    found = lookup(account, LOST, f"unknown-type-{ino}-".encode() + _dentry_id(engine, ino))
    assert found.mode == stat.S_IFREG | 0o600
    assert account.core.read_file(ino) == data


def test_an_impossible_size_is_cut_to_the_stored_chunks(engine, stores, account):
    data = os.urandom(2 * CHUNK_SIZE + 5)
    ino = account.write(b"huge", data)
    sql(engine, "ALTER TABLE inodes DROP CONSTRAINT inodes_size_in_range")  # a row from before migration 10
    sql(engine, "UPDATE inodes SET size = :s WHERE id = :i", s=MAX_FILE_SIZE + 1, i=ino)
    repaired_cleanly(engine, stores, account, "bad_sizes")
    assert account.meta.get_attrs(ino).size == len(data)
    assert account.core.read_file(ino) == data


def test_chunks_past_the_end_become_a_file_of_their_own(engine, stores, account):
    data = os.urandom(4 * CHUNK_SIZE)
    ino = account.write(b"cut", data)
    sql(engine, "UPDATE inodes SET size = 10 WHERE id = :i", i=ino)  # a truncate half done
    repaired_cleanly(engine, stores, account, "chunks_past_end", found=3)
    assert account.core.read_file(ino) == data[:10]
    beyond = lookup(account, LOST, f"beyond-end-{ino}".encode())
    assert beyond.size == len(data)
    assert account.core.read_file(beyond.ino)[CHUNK_SIZE:] == data[CHUNK_SIZE:]
    assert account.meta.get_attrs(ino).stored_bytes == CHUNK_SIZE
    assert beyond.stored_bytes == 3 * CHUNK_SIZE


def test_a_directory_with_two_names_is_reported(engine, stores, account):
    d = account.mkdir(b"d")
    sql(engine, "INSERT INTO dentries (user_id, parent_ino, name, ino) VALUES (:u, :r, 'again', :d)",
        u=account.user_id, r=account.fs.root_ino, d=d)
    report = fsck(engine, stores, account, repair=True)
    assert report.found["linked_directories"] == 1
    assert report.repaired["linked_directories"] == 0  # a person decides which name goes
    sql(engine, "DELETE FROM dentries WHERE name = 'again' AND ino = :d", d=d)


def test_entries_naming_missing_inodes_are_dropped(engine, stores, account):
    sql(engine, "ALTER TABLE dentries DROP CONSTRAINT IF EXISTS dentries_ino_same_account")
    tampered(engine, "INSERT INTO dentries (user_id, parent_ino, name, ino)"
             " VALUES (:u, :r, 'ghost', 999999999)", u=account.user_id, r=account.fs.root_ino)
    repaired_cleanly(engine, stores, account, "dangling_entries")


def quarantined(account) -> list[tuple[int, bytes, int]]:
    """(entry id, name, inode) of each entry in lost+found."""
    rows, _ = account.meta.readdir(lookup(account, LOST).ino, 0, 1000)
    return [(entry_id, name, attrs.ino) for entry_id, name, attrs in rows]


def _dentry_id(engine, ino: int) -> bytes:
    with engine.connect() as conn:
        return str(conn.execute(sa.text("SELECT id FROM dentries WHERE ino = :i"),
                                {"i": ino}).scalar()).encode()
