"""The `dfsfs` command: administration (init, accounts) here; mount, umount, stats and fsck
are added by their own modules (see the end of this file).

Who may do what is decided by the server (migration 7): `dfsfs init` needs the owner's
credentials; account management, `stats --all` and fsck of other accounts need the
owner's credentials or an administrator's login; everything else logs in as the account.

Exit codes: 0 ok, 1 error (`dfsfs: error: …` on stderr), 2 usage.
"""

import dataclasses
import functools
import getpass
import grp
import importlib
import json
import logging
import os
import pwd
import sys
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path

import click
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from dfsfs.auth import login, make_verifier, validate_user_name
from dfsfs.chunks.url import prepare_stores
from dfsfs.config import (
    CLIENT_ROLE,
    DEFAULT_CHUNK_SIZE,
    SECRET_ENVIRONMENT,
    DatabaseAccess,
    Settings,
    check_private_file,
    check_write_buffer_fits,
    database_access,
    default_data_dir,
    file_url_path,
    format_size,
    holds_secret,
    load_settings,
    normalise_store_url,
    parse_size,
    redact_url,
    system_config_file,
    take_secret_environment,
)
from dfsfs.errors import ConfigError, DfsfsError, ExistsError, PermissionDeniedError, StorageError
from dfsfs.meta.accounts import KEEP, AccountStore
from dfsfs.meta.db import create_engine, run_transaction
from dfsfs.meta.layout import record_chunk_size, recorded_chunk_size
from dfsfs.meta.migrations import LATEST_VERSION, migrate
from dfsfs.session import LoginResult, logout, session_engine

log = logging.getLogger(__name__)

PASSWORD_ENV = "DFSFS_PASSWORD"
UNDEFINED_TABLE = "42P01"
UNDEFINED_FUNCTION = "42883"
STORE_ROOT_MODE = 0o711  # others may enter a shared store root (to their own directory), not list it
ACCOUNT_DIRECTORY_MODE = 0o700


class CommandError(click.ClickException):
    """An error shown as `dfsfs: error: <message>` with exit code 1."""

    def show(self, file=None) -> None:
        click.echo(f"dfsfs: error: {self.format_message()}", err=True)


class DfsfsGroup(click.Group):
    """Turns domain and database errors of any subcommand into CommandError."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DfsfsError as error:
            raise CommandError(str(error)) from error
        except DBAPIError as error:
            raise CommandError(_database_error_message(error)) from error


def _database_error_message(error: DBAPIError) -> str:
    code = getattr(error.orig, "pgcode", None)
    if code == UNDEFINED_TABLE:
        return "the database has no dfsfs tables yet: run `dfsfs init` first"
    if code == UNDEFINED_FUNCTION:
        return "the database's dfsfs schema is missing or older than this dfsfs: run `dfsfs init`"
    # Only the driver's first line: SQLAlchemy's full text includes statement parameters.
    return f"database error: {str(error.orig).strip().splitlines()[0]}"


# --- settings and shared helpers for every command module ---------------------------------


class _State:
    def __init__(self, overrides: dict, verbosity: int, secrets: dict[str, str]):
        self.overrides = overrides
        self.verbosity = verbosity
        self.secrets = secrets  # taken out of the environment at start-up
        self.settings: Settings | None = None
        self.access: DatabaseAccess | None = None
        self.own_sessions: set[int] = set()  # sessions this command logged in with


def _state(ctx: click.Context | None = None) -> _State:
    return (ctx or click.get_current_context()).find_object(_State)


def get_settings(ctx: click.Context | None = None) -> Settings:
    """The validated settings of this invocation (loaded once, on first use, so that
    `--help` works even when the environment holds a bad value)."""
    state = _state(ctx)
    if state.settings is None:
        database_url = state.overrides.get("database_url")
        if database_url and holds_secret("database_url", database_url):
            raise ConfigError(
                "a database password must not be given on the command line, where every "
                "local user sees it (ps): put the URL in a config file of mode 600, or give "
                "the owner's URL in DFSFS_OWNER_URL")
        environ = {**os.environ, **state.secrets}
        state.settings = load_settings(state.overrides, environ=environ)
        configure_logging(_log_level(state.verbosity, state.settings.log_level))
        log.debug("settings: %r", state.settings)
    return state.settings


def pass_settings(command: Callable) -> Callable:
    """Decorator: call the command with the Settings as its first argument."""

    @click.pass_context
    def wrapper(ctx: click.Context, *args, **kwargs):
        return ctx.invoke(command, get_settings(ctx), *args, **kwargs)

    return functools.update_wrapper(wrapper, command)


def database(settings: Settings) -> DatabaseAccess:
    """How this invocation reaches the database (resolved once; may start the embedded
    server)."""
    state = _state()
    if state.access is None:
        state.access = database_access(settings)
    return state.access


def _on_close(callback: Callable[[], object]) -> None:
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(callback)


def open_engine(url: str, **options) -> Engine:
    """An engine on the metadata database, disposed when the command ends."""
    engine = create_engine(url, **options)
    _on_close(engine.dispose)
    return engine


def owner_engine(settings: Settings) -> Engine | None:
    """An engine of the owner role, when this user has its credentials; else None.

    Credentials given as such (owner_url) must work. Those only presumed — the embedded
    server's owner by peer authentication, a database URL of another role than the
    client's — are this user's if the server lets the connection in."""
    access = database(settings)
    if access.owner_url is None:
        return None
    engine = create_engine(access.owner_url, pool_size=2)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except DBAPIError as error:
        engine.dispose()
        if settings.owner_url is None and isinstance(error, OperationalError):
            log.debug("no owner credentials: %s", str(error.orig).strip().splitlines()[0])
            return None
        raise
    _on_close(engine.dispose)
    return engine


def client_engine(settings: Settings) -> Engine:
    """An engine of the client role without a session: it can log in, nothing more."""
    return open_engine(database(settings).client_url, pool_size=2)


def login_session(settings: Settings, name: str, password: str, *, purpose: str = "command",
                  admin: bool = False) -> tuple[LoginResult, Engine]:
    """Log in as `name`; return the login and an engine acting under its session, which
    is logged out and disposed when the command ends."""
    result = login(client_engine(settings), name, password, purpose=purpose, admin=admin,
                   expiry_s=int(settings.session_expiry_s))
    engine = create_engine(database(settings).client_url, session_token=result.token, pool_size=4)
    _state().own_sessions.add(result.session_id)

    def end() -> None:
        logout(engine)
        engine.dispose()

    _on_close(end)
    return result, engine


def admin_options(command: Callable) -> Callable:
    """Options of the commands that need administrator rights."""
    command = click.option(
        "--admin-password-file", type=click.Path(dir_okay=False, allow_dash=True),
        help="The administrator's password from this file (mode 600; '-': stdin).")(command)
    return click.option(
        "--admin-user", "admin_name", metavar="NAME",
        help="Log in as this administrator account instead of using the owner's "
             "credentials (default when you have none: your login name).")(command)


def administrator_engine(settings: Settings, admin_name: str | None,
                         admin_password_file: str | None) -> Engine:
    """An engine with administrator rights: the owner's credentials when this user has
    them (root for the embedded server), else the login of an administrator account."""
    if admin_name is None:
        engine = owner_engine(settings)
        if engine is not None:
            return engine
    name = admin_name or getpass.getuser()
    password = read_password(admin_password_file, confirm=False,
                             prompt=f"Password of dfsfs administrator {name}", environment=False)
    try:
        return login_session(settings, name, password, purpose="admin", admin=True)[1]
    except PermissionDeniedError:
        raise PermissionDeniedError(
            f"{name} is not a dfsfs administrator; this needs an administrator's login "
            "(--admin NAME) or the owner's credentials (root, for the embedded server)") from None


def account_engine(settings: Settings, name: str, admin_name: str | None,
                   admin_password_file: str | None, read_own_password: Callable[[], str]) -> Engine:
    """Rights over the account `name`: the owner's credentials or an administrator's
    login, or, for your own account (your login name), your own login."""
    if admin_name is None and name == getpass.getuser():
        engine = owner_engine(settings)
        if engine is not None:
            return engine
        return login_session(settings, name, read_own_password())[1]
    return administrator_engine(settings, admin_name, admin_password_file)


def open_accounts(settings: Settings, admin_name: str | None = None,
                  admin_password_file: str | None = None) -> AccountStore:
    """Account management with administrator rights (see administrator_engine)."""
    return AccountStore(administrator_engine(settings, admin_name, admin_password_file))


def with_recorded_layout(settings: Settings, engine: Engine) -> Settings:
    """The settings with the database's recorded chunk size (which every mount must use)."""
    recorded = recorded_chunk_size(engine)
    if recorded is None:
        raise CommandError("the database records no chunk size yet: run `dfsfs init`")
    if settings.chunk_size not in (None, recorded):
        click.echo(f"dfsfs: note: this database stores files in {format_size(recorded)} chunks; "
                   f"the configured chunk size ({format_size(settings.chunk_size)}) applies to "
                   "new databases only", err=True)
    check_write_buffer_fits(settings, recorded)
    return dataclasses.replace(settings, chunk_size=recorded)


def with_account_stores(settings: Settings, result: LoginResult) -> Settings:
    """The settings with the account's own chunk stores, if an administrator set any."""
    changes = {}
    if result.primary_store:
        changes["store_url"] = normalise_store_url(result.primary_store, "store")
    if result.backup_store:
        changes["backup_url"] = normalise_store_url(result.backup_store, "backup store")
    return dataclasses.replace(settings, **changes)


def mount_login(settings: Settings, name: str, password: str) -> tuple[Settings, str, LoginResult]:
    """Log in for a mount: (the settings the daemon uses, the client role's URL, the login).

    The session outlives this command: the daemon presents it, keeps it alive with its
    heartbeat and ends it when it unmounts."""
    result = login(client_engine(settings), name, password, purpose="mount",
                   expiry_s=int(settings.session_expiry_s))
    client_url = database(settings).client_url
    engine = session_engine(client_url, result, pool_size=1)
    try:
        settings = with_recorded_layout(with_account_stores(settings, result), engine)
        warn_about_client_role(engine)
    except BaseException:
        logout(engine)
        raise
    finally:
        engine.dispose()
    return settings, client_url, result


def read_password(password_file: str | Path | None, confirm: bool, prompt: str = "Password",
                  environment: bool = True) -> str:
    """A password from a file ('-' = stdin; one trailing newline dropped; the file must
    be private), else from DFSFS_PASSWORD (when `environment`), else prompted without echo
    (twice when `confirm`)."""
    if password_file is not None:
        return _read_password_file(password_file)
    secrets = _state().secrets
    if environment and secrets.get(PASSWORD_ENV):
        return secrets[PASSWORD_ENV]
    return click.prompt(prompt, hide_input=True, confirmation_prompt=confirm)


def _read_password_file(password_file: str | Path) -> str:
    if str(password_file) != "-":
        check_private_file(password_file, "a password")
    try:
        if str(password_file) == "-":
            text = sys.stdin.readline()
        else:
            text = Path(password_file).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read password file {password_file}: {error.strerror}") from None
    return text.removesuffix("\n").removesuffix("\r")


class _StderrHandler(logging.StreamHandler):
    """Writes to the current sys.stderr (which test runners swap), not the one at setup."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("dfsfs: %(levelname)s: %(name)s: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def configure_logging(level: str) -> None:
    logger = logging.getLogger("dfsfs")
    logger.setLevel(level)
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        logger.addHandler(_StderrHandler())


def _log_level(verbosity: int, configured: str) -> str:
    return {0: configured, 1: "INFO"}.get(verbosity, "DEBUG")


# --- the command group --------------------------------------------------------------------


@click.group(cls=DfsfsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--database-url", metavar="URL",
              help="PostgreSQL URL, without a password (default: embedded server).")
@click.option("--data-dir", metavar="DIR", help="Data directory of the embedded defaults.")
@click.option("--store", "store_url", metavar="URL", help="Primary chunk store (file://, s3://).")
@click.option("--backup", "backup_url", metavar="URL", help="Backup chunk store.")
@click.option("--chunk-size", metavar="SIZE", help="Chunk size, e.g. 1M (power of two).")
@click.option("--config", "config_file", metavar="FILE", help="TOML config file.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv: debug).")
@click.version_option(package_name="dfsfs")
@click.pass_context
def main(ctx: click.Context, verbose: int, **overrides) -> None:
    """dfsfs: a file system of checked, backed-up chunks with metadata in PostgreSQL."""
    # First of all: a daemon forked later must not carry secrets in its environment.
    ctx.obj = _State(overrides, verbose, take_secret_environment(SECRET_ENVIRONMENT))


@main.command()
@pass_settings
def init(settings: Settings) -> None:
    """Create or upgrade the metadata schema and the local chunk directories.

    Needs the owner's credentials: root for the embedded server, else the owner role's
    URL (owner_url in a config file of mode 600, or DFSFS_OWNER_URL). As root with the
    embedded default, also writes /etc/dfsfs/dfsfs.toml, from which every user of this
    machine mounts their own account against the shared server.
    """
    engine = owner_engine(settings)
    if engine is None:
        raise PermissionDeniedError(
            "dfsfs init needs the database owner's credentials: run it as root (embedded "
            "server), or give the owner role's URL in DFSFS_OWNER_URL or as owner_url in a "
            "config file of mode 600")
    applied = migrate(engine)
    recorded = record_chunk_size(engine, settings.chunk_size or DEFAULT_CHUNK_SIZE)
    if settings.chunk_size not in (None, recorded):
        click.echo(f"dfsfs: note: this database stores files in {format_size(recorded)} chunks "
                   "already; the configured chunk size is not used", err=True)
    for url in (settings.store_url, settings.backup_url):
        path = file_url_path(url)
        if path is not None:
            _make_store_root(path)
    prepare_stores(settings.store_url, "primary", settings.backup_url, "backup", report=click.echo)
    warn_about_client_role(engine)
    if applied:
        click.echo(f"applied migrations: {', '.join(map(str, applied))}")
    else:
        click.echo(f"database schema up to date (version {LATEST_VERSION})")
    if os.geteuid() == 0 and database(settings).embedded:
        _write_system_config(settings)


def _make_store_root(path: Path) -> None:
    """A local store's root: every account has its own directory in it (made by `user
    add`); a root shared by the accounts of several Linux users may be entered but not
    listed."""
    path.mkdir(mode=ACCOUNT_DIRECTORY_MODE, parents=True, exist_ok=True)
    if os.geteuid() == 0 and path.stat().st_uid == 0:
        path.chmod(STORE_ROOT_MODE)


def warn_about_client_role(engine: Engine) -> None:
    """The daemons of all accounts share the client role. A role sees the query text of its
    own backends in pg_stat_activity unless track_activities is off for it; and any role
    may set defaults for itself (an account could so weigh on every other account's
    daemon; the settings that matter are pinned, but not all). Say what needs fixing."""
    settings = run_transaction(engine, lambda conn: conn.execute(sa.text(
        "SELECT coalesce(array_agg(c ORDER BY c), '{}') FROM pg_db_role_setting s"
        " JOIN pg_roles r ON r.oid = s.setrole, unnest(s.setconfig) AS c"
        " WHERE r.rolname = :client AND s.setdatabase IN (0, (SELECT oid FROM pg_database"
        " WHERE datname = current_database()))"), {"client": CLIENT_ROLE}).scalar())
    fixes = []
    if "track_activities=off" not in settings:
        fixes.append(f"ALTER ROLE {CLIENT_ROLE} SET track_activities = off")
    unexpected = [setting for setting in settings if setting != "track_activities=off"]
    if unexpected:
        fixes[:0] = [f"ALTER ROLE {CLIENT_ROLE} RESET ALL",
                     f"ALTER ROLE {CLIENT_ROLE} IN DATABASE <this database> RESET ALL"]
        fixes.append(f"ALTER ROLE {CLIENT_ROLE} SET track_activities = off")
    if fixes:
        what = (f"has defaults someone set ({', '.join(unexpected)})" if unexpected else
                "lets daemons of different accounts see each other's statements in pg_stat_activity")
        click.echo(f"dfsfs: warning: the client role {CLIENT_ROLE} {what}: ask a superuser of "
                   f"the database to run: {'; '.join(dict.fromkeys(fixes))}", err=True)


def _write_system_config(settings: Settings) -> None:
    """/etc/dfsfs/dfsfs.toml for every user of this machine: the shared server and stores
    (nothing secret: it is world-readable). Written once; an administrator may edit it."""
    path = system_config_file()
    if path.exists() or (settings.data_dir != default_data_dir() and path == system_config_file({})):
        return  # (an explicit DFSFS_SYSTEM_CONFIG, or the system's own data directory)
    values = {"server_dir": str(database(settings).server_dir)}
    for name in ("store_url", "backup_url"):
        value = getattr(settings, name)
        if holds_secret(name, value):
            click.echo(f"dfsfs: note: {name} holds credentials: not written to {path}", err=True)
            continue
        values[name] = value
    lines = ["# The dfsfs system install, written by `dfsfs init`: every user of this machine",
             "# mounts their own account from this server and these stores. World-readable:",
             "# never put a secret here (see the README, \"Threat model\").", ""]
    lines += [f"{name} = {json.dumps(value)}" for name, value in values.items()]
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o644)
    click.echo(f"wrote {path}: users of this machine mount with `dfsfs mount DIR`")


# --- accounts -----------------------------------------------------------------------------


@main.group()
def user() -> None:
    """Manage accounts (administrators; `passwd` and `sessions` also for your own)."""


password_file_option = click.option(
    "--password-file",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Read the password from this file (mode 600; '-': stdin) instead of prompting.",
)


@user.command("add")
@click.argument("name")
@click.option("--admin", is_flag=True, help="Allow administrator commands.")
@click.option("--unix-user", metavar="LOGIN",
              help="The Linux user who owns the account's root directory and local chunk "
                   "directories (default: the Linux user NAME, if there is one).")
@password_file_option
@admin_options
@pass_settings
def user_add(settings: Settings, name: str, admin: bool, unix_user: str | None,
             password_file: str | None, admin_name: str | None,
             admin_password_file: str | None) -> None:
    """Create an account with an empty root directory."""
    validate_user_name(name)
    owner = _linux_owner(name, unix_user)
    accounts = open_accounts(settings, admin_name, admin_password_file)
    if accounts.get_user(name) is not None:
        raise ExistsError("a user with that name already exists")
    verifier = make_verifier(read_password(password_file, confirm=True))
    user_id = accounts.create_user(name, verifier, is_admin=admin, uid=owner.pw_uid,
                                   gid=owner.pw_gid, unix_user=owner.pw_name)
    click.echo(f"created user {name} (id {user_id})")
    for url in (settings.store_url, settings.backup_url):
        path = file_url_path(url)
        if path is not None:
            _make_account_directory(path, user_id, owner)


def _linux_owner(name: str, unix_user: str | None) -> pwd.struct_passwd:
    """Who owns the new account's files: --unix-user, else the Linux user of the
    account's name (when root creates it), else whoever runs the command."""
    if unix_user is not None:
        try:
            owner = pwd.getpwnam(unix_user)
        except KeyError:
            raise ConfigError(f"there is no Linux user {unix_user!r}") from None
        if os.geteuid() != 0 and owner.pw_uid != os.geteuid():
            raise PermissionDeniedError(
                f"only root can give the account's directories to {unix_user}")
        return owner
    if os.geteuid() == 0:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    return pwd.getpwuid(os.geteuid())


def _make_account_directory(store_root: Path, user_id: int, owner: pwd.struct_passwd) -> None:
    """STORE/<account id>, owned by the account's Linux user, mode 0700: its daemon (which
    runs as that user) writes chunks there, and no other user can list or read them."""
    directory = store_root / str(user_id)
    try:
        _make_store_root(store_root)
        directory.mkdir(mode=ACCOUNT_DIRECTORY_MODE, exist_ok=True)
        os.chown(directory, owner.pw_uid, owner.pw_gid)
        directory.chmod(ACCOUNT_DIRECTORY_MODE)
    except OSError as error:
        click.echo(f"dfsfs: warning: could not prepare {directory} for {owner.pw_name}: "
                   f"{error.strerror}; create it owned by {owner.pw_name}, mode 0700 (or run "
                   "`dfsfs user add` as root on the machine of that store)", err=True)


@user.command("passwd")
@click.argument("name", required=False)
@password_file_option
@click.option("--current-password-file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Changing your own password without owner credentials: the current one "
                   "from this file (mode 600) instead of a prompt.")
@admin_options
@pass_settings
def user_passwd(settings: Settings, name: str | None, password_file: str | None,
                current_password_file: str | None, admin_name: str | None,
                admin_password_file: str | None) -> None:
    """Set an account's password (also ends login throttling). NAME defaults to yours:
    you may change your own password with the current one; an administrator any."""
    name = name or getpass.getuser()
    engine = account_engine(
        settings, name, admin_name, admin_password_file,
        lambda: read_password(current_password_file, confirm=False,
                              prompt=f"Current password of {name}", environment=False))
    AccountStore(engine).set_verifier(name, make_verifier(read_password(password_file, True)))
    click.echo(f"password of {name} changed")


@user.command("remove")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@admin_options
@pass_settings
def user_remove(settings: Settings, name: str, yes: bool, admin_name: str | None,
                admin_password_file: str | None) -> None:
    """Delete an account with all its files and chunks."""
    accounts = open_accounts(settings, admin_name, admin_password_file)
    account = accounts.require_user(name)
    primary, backup = accounts.stores(name)
    store_url, backup_url = primary or settings.store_url, backup or settings.backup_url
    footprint = accounts.footprint(account.id)
    if not yes:
        click.confirm(
            f"Delete user {name} (id {account.id}) with {footprint.inodes} files and "
            f"directories and {footprint.chunks} chunks ({format_size(footprint.stored_bytes)}) "
            f"in {redact_url(store_url)} and {redact_url(backup_url)}?",
            abort=True,
        )
    digests = accounts.chunk_digests(account.id)
    accounts.remove_user(name)  # commit first: chunk files go only after their references
    failures = []
    for url, store_name in ((store_url, "primary"), (backup_url, "backup")):
        error = _delete_namespace(url, store_name, account.id, digests)
        if error:
            failures.append(error)
    if failures:
        raise StorageError(
            f"user {account.id} removed, but some of its chunk files remain "
            f"({'; '.join(failures)}); `dfsfs fsck --repair` removes orphan chunks"
        )
    click.echo(f"removed user {name} and {len(digests)} chunks")


def _delete_namespace(
    url: str, store_name: str, user_id: int, digests: Iterable[bytes]
) -> str | None:
    """Delete every chunk file of `user_id` from one store; return an error text or None."""
    from dfsfs.chunks.url import open_store

    try:
        store = open_store(url, store_name)
        try:
            listed = {digest for _namespace, digest in store.keys(user_id)}
            for digest in listed | set(digests):
                store.delete(user_id, digest)
        finally:
            store.close()
    except (DfsfsError, OSError) as error:
        log.warning("deleting chunks of user id %d from the %s store failed", user_id, store_name,
                    exc_info=True)
        return f"{store_name} store: {error}"
    return None


@user.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@admin_options
@pass_settings
def user_list(settings: Settings, as_json: bool, admin_name: str | None,
              admin_password_file: str | None) -> None:
    """List accounts."""
    accounts = open_accounts(settings, admin_name, admin_password_file).list_users()
    if as_json:
        click.echo(json.dumps([_account_json(account) for account in accounts], indent=2))
        return
    rows = [("ID", "NAME", "ADMIN", "QUOTA BYTES", "QUOTA INODES", "CREATED")]
    rows += [
        (
            str(account.id), account.name, "yes" if account.is_admin else "no",
            _quota_text(account.quota_bytes, format_size), _quota_text(account.quota_inodes, str),
            account.created_at.strftime("%Y-%m-%d %H:%M"),
        )
        for account in accounts
    ]
    _echo_table(rows)


def _account_json(account) -> dict:
    return {
        "id": account.id,
        "name": account.name,
        "is_admin": account.is_admin,
        "quota_bytes": account.quota_bytes,
        "quota_inodes": account.quota_inodes,
        "created_at": account.created_at.isoformat(),
        "unix_user": account.unix_user,
    }


def _quota_text(quota: int | None, show: Callable[[int], str]) -> str:
    return "unlimited" if quota is None else show(quota)


def _quota_value(parse: Callable[[str], int]) -> Callable:
    """A click callback: 'none' clears the quota; absent leaves it unchanged (KEEP)."""

    def callback(_ctx, param, value):
        if value is None:
            return KEEP
        if value.strip().lower() in ("none", "unlimited"):
            return None
        try:
            return parse(value)
        except (DfsfsError, ValueError) as error:
            raise click.BadParameter(str(error), param=param) from None

    return callback


def _parse_inode_count(value: str) -> int:
    count = int(value)
    if count < 0:
        raise ValueError(f"must not be negative, not {value!r}")
    return count


@user.command("quota")
@click.argument("name")
@click.option("--bytes", "quota_bytes", metavar="SIZE|none",
              callback=_quota_value(lambda value: parse_size(value, "byte quota")),
              help="Logical bytes allowed, e.g. 10G; 'none' = unlimited.")
@click.option("--inodes", "quota_inodes", metavar="COUNT|none",
              callback=_quota_value(_parse_inode_count),
              help="Files, directories and symlinks allowed; 'none' = unlimited.")
@admin_options
@pass_settings
def user_quota(settings: Settings, name: str, quota_bytes, quota_inodes, admin_name: str | None,
               admin_password_file: str | None) -> None:
    """Set or clear an account's quotas."""
    if quota_bytes is KEEP and quota_inodes is KEEP:
        raise click.UsageError("give --bytes and/or --inodes")
    accounts = open_accounts(settings, admin_name, admin_password_file)
    account = accounts.set_quota(name, quota_bytes, quota_inodes)
    click.echo(
        f"quota of {name}: bytes {_quota_text(account.quota_bytes, format_size)}, "
        f"inodes {_quota_text(account.quota_inodes, str)}"
    )


def _revocation(_ctx, param, value):
    if value is None or value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter("give a session id or 'all'", param=param) from None


@user.command("sessions")
@click.argument("name", required=False)
@click.option("--revoke", metavar="ID|all", callback=_revocation,
              help="End this live session (or all): its daemon unmounts.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@password_file_option
@admin_options
@pass_settings
def user_sessions(settings: Settings, name: str | None, revoke, as_json: bool,
                  password_file: str | None, admin_name: str | None,
                  admin_password_file: str | None) -> None:
    """List an account's login sessions (mounts and commands), newest first; with
    --revoke, end one or all. NAME defaults to yours: your own need your password, any
    other account an administrator's."""
    name = name or getpass.getuser()
    engine = account_engine(settings, name, admin_name, admin_password_file,
                            lambda: read_password(password_file, confirm=False))
    accounts = AccountStore(engine)
    if revoke is not None:
        ended = accounts.revoke_sessions(name, None if revoke == "all" else revoke)
        if revoke != "all" and ended == 0:
            raise CommandError(f"{name} has no live session {revoke}")
        click.echo(f"revoked {ended} session(s) of {name}")
        return
    own = _state().own_sessions
    sessions = [s for s in accounts.sessions(name) if s.id not in own]
    if as_json:
        click.echo(json.dumps([{**dataclasses.asdict(s), "live": s.live} for s in sessions],
                              indent=2, default=str))
        return
    rows = [("ID", "STATE", "PURPOSE", "HOST", "PID", "STARTED", "LAST HEARTBEAT", "ENDS")]
    rows += [
        (str(s.id), "live" if s.live else s.end_reason or "ended",
         s.purpose + (" (admin)" if s.admin else ""), s.host, str(s.pid), _time(s.started_at),
         _time(s.heartbeat_at), _time(s.ended_at or s.expires_at))
        for s in sessions
    ]
    _echo_table(rows)


def _time(moment) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _echo_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@user.command("stores")
@click.argument("name")
@click.option("--credentials-file", type=click.Path(dir_okay=False, exists=True),
              help="A TOML file (mode 600) with primary = \"s3://…\" and/or backup = "
                   "\"s3://…\": the account's own stores, with its own keys.")
@click.option("--clear", is_flag=True, help="Use the configured stores again.")
@admin_options
@pass_settings
def user_stores(settings: Settings, name: str, credentials_file: str | None, clear: bool,
                admin_name: str | None, admin_password_file: str | None) -> None:
    """Give an account chunk stores of its own (S3 buckets or keys that reach its data
    only); its daemons get them from the server at login. The URLs hold keys: they come
    from a private file, never from the command line."""
    if clear == (credentials_file is not None):
        raise click.UsageError("give --credentials-file FILE or --clear")
    primary = backup = None
    if credentials_file is not None:
        primary, backup = _read_store_credentials(Path(credentials_file))
    accounts = open_accounts(settings, admin_name, admin_password_file)
    accounts.set_stores(name, primary, backup)
    click.echo(f"stores of {name}: primary {redact_url(primary) if primary else '(configured)'}, "
               f"backup {redact_url(backup) if backup else '(configured)'}")


def _read_store_credentials(path: Path) -> tuple[str | None, str | None]:
    check_private_file(path, "store credentials")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read store credentials {path}: {error}") from None
    unknown = set(values) - {"primary", "backup"}
    if unknown or not values:
        raise ConfigError(f"{path} must set primary and/or backup (store URLs), nothing else")
    from dfsfs.chunks.url import open_store

    urls = []
    for role in ("primary", "backup"):
        url = values.get(role)
        if url is not None:
            url = normalise_store_url(str(url), f"{role} store")
            open_store(url, role).close()  # a bad URL is refused here, redacted
        urls.append(url)
    return urls[0], urls[1]


# --- commands from other modules: mount/umount (cli_mount), stats (cli_stats), fsck (cli_fsck)
# Each module defines `command` (one click command) or `commands` (a list of them); it may
# import the helpers above (get_settings, pass_settings, read_password, open_engine).

COMMAND_MODULES = ("dfsfs.cli_mount", "dfsfs.cli_stats", "dfsfs.cli_fsck", "dfsfs.cli_server")


def _register_command_modules() -> None:
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise  # the module exists but something it imports does not
            continue
        found = getattr(module, "commands", None) or [getattr(module, "command", None)]
        for command in filter(None, found):
            main.add_command(command)


_register_command_modules()
