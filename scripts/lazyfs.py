#!/usr/bin/env python3
"""A pass-through file system that forgets what was not synced: power cuts for tests.

Modelled on LazyFS (dsrhaslab/lazyfs): the mount serves a *live* copy of a *backing*
directory, and only fsync/fdatasync/fsyncdir carry changes to the backing directory. A
power cut throws the live copy away; the backing directory then holds exactly what was
synced, and a new lazyfs over it is the machine after the reboot.

    lazyfs.py BACKING MOUNTPOINT --live DIR    (foreground until unmounted or cut)

What survives a cut, modelled on ext4 (data=ordered, delayed allocation):
- File data is written to the live copy and remembered as dirty byte ranges per inode.
  fsync(2)/fdatasync(2) of a file copies that file's dirty ranges (and its size) to the
  backing file. Data never synced is lost, even when its file was closed long ago.
- Namespace changes (create, mknod, mkdir, symlink, link, unlink, rmdir, rename) and
  metadata changes (truncate, chmod, chown) go to an ordered log, like ext4's journal.
  Every fsync or fsyncdir of anything commits the whole log to the backing directory
  first, in order (ext4's fsync commits the running journal transaction, which holds every
  earlier metadata change of the file system). Not synced, they are lost at a cut: a
  created file disappears, a rename or unlink is undone.
- A cut may first commit a prefix of the log (`--cut-keeps FRACTION`): ext4 also commits
  its journal every few seconds on its own, so any prefix of the metadata changes may be
  durable while the data they concern is not: a file renamed over another without fsync
  may then be present with the data it had at its last sync (empty if never synced).
- Times are not modelled (the backing files' times are those of the replay).
- A clean unmount (fusermount3 -u) syncs everything, as unmounting a disk does.

Control: SIGUSR1 is the power cut: the log prefix (if any) is committed, and from then on
the backing directory is never touched again (every fsync fails with EIO; the mount stays,
so that the processes using it can be killed before it goes). SIGTERM then ends the
process without syncing anything: it unmounts lazily and removes the live copy. SIGTERM
without a cut is a clean shutdown (everything synced), and so is fusermount3 -u. SIGKILL
is a cut that keeps no log prefix; then the caller unmounts (fusermount3 -uz) and removes
the live copy.

The backing directory's files are written but, unless `--host-fsync`, not fsync'd on the
host: the cut is simulated and the same running host reads them back, so the host's page
cache serves as well as its disk and every sync costs a fraction.

The live copy is made with `cp -a` (owners, modes and special files kept) into `--live`,
which must not exist yet (a directory on tmpfs is fastest), and removed at exit. The
kernel's writeback cache stays off: the kernel then holds no dirty pages of its own, and
every write reaches this process before write(2) returns.
"""

import argparse
import errno
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyfuse3
import trio
from pyfuse3 import FUSEError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from passthrough import Passthrough, _os_call  # noqa: E402 - the sibling script

log = logging.getLogger("lazyfs")


class Ranges:
    """Byte ranges [start, end) of one file written since its last sync, kept merged."""

    def __init__(self) -> None:
        self.spans: list[list[int]] = []

    def add(self, start: int, end: int) -> None:
        merged = []
        for span in self.spans:
            if span[1] < start or span[0] > end:
                merged.append(span)
            else:
                start, end = min(start, span[0]), max(end, span[1])
        merged.append([start, end])
        self.spans = sorted(merged)

    def bytes(self) -> int:
        return sum(end - start for start, end in self.spans)


class Backing:
    """The backing directory (what survives a cut) and the log of metadata changes made to
    the live copy since the log was last committed. Paths in the log are relative."""

    def __init__(self, root: str, host_fsync: bool) -> None:
        self.root = root
        self.host_fsync = host_fsync
        self.log: list[tuple] = []
        self.broken: str | None = None  # the first replay that failed: the model is wrong

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def record(self, *change) -> None:
        self.log.append(change)

    def commit(self, count: int | None = None) -> None:
        """Apply the first `count` logged changes (all by default) in order."""
        changes, self.log = self.log[:count], self.log[len(self.log[:count]):]
        synced_dirs = set()
        for change in changes:
            try:
                getattr(self, "_" + change[0])(*change[1:])
            except OSError as error:
                self.broken = f"replaying {change!r} on the backing directory: {error}"
                log.error("%s", self.broken)
                raise FUSEError(errno.EIO) from None
            names = change[1:3] if change[0] in ("link", "rename") else change[1:2]
            synced_dirs.update(os.path.dirname(self.path(rel)) for rel in names)
        if self.host_fsync:
            for directory in synced_dirs:
                if os.path.isdir(directory):
                    _fsync_path(directory)

    def write_back(self, rel: str, live_fd: int, ranges: Ranges | None) -> int:
        """Copy a file's dirty ranges and its size from the live copy; the bytes copied."""
        target = os.open(self.path(rel), os.O_WRONLY | os.O_NOFOLLOW)
        copied = 0
        try:
            for start, end in ranges.spans if ranges else ():
                data = os.pread(live_fd, end - start, start)
                os.pwrite(target, data, start)
                copied += len(data)
            os.ftruncate(target, os.fstat(live_fd).st_size)
            if self.host_fsync:
                os.fsync(target)
        finally:
            os.close(target)
        return copied

    # ---- replaying one logged change (named after the change's first field) -----------

    def _mkdir(self, rel, mode, uid, gid):
        os.mkdir(self.path(rel), mode)
        self._owner(rel, mode, uid, gid)

    def _mknod(self, rel, mode, rdev, uid, gid):
        os.mknod(self.path(rel), mode, rdev)
        self._owner(rel, mode, uid, gid)

    def _create(self, rel, mode, uid, gid):
        os.close(os.open(self.path(rel), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode))
        self._owner(rel, mode, uid, gid)

    def _symlink(self, rel, target, uid, gid):
        os.symlink(target, self.path(rel))
        os.chown(self.path(rel), uid, gid, follow_symlinks=False)

    def _link(self, rel, new_rel):
        os.link(self.path(rel), self.path(new_rel), follow_symlinks=False)

    def _unlink(self, rel):
        os.unlink(self.path(rel))

    def _rmdir(self, rel):
        os.rmdir(self.path(rel))

    def _rename(self, rel, new_rel):
        os.rename(self.path(rel), self.path(new_rel))

    def _truncate(self, rel, size):
        os.truncate(self.path(rel), size)

    def _chmod(self, rel, mode):
        os.chmod(self.path(rel), mode)

    def _chown(self, rel, uid, gid):
        os.chown(self.path(rel), uid, gid, follow_symlinks=False)

    def _owner(self, rel, mode, uid, gid):
        os.chown(self.path(rel), uid, gid, follow_symlinks=False)
        os.chmod(self.path(rel), stat.S_IMODE(mode))  # not narrowed by this process's umask


class LazyFS(Passthrough):
    """Passthrough over the live copy, logging what a sync must carry to the backing."""

    enable_writeback_cache = False

    def __init__(self, live: str, backing: Backing, lies: tuple[str, ...] = ()) -> None:
        super().__init__(live)
        self.live = live
        self.backing = backing
        self.lies = tuple(os.path.normpath(prefix) for prefix in lies)
        self.dirty: dict[int, Ranges] = {}  # live inode -> ranges written since its sync
        self.fd_inode: dict[int, int] = {}  # open live descriptor -> its live inode
        self.cut = False
        self.stats = {"syncs": 0, "bytes_synced": 0}

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.live)

    def _record_new(self, kind: str, path: str, *extra) -> None:
        st = os.lstat(path)
        if kind == "symlink":
            self.backing.record(kind, self._rel(path), *extra, st.st_uid, st.st_gid)
        else:
            self.backing.record(kind, self._rel(path), st.st_mode, *extra, st.st_uid, st.st_gid)

    def _alive(self) -> None:
        if self.cut or self.backing.broken:
            raise FUSEError(errno.EIO)

    def _lies_about(self, path: str | None) -> bool:
        """Whether a sync of `path` is to be acknowledged without doing anything."""
        if path is None or not self.lies:
            return False
        rel = self._rel(path)
        return any(rel == prefix or rel.startswith(prefix + os.sep) for prefix in self.lies)

    # ---- namespace changes: done on the live copy, logged for the backing ----------------

    async def mkdir(self, parent_inode, name, mode, ctx):
        entry = await super().mkdir(parent_inode, name, mode, ctx)
        self._record_new("mkdir", self._child(parent_inode, name))
        return entry

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        entry = await super().mknod(parent_inode, name, mode, rdev, ctx)
        self._record_new("mknod", self._child(parent_inode, name), rdev)
        return entry

    async def symlink(self, parent_inode, name, target, ctx):
        entry = await super().symlink(parent_inode, name, target, ctx)
        self._record_new("symlink", self._child(parent_inode, name), os.fsdecode(target))
        return entry

    async def link(self, inode, new_parent_inode, new_name, ctx):
        old = self.paths.path(inode)
        entry = await super().link(inode, new_parent_inode, new_name, ctx)
        self.backing.record("link", self._rel(old), self._rel(self._child(new_parent_inode, new_name)))
        return entry

    async def unlink(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        gone = self._last_link(path)
        await super().unlink(parent_inode, name, ctx)
        self.backing.record("unlink", self._rel(path))
        self._forget_data(gone)

    async def rmdir(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        await super().rmdir(parent_inode, name, ctx)
        self.backing.record("rmdir", self._rel(path))

    async def rename(self, old_parent, old_name, new_parent, new_name, flags, ctx):
        old, new = self._child(old_parent, old_name), self._child(new_parent, new_name)
        replaced = self._last_link(new) if os.path.lexists(new) else None
        await super().rename(old_parent, old_name, new_parent, new_name, flags, ctx)
        if old != new:
            self.backing.record("rename", self._rel(old), self._rel(new))
            self._forget_data(replaced)

    async def setattr(self, inode, attr, fields, fh, ctx):
        entry = await super().setattr(inode, attr, fields, fh, ctx)
        path = self._path_of(inode)
        if path is not None:  # a file without a name: nothing of it is durable anyway
            rel = self._rel(path)
            if fields.update_size:
                self.backing.record("truncate", rel, attr.st_size)
            if fields.update_mode:
                self.backing.record("chmod", rel, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                self.backing.record("chown", rel, entry.st_uid, entry.st_gid)
        return entry

    def _path_of(self, inode: int) -> str | None:
        """A live path of `inode`, checked: None when it has no name (unlinked)."""
        try:
            path = self.paths.path(inode)
        except FUSEError:
            return None
        try:
            if os.lstat(path).st_ino == inode or inode == pyfuse3.ROOT_INODE:
                return path
        except OSError:
            pass
        return None

    def _last_link(self, path: str) -> int | None:
        """The inode at `path` if removing this name removes the file."""
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return st.st_ino if st.st_nlink <= 1 and not stat.S_ISDIR(st.st_mode) else None

    def _forget_data(self, inode: int | None) -> None:
        """A removed file's unsynced data can never be synced: forget it once no descriptor
        is open (its inode number may be reused by the next file made)."""
        if inode is not None and inode not in self.fd_inode.values():
            self.dirty.pop(inode, None)

    # ---- data --------------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        info = await super().open(inode, flags, ctx)
        self.fd_inode[info.fh] = inode
        if flags & os.O_TRUNC:
            path = self._path_of(inode)
            if path is not None:
                self.backing.record("truncate", self._rel(path), 0)
        return info

    async def create(self, parent_inode, name, mode, flags, ctx):
        info, entry = await super().create(parent_inode, name, mode, flags, ctx)
        self.fd_inode[info.fh] = entry.st_ino
        self.dirty.pop(entry.st_ino, None)  # a reused inode number starts clean
        self._record_new("create", self._child(parent_inode, name))
        return info, entry

    async def write(self, fd, offset, buf):
        written = await super().write(fd, offset, buf)
        self.dirty.setdefault(self.fd_inode[fd], Ranges()).add(offset, offset + written)
        return written

    async def fsync(self, fd, datasync):
        self._alive()
        inode = self.fd_inode[fd]
        path = self._path_of(inode)
        if self._lies_about(path):
            return
        self.backing.commit()
        ranges = self.dirty.pop(inode, None)
        if path is None and os.fstat(fd).st_nlink > 0:
            self.backing.broken = f"fsync of inode {inode}: it has a name, but not one known here"
            log.error("%s", self.backing.broken)
            raise FUSEError(errno.EIO)
        if path is not None:
            try:
                copied = self.backing.write_back(self._rel(path), fd, ranges)
            except OSError as error:
                self.backing.broken = f"writing back {path}: {error}"
                log.error("%s", self.backing.broken)
                raise FUSEError(errno.EIO) from None
            self.stats["bytes_synced"] += copied
        self.stats["syncs"] += 1

    async def fsyncdir(self, fh, datasync):
        self._alive()
        if self._lies_about(self._path_of(fh)):
            return
        self.backing.commit()
        self.stats["syncs"] += 1

    async def release(self, fd):
        inode = self.fd_inode.pop(fd)
        unlinked = os.fstat(fd).st_nlink == 0
        await super().release(fd)
        if unlinked:
            self._forget_data(inode)

    # ---- the two ends ------------------------------------------------------------------

    def power_cut(self, keeps: float) -> None:
        """Commit a prefix of the log (a journal commit before the cut), forget the rest."""
        count = int(len(self.backing.log) * keeps)
        if count and not self.backing.broken:
            self.backing.commit(count)
        lost = sum(r.bytes() for r in self.dirty.values())
        log.info("power cut: kept %d of %d metadata changes, lost %d unsynced bytes in %d "
                 "files (%d syncs, %d bytes synced before)", count, count + len(self.backing.log),
                 lost, len(self.dirty), self.stats["syncs"], self.stats["bytes_synced"])
        self.cut = True
        self.backing.log.clear()
        self.dirty.clear()

    def sync_all(self) -> None:
        """A clean unmount: everything reaches the backing directory."""
        self.backing.commit()
        for inode, ranges in list(self.dirty.items()):
            path = self._path_of(inode)
            if path is None:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                self.backing.write_back(self._rel(path), fd, ranges)
            finally:
                os.close(fd)
        self.dirty.clear()


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _serve(fs: LazyFS, keeps: float) -> None:
    async with trio.open_nursery() as nursery:

        async def on_signal():
            with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGTERM) as signals:
                async for signum in signals:
                    if signum == signal.SIGUSR1:
                        fs.power_cut(keeps)
                    else:
                        pyfuse3.terminate()
                        return

        nursery.start_soon(on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backing", help="the directory that survives a power cut")
    parser.add_argument("mountpoint")
    parser.add_argument("--live", required=True,
                        help="where to keep the live copy (must not exist; removed at exit)")
    parser.add_argument("--cut-keeps", type=float, default=0.0, metavar="FRACTION",
                        help="the fraction of unsynced metadata changes a cut commits first")
    parser.add_argument("--host-fsync", action="store_true",
                        help="also fsync the backing files on the host at each sync")
    parser.add_argument("--lie", action="append", default=[], metavar="PATH",
                        help="acknowledge syncs of files and directories under PATH (relative "
                             "to the mount) without syncing anything: a disk that loses what it "
                             "promised, to show that a test notices (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s lazyfs %(levelname)s %(message)s")
    backing = os.path.abspath(args.backing)
    live = os.path.abspath(args.live)
    started = time.monotonic()
    subprocess.run(["cp", "-a", "--", backing, live], check=True)
    fs = LazyFS(live, Backing(backing, args.host_fsync), tuple(args.lie))
    options = set(pyfuse3.default_options) | {"fsname=lazyfs", "allow_other"}
    try:
        pyfuse3.init(fs, args.mountpoint, options)
    except BaseException:
        shutil.rmtree(live, ignore_errors=True)
        raise
    log.info("serving %s at %s (live copy made in %.2f s)", backing, args.mountpoint,
             time.monotonic() - started)
    clean = False
    try:
        trio.run(_serve, fs, args.cut_keeps)
        clean = not fs.cut
    finally:
        if clean:
            fs.sync_all()
            log.info("unmounted: everything synced")
        pyfuse3.close(unmount=clean)
        if not clean:
            subprocess.run(["fusermount3", "-uz", args.mountpoint], capture_output=True, check=False)
        shutil.rmtree(live, ignore_errors=True)
    if fs.backing.broken:
        log.error("the backing directory may not hold what was synced: %s", fs.backing.broken)
        sys.exit(1)


if __name__ == "__main__":
    main()
