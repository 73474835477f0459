"""What the power-cut test does to a mount, and the worker processes that do it.

The initial files are the same for every seed (they are made once, in the golden state);
a seed chooses the workload: `plan(seed)` gives one spec per worker role. Each worker runs
in its own process (`python -m powercut.workload SPEC`), so that it can be frozen and
killed at the cut, and journals every step the file system acknowledged in a file outside
the lazy file system, after the step returned. Every line ends with CLOCK_MONOTONIC times
in ns (one clock for all processes), so the checks can tell which steps came before which
fsync of another worker.

Journal lines (`T` the time the step returned, `T0` the time it was called):
    start T / done T
    sync TAG LENGTH T0 T       fsync(2) of TAG returned with LENGTH bytes written so far
    begin NAME SEQ T           small: about to open NAME (O_TRUNC) for version SEQ
    closed NAME SEQ T          small, large: close(2) returned
    tmpdone SEQ SYNCED T       save: tmpSEQ written (fsync'd if SYNCED) and closed
    renamed SEQ T0 T           save: rename(tmpSEQ, target) returned
    unlinked NAME T0 T         delete: unlink(NAME) returned
"""

import json
import os
import random
import sys
import time

from faults import Journal, content

SMALL_NAMES = [f"s{i}" for i in range(6)]
SAVE_TARGETS = [f"r{i}" for i in range(4)]
DELETABLE = [f"del{i}" for i in range(10)]
UNTOUCHED = ["keep/k0", "keep/k1", "keep/k2", "dmark"]
BIG = "big"
PIECES = (1, 100, 4096, 10_000, 65_536, 65_537, 200_000)


def initial_files() -> dict[str, bytes]:
    """The golden state's files, by path relative to the mount."""
    sizes = [0, 1, 4096, 65_536, 65_537, 150_000]
    files = {name: content(f"init/{name}", size) for name, size in zip(SMALL_NAMES, sizes)}
    files.update({name: content(f"init/{name}", 1000 + 60_000 * i) for i, name in enumerate(SAVE_TARGETS)})
    files.update({name: content(f"init/{name}", [1, 5000, 65_536, 200_000][i % 4])
                  for i, name in enumerate(DELETABLE)})
    files.update({name: content(f"init/{name}", 70_000) for name in UNTOUCHED})
    files[BIG] = content("init/big", 1_200_000)
    return files


def plan(seed: int) -> dict[str, dict]:
    """One spec per role; paths and journals are added by the caller."""
    rng = random.Random(f"powercut/{seed}")
    small_count, save_count = 40, 16
    return {
        "small": dict(
            names=[rng.choice(SMALL_NAMES) for _ in range(small_count)],
            sizes=[rng.choice([0, 1, 100, 4096, 30_000, 65_536, 65_537, 150_000]) for _ in range(small_count)],
            # none: close only; end: fsync before close; mid: fsync now and then, and at the end
            syncs=[rng.choice(["none", "none", "end", "end", "mid"]) for _ in range(small_count)],
            content_seed=f"S{seed}", seed=rng.randrange(2**32)),
        "save": dict(
            targets=[rng.choice(SAVE_TARGETS) for _ in range(save_count)],
            sizes=[rng.choice([1, 100, 65_536, 100_000, 200_000]) for _ in range(save_count)],
            syncs=[rng.random() < 0.5 for _ in range(save_count)],
            content_seed=f"R{seed}", seed=rng.randrange(2**32)),
        "large": dict(size=rng.randrange(2_000_000, 6_000_000), content_seed=f"L{seed}",
                      seed=rng.randrange(2**32)),
        "delete": dict(names=rng.sample(DELETABLE, len(DELETABLE)), seed=rng.randrange(2**32)),
    }


def now() -> int:
    return time.monotonic_ns()


def _fsync(fd: int, journal: Journal, tag: str, length: int) -> None:
    called = now()
    os.fsync(fd)
    journal("sync", tag, length, called, now())


def _write(path: str, data: bytes, rng: random.Random, journal: Journal, tag: str, sync: str) -> None:
    """Write `data` in random pieces; fsync as `sync` says (see plan)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        position = 0
        while position < len(data):
            position += os.write(fd, data[position:position + rng.choice(PIECES)])
            if (sync == "mid" and rng.random() < 0.3) or (sync == "stream" and rng.random() < 0.05):
                _fsync(fd, journal, tag, position)
        if sync in ("end", "mid"):
            _fsync(fd, journal, tag, position)
    finally:
        os.close(fd)


def small(spec, root, rng, journal) -> None:
    for seq, (name, size, sync) in enumerate(zip(spec["names"], spec["sizes"], spec["syncs"])):
        journal("begin", name, seq, now())
        data = content(f"{spec['content_seed']}/{seq}", size)
        _write(os.path.join(root, name), data, rng, journal, f"{name}/{seq}", sync)
        journal("closed", name, seq, now())


def save(spec, root, rng, journal) -> None:
    """Editors' safe save: a temporary file, fsync'd or not, renamed over the target."""
    for seq, (target, size, sync) in enumerate(zip(spec["targets"], spec["sizes"], spec["syncs"])):
        tmp = os.path.join(root, f"tmp{seq}")
        data = content(f"{spec['content_seed']}/{seq}", size)
        _write(tmp, data, rng, journal, f"tmp{seq}", "end" if sync else "none")
        journal("tmpdone", seq, int(sync), now())
        called = now()
        os.rename(tmp, os.path.join(root, target))
        journal("renamed", seq, called, now())


def large(spec, root, rng, journal) -> None:
    data = content(spec["content_seed"], spec["size"])
    _write(os.path.join(root, BIG), data, rng, journal, BIG, "stream")
    journal("closed", BIG, 0, now())


def delete(spec, root, rng, journal) -> None:
    """Unlinks, with an fsync of another file after every third (it makes them durable)."""
    for position, name in enumerate(spec["names"]):
        called = now()
        os.unlink(os.path.join(root, name))
        journal("unlinked", name, called, now())
        if position % 3 == 2:
            fd = os.open(os.path.join(root, "dmark"), os.O_RDONLY)
            try:
                _fsync(fd, journal, "dmark", 0)
            finally:
                os.close(fd)
        time.sleep(rng.uniform(0, 0.05))


ROLES = {"small": small, "save": save, "large": large, "delete": delete}


def worker_main(spec: dict) -> None:
    journal = Journal(spec["journal"])
    journal("start", now())
    ROLES[spec["role"]](spec, spec["root"], random.Random(spec["seed"]), journal)
    journal("done", now())


if __name__ == "__main__":
    worker_main(json.loads(sys.argv[1]))
