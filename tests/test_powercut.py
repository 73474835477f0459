"""Power cuts (issue 11): PostgreSQL's cluster and both chunk stores live on scripts/lazyfs.py,
which forgets whatever was not fsync'd; the power is cut at a random point of workloads on
a dfsfs mount, everything restarts, and every promise of ARCHITECTURE.md "Durability" is
checked against what the workers journalled (tests/powercut/checks.py):

* PostgreSQL recovers from its WAL; `dfsfs fsck` finds nothing but crash leftovers (orphan
  chunk files, chunk rows no file references) and references whose chunks did not survive;
* on a fresh mount every file reads as an earlier state or a prefix of a newer content,
  nothing acknowledged by fsync is lost (nor any rename or unlink acknowledged before an
  fsync returned), a rename over an existing name never leaves an empty or partial file,
  and no read fails;
* what the mount changed by itself (settling references whose chunks were lost) has a
  damage record;
* after `dfsfs fsck --repair`, fsck is clean and both stores hold exactly the chunks the
  metadata names.

One cycle per seed, each from the same golden state. Even seeds run fsck before the fresh
mount, odd seeds after it. DFSFS_POWERCUT_SEEDS=200 runs seeds 1..200 instead of the CI
set; DFSFS_POWERCUT_SEED=17,42 runs just those. A failure names its seed.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from dfsfs.chunks.mirrored import MirroredChunkStore
from dfsfs.chunks.url import open_store
from dfsfs.fsck import check as fsck_check
from dfsfs.meta.db import create_engine
from faults import bounded, chunk_files, read_journal

from powercut.checks import check
from powercut.rig import USER, Rig
from powercut.workload import initial_files, plan

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.mount, pytest.mark.timeout(240)]

CI_SEEDS = 8
CHUNK = 64 * 1024  # the golden state's chunk size (rig.py)
LYING_SEED = 2  # its cut comes after 2 s: many fsyncs were acknowledged
TESTS = Path(__file__).resolve().parent
INITIAL = initial_files()
# Leftovers a crash may leave (fsck reports them, --repair settles them): the session of
# the daemon that died (its holds, the chunks it had not made durable), chunk rows between
# their last reference and their reclaim, chunk files put and never reserved.
CRASH_LEFTOVERS = {"sessions_over", "orphan_chunks", "unreferenced_chunks"}
# References whose chunks did not survive: allowed when found, settled and reported.
UNSETTLED = {"unsettled_chunks", "damaged_copies", "lost_chunks", "dangling_references"}


def seeds() -> list[int]:
    chosen = os.environ.get("DFSFS_POWERCUT_SEED")
    if chosen:
        return [int(seed) for seed in chosen.split(",") if seed.strip()]
    return list(range(1, int(os.environ.get("DFSFS_POWERCUT_SEEDS", CI_SEEDS)) + 1))


@pytest.fixture(scope="module")
def rig():
    base = Path(tempfile.mkdtemp(prefix="dfsfs-powercut-", dir="/tmp"))
    base.chmod(0o755)  # PostgreSQL runs as postgres
    machine = Rig(base)
    try:
        machine.build_golden(INITIAL)
        yield machine
    finally:
        machine.cleanup()
        machine.remove()


@pytest.mark.parametrize("seed", seeds())
def test_power_cut(rig, seed):
    cycle = Cycle(rig, seed)
    try:
        cycle.run()
    finally:
        cycle.cleanup()
    print(cycle.summary())
    assert not cycle.problems, (
        f"seed {seed} (rerun: DFSFS_POWERCUT_SEED={seed} .venv/bin/pytest -q tests/test_powercut.py; "
        f"journals and logs kept in {cycle.keep_evidence()}):\n"
        + "\n".join(cycle.problems) + "\n" + cycle.summary())


@pytest.mark.parametrize("lies", [("primary", "backup"), ("pg/cluster/pg_wal",)], ids=["stores", "wal"])
def test_the_checks_catch_a_disk_that_lies(rig, lies):
    """The same cycle on a disk that acknowledges syncs (of the chunk stores, or of
    PostgreSQL) without keeping anything: losing what was fsync'd must not go unnoticed."""
    cycle = Cycle(rig, LYING_SEED, lies=lies)
    try:
        cycle.run()
    finally:
        cycle.cleanup()
    print(cycle.summary(), "\n".join(cycle.problems), sep="\n")
    assert cycle.problems, "a disk that lost synced data went unnoticed:\n" + cycle.summary()


def test_fsync_makes_earlier_unlinks_durable(rig):
    """What seed 8 found, without chance: an unlink, then fsync of a file with nothing to
    commit, then the cut. ARCHITECTURE: fsync returns when "every namespace change this
    mount made before the call" is durable; the unlink must not come back."""
    after = cut_and_reboot(rig, "del0", fsync="dmark", cut_keeps=0.0)
    assert after is None, "del0 is back after the cut: its unlink was acknowledged before an fsync returned"


def test_chunks_outlive_the_references_to_them(rig):
    """Invariant 2: a freed chunk's bytes go only after the commit that dropped its last
    reference is durable. Unlink a file without fsync, let the reclaimer delete its
    chunks, cut (the lazy FS's journal commits every name change first, as ext4's timer
    may): the unlink may be undone, but then the file must read whole, not fail."""
    after = cut_and_reboot(rig, "del1", fsync=None, cut_keeps=1.0)
    assert after in (None, INITIAL["del1"]), f"del1 after the cut: {after!r:.80}"


def cut_and_reboot(rig: Rig, victim: str, fsync: str | None, cut_keeps: float):
    """Unlink `victim`, fsync `fsync` (if any), wait until the reclaimer has deleted the
    victim's chunk files, cut the power, reboot: what `victim` reads then (None: absent,
    an OSError if reading fails)."""
    chunk_names = {hashlib.sha256(INITIAL[victim][i:i + CHUNK]).hexdigest()
                   for i in range(0, len(INITIAL[victim]), CHUNK)}
    primary, _ = rig.stores_seen_directly
    mnt = None
    try:
        rig.restore_golden()
        rig.boot(cut_keeps)
        mnt = rig.deployment.mount(USER, rig.mnt)
        os.unlink(mnt.path / victim)
        if fsync:
            fd = os.open(mnt.path / fsync, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        deadline = time.monotonic() + 10
        while chunk_names & {path.name for path in primary.rglob("*")}:
            assert time.monotonic() < deadline, "the reclaimer did not delete the chunks"
            time.sleep(0.05)
        rig.power_cut()
        mnt.abort()
        mnt.cleanup()
        rig.boot()
        mnt = rig.deployment.mount(USER, rig.mnt)
        try:
            return (mnt.path / victim).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            return error
    finally:
        if mnt is not None:
            mnt.cleanup()
        rig.cleanup()


class Cycle:
    """One seed: boot, workload, cut, reboot, checks."""

    def __init__(self, rig: Rig, seed: int, lies: tuple[str, ...] = ()):
        self.rig = rig
        self.seed = seed
        self.lies = lies
        self.rng = random.Random(f"cut/{seed}")
        self.specs = plan(seed)
        self.journal_dir = Path(tempfile.mkdtemp(prefix=f"journals-{seed}-", dir=rig.base))
        self.workers: list[subprocess.Popen] = []
        self.mount = None
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.times: dict[str, float] = {}
        self.cut_after = 0.0
        self.cut_keeps = 0.0
        self.engine = None

    def phase(self, name: str, started: float) -> float:
        now = time.monotonic()
        self.times[name] = round(now - started, 2)
        return now

    def run(self) -> None:
        rig = self.rig
        started = t = time.monotonic()
        self.cut_keeps = self.rng.choice([0.0, 0.0, 0.5, 1.0])
        rig.restore_golden()
        rig.boot(self.cut_keeps, self.lies)
        self.mount = rig.deployment.mount(USER, rig.mnt)
        t = self.phase("boot", t)
        self.start_workers()
        self.cut_after = self.rng.uniform(0.05, 3.0)
        time.sleep(self.cut_after)
        for worker in self.workers:
            worker.send_signal(signal.SIGSTOP)  # from now on they acknowledge nothing
        rig.power_cut(frozen=[worker.pid for worker in self.workers])
        for worker in self.workers:
            worker.wait(timeout=30)
        self.mount.abort()  # the daemon dies with the machine
        self.mount.cleanup()
        self.journals = {role: read_journal(self.journal_dir / role) for role in self.specs}
        t = self.phase("workload", t)

        try:
            rig.boot()
        except AssertionError as error:  # PostgreSQL refused to start
            self.problems.append(f"no recovery after the cut: {error}")
            return
        t = self.phase("reboot", t)
        account = self.query("SELECT id FROM users WHERE name = :name", name=USER)[0][0]
        fsck_first = self.seed % 2 == 0
        if fsck_first:
            self.check_fsck_after_cut()
        before = self.file_rows(account)
        damage_before = self.damage_count(account)
        self.mount = rig.deployment.mount(USER, rig.mnt)
        try:
            result, error, _ = bounded(check, str(self.mount.path), self.specs, self.journals,
                                       INITIAL, timeout=120)
            if error is not None:
                raise error
            problems, notes = result
            self.problems += problems
            self.notes += notes
            self.mount.umount()  # cleanly, and nothing alarming in the daemon's log
        except AssertionError as error:
            self.problems.append(f"the mount after the cut: {error}")
        finally:
            self.mount.cleanup()
        self.check_settled(before, self.file_rows(account), damage_before, self.damage_count(account))
        if not fsck_first:
            self.check_fsck_after_cut()
        t = self.phase("check", t)

        result = rig.deployment.run("fsck", "--repair", check=False, timeout=120)
        if result.returncode not in (0, 1):
            self.problems.append(f"dfsfs fsck --repair exited {result.returncode}: {result.stderr}")
        report = self.fsck()
        if not report.clean:
            self.problems.append(f"fsck after --repair is not clean: {dict(report.found)}: "
                                 + excerpt(report.problems))
        self.check_stores_match_metadata(account)
        rig.power_off()
        self.phase("repair", t)
        self.times["total"] = round(time.monotonic() - started, 2)

    def start_workers(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(TESTS))
        for role, spec in self.specs.items():
            spec.update(role=role, root=str(self.mount.path), journal=str(self.journal_dir / role))
            self.workers.append(subprocess.Popen(
                [sys.executable, "-m", "powercut.workload", json.dumps(spec)], cwd=TESTS, env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while not all(read_journal(self.journal_dir / role)[:1] for role in self.specs):
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.01)

    # ---- facts from fsck and the database ------------------------------------------------

    def fsck(self):
        """dfsfs's own fsck, in this process (its report, not its printed summary), without
        repairs: it only reads the stores, so it reads them beside the lazy FS."""
        primary, backup = self.rig.stores_seen_directly
        engine = create_engine(self.rig.database_url, pool_size=1)
        stores = MirroredChunkStore(open_store(primary.as_uri(), "primary"),
                                    open_store(backup.as_uri(), "backup"))
        try:
            return fsck_check(engine, stores)
        finally:
            stores.close()
            engine.dispose()

    def check_fsck_after_cut(self) -> None:
        report = self.fsck()
        found = {category for category, count in report.found.items() if count}
        self.fsck_found = dict(report.found)
        if found - CRASH_LEFTOVERS - UNSETTLED:
            self.problems.append("fsck after the cut: " + excerpt(report.problems))
        elif found & UNSETTLED:
            self.notes.append("fsck found references to chunks that did not survive")

    def query(self, sql: str, **params) -> list[tuple]:
        if self.engine is None:
            self.engine = create_engine(self.rig.database_url, pool_size=1)
        with self.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(sql), params)]

    def file_rows(self, account: int) -> dict[int, tuple]:
        rows = self.query(
                     "SELECT i.id, i.size, array_agg(f.index || ':' || f.chunk_id ORDER BY f.index) "
                     "FROM inodes i LEFT JOIN file_chunks f ON f.ino = i.id "
                     "WHERE i.user_id = :account GROUP BY i.id", account=account)
        return {ino: (size, chunks) for ino, size, chunks in rows}

    def damage_count(self, account: int) -> int:
        return self.query("SELECT count(*) FROM damage WHERE user_id = :account", account=account)[0][0]

    def check_settled(self, before: dict, after: dict, damage_before: int, damage_after: int) -> None:
        """A mount that only read changed files only to settle lost chunks, and reports it."""
        changed = sorted(ino for ino in before.keys() & after.keys() if before[ino] != after[ino])
        if changed:
            self.notes.append(f"the mount settled inodes {changed}")
            if damage_after == damage_before:
                self.problems.append(f"the mount changed inodes {changed} without a damage record")

    def check_stores_match_metadata(self, account: int) -> None:
        named = {row[0] for row in self.query(
            "SELECT encode(sha256, 'hex') FROM chunks WHERE user_id = :account", account=account)}
        for store in self.rig.stores_seen_directly:
            held = {path.name for path in chunk_files(store, account)}
            if held != named:
                self.problems.append(f"{store.name} after fsck --repair: {len(held - named)} chunk files "
                                     f"the metadata does not name, {len(named - held)} named chunks missing")
            leftovers = [p.name for p in (store / str(account)).rglob(".*.tmp")]
            if leftovers:
                self.notes.append(f"{store.name}: {len(leftovers)} temporary files of interrupted puts")

    # ---- the end ------------------------------------------------------------------------------

    def cleanup(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
        for worker in self.workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(timeout=30)
        if self.mount is not None:
            self.mount.cleanup()
        self.rig.cleanup()

    def keep_evidence(self) -> Path:
        """Copy the journals and the logs of a failed cycle where they outlive the test."""
        kept = Path(tempfile.mkdtemp(prefix=f"dfsfs-powercut-seed{self.seed}-", dir="/tmp"))
        shutil.copytree(self.journal_dir, kept / "journals")
        for log in [self.rig.base / "lazyfs.log", self.rig.pg.log_file,
                    *(self.rig.base / "dep" / "data" / "logs").glob("*.log")]:
            if log.exists():
                shutil.copy(log, kept)
        return kept

    def summary(self) -> str:
        acked = {role: sum(1 for line in self.journals.get(role, []) if line[0] not in ("start", "done"))
                 for role in self.specs} if hasattr(self, "journals") else {}
        return (f"seed {self.seed}: cut after {self.cut_after:.2f} s (keeps {self.cut_keeps}), "
                f"steps acknowledged {acked}, fsck after the cut {getattr(self, 'fsck_found', {})}, "
                f"notes {self.notes}, times {self.times}")


def excerpt(lines: list[str], count: int = 4) -> str:
    return "; ".join(lines[:count]) + (f"; … ({len(lines) - count} more)" if len(lines) > count else "")
