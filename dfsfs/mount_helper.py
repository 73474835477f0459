"""`mount.dfsfs`: lets mount(8), /etc/fstab and systemd mount units mount dfsfs.

mount(8) runs `mount.dfsfs SPEC DIR [-sfnv] [-o OPTIONS]` with no PATH in its environment,
where SPEC is the account name (`dfsfs:alice` or `alice`). dfsfs options (`password_file=`,
`config=`, `data_dir=`, `database_url=`) become `dfsfs` flags or variables (a database
URL may hold a password, so it goes through the environment, never argv); options that
only mean something to mount(8) or systemd are dropped; the rest are mount options that
`dfsfs mount -o` checks (and refuses by name when unknown). Example fstab line:

    alice  /home/alice/dfs  dfsfs  noauto,_netdev,password_file=/etc/dfsfs/alice.pw  0 0

With `user` or `users` in the line, mount(8) lets other users mount it and runs this
helper as the user who asked (the daemon then runs as that user, through fusermount3).
"""

import os
import sys

# Options mount(8) and systemd consume themselves (besides x-* and comment=).
MOUNT_ONLY_OPTIONS = frozenset({"defaults", "auto", "noauto", "user", "users", "nouser", "owner",
                                "group", "_netdev", "nofail"})
GLOBAL_FLAGS = {"config": "--config", "data_dir": "--data-dir"}
ENVIRONMENT = {"database_url": "DFSFS_DATABASE_URL"}
USAGE = "usage: mount.dfsfs [dfsfs:]ACCOUNT MOUNTPOINT [-o OPTIONS]"


def build_command(argv: list[str], environ: dict[str, str] | None = None) -> list[str]:
    """The `dfsfs` command line that mounts what mount(8) asked for; fills `environ`."""
    environ = {} if environ is None else environ
    positional, options = _parse(argv)
    if len(positional) != 2:
        raise SystemExit(USAGE)
    spec, mountpoint = positional
    account = spec.removeprefix("dfsfs:")
    global_flags, mount_flags, mount_options = [], ["--user", account], []
    for option in options:
        name, has_value, value = option.partition("=")
        if name in MOUNT_ONLY_OPTIONS or name.startswith("x-") or name == "comment":
            continue
        if name in GLOBAL_FLAGS and has_value:
            global_flags += [GLOBAL_FLAGS[name], value]
        elif name in ENVIRONMENT and has_value:
            environ[ENVIRONMENT[name]] = value
        elif name == "password_file" and has_value:
            mount_flags += ["--password-file", value]
        else:
            mount_options.append(option)
    if mount_options:
        mount_flags += ["-o", ",".join(mount_options)]
    return [sys.executable, "-m", "dfsfs", *global_flags, "mount", mountpoint, *mount_flags]


def _parse(argv: list[str]) -> tuple[list[str], list[str]]:
    positional, options = [], []
    arguments = iter(argv)
    for argument in arguments:
        if argument == "-o":
            options += [o for o in next(arguments, "").split(",") if o]
        elif argument.startswith("-o"):
            options += [o for o in argument[2:].split(",") if o]
        elif argument.startswith("-"):
            continue  # -s, -f (fake), -n (no mtab), -v: nothing to do for a FUSE mount
        else:
            positional.append(argument)
    return positional, options


def main() -> None:
    from dfsfs.programs import ensure_sane_path

    if "-f" in sys.argv[1:]:
        return  # mount -f: pretend, as asked
    ensure_sane_path()  # mount(8) gives helpers no PATH; the daemon runs fusermount3, runuser
    command = build_command(sys.argv[1:], os.environ)
    os.execv(command[0], command)
