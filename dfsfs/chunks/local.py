"""Chunks as files in a local directory: ``root/<namespace>/<hex[0:2]>/<hex[2:4]>/<hex>``.

A put writes a temporary file beside the final name and renames it into place, so a
reader never sees a half-written chunk, and returns without waiting for the disk. `sync()`
makes every put before it durable: it fsyncs the chunk files put since the last sync (in
parallel, so the file system commits them together) and then their directories, deepest
first. A power cut before a sync may leave a chunk file empty or partial: reads verify
every chunk against its digest, and the metadata says which chunks were not yet settled.
"""

import errno
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

from dfsfs.chunks.base import (
    ChunkMissingError,
    ChunkStore,
    check_key,
    check_namespace,
    missing_message,
)
from dfsfs.errors import NoSpaceError, StorageError

# Chunk files hold users' data: only the dfsfs process may read them.
FILE_MODE = 0o600
DIRECTORY_MODE = 0o700

TEMP_SUFFIX = ".tmp"
_CHUNK_NAME = re.compile(r"[0-9a-f]{64}")
_FAN_OUT_NAME = re.compile(r"[0-9a-f]{2}")
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
SYNC_THREADS = 8  # files fsync'd at once by a sync


class LocalChunkStore(ChunkStore):
    """A chunk store in a directory tree; safe to use from many threads at once."""

    def __init__(self, root: str, name: str = "primary") -> None:
        self.root = os.path.abspath(root)
        self.name = name
        self._lock = threading.Lock()
        # Held for the whole of a sync, so that a sync that finds nothing to do still
        # waits for a concurrent sync that is fsyncing directories this caller relies on.
        self._sync_lock = threading.Lock()
        self._existing_dirs: set[str] = set()  # directories known to exist: no makedirs
        self._dirty_dirs: set[str] = set()  # directories whose entries changed since sync
        self._unsynced: set[str] = set()  # chunk files put since the last sync
        self._syncers: futures.ThreadPoolExecutor | None = None
        try:
            os.makedirs(self.root, mode=DIRECTORY_MODE, exist_ok=True)
        except OSError as exc:
            raise self._error("creating the store directory", self.root, exc) from exc

    def put(self, namespace: int, digest: bytes, data: bytes) -> None:
        path = self._path(namespace, digest)
        directory = os.path.dirname(path)
        if not self._exists(path):
            self._write_new(directory, path, data)
        # Whoever wrote it (this put, or another one not synced yet), the next sync makes
        # it durable for this caller.
        with self._lock:
            self._unsynced.add(path)
            self._dirty_dirs.add(directory)

    def get(self, namespace: int, digest: bytes) -> bytes:
        path = self._path(namespace, digest)
        try:
            with open(path, "rb", buffering=0) as chunk_file:
                return chunk_file.read()
        except FileNotFoundError:
            raise ChunkMissingError(missing_message(self.name, namespace, digest)) from None
        except OSError as exc:
            raise self._error("reading", path, exc) from exc

    def has(self, namespace: int, digest: bytes) -> bool:
        return self._exists(self._path(namespace, digest))

    def delete(self, namespace: int, digest: bytes) -> None:
        path = self._path(namespace, digest)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error("deleting", path, exc) from exc

    def keys(self, namespace: int | None = None) -> Iterator[tuple[int, bytes]]:
        for chunk_namespace, directory, hex_prefix in self._leaf_directories(namespace):
            for name in self._list(directory):
                # A file elsewhere than its digest says could never be found by get.
                if _CHUNK_NAME.fullmatch(name) and name.startswith(hex_prefix):
                    yield chunk_namespace, bytes.fromhex(name)

    def sync(self) -> None:
        with self._sync_lock:
            with self._lock:
                files, self._unsynced = self._unsynced, set()
                dirty, self._dirty_dirs = self._dirty_dirs, set()
            try:
                self._sync_files(files)
            except OSError as exc:
                with self._lock:  # a later sync tries them all again
                    self._unsynced.update(files)
                    self._dirty_dirs.update(dirty)
                raise self._error("syncing chunk files in", self.root, exc) from exc
            # Deepest first: a new directory's own entries, then its entry in its parent.
            pending = sorted(dirty, key=len, reverse=True)
            for synced, directory in enumerate(pending):
                try:
                    _fsync_directory(directory)
                except FileNotFoundError:
                    continue  # emptied and removed meanwhile
                except OSError as exc:
                    with self._lock:
                        self._dirty_dirs.update(pending[synced:])  # a later sync retries them
                    raise self._error("syncing directory", directory, exc) from exc

    def _sync_files(self, paths: set[str]) -> None:
        if len(paths) <= 1:
            for path in paths:
                _fdatasync_file(path)
            return
        if self._syncers is None:
            self._syncers = futures.ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="store-sync")
        list(self._syncers.map(_fdatasync_file, paths))  # waits for all; raises the first failure

    def close(self) -> None:
        if self._syncers is not None:
            self._syncers.shutdown()

    def remove_stale_temp_files(self, older_than_s: float) -> int:
        """Delete temporary files left by interrupted puts; return how many were removed.

        `older_than_s` must exceed the longest a put can take, so that no temp file of a
        put still running is removed.
        """
        cutoff = time.time() - older_than_s
        removed = 0
        for _, directory, _ in self._leaf_directories(None):
            for name in self._list(directory):
                if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                    removed += self._remove_if_older(os.path.join(directory, name), cutoff)
        return removed

    def path_of(self, namespace: int, digest: bytes) -> Path:
        """Where the chunk's file is (for tests and tools that look at the files)."""
        return Path(self._path(namespace, digest))

    def _path(self, namespace: int, digest: bytes) -> str:
        # check_key admits only an int and 32 bytes, whose decimal and hex spellings
        # cannot contain a separator or "..": every path stays under root.
        check_key(namespace, digest)
        digest_hex = digest.hex()
        return os.path.join(self.root, str(namespace), digest_hex[0:2], digest_hex[2:4], digest_hex)

    def _exists(self, path: str) -> bool:
        try:
            os.stat(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._error("looking up", path, exc) from exc
        return True

    def _write_new(self, directory: str, path: str, data: bytes) -> None:
        temp_name = f".{os.path.basename(path)}.{secrets.token_hex(8)}{TEMP_SUFFIX}"
        temp_path = os.path.join(directory, temp_name)
        try:
            self._ensure_directory(directory)
            _write_file(temp_path, data, self._account_owner(directory))
            os.rename(temp_path, path)
        except OSError as exc:
            _remove_quietly(temp_path)
            raise self._error("writing", path, exc) from exc

    def _ensure_directory(self, directory: str) -> None:
        if directory in self._existing_dirs:
            return
        existing = directory  # the deepest level that exists already
        while existing != self.root and not os.path.isdir(existing):
            existing = os.path.dirname(existing)
        os.makedirs(directory, mode=DIRECTORY_MODE, exist_ok=True)
        owner = self._account_owner(directory)
        if owner is not None:  # levels root made inside an account's directory are its user's
            for level in (directory, os.path.dirname(directory)):
                os.chown(level, *owner)
        # The new levels, and the entry of the first in the level that existed, become
        # durable with the next sync. This happens once per directory. Only levels whose
        # entries changed: a shared store root that this user may enter but not read (an
        # account's directory made by `dfsfs user add`) is never opened.
        with self._lock:
            parent = directory
            while parent != existing:
                parent = os.path.dirname(parent)
                self._dirty_dirs.add(parent)
            self._existing_dirs.add(directory)

    def _account_owner(self, directory: str) -> tuple[int, int] | None:
        """(uid, gid) of the account directory above `directory` when this process is root
        and another user owns it (`dfsfs user add` gives each account's directory to its
        Linux user): what root writes there (fsck --repair, a root mount) must stay
        readable by that user's daemon. None otherwise."""
        if os.geteuid() != 0:
            return None
        account_dir = os.path.dirname(os.path.dirname(directory))
        try:
            status = os.stat(account_dir)
        except OSError:
            return None
        return None if status.st_uid == 0 else (status.st_uid, status.st_gid)

    def _leaf_directories(self, namespace: int | None) -> Iterator[tuple[int, str, str]]:
        """(namespace, directory, hex[0:4] of the chunks it holds) for each leaf directory."""
        if namespace is None:
            namespaces = [int(name) for name in self._list(self.root) if _is_namespace_name(name)]
        else:
            check_namespace(namespace)
            namespaces = [namespace]
        for chunk_namespace in namespaces:
            namespace_dir = os.path.join(self.root, str(chunk_namespace))
            for first in filter(_FAN_OUT_NAME.fullmatch, self._list(namespace_dir)):
                first_dir = os.path.join(namespace_dir, first)
                for second in filter(_FAN_OUT_NAME.fullmatch, self._list(first_dir)):
                    yield chunk_namespace, os.path.join(first_dir, second), first + second

    def _remove_if_older(self, path: str, cutoff: float) -> int:
        try:
            if os.stat(path).st_mtime >= cutoff:
                return 0
            os.unlink(path)
        except FileNotFoundError:
            return 0  # a concurrent put renamed it, or another cleaner removed it
        except OSError as exc:
            raise self._error("removing temporary file", path, exc) from exc
        return 1

    def _list(self, directory: str) -> list[str]:
        """Entry names of a directory; none if it does not exist (or was just removed)."""
        try:
            return os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise self._error("listing", directory, exc) from exc

    def _error(self, action: str, path: str, exc: OSError) -> Exception:
        if exc.errno in _NO_SPACE_ERRNOS:
            return NoSpaceError(f"{self.name}: no space left {action} {path}: {exc.strerror}")
        return StorageError(f"{self.name}: {action} {path} failed: {exc.strerror or exc}")


def _write_file(path: str, data: bytes, owner: tuple[int, int] | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        remaining = memoryview(data)
        while remaining:
            written = os.write(fd, remaining)
            remaining = remaining[written:]
    finally:
        os.close(fd)


def _fdatasync_file(path: str) -> None:
    """Make a chunk file's bytes durable (one deleted since it was put needs nothing)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_namespace_name(name: str) -> bool:
    return name.isdigit() and str(int(name)) == name


def _remove_quietly(path: str) -> None:
    """Remove a file we may or may not have created; the original error matters more."""
    try:
        os.unlink(path)
    except OSError:
        pass
