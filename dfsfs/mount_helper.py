"""`mount.dfsfs`: lets mount(8), /etc/fstab and systemd mount units mount dfsfs.

mount(8) runs `mount.dfsfs SPEC DIR [-sfnv] [-o OPTIONS]`, where SPEC is the account
name. dfsfs options (`password_file=`, `config=`, `data_dir=`, `database_url=`) become
`dfsfs` flags; options that only mean something to mount(8) or systemd are dropped; the
rest are FUSE options. Example fstab line:

    alice  /home/alice/dfs  dfsfs  noauto,_netdev,password_file=/etc/dfsfs/alice.pw  0 0
"""

import os
import sys

# Options mount(8) and systemd consume themselves.
MOUNT_ONLY_OPTIONS = {"defaults", "auto", "noauto", "user", "users", "nouser", "_netdev",
                      "nofail", "rw"}
GLOBAL_FLAGS = {"config": "--config", "data_dir": "--data-dir", "database_url": "--database-url"}


def build_command(argv: list[str]) -> list[str]:
    """The `dfsfs` command line that mounts what mount(8) asked for."""
    positional, options = _parse(argv)
    if len(positional) != 2:
        raise SystemExit("usage: mount.dfsfs ACCOUNT MOUNTPOINT [-o OPTIONS]")
    account, mountpoint = positional
    global_flags, mount_flags, fuse_options = [], ["--user", account], []
    for option in options:
        name, _, value = option.partition("=")
        if name in MOUNT_ONLY_OPTIONS or name.startswith(("x-", "comment=")):
            continue
        if name in GLOBAL_FLAGS:
            global_flags += [GLOBAL_FLAGS[name], value]
        elif name == "password_file":
            mount_flags += ["--password-file", value]
        else:
            fuse_options.append(option)
    if fuse_options:
        mount_flags += ["-o", ",".join(fuse_options)]
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
    if "-f" in sys.argv[1:]:
        return  # mount -f: pretend, as asked
    command = build_command(sys.argv[1:])
    os.execv(command[0], command)
