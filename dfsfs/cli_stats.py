"""`dfsfs stats`: usage of one account (after a login) or of every account."""

import getpass
import json
from datetime import datetime

import click

from dfsfs.cli import (
    admin_options,
    administrator_engine,
    login_session,
    pass_settings,
    password_file_option,
    read_password,
)
from dfsfs.config import Settings, format_size
from dfsfs.meta.layout import recorded_chunk_size
from dfsfs.stats import DEFAULT_TOP_N, all_stats, user_stats


@click.command("stats")
@click.option("--user", "user_name", metavar="NAME",
              help="The account to show (default: your login name).")
@click.option("--all", "all_users", is_flag=True,
              help="Every account, for administrators (owner credentials or an admin login).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (keys below) instead of a table.")
@click.option("--top", "top_n", type=click.IntRange(min=0), default=DEFAULT_TOP_N, show_default=True,
              help="How many of the largest directories to list (0: skip that walk).")
@password_file_option
@admin_options
@pass_settings
def command(settings: Settings, user_name: str | None, all_users: bool, as_json: bool, top_n: int,
            password_file: str | None, admin_name: str | None,
            admin_password_file: str | None) -> None:
    """Show storage use: files, bytes before and after deduplication, quotas, backup
    coverage, damage records, the last fsck and the largest directories.

    For one account, dfsfs logs in as that account: the password is read from
    --password-file, else from DFSFS_PASSWORD, else prompted. --all lists every account:
    the server allows it to the owner's credentials (root, for the embedded server) and
    to an administrator's login (--admin-user, default your login name).

    \b
    JSON keys (one object, or a list of them with --all; docs/stats.md has details):
      user, user_id, files, directories, symlinks, logical_bytes, stored_bytes,
      dedup_ratio (logical/stored, null when nothing is stored), chunk_count,
      chunk_size, quota_bytes, quota_inodes (null: unlimited),
      quota_bytes_used_pct, quota_inodes_used_pct (null: no quota),
      backup {chunks_backed_up, chunks_pending_backup},
      integrity {damage_repaired, damage_unrepaired},
      last_fsck_at (ISO 8601 or null), largest_directories [{path, bytes}]
    """
    if all_users and user_name:
        raise click.UsageError("give --user or --all, not both")
    if all_users:
        engine = administrator_engine(settings, admin_name, admin_password_file)
        stats = all_stats(engine, recorded_chunk_size(engine), top_n)
        click.echo(json.dumps(stats, indent=2) if as_json else _accounts_table(stats))
        return
    login, engine = login_session(settings, user_name or getpass.getuser(),
                                  read_password(password_file, confirm=False))
    stats = user_stats(engine, login.account, recorded_chunk_size(engine), top_n)
    click.echo(json.dumps(stats, indent=2) if as_json else _account_report(stats))


def _chunk_size(size: int | None) -> str:
    return "not recorded: run `dfsfs init`" if size is None else format_size(size)


def _account_report(stats: dict) -> str:
    backup, integrity = stats["backup"], stats["integrity"]
    rows = [
        ("user", stats["user"]),
        ("files", str(stats["files"])),
        ("directories", str(stats["directories"])),
        ("symlinks", str(stats["symlinks"])),
        ("logical size", _size(stats["logical_bytes"])),
        ("stored size", _size(stats["stored_bytes"])),
        ("dedup ratio", _ratio(stats["dedup_ratio"])),
        ("chunks", f"{stats['chunk_count']} (chunk size {_chunk_size(stats['chunk_size'])})"),
        ("byte quota", _quota(stats["quota_bytes"], stats["quota_bytes_used_pct"], format_size)),
        ("inode quota", _quota(stats["quota_inodes"], stats["quota_inodes_used_pct"], str)),
        ("backup", f"{backup['chunks_backed_up']} chunks backed up, "
                   f"{backup['chunks_pending_backup']} pending"),
        ("damage", f"{integrity['damage_unrepaired']} unrepaired, "
                   f"{integrity['damage_repaired']} repaired"),
        ("last fsck", _when(stats["last_fsck_at"])),
    ]
    lines = _table(rows)
    if stats["largest_directories"]:
        lines += ["", "largest directories:"]
        lines += _table([(format_size(entry["bytes"]), entry["path"])
                         for entry in stats["largest_directories"]], indent="  ")
    return "\n".join(lines)


def _accounts_table(accounts: list[dict]) -> str:
    rows = [
        ("USER", "FILES", "DIRS", "LOGICAL", "STORED", "DEDUP", "QUOTA USED", "DAMAGE", "LAST FSCK"),
    ]
    rows += [
        (
            stats["user"],
            str(stats["files"]),
            str(stats["directories"]),
            format_size(stats["logical_bytes"]),
            format_size(stats["stored_bytes"]),
            _ratio(stats["dedup_ratio"]),
            _percent(stats["quota_bytes_used_pct"]),
            str(stats["integrity"]["damage_unrepaired"]),
            _when(stats["last_fsck_at"]),
        )
        for stats in accounts
    ]
    return "\n".join(_table(rows))


def _table(rows: list[tuple[str, ...]], indent: str = "") -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [
        indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _size(size: int) -> str:
    return f"{format_size(size)} ({size} bytes)" if size >= 1024 else format_size(size)


def _ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def _percent(percent: float | None) -> str:
    return "-" if percent is None else f"{percent:.1f}%"


def _when(iso_time: str | None) -> str:
    """An ISO 8601 time as local time to the minute."""
    if iso_time is None:
        return "never"
    return datetime.fromisoformat(iso_time).astimezone().strftime("%Y-%m-%d %H:%M")


def _quota(quota: int | None, used_pct: float | None, show) -> str:
    return "unlimited" if quota is None else f"{show(quota)} ({_percent(used_pct)} used)"
