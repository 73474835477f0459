"""The install/test scripts, CI entry point and compose file are well-formed."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["scripts/install", "scripts/test", "scripts/quickstart", ".ci/run"]


def docker_compose_works() -> bool:
    if shutil.which("docker") is None:
        return False
    result = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, timeout=30, check=False
    )
    return result.returncode == 0


def test_ci_runs_the_readme_test_command():
    lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert "exec scripts/test \"$@\"" in lines
    assert "scripts/test" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_executable_bash(script):
    path = ROOT / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_compose_file_is_valid():
    if not docker_compose_works():
        pytest.skip("`docker compose` is not available on this machine")
    result = subprocess.run(
        ["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
