"""Programs dfsfs runs, found the same way whatever PATH it was started with.

mount(8) runs its helpers with no PATH at all and cron with /usr/bin:/bin, while dfsfs runs
programs from /usr/sbin (runuser) and /usr/bin (fusermount3). Every entry point (`dfsfs`,
`python -m dfsfs`, `mount.dfsfs`) therefore starts by completing PATH with the system
directories, and dfsfs's own code runs programs by absolute path (`find_program`).
"""

import os
import shutil
from collections.abc import MutableMapping

from dfsfs.errors import ConfigError

# The directories of Debian's and systemd's default PATH for root, in their order.
SANE_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
# The Debian package of each program dfsfs runs, for the message when one is missing.
PACKAGES = {"fusermount3": "fuse3", "runuser": "util-linux", "mount": "mount"}


def ensure_sane_path(environ: MutableMapping[str, str] | None = None) -> None:
    """Append to PATH each system directory it lacks (the given ones keep precedence)."""
    environ = os.environ if environ is None else environ
    given = [directory for directory in environ.get("PATH", "").split(os.pathsep) if directory]
    environ["PATH"] = os.pathsep.join(given + [d for d in SANE_PATH if d not in given])


def find_program(name: str) -> str:
    """The absolute path of `name` in the system directories (then PATH); ConfigError if none."""
    search = os.pathsep.join([*SANE_PATH, os.environ.get("PATH", "")])
    found = shutil.which(name, path=search)
    if found is None:
        package = PACKAGES.get(name, name)
        raise ConfigError(f"{name} is not installed (install the Debian package '{package}')")
    return found


def main() -> None:
    """The `dfsfs` command."""
    ensure_sane_path()
    from dfsfs.cli import main as cli_main

    cli_main()
