"""The power-cut test's verdicts (tests/powercut/checks.py) on hand-made journals and files:
what the promises allow passes, each kind of loss is named. No mount, no database."""

import pytest

from faults import content

from powercut.checks import check
from powercut.workload import initial_files, plan

INITIAL = initial_files()
SPECS = plan(1)
T = 1_000  # journal times: T + n


@pytest.fixture
def root(tmp_path):
    """The golden files, as a directory: the state before any step."""
    for name, data in INITIAL.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    return tmp_path


def verdict(root, **journals):
    lines = {role: [line.split() for line in journals.get(role, [])] for role in SPECS}
    return check(str(root), SPECS, lines, INITIAL)


def small_version(seq: int) -> bytes:
    spec = SPECS["small"]
    return content(f"{spec['content_seed']}/{seq}", spec["sizes"][seq])


def saved_version(seq: int) -> bytes:
    spec = SPECS["save"]
    return content(f"{spec['content_seed']}/{seq}", spec["sizes"][seq])


def test_nothing_happened(root):
    assert verdict(root) == ([], [])


def test_a_closed_file_may_read_as_before_but_an_fsyncd_one_may_not(root):
    seq = next(seq for seq, size in enumerate(SPECS["small"]["sizes"]) if size > 100)
    name = SPECS["small"]["names"][seq]
    closed = [f"begin {name} {seq} {T}", f"closed {name} {seq} {T + 1}"]
    assert verdict(root, small=closed)[0] == []  # close() is not durable
    (root / name).write_bytes(small_version(seq)[:10])
    assert verdict(root, small=closed)[0] == []  # a prefix of the new content
    synced = [f"begin {name} {seq} {T}", f"sync {name}/{seq} {len(small_version(seq))} {T + 1} {T + 2}"]
    problems, _ = verdict(root, small=synced)
    assert problems and problems[0].startswith(f"{name}: reads 10 bytes")
    (root / name).write_bytes(small_version(seq))
    assert verdict(root, small=synced)[0] == []
    (root / name).write_bytes(b"garbage")
    assert verdict(root, small=closed)[0], "other bytes went unnoticed"


def test_safe_saves(root):
    seq = 0
    target = SPECS["save"]["targets"][seq]
    renamed = [f"sync tmp{seq} 1 {T} {T + 1}", f"tmpdone {seq} 1 {T + 2}", f"renamed {seq} {T + 3} {T + 4}"]
    # the rename undone: the fsync'd temporary file must still be there, whole
    assert verdict(root, save=renamed)[0] == [f"tmp{seq}: fsync'd, then lost: absent, and {target} reads version -1"]
    (root / f"tmp{seq}").write_bytes(saved_version(seq))
    assert verdict(root, save=renamed)[0] == []
    # a later fsync (of any worker) makes the rename durable
    later_fsync = [f"start {T}", f"sync dmark 0 {T + 5} {T + 6}"]
    problems, _ = verdict(root, save=renamed, delete=later_fsync)
    assert any("acknowledged before an fsync returned" in p for p in problems)
    # the rename done: the target holds all of the new version, never part of it
    (root / f"tmp{seq}").unlink()
    (root / target).write_bytes(saved_version(seq))
    assert verdict(root, save=renamed, delete=later_fsync)[0] == []
    (root / target).write_bytes(b"")
    assert any(p.startswith(f"{target}: reads 0 bytes") for p in verdict(root, save=renamed)[0])


def test_large_file_keeps_its_fsyncd_prefix(root):
    spec = SPECS["large"]
    new = content(spec["content_seed"], spec["size"])
    journal = [f"sync big 300000 {T} {T + 1}"]
    assert verdict(root, large=journal)[0][0].startswith("big: reads 1200000 bytes")
    (root / "big").write_bytes(new[:300_000])
    assert verdict(root, large=journal)[0] == []
    (root / "big").write_bytes(new[:200_000] + bytes(100_000))
    assert "(zeros there)" in verdict(root, large=journal)[0][0]


def test_unlinks(root):
    first, second = SPECS["delete"]["names"][:2]
    journal = [f"unlinked {first} {T} {T + 1}"]
    (root / first).unlink()
    assert verdict(root, delete=journal)[0] == []
    (root / second).unlink()  # in flight: may have happened
    assert verdict(root, delete=journal)[0] == []
    (root / first).write_bytes(INITIAL[first])  # undone: allowed without a later fsync
    assert verdict(root, delete=journal)[0] == []
    journal.append(f"sync dmark 0 {T + 2} {T + 3}")
    assert verdict(root, delete=journal)[0] == [
        f"{first}: present, but its unlink was acknowledged before an fsync returned"]
    (root / SPECS["delete"]["names"][2]).unlink()
    assert f"{SPECS['delete']['names'][2]}: absent, but never unlinked" in verdict(root, delete=journal)[0]


def test_stray_and_untouched_files(root):
    (root / "keep" / "k0").write_bytes(b"changed")
    (root / "stray").write_bytes(b"")
    problems, _ = verdict(root)
    assert problems == ["keep/k0: untouched, reads 7 bytes", "listing: unexpected ['stray']"]
