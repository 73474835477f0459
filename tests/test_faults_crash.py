"""Crash consistency: SIGKILL the mount daemon at random points while four worker processes
write a large file, write and rewrite small files, save files atomically (write a temporary
file, fsync, rename over the target) and move a directory, and delete files. Then:

* the killed daemon leaves a stale mount; `dfsfs mount` (or `dfsfs umount`) on the same mount
  point detects it, cleans it up and says so;
* `dfsfs fsck` finds nothing but leftovers a crash may leave (orphan chunk files, chunk rows
  no file references) — never a dangling reference, a lost chunk or wrong counts;
* deletes not yet fsync'd may be undone, newest first, never out of order;
* every file reads as its old content or its new content. A file whose writer had not
  closed it yet (nor fsync'd all of it) may hold a prefix of the new content — unsynced
  writes may be partially present — but never other bytes (no garbage, no zeros in the
  middle), and every byte that an fsync acknowledged is there;
* at the end `dfsfs fsck --repair` cleans everything and a second fsck exits 0.

Workers journal each acknowledged step in a file outside the mount (see faults.worker_main);
the checks below derive what each file may hold from those journals. Seeded: a failure
names the iteration and its seed.
"""

import os
import random
import signal
import subprocess
import time

import pytest

from faults import (
    adopt,
    content,
    fsck,
    is_stale,
    kill_daemon,
    mounted,
    read_journal,
    start_worker,
    teardown,
)
from mounting import Deployment, is_mount

from dfsfs.recovery import process_start

ITERATIONS = 10
SEED = 20240607
# Leftovers a crash may legitimately leave; fsck reports them and --repair removes them.
# What a killed daemon leaves: its session (holds, chunks not yet durable), and chunks
# between their last reference and their reclaim, or put and not yet committed.
CRASH_LEFTOVERS = {"sessions_over", "orphan_chunks", "unreferenced_chunks"}
SMALL_NAMES = [f"s{i}" for i in range(16)]
RENAME_TARGETS = [f"r{i}" for i in range(6)]
INNER = content("inner", 70_000)


@pytest.fixture(scope="module")
def deployment(database_url, tmp_path_factory):
    # A small write buffer makes large writes commit in many batches while they run.
    return Deployment(database_url, tmp_path_factory.mktemp("crash"), chunk_size="64K",
                      extra_env={"DFSFS_WRITE_BUFFER": "1M"})


def read_or_none(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def describe(data) -> str:
    return "absent" if data is None else f"{len(data)} bytes"


def write_closed(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def test_open_with_o_trunc_truncates(deployment):
    """The crash test (and every `>` redirection, cp over a file, editor saves) relies on it."""
    with mounted(deployment, "trunc") as mnt:
        path = mnt.path / "f"
        path.write_bytes(b"x" * 100)
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            assert os.fstat(fd).st_size == 0, "open(O_TRUNC) did not truncate"
            os.write(fd, b"y" * 10)
        finally:
            os.close(fd)
        assert path.read_bytes() == b"y" * 10
        path.write_bytes(b"short")  # open(..., "wb") = O_WRONLY|O_CREAT|O_TRUNC
        assert path.read_bytes() == b"short"


def test_mount_right_after_kill_cleans_the_stale_mount(deployment):
    """`dfsfs mount` at once after the daemon died, while the kernel still caches the mount
    point's attributes (attr_timeout), must still see the stale mount and clean it."""
    mount_path = deployment.base / "mnt-quick"
    mnt = deployment.mount("quick", mount_path)
    try:
        (mnt.path / "f").write_bytes(b"kept")
        os.stat(mnt.path)  # the mount point's attributes are now cached
        kill_daemon(mnt)
        result = deployment.run("mount", mnt.path, "--user", "quick", check=False)
        assert result.returncode == 0, f"mount over a just-killed daemon's mount: {result.stderr}"
        assert "daemon that is gone" in result.stderr, result.stderr
        mnt = adopt(deployment, "quick", mount_path)
        assert (mnt.path / "f").read_bytes() == b"kept"
    finally:
        teardown(mnt)


def test_a_killed_daemon_not_yet_reaped_is_gone():
    """A mount that finds the session of a killed daemon whose parent has not reaped it
    (a zombie keeps its pid and start time) must still settle that session."""
    process = subprocess.Popen(["sleep", "600"])
    try:
        assert process_start(process.pid) is not None
        os.kill(process.pid, signal.SIGKILL)
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)  # a zombie, not reaped
        assert process_start(process.pid) is None
    finally:
        process.kill()
        process.wait()


def test_kill_daemon_at_random_points(deployment):
    rng = random.Random(SEED)
    user = "crash"
    mount_path = deployment.base / "mnt"
    mnt = deployment.mount(user, mount_path)
    root = mnt.path
    model: dict[str, bytes] = {}
    try:
        # ---- the files the workers change, all closed ----
        for index in range(2):
            model[f"big{index}"] = content(f"big-initial-{index}", 1_500_000 + index)
        for name in SMALL_NAMES:
            model[name] = content(f"{name}-initial", rng.randrange(0, 20_000))
        for name in RENAME_TARGETS:
            model[name] = content(f"{name}-initial", rng.randrange(0, 150_000))
        for name, data in model.items():
            write_closed(root / name, data)
        os.mkdir(root / "dA")
        write_closed(root / "dA" / "inner", INNER)
        directory = "dA"
        history = []

        for iteration in range(ITERATIONS):
            seed = rng.randrange(2**32)
            where = f"iteration {iteration} (seed {seed})"
            it_rng = random.Random(seed)
            deletable = {f"del{iteration}_{k}": content(f"del-{iteration}-{k}", it_rng.choice(
                [0, 1, 5000, 65_536, 200_000, 700_000])) for k in range(10)}
            for name, data in deletable.items():
                write_closed(root / name, data)
                model[name] = data

            journals = {role: str(deployment.base / f"journal-{iteration}-{role}")
                        for role in ("large", "small", "rename", "delete")}
            big = f"big{iteration % 2}"
            large_size = it_rng.randrange(4_000_000, 32_000_000)
            small_count = 60
            small_names = [it_rng.choice(SMALL_NAMES) for _ in range(small_count)]
            small_sizes = [it_rng.choice([0, 1, 100, 4096, 65_536, 65_537, 30_000])
                           for _ in range(small_count)]
            rename_count = 24
            rename_targets = [it_rng.choice(RENAME_TARGETS) for _ in range(rename_count)]
            rename_sizes = [it_rng.choice([0, 10, 65_536, 100_000, 300_000]) for _ in range(rename_count)]
            delete_order = list(deletable)
            it_rng.shuffle(delete_order)
            specs = {
                "large": dict(name=big, size=large_size, content_seed=f"L{seed}"),
                "small": dict(count=small_count, names=small_names, sizes=small_sizes,
                              content_seed=f"S{seed}"),
                "rename": dict(count=rename_count, targets=rename_targets, sizes=rename_sizes,
                               content_seed=f"R{seed}"),
                "delete": dict(names=delete_order),
            }
            workers = []
            for role, spec in specs.items():
                spec.update(role=role, root=str(root), journal=journals[role],
                            seed=it_rng.randrange(2**32))
                workers.append(start_worker(spec))
            deadline = time.monotonic() + 20
            while not all(read_journal(j)[:1] == [["start"]] for j in journals.values()):
                assert time.monotonic() < deadline, f"{where}: workers did not start"
                time.sleep(0.01)
            delay = it_rng.uniform(0.02, 1.0)
            time.sleep(delay)

            # ---- the crash ----
            kill_daemon(mnt)
            for worker in workers:
                worker.kill()
                worker.wait(timeout=30)
            events = {role: read_journal(path) for role, path in journals.items()}
            finished = [role for role, lines in events.items() if lines[-1:] == [["done"]]]
            history.append((iteration, round(delay, 2), finished))
            # (the kernel may answer stat from cached attributes for up to attr_timeout)
            deadline = time.monotonic() + 5
            while not is_stale(root):
                assert time.monotonic() < deadline, f"{where}: the mount of a killed daemon is not stale"
                time.sleep(0.1)

            # ---- fsck on the crashed state: only crash leftovers ----
            status, found, output = fsck(deployment, "--user", user)
            unexpected = set(found) - CRASH_LEFTOVERS
            assert not unexpected, f"{where}: fsck after the crash found {found}:\n{output}"
            assert status == (1 if found else 0), output

            # ---- stale-mount cleanup, then mount again ----
            if iteration % 3 == 2:
                result = deployment.run("umount", root, check=False)
                assert result.returncode == 0, f"{where}: umount of a stale mount: {result.stderr}"
                assert "daemon that is gone" in result.stderr, result.stderr
                assert not is_mount(root)
                result = deployment.run("mount", root, "--user", user, check=False)
                assert result.returncode == 0, f"{where}: mount after umount: {result.stderr}"
            else:
                result = deployment.run("mount", root, "--user", user, check=False)
                assert result.returncode == 0, f"{where}: mount over a stale mount: {result.stderr}"
                assert "daemon that is gone" in result.stderr, (
                    f"{where}: no clear message about the stale mount: {result.stderr!r}")
            mnt = adopt(deployment, user, mount_path)
            assert not is_stale(root)

            # ---- every file holds an allowed content ----
            directory = check_files(root, model, specs, events, directory, where)

        # ---- clean up with fsck --repair ----
        teardown(mnt)
        status, found, output = fsck(deployment, "--repair", "--user", user)
        assert set(found) <= CRASH_LEFTOVERS, output
        status, found, output = fsck(deployment, "--user", user)
        assert status == 0 and not found, f"fsck after --repair is not clean:\n{output}"
        print("iterations (index, kill delay s, roles that had finished):", history)
        # and the files still read back after all that
        mnt = deployment.mount(user, mount_path)
        for name, data in model.items():
            assert read_or_none(root / name) == data, name
        assert read_or_none(root / directory / "inner") == INNER
    finally:
        teardown(mnt)


def check_files(root, model, specs, events, directory, where) -> str:
    """Check every file against what the journals allow; update `model`; return the dir name."""
    problems = []
    allowed_names = set(model) | {"dA", "dB"}

    def verdict(name, ok, detail):
        if not ok:
            problems.append(f"{name}: {detail}")

    # large: old content, else a prefix of the new one covering every fsync'd byte
    spec, lines = specs["large"], events["large"]
    name = spec["name"]
    new = content(spec["content_seed"], spec["size"])
    synced = max([int(line[2]) for line in lines if line[0] == "sync"], default=0)
    closed = ["closed", "big"] in lines
    actual = read_or_none(root / name)
    if closed:
        verdict(name, actual == new, f"closed with {len(new)} new bytes, reads {describe(actual)}")
    elif actual is None:
        verdict(name, False, "a file being rewritten disappeared")
    else:
        is_old = actual == model[name] and synced == 0
        is_prefix = len(actual) >= synced and actual == new[:len(actual)]
        verdict(name, is_old or is_prefix,
                f"{describe(actual)}: neither the old content nor a prefix of the new one covering "
                f"the {synced} fsync'd bytes (first difference at "
                f"{first_difference(actual, new)}; zeros there: {zeros_at(actual, new)})")
    model[name] = actual

    # small: the last closed version, or (in flight) the one before or a prefix of the next
    spec, lines = specs["small"], events["small"]
    last: dict[str, tuple[str, int]] = {}
    synced_small: dict[str, int] = {}
    for line in lines:
        if line[0] in ("begin", "closed"):
            last[line[1]] = (line[0], int(line[2]))
        elif line[0] == "sync":
            synced_small[line[1]] = max(synced_small.get(line[1], 0), int(line[2]))
    for name, (state, seq) in last.items():
        version = content(f"{spec['content_seed']}/{seq}", spec["sizes"][seq])
        actual = read_or_none(root / name)
        if state == "closed":
            verdict(name, actual == version, f"closed version {seq} ({len(version)} bytes), "
                                             f"reads {describe(actual)}")
            model[name] = version if actual == version else actual
            continue
        previous = [s for s in range(seq) if spec["names"][s] == name]
        before = (content(f"{spec['content_seed']}/{previous[-1]}", spec["sizes"][previous[-1]])
                  if previous else model[name])
        synced = synced_small.get(f"{name}/{seq}", 0)
        ok = actual is not None and (
            (actual == before and synced == 0)
            or (len(actual) >= synced and actual == version[:len(actual)]))
        verdict(name, ok, f"in flight (version {seq}, {synced} bytes fsync'd): reads {describe(actual)}")
        model[name] = actual

    # rename: completed operations are a prefix; at most one is in flight
    spec, lines = specs["rename"], events["rename"]
    done = {int(line[1]) for line in lines if line[0] == "renamed"}
    tmp_done = {int(line[1]) for line in lines if line[0] == "tmpdone"}
    dir_moves = [line[1] for line in lines if line[0] == "dir"]
    expected = {}
    completed = 0
    in_flight = None
    for seq in range(spec["count"]):
        if seq % 4 == 3:
            if completed < len(dir_moves):
                directory = dir_moves[completed]
                completed += 1
                continue
            in_flight = seq
            break
        if seq not in done:
            in_flight = seq
            break
        expected[spec["targets"][seq]] = seq
    listing = set(os.listdir(root))
    tmp_names = {n for n in listing if n.startswith("tmp")}
    for target in RENAME_TARGETS:
        if target in expected:
            seq = expected[target]
            model[target] = content(f"{spec['content_seed']}/{seq}", spec["sizes"][seq])
    if in_flight is not None and in_flight % 4 == 3:
        present = [d for d in ("dA", "dB") if d in listing]
        verdict("directory", len(present) == 1, f"in-flight move, present: {present}")
        directory = present[0] if present else directory
    elif in_flight is not None:
        target, tmp = spec["targets"][in_flight], f"tmp{in_flight}"
        version = content(f"{spec['content_seed']}/{in_flight}", spec["sizes"][in_flight])
        actual_target, actual_tmp = read_or_none(root / target), read_or_none(root / tmp)
        if in_flight in tmp_done:
            ok = ((actual_target == version and actual_tmp is None)
                  or (actual_target == model[target] and actual_tmp == version))
        else:
            ok = actual_target == model[target] and (
                actual_tmp is None or actual_tmp == version[:len(actual_tmp)])
        verdict(target, ok, f"rename {in_flight} in flight (temporary file fsync'd: "
                            f"{in_flight in tmp_done}): target {describe(actual_target)}, "
                            f"{tmp} {describe(actual_tmp)}")
        model[target] = actual_target
        tmp_names.discard(tmp)
        if actual_tmp is not None:
            os.unlink(root / tmp)
    verdict("temporary files", not tmp_names, f"unexpected {sorted(tmp_names)}")
    for target in RENAME_TARGETS:
        if target in expected or (in_flight is not None and in_flight % 4 != 3
                                  and target == spec["targets"][in_flight]):
            actual = read_or_none(root / target)
            verdict(target, actual == model[target],
                    f"expected {describe(model[target])}, reads {describe(actual)}")
    other_dir = "dB" if directory == "dA" else "dA"
    verdict("directory", directory in listing and other_dir not in listing,
            f"expected only {directory}, listing has {sorted(listing & {'dA', 'dB'})}")
    verdict("directory content", read_or_none(root / directory / "inner") == INNER,
            "the moved directory's file changed")

    # delete: unlinks reach the database in order, in batches, and like any namespace change
    # without an fsync a crash may undo the last ones. So the names gone are a prefix of the
    # order, at most one beyond those acknowledged (the one in flight); the rest are intact.
    spec, lines = specs["delete"], events["delete"]
    unlinked = [line[1] for line in lines if line[0] == "unlinked"]
    order = spec["names"]
    verdict("deletes", unlinked == order[:len(unlinked)], "journal out of order")
    present = [read_or_none(root / name) for name in order]
    gone = next((position for position, actual in enumerate(present) if actual is not None),
                len(order))
    verdict("deletes", gone <= len(unlinked) + 1,
            f"{gone} names gone, only {len(unlinked)} unlinks acknowledged")
    for position, (name, actual) in enumerate(zip(order, present, strict=True)):
        if position >= gone:
            verdict(name, actual == model[name],
                    f"after the last name gone ({gone}): reads {describe(actual)}")
        if actual is None:
            model.pop(name)
        else:
            model[name] = actual
    undone = len(unlinked) - min(gone, len(unlinked))
    if undone:
        print(f"deletes: {undone} acknowledged unlinks undone by the crash (not fsync'd)")

    # every other file is intact (those checked above read the same again), nothing else appeared
    for name, data in model.items():
        actual = read_or_none(root / name)
        verdict(name, actual == data, f"expected {describe(data)}, reads {describe(actual)}")
    stray = set(os.listdir(root)) - allowed_names
    verdict("listing", not stray, f"unexpected names {sorted(stray)}")
    assert not problems, f"{where}: files after the crash:\n" + "\n".join(problems)
    return directory


def first_difference(actual: bytes, expected: bytes) -> int | None:
    """The first offset where the two differ within their common length."""
    common = min(len(actual), len(expected))
    for offset in range(0, common, 4096):
        if actual[offset:offset + 4096] != expected[offset:offset + 4096]:
            block = offset
            while block < common and actual[block] == expected[block]:
                block += 1
            return block
    return None


def zeros_at(actual: bytes, expected: bytes) -> bool:
    offset = first_difference(actual, expected)
    return offset is not None and not any(actual[offset:offset + 4096])
