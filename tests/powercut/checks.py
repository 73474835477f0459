"""What each file may hold after a power cut, from the workers' journals, by the promises
of ARCHITECTURE.md "Durability" (not by what today's code happens to do):

- close() is durable only within the commit interval: a closed file may read as any
  earlier state;
- every file reads as an earlier state or a prefix of a newer content; never other bytes;
- nothing acknowledged by fsync is lost: a file's fsync'd bytes are there (unless a later
  version of the file replaced them), and so is every namespace change (rename, unlink)
  the mount acknowledged before that fsync was called — by any worker;
- a rename over an existing name never leaves an empty or partial file: the target holds
  its old content or the full content of a renamed file.

`check(root, specs, journals, initial)` returns the problems found (empty when every file
is allowed) and notes about what the cut undid (allowed, worth printing).
"""

import errno
import os
from dataclasses import dataclass, field

from faults import content

from powercut.workload import BIG, DELETABLE, SAVE_TARGETS, SMALL_NAMES, UNTOUCHED


@dataclass
class Facts:
    """The journals, digested."""

    lines: dict[str, list[list[str]]]
    synced: dict[str, int] = field(default_factory=dict)  # tag -> bytes fsync'd (max)
    last_fsync_call: int = -1  # the latest time an fsync that returned was called

    def __post_init__(self) -> None:
        for lines in self.lines.values():
            for line in lines:
                if line[0] == "sync":
                    self.synced[line[1]] = max(self.synced.get(line[1], 0), int(line[2]))
                    self.last_fsync_call = max(self.last_fsync_call, int(line[3]))

    def events(self, role: str, kind: str) -> list[list[str]]:
        return [line for line in self.lines.get(role, []) if line[0] == kind]

    def done(self, role: str) -> bool:
        return any(line[0] == "done" for line in self.lines.get(role, []))

    def fsync_followed(self, acknowledged_ns: int) -> bool:
        """Whether an fsync was called after this step returned, and returned itself."""
        return acknowledged_ns < self.last_fsync_call


class Reader:
    """Reads files once each; an error other than ENOENT is a problem (never wrong bytes)."""

    def __init__(self, root: str, problems: list[str]):
        self.root = root
        self.problems = problems
        self.cache: dict[str, bytes | None] = {}
        self.failed: set[str] = set()  # read errors, reported once: no other verdict on them

    def __call__(self, name: str) -> bytes | None:
        if name not in self.cache:
            try:
                with open(os.path.join(self.root, name), "rb") as f:
                    self.cache[name] = f.read()
            except FileNotFoundError:
                self.cache[name] = None
            except OSError as error:
                self.problems.append(f"{name}: unreadable ({errno.errorcode.get(error.errno)}: {error})")
                self.failed.add(name)
                self.cache[name] = None
        return self.cache[name]


def describe(data: bytes | None) -> str:
    return "absent" if data is None else f"{len(data)} bytes"


def is_prefix(actual: bytes, of: bytes, at_least: int = 0) -> bool:
    return at_least <= len(actual) <= len(of) and of[:len(actual)] == actual


def first_difference(actual: bytes, expected: bytes) -> str:
    common = min(len(actual), len(expected))
    for offset in range(common):
        if actual[offset] != expected[offset]:
            zeros = not any(actual[offset:offset + 4096])
            return f"first difference at byte {offset}{' (zeros there)' if zeros else ''}"
    return f"no difference in the first {common} bytes"


def check(root: str, specs: dict, journals: dict[str, list[list[str]]],
          initial: dict[str, bytes]) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    notes: list[str] = []
    facts = Facts(journals)
    read = Reader(root, problems)
    _check_small(specs["small"], facts, read, initial, problems)
    _check_saves(specs["save"], facts, read, initial, problems, notes)
    _check_large(specs["large"], facts, read, initial, problems)
    _check_deletes(specs["delete"], facts, read, initial, problems, notes)
    for name in UNTOUCHED:
        if read(name) != initial[name]:
            problems.append(f"{name}: untouched, reads {describe(read(name))}")
    expected = {name.split("/")[0] for name in initial} - set(DELETABLE)
    allowed = expected | set(DELETABLE) | {f"tmp{seq}" for seq in range(len(specs["save"]["targets"]))}
    listing = set(os.listdir(root))
    if expected - listing:
        problems.append(f"listing: missing {sorted(expected - listing)}")
    if listing - allowed:
        problems.append(f"listing: unexpected {sorted(listing - allowed)}")
    verdicts = [p for p in problems if p.split(":", 1)[0] not in read.failed or "unreadable" in p]
    return verdicts, notes


def _check_small(spec, facts, read, initial, problems) -> None:
    begun = {int(line[2]) for line in facts.events("small", "begin")}
    for name in SMALL_NAMES:
        versions = [seq for seq in sorted(begun) if spec["names"][seq] == name]
        synced = [seq for seq in versions if f"{name}/{seq}" in facts.synced]
        floor = synced[-1] if synced else None  # the newest version with an fsync'd prefix
        actual = read(name)
        if actual is None:
            problems.append(f"{name}: absent (small files are only ever rewritten)")
            continue
        if floor is None and actual == initial[name]:
            continue
        ok = any(is_prefix(actual, content(f"{spec['content_seed']}/{seq}", spec["sizes"][seq]),
                           facts.synced[f"{name}/{seq}"] if seq == floor else 0)
                 for seq in versions if floor is None or seq >= floor)
        if not ok:
            floor_text = (f"version {floor} fsync'd with {facts.synced[f'{name}/{floor}']} bytes"
                          if floor is not None else "nothing fsync'd")
            problems.append(f"{name}: reads {describe(actual)}, neither its initial content nor a "
                            f"prefix of versions {versions} ({floor_text})")


def _check_saves(spec, facts, read, initial, problems, notes) -> None:
    attempted = [int(line[1]) for line in facts.events("save", "tmpdone")]
    renamed = {int(line[1]): int(line[3]) for line in facts.events("save", "renamed")}
    for target in SAVE_TARGETS:
        seqs = [seq for seq in attempted if spec["targets"][seq] == target]
        candidates = {-1: initial[target]}
        candidates.update({seq: content(f"{spec['content_seed']}/{seq}", spec["sizes"][seq])
                           for seq in seqs})
        actual = read(target)
        shown = next((seq for seq, data in candidates.items() if data == actual), None)
        if shown is None:
            partial = [seq for seq, data in candidates.items() if actual is not None and is_prefix(actual, data)]
            problems.append(f"{target}: reads {describe(actual)}, neither its old content nor a saved "
                            f"version {seqs}" + (f" (a prefix of {partial})" if partial else ""))
            continue
        # renames acknowledged before an fsync that returned are durable
        durable = [seq for seq in seqs if seq in renamed and facts.fsync_followed(renamed[seq])]
        if durable and seqs.index(durable[-1]) > (seqs.index(shown) if shown >= 0 else -1):
            problems.append(f"{target}: reads version {shown}, but the rename of tmp{durable[-1]} "
                            "over it was acknowledged before an fsync returned")
        position = seqs.index(shown) if shown >= 0 else -1
        for seq in seqs:
            tmp_name = f"tmp{seq}"
            tmp = read(tmp_name)
            data = candidates[seq]
            fsynced = f"tmp{seq}" in facts.synced
            in_effect = seqs.index(seq) <= position
            if tmp is not None:
                if in_effect:
                    problems.append(f"{tmp_name}: present, but {target} shows its rename happened")
                elif not is_prefix(tmp, data, len(data) if fsynced else 0):
                    problems.append(f"{tmp_name}: reads {describe(tmp)}, not a "
                                    f"{'full copy' if fsynced else 'prefix'} of its {len(data)} bytes")
                else:
                    notes.append(f"rename of {tmp_name} over {target} undone")
            elif fsynced and not in_effect:
                problems.append(f"{tmp_name}: fsync'd, then lost: absent, and {target} reads "
                                f"version {shown}")
    for seq in range(len(spec["targets"])):  # a temporary file still being written
        if seq not in attempted and read(f"tmp{seq}") is not None:
            data = content(f"{spec['content_seed']}/{seq}", spec["sizes"][seq])
            synced = facts.synced.get(f"tmp{seq}", 0)
            if not is_prefix(read(f"tmp{seq}"), data, synced):
                problems.append(f"tmp{seq}: in flight, reads {describe(read(f'tmp{seq}'))}, not a "
                                f"prefix of its {len(data)} bytes covering {synced} fsync'd")


def _check_large(spec, facts, read, initial, problems) -> None:
    new = content(spec["content_seed"], spec["size"])
    synced = facts.synced.get(BIG, 0)
    actual = read(BIG)
    if actual is None:
        problems.append(f"{BIG}: absent")
    elif not ((synced == 0 and actual == initial[BIG]) or is_prefix(actual, new, synced)):
        problems.append(f"{BIG}: reads {describe(actual)}: neither its initial content nor a prefix "
                        f"of the new {len(new)} bytes covering the {synced} fsync'd "
                        f"({first_difference(actual, new)})")


def _check_deletes(spec, facts, read, initial, problems, notes) -> None:
    unlinked = {line[1]: int(line[3]) for line in facts.events("delete", "unlinked")}
    order = spec["names"]
    in_flight = order[len(unlinked)] if len(unlinked) < len(order) and not facts.done("delete") else None
    undone = []
    for name in order:
        actual = read(name)
        if actual is None:
            if name not in unlinked and name != in_flight:
                problems.append(f"{name}: absent, but never unlinked")
        elif actual != initial[name]:
            problems.append(f"{name}: reads {describe(actual)}, not its content")
        elif name in unlinked:
            if facts.fsync_followed(unlinked[name]):
                problems.append(f"{name}: present, but its unlink was acknowledged before an fsync returned")
            undone.append(name)
    if undone:
        notes.append(f"unlinks undone: {undone}")
