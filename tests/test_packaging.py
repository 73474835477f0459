"""The install/test scripts, CI entry point and compose file are well-formed."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["scripts/install", "scripts/test", "scripts/quickstart", ".ci/run"]


def docker_compose() -> list[str] | None:
    """`docker compose` (the plugin) or `docker-compose` (Debian's), whichever works."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        result = subprocess.run([*command, "version"], capture_output=True, timeout=30,
                                check=False)
        if result.returncode == 0:
            return command
    return None


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
    compose = docker_compose()
    if compose is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is available on this machine")
    command = [*compose, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"]
    env = {**os.environ, "DFSFS_ADMIN": "alice"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False,
                            env=env)
    assert result.returncode == 0, result.stderr
    # without the administrator's name it refuses, naming the variable (no inline default)
    env.pop("DFSFS_ADMIN")
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False,
                            env=env, cwd="/")
    assert result.returncode != 0 and "DFSFS_ADMIN" in result.stderr


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_servers_are_healthchecked_and_keep_their_data(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "seaweedfs", "init"}
    for name in ("postgres", "seaweedfs"):
        assert services[name]["healthcheck"]["test"], name
        assert services[name]["restart"] == "unless-stopped"
        named = [volume.split(":")[0] for volume in services[name]["volumes"]]
        assert named and all(volume in compose["volumes"] for volume in named), name
    assert "-s3" in services["seaweedfs"]["command"]


def test_compose_secrets_come_from_files_only(compose):
    assert all(set(secret) == {"file"} for secret in compose["secrets"].values())
    text = (ROOT / "docker-compose.yml").read_text()
    assert "POSTGRES_PASSWORD:" not in text and ":-" not in text  # no inline defaults
    for name, service in compose["services"].items():
        for variable, value in (service.get("environment") or {}).items():
            assert not any(word in variable for word in ("PASSWORD", "SECRET", "KEY")) or \
                variable.endswith("_FILE"), (name, variable)
            assert "secret_key" not in str(value) and "access_key" not in str(value)


def test_compose_init_waits_for_healthy_servers_and_makes_the_first_admin(compose):
    init = compose["services"]["init"]
    assert init["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                  "seaweedfs": {"condition": "service_healthy"}}
    script = init["entrypoint"][-1]
    assert "dfsfs init" in script
    assert "dfsfs user add \"$$DFSFS_ADMIN\" --admin --password-file /run/secrets/" in script
    for variable in ("DFSFS_STORE", "DFSFS_BACKUP"):
        assert "credentials=/run/secrets/s3_credentials" in init["environment"][variable]
    assert init["environment"]["DFSFS_STORE"] != init["environment"]["DFSFS_BACKUP"]
