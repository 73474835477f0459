"""A mount's login session (issue 12), through real mounts: it is kept alive by the
daemon's heartbeat, listed by `dfsfs user sessions`, ended by the unmount; revoking it
makes the daemon unmount cleanly with a message in its log; a killed daemon's session
expires; the daemon holds no password in its environment or command line."""

import errno
import os
import time
from pathlib import Path

import pytest

from faults import errno_for, teardown, user_id
from mounting import PASSWORD, Deployment, _alive, is_mount
from test_trust import owner_rows

HEARTBEAT_S = 1
EXPIRY_S = 10  # the server's shortest


@pytest.fixture(scope="module")
def deployment(database_url, tmp_path_factory):
    return Deployment(database_url, tmp_path_factory.mktemp("sessions"), chunk_size="64K",
                      extra_env={"DFSFS_SESSION_HEARTBEAT": str(HEARTBEAT_S),
                                 "DFSFS_SESSION_EXPIRY": str(EXPIRY_S)})


def sessions(admin_engine, name: str) -> list[tuple]:
    return owner_rows(admin_engine, """
        SELECT s.id, s.purpose, s.started_at, s.heartbeat_at, s.expires_at, s.ended_at, s.end_reason
          FROM sessions s JOIN users a ON a.id = s.user_id
         WHERE a.name = :n AND s.purpose = 'mount' ORDER BY s.id""", n=name)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_heartbeats_keep_a_mount_alive_and_unmounting_ends_it(deployment, admin_engine):
    with deployment.mount("hearty") as mnt:
        (mnt.path / "f").write_bytes(b"x")
        (session,) = sessions(admin_engine, "hearty")
        wait_for(lambda: (sessions(admin_engine, "hearty")[0][3] - session[2]).total_seconds() > 1.5,
                 10, "a heartbeat")
        listed = deployment.run("user", "sessions", "hearty").stdout.splitlines()
        (line,) = [line for line in listed if line.split()[0] == str(session[0])]
        assert line.split()[1:3] == ["live", "mount"], listed
        environ = Path(f"/proc/{mnt.pid}/environ").read_bytes()
        cmdline = Path(f"/proc/{mnt.pid}/cmdline").read_bytes()
        assert PASSWORD.encode() not in environ and PASSWORD.encode() not in cmdline
        assert b"DFSFS_DATA_DIR" in environ  # (it is the daemon's environment we looked at)
    (session,) = sessions(admin_engine, "hearty")
    assert session[6] == "unmounted"


def test_revoking_the_session_unmounts_cleanly(deployment, admin_engine):
    mnt = deployment.mount("revoked")
    try:
        (mnt.path / "kept").write_bytes(b"written before the revocation")
        result = deployment.run("user", "sessions", "revoked", "--revoke", "all")
        assert result.stdout == "revoked 1 session(s) of revoked\n"
        wait_for(lambda: not is_mount(mnt.path), 10, "the daemon unmounts")
        wait_for(lambda: not _alive(mnt.pid), 10, "the daemon exits")
        log = mnt.new_log()
        assert "the login session has ended" in log and "unmounting" in log, log
        assert "Traceback" not in log, log
    finally:
        teardown(mnt)
    with deployment.mount("revoked") as again:  # a new login: a new session
        assert (again.path / "kept").read_bytes() == b"written before the revocation"


def test_a_statement_under_a_revoked_session_unmounts_at_once(deployment, admin_engine, tmp_path):
    slow = Deployment(deployment.env["DFSFS_DATABASE_URL"], tmp_path, chunk_size=None,
                      extra_env={"DFSFS_SESSION_HEARTBEAT": "120", "DFSFS_SESSION_EXPIRY": "600"})
    mnt = slow.mount("statement")
    try:
        slow.run("user", "sessions", "statement", "--revoke", "all")
        code = errno_for(os.listdir, mnt.path / "no-such-directory")
        assert code in (errno.EIO, errno.ENOENT, errno.ENOTCONN), code
        wait_for(lambda: not is_mount(mnt.path), 10, "the daemon unmounts (long before its heartbeat)")
        assert "the login session has ended" in mnt.new_log()
    finally:
        teardown(mnt)


def test_a_killed_daemons_session_expires(deployment, admin_engine):
    mnt = deployment.mount("killed")
    try:
        os.kill(mnt.pid, 9)
        wait_for(lambda: not _alive(mnt.pid), 10, "the daemon dies")
    finally:
        teardown(mnt)
    (session,) = sessions(admin_engine, "killed")
    assert session[5] is None  # nobody ended it ...
    time.sleep(max(0.0, (session[4] - owner_rows(admin_engine, "SELECT now()")[0][0]).total_seconds()) + 0.5)
    listed = deployment.run("user", "sessions", "killed", "--json").stdout
    assert '"end_reason": "expired"' in listed and '"live": false' in listed, listed
    # ... and its token no longer opens anything.
    account = user_id(deployment.env["DFSFS_DATABASE_URL"], "killed")
    assert owner_rows(admin_engine, "SELECT count(*) FROM sessions WHERE user_id = :a AND"
                      " ended_at IS NULL AND expires_at > now()", a=account) == [(0,)]
