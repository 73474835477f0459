"""What this mount's kernel and open handles refer to, per inode.

The kernel counts its references to an inode (one per entry it was given: lookup, create,
mkdir, mknod, symlink, link, readdirplus) and gives them back with forget. An inode lives
while the kernel refers to it, a handle is open, or a name points at it — whichever ends
last. This table tracks the first two for the inodes this session holds in the database;
the database tracks names and every session's holds.
"""

from collections import Counter


class InodeTable:
    def __init__(self, root_ino: int):
        self.root_ino = root_ino
        self._lookups: Counter[int] = Counter()
        self._handles: Counter[int] = Counter()
        self._held: set[int] = set()  # inodes this session holds in the database

    def looked_up(self, ino: int) -> None:
        if ino != self.root_ino:
            self._lookups[ino] += 1

    def forgotten(self, ino: int, count: int) -> bool:
        """The kernel dropped `count` references; True if this session should release it."""
        remaining = self._lookups[ino] - count
        if remaining > 0:
            self._lookups[ino] = remaining
            return False
        self._lookups.pop(ino, None)
        return self._release_if_free(ino)

    def opened(self, ino: int) -> None:
        self._handles[ino] += 1
        self._held.add(ino)  # dfsfs_open and a create take a hold

    def closed(self, ino: int) -> bool:
        """A handle closed; True if this session should release the inode."""
        self._handles[ino] -= 1
        if self._handles[ino] <= 0:
            del self._handles[ino]
            return self._release_if_free(ino)
        return False

    def held(self, ino: int) -> bool:
        """The database now says this session holds `ino` (its last name went here);
        True if nothing here refers to it any more, so it should be released at once."""
        self._held.add(ino)
        return self._release_if_free(ino)

    def referenced(self, ino: int) -> bool:
        return ino in self._lookups or ino in self._handles

    def is_open(self, ino: int) -> bool:
        return ino in self._handles

    def all_held(self) -> list[int]:
        return sorted(self._held)

    def _release_if_free(self, ino: int) -> bool:
        if ino in self._held and not self.referenced(ino):
            self._held.discard(ino)
            return True
        return False
