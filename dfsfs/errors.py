"""Domain errors. Each carries the errno the FUSE boundary reports for it."""

import errno


class DfsfsError(Exception):
    """Base of every error dfsfs raises on purpose."""

    errno = errno.EIO


class NotFoundError(DfsfsError):
    errno = errno.ENOENT


class ExistsError(DfsfsError):
    errno = errno.EEXIST


class NotEmptyError(DfsfsError):
    errno = errno.ENOTEMPTY


class IsDirectoryError(DfsfsError):
    errno = errno.EISDIR


class NotDirectoryError(DfsfsError):
    errno = errno.ENOTDIR


class NameTooLongError(DfsfsError):
    errno = errno.ENAMETOOLONG


class InvalidArgumentError(DfsfsError):
    errno = errno.EINVAL


class PermissionDeniedError(DfsfsError):
    errno = errno.EPERM


class AccessDeniedError(DfsfsError):
    errno = errno.EACCES


class NoAttributeError(DfsfsError):
    errno = errno.ENODATA


class NotSupportedError(DfsfsError):
    errno = errno.EOPNOTSUPP


class QuotaExceededError(DfsfsError):
    errno = errno.EDQUOT


class NoSpaceError(DfsfsError):
    errno = errno.ENOSPC


class TooManyLinksError(DfsfsError):
    errno = errno.EMLINK


class CrossDeviceError(DfsfsError):
    errno = errno.EXDEV


class FileTooLargeError(DfsfsError):
    """An offset or size past the largest file dfsfs keeps."""

    errno = errno.EFBIG


class BusyError(DfsfsError):
    """Something the call needs is in use right now (a chunk's bytes being deleted)."""

    errno = errno.EBUSY


class StaleError(DfsfsError):
    """The inode is gone (removed through another mount): the kernel looks the name up again."""

    errno = errno.ESTALE


class StorageError(DfsfsError):
    """A chunk store failed (I/O error, unreachable, no good copy of a chunk)."""

    errno = errno.EIO


class StoreUnavailableError(StorageError):
    """A chunk store does not answer (down, unreachable, overloaded): an outage, not damage."""


class ChunkLostError(StorageError):
    """Neither store holds a copy of a chunk whose SHA-256 matches."""


class InvalidKeyError(DfsfsError):
    """A chunk key that is not a user namespace and a SHA-256 digest."""

    errno = errno.EINVAL


class MetadataError(DfsfsError):
    """The metadata database refused a statement for a reason that is not a refusal of the
    operation (a bug, a broken row, a resource limit); `sqlstate` says which."""

    errno = errno.EIO

    def __init__(self, message: str, sqlstate: str | None = None):
        super().__init__(message)
        self.sqlstate = sqlstate


class MetadataUnavailableError(DfsfsError):
    """The metadata database cannot be reached."""

    errno = errno.EIO


class ConfigError(DfsfsError):
    """A setting has a bad value; the message says which and why."""


class AuthError(DfsfsError):
    """Login failed: unknown user or wrong password (deliberately indistinguishable)."""

    errno = errno.EACCES
