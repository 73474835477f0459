"""The systemd units dfsfs ships: they pass `systemd-analyze verify`, and the commands they
run do what the units expect, run here exactly as systemd would run them (specifiers and
environment expanded), without systemd."""

import configparser
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from mounting import DFSFS, PASSWORD, Deployment, is_mount, run_cli
from dfsfs.cli_server import rendered_units

pytestmark = pytest.mark.timeout(180)
BIN_DIR = str(Path(DFSFS).parent)


def unit(kind: str, name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    parser.read_string(rendered_units(BIN_DIR)[kind][name])
    return parser


def command_of(line: str, specifiers: dict[str, str], environment: dict[str, str]) -> list[str]:
    """A unit's Exec line as systemd runs it: %x specifiers, then ${VAR} (one word) and
    $VAR (split into words)."""
    for specifier, value in specifiers.items():
        line = line.replace(f"%{specifier}", value)
    words = []
    for word in shlex.split(line):
        plain = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if plain:
            words += environment.get(plain[1], "").split()
        else:
            words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                                lambda m: environment.get(m[1], ""), word))
    return words


@pytest.mark.parametrize(("kind", "name"), [(kind, name) for kind, units in
                         rendered_units(BIN_DIR).items() for name in units])
def test_units_pass_systemd_analyze_verify(kind, name, tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    path = tmp_path / name
    path.write_text(rendered_units(BIN_DIR)[kind][name])
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    command = ["systemd-analyze", *(["--user"] if kind == "user" else []), "verify", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False,
                            env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime)))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_install_units_puts_them_in_place(tmp_path):
    result = subprocess.run([DFSFS, "install-units", "--system-dir", str(tmp_path / "system"),
                             "--user-dir", str(tmp_path / "user")],
                            capture_output=True, text=True, timeout=60, check=True)
    assert sorted(p.name for p in (tmp_path / "system").iterdir()) == [
        "dfsfs-mount@.service", "dfsfs-postgres.service"]
    assert [p.name for p in (tmp_path / "user").iterdir()] == ["dfsfs-mount@.service"]
    installed = (tmp_path / "system" / "dfsfs-postgres.service").read_text()
    assert f"ExecStart={BIN_DIR}/dfsfs server run" in installed
    assert "systemctl daemon-reload" in result.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="a system unit runs as root")
def test_postgres_unit_runs_and_stops_the_embedded_server():
    service = unit("system", "dfsfs-postgres.service")["Service"]
    data_dir = Path(tempfile.mkdtemp(prefix="dfsfs-unit-", dir="/tmp"))
    data_dir.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "DFSFS_DATA_DIR": str(data_dir), "LANG": "C.UTF-8"}
    status = command_of(service["ExecReload"], {}, env)
    server = subprocess.Popen(command_of(service["ExecStart"], {}, env), env=env,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while subprocess.run(status, env=env, capture_output=True).returncode != 0:
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        # started twice (by hand beside the unit): no second server, no error
        again = subprocess.run([DFSFS, "server", "start"], env=env, capture_output=True,
                               text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        server.send_signal(signal.SIGTERM)  # systemctl stop
        assert server.wait(60) == 0, server.stderr.read()
        stopped = subprocess.run(status, env=env, capture_output=True, text=True)
        assert stopped.returncode == 3
        assert "start it with `dfsfs server start`" in stopped.stdout
    finally:
        if server.poll() is None:
            server.kill()
        subprocess.run([DFSFS, "server", "stop"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(data_dir, ignore_errors=True)


def test_server_commands_refuse_an_external_database(database_url):
    result = subprocess.run([DFSFS, "server", "status"], capture_output=True, text=True,
                            env=dict(os.environ, DFSFS_DATABASE_URL=database_url), timeout=60)
    assert result.returncode == 1
    assert "`dfsfs server` runs only the embedded one" in result.stderr


@pytest.fixture(scope="module")
def deployment(database_url, tmp_path_factory):
    deployment = Deployment(database_url, tmp_path_factory.mktemp("units"))
    deployment.add_user("alice")
    return deployment


def daemon_pid(deployment, mountpoint: Path) -> int:
    from dfsfs.cli_mount import pid_file
    from dfsfs.config import load_settings

    settings = load_settings(environ=deployment.env)
    return int(pid_file(settings, str(mountpoint)).read_text())


def stop_like_systemd(pid: int, mountpoint: Path) -> None:
    """systemctl stop of a Type=forking unit: SIGTERM to the main process, then wait."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while is_mount(mountpoint) or Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "the daemon did not unmount on SIGTERM"
        time.sleep(0.05)


def test_system_mount_unit_mounts_and_stops_on_sigterm(deployment, tmp_path):
    service = unit("system", "dfsfs-mount@.service")["Service"]
    mountpoint = tmp_path / "alice"
    mountpoint.mkdir()
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "password").write_text(PASSWORD)  # what LoadCredential= hands over:
    (credentials / "password").chmod(0o400)  # readable by the service's user only
    # /etc/dfsfs/mount-alice.env
    env = {k: v for k, v in deployment.env.items() if k != "DFSFS_PASSWORD"}
    env.update(PATH="/usr/bin:/bin", CREDENTIALS_DIRECTORY=str(credentials),
               DFSFS_MOUNTPOINT=str(mountpoint), DFSFS_MOUNT_OPTIONS="-o allow_other,commit=2")
    start = command_of(service["ExecStart"], {"i": "alice"}, env)
    started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=60)
    try:
        assert started.returncode == 0, started.stderr
        assert is_mount(mountpoint)
        (mountpoint / "f").write_text("from a unit")
        # the unit started again while mounted: one line naming the mount and the fix
        twice = subprocess.run(start, env=env, capture_output=True, text=True, timeout=60)
        assert twice.returncode == 1
        assert twice.stderr.strip().splitlines() == [
            f"dfsfs: error: {mountpoint} is already mounted (dfsfs:alice): use it as it is, or "
            f"run `dfsfs umount {mountpoint}` first"]
        stop_like_systemd(daemon_pid(deployment, mountpoint), mountpoint)
    finally:
        if is_mount(mountpoint):
            run_cli(["umount", mountpoint], deployment.env, check=False)
    remounted = subprocess.run(start, env=env, capture_output=True, text=True, timeout=60)
    assert remounted.returncode == 0, remounted.stderr
    try:
        assert (mountpoint / "f").read_text() == "from a unit"
    finally:
        run_cli(["umount", mountpoint], deployment.env)


def test_user_mount_unit_mounts_dfs_in_the_home(deployment, tmp_path):
    service = unit("user", "dfsfs-mount@.service")["Service"]
    home = tmp_path / "home"
    config = home / ".config"
    (config / "dfsfs").mkdir(parents=True)
    password = config / "dfsfs" / "password"
    password.write_text(PASSWORD + "\n")
    password.chmod(0o600)
    specifiers = {"h": str(home), "I": "dfs", "i": "dfs", "E": str(config)}
    env = {k: v for k, v in deployment.env.items() if k != "DFSFS_PASSWORD"}
    env.update(HOME=str(home), USER="alice", LOGNAME="alice", PATH="/usr/bin:/bin")
    for line in (service["ExecStartPre"], service["ExecStart"]):
        # `dfsfs mount` without --user mounts the account of the login name (LOGNAME)
        result = subprocess.run(command_of(line, specifiers, env), env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    mountpoint = home / "dfs"
    try:
        assert is_mount(mountpoint)
        (mountpoint / "hello").write_text("hi")
    finally:
        stop_like_systemd(daemon_pid(deployment, mountpoint), mountpoint)
