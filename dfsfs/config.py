"""Settings from flags, environment, config file and defaults, validated once at start-up.

Precedence: flags > environment > config file > defaults. The config file is TOML whose
keys are the field names of `Settings` (for example ``chunk_size = "4M"``).
"""

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
SYSTEM_CONFIG_FILE = Path("/etc/dfsfs/config.toml")
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
}


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


def _config_file_path(explicit: Any, data_dir: Path) -> Path | None:
    if explicit is not None:
        path = PARSERS["config_file"](explicit)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    for candidate in (data_dir / "config.toml", SYSTEM_CONFIG_FILE):
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
    return values


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
        outer.pop("config_file", None), data_dir or default_data_dir(environ)
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


def database_url_for(settings: Settings) -> str:
    """The URL of a reachable metadata database: the configured one, or the embedded
    server in the data directory (started now unless it is already running)."""
    url = settings.database_url or _start_embedded(settings.data_dir)
    _check_reachable(url)
    return url


def _start_embedded(data_dir: Path) -> str:
    from dfsfs.embedded import PostgresServer

    data_dir.mkdir(parents=True, exist_ok=True)
    # Two dfsfs commands starting at once must not both run pg_ctl start.
    with open(data_dir / "postgres.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        server = PostgresServer(data_dir / "postgres")
        server.start()
        server.ensure_database(EMBEDDED_DATABASE)
    return server.url(EMBEDDED_DATABASE)


def _check_reachable(url: str) -> None:
    from dfsfs.meta.db import check_reachable, create_engine

    engine = create_engine(url, pool_size=1)
    try:
        check_reachable(engine)
    except MetadataUnavailableError as error:
        raise ConfigError(f"{error} (database URL {redact_url(url)})") from None
    finally:
        engine.dispose()
