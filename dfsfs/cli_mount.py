"""`dfsfs mount` and `dfsfs umount`."""

import contextlib
import errno
import getpass
import grp
import hashlib
import logging
import os
import pwd
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from dfsfs.cli import (
    CommandError,
    get_settings,
    mount_login,
    read_password,
)
from dfsfs.chunks.url import take_environment_credentials
from dfsfs.config import Settings
from dfsfs.mount_helper import MOUNT_ONLY_OPTIONS
from dfsfs.programs import find_program

log = logging.getLogger(__name__)

FSTYPE = "fuse.dfsfs"
UNMOUNT_WAIT_S = 120


# ---- the mount table ---------------------------------------------------------------------


def _unescape_mountinfo(field: str) -> str:
    return field.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "surrogateescape")


def mount_type(path: str) -> str | None:
    """The file-system type mounted exactly at `path`, or None."""
    found = _mount_entry(path)
    return found[0] if found else None


def _mount_entry(path: str) -> tuple[str, str] | None:
    """(type, source) of what is mounted exactly at `path`, or None."""
    found = None  # the last of stacked mounts is the visible one
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if _unescape_mountinfo(fields[4]) == path:
                after = fields[fields.index("-") + 1:]
                found = (after[0], _unescape_mountinfo(after[1]) if len(after) > 1 else "")
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
    subprocess.run([find_program("fusermount3"), "-uz", path], capture_output=True, check=False)


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


# ---- mount options ---------------------------------------------------------------------------
# Every option `-o` accepts (README, "Mount options"). Those that change how the file system
# behaves become fields of the MountRequest, for the core to honour; kernel options go to
# libfuse; options of mount(8) and systemd are accepted and ignored; anything else is refused
# here with its name (libfuse would only say "fuse_session_new() failed").

# Passed to the kernel through libfuse as they are.
KERNEL_OPTIONS = frozenset({"allow_other", "allow_root", "ro", "rw", "nosuid", "suid", "nodev",
                            "dev", "noexec", "exec", "default_permissions"})
ATIME_MODES = ("noatime", "relatime", "strictatime")
MAX_COMMIT_S = 300
MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to chown


@dataclass(frozen=True)
class MountOptions:
    """`-o` options, validated: what goes to libfuse and what the core must honour."""

    kernel: tuple[str, ...] = ()
    nonempty: bool = False
    # Fields of the MountRequest (see dfsfs/daemon.py for what each one means).
    request: dict = field(default_factory=dict)


def parse_mount_options(groups: tuple[str, ...] | list[str]) -> MountOptions:
    """Validate `-o` options (each group comma-separated); CommandError names a bad one."""
    kernel: list[str] = []
    request: dict = {}
    nonempty = False
    for option in (o.strip() for group in groups for o in group.split(",")):
        if not option:
            continue
        name, has_value, value = option.partition("=")
        if name in MOUNT_ONLY_OPTIONS or name.startswith("x-") or name == "comment":
            continue
        if name == "nonempty" and not has_value:
            nonempty = True
        elif name in KERNEL_OPTIONS and not has_value:
            kernel.append(name)
            if name in ("ro", "rw"):
                request["read_only"] = name == "ro"
        elif name in ATIME_MODES and not has_value:
            request["atime"] = name
        elif name == "atime" and not has_value:
            request["atime"] = "relatime"  # as mount(8): "atime" undoes noatime
        elif name in ("sync", "async") and not has_value:
            request["sync"] = name == "sync"
        elif name in _VALUED and has_value:
            request.update(_VALUED[name](value))
        elif name in _VALUED or name in KERNEL_OPTIONS or name in ATIME_MODES:
            raise CommandError(f"mount option {name!r} {_usage(name)}")
        elif name in ("fsname", "subtype"):
            raise CommandError(f"mount option {name!r} is set by dfsfs itself (dfsfs:ACCOUNT, "
                               "dfsfs); remove it")
        else:
            raise CommandError(f"unknown mount option {_shown(name)!r}: remove it (the options "
                               "dfsfs accepts are listed in README.md, 'Mount options')")
    if "allow_other" in kernel and "allow_root" in kernel:
        raise CommandError("mount options 'allow_other' and 'allow_root' exclude each other: "
                           "keep one")
    return MountOptions(tuple(dict.fromkeys(kernel)), nonempty, request)


def _shown(name: str) -> str:
    """An option name fit to echo: a long odd one may be a pasted secret."""
    return name if len(name) <= 40 and name.isprintable() else name[:4] + "…"


def _owner_id(kind: str, value: str) -> dict:
    lookup = pwd.getpwnam if kind == "uid" else grp.getgrnam
    if value.isdigit():
        number = int(value)
    else:
        try:
            entry = lookup(value)
        except KeyError:
            raise CommandError(f"mount option {kind}={value}: no such "
                               f"{'user' if kind == 'uid' else 'group'} (give a name or a number)")
        number = entry.pw_uid if kind == "uid" else entry.gr_gid
    if number > MAX_ID:
        raise CommandError(f"mount option {kind}={value}: out of range (0 to {MAX_ID})")
    return {f"owner_{kind}": number}


def _umask(value: str) -> dict:
    try:
        mask = int(value, 8)
    except ValueError:
        mask = -1
    if not 0 <= mask <= 0o777:
        raise CommandError(f"mount option umask={value}: give octal permission bits to clear, "
                           "e.g. umask=022 or umask=077")
    return {"umask": mask}


def _commit(value: str) -> dict:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_COMMIT_S:
        raise CommandError(f"mount option commit={value}: give the commit interval in seconds "
                           f"(0 to {MAX_COMMIT_S}; 0 means the default, 1)")
    return {"commit_interval_s": seconds or None}


_VALUED = {
    "uid": lambda value: _owner_id("uid", value),
    "gid": lambda value: _owner_id("gid", value),
    "umask": _umask,
    "commit": _commit,
}


def _usage(name: str) -> str:
    if name in _VALUED:
        return f"needs a value ({name}=…)"
    return "takes no value"


def check_allowed(options: MountOptions) -> None:
    """allow_other/allow_root for a user other than root need user_allow_other in fuse.conf."""
    wanted = [name for name in ("allow_other", "allow_root") if name in options.kernel]
    if not wanted or os.geteuid() == 0 or _fuse_conf_allows_other():
        return
    raise CommandError(f"mount option {wanted[0]!r} needs 'user_allow_other' in /etc/fuse.conf "
                       "(ask root to add that line) or a mount by root")


def _fuse_conf_allows_other(path: str = "/etc/fuse.conf") -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as conf:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in conf)
    except OSError:
        return False


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
    kind, source = _mount_entry(mountpoint) or (None, "")
    if kind == FSTYPE:
        raise CommandError(f"{mountpoint} is already mounted ({source}): use it as it is, or "
                           f"run `dfsfs umount {mountpoint}` first")
    if kind is not None:
        raise CommandError(f"{mountpoint} is already a mount point ({kind} {source}): unmount "
                           "it first or choose another directory")
    if not allow_nonempty and os.listdir(mountpoint):
        raise CommandError(f"mount point {mountpoint} is not empty: choose an empty directory "
                           "(or add -o nonempty to hide its files while mounted)")
    if not os.access(mountpoint, os.W_OK | os.X_OK):
        raise CommandError(f"no permission to mount on {mountpoint}")
    return mountpoint


@click.command("mount")
@click.argument("mountpoint", type=click.Path())
@click.option("--user", "user_name", metavar="NAME", help="Account to mount (default: your login name).")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground and log to stderr.")
@click.option("-o", "options", metavar="OPT[,OPT]", multiple=True,
              help="Mount options: allow_other, allow_root, ro, uid=, gid=, umask=, noatime, "
                   "relatime, strictatime, commit=SECONDS, sync, nonempty (README: Mount options).")
@click.option("--password-file", metavar="FILE", help="Read the password from FILE ('-' = stdin).")
@click.pass_context
def mount(ctx, mountpoint, user_name, foreground, options, password_file):
    """Mount your files at MOUNTPOINT (asks for your password).

    Returns once the file system is live; the daemon then runs in the background
    until `dfsfs umount MOUNTPOINT` (or SIGTERM), which commits every buffered write.
    """
    from dfsfs.daemon import MountRequest

    take_environment_credentials()  # the daemon forked below must not carry S3 keys
    parsed = parse_mount_options(options)
    check_allowed(parsed)
    settings = get_settings(ctx)
    mountpoint = check_mountpoint(mountpoint, parsed.nonempty)
    name = user_name or getpass.getuser()
    settings, client_url, session = mount_login(settings, name,
                                                read_password(password_file, confirm=False))
    request = MountRequest(client_url, settings, session.account, mountpoint, parsed.kernel,
                           account_name=session.name, session=session, **parsed.request)
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
    log_path = _log_file(settings, request.account_id)
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
    result = subprocess.run([find_program("fusermount3"), "-u", path], capture_output=True,
                            text=True, check=False)
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
