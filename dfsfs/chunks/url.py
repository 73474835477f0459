"""Open a chunk store from the URL a user configured (`--store`, `DFSFS_STORE`, …).

Store credentials never travel in a URL (a URL given as a flag stays visible in `ps` for
the daemon's life): they come from a credentials file named by the URL (`credentials=`),
or from the environment dfsfs was started with (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY),
which `take_environment_credentials` moves out of the process environment. Every part of a
URL is checked before any of it is shown, and what is shown never holds a value that could
be a secret.
"""

import configparser
import ctypes
import os
import re
import stat
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from dfsfs.chunks.base import ChunkStore
from dfsfs.chunks.local import LocalChunkStore
from dfsfs.chunks.s3 import DEFAULT_TIMEOUT_S, S3ChunkStore
from dfsfs.errors import ConfigError

ACCEPTED_FORMS = (
    "file:///absolute/path, /absolute/path, or s3://bucket[/prefix]?endpoint=http://host:port"
    "[&region=…][&credentials=/path/to/file[&profile=…]][&timeout=SECONDS]"
)
DEFAULT_REGION = "us-east-1"
MAX_TIMEOUT_S = 600
_S3_PARAMETERS = {"endpoint", "region", "credentials", "profile", "timeout"}
_CREDENTIAL_PARAMETERS = {"access_key", "secret_key", "session_token"}
_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_SHOWN_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.:/%~+-]{0,200}")
ENVIRONMENT_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    session_token: str | None = None


# Credentials taken from the start-up environment (see take_environment_credentials).
_taken: Credentials | None = None


def open_store(url: str, name: str, *, create_bucket: bool = False,
               keys_in_url: bool = False) -> ChunkStore:
    """The store `url` names, called `name` in messages and damage records.

    S3 credentials come from the URL's credentials= file, else from the start-up
    environment, else from boto3's own places (~/.aws, instance profile). With
    `keys_in_url`, the URL may carry them (access_key=, secret_key=, session_token=): an
    account's own stores, which an administrator records in the database and the login
    hands to the daemon, never through argv, a file or the environment.
    Raises ConfigError for a URL of any other form; no message ever shows a credential.
    """
    if url.startswith("/"):
        return LocalChunkStore(url, name)
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        raise _bad_url(url, "not a URL") from None
    if parts.scheme == "file":
        return _open_file(url, parts, name)
    if parts.scheme == "s3":
        return _open_s3(url, parts, name, create_bucket, keys_in_url)
    reason = (f"unknown scheme {parts.scheme!r}" if _SHOWN_NAME.fullmatch(parts.scheme)
              else "not a URL or absolute path")
    raise _bad_url(url, reason)


def prepare_stores(*urls_and_names: str, report: Callable[[str], None] = print) -> None:
    """For `dfsfs init`: create each missing S3 bucket and check that its credentials may
    write, read, list and delete there. StorageError names the permission that is lacking.
    Arguments alternate URL and name ('primary', 'backup'); file:// stores are skipped."""
    for url, name in zip(urls_and_names[::2], urls_and_names[1::2], strict=True):
        if urllib.parse.urlsplit(url).scheme != "s3":
            continue
        store = open_store(url, name, create_bucket=True)
        try:
            store.probe()
        finally:
            store.close()
        verb = "created" if store.created_bucket else "checked"
        report(f"{name} store: {verb} bucket {store.bucket} at {store.endpoint_url or 'AWS S3'}")


def take_environment_credentials(environ=None) -> None:
    """Keep S3 credentials from the environment for the stores this process opens, and take
    them out of the environment (and the memory /proc/PID/environ shows), so that a daemon
    forked from here does not carry them where other tools read environments."""
    global _taken
    environ = os.environ if environ is None else environ
    access_key, secret_key, token = (environ.get(name) for name in ENVIRONMENT_CREDENTIALS)
    if access_key and secret_key:
        _taken = Credentials(access_key, secret_key, token or None)
    for name in ENVIRONMENT_CREDENTIALS:
        if name in environ:
            _wipe_startup_environment(name)
            del environ[name]


def _wipe_startup_environment(name: str) -> None:
    """Overwrite the value of `name` in the C environment block with zero bytes."""
    libc = ctypes.CDLL(None)
    environ = ctypes.POINTER(ctypes.c_char_p).in_dll(libc, "environ")
    prefix = name.encode() + b"="
    index = 0
    while environ[index] is not None:
        entry = environ[index]
        if entry.startswith(prefix):
            address = ctypes.cast(environ, ctypes.POINTER(ctypes.c_void_p))[index]
            ctypes.memset(address + len(prefix), 0, len(entry) - len(prefix))
        index += 1


def _open_file(url: str, parts: urllib.parse.SplitResult, name: str) -> LocalChunkStore:
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise _bad_url(url, "a file URL has no host, query or fragment")
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/"):
        raise _bad_url(url, "the path must be absolute")
    return LocalChunkStore(path, name)


def _open_s3(
    url: str, parts: urllib.parse.SplitResult, name: str, create_bucket: bool, keys_in_url: bool
) -> S3ChunkStore:
    if not parts.netloc or "@" in parts.netloc or ":" in parts.netloc:
        raise _bad_url(url, "the host part must be a bucket name (the server goes in "
                       "endpoint=, credentials in a file named by credentials=)")
    if parts.fragment:
        raise _bad_url(url, "an s3 URL has no fragment")
    parameters = _query_parameters(url, parts.query, keys_in_url)
    endpoint = parameters.get("endpoint")
    if endpoint is not None:
        _check_endpoint(url, endpoint)
    credentials = _credentials(url, parameters)
    return S3ChunkStore(
        bucket=parts.netloc,
        prefix=urllib.parse.unquote(parts.path).strip("/"),
        endpoint_url=endpoint,
        access_key=credentials.access_key if credentials else None,
        secret_key=credentials.secret_key if credentials else None,
        session_token=credentials.session_token if credentials else None,
        region=parameters.get("region", DEFAULT_REGION),
        name=name,
        create_bucket=create_bucket,
        timeout_s=_timeout(url, parameters.get("timeout")),
    )


def _query_parameters(url: str, query: str, keys_in_url: bool) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise _bad_url(url, "malformed query (use name=value pairs joined by &)") from None
    parameters = dict(pairs)
    given_credentials = sorted(set(parameters) & _CREDENTIAL_PARAMETERS)
    if given_credentials and not keys_in_url:
        raise _bad_url(url, f"{', '.join(given_credentials)} may not be given in a URL (it "
                       "would show in `ps` and logs): put the keys in a credentials file named "
                       "by credentials=, or in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    unknown = sorted(set(parameters) - _S3_PARAMETERS - _CREDENTIAL_PARAMETERS)
    if unknown:
        shown = [name if _SHOWN_NAME.fullmatch(name) else "(a name not shown)" for name in unknown]
        raise _bad_url(url, f"unknown parameter(s) {', '.join(shown)}")
    if len(parameters) != len(pairs) or not all(parameters.values()):
        raise _bad_url(url, "each parameter must be given once, with a value")
    if "profile" in parameters and "credentials" not in parameters:
        raise _bad_url(url, "profile= names a section of the credentials= file: give both")
    if not _REGION.fullmatch(parameters.get("region", DEFAULT_REGION)):
        raise _bad_url(url, "region= must be a region name such as us-east-1")
    if not _SHOWN_NAME.fullmatch(parameters.get("profile", "default")):
        raise _bad_url(url, "profile= must be a section name such as default")
    return parameters


def _timeout(url: str, value: str | None) -> float:
    if value is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0.5 <= seconds <= MAX_TIMEOUT_S:
        raise _bad_url(url, f"timeout= must be seconds from 0.5 to {MAX_TIMEOUT_S}")
    return seconds


def _credentials(url: str, parameters: dict[str, str]) -> Credentials | None:
    if "access_key" in parameters or "secret_key" in parameters:
        if "credentials" in parameters or not {"access_key", "secret_key"} <= set(parameters):
            raise _bad_url(url, "give access_key= and secret_key= together, and no credentials=")
        return Credentials(parameters["access_key"], parameters["secret_key"],
                           parameters.get("session_token"))
    path = parameters.get("credentials")
    if path is None:
        return _taken or _from_environment()
    if not path.startswith("/"):
        raise _bad_url(url, "credentials= must be an absolute path")
    return read_credentials_file(path, parameters.get("profile", "default"))


def _from_environment() -> Credentials | None:
    access_key, secret_key, token = (os.environ.get(n) for n in ENVIRONMENT_CREDENTIALS)
    return Credentials(access_key, secret_key, token or None) if access_key and secret_key else None


def read_credentials_file(path: str, profile: str = "default") -> Credentials:
    """Keys from an AWS-style credentials file that only its owner may read:

        [default]
        aws_access_key_id = …
        aws_secret_access_key = …
    """
    try:
        with open(path, encoding="utf-8") as file:
            mode = os.fstat(file.fileno()).st_mode
            text = file.read()
    except OSError as error:
        raise ConfigError(f"cannot read the S3 credentials file {path}: {error.strerror}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise ConfigError(f"the S3 credentials file {path} may be read by other users: "
                          f"run `chmod 600 {path}`")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=path)
    except configparser.Error:
        raise ConfigError(f"the S3 credentials file {path} is not in the AWS credentials format "
                          "([default] with aws_access_key_id and aws_secret_access_key)") from None
    if not parser.has_section(profile):
        raise ConfigError(f"the S3 credentials file {path} has no [{profile}] section")
    section = parser[profile]
    access_key = section.get("aws_access_key_id", "").strip()
    secret_key = section.get("aws_secret_access_key", "").strip()
    if not access_key or not secret_key:
        raise ConfigError(f"the [{profile}] section of the S3 credentials file {path} needs "
                          "aws_access_key_id and aws_secret_access_key")
    return Credentials(access_key, secret_key, section.get("aws_session_token") or None)


def _valid_endpoint(endpoint: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(endpoint)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and "@" not in parts.netloc
            and bool(_SAFE_VALUE.fullmatch(endpoint)))


def _valid_timeout(value: str) -> bool:
    try:
        return 0.5 <= float(value) <= MAX_TIMEOUT_S
    except ValueError:
        return False


# What each parameter's value must look like; only a value that passes is ever shown.
_VALID = {
    "endpoint": _valid_endpoint,
    "region": lambda value: bool(_REGION.fullmatch(value)),
    "profile": lambda value: bool(_SHOWN_NAME.fullmatch(value)),
    "timeout": _valid_timeout,
    "credentials": lambda value: value.startswith("/") and bool(_SAFE_VALUE.fullmatch(value)),
}


def _check_endpoint(url: str, endpoint: str) -> None:
    try:
        parts = urllib.parse.urlsplit(endpoint)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise _bad_url(url, "endpoint= is not a URL (http(s)://host[:port])") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        raise _bad_url(url, "endpoint= must be http(s)://host[:port]")


def _bad_url(url: str, reason: str) -> ConfigError:
    return ConfigError(
        f"bad chunk store URL {shown_url(url)!r}: {reason}; accepted forms: {ACCEPTED_FORMS}"
    )


def shown_url(url: str) -> str:
    """The URL as it may be shown: scheme, bucket or path, and only the values of known,
    non-secret parameters that look like what they should be; everything else is '***'."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "***"
    scheme = parts.scheme if _SHOWN_NAME.fullmatch(parts.scheme) else "***"
    host = parts.netloc.rpartition("@")[2]
    netloc = ("***@" if "@" in parts.netloc else "") + (
        host if _SAFE_VALUE.fullmatch(host) else "***")
    shown = []
    for pair in filter(None, parts.query.split("&")):
        key, _, value = pair.partition("=")
        key = urllib.parse.unquote_plus(key)
        value = urllib.parse.unquote_plus(value)
        if key in _S3_PARAMETERS and _VALID[key](value):
            shown.append(f"{key}={value}")  # a value that passes its own check
        else:
            shown.append(f"{key if _SHOWN_NAME.fullmatch(key) else '***'}=***")
    path = parts.path if _SAFE_VALUE.fullmatch(parts.path) else "/***"
    text = f"{scheme}://{netloc}{path}" if parts.scheme else ("***" if url else "")
    return text + ("?" + "&".join(shown) if shown else "")
