"""Open a chunk store from the URL a user configured (`--store`, `DFSFS_STORE`, …)."""

import os
import re
import urllib.parse

from dfsfs.chunks.base import ChunkStore
from dfsfs.chunks.local import LocalChunkStore
from dfsfs.chunks.s3 import S3ChunkStore
from dfsfs.errors import ConfigError

ACCEPTED_FORMS = (
    "file:///absolute/path, /absolute/path, or "
    "s3://bucket[/prefix]?endpoint=http://host:port[&region=…][&access_key=…&secret_key=…]"
)
DEFAULT_REGION = "us-east-1"
_S3_PARAMETERS = {"endpoint", "region", "access_key", "secret_key"}
_SECRET_PARAMETERS = {"access_key", "secret_key"}
_USER_INFO = re.compile(r"^([a-z0-9+.-]*://)[^/?#@]*@", re.IGNORECASE)


def open_store(url: str, name: str, *, create_bucket: bool = False) -> ChunkStore:
    """The store `url` names, called `name` in messages and damage records.

    S3 credentials come from the URL's access_key/secret_key, else from the environment
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), else from boto3's usual places.
    Raises ConfigError for a URL of any other form; no message ever shows a credential.
    """
    if url.startswith("/"):
        return LocalChunkStore(url, name)
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise _bad_url(url, str(exc)) from None
    if parts.scheme == "file":
        return _open_file(url, parts, name)
    if parts.scheme == "s3":
        return _open_s3(url, parts, name, create_bucket)
    reason = f"unknown scheme {parts.scheme!r}" if parts.scheme else "not a URL or absolute path"
    raise _bad_url(url, reason)


def _open_file(url: str, parts: urllib.parse.SplitResult, name: str) -> LocalChunkStore:
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise _bad_url(url, "a file URL has no host, query or fragment")
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/"):
        raise _bad_url(url, "the path must be absolute")
    return LocalChunkStore(path, name)


def _open_s3(
    url: str, parts: urllib.parse.SplitResult, name: str, create_bucket: bool
) -> S3ChunkStore:
    if not parts.netloc or "@" in parts.netloc or ":" in parts.netloc:
        raise _bad_url(url, "the host part must be a bucket name (the server goes in endpoint=, "
                       "credentials in access_key= and secret_key=)")
    if parts.fragment:
        raise _bad_url(url, "an s3 URL has no fragment")
    parameters = _query_parameters(url, parts.query)
    endpoint = parameters.get("endpoint")
    if endpoint is not None:
        _check_endpoint(url, endpoint)
    return S3ChunkStore(
        bucket=parts.netloc,
        prefix=urllib.parse.unquote(parts.path).strip("/"),
        endpoint_url=endpoint,
        access_key=parameters.get("access_key", os.environ.get("AWS_ACCESS_KEY_ID")),
        secret_key=parameters.get("secret_key", os.environ.get("AWS_SECRET_ACCESS_KEY")),
        region=parameters.get("region", DEFAULT_REGION),
        name=name,
        create_bucket=create_bucket,
    )


def _query_parameters(url: str, query: str) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise _bad_url(url, "malformed query") from None
    parameters = dict(pairs)
    unknown = sorted(set(parameters) - _S3_PARAMETERS)
    if unknown:
        raise _bad_url(url, f"unknown parameter(s) {', '.join(unknown)}")
    if len(parameters) != len(pairs) or not all(parameters.values()):
        raise _bad_url(url, "each parameter must be given once, with a value")
    if ("access_key" in parameters) != ("secret_key" in parameters):
        raise _bad_url(url, "access_key and secret_key go together")
    return parameters


def _check_endpoint(url: str, endpoint: str) -> None:
    try:
        parts = urllib.parse.urlsplit(endpoint)
    except ValueError as exc:
        raise _bad_url(url, f"malformed endpoint: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _bad_url(url, f"endpoint must be http(s)://host[:port], not {_redacted(endpoint)!r}")


def _bad_url(url: str, reason: str) -> ConfigError:
    return ConfigError(
        f"bad chunk store URL {_redacted(url)!r}: {reason}; accepted forms: {ACCEPTED_FORMS}"
    )


def _redacted(url: str) -> str:
    """The URL without credentials (user info, access_key/secret_key values), safe to show."""
    url = _USER_INFO.sub(r"\1***@", url)
    base, separator, query = url.partition("?")
    if not separator:
        return url
    hidden = [
        f"{key}=***" if urllib.parse.unquote_plus(key) in _SECRET_PARAMETERS else f"{key}={value}"
        for key, _, value in (pair.partition("=") for pair in query.split("&"))
    ]
    return f"{base}?{'&'.join(hidden)}"
