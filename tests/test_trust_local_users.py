"""Local users of one machine (issue 12), with real Linux users made by the test.

Root runs `dfsfs init` with the embedded default: a PostgreSQL of dfsfs's own (run as
the postgres user) and local stores, and the system config every user reads. Root adds
accounts for two Linux users; each mounts their own account with nothing but their
password, and can reach nothing of the other's: not the database as its owner or as the
superuser, not the other's chunk directories. A Linux user on a machine without a system
install gets a private server of their own, as locked down.

The users run dfsfs through the system Python with this checkout's packages (the venv's
interpreter lies under /root, which they cannot enter), as an installed dfsfs would run.
"""

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from dfsfs.embedded import PostgresServer, find_bin_dir
from mounting import DFSFS, is_mount

PASSWORDS = {"first": "pw-of-the-first-user", "second": "pw-of-the-second-user"}
SITE_PACKAGES = next(Path(sys.prefix, "lib").glob("python3*/site-packages"))
SYSTEM_PYTHON = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
REPO = Path(__file__).resolve().parent.parent

if not Path(SYSTEM_PYTHON).exists() or os.geteuid() != 0:
    pytest.skip(f"needs root and {SYSTEM_PYTHON}", allow_module_level=True)


class LinuxUser:
    """A Linux user made for the test (useradd -m), removed with its home afterwards."""

    def __init__(self, label: str, base: Path):
        self.name = f"dft{label[:3]}{uuid.uuid4().hex[:6]}"
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", self.name],
                       check=True, capture_output=True)
        entry = pwd.getpwnam(self.name)
        self.uid, self.gid, self.home = entry.pw_uid, entry.pw_gid, Path(entry.pw_dir)
        self.cli = base / "bin" / "dfsfs"
        self.mountpoint = self.home / "dfs"

    def run(self, argv: list[str], env: dict | None = None, check: bool = False,
            timeout: float = 60) -> subprocess.CompletedProcess:
        environment = {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
                       "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                       "DFSFS_ARGON2_PROFILE": "test", **(env or {})}
        result = subprocess.run(["runuser", "-u", self.name, "--", *argv], env=environment,
                                capture_output=True, text=True, timeout=timeout, cwd=self.home,
                                stdin=subprocess.DEVNULL)
        if check:
            assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
        return result

    def dfsfs(self, *args, env=None, check=False) -> subprocess.CompletedProcess:
        return self.run([str(self.cli), *map(str, args)], env=env, check=check)

    def log(self) -> str:
        """The user's daemon logs (for failure messages)."""
        logs = sorted((self.home / ".local" / "share" / "dfsfs" / "logs").glob("*.log"))
        return "".join(path.read_text(errors="replace") for path in logs)[-4000:]

    def remove(self) -> None:
        if is_mount(self.mountpoint):
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)
        left = subprocess.run(["pgrep", "-u", self.name], capture_output=True, text=True).stdout
        for pid in map(int, left.split()):  # its daemons, started by this test
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        subprocess.run(["userdel", "--remove", self.name], capture_output=True)


def cli_wrapper(path: Path) -> None:
    """`dfsfs` for the test users: the system Python with this checkout's packages."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""#!{SYSTEM_PYTHON}
import site, sys
site.addsitedir({str(SITE_PACKAGES)!r})
sys.path.insert(0, {str(REPO)!r})
from dfsfs.cli import main
sys.exit(main())
""")
    path.chmod(0o755)


@pytest.fixture(scope="module")
def machine():
    """A system install in a temporary place, with two Linux users and their accounts."""
    base = Path(tempfile.mkdtemp(prefix="dfsfs-sys-", dir="/tmp"))
    base.chmod(0o755)
    cli_wrapper(base / "bin" / "dfsfs")
    system_config = base / "etc" / "dfsfs.toml"
    root_env = {k: v for k, v in os.environ.items() if not k.startswith("DFSFS_")}
    root_env.update(DFSFS_DATA_DIR=str(base / "var"), DFSFS_SYSTEM_CONFIG=str(system_config),
                    DFSFS_ARGON2_PROFILE="test", DFSFS_CHUNK_SIZE="64K")
    users = {}
    server = PostgresServer(base / "var" / "postgres")
    try:
        result = run_root(root_env, "init")
        assert "wrote " + str(system_config) in result.stdout, result.stdout
        for label in PASSWORDS:
            users[label] = LinuxUser(label, base)
            run_root({**root_env, "DFSFS_PASSWORD": PASSWORDS[label]}, "user", "add", users[label].name)
        yield {"base": base, "users": users, "config": system_config, "server": server,
               "root_env": root_env}
    finally:
        for user in users.values():
            user.remove()
        server.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)


def run_root(env: dict, *args) -> subprocess.CompletedProcess:
    result = subprocess.run([DFSFS, *map(str, args)], env=env, capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"dfsfs {args}: {result.stdout}{result.stderr}"
    return result


def user_env(machine) -> dict:
    return {"DFSFS_SYSTEM_CONFIG": str(machine["config"])}


def test_the_system_config_names_the_shared_server_and_no_secret(machine):
    text = machine["config"].read_text()
    assert f'server_dir = "{machine["base"]}/var/postgres"' in text
    assert "password" not in text and "secret" not in text.replace("never put a secret", "")
    assert machine["config"].stat().st_mode & 0o777 == 0o644


def test_each_user_mounts_and_writes_their_own_account(machine):
    for label, user in machine["users"].items():
        user.run(["mkdir", "-p", str(user.mountpoint)], check=True)
        env = {**user_env(machine), "DFSFS_PASSWORD": PASSWORDS[label]}
        wrong = user.dfsfs("mount", user.mountpoint, env={**env, "DFSFS_PASSWORD": "wrong"})
        assert wrong.returncode == 1 and "wrong user name or password" in wrong.stderr
        user.dfsfs("mount", user.mountpoint, env=env, check=True)
        try:
            # its root directory is theirs (the mount is theirs only: root sees nothing of it)
            owner = user.run(["stat", "-c", "%u", str(user.mountpoint)], check=True).stdout
            assert int(owner) == user.uid
            written = user.run(["sh", "-c", f"echo hello from {label} > {user.mountpoint}/note && "
                                f"mkdir {user.mountpoint}/dir && cp /etc/services {user.mountpoint}/dir/"])
            assert written.returncode == 0, written.stderr + user.log()
            assert user.run(["cat", f"{user.mountpoint}/note"], check=True).stdout == f"hello from {label}\n"
            stats = user.dfsfs("stats", "--json", env=env, check=True)
            assert '"files": 2' in stats.stdout
        finally:
            user.dfsfs("umount", user.mountpoint, env=env, check=True)
        # No private server was made: there is a system install.
        assert not (user.home / ".local" / "share" / "dfsfs" / "postgres").exists()


def test_no_user_reaches_another_users_chunks(machine):
    first, second = machine["users"]["first"], machine["users"]["second"]
    store = machine["base"] / "var" / "chunks"
    assert oct(store.stat().st_mode & 0o777) == oct(0o711)
    account_dirs = {int(p.name): p for p in store.iterdir()}
    assert len(account_dirs) == 2
    for directory in account_dirs.values():
        assert directory.stat().st_mode & 0o777 == 0o700
    first_dir = next(d for d in account_dirs.values() if d.stat().st_uid == first.uid)
    chunk = next(p for p in first_dir.rglob("*") if p.is_file())
    for argv in (["ls", str(store)], ["ls", str(first_dir)], ["cat", str(chunk)],
                 ["ls", str(machine["base"] / "var" / "backup" / first_dir.name)]):
        result = second.run(argv)
        assert result.returncode != 0 and "Permission denied" in result.stderr, argv
    assert first.run(["ls", str(first_dir)]).returncode == 0


def test_no_user_reaches_the_server_as_owner_or_superuser(machine):
    server, second = machine["server"], machine["users"]["second"]
    psql = str(find_bin_dir() / "psql")
    for role in ("dfsfs", "postgres"):
        result = second.run([psql, "-X", "-h", str(server.socket_dir), "-p", str(server.port),
                             "-U", role, "-d", "dfsfs", "-c", "SELECT 1"])
        assert result.returncode != 0 and "authentication failed" in result.stderr, (role, result.stderr)
    as_client = [psql, "-X", "-At", "-h", str(server.socket_dir), "-p", str(server.port),
                 "-U", "dfsfs_client", "-d", "dfsfs", "-c"]
    result = second.run([*as_client, "SELECT count(*) FROM inodes"])
    assert result.stdout.strip() == "0", result  # the client role, without a login: nothing
    marker = second.home / "ran"
    result = second.run([*as_client, f"COPY (SELECT 1) TO PROGRAM 'touch {marker}'"])
    assert "must be superuser" in result.stderr and not marker.exists()
    result = second.run([psql, "-X", "-h", str(server.socket_dir), "-p", str(server.port),
                         "-U", "dfsfs_client", "-d", "postgres", "-c", "SELECT 1"])
    assert result.returncode != 0, "the client role has no business in other databases"
    for private in (server.log_file, server.owner_password_file, server.cluster_dir / "pg_hba.conf"):
        assert second.run(["cat", str(private)]).returncode != 0, private
    assert second.run(["ls", str(server.socket_dir)]).returncode != 0


def test_administration_needs_an_administrator(machine):
    first = machine["users"]["first"]
    env = {**user_env(machine), "DFSFS_PASSWORD": PASSWORDS["first"]}
    own_password = first.home / "pw"
    first.run(["sh", "-c", f"umask 077; printf %s '{PASSWORDS['first']}' > {own_password}"], check=True)
    for command in (("user", "list"), ("stats", "--all"),
                    ("user", "quota", machine["users"]["second"].name, "--inodes", "1")):
        result = first.dfsfs(*command, "--admin-password-file", own_password, env=env)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert "is not a dfsfs administrator" in result.stderr, (command, result.stderr)
    result = first.dfsfs("init", env=env)
    assert result.returncode == 1 and "needs the database owner's credentials" in result.stderr
    result = first.dfsfs("user", "sessions", env=env)
    assert result.returncode == 0 and "STATE" in result.stdout, result.stderr


def test_a_user_without_a_system_install_gets_a_private_locked_server(machine):
    """Mounting needs an account; the private server's owner is its Linux user (peer), so
    they run `dfsfs init` and `dfsfs user add` themselves."""
    base = machine["base"]
    loner, other = LinuxUser("loner", base), machine["users"]["second"]
    env = {"DFSFS_SYSTEM_CONFIG": str(base / "etc" / "absent.toml"), "DFSFS_PASSWORD": "loner-pw",
           "DFSFS_CHUNK_SIZE": "64K"}
    server_dir = loner.home / ".local" / "share" / "dfsfs" / "postgres"
    try:
        loner.dfsfs("init", env=env, check=True)
        loner.dfsfs("user", "add", loner.name, env=env, check=True)
        assert server_dir.stat().st_uid == loner.uid
        assert server_dir.stat().st_mode & 0o777 == 0o700
        loner.run(["mkdir", "-p", str(loner.mountpoint)], check=True)
        loner.dfsfs("mount", loner.mountpoint, env=env, check=True)
        try:
            loner.run(["sh", "-c", f"echo mine > {loner.mountpoint}/f"], check=True)
        finally:
            loner.dfsfs("umount", loner.mountpoint, env=env, check=True)
        psql = str(find_bin_dir() / "psql")
        for role in ("dfsfs", "postgres", "dfsfs_client"):
            result = other.run([psql, "-X", "-h", str(server_dir), "-U", role, "-d", "dfsfs",
                                "-c", "SELECT 1"])
            assert result.returncode != 0, role  # the socket is in a directory only its owner enters
    finally:
        loner.run([str(find_bin_dir() / "pg_ctl"), "stop", "-m", "immediate", "-D",
                   str(server_dir / "cluster")])
        loner.remove()
