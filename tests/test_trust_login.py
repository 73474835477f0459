"""Throttling is the server's (issue 12): 20 wrong passwords sent by raw calls of the
login function (no argon2, no dfsfs code) meet exactly the locks that 20 wrong passwords
through the CLI meet; the right password works once the lock has run out."""

import math
import os
import uuid

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from dfsfs import auth
from dfsfs.cli import main
from dfsfs.config import ENVIRONMENT
from dfsfs.meta.accounts import AccountStore
from dfsfs.meta.db import create_engine

PASSWORD = "the-right-one"
ATTEMPTS = 20


@pytest.fixture(scope="module")
def client(client_url):
    engine = create_engine(client_url, pool_size=1)
    yield engine
    engine.dispose()


def new_account(admin_engine) -> str:
    name = "t" + uuid.uuid4().hex[:10]
    AccountStore(admin_engine).create_user(name, auth.make_verifier(PASSWORD))
    return name


def raw_attempt(client, name: str) -> str:
    """A guess as a client that skips dfsfs's code would send it: a real nonce, a made-up
    proof, no key derivation."""
    with client.begin() as conn:
        nonce = conn.execute(sa.text("SELECT nonce FROM dfsfs_login_challenge(:n)"), {"n": name}).scalar()
    with client.begin() as conn:
        row = conn.execute(sa.text("SELECT outcome, retry_after_s FROM dfsfs_login(:n, :nonce, :proof,"
                                   " 'command', 'x', 0, false, 60)"),
                           {"n": name, "nonce": nonce, "proof": os.urandom(32)}).one()
    return "failed" if row.outcome == "failed" else f"{row.outcome} {row.retry_after_s}"


def cli_attempt(client_url: str, name: str, password_file: str) -> str:
    """A guess through `dfsfs stats`, as a person would make it."""
    environment = {variable: None for variable in [*ENVIRONMENT.values(), "DFSFS_PASSWORD"]}
    environment["DFSFS_DATABASE_URL"] = client_url
    result = CliRunner().invoke(main, ["stats", "--user", name, "--password-file", password_file],
                                env=environment)
    assert result.exit_code == 1, result.output
    if auth.LOGIN_FAILED in result.stderr:
        return "failed"
    retry = result.stderr.split("try again in ")[1].split(" s")[0]
    return f"throttled {retry}"


def lock_state(admin_engine, name: str) -> tuple[int, int]:
    """(failures counted, seconds locked from now, rounded up)."""
    with admin_engine.connect() as conn:
        failures, locked = conn.execute(sa.text(
            "SELECT failed_logins, extract(epoch FROM throttled_until - clock_timestamp())"
            " FROM users WHERE name = :n"), {"n": name}).one()
    return failures, 0 if locked is None or locked <= 0 else math.ceil(locked)


def expire_lock(admin_engine, name: str) -> None:
    """What waiting it out does (the server's clock is not the test's to move)."""
    with admin_engine.begin() as conn:
        conn.execute(sa.text("UPDATE users SET throttled_until = now() - interval '1 ms'"
                             " WHERE name = :n AND throttled_until IS NOT NULL"), {"n": name})


def lengthen_lock(admin_engine, name: str) -> None:
    """Keep a lock from running out during the rest of a run (a CLI attempt takes longer
    than a raw one: both must meet the lock, not the machine's speed)."""
    with admin_engine.begin() as conn:
        conn.execute(sa.text("UPDATE users SET throttled_until = now() + interval '60 s'"
                             " WHERE name = :n AND throttled_until > now()"), {"n": name})


def run(attempt, admin_engine, name: str, wait_out_locks: bool) -> list[tuple]:
    trace = []
    for _ in range(ATTEMPTS):
        outcome = attempt(name)
        state = lock_state(admin_engine, name)
        trace.append((outcome, *state))
        if wait_out_locks:
            expire_lock(admin_engine, name)
        elif state[1]:
            lengthen_lock(admin_engine, name)
    return trace


@pytest.mark.parametrize("wait_out_locks", [False, True], ids=["in-a-row", "each-lock-waited-out"])
def test_raw_calls_are_throttled_exactly_as_the_cli(client, client_url, admin_engine, tmp_path,
                                                    wait_out_locks):
    wrong = tmp_path / "wrong"
    wrong.write_text("a wrong guess")
    wrong.chmod(0o600)
    raw_name, cli_name = new_account(admin_engine), new_account(admin_engine)
    raw = run(lambda name: raw_attempt(client, name), admin_engine, raw_name, wait_out_locks)
    cli = run(lambda name: cli_attempt(client_url, name, str(wrong)), admin_engine, cli_name,
              wait_out_locks)
    # Seconds may differ by the one that passes between an attempt and the reading of its lock.
    normalise = lambda trace: [(o.split()[0], f, lock if wait_out_locks else bool(lock))  # noqa: E731
                               for o, f, lock in trace]
    assert normalise(raw) == normalise(cli), (raw, cli)
    if wait_out_locks:
        # every guess was checked and failed, each lock as the schedule says
        assert [f for _, f, _ in raw] == list(range(1, ATTEMPTS + 1))
        for (_, failures, locked) in raw:
            assert locked in (auth.throttle_delay_s(failures), auth.throttle_delay_s(failures) - 1)
        assert raw[-1][2] <= auth.MAX_DELAY_S
    else:
        # three guesses, then nothing is checked while the first lock (1 s) lasts
        assert [o for o, _, _ in raw][:auth.FREE_FAILURES] == ["failed"] * auth.FREE_FAILURES
        assert all(o.startswith("throttled") for o, _, _ in raw[auth.FREE_FAILURES:]), raw
        assert {f for _, f, _ in raw[auth.FREE_FAILURES:]} == {auth.FREE_FAILURES}
    # the right password: refused while locked, accepted once the lock has run out
    if lock_state(admin_engine, raw_name)[1]:
        with pytest.raises(auth.ThrottledError):
            auth.login(client, raw_name, PASSWORD)
    expire_lock(admin_engine, raw_name)
    expire_lock(admin_engine, cli_name)
    assert auth.login(client, raw_name, PASSWORD).name == raw_name
    assert auth.login(client, cli_name, PASSWORD).name == cli_name
    assert lock_state(admin_engine, raw_name) == (0, 0)

