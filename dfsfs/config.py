"""Settings from flags, environment, config file and defaults, validated once at start-up.

Precedence: flags > environment > config file > defaults. The config file is TOML whose
keys are the field names of `Settings` (for example ``chunk_size = "4M"``): the user's
(DATA_DIR/config.toml), else the system install's (/etc/dfsfs/dfsfs.toml, written by
`dfsfs init` as root; every user of the machine then mounts from the shared server).

Secrets (the owner's database password, S3 keys, account passwords) never come from argv,
are taken out of the environment as soon as they are read, and are read only from files
no one else may read: such a file with group or other permission bits is refused.
"""

import ctypes
import fcntl
import logging
import math
import os
import re
import tomllib
from decimal import Decimal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from dfsfs.errors import ConfigError, MetadataUnavailableError

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
DEFAULT_CHUNK_SIZE = 1 * MiB
MIN_CHUNK_SIZE = 4 * KiB
MAX_CHUNK_SIZE = 64 * MiB
BACKUP_MODES = ("sync", "async")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SYSTEM_CONFIG_FILE = Path("/etc/dfsfs/dfsfs.toml")
SYSTEM_CONFIG_ENV = "DFSFS_SYSTEM_CONFIG"  # another path for it (tests, packaging)
CLIENT_ROLE = "dfsfs_client"  # the unprivileged role of daemons and account commands
DATABASE_SCHEMES = ("postgresql", "postgresql+psycopg2", "postgres")
STORE_SCHEMES = ("file", "s3")

# Environment variable of each setting that has one.
ENVIRONMENT = {
    "database_url": "DFSFS_DATABASE_URL",
    "data_dir": "DFSFS_DATA_DIR",
    "store_url": "DFSFS_STORE",
    "backup_url": "DFSFS_BACKUP",
    "backup_mode": "DFSFS_BACKUP_MODE",
    "chunk_size": "DFSFS_CHUNK_SIZE",
    "write_buffer_bytes": "DFSFS_WRITE_BUFFER",
    "read_cache_bytes": "DFSFS_READ_CACHE",
    "readahead_chunks": "DFSFS_READAHEAD",
    "config_file": "DFSFS_CONFIG",
    "log_level": "DFSFS_LOG_LEVEL",
    "owner_url": "DFSFS_OWNER_URL",
    "server_dir": "DFSFS_SERVER_DIR",
    "session_heartbeat_s": "DFSFS_SESSION_HEARTBEAT",
    "session_expiry_s": "DFSFS_SESSION_EXPIRY",
}
# Variables holding secrets: taken out of the environment (and wiped from the process's
# initial environment block, which /proc/PID/environ shows) as soon as dfsfs starts.
SECRET_ENVIRONMENT = ("DFSFS_PASSWORD", "DFSFS_OWNER_URL")


@dataclass(frozen=True)
class Settings:
    database_url: str | None  # None: the embedded PostgreSQL in data_dir
    data_dir: Path
    store_url: str  # primary chunk store (file:// or s3://)
    backup_url: str  # backup chunk store
    backup_mode: str = "sync"  # 'sync': backup written before a chunk is referenced
    # Chunk size of a new database (`dfsfs init`); an existing one uses its recorded size.
    chunk_size: int | None = None
    write_buffer_bytes: int = 64 * MiB  # global budget of buffered writes; bounds the daemon's memory
    read_cache_bytes: int = 128 * MiB
    readahead_chunks: int = 4
    attr_timeout_s: float = 1.0
    entry_timeout_s: float = 1.0
    log_level: str = "WARNING"
    config_file: Path | None = None  # the file that was read, if any
    # The owner's credentials (dfsfs init, administration) when database_url names the
    # client role: a secret, so only from a private config file or DFSFS_OWNER_URL.
    owner_url: str | None = None
    # The embedded server's directory (socket, cluster); default DATA_DIR/postgres. A
    # system install names its shared server here; only the OS user who owns it (or
    # root) starts it, everyone else connects as the client role.
    server_dir: Path | None = None
    session_heartbeat_s: float = 60.0  # a mount renews its login session this often
    session_expiry_s: float = 300.0  # ... which ends this long after the last renewal

    def __repr__(self) -> str:  # URLs may carry credentials
        shown = ", ".join(
            f"{f.name}={_redacted_value(f.name, getattr(self, f.name))!r}" for f in fields(self)
        )
        return f"Settings({shown})"


SETTING_NAMES = frozenset(f.name for f in fields(Settings))


def _redacted_value(name: str, value: Any) -> Any:
    return redact_url(value) if name.endswith("_url") and isinstance(value, str) else value


# --- values -------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNIT_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(value: str | int, what: str = "size") -> int:
    """Bytes from an int or a string like 4096, 64K, 1.5M, 4MiB (binary) or 1MB (decimal)."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a number of bytes, not {value!r}")
    if isinstance(value, int):
        number = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ConfigError(
                f"{what} must be a number of bytes with an optional suffix "
                f"K, M, G, T (powers of 1024) or KB, MB, GB, TB (powers of 1000), not {value!r}"
            )
        digits, unit, tail = match.groups()
        base = 1000 if tail.lower() == "b" and unit else 1024
        exact = Decimal(digits) * base ** _UNIT_POWER[unit.lower()]
        if exact != exact.to_integral_value():
            raise ConfigError(f"{what} must be a whole number of bytes, not {value!r}")
        number = int(exact)
    if number < 0:
        raise ConfigError(f"{what} must not be negative, not {value!r}")
    return number


def format_size(size: int) -> str:
    """A short human form of a byte count: 512 B, 64 KiB, 10 GiB, 1.5 GiB."""
    for unit, factor in (("TiB", 1024**4), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= factor:
            amount = size / factor
            return f"{amount:.0f} {unit}" if amount == int(amount) else f"{amount:.1f} {unit}"
    return f"{size} B"


def _parse_chunk_size(value: str | int) -> int:
    size = parse_size(value, "chunk size")
    if size <= 0 or size & (size - 1):
        raise ConfigError(f"chunk size must be a power of two, not {value!r}")
    if not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
        raise ConfigError(
            f"chunk size must be between {format_size(MIN_CHUNK_SIZE)} and "
            f"{format_size(MAX_CHUNK_SIZE)}, not {format_size(size)}"
        )
    return size


def _parse_number(what: str, convert: Callable[[Any], float], unit: str) -> Callable:
    """A parser of non-negative numbers: `unit` is 'whole number' or 'number of seconds'."""

    def parse(value: Any):
        try:
            number = convert(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be a {unit}, not {value!r}") from None
        if isinstance(value, bool) or not math.isfinite(number) or number < 0:
            raise ConfigError(f"{what} must be a non-negative {unit}, not {value!r}")
        return number

    return parse


def _parse_choice(what: str, choices: tuple[str, ...], normalise=str.lower):
    def parse(value: str) -> str:
        choice = normalise(str(value).strip())
        if choice not in choices:
            raise ConfigError(f"{what} must be one of {', '.join(choices)}, not {value!r}")
        return choice

    return parse


def _parse_path(what: str) -> Callable[[str | Path], Path]:
    def parse(value: str | Path) -> Path:
        path = Path(os.path.expanduser(str(value)))
        if not path.is_absolute():
            raise ConfigError(f"{what} must be an absolute path, not {str(value)!r}")
        return path

    return parse


def normalise_database_url(url: str) -> str:
    """postgresql://… (libpq style) becomes postgresql+psycopg2://…; other schemes are refused."""
    scheme, sep, rest = str(url).strip().partition("://")
    if not sep or scheme.lower() not in DATABASE_SCHEMES:
        raise ConfigError(
            f"database URL {redact_url(str(url))!r} has an unknown scheme: "
            "use postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        )
    return f"postgresql+psycopg2://{rest}"


def normalise_store_url(url: str | Path, what: str = "store") -> str:
    """file:///dir, s3://bucket/prefix?…, or an absolute path (which becomes a file:// URL)."""
    text = str(url).strip()
    if text.startswith("/"):
        return Path(text).as_uri()
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in STORE_SCHEMES:
        raise ConfigError(
            f"{what} location {redact_url(text)!r} must be a file:// URL, an s3:// URL "
            "or an absolute path"
        )
    if scheme == "file" and not rest.startswith("/"):
        raise ConfigError(f"{what} location {text!r} must name an absolute path (file:///…)")
    if scheme == "s3" and not urlsplit(text).netloc:
        raise ConfigError(f"{what} location {redact_url(text)!r} names no bucket (s3://BUCKET/…)")
    return f"{scheme}://{rest}"


def file_url_path(url: str) -> Path | None:
    """The directory of a file:// store URL; None for other stores."""
    parts = urlsplit(url)
    return Path(unquote(parts.path)) if parts.scheme == "file" else None


# Query parameters whose values are secrets (S3 keys, passwords, tokens).
_SECRET_PARAM = re.compile(r"pass|secret|token|key|credential|signature", re.IGNORECASE)


def redact_url(url: str | None) -> str:
    """The URL with its password and secret query parameters replaced by '***'."""
    if url is None:
        return "(embedded)"
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "***"
    if not parts.scheme or parts.scheme == "file":
        return str(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    netloc = f"{userinfo}@{hostport}" if at else hostport
    query = [
        (key, "***" if _SECRET_PARAM.search(key) else value)
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(
        (parts.scheme, netloc, parts.path, urlencode(query, safe="/*:", quote_via=quote),
         parts.fragment)
    )


# How each setting is parsed from a string (environment, flag) or a TOML value.
PARSERS: dict[str, Callable[[Any], Any]] = {
    "database_url": normalise_database_url,
    "data_dir": _parse_path("data directory"),
    "store_url": lambda value: normalise_store_url(value, "store"),
    "backup_url": lambda value: normalise_store_url(value, "backup store"),
    "backup_mode": _parse_choice("backup mode", BACKUP_MODES),
    "chunk_size": _parse_chunk_size,
    "write_buffer_bytes": lambda value: parse_size(value, "write buffer size"),
    "read_cache_bytes": lambda value: parse_size(value, "read cache size"),
    "readahead_chunks": _parse_number("readahead (chunks)", int, "whole number"),
    "attr_timeout_s": _parse_number("attribute timeout", float, "number of seconds"),
    "entry_timeout_s": _parse_number("entry timeout", float, "number of seconds"),
    "log_level": _parse_choice("log level", LOG_LEVELS, normalise=str.upper),
    "config_file": _parse_path("config file"),
    "owner_url": normalise_database_url,
    "server_dir": _parse_path("server directory"),
    "session_heartbeat_s": _parse_number("session heartbeat", float, "number of seconds"),
    "session_expiry_s": _parse_number("session expiry", float, "number of seconds"),
}


# --- sources ------------------------------------------------------------------------------


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    if os.geteuid() == 0:
        return Path("/var/lib/dfsfs")
    xdg = environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "dfsfs"


def _from_flags(overrides: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(overrides) - SETTING_NAMES
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    return {name: value for name, value in overrides.items() if value is not None}


def _from_environment(environ: Mapping[str, str]) -> dict[str, str]:
    # An empty variable counts as unset, so `DFSFS_DATABASE_URL= dfsfs …` means embedded.
    return {name: environ[var] for name, var in ENVIRONMENT.items() if environ.get(var)}


def system_config_file(environ: Mapping[str, str] | None = None) -> Path:
    """Where the system install's settings are (written by `dfsfs init` as root)."""
    environ = os.environ if environ is None else environ
    override = environ.get(SYSTEM_CONFIG_ENV)
    return Path(override) if override else SYSTEM_CONFIG_FILE


def _config_file_path(explicit: Any, data_dir: Path, environ: Mapping[str, str]) -> Path | None:
    if explicit is not None:
        path = PARSERS["config_file"](explicit)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    for candidate in (data_dir / "config.toml", system_config_file(environ)):
        if candidate.is_file():
            return candidate
    return None


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings of a TOML file; unknown keys are an error (a typo must not pass silently)."""
    try:
        with open(path, "rb") as file:
            values = tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    unknown = set(values) - (SETTING_NAMES - {"config_file"})
    if unknown:
        raise ConfigError(
            f"config file {path} has unknown key(s): {', '.join(sorted(unknown))}; "
            f"known keys: {', '.join(sorted(SETTING_NAMES - {'config_file'}))}"
        )
    secrets_held = [name for name, value in values.items() if holds_secret(name, value)]
    if secrets_held:
        check_private_file(path, f"secrets ({', '.join(sorted(secrets_held))})")
    return values


def holds_secret(name: str, value: Any) -> bool:
    """Whether a setting's value is a secret: a database password (except the client
    role's, which opens nothing without an account's login) or S3 keys in a store URL."""
    if not isinstance(value, str) or not name.endswith("_url"):
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return True
    if name in ("database_url", "owner_url"):
        return bool(parts.password) and (name == "owner_url" or parts.username != CLIENT_ROLE)
    return any(_SECRET_PARAM.search(key) for key, _ in parse_qsl(parts.query))


def check_private_file(path: Path | str, holding: str) -> None:
    """Refuse a file holding secrets that others may read or write (group or other
    permission bits), with a message naming the file and the fix."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
    if mode & 0o077:
        raise ConfigError(
            f"{path} holds {holding} but others may access it (mode {mode & 0o777:03o}): "
            f"run `chmod 600 {path}` and keep it readable by its owner only"
        )


def take_secret_environment(names=SECRET_ENVIRONMENT) -> dict[str, str]:
    """Take the secret variables out of this process's environment and return them.

    os.environ.pop alone is not enough: /proc/PID/environ shows the process's initial
    environment block, which unsetenv leaves as it was, and a forked daemon inherits it.
    So each value is first overwritten with NUL bytes where it lies in that block.
    """
    taken = {}
    wanted = {name.encode() + b"=": name for name in names if name in os.environ}
    if not wanted:
        return taken
    environ = ctypes.POINTER(ctypes.c_void_p).in_dll(ctypes.CDLL(None), "environ")
    index = 0
    while environ[index]:
        address = environ[index]
        entry = ctypes.string_at(address)
        for prefix, name in wanted.items():
            if entry.startswith(prefix):
                ctypes.memset(address + len(prefix), 0, len(entry) - len(prefix))
        index += 1
    for name in wanted.values():
        taken[name] = os.environ.pop(name)
    return taken


def _parse_all(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {name: PARSERS[name](value) for name, value in raw.items()}


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from flags (`overrides`, keyed by field name; None = not given), the
    environment, the config file and the defaults, in that order of precedence."""
    environ = os.environ if environ is None else environ
    outer = {**_from_environment(environ), **_from_flags(overrides or {})}
    # The config file is looked for in the data directory given by flag or environment.
    data_dir = PARSERS["data_dir"](outer["data_dir"]) if "data_dir" in outer else None
    config_file = _config_file_path(
        outer.pop("config_file", None), data_dir or default_data_dir(environ), environ
    )
    from_file = read_config_file(config_file) if config_file else {}
    values = _parse_all({**from_file, **outer})
    data_dir = values.pop("data_dir", None) or default_data_dir(environ)
    settings = Settings(
        database_url=values.pop("database_url", None),
        data_dir=data_dir,
        store_url=values.pop("store_url", None) or (data_dir / "chunks").as_uri(),
        backup_url=values.pop("backup_url", None) or (data_dir / "backup").as_uri(),
        config_file=config_file,
        **values,
    )
    _check_consistent(settings)
    return settings


def _check_consistent(settings: Settings) -> None:
    if not 0 < settings.session_heartbeat_s < settings.session_expiry_s:
        raise ConfigError(
            f"the session heartbeat ({settings.session_heartbeat_s:g} s) must be shorter "
            f"than the session expiry ({settings.session_expiry_s:g} s)"
        )
    if settings.store_url.rstrip("/") == settings.backup_url.rstrip("/"):
        raise ConfigError(
            f"the backup store must differ from the primary store "
            f"(both are {redact_url(settings.store_url)})"
        )
    if settings.chunk_size is not None:
        check_write_buffer_fits(settings, settings.chunk_size)


def check_write_buffer_fits(settings: Settings, chunk_size: int) -> None:
    if settings.write_buffer_bytes < chunk_size:
        raise ConfigError(
            f"the write buffer ({format_size(settings.write_buffer_bytes)}) must hold at least "
            f"one chunk ({format_size(chunk_size)})"
        )


# --- the metadata database ----------------------------------------------------------------

EMBEDDED_DATABASE = "dfsfs"


@dataclass(frozen=True)
class DatabaseAccess:
    """How this invocation reaches the metadata database.

    `client_url` names the client role: daemons and account commands use it, always
    (the daemon never holds more than one account's session). `owner_url` names the
    owner role when this user has its credentials (a configured owner URL or database
    URL of another role, or the embedded server's administrator connecting by peer),
    else None: administration then needs an administrator's login.
    """

    client_url: str
    owner_url: str | None
    embedded: bool
    server_dir: Path | None = None  # the embedded server's directory

    def __repr__(self) -> str:
        return (f"DatabaseAccess(client_url={redact_url(self.client_url)!r}, "
                f"owner_url={redact_url(self.owner_url) if self.owner_url else None!r})")


def embedded_server_dir(settings: Settings) -> Path:
    return settings.server_dir or settings.data_dir / "postgres"


def database_access(settings: Settings) -> DatabaseAccess:
    """The URLs of a reachable metadata database: the configured one, or the embedded
    server (started now when this user administers it and it is not running)."""
    if settings.database_url is not None:
        url = sa_make_url(settings.database_url)
        if url.username == CLIENT_ROLE:
            client_url, owner_url = settings.database_url, settings.owner_url
        else:
            client_url = url.set(username=CLIENT_ROLE, password=None).render_as_string(
                hide_password=False)
            owner_url = settings.owner_url or settings.database_url
        access = DatabaseAccess(client_url, owner_url, embedded=False)
    else:
        access = _embedded(settings)
    _check_reachable(access.client_url)
    return access


def database_url_for(settings: Settings) -> str:
    """The URL administration connects with: the owner's when this user has it, else
    the client role's."""
    access = database_access(settings)
    return access.owner_url or access.client_url


def sa_make_url(url: str):
    from sqlalchemy.engine import make_url

    return make_url(url)


def administers_server(server_dir: Path) -> bool:
    """Whether this user may start (and connects by peer as the owner of) the embedded
    server in `server_dir`: root, or the owner of a private server's directory."""
    if os.geteuid() == 0:
        return True
    for path in (server_dir, *server_dir.parents):
        if path.exists():
            return path.stat().st_uid == os.geteuid()
    return False


def _embedded(settings: Settings) -> DatabaseAccess:
    from dfsfs.embedded import PostgresServer

    server_dir = embedded_server_dir(settings)
    if not administers_server(server_dir):
        server = PostgresServer(server_dir)
        if not (server_dir / f".s.PGSQL.{server.port}").exists():
            raise ConfigError(
                f"the dfsfs PostgreSQL server in {server_dir} is not running: ask the "
                "administrator of this machine to start it")
        return DatabaseAccess(server.client_url(EMBEDDED_DATABASE), settings.owner_url,
                              embedded=True, server_dir=server_dir)
    server_dir.parent.mkdir(parents=True, exist_ok=True)
    # Two dfsfs commands starting at once must not both run pg_ctl start.
    with open(server_dir.parent / "postgres.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        server = PostgresServer(server_dir)
        server.start()
        server.ensure_database(EMBEDDED_DATABASE)
    return DatabaseAccess(server.client_url(EMBEDDED_DATABASE),
                          settings.owner_url or server.url(EMBEDDED_DATABASE),
                          embedded=True, server_dir=server_dir)


def _check_reachable(url: str) -> None:
    from dfsfs.meta.db import check_reachable, create_engine

    engine = create_engine(url, pool_size=1)
    try:
        check_reachable(engine)
    except MetadataUnavailableError as error:
        raise ConfigError(f"{error} (database URL {redact_url(url)})") from None
    finally:
        engine.dispose()
