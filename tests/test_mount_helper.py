"""mount.dfsfs turns what mount(8) passes into a `dfsfs mount` command, and `dfsfs mount -o`
checks every option (tests/test_deploy_mount.py mounts for real)."""

import sys

import pytest

from dfsfs.cli import CommandError
from dfsfs.cli_mount import parse_mount_options
from dfsfs.mount_helper import build_command
from dfsfs.programs import SANE_PATH, ensure_sane_path


def test_fstab_options_become_dfsfs_flags_and_mount_options():
    environ = {}
    command = build_command([
        "dfsfs:alice", "/home/alice/dfs", "-o",
        "rw,noauto,_netdev,x-systemd.automount,password_file=/etc/dfsfs/alice.pw,"
        "config=/etc/dfsfs/config.toml,database_url=postgresql://u:pw@db/dfsfs,allow_other,"
        "user,users,nofail,comment=x,uid=1000",
    ], environ)
    assert command == [
        sys.executable, "-m", "dfsfs", "--config", "/etc/dfsfs/config.toml",
        "mount", "/home/alice/dfs", "--user", "alice",
        "--password-file", "/etc/dfsfs/alice.pw", "-o", "rw,allow_other,uid=1000",
    ]
    # a database password never reaches argv (ps shows it for the daemon's life)
    assert environ == {"DFSFS_DATABASE_URL": "postgresql://u:pw@db/dfsfs"}


def test_flags_mount_passes_are_ignored():
    command = build_command(["-s", "bob", "/mnt/b", "-n", "-oro"])
    assert command[-5:] == ["/mnt/b", "--user", "bob", "-o", "ro"]


def test_a_missing_mount_point_is_a_usage_error():
    with pytest.raises(SystemExit, match="usage: mount.dfsfs"):
        build_command(["alice"])


@pytest.mark.parametrize("given", ["", "/usr/bin:/bin", "/opt/x"])
def test_entry_points_complete_an_empty_or_cron_path(given):
    environ = {"PATH": given} if given else {}
    ensure_sane_path(environ)
    directories = environ["PATH"].split(":")
    assert directories[: len(given.split(":")) if given else 0] == (given.split(":") if given else [])
    assert set(SANE_PATH) <= set(directories)
    assert len(directories) == len(set(directories))


# ---- dfsfs mount -o ------------------------------------------------------------------------


def test_options_that_change_behaviour_become_mount_request_fields():
    parsed = parse_mount_options(["uid=1000,gid=root,umask=027,commit=5", "sync,relatime,ro"])
    assert parsed.request == {"owner_uid": 1000, "owner_gid": 0, "umask": 0o027,
                              "commit_interval_s": 5.0, "sync": True, "atime": "relatime",
                              "read_only": True}
    assert parsed.kernel == ("ro",)
    assert parse_mount_options(["uid=root"]).request == {"owner_uid": 0}
    assert parse_mount_options(["commit=0"]).request == {"commit_interval_s": None}  # default
    assert parse_mount_options(["strictatime"]).request == {"atime": "strictatime"}
    assert parse_mount_options(["noatime,atime"]).request == {"atime": "relatime"}
    assert parse_mount_options(["sync,async"]).request == {"sync": False}


def test_kernel_and_mount8_options_are_accepted():
    parsed = parse_mount_options(["allow_other,nosuid,nodev,noexec,rw,default_permissions",
                                  "user,users,noauto,auto,_netdev,nofail,defaults,owner,group",
                                  "x-systemd.automount,x-systemd.idle-timeout=60,comment=x",
                                  "nonempty"])
    assert parsed.kernel == ("allow_other", "nosuid", "nodev", "noexec", "rw",
                             "default_permissions")
    assert parsed.nonempty
    assert parse_mount_options(["allow_root"]).kernel == ("allow_root",)


@pytest.mark.parametrize(("options", "message"), [
    ("bogus", "unknown mount option 'bogus': remove it"),
    ("rw,max_readahead=1", "unknown mount option 'max_readahead'"),
    ("uid=nosuchuser", "uid=nosuchuser: no such user"),
    ("gid=4294967295", "gid=4294967295: out of range"),
    ("umask=999", "umask=999: give octal permission bits"),
    ("umask=-1", "umask=-1: give octal"),
    ("commit=soon", "commit=soon: give the commit interval in seconds"),
    ("commit=301", "commit=301"),
    ("uid", "mount option 'uid' needs a value (uid=…)"),
    ("ro=1", "mount option 'ro' takes no value"),
    ("fsname=x", "'fsname' is set by dfsfs itself"),
    ("allow_other,allow_root", "'allow_other' and 'allow_root' exclude each other"),
    ("A" * 60, "unknown mount option 'AAAA…'"),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(CommandError) as refused:
        parse_mount_options([options])
    assert message in refused.value.format_message()
    assert "\n" not in refused.value.format_message()

