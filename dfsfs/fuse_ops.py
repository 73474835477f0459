"""pyfuse3 Operations: translate kernel requests to FileSystem calls and errors to errnos.

No file-system logic lives here. Kernel inode 1 is the user's root directory; every
other kernel inode number is the metadata inode id plus one, so the two never collide.
"""

import errno
import functools
import logging
import stat as stat_module
from dataclasses import dataclass

import pyfuse3
import trio

from dfsfs.core.filesystem import EntryInvalidation, FileSystem, KernelInvalidation
from dfsfs.errors import DfsfsError
from dfsfs.types import Attrs

log = logging.getLogger(__name__)

BLOCK_SIZE = 4096
DIRECTORY_SIZE = 4096  # as ext4 shows a small directory
DOT_OFFSET, DOTDOT_OFFSET = 1, 2  # readdir offsets; an entry's is its id plus 2


@dataclass(frozen=True)
class ShownOwnership:
    """Mount options uid=, gid=, umask=: every file is shown with this owner and group,
    and without these permission bits (what is stored does not change)."""

    uid: int | None = None
    gid: int | None = None
    umask: int = 0


def errno_boundary(operation):
    """The one place exceptions become errnos; unexpected ones are logged and become EIO."""

    @functools.wraps(operation)
    async def wrapper(*args, **kwargs):
        try:
            return await operation(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except DfsfsError as error:
            if error.errno == errno.EIO:
                log.error("%s: %s", operation.__name__, error)
            raise pyfuse3.FUSEError(error.errno) from None
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("unexpected error in %s%r", operation.__name__, args[1:3])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, fs: FileSystem, attr_timeout_s: float, entry_timeout_s: float,
                 shown: "ShownOwnership | None" = None):
        super().__init__()
        self.fs = fs
        self.attr_timeout_s = attr_timeout_s
        self.entry_timeout_s = entry_timeout_s
        self.shown = shown or ShownOwnership()

    # ---- inode numbers and attributes ----------------------------------------------

    def _ino(self, kernel_ino: int) -> int:
        return self.fs.root_ino if kernel_ino == pyfuse3.ROOT_INODE else kernel_ino - 1

    def _kernel_ino(self, ino: int) -> int:
        return pyfuse3.ROOT_INODE if ino == self.fs.root_ino else ino + 1

    def _attributes(self, attrs: Attrs) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = self._kernel_ino(attrs.ino)
        entry.generation = 0
        entry.entry_timeout = self.entry_timeout_s
        entry.attr_timeout = self.attr_timeout_s
        entry.st_mode = attrs.mode & ~self.shown.umask
        entry.st_nlink = attrs.nlink
        entry.st_uid = attrs.uid if self.shown.uid is None else self.shown.uid
        entry.st_gid = attrs.gid if self.shown.gid is None else self.shown.gid
        entry.st_rdev = attrs.rdev
        entry.st_blksize = self.fs.settings.chunk_size  # cp and friends size their I/O by it
        if attrs.is_dir:
            entry.st_size = DIRECTORY_SIZE
            entry.st_blocks = DIRECTORY_SIZE // 512
        else:
            entry.st_size = attrs.size
            entry.st_blocks = (attrs.stored_bytes + 511) // 512  # holes take no blocks
        entry.st_atime_ns = attrs.atime_ns
        entry.st_mtime_ns = attrs.mtime_ns
        entry.st_ctime_ns = attrs.ctime_ns
        return entry

    def _entry(self, attrs: Attrs) -> pyfuse3.EntryAttributes:
        """Attributes given to the kernel as an entry: it holds a reference until forget."""
        self.fs.kernel_took(attrs.ino)
        return self._attributes(attrs)

    # ---- names -----------------------------------------------------------------------

    @errno_boundary
    async def lookup(self, parent_inode, name, ctx=None):
        return self._entry(await self.fs.lookup(self._ino(parent_inode), name))

    @errno_boundary
    async def getattr(self, inode, ctx=None):
        return self._attributes(await self.fs.getattr(self._ino(inode)))

    @errno_boundary
    async def setattr(self, inode, attr, fields, fh, ctx):
        changes = {}
        if fields.update_mode:
            changes["mode"] = attr.st_mode
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        size = attr.st_size if fields.update_size else None
        return self._attributes(
            await self.fs.setattr(self._ino(inode), ctx.uid, size=size, **changes))

    @errno_boundary
    async def readlink(self, inode, ctx):
        return await self.fs.readlink(self._ino(inode))

    @errno_boundary
    async def opendir(self, inode, ctx):
        return self.fs.opendir(self._ino(inode))

    @errno_boundary
    async def readdir(self, fh, start_id, token):
        """'.' and '..' first, then the entries by id. The kernel takes a reference to
        every entry but those two."""
        batch = 256
        after = max(0, start_id - DOTDOT_OFFSET)
        entries, parent_ino = await self.fs.readdir(fh, after, batch)
        if start_id < DOTDOT_OFFSET:
            directory = self.fs.handles.dir(fh).ino
            for offset, name, ino in ((DOT_OFFSET, b".", directory),
                                      (DOTDOT_OFFSET, b"..", parent_ino)):
                if start_id < offset and not pyfuse3.readdir_reply(
                        token, name, self._dot_attributes(ino), offset):
                    return
        while True:
            for entry_id, name, attrs in entries:
                if not pyfuse3.readdir_reply(token, name, self._attributes(attrs),
                                             entry_id + DOTDOT_OFFSET):
                    return
                self.fs.kernel_took(attrs.ino)
                after = entry_id
            if len(entries) < batch:
                return
            entries, _ = await self.fs.readdir(fh, after, batch)

    def _dot_attributes(self, ino: int) -> pyfuse3.EntryAttributes:
        """'.' and '..' carry only their inode number (the kernel ignores the rest)."""
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = self._kernel_ino(ino)
        entry.st_mode = stat_module.S_IFDIR
        return entry

    @errno_boundary
    async def releasedir(self, fh):
        self.fs.releasedir(fh)

    @errno_boundary
    async def fsyncdir(self, fh, datasync):
        await self.fs.sync()

    @errno_boundary
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        attrs = await self.fs.make_node(self._ino(parent_inode), name, mode, ctx.uid, ctx.gid, rdev)
        return self._entry(attrs)

    @errno_boundary
    async def mkdir(self, parent_inode, name, mode, ctx):
        mode = stat_module.S_IFDIR | (mode & 0o7777 & ~ctx.umask)
        attrs = await self.fs.make_node(self._ino(parent_inode), name, mode, ctx.uid, ctx.gid)
        return self._entry(attrs)

    @errno_boundary
    async def symlink(self, parent_inode, name, target, ctx):
        mode = stat_module.S_IFLNK | 0o777
        attrs = await self.fs.make_node(self._ino(parent_inode), name, mode, ctx.uid, ctx.gid,
                                        target=target)
        return self._entry(attrs)

    @errno_boundary
    async def unlink(self, parent_inode, name, ctx):
        await self.fs.unlink(self._ino(parent_inode), name)

    @errno_boundary
    async def rmdir(self, parent_inode, name, ctx):
        await self.fs.unlink(self._ino(parent_inode), name, directory=True)

    @errno_boundary
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.fs.rename(self._ino(parent_inode_old), name_old, self._ino(parent_inode_new),
                             name_new, flags)

    @errno_boundary
    async def link(self, inode, new_parent_inode, new_name, ctx):
        attrs = await self.fs.link(self._ino(inode), self._ino(new_parent_inode), new_name)
        return self._entry(attrs)

    # ---- files -------------------------------------------------------------------------

    @errno_boundary
    async def open(self, inode, flags, ctx):
        fh, current = await self.fs.open(self._ino(inode), flags)
        if not current:
            # Changed by another mount since the kernel cached it: drop the cached size
            # (keep_cache=False drops the cached pages).
            pyfuse3.invalidate_inode(inode, attr_only=True)
        return pyfuse3.FileInfo(fh=fh, keep_cache=current)

    @errno_boundary
    async def create(self, parent_inode, name, mode, flags, ctx):
        mode = mode & ~ctx.umask
        fh, attrs = await self.fs.create(self._ino(parent_inode), name, mode, ctx.uid, ctx.gid, flags)
        return pyfuse3.FileInfo(fh=fh), self._entry(attrs)

    @errno_boundary
    async def read(self, fh, off, size):
        return await self.fs.read(fh, off, size)

    @errno_boundary
    async def write(self, fh, off, buf):
        return await self._writing(fh, self.fs.write(fh, off, buf))

    @errno_boundary
    async def flush(self, fh):
        await self._writing(fh, self.fs.flush(fh))

    @errno_boundary
    async def fsync(self, fh, datasync):
        await self._writing(fh, self.fs.fsync(fh))

    async def _writing(self, fh, call):
        """A write, flush or fsync that failed may have cost the file its uncommitted
        writes: the size the kernel keeps from them is dropped with the error."""
        try:
            return await call
        except DfsfsError:
            pyfuse3.invalidate_inode(self._kernel_ino(self.fs.handles.file(fh).ino), attr_only=True)
            raise

    @errno_boundary
    async def release(self, fh):
        await self.fs.release(fh)

    # ---- extended attributes -----------------------------------------------------------

    @errno_boundary
    async def getxattr(self, inode, name, ctx):
        return await self.fs.get_xattr(self._ino(inode), name)

    @errno_boundary
    async def setxattr(self, inode, name, value, ctx):
        await self.fs.set_xattr(self._ino(inode), name, value, 0)

    @errno_boundary
    async def listxattr(self, inode, ctx):
        return await self.fs.list_xattrs(self._ino(inode))

    @errno_boundary
    async def removexattr(self, inode, name, ctx):
        await self.fs.remove_xattr(self._ino(inode), name)

    # ---- the file system as a whole -------------------------------------------------------

    @errno_boundary
    async def statfs(self, ctx):
        capacity = await self.fs.capacity()
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = BLOCK_SIZE
        stats.f_blocks = capacity.total_bytes // BLOCK_SIZE
        stats.f_bfree = stats.f_bavail = capacity.free_bytes // BLOCK_SIZE
        stats.f_files = capacity.total_inodes
        stats.f_ffree = stats.f_favail = capacity.free_inodes
        stats.f_namemax = 255
        return stats

    def invalidate(self, invalidations: list[KernelInvalidation]) -> None:
        """Tell the kernel what another mount changed. Blocking (the kernel may wait for a
        request of this mount in flight): call it from a worker thread."""
        for invalidation in invalidations:
            try:
                if isinstance(invalidation, EntryInvalidation):
                    pyfuse3.invalidate_entry(self._kernel_ino(invalidation.parent_ino), invalidation.name,
                                             self._kernel_ino(invalidation.deleted) if invalidation.deleted else 0)
                else:
                    pyfuse3.invalidate_inode(self._kernel_ino(invalidation.ino))
            except OSError as error:
                if error.errno != errno.ENOENT:  # the kernel had forgotten it already
                    log.info("invalidating %s: %s", invalidation, error)

    async def forget(self, inode_list):
        """The kernel drops references (no reply is sent, so no errno either)."""
        for inode, count in inode_list:
            if inode != pyfuse3.ROOT_INODE:
                self.fs.forget(self._ino(inode), count)

