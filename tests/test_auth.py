"""Login on the server (migration 7) from the client side: verifiers, proofs, throttling,
sessions, name rules; against a real PostgreSQL, as the client role."""

import hashlib
import hmac
import logging
import statistics
import time
import uuid

import pytest
import sqlalchemy as sa

from dfsfs import auth
from dfsfs.auth import (
    LOGIN_FAILED,
    ThrottledError,
    client_proof,
    derive_key,
    login,
    make_verifier,
    throttle_delay_s,
    validate_password,
    validate_user_name,
)
from dfsfs.errors import AuthError, InvalidArgumentError, PermissionDeniedError
from dfsfs.meta.accounts import AccountStore
from dfsfs.meta.db import SessionEndedError, create_engine, run_transaction
from dfsfs.session import heartbeat, logout, session_engine

PASSWORD = "correct horse battery staple"
COSTLY = {"time_cost": 2, "memory_cost": 16 * 1024, "parallelism": 1}


@pytest.fixture
def accounts(admin_engine) -> AccountStore:
    """Account management with the owner's credentials."""
    return AccountStore(admin_engine)


@pytest.fixture(scope="module")
def client(client_url):
    """The client role without a session: it can log in and nothing else."""
    engine = create_engine(client_url, pool_size=2)
    yield engine
    engine.dispose()


def new_name() -> str:
    return "u" + uuid.uuid4().hex[:12]


def add_user(accounts: AccountStore, password: str = PASSWORD, profile=None, admin=False) -> str:
    name = new_name()
    accounts.create_user(name, make_verifier(password, profile), is_admin=admin)
    return name


def expire_lock(admin_engine, name: str) -> None:
    """What waiting out the lock does (the server's clock is not the test's to move)."""
    with admin_engine.begin() as conn:
        conn.execute(sa.text("UPDATE users SET throttled_until = now() - interval '1 ms'"
                             " WHERE name = :name AND throttled_until IS NOT NULL"), {"name": name})


def test_verifiers_are_argon2id_with_test_parameters_and_fresh_salts():
    first, second = make_verifier(PASSWORD), make_verifier(PASSWORD)
    assert first.parameters.kdf == "argon2id"
    assert (first.parameters.time_cost, first.parameters.memory_cost) == (1, 8)
    assert first.parameters.salt != second.parameters.salt
    assert first.stored_key != second.stored_key
    assert "stored_key" not in repr(first)


def test_hmac_on_the_server_is_rfc_2104(admin_engine):
    for key, message in ((b"k" * 10, b"m"), (b"k" * 64, b""), (b"x" * 100, b"long " * 50)):
        with admin_engine.connect() as conn:
            ours = conn.execute(sa.text("SELECT dfsfs_hmac(:k, :m)"), {"k": key, "m": message}).scalar()
        assert bytes(ours) == hmac.digest(key, message, "sha256")


def test_the_throttling_schedule_is_the_servers(admin_engine):
    with admin_engine.connect() as conn:
        server = [conn.execute(sa.text("SELECT dfsfs_login_delay(:n)"), {"n": n}).scalar()
                  for n in range(0, 30)]
    assert server == [throttle_delay_s(n) for n in range(0, 30)]
    assert [throttle_delay_s(n) for n in range(1, 8)] == [0, 0, 1, 2, 4, 8, 16]
    assert throttle_delay_s(12) == throttle_delay_s(10**6) == auth.MAX_DELAY_S


def test_login_opens_a_session_of_the_account(accounts, client, client_url):
    name = add_user(accounts)
    result = login(client, name, PASSWORD, purpose="mount")
    account = accounts.get_user(name)
    assert (result.account, result.root_ino, result.is_admin) == (account.id, account.root_ino, False)
    assert "token" not in repr(result) and result.token not in repr(result)
    engine = session_engine(client_url, result, pool_size=1)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT dfsfs_current_account()")).scalar() == account.id
            assert conn.execute(sa.text("SELECT dfsfs_current_session()")).scalar() == result.session_id
            assert conn.execute(sa.text("SELECT id FROM users")).scalars().all() == [account.id]
        (session,) = accounts.sessions(name)
        assert (session.id, session.purpose, session.live) == (result.session_id, "mount", True)
    finally:
        engine.dispose()


def test_wrong_password_and_unknown_user_fail_alike(accounts, client):
    name = add_user(accounts)
    with pytest.raises(AuthError) as wrong:
        login(client, name, "not the password")
    with pytest.raises(AuthError) as unknown:
        login(client, new_name(), PASSWORD)
    assert type(wrong.value) is type(unknown.value) is AuthError
    assert str(wrong.value) == str(unknown.value) == LOGIN_FAILED


def test_unknown_names_get_a_stable_salt_and_the_accounts_parameters(accounts, client):
    add_user(accounts)  # the newest verifier: its parameters answer for unknown names
    known = add_user(accounts)
    unknown = new_name()

    def challenge(name):
        with client.connect() as conn:
            return conn.execute(sa.text("SELECT * FROM dfsfs_login_challenge(:n)"), {"n": name}).one()

    first, again, real = challenge(unknown), challenge(unknown), challenge(known)
    assert first.salt == again.salt and first.nonce != again.nonce
    assert len(first.salt) == len(real.salt) == auth.SALT_BYTES
    assert (first.kdf, first.time_cost, first.memory_cost, first.parallelism, first.key_length) == (
        real.kdf, real.time_cost, real.memory_cost, real.parallelism, real.key_length)


def test_failed_logins_are_throttled_with_a_growing_delay(accounts, client, admin_engine):
    name = add_user(accounts)
    for _ in range(auth.FREE_FAILURES):
        with pytest.raises(AuthError, match=LOGIN_FAILED):
            login(client, name, "wrong")
    # Locked now: even the right password is refused without being checked.
    with pytest.raises(ThrottledError, match="too many failed attempts, try again in 1 s"):
        login(client, name, PASSWORD)
    assert accounts.get_user(name).failed_logins == auth.FREE_FAILURES

    expire_lock(admin_engine, name)
    with pytest.raises(AuthError, match=LOGIN_FAILED):
        login(client, name, "wrong again")
    with pytest.raises(ThrottledError) as throttled:
        login(client, name, PASSWORD)
    assert throttled.value.retry_after == 2

    expire_lock(admin_engine, name)
    assert login(client, name, PASSWORD).account == accounts.get_user(name).id
    assert accounts.get_user(name).failed_logins == 0
    assert accounts.get_user(name).throttled_until is None


def test_a_correct_password_works_once_the_lock_runs_out(accounts, client):
    name = add_user(accounts)
    for _ in range(auth.FREE_FAILURES):
        with pytest.raises(AuthError):
            login(client, name, "wrong")
    with pytest.raises(ThrottledError) as throttled:
        login(client, name, PASSWORD)
    time.sleep(throttled.value.retry_after + 0.1)  # real time: the server's clock decides
    assert login(client, name, PASSWORD).name == name


def test_new_password_ends_throttling(accounts, client):
    name = add_user(accounts)
    for _ in range(auth.FREE_FAILURES):
        with pytest.raises(AuthError):
            login(client, name, "wrong")
    accounts.set_verifier(name, make_verifier("a new one"))
    assert login(client, name, "a new one").name == name
    with pytest.raises(AuthError):
        login(client, name, PASSWORD)


def test_a_proof_is_good_for_its_nonce_and_name_only(accounts, client):
    name, other = add_user(accounts), add_user(accounts)

    def challenge(login_name):
        with client.begin() as conn:
            return conn.execute(sa.text("SELECT * FROM dfsfs_login_challenge(:n)"),
                                {"n": login_name}).one()

    def attempt(login_name, nonce, proof):
        with client.begin() as conn:
            return conn.execute(sa.text(
                "SELECT outcome FROM dfsfs_login(:n, :nonce, :proof, 'command', 'h', 1, false, 60)"),
                {"n": login_name, "nonce": nonce, "proof": proof}).scalar()

    first = challenge(name)
    parameters = auth.KdfParameters(first.kdf, bytes(first.salt), first.time_cost,
                                    first.memory_cost, first.parallelism, first.key_length)
    proof = client_proof(derive_key(PASSWORD, parameters), name, bytes(first.nonce))
    assert attempt(name, bytes(first.nonce), proof) == "ok"
    assert attempt(name, bytes(first.nonce), proof) == "failed"  # replayed
    second = challenge(other)
    assert attempt(other, bytes(second.nonce), proof) == "failed"  # another name's nonce
    third = challenge(name)
    assert attempt(name, bytes(third.nonce), proof) == "failed"  # an old proof, a new nonce
    assert attempt(name, bytes(third.nonce), b"\0" * 7) == "failed"  # not even the right length


def test_admin_sessions_only_for_administrators(accounts, client, client_url):
    plain, admin = add_user(accounts), add_user(accounts, admin=True)
    with pytest.raises(PermissionDeniedError, match="not a dfsfs administrator"):
        login(client, plain, PASSWORD, admin=True)
    result = login(client, admin, PASSWORD, admin=True)
    engine = session_engine(client_url, result, pool_size=1)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT dfsfs_sees_all()")).scalar() is True
            names = set(conn.execute(sa.text("SELECT name FROM users")).scalars())
        assert {plain, admin} <= names
    finally:
        engine.dispose()
    # An administrator's ordinary session (a mount) sees its own account only.
    engine = session_engine(client_url, login(client, admin, PASSWORD), pool_size=1)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT name FROM users")).scalars().all() == [admin]
    finally:
        engine.dispose()


def test_heartbeat_extends_and_ended_sessions_refuse_every_statement(accounts, client, client_url,
                                                                       admin_engine):
    name = add_user(accounts)
    result = login(client, name, PASSWORD, expiry_s=60)
    engine = session_engine(client_url, result, pool_size=1)
    try:
        before = result.expires_at
        time.sleep(0.01)
        assert heartbeat(engine) > before
        # Expired without a heartbeat (the server's clock is not the test's to move):
        with admin_engine.begin() as conn:
            conn.execute(sa.text("UPDATE sessions SET expires_at = now() - interval '1 s'"
                                 " WHERE id = :id"), {"id": result.session_id})
        with pytest.raises(SessionEndedError, match="expired"):
            heartbeat(engine)
        assert accounts.sessions(name)[0].end_reason == "expired"
    finally:
        engine.dispose()
    second = login(client, name, PASSWORD)
    engine = session_engine(client_url, second, pool_size=1)
    try:
        assert accounts.revoke_sessions(name) == 1
        with pytest.raises(SessionEndedError, match="ended"):
            heartbeat(engine)
        logout(engine)  # harmless once ended
        assert [s.end_reason for s in accounts.sessions(name)][:1] == ["revoked"]
    finally:
        engine.dispose()


def test_logout_ends_the_session(accounts, client, client_url):
    name = add_user(accounts)
    engine = session_engine(client_url, login(client, name, PASSWORD), pool_size=1)
    try:
        logout(engine, "unmounted")
        with pytest.raises(SessionEndedError):
            run_transaction(engine, lambda conn: conn.execute(sa.text("SELECT count(*) FROM inodes")))
        assert accounts.sessions(name)[0].end_reason == "unmounted"
    finally:
        engine.dispose()


def test_a_forged_token_is_refused(client_url):
    engine = create_engine(client_url, session_token=hashlib.sha256(b"guess").hexdigest(), pool_size=1)
    try:
        with pytest.raises(SessionEndedError):
            heartbeat(engine)
    finally:
        engine.dispose()


def test_unknown_user_costs_the_same_time_as_a_wrong_password(accounts, client):
    # Costly enough that hashing, not the database, dominates (as in production). The
    # account is the newest, so unknown names are answered with its parameters.
    name = add_user(accounts, profile=COSTLY)
    user_id = accounts.get_user(name).id

    def seconds_to_fail(login_name: str) -> float:
        start = time.perf_counter()
        with pytest.raises(AuthError, match=LOGIN_FAILED):
            login(client, login_name, "wrong")
        elapsed = time.perf_counter() - start
        with accounts.engine.begin() as conn:  # keep throttling out of the measurement
            conn.execute(sa.text("UPDATE users SET failed_logins = 0, throttled_until = NULL"
                                 " WHERE id = :id"), {"id": user_id})
        return elapsed

    seconds_to_fail(new_name())  # warm up
    samples = {"wrong": [], "unknown": []}
    for _ in range(25):  # in pairs, so that the machine's load weighs on both alike
        samples["wrong"].append(seconds_to_fail(name))
        samples["unknown"].append(seconds_to_fail(new_name()))
    # The median ratio of the pairs: a busy machine (two cores shared with other work)
    # stretches single samples, not both of a pair.
    ratio = statistics.median(u / w for w, u in zip(samples["wrong"], samples["unknown"]))
    assert 1 / 1.2 < ratio < 1.2, (ratio, samples)


@pytest.mark.parametrize("name", ["alice", "_svc", "a.b-c_9", "x" * 32, "z"])
def test_valid_user_names(name):
    assert validate_user_name(name) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must not be empty"),
        ("x" * 33, "33 characters long; at most 32"),
        ("Alice", "only lower-case letters"),
        ("9lives", "must start with a letter or '_'"),
        ("-rf", "must start with a letter or '_'"),
        ("a b", "only lower-case letters"),
        ("a/b", "only lower-case letters"),
        ("zoë", "only lower-case letters"),
    ],
)
def test_invalid_user_names(name, message):
    with pytest.raises(InvalidArgumentError, match=message):
        validate_user_name(name)


def test_the_server_checks_names_too(accounts):
    with pytest.raises(InvalidArgumentError):
        accounts.create_user("Bad Name", make_verifier(PASSWORD))


def test_password_rules():
    assert validate_password("x" * 1024) == "x" * 1024
    with pytest.raises(InvalidArgumentError, match="must not be empty"):
        make_verifier("")
    with pytest.raises(InvalidArgumentError, match="longer than 1024 bytes"):
        validate_password("é" * 513)  # 1026 bytes in UTF-8


def test_names_and_passwords_are_never_logged(accounts, client, caplog):
    caplog.set_level(logging.DEBUG, logger="dfsfs")  # (in-process CLI runs set its level)
    name = add_user(accounts)
    login(client, name, PASSWORD)
    for _ in range(auth.FREE_FAILURES + 1):
        with pytest.raises(AuthError):
            login(client, name, f"bad-{PASSWORD}")
    with pytest.raises(AuthError):
        login(client, "nobody-" + name, PASSWORD)
    assert caplog.records, "login should log (account ids only)"
    assert name not in caplog.text and PASSWORD not in caplog.text
