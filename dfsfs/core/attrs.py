"""Attributes as this mount shows them: kept as long as the kernel would keep them, kept in
step with this mount's own changes, and overlaid with the buffered writes of open files."""

import dataclasses

from dfsfs.core.caches import TTLCache
from dfsfs.core.write_buffer import FileState
from dfsfs.types import Attrs


class AttrView:
    def __init__(self, states: dict[int, FileState], ttl_s: float):
        self.states = states  # the core's files with open handles or uncommitted changes
        self._kept: TTLCache[int, Attrs] = TTLCache(ttl_s)
        # (mtime, size) of each file's committed version this mount last saw (see `seen`)
        self._versions: TTLCache[int, tuple[int, int]] = TTLCache(24 * 3600.0, 100_000)

    def shown(self, attrs: Attrs) -> Attrs:
        """What this mount shows for attributes just read or changed: an open file's
        buffered writes change its size and times; other attributes are kept."""
        state = self.states.get(attrs.ino)
        if state is None:
            self._kept.put(attrs.ino, attrs)
            return attrs
        state.attrs = attrs
        return state.seen_attrs(attrs)

    def kept(self, ino: int) -> Attrs | None:
        """Attributes read or set within the kernel's attribute timeout. The kernel forgets
        a file's after every write and a directory's after every change of its entries, and
        asks again: these answer it without a round trip."""
        return self._kept.get(ino)

    def forget(self, ino: int) -> None:
        self._kept.discard(ino)

    def dir_changed(self, ino: int, now_ns: int, nlink_delta: int = 0) -> None:
        """This mount changed a directory's entries: its kept attributes take the times and
        link count the metadata call just set (what a new query would say)."""
        attrs = self._kept.get(ino)
        if attrs is not None:
            self._kept.replace(ino, dataclasses.replace(
                attrs, mtime_ns=now_ns, ctime_ns=now_ns, nlink=attrs.nlink + nlink_delta))

    def seen(self, attrs: Attrs) -> bool:
        """Record the file's committed version; False if it changed since this mount saw it
        (another mount wrote it): the kernel's cached pages and size are then stale."""
        version = (attrs.mtime_ns, attrs.size)
        previous = self._versions.get(attrs.ino)
        self._versions.put(attrs.ino, version)
        return previous == version

    def wrote(self, attrs: Attrs) -> None:
        """This mount committed this version: its pages in the kernel match it."""
        self._versions.put(attrs.ino, (attrs.mtime_ns, attrs.size))
