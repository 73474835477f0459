"""`dfsfs init` and `dfsfs user …` through click's CliRunner on a real PostgreSQL."""

import hashlib
import json
import logging
import time
import uuid

import pytest
from click.testing import CliRunner

from dfsfs import auth
from dfsfs.chunks.url import open_store
from dfsfs.cli import main
from dfsfs.config import ENVIRONMENT, GiB
from dfsfs.auth import make_verifier
from dfsfs.errors import AuthError
from dfsfs.meta.accounts import AccountStore
from dfsfs.meta.db import create_engine
from dfsfs.meta.migrations import LATEST_VERSION
from dfsfs.meta.schema import chunks, dentries, file_chunks, inodes

PASSWORD = "s3cret-Passw0rd!"


@pytest.fixture
def dfsfs(database_url, tmp_path, monkeypatch):
    """Run `dfsfs ARGS…` against the module's database with stores under tmp_path."""
    for variable in [*ENVIRONMENT.values(), "DFSFS_PASSWORD"]:
        monkeypatch.delenv(variable, raising=False)
    logger = logging.getLogger("dfsfs")
    saved = (logger.level, list(logger.handlers))

    def run(*args: str, url: str = database_url, input: str | None = None, env=None):
        environment = {"DFSFS_DATABASE_URL": url, "DFSFS_DATA_DIR": str(tmp_path), **(env or {})}
        return CliRunner().invoke(main, list(args), input=input, env=environment)

    yield run
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]


def private_file(path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o600)  # a file holding secrets that others may read is refused
    return str(path)


@pytest.fixture
def password_file(tmp_path):
    return private_file(tmp_path / "password", PASSWORD + "\n")


@pytest.fixture
def accounts(admin_engine) -> AccountStore:
    return AccountStore(admin_engine)


def new_name() -> str:
    return "u" + uuid.uuid4().hex[:12]


def listed(dfsfs) -> dict[str, dict]:
    result = dfsfs("user", "list", "--json")
    assert result.exit_code == 0, result.output
    return {account["name"]: account for account in json.loads(result.stdout)}


def test_init_applies_migrations_once_and_creates_store_directories(
    dfsfs, database_factory, tmp_path
):
    url = database_factory()
    first = dfsfs("init", url=url)
    assert first.exit_code == 0, first.output
    assert first.stdout == f"applied migrations: {', '.join(map(str, range(1, LATEST_VERSION + 1)))}\n"
    second = dfsfs("init", url=url)
    assert second.exit_code == 0, second.output
    assert "up to date" in second.stdout
    assert (tmp_path / "chunks").is_dir() and (tmp_path / "backup").is_dir()


def test_commands_before_init_say_to_run_init(dfsfs, database_factory):
    result = dfsfs("user", "list", url=database_factory())
    assert result.exit_code == 1
    assert result.stderr.startswith("dfsfs: error: the database") and "run `dfsfs init`" in result.stderr


def test_add_and_list(dfsfs, password_file, accounts):
    name = new_name()
    result = dfsfs("user", "add", name, "--admin", "--password-file", password_file)
    assert result.exit_code == 0, result.output
    account = listed(dfsfs)[name]
    assert account["is_admin"] is True and account["quota_bytes"] is None
    assert auth.login(accounts, name, PASSWORD).account == account["id"]

    table = dfsfs("user", "list").stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "NAME", "ADMIN"]
    assert any(line.split()[1:3] == [name, "yes"] for line in table[1:])


def test_add_prompts_twice_or_reads_the_environment(dfsfs, accounts):
    prompted, from_env = new_name(), new_name()
    result = dfsfs("user", "add", prompted, input=f"{PASSWORD}\n{PASSWORD}\n")
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    result = dfsfs("user", "add", from_env, env={"DFSFS_PASSWORD": PASSWORD})
    assert result.exit_code == 0, result.output
    for name in (prompted, from_env):
        auth.login(accounts, name, PASSWORD)


def test_add_refuses_duplicates_and_bad_names(dfsfs, password_file):
    name = new_name()
    assert dfsfs("user", "add", name, "--password-file", password_file).exit_code == 0
    again = dfsfs("user", "add", name, "--password-file", password_file)
    assert again.exit_code == 1
    assert again.stderr == "dfsfs: error: a user with that name already exists\n"

    bad = dfsfs("user", "add", "Bad Name", "--password-file", password_file)
    assert bad.exit_code == 1
    assert "user name may contain only lower-case letters" in bad.stderr
    assert "Bad Name" not in listed(dfsfs)


def test_empty_password_is_refused(dfsfs, tmp_path):
    empty = private_file(tmp_path / "empty", "\n")
    result = dfsfs("user", "add", new_name(), "--password-file", empty)
    assert result.exit_code == 1
    assert result.stderr == "dfsfs: error: password must not be empty\n"


def test_passwd_changes_the_password(dfsfs, password_file, accounts, tmp_path):
    name = new_name()
    dfsfs("user", "add", name, "--password-file", password_file)
    new_password = private_file(tmp_path / "new", "another password")
    result = dfsfs("user", "passwd", name, "--password-file", str(new_password))
    assert result.exit_code == 0, result.output
    auth.login(accounts, name, "another password")
    with pytest.raises(AuthError):
        auth.login(accounts, name, PASSWORD)

    missing = dfsfs("user", "passwd", new_name(), "--password-file", str(new_password))
    assert (missing.exit_code, missing.stderr) == (1, "dfsfs: error: no user with that name\n")


def test_quota_set_and_clear(dfsfs, password_file):
    name = new_name()
    dfsfs("user", "add", name, "--password-file", password_file)
    result = dfsfs("user", "quota", name, "--bytes", "10G", "--inodes", "100000")
    assert result.exit_code == 0, result.output
    assert (listed(dfsfs)[name]["quota_bytes"], listed(dfsfs)[name]["quota_inodes"]) == (
        10 * GiB, 100000,
    )
    assert dfsfs("user", "quota", name, "--bytes", "none").exit_code == 0
    assert (listed(dfsfs)[name]["quota_bytes"], listed(dfsfs)[name]["quota_inodes"]) == (
        None, 100000,
    )
    assert dfsfs("user", "quota", name).exit_code == 2
    bogus = dfsfs("user", "quota", name, "--bytes", "lots")
    assert bogus.exit_code == 2 and "byte quota must be a number of bytes" in bogus.stderr
    assert dfsfs("user", "quota", new_name(), "--inodes", "5").exit_code == 1


def give_a_file(admin_engine, user_id: int, root_ino: int, data: bytes) -> bytes:
    """Metadata of a one-chunk file, as the metadata store would write it."""
    digest = hashlib.sha256(data).digest()
    now_ns = time.time_ns()
    with admin_engine.begin() as conn:
        ino = conn.execute(
            inodes.insert()
            .values(user_id=user_id, mode=0o100644, uid=0, gid=0, size=len(data),
                    atime_ns=now_ns, mtime_ns=now_ns, ctime_ns=now_ns)
            .returning(inodes.c.id)
        ).scalar_one()
        conn.execute(dentries.insert().values(user_id=user_id, parent_ino=root_ino,
                                              name=b"file", ino=ino))
        chunk_id = conn.execute(
            chunks.insert()
            .values(user_id=user_id, sha256=digest, size=len(data), refcount=1)
            .returning(chunks.c.id)
        ).scalar_one()
        conn.execute(file_chunks.insert().values(user_id=user_id, ino=ino, index=0,
                                                 chunk_id=chunk_id))
    return digest


def test_remove_deletes_rows_and_chunk_files_after_confirmation(
    dfsfs, password_file, accounts, admin_engine, tmp_path
):
    doomed, kept = new_name(), new_name()
    for name in (doomed, kept):
        dfsfs("user", "add", name, "--password-file", password_file)
    stores = [open_store(f"file://{tmp_path}/{kind}", kind) for kind in ("chunks", "backup")]
    for account in map(accounts.get_user, (doomed, kept)):
        data = f"the data of {account.id}".encode()
        digest = give_a_file(admin_engine, account.id, account.root_ino, data)
        for store in stores:
            store.put(account.id, digest, data)
    doomed_id, kept_id = accounts.get_user(doomed).id, accounts.get_user(kept).id

    declined = dfsfs("user", "remove", doomed, input="n\n")
    assert declined.exit_code == 1
    assert "2 files and directories and 1 chunks" in declined.stdout
    assert accounts.get_user(doomed) is not None

    removed = dfsfs("user", "remove", doomed, "--yes")
    assert removed.exit_code == 0, removed.output
    assert accounts.get_user(doomed) is None
    assert accounts.footprint(doomed_id).inodes == 0
    for store in stores:
        assert list(store.keys(doomed_id)) == []
        assert len(list(store.keys(kept_id))) == 1
    assert accounts.footprint(kept_id).chunks == 1

    again = dfsfs("user", "remove", doomed, "--yes")
    assert (again.exit_code, again.stderr) == (1, "dfsfs: error: no user with that name\n")


def test_names_and_passwords_never_reach_logs_or_stderr(dfsfs, password_file, accounts, caplog):
    caplog.set_level(logging.DEBUG, logger="dfsfs")  # (in-process CLI runs set its level)
    name = "zed_" + uuid.uuid4().hex[:8]
    results = [
        dfsfs("-vv", "user", "add", name, "--password-file", password_file),
        dfsfs("-vv", "user", "passwd", name, env={"DFSFS_PASSWORD": PASSWORD}),
        dfsfs("-vv", "user", "add", name, "--password-file", password_file),  # duplicate
        dfsfs("-vv", "user", "quota", name, "--inodes", "10"),
        dfsfs("-vv", "user", "list"),
    ]
    for password in (PASSWORD, "wrong", "wrong", "wrong", "wrong"):
        try:
            auth.login(accounts, name, password)
        except AuthError:
            pass
    results.append(dfsfs("-vv", "user", "remove", name, "--yes"))
    assert "DEBUG" in caplog.text  # -vv did turn debug logging on
    stderr = "".join(result.stderr for result in results)
    for secret in (name, PASSWORD):
        assert secret not in caplog.text
        assert secret not in stderr


# ---- rights checked by the server ------------------------------------------------------------


@pytest.fixture
def admin_account(accounts, tmp_path) -> tuple[str, str]:
    """An administrator account: (name, its password file)."""
    name = "adm_" + uuid.uuid4().hex[:8]
    accounts.create_user(name, make_verifier("admin-pw"), is_admin=True)
    return name, private_file(tmp_path / "admin-pw", "admin-pw\n")


def test_without_owner_credentials_an_administrator_login_is_needed(
        dfsfs, client_url, accounts, admin_account, password_file, tmp_path):
    admin, admin_pw = admin_account
    name = new_name()
    as_admin = ("--admin-user", admin, "--admin-password-file", admin_pw)
    added = dfsfs("user", "add", name, "--password-file", password_file, *as_admin, url=client_url)
    assert added.exit_code == 0, added.output
    listing = dfsfs("user", "list", "--json", *as_admin, url=client_url)
    assert name in {a["name"] for a in json.loads(listing.stdout)}
    assert dfsfs("user", "quota", name, "--inodes", "7", *as_admin, url=client_url).exit_code == 0
    assert accounts.get_user(name).quota_inodes == 7

    plain_pw = private_file(tmp_path / "plain-pw", PASSWORD)
    for command in (("user", "list"), ("user", "quota", admin, "--inodes", "1"),
                    ("user", "remove", admin, "--yes"), ("user", "passwd", admin),
                    ("user", "add", new_name()), ("stats", "--all")):
        refused = dfsfs(*command, "--admin-user", name, "--admin-password-file", plain_pw,
                        url=client_url, env={"DFSFS_PASSWORD": "whatever-new"})
        assert refused.exit_code == 1, (command, refused.output)
        assert f"{name} is not a dfsfs administrator" in refused.stderr, (command, refused.stderr)
    wrong = dfsfs("user", "list", "--admin-user", admin, "--admin-password-file", plain_pw,
                  url=client_url)
    assert (wrong.exit_code, wrong.stderr) == (1, "dfsfs: error: wrong user name or password\n")
    assert accounts.get_user(admin).quota_inodes is None and accounts.get_user(admin).is_admin


def test_init_needs_the_owner(dfsfs, client_url):
    result = dfsfs("init", url=client_url)
    assert result.exit_code == 1 and "needs the database owner's credentials" in result.stderr


def test_an_account_changes_its_own_password_with_the_current_one(
        dfsfs, client_url, accounts, password_file, tmp_path, monkeypatch):
    name = new_name()
    accounts.create_user(name, make_verifier(PASSWORD))
    monkeypatch.setattr("getpass.getuser", lambda: name)
    new = private_file(tmp_path / "new", "brand new one")
    wrong = private_file(tmp_path / "wrong", "not the current one")
    refused = dfsfs("user", "passwd", "--password-file", new, "--current-password-file", wrong,
                    url=client_url)
    assert refused.exit_code == 1 and "wrong user name or password" in refused.stderr
    changed = dfsfs("user", "passwd", "--password-file", new, "--current-password-file",
                    password_file, url=client_url)
    assert changed.exit_code == 0, changed.output
    assert auth.login(accounts, name, "brand new one").name == name


def test_sessions_are_listed_and_revoked(dfsfs, client_url, accounts, admin_account):
    admin, admin_pw = admin_account
    name = new_name()
    accounts.create_user(name, make_verifier(PASSWORD))
    first = auth.login(accounts, name, PASSWORD, purpose="mount")
    auth.login(accounts, name, PASSWORD)
    as_admin = ("--admin-user", admin, "--admin-password-file", admin_pw)
    listed_sessions = json.loads(dfsfs("user", "sessions", name, "--json", *as_admin,
                                       url=client_url).stdout)
    assert [s["purpose"] for s in listed_sessions] == ["command", "mount"]
    assert all(s["live"] for s in listed_sessions)
    table = dfsfs("user", "sessions", name, *as_admin, url=client_url).stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "STATE", "PURPOSE"] and len(table) == 3
    revoked = dfsfs("user", "sessions", name, "--revoke", str(first.session_id), *as_admin,
                    url=client_url)
    assert (revoked.exit_code, revoked.stdout) == (0, f"revoked 1 session(s) of {name}\n")
    again = dfsfs("user", "sessions", name, "--revoke", str(first.session_id), *as_admin,
                  url=client_url)
    assert again.exit_code == 1 and "no live session" in again.stderr
    assert dfsfs("user", "sessions", name, "--revoke", "all", *as_admin,
                 url=client_url).stdout == f"revoked 1 session(s) of {name}\n"
    states = {s.id: s.end_reason for s in accounts.sessions(name)}
    assert set(states.values()) == {"revoked"}


def test_secret_files_others_can_read_are_refused(dfsfs, tmp_path):
    loose = tmp_path / "loose"
    loose.write_text(PASSWORD)
    loose.chmod(0o640)
    result = dfsfs("user", "add", new_name(), "--password-file", str(loose))
    assert result.exit_code == 1
    assert f"{loose} holds a password but others may access it (mode 640)" in result.stderr
    config = tmp_path / "config.toml"
    config.write_text('owner_url = "postgresql://dfsfs:s3cr3t@db/dfsfs"\n')
    config.chmod(0o644)
    result = dfsfs("--config", str(config), "user", "list")
    assert result.exit_code == 1 and f"{config} holds secrets (owner_url)" in result.stderr
    assert "s3cr3t" not in result.output


def test_no_database_password_on_the_command_line(dfsfs):
    result = dfsfs("--database-url", "postgresql://dfsfs:hunter2@/x?host=/nowhere", "user", "list")
    assert result.exit_code == 1 and "must not be given on the command line" in result.stderr
    assert "hunter2" not in result.output


def test_an_account_gets_stores_of_its_own(dfsfs, accounts, tmp_path):
    name = new_name()
    accounts.create_user(name, make_verifier(PASSWORD))
    credentials = private_file(tmp_path / "stores.toml",
                               f'primary = "file://{tmp_path}/own-primary"\n'
                               f'backup = "file://{tmp_path}/own-backup"\n')
    result = dfsfs("user", "stores", name, "--credentials-file", credentials)
    assert result.exit_code == 0, result.output
    assert accounts.stores(name) == (f"file://{tmp_path}/own-primary", f"file://{tmp_path}/own-backup")
    login = auth.login(accounts, name, PASSWORD)
    assert (login.primary_store, login.backup_store) == accounts.stores(name)
    assert dfsfs("user", "stores", name, "--clear").exit_code == 0
    assert accounts.stores(name) == (None, None)


def test_client_role_defaults_someone_set_are_reported(dfsfs, database_url, admin_engine, client_url):
    engine = create_engine(client_url, pool_size=1)
    try:
        with engine.begin() as conn:  # what any account may do to the role it shares
            conn.exec_driver_sql("ALTER ROLE dfsfs_client SET work_mem = '64kB'")
        result = dfsfs("init")
        assert result.exit_code == 0, result.output
        assert "has defaults someone set (work_mem=64kB)" in result.stderr
        assert "ALTER ROLE dfsfs_client RESET ALL" in result.stderr
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER ROLE dfsfs_client RESET ALL")
        engine.dispose()
    assert "warning" not in dfsfs("init").stderr
