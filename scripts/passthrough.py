#!/usr/bin/env python3
"""A pass-through pyfuse3 file system: the Python ceiling for `scripts/bench`.

Modelled on pyfuse3's examples/passthroughfs.py (same design: inodes are the source's inode
numbers, the kernel's writeback cache is on, attribute and entry timeouts are zero, every
request is served synchronously on the trio loop). Unlike the example it implements fsync,
so a benchmark's "write then fsync" reaches the disk here as it does on the native directory
and on dfsfs, and it opens one descriptor per open() rather than sharing one per inode.

Usage: passthrough.py SOURCE MOUNTPOINT   (stays in the foreground until unmounted)
"""

import argparse
import errno
import os
import stat
from collections import defaultdict

import pyfuse3
import trio
from pyfuse3 import FUSEError


def _os_call(function, *args, **kwargs):
    """Run an os function, turning OSError into the FUSEError the kernel expects."""
    try:
        return function(*args, **kwargs)
    except OSError as exc:
        raise FUSEError(exc.errno) from None


def _entry(st: os.stat_result) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    for name in ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                 "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blksize", "st_blocks"):
        setattr(entry, name, getattr(st, name))
    entry.generation = 0
    entry.entry_timeout = 0
    entry.attr_timeout = 0
    return entry


class PathMap:
    """The source paths of each inode the kernel knows, with the kernel's lookup counts."""

    def __init__(self, source: str):
        self._paths: dict[int, set[str]] = {pyfuse3.ROOT_INODE: {source}}
        self._lookups: dict[int, int] = defaultdict(int)

    def path(self, inode: int) -> str:
        paths = self._paths.get(inode)
        if not paths:
            raise FUSEError(errno.ENOENT)
        return next(iter(paths))

    def remember(self, inode: int, path: str) -> None:
        self._lookups[inode] += 1
        self._paths.setdefault(inode, set()).add(path)

    def drop_path(self, inode: int, path: str) -> None:
        self._paths.get(inode, set()).discard(path)

    def move(self, inode: int, old: str, new: str) -> None:
        if inode in self._paths:
            self._paths[inode].discard(old)
            self._paths[inode].add(new)

    def forget(self, inode: int, count: int) -> None:
        self._lookups[inode] -= count
        if self._lookups[inode] <= 0 and inode != pyfuse3.ROOT_INODE:
            self._lookups.pop(inode, None)
            self._paths.pop(inode, None)


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, source: str):
        super().__init__()
        self.paths = PathMap(source)

    def _child(self, parent_inode: int, name: bytes) -> str:
        return os.path.join(self.paths.path(parent_inode), os.fsdecode(name))

    def _lookup_path(self, path: str) -> pyfuse3.EntryAttributes:
        entry = _entry(_os_call(os.lstat, path))
        self.paths.remember(entry.st_ino, path)
        return entry

    def _chown_to_caller(self, path: str, ctx) -> None:
        _os_call(os.chown, path, ctx.uid, ctx.gid, follow_symlinks=False)

    # --- names ---------------------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        path = self._child(parent_inode, name)
        if name in (b".", b".."):
            return _entry(_os_call(os.lstat, path))
        return self._lookup_path(path)

    async def forget(self, inode_list):
        for inode, count in inode_list:
            self.paths.forget(inode, count)

    async def getattr(self, inode, ctx=None):
        return _entry(_os_call(os.lstat, self.paths.path(inode)))

    async def setattr(self, inode, attr, fields, fh, ctx):
        target = fh if fh is not None else self.paths.path(inode)
        if fields.update_size:
            _os_call(os.truncate, target, attr.st_size)
        if fields.update_mode:
            _os_call(os.chmod, target, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            _os_call(os.chown, target, uid, gid, follow_symlinks=fh is not None)
        if fields.update_atime or fields.update_mtime:
            self._set_times(target, attr, fields, fh is not None)
        return await self.getattr(inode)

    @staticmethod
    def _set_times(target, attr, fields, is_fd: bool) -> None:
        old = _os_call(os.stat, target) if is_fd else _os_call(os.lstat, target)
        atime = attr.st_atime_ns if fields.update_atime else old.st_atime_ns
        mtime = attr.st_mtime_ns if fields.update_mtime else old.st_mtime_ns
        follow = {} if is_fd else {"follow_symlinks": False}
        _os_call(os.utime, target, ns=(atime, mtime), **follow)

    async def readlink(self, inode, ctx):
        return os.fsencode(_os_call(os.readlink, self.paths.path(inode)))

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, inode, start_id, token):
        directory = self.paths.path(inode)
        with _os_call(os.scandir, directory) as scan:
            entries = sorted(
                (entry.inode(), entry.name, _entry(_os_call(entry.stat, follow_symlinks=False)))
                for entry in scan
            )
        for ino, name, attr in entries:
            if ino <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, ino):
                break
            self.paths.remember(ino, os.path.join(directory, name))

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        _os_call(os.mkdir, path, mode & ~ctx.umask)
        self._chown_to_caller(path, ctx)
        return self._lookup_path(path)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        path = self._child(parent_inode, name)
        _os_call(os.mknod, path, mode & ~ctx.umask, rdev)
        self._chown_to_caller(path, ctx)
        return self._lookup_path(path)

    async def symlink(self, parent_inode, name, target, ctx):
        path = self._child(parent_inode, name)
        _os_call(os.symlink, os.fsdecode(target), path)
        self._chown_to_caller(path, ctx)
        return self._lookup_path(path)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        path = self._child(new_parent_inode, new_name)
        _os_call(os.link, self.paths.path(inode), path, follow_symlinks=False)
        return self._lookup_path(path)

    async def unlink(self, parent_inode, name, ctx):
        self._remove(parent_inode, name, os.unlink)

    async def rmdir(self, parent_inode, name, ctx):
        self._remove(parent_inode, name, os.rmdir)

    def _remove(self, parent_inode, name, remove) -> None:
        path = self._child(parent_inode, name)
        inode = _os_call(os.lstat, path).st_ino
        _os_call(remove, path)
        self.paths.drop_path(inode, path)

    async def rename(self, old_parent, old_name, new_parent, new_name, flags, ctx):
        if flags:
            raise FUSEError(errno.EINVAL)
        old = self._child(old_parent, old_name)
        new = self._child(new_parent, new_name)
        inode = _os_call(os.lstat, old).st_ino
        _os_call(os.rename, old, new)
        self.paths.move(inode, old, new)

    async def statfs(self, ctx):
        source = _os_call(os.statvfs, self.paths.path(pyfuse3.ROOT_INODE))
        result = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                     "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(result, name, getattr(source, name))
        return result

    # --- file contents -------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        # With the writeback cache the kernel reads pages of files opened write-only and
        # positions appends itself.
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        fd = _os_call(os.open, self.paths.path(inode), flags & ~os.O_APPEND)
        return pyfuse3.FileInfo(fh=fd)

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        flags = (flags & ~(os.O_ACCMODE | os.O_APPEND)) | os.O_RDWR | os.O_CREAT | os.O_TRUNC
        fd = _os_call(os.open, path, flags, mode & ~ctx.umask)
        self._chown_to_caller(path, ctx)
        return pyfuse3.FileInfo(fh=fd), self._lookup_path(path)

    async def read(self, fd, offset, length):
        return _os_call(os.pread, fd, length, offset)

    async def write(self, fd, offset, buf):
        return _os_call(os.pwrite, fd, buf, offset)

    async def fsync(self, fd, datasync):
        _os_call(os.fdatasync if datasync else os.fsync, fd)

    async def release(self, fd):
        _os_call(os.close, fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="directory to mirror")
    parser.add_argument("mountpoint", help="where to mount it")
    args = parser.parse_args()
    options = set(pyfuse3.default_options) | {"fsname=passthrough"}
    pyfuse3.init(Passthrough(os.path.abspath(args.source)), args.mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    except BaseException:
        pyfuse3.close(unmount=False)
        raise
    pyfuse3.close()


if __name__ == "__main__":
    main()
