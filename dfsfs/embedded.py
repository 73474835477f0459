"""A PostgreSQL server of dfsfs's own, for one machine with no database configured.

It lives in a data directory, listens on a unix socket only (inside that directory),
and is started on demand and reused while alive. PostgreSQL refuses to run as root,
so when dfsfs runs as root the server runs as the `postgres` system user.

Nothing is trusted (see ../shared/ARCHITECTURE.md, "Trust"). Every local connection is
authenticated by peer (the kernel says which OS user is connecting) through one user map:
the OS user who set the server up (root or, for a private server, its owner) and the
`postgres` OS user may connect as any role; every other local user only as the client
role, which can do nothing without a session of an account (a login). TCP connections,
where enabled, need scram-sha-256 passwords. The owner role's password is generated once
and kept in `owner.password`, readable by the server's administrator only; the superuser
has none. The socket directory can be entered but not listed by others; the log file is
private.
"""

import base64
import glob
import hashlib
import hmac
import os
import pwd
import secrets
import shutil
import subprocess
import time
from pathlib import Path

from dfsfs.errors import ConfigError

DEFAULT_PORT = 5432
OWNER_ROLE = "dfsfs"  # owns the schema: `dfsfs init`, upgrades, administration
ROLE = OWNER_ROLE  # (the name older callers use)
CLIENT_ROLE = "dfsfs_client"  # daemons and account commands: unprivileged, scoped by session
SUPERUSER = "postgres"
USER_MAP = "dfsfs"
SCRAM_ITERATIONS = 4096
SOCKET_DIR_MODE = 0o711  # others may reach the socket by its name, not list the directory

_HBA = """\
# Written by dfsfs (dfsfs/embedded.py): every connection is authenticated; nothing is trusted.
# Local connections: the OS user, as the kernel reports it, must be allowed the role in
# pg_ident.conf (map {map}). TCP (when enabled): passwords, scram-sha-256.
local   all   all                peer   map={map}
host    all   all   0.0.0.0/0    scram-sha-256
host    all   all   ::/0         scram-sha-256
"""

_IDENT_HEADER = """\
# Written by dfsfs (dfsfs/embedded.py). MAP  OS-USER  ROLE
# The administrators of this server may connect as any role; everyone else as the
# unprivileged client role only.
"""


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


def scram_verifier(password: str, iterations: int = SCRAM_ITERATIONS) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier of `password` (what `ALTER ROLE … PASSWORD`
    accepts in place of the password, so that the password never reaches the server)."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    encode = lambda data: base64.b64encode(data).decode("ascii")  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{encode(salt)}${encode(stored_key)}:{encode(server_key)}"


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

    @property
    def owner_password_file(self) -> Path:
        """The owner role's password (for TCP connections): mode 0600, the administrator's."""
        return self.data_dir / "owner.password"

    def url(self, database: str, role: str = OWNER_ROLE) -> str:
        return f"postgresql+psycopg2://{role}@/{database}?host={self.socket_dir}&port={self.port}"

    def client_url(self, database: str) -> str:
        return self.url(database, CLIENT_ROLE)

    def _command(self, *argv: str) -> list[str]:
        program = [str(self.bin_dir / argv[0]), *argv[1:]]
        return ["runuser", "-u", self.run_as, "--", *program] if self.run_as else program

    def _run(self, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            self._command(*argv), capture_output=True, text=True, cwd="/", check=False,
            input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
        )

    def _run_checked(self, what: str, *argv: str) -> None:
        result = self._run(*argv)
        if result.returncode != 0:
            raise ConfigError(f"{what} failed: {(result.stderr or result.stdout).strip()}")

    def ensure_initialized(self) -> None:
        if not (self.cluster_dir / "PG_VERSION").exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if self.run_as:
                account = pwd.getpwnam(self.run_as)
                os.chown(self.data_dir, account.pw_uid, account.pw_gid)
                _ensure_traversable(self.data_dir)
            self._run_checked(
                "initdb",
                "initdb", "-D", str(self.cluster_dir), "-U", SUPERUSER,
                "--auth-local=peer", "--auth-host=scram-sha-256",
                "--encoding=UTF8", "--locale=C.UTF-8",
            )
        self._lock_down()

    def _lock_down(self) -> bool:
        """Authentication rules and file modes as the module docstring says (also for a
        cluster made by an older dfsfs, which trusted every local connection). Returns
        whether the rules changed."""
        os.chmod(self.data_dir, SOCKET_DIR_MODE if self.run_as else 0o700)
        changed = self._write_private(self.cluster_dir / "pg_hba.conf", _HBA.format(map=USER_MAP))
        changed |= self._write_private(self.cluster_dir / "pg_ident.conf", self._ident_map())
        if not self.log_file.exists():
            self._write_private(self.log_file, "")
        os.chmod(self.log_file, 0o600)
        return changed

    def _ident_map(self) -> str:
        administrators = ["root", SUPERUSER] if self.run_as else [pwd.getpwuid(os.geteuid()).pw_name]
        lines = [_IDENT_HEADER]
        for os_user in administrators:
            for role in (SUPERUSER, OWNER_ROLE, CLIENT_ROLE):
                lines.append(f"{USER_MAP}  {os_user}  {role}\n")
        lines.append(f"{USER_MAP}  /^.*$  {CLIENT_ROLE}\n")
        return "".join(lines)

    def _write_private(self, path: Path, text: str) -> bool:
        """Write `path` (mode 0600, owned by the server's OS user) unless it holds `text`."""
        try:
            if path.read_text() == text:
                return False
        except FileNotFoundError:
            pass
        temporary = path.with_name(path.name + ".dfsfs-new")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(text)
        if self.run_as:
            account = pwd.getpwnam(self.run_as)
            os.chown(temporary, account.pw_uid, account.pw_gid)
        os.replace(temporary, path)
        return True

    def is_running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", str(self.cluster_dir)).returncode == 0

    def start(self) -> None:
        """Start the server unless it is already running; wait until it accepts connections."""
        self.ensure_initialized()
        if self.is_running():
            if self._lock_down():
                self._run_checked("reloading PostgreSQL", "pg_ctl", "reload", "-D",
                                  str(self.cluster_dir))
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
        """Run `sql` as the superuser. The text goes on standard input, never in argv."""
        result = self._run(
            "psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
            "-h", str(self.socket_dir), "-p", str(self.port), "-U", SUPERUSER,
            "-d", database, "-f", "-", stdin=sql,
        )
        if result.returncode != 0:
            raise ConfigError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def owner_password(self) -> str:
        """The owner role's password, made (and stored, mode 0600) on first use."""
        try:
            return self.owner_password_file.read_text().strip()
        except FileNotFoundError:
            pass
        password = secrets.token_urlsafe(32)
        fd = os.open(self.owner_password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(password + "\n")
        return password

    def ensure_database(self, database: str, role: str = OWNER_ROLE) -> None:
        """The owner role (`role`) and the client role, unprivileged, and a database the
        owner owns that only they may connect to. Idempotent."""
        verifier = scram_verifier(self.owner_password())
        self.psql(f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {_literal(role)}) THEN
        CREATE ROLE {_ident(role)} LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {_literal(CLIENT_ROLE)}) THEN
        CREATE ROLE {_ident(CLIENT_ROLE)} LOGIN;
    END IF;
END $$;
ALTER ROLE {_ident(role)} NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS LOGIN
    PASSWORD {_literal(verifier)};
ALTER ROLE {_ident(CLIENT_ROLE)} NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS NOINHERIT LOGIN;
-- Daemons of every account share the client role. A role sees the query text of its own
-- backends in pg_stat_activity: keep it empty. And any role may set defaults for itself,
-- which would weigh on every account's daemon: clear what an account may have set.
ALTER ROLE {_ident(CLIENT_ROLE)} RESET ALL;
DELETE FROM pg_db_role_setting
 WHERE setrole = (SELECT oid FROM pg_roles WHERE rolname = {_literal(CLIENT_ROLE)})
   AND setdatabase <> 0;
ALTER ROLE {_ident(CLIENT_ROLE)} SET track_activities = off;
REVOKE CONNECT, TEMPORARY ON DATABASE postgres FROM PUBLIC;
REVOKE CONNECT, TEMPORARY ON DATABASE template1 FROM PUBLIC;
""")
        if not self.psql(f"SELECT 1 FROM pg_database WHERE datname = {_literal(database)}").strip():
            self.psql(f"CREATE DATABASE {_ident(database)} OWNER {_ident(role)}")
        self.psql(f"""
REVOKE ALL ON DATABASE {_ident(database)} FROM PUBLIC;
GRANT CONNECT ON DATABASE {_ident(database)} TO {_ident(CLIENT_ROLE)};
""")
        # Backends of one role may signal each other, and anyone may fill the disk with
        # large objects: an account could end or crowd out the others' daemons.
        self.psql("""
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_cancel_backend(integer),
    pg_catalog.pg_terminate_backend(integer, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION pg_catalog.lo_create(oid), pg_catalog.lo_creat(integer),
    pg_catalog.lo_from_bytea(oid, bytea) FROM PUBLIC;
""", database)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ensure_traversable(path: Path) -> None:
    """The postgres user must reach `path` through its parents; say so clearly if not."""
    for parent in path.parents:
        if not parent.stat().st_mode & 0o001:
            raise ConfigError(
                f"the PostgreSQL data directory {path} is inside {parent}, which the "
                f"'{SUPERUSER}' user cannot enter; choose a data directory elsewhere "
                "(for example under /var/lib/dfsfs)"
            )
