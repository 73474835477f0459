"""Two mounts of one account driven at random and checked against a model of what POSIX
and close-to-open consistency promise (ARCHITECTURE.md, Durability).

A seeded driver makes random operations on either mount: create, write, close, open for
reading, read, reopen for writing (with or without O_TRUNC), rename, rename over an
existing name, unlink while open, link, mkdir, rmdir. The model knows every name and
inode, and what a mount may see:
- a name changed by one mount may still look unchanged on the other for up to the entry
  timeout (1 s): the driver makes an operation only on names whose last change was its
  own mount's, or older than LAG_S;
- a file's content seen at open is the content at the last close anywhere; while a
  writer is open on the other mount, any state of its writes so far may have been
  committed (the idle commit) and is accepted; on the writer's own mount, every write;
- an open file stays readable after its names go, here or on the other mount.
Each operation's errno is checked against the model's. At the end both mounts must show
the model's tree and contents, and after both unmount fsck must be clean.

CI runs SEEDS. More: DFSFS_MODEL_SEEDS="100-199" (or "7,9"), DFSFS_MODEL_STEPS=N.
A failure names its seed and the operations that led to it; run it again alone with
DFSFS_MODEL_SEEDS=SEED.
"""

import collections
import errno
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mounting import deployment, mnt, work  # noqa: F401

CHUNK_SIZE = "64K"
CHUNK = 64 * 1024
LAG_S = 1.2  # entry and attribute timeouts are 1 s (and a queued unlink lands within ms)
SEEDS = [1, 2, 3, 4]
STEPS = int(os.environ.get("DFSFS_MODEL_STEPS", "200"))
NAMES = ["a", "b", "c", "d", "e"]
pytestmark = [pytest.mark.mount, pytest.mark.timeout(600)]


def seeds_wanted() -> list[int]:
    spec = os.environ.get("DFSFS_MODEL_SEEDS")
    if not spec:
        return SEEDS
    seeds = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        seeds.extend(range(int(low), int(high or low) + 1))
    return seeds


@dataclass(eq=False)
class Node:
    kind: str  # "file" or "dir"
    committed: bytes = b""  # content as of the last close (or O_TRUNC) anywhere
    versions: list[bytes] = field(default_factory=lambda: [b""])  # what another mount may see
    names: int = 1
    writer: "Handle | None" = None
    write_seq: int = 0
    moved_by: set[int] = field(default_factory=set)  # mounts that renamed this directory


@dataclass(eq=False)
class Handle:
    mount: int
    fd: int
    node: Node
    writing: bool
    content: bytes  # a writer's content; a reader's content at open
    seq: int  # the node's write_seq when opened
    stable: bool = True  # a reader opened while no other mount had the file open to write


class Model:
    def __init__(self, roots: list[Path], rng: random.Random):
        self.roots = roots
        self.rng = rng
        self.tree: dict[tuple[str, ...], Node] = {(): Node("dir")}
        self.changed: dict[tuple[str, ...], tuple[int, float]] = {}  # path -> (mount, when)
        self.handles: list[Handle] = []
        self.log: list[str] = []

    # ---- what the model knows ----------------------------------------------------------------

    def path(self, mount: int, path: tuple[str, ...]) -> Path:
        return self.roots[mount].joinpath(*path)

    def children(self, path):
        return [p for p in self.tree if len(p) == len(path) + 1 and p[:len(path)] == path]

    def below(self, path):
        return [p for p in self.tree if len(p) > len(path) and p[:len(path)] == path]

    def settled(self, mount: int, *paths) -> bool:
        """Whether `mount` surely sees these names (and their ancestors) as they are."""
        now = time.monotonic()
        for path in paths:
            for depth in range(1, len(path) + 1):
                change = self.changed.get(path[:depth])
                if change and change[0] != mount and now - change[1] < LAG_S:
                    return False
        return True

    def touch(self, mount: int, *paths) -> None:
        now = time.monotonic()
        for path in paths:
            self.changed[path] = (mount, now)

    def dirs(self):
        return [p for p, n in self.tree.items() if n.kind == "dir" and len(p) < 3]

    def files(self):
        return [p for p, n in self.tree.items() if n.kind == "file"]

    def any_name(self):
        """An existing or new name in an existing directory."""
        return self.rng.choice(self.dirs()) + (self.rng.choice(NAMES),)

    # ---- checking -------------------------------------------------------------------------------

    def expect(self, what: str, expected, call):
        try:
            result = call()
            got = 0
        except OSError as error:
            result, got = None, error.errno
        self.log.append(f"{what} -> {errno.errorcode.get(got, got)}")
        allowed = expected if isinstance(expected, set) else {expected}
        assert got in allowed, self.failure(
            f"{what}: got {errno.errorcode.get(got, got)},"
            f" model says {sorted(errno.errorcode.get(e, e) for e in allowed)}")
        return got, result

    def failure(self, message: str) -> str:
        shown = self.log if os.environ.get("DFSFS_MODEL_VERBOSE") else self.log[-40:]
        return message + "\noperations:\n  " + "\n  ".join(shown)

    def check_content(self, what: str, got: bytes, allowed: list[bytes]) -> None:
        self.log.append(f"{what} ({len(got)} bytes)")
        assert got in allowed, self.failure(
            f"{what}: {len(got)} bytes {got[:16]!r}…, model allows sizes"
            f" {[len(a) for a in allowed]}")


def read_all(fd: int) -> bytes:
    parts, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


# ---- the operations ----------------------------------------------------------------------------

def op_create(model: Model, m: int) -> None:
    path = model.any_name()
    if not model.settled(m, path):
        return
    exists = path in model.tree
    got, fd = model.expect(f"m{m} create {'/'.join(path)}", errno.EEXIST if exists else 0,
                           lambda: os.open(model.path(m, path),
                                           os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644))
    if got == 0:
        node = model.tree[path] = Node("file")
        node.writer = Handle(m, fd, node, True, b"", 0)
        model.handles.append(node.writer)
        model.touch(m, path)


def op_write(model: Model, m: int) -> None:
    writers = [h for h in model.handles if h.writing]
    if not writers:
        return
    handle = model.rng.choice(writers)
    size = model.rng.choice([1, 100, CHUNK - 1, CHUNK + 3, 2 * CHUNK + 11])
    offset = model.rng.choice([0, len(handle.content), model.rng.randrange(len(handle.content) + 1),
                               len(handle.content) + model.rng.randrange(2 * CHUNK)])
    data = model.rng.randbytes(size)
    model.expect(f"m{handle.mount} pwrite {size}@{offset}", 0,
                 lambda: os.pwrite(handle.fd, data, offset))
    old = handle.content
    handle.content = old[:offset].ljust(offset, b"\0") + data + old[offset + size:]
    handle.node.versions.append(handle.content)
    handle.node.write_seq += 1


def op_close(model: Model, m: int) -> None:
    if not model.handles:
        return
    handle = model.rng.choice(model.handles)
    model.expect(f"m{handle.mount} close {'w' if handle.writing else 'r'}", 0,
                 lambda: os.close(handle.fd))
    model.handles.remove(handle)
    if handle.writing:
        handle.node.committed = handle.content
        handle.node.versions = [handle.content]
        handle.node.writer = None


def op_open_read(model: Model, m: int) -> None:
    files = [p for p in model.files() if model.settled(m, p)]
    if not files:
        return
    path = model.rng.choice(files)
    node = model.tree[path]
    _, fd = model.expect(f"m{m} open r {'/'.join(path)}", 0,
                         lambda: os.open(model.path(m, path), os.O_RDONLY))
    content = read_all(fd)
    if node.writer is not None and node.writer.mount == m:
        allowed = [node.writer.content]  # one mount: its own writes, at once
    elif node.writer is not None:
        allowed = node.versions  # the other mount's writer may have committed any of these
    else:
        allowed = [node.committed]  # close-to-open
    model.check_content(f"m{m} read at open of {'/'.join(path)}", content, allowed)
    stable = node.writer is None or node.writer.mount == m
    model.handles.append(Handle(m, fd, node, False, content, node.write_seq, stable))


def op_read(model: Model, m: int) -> None:
    """Read an open handle again, whether or not its file still has names."""
    if not model.handles:
        return
    handle = model.rng.choice(model.handles)
    if not handle.writing and (handle.node.write_seq != handle.seq or not handle.stable):
        return  # written since it was opened, or a writer elsewhere may commit: no promise
    content = read_all(handle.fd)
    model.check_content(f"m{handle.mount} read again ({handle.node.names} names left)",
                        content, [handle.content])


def op_reopen(model: Model, m: int) -> None:
    files = [p for p in model.files()
             if model.settled(m, p) and model.tree[p].writer is None]
    if not files:
        return
    path = model.rng.choice(files)
    node = model.tree[path]
    truncate = model.rng.random() < 0.3
    flags = os.O_RDWR | (os.O_TRUNC if truncate else 0)
    _, fd = model.expect(f"m{m} open w{' trunc' if truncate else ''} {'/'.join(path)}", 0,
                         lambda: os.open(model.path(m, path), flags))
    if truncate:  # O_TRUNC is committed at once
        node.committed = b""
        node.versions = [b""]
        node.write_seq += 1
    node.writer = Handle(m, fd, node, True, node.committed, node.write_seq)
    model.handles.append(node.writer)


def op_unlink(model: Model, m: int) -> None:
    path = model.any_name()
    if not model.settled(m, path):
        return
    node = model.tree.get(path)
    expected = errno.ENOENT if node is None else errno.EISDIR if node.kind == "dir" else 0
    got, _ = model.expect(f"m{m} unlink {'/'.join(path)}", expected,
                          lambda: os.unlink(model.path(m, path)))
    if got == 0:
        del model.tree[path]
        node.names -= 1
        model.touch(m, path)


def op_link(model: Model, m: int) -> None:
    files = model.files()
    if not files:
        return
    source, target = model.rng.choice(files), model.any_name()
    if not model.settled(m, source, target):
        return
    expected = errno.EEXIST if target in model.tree else 0
    got, _ = model.expect(f"m{m} link {'/'.join(source)} {'/'.join(target)}", expected,
                          lambda: os.link(model.path(m, source), model.path(m, target)))
    if got == 0:
        node = model.tree[target] = model.tree[source]
        node.names += 1
        model.touch(m, target)


def op_mkdir(model: Model, m: int) -> None:
    path = model.any_name()
    if not model.settled(m, path):
        return
    got, _ = model.expect(f"m{m} mkdir {'/'.join(path)}",
                          errno.EEXIST if path in model.tree else 0,
                          lambda: os.mkdir(model.path(m, path)))
    if got == 0:
        model.tree[path] = Node("dir")
        model.touch(m, path)


def op_rmdir(model: Model, m: int) -> None:
    dirs = [p for p in model.dirs() if p]
    if not dirs:
        return
    path = model.rng.choice(dirs + [model.any_name()])
    if not model.settled(m, path, *model.below(path)):
        return
    node = model.tree.get(path)
    expected = (errno.ENOENT if node is None else errno.ENOTDIR if node.kind == "file"
                else errno.ENOTEMPTY if model.children(path) else 0)
    got, _ = model.expect(f"m{m} rmdir {'/'.join(path)}", expected,
                          lambda: os.rmdir(model.path(m, path)))
    if got == 0:
        del model.tree[path]
        model.touch(m, path)


def op_rename(model: Model, m: int) -> None:
    existing = [p for p in model.tree if p]
    if not existing:
        return
    source = model.rng.choice(existing)
    target = model.rng.choice([model.any_name(), model.any_name(), model.rng.choice(existing)])
    target = target if target else model.any_name()
    moved = model.below(source)
    replaced_below = model.below(target) if target in model.tree else []
    if not model.settled(m, source, target, *moved, *replaced_below):
        return
    src, dst = model.tree[source], model.tree.get(target)
    # A directory the other mount moved may still be in this mount's kernel under its old
    # name: looked up inside a rename, the kernel cannot move that stale alias (it holds
    # the rename lock) and answers ESTALE (tests/test_posix.py, the stale alias case).
    stale = {errno.ESTALE} if any(
        node is not None and node.kind == "dir" and node.moved_by - {m}
        for node in (src, dst)) else set()
    if target[:len(source)] == source and target != source:
        expected = errno.EINVAL  # a directory below itself
    elif source[:len(target)] == target and target != source:
        expected = errno.ENOTEMPTY  # over its own ancestor
    elif dst is None or dst is src:
        expected = 0
    elif src.kind == "dir" and dst.kind == "file":
        expected = errno.ENOTDIR
    elif src.kind == "file" and dst.kind == "dir":
        expected = errno.EISDIR
    elif dst.kind == "dir" and model.children(target):
        expected = {errno.ENOTEMPTY, errno.EEXIST}
    else:
        expected = 0
    expected = (expected if isinstance(expected, set) else {expected}) | stale
    got, _ = model.expect(f"m{m} rename {'/'.join(source)} {'/'.join(target)}", expected,
                          lambda: os.rename(model.path(m, source), model.path(m, target)))
    if got != 0 or dst is src:
        return
    if src.kind == "dir" and source != target:
        src.moved_by.add(m)
    if dst is not None:
        dst.names -= 1
    for path in [source, *moved]:
        model.tree[target + path[len(source):]] = model.tree.pop(path)
    model.touch(m, source, target, *moved, *(target + p[len(source):] for p in moved))


def op_wait(model: Model, m: int) -> None:
    """Let the other mount's view of every name catch up (so both mounts act on all)."""
    model.log.append("wait")
    time.sleep(LAG_S)


OPERATIONS = [(op_wait, 1), (op_create, 6), (op_write, 10), (op_close, 6), (op_open_read, 6), (op_read, 3),
              (op_reopen, 3), (op_unlink, 4), (op_link, 2), (op_mkdir, 3), (op_rmdir, 2),
              (op_rename, 8)]


def check_tree(model: Model, m: int) -> None:
    """What mount `m` shows is the model's tree (names settled), with contents as closed."""
    shown = {}
    root = model.roots[m]
    for directory, dirs, files in os.walk(root):
        rel = Path(directory).relative_to(root).parts
        for name in dirs:
            shown[(*rel, name)] = "dir"
        for name in files:
            shown[(*rel, name)] = "file"
    expected = {p: n.kind for p, n in model.tree.items() if p}
    assert shown == expected, model.failure(f"mount {m} shows {sorted(shown.items())},"
                                            f" the model {sorted(expected.items())}")
    for path, node in model.tree.items():
        if node.kind == "file":
            assert model.path(m, path).read_bytes() == node.committed, model.failure(
                f"mount {m}: {'/'.join(path)} differs after close")
            assert os.stat(model.path(m, path)).st_nlink == node.names, model.failure(
                f"mount {m}: {'/'.join(path)} link count")


# ---- the test ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def second(deployment, mnt):
    with deployment.mount(mnt.user) as other:
        yield other


@pytest.mark.parametrize("seed", seeds_wanted())
def test_two_mounts_against_the_model(seed, work, mnt, second):
    second_root = second.path / work.relative_to(mnt.path)
    model = Model([work, second_root], random.Random(seed))
    operations, weights = zip(*OPERATIONS)
    try:
        for _ in range(STEPS):
            operation = model.rng.choices(operations, weights)[0]
            operation(model, model.rng.randrange(2))
    finally:
        for handle in model.handles:
            os.close(handle.fd)
            if handle.writing:
                handle.node.committed = handle.content
    if os.environ.get("DFSFS_MODEL_VERBOSE"):
        kinds = collections.Counter(" ".join(line.split()[:2]) for line in model.log
                                    if not line.endswith(("ENOENT", "EEXIST")))
        print(f"seed {seed}: {len(model.log)} checked operations: {dict(sorted(kinds.items()))}")
    time.sleep(LAG_S)
    for m in (0, 1):
        check_tree(model, m)
    second.check_healthy()
