"""`dfsfs fsck`: check, and with --repair fix, metadata and both chunk stores."""

import contextlib
import getpass
import json
import sys
from collections.abc import Iterator

import click
from sqlalchemy.engine import Engine

from dfsfs.chunks.mirrored import MirroredChunkStore
from dfsfs.chunks.url import open_store
from dfsfs.cli import (
    account_engine,
    admin_options,
    administrator_engine,
    pass_settings,
    password_file_option,
    read_password,
)
from dfsfs.config import Settings, normalise_store_url
from dfsfs.fsck import CATEGORIES, FsckReport, ProgressCallback, check
from dfsfs.meta.accounts import AccountStore


@click.command("fsck")
@click.option("--repair", is_flag=True, help="Fix what was found (see above).")
@click.option("--user", "user_names", metavar="NAME", multiple=True,
              help="Check only this account (repeatable).")
@click.option("--all", "all_users", is_flag=True, help="Check every account (the default).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as JSON: clean, found and repaired per category, problems.")
@password_file_option
@admin_options
@pass_settings
def command(settings: Settings, repair: bool, user_names: tuple[str, ...], all_users: bool,
            as_json: bool, password_file: str | None, admin_name: str | None,
            admin_password_file: str | None) -> None:
    """Check the metadata and both chunk stores; with --repair, fix what can be fixed.

    \b
    For each account (all of them unless --user is given):
      link counts, and unlinked files a crashed mount never purged;
      chunk reference counts against the files' chunk lists;
      chunk rows no file references, and chunk files without metadata (orphans);
      presence and SHA-256 of both copies of every chunk;
      the usage counters `dfsfs stats` shows.

    --repair corrects counts and counters, purges unlinked files, deletes orphans and
    unreferenced chunks, rewrites a missing or corrupt copy from the good one, and removes
    temporary files of interrupted writes older than an hour. A chunk with no good copy
    cannot be repaired: it is recorded as damage and the files using it are listed.
    Repair while none of the checked accounts is mounted: an open file that was deleted
    looks like one a crashed mount left behind.

    Checking other accounts than your own needs administrator rights, which the server
    checks: the owner's credentials (root, for the embedded server) or an administrator's
    login (--admin-user, default your login name). `--user YOURNAME` checks your own with
    your password (--password-file, DFSFS_PASSWORD or a prompt). An account with stores
    of its own (`dfsfs user stores`) is checked in those. A progress bar is shown when
    stderr is a terminal.

    Exit status: 0 when nothing was found; 1 when problems were found, even if --repair
    fixed them all (the summary says what was repaired; a second run shows a clean
    state), and on errors; 2 for usage errors.
    """
    if user_names and all_users:
        raise click.UsageError("give --user or --all, not both")
    if len(set(user_names)) == 1 and user_names[0] == getpass.getuser():
        engine = account_engine(settings, user_names[0], admin_name, admin_password_file,
                                lambda: read_password(password_file, confirm=False))
    else:
        engine = administrator_engine(settings, admin_name, admin_password_file)
    report = FsckReport()
    for (store_url, backup_url), user_ids in _accounts_by_stores(engine, settings,
                                                                  user_names).items():
        stores = MirroredChunkStore(open_store(store_url, "primary"),
                                    open_store(backup_url, "backup"))
        try:
            with _progress_bar() as progress:
                _merge(report, check(engine, stores, user_ids, repair, progress))
        finally:
            stores.close()
    if as_json:
        click.echo(json.dumps(_report_json(report), indent=2))
    else:
        _echo_summary(report, repair)
    if not report.clean:
        click.get_current_context().exit(1)


def _accounts_by_stores(engine: Engine, settings: Settings,
                        names: tuple[str, ...]) -> dict[tuple[str, str], list[int] | None]:
    """The accounts to check, grouped by the stores that hold their chunks (their own,
    if an administrator gave them any, else the configured ones). None: every account."""
    accounts = AccountStore(engine)
    if names:
        users = []
        for name in names:
            user = accounts.get_user(name)
            if user is None:
                raise click.BadParameter(f"no user named {name!r}", param_hint="--user")
            users.append(user)
    else:
        users = accounts.list_users()
    groups: dict[tuple[str, str], list[int]] = {}
    for user in users:
        primary, backup = accounts.stores(user.name)
        key = (normalise_store_url(primary, "store") if primary else settings.store_url,
               normalise_store_url(backup, "backup store") if backup else settings.backup_url)
        groups.setdefault(key, []).append(user.id)
    default = (settings.store_url, settings.backup_url)
    if not names and set(groups) <= {default}:
        return {default: None}  # every account, and accounts made while checking
    return groups


def _merge(total: FsckReport, part: FsckReport) -> None:
    total.users_checked += part.users_checked
    total.chunks_verified += part.chunks_verified
    total.stale_temp_files_removed += part.stale_temp_files_removed
    total.found.update(part.found)
    total.repaired.update(part.repaired)
    total.problems.extend(part.problems)


@contextlib.contextmanager
def _progress_bar() -> Iterator[ProgressCallback | None]:
    """A progress callback drawing a bar on stderr, or None when stderr is no terminal."""
    if not sys.stderr.isatty():
        yield None
        return
    bars = []  # made on the first call, when the total is known

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(click.progressbar(length=total, label="verifying chunks", file=sys.stderr))
        bars[0].update(done - bars[0].pos)

    try:
        yield update
    finally:
        if bars:
            bars[0].render_finish()


def _report_json(report: FsckReport) -> dict:
    return {
        "clean": report.clean,
        "users_checked": report.users_checked,
        "chunks_verified": report.chunks_verified,
        "stale_temp_files_removed": report.stale_temp_files_removed,
        "found": {category: report.found[category] for category in CATEGORIES if report.found[category]},
        "repaired": {category: report.repaired[category] for category in CATEGORIES
                     if report.repaired[category]},
        "problems": report.problems,
    }


def _echo_summary(report: FsckReport, repair: bool) -> None:
    for problem in report.problems:
        click.echo(problem)
    click.echo(f"checked {report.users_checked} account(s), verified {report.chunks_verified} chunk(s)")
    for category, description in CATEGORIES.items():
        found = report.found[category]
        if found:
            click.echo(f"  {description}: {found} found, {report.repaired[category]} repaired")
    if report.stale_temp_files_removed:
        click.echo(f"removed {report.stale_temp_files_removed} stale temporary file(s)")
    found, repaired = sum(report.found.values()), sum(report.repaired.values())
    if report.clean:
        click.echo("no problems found")
    elif repair:
        click.echo(f"{found} problem(s) found, {repaired} repaired, {found - repaired} left")
    else:
        click.echo(f"{found} problem(s) found; `dfsfs fsck --repair` fixes what can be fixed")
