"""Open file and directory handles."""

from dfsfs.core.write_buffer import FileState
from dfsfs.errors import InvalidArgumentError
from dfsfs.types import Attrs


class DirHandle:
    """An open directory: the last page of entries read from the database."""

    def __init__(self, ino: int):
        self.ino = ino
        self.parent_ino: int | None = None  # for '..', from the first page
        self.page_after = 0  # the page holds the entries after this id ...
        self.page: list[tuple[int, bytes, Attrs]] = []  # ... in id order
        self.complete = False  # ... and every entry up to the end

    def serve(self, after_id: int, limit: int) -> list[tuple[int, bytes, Attrs]] | None:
        """Entries after `after_id` from the page, or None if the database must be asked."""
        last_id = self.page[-1][0] if self.page else self.page_after
        if after_id == 0 or not self.page_after <= after_id <= last_id:
            return None  # (from 0: a new listing, or rewinddir, which must see changes)
        rest = [entry for entry in self.page if entry[0] > after_id]
        if not rest and not self.complete:
            return None
        return rest[:limit]

    def fetched(self, after_id: int, entries: list, complete: bool) -> None:
        self.page_after, self.page, self.complete = after_id, entries, complete


class HandleTable:
    def __init__(self) -> None:
        self._files: dict[int, FileState] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._next_fh = 1

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def open_file(self, state: FileState) -> int:
        fh = self._new_fh()
        self._files[fh] = state
        state.open_handles += 1
        return fh

    def file(self, fh: int) -> FileState:
        try:
            return self._files[fh]
        except KeyError:
            raise InvalidArgumentError(f"no open file handle {fh}") from None

    def close_file(self, fh: int) -> FileState | None:
        state = self._files.pop(fh, None)
        if state is not None:
            state.open_handles -= 1
        return state

    def open_dir(self, ino: int) -> int:
        fh = self._new_fh()
        self._dirs[fh] = DirHandle(ino)
        return fh

    def dir(self, fh: int) -> DirHandle:
        try:
            return self._dirs[fh]
        except KeyError:
            raise InvalidArgumentError("not an open directory") from None

    def close_dir(self, fh: int) -> None:
        self._dirs.pop(fh, None)
