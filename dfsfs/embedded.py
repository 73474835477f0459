"""A PostgreSQL server of dfsfs's own, for one machine with no database configured.

It lives in a data directory, listens on a unix socket only (inside that directory),
and is started on demand and reused while alive. PostgreSQL refuses to run as root,
so when dfsfs runs as root the server runs as the `postgres` system user.
"""

import glob
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

from dfsfs.errors import ConfigError

DEFAULT_PORT = 5432
ROLE = "dfsfs"  # the role dfsfs connects as: not a superuser, so row-level security applies
SUPERUSER = "postgres"


def find_bin_dir() -> Path:
    """The newest Debian PostgreSQL server binaries, or those on PATH."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
    )
    for candidate in reversed(candidates):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise ConfigError(
        "no PostgreSQL server binaries found: install the 'postgresql' package "
        "or set DFSFS_DATABASE_URL to an existing server"
    )


class PostgresServer:
    """One PostgreSQL cluster in `data_dir`, reachable on a unix socket in that directory."""

    def __init__(self, data_dir: Path, port: int = DEFAULT_PORT, durable: bool = True):
        self.data_dir = Path(data_dir)
        self.port = port
        self.durable = durable  # False only for throwaway test servers (fsync off)
        self.bin_dir = find_bin_dir()
        self.run_as = SUPERUSER if os.geteuid() == 0 else None

    @property
    def cluster_dir(self) -> Path:
        return self.data_dir / "cluster"

    @property
    def socket_dir(self) -> Path:
        return self.data_dir

    @property
    def log_file(self) -> Path:
        return self.data_dir / "postgresql.log"

    def url(self, database: str, role: str = ROLE) -> str:
        return f"postgresql+psycopg2://{role}@/{database}?host={self.socket_dir}&port={self.port}"

    def _command(self, *argv: str) -> list[str]:
        program = [str(self.bin_dir / argv[0]), *argv[1:]]
        return ["runuser", "-u", self.run_as, "--", *program] if self.run_as else program

    def _run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            self._command(*argv), capture_output=True, text=True, cwd="/", check=False
        )

    def _run_checked(self, what: str, *argv: str) -> None:
        result = self._run(*argv)
        if result.returncode != 0:
            raise ConfigError(f"{what} failed: {(result.stderr or result.stdout).strip()}")

    def ensure_initialized(self) -> None:
        if (self.cluster_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.run_as:
            account = pwd.getpwnam(self.run_as)
            os.chown(self.data_dir, account.pw_uid, account.pw_gid)
            _ensure_traversable(self.data_dir)
        self._run_checked(
            "initdb",
            "initdb", "-D", str(self.cluster_dir), "-U", SUPERUSER,
            "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8",
        )

    def is_running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", str(self.cluster_dir)).returncode == 0

    def start(self) -> None:
        """Start the server unless it is already running; wait until it accepts connections."""
        self.ensure_initialized()
        if self.is_running():
            return
        options = f"-k {self.socket_dir} -c listen_addresses='' -p {self.port}"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run_checked(
            "starting PostgreSQL",
            "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.cluster_dir),
            "-l", str(self.log_file), "-o", options,
        )
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready = self._run("pg_isready", "-h", str(self.socket_dir), "-p", str(self.port))
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise ConfigError(f"PostgreSQL did not become ready; see {self.log_file}")

    def stop(self, mode: str = "fast") -> None:
        if self.is_running():
            self._run("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.cluster_dir))

    def psql(self, sql: str, database: str = "postgres") -> str:
        result = self._run(
            "psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
            "-h", str(self.socket_dir), "-p", str(self.port), "-U", SUPERUSER,
            "-d", database, "-c", sql,
        )
        if result.returncode != 0:
            raise ConfigError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def ensure_database(self, database: str, role: str = ROLE) -> None:
        """Create the login role and a database it owns, if missing."""
        if not self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'").strip():
            self.psql(f'CREATE ROLE "{role}" LOGIN')
        if not self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}'").strip():
            self.psql(f'CREATE DATABASE "{database}" OWNER "{role}"')


def _ensure_traversable(path: Path) -> None:
    """The postgres user must reach `path` through its parents; say so clearly if not."""
    for parent in path.parents:
        if not parent.stat().st_mode & 0o001:
            raise ConfigError(
                f"the PostgreSQL data directory {path} is inside {parent}, which the "
                f"'{SUPERUSER}' user cannot enter; choose a data directory elsewhere "
                "(for example under /var/lib/dfsfs)"
            )
