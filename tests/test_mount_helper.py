import sys

from dfsfs.mount_helper import build_command


def test_fstab_options_become_dfsfs_flags_and_fuse_options():
    command = build_command([
        "alice", "/home/alice/dfs", "-o",
        "rw,noauto,_netdev,x-systemd.automount,password_file=/etc/dfsfs/alice.pw,"
        "config=/etc/dfsfs/config.toml,allow_other",
    ])
    assert command == [
        sys.executable, "-m", "dfsfs", "--config", "/etc/dfsfs/config.toml",
        "mount", "/home/alice/dfs", "--user", "alice",
        "--password-file", "/etc/dfsfs/alice.pw", "-o", "allow_other",
    ]


def test_flags_mount_passes_are_ignored():
    command = build_command(["-s", "bob", "/mnt/b", "-n", "-oro"])
    assert command[-5:] == ["/mnt/b", "--user", "bob", "-o", "ro"]
