"""The `dfsfs` command: administration (init, accounts) here; mount, umount, stats and fsck
are added by their own modules (see the end of this file).

Exit codes: 0 ok, 1 error (`dfsfs: error: …` on stderr), 2 usage.
"""

import dataclasses
import functools
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import click
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from dfsfs.auth import hash_password, validate_user_name
from dfsfs.chunks.url import prepare_stores
from dfsfs.config import (
    DEFAULT_CHUNK_SIZE,
    Settings,
    check_write_buffer_fits,
    database_url_for,
    file_url_path,
    format_size,
    load_settings,
    parse_size,
    redact_url,
)
from dfsfs.errors import ConfigError, DfsfsError, ExistsError, StorageError
from dfsfs.meta.accounts import KEEP, AccountStore
from dfsfs.meta.db import create_engine
from dfsfs.meta.layout import record_chunk_size, recorded_chunk_size
from dfsfs.meta.migrations import LATEST_VERSION, migrate

log = logging.getLogger(__name__)

PASSWORD_ENV = "DFSFS_PASSWORD"
UNDEFINED_TABLE = "42P01"


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
    if getattr(error.orig, "pgcode", None) == UNDEFINED_TABLE:
        return "the database has no dfsfs tables yet: run `dfsfs init` first"
    # Only the driver's first line: SQLAlchemy's full text includes statement parameters.
    return f"database error: {str(error.orig).strip().splitlines()[0]}"


# --- settings and shared helpers for every command module ---------------------------------


class _State:
    def __init__(self, overrides: dict, verbosity: int):
        self.overrides = overrides
        self.verbosity = verbosity
        self.settings: Settings | None = None


def get_settings(ctx: click.Context | None = None) -> Settings:
    """The validated settings of this invocation (loaded once, on first use, so that
    `--help` works even when the environment holds a bad value)."""
    ctx = ctx or click.get_current_context()
    state = ctx.find_object(_State)
    if state.settings is None:
        state.settings = load_settings(state.overrides)
        configure_logging(_log_level(state.verbosity, state.settings.log_level))
        log.debug("settings: %r", state.settings)
    return state.settings


def pass_settings(command: Callable) -> Callable:
    """Decorator: call the command with the Settings as its first argument."""

    @click.pass_context
    def wrapper(ctx: click.Context, *args, **kwargs):
        return ctx.invoke(command, get_settings(ctx), *args, **kwargs)

    return functools.update_wrapper(wrapper, command)


def open_engine(settings: Settings, admin: bool = True, user_id: int | None = None) -> Engine:
    """An engine on the metadata database, disposed when the command ends."""
    engine = create_engine(database_url_for(settings), admin=admin, user_id=user_id)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(engine.dispose)
    return engine


def open_accounts(settings: Settings) -> AccountStore:
    return AccountStore(open_engine(settings, admin=True))


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


def read_password(password_file: str | Path | None, confirm: bool) -> str:
    """A password from a file ('-' = stdin; one trailing newline dropped), else from
    DFSFS_PASSWORD, else prompted without echo (twice when `confirm`)."""
    if password_file is not None:
        return _read_password_file(password_file)
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    return click.prompt("Password", hide_input=True, confirmation_prompt=confirm)


def _read_password_file(password_file: str | Path) -> str:
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
@click.option("--database-url", metavar="URL", help="PostgreSQL URL (default: embedded server).")
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
    ctx.obj = _State(overrides, verbose)


@main.command()
@pass_settings
def init(settings: Settings) -> None:
    """Create or upgrade the metadata schema and the local chunk directories."""
    engine = open_engine(settings)
    applied = migrate(engine)
    recorded = record_chunk_size(engine, settings.chunk_size or DEFAULT_CHUNK_SIZE)
    if settings.chunk_size not in (None, recorded):
        click.echo(f"dfsfs: note: this database stores files in {format_size(recorded)} chunks "
                   "already; the configured chunk size is not used", err=True)
    for url in (settings.store_url, settings.backup_url):
        path = file_url_path(url)
        if path is not None:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
    prepare_stores(settings.store_url, "primary", settings.backup_url, "backup", report=click.echo)
    if applied:
        click.echo(f"applied migrations: {', '.join(map(str, applied))}")
    else:
        click.echo(f"database schema up to date (version {LATEST_VERSION})")


# --- accounts -----------------------------------------------------------------------------


@main.group()
def user() -> None:
    """Manage accounts."""


password_file_option = click.option(
    "--password-file",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Read the password from this file ('-': stdin) instead of prompting.",
)


@user.command("add")
@click.argument("name")
@click.option("--admin", is_flag=True, help="Allow administrator commands.")
@password_file_option
@pass_settings
def user_add(settings: Settings, name: str, admin: bool, password_file: str | None) -> None:
    """Create an account with an empty root directory."""
    validate_user_name(name)
    accounts = open_accounts(settings)
    if accounts.get_user(name) is not None:
        raise ExistsError("a user with that name already exists")
    password_hash = hash_password(read_password(password_file, confirm=True))
    user_id = accounts.create_user(name, password_hash, is_admin=admin)
    click.echo(f"created user {name} (id {user_id})")


@user.command("passwd")
@click.argument("name")
@password_file_option
@pass_settings
def user_passwd(settings: Settings, name: str, password_file: str | None) -> None:
    """Set an account's password (also ends login throttling)."""
    accounts = open_accounts(settings)
    account = accounts.require_user(name)
    accounts.set_password_hash(account.id, hash_password(read_password(password_file, True)))
    click.echo(f"password of {name} changed")


@user.command("remove")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_settings
def user_remove(settings: Settings, name: str, yes: bool) -> None:
    """Delete an account with all its files and chunks."""
    accounts = open_accounts(settings)
    account = accounts.require_user(name)
    footprint = accounts.footprint(account.id)
    if not yes:
        click.confirm(
            f"Delete user {name} (id {account.id}) with {footprint.inodes} files and "
            f"directories and {footprint.chunks} chunks ({format_size(footprint.stored_bytes)}) "
            f"in {redact_url(settings.store_url)} and {redact_url(settings.backup_url)}?",
            abort=True,
        )
    digests = accounts.chunk_digests(account.id)
    accounts.remove_user(name)  # commit first: chunk files go only after their references
    failures = []
    for url, store_name in ((settings.store_url, "primary"), (settings.backup_url, "backup")):
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
@pass_settings
def user_list(settings: Settings, as_json: bool) -> None:
    """List accounts."""
    accounts = open_accounts(settings).list_users()
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
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _account_json(account) -> dict:
    return {
        "id": account.id,
        "name": account.name,
        "is_admin": account.is_admin,
        "quota_bytes": account.quota_bytes,
        "quota_inodes": account.quota_inodes,
        "created_at": account.created_at.isoformat(),
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
@pass_settings
def user_quota(settings: Settings, name: str, quota_bytes, quota_inodes) -> None:
    """Set or clear an account's quotas."""
    if quota_bytes is KEEP and quota_inodes is KEEP:
        raise click.UsageError("give --bytes and/or --inodes")
    account = open_accounts(settings).set_quota(name, quota_bytes, quota_inodes)
    click.echo(
        f"quota of {name}: bytes {_quota_text(account.quota_bytes, format_size)}, "
        f"inodes {_quota_text(account.quota_inodes, str)}"
    )


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
