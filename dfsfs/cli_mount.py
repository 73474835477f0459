"""`dfsfs mount` and `dfsfs umount`."""

import contextlib
import errno
import getpass
import hashlib
import logging
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import click

from dfsfs.cli import (
    CommandError,
    get_settings,
    mount_login,
    read_password,
)
from dfsfs.config import Settings

log = logging.getLogger(__name__)

FSTYPE = "fuse.dfsfs"
UNMOUNT_WAIT_S = 120


# ---- the mount table ---------------------------------------------------------------------


def _unescape_mountinfo(field: str) -> str:
    return field.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "surrogateescape")


def mount_type(path: str) -> str | None:
    """The file-system type mounted exactly at `path`, or None."""
    found = None  # the last of stacked mounts is the visible one
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if _unescape_mountinfo(fields[4]) == path:
                found = fields[fields.index("-") + 1]
    return found


def _is_stale(path: str) -> bool:
    """Whether a FUSE mount at `path` has lost its daemon.

    Looking up a name that does not exist cannot be answered from the kernel's caches,
    so it reaches the daemon (or fails with ENOTCONN when there is none).
    """
    probe = os.path.join(path, f".dfsfs-probe-{secrets.token_hex(8)}")
    for candidate in (path, probe):
        try:
            os.lstat(candidate)
        except OSError as error:
            if error.errno == errno.ENOTCONN:
                return True
            if candidate == path:
                return False
    return False


def _lazy_unmount(path: str) -> None:
    subprocess.run(["fusermount3", "-uz", path], capture_output=True, check=False)


# ---- the daemon's pid file -------------------------------------------------------------------


def pid_file(settings: Settings, mountpoint: str) -> Path:
    key = hashlib.sha256(mountpoint.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return settings.data_dir / "run" / f"mount-{key}.pid"


def _daemon_pid(settings: Settings, mountpoint: str) -> int | None:
    try:
        return int(pid_file(settings, mountpoint).read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            state = stat.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


# ---- mount -----------------------------------------------------------------------------------


def check_mountpoint(path: str, allow_nonempty: bool) -> str:
    """The mount point's absolute path; clear errors for every unusable one."""
    mountpoint = os.path.realpath(path)
    if _is_stale(mountpoint):
        click.echo(f"dfsfs: {mountpoint} was left mounted by a daemon that is gone; cleaning up",
                   err=True)
        _lazy_unmount(mountpoint)
    if not os.path.lexists(mountpoint):
        raise CommandError(f"mount point {mountpoint} does not exist (create it with mkdir)")
    if not os.path.isdir(mountpoint):
        raise CommandError(f"mount point {mountpoint} is not a directory")
    kind = mount_type(mountpoint)
    if kind == FSTYPE:
        raise CommandError(f"{mountpoint} is already a dfsfs mount")
    if kind is not None:
        raise CommandError(f"{mountpoint} is already a mount point ({kind})")
    if not allow_nonempty and os.listdir(mountpoint):
        raise CommandError(f"mount point {mountpoint} is not empty")
    if not os.access(mountpoint, os.W_OK | os.X_OK):
        raise CommandError(f"no permission to mount on {mountpoint}")
    return mountpoint


@click.command("mount")
@click.argument("mountpoint", type=click.Path())
@click.option("--user", "user_name", metavar="NAME", help="Account to mount (default: your login name).")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground and log to stderr.")
@click.option("-o", "options", metavar="OPT[,OPT]", multiple=True,
              help="FUSE mount options, e.g. -o allow_other; 'nonempty' allows a non-empty mount point.")
@click.option("--password-file", metavar="FILE", help="Read the password from FILE ('-' = stdin).")
@click.pass_context
def mount(ctx, mountpoint, user_name, foreground, options, password_file):
    """Mount your files at MOUNTPOINT (asks for your password).

    Returns once the file system is live; the daemon then runs in the background
    until `dfsfs umount MOUNTPOINT` (or SIGTERM), which commits every buffered write.
    """
    from dfsfs.daemon import MountRequest

    settings = get_settings(ctx)
    fuse_options = tuple(o for group in options for o in group.split(",") if o)
    allow_nonempty = "nonempty" in fuse_options
    fuse_options = tuple(o for o in fuse_options if o != "nonempty")
    mountpoint = check_mountpoint(mountpoint, allow_nonempty)
    name = user_name or getpass.getuser()
    settings, client_url, session = mount_login(settings, name,
                                                read_password(password_file, confirm=False))
    request = MountRequest(client_url, settings, session.account, mountpoint, fuse_options,
                           session=session)
    if foreground:
        _serve_in_foreground(settings, request)
    else:
        _serve_in_background(settings, request)


def _serve_in_foreground(settings: Settings, request) -> None:
    from dfsfs.daemon import serve

    with _pid_file_written(settings, request.mountpoint):
        serve(request)


@contextlib.contextmanager
def _pid_file_written(settings: Settings, mountpoint: str):
    path = pid_file(settings, mountpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(os.getpid()))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _log_file(settings: Settings, user_id: int) -> Path:
    path = settings.data_dir / "logs" / f"mount-user{user_id}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _serve_in_background(settings: Settings, request) -> None:
    """Fork the daemon; return when it reports the mount live, or fail with its error."""
    log_path = _log_file(settings, request.user_id)
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _run_daemon(settings, request, log_path, write_end)
    os.close(write_end)
    with os.fdopen(read_end, "r", encoding="utf-8") as reports:
        report = reports.readline().strip()
    if report != "mounted":
        os.waitpid(pid, 0)
        raise CommandError(report or f"the mount daemon stopped before mounting; see {log_path}")
    click.echo(f"dfsfs mounted at {request.mountpoint} (log: {log_path})", err=True)


def _run_daemon(settings: Settings, request, log_path: Path, report_fd: int) -> None:
    """In the forked child: detach, log to a file, serve; never returns."""
    from dfsfs.daemon import serve

    status = 1
    try:
        os.setsid()
        _redirect_output(log_path)
        with _pid_file_written(settings, request.mountpoint):
            serve(request, on_mounted=lambda: _report(report_fd, "mounted"))
        status = 0
    except BaseException as error:  # noqa: BLE001 - the parent shows it; the log keeps details
        log.exception("mount daemon failed")
        _report(report_fd, f"mounting failed: {error}")
    finally:
        logging.shutdown()
        os._exit(status)


def _report(fd: int, message: str) -> None:
    try:
        os.write(fd, (message + "\n").encode())
        os.close(fd)
    except OSError:
        pass  # the parent is gone or was told already


def _redirect_output(log_path: Path) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    handler = logging.StreamHandler(open(log_fd, "w", buffering=1, closefd=False))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("dfsfs")
    root.handlers = [handler]
    root.setLevel(min(root.level or logging.INFO, logging.INFO))


# ---- umount ----------------------------------------------------------------------------------


@click.command("umount")
@click.argument("mountpoint", type=click.Path())
@click.pass_context
def umount(ctx, mountpoint):
    """Commit everything and unmount MOUNTPOINT."""
    settings = get_settings(ctx)
    path = os.path.realpath(mountpoint)
    if _is_stale(path):
        _lazy_unmount(path)
        click.echo(f"dfsfs: {path} was left by a daemon that is gone; cleaned up", err=True)
        return
    kind = mount_type(path)
    if kind is None:
        raise CommandError(f"{path} is not mounted")
    if kind != FSTYPE:
        raise CommandError(f"{path} is not a dfsfs mount ({kind})")
    pid = _daemon_pid(settings, path)
    result = subprocess.run(["fusermount3", "-u", path], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        if "busy" in result.stderr.lower():
            raise CommandError(f"{path} is busy: a process still uses it (see `fuser -vm {path}`)")
        raise CommandError(f"cannot unmount {path}: {result.stderr.strip()}")
    _wait_for_exit(pid)


def _wait_for_exit(pid: int | None) -> None:
    """The daemon commits and exits after the kernel lets go; wait for that."""
    if pid is None:
        return
    deadline = time.monotonic() + UNMOUNT_WAIT_S
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        raise CommandError(f"the dfsfs daemon (pid {pid}) has not exited after unmounting")


commands = [mount, umount]
