"""Differential test: one seeded stream of random file-system operations, applied to a real
mount (64 KiB chunks) and to a local directory; every result (bytes read, counts, errnos)
and, every few operations, the whole tree (listings, types, modes, sizes, link counts,
contents, symlink targets) must agree. At the end the mount is remounted and compared again.

Fixed seeds run always; DFSFS_TEST_SEED=N adds seed N. A mismatch reports the seed and the
tail of the operation log; rerun one seed with
    DFSFS_TEST_SEED=N pytest tests/test_mount_differential.py -k env
"""

import errno
import os
import random
import stat

import pytest

from mounting import deployment, mnt, work  # noqa: F401 - fixtures

CHUNK_SIZE = "64K"
CHUNK = 64 * 1024
OPS_PER_SEED = 300
COMPARE_EVERY = 20
MAX_OPEN = 6
NAMES = ["a", "b", "c", "d", "e"]
FILE_MODES = [0o644, 0o600, 0o640, 0o755, 0o700, 0o444, 0o604, 0o666]
DIR_MODES = [0o755, 0o700, 0o750, 0o777, 0o711]
OPEN_FLAGS = [
    ("rw|creat", os.O_RDWR | os.O_CREAT),
    ("rw", os.O_RDWR),
    ("rdonly", os.O_RDONLY),
    ("wronly|append|creat", os.O_WRONLY | os.O_APPEND | os.O_CREAT),
    ("rw|trunc|creat", os.O_RDWR | os.O_TRUNC | os.O_CREAT),
    ("rw|creat|excl", os.O_RDWR | os.O_CREAT | os.O_EXCL),
]
pytestmark = pytest.mark.timeout(240)

SEEDS = [11, 2024, 987654]
if os.environ.get("DFSFS_TEST_SEED"):
    SEEDS.append(("env", int(os.environ["DFSFS_TEST_SEED"])))


class Mismatch(AssertionError):
    pass


# ---- the operations: each runs on one side (a root directory and its open descriptors) -------


def run_op(op: tuple, root: str, fds: dict):
    """Apply `op` under `root`; the outcome is ("ok", value) or ("errno", name)."""
    kind, *args = op
    p = lambda rel: os.path.join(root, rel)  # noqa: E731
    try:
        if kind == "open":
            handle, rel, _, flags = args
            fds[handle] = os.open(p(rel), flags, 0o644)
            return ("ok", None)
        if kind == "close":
            fd = fds.pop(args[0])
            os.close(fd)
            return ("ok", None)
        if kind == "fsync":
            os.fsync(fds[args[0]])
            return ("ok", None)
        if kind == "fstat":
            st = os.fstat(fds[args[0]])
            return ("ok", (st.st_size, st.st_mode, st.st_nlink))
        if kind == "hwrite":  # through an open descriptor (appending ones ignore the offset)
            handle, offset, data, append = args
            fd = fds[handle]
            return ("ok", os.write(fd, data) if append else os.pwrite(fd, data, offset))
        if kind == "hread":
            handle, offset, size = args
            return ("ok", os.pread(fds[handle], size, offset))
        if kind == "htruncate":
            os.ftruncate(fds[args[0]], args[1])
            return ("ok", None)
        if kind == "write":  # open, write at an offset, close
            rel, offset, data = args
            fd = os.open(p(rel), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                written = os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
            return ("ok", written)
        if kind == "read":
            rel, offset, size = args
            fd = os.open(p(rel), os.O_RDONLY)
            try:
                return ("ok", os.pread(fd, size, offset))
            finally:
                os.close(fd)
        if kind == "truncate":
            os.truncate(p(args[0]), args[1])
            return ("ok", None)
        if kind == "rename":
            os.rename(p(args[0]), p(args[1]))
            return ("ok", None)
        if kind == "unlink":
            os.unlink(p(args[0]))
            return ("ok", None)
        if kind == "mkdir":
            os.mkdir(p(args[0]), args[1])
            return ("ok", None)
        if kind == "rmdir":
            os.rmdir(p(args[0]))
            return ("ok", None)
        if kind == "link":
            os.link(p(args[0]), p(args[1]))
            return ("ok", None)
        if kind == "symlink":
            os.symlink(args[0], p(args[1]))
            return ("ok", None)
        if kind == "chmod":
            os.chmod(p(args[0]), args[1])
            return ("ok", None)
        if kind == "listdir":
            return ("ok", sorted(os.listdir(p(args[0]))))
        if kind == "stat":
            st = os.lstat(p(args[0]))
            size = None if stat.S_ISDIR(st.st_mode) else st.st_size
            return ("ok", (st.st_mode, size, None if stat.S_ISDIR(st.st_mode) else st.st_nlink))
    except OSError as error:
        return ("errno", errno.errorcode.get(error.errno, str(error.errno)))
    raise ValueError(f"unknown operation {kind}")


def describe(op: tuple) -> str:
    parts = []
    for arg in op[1:]:
        if isinstance(arg, (bytes, bytearray)):
            parts.append(f"<{len(arg)} bytes>")
        else:
            parts.append(repr(arg))
    return f"{op[0]}({', '.join(parts)})"


# ---- generating operations from the local side's current state ----------------------------------


class Generator:
    def __init__(self, seed: int, local_root: str):
        self.rng = random.Random(seed)
        self.root = local_root
        self.next_handle = 0
        self.handles: dict[int, bool] = {}  # handle -> opened for appending

    def entries(self) -> tuple[list[str], list[str], list[str]]:
        """(files, directories, symlinks) under the root, as sorted relative paths."""
        files, dirs, links = [], [""], []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.root)
                if os.path.islink(full):
                    links.append(rel)
                elif os.path.isdir(full):
                    dirs.append(rel)
                else:
                    files.append(rel)
        return files, dirs, links

    def new_path(self, dirs) -> str:
        parent = self.rng.choice(dirs)
        if parent.count("/") >= 2:
            parent = ""
        return os.path.join(parent, self.rng.choice(NAMES))

    def offset(self) -> int:
        rng = self.rng
        return rng.choice([
            0, rng.randrange(0, 4 * CHUNK), rng.randrange(1, 4) * CHUNK - rng.randrange(0, 64),
            rng.randrange(1, 4) * CHUNK, rng.randrange(1, 4) * CHUNK + rng.randrange(1, 64),
            rng.randrange(5 * CHUNK, 7 * CHUNK)])

    def size(self) -> int:
        rng = self.rng
        return rng.choice([1, rng.randrange(2, 200), 4096, CHUNK - 1, CHUNK, CHUNK + 1,
                           rng.randrange(CHUNK, 3 * CHUNK), rng.randrange(100, 10_000)])

    def data(self, size: int) -> bytes:
        if self.rng.random() < 0.15:
            return bytes(size)  # zeros: whole chunks of them may be stored as holes
        return self.rng.randbytes(size)

    def next_op(self) -> tuple:
        rng = self.rng
        files, dirs, links = self.entries()
        anything = files + dirs[1:] + links
        existing_file = lambda: rng.choice(files) if files and rng.random() < 0.85 else self.new_path(dirs)  # noqa: E731
        choice = rng.choices(
            ["open", "close", "hwrite", "hread", "htruncate", "fsync", "fstat", "write", "read",
             "truncate", "rename", "unlink", "mkdir", "rmdir", "link", "symlink", "chmod",
             "listdir", "stat"],
            weights=[8, 5, 14, 6, 3, 1, 2, 14, 8, 6, 7, 4, 4, 2, 3, 2, 3, 2, 2])[0]
        handles = sorted(self.handles)
        if choice in ("close", "hwrite", "hread", "htruncate", "fsync", "fstat") and not handles:
            choice = "open"
        if choice == "open" and len(handles) >= MAX_OPEN:
            choice = "close"
        if choice == "open":
            name, flags = rng.choice(OPEN_FLAGS)
            handle = self.next_handle
            self.next_handle += 1
            return ("open", handle, existing_file(), name, flags)
        if choice == "close":
            return ("close", rng.choice(handles))
        if choice == "hwrite":
            handle = rng.choice(handles)
            return ("hwrite", handle, self.offset(), self.data(self.size()), self.handles[handle])
        if choice == "hread":
            return ("hread", rng.choice(handles), self.offset(), self.size())
        if choice == "htruncate":
            return ("htruncate", rng.choice(handles), self.offset())
        if choice in ("fsync", "fstat"):
            return (choice, rng.choice(handles))
        if choice == "write":
            return ("write", existing_file(), self.offset(), self.data(self.size()))
        if choice == "read":
            return ("read", existing_file(), self.offset(), self.size() + rng.choice([0, CHUNK]))
        if choice == "truncate":
            return ("truncate", existing_file(), self.offset())
        if choice == "rename":
            source = rng.choice(anything) if anything else self.new_path(dirs)
            target = rng.choice(anything) if anything and rng.random() < 0.4 else self.new_path(dirs)
            return ("rename", source, target)
        if choice == "unlink":
            return ("unlink", rng.choice(anything) if anything and rng.random() < 0.9 else self.new_path(dirs))
        if choice == "mkdir":
            return ("mkdir", self.new_path(dirs), rng.choice(DIR_MODES))
        if choice == "rmdir":
            return ("rmdir", rng.choice(anything) if anything else self.new_path(dirs))
        if choice == "link":
            return ("link", existing_file(), self.new_path(dirs))
        if choice == "symlink":
            return ("symlink", rng.choice(NAMES + ["a/b", "nowhere", "c/d/e"]), self.new_path(dirs))
        if choice == "chmod":
            target = rng.choice(anything) if anything else self.new_path(dirs)
            full = os.path.join(self.root, target)
            return ("chmod", target, rng.choice(DIR_MODES if os.path.isdir(full) else FILE_MODES))
        if choice == "listdir":
            return ("listdir", rng.choice(dirs))
        return ("stat", rng.choice(anything) if anything else self.new_path(dirs))

    def applied(self, op: tuple, outcome: tuple) -> None:
        """Track open handles after `op` ran with `outcome` on both sides."""
        if op[0] == "open" and outcome[0] == "ok":
            self.handles[op[1]] = bool(op[4] & os.O_APPEND)
        elif op[0] == "close":
            self.handles.pop(op[1], None)


# ---- comparing whole trees ------------------------------------------------------------------------


def tree_state(root: str) -> dict:
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        state[("listing", rel_dir)] = sorted(dirnames + filenames)
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            entry = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid}
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(full)
            elif stat.S_ISDIR(st.st_mode):
                entry["nlink"] = st.st_nlink
            else:
                entry["size"] = st.st_size
                entry["nlink"] = st.st_nlink
                with open(full, "rb") as f:
                    entry["content"] = f.read()
            state[rel] = entry
    return state


def compare_trees(local: str, mounted: str) -> list[str]:
    """Differences between the trees, described (empty when they agree)."""
    expected, actual = tree_state(local), tree_state(mounted)
    problems = []
    for key in sorted(set(expected) | set(actual), key=repr):
        want, got = expected.get(key), actual.get(key)
        if want == got:
            continue
        if want is None or got is None:
            problems.append(f"{key!r}: only {'in the mount' if want is None else 'locally'}")
            continue
        if isinstance(want, list):
            problems.append(f"listing {key[1]!r}: local {want}, mount {got}")
            continue
        for field in sorted(set(want) | set(got)):
            if want.get(field) != got.get(field):
                if field == "content":
                    a, b = want[field], got[field]
                    first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]),
                                 min(len(a), len(b)))
                    problems.append(f"{key!r}: contents differ from byte {first} "
                                    f"(local {len(a)} bytes, mount {len(b)} bytes)")
                else:
                    want_v, got_v = want.get(field), got.get(field)
                    if field == "mode":
                        want_v, got_v = oct(want_v), oct(got_v)
                    problems.append(f"{key!r}: {field} local {want_v}, mount {got_v}")
    return problems


# ---- the test ------------------------------------------------------------------------------------------


def seed_id(seed) -> str:
    return f"env-{seed[1]}" if isinstance(seed, tuple) else str(seed)


@pytest.mark.parametrize("seed", SEEDS, ids=seed_id)
def test_random_operations_match_a_local_directory(work, mnt, tmp_path, seed):
    seed = seed[1] if isinstance(seed, tuple) else seed
    local = str(tmp_path / "local")
    os.mkdir(local)
    mounted = str(work)
    generator = Generator(seed, local)
    local_fds: dict = {}
    mount_fds: dict = {}
    log: list[str] = []

    def fail(message: str) -> None:
        tail = "\n".join(log[-40:])
        raise Mismatch(f"seed {seed}: {message}\n"
                       f"rerun: DFSFS_TEST_SEED={seed} pytest tests/test_mount_differential.py -k env\n"
                       f"last operations (of {len(log)}):\n{tail}")

    def compare(when: str) -> None:
        problems = compare_trees(local, mounted)
        if problems:
            fail(f"the trees differ {when}:\n  " + "\n  ".join(problems[:30]))

    def close_all() -> None:
        for handle in sorted(generator.handles):
            op = ("close", handle)
            outcomes = run_op(op, local, local_fds), run_op(op, mounted, mount_fds)
            log.append(f"{len(log):4d} {describe(op)} -> local {outcomes[0]}, mount {outcomes[1]}")
            if outcomes[0] != outcomes[1]:
                fail(f"close of handle {handle}: local {outcomes[0]}, mount {outcomes[1]}")
        generator.handles.clear()

    try:
        for number in range(OPS_PER_SEED):
            op = generator.next_op()
            expected = run_op(op, local, local_fds)
            actual = run_op(op, mounted, mount_fds)
            shown = expected if not isinstance(expected[1], bytes) else ("ok", f"<{len(expected[1])} bytes>")
            log.append(f"{number:4d} {describe(op)} -> {shown}")
            if expected != actual:
                if isinstance(expected[1], bytes) and isinstance(actual[1], bytes):
                    a, b = expected[1], actual[1]
                    first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]),
                                 min(len(a), len(b)))
                    fail(f"{describe(op)} read different bytes: local {len(a)} bytes, "
                         f"mount {len(b)} bytes, first difference at {first}")
                fail(f"{describe(op)}: local {expected}, mount {actual}")
            generator.applied(op, expected)
            if number % COMPARE_EVERY == COMPARE_EVERY - 1:
                compare(f"after operation {number}")
        close_all()
        compare("at the end")
        mnt.remount()
        compare("after a remount")
    finally:
        for fds in (local_fds, mount_fds):
            for fd in fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
