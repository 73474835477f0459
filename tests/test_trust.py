"""A hostile client: the client role with a valid session of account A tries, in raw SQL,
every way out of its account (issue 12) — and B's files and stats stay as they were.

B's files are written through a real mount of B and read back through one at the end.
Every attack runs on its own autocommit statement; each must fail or see nothing. A
sanity check before each test makes sure the attacker's session is still live (an
attack that fails only because the attacker lost its session proves nothing).
"""

import hashlib
import os
import threading
import time
import uuid

import psycopg2
import pytest
import sqlalchemy as sa

from conftest import client_url_of
from dfsfs.auth import login
from dfsfs.meta.db import create_engine
from dfsfs.session import session_engine
from dfsfs.stats import user_stats
from mounting import PASSWORD, Deployment, tree_snapshot

ACCOUNT_TABLES = ("usage", "inodes", "dentries", "chunks", "file_chunks", "xattrs", "damage",
                  "backup_queue", "sessions")
PRIVATE_TABLES = ("verifiers", "trust_settings", "login_challenges", "unknown_logins",
                  "account_stores")
OWNER_ROLES = ("dfsfs", "postgres")
INT64_MAX = 2**63 - 1


def dsn_of(url: str) -> str:
    parts = sa.engine.make_url(url)
    query = dict(parts.query)
    return (f"host={query.get('host', parts.host)} port={query.get('port', parts.port or 5432)} "
            f"dbname={parts.database} user={parts.username}")


class Hostile:
    """A raw psycopg2 connection of the client role presenting `token` (account A's)."""

    def __init__(self, client_url: str, token: str):
        self.dsn = dsn_of(client_url)
        self.token = token
        self.conn = psycopg2.connect(self.dsn, options=f"-c dfsfs.session={token}")
        self.conn.autocommit = True

    def rows(self, sql: str, params=None) -> list[tuple]:
        with self.conn.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def count(self, sql: str, params=None) -> int:
        with self.conn.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.rowcount

    def refused(self, sql: str, params=None) -> str:
        """Run `sql`; it must fail. Returns the error's first line."""
        try:
            rows = self.rows(sql, params)
        except psycopg2.Error as error:
            return str(error).strip().splitlines()[0]
        raise AssertionError(f"not refused: {sql} -> {rows!r}")

    def close(self) -> None:
        self.conn.close()


DENIALS = ("permission denied", "must be owner", "must be superuser", "must have admin option",
           "must be member of role")


def denied(message: str) -> bool:
    """A refusal for want of rights (not, say, a typo in the attack)."""
    return any(denial in message for denial in DENIALS)


def owner_rows(engine, sql: str, **params) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(bytes(value) if isinstance(value, memoryview) else value for value in row)
                for row in conn.execute(sa.text(sql), params)]


def snapshot(engine, account: int) -> dict:
    """Every row of the account, as the owner sees it (sessions aside: they come and go)."""
    shot = {}
    for table in ACCOUNT_TABLES + ("verifiers", "account_stores"):
        if table == "sessions":
            continue
        shot[table] = sorted(map(repr, owner_rows(engine, f"SELECT * FROM {table} WHERE user_id = :a",
                                                  a=account)))
    shot["users"] = owner_rows(engine, "SELECT * FROM users WHERE id = :a", a=account)
    return shot


@pytest.fixture(scope="module")
def scene(database_url, admin_engine, tmp_path_factory):
    """Accounts alice (the attacker) and bob (the victim), with bob's files written by a
    real mount of bob; what bob has, as the owner sees it; and an attacker's session."""
    deployment = Deployment(database_url, tmp_path_factory.mktemp("hostile"), chunk_size="64K")
    deployment.add_user("alice")
    with deployment.mount("bob") as mnt:
        root = mnt.path
        (root / "docs").mkdir()
        (root / "docs" / "secret.txt").write_bytes(b"bob's secret\n" * 20000)
        (root / "note").write_bytes(b"a note")
        os.setxattr(root / "note", "user.tag", b"bob")
        os.symlink("docs/secret.txt", root / "link")
        os.link(root / "note", root / "note-again")
        files_before = tree_snapshot(root)
    with deployment.mount("alice") as mnt:
        (mnt.path / "mine").write_bytes(b"alice's file")
    ids = {name: owner_rows(admin_engine, "SELECT id, root_ino FROM users WHERE name = :n", n=name)[0]
           for name in ("alice", "bob")}
    bob, bob_root = ids["bob"]
    with admin_engine.begin() as conn:  # rows in the tables no mount wrote to
        for account in (ids["alice"][0], bob):
            digest = hashlib.sha256(b"%d" % account).digest()
            conn.execute(sa.text("INSERT INTO damage (user_id, sha256, store, kind) VALUES"
                                 " (:a, :d, 'primary', 'missing')"), {"a": account, "d": digest})
            conn.execute(sa.text("INSERT INTO backup_queue (user_id, sha256) VALUES (:a, :d)"),
                         {"a": account, "d": digest})
    bob_file = owner_rows(admin_engine, "SELECT d.ino FROM dentries d JOIN dentries p ON"
                          " p.ino = d.parent_ino WHERE d.user_id = :b AND d.name = 'secret.txt'",
                          b=bob)[0][0]
    bob_chunks = [row[0] for row in owner_rows(admin_engine, "SELECT id FROM chunks WHERE"
                                               " user_id = :b ORDER BY id", b=bob)]
    client_url = client_url_of(database_url)
    anonymous = create_engine(client_url, pool_size=1)
    attacker_login = login(anonymous, "alice", PASSWORD)
    anonymous.dispose()
    hostile = Hostile(client_url, attacker_login.token)
    stats = user_stats(admin_engine, bob, 65536)
    scene = dict(deployment=deployment, alice=ids["alice"][0], alice_root=ids["alice"][1],
                 bob=bob, bob_root=bob_root, bob_file=bob_file, bob_chunks=bob_chunks,
                 files=files_before, rows=snapshot(admin_engine, bob), stats=stats,
                 hostile=hostile, client_url=client_url, login=attacker_login)
    yield scene
    hostile.close()


@pytest.fixture
def hostile(scene) -> Hostile:
    """The attacker's connection, checked to be alive and scoped to alice."""
    attacker = scene["hostile"]
    assert attacker.rows("SELECT dfsfs_current_account()") == [(scene["alice"],)]
    yield attacker
    assert attacker.rows("SELECT dfsfs_current_account()") == [(scene["alice"],)], (
        "the attacker's session ended during the test: its attacks proved nothing")


def visible_accounts(hostile: Hostile) -> dict[str, set]:
    seen = {table: {row[0] for row in hostile.rows(f"SELECT DISTINCT user_id FROM {table}")}
            for table in ACCOUNT_TABLES if table != "sessions"}
    seen["sessions"] = {row[0] for row in hostile.rows("SELECT DISTINCT user_id FROM sessions")}
    seen["users"] = {row[0] for row in hostile.rows("SELECT id FROM users")}
    return seen


# ---- settings, roles -----------------------------------------------------------------------


def test_no_setting_widens_the_scope(scene, hostile):
    alice, bob = scene["alice"], scene["bob"]
    assert set().union(*visible_accounts(hostile).values()) == {alice}
    for statement in ("SET dfsfs.user_id = %s" % bob, "SET dfsfs.admin = on",
                      "SELECT set_config('dfsfs.user_id', '%s', false)" % bob,
                      "SELECT set_config('dfsfs.admin', 'on', false)",
                      "SET row_security = on", "SET search_path = pg_catalog, public"):
        hostile.rows(statement)
        assert set().union(*visible_accounts(hostile).values()) == {alice}, statement
    # Another session's token is a secret; a guessed one is no session at all: a fresh
    # connection presenting it is refused, one presenting none sees nothing.
    guess = f"{bob}:1:" + hashlib.sha256(b"guess").hexdigest()
    for token in (guess, hashlib.sha256(b"guess").hexdigest()):
        fresh = Hostile(scene["client_url"], token)
        try:
            assert "session has ended" in fresh.refused("SELECT count(*) FROM inodes")
        finally:
            fresh.close()
    fresh = Hostile(scene["client_url"], "")
    try:
        assert set().union(*visible_accounts(fresh).values()) == set()
    finally:
        fresh.close()
    # A connection bound to alice's session stays hers whatever it presents afterwards.
    hostile.rows("SET dfsfs.session = %s", (guess,))
    assert set().union(*visible_accounts(hostile).values()) == {alice}
    hostile.rows("SET dfsfs.session = %s", (hostile.token,))
    hostile.rows("RESET ALL")
    hostile.rows("SET row_security = off")  # then a query RLS would filter is an error
    assert "row-level security" in hostile.refused("SELECT count(*) FROM inodes")
    hostile.rows("RESET row_security")


def test_no_value_of_any_setting_widens_the_scope(scene, hostile):
    """Every setting a client may change, at the ends of its range (and every choice of
    an enum): statements then either fail or still see alice's rows only."""
    seen_by_all = " UNION ".join(f"SELECT user_id FROM {t}" for t in ACCOUNT_TABLES) + \
        " UNION SELECT id FROM users"
    settings = hostile.rows("SELECT name, vartype, min_val, max_val, enumvals FROM pg_settings"
                            " WHERE context = 'user'")
    tried = 0
    for name, kind, low, high, choices in settings:
        values = {"bool": ["on", "off"], "enum": choices or [], "integer": [low, high],
                  "real": [low, high]}.get(kind, [])
        for value in values:
            hostile.rows("BEGIN")
            try:
                hostile.rows(f"SET LOCAL {name} = %s", (str(value),))
                visible = {row[0] for row in hostile.rows(seen_by_all)}
            except psycopg2.Error:
                visible = set()
            finally:
                hostile.rows("ROLLBACK")
            assert visible <= {scene["alice"]}, (name, value, visible)
            tried += 1
    assert tried > 200, tried


def test_the_binding_of_the_connection_cannot_be_forged(scene, hostile):
    """A connection's account is kept in what it drew from owner-only sequences (see
    migration 7): the client may read them, not draw from or set them."""
    alice, bob = scene["alice"], scene["bob"]
    for sequence in ("dfsfs_binding", "dfsfs_bound_at", "dfsfs_sessions_ended"):
        assert denied(hostile.refused(f"SELECT nextval('{sequence}')"))
        assert denied(hostile.refused(f"SELECT setval('{sequence}', %s)", (bob * 2 + 1,)))
        assert denied(hostile.refused(f"ALTER SEQUENCE {sequence} RESTART WITH {bob * 2 + 1}"))
    assert denied(hostile.refused("SELECT dfsfs_draw('dfsfs_binding', %s)", (bob * 2 + 1,)))
    assert hostile.rows("SELECT currval('dfsfs_binding') / 2") == [(alice,)]
    # the hint only picks the path: without a binding, a forged one makes statements fail
    hostile.rows("DISCARD SEQUENCES")
    assert "not yet defined" in hostile.refused("SELECT count(*) FROM inodes")
    hostile.rows("RESET dfsfs.bound")  # ... and without the hint the connection binds again
    assert set().union(*visible_accounts(hostile).values()) == {alice}
    hostile.rows("DISCARD ALL")
    hostile.rows("SET dfsfs.session = %s", (hostile.token,))
    assert set().union(*visible_accounts(hostile).values()) == {alice}
    assert hostile.rows("SELECT dfsfs_sees_all()") == [(False,)]


def test_no_other_role(hostile):
    for role in (*OWNER_ROLES, "pg_read_all_data", "pg_write_all_data", "pg_execute_server_program"):
        assert denied(hostile.refused(f"SET ROLE {role}"))
        assert denied(hostile.refused(f"SET SESSION AUTHORIZATION {role}"))
        assert denied(hostile.refused(f"GRANT {role} TO dfsfs_client"))
    for statement in ("SET track_activities = on", "ALTER ROLE dfsfs_client SUPERUSER",
                      "ALTER ROLE dfsfs_client BYPASSRLS", "ALTER ROLE dfsfs_client CREATEROLE",
                      "CREATE ROLE intruder LOGIN SUPERUSER", "CREATE ROLE intruder",
                      "ALTER ROLE dfsfs PASSWORD 'x'", "ALTER ROLE dfsfs_client SET track_activities = on",
                      "CREATE DATABASE intruder"):
        assert denied(hostile.refused(statement)), statement
    assert hostile.rows("SELECT rolsuper OR rolbypassrls OR rolcreaterole OR rolcreatedb"
                        " FROM pg_roles WHERE rolname = current_user") == [(False,)]


def test_role_defaults_cannot_weaken_other_accounts(scene, hostile):
    """Any role may set defaults for itself, and all accounts' daemons share the client
    role: what matters for them is pinned in their startup packets."""
    bad = {"synchronous_commit": "off", "default_transaction_read_only": "on",
           "search_path": "pg_catalog", "statement_timeout": "1", "enable_indexscan": "off"}
    try:
        for name, value in bad.items():
            hostile.rows(f"ALTER ROLE dfsfs_client SET {name} = '{value}'")
        victim = session_engine(scene["client_url"],
                                login(create_engine(scene["client_url"], pool_size=1), "bob", PASSWORD),
                                pool_size=1, relaxed_commits=False)
        try:
            with victim.begin() as conn:
                for name in bad:
                    assert conn.execute(sa.text(f"SHOW {name}")).scalar() != bad[name], name
                conn.execute(sa.text("SELECT pg_sleep(0.01), count(*) FROM inodes"))
                conn.execute(sa.text("UPDATE inodes SET atime_ns = atime_ns WHERE false"))
        finally:
            victim.dispose()
    finally:
        hostile.rows("ALTER ROLE dfsfs_client RESET ALL")
    settings = hostile.rows("SELECT setconfig FROM pg_db_role_setting WHERE setdatabase = 0 AND"
                            " setrole = (SELECT oid FROM pg_roles WHERE rolname = 'dfsfs_client')")
    assert settings == [(["track_activities=off"],)], "RESET ALL by the role kept the superuser's"


# ---- reading ---------------------------------------------------------------------------------


def test_verifiers_and_private_tables_are_unreadable(hostile):
    for table in PRIVATE_TABLES:
        assert denied(hostile.refused(f"SELECT * FROM {table}")), table
    assert denied(hostile.refused("SELECT token_hash FROM sessions"))
    assert denied(hostile.refused("COPY verifiers TO STDOUT"))
    assert "password_hash" not in {row[0] for row in hostile.rows(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'users'")}


def test_nothing_of_b_is_visible(scene, hostile):
    bob, bob_root, bob_file = scene["bob"], scene["bob_root"], scene["bob_file"]
    for table in ACCOUNT_TABLES:
        assert hostile.rows(f"SELECT count(*) FROM {table} WHERE user_id = %s", (bob,)) == [(0,)]
    assert hostile.rows("SELECT count(*) FROM users WHERE id = %s OR name = 'bob'", (bob,)) == [(0,)]
    assert hostile.rows("SELECT count(*) FROM inodes WHERE id IN (%s, %s)", (bob_root, bob_file)) == [(0,)]
    assert hostile.rows("SELECT count(*) FROM dentries WHERE name = 'secret.txt'") == [(0,)]
    assert hostile.rows("SELECT count(*) FROM inodes i JOIN dentries d ON d.ino = i.id"
                        " WHERE i.user_id <> d.user_id") == [(0,)]
    # Through COPY and through leaky functions in a WHERE clause (RLS is a security barrier)
    copied = []
    with hostile.conn.cursor() as cursor:
        class Sink:
            def write(self, data):
                copied.append(data if isinstance(data, str) else data.decode())
        cursor.copy_expert("COPY (SELECT user_id FROM inodes) TO STDOUT", Sink())
    assert {int(line) for line in "".join(copied).split()} == {scene["alice"]}
    # A condition that fails on B's row would betray it: RLS filters first (security barrier).
    for table, column in (("inodes", "id"), ("dentries", "ino"), ("chunks", "id")):
        target = bob_file if table != "chunks" else scene["bob_chunks"][0]
        assert hostile.rows(f"SELECT count(*) FROM {table} WHERE 1 / ({column} - %s) <> 0",
                            (target,)) is not None


# ---- writing ---------------------------------------------------------------------------------


def test_no_change_to_b_rows(scene, hostile):
    bob, bob_root, bob_file = scene["bob"], scene["bob_root"], scene["bob_file"]
    for table in ACCOUNT_TABLES:
        if table == "sessions":
            assert denied(hostile.refused("UPDATE sessions SET ended_at = now()"
                                                          " WHERE user_id = %s", (bob,)))
            assert denied(hostile.refused("DELETE FROM sessions WHERE user_id = %s",
                                                          (bob,)))
            continue
        assert hostile.count(f"UPDATE {table} SET user_id = user_id WHERE user_id = %s", (bob,)) == 0
        assert hostile.count(f"DELETE FROM {table} WHERE user_id = %s", (bob,)) == 0
    assert hostile.count("UPDATE inodes SET size = 0 WHERE id = %s", (bob_file,)) == 0
    assert hostile.count("DELETE FROM dentries WHERE parent_ino = %s", (bob_root,)) == 0
    assert denied(hostile.refused("UPDATE users SET quota_bytes = 0 WHERE id = %s", (bob,)))
    assert denied(hostile.refused("TRUNCATE inodes CASCADE"))
    assert denied(hostile.refused("DELETE FROM users WHERE id = %s", (bob,)))
    assert hostile.count("UPDATE users SET last_fsck_at = now() WHERE id = %s", (bob,)) == 0


def test_no_rows_for_b_and_none_that_point_at_b(scene, hostile):
    alice, bob = scene["alice"], scene["bob"]
    bob_root, bob_file, bob_chunk = scene["bob_root"], scene["bob_file"], scene["bob_chunks"][0]
    now = time.time_ns()
    digest = hashlib.sha256(b"forged").digest()
    inserts_for_bob = [
        ("INSERT INTO inodes (user_id, mode, uid, gid, atime_ns, mtime_ns, ctime_ns)"
         " VALUES (%s, 33188, 0, 0, %s, %s, %s)", (bob, now, now, now)),
        ("INSERT INTO dentries (user_id, parent_ino, name, ino) VALUES (%s, %s, 'x', %s)",
         (bob, bob_root, bob_file)),
        ("INSERT INTO chunks (user_id, sha256, size, refcount) VALUES (%s, %s, 1, 1)", (bob, digest)),
        ("INSERT INTO file_chunks (user_id, ino, index, chunk_id) VALUES (%s, %s, 99, %s)",
         (bob, bob_file, bob_chunk)),
        ("INSERT INTO xattrs (user_id, ino, name, value) VALUES (%s, %s, 'user.x', 'y')",
         (bob, bob_file)),
        ("INSERT INTO damage (user_id, sha256, store, kind) VALUES (%s, %s, 'backup', 'corrupt')",
         (bob, digest)),
        ("INSERT INTO backup_queue (user_id, sha256) VALUES (%s, %s)", (bob, digest)),
        ("INSERT INTO usage (user_id) VALUES (%s)", (bob,)),
    ]
    for sql, params in inserts_for_bob:
        refusal = hostile.refused(sql, params)
        # (a name is refused before the row: B's directory does not exist for A)
        assert "row-level security" in refusal or "does not exist" in refusal, sql
    assert denied(hostile.refused(
        "INSERT INTO sessions (user_id, host, pid, expires_at) VALUES (%s, 'h', 1, now())", (bob,)))
    assert denied(hostile.refused(
        "INSERT INTO users (name) VALUES ('intruder')"))
    # Own rows that name B's rows: a foreign-key check bypasses RLS, the keys include the account.
    pointing_at_bob = [
        ("INSERT INTO dentries (user_id, parent_ino, name, ino) VALUES (%s, %s, 'squat', %s)",
         (alice, bob_root, scene["alice_root"])),
        ("INSERT INTO dentries (user_id, parent_ino, name, ino) VALUES (%s, %s, 'stolen', %s)",
         (alice, scene["alice_root"], bob_file)),
        ("INSERT INTO xattrs (user_id, ino, name, value) VALUES (%s, %s, 'user.x', 'y')",
         (alice, bob_file)),
        ("INSERT INTO file_chunks (user_id, ino, index, chunk_id)"
         " SELECT %s, id, 77, %s FROM inodes WHERE mode & 61440 = 32768 LIMIT 1", (alice, bob_chunk)),
    ]
    for sql, params in pointing_at_bob:
        refusal = hostile.refused(sql, params)
        assert "foreign key" in refusal or "does not exist" in refusal, sql
    # Handing one's own rows to B
    for table in ("inodes", "dentries", "chunks", "file_chunks", "xattrs", "damage", "backup_queue",
                  "usage"):
        if hostile.rows(f"SELECT count(*) FROM {table}") == [(0,)]:
            assert hostile.count(f"UPDATE {table} SET user_id = %s", (bob,)) == 0, table
        else:
            assert "row-level security" in hostile.refused(f"UPDATE {table} SET user_id = %s",
                                                           (bob,)), table


def test_every_function_called_with_b_ids(scene, hostile):
    """Each function of the schema, with B's account id, inode ids, chunk ids and name
    in every position its type allows: each fails, or changes nothing of B's (checked at
    the end of the module). The login functions are the lock-out test's."""
    skipped = {"dfsfs_login", "dfsfs_logout", "dfsfs_heartbeat"}  # own session; the lock-out test
    bob_ids = [scene["bob"], scene["bob_root"], scene["bob_file"], *scene["bob_chunks"][:1]]
    functions = hostile.rows(
        "SELECT p.proname, p.oid::regprocedure::text, p.proargtypes::regtype[]::text[]"
        " FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace ORDER BY 1")
    called = 0
    for name, signature, types in functions:
        if name in skipped:
            continue
        for bob_id in bob_ids:
            values = {"bigint": bob_id, "bigint[]": bob_ids, "text": "bob", "bytea": b"\0" * 32,
                      "bytea[]": [b"\0" * 32], "integer": 0, "integer[]": [0], "boolean": True,
                      "boolean[]": [True]}
            arguments = [values.get(t) for t in types]
            placeholders = ", ".join(["%s"] * len(arguments))
            try:
                hostile.rows(f"SELECT * FROM {name}({placeholders})", arguments)
            except psycopg2.Error:
                pass
            called += 1
    assert called > 60, functions


def test_no_ddl(scene, hostile):
    for table in ACCOUNT_TABLES + ("users",):
        policy = owner_rows(create_engine(scene["deployment"].env["DFSFS_DATABASE_URL"], pool_size=1),
                            "SELECT policyname FROM pg_policies WHERE tablename = :t LIMIT 1", t=table)[0][0]
        for statement in (f"DROP POLICY {policy} ON {table}",
                          f"ALTER POLICY {policy} ON {table} USING (true)",
                          f"CREATE POLICY mine ON {table} USING (true)",
                          f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY",
                          f"ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY",
                          f"ALTER TABLE {table} OWNER TO dfsfs_client",
                          f"DROP TABLE {table}"):
            assert denied(hostile.refused(statement)), statement
    for statement in ("DROP FUNCTION dfsfs_current_account()",
                      "ALTER FUNCTION dfsfs_current_account() SECURITY INVOKER",
                      "ALTER FUNCTION dfsfs_sees_all() OWNER TO dfsfs_client",
                      "CREATE OR REPLACE FUNCTION dfsfs_sees_all() RETURNS boolean"
                      " LANGUAGE sql AS 'SELECT true'"):
        assert denied(hostile.refused(statement)), statement
    for statement in ("CREATE FUNCTION public.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
                      "CREATE FUNCTION pg_temp.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
                      "CREATE TABLE public.mine (x int)", "CREATE TEMP TABLE mine (x int)",
                      "CREATE SCHEMA mine", "CREATE EXTENSION dblink", "CREATE EXTENSION pgcrypto",
                      "CREATE VIEW public.mine AS SELECT 1"):
        assert denied(hostile.refused(statement)), statement


def test_no_programs_or_server_files(hostile, tmp_path):
    marker = tmp_path / "ran"
    for statement in (f"COPY (SELECT 1) TO PROGRAM 'touch {marker}'",
                      f"COPY inodes FROM PROGRAM 'touch {marker}'",
                      "COPY (SELECT 1) TO '/tmp/dfsfs-hostile-copy'",
                      "SELECT pg_read_file('/etc/passwd')", "SELECT pg_ls_dir('/')",
                      "SELECT lo_import('/etc/passwd')", "SELECT lo_from_bytea(0, 'x')",
                      "SELECT pg_read_binary_file('/etc/hostname')"):
        assert denied(hostile.refused(statement)), statement
    assert not marker.exists() and not os.path.exists("/tmp/dfsfs-hostile-copy")
    assert "not supported" in hostile.refused("COPY inodes FROM STDIN")


def test_pg_stat_activity_shows_no_statement_of_other_backends(scene, hostile):
    marker = "bob-private-" + uuid.uuid4().hex
    victim = session_engine(scene["client_url"],
                            login(create_engine(scene["client_url"], pool_size=1), "bob", PASSWORD),
                            pool_size=1)
    started = threading.Event()

    def busy():
        with victim.connect() as conn:
            started.set()
            conn.execute(sa.text(f"SELECT pg_sleep(2), '{marker}', count(*) FROM inodes"))

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        started.wait(10)
        time.sleep(0.5)
        activity = hostile.rows("SELECT * FROM pg_stat_activity")
        everything = repr(activity) + repr(hostile.rows("SELECT * FROM pg_stat_get_activity(NULL)"))
        assert marker not in everything and "bob" not in everything.replace("bob_", "")
        assert "SELECT * FROM pg_stat_activity" not in everything  # even its own are not shown
        pids = [row[0] for row in hostile.rows("SELECT pid FROM pg_stat_activity WHERE pid <>"
                                               " pg_backend_pid() AND usename = current_user")]
        assert pids, "the victim's backend should be listed (only without its statement)"
        for pid in pids:
            assert denied(hostile.refused("SELECT pg_terminate_backend(%s)", (pid,)))
            assert denied(hostile.refused("SELECT pg_cancel_backend(%s)", (pid,)))
    finally:
        worker.join(30)
        victim.dispose()


# ---- the audit's attacks (issue 12) ------------------------------------------------------------


def test_swap_names_relabel_symlink_counters(scene, hostile):
    bob, bob_file, alice = scene["bob"], scene["bob_file"], scene["alice"]
    # swap two accounts' names (then A's password would open B's files)
    assert denied(hostile.refused(
        "UPDATE users SET name = CASE name WHEN 'alice' THEN 'bob' ELSE 'alice' END"))
    assert "administrator" in hostile.refused(
        "SELECT dfsfs_set_verifier('bob', 'argon2id', %s, 1, 8, 1, 32, %s)",
        (b"s" * 16, hashlib.sha256(b"x").digest()))
    assert "administrator" in hostile.refused(
        "SELECT * FROM dfsfs_create_account('eve', true, 0, 0, NULL, 'argon2id', %s, 1, 8, 1, 32, %s)",
        (b"s" * 16, hashlib.sha256(b"x").digest()))
    # relabel: B's inode as A's, or A's as B's
    assert hostile.count("UPDATE inodes SET user_id = %s WHERE id = %s", (alice, bob_file)) == 0
    # turn B's file into a symlink out of the mount
    assert hostile.count("UPDATE inodes SET mode = 41471, target = '/etc/shadow' WHERE id = %s",
                         (bob_file,)) == 0
    # a usage counter near 2^63
    assert hostile.count("UPDATE usage SET logical_bytes = %s, files = %s WHERE user_id = %s",
                         (INT64_MAX, INT64_MAX, bob)) == 0


def test_own_rows_hold_only_what_a_mount_can_serve(scene, hostile):
    """An account's raw SQL on its own rows cannot store what no mount writes (an unknown
    file type, a symlink with no usable target, sizes, xattrs or chunk indices out of
    range): the server refuses each, and the file stays as it was."""
    mine = hostile.rows("SELECT d.ino FROM dentries d JOIN users u ON u.root_ino = d.parent_ino"
                        " WHERE d.name = 'mine'")[0][0]
    attacks = [
        ("UPDATE inodes SET mode = 61440 | 420 WHERE id = %s", (mine,)),  # S_IFMT itself
        ("UPDATE inodes SET mode = 1048576 | 33188 WHERE id = %s", (mine,)),
        ("UPDATE inodes SET size = %s WHERE id = %s", (2**62, mine)),
        ("UPDATE inodes SET mode = 41471 WHERE id = %s", (mine,)),  # a symlink, no target
        ("UPDATE inodes SET mode = 41471, target = '' WHERE id = %s", (mine,)),
        ("UPDATE inodes SET mode = 41471, target = %s WHERE id = %s", (b"a\0b", mine)),
        ("UPDATE inodes SET mode = 41471, target = %s WHERE id = %s", (b"x" * 4096, mine)),
        ("UPDATE inodes SET target = '/etc/shadow' WHERE id = %s", (mine,)),  # a file's target
        ("INSERT INTO xattrs (user_id, ino, name, value) VALUES (%s, %s, %s, 'v')",
         (scene["alice"], mine, b"user." + b"n" * 300)),
        ("INSERT INTO xattrs (user_id, ino, name, value) VALUES (%s, %s, 'user.big', %s)",
         (scene["alice"], mine, b"v" * 65537)),
        ("UPDATE file_chunks SET index = -1 WHERE ino = %s", (mine,)),
        ("UPDATE file_chunks SET index = %s WHERE ino = %s", (2**40, mine)),
    ]
    rows = ("SELECT mode, size, target FROM inodes WHERE id = %s", "SELECT index, chunk_id FROM"
            " file_chunks WHERE ino = %s ORDER BY index", "SELECT name FROM xattrs WHERE ino = %s")
    before = [hostile.rows(sql, (mine,)) for sql in rows]
    for sql, params in attacks:
        assert "check constraint" in hostile.refused(sql, params), sql
    assert [hostile.rows(sql, (mine,)) for sql in rows] == before


def test_lock_out(scene, hostile, admin_engine):
    """B cannot be locked out for longer than the throttling allows, and a live session of
    B is not touched by failed logins."""
    assert denied(hostile.refused(
        "UPDATE users SET throttled_until = 'infinity', failed_logins = 1000000 WHERE name = 'carol'"))
    deployment = scene["deployment"]
    deployment.add_user("carol")
    carol_engine = session_engine(scene["client_url"],
                                  login(create_engine(scene["client_url"], pool_size=1), "carol", PASSWORD),
                                  pool_size=1)
    try:
        for _ in range(20):
            challenge = hostile.rows("SELECT nonce FROM dfsfs_login_challenge('carol')")[0][0]
            hostile.rows("SELECT outcome FROM dfsfs_login('carol', %s, %s, 'command', 'h', 1, false, 60)",
                         (challenge, b"\0" * 32))
        locked = owner_rows(admin_engine, "SELECT throttled_until - now() FROM users WHERE name = 'carol'")
        assert locked[0][0].total_seconds() <= 300
        with carol_engine.connect() as conn:  # carol's live session goes on
            assert conn.execute(sa.text("SELECT count(*) FROM inodes")).scalar() == 1
    finally:
        carol_engine.dispose()


# ---- afterwards --------------------------------------------------------------------------------


def test_every_table_the_client_can_use_is_scoped(admin_engine):
    """A guard for later migrations: a table the client role may read or write has forced
    row-level security and policies for the client role in terms of the scoping functions
    (layout and schema_version hold nothing of any account)."""
    tables = owner_rows(admin_engine, """
        SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity
          FROM pg_class c
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')
           AND (has_table_privilege('dfsfs_client', c.oid, 'SELECT')
                OR has_table_privilege('dfsfs_client', c.oid, 'INSERT')
                OR has_table_privilege('dfsfs_client', c.oid, 'UPDATE')
                OR has_table_privilege('dfsfs_client', c.oid, 'DELETE')
                OR has_any_column_privilege('dfsfs_client', c.oid, 'SELECT'))""")
    unscoped = [name for name, rls, forced in tables
                if name not in ("layout", "schema_version") and not (rls and forced)]
    assert not unscoped, f"tables the client role reaches without forced RLS: {unscoped}"
    policies = owner_rows(admin_engine, """
        SELECT tablename, qual FROM pg_policies
         WHERE schemaname = 'public' AND ('dfsfs_client' = ANY(roles) OR 'public' = ANY(roles))""")
    for table, qual in policies:
        assert any(scoping in qual for scoping in (
            "dfsfs_current_account()", "dfsfs_sees_all()", "dfsfs_bind()")), (table, qual)


def test_b_is_unchanged(scene, admin_engine):
    assert snapshot(admin_engine, scene["bob"]) == scene["rows"]
    assert user_stats(admin_engine, scene["bob"], 65536) == scene["stats"]
    with scene["deployment"].mount("bob") as mnt:
        assert tree_snapshot(mnt.path) == scene["files"]
        assert (mnt.path / "docs" / "secret.txt").read_bytes() == b"bob's secret\n" * 20000
