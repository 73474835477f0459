"""scripts/bench keeps working: one --quick run on the native directory and dfsfs.

It checks that the run succeeds and that the report has its documented shape; it asserts
nothing about speed (see docs/bench.md). Deselect it with `-k "not bench"`.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"
CONTENDERS = ["native", "dfsfs"]
SEQUENTIAL = ["seq_write", "seq_read_cold", "seq_read_warm"]
SMALL_FILES = ["small_create", "small_stat", "small_read", "small_delete"]
TREE = ["tree_extract", "tree_find", "tree_du", "tree_rm"]


def _can_mount_and_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/dev/fuse", os.R_OK | os.W_OK)


pytestmark = pytest.mark.skipif(
    not _can_mount_and_drop_caches(), reason="needs root and /dev/fuse (mounts, drops caches)"
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Run the benchmark once; (completed process, parsed JSON report)."""
    report_file = tmp_path_factory.mktemp("bench") / "bench.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--contenders", ",".join(CONTENDERS),
         "--json", str(report_file)],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stderr
    return result, json.loads(report_file.read_text())


def test_bench_report_has_every_section(quick_run):
    _, report = quick_run
    assert set(report) == {"config", "metrics", "samples", "summary", "ratios", "targets"}
    assert report["config"]["contenders"] == CONTENDERS
    assert report["config"]["reps"] == 1


def test_bench_samples_every_metric_for_every_contender(quick_run):
    _, report = quick_run
    expected = SEQUENTIAL + SMALL_FILES + TREE + (["fio_randread"] if shutil.which("fio") else [])
    for metric in expected:
        assert set(report["samples"][metric]) == set(CONTENDERS), metric
        for values in report["samples"][metric].values():
            assert len(values) == 1 and values[0] > 0, metric
    assert set(report["samples"]["peak_rss"]) == {"dfsfs"}  # native has no daemon
    assert set(report["samples"]) <= set(report["metrics"])


def test_bench_summary_and_ratios_follow_the_samples(quick_run):
    _, report = quick_run
    for metric, by_contender in report["samples"].items():
        for name, values in by_contender.items():
            summary = report["summary"][metric][name]
            assert summary["min"] <= summary["median"] <= summary["max"]
            assert summary["median"] == values[0]
    assert set(report["ratios"]["seq_write"]) == {"native"}


def test_bench_checks_the_issue_targets(quick_run):
    result, report = quick_run
    targets = {t["metric"]: t for t in report["targets"]}
    assert targets["peak_rss"]["value"] > 0
    assert targets["peak_rss"]["met"] in (True, False)
    assert targets["seq_write"]["met"] is None  # the pass-through baseline did not run
    assert "dfsfs/native" in result.stdout
