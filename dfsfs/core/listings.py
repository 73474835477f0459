"""The complete listings of directories this mount knows, so that a lookup of a name that
is not there (what every new file's creation starts with) needs no round trip.

A directory's listing is known when this mount made the directory (empty) or listed it
to the end, and is kept in step with this mount's own changes and, through the change
feed, with other mounts' (which it may miss for the few milliseconds a change takes to
reach this mount: as the kernel's own entry timeout allows). When the feed is not
running, nothing is known.
"""

from collections import OrderedDict

MAX_NAMES = 200_000  # names kept over all directories; the least recently used go first
MAX_DIRECTORY = 20_000  # a directory with more entries is not kept


class KnownListings:
    def __init__(self) -> None:
        self._names: OrderedDict[int, set[bytes]] = OrderedDict()
        self._count = 0
        self.enabled = False  # the change feed is running: other mounts' changes arrive

    def absent(self, parent_ino: int, name: bytes) -> bool:
        """Whether `name` is known not to be in the directory."""
        names = self._names.get(parent_ino)
        if names is None:
            return False
        self._names.move_to_end(parent_ino)
        return name not in names

    def known(self, dir_ino: int, names: set[bytes]) -> None:
        """The directory holds exactly `names` now."""
        if not self.enabled or len(names) > MAX_DIRECTORY:
            return
        self.forget(dir_ino)
        self._names[dir_ino] = set(names)
        self._count += len(names)
        while self._count > MAX_NAMES and self._names:
            _, evicted = self._names.popitem(last=False)
            self._count -= len(evicted)

    def added(self, parent_ino: int, name: bytes) -> None:
        names = self._names.get(parent_ino)
        if names is not None and name not in names:
            names.add(name)
            self._count += 1

    def removed(self, parent_ino: int, name: bytes) -> None:
        names = self._names.get(parent_ino)
        if names is not None and name in names:
            names.discard(name)
            self._count -= 1

    def forget(self, dir_ino: int) -> None:
        names = self._names.pop(dir_ino, None)
        if names is not None:
            self._count -= len(names)

    def disable(self) -> None:
        """The change feed stopped: what other mounts change would go unseen."""
        self.enabled = False
        self._names.clear()
        self._count = 0
