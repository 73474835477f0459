"""Mounting as mount(8), fstab, cron and systemd do: no PATH, options by name, and a
one-line message that names the cause and the fix for every failure a user can hit."""

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mounting import DFSFS, PASSWORD, Deployment, is_mount, run_cli

MOUNT_HELPER = str(Path(sys.executable).with_name("mount.dfsfs"))
SYSTEM_HELPER = Path("/sbin/mount.dfsfs")
CRON_PATH = "/usr/bin:/bin"
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def deployment(database_url, tmp_path_factory):
    deployment = Deployment(database_url, tmp_path_factory.mktemp("dep"))
    deployment.add_user("alice")
    return deployment


@pytest.fixture
def mountpoint(tmp_path):
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if is_mount(path):
        subprocess.run([DFSFS, "umount", str(path)], capture_output=True, check=False, timeout=60)
    if is_mount(path):
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True, check=False)


def empty_environment(deployment, **extra) -> dict:
    """What mount(8) gives a helper: the caller's variables without PATH."""
    env = {k: v for k, v in deployment.env.items() if k != "PATH" and k != "DFSFS_PASSWORD"}
    return {**env, **extra}


def mountinfo(path: Path) -> tuple[str, str, str]:
    """(type, source, options) of the mount at `path`."""
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        if fields[4] == str(path):
            after = fields[fields.index("-") + 1:]
            return after[0], after[1], fields[5]
    raise AssertionError(f"{path} is not mounted")


def one_line_error(result) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dfsfs: error: ")
    assert "Traceback" not in result.stderr and "fuse_session_new" not in result.stderr
    return lines[0]


def test_mount_helper_works_without_path(deployment, mountpoint, tmp_path):
    password = tmp_path / "pw"
    password.write_text(PASSWORD)
    password.chmod(0o600)
    options = f"password_file={password},noauto,_netdev,user,relatime,nosuid,nodev,uid=0"
    result = subprocess.run([MOUNT_HELPER, "dfsfs:alice", str(mountpoint), "-o", options],
                            env=empty_environment(deployment), capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    kind, source, flags = mountinfo(mountpoint)
    assert (kind, source) == ("fuse.dfsfs", "dfsfs:alice")
    assert {"nosuid", "nodev", "relatime"} <= set(flags.split(","))
    (mountpoint / "f").write_text("via mount.dfsfs")
    # and dfsfs umount works from cron's PATH (it runs fusermount3 by its absolute path)
    umount = subprocess.run([DFSFS, "umount", str(mountpoint)], capture_output=True, text=True,
                            env=dict(deployment.env, PATH=CRON_PATH), timeout=60, check=False)
    assert umount.returncode == 0, umount.stderr
    assert not is_mount(mountpoint)


def test_mount_8_with_an_fstab_line(deployment, mountpoint, tmp_path):
    """The real mount(8): it strips PATH, drops noauto and runs /sbin/mount.dfsfs."""
    if SYSTEM_HELPER.exists() and os.path.realpath(SYSTEM_HELPER) != MOUNT_HELPER:
        pytest.skip(f"{SYSTEM_HELPER} belongs to another installation")
    password = tmp_path / "pw"
    password.write_text(PASSWORD)
    password.chmod(0o600)
    fstab = tmp_path / "fstab"
    fstab.write_text(f"alice {mountpoint} dfsfs noauto,_netdev,x-systemd.automount,ro,"
                     f"password_file={password} 0 0\n")
    installed = not SYSTEM_HELPER.exists()
    if installed:
        SYSTEM_HELPER.symlink_to(MOUNT_HELPER)
    try:
        result = subprocess.run(["/bin/mount", "-T", str(fstab), str(mountpoint)],
                                env=empty_environment(deployment), capture_output=True, text=True,
                                timeout=60, check=False)
    finally:
        if installed:
            SYSTEM_HELPER.unlink()
    assert result.returncode == 0, result.stderr
    kind, source, flags = mountinfo(mountpoint)
    assert (kind, source) == ("fuse.dfsfs", "dfsfs:alice")
    assert "ro" in flags.split(",")
    with pytest.raises(OSError) as refused:
        (mountpoint / "f").write_text("read-only")
    assert refused.value.errno == errno.EROFS


def test_unknown_option_is_refused_by_name(deployment, mountpoint):
    result = run_cli(["mount", mountpoint, "--user", "alice", "-o", "allow_other,bogus"],
                     deployment.env, check=False)
    assert "unknown mount option 'bogus': remove it" in one_line_error(result)
    assert not is_mount(mountpoint)


def test_mounting_twice_names_the_mount_and_the_fix(deployment, mountpoint):
    run_cli(["mount", mountpoint, "--user", "alice"], deployment.env)
    again = run_cli(["mount", mountpoint, "--user", "alice"], deployment.env, check=False)
    message = one_line_error(again)
    assert f"{mountpoint} is already mounted (dfsfs:alice)" in message
    assert f"`dfsfs umount {mountpoint}`" in message


def test_a_busy_mount_point_names_the_fix(deployment, mountpoint):
    run_cli(["mount", mountpoint, "--user", "alice"], deployment.env)
    holder = subprocess.Popen(["sleep", "60"], cwd=mountpoint)
    try:
        busy = run_cli(["umount", mountpoint], deployment.env, check=False)
        assert f"{mountpoint} is busy: a process still uses it (see `fuser -vm {mountpoint}`)" \
            in one_line_error(busy)
    finally:
        holder.kill()
        holder.wait()
    run_cli(["umount", mountpoint], deployment.env)


def test_a_non_empty_mount_point_names_the_fix(deployment, mountpoint):
    (mountpoint / "file").write_text("x")
    result = run_cli(["mount", mountpoint, "--user", "alice"], deployment.env, check=False)
    assert "not empty: choose an empty directory (or add -o nonempty" in one_line_error(result)


def test_an_unreachable_database_names_the_server(deployment, mountpoint):
    env = dict(deployment.env, DFSFS_DATABASE_URL="postgresql://dfsfs:pw@127.0.0.1:9/dfsfs")
    result = run_cli(["mount", mountpoint, "--user", "alice"], env, check=False)
    message = one_line_error(result)
    assert "127.0.0.1" in message and ":pw@" not in message


@pytest.mark.skipif(os.geteuid() != 0, reason="the embedded server runs as postgres under root")
def test_the_embedded_server_starts_from_cron(tmp_path_factory):
    """Root's embedded PostgreSQL is run through runuser, which is in /usr/sbin: not on
    cron's PATH (the daemon died with FileNotFoundError: 'runuser')."""
    from dfsfs.embedded import PostgresServer

    data_dir = Path(tempfile.mkdtemp(prefix="dfsfs-cron-", dir="/tmp"))
    data_dir.chmod(0o755)
    env = {"PATH": CRON_PATH, "HOME": "/root", "DFSFS_DATA_DIR": str(data_dir),
           "DFSFS_ARGON2_PROFILE": "test", "LANG": "C.UTF-8"}
    try:
        result = subprocess.run([DFSFS, "init"], env=env, capture_output=True, text=True,
                                timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        assert "runuser" not in result.stderr
    finally:
        PostgresServer(data_dir / "postgres").stop(mode="immediate")
        shutil.rmtree(data_dir, ignore_errors=True)
