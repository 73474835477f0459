"""`dfsfs server run|start|stop|status` (the embedded PostgreSQL, for systemd and admins)
and `dfsfs install-units` (the systemd units shipped in dfsfs/units/)."""

import contextlib
import fcntl
import os
import signal
import sys
import time
from importlib import resources
from pathlib import Path

import click

from dfsfs.cli import CommandError, get_settings
from dfsfs.config import Settings, redact_url

SERVER_CHECK_INTERVAL_S = 5.0
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
USER_UNIT_DIR = Path("/etc/systemd/user")  # every user's manager reads it


# ---- dfsfs server ----------------------------------------------------------------------------


@click.group("server")
def server() -> None:
    """The embedded PostgreSQL of this machine (no --database-url configured)."""


def _embedded(settings: Settings):
    from dfsfs.embedded import PostgresServer

    if settings.database_url is not None:
        raise CommandError(f"this install uses the database at {redact_url(settings.database_url)}; "
                           "`dfsfs server` runs only the embedded one (no database_url configured)")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return PostgresServer(settings.data_dir / "postgres")


@contextlib.contextmanager
def _server_lock(settings: Settings):
    """The lock `dfsfs` commands take around starting the embedded server."""
    with open(settings.data_dir / "postgres.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@server.command("start")
@click.pass_context
def server_start(ctx) -> None:
    """Start the server unless it runs; return once it accepts connections."""
    settings = get_settings(ctx)
    postgres = _embedded(settings)
    with _server_lock(settings):
        postgres.start()
    click.echo(f"dfsfs metadata server running in {postgres.data_dir}")


@server.command("stop")
@click.pass_context
def server_stop(ctx) -> None:
    """Stop the server (fast shutdown: open sessions end, nothing committed is lost)."""
    settings = get_settings(ctx)
    postgres = _embedded(settings)
    with _server_lock(settings):
        postgres.stop()
    click.echo(f"dfsfs metadata server in {postgres.data_dir} stopped")


@server.command("status")
@click.pass_context
def server_status(ctx) -> None:
    """Exit 0 if the server runs, 3 if not (as systemctl status and LSB scripts do)."""
    postgres = _embedded(get_settings(ctx))
    if postgres.is_running():
        click.echo(f"running in {postgres.data_dir}")
        return
    click.echo(f"not running (data in {postgres.data_dir}); start it with `dfsfs server start`")
    ctx.exit(3)


@server.command("run")
@click.pass_context
def server_run(ctx) -> None:
    """Start the server and stay until SIGTERM or SIGINT, then stop it (for systemd).

    Exits 1 when the server stops by itself, so that systemd restarts it."""
    settings = get_settings(ctx)
    postgres = _embedded(settings)
    stopping = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.append(True))
    with _server_lock(settings):
        postgres.start()
    click.echo(f"dfsfs metadata server running in {postgres.data_dir}", err=True)
    while not stopping:
        if not postgres.is_running():
            raise CommandError(f"the metadata server stopped by itself; see {postgres.log_file}")
        _sleep_unless_signalled(SERVER_CHECK_INTERVAL_S, stopping)
    with _server_lock(settings):
        postgres.stop()
    click.echo("dfsfs metadata server stopped", err=True)


def _sleep_unless_signalled(seconds: float, stopping: list) -> None:
    deadline = time.monotonic() + seconds
    while not stopping and time.monotonic() < deadline:
        time.sleep(min(0.1, deadline - time.monotonic()))


# ---- dfsfs install-units ---------------------------------------------------------------------


def unit_files() -> dict[str, dict[str, str]]:
    """{'system': {name: text}, 'user': {name: text}} as shipped, with @BINDIR@ unresolved."""
    shipped = resources.files("dfsfs") / "units"
    return {
        kind: {entry.name: entry.read_text(encoding="utf-8")
               for entry in (shipped / kind).iterdir() if entry.name.endswith(".service")}
        for kind in ("system", "user")
    }


def rendered_units(bin_dir: str | os.PathLike | None = None) -> dict[str, dict[str, str]]:
    """The unit files with the directory of this installation's `dfsfs` filled in."""
    bin_dir = str(bin_dir or Path(sys.executable).parent)
    return {kind: {name: text.replace("@BINDIR@", bin_dir) for name, text in units.items()}
            for kind, units in unit_files().items()}


@click.command("install-units")
@click.option("--system-dir", type=click.Path(file_okay=False), default=str(SYSTEM_UNIT_DIR),
              show_default=True, help="Where system units go.")
@click.option("--user-dir", type=click.Path(file_okay=False), default=str(USER_UNIT_DIR),
              show_default=True, help="Where user units go (every user's systemd reads it).")
def install_units(system_dir: str, user_dir: str) -> None:
    """Install the systemd units: dfsfs-postgres.service, dfsfs-mount@.service (system) and
    dfsfs-mount@.service (user)."""
    for kind, directory in (("system", Path(system_dir)), ("user", Path(user_dir))):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for name, text in rendered_units()[kind].items():
                (directory / name).write_text(text, encoding="utf-8")
                click.echo(f"installed {directory / name}")
        except PermissionError:
            raise CommandError(f"no permission to write to {directory}: run "
                               "`sudo dfsfs install-units`") from None
    click.echo("now run `systemctl daemon-reload` (and `systemctl --user daemon-reload` as each "
               "user); README 'One machine, many users' and 'fstab and systemd' say what next")


commands = [server, install_units]
